//! The token log-probability head shared by every training objective.
//!
//! One fused, in-place kernel pair over `[n, v]` logits: the forward turns logits into
//! probabilities (keeping only per-row scalars), the backward turns those probabilities into
//! dL/dlogits. Cross-entropy, weighted SFT losses, policy-gradient / DPO-style objectives and entropy
//! bonuses are all expressed by the caller through `dlogp` and `dentropy`, so the `[n, v]` buffer
//! is written only once per pass (it is the largest activation by far).
#![allow(clippy::too_many_arguments)]

use rayon::prelude::*;

use crate::simd;

/// Target value meaning "no target at this row" (logp and entropy reported as 0, no gradient).
pub const IGNORE: u32 = u32::MAX;

/// In place: `logits_to_probs` (`[n, v]`, `n = targets.len()`) is divided by `temperature` and
/// REPLACED by its softmax probabilities.
///
/// Writes `logp[i] = log softmax(logits_i / T)[targets[i]]` (0 for [`IGNORE`] rows) and, when
/// `Some`, `entropy[i] = -sum_j p_ij ln p_ij` (for every row, IGNORE rows included). Numerically
/// stable: max-subtraction, and the log-sum-exp never exponentiates a positive number.
pub fn token_logprob_forward(
    logits_to_probs: &mut [f32],
    targets: &[u32],
    temperature: f32,
    logp: &mut [f32],
    entropy: Option<&mut [f32]>,
    v: usize,
) {
    let _span = crate::profile::span(crate::profile::Kind::Loss);
    let n = targets.len();
    assert!(
        logits_to_probs.len() >= n * v,
        "token_logprob_forward: logits too small"
    );
    assert!(logp.len() >= n, "token_logprob_forward: logp too small");
    assert!(
        temperature > 0.0,
        "token_logprob_forward: temperature must be > 0"
    );
    if n == 0 || v == 0 {
        return;
    }
    let rows = logits_to_probs[..n * v]
        .par_chunks_mut(v)
        .zip(targets.par_iter())
        .zip(logp[..n].par_iter_mut());
    match entropy {
        Some(entropy) => {
            assert!(
                entropy.len() >= n,
                "token_logprob_forward: entropy too small"
            );
            rows.zip(entropy[..n].par_iter_mut())
                .for_each(|(((row, &tgt), lp), h)| {
                    (*lp, *h) = logprob_row_forward(row, tgt, temperature);
                });
        }
        None => rows.for_each(|((row, &tgt), lp)| {
            *lp = logprob_row_forward(row, tgt, temperature).0;
        }),
    }
}

simd::multiversion! {
    /// One row: logits -> probabilities in place; returns (logp of the target, entropy).
    fn logprob_row_forward(row: &mut [f32], target: u32, temperature: f32) -> (f32, f32) {
        assert!(target == IGNORE || (target as usize) < row.len(), "token_logprob: target {target} out of range");
        if temperature != 1.0 {
            for z in row.iter_mut() {
                *z /= temperature;
            }
        }
        let mx = simd::max(row);
        let z_target = if target == IGNORE { 0.0 } else { row[target as usize] };
        // One pass: e = exp(z - max) stored in place, with sum(e) and sum(e * (z - max)) on the side.
        // H = ln S - sum(e d) / S follows from ln p = d - ln S, so no second exp/log pass is needed.
        let mut acc_s = [0.0f32; simd::LANES];
        let mut acc_ed = [0.0f32; simd::LANES];
        let mut it = row.chunks_exact_mut(simd::LANES);
        for ch in &mut it {
            for ((z, s), ed) in ch.iter_mut().zip(&mut acc_s).zip(&mut acc_ed) {
                let d = *z - mx;
                let e = simd::exp(d);
                *z = e;
                *s += e;
                // max(-88): a -inf logit has e = 0 and must add 0, not 0 * -inf = NaN.
                *ed += e * d.max(-88.0);
            }
        }
        for ((z, s), ed) in it.into_remainder().iter_mut().zip(&mut acc_s).zip(&mut acc_ed) {
            let d = *z - mx;
            let e = simd::exp(d);
            *z = e;
            *s += e;
            *ed += e * d.max(-88.0);
        }
        let s = simd::sum(&acc_s);
        let ln_s = s.ln();
        let inv = 1.0 / s;
        for z in row.iter_mut() {
            *z *= inv;
        }
        let entropy = ln_s - simd::sum(&acc_ed) * inv;
        let logp = if target == IGNORE { 0.0 } else { z_target - mx - ln_s };
        (logp, entropy)
    }
}

