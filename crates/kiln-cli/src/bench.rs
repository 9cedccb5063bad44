//! `kiln bench`: the standard speed measurements, with the same shapes, flags and RESULT lines as
//! `shared/bench/torch_gpt_bench.py` so scripts can divide one by the other.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use kiln_model::{
    generate_with, Activations, Arch, Family, GenerateOptions, Input, Model, ModelConfig,
    PackedWeights, Sampling, WeightFormat,
};
use kiln_train::optim::{clip_scale, AdamW, AdamWConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Training step (forward, backward, AdamW) on random tokens.
    Train(TrainBench),
    /// Sampling with the KV cache.
    Generate(Shape),
    /// Tokenizer training time and encoding throughput.
    Tokenizer(TokArgs),
}

#[derive(Args)]
pub struct Shape {
    /// Model family: gpt2, or llama (RMSNorm, RoPE, SwiGLU, grouped-query attention).
    #[arg(long, default_value = "gpt2", value_parser = parse_family)]
    arch: Family,
    /// llama: key/value heads (0: as many as --heads).
    #[arg(long, default_value_t = 0)]
    kv_heads: usize,
    /// llama: SwiGLU hidden size (0: 8/3 of --dim, rounded up to 64).
    #[arg(long, default_value_t = 0)]
    ffn: usize,
    /// llama: a separate output head (default: tied to the token embedding).
    #[arg(long)]
    untied: bool,
    #[arg(long, default_value_t = 8192)]
    vocab: usize,
    #[arg(long, default_value_t = 6)]
    layers: usize,
    #[arg(long, default_value_t = 6)]
    heads: usize,
    #[arg(long, default_value_t = 384)]
    dim: usize,
    #[arg(long, default_value_t = 256)]
    ctx: usize,
    /// Sequences per step (train: 8; generate: 1 unless given).
    #[arg(long)]
    batch: Option<usize>,
    /// `--threads` given after the subcommand (the global flag's own help line describes it).
    #[arg(long = "threads", id = "bench_threads", hide = true)]
    bench_threads: Option<usize>,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 16)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Generation only: weights of the matrix products, f32 (the model's own), bf16 or int8
    /// (inference-only packed copies).
    #[arg(long, default_value_t = WeightFormat::F32)]
    weights: WeightFormat,
}

#[derive(Args)]
pub struct TrainBench {
    #[command(flatten)]
    shape: Shape,
    /// Matmul arithmetic: f32, or bf16 (bf16 operands, f32 accumulation; AMX or AVX512-BF16;
    /// attention's products too where the CPU has AVX512-BF16).
    #[arg(long, default_value = "f32")]
    precision: kiln_kernels::Precision,
    /// Train LoRA adapters of this rank on a frozen base instead of every weight (0: full).
    #[arg(long, default_value_t = 0)]
    lora_rank: usize,
    /// LoRA targets (comma-separated module names, or all-linear).
    #[arg(long, value_delimiter = ',', default_value = "all-linear")]
    lora_targets: Vec<String>,
    /// The frozen base's format under LoRA: f32, bf16 or int8.
    #[arg(long, default_value_t = WeightFormat::F32)]
    base_weights: WeightFormat,
}

#[derive(Args)]
pub struct TokArgs {
    /// Corpus files (default: a generated demo corpus of a few MB).
    #[arg(long)]
    input: Vec<PathBuf>,
    #[arg(long, default_value_t = 4096)]
    vocab_size: usize,
}

/// Peak resident memory of this process, from /proc (Linux), in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn parse_family(s: &str) -> Result<Family> {
    Family::parse(s)
}

fn model_for(s: &Shape) -> Result<Model> {
    let cfg = ModelConfig {
        vocab_size: s.vocab,
        n_ctx: s.ctx,
        n_layer: s.layers,
        n_head: s.heads,
        n_embd: s.dim,
        arch: Arch::Decoder,
        score_head: false,
        family: s.arch,
        n_kv_head: s.kv_heads,
        ffn_hidden: s.ffn,
        tie_embeddings: !s.untied,
        ..ModelConfig::default()
    };
    cfg.validate()?;
    Ok(Model::new(cfg, 0))
}

fn with_threads<T: Send>(n: Option<usize>, f: impl FnOnce() -> T + Send) -> Result<T> {
    match n {
        Some(n) => Ok(kiln_kernels::thread_pool_builder(Some(n))
            .build()?
            .install(f)),
        None => Ok(f()),
    }
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Train(s) => with_threads(s.shape.bench_threads, || bench_train(&s))?,
        BenchCmd::Generate(s) => with_threads(s.bench_threads, || bench_generate(&s))?,
        BenchCmd::Tokenizer(a) => bench_tokenizer(&a),
    }
}

