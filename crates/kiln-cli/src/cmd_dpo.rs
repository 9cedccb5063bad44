//! `kiln dpo`: direct preference optimisation from an SFT model on preference data.

use crate::config::{self, Overrides};
use crate::stages;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct DpoArgs {
    /// The SFT model to start from (checkpoint or run directory); also the frozen reference
    /// unless --reference names another.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Preference data: rankings (every ordered pair trains), pairs, HH-RLHF or Stack Exchange
    /// (JSON array, JSONL, .gz, or Parquet; repeatable).
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Held-out preferences (default: 5 % of --data).
    #[arg(long)]
    val_data: Option<PathBuf>,
    /// Run directory (checkpoints, metrics.jsonl, reference_logps.safetensors).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Another reference model (same tokenizer) instead of --init.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// sigmoid (DPO) | ipo (length-normalised log-ratios) | hinge (SLiC)
    #[arg(long)]
    loss: Option<String>,
    /// β, the strength of the implicit KL penalty (default 0.1).
    #[arg(long)]
    beta: Option<f64>,
    /// Conservative DPO: the probability ε that a preference label is wrong (sigmoid only).
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// RPO: weight of the NLL term on the chosen responses (0: off).
    #[arg(long)]
    sft_coef: Option<f64>,
    /// Skip bad records (counted and reported) instead of failing.
    #[arg(long)]
    skip_bad_records: bool,
    /// A dataset column read as one of Kiln's fields, KILN=COLUMN (repeatable): e.g.
    /// `--field instruction=question --field output=answer` (JSON, JSONL or Parquet).
    #[arg(long = "field", value_name = "KILN=COLUMN")]
    fields: Vec<String>,
    /// Demo world (world.json) for judged task accuracy, with --judge-prompts.
    #[arg(long)]
    judge_world: Option<PathBuf>,
    #[arg(long)]
    judge_prompts: Option<PathBuf>,
    #[command(flatten)]
    train: crate::TrainFlags,
    #[command(flatten)]
    pub lora: crate::cmd_lora::LoraFlags,
}

pub fn run(a: DpoArgs, progress: bool) -> Result<()> {
    let mut o: Overrides = a.train.overrides()?;
    o.path("init", &a.init);
    o.paths("data", &a.data);
    o.path("val_data", &a.val_data);
    o.path("out", &a.out);
    o.path("reference", &a.reference);
    o.opt("loss", a.loss.clone());
    o.opt("beta", a.beta);
    o.opt("label_smoothing", a.label_smoothing);
    o.opt("sft_coef", a.sft_coef);
    if a.skip_bad_records {
        o.set("skip_bad_records", true);
    }
    crate::field_overrides(&mut o, &a.fields)?;
    crate::judge_overrides(&mut o, &a.judge_world, &a.judge_prompts)?;
    a.lora.apply(&mut o)?;
    let cfg: stages::DpoConfig = config::build(a.train.config.as_deref(), o)?;
    kiln_train::install_ctrlc();
    let r = stages::dpo(&cfg, a.train.resume, progress)?;
    let s = &r.summary;
    crate::exit_if_interrupted(s.interrupted, s.steps);
    if !kiln_train::dist::is_root() {
        return Ok(());
    }
    let skipped = if r.skipped > 0 {
        format!(" ({} bad records skipped)", r.skipped)
    } else {
        String::new()
    };
    println!(
        "dpo: {} steps in {:.1}s{skipped}, final {}",
        s.steps,
        s.seconds,
        kiln_train::trainer::fmt_metrics(&s.eval)
    );
    Ok(())
}