simd::multiversion! {
    /// Unnormalised softmax weights of one row at a temperature: `w[i] = exp((x[i] - max) / t)`
    /// with `max` the row's largest value (so the largest weight is 1), given `inv_t = 1 / t`;
    /// returns their sum. For sampling a token without a pass of scalar `exp`s.
    pub fn softmax_weights(w: &mut [f32], x: &[f32], inv_t: f32) -> f32 {
        assert_eq!(w.len(), x.len(), "softmax_weights: length mismatch");
        let mx = simd::max(x);
        let mut acc = [0.0f32; simd::LANES];
        let mut wi = w.chunks_exact_mut(simd::LANES);
        let mut xi = x.chunks_exact(simd::LANES);
        for (wc, xc) in (&mut wi).zip(&mut xi) {
            for ((o, &v), a) in wc.iter_mut().zip(xc).zip(&mut acc) {
                let e = simd::exp((v - mx) * inv_t);
                *o = e;
                *a += e;
            }
        }
        for ((o, &v), a) in wi.into_remainder().iter_mut().zip(xi.remainder()).zip(&mut acc) {
            let e = simd::exp((v - mx) * inv_t);
            *o = e;
            *a += e;
        }
        simd::sum(&acc)
    }
}

/// In place: the probabilities left by [`token_logprob_forward`] are REPLACED by d(loss)/d(logits)
/// (overwritten, not accumulated: the buffer is the forward's), given `dlogp[i] = dL/dlogp_i` and
/// optionally `dentropy[i] = dL/dH_i`:
///
/// `dz_ij = ( dlogp_i (onehot(targets_i)_j - p_ij) + dentropy_i (-p_ij (ln p_ij + H_i)) ) / T`
///
/// with `H_i` recomputed from the row. IGNORE rows contribute no `dlogp` term; rows whose
/// coefficients are all zero become zero rows. Cross-entropy with per-token weights `w_i` is the
/// special case `dlogp_i = -w_i / norm`.
pub fn token_logprob_backward(
    probs_to_dlogits: &mut [f32],
    targets: &[u32],
    temperature: f32,
    dlogp: &[f32],
    dentropy: Option<&[f32]>,
    v: usize,
) {
    let _span = crate::profile::span(crate::profile::Kind::Loss);
    let n = targets.len();
    assert!(
        probs_to_dlogits.len() >= n * v,
        "token_logprob_backward: probs too small"
    );
    assert!(dlogp.len() >= n, "token_logprob_backward: dlogp too small");
    if let Some(dh) = dentropy {
        assert!(dh.len() >= n, "token_logprob_backward: dentropy too small");
    }
    if n == 0 || v == 0 {
        return;
    }
    let inv_t = 1.0 / temperature;
    let rows = probs_to_dlogits[..n * v]
        .par_chunks_mut(v)
        .zip(targets.par_iter())
        .enumerate();
    let coef = |i: usize, tgt: u32| if tgt == IGNORE { 0.0 } else { dlogp[i] };
    match dentropy {
        None => rows.for_each(|(i, (row, &tgt))| {
            logprob_row_backward(row, &mut [], tgt, coef(i, tgt), 0.0, inv_t);
        }),
        // Scratch row for ln p, so the entropy term takes one log per element, not two.
        Some(dh) => rows.for_each_init(
            || vec![0.0f32; v],
            |lnp, (i, (row, &tgt))| logprob_row_backward(row, lnp, tgt, coef(i, tgt), dh[i], inv_t),
        ),
    }
}