fn bench_train(args: &TrainBench) -> Result<()> {
    let s = &args.shape;
    if s.weights != WeightFormat::F32 {
        bail!("--weights applies to `bench generate` only (training takes --precision)");
    }
    let b = s.batch.unwrap_or(8);
    let mut model = model_for(s)?;
    let (precision, why) = args.precision.for_this_cpu();
    if let Some(why) = why {
        eprintln!("{why}");
    }
    model.precision = precision;
    let lora = (args.lora_rank > 0).then(|| kiln_model::LoraConfig {
        rank: args.lora_rank,
        alpha: 2.0 * args.lora_rank as f32,
        targets: args.lora_targets.clone(),
        base_weights: args.base_weights,
        ..Default::default()
    });
    if lora.is_none() && args.base_weights != WeightFormat::F32 {
        bail!("--base-weights needs --lora-rank (only a frozen base is packed)");
    }
    let estimate = kiln_model::memory::training_bytes_with(
        &model.cfg,
        b,
        s.ctx,
        true,
        lora.as_ref(),
        precision,
    );
    if let Some(l) = &lora {
        model.attach_lora(l, 0)?;
    }
    let t = s.ctx;
    let mut rng = ChaCha8Rng::seed_from_u64(1234);
    let data: Vec<u32> = (0..b * (t + 1))
        .map(|_| rng.gen_range(0..s.vocab as u32))
        .collect();
    let mut tokens = Vec::with_capacity(b * t);
    let mut targets = Vec::with_capacity(b * t);
    for r in 0..b {
        tokens.extend_from_slice(&data[r * (t + 1)..r * (t + 1) + t]);
        targets.extend_from_slice(&data[r * (t + 1) + 1..(r + 1) * (t + 1)]);
    }
    let positions: Vec<u32> = (0..b * t).map(|i| (i % t) as u32).collect();
    let mut acts = Activations::new(&model.cfg, b, t, true);
    let mut opt = AdamW::new(&model, AdamWConfig::default());
    // Peak memory from here on: the training loop's, not the f32 model a packed base came from.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    println!(
        "kiln arch={} threads={} simd={} vocab={} layers={} heads={} kv_heads={} ffn={} dim={} ctx={} batch={} precision={}{}",
        s.arch.name(),
        rayon::current_num_threads(),
        kiln_kernels::simd_level_name(),
        s.vocab,
        s.layers,
        s.heads,
        model.cfg.kv_heads(),
        model.cfg.ffn(),
        s.dim,
        s.ctx,
        b,
        precision,
        match (precision, kiln_kernels::bf16::hardware()) {
            (kiln_kernels::Precision::Bf16, Some(hw)) => format!(" ({hw})"),
            (kiln_kernels::Precision::Bf16, None) =>
                " (no bf16 hardware: portable path)".to_string(),
            (kiln_kernels::Precision::F32, _) => String::new(),
        }
    );
    let mut times = Vec::new();
    // Per measured step: the time of each kind of kernel.
    let mut profiles: Vec<kiln_kernels::profile::Profile> = Vec::new();
    let mut losses = Vec::new();
    let dlogp = vec![-1.0 / (b * t) as f32; b * t];
    kiln_kernels::profile::enable(true);
    for step in 0..s.warmup + s.steps {
        let _ = kiln_kernels::profile::take();
        let t0 = Instant::now();
        model.zero_grads();
        model.forward(
            &mut acts,
            &Input {
                tokens: &tokens,
                positions: &positions,
                valid: None,
                segments: None,
                b,
                t,
            },
        );
        model.lm_head(&mut acts, &targets, 1.0);
        let loss = -acts.logp.iter().map(|&x| x as f64).sum::<f64>() / (b * t) as f64;
        model.lm_head_backward(&mut acts, &dlogp, None);
        model.backward(&mut acts);
        let (_, clip) = clip_scale(model.trainable_grads_mut(), 1.0);
        opt.update_scaled(&mut model, 1e-3, clip);
        let dt = t0.elapsed().as_secs_f64();
        let prof = kiln_kernels::profile::take();
        losses.push(loss);
        if step >= s.warmup {
            times.push(dt);
            profiles.push(prof);
        }
    }
    kiln_kernels::profile::enable(false);
    let med = median(times.clone());
    use kiln_kernels::profile::Kind;
    let kind_med = |k: Kind| median(profiles.iter().map(|p| p.time(k).as_secs_f64()).collect());
    let mm_med = kind_med(Kind::Matmul);
    let mm_flops = profiles.last().map_or(0, |p| p.matmul_flops);
    let nparams = model.cfg.num_params();
    let tok = b * t;
    let flops = (6 * nparams + 12 * s.layers * s.ctx * s.dim) as f64 * tok as f64;
    let lora_desc = match &lora {
        Some(l) => format!(" lora_rank={} base_weights={}", l.rank, l.base_weights),
        None => String::new(),
    };
    println!(
        "RESULT kiln-train params={nparams} trainable={}{lora_desc} tokens_per_step={tok} median_ms={:.1} tok_per_s={:.0} gflop_per_s={:.1} loss_first={:.4} loss_last={:.4} peak_mib={:.0} estimate_mib={:.0}",
        model.num_trainable(),
        med * 1e3,
        tok as f64 / med,
        flops / med / 1e9,
        losses[0],
        losses[losses.len() - 1],
        peak_rss_mib(),
        estimate as f64 / (1 << 20) as f64
    );
    // The step against its own matrix products: what the rest (attention's softmax, norms,
    // activations, the loss, AdamW, memory traffic) costs.
    println!(
        "RESULT kiln-train-matmuls matmul_ms={:.1} matmul_gflop_per_s={:.1} other_ms={:.1} step_over_matmuls={:.3}",
        mm_med * 1e3,
        mm_flops as f64 / mm_med.max(1e-12) / 1e9,
        (med - mm_med) * 1e3,
        med / mm_med.max(1e-12)
    );
    // Where the rest goes: each kind's median time, and the glue between kernels (the step less
    // every kernel, median over steps).
    let glue = median(
        times
            .iter()
            .zip(&profiles)
            .map(|(t, p)| t - p.total().as_secs_f64())
            .collect(),
    );
    let kinds: Vec<String> = Kind::ALL
        .iter()
        .map(|&k| format!("{}_ms={:.1}", k.name(), kind_med(k) * 1e3))
        .collect();
    println!(
        "RESULT kiln-train-profile step_ms={:.1} {} glue_ms={:.1}",
        med * 1e3,
        kinds.join(" "),
        glue * 1e3
    );
    Ok(())
}

