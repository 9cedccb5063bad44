//! Task accuracy of a chat model on held-out prompts, judged by the demo world's rule-based judge.

use anyhow::{Context, Result};
use kiln_data::chat_format::ChatFormat;
use kiln_data::datasets::Message;
use kiln_data::Tokenizer;
use kiln_demo::World;
use kiln_model::{generate, GenerateOptions, Model, Sampling};
use kiln_train::Metrics;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the judge's world and held-out prompts are (TOML `[judge]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    pub world: PathBuf,
    pub prompts: PathBuf,
    /// Evaluate at most this many prompts (0: all).
    #[serde(default)]
    pub limit: usize,
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
}

fn default_max_new() -> usize {
    32
}

/// One judged answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub prompt: String,
    pub response: String,
    pub correct: bool,
    pub well_formed: bool,
    pub score: f32,
    pub ended: bool,
}

pub struct Judge {
    pub world: World,
    pub prompts: Vec<String>,
    pub max_new_tokens: usize,
}

impl Judge {
    pub fn load(cfg: &JudgeConfig) -> Result<Judge> {
        let world = World::load(&cfg.world)?;
        let mut prompts = read_prompt_texts(&cfg.prompts)?;
        if cfg.limit > 0 {
            prompts.truncate(cfg.limit);
        }
        Ok(Judge {
            world,
            prompts,
            max_new_tokens: cfg.max_new_tokens,
        })
    }

    /// Greedy answers to every prompt, rendered with the model's chat format (Kiln's template or
    /// a Hugging Face one), judged: accuracy, well-formedness, mean score, the share that stopped
    /// at the end token, and mean length in tokens.
    pub fn evaluate(
        &self,
        model: &Model,
        tok: &Tokenizer,
        chat: &dyn ChatFormat,
    ) -> Result<(Metrics, Vec<Sample>)> {
        let stops = chat.stop_tokens()?;
        let mut samples = Vec::with_capacity(self.prompts.len());
        let opts = GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: Sampling {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
            },
            stop_tokens: stops.clone(),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut total_len = 0usize;
        let mut tally = kiln_demo::JudgeTally::default();
        for chunk in self.prompts.chunks(64) {
            let rendered: Vec<Vec<u32>> = chunk
                .iter()
                .map(|p| chat.render_prompt(&[Message::user(p.clone())]))
                .collect::<Result<_, _>>()?;
            let outs = generate(model, &rendered, &opts, &mut rng, |_, _| {})?;
            for (p, out) in chunk.iter().zip(outs) {
                let ended = out.last().is_some_and(|t| stops.contains(t));
                total_len += out.len();
                let response = tok.decode_skip_special(&out).trim().to_string();
                let j = self.world.judge(p, &response);
                tally.record(&j);
                samples.push(Sample {
                    prompt: p.clone(),
                    response,
                    correct: j.correct,
                    well_formed: j.well_formed,
                    score: j.score,
                    ended,
                });
            }
        }
        let n = samples.len().max(1) as f64;
        let mut m = Metrics::new();
        m.insert(
            "accuracy".into(),
            samples.iter().filter(|s| s.correct).count() as f64 / n,
        );
        m.insert(
            "well_formed".into(),
            samples.iter().filter(|s| s.well_formed).count() as f64 / n,
        );
        m.insert(
            "judge_score".into(),
            samples.iter().map(|s| s.score as f64).sum::<f64>() / n,
        );
        m.insert(
            "ended".into(),
            samples.iter().filter(|s| s.ended).count() as f64 / n,
        );
        m.insert("answer_len".into(), total_len as f64 / n);
        m.insert("macro_accuracy".into(), tally.macro_accuracy());
        for (kind, t) in &tally.per_kind {
            m.insert(format!("acc_{}", kind.name()), t.accuracy());
        }
        Ok((m, samples))
    }
}

/// The prompt texts of a prompt file (`{"prompt"}` or Alpaca records).
pub fn read_prompt_texts(path: &Path) -> Result<Vec<String>> {
    let loaded = kiln_data::datasets::load_prompts(path, &Default::default())
        .with_context(|| format!("loading prompts from {}", path.display()))?;
    Ok(loaded.records.into_iter().map(|r| r.raw).collect())
}