simd::multiversion! {
    /// One row: probabilities -> gradient, given the row's dlogp coefficient `a` (already 0 for IGNORE)
    /// and entropy coefficient `hc`. `lnp` is scratch of the row's length (may be empty if `hc == 0`).
    fn logprob_row_backward(row: &mut [f32], lnp: &mut [f32], target: u32, a: f32, hc: f32, inv_t: f32) {
        assert!(target == IGNORE || (target as usize) < row.len(), "token_logprob: target {target} out of range");
        if a == 0.0 && hc == 0.0 {
            row.fill(0.0);
            return;
        }
        if hc == 0.0 {
            // Plain log-likelihood gradient: -a p / T everywhere, + a / T at the target.
            let k = -a * inv_t;
            for p in row.iter_mut() {
                *p *= k;
            }
        } else {
            let lnp = &mut lnp[..row.len()];
            // H = -sum p ln p (ln(0) is finite here, so p = 0 contributes exactly 0).
            let mut acc = [0.0f32; simd::LANES];
            let mut it = row.chunks_exact(simd::LANES);
            let mut it_l = lnp.chunks_exact_mut(simd::LANES);
            for (ch, chl) in (&mut it).zip(&mut it_l) {
                for ((s, &p), l) in acc.iter_mut().zip(ch).zip(chl) {
                    *l = simd::ln(p);
                    *s += p * *l;
                }
            }
            for ((s, &p), l) in acc.iter_mut().zip(it.remainder()).zip(it_l.into_remainder()) {
                *l = simd::ln(p);
                *s += p * *l;
            }
            let h = -simd::sum(&acc);
            for (p, &l) in row.iter_mut().zip(&*lnp) {
                let pv = *p;
                *p = (-a * pv - hc * pv * (l + h)) * inv_t;
            }
        }
        if target != IGNORE {
            row[target as usize] += a * inv_t;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    const V: usize = 9;

    fn reference(logits: &[f32], targets: &[u32], temp: f32) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut probs, mut logp, mut ent) = (vec![], vec![], vec![]);
        for (row, &tgt) in logits.chunks(V).zip(targets) {
            let z: Vec<f64> = row.iter().map(|&x| x as f64 / temp as f64).collect();
            let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
            let lp: Vec<f64> = z.iter().map(|v| v - lse).collect();
            logp.push(if tgt == IGNORE { 0.0 } else { lp[tgt as usize] });
            ent.push(-lp.iter().map(|l| l.exp() * l).sum::<f64>());
            probs.extend(lp.iter().map(|l| l.exp()));
        }
        (probs, logp, ent)
    }

    #[test]
    fn forward_matches_reference() {
        let mut rng = rng(50);
        let targets = vec![3u32, IGNORE, 0, 8, 5];
        let n = targets.len();
        let logits: Vec<f32> = randn(&mut rng, n * V, 4.0)
            .iter()
            .map(|v| v + 100.0)
            .collect(); // large offset: stability
        for temp in [1.0f32, 0.7, 1.6] {
            let mut buf = logits.clone();
            let (mut logp, mut ent) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            token_logprob_forward(&mut buf, &targets, temp, &mut logp, Some(&mut ent), V);
            let (rp, rl, re) = reference(&logits, &targets, temp);
            assert_close(&buf, &rp, 1e-5, "probs");
            assert_close(&logp, &rl, 1e-5, "logp");
            assert_close(&ent, &re, 1e-5, "entropy");
            assert_eq!(logp[1], 0.0);
            // Without entropy the other outputs are identical.
            let mut buf2 = logits.clone();
            let mut logp2 = vec![0.0; n];
            token_logprob_forward(&mut buf2, &targets, temp, &mut logp2, None, V);
            assert_eq!(buf, buf2);
            assert_eq!(logp, logp2);
        }
        // -inf logits (e.g. banned tokens) give p = 0 and no NaN in logp or entropy.
        let mut row = vec![0.5f32, f32::NEG_INFINITY, 1.0];
        let (mut lp, mut h) = ([0.0], [0.0]);
        token_logprob_forward(&mut row, &[0], 1.0, &mut lp, Some(&mut h), 3);
        assert_eq!(row[1], 0.0);
        assert!(lp[0].is_finite() && h[0].is_finite());
    }

    /// L = sum_i wl_i logp_i + we_i H_i, through the forward, as a function of the raw logits.
    fn loss(logits: &[f32], targets: &[u32], temp: f32, wl: &[f32], we: Option<&[f32]>) -> f64 {
        let n = targets.len();
        let mut buf = logits.to_vec();
        let (mut logp, mut ent) = (vec![0.0; n], vec![0.0; n]);
        token_logprob_forward(&mut buf, targets, temp, &mut logp, Some(&mut ent), V);
        weighted_sum(&logp, wl) + we.map_or(0.0, |we| weighted_sum(&ent, we))
    }

    fn grad(
        logits: &[f32],
        targets: &[u32],
        temp: f32,
        wl: &[f32],
        we: Option<&[f32]>,
    ) -> Vec<f32> {
        let n = targets.len();
        let mut buf = logits.to_vec();
        let mut logp = vec![0.0; n];
        token_logprob_forward(&mut buf, targets, temp, &mut logp, None, V);
        token_logprob_backward(&mut buf, targets, temp, wl, we, V);
        buf
    }

    #[test]
    fn backward_finite_differences() {
        let mut rng = rng(51);
        let targets = vec![3u32, IGNORE, 0, 8, 5, IGNORE];
        let n = targets.len();
        let logits = randn(&mut rng, n * V, 2.0);
        let wl = randn(&mut rng, n, 1.0);
        let mut we = randn(&mut rng, n, 1.0);
        we[2] = 0.0; // a row with only the logp term
        for temp in [1.0f32, 0.6, 1.7] {
            for we in [None, Some(&we[..])] {
                let g = grad(&logits, &targets, temp, &wl, we);
                let num = numgrad(&logits, 1e-2, |x| loss(x, &targets, temp, &wl, we));
                assert_grad(
                    &g,
                    &num,
                    &format!("token_logprob T={temp} entropy={}", we.is_some()),
                );
            }
        }
    }

    #[test]
    fn zero_coefficients_give_zero_rows_and_cross_entropy() {
        let mut rng = rng(52);
        let targets = vec![1u32, IGNORE, 4];
        let logits = randn(&mut rng, 3 * V, 2.0);
        // Row 0: zero coefficients; row 1: IGNORE and no entropy term; row 2: cross-entropy weight 0.5.
        let g = grad(
            &logits,
            &targets,
            1.0,
            &[0.0, 3.0, -0.5],
            Some(&[0.0, 0.0, 0.0]),
        );
        assert!(g[..2 * V].iter().all(|&x| x == 0.0));
        let (rp, _, _) = reference(&logits, &targets, 1.0);
        let want: Vec<f64> = (0..V)
            .map(|j| 0.5 * (rp[2 * V + j] - if j == 4 { 1.0 } else { 0.0 }))
            .collect();
        assert_close(&g[2 * V..], &want, 1e-6, "weighted cross-entropy");
    }

    #[test]
    fn softmax_weights_match_exp() {
        let mut rng = rng(12);
        for len in [1, 15, 17, 8192] {
            let x = randn(&mut rng, len, 4.0);
            for t in [1.0f32, 0.7, 2.5] {
                let mut w = vec![0.0; len];
                let total = softmax_weights(&mut w, &x, 1.0 / t);
                let mx = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let want: Vec<f64> = x
                    .iter()
                    .map(|&v| ((v as f64 - mx) / t as f64).exp())
                    .collect();
                assert_close(&w, &want, 1e-6, "softmax weights");
                let sum: f64 = want.iter().sum();
                assert!(
                    (total as f64 - sum).abs() <= 1e-5 * sum,
                    "sum {total} vs {sum}"
                );
            }
        }
    }

    #[test]
    fn deterministic() {
        let mut rng = rng(53);
        let (n, v) = (64, 1000);
        let logits = randn(&mut rng, n * v, 5.0);
        let targets: Vec<u32> = (0..n)
            .map(|i| {
                if i % 7 == 0 {
                    IGNORE
                } else {
                    (i * 31 % v) as u32
                }
            })
            .collect();
        let dl = randn(&mut rng, n, 1.0);
        let dh = randn(&mut rng, n, 1.0);
        let run = || {
            let mut buf = logits.clone();
            let (mut lp, mut h) = (vec![0.0; n], vec![0.0; n]);
            token_logprob_forward(&mut buf, &targets, 0.9, &mut lp, Some(&mut h), v);
            token_logprob_backward(&mut buf, &targets, 0.9, &dl, Some(&dh), v);
            (buf, lp, h)
        };
        assert_bits_eq(&run(), &run());
    }
}
