//! RMSNorm over the last dimension, as in Llama (`LlamaRMSNorm`): no mean subtraction and no bias,
//! `eps` inside the sqrt, computed in f32.
#![allow(clippy::too_many_arguments)]

use rayon::prelude::*;

use crate::simd;

/// Minimum rows per task in the backward: each task keeps a private dw partial, summed afterwards in
/// task order, so the result is deterministic whatever the thread count.
const ROW_BLOCK: usize = 32;

/// out = inp * rstd * w with rstd = 1/sqrt(mean(inp^2) + eps), per row of c channels (Llama's
/// RMSNorm, computed in f32). Saves rstd[n].
pub fn rmsnorm_forward(
    out: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    w: &[f32],
    n: usize,
    c: usize,
    eps: f32,
) {
    let _span = crate::profile::span(crate::profile::Kind::Norm);
    if n == 0 || c == 0 {
        return;
    }
    let w = &w[..c];
    out[..n * c]
        .par_chunks_mut(c)
        .zip(inp[..n * c].par_chunks(c))
        .zip(rstd[..n].par_iter_mut())
        .for_each(|((o, x), r)| *r = rms_row_forward(o, x, w, eps));
}

simd::multiversion! {
    /// One row of the forward; returns rstd.
    fn rms_row_forward(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 {
        let c = x.len();
        let rstd = 1.0 / (simd::dot(x, x) / c as f32 + eps).sqrt();
        let (out, w) = (&mut out[..c], &w[..c]);
        for ((o, &v), &wj) in out.iter_mut().zip(x).zip(w) {
            *o = v * rstd * wj;
        }
        rstd
    }
}

/// Backward, ACCUMULATING into dinp [n,c] and dw [c] (dw deterministic: per-task partials summed in
/// task order, as layernorm_backward does).
///
/// With `norm = x * rstd` and `g = w * dout`: `dinp += rstd * (g - norm * mean(g * norm))`,
/// `dw += sum_rows norm * dout`.
pub fn rmsnorm_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    let _span = crate::profile::span(crate::profile::Kind::Norm);
    if n == 0 || c == 0 {
        return;
    }
    let w = &w[..c];
    let rb = simd::rows_per_block(n, ROW_BLOCK);
    let nblocks = n.div_ceil(rb);
    let mut partials = vec![0.0f32; nblocks * c];
    let bc = rb * c;
    partials
        .par_chunks_mut(c)
        .zip(dinp[..n * c].par_chunks_mut(bc))
        .zip(
            dout[..n * c]
                .par_chunks(bc)
                .zip(inp[..n * c].par_chunks(bc)),
        )
        .zip(rstd[..n].par_chunks(rb))
        .for_each(|(((pdw, dinp), (dout, inp)), rstd)| {
            for (((di, dy), x), &r) in dinp
                .chunks_exact_mut(c)
                .zip(dout.chunks_exact(c))
                .zip(inp.chunks_exact(c))
                .zip(rstd)
            {
                rms_row_backward(di, pdw, dy, x, w, r);
            }
        });
    let dw = &mut dw[..c];
    for part in partials.chunks_exact(c) {
        add_row(dw, part);
    }
}

