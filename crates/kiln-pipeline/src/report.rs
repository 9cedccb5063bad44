//! The run folder's `report.md`, `summary.json` and charts, from a finished pipeline's results:
//! what each stage achieved, one table comparing every post-training branch on the same held-out
//! prompts, answers side by side, and the curves. The report runs no model: it reads results.

use crate::plot::{self, LabelledPoint};
use crate::results::{PipelineRun, StageResult};
use anyhow::Result;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

fn read_metrics(dir: &Path) -> Vec<Value> {
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

/// The last value of a metric in a stage's metrics.jsonl.
fn last(dir: &Path, key: &str) -> Option<f64> {
    series(dir, key).last().map(|p| p.1)
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

/// Half-width of the 95 % interval of a proportion `p` over `n` answers (normal approximation).
pub fn ci95(p: f64, n: usize) -> f64 {
    1.96 * (p * (1.0 - p) / n.max(1) as f64).sqrt()
}

/// What each method's row in the table is called.
fn method_label(method: &str) -> &'static str {
    match method {
        "ppo" => "RM + PPO",
        "dpo" => "DPO",
        "grpo" => "GRPO",
        _ => "?",
    }
}

/// An RL stage's per-iteration history.
fn history(r: &BTreeMap<String, StageResult>, stage: &str) -> Vec<Value> {
    r.get(stage)
        .and_then(|r| r.extra.get("history"))
        .and_then(|h| h.as_array().cloned())
        .unwrap_or_default()
}

fn hist_at(h: &[Value], i: usize, k: &str) -> Option<f64> {
    h.get(i)?.get(k)?.as_f64()
}

fn hist_sum(h: &[Value], k: &str) -> Option<f64> {
    let v: Vec<f64> = h.iter().filter_map(|m| m.get(k)?.as_f64()).collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

/// Tokens a branch trained on and sampled: supervised stages count trained tokens in their
/// metrics; RL stages log both per iteration.
fn tokens(run: &PipelineRun, name: &str, dir: &Path) -> (Option<f64>, Option<f64>) {
    let h = history(&run.results, name);
    if h.is_empty() {
        (last(dir, "tokens"), Some(0.0))
    } else {
        (hist_sum(&h, "train_tokens"), hist_sum(&h, "sampled_tokens"))
    }
}

/// Quantiles (min, 25 %, median, 75 %, max) of `v`.
fn quantiles(v: &[f64]) -> Option<[f64; 5]> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let q = |p: f64| s[((s.len() - 1) as f64 * p).round() as usize];
    Some([q(0.0), q(0.25), q(0.5), q(0.75), q(1.0)])
}

/// The charts of a run; returns the file names written.
fn write_plots(run: &PipelineRun) -> Result<Vec<String>> {
    let out = &run.cfg.out;
    let dir = |name: &str| out.join(name);
    let mut names = Vec::new();
    let mut line = |file: &str,
                    title: &str,
                    axes: (&str, &str),
                    s: Vec<(&str, Vec<(f64, f64)>)>|
     -> Result<()> {
        if plot::line_chart(&out.join(file), title, axes, &s)? {
            names.push(file.to_string());
        }
        Ok(())
    };
    let (pre, sft, rm) = (dir("pretrain"), dir("sft"), dir("rm"));
    line(
        "pretrain_loss.png",
        "Pretraining: loss",
        ("step", "cross-entropy (nats/token)"),
        vec![
            ("train", plot::smoothed(series(&pre, "loss"))),
            ("validation", series(&pre, "val_loss")),
        ],
    )?;
    line(
        "sft.png",
        "SFT: response loss",
        ("step", "cross-entropy (nats/token)"),
        vec![
            ("train", plot::smoothed(series(&sft, "loss"))),
            ("validation", series(&sft, "val_loss")),
        ],
    )?;
    if run.rm.is_some() {
        line(
            "rm.png",
            "Reward model: pairwise accuracy",
            ("step", "share of pairs ranked right"),
            vec![
                ("train", plot::smoothed(series(&rm, "acc"))),
                ("validation", series(&rm, "val_acc")),
            ],
        )?;
    }
    for (name, method, d) in &run.branches {
        let title = |what: &str| format!("{name} ({}): {what}", method_label(method));
        match *method {
            "ppo" => {
                line(
                    &format!("{name}_reward.png"),
                    &title("reward and KL to the SFT model"),
                    ("iteration", "mean per rollout"),
                    vec![("RM reward", series(d, "reward")), ("KL", series(d, "kl"))],
                )?;
            }
            "grpo" => {
                line(
                    &format!("{name}_reward.png"),
                    &title("reward of its samples"),
                    ("iteration", "mean per sample"),
                    vec![
                        ("reward", series(d, "reward")),
                        ("zero-variance groups", series(d, "zero_std_frac")),
                    ],
                )?;
            }
            _ => {
                line(
                    &format!("{name}_pairs.png"),
                    &title("preference accuracy of its implicit reward"),
                    ("step", "share of pairs"),
                    vec![
                        ("train", plot::smoothed(series(d, "rewards/accuracies"))),
                        ("validation", series(d, "val_rewards/accuracies")),
                    ],
                )?;
            }
        }
        if *method != "dpo" {
            // The evaluation before the first iteration (the SFT model) is iteration 0.
            let mut held: Vec<(f64, f64)> = get(&run.results, name, "accuracy", false)
                .map(|y| (0.0, y))
                .into_iter()
                .collect();
            held.extend(series(d, "eval_accuracy"));
            let mut s = vec![("held-out", held)];
            let r = series(d, "rollout_acc");
            if !r.is_empty() {
                s.push(("own rollouts", r));
            }
            line(
                &format!("{name}_accuracy.png"),
                &title("judged accuracy during training"),
                ("iteration", "accuracy"),
                s,
            )?;
        }
    }
    // Accuracy against drift, across the branches (SFT at KL 0).
    let n = run.evals.first().map_or(0, |e| e.answers.len());
    let pts: Vec<LabelledPoint> = run
        .evals
        .iter()
        .filter(|e| e.name != "pretrained")
        .filter_map(|e| {
            let acc = e.accuracy()?;
            let kl = if e.name == "SFT" {
                0.0
            } else {
                *e.metrics.get("kl_sft")?
            };
            Some(LabelledPoint {
                label: e.name.clone(),
                x: kl,
                y: acc,
                err: ci95(acc, n),
            })
        })
        .collect();
    if pts.len() > 1
        && plot::scatter_chart(
            &out.join("accuracy_vs_kl.png"),
            "Held-out accuracy against drift from SFT",
            (
                "KL to the SFT model (nats per answer)",
                "accuracy (± 95 % interval)",
            ),
            &pts,
        )?
    {
        names.push("accuracy_vs_kl.png".into());
    }
    let rm_samples: Vec<(&str, Vec<f64>)> = run
        .evals
        .iter()
        .filter(|e| e.name != "pretrained")
        .map(|e| {
            (
                e.name.as_str(),
                e.answers
                    .iter()
                    .filter_map(|a| a.rm_score)
                    .collect::<Vec<f64>>(),
            )
        })
        .filter(|s| !s.1.is_empty())
        .collect();
    if !rm_samples.is_empty()
        && plot::histogram_chart(
            &out.join("rm_scores.png"),
            "Reward-model scores of each model's held-out answers",
            "normalised RM score",
            &rm_samples,
        )?
    {
        names.push("rm_scores.png".into());
    }
    Ok(names)
}

/// `summary.json`: the headline figures of every stage and branch.
fn summary(run: &PipelineRun) -> Value {
    let r = &run.results;
    let ev = |name: &str, k: &str| {
        run.evals
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.metrics.get(k).copied())
    };
    let n = run.evals.first().map_or(0, |e| e.answers.len());
    let seconds: BTreeMap<String, f64> = r.iter().map(|(k, v)| (k.clone(), v.seconds)).collect();
    let mut s = json!({
        "pretrain": {"val_loss": get(r, "pretrain", "loss", true), "val_loss_start": get(r, "pretrain", "loss", false), "val_ppl": get(r, "pretrain", "ppl", true), "accuracy": ev("pretrained", "accuracy")},
        "sft": {"val_loss": get(r, "sft", "loss", true), "accuracy": ev("SFT", "accuracy"), "well_formed": ev("SFT", "well_formed"), "ended": ev("SFT", "ended"), "rm_score": ev("SFT", "rm_score"), "reward": ev("SFT", "reward")},
        "rm": {"accuracy": get(r, "rm", "acc", true), "accuracy_start": get(r, "rm", "acc", false), "margin": get(r, "rm", "margin", true), "accuracy_heldout": get(r, "rm", "test_acc", true)},
        "seconds": seconds,
        "seed": run.cfg.seed,
        "heldout_prompts": n,
        "branches": run.branches.iter().map(|b| json!({"name": b.0, "method": b.1})).collect::<Vec<_>>(),
    });
    for (name, method, dir) in &run.branches {
        let (trained, sampled) = tokens(run, name, dir);
        let acc = ev(name, "accuracy");
        let mut b = json!({
            "method": method,
            "accuracy": acc,
            "accuracy_ci95": acc.map(|p| ci95(p, n)),
            "well_formed": ev(name, "well_formed"),
            "rm_score": ev(name, "rm_score"),
            "reward": ev(name, "reward"),
            "kl_heldout": ev(name, "kl_sft"),
            "seconds": r.get(name.as_str()).map(|x| x.seconds),
            "tokens_trained": trained,
            "tokens_sampled": sampled,
        });
        let h = history(r, name);
        let end = h.len().saturating_sub(1);
        let extra = match *method {
            "ppo" => json!({
                "reward_start": hist_at(&h, 0, "reward"), "reward_end": hist_at(&h, end, "reward"),
                "kl_end": hist_at(&h, end, "kl"), "response_len_end": hist_at(&h, end, "response_len"),
                "rollout_acc_start": hist_at(&h, 0, "rollout_acc"), "rollout_acc_end": hist_at(&h, end, "rollout_acc"),
                "iterations": h.len(),
            }),
            "grpo" => json!({
                "reward_start": hist_at(&h, 0, "reward"), "reward_end": hist_at(&h, end, "reward"),
                "rollout_acc_start": hist_at(&h, 0, "rollout_acc"), "rollout_acc_end": hist_at(&h, end, "rollout_acc"),
                "response_len_end": hist_at(&h, end, "response_len"),
                "sample_share": hist_sum(&h, "sample_share").map(|x| x / h.len().max(1) as f64),
                "iterations": h.len(),
            }),
            _ => {
                let d = |k: &str| get(r, name, k, true);
                let cfg = run.cfg.branch.iter().find(|b| &b.name == name);
                let (loss, beta) = match cfg.map(|b| &b.method) {
                    Some(crate::spec::Method::Dpo(c)) => (Some(c.loss.name()), Some(c.beta)),
                    _ => (None, None),
                };
                json!({
                    "val_kl": d("kl"), "val_loss": d("loss"), "val_loss_start": get(r, name, "loss", false),
                    "val_reward_accuracy": d("rewards/accuracies"), "val_margin": d("rewards/margins"),
                    "steps": r.get(name.as_str()).and_then(|x| x.extra.get("steps").cloned()),
                    "loss": loss, "beta": beta,
                })
            }
        };
        if let (Value::Object(b), Value::Object(e)) = (&mut b, extra) {
            b.extend(e);
        }
        s[name.as_str()] = b;
    }
    s
}

