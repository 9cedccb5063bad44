//! The whole pipeline in one command: `kiln demo` (on self-generated data) and `kiln pipeline run`
//! (on a user's TOML file). Stages whose output is complete are reused; an interrupted stage resumes
//! from its last checkpoint. At the end: `report.md`, `summary.json` and plots in the run folder.

use crate::bundle::load_bundle;
use crate::evaluate::{Judge, JudgeConfig, Sample};
use crate::stages::{
    self, DpoConfig, GrpoStageConfig, ModelShape, PpoStageConfig, PretrainConfig, RmConfig,
    SftConfig, StageResult,
};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kiln_data::datasets::Message;
use kiln_demo::Size;
use kiln_model::{Activations, Family};
use kiln_train::Metrics;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct DataDemoArgs {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// tiny | small | full
    #[arg(long, default_value = "small")]
    size: Size,
}

pub fn run_data_demo(a: DataDemoArgs) -> Result<()> {
    let m = kiln_demo::generate(&a.out, a.seed, a.size)?;
    println!(
        "demo data ({}, seed {}) in {}: corpus {} documents ({:.2} MB), SFT {}/{}, rankings {}/{}, scored {}/{}, PPO prompts {}, eval prompts {}",
        a.size.name(),
        a.seed,
        a.out.display(),
        m.counts.corpus_documents,
        m.counts.corpus_bytes as f64 / 1e6,
        m.counts.sft_train,
        m.counts.sft_val,
        m.counts.rm_train,
        m.counts.rm_val,
        m.counts.rm_scored_train,
        m.counts.rm_scored_val,
        m.counts.ppo_prompts,
        m.counts.eval_prompts
    );
    Ok(())
}

#[derive(Args)]
pub struct DemoArgs {
    /// Run folder.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// tiny (a smoke test, seconds) | small (the default, ~8 min on 2 cores) | full (6 layers ×
    /// 192, 4x the data, ~25 min)
    #[arg(long, default_value = "small")]
    size: Size,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Start over: delete the run folder first instead of reusing finished stages.
    #[arg(long)]
    fresh: bool,
    /// Model family of the demo's models: llama (RMSNorm, RoPE, SwiGLU, grouped-query attention
    /// with half as many key/value heads; the default: measured better on the demo), or gpt2.
    #[arg(long, default_value = "llama", value_parser = crate::bench::parse_family)]
    arch: Family,
}

#[derive(Subcommand)]
pub enum PipelineCmd {
    /// Run the pipeline a TOML file describes (see README: "Your own data").
    Run {
        config: PathBuf,
        #[arg(long)]
        fresh: bool,
    },
    /// Print the pipeline configuration the demo uses, as a starting point for your own.
    Example {
        #[arg(long, default_value = "small")]
        size: Size,
        /// Model family (model.arch in [pretrain]): llama or gpt2.
        #[arg(long, default_value = "llama", value_parser = crate::bench::parse_family)]
        arch: Family,
    },
}

/// Settings of the tokenizer and shard stages.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorpusConfig {
    /// Corpus files or directories (.txt, .md, .jsonl).
    pub input: Vec<PathBuf>,
    pub field: String,
    pub vocab_size: usize,
    pub val_fraction: f64,
}

impl Default for CorpusConfig {
    fn default() -> Self {
        CorpusConfig {
            input: Vec::new(),
            field: "text".into(),
            vocab_size: 2048,
            val_fraction: 0.02,
        }
    }
}

/// A whole pipeline: corpus → tokenizer → shards → pretrain → SFT → RM → PPO, and optionally DPO
/// from the same SFT model on the reward model's preference data. Paths between stages are derived
/// from `out`; the user names the data.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    pub out: PathBuf,
    pub seed: u64,
    pub corpus: CorpusConfig,
    /// Judged task accuracy (demo world) for SFT, PPO and the report.
    pub judge: Option<JudgeConfig>,
    pub pretrain: PretrainConfig,
    pub sft: SftConfig,
    pub rm: RmConfig,
    pub ppo: PpoStageConfig,
    /// DPO as the alternative to RM + PPO (absent: not run). Its data default to `rm.data` /
    /// `rm.val_data`, its model to the SFT model.
    pub dpo: Option<DpoConfig>,
    /// GRPO from the SFT model with verifiable rewards (absent: not run). Its prompts default to
    /// `ppo.prompts`; with a judge and no rewards named, the judge is the reward.
    pub grpo: Option<GrpoStageConfig>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            out: PathBuf::from("runs/pipeline"),
            seed: 1337,
            corpus: CorpusConfig::default(),
            judge: None,
            pretrain: PretrainConfig::default(),
            sft: SftConfig::default(),
            rm: RmConfig::default(),
            ppo: PpoStageConfig::default(),
            dpo: None,
            grpo: None,
        }
    }
}

