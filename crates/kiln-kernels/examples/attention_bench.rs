//! Wall time of causal attention forward and backward on the `kiln bench train` shapes (8 x 256
//! tokens, width 384, 6 heads of 64), multi-head and grouped-query (2 kv heads), median of reps.
//!
//! `cargo run --release -p kiln-kernels --example attention_bench [reps]` (threads: RAYON_NUM_THREADS;
//! `T=1024` for another context length at the same 2,048 tokens, e.g. 2 x 1024; `PRECISION=bf16`
//! for the bf16 products, which run where the CPU has AVX512-BF16).

use kiln_kernels::attention::{attention_backward_with, attention_forward_with, AttnShape};
use kiln_kernels::{AttnMask, Precision};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(9);
    let t: usize = std::env::var("T")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let (b, nh, hs) = (8 * 256 / t, 6, 64);
    let c = nh * hs;
    let mask = AttnMask {
        causal: true,
        ..Default::default()
    };
    let mut state = 1u32;
    let mut fill = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    let prec: Precision = std::env::var("PRECISION")
        .map(|p| p.parse().expect("PRECISION: f32 or bf16"))
        .unwrap_or_default();
    println!(
        "threads={} reps={reps} (median) precision={prec}",
        rayon::current_num_threads()
    );
    for nkv in [nh, 2] {
        let shape = AttnShape { nh, nkv, hs };
        let rw = (nh + 2 * nkv) * hs;
        let qkv = fill(b * t * rw);
        let dout = fill(b * t * c);
        let mut out = vec![0.0f32; b * t * c];
        let mut att = vec![0.0f32; kiln_kernels::attention::stats_len(b, nh, t)];
        let mut dqkv = vec![0.0f32; b * t * rw];
        let (mut tf, mut tb) = (Vec::new(), Vec::new());
        for _ in 0..reps + 1 {
            let t0 = Instant::now();
            attention_forward_with(prec, &mut out, &mut att, &qkv, b, t, shape, &mask);
            let t1 = Instant::now();
            attention_backward_with(prec, &mut dqkv, &dout, &qkv, &att, b, t, shape, &mask);
            tf.push((t1 - t0).as_secs_f64() * 1e3);
            tb.push(t1.elapsed().as_secs_f64() * 1e3);
        }
        tf.remove(0);
        tb.remove(0);
        println!(
            "nh={nh} nkv={nkv}: forward {:.2} ms, backward {:.2} ms",
            median(tf),
            median(tb)
        );
    }
}
