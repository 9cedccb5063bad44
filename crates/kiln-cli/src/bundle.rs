//! A model directory as the stages pass it on: weights + `config.json` + `tokenizer.json` + `kiln.json`
//! (the stage, the chat template, reward statistics), so later stages and `chat` render prompts
//! exactly as training did.

use anyhow::{bail, Context, Result};
use kiln_data::template::ChatTemplate;
use kiln_data::Tokenizer;
use kiln_model::checkpoint::{load_model, read_checked, resolve_model_dir};
use kiln_model::Model;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const META_FILE: &str = "kiln.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// `kiln.json`: what Kiln needs beyond the weights.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct KilnMeta {
    /// "pretrain", "sft", "rm" or "ppo".
    pub stage: String,
    pub template: ChatTemplate,
    /// Mean and standard deviation of the reward model's scores over its training responses.
    pub reward_mean: Option<f32>,
    pub reward_std: Option<f32>,
    pub tokenizer_fingerprint: String,
    pub seed: u64,
}

pub struct Bundle {
    pub dir: PathBuf,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub meta: KilnMeta,
}

impl KilnMeta {
    pub fn new(stage: &str, template: ChatTemplate, tokenizer: &Tokenizer, seed: u64) -> Self {
        KilnMeta {
            stage: stage.into(),
            template,
            reward_mean: None,
            reward_std: None,
            tokenizer_fingerprint: tokenizer.fingerprint().to_string(),
            seed,
        }
    }

    /// The extra files every checkpoint of a stage carries: the tokenizer and this metadata.
    pub fn files(&self, tokenizer_path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
        let tok = std::fs::read(tokenizer_path)
            .with_context(|| format!("reading {}", tokenizer_path.display()))?;
        Ok(vec![
            (TOKENIZER_FILE.into(), tok),
            (META_FILE.into(), serde_json::to_vec_pretty(self)?),
        ])
    }
}

/// Loads a model directory (or a run directory's latest checkpoint) with its tokenizer and metadata,
/// checking that they belong together.
pub fn load_bundle(path: &Path) -> Result<Bundle> {
    let dir = resolve_model_dir(path)?;
    let model = load_model(&dir)?;
    let tok_path = dir.join(TOKENIZER_FILE);
    if !tok_path.exists() {
        bail!("{}: no tokenizer.json beside the model", dir.display());
    }
    let tokenizer = Tokenizer::load(&tok_path)?;
    if tokenizer.vocab_size() != model.cfg.vocab_size {
        bail!(
            "{}: the model's vocabulary has {} tokens but tokenizer.json has {} (a tokenizer from another model?)",
            dir.display(),
            model.cfg.vocab_size,
            tokenizer.vocab_size()
        );
    }
    let meta: KilnMeta = if dir.join(META_FILE).exists() {
        serde_json::from_slice(&read_checked(&dir, META_FILE)?)
            .with_context(|| format!("{}/{META_FILE}", dir.display()))?
    } else {
        KilnMeta {
            tokenizer_fingerprint: tokenizer.fingerprint().to_string(),
            ..Default::default()
        }
    };
    if !meta.tokenizer_fingerprint.is_empty()
        && meta.tokenizer_fingerprint != tokenizer.fingerprint()
    {
        bail!(
            "{}: tokenizer.json does not match the tokenizer the model was trained with",
            dir.display()
        );
    }
    Ok(Bundle {
        dir,
        model,
        tokenizer,
        meta,
    })
}

/// Replaces one file of an existing checkpoint (rewriting the directory atomically, checksums included).
pub fn update_checkpoint_file(dir: &Path, name: &str, bytes: Vec<u8>) -> Result<()> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let fname = e.file_name().to_string_lossy().to_string();
        if fname == kiln_model::checkpoint::CHECKSUMS_FILE || fname == name || !e.path().is_file() {
            continue;
        }
        files.push((fname.clone(), read_checked(dir, &fname)?));
    }
    files.push((name.to_string(), bytes));
    kiln_model::checkpoint::write_checkpoint_dir(dir, &files)
}
