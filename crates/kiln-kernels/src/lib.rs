//! Kiln's compute engine: CPU kernels over flat, row-major `f32` buffers, each forward beside its backward.
//!
//! This is the one narrow interface the models are written against (so a GPU backend can slot in later).
//! Conventions, shared by every kernel:
//! - Buffers are row-major slices; shapes are passed explicitly (`n` rows, `c` channels, ...).
//! - Every backward function ACCUMULATES (`+=`) into its gradient outputs, for parameters and
//!   activations alike; the caller zeroes gradient buffers once per step. This makes gradient
//!   accumulation and residual branches free.
//! - Parallelism is rayon (and `gemm`'s rayon mode) with fixed chunking: results never depend on thread
//!   scheduling, so the same inputs and thread count give bit-identical outputs.
//! - Compute threads flush subnormal floats to zero ([`flush_denormals`], [`thread_pool_builder`]).

pub mod attention;
pub mod bf16;
pub mod embed;
pub mod gelu;
pub mod layernorm;
pub mod loss;
pub mod matmul;
pub mod optim;
pub mod profile;
pub mod quant;
pub mod rmsnorm;
pub mod rope;
mod simd;
pub mod swiglu;
#[cfg(test)]
mod testutil;

pub use attention::{
    attention_backward, attention_backward_gqa, attention_backward_with, attention_cached_row,
    attention_forward, attention_forward_gqa, attention_forward_with, AttnMask, AttnShape,
};
pub use bf16::Precision;
pub use embed::{embedding_backward, embedding_forward};
pub use gelu::{gelu_backward, gelu_backward_inplace, gelu_backward_inplace_bias, gelu_forward};
pub use layernorm::{layernorm_backward, layernorm_forward, LN_EPS};
pub use loss::{softmax_weights, token_logprob_backward, token_logprob_forward, IGNORE};
pub use matmul::{
    linear_backward, linear_backward_with, linear_forward, linear_forward_residual_with,
    linear_forward_with, matmul, matmul_strided, matmul_with, Strided,
};
pub use optim::{adamw_update, adamw_update_scaled, global_grad_norm, scale};
pub use quant::{PackedFormat, PackedLinear, Path as PackedPath};
pub use rmsnorm::{rmsnorm_backward, rmsnorm_forward};
pub use rope::{rope_backward, rope_forward, Rope, RopeScaling};
pub use swiglu::{swiglu_backward, swiglu_forward};

/// The vector instruction set Kiln's own kernels run with on this CPU (`avx512`, `avx2` or `base`;
/// `KILN_SIMD=avx2|base` caps it). The large matrix products (`gemm`) dispatch on their own.
pub fn simd_level_name() -> &'static str {
    match simd::level() {
        simd::Level::V4 => "avx512",
        simd::Level::V3 => "avx2",
        simd::Level::Base => "base",
    }
}

/// Flushes subnormal floats to zero on the calling thread (x86 MXCSR FTZ and DAZ; a no-op elsewhere).
/// Values below f32's normal range (~1.2e-38) carry nothing a model can use, but each one costs an
/// x86 FMA a microcode assist of ~100 cycles: a reward model's backward, whose gradients reach only
/// a few positions, ran 3.4x slower with them (185 vs 55 ms a step). Deterministic like the rest.
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: sets two MXCSR mode bits (flush-to-zero 0x8000, denormals-are-zero 0x0040) of this
    // thread's floating-point control; no memory is touched.
    #[allow(deprecated)]
    unsafe {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        _mm_setcsr(_mm_getcsr() | 0x8040);
    }
}

/// [`flush_denormals`] on the calling thread and on every thread of the current rayon pool (for
/// entry points that may run in a pool they did not build).
pub fn flush_denormals_everywhere() {
    flush_denormals();
    rayon::broadcast(|_| flush_denormals());
}

/// A rayon pool builder whose threads flush denormals (see [`flush_denormals`]); `None` threads means
/// one per core. Every pool that runs kernels should come from here.
pub fn thread_pool_builder(threads: Option<usize>) -> rayon::ThreadPoolBuilder {
    let b = rayon::ThreadPoolBuilder::new().start_handler(|_| flush_denormals());
    match threads {
        Some(n) => b.num_threads(n.max(1)),
        None => b,
    }
}

