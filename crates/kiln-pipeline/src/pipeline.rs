//! The whole pipeline: corpus → tokenizer → shards → pretraining → SFT → reward model, then every
//! post-training branch from the SFT model (PPO, DPO, GRPO, each with its own settings), then the
//! held-out evaluation of every model and the report. `kiln demo` runs it on self-generated data,
//! `kiln pipeline run` on a user's TOML file. The plan is checked whole before the first stage
//! (`check`); stages whose output is complete are reused; an interrupted stage resumes from its
//! last checkpoint.

use crate::heldout::{self, EvalPlan};
use crate::stages;
use anyhow::{bail, Context, Result};
use kiln_demo::Size;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

// The configuration and results types, here too: `pipeline` is the library's front door.
pub use crate::results::{PipelineRun, StageResult};
pub use crate::spec::*;

/// The demo's data in `out/data`: reused when it was generated with the same seed, size and
/// format, generated otherwise. Returns the data folder.
pub fn demo_data(out: &Path, seed: u64, size: Size) -> Result<PathBuf> {
    let data = out.join("data");
    if kiln_demo::DemoManifest::load(&data)
        .map(|m| m.seed == seed && m.size == size && m.format_version == kiln_demo::FORMAT_VERSION)
        .unwrap_or(false)
    {
        eprintln!("[data] reusing the demo data in {}", data.display());
    } else {
        let t0 = Instant::now();
        let m = kiln_demo::generate(&data, seed, size)?;
        eprintln!(
            "[data] demo world ({}) generated in {:.1}s: corpus {:.2} MB, {} SFT, {} rankings, {} PPO prompts, {} eval prompts",
            size.name(),
            t0.elapsed().as_secs_f64(),
            m.counts.corpus_bytes as f64 / 1e6,
            m.counts.sft_train,
            m.counts.rm_train,
            m.counts.ppo_prompts,
            m.counts.eval_prompts
        );
    }
    Ok(data)
}

/// What a stage's output depends on: its settings and the keys of the stages it reads. A
/// finished stage is reused only for the same key, so adding or changing a branch reruns only that
/// branch, and changing SFT reruns everything after it.
pub fn stage_key<T: Serialize>(cfg: &T, inputs: &[&str]) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(serde_json::to_string(cfg)?.as_bytes());
    for k in inputs {
        h.update(b"\0");
        h.update(k.as_bytes());
    }
    Ok(h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect())
}

const KEY_FILE: &str = "stage_key.txt";