/// The demo's settings per size, tuned for a 2-core CPU.
pub fn demo_config(data: &Path, out: &Path, size: Size, seed: u64, arch: Family) -> PipelineConfig {
    let mut c = PipelineConfig {
        out: out.to_path_buf(),
        seed,
        ..Default::default()
    };
    let d = |f: &str| data.join(f);
    c.corpus.input = vec![d("corpus.jsonl")];
    c.judge = Some(JudgeConfig {
        world: d("world.json"),
        prompts: d("eval_prompts.jsonl"),
        limit: 0,
        max_new_tokens: 24,
    });
    c.sft.data = vec![d("sft_train.jsonl")];
    c.sft.val_data = Some(d("sft_val.jsonl"));
    c.rm.data = vec![d("rm_train.jsonl")];
    c.rm.val_data = Some(d("rm_val.jsonl"));
    c.rm.test_data = Some(d("rm_heldout.jsonl"));
    c.ppo.prompts = d("ppo_prompts.jsonl");
    let (shape, vocab, pre_steps, sft_steps, rm_steps, ppo_iters, dpo_steps) = match size {
        Size::Tiny => (
            ModelShape {
                n_layer: 2,
                n_head: 2,
                n_embd: 64,
                n_ctx: 64,
                ..ModelShape::default()
            },
            512,
            60,
            40,
            30,
            4,
            20,
        ),
        Size::Small => (
            ModelShape {
                n_layer: 4,
                n_head: 4,
                n_embd: 128,
                n_ctx: 64,
                ..ModelShape::default()
            },
            1024,
            3000,
            800,
            8000,
            40,
            600,
        ),
        // Demo documents and answers are short: a 64-token context loses little and halves the cost.
        Size::Full => (
            ModelShape {
                n_layer: 6,
                n_head: 6,
                n_embd: 192,
                n_ctx: 64,
                ..ModelShape::default()
            },
            2048,
            3500,
            1500,
            8000,
            40,
            600,
        ),
    };
    c.corpus.vocab_size = vocab;
    c.pretrain.model = ModelShape {
        arch,
        n_kv_head: if arch == Family::Gpt2 {
            0
        } else {
            (shape.n_head / 2).max(1)
        },
        ..shape
    };
    c.pretrain.train.max_steps = pre_steps;
    c.pretrain.train.batch_size = 16;
    c.pretrain.train.eval_every = (pre_steps / 6).max(1);
    c.pretrain.train.ckpt_every = (pre_steps / 4).max(1);
    c.pretrain.train.warmup_steps = (pre_steps / 20).max(1);
    // Demo answers are short: packing several per row makes each step see more of them.
    c.sft.packing = true;
    c.sft.train.lr = 2e-3;
    c.sft.train.max_steps = sft_steps;
    c.sft.train.eval_every = (sft_steps / 2).max(1);
    c.sft.train.ckpt_every = (sft_steps / 2).max(1);
    c.sft.train.warmup_steps = (sft_steps / 10).max(1);
    c.rm.train.lr = 2e-3;
    c.rm.train.batch_size = 8;
    c.rm.train.max_steps = rm_steps;
    c.rm.train.eval_every = (rm_steps / 3).max(1);
    c.rm.train.ckpt_every = (rm_steps / 2).max(1);
    c.rm.train.warmup_steps = (rm_steps / 10).max(1);
    // A model this small moves little at the 1e-5 that suits large ones.
    c.ppo.ppo.actor_lr = 5e-5;
    c.ppo.ppo.kl_coef = 0.1;
    c.ppo.ppo.critic_lr = 1e-4;
    c.ppo.ppo.iterations = ppo_iters;
    c.ppo.ppo.eval_every = (ppo_iters / 3).max(1);
    c.ppo.ppo.ckpt_every = (ppo_iters / 3).max(1);
    // DPO from the same SFT model on the same rankings (every ordered pair of each prompt's four
    // answers), against the SFT model as its reference.
    let mut dpo = DpoConfig::default();
    dpo.train.lr = 1e-4;
    dpo.train.min_lr = 1e-5;
    dpo.train.batch_size = 8;
    dpo.train.max_steps = dpo_steps;
    dpo.train.eval_every = (dpo_steps / 3).max(1);
    dpo.train.ckpt_every = (dpo_steps / 3).max(1);
    dpo.train.warmup_steps = (dpo_steps / 10).max(1);
    if size == Size::Tiny {
        dpo.train.batch_size = 2;
    }
    c.dpo = Some(dpo);
    // GRPO from the same SFT model on PPO's prompts, rewarded by the judge (1 for a right answer):
    // as many iterations as PPO, 8 prompts × 16 answers each. The SFT policy answers these short
    // questions almost deterministically, so most groups of 8 are all right or all wrong and teach
    // nothing; groups of 16 (the same 128 samples) found more mixed ones: 53.0 → 58.5 % held out.
    let mut grpo = GrpoStageConfig::default();
    grpo.grpo.iterations = ppo_iters;
    grpo.grpo.group_size = 16;
    grpo.grpo.prompts_per_iter = 8;
    grpo.grpo.eval_every = (ppo_iters / 3).max(1);
    grpo.grpo.ckpt_every = (ppo_iters / 3).max(1);
    if size == Size::Tiny {
        grpo.grpo.prompts_per_iter = 4;
        grpo.grpo.group_size = 4;
        grpo.grpo.minibatch = 8;
    }
    c.grpo = Some(grpo);
    if size == Size::Tiny {
        c.ppo.ppo.rollout_batch = 16;
        c.ppo.ppo.minibatch = 8;
        c.pretrain.train.batch_size = 8;
        c.sft.train.batch_size = 8;
        c.rm.train.batch_size = 2;
        if let Some(j) = c.judge.as_mut() {
            j.limit = 24;
        }
    }
    c
}

