//! Best-of-N time of `matmul` at decoding shapes (`m` rows times a `[k, n]` weight, plain and
//! transposed), for comparing the code paths: run it under `KILN_SIMD=avx2` or `base` to force an
//! older CPU's path (`base`: the skinny kernels are off and `gemm` does the product).
//!
//!     cargo run --release -p kiln-kernels --example matmul_shapes [-- REPS]
use std::time::Instant;

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    println!("simd={}", kiln_kernels::simd_level_name());
    for &(k, n) in &[(384, 1152), (384, 8192), (576, 1536)] {
        for m in [1, 2, 3, 4, 8, 16] {
            for tb in [false, true] {
                let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
                let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
                let mut out = vec![0.0f32; m * n];
                let mut best = f64::INFINITY;
                for _ in 0..reps {
                    let t = Instant::now();
                    kiln_kernels::matmul(&mut out, &a, &b, m, k, n, false, tb, false);
                    best = best.min(t.elapsed().as_secs_f64());
                }
                println!(
                    "m={m:2} k={k} n={n:5} trans_b={tb:5} best_us={:8.1} gflop_per_s={:6.1}",
                    best * 1e6,
                    2.0 * (m * k * n) as f64 / best / 1e9
                );
            }
        }
    }
}
