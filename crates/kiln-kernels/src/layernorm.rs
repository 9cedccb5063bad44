//! LayerNorm over the last dimension, as in GPT-2 (biased variance, eps inside the sqrt).
#![allow(clippy::too_many_arguments)]

use rayon::prelude::*;

use crate::simd;

/// The epsilon GPT-2 uses (`layer_norm_epsilon` in the HF config).
pub const LN_EPS: f32 = 1e-5;

/// Minimum rows per task in the backward: each task keeps private dw/db partials, summed afterwards
/// in task order, so the result is deterministic whatever the thread count.
const ROW_BLOCK: usize = 32;

/// `out = (inp - mean) * rstd * w + b` for each of the `n` rows of `c` channels.
///
/// Saves `mean[n]` and `rstd[n] = 1/sqrt(var + eps)` for the backward.
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    c: usize,
) {
    let _span = crate::profile::span(crate::profile::Kind::Norm);
    if n == 0 || c == 0 {
        return;
    }
    let (w, b) = (&w[..c], &b[..c]);
    out[..n * c]
        .par_chunks_mut(c)
        .zip(inp[..n * c].par_chunks(c))
        .zip(mean[..n].par_iter_mut().zip(rstd[..n].par_iter_mut()))
        .for_each(|((o, x), (m, r))| (*m, *r) = ln_row_forward(o, x, w, b));
}

simd::multiversion! {
    /// One row of the forward; returns (mean, rstd).
    fn ln_row_forward(out: &mut [f32], x: &[f32], w: &[f32], b: &[f32]) -> (f32, f32) {
        let c = x.len();
        let mean = simd::sum(x) / c as f32;
        // Two passes (variance of the centred values) instead of E[x^2] - E[x]^2: no cancellation.
        let mut var_acc = [0.0f32; simd::LANES];
        let mut it = x.chunks_exact(simd::LANES);
        for ch in &mut it {
            for (a, &v) in var_acc.iter_mut().zip(ch) {
                let d = v - mean;
                *a += d * d;
            }
        }
        let mut var: f32 = it.remainder().iter().map(|&v| (v - mean) * (v - mean)).sum();
        var += simd::sum(&var_acc);
        let var = var / c as f32;
        let rstd = 1.0 / (var + LN_EPS).sqrt();
        let (out, w, b) = (&mut out[..c], &w[..c], &b[..c]);
        for (((o, &v), &wj), &bj) in out.iter_mut().zip(x).zip(w).zip(b) {
            *o = (v - mean) * rstd * wj + bj;
        }
        (mean, rstd)
    }
}

/// Backward of [`layernorm_forward`], accumulating into `dinp`, `dw`, `db`.
///
/// With `norm = (x - mean) * rstd` and `g = w * dout`:
/// `dinp += rstd * (g - mean(g) - norm * mean(g * norm))`, `dw += sum_rows norm * dout`,
/// `db += sum_rows dout`.
pub fn layernorm_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    let _span = crate::profile::span(crate::profile::Kind::Norm);
    if n == 0 || c == 0 {
        return;
    }
    let w = &w[..c];
    // Per-block partials: [dw | db] for each block of `rb` rows.
    let rb = simd::rows_per_block(n, ROW_BLOCK);
    let nblocks = n.div_ceil(rb);
    let mut partials = vec![0.0f32; nblocks * 2 * c];
    let bc = rb * c;
    partials
        .par_chunks_mut(2 * c)
        .zip(dinp[..n * c].par_chunks_mut(bc))
        .zip(
            dout[..n * c]
                .par_chunks(bc)
                .zip(inp[..n * c].par_chunks(bc)),
        )
        .zip(mean[..n].par_chunks(rb).zip(rstd[..n].par_chunks(rb)))
        .for_each(|(((part, dinp), (dout, inp)), (mean, rstd))| {
            let (pdw, pdb) = part.split_at_mut(c);
            for ((((di, dy), x), &m), &r) in dinp
                .chunks_exact_mut(c)
                .zip(dout.chunks_exact(c))
                .zip(inp.chunks_exact(c))
                .zip(mean)
                .zip(rstd)
            {
                ln_row_backward(di, pdw, pdb, dy, x, w, m, r);
            }
        });
    let (dw, db) = (&mut dw[..c], &mut db[..c]);
    for part in partials.chunks_exact(2 * c) {
        add_row(dw, &part[..c]);
        add_row(db, &part[c..]);
    }
}