pub fn run_data_and_demo_config(a: &DemoArgs) -> Result<PipelineConfig> {
    if a.fresh && a.out.exists() {
        std::fs::remove_dir_all(&a.out).with_context(|| format!("removing {}", a.out.display()))?;
    }
    let data = a.out.join("data");
    if kiln_demo::DemoManifest::load(&data)
        .map(|m| {
            m.seed == a.seed && m.size == a.size && m.format_version == kiln_demo::FORMAT_VERSION
        })
        .unwrap_or(false)
    {
        eprintln!("[data] reusing the demo data in {}", data.display());
    } else {
        let t0 = Instant::now();
        let m = kiln_demo::generate(&data, a.seed, a.size)?;
        eprintln!(
            "[data] demo world ({}) generated in {:.1}s: corpus {:.2} MB, {} SFT, {} rankings, {} PPO prompts, {} eval prompts",
            a.size.name(),
            t0.elapsed().as_secs_f64(),
            m.counts.corpus_bytes as f64 / 1e6,
            m.counts.sft_train,
            m.counts.rm_train,
            m.counts.ppo_prompts,
            m.counts.eval_prompts
        );
    }
    Ok(demo_config(&data, &a.out, a.size, a.seed, a.arch))
}

pub fn run_demo(a: DemoArgs, progress: bool) -> Result<()> {
    let cfg = run_data_and_demo_config(&a)?;
    run_pipeline_config(&cfg, progress)
}