/// Element-wise `out[i] += x[i]`.
pub fn add_inplace(out: &mut [f32], x: &[f32]) {
    assert_eq!(out.len(), x.len());
    let _span = profile::span(profile::Kind::Elementwise);
    for (o, v) in out.iter_mut().zip(x) {
        *o += *v;
    }
}

/// Elements per task of the element-wise passes below.
const ELEMWISE_CHUNK: usize = 1 << 14;

/// Sets every element to zero (a gradient buffer before a step).
pub fn zero(buf: &mut [f32]) {
    use rayon::prelude::*;
    let _span = profile::span(profile::Kind::Elementwise);
    buf.par_chunks_mut(4 * ELEMWISE_CHUNK)
        .for_each(|ch| ch.fill(0.0));
}

#[cfg(test)]
mod tests {
    use crate::testutil::*;
    use crate::*;

    /// Every kernel, forward and backward, on one small transformer-block-like workload.
    fn workload() -> Vec<Vec<f32>> {
        let (b, t, c, nh, v) = (2, 70, 64, 4, 300);
        let n = b * t;
        let mut rng = rng(99);
        let x = randn(&mut rng, n * c, 1.0);
        let w = randn(&mut rng, c * 3 * c, 0.2);
        let bias = randn(&mut rng, 3 * c, 0.1);
        let wlm = randn(&mut rng, c * v, 0.2);
        let (mut ln, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut ln, &mut mean, &mut rstd, &x, &w[..c], &bias[..c], n, c);
        let mut qkv = vec![0.0; n * 3 * c];
        linear_forward(&mut qkv, &ln, &w, Some(&bias), n, c, 3 * c);
        let mut g = vec![0.0; n * 3 * c];
        gelu_forward(&mut g, &qkv);
        let (mut y, mut att) = (vec![0.0; n * c], vec![0.0; attention::stats_len(b, nh, t)]);
        let mask = AttnMask {
            causal: true,
            ..Default::default()
        };
        attention_forward(&mut y, &mut att, &g, b, t, c, nh, &mask);
        let mut logits = vec![0.0; n * v];
        matmul(&mut logits, &y, &wlm, n, c, v, false, false, false);
        let targets: Vec<u32> = (0..n as u32)
            .map(|i| if i % 5 == 0 { IGNORE } else { i * 7 % v as u32 })
            .collect();
        let (mut logp, mut ent) = (vec![0.0; n], vec![0.0; n]);
        token_logprob_forward(&mut logits, &targets, 0.8, &mut logp, Some(&mut ent), v);
        let dl = randn(&mut rng, n, 1.0);
        token_logprob_backward(&mut logits, &targets, 0.8, &dl, Some(&dl), v);
        let mut dy = vec![0.0; n * c];
        let mut dwl = vec![0.0; c * v];
        matmul(&mut dy, &logits, &wlm, n, v, c, false, true, true);
        matmul(&mut dwl, &y, &logits, c, n, v, true, false, true);
        let mut dg = vec![0.0; n * 3 * c];
        attention_backward(&mut dg, &dy, &g, &att, b, t, c, nh, &mask);
        let mut dqkv = vec![0.0; n * 3 * c];
        gelu_backward(&mut dqkv, &qkv, &dg);
        let (mut dln, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c * 3 * c], vec![0.0; 3 * c]);
        linear_backward(
            Some(&mut dln),
            &mut dw,
            Some(&mut db),
            &dqkv,
            &ln,
            &w,
            n,
            c,
            3 * c,
        );
        let (mut dx, mut dlw, mut dlb) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
        layernorm_backward(
            &mut dx,
            &mut dlw,
            &mut dlb,
            &dln,
            &x,
            &w[..c],
            &mean,
            &rstd,
            n,
            c,
        );
        let tokens: Vec<u32> = (0..n as u32).map(|i| i * 13 % v as u32).collect();
        let positions: Vec<u32> = (0..n as u32).map(|i| i % t as u32).collect();
        let (mut dwte, mut dwpe) = (vec![0.0; v * c], vec![0.0; t * c]);
        embedding_backward(&mut dwte, &mut dwpe, &dx, &tokens, &positions, c);
        let mut p = w.clone();
        let (mut m, mut vv) = (vec![0.0; p.len()], vec![0.0; p.len()]);
        let norm = global_grad_norm(&[&dw, &db, &dlw, &dlb, &dwte, &dwpe]);
        scale(&mut dw, 1.0 / norm.max(1.0));
        adamw_update(&mut p, &dw, &mut m, &mut vv, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1);
        vec![
            logp,
            ent,
            logits,
            att,
            dx,
            dw,
            db,
            dwte,
            dwpe,
            p,
            vec![norm],
        ]
    }

    /// The Llama kernels (RMSNorm, RoPE, grouped-query attention, SwiGLU), forward and backward, on
    /// a small Llama-block-like workload of packed sequences.
    fn llama_workload() -> Vec<Vec<f32>> {
        let (b, t, nh, nkv, hs, f) = (2, 70, 4, 2, 16, 96);
        let (n, c) = (b * t, nh * hs);
        let shape = AttnShape { nh, nkv, hs };
        let rw = (nh + 2 * nkv) * hs;
        let mut rng = rng(98);
        let x = randn(&mut rng, n * c, 1.0);
        let wn = randn(&mut rng, c, 1.0);
        let wqkv = randn(&mut rng, c * rw, 0.2);
        let wgu = randn(&mut rng, c * 2 * f, 0.2);
        let (mut xn, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
        rmsnorm_forward(&mut xn, &mut rstd, &x, &wn, n, c, 1e-5);
        let mut qkv = vec![0.0; n * rw];
        linear_forward(&mut qkv, &xn, &wqkv, None, n, c, rw);
        // Two packed examples per sequence (30 + 40 tokens): positions restart at the boundary.
        let segments: Vec<u32> = (0..n)
            .map(|i| (2 * (i / t) + (i % t >= 30) as usize) as u32)
            .collect();
        let positions: Vec<u32> = (0..n)
            .map(|i| (if i % t >= 30 { i % t - 30 } else { i % t }) as u32)
            .collect();
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32,
        };
        let rope = Rope::new(hs, t, 10000.0, Some(&scaling));
        rope_forward(&mut qkv, &positions, &rope, n, rw, nh + nkv);
        let mask = AttnMask {
            causal: true,
            key_valid: None,
            segments: Some(&segments),
        };
        let (mut y, mut att) = (vec![0.0; n * c], vec![0.0; attention::stats_len(b, nh, t)]);
        attention_forward_gqa(&mut y, &mut att, &qkv, b, t, shape, &mask);
        let mut gu = vec![0.0; n * 2 * f];
        linear_forward(&mut gu, &y, &wgu, None, n, c, 2 * f);
        let mut h = vec![0.0; n * f];
        swiglu_forward(&mut h, &gu, n, f);
        let dh = randn(&mut rng, n * f, 1.0);
        let mut dgu = vec![f32::NAN; n * 2 * f];
        swiglu_backward(&mut dgu, &gu, &dh, n, f);
        let (mut dy, mut dwgu) = (vec![0.0; n * c], vec![0.0; c * 2 * f]);
        linear_backward(Some(&mut dy), &mut dwgu, None, &dgu, &y, &wgu, n, c, 2 * f);
        let mut dqkv = vec![0.0; n * rw];
        attention_backward_gqa(&mut dqkv, &dy, &qkv, &att, b, t, shape, &mask);
        rope_backward(&mut dqkv, &positions, &rope, n, rw, nh + nkv);
        let (mut dxn, mut dwqkv) = (vec![0.0; n * c], vec![0.0; c * rw]);
        linear_backward(
            Some(&mut dxn),
            &mut dwqkv,
            None,
            &dqkv,
            &xn,
            &wqkv,
            n,
            c,
            rw,
        );
        let (mut dx, mut dwn) = (vec![0.0; n * c], vec![0.0; c]);
        rmsnorm_backward(&mut dx, &mut dwn, &dxn, &x, &wn, &rstd, n, c);
        vec![rstd, qkv, att, h, dgu, dqkv, dx, dwn, dwqkv, dwgu]
    }

    #[test]
    fn deterministic_across_runs_and_thread_counts() {
        let reference = workload().concat();
        assert_bits_eq(&reference, &workload().concat());
        assert_thread_independent(&reference, || workload().concat());
    }

    #[test]
    fn llama_kernels_deterministic_across_runs_and_thread_counts() {
        let reference = llama_workload().concat();
        assert!(reference.iter().all(|v| v.is_finite()));
        assert_bits_eq(&reference, &llama_workload().concat());
        assert_thread_independent(&reference, || llama_workload().concat());
    }
}