pub fn write_report(run: &PipelineRun) -> Result<()> {
    let out = &run.cfg.out;
    let r = &run.results;
    let summary = summary(run);
    let bytes = serde_json::to_vec_pretty(&summary)?;
    kiln_data::atomic_write(&out.join("summary.json"), |w| w.write_all(&bytes))?;
    let plots = write_plots(run).unwrap_or_else(|e| {
        eprintln!("[report] charts skipped: {e:#}");
        Vec::new()
    });
    let secs = |s: &str| r.get(s).map(|x| x.seconds);
    let t = |s: &str| secs(s).map_or("–".into(), |x| format!("{x:.1}"));
    let mut md = String::new();
    writeln!(md, "# Kiln pipeline report\n")?;
    writeln!(md, "Run folder `{}`, seed {}. Configuration: `pipeline.toml`; per-stage metrics: `<stage>/metrics.jsonl`; held-out answers: `eval/<model>.json`; figures: `summary.json`.\n", out.display(), run.cfg.seed)?;

    // The comparison first: it is what a user came for.
    let n = run.evals.first().map_or(0, |e| e.answers.len());
    if !run.evals.is_empty() {
        let judged = run.cfg.judge.is_some();
        let has = |k: &str| run.evals.iter().any(|e| e.metrics.contains_key(k));
        writeln!(
            md,
            "## Every post-training branch from the same SFT model\n"
        )?;
        let scoring = if judged {
            "judged right by the demo world's rule-based judge".to_string()
        } else if has("reward") {
            "counted right when the reward sources give ≥ 0.5 (`eval.rewards`)".to_string()
        } else {
            "no judge and no reference answers: accuracy is not measured; compare the reward-model scores and the answers".to_string()
        };
        writeln!(md, "Greedy answers to {n} held-out prompts ({}), never trained on; accuracy: {scoring}, ± its 95 % interval. Mean RM score: the reward model's normalised score of the answers. KL to SFT: one answer per prompt sampled at temperature 1, Σ over its tokens of KL(π ‖ π_SFT), exact over the vocabulary (nats per answer). Tokens: trained on / sampled.\n", run.eval_source)?;
        writeln!(md, "| model | method | time (s) | accuracy | well-formed | mean RM score | mean reward | ends its turn | KL to SFT | tokens trained | tokens sampled |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
        for e in &run.evals {
            let g = |k: &str| f(e.metrics.get(k).copied());
            let branch = run.branches.iter().find(|b| b.0 == e.name);
            let (method, time, (tt, ts)) = match branch {
                Some((name, m, d)) => (method_label(m), t(name), tokens(run, name, d)),
                None if e.name == "SFT" => {
                    ("SFT", t("sft"), (last(&out.join("sft"), "tokens"), None))
                }
                None => (
                    "pretraining",
                    t("pretrain"),
                    (last(&out.join("pretrain"), "tokens"), None),
                ),
            };
            let tok = |x: Option<f64>| x.map_or("–".into(), |v| format!("{:.0}", v));
            writeln!(
                md,
                "| {} | {method} | {time} | {} | {} | {} | {} | {} | {} | {} | {} |",
                e.name,
                e.accuracy()
                    .map_or("–".into(), |p| format!("{p:.3} ± {:.3}", ci95(p, n))),
                g("well_formed"),
                g("rm_score"),
                g("reward"),
                g("ended"),
                if e.name == "SFT" {
                    "0".into()
                } else {
                    g("kl_sft")
                },
                tok(tt),
                tok(ts),
            )?;
        }
        writeln!(md)?;
        // Per task kind (the judge's breakdown).
        let mut kinds: Vec<String> = run
            .evals
            .iter()
            .flat_map(|e| {
                e.metrics
                    .keys()
                    .filter_map(|k| k.strip_prefix("acc_").map(str::to_string))
            })
            .collect();
        kinds.sort();
        kinds.dedup();
        if !kinds.is_empty() {
            writeln!(md, "### Accuracy per task kind\n")?;
            writeln!(
                md,
                "| model | {} |\n|---|{}",
                kinds.join(" | "),
                "---:|".repeat(kinds.len())
            )?;
            for e in &run.evals {
                let cells: Vec<String> = kinds
                    .iter()
                    .map(|k| f(e.metrics.get(&format!("acc_{k}")).copied()))
                    .collect();
                writeln!(md, "| {} | {} |", e.name, cells.join(" | "))?;
            }
            writeln!(md)?;
        }
        let reward_keys: Vec<String> = {
            let mut v: Vec<String> = run
                .evals
                .iter()
                .flat_map(|e| {
                    e.metrics
                        .keys()
                        .filter(|k| k.starts_with("reward/"))
                        .cloned()
                })
                .collect();
            v.sort();
            v.dedup();
            v
        };
        if !reward_keys.is_empty() {
            writeln!(md, "### Mean reward per source\n")?;
            writeln!(
                md,
                "| model | {} |\n|---|{}",
                reward_keys.join(" | "),
                "---:|".repeat(reward_keys.len())
            )?;
            for e in &run.evals {
                let cells: Vec<String> = reward_keys
                    .iter()
                    .map(|k| f(e.metrics.get(k).copied()))
                    .collect();
                writeln!(md, "| {} | {} |", e.name, cells.join(" | "))?;
            }
            writeln!(md)?;
        }
        if run
            .evals
            .iter()
            .any(|e| e.answers.iter().any(|a| a.rm_score.is_some()))
        {
            writeln!(md, "### Reward-model scores of the answers\n")?;
            writeln!(
                md,
                "| model | min | 25 % | median | 75 % | max |\n|---|---:|---:|---:|---:|---:|"
            )?;
            for e in &run.evals {
                let v: Vec<f64> = e.answers.iter().filter_map(|a| a.rm_score).collect();
                if let Some(q) = quantiles(&v) {
                    writeln!(
                        md,
                        "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
                        e.name, q[0], q[1], q[2], q[3], q[4]
                    )?;
                }
            }
            writeln!(md)?;
        }
        writeln!(md, "### Answers side by side\n")?;
        for i in 0..n.min(8) {
            writeln!(
                md,
                "**Prompt:** {}\n",
                run.evals[0].answers[i].prompt.replace('\n', " / ")
            )?;
            for e in &run.evals {
                let a = &e.answers[i];
                let verdict = match (a.correct, a.well_formed, a.reward) {
                    (Some(true), Some(true), _) => "✔ ",
                    (Some(true), _, _) => "≈ ",
                    (Some(false), _, _) => "✘ ",
                    (None, _, Some(r)) if r >= 0.5 => "✔ ",
                    (None, _, Some(_)) => "✘ ",
                    _ => "",
                };
                let rm = a
                    .rm_score
                    .map_or(String::new(), |s| format!(" (RM {s:.2})"));
                writeln!(
                    md,
                    "- {} {verdict}`{}`{rm}",
                    e.name,
                    a.response.replace('\n', " ").replace('`', "'")
                )?;
            }
            writeln!(md)?;
        }
    }

    writeln!(md, "## Stages\n")?;
    writeln!(md, "| stage | time (s) | headline |\n|---|---:|---|")?;
    let extra = |s: &str, k: &str| {
        r.get(s)
            .and_then(|x| x.extra.get(k).cloned())
            .unwrap_or(Value::Null)
    };
    writeln!(
        md,
        "| tokenizer | {} | vocabulary {} |",
        t("tokenizer"),
        extra("tokenizer", "vocab_size")
    )?;
    writeln!(
        md,
        "| prepare | {} | {} documents → {} train / {} val tokens |",
        t("prepare"),
        extra("prepare", "documents"),
        extra("prepare", "train_tokens"),
        extra("prepare", "val_tokens")
    )?;
    writeln!(
        md,
        "| pretrain | {} | val loss {} → {} (ppl {}) |",
        t("pretrain"),
        f(get(r, "pretrain", "loss", false)),
        f(get(r, "pretrain", "loss", true)),
        f(get(r, "pretrain", "ppl", true))
    )?;
    writeln!(
        md,
        "| sft | {} | val loss {} → {}; judged accuracy during training {} → {} |",
        t("sft"),
        f(get(r, "sft", "loss", false)),
        f(get(r, "sft", "loss", true)),
        f(get(r, "sft", "accuracy", false)),
        f(get(r, "sft", "accuracy", true))
    )?;
    if run.rm.is_some() {
        writeln!(
            md,
            "| rm | {} | pairwise accuracy {} → {} (margin {}); on rm.test_data {} |",
            t("rm"),
            f(get(r, "rm", "acc", false)),
            f(get(r, "rm", "acc", true)),
            f(get(r, "rm", "margin", true)),
            f(get(r, "rm", "test_acc", true))
        )?;
    }
    for (name, method, _) in &run.branches {
        let h = history(r, name);
        let end = h.len().saturating_sub(1);
        let line = match *method {
            "ppo" => format!(
                "reward {} → {}, KL {} → {}, length {} → {}, judged accuracy on its rollouts {} → {}",
                f(hist_at(&h, 0, "reward")), f(hist_at(&h, end, "reward")),
                f(hist_at(&h, 0, "kl")), f(hist_at(&h, end, "kl")),
                f(hist_at(&h, 0, "response_len")), f(hist_at(&h, end, "response_len")),
                f(hist_at(&h, 0, "rollout_acc")), f(hist_at(&h, end, "rollout_acc")),
            ),
            "grpo" => format!(
                "reward {} → {}, zero-variance groups {} → {}, length {} → {}, sampling {:.0} % of the time",
                f(hist_at(&h, 0, "reward")), f(hist_at(&h, end, "reward")),
                f(hist_at(&h, 0, "zero_std_frac")), f(hist_at(&h, end, "zero_std_frac")),
                f(hist_at(&h, 0, "response_len")), f(hist_at(&h, end, "response_len")),
                100.0 * hist_sum(&h, "sample_share").unwrap_or(0.0) / h.len().max(1) as f64,
            ),
            _ => format!(
                "val loss {} → {}; val reward accuracy {} (margin {}); val KL to the reference {}",
                f(get(r, name, "loss", false)), f(get(r, name, "loss", true)),
                f(get(r, name, "rewards/accuracies", true)), f(get(r, name, "rewards/margins", true)),
                f(get(r, name, "kl", true)),
            ),
        };
        writeln!(
            md,
            "| {name} ({}) | {} | {line} |",
            method_label(method),
            t(name)
        )?;
    }
    writeln!(md)?;
    if !plots.is_empty() {
        writeln!(md, "## Curves\n")?;
        for p in &plots {
            writeln!(md, "![{p}]({p})\n")?;
        }
    }
    writeln!(md, "## Settings\n\n```toml\n{}```", run.cfg.to_toml()?)?;
    kiln_data::atomic_write(&out.join("report.md"), |w| w.write_all(md.as_bytes()))?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