pub fn run_pipeline(c: PipelineCmd, progress: bool) -> Result<()> {
    match c {
        PipelineCmd::Run { config, fresh } => {
            let cfg: PipelineConfig = crate::config::build(Some(&config), Default::default())?;
            if fresh && cfg.out.exists() {
                std::fs::remove_dir_all(&cfg.out)?;
            }
            run_pipeline_config(&cfg, progress)
        }
        PipelineCmd::Example { size, arch } => {
            let cfg = demo_config(
                Path::new("runs/demo/data"),
                Path::new("runs/mine"),
                size,
                1337,
                arch,
            );
            println!("# A Kiln pipeline. Name your data: corpus.input, sft.data / sft.val_data, rm.data / rm.val_data,");
            println!("# ppo.prompts (and judge, for the demo world only). Paths between stages (pretrain.data,");
            println!("# pretrain.tokenizer, sft.init, rm.init, ppo.actor, ppo.reward_model, dpo.init, every out) are derived");
            println!("# from `out`; [dpo] (delete it to skip DPO) trains on rm.data unless dpo.data names other files.");
            print!("{}", crate::config::to_toml(&cfg)?);
            Ok(())
        }
    }
}

/// Runs `f` unless the stage's `done.json` says it finished; records its time.
fn stage<F: FnOnce() -> Result<StageResult>>(
    name: &str,
    dir: &Path,
    results: &mut BTreeMap<String, StageResult>,
    f: F,
) -> Result<()> {
    if let Some(r) = StageResult::load(dir) {
        eprintln!(
            "[{name}] finished earlier ({:.0}s); reusing {}",
            r.seconds,
            dir.display()
        );
        results.insert(name.into(), r);
        return Ok(());
    }
    let t0 = Instant::now();
    let mut r = f()?;
    r.stage = name.into();
    r.seconds = t0.elapsed().as_secs_f64();
    if kiln_train::trainer::STOP.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("interrupted during {name}; run the same command again to resume");
    }
    r.save(dir)?;
    eprintln!("[{name}] done in {:.1}s", r.seconds);
    results.insert(name.into(), r);
    Ok(())
}

fn summary_result(s: &kiln_train::TrainSummary) -> StageResult {
    StageResult {
        metrics_start: s.eval_start.clone(),
        metrics_end: s.eval.clone(),
        extra: serde_json::json!({"steps": s.steps, "tokens_per_sec": s.tokens_per_sec, "final_loss": s.final_loss}),
        ..Default::default()
    }
}

