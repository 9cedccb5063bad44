//! `kiln grpo`: RL with verifiable rewards (GRPO, Dr. GRPO, RLOO) from an SFT model.

use crate::config::{self, Overrides};
use crate::stages;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct GrpoArgs {
    /// The SFT model the policy starts from (and the reference when --beta > 0).
    #[arg(long)]
    actor: Option<PathBuf>,
    /// Prompt file: {"prompt", ...}, Alpaca or chat records (extra fields reach reward programs).
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
    /// A reward source (repeatable; summed): judge | format | rm:DIR | cmd:PROGRAM. A program reads
    /// one JSON line per answer ({"prompt", "response", and the prompt record's other fields}) on
    /// standard input and prints one number per line.
    #[arg(long = "reward", value_name = "SOURCE")]
    rewards: Vec<String>,
    /// The weight of each --reward, in order (default 1 each).
    #[arg(long = "reward-weight", value_name = "W")]
    reward_weights: Vec<f64>,
    #[arg(long)]
    iterations: Option<i64>,
    /// Responses sampled per prompt.
    #[arg(long)]
    group_size: Option<i64>,
    /// Distinct prompts per iteration.
    #[arg(long)]
    prompts_per_iter: Option<i64>,
    /// group ((r − mean)/std, GRPO) | mean (r − mean, Dr. GRPO) | rloo (leave-one-out).
    #[arg(long, value_parser = ["group", "mean", "rloo"])]
    advantage: Option<String>,
    /// token (DAPO) | sequence (original GRPO) | constant (Dr. GRPO).
    #[arg(long, value_parser = ["token", "sequence", "constant"])]
    loss_agg: Option<String>,
    #[arg(long)]
    clip_low: Option<f64>,
    /// Upper clip of the ratio (DAPO's clip-higher; default 0.28).
    #[arg(long)]
    clip_high: Option<f64>,
    /// Passes over each iteration's samples (1: on-policy).
    #[arg(long)]
    inner_epochs: Option<i64>,
    /// Responses per forward/backward pass (default 8; 0: the whole minibatch); gradients
    /// accumulate into the minibatch's update, and only this many rows' activations are held.
    #[arg(long)]
    micro_batch: Option<i64>,
    /// Weight of the k3 KL penalty to the frozen SFT model (0, the default, holds no reference).
    #[arg(long)]
    beta: Option<f64>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    temperature: Option<f64>,
    /// Leave answers cut off at max_new_tokens out of the loss.
    #[arg(long)]
    mask_truncated: bool,
    /// DAPO's dynamic sampling: drop groups whose answers all got the same reward (they teach
    /// nothing) and sample more prompts until the batch is full, up to --max-sample-rounds.
    #[arg(long)]
    dynamic_sampling: bool,
    /// Sampling rounds per iteration at most, with --dynamic-sampling (default 4).
    #[arg(long)]
    max_sample_rounds: Option<i64>,
    #[arg(long)]
    judge_world: Option<PathBuf>,
    #[arg(long)]
    judge_prompts: Option<PathBuf>,
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    resume: bool,
    /// Override any config value, e.g. `--set grpo.max_new_tokens=48`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[arg(long)]
    seed: Option<i64>,
    #[command(flatten)]
    pub lora: crate::cmd_lora::LoraFlags,
}