fn bench_generate(s: &Shape) -> Result<()> {
    let b = s.batch.unwrap_or(1);
    if s.prompt_tokens + s.new_tokens > s.ctx {
        bail!("prompt + new tokens exceed --ctx");
    }
    let model = model_for(s)?;
    let t0 = Instant::now();
    let packed = s.weights.packed().map(|f| PackedWeights::new(&model, f));
    let pack_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut rng = ChaCha8Rng::seed_from_u64(1234);
    let prompts: Vec<Vec<u32>> = (0..b)
        .map(|_| {
            (0..s.prompt_tokens)
                .map(|_| rng.gen_range(0..s.vocab as u32))
                .collect()
        })
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: s.new_tokens,
        sampling: Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        stop_tokens: vec![],
    };
    println!(
        "kiln arch={} threads={} simd={} vocab={} layers={} heads={} dim={} ctx={} batch={b} weights={}",
        s.arch.name(),
        rayon::current_num_threads(),
        kiln_kernels::simd_level_name(),
        s.vocab,
        s.layers,
        s.heads,
        s.dim,
        s.ctx,
        s.weights
    );
    if let Some(p) = &packed {
        println!(
            "packed {} matrices: {:.1} MB in {pack_ms:.0} ms",
            s.weights,
            p.bytes() as f64 / 1e6
        );
    }
    let reps = (s.steps / 3).max(1);
    let (mut times, mut prefills) = (Vec::new(), Vec::new());
    for rep in 0..s.warmup + reps {
        let t0 = Instant::now();
        // Every prompt is prefilled before the first token is chosen: time to first token.
        let mut first: Option<Instant> = None;
        let out = generate_with(
            &model,
            packed.as_ref(),
            &prompts,
            &opts,
            &mut rng,
            |_, _| {
                first.get_or_insert_with(Instant::now);
            },
        )?;
        let dt = t0.elapsed().as_secs_f64();
        assert!(out.iter().all(|o| o.len() == s.new_tokens));
        if rep >= s.warmup {
            times.push(dt);
            prefills.push(first.map_or(dt, |f| (f - t0).as_secs_f64()));
        }
    }
    let (med, prefill) = (median(times), median(prefills));
    println!(
        "RESULT kiln-generate batch={b} prompt={} new={} weights={} median_ms={:.1} tok_per_s={:.0} peak_mib={:.0} prefill_ms={:.1} prompt_tok_per_s={:.0}",
        s.prompt_tokens,
        s.new_tokens,
        s.weights,
        med * 1e3,
        (b * s.new_tokens) as f64 / med,
        peak_rss_mib(),
        prefill * 1e3,
        (b * s.prompt_tokens) as f64 / prefill.max(1e-12)
    );
    // The memory-bandwidth bound: every decoding step streams the matrices once (for the whole
    // batch) and each sequence's KV cache so far.
    let cfg = &model.cfg;
    let weights = match &packed {
        Some(p) => p.bytes(),
        None => {
            let lay = &model.layout;
            let per_layer: usize = lay
                .layers
                .iter()
                .map(|l| {
                    [&l.qkv, &l.o, &l.up, &l.down]
                        .iter()
                        .map(|x| x.i * x.o)
                        .sum::<usize>()
                })
                .sum();
            4 * (per_layer + cfg.vocab_size * cfg.n_embd)
        }
    };
    let avg_len = s.prompt_tokens as f64 + s.new_tokens as f64 / 2.0;
    let kv = 2.0 * 4.0 * (cfg.n_layer * cfg.kv_heads() * cfg.head_size()) as f64 * avg_len;
    let step_bytes = weights as f64 + b as f64 * kv;
    let bw = kiln_kernels::profile::read_bandwidth();
    let bound_steps = bw / step_bytes;
    let steps_per_s = s.new_tokens as f64 / med;
    println!(
        "RESULT kiln-generate-bound read_gb_per_s={:.1} mb_per_step={:.2} (weights {:.2} + kv {:.2}) bound_tok_per_s={:.0} share_of_bound={:.2}",
        bw / 1e9,
        step_bytes / 1e6,
        weights as f64 / 1e6,
        b as f64 * kv / 1e6,
        bound_steps * b as f64,
        steps_per_s / bound_steps
    );
    if let Some(llc) = last_level_cache_bytes().filter(|&c| step_bytes < c as f64) {
        println!(
            "note: a step's {:.1} MB fit in the {:.0} MB last-level cache, so decoding can beat the memory bound",
            step_bytes / 1e6,
            llc as f64 / 1e6
        );
    }
    Ok(())
}

