//! Optimizer kernels: AdamW, global gradient norm (for clipping), scaling.
#![allow(clippy::too_many_arguments)]

use rayon::prelude::*;

use crate::simd;

/// Elements per rayon task: fixed, so reductions are summed in the same order on every run.
const CHUNK: usize = 1 << 14;

/// One AdamW step on one tensor, in place on `p`, `m`, `v`.
///
/// Decoupled weight decay as in Loshchilov & Hutter / `torch.optim.AdamW`: `p -= lr*wd*p`, then
/// `p -= lr * mhat / (sqrt(vhat) + eps)`, with bias corrections `1 - beta^step` (`step` is 1-based).
/// Callers that do not decay some tensors (biases, norms) pass `weight_decay = 0`.
pub fn adamw_update(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step: u64,
) {
    adamw_update_scaled(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, 1.0);
}

/// [`adamw_update`] on the gradient `grad_scale · g`, scaled in registers: gradient clipping in the
/// same pass as the update (the same bits as scaling `g` in place first, one pass over memory
/// fewer).
pub fn adamw_update_scaled(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step: u64,
    grad_scale: f32,
) {
    let _span = crate::profile::span(crate::profile::Kind::Optimizer);
    let n = p.len();
    assert!(
        g.len() == n && m.len() == n && v.len() == n,
        "adamw_update: length mismatch"
    );
    assert!(step >= 1, "adamw_update: step is 1-based");
    // Bias corrections in f64: beta^step underflows gracefully and 1 - beta^step keeps its digits.
    let exp = step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 / (1.0 - (beta1 as f64).powi(exp));
    let bc2 = 1.0 / (1.0 - (beta2 as f64).powi(exp));
    let hp = AdamParams {
        lr,
        beta1,
        beta2,
        eps,
        decay: 1.0 - lr * weight_decay,
        bc1: bc1 as f32,
        bc2: bc2 as f32,
        grad_scale,
    };
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| adamw_chunk(p, g, m, v, hp));
}

#[derive(Clone, Copy)]
struct AdamParams {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    bc1: f32,
    bc2: f32,
    grad_scale: f32,
}

simd::multiversion! {
    fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamParams) {
        let n = p.len();
        let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g * hp.grad_scale;
            *m = hp.beta1 * *m + (1.0 - hp.beta1) * g;
            *v = hp.beta2 * *v + (1.0 - hp.beta2) * g * g;
            let mhat = *m * hp.bc1;
            let vhat = *v * hp.bc2;
            *p = *p * hp.decay - hp.lr * mhat / (vhat.sqrt() + hp.eps);
        }
    }
}

/// `sqrt(sum g^2)` over all the slices, accumulated in f64 in a fixed order (deterministic).
///
/// Each slice is cut into fixed chunks summed in parallel, and the chunk sums are added in order.
pub fn global_grad_norm(grads: &[&[f32]]) -> f32 {
    let _span = crate::profile::span(crate::profile::Kind::Optimizer);
    let mut total = 0.0f64;
    for g in grads {
        let partials: Vec<f64> = g.par_chunks(CHUNK).map(sumsq_f64).collect();
        total += partials.iter().sum::<f64>();
    }
    total.sqrt() as f32
}

simd::multiversion! {
    fn sumsq_f64(x: &[f32]) -> f64 {
        const L: usize = 16;
        let mut acc = [0.0f64; L];
        let mut it = x.chunks_exact(L);
        for ch in &mut it {
            for (a, &v) in acc.iter_mut().zip(ch) {
                let v = v as f64;
                *a += v * v;
            }
        }
        for (a, &v) in acc.iter_mut().zip(it.remainder()) {
            *a += v as f64 * v as f64;
        }
        acc.iter().sum()
    }
}

/// `x *= s`, in place.
pub fn scale(x: &mut [f32], s: f32) {
    let _span = crate::profile::span(crate::profile::Kind::Optimizer);
    x.par_chunks_mut(CHUNK).for_each(|ch| scale_chunk(ch, s));
}

