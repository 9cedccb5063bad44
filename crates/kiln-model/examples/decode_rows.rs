//! Decoding steps as `kiln serve` runs them: `rows` sequences (1, 4, 8, 16) after a 16-token
//! prompt each, 32 steps of one token per row, on the model's own f32 weights and on the f32
//! panels of its block matrices (`PackedWeights::f32_blocks`, what the server decodes on; the LM
//! head stays on the model's weight in both). Best of 3 rounds, alternately; tok/s. Random
//! weights at the `kiln bench` GPT-2 shape (6 x 384, vocab 8,192), or with `LLAMA=1` at
//! SmolLM2-135M's (30 x 576, 9 heads / 3 kv heads, SwiGLU 1,536, vocab 49,152).
//!
//!     [LLAMA=1] cargo run --release -p kiln-model --example decode_rows
use kiln_model::{Family, KvCache, Model, ModelConfig, PackedWeights};
use std::time::Instant;

fn main() {
    let cfg = if std::env::var("LLAMA").is_ok_and(|v| v == "1") {
        ModelConfig {
            vocab_size: 49152,
            n_ctx: 512,
            n_layer: 30,
            n_head: 9,
            n_kv_head: 3,
            n_embd: 576,
            ffn_hidden: 1536,
            family: Family::Llama,
            ..Default::default()
        }
    } else {
        ModelConfig {
            vocab_size: 8192,
            n_ctx: 256,
            n_layer: 6,
            n_head: 6,
            n_embd: 384,
            ..Default::default()
        }
    };
    let model = Model::new(cfg, 1);
    let panels = PackedWeights::f32_blocks(&model);
    println!(
        "simd={} threads={}",
        kiln_kernels::simd_level_name(),
        rayon::current_num_threads()
    );
    let steps = 32;
    for rows in [1usize, 4, 8, 16] {
        // Seconds per token, best of the rounds: [own weights, panels].
        let mut best = [f64::INFINITY; 2];
        for _round in 0..3 {
            for (wi, w) in [None, Some(&panels)].into_iter().enumerate() {
                let mut cache = KvCache::new(&model, rows);
                for r in 0..rows {
                    let p: Vec<u32> = (0..16).map(|i| ((r * 31 + i * 7) % 1000) as u32).collect();
                    model.forward_cached_with(None, &mut cache, &[r], &p, p.len());
                }
                let slots: Vec<usize> = (0..rows).collect();
                let t = Instant::now();
                for s in 0..steps {
                    let toks: Vec<u32> = (0..rows)
                        .map(|r| ((r * 13 + s * 101) % 1000) as u32)
                        .collect();
                    model.forward_cached_with(w, &mut cache, &slots, &toks, 1);
                }
                best[wi] = best[wi].min(t.elapsed().as_secs_f64() / (rows * steps) as f64);
            }
        }
        println!(
            "rows {rows:2}: own weights {:6.0} tok/s, f32 block panels {:6.0} tok/s",
            1.0 / best[0],
            1.0 / best[1]
        );
    }
}
