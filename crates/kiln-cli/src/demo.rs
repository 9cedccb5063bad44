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
    /// Run the pipeline a TOML file describes (see README: "Your own data"). The whole plan is
    /// checked first (`kiln pipeline check`); finished stages are reused, an interrupted one resumes.
    Run {
        config: PathBuf,
        /// Start over: delete the run folder first.
        #[arg(long)]
        fresh: bool,
    },
    /// Check a pipeline file without training: every file exists and parses (format named, bad
    /// records counted), records that are too long for the context are counted, the output folder
    /// is writable, every key is known. Lists every problem at once; exit code 1 if any.
    Check { config: PathBuf },
    /// Print a pipeline configuration to start your own from (your data's paths to fill in).
    Example {
        #[arg(long, default_value = "small")]
        size: Size,
        /// Model family (model.arch in [pretrain]): llama or gpt2.
        #[arg(long, default_value = "llama", value_parser = crate::bench::parse_family)]
        arch: Family,
        /// The demo's own configuration instead (its data in runs/demo/data, and the judge).
        #[arg(long)]
        demo: bool,
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
    run_pipeline_config(&cfg, progress).map(|_| ())
}

pub fn run_pipeline(c: PipelineCmd, progress: bool) -> Result<()> {
    match c {
        PipelineCmd::Run { config, fresh } => {
            let cfg = PipelineConfig::load(&config)?;
            if fresh && cfg.out.exists() {
                std::fs::remove_dir_all(&cfg.out)
                    .with_context(|| format!("removing {}", cfg.out.display()))?;
            }
            run_pipeline_config(&cfg, progress).map(|_| ())
        }
        PipelineCmd::Check { config } => {
            let rep = kiln_pipeline::check::check_file(&config);
            rep.print();
            let n = rep.problems.len();
            rep.into_result()?;
            println!("{}: the plan is sound ({n} problems)", config.display());
            Ok(())
        }
        PipelineCmd::Example { size, arch, demo } => {
            let cfg = if demo {
                demo_config(
                    Path::new("runs/demo/data"),
                    Path::new("runs/demo"),
                    size,
                    1337,
                    arch,
                )
            } else {
                kiln_pipeline::pipeline::example_config(size, arch)
            };
            print!("{}", kiln_pipeline::example::commented_toml(&cfg)?);
            Ok(())
        }
    }
}