simd::multiversion! {
    /// One row of the backward; adds this row's dw/db contributions into the block partials.
    fn ln_row_backward(
        dinp: &mut [f32],
        pdw: &mut [f32],
        pdb: &mut [f32],
        dout: &[f32],
        x: &[f32],
        w: &[f32],
        mean: f32,
        rstd: f32,
    ) {
        let c = x.len();
        let (dinp, pdw, pdb, dout, w) = (&mut dinp[..c], &mut pdw[..c], &mut pdb[..c], &dout[..c], &w[..c]);
        // Two reductions over the row: mean(g) and mean(g * norm), with g = w * dout.
        let mut acc_g = [0.0f32; simd::LANES];
        let mut acc_gn = [0.0f32; simd::LANES];
        let mut tail_g = 0.0f32;
        let mut tail_gn = 0.0f32;
        let split = c - c % simd::LANES;
        for ((dy, xs), ws) in dout[..split]
            .chunks_exact(simd::LANES)
            .zip(x[..split].chunks_exact(simd::LANES))
            .zip(w[..split].chunks_exact(simd::LANES))
        {
            for k in 0..simd::LANES {
                let g = ws[k] * dy[k];
                acc_g[k] += g;
                acc_gn[k] += g * ((xs[k] - mean) * rstd);
            }
        }
        for j in split..c {
            let g = w[j] * dout[j];
            tail_g += g;
            tail_gn += g * ((x[j] - mean) * rstd);
        }
        let mean_g = (simd::sum(&acc_g) + tail_g) / c as f32;
        let mean_gn = (simd::sum(&acc_gn) + tail_gn) / c as f32;
        for j in 0..c {
            let norm = (x[j] - mean) * rstd;
            let g = w[j] * dout[j];
            dinp[j] += rstd * (g - mean_g - norm * mean_gn);
            pdw[j] += norm * dout[j];
            pdb[j] += dout[j];
        }
    }
}

simd::multiversion! {
    fn add_row(out: &mut [f32], x: &[f32]) {
        simd::add_to(out, x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn forward(inp: &[f32], w: &[f32], b: &[f32], n: usize, c: usize) -> Vec<f32> {
        let mut out = vec![0.0; n * c];
        let (mut m, mut r) = (vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut out, &mut m, &mut r, inp, w, b, n, c);
        out
    }

    #[test]
    fn forward_matches_reference() {
        let mut rng = rng(10);
        let (n, c) = (5, 37);
        let inp: Vec<f32> = randn(&mut rng, n * c, 2.0)
            .iter()
            .map(|v| v + 3.0)
            .collect();
        let w = randn(&mut rng, c, 1.0);
        let b = randn(&mut rng, c, 1.0);
        let mut out = vec![0.0; n * c];
        let (mut mean, mut rstd) = (vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &b, n, c);
        let mut want = vec![0.0f64; n * c];
        for r in 0..n {
            let x = &inp[r * c..(r + 1) * c];
            let m = x.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var = x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / c as f64;
            let rs = 1.0 / (var + LN_EPS as f64).sqrt();
            assert!((mean[r] as f64 - m).abs() < 1e-5);
            assert!((rstd[r] as f64 - rs).abs() < 1e-5 * rs);
            for j in 0..c {
                want[r * c + j] = (x[j] as f64 - m) * rs * w[j] as f64 + b[j] as f64;
            }
        }
        assert_close(&out, &want, 1e-5, "layernorm forward");
    }

    #[test]
    fn backward_finite_differences() {
        let mut rng = rng(11);
        // c > LANES so both the vector body and the tail run; n > ROW_BLOCK for several partials.
        let (n, c) = (ROW_BLOCK + 3, simd::LANES + 5);
        assert!(simd::rows_per_block(n, ROW_BLOCK) < n);
        let inp = randn(&mut rng, n * c, 1.0);
        let w = randn(&mut rng, c, 1.0);
        let b = randn(&mut rng, c, 1.0);
        let lw = randn(&mut rng, n * c, 1.0);
        let mut out = vec![0.0; n * c];
        let (mut mean, mut rstd) = (vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &b, n, c);
        let g0 = -0.5f32;
        let (mut dinp, mut dw, mut db) = (vec![g0; n * c], vec![g0; c], vec![g0; c]);
        layernorm_backward(
            &mut dinp, &mut dw, &mut db, &lw, &inp, &w, &mean, &rstd, n, c,
        );
        let sub = |g: &[f32]| g.iter().map(|v| v - g0).collect::<Vec<_>>();
        let num = numgrad(&inp, 1e-2, |x| weighted_sum(&forward(x, &w, &b, n, c), &lw));
        assert_grad(&sub(&dinp), &num, "layernorm dinp");
        let num = numgrad(&w, 1e-2, |x| weighted_sum(&forward(&inp, x, &b, n, c), &lw));
        assert_grad(&sub(&dw), &num, "layernorm dw");
        let num = numgrad(&b, 1e-2, |x| weighted_sum(&forward(&inp, &w, x, n, c), &lw));
        assert_grad(&sub(&db), &num, "layernorm db");
    }

    #[test]
    fn deterministic() {
        let mut rng = rng(12);
        let (n, c) = (300, 70);
        let inp = randn(&mut rng, n * c, 1.0);
        let w = randn(&mut rng, c, 1.0);
        let b = randn(&mut rng, c, 1.0);
        let dout = randn(&mut rng, n * c, 1.0);
        let run = || {
            let mut out = vec![0.0; n * c];
            let (mut mean, mut rstd) = (vec![0.0; n], vec![0.0; n]);
            layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &b, n, c);
            let (mut dinp, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
            layernorm_backward(
                &mut dinp, &mut dw, &mut db, &dout, &inp, &w, &mean, &rstd, n, c,
            );
            (out, dinp, dw, db)
        };
        assert_bits_eq(&run(), &run());
    }
}