pub fn run(a: GrpoArgs, progress: bool) -> Result<()> {
    let mut o = Overrides::default();
    o.parse_sets(&a.sets)?;
    o.path("actor", &a.actor);
    o.path("prompts", &a.prompts);
    o.path("out", &a.out);
    if a.skip_bad_records {
        o.set("skip_bad_records", true);
    }
    if !a.rewards.is_empty() {
        o.set(
            "rewards",
            toml::Value::Array(a.rewards.iter().map(|r| r.clone().into()).collect()),
        );
    }
    if !a.reward_weights.is_empty() {
        o.set(
            "reward_weights",
            toml::Value::Array(a.reward_weights.iter().map(|&w| w.into()).collect()),
        );
    }
    o.opt("grpo.iterations", a.iterations);
    o.opt("grpo.group_size", a.group_size);
    o.opt("grpo.prompts_per_iter", a.prompts_per_iter);
    o.opt("grpo.advantage", a.advantage.clone());
    o.opt("grpo.loss_agg", a.loss_agg.clone());
    o.opt("grpo.clip_low", a.clip_low);
    o.opt("grpo.clip_high", a.clip_high);
    o.opt("grpo.inner_epochs", a.inner_epochs);
    o.opt("grpo.micro_batch", a.micro_batch);
    o.opt("grpo.beta", a.beta);
    o.opt("grpo.lr", a.lr);
    o.opt("grpo.temperature", a.temperature);
    if a.mask_truncated {
        o.set("grpo.mask_truncated", true);
    }
    if a.dynamic_sampling {
        o.set("grpo.dynamic_sampling", true);
    }
    o.opt("grpo.max_sample_rounds", a.max_sample_rounds);
    o.opt("grpo.seed", a.seed);
    crate::field_overrides(&mut o, &a.fields)?;
    crate::judge_overrides(&mut o, &a.judge_world, &a.judge_prompts)?;
    a.lora.apply(&mut o)?;
    let cfg: stages::GrpoStageConfig = config::build(a.config.as_deref(), o)?;
    kiln_train::install_ctrlc();
    let s = stages::grpo(&cfg, a.resume, progress)?;
    crate::exit_if_interrupted(s.interrupted, s.iterations);
    if !kiln_train::dist::is_root() {
        return Ok(());
    }
    if let (Some(first), Some(last)) = (s.history.first(), s.history.last()) {
        println!(
            "grpo: {} iterations in {:.1}s; reward {:.3} → {:.3}",
            s.iterations, s.seconds, first["reward"], last["reward"]
        );
    }
    if !s.eval_end.is_empty() {
        println!(
            "grpo: held-out {} → {}",
            kiln_train::trainer::fmt_metrics(&s.eval_start),
            kiln_train::trainer::fmt_metrics(&s.eval_end)
        );
    }
    Ok(())
}

/// `kiln eval --reward ...`: a user's own prompts evaluated exactly as `kiln grpo` rewards them.
pub struct RewardEvalArgs {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub world: Option<PathBuf>,
    pub prompts: PathBuf,
    pub limit: usize,
    pub show: usize,
    pub rewards: Vec<String>,
    pub reward_weights: Vec<f32>,
    pub by: Option<String>,
    pub max_new_tokens: usize,
    /// The prompt file's column names for Kiln's fields.
    pub fields: kiln_data::datasets::FieldMap,
}

