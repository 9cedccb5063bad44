//! Every model of a pipeline answers the same held-out prompts (greedily); the answers are judged
//! (the demo world), scored by reward sources (a reference answer's exact match, a user's checker
//! program, …) and by the reward model, and the drift from the SFT model is measured. The results
//! are files (`eval/<model>.json`), which the report reads: evaluation runs models, the report
//! does not.

use crate::bundle::{load_bundle, Bundle};
use crate::evaluate::{Judge, JudgeConfig};
use crate::stages::{reward_sources, RewardContext};
use anyhow::{Context, Result};
use kiln_data::datasets::{Message, Obj, PromptRecord, Role};
use kiln_model::{Activations, GenerateOptions, Sampling};
use kiln_train::Metrics;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What every model is evaluated on.
pub struct EvalPlan {
    /// The held-out prompts, each with its whole record (reference answers for reward sources).
    pub prompts: Vec<(PromptRecord, Obj)>,
    /// The demo world's judge (its prompts are `prompts`).
    pub judge: Option<JudgeConfig>,
    /// The reward model that scores every answer (normalised by its training statistics).
    pub reward_model: Option<PathBuf>,
    /// Reward sources (`exact`, `cmd:PROGRAM`, `format`, `judge`, `rm:DIR`) and their weights.
    pub rewards: Vec<String>,
    pub reward_weights: Vec<f32>,
    pub max_new_tokens: usize,
}

/// One model's answer to one held-out prompt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Answer {
    pub prompt: String,
    pub response: String,
    /// The judge's verdict, when there is a judge.
    pub correct: Option<bool>,
    pub well_formed: Option<bool>,
    /// The weighted sum of the reward sources, when there are any.
    pub reward: Option<f64>,
    /// The reward model's normalised score.
    pub rm_score: Option<f64>,
    /// The answer ended with an end-of-turn token (not cut at the length limit).
    pub ended: bool,
}

/// One model's evaluation: the metrics and every answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelEval {
    pub name: String,
    /// The checkpoint evaluated (an evaluation file is reused only for the same one).
    pub checkpoint: String,
    pub metrics: Metrics,
    pub answers: Vec<Answer>,
}

impl ModelEval {
    /// The share of answers counted right: by the judge, else by the rewards (≥ 0.5).
    pub fn accuracy(&self) -> Option<f64> {
        self.metrics.get("accuracy").copied()
    }
}

/// The checkpoint a run folder (or checkpoint folder) resolves to, as text.
fn checkpoint_of(dir: &Path) -> String {
    kiln_model::checkpoint::resolve_model_dir(dir)
        .unwrap_or_else(|_| dir.to_path_buf())
        .display()
        .to_string()
}

/// The question of a prompt: its last user turn.
fn question(r: &PromptRecord) -> String {
    r.prompt
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .map(|m| m.content.clone())
        .unwrap_or_else(|| r.raw.clone())
}

/// Evaluates the model in `dir`, with its drift from `kl_reference` (the SFT model) when given,
/// reusing `cache` when it holds this checkpoint's evaluation.
pub fn evaluate_model(
    name: &str,
    dir: &Path,
    plan: &EvalPlan,
    kl_reference: Option<&Path>,
    cache: &Path,
) -> Result<ModelEval> {
    let checkpoint = checkpoint_of(dir);
    if let Some(e) = std::fs::read(cache)
        .ok()
        .and_then(|b| serde_json::from_slice::<ModelEval>(&b).ok())
        .filter(|e| e.checkpoint == checkpoint && e.name == name)
    {
        return Ok(e);
    }
    let b = load_bundle(dir)?;
    let e = evaluate_bundle(name, &b, plan, kl_reference, checkpoint)?;
    let bytes = serde_json::to_vec_pretty(&e)?;
    if let Some(parent) = cache.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    kiln_data::atomic_write(cache, |w| w.write_all(&bytes))?;
    Ok(e)
}

