//! The run folder's `report.md`, `summary.json` and plots: what each stage was given, how long it
//! took, what it achieved, and the same held-out prompts answered by the pretrained, SFT, PPO and
//! DPO models side by side.

use crate::evaluate::Judge;
use crate::pipeline::{eval_model, heldout_kl, ModelEval, PipelineConfig};
use crate::stages::StageResult;
use anyhow::Result;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

fn read_metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// (step, value) points of one metric in a stage's metrics.jsonl.
pub fn series(dir: &Path, key: &str) -> Vec<(f64, f64)> {
    read_metrics(dir)
        .iter()
        .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get(key)?.as_f64()?)))
        .collect()
}

fn get(r: &BTreeMap<String, StageResult>, stage: &str, key: &str, end: bool) -> Option<f64> {
    let s = r.get(stage)?;
    let m = if end {
        &s.metrics_end
    } else {
        &s.metrics_start
    };
    m.get(key).copied()
}

fn f(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "–".into())
}

/// The run directories of the pipeline's stages.
pub struct StageDirs<'a> {
    pub pre: &'a Path,
    pub sft: &'a Path,
    pub rm: &'a Path,
    pub ppo: &'a Path,
    /// When the pipeline ran DPO.
    pub dpo: Option<&'a Path>,
    /// When the pipeline ran GRPO.
    pub grpo: Option<&'a Path>,
}