simd::multiversion! {
    fn scale_chunk(x: &mut [f32], s: f32) {
        for v in x.iter_mut() {
            *v *= s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn scaled_update_equals_scaling_the_gradient_first() {
        let mut g = rng(21);
        let n = 40_000; // several chunks
        let p0 = randn(&mut g, n, 1.0);
        let grad = randn(&mut g, n, 3.0);
        let (m0, v0) = (
            randn(&mut g, n, 0.1),
            randn(&mut g, n, 0.1)
                .iter()
                .map(|x| x * x)
                .collect::<Vec<_>>(),
        );
        let s = 0.37f32;
        let (mut pa, mut ma, mut va) = (p0.clone(), m0.clone(), v0.clone());
        let mut scaled = grad.clone();
        scale(&mut scaled, s);
        adamw_update(
            &mut pa, &scaled, &mut ma, &mut va, 1e-3, 0.9, 0.95, 1e-8, 0.1, 3,
        );
        let (mut pb, mut mb, mut vb) = (p0, m0, v0);
        adamw_update_scaled(
            &mut pb, &grad, &mut mb, &mut vb, 1e-3, 0.9, 0.95, 1e-8, 0.1, 3, s,
        );
        assert_eq!(pa.bits(), pb.bits());
        assert_eq!(ma.bits(), mb.bits());
        assert_eq!(va.bits(), vb.bits());
    }

    #[test]
    fn adamw_matches_hand_computed_steps() {
        let (lr, b1, b2, eps, wd) = (0.1f32, 0.9f32, 0.999f32, 1e-8f32, 0.01f32);
        let mut p = vec![1.0f32, -2.0, 0.5];
        let g = vec![0.5f32, 0.25, -1.0];
        let (mut m, mut v) = (vec![0.0f32; 3], vec![0.0f32; 3]);
        // Step 1 by hand: m = 0.1 g, v = 0.001 g^2, mhat = g, vhat = g^2, so the update is
        // lr * g / (|g| + eps) = lr * sign(g) (up to eps), after decay by (1 - lr*wd).
        adamw_update(&mut p, &g, &mut m, &mut v, lr, b1, b2, eps, wd, 1);
        let want1 = [
            1.0 * (1.0 - 0.001) - 0.1,
            -2.0 * 0.999 - 0.1,
            0.5 * 0.999 + 0.1,
        ];
        for i in 0..3 {
            assert!(
                (p[i] - want1[i]).abs() < 1e-6,
                "step 1: p[{i}] = {}, want {}",
                p[i],
                want1[i]
            );
            assert!((m[i] - 0.1 * g[i]).abs() < 1e-7);
            // 1 - 0.999 is 0.000999987 in f32: compare relatively.
            assert!((v[i] - 0.001 * g[i] * g[i]).abs() < 1e-4 * v[i]);
        }
        // Step 2 against an f64 reference of the same formulas.
        let g2 = vec![-0.3f32, 0.25, 2.0];
        let (p1, m1, v1) = (p.clone(), m.clone(), v.clone());
        adamw_update(&mut p, &g2, &mut m, &mut v, lr, b1, b2, eps, wd, 2);
        for i in 0..3 {
            let (b1, b2, lr, wd) = (b1 as f64, b2 as f64, lr as f64, wd as f64);
            let mm = b1 * m1[i] as f64 + (1.0 - b1) * g2[i] as f64;
            let vv = b2 * v1[i] as f64 + (1.0 - b2) * (g2[i] as f64).powi(2);
            let mhat = mm / (1.0 - b1 * b1);
            let vhat = vv / (1.0 - b2 * b2);
            let want = p1[i] as f64 * (1.0 - lr * wd) - lr * mhat / (vhat.sqrt() + eps as f64);
            assert!(
                (p[i] as f64 - want).abs() < 1e-6,
                "step 2: p[{i}] = {}, want {want}",
                p[i]
            );
            assert!((m[i] as f64 - mm).abs() < 1e-7 && (v[i] as f64 - vv).abs() < 1e-8);
        }
    }

    #[test]
    fn grad_norm_and_scale() {
        let mut rng = rng(60);
        let a = randn(&mut rng, 3 * CHUNK + 11, 1.0);
        let b = randn(&mut rng, 5, 3.0);
        let want = a
            .iter()
            .chain(&b)
            .map(|&x| x as f64 * x as f64)
            .sum::<f64>()
            .sqrt();
        let got = global_grad_norm(&[&a, &b, &[]]);
        assert!(
            ((got as f64) - want).abs() <= 1e-6 * want,
            "{got} vs {want}"
        );
        assert_eq!(global_grad_norm(&[]), 0.0);
        assert_eq!(got.to_bits(), global_grad_norm(&[&a, &b, &[]]).to_bits());

        let mut x = a.clone();
        scale(&mut x, 0.25);
        assert!(x.iter().zip(&a).all(|(x, a)| *x == a * 0.25));
    }

    #[test]
    fn deterministic() {
        let mut rng = rng(61);
        let n = 2 * CHUNK + 3;
        let g = randn(&mut rng, n, 1.0);
        let p0 = randn(&mut rng, n, 1.0);
        let run = || {
            let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
            for step in 1..=3 {
                adamw_update(&mut p, &g, &mut m, &mut v, 1e-3, 0.9, 0.95, 1e-8, 0.1, step);
            }
            (p, m, v)
        };
        assert_bits_eq(&run(), &run());
    }
}