fn evaluate_bundle(
    name: &str,
    b: &Bundle,
    plan: &EvalPlan,
    kl_reference: Option<&Path>,
    checkpoint: String,
) -> Result<ModelEval> {
    let chat = b.chat()?;
    let n_ctx = b.model.cfg.n_ctx;
    let stop_tokens = chat.stop_tokens()?;
    let rendered: Vec<Vec<u32>> = plan
        .prompts
        .iter()
        .map(|(r, _)| {
            // Keep the prompt's end (where the question and the assistant prefix are) and room
            // for an answer: every model answers every prompt.
            let t = chat.render_prompt(&r.prompt)?;
            let room = plan.max_new_tokens.min(n_ctx / 2).max(1);
            Ok(t[t.len().saturating_sub(n_ctx - room)..].to_vec())
        })
        .collect::<Result<_>>()?;
    let questions: Vec<String> = plan.prompts.iter().map(|(r, _)| question(r)).collect();
    let judge = plan.judge.as_ref().map(Judge::load).transpose()?;
    let opts = GenerateOptions {
        max_new_tokens: plan.max_new_tokens,
        sampling: Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        },
        stop_tokens: stop_tokens.clone(),
    };
    // Greedy: the generator never draws from it.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut outs: Vec<Vec<u32>> = Vec::with_capacity(rendered.len());
    for chunk in rendered.chunks(64) {
        outs.extend(kiln_model::generate(
            &b.model,
            chunk,
            &opts,
            &mut rng,
            |_, _| {},
        )?);
    }
    let mut answers: Vec<Answer> = plan
        .prompts
        .iter()
        .zip(&outs)
        .map(|((r, _), out)| Answer {
            prompt: r.raw.clone(),
            response: b.tokenizer.decode_skip_special(out).trim().to_string(),
            correct: None,
            well_formed: None,
            reward: None,
            rm_score: None,
            ended: out.last().is_some_and(|t| stop_tokens.contains(t)),
        })
        .collect();
    let mut m = Metrics::new();
    let n = answers.len().max(1) as f64;
    let share =
        |f: &dyn Fn(&Answer) -> bool, a: &[Answer]| a.iter().filter(|x| f(x)).count() as f64 / n;
    if let Some(j) = &judge {
        let mut tally = kiln_demo::JudgeTally::default();
        let mut score = 0.0;
        for (a, q) in answers.iter_mut().zip(&questions) {
            let v = j.world.judge(q, &a.response);
            tally.record(&v);
            score += v.score as f64;
            a.correct = Some(v.correct);
            a.well_formed = Some(v.well_formed);
        }
        m.insert(
            "accuracy".into(),
            share(&|a| a.correct == Some(true), &answers),
        );
        m.insert(
            "well_formed".into(),
            share(&|a| a.well_formed == Some(true), &answers),
        );
        m.insert("judge_score".into(), score / n);
        m.insert("macro_accuracy".into(), tally.macro_accuracy());
        for (kind, t) in &tally.per_kind {
            m.insert(format!("acc_{}", kind.name()), t.accuracy());
        }
    }
    if !plan.rewards.is_empty() {
        let mut sources = reward_sources(
            &plan.rewards,
            &plan.reward_weights,
            &RewardContext {
                actor: b,
                loaded: &plan.prompts,
                prompts: &rendered,
                questions: &questions,
                judge: judge.as_ref(),
                stop_tokens: &stop_tokens,
                timeout_s: 30.0,
                batch: 32,
            },
        )?;
        let idx: Vec<usize> = (0..outs.len()).collect();
        let mut total = vec![0.0f64; outs.len()];
        for w in sources.iter_mut() {
            let s = w.source.score(&idx, &outs)?;
            m.insert(
                format!("reward/{}", w.source.name()),
                s.iter().map(|&x| x as f64).sum::<f64>() / n,
            );
            for (t, x) in total.iter_mut().zip(&s) {
                *t += (w.weight * x) as f64;
            }
        }
        for (a, t) in answers.iter_mut().zip(&total) {
            a.reward = Some(*t);
        }
        m.insert("reward".into(), total.iter().sum::<f64>() / n);
        if judge.is_none() {
            m.insert(
                "accuracy".into(),
                share(&|a| a.reward.is_some_and(|r| r >= 0.5), &answers),
            );
        }
    }
    if let Some(rm_dir) = &plan.reward_model {
        let scores = rm_scores(rm_dir, &plan.prompts, &answers)?;
        for (a, s) in answers.iter_mut().zip(&scores) {
            a.rm_score = Some(*s);
        }
        m.insert("rm_score".into(), scores.iter().sum::<f64>() / n);
    }
    m.insert("ended".into(), share(&|a| a.ended, &answers));
    m.insert(
        "answer_len".into(),
        outs.iter().map(|o| o.len() as f64).sum::<f64>() / n,
    );
    if let Some(r) = kl_reference {
        let reference = load_bundle(r)?;
        m.insert(
            "kl_sft".into(),
            heldout_kl(b, &reference, &rendered, plan.max_new_tokens)?,
        );
    }
    Ok(ModelEval {
        name: name.into(),
        checkpoint,
        metrics: m,
        answers,
    })
}