/// Greedy answers to every prompt, scored by the reward sources: the mean of each source and of
/// their weighted sum, the share of answers whose total reward is at least 0.5 ("accuracy", for
/// 0/1 checkers), and the same per value of the `by` field.
pub fn run_reward_eval(a: RewardEvalArgs) -> Result<()> {
    use kiln_data::datasets::Role;
    use std::collections::BTreeMap;
    let b = crate::cmd_lora::load_bundle_adapted(&a.model, a.adapter.as_deref())?;
    let chat = b.chat()?;
    let opts = kiln_data::datasets::LoadOptions {
        fields: a.fields.clone(),
        ..kiln_data::datasets::LoadOptions::STRICT
    };
    let mut loaded = kiln_data::datasets::load_prompts_with_fields(&a.prompts, &opts)?.records;
    if a.limit > 0 {
        loaded.truncate(a.limit);
    }
    let n_ctx = b.model.cfg.n_ctx;
    let rendered: Vec<Vec<u32>> = loaded
        .iter()
        .map(|(r, _)| chat.render_prompt(&r.prompt))
        .collect::<Result<_, _>>()?;
    let keep: Vec<usize> = (0..rendered.len())
        .filter(|&i| rendered[i].len() < n_ctx)
        .collect();
    if keep.len() < rendered.len() {
        eprintln!(
            "[eval] {} of {} prompts skipped: no room for an answer in the context of {n_ctx}",
            rendered.len() - keep.len(),
            rendered.len()
        );
    }
    anyhow::ensure!(!keep.is_empty(), "no prompt fits the model's context");
    let questions: Vec<String> = loaded
        .iter()
        .map(|(r, _)| {
            let user = r.prompt.iter().rev().find(|m| m.role == Role::User);
            user.map(|m| m.content.clone()).unwrap_or_default()
        })
        .collect();
    let judge = match &a.world {
        Some(w) => Some(crate::evaluate::Judge::load(
            &crate::evaluate::JudgeConfig {
                world: w.clone(),
                prompts: a.prompts.clone(),
                limit: a.limit,
                max_new_tokens: a.max_new_tokens,
            },
        )?),
        None => None,
    };
    let stop_tokens = chat.stop_tokens()?;
    let mut sources = stages::reward_sources(
        &a.rewards,
        &a.reward_weights,
        &stages::RewardContext {
            actor: &b,
            loaded: &loaded,
            prompts: &rendered,
            questions: &questions,
            judge: judge.as_ref(),
            stop_tokens: &stop_tokens,
            timeout_s: 30.0,
            batch: 32,
        },
    )?;
    let opts = kiln_model::GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: kiln_model::Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        },
        stop_tokens,
    };
    // Greedy: the generator never draws from it.
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let mut answers: Vec<Vec<u32>> = Vec::with_capacity(keep.len());
    for chunk in keep.chunks(32) {
        let ps: Vec<Vec<u32>> = chunk.iter().map(|&i| rendered[i].clone()).collect();
        answers.extend(kiln_model::generate(
            &b.model,
            &ps,
            &opts,
            &mut rng,
            |_, _| {},
        )?);
    }
    let mut total = vec![0.0f64; keep.len()];
    let mut per_source = Vec::new();
    for w in sources.iter_mut() {
        let s = w.source.score(&keep, &answers)?;
        for (t, x) in total.iter_mut().zip(&s) {
            *t += (w.weight * x) as f64;
        }
        per_source.push((w.source.name(), s));
    }
    let n = keep.len() as f64;
    for (k, &i) in keep.iter().enumerate().take(a.show) {
        println!(
            "{:+.3} {:?} -> {:?}",
            total[k],
            loaded[i].0.raw,
            b.tokenizer.decode_skip_special(&answers[k])
        );
    }
    println!("{:>20} {}", "answers", keep.len());
    println!(
        "{:>20} {:.4}",
        "accuracy",
        total.iter().filter(|&&x| x >= 0.5).count() as f64 / n
    );
    println!("{:>20} {:.4}", "reward", total.iter().sum::<f64>() / n);
    for (name, s) in &per_source {
        println!(
            "{:>20} {:.4}",
            format!("reward/{name}"),
            s.iter().map(|&x| x as f64).sum::<f64>() / n
        );
    }
    if let Some(field) = &a.by {
        let mut groups: BTreeMap<String, (usize, usize, f64)> = BTreeMap::new();
        for (k, &i) in keep.iter().enumerate() {
            let key = match loaded[i].1.get(field) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => "(none)".into(),
            };
            let g = groups.entry(key).or_default();
            g.0 += 1;
            g.1 += usize::from(total[k] >= 0.5);
            g.2 += total[k];
        }
        println!("by {field}:");
        for (key, (c, right, sum)) in groups {
            println!(
                "  {key:>18} n {c:>5}  accuracy {:.4}  reward {:.4}",
                right as f64 / c as f64,
                sum / c as f64
            );
        }
    }
    Ok(())
}