/// Runs `f` unless the stage's `done.json` says it finished with the same `key`; records its time.
/// A folder that holds the stage run with another key is refused (nothing is deleted).
fn stage<F: FnOnce() -> Result<StageResult>>(
    name: &str,
    dir: &Path,
    key: &str,
    results: &mut BTreeMap<String, StageResult>,
    f: F,
) -> Result<()> {
    let key_file = dir.join(KEY_FILE);
    let done = StageResult::load(dir);
    // A folder with a result or checkpoints but no key was made before keys existed: not reused.
    let old_key = std::fs::read_to_string(&key_file)
        .ok()
        .or_else(|| (done.is_some() || dir.join("latest").exists()).then(String::new));
    if old_key.is_some_and(|k| k.trim() != key) {
        bail!(
            "{} holds a run of another configuration of the {name} stage (its settings or an earlier stage's changed): \
             delete {} to run it again with these settings, add --fresh to start the whole pipeline over, or choose another --out",
            dir.display(),
            dir.display()
        );
    }
    if let Some(r) = done {
        eprintln!(
            "[{name}] finished earlier ({:.0}s); reusing {}",
            r.seconds,
            dir.display()
        );
        results.insert(name.into(), r);
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    kiln_data::atomic_write(&key_file, |w| w.write_all(key.as_bytes()))?;
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

fn rl_result(
    eval_start: &kiln_train::Metrics,
    eval_end: &kiln_train::Metrics,
    history: &[kiln_train::Metrics],
    iterations: u64,
) -> StageResult {
    StageResult {
        metrics_start: eval_start.clone(),
        metrics_end: eval_end.clone(),
        extra: serde_json::json!({"history": history, "iterations": iterations}),
        ..Default::default()
    }
}

/// Splits `src` into a training and a held-out prompt file in `dir` (deterministic for a seed),
/// unless both exist already.
fn split_prompts(src: &Path, fraction: f64, seed: u64, skip_bad: bool, dir: &Path) -> Result<()> {
    let (train, held) = (
        dir.join("prompts_train.jsonl"),
        dir.join("prompts_heldout.jsonl"),
    );
    if train.exists() && held.exists() {
        return Ok(());
    }
    let opts = kiln_data::datasets::LoadOptions {
        skip_bad,
        ..kiln_data::datasets::LoadOptions::STRICT
    };
    let loaded = kiln_data::datasets::load_prompts_with_fields(src, &opts)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (i, (r, o)) in loaded.records.into_iter().enumerate() {
        let mut o = o;
        o.entry("prompt").or_insert_with(|| r.raw.clone().into());
        let line = serde_json::to_string(&o)?;
        if kiln_data::prepare::split_hash(seed ^ 0x5eed, i as u64) < fraction {
            b.push(line);
        } else {
            a.push(line);
        }
    }
    if a.is_empty() || b.is_empty() {
        bail!(
            "{}: {} prompts are too few to hold out {:.0} % (set eval.prompts, or eval.heldout_fraction = 0)",
            src.display(),
            a.len() + b.len(),
            fraction * 100.0
        );
    }
    for (path, lines) in [(&train, &a), (&held, &b)] {
        kiln_data::atomic_write(path, |w| {
            for l in lines.iter() {
                writeln!(w, "{l}")?;
            }
            Ok(())
        })?;
    }
    eprintln!(
        "[eval] {}: {} prompts for RL training, {} held out for evaluation",
        src.display(),
        a.len(),
        b.len()
    );
    Ok(())
}

pub fn run_pipeline_config(cfg: &PipelineConfig, progress: bool) -> Result<PipelineRun> {
    kiln_train::install_ctrlc();
    let total = Instant::now();
    let out = &cfg.out;
    let report = crate::check::check(cfg)?;
    report.print();
    report.into_result()?;
    let plan = cfg.plan()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let text = cfg.to_toml()?;
    // The configuration of the latest run, for the record (each stage checks its own key).
    kiln_data::atomic_write(&out.join("pipeline.toml"), |w| w.write_all(text.as_bytes()))?;
    let mut results = BTreeMap::new();
    let k_tok = stage_key(&cfg.corpus, &[])?;
    let k_prep = stage_key(&cfg.corpus, &[&k_tok, &cfg.seed.to_string()])?;
    let k_pre = stage_key(&plan.pretrain, &[&k_prep])?;
    let k_sft = stage_key(&plan.sft, &[&k_pre])?;
    let k_rm = match &plan.rm {
        Some(rm) => stage_key(rm, &[&k_sft])?,
        None => String::new(),
    };
    // Tokenizer.
    let tok_dir = out.join("tokenizer");
    let tok_path = plan.pretrain.tokenizer.clone();
    stage("tokenizer", &tok_dir, &k_tok, &mut results, || {
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
    let shards = plan.pretrain.data.clone();
    stage("prepare", &shards, &k_prep, &mut results, || {
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
    let pre = &plan.pretrain;
    stage("pretrain", &pre.out, &k_pre, &mut results, || {
        Ok(summary_result(&stages::pretrain(pre, true, progress)?))
    })?;
    let sft = &plan.sft;
    stage("sft", &sft.out, &k_sft, &mut results, || {
        Ok(summary_result(&stages::sft(sft, true, progress)?))
    })?;
    if let Some(rm) = &plan.rm {
        stage("rm", &rm.out, &k_rm, &mut results, || {
            Ok(summary_result(&stages::reward_model(rm, true, progress)?))
        })?;
    }
    if let Some((src, fraction)) = &plan.heldout_split {
        split_prompts(
            src,
            *fraction,
            cfg.seed,
            rl_skip_bad_records(cfg),
            &out.join("eval"),
        )?;
    }
    let mut branches = Vec::new();
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    keys.insert("pretrained".into(), k_pre.clone());
    keys.insert("SFT".into(), k_sft.clone());
    for b in &plan.branches {
        let name = b.name.as_str();
        let (dir, method) = match &b.method {
            Method::Ppo(c) => (c.out.clone(), "ppo"),
            Method::Dpo(c) => (c.out.clone(), "dpo"),
            Method::Grpo(c) => (c.out.clone(), "grpo"),
        };
        let key = match &b.method {
            Method::Ppo(c) => stage_key(c, &[&k_sft, &k_rm])?,
            Method::Dpo(c) => stage_key(c, &[&k_sft])?,
            Method::Grpo(c) => stage_key(c, &[&k_sft, &k_rm])?,
        };
        keys.insert(name.to_string(), key.clone());
        stage(name, &dir, &key, &mut results, || match &b.method {
            Method::Ppo(c) => {
                let s = stages::ppo(c, true, progress)?;
                Ok(rl_result(
                    &s.eval_start,
                    &s.eval_end,
                    &s.history,
                    s.iterations,
                ))
            }
            Method::Dpo(c) => {
                let r = stages::dpo(c, true, progress)?;
                let mut res = summary_result(&r.summary);
                res.extra["skipped_records"] = serde_json::json!(r.skipped);
                Ok(res)
            }
            Method::Grpo(c) => {
                let s = stages::grpo(c, true, progress)?;
                Ok(rl_result(
                    &s.eval_start,
                    &s.eval_end,
                    &s.history,
                    s.iterations,
                ))
            }
        })?;
        results.get_mut(name).expect("just run").extra["method"] = method.into();
        branches.push((name.to_string(), method, dir));
    }
    // Held-out evaluation of every model.
    let t0 = Instant::now();
    let mut models = vec![
        ("pretrained".to_string(), pre.out.clone()),
        ("SFT".to_string(), sft.out.clone()),
    ];
    models.extend(branches.iter().map(|(n, _, d)| (n.clone(), d.clone())));
    let (prompts, eval_source) = eval_prompts(cfg, &plan)?;
    let mut evals = Vec::new();
    if prompts.is_empty() {
        eprintln!(
            "[eval] no held-out prompts (set `prompts` or eval.prompts): models not evaluated"
        );
    } else {
        let has_answers = prompts.iter().all(|(_, o)| o.contains_key("answer"));
        let rewards = if cfg.eval.rewards.is_empty() && has_answers && cfg.judge.is_none() {
            vec!["exact".to_string()]
        } else {
            cfg.eval.rewards.clone()
        };
        let eval_plan = EvalPlan {
            prompts,
            judge: cfg.judge.clone(),
            reward_model: plan.rm.as_ref().map(|r| r.out.clone()),
            rewards,
            reward_weights: cfg.eval.reward_weights.clone(),
            max_new_tokens: cfg
                .judge
                .as_ref()
                .map_or(cfg.eval.max_new_tokens, |j| j.max_new_tokens),
        };
        // An evaluation is reused for the same model (its stage key) and the same evaluation.
        let k_eval = stage_key(&(&cfg.eval, &cfg.judge), &[&k_rm])?;
        for (i, (name, dir)) in models.iter().enumerate() {
            // The drift from SFT, for the post-training branches.
            let kl_ref = (i >= 2).then_some(sft.out.as_path());
            let cache = out.join("eval").join(format!("{name}.json"));
            let key = format!("{}-{k_eval}-{k_sft}", keys[name]);
            let e = heldout::evaluate_model(name, dir, &eval_plan, kl_ref, &key, &cache)
                .with_context(|| format!("evaluating {name} ({})", dir.display()))?;
            eprintln!(
                "[eval] {name}: {}",
                kiln_train::trainer::fmt_metrics(&e.metrics)
            );
            evals.push(e);
        }
        eprintln!(
            "[eval] {} models × {} held-out prompts in {:.1}s",
            evals.len(),
            evals[0].answers.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    let run = PipelineRun {
        cfg: cfg.clone(),
        results,
        models,
        branches,
        rm: plan.rm.as_ref().map(|r| r.out.clone()),
        evals,
        eval_source,
    };
    let t0 = Instant::now();
    crate::report::write_report(&run)?;
    eprintln!(
        "[report] written in {:.1}s: {}",
        t0.elapsed().as_secs_f64(),
        out.join("report.md").display()
    );
    eprintln!("pipeline finished in {:.1}s", total.elapsed().as_secs_f64());
    Ok(run)
}

/// The held-out prompts every model answers, and where they came from.
fn eval_prompts(
    cfg: &PipelineConfig,
    plan: &Plan,
) -> Result<(
    Vec<(kiln_data::datasets::PromptRecord, kiln_data::datasets::Obj)>,
    String,
)> {
    let (mut prompts, source) = if let Some(j) = &cfg.judge {
        (
            heldout::judge_prompts(j)?,
            format!("the judge's prompts ({})", j.prompts.display()),
        )
    } else if let Some(p) = &cfg.eval.prompts {
        (
            kiln_data::datasets::load_prompts_with_fields(p, &Default::default())?.records,
            format!("eval.prompts ({})", p.display()),
        )
    } else if let Some((src, f)) = &plan.heldout_split {
        let held = cfg.out.join("eval").join("prompts_heldout.jsonl");
        (
            kiln_data::datasets::load_prompts_with_fields(&held, &Default::default())?.records,
            format!(
                "{:.0} % of {} held out of RL training",
                f * 100.0,
                src.display()
            ),
        )
    } else {
        (Vec::new(), String::new())
    };
    let limit = if cfg.judge.is_some() {
        0
    } else {
        cfg.eval.limit
    };
    if limit > 0 {
        prompts.truncate(limit);
    }
    Ok((prompts, source))
}
