//! `kiln`: train a chat language model end to end on CPU — BPE tokenizer, pretraining, supervised
//! fine-tuning, reward model and RLHF with PPO — in one binary.

mod bench;
mod chat;
mod cmd_data_prepare;
mod cmd_dpo;
mod cmd_grpo;
mod cmd_lora;
mod cmd_template;
mod cmd_tokenizer;
mod demo;
#[cfg(feature = "mpi")]
mod mpi_world;
mod serve;

// The pipeline library's modules under their old paths, so `crate::stages::…` reads as before.
use kiln_pipeline::{bundle, config, evaluate, stages};

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use config::Overrides;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Train a chat language model end to end on CPU: tokenizer → pretraining → SFT → reward model → PPO", long_about = None)]
struct Cli {
    /// Worker threads (default: all cores). Results are reproducible for a fixed seed and thread count.
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// No progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole pipeline on self-generated demo data, with a report.
    Demo(demo::DemoArgs),
    /// Run the whole pipeline from a TOML file naming your own data.
    #[command(subcommand)]
    Pipeline(demo::PipelineCmd),
    /// Train, inspect and use BPE tokenizers.
    #[command(subcommand)]
    Tokenizer(cmd_tokenizer::TokenizerCmd),
    /// Prepare token shards, or generate the demo data.
    #[command(subcommand)]
    Data(DataCmd),
    /// Pretrain a GPT (next-token) or BERT-style encoder (masked-LM) on token shards.
    Pretrain(PretrainArgs),
    /// Supervised instruction fine-tuning on Alpaca, chat or ShareGPT data.
    Sft(SftArgs),
    /// Train a reward model on rankings, pairs or scores (`kiln rm score` to use one).
    Rm(RmCmd),
    /// RLHF: optimise a policy against a reward model with PPO.
    Ppo(PpoArgs),
    /// RL with verifiable rewards: GRPO / Dr. GRPO / RLOO, no critic (rewards from a judge, a
    /// reward model, a program or a format check).
    Grpo(cmd_grpo::GrpoArgs),
    /// Direct preference optimisation (DPO, IPO, hinge) of an SFT model on preference data.
    Dpo(cmd_dpo::DpoArgs),
    /// Generate text from a model (KV cache, batched, streaming).
    Generate(chat::GenerateArgs),
    /// Talk to a fine-tuned model (interactive, or --prompt / stdin for scripts).
    Chat(chat::ChatArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (continuous batching), with a chat page.
    Serve(serve::ServeArgs),
    /// Print a model's logits for some token ids as JSON (for comparing with other implementations).
    #[command(hide = true)]
    Logits(LogitsArgs),
    /// Evaluate a chat model: judged task accuracy on demo prompts, or any prompts scored by reward
    /// sources (a checker program, a reward model) exactly as `kiln grpo` rewards them.
    Eval(EvalArgs),
    /// Fill in `<|mask|>` tokens with an MLM encoder.
    FillMask(chat::FillMaskArgs),
    /// Speed benchmarks (same shapes and output lines as shared/bench/torch_gpt_bench.py).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// LoRA adapters: `kiln lora merge` folds a PEFT adapter into its base.
    #[command(subcommand)]
    Lora(cmd_lora::LoraCmd),
    /// Chat templates: render messages with a model's template (`kiln template render`).
    #[command(subcommand)]
    Template(cmd_template::TemplateCmd),
}

#[derive(Args)]
struct EvalArgs {
    /// A chat model (checkpoint or run directory).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT adapter directory to merge into the model first.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The demo world (world.json): judged task accuracy, and the `judge` reward source.
    #[arg(long)]
    world: Option<PathBuf>,
    /// Prompts to answer (e.g. eval_prompts.jsonl; with --reward, any prompt file whose records
    /// carry what the checker needs, such as a reference answer).
    #[arg(long)]
    prompts: PathBuf,
    /// At most this many prompts (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Print this many judged answers.
    #[arg(long, default_value_t = 10)]
    show: usize,
    /// Evaluate with reward sources, exactly as `kiln grpo` rewards (repeatable; summed):
    /// judge | format | rm:DIR | cmd:PROGRAM.
    #[arg(long = "reward", value_name = "SOURCE")]
    rewards: Vec<String>,
    /// The weight of each --reward, in order (default 1 each).
    #[arg(long = "reward-weight", value_name = "W")]
    reward_weights: Vec<f32>,
    /// With --reward: break the results down by this field of the prompt records.
    #[arg(long)]
    by: Option<String>,
    /// A dataset column read as one of Kiln's fields, KILN=COLUMN (repeatable): e.g.
    /// `--field instruction=question --field output=answer` (JSON, JSONL or Parquet).
    #[arg(long = "field", value_name = "KILN=COLUMN")]
    fields: Vec<String>,

