//! SwiGLU, the gated MLP activation of Llama: `silu(gate) * up`, with gate and up side by side in
//! one buffer so a single fused matmul produces both.
//!
//! `silu(x) = x * sigmoid(x)`; as in [`crate::gelu`], one vectorised `exp` and one division per
//! element.

use rayon::prelude::*;

use crate::simd;

/// Output elements per rayon task (rounded to whole rows): fixed, and large enough to amortise
/// scheduling.
const CHUNK: usize = 1 << 14;

/// Rows per task for rows of `f` outputs.
fn rows_per_task(f: usize) -> usize {
    (CHUNK / f).max(1)
}

/// gu: [n, 2f], gate in columns 0..f and up in f..2f of each row (one fused matmul makes both);
/// out[n, f] = silu(gate) * up, silu(x) = x / (1 + exp(-x)).
pub fn swiglu_forward(out: &mut [f32], gu: &[f32], n: usize, f: usize) {
    let _span = crate::profile::span(crate::profile::Kind::Activation);
    assert!(gu.len() >= n * 2 * f, "swiglu_forward: gu too small");
    assert!(out.len() >= n * f, "swiglu_forward: out too small");
    if n == 0 || f == 0 {
        return;
    }
    let rows = rows_per_task(f);
    out[..n * f]
        .par_chunks_mut(rows * f)
        .zip(gu[..n * 2 * f].par_chunks(rows * 2 * f))
        .for_each(|(o, gu)| {
            for (o, gu) in o.chunks_exact_mut(f).zip(gu.chunks_exact(2 * f)) {
                swiglu_row_forward(o, gu);
            }
        });
}

simd::multiversion! {
    fn swiglu_row_forward(out: &mut [f32], gu: &[f32]) {
        let f = out.len();
        let (gate, up) = gu[..2 * f].split_at(f);
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + simd::exp(-g)) * u;
        }
    }
}

/// Backward: OVERWRITES dgu [n, 2f] from dout [n, f] (no zeroing pass needed).
///
/// With `s = sigmoid(gate)`: `dgate = dout * up * s * (1 + gate * (1 - s))`,
/// `dup = dout * silu(gate)`.
pub fn swiglu_backward(dgu: &mut [f32], gu: &[f32], dout: &[f32], n: usize, f: usize) {
    let _span = crate::profile::span(crate::profile::Kind::Activation);
    assert!(gu.len() >= n * 2 * f, "swiglu_backward: gu too small");
    assert!(dgu.len() >= n * 2 * f, "swiglu_backward: dgu too small");
    assert!(dout.len() >= n * f, "swiglu_backward: dout too small");
    if n == 0 || f == 0 {
        return;
    }
    let rows = rows_per_task(f);
    dgu[..n * 2 * f]
        .par_chunks_mut(rows * 2 * f)
        .zip(
            gu[..n * 2 * f]
                .par_chunks(rows * 2 * f)
                .zip(dout[..n * f].par_chunks(rows * f)),
        )
        .for_each(|(d, (gu, dy))| {
            for ((d, gu), dy) in d
                .chunks_exact_mut(2 * f)
                .zip(gu.chunks_exact(2 * f))
                .zip(dy.chunks_exact(f))
            {
                swiglu_row_backward(d, gu, dy);
            }
        });
}

simd::multiversion! {
    fn swiglu_row_backward(dgu: &mut [f32], gu: &[f32], dout: &[f32]) {
        let f = dout.len();
        let (dgate, dup) = dgu[..2 * f].split_at_mut(f);
        let (gate, up) = gu[..2 * f].split_at(f);
        for ((((dg, du), &g), &u), &dy) in dgate
            .iter_mut()
            .zip(dup.iter_mut())
            .zip(gate)
            .zip(up)
            .zip(dout)
        {
            let s = 1.0 / (1.0 + simd::exp(-g));
            *du = dy * g * s;
            *dg = dy * u * (s + g * s * (1.0 - s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn forward(gu: &[f32], n: usize, f: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; n * f];
        swiglu_forward(&mut out, gu, n, f);
        out
    }

    #[test]
    fn forward_matches_reference() {
        let mut rng = rng(70);
        let (n, f) = (7, 45);
        let mut gu = randn(&mut rng, n * 2 * f, 6.0);
        gu[..4].copy_from_slice(&[0.0, -30.0, 30.0, 1e-6]);
        let out = forward(&gu, n, f);
        let mut want = vec![0.0f64; n * f];
        for r in 0..n {
            for j in 0..f {
                let g = gu[r * 2 * f + j] as f64;
                let u = gu[r * 2 * f + f + j] as f64;
                want[r * f + j] = g / (1.0 + (-g).exp()) * u;
            }
        }
        assert_close(&out, &want, 1e-6, "swiglu forward");
    }

    #[test]
    fn backward_finite_differences() {
        let mut rng = rng(71);
        let (n, f) = (6, 11);
        let gu = randn(&mut rng, n * 2 * f, 4.0);
        let lw = randn(&mut rng, n * f, 1.0);
        // Overwrites: garbage in the buffer must not leak into the gradient.
        let mut dgu = vec![f32::NAN; n * 2 * f];
        swiglu_backward(&mut dgu, &gu, &lw, n, f);
        let num = numgrad(&gu, 1e-3, |x| weighted_sum(&forward(x, n, f), &lw));
        assert_grad(&dgu, &num, "swiglu dgu");
    }

    #[test]
    fn deterministic_across_thread_counts() {
        let mut rng = rng(72);
        // Several tasks, the last one ragged.
        let (n, f) = (3 * rows_per_task(300) + 5, 300);
        let gu = randn(&mut rng, n * 2 * f, 4.0);
        let dout = randn(&mut rng, n * f, 1.0);
        let run = || {
            let mut dgu = vec![0.0; n * 2 * f];
            swiglu_backward(&mut dgu, &gu, &dout, n, f);
            (forward(&gu, n, f), dgu)
        };
        let reference = run();
        assert_bits_eq(&reference, &run());
        assert_thread_independent(&reference, run);
    }
}
