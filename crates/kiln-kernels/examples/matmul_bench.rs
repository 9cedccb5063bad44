//! GFLOP/s of the f32 and bf16 matmuls on the shapes of one training step of the `kiln bench train`
//! model (vocab 8192, 6 layers, width 384, 8 x 256 tokens), and the matmul time per step.
//!
//! `[LLAMA=1] cargo run --release -p kiln-kernels --example matmul_bench [reps]` (threads:
//! RAYON_NUM_THREADS; `LLAMA=1`: the shapes of SmolLM2-135M at 4 x 512 tokens instead).

use kiln_kernels::{bf16, matmul_with, Precision};
use std::time::Instant;

/// CPU time of this process (all threads) divided by the pool size, in seconds.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9) / rayon::current_num_threads() as f64
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    // LLAMA=1: SmolLM2-135M's shapes (width 576, q|k|v 960, gate|up 3072, vocab 49,152, 30
    // layers) at 4 x 512 tokens.
    let llama = std::env::var("LLAMA").is_ok_and(|v| v == "1");
    let (n, c, v, layers) = if llama {
        (2048, 576, 49152, 30)
    } else {
        (2048, 384, 8192, 6)
    };
    let (qkv, up, down) = if llama {
        (960, 3072, 1536)
    } else {
        (3 * c, 4 * c, 4 * c)
    };
    // (name, m, k, n, trans_a, trans_b, calls per step)
    let shapes = [
        ("fwd qkv", n, c, qkv, false, false, layers),
        ("fwd proj", n, c, c, false, false, layers),
        ("fwd fc", n, c, up, false, false, layers),
        ("fwd fcproj", n, down, c, false, false, layers),
        ("fwd lm head", n, c, v, false, true, 1),
        ("dx qkv", n, qkv, c, false, true, layers),
        ("dx proj", n, c, c, false, true, layers),
        ("dx fc", n, up, c, false, true, layers),
        ("dx fcproj", n, c, down, false, true, layers),
        ("dx lm head", n, v, c, false, false, 1),
        ("dw qkv", c, n, qkv, true, false, layers),
        ("dw proj", c, n, c, true, false, layers),
        ("dw fc", c, n, up, true, false, layers),
        ("dw fcproj", down, n, c, true, false, layers),
        ("dw lm head", v, n, c, true, false, 1),
    ];
    // On a shared machine wall time mostly measures the neighbours: with KILN_BENCH_CPU=1, time is
    // this process's CPU time divided by the thread count (spinning idle threads count as busy).
    let use_cpu = std::env::var("KILN_BENCH_CPU").is_ok_and(|v| v == "1");
    println!(
        "threads={} bf16_hardware={} reps={reps} (median) timing={}",
        rayon::current_num_threads(),
        bf16::hardware().unwrap_or("none"),
        if use_cpu { "cpu" } else { "wall" }
    );
    println!(
        "{:<12} {:>5} {:>5} {:>5} {:>10} {:>10} {:>7}",
        "shape", "m", "k", "n", "f32 GF/s", "bf16 GF/s", "speedup"
    );
    let mut total = [0.0f64; 2];
    let mut state = 1u32;
    let mut fill = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    for &(name, m, k, nn, ta, tb, count) in &shapes {
        let a = fill(m * k);
        let b = fill(k * nn);
        let mut out = fill(m * nn);
        let flops = 2.0 * (m * k * nn) as f64;
        let mut gf = [0.0f64; 2];
        for (pi, prec) in [Precision::F32, Precision::Bf16].into_iter().enumerate() {
            let mut times: Vec<f64> = (0..reps + 1)
                .map(|_| {
                    let (t0, c0) = (Instant::now(), cpu_seconds());
                    matmul_with(prec, &mut out, &a, &b, m, k, nn, ta, tb, true);
                    if use_cpu {
                        cpu_seconds() - c0
                    } else {
                        t0.elapsed().as_secs_f64()
                    }
                })
                .skip(1)
                .collect();
            times.sort_by(|x, y| x.partial_cmp(y).unwrap());
            let med = times[times.len() / 2];
            gf[pi] = flops / med / 1e9;
            total[pi] += med * count as f64;
        }
        println!(
            "{name:<12} {m:>5} {k:>5} {nn:>5} {:>10.1} {:>10.1} {:>6.2}x",
            gf[0],
            gf[1],
            gf[1] / gf[0]
        );
    }
    println!(
        "matmul time per training step: f32 {:.1} ms, bf16 {:.1} ms",
        total[0] * 1e3,
        total[1] * 1e3
    );
}