    /// Tokens generated per answer (greedy).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
}

fn run_eval(a: EvalArgs) -> Result<()> {
    if !a.rewards.is_empty() {
        return cmd_grpo::run_reward_eval(cmd_grpo::RewardEvalArgs {
            model: a.model,
            adapter: a.adapter,
            world: a.world,
            prompts: a.prompts,
            limit: a.limit,
            show: a.show,
            rewards: a.rewards,
            reward_weights: a.reward_weights,
            by: a.by,
            max_new_tokens: a.max_new_tokens,
            fields: kiln_data::datasets::FieldMap::parse(&a.fields).map_err(anyhow::Error::msg)?,
        });
    }
    let Some(world) = a.world else {
        bail!("kiln eval needs --world (the demo world's judge) or --reward sources");
    };
    let b = cmd_lora::load_bundle_adapted(&a.model, a.adapter.as_deref())?;
    let judge = evaluate::Judge::load(&evaluate::JudgeConfig {
        world,
        prompts: a.prompts,
        limit: a.limit,
        max_new_tokens: a.max_new_tokens,
    })?;
    let (m, samples) = judge.evaluate(&b.model, &b.tokenizer, b.chat()?)?;
    for s in samples.iter().take(a.show) {
        let verdict = if s.correct && s.well_formed {
            "ok  "
        } else if s.correct {
            "~ok "
        } else {
            "FAIL"
        };
        println!("{verdict} {:?} -> {:?}", s.prompt, s.response);
    }
    for (k, v) in &m {
        println!("{k:>16} {v:.4}");
    }
    Ok(())
}

#[derive(Args)]
struct LogitsArgs {
    #[arg(long)]
    model: PathBuf,
    /// A PEFT adapter directory to merge into the model first.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Token ids, separated by spaces or commas.
    #[arg(long)]
    tokens: String,
}

fn run_logits(a: LogitsArgs) -> Result<()> {
    let dir = kiln_model::checkpoint::resolve_model_dir(&a.model)?;
    let model = kiln_model::checkpoint::load_model(&dir)?;
    let model = cmd_lora::merge_adapter(model, a.adapter.as_deref())?;
    let tokens: Vec<u32> = a
        .tokens
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let t = tokens.len();
    anyhow::ensure!(
        t > 0 && t <= model.cfg.n_ctx,
        "give 1..={} token ids",
        model.cfg.n_ctx
    );
    if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= model.cfg.vocab_size) {
        bail!(
            "token id {bad} is outside the model's vocabulary ({})",
            model.cfg.vocab_size
        );
    }
    let logits = model.logits(&tokens);
    let v = model.cfg.vocab_size;
    let rows: Vec<&[f32]> = logits.chunks(v).collect();
    let mut out = serde_json::json!({ "tokens": tokens, "logits": rows });
    if model.cfg.score_head {
        // A reward model or critic: its score at every position too (the reward is the last).
        out["scores"] = serde_json::json!(model.position_scores(&tokens));
    }
    println!("{out}");
    Ok(())
}