/// The largest CPU cache (Linux sysfs), in bytes.
fn last_level_cache_bytes() -> Option<usize> {
    (0..8)
        .filter_map(|i| {
            let t = std::fs::read_to_string(format!(
                "/sys/devices/system/cpu/cpu0/cache/index{i}/size"
            ))
            .ok()?;
            let t = t.trim();
            let (num, mult) = match t.strip_suffix('K') {
                Some(n) => (n, 1 << 10),
                None => match t.strip_suffix('M') {
                    Some(n) => (n, 1 << 20),
                    None => (t, 1),
                },
            };
            Some(num.parse::<usize>().ok()? * mult)
        })
        .max()
}

fn bench_tokenizer(a: &TokArgs) -> Result<()> {
    let docs: Vec<String> = if a.input.is_empty() {
        let dir = tempfile::tempdir()?;
        kiln_demo::generate(dir.path(), 0, kiln_demo::Size::Full)?;
        kiln_data::read_documents(&dir.path().join("corpus.jsonl"), "text")?
    } else {
        let mut docs = Vec::new();
        for f in kiln_data::expand_inputs(&a.input)? {
            docs.extend(kiln_data::read_documents(&f, "text")?);
        }
        docs
    };
    let r = kiln_data::bench_tokenizer(&docs, a.vocab_size)?;
    println!(
        "corpus: {} documents, {:.2} MB; vocab {} trained in {:.2}s; {} tokens ({:.2} bytes/token); round trip {}",
        r.documents,
        r.bytes as f64 / 1e6,
        r.vocab_size,
        r.train_secs,
        r.tokens,
        r.bytes_per_token(),
        if r.round_trip_ok { "ok" } else { "FAILED" }
    );
    println!(
        "RESULT kiln-tokenizer train_s={:.2} encode_1t_mb_per_s={:.2} encode_{}t_mb_per_s={:.2} tok_per_s={:.0}",
        r.train_secs, r.single_thread_mb_s, r.threads, r.parallel_mb_s, r.parallel_tokens_s
    );
    Ok(())
}