simd::multiversion! {
    /// One row of the backward; adds this row's dw contribution into the block partial.
    fn rms_row_backward(dinp: &mut [f32], pdw: &mut [f32], dout: &[f32], x: &[f32], w: &[f32], rstd: f32) {
        let c = x.len();
        let (dinp, pdw, dout, w) = (&mut dinp[..c], &mut pdw[..c], &dout[..c], &w[..c]);
        // mean(g * norm) = rstd * mean(w * dout * x).
        let mut acc = [0.0f32; simd::LANES];
        let mut tail = 0.0f32;
        let split = c - c % simd::LANES;
        for ((dy, xs), ws) in dout[..split]
            .chunks_exact(simd::LANES)
            .zip(x[..split].chunks_exact(simd::LANES))
            .zip(w[..split].chunks_exact(simd::LANES))
        {
            for k in 0..simd::LANES {
                acc[k] += ws[k] * dy[k] * xs[k];
            }
        }
        for j in split..c {
            tail += w[j] * dout[j] * x[j];
        }
        let mean_gn = (simd::sum(&acc) + tail) * rstd / c as f32;
        for j in 0..c {
            let norm = x[j] * rstd;
            dinp[j] += rstd * (w[j] * dout[j] - norm * mean_gn);
            pdw[j] += norm * dout[j];
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

    const EPS: f32 = 1e-5;

    fn forward(inp: &[f32], w: &[f32], n: usize, c: usize) -> Vec<f32> {
        let mut out = vec![0.0; n * c];
        let mut r = vec![0.0; n];
        rmsnorm_forward(&mut out, &mut r, inp, w, n, c, EPS);
        out
    }

    #[test]
    fn forward_matches_reference() {
        let mut rng = rng(50);
        // c > LANES: the vector body and the tail both run. Offset inputs: RMS is not the std.
        let (n, c) = (5, simd::LANES + 7);
        let inp: Vec<f32> = randn(&mut rng, n * c, 2.0)
            .iter()
            .map(|v| v + 1.5)
            .collect();
        let w = randn(&mut rng, c, 1.0);
        for eps in [EPS, 1e-6, 0.5] {
            let mut out = vec![f32::NAN; n * c];
            let mut rstd = vec![f32::NAN; n];
            rmsnorm_forward(&mut out, &mut rstd, &inp, &w, n, c, eps);
            let mut want = vec![0.0f64; n * c];
            for r in 0..n {
                let x = &inp[r * c..(r + 1) * c];
                let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / c as f64;
                let rs = 1.0 / (ms + eps as f64).sqrt();
                assert!((rstd[r] as f64 - rs).abs() < 1e-6 * rs, "rstd row {r}");
                for j in 0..c {
                    want[r * c + j] = x[j] as f64 * rs * w[j] as f64;
                }
            }
            assert_close(&out, &want, 1e-5, "rmsnorm forward");
        }
    }

    #[test]
    fn zero_row_is_finite() {
        let (n, c) = (2, 8);
        let inp = [vec![0.0; c], vec![1.0; c]].concat();
        let w = vec![2.0; c];
        let mut out = vec![f32::NAN; n * c];
        let mut rstd = vec![0.0; n];
        rmsnorm_forward(&mut out, &mut rstd, &inp, &w, n, c, EPS);
        assert!(out[..c].iter().all(|&v| v == 0.0));
        assert!((rstd[0] - 1.0 / EPS.sqrt()).abs() < 1.0);
        assert!(out[c..].iter().all(|&v| (v - 2.0).abs() < 1e-4));
    }

    #[test]
    fn backward_finite_differences() {
        let mut rng = rng(51);
        // n > ROW_BLOCK for several partials, c > LANES for the vector body and the tail.
        let (n, c) = (ROW_BLOCK + 3, simd::LANES + 5);
        assert!(simd::rows_per_block(n, ROW_BLOCK) < n);
        let inp: Vec<f32> = randn(&mut rng, n * c, 1.0)
            .iter()
            .map(|v| v + 0.3)
            .collect();
        let w = randn(&mut rng, c, 1.0);
        let lw = randn(&mut rng, n * c, 1.0);
        let mut out = vec![0.0; n * c];
        let mut rstd = vec![0.0; n];
        rmsnorm_forward(&mut out, &mut rstd, &inp, &w, n, c, EPS);
        // Accumulates: start from a non-zero gradient and subtract it.
        let g0 = -0.5f32;
        let (mut dinp, mut dw) = (vec![g0; n * c], vec![g0; c]);
        rmsnorm_backward(&mut dinp, &mut dw, &lw, &inp, &w, &rstd, n, c);
        let sub = |g: &[f32]| g.iter().map(|v| v - g0).collect::<Vec<_>>();
        let num = numgrad(&inp, 1e-2, |x| weighted_sum(&forward(x, &w, n, c), &lw));
        assert_grad(&sub(&dinp), &num, "rmsnorm dinp");
        let num = numgrad(&w, 1e-2, |x| weighted_sum(&forward(&inp, x, n, c), &lw));
        assert_grad(&sub(&dw), &num, "rmsnorm dw");
    }

    #[test]
    fn deterministic_across_thread_counts() {
        let mut rng = rng(52);
        let (n, c) = (300, 70);
        let inp = randn(&mut rng, n * c, 1.0);
        let w = randn(&mut rng, c, 1.0);
        let dout = randn(&mut rng, n * c, 1.0);
        let run = || {
            let mut out = vec![0.0; n * c];
            let mut rstd = vec![0.0; n];
            rmsnorm_forward(&mut out, &mut rstd, &inp, &w, n, c, EPS);
            let (mut dinp, mut dw) = (vec![0.0; n * c], vec![0.0; c]);
            rmsnorm_backward(&mut dinp, &mut dw, &dout, &inp, &w, &rstd, n, c);
            (out, rstd, dinp, dw)
        };
        let reference = run();
        assert_bits_eq(&reference, &run());
        assert_thread_independent(&reference, run);
    }
}
