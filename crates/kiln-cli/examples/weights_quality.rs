//! How far int8 / bf16 packed weights move a trained model's outputs from f32.
//!
//! `cargo run --release -p kiln-cli --example weights_quality -- CHECKPOINT_DIR VAL_SHARD [PROMPTS]`
//!
//! Windows of held-out tokens are fed token by token through the KV cache with f32 weights and with
//! each packed format (teacher forcing): max and mean |logit difference|, top-1 agreement, and the
//! mean KL(f32 || packed) of the next-token distributions at every position. Then greedy generation
//! from each window's first 16 tokens: how many of 48 new tokens match f32 before the first
//! difference, and how many continuations are identical.

use anyhow::{Context, Result};
use kiln_data::shards::Shard;
use kiln_model::checkpoint::load_model;
use kiln_model::{generate_with, GenerateOptions, KvCache, PackedWeights, Sampling, WeightFormat};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

const PROMPT: usize = 16;
const NEW: usize = 48;

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    x.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(x: &[f32]) -> usize {
    (0..x.len()).fold(0, |b, j| if x[j] > x[b] { j } else { b })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ckpt = PathBuf::from(
        args.first()
            .context("usage: CHECKPOINT_DIR VAL_SHARD [PROMPTS]")?,
    );
    let shard = Shard::open(&PathBuf::from(args.get(1).context("missing VAL_SHARD")?))?;
    let prompts: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(32);
    let model = load_model(&ckpt)?;
    let v = model.cfg.vocab_size;
    let win = PROMPT + NEW;
    let stride = (shard.len() - win) / prompts;
    let windows: Vec<Vec<u32>> = (0..prompts)
        .map(|i| {
            let mut w = vec![0u32; win];
            shard.read(i * stride, &mut w);
            w
        })
        .collect();
    println!(
        "{}: {} layers, width {}, vocab {v}; {prompts} windows of {win} held-out tokens",
        ckpt.display(),
        model.cfg.n_layer,
        model.cfg.n_embd
    );
    for fmt in [WeightFormat::Bf16, WeightFormat::Int8] {
        let packed = PackedWeights::new(&model, fmt.packed().unwrap());
        let (mut max_d, mut sum_d, mut n_d) = (0.0f32, 0.0f64, 0usize);
        let (mut agree, mut kl, mut pos) = (0usize, 0.0f64, 0usize);
        for w in &windows {
            let mut c32 = KvCache::new(&model, 1);
            let mut cq = KvCache::new(&model, 1);
            for &t in w {
                let a = model.forward_cached(&mut c32, &[0], &[t], 1);
                let b = model.forward_cached_with(Some(&packed), &mut cq, &[0], &[t], 1);
                for (x, y) in a.iter().zip(&b) {
                    let d = (x - y).abs();
                    max_d = max_d.max(d);
                    sum_d += d as f64;
                }
                n_d += v;
                agree += (argmax(&a) == argmax(&b)) as usize;
                let (la, lb) = (log_softmax(&a), log_softmax(&b));
                kl += la
                    .iter()
                    .zip(&lb)
                    .map(|(p, q)| p.exp() * (p - q))
                    .sum::<f64>();
                pos += 1;
            }
        }
        let opts = GenerateOptions {
            max_new_tokens: NEW,
            sampling: Sampling {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
            },
            stop_tokens: vec![],
        };
        let ps: Vec<Vec<u32>> = windows.iter().map(|w| w[..PROMPT].to_vec()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let g32 = generate_with(&model, None, &ps, &opts, &mut rng, |_, _| {})?;
        let gq = generate_with(&model, Some(&packed), &ps, &opts, &mut rng, |_, _| {})?;
        let (mut same_prefix, mut identical) = (0usize, 0usize);
        for (a, b) in g32.iter().zip(&gq) {
            let k = a.iter().zip(b).take_while(|(x, y)| x == y).count();
            same_prefix += k;
            identical += (a == b) as usize;
        }
        println!(
            "{fmt}: teacher-forced over {pos} positions: max |dlogit| {max_d:.4}, mean |dlogit| {:.5}, \
             top-1 agreement {:.2}%, mean KL(f32||{fmt}) {:.2e} nats; greedy {NEW} tokens: {:.1} \
             match before the first difference on average, {identical}/{prompts} continuations identical",
            sum_d / n_d as f64,
            100.0 * agree as f64 / pos as f64,
            kl / pos as f64,
            same_prefix as f64 / prompts as f64,
        );
    }
    Ok(())
}