pub fn run_pipeline_config(cfg: &PipelineConfig, progress: bool) -> Result<()> {
    kiln_train::install_ctrlc();
    let total = Instant::now();
    let out = &cfg.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let text = crate::config::to_toml(cfg)?;
    // Finished stages are reused only for the configuration that made them.
    if let Ok(old) = std::fs::read_to_string(out.join("pipeline.toml")) {
        let old = crate::config::normalize_toml(&old).unwrap_or(old);
        if old != text {
            let line = old
                .lines()
                .zip(text.lines())
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!(" (first difference: {a:?} then, {b:?} now)"))
                .unwrap_or_default();
            bail!(
                "{} holds a run of another configuration{line}: add --fresh to start over, or choose another --out",
                out.display()
            );
        }
    }
    kiln_data::atomic_write(&out.join("pipeline.toml"), |w| w.write_all(text.as_bytes()))?;
    let mut results = BTreeMap::new();
    if cfg.corpus.input.is_empty() {
        bail!("pipeline: corpus.input names no files");
    }
    // Tokenizer.
    let tok_dir = out.join("tokenizer");
    let tok_path = tok_dir.join("tokenizer.json");
    stage("tokenizer", &tok_dir, &mut results, || {
        let t0 = Instant::now();
        let (tok, _stats) = kiln_data::Tokenizer::train_with_stats(
            &cfg.corpus.input,
            &cfg.corpus.field,
            cfg.corpus.vocab_size,
        )?;
        tok.save(&tok_path)?;
        eprintln!(
            "[tokenizer] vocabulary of {} trained in {:.1}s",
            tok.vocab_size(),
            t0.elapsed().as_secs_f64()
        );
        Ok(StageResult {
            extra: serde_json::json!({"vocab_size": tok.vocab_size()}),
            ..Default::default()
        })
    })?;
    // Shards.
    let shards = out.join("shards");
    stage("prepare", &shards, &mut results, || {
        let tok = kiln_data::Tokenizer::load(&tok_path)?;
        let s = kiln_data::prepare(
            &tok,
            &cfg.corpus.input,
            &cfg.corpus.field,
            &shards,
            cfg.corpus.val_fraction,
            cfg.seed,
            kiln_data::prepare::DEFAULT_SHARD_TOKENS,
            progress,
        )?;
        Ok(StageResult {
            extra: serde_json::json!({"train_tokens": s.train_tokens, "val_tokens": s.val_tokens, "documents": s.documents}),
            ..Default::default()
        })
    })?;
    // Pretraining.
    let mut pre = cfg.pretrain.clone();
    pre.data = shards.clone();
    pre.tokenizer = tok_path.clone();
    pre.out = out.join("pretrain");
    pre.train.seed = cfg.seed;
    stage("pretrain", &pre.out.clone(), &mut results, || {
        Ok(summary_result(&stages::pretrain(&pre, true, progress)?))
    })?;
    // SFT.
    let mut sft = cfg.sft.clone();
    sft.init = pre.out.clone();
    sft.out = out.join("sft");
    sft.judge = cfg.judge.clone();
    sft.train.seed = cfg.seed;
    stage("sft", &sft.out.clone(), &mut results, || {
        Ok(summary_result(&stages::sft(&sft, true, progress)?))
    })?;
    // Reward model.
    let mut rm = cfg.rm.clone();
    rm.init = sft.out.clone();
    rm.out = out.join("rm");
    rm.train.seed = cfg.seed;
    stage("rm", &rm.out.clone(), &mut results, || {
        Ok(summary_result(&stages::reward_model(&rm, true, progress)?))
    })?;
    // PPO.
    let mut ppo = cfg.ppo.clone();
    ppo.actor = sft.out.clone();
    ppo.reward_model = rm.out.clone();
    ppo.out = out.join("ppo");
    ppo.judge = cfg.judge.clone();
    ppo.ppo.seed = cfg.seed;
    if ppo.ppo.ptx_coef > 0.0 && ppo.ptx_data.is_none() {
        ppo.ptx_data = Some(shards.clone());
    }
    stage("ppo", &ppo.out.clone(), &mut results, || {
        let s = stages::ppo(&ppo, true, progress)?;
        Ok(StageResult {
            metrics_start: s.eval_start.clone(),
            metrics_end: s.eval_end.clone(),
            extra: serde_json::json!({"history": s.history, "iterations": s.iterations}),
            ..Default::default()
        })
    })?;
    // DPO: the alternative to RM + PPO, from the same SFT model and preference data.
    let dpo = cfg.dpo.clone().map(|mut d| {
        d.init = sft.out.clone();
        d.reference = None;
        if d.data.is_empty() {
            d.data = rm.data.clone();
            if d.val_data.is_none() {
                d.val_data = rm.val_data.clone();
            }
        }
        d.out = out.join("dpo");
        d.judge = cfg.judge.clone();
        d.train.seed = cfg.seed;
        d
    });
    if let Some(d) = &dpo {
        stage("dpo", &d.out.clone(), &mut results, || {
            let r = stages::dpo(d, true, progress)?;
            let mut res = summary_result(&r.summary);
            res.extra["skipped_records"] = serde_json::json!(r.skipped);
            Ok(res)
        })?;
    }
    // GRPO: RL with the judge as a verifiable reward, no reward model and no critic.
    let grpo = cfg.grpo.clone().map(|mut g| {
        g.actor = sft.out.clone();
        if g.prompts == GrpoStageConfig::default().prompts {
            g.prompts = ppo.prompts.clone();
        }
        g.out = out.join("grpo");
        g.judge = cfg.judge.clone();
        if g.judge.is_none() {
            g.rewards.retain(|r| r != "judge");
        }
        g.grpo.seed = cfg.seed;
        g
    });
    if let Some(g) = grpo.as_ref().filter(|g| !g.rewards.is_empty()) {
        stage("grpo", &g.out.clone(), &mut results, || {
            let s = stages::grpo(g, true, progress)?;
            Ok(StageResult {
                metrics_start: s.eval_start.clone(),
                metrics_end: s.eval_end.clone(),
                extra: serde_json::json!({"history": s.history, "iterations": s.iterations}),
                ..Default::default()
            })
        })?;
    }
    // Report.
    let t0 = Instant::now();
    let dirs = crate::report::StageDirs {
        pre: &pre.out,
        sft: &sft.out,
        rm: &rm.out,
        ppo: &ppo.out,
        dpo: dpo.as_ref().map(|d| d.out.as_path()),
        grpo: grpo
            .as_ref()
            .filter(|_| results.contains_key("grpo"))
            .map(|g| g.out.as_path()),
    };
    crate::report::write_report(cfg, &results, &dirs)?;
    eprintln!(
        "[report] written in {:.1}s: {}",
        t0.elapsed().as_secs_f64(),
        out.join("report.md").display()
    );
    eprintln!("pipeline finished in {:.1}s", total.elapsed().as_secs_f64());
    Ok(())
}