#[derive(Subcommand)]
enum DataCmd {
    /// Tokenize corpora into train/validation shards.
    Prepare(cmd_data_prepare::PrepareArgs),
    /// Generate the self-contained demo world: corpus, instructions, rankings, prompts, judge.
    Demo(demo::DataDemoArgs),
}

/// Flags shared by the training stages.
#[derive(Args, Clone)]
struct TrainFlags {
    /// A TOML config file (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue from the run directory's latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Override any config value, e.g. `--set train.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[arg(long)]
    max_steps: Option<i64>,
    #[arg(long)]
    batch_size: Option<i64>,
    #[arg(long)]
    grad_accum: Option<i64>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    warmup_steps: Option<i64>,
    #[arg(long)]
    eval_every: Option<i64>,
    #[arg(long)]
    ckpt_every: Option<i64>,
    #[arg(long)]
    seed: Option<i64>,
    /// Matmul arithmetic: `f32` (default) or `bf16` (bf16 operands, f32 accumulation and
    /// master weights; on AMX or AVX512-BF16, else f32; attention's products too where the CPU
    /// has AVX512-BF16). Same as `--set train.precision=...`.
    #[arg(long)]
    precision: Option<String>,
}

impl TrainFlags {
    fn overrides(&self) -> Result<Overrides> {
        let mut o = Overrides::default();
        o.parse_sets(&self.sets)?;
        o.opt("train.max_steps", self.max_steps);
        o.opt("train.batch_size", self.batch_size);
        o.opt("train.grad_accum", self.grad_accum);
        o.opt("train.lr", self.lr);
        o.opt("train.warmup_steps", self.warmup_steps);
        o.opt("train.eval_every", self.eval_every);
        o.opt("train.ckpt_every", self.ckpt_every);
        o.opt("train.seed", self.seed);
        o.opt("train.precision", self.precision.clone());
        Ok(o)
    }
}

#[derive(Args)]
struct PretrainArgs {
    /// Shard directory from `kiln data prepare`.
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Run directory (checkpoints, metrics.jsonl).
    #[arg(long)]
    out: Option<PathBuf>,
    /// `causal` (GPT) or `mlm` (BERT-style encoder).
    #[arg(long)]
    objective: Option<String>,
    #[arg(long)]
    layers: Option<i64>,
    #[arg(long)]
    heads: Option<i64>,
    #[arg(long)]
    dim: Option<i64>,
    #[arg(long)]
    ctx: Option<i64>,
    /// Model family: gpt2 (default), or llama (RMSNorm, rotary positions, SwiGLU, grouped-query
    /// attention; also mistral, qwen2). Sets model.arch.
    #[arg(long, value_parser = ["gpt2", "llama", "mistral", "qwen2"])]
    arch: Option<String>,
    /// Llama family: key/value heads (model.n_kv_head; default: as many as --heads).
    #[arg(long)]
    kv_heads: Option<i64>,
    /// Llama family: SwiGLU hidden size (model.ffn_hidden; default 8/3 of --dim, rounded up to 64).
    #[arg(long)]
    ffn: Option<i64>,
    /// Print a text sample every N steps.
    #[arg(long)]
    sample_every: Option<i64>,
    #[command(flatten)]
    train: TrainFlags,
}

#[derive(Args)]
struct SftArgs {
    /// The pretrained model (checkpoint or run directory).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Training data: Alpaca, chat or ShareGPT (JSON array or JSONL; repeatable).
    #[arg(long)]
    data: Vec<PathBuf>,
    #[arg(long)]
    val_data: Option<PathBuf>,
    #[arg(long)]
    out: Option<PathBuf>,
    /// Chat template: Kiln's JSON, or a Hugging Face Jinja template (FILE.jinja). Default: the
    /// model's own (kiln.json, or tokenizer_config.json's chat_template).
    #[arg(long)]
    template: Option<PathBuf>,
    /// Skip malformed records (counted and reported) instead of failing.
    #[arg(long)]
    skip_bad_records: bool,
    /// A dataset column read as one of Kiln's fields, KILN=COLUMN (repeatable): e.g.
    /// `--field instruction=question --field output=answer` (JSON, JSONL or Parquet).
    #[arg(long = "field", value_name = "KILN=COLUMN")]
    fields: Vec<String>,
    /// Pack several short examples into each row (attention never crosses examples).
    #[arg(long)]
    packing: bool,
    /// Demo world (world.json) for judged task accuracy, with --judge-prompts.
    #[arg(long)]
    judge_world: Option<PathBuf>,
    #[arg(long)]
    judge_prompts: Option<PathBuf>,
    #[command(flatten)]
    roles: RoleFlags,
    #[command(flatten)]
    train: TrainFlags,
    #[command(flatten)]
    lora: cmd_lora::LoraFlags,
}

