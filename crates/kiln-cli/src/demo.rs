//! `kiln demo`, `kiln pipeline` and `kiln data demo`: flags into a pipeline configuration; the
//! pipeline itself lives in the `kiln-pipeline` library.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kiln_demo::Size;
use kiln_model::Family;
use kiln_pipeline::pipeline::{demo_config, demo_data, run_pipeline_config, PipelineConfig};
use std::path::{Path, PathBuf};

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

pub fn run_data_and_demo_config(a: &DemoArgs) -> Result<PipelineConfig> {
    if a.fresh && a.out.exists() {
        std::fs::remove_dir_all(&a.out).with_context(|| format!("removing {}", a.out.display()))?;
    }
    let data = demo_data(&a.out, a.seed, a.size)?;
    Ok(demo_config(&data, &a.out, a.size, a.seed, a.arch))
}
pub fn run_demo(a: DemoArgs, progress: bool) -> Result<()> {
    let cfg = run_data_and_demo_config(&a)?;
    run_pipeline_config(&cfg, progress)
}

pub fn run_pipeline(c: PipelineCmd, progress: bool) -> Result<()> {
    match c {
        PipelineCmd::Run { config, fresh } => {
            let cfg: PipelineConfig =
                kiln_pipeline::config::build(Some(&config), Default::default())?;
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
            print!("{}", kiln_pipeline::config::to_toml(&cfg)?);
            Ok(())
        }
    }
}
