//! Decoding's products alone: one token through the matrices of SmolLM2-135M (30 layers of q|k|v,
//! o, gate|up and down, fused as Kiln packs them; the tied 49,152-word head), packed int8, bf16 or
//! f32 (batched decoding's copy), in GB/s of weights streamed and GMAC/s, beside the machine's read
//! bandwidth. Best of REPS passes
//! over all the matrices (135 MB in int8, beyond the caches, so every pass streams from memory).
//!
//!     [ROWS=1] [LAYERS=30] [HEAD=1] cargo run --release -p kiln-kernels --example packed_bench \
//!         [-- REPS [int8|bf16|f32]]
//!
//! ROWS rows per product (batched decoding); LAYERS=1 HEAD=0 keeps the matrices in cache, which
//! gives the kernel's own ceiling. Threads: RAYON_NUM_THREADS.
use kiln_kernels::{PackedFormat, PackedLinear};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let reps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let fmt = match args.next().as_deref() {
        Some("bf16") => PackedFormat::Bf16,
        Some("f32") => PackedFormat::F32,
        _ => PackedFormat::Int8,
    };
    // LAYERS=1 HEAD=0 keeps the matrices in cache: the kernel's own ceiling; LAYERS=0 times the
    // head alone (one long stream per thread).
    let layers: usize = std::env::var("LAYERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let (c, kv, ffn, vocab) = (576usize, 192usize, 1536usize, 49152usize);
    // (k, n) of each product of one token, in order.
    let mut shapes = Vec::new();
    for _ in 0..layers {
        // Fused as Kiln packs them: q|k|v, o, gate|up, down.
        shapes.extend([(c, c + 2 * kv), (c, c), (c, 2 * ffn), (ffn, c)]);
    }
    if std::env::var("HEAD").map_or(true, |v| v != "0") {
        shapes.push((c, vocab));
    }
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mats: Vec<PackedLinear> = shapes
        .iter()
        .map(|&(k, n)| {
            let w: Vec<f32> = (0..k * n).map(|_| rand()).collect();
            PackedLinear::from_in_out(&w, None, k, n, fmt)
        })
        .collect();
    let bytes: usize = mats.iter().map(|m| m.weight_bytes()).sum();
    let macs: usize = shapes.iter().map(|&(k, n)| k * n).sum();
    // ROWS: rows per product (batched decoding), 1 by default.
    let rows: usize = std::env::var("ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let x: Vec<f32> = (0..rows * ffn).map(|_| rand()).collect();
    let mut out = vec![0.0f32; rows * vocab];
    let mut best = f64::MAX;
    // Inside the pool, as `kiln` runs: the calling thread is one of the workers.
    rayon::scope(|_| {
        for _ in 0..reps {
            let t0 = Instant::now();
            for (m, &(k, n)) in mats.iter().zip(&shapes) {
                m.forward(&mut out[..rows * n], &x[..rows * k], rows);
            }
            best = best.min(t0.elapsed().as_secs_f64());
        }
    });
    std::hint::black_box(&out);
    let bw = kiln_kernels::profile::read_bandwidth();
    println!(
        "threads={} rows={rows} format={fmt:?} products={} weights={:.1} MB best_ms={:.2} streamed_gb_per_s={:.1} gmac_per_s={:.1} read_gb_per_s={:.1} share={:.2}",
        rayon::current_num_threads(),
        mats.len(),
        bytes as f64 / 1e6,
        best * 1e3,
        bytes as f64 / best / 1e9,
        macs as f64 * rows as f64 / best / 1e9,
        bw / 1e9,
        bytes as f64 / best / bw
    );
}