pub fn write_report(
    cfg: &PipelineConfig,
    results: &BTreeMap<String, StageResult>,
    dirs: &StageDirs,
) -> Result<()> {
    let out = &cfg.out;
    let (pre, sft, rm, ppo) = (dirs.pre, dirs.sft, dirs.rm, dirs.ppo);
    let evals: Vec<ModelEval> = match &cfg.judge {
        Some(j) => {
            let judge = Judge::load(j)?;
            let mut v = vec![
                eval_model("pretrained", pre, &judge, rm)?,
                eval_model("SFT", sft, &judge, rm)?,
                eval_model("PPO", ppo, &judge, rm)?,
            ];
            if let Some(d) = dirs.dpo {
                v.push(eval_model("DPO", d, &judge, rm)?);
            }
            if let Some(d) = dirs.grpo {
                v.push(eval_model("GRPO", d, &judge, rm)?);
            }
            // Drift from the SFT model on the held-out prompts, measured alike for both routes.
            for e in v.iter_mut() {
                let dir = match e.name.as_str() {
                    "PPO" => ppo,
                    "DPO" => dirs.dpo.unwrap_or(ppo),
                    "GRPO" => dirs.grpo.unwrap_or(ppo),
                    _ => continue,
                };
                e.metrics
                    .insert("kl_sft".into(), heldout_kl(dir, sft, &judge)?);
            }
            v
        }
        None => Vec::new(),
    };
    let acc = |name: &str, key: &str| {
        evals
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.metrics.get(key).copied())
    };
    let ppo_hist: Vec<serde_json::Value> = results
        .get("ppo")
        .and_then(|r| r.extra.get("history"))
        .and_then(|h| h.as_array().cloned())
        .unwrap_or_default();
    let hist = |i: usize, k: &str| {
        ppo_hist
            .get(i)
            .and_then(|m| m.get(k))
            .and_then(|v| v.as_f64())
    };
    let last = ppo_hist.len().saturating_sub(1);
    let seconds: BTreeMap<String, f64> = results
        .iter()
        .map(|(k, v)| (k.clone(), v.seconds))
        .collect();
    let summary = serde_json::json!({
        "pretrain": {"val_loss": get(results, "pretrain", "loss", true), "val_loss_start": get(results, "pretrain", "loss", false), "val_ppl": get(results, "pretrain", "ppl", true), "accuracy": acc("pretrained", "accuracy")},
        "sft": {"val_loss": get(results, "sft", "loss", true), "accuracy": acc("SFT", "accuracy"), "well_formed": acc("SFT", "well_formed"), "ended": acc("SFT", "ended"), "rm_score": acc("SFT", "rm_score")},
        "rm": {"accuracy": get(results, "rm", "acc", true), "accuracy_start": get(results, "rm", "acc", false), "margin": get(results, "rm", "margin", true), "accuracy_heldout": get(results, "rm", "test_acc", true)},
        "ppo": {"reward_start": hist(0, "reward"), "reward_end": hist(last, "reward"), "kl_end": hist(last, "kl"), "kl_heldout": acc("PPO", "kl_sft"), "accuracy": acc("PPO", "accuracy"), "well_formed": acc("PPO", "well_formed"), "rm_score": acc("PPO", "rm_score"), "response_len_end": hist(last, "response_len")},
        "seconds": seconds,
        "seed": cfg.seed,
    });
    let mut summary = summary;
    if results.contains_key("dpo") {
        let d = |k: &str| get(results, "dpo", k, true);
        summary["dpo"] = serde_json::json!({
            "accuracy": acc("DPO", "accuracy"),
            "well_formed": acc("DPO", "well_formed"),
            "rm_score": acc("DPO", "rm_score"),
            "kl_heldout": acc("DPO", "kl_sft"),
            "val_kl": d("kl"),
            "val_loss": d("loss"),
            "val_loss_start": get(results, "dpo", "loss", false),
            "val_reward_accuracy": d("rewards/accuracies"),
            "val_margin": d("rewards/margins"),
            "steps": results["dpo"].extra.get("steps"),
            "loss": cfg.dpo.as_ref().map(|c| c.loss.name()),
            "beta": cfg.dpo.as_ref().map(|c| c.beta),
        });
    }
    let grpo_hist: Vec<serde_json::Value> = results
        .get("grpo")
        .and_then(|r| r.extra.get("history"))
        .and_then(|h| h.as_array().cloned())
        .unwrap_or_default();
    let ghist = |i: usize, k: &str| {
        grpo_hist
            .get(i)
            .and_then(|m| m.get(k))
            .and_then(|v| v.as_f64())
    };
    let glast = grpo_hist.len().saturating_sub(1);
    if results.contains_key("grpo") {
        summary["grpo"] = serde_json::json!({
            "reward_start": ghist(0, "reward"),
            "reward_end": ghist(glast, "reward"),
            "rollout_acc_start": ghist(0, "rollout_acc"),
            "rollout_acc_end": ghist(glast, "rollout_acc"),
            "kl_heldout": acc("GRPO", "kl_sft"),
            "accuracy": acc("GRPO", "accuracy"),
            "well_formed": acc("GRPO", "well_formed"),
            "rm_score": acc("GRPO", "rm_score"),
            "response_len_end": ghist(glast, "response_len"),
            "sample_share": grpo_hist.iter().filter_map(|m| m.get("sample_share")?.as_f64()).sum::<f64>() / grpo_hist.len().max(1) as f64,
            "iterations": grpo_hist.len(),
        });
    }
    let bytes = serde_json::to_vec_pretty(&summary)?;
    kiln_data::atomic_write(&out.join("summary.json"), |w| w.write_all(&bytes))?;
    let ppo_start = results
        .get("ppo")
        .map(|r| r.metrics_start.clone())
        .unwrap_or_default();
    let plots = crate::plot::write_plots(out, pre, sft, rm, ppo, dirs.dpo, &ppo_start)
        .unwrap_or_else(|e| {
            eprintln!("[report] plots skipped: {e:#}");
            Vec::new()
        });

    let mut md = String::new();
    writeln!(md, "# Kiln pipeline report\n")?;
    writeln!(md, "Run folder `{}`, seed {}. Configuration: `pipeline.toml`; per-stage metrics: `<stage>/metrics.jsonl`; figures: `summary.json`.\n", out.display(), cfg.seed)?;
    writeln!(md, "| stage | time (s) | headline |\n|---|---:|---|")?;
    let t = |s: &str| {
        seconds
            .get(s)
            .map(|x| format!("{x:.1}"))
            .unwrap_or_else(|| "–".into())
    };
    writeln!(
        md,
        "| tokenizer | {} | vocabulary {} |",
        t("tokenizer"),
        results
            .get("tokenizer")
            .and_then(|r| r.extra.get("vocab_size"))
            .map(|v| v.to_string())
            .unwrap_or_default()
    )?;
    let prep = results
        .get("prepare")
        .map(|r| r.extra.clone())
        .unwrap_or_default();
    writeln!(
        md,
        "| prepare | {} | {} documents → {} train / {} val tokens |",
        t("prepare"),
        prep["documents"],
        prep["train_tokens"],
        prep["val_tokens"]
    )?;
    writeln!(
        md,
        "| pretrain | {} | val loss {} → {} (ppl {}) |",
        t("pretrain"),
        f(get(results, "pretrain", "loss", false)),
        f(get(results, "pretrain", "loss", true)),
        f(get(results, "pretrain", "ppl", true))
    )?;
    writeln!(
        md,
        "| sft | {} | val loss {} → {}; task accuracy {} → {} |",
        t("sft"),
        f(get(results, "sft", "loss", false)),
        f(get(results, "sft", "loss", true)),
        f(get(results, "sft", "accuracy", false)),
        f(get(results, "sft", "accuracy", true))
    )?;
    writeln!(
        md,
        "| rm | {} | pairwise accuracy {} → {} (margin {}); on held-out topics {} |",
        t("rm"),
        f(get(results, "rm", "acc", false)),
        f(get(results, "rm", "acc", true)),
        f(get(results, "rm", "margin", true)),
        f(get(results, "rm", "test_acc", true))
    )?;
    writeln!(
        md,
        "| ppo | {} | reward {} → {}, KL {} → {}, length {} → {} |",
        t("ppo"),
        f(hist(0, "reward")),
        f(hist(last, "reward")),
        f(hist(0, "kl")),
        f(hist(last, "kl")),
        f(hist(0, "response_len")),
        f(hist(last, "response_len"))
    )?;
    if results.contains_key("dpo") {
        writeln!(
            md,
            "| dpo | {} | val loss {} → {}; val reward accuracy {} (margin {}); val KL to the reference {} |",
            t("dpo"),
            f(get(results, "dpo", "loss", false)),
            f(get(results, "dpo", "loss", true)),
            f(get(results, "dpo", "rewards/accuracies", true)),
            f(get(results, "dpo", "rewards/margins", true)),
            f(get(results, "dpo", "kl", true))
        )?;
    }
    if results.contains_key("grpo") {
        writeln!(
            md,
            "| grpo | {} | judge reward {} → {}, zero-variance groups {} → {}, length {} → {} |",
            t("grpo"),
            f(ghist(0, "reward")),
            f(ghist(glast, "reward")),
            f(ghist(0, "zero_std_frac")),
            f(ghist(glast, "zero_std_frac")),
            f(ghist(0, "response_len")),
            f(ghist(glast, "response_len"))
        )?;
    }
    writeln!(md)?;
    if !evals.is_empty() {
        writeln!(md, "## Held-out prompts: the models side by side\n")?;
        writeln!(md, "Greedy answers to {} held-out prompts (never seen in training), judged by the demo world's rule-based judge and scored by the reward model (normalised). KL to SFT: one answer per prompt sampled at temperature 1, Σ over its tokens of KL(π ‖ π_SFT), exact over the vocabulary (nats per answer).\n", evals[0].samples.len())?;
        writeln!(md, "| model | task accuracy | well-formed | judge score | stops at end token | mean RM score | KL to SFT |\n|---|---:|---:|---:|---:|---:|---:|")?;
        for e in &evals {
            let g = |k: &str| f(e.metrics.get(k).copied());
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                e.name,
                g("accuracy"),
                g("well_formed"),
                g("judge_score"),
                g("ended"),
                g("rm_score"),
                g("kl_sft")
            )?;
        }
        if results.contains_key("dpo") || results.contains_key("grpo") {
            let secs = |k: &str| seconds.get(k).copied().unwrap_or(0.0);
            writeln!(
                md,
                "\n### Every post-training route from the same SFT model\n"
            )?;
            writeln!(md, "RM + PPO and DPO learn from the same rankings; GRPO from the judge's verdicts on its own samples (a verifiable reward, no reward model). Task accuracy ± its 95 % interval (normal approximation over the {} prompts).\n", evals[0].samples.len())?;
            writeln!(md, "| route | training time (s) | task accuracy | well-formed | mean RM score | KL to SFT |\n|---|---:|---:|---:|---:|---:|")?;
            for (route, name, time) in [
                ("SFT (start)", "SFT", None),
                ("RM + PPO", "PPO", Some(secs("rm") + secs("ppo"))),
                ("DPO", "DPO", Some(secs("dpo"))),
                ("GRPO (judge reward)", "GRPO", Some(secs("grpo"))),
            ] {
                if acc(name, "accuracy").is_none() {
                    continue;
                }
                writeln!(
                    md,
                    "| {route} | {} | {} | {} | {} | {} |",
                    time.map(|x| format!("{x:.1}"))
                        .unwrap_or_else(|| "–".into()),
                    acc(name, "accuracy").map_or("–".into(), |p| {
                        let n = evals[0].samples.len().max(1) as f64;
                        format!("{p:.3} ± {:.3}", 1.96 * (p * (1.0 - p) / n).sqrt())
                    }),
                    f(acc(name, "well_formed")),
                    f(acc(name, "rm_score")),
                    if name == "SFT" {
                        "0".to_string()
                    } else {
                        f(acc(name, "kl_sft"))
                    }
                )?;
            }
        }
        writeln!(md, "\n### Sample answers\n")?;
        for i in 0..evals[0].samples.len().min(8) {
            writeln!(
                md,
                "**Prompt:** {}\n",
                evals[0].samples[i].prompt.replace('\n', " / ")
            )?;
            for e in &evals {
                let s = &e.samples[i];
                let verdict = if s.correct && s.well_formed {
                    "✔"
                } else if s.correct {
                    "≈"
                } else {
                    "✘"
                };
                writeln!(
                    md,
                    "- {} {verdict} `{}` (RM {:.2})",
                    e.name,
                    s.response.replace('\n', " ").replace('`', "'"),
                    e.rm_scores[i]
                )?;
            }
            writeln!(md)?;
        }
    }
    if !plots.is_empty() {
        writeln!(md, "## Curves\n")?;
        for p in &plots {
            writeln!(md, "![{p}]({p})\n")?;
        }
    }
    writeln!(
        md,
        "## Settings\n\n```toml\n{}```",
        crate::config::to_toml(cfg)?
    )?;
    kiln_data::atomic_write(&out.join("report.md"), |w| w.write_all(md.as_bytes()))?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
