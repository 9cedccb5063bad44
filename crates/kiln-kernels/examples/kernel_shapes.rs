//! Best-of-N time of the non-matmul kernels of a training step at the bench shape (batch 8 × 256,
//! width 384, 6 heads, MLP 1,536): attention forward/backward, GELU, LayerNorm, the loss, AdamW.
//!
//!     [T=CONTEXT] cargo run --release -p kiln-kernels --example kernel_shapes [-- REPS]
use kiln_kernels::*;
use std::time::Instant;

fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut b = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        b = b.min(t.elapsed().as_secs_f64());
    }
    b * 1e3
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let t: usize = std::env::var("T")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let (b, nh, hs, v) = (8usize, 6usize, 64usize, 8192usize);
    let c = nh * hs;
    let n = b * t;
    let fill = |len: usize, s: f32| -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 2654435761) % 1000) as f32 / 1000.0 * s - s / 2.0)
            .collect()
    };
    let qkv = fill(n * 3 * c, 1.0);
    let mut y = vec![0.0; n * c];
    let mut att = vec![0.0; attention::stats_len(b, nh, t)];
    let mask = AttnMask {
        causal: true,
        ..Default::default()
    };
    let shape = AttnShape { nh, nkv: nh, hs };
    let fwd = best(reps, || {
        attention_forward_gqa(&mut y, &mut att, &qkv, b, t, shape, &mask)
    });
    let dout = fill(n * c, 1.0);
    let mut dqkv = vec![0.0; n * 3 * c];
    let bwd = best(reps, || {
        attention_backward_gqa(&mut dqkv, &dout, &qkv, &att, b, t, shape, &mask)
    });
    // Causal: about half of each t × t product.
    let fl = 2.0 * 2.0 * (b * nh * t * t * hs) as f64 / 2.0;
    println!(
        "simd={} threads={}",
        simd_level_name(),
        rayon::current_num_threads()
    );
    println!(
        "attention forward  {fwd:7.2} ms  {:6.1} GFLOP/s (causal, 2 products)",
        fl / fwd / 1e6
    );
    println!(
        "attention backward {bwd:7.2} ms  {:6.1} GFLOP/s (4 products)",
        2.0 * fl / bwd / 1e6
    );
    let h = fill(n * 4 * c, 2.0);
    let mut a = vec![0.0; n * 4 * c];
    println!(
        "gelu forward       {:7.2} ms",
        best(reps, || gelu_forward(&mut a, &h))
    );
    println!(
        "gelu backward      {:7.2} ms",
        best(reps, || gelu_backward_inplace(&mut a, &h))
    );
    let x = fill(n * c, 2.0);
    let (w, bb) = (fill(c, 1.0), fill(c, 1.0));
    let (mut o, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    println!(
        "layernorm forward  {:7.2} ms",
        best(reps, || layernorm_forward(
            &mut o, &mut mean, &mut rstd, &x, &w, &bb, n, c
        ))
    );
    let (mut dx, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
    println!(
        "layernorm backward {:7.2} ms",
        best(reps, || layernorm_backward(
            &mut dx, &mut dw, &mut db, &dout, &x, &w, &mean, &rstd, n, c
        ))
    );
    let logits0 = fill(n * v, 4.0);
    let targets: Vec<u32> = (0..n as u32).map(|i| i * 7 % v as u32).collect();
    let (mut logp, mut ent) = (vec![0.0; n], vec![0.0; n]);
    let mut logits = logits0.clone();
    println!(
        "loss forward       {:7.2} ms",
        best(reps, || {
            logits.copy_from_slice(&logits0);
            token_logprob_forward(&mut logits, &targets, 1.0, &mut logp, Some(&mut ent), v)
        })
    );
    let dl = vec![-1.0 / n as f32; n];
    println!(
        "loss backward      {:7.2} ms",
        best(reps, || token_logprob_backward(
            &mut logits,
            &targets,
            1.0,
            &dl,
            None,
            v
        ))
    );
    let np = 13_891_584;
    let (mut p, g, mut m1, mut m2) = (fill(np, 0.1), fill(np, 0.01), vec![0.0; np], vec![0.0; np]);
    println!(
        "grad norm          {:7.2} ms",
        best(reps, || {
            std::hint::black_box(global_grad_norm(&[&g]));
        })
    );
    println!(
        "adamw              {:7.2} ms",
        best(reps, || adamw_update(
            &mut p, &g, &mut m1, &mut m2, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1
        ))
    );
    let mut zb = vec![1.0f32; np];
    println!("zero grads         {:7.2} ms", best(reps, || zero(&mut zb)));
}