/// Special-token roles of a Hugging Face tokenizer, overriding its files (tokenizer_config.json,
/// generation_config.json, config.json); carried on into the checkpoints Kiln writes.
#[derive(Args)]
struct RoleFlags {
    /// End-of-sequence token (repeatable: generation stops at any, e.g. `--eos-token
    /// "<|end_of_text|>" --eos-token "<|eot_id|>"`).
    #[arg(long = "eos-token", value_name = "TOKEN")]
    eos_token: Vec<String>,
    /// Beginning-of-sequence token.
    #[arg(long)]
    bos_token: Option<String>,
    /// Padding token (padding is always masked, whatever its id).
    #[arg(long)]
    pad_token: Option<String>,
    /// The token that ends a chat turn (default: found from the template, else the EOS token).
    #[arg(long)]
    end_of_turn_token: Option<String>,
}

impl RoleFlags {
    fn overrides(&self, o: &mut Overrides) {
        if !self.eos_token.is_empty() {
            o.set(
                "eos_token",
                toml::Value::Array(self.eos_token.iter().map(|t| t.clone().into()).collect()),
            );
        }
        o.opt("bos_token", self.bos_token.clone());
        o.opt("pad_token", self.pad_token.clone());
        o.opt("end_of_turn_token", self.end_of_turn_token.clone());
    }
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct RmCmd {
    #[command(subcommand)]
    sub: Option<RmSub>,
    #[command(flatten)]
    args: RmArgs,
}

#[derive(Subcommand)]
enum RmSub {
    /// Score (prompt, response) pairs with a reward model.
    Score(chat::ScoreArgs),
}

#[derive(Args)]
struct RmArgs {
    /// SFT/pretrained decoder or MLM encoder to start from.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Ranking, pairwise, HH-RLHF or scored data (repeatable).
    #[arg(long)]
    data: Vec<PathBuf>,
    #[arg(long)]
    val_data: Option<PathBuf>,
    /// Rankings evaluated once at the end (never trained on), reported as test_acc.
    #[arg(long)]
    test_data: Option<PathBuf>,
    #[arg(long)]
    out: Option<PathBuf>,
    /// pairwise | hinge | mse
    #[arg(long)]
    loss: Option<String>,
    #[arg(long)]
    margin: Option<f64>,
    #[arg(long)]
    skip_bad_records: bool,
    /// A dataset column read as one of Kiln's fields, KILN=COLUMN (repeatable): e.g.
    /// `--field instruction=question --field output=answer` (JSON, JSONL or Parquet).
    #[arg(long = "field", value_name = "KILN=COLUMN")]
    fields: Vec<String>,
    #[command(flatten)]
    roles: RoleFlags,
    #[command(flatten)]
    train: TrainFlags,
    #[command(flatten)]
    lora: cmd_lora::LoraFlags,
}

#[derive(Args)]
struct PpoArgs {
    /// The SFT model (actor and frozen reference).
    #[arg(long)]
    actor: Option<PathBuf>,
    #[arg(long)]
    reward_model: Option<PathBuf>,
    /// Critic initialisation (default: the reward model).
    #[arg(long)]
    critic: Option<PathBuf>,
    /// Prompt file: {"prompt"}, Alpaca or chat records.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// A dataset column read as one of Kiln's fields, KILN=COLUMN (repeatable): e.g.
    /// `--field instruction=question --field output=answer` (JSON, JSONL or Parquet).
    #[arg(long = "field", value_name = "KILN=COLUMN")]
    fields: Vec<String>,
    /// Skip malformed prompt records (counted and reported) instead of failing.
    #[arg(long)]
    skip_bad_records: bool,
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    iterations: Option<i64>,
    /// Sequences per forward/backward pass (default 8; 0: the whole minibatch); gradients
    /// accumulate into the minibatch's update, and only this many rows' activations are held.
    #[arg(long)]
    micro_batch: Option<i64>,
    /// KL coefficient β (initial value when adaptive).
    #[arg(long)]
    kl_coef: Option<f64>,
    /// Target KL per sequence for the adaptive β (0: fixed β).
    #[arg(long)]
    kl_target: Option<f64>,
    /// PPO-ptx: weight of the pretraining loss mixed into the policy updates (needs --ptx-data).
    #[arg(long)]
    ptx_coef: Option<f64>,
    /// Pretraining shards (from `kiln data prepare`) for PPO-ptx.
    #[arg(long)]
    ptx_data: Option<PathBuf>,
    #[arg(long)]
    judge_world: Option<PathBuf>,
    #[arg(long)]
    judge_prompts: Option<PathBuf>,
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    resume: bool,
    /// Override any config value, e.g. `--set ppo.actor_lr=2e-5`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[arg(long)]
    seed: Option<i64>,
    #[command(flatten)]
    lora: cmd_lora::LoraFlags,
}

/// `--field KILN=COLUMN` flags as `fields.KILN = "COLUMN"` (checked here, so a bad one fails
/// before anything loads).
pub(crate) fn field_overrides(o: &mut Overrides, specs: &[String]) -> Result<()> {
    let map = kiln_data::datasets::FieldMap::parse(specs).map_err(anyhow::Error::msg)?;
    for (kiln, column) in map.0 {
        o.set(&format!("fields.{kiln}"), column);
    }
    Ok(())
}

pub(crate) fn judge_overrides(
    o: &mut Overrides,
    world: &Option<PathBuf>,
    prompts: &Option<PathBuf>,
) -> Result<()> {
    match (world, prompts) {
        (Some(w), Some(p)) => {
            o.set("judge.world", w.display().to_string());
            o.set("judge.prompts", p.display().to_string());
            Ok(())
        }
        (None, None) => Ok(()),
        _ => anyhow::bail!("--judge-world and --judge-prompts go together"),
    }
}

/// After Ctrl-C the stage has saved a checkpoint; say so and exit with the shell's code for SIGINT.
pub(crate) fn exit_if_interrupted(interrupted: bool, step: u64) {
    if interrupted {
        eprintln!("interrupted: checkpoint saved at step {step}; continue with the same command and --resume");
        std::process::exit(130);
    }
}

fn run(cli: Cli) -> Result<()> {
    // In a data-parallel run rank 0 speaks for all.
    let progress = !cli.quiet && kiln_train::dist::is_root();
    match cli.cmd {
        Cmd::Demo(a) => demo::run_demo(a, progress),
        Cmd::Pipeline(c) => demo::run_pipeline(c, progress),
        Cmd::Tokenizer(c) => cmd_tokenizer::run(c),
        Cmd::Data(DataCmd::Prepare(mut a)) => {
            a.quiet = !progress;
            cmd_data_prepare::run(a)
        }
        Cmd::Data(DataCmd::Demo(a)) => demo::run_data_demo(a),
        Cmd::Pretrain(a) => {
            let mut o = a.train.overrides()?;
            o.path("data", &a.data);
            o.path("tokenizer", &a.tokenizer);
            o.path("out", &a.out);
            o.opt("objective", a.objective.clone());
            o.opt("model.n_layer", a.layers);
            o.opt("model.n_head", a.heads);
            o.opt("model.n_embd", a.dim);
            o.opt("model.n_ctx", a.ctx);
            o.opt("model.arch", a.arch.clone());
            o.opt("model.n_kv_head", a.kv_heads);
            o.opt("model.ffn_hidden", a.ffn);
            o.opt("train.sample_every", a.sample_every);
            let cfg: stages::PretrainConfig = config::build(a.train.config.as_deref(), o)?;
            kiln_train::install_ctrlc();
            let s = stages::pretrain(&cfg, a.train.resume, progress)?;
            exit_if_interrupted(s.interrupted, s.steps);
            if !kiln_train::dist::is_root() {
                return Ok(());
            }
            println!(
                "pretrain: {} steps in {:.1}s ({:.0} tok/s), final {}",
                s.steps,
                s.seconds,
                s.tokens_per_sec,
                kiln_train::trainer::fmt_metrics(&s.eval)
            );
            Ok(())
        }
        Cmd::Sft(a) => {
            let mut o = a.train.overrides()?;
            o.path("init", &a.init);
            o.paths("data", &a.data);
            o.path("val_data", &a.val_data);
            o.path("out", &a.out);
            o.path("template", &a.template);
            if a.skip_bad_records {
                o.set("skip_bad_records", true);
            }
            if a.packing {
                o.set("packing", true);
            }
            field_overrides(&mut o, &a.fields)?;
            a.roles.overrides(&mut o);
            judge_overrides(&mut o, &a.judge_world, &a.judge_prompts)?;
            a.lora.apply(&mut o)?;
            let cfg: stages::SftConfig = config::build(a.train.config.as_deref(), o)?;
            kiln_train::install_ctrlc();
            let s = stages::sft(&cfg, a.train.resume, progress)?;
            exit_if_interrupted(s.interrupted, s.steps);
            if !kiln_train::dist::is_root() {
                return Ok(());
            }
            println!(
                "sft: {} steps in {:.1}s, final {}",
                s.steps,
                s.seconds,
                kiln_train::trainer::fmt_metrics(&s.eval)
            );
            Ok(())
        }
        Cmd::Rm(RmCmd {
            sub: Some(RmSub::Score(s)),
            ..
        }) => chat::run_score(s),
        Cmd::Rm(RmCmd { sub: None, args: a }) => {
            let mut o = a.train.overrides()?;
            o.path("init", &a.init);
            o.paths("data", &a.data);
            o.path("val_data", &a.val_data);
            o.path("test_data", &a.test_data);
            o.path("out", &a.out);
            o.opt("loss", a.loss.clone());
            o.opt("margin", a.margin);
            if a.skip_bad_records {
                o.set("skip_bad_records", true);
            }
            a.lora.apply(&mut o)?;
            field_overrides(&mut o, &a.fields)?;
            a.roles.overrides(&mut o);
            let cfg: stages::RmConfig = config::build(a.train.config.as_deref(), o)?;
            kiln_train::install_ctrlc();
            let s = stages::reward_model(&cfg, a.train.resume, progress)?;
            exit_if_interrupted(s.interrupted, s.steps);
            if !kiln_train::dist::is_root() {
                return Ok(());
            }
            println!(
                "rm: {} steps in {:.1}s, final {}",
                s.steps,
                s.seconds,
                kiln_train::trainer::fmt_metrics(&s.eval)
            );
            Ok(())
        }
        Cmd::Ppo(a) => {
            let mut o = Overrides::default();
            o.parse_sets(&a.sets)?;
            o.path("actor", &a.actor);
            o.path("reward_model", &a.reward_model);
            o.path("critic", &a.critic);
            o.path("prompts", &a.prompts);
            field_overrides(&mut o, &a.fields)?;
            if a.skip_bad_records {
                o.set("skip_bad_records", true);
            }
            o.path("out", &a.out);
            o.opt("ppo.iterations", a.iterations);
            o.opt("ppo.kl_coef", a.kl_coef);
            o.opt("ppo.micro_batch", a.micro_batch);
            o.opt("ppo.kl_target", a.kl_target);
            o.opt("ppo.ptx_coef", a.ptx_coef);
            o.path("ptx_data", &a.ptx_data);
            o.opt("ppo.seed", a.seed);
            judge_overrides(&mut o, &a.judge_world, &a.judge_prompts)?;
            a.lora.apply(&mut o)?;
            let cfg: stages::PpoStageConfig = config::build(a.config.as_deref(), o)?;
            kiln_train::install_ctrlc();
            let s = stages::ppo(&cfg, a.resume, progress)?;
            exit_if_interrupted(s.interrupted, s.iterations);
            if !kiln_train::dist::is_root() {
                return Ok(());
            }
            if let (Some(first), Some(last)) = (s.history.first(), s.history.last()) {
                println!(
                    "ppo: {} iterations in {:.1}s; reward {:.3} → {:.3}, KL {:.3} → {:.3}",
                    s.iterations,
                    s.seconds,
                    first["reward"],
                    last["reward"],
                    first["kl"],
                    last["kl"]
                );
            }
            if !s.eval_end.is_empty() {
                println!(
                    "ppo: held-out {} → {}",
                    kiln_train::trainer::fmt_metrics(&s.eval_start),
                    kiln_train::trainer::fmt_metrics(&s.eval_end)
                );
            }
            Ok(())
        }
        Cmd::Grpo(a) => cmd_grpo::run(a, progress),
        Cmd::Dpo(a) => cmd_dpo::run(a, progress),
        Cmd::Generate(a) => chat::run_generate(a),
        Cmd::Chat(a) => chat::run_chat(a),
        Cmd::Serve(a) => serve::run_serve(a),
        Cmd::FillMask(a) => chat::run_fill_mask(a),
        Cmd::Eval(a) => run_eval(a),
        Cmd::Logits(a) => run_logits(a),
        Cmd::Bench(c) => bench::run(c),
        Cmd::Template(c) => cmd_template::run(c),
        Cmd::Lora(c) => cmd_lora::run(c),
    }
}

fn main() {
    let cli = Cli::parse();
    #[cfg(feature = "mpi")]
    let (_mpi_universe, threads) = match start_mpi(cli.threads) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: starting MPI: {e:#}");
            std::process::exit(1);
        }
    };
    #[cfg(not(feature = "mpi"))]
    let threads = cli.threads;
    // The command runs on a worker of the pool, not beside it: every parallel kernel call from the
    // main thread would otherwise be handed over to the pool and waited for, which halves the speed
    // of generation's many small calls (`bench generate` int8, batch 1: ~640 vs ~1,180 tok/s).
    let pool = match kiln_kernels::thread_pool_builder(threads)
        .stack_size(8 << 20)
        .build()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot set up the worker threads: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = pool.install(|| run(cli)) {
        let world = kiln_train::dist::world();
        if world.size() > 1 {
            eprintln!("error (rank {} of {}): {e:#}", world.rank(), world.size());
            // The other ranks would wait for this one forever: end them all.
            #[cfg(feature = "mpi")]
            mpi_world::abort_all(1);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Under an MPI launcher: starts MPI, installs the process group, makes a panic on any rank end
/// them all, and divides the machine's cores among its ranks unless `--threads` (or
/// RAYON_NUM_THREADS) says otherwise. Returns the universe (MPI is finalized when it drops) and the
/// thread count.
#[cfg(feature = "mpi")]
fn start_mpi(
    threads: Option<usize>,
) -> Result<(Option<mpi::environment::Universe>, Option<usize>)> {
    let Some((universe, world)) = mpi_world::init()? else {
        return Ok((None, threads));
    };
    let size = kiln_train::dist::Collective::size(&world);
    kiln_train::dist::set_world(Box::new(world))?;
    if size > 1 {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            mpi_world::abort_all(101);
        }));
    }
    let threads = threads.or_else(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_some() {
            return None;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Some((cores / mpi_world::local_ranks()).max(1))
    });
    Ok((Some(universe), threads))
}