/// The drift of a model from the SFT model on the held-out prompts: one answer per prompt sampled
/// at temperature 1 (seed 0), and Σ over its tokens of KL(π(·|x, y<t) ‖ π_SFT(·|x, y<t)), exact over
/// the vocabulary; the mean over prompts, in nats per answer (the same measure for PPO and DPO).
pub fn heldout_kl(dir: &Path, sft_dir: &Path, judge: &Judge) -> Result<f64> {
    let (p, r) = (load_bundle(dir)?, load_bundle(sft_dir)?);
    let template = &p.meta.template;
    let opts = kiln_model::GenerateOptions {
        max_new_tokens: judge.max_new_tokens,
        sampling: kiln_model::Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        stop_tokens: template.stop_tokens()?,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut items = Vec::with_capacity(judge.prompts.len());
    for chunk in judge.prompts.chunks(64) {
        let rendered: Vec<Vec<u32>> = chunk
            .iter()
            .map(|q| template.render_prompt(&p.tokenizer, &[Message::user(q.clone())]))
            .collect::<Result<_, _>>()?;
        let outs = kiln_model::generate(&p.model, &rendered, &opts, &mut rng, |_, _| {})?;
        items.extend(rendered.into_iter().zip(outs));
    }
    let kl = kiln_train::dpo::response_kl(&p.model, &r.model, &items)?;
    Ok(kl.iter().sum::<f64>() / kl.len().max(1) as f64)
}

/// Answers of one model to held-out prompts, judged, and scored by the reward model.
pub struct ModelEval {
    pub name: String,
    pub metrics: Metrics,
    pub samples: Vec<Sample>,
    pub rm_scores: Vec<f32>,
}

pub fn eval_model(name: &str, dir: &Path, judge: &Judge, rm_dir: &Path) -> Result<ModelEval> {
    let b = load_bundle(dir)?;
    let (mut metrics, samples) = judge.evaluate(&b.model, &b.tokenizer, b.chat()?)?;
    let rm = load_bundle(rm_dir)?;
    let (mean, std) = (
        rm.meta.reward_mean.unwrap_or(0.0),
        rm.meta.reward_std.unwrap_or(1.0),
    );
    let n_ctx = rm.model.cfg.n_ctx;
    let seqs: Vec<Vec<u32>> = samples
        .iter()
        .map(|s| {
            let r = rm.meta.template.render_prompt_response(
                &rm.tokenizer,
                &[Message::user(s.prompt.clone())],
                &s.response,
            )?;
            Ok(kiln_data::template::fit_example(&r, n_ctx)
                .map(|f| f.tokens)
                .unwrap_or_else(|| r.tokens[r.tokens.len().saturating_sub(n_ctx)..].to_vec()))
        })
        .collect::<Result<_>>()?;
    let mut acts = Activations::new(&rm.model.cfg, 32, n_ctx, false);
    let mut rm_scores = Vec::new();
    for chunk in seqs.chunks(32) {
        rm_scores.extend(
            kiln_train::rm::score_rows(&rm.model, &mut acts, chunk)
                .into_iter()
                .map(|s| (s - mean) / std),
        );
    }
    metrics.insert(
        "rm_score".into(),
        rm_scores.iter().map(|&x| x as f64).sum::<f64>() / rm_scores.len().max(1) as f64,
    );
    Ok(ModelEval {
        name: name.into(),
        metrics,
        samples,
        rm_scores,
    })
}
