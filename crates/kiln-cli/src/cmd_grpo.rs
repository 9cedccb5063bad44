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
}

pub fn run(a: GrpoArgs, progress: bool) -> Result<()> {
    let mut o = Overrides::default();
    o.parse_sets(&a.sets)?;
    o.path("actor", &a.actor);
    o.path("prompts", &a.prompts);
    o.path("out", &a.out);
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
    o.opt("grpo.beta", a.beta);
    o.opt("grpo.lr", a.lr);
    o.opt("grpo.temperature", a.temperature);
    if a.mask_truncated {
        o.set("grpo.mask_truncated", true);
    }
    o.opt("grpo.seed", a.seed);
    crate::judge_overrides(&mut o, &a.judge_world, &a.judge_prompts)?;
    let cfg: stages::GrpoStageConfig = config::build(a.config.as_deref(), o)?;
    kiln_train::install_ctrlc();
    let s = stages::grpo(&cfg, a.resume, progress)?;
    crate::exit_if_interrupted(s.interrupted, s.iterations);
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