/// The reward model's normalised scores of (prompt, answer) pairs.
fn rm_scores(
    rm_dir: &Path,
    prompts: &[(PromptRecord, Obj)],
    answers: &[Answer],
) -> Result<Vec<f64>> {
    let rm = load_bundle(rm_dir)?;
    let chat = rm.chat()?;
    let (mean, std) = (
        rm.meta.reward_mean.unwrap_or(0.0),
        rm.meta.reward_std.unwrap_or(1.0),
    );
    let n_ctx = rm.model.cfg.n_ctx;
    let seqs: Vec<Vec<u32>> = prompts
        .iter()
        .zip(answers)
        .map(|((r, _), a)| {
            let x = chat.render_prompt_response(&r.prompt, &a.response)?;
            Ok(kiln_data::template::fit_example(&x, n_ctx)
                .map(|f| f.tokens)
                .unwrap_or_else(|| x.tokens[x.tokens.len().saturating_sub(n_ctx)..].to_vec()))
        })
        .collect::<Result<_>>()?;
    let mut acts = Activations::new(&rm.model.cfg, 32, n_ctx, false);
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(32) {
        out.extend(
            kiln_train::rm::score_rows(&rm.model, &mut acts, chunk)
                .into_iter()
                .map(|s| ((s - mean) / std) as f64),
        );
    }
    Ok(out)
}

/// The drift of a model from a reference on the held-out prompts: one answer per prompt sampled at
/// temperature 1 (seed 0), and Σ over its tokens of KL(π(·|x, y<t) ‖ π_ref(·|x, y<t)), exact over
/// the vocabulary; the mean over prompts, in nats per answer (the same measure for every branch).
pub fn heldout_kl(
    p: &Bundle,
    r: &Bundle,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
) -> Result<f64> {
    let opts = GenerateOptions {
        max_new_tokens,
        sampling: Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        stop_tokens: p.chat()?.stop_tokens()?,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut items = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(64) {
        let outs = kiln_model::generate(&p.model, chunk, &opts, &mut rng, |_, _| {})?;
        items.extend(chunk.iter().cloned().zip(outs));
    }
    let kl = kiln_train::dpo::response_kl(&p.model, &r.model, &items)?;
    Ok(kl.iter().sum::<f64>() / kl.len().max(1) as f64)
}

/// The held-out prompts of a judge: its prompt file as user turns.
pub fn judge_prompts(j: &JudgeConfig) -> Result<Vec<(PromptRecord, Obj)>> {
    let judge = Judge::load(j)?;
    Ok(judge
        .prompts
        .into_iter()
        .map(|q| {
            let mut o = Obj::new();
            o.insert("prompt".into(), q.clone().into());
            (
                PromptRecord {
                    prompt: vec![Message::user(q.clone())],
                    raw: q,
                },
                o,
            )
        })
        .collect())
}
