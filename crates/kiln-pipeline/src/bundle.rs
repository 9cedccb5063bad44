//! A model directory as the stages pass it on: weights + `config.json` + `tokenizer.json` + `kiln.json`
//! (the stage, the chat template, reward statistics), so later stages and `chat` render prompts
//! exactly as training did.
//!
//! A Hugging Face model directory (no `kiln.json`) loads too: its `tokenizer.json` with the special
//! tokens' roles of `tokenizer_config.json` / `generation_config.json` / `config.json`, and the Jinja
//! `chat_template` of `tokenizer_config.json` (or `chat_template.jinja`). Checkpoints Kiln writes
//! from it carry those files (the template in `tokenizer_config.json`), so `transformers` loads them
//! back, `AutoTokenizer` included.

use anyhow::{bail, Context, Result};
use kiln_data::chat_format::{ChatFormat, JinjaChat, KilnChat};
use kiln_data::template::ChatTemplate;
use kiln_data::{SpecialOverrides, Tokenizer};
use kiln_model::checkpoint::{load_model, read_checked, resolve_model_dir};
use kiln_model::Model;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// A Hugging Face Jinja chat template used instead of `template` (also written into the
    /// checkpoint's `tokenizer_config.json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
}

pub struct Bundle {
    pub dir: PathBuf,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub meta: KilnMeta,
    /// The chat template bound to the tokenizer; `None` for a Hugging Face directory without one.
    pub chat: Option<Arc<dyn ChatFormat + Send + Sync>>,
}

/// Files of a Hugging Face tokenizer that checkpoints carry on.
pub const HF_TOKENIZER_FILES: [&str; 3] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

impl Bundle {
    /// The chat template, or an error saying how to give one.
    pub fn chat(&self) -> Result<&dyn ChatFormat> {
        match &self.chat {
            Some(c) => Ok(c.as_ref()),
            None => bail!(
                "{}: no chat template (tokenizer_config.json has no \"chat_template\" and there is no \
                 chat_template.jinja); give one with --template FILE.jinja",
                self.dir.display()
            ),
        }
    }

    /// The chat template as a shared handle (for closures that outlive the bundle), or the
    /// error of [`chat`](Self::chat).
    pub fn chat_format(&self) -> Result<Arc<dyn ChatFormat + Send + Sync>> {
        self.chat()?;
        Ok(self.chat.clone().expect("checked by chat()"))
    }

    /// The files a stage's checkpoints carry beside the weights: the tokenizer, `kiln.json`, and
    /// for a Hugging Face tokenizer its `tokenizer_config.json` (with the chat template in use),
    /// `special_tokens_map.json` and `generation_config.json` (whose `eos_token_id` lists the stop
    /// tokens).
    pub fn stage_files(&self, meta: &KilnMeta) -> Result<Vec<(String, Vec<u8>)>> {
        let mut files = meta.files(&self.dir.join(TOKENIZER_FILE))?;
        if self.tokenizer.is_kiln() && meta.chat_template.is_none() {
            return Ok(files);
        }
        let sp = self.tokenizer.specials();
        for name in HF_TOKENIZER_FILES {
            let path = self.dir.join(name);
            let mut v: serde_json::Value = if path.exists() {
                serde_json::from_slice(&read_checked(&self.dir, name)?)
                    .with_context(|| format!("{}: invalid JSON", path.display()))?
            } else if name == TOKENIZER_CONFIG_FILE {
                serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast"})
            } else if name == "generation_config.json" {
                serde_json::json!({})
            } else {
                continue;
            };
            let Some(o) = v.as_object_mut() else {
                bail!("{}: expected a JSON object", path.display());
            };
            if name == TOKENIZER_CONFIG_FILE {
                if let Some(t) = &meta.chat_template {
                    o.insert("chat_template".into(), t.clone().into());
                }
                // Roles missing from the file, or given otherwise (flags), are written as strings.
                for role in ["bos_token", "eos_token", "pad_token"] {
                    let Some(want) = sp.strings.get(role) else {
                        continue;
                    };
                    let have = o.get(role).and_then(|x| match x {
                        serde_json::Value::String(s) => Some(s.clone()),
                        serde_json::Value::Object(m) => m
                            .get("content")
                            .and_then(|c| c.as_str())
                            .map(str::to_string),
                        _ => None,
                    });
                    if have.as_ref() != Some(want) {
                        o.insert(role.into(), want.clone().into());
                    }
                }
            }
            if name == "generation_config.json" {
                o.insert("eos_token_id".into(), serde_json::json!(sp.stop_tokens()));
                if let Some(b) = sp.bos {
                    o.insert("bos_token_id".into(), b.into());
                }
                if let Some(p) = sp.pad {
                    o.insert("pad_token_id".into(), p.into());
                }
            }
            files.push((name.to_string(), serde_json::to_vec_pretty(&v)?));
        }
        Ok(files)
    }
}

/// What a training stage renders with: `path` (a `.jinja` file is a Hugging Face chat template,
/// anything else Kiln's JSON template), or the bundle's own template. Returns Kiln's template (for
/// `kiln.json`), the Jinja source if any, and the format.
#[allow(clippy::type_complexity)]
pub fn stage_template(
    b: &Bundle,
    path: &Option<PathBuf>,
) -> Result<(
    ChatTemplate,
    Option<String>,
    Arc<dyn ChatFormat + Send + Sync>,
)> {
    let Some(p) = path else {
        let chat = b.chat()?;
        let _ = chat;
        return Ok((
            b.meta.template.clone(),
            b.meta.chat_template.clone(),
            b.chat.clone().expect("checked by chat()"),
        ));
    };
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    if p.extension().is_some_and(|e| e == "jinja") {
        let chat = chat_format(&b.tokenizer, &b.meta.template, Some(&text))
            .with_context(|| p.display().to_string())?
            .expect("a Jinja template");
        return Ok((b.meta.template.clone(), Some(text), chat));
    }
    let template = ChatTemplate::from_json(&text)
        .with_context(|| format!("{}: invalid chat template", p.display()))?;
    if !b.tokenizer.is_kiln() {
        bail!(
            "{}: Kiln's JSON chat template needs a Kiln tokenizer (its <|name|> special tokens); \
             give a Jinja template (FILE.jinja) for {}",
            p.display(),
            b.dir.display()
        );
    }
    let chat = chat_format(&b.tokenizer, &template, None)?.expect("a Kiln tokenizer");
    Ok((template, None, chat))
}

/// A Hugging Face directory's Jinja chat template: `tokenizer_config.json`'s `chat_template` (a
/// string, or a list of named templates of which "default" is taken), else `chat_template.jinja`.
pub fn hf_chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join(CHAT_TEMPLATE_FILE);
    if jinja.exists() {
        return Ok(Some(
            std::fs::read_to_string(&jinja)
                .with_context(|| format!("reading {}", jinja.display()))?,
        ));
    }
    let path = dir.join(TOKENIZER_CONFIG_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let v: serde_json::Value = serde_json::from_slice(&read_checked(dir, TOKENIZER_CONFIG_FILE)?)
        .with_context(|| format!("{}: invalid JSON", path.display()))?;
    Ok(match v.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or(list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    })
}

/// Builds the chat format of a tokenizer: a Jinja template when one is given, else Kiln's JSON
/// template (Kiln tokenizers only).
pub fn chat_format(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    jinja: Option<&str>,
) -> Result<Option<Arc<dyn ChatFormat + Send + Sync>>> {
    if let Some(src) = jinja {
        return Ok(Some(Arc::new(
            JinjaChat::new(src, tokenizer.clone()).context("the chat template")?,
        )));
    }
    if tokenizer.is_kiln() {
        return Ok(Some(Arc::new(KilnChat {
            template: template.clone(),
            enc: tokenizer.clone(),
        })));
    }
    Ok(None)
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
            chat_template: None,
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
    load_bundle_with(path, &SpecialOverrides::default())
}

/// [`load_bundle`] with special-token roles given explicitly (a Hugging Face tokenizer only).
pub fn load_bundle_with(path: &Path, roles: &SpecialOverrides) -> Result<Bundle> {
    let dir = resolve_model_dir(path)?;
    let model = load_model(&dir)?;
    let tokenizer = load_tokenizer(&dir, roles)?;
    if !tokenizer.is_kiln() {
        // Hugging Face models often pad their embedding past the tokenizer's last id.
        if tokenizer.vocab_size() > model.cfg.vocab_size {
            bail!(
                "{}: the model's vocabulary has {} tokens but tokenizer.json has {} (ids {}.. \
                 would be out of range: a tokenizer from another model?)",
                dir.display(),
                model.cfg.vocab_size,
                tokenizer.vocab_size(),
                model.cfg.vocab_size
            );
        }
    } else if tokenizer.vocab_size() != model.cfg.vocab_size {
        bail!(
            "{}: the model's vocabulary has {} tokens but tokenizer.json has {} (a tokenizer from another model?)",
            dir.display(),
            model.cfg.vocab_size,
            tokenizer.vocab_size()
        );
    }
    let (meta, chat) = load_meta_and_chat(&dir, &tokenizer)?;
    Ok(Bundle {
        dir,
        model,
        tokenizer,
        meta,
        chat,
    })
}

/// The tokenizer (with its special tokens' roles), `kiln.json` (or defaults) and the chat template of
/// a model directory, checking that they belong together; no weights are read.
#[allow(clippy::type_complexity)]
pub fn load_chat(
    dir: &Path,
) -> Result<(
    Tokenizer,
    KilnMeta,
    Option<Arc<dyn ChatFormat + Send + Sync>>,
)> {
    let tokenizer = load_tokenizer(dir, &SpecialOverrides::default())?;
    let (meta, chat) = load_meta_and_chat(dir, &tokenizer)?;
    Ok((tokenizer, meta, chat))
}

fn load_tokenizer(dir: &Path, roles: &SpecialOverrides) -> Result<Tokenizer> {
    let tok_path = dir.join(TOKENIZER_FILE);
    if !tok_path.exists() {
        bail!("{}: no tokenizer.json beside the model", dir.display());
    }
    Ok(Tokenizer::load_dir_with(dir, roles)?)
}

#[allow(clippy::type_complexity)]
fn load_meta_and_chat(
    dir: &Path,
    tokenizer: &Tokenizer,
) -> Result<(KilnMeta, Option<Arc<dyn ChatFormat + Send + Sync>>)> {
    let mut meta: KilnMeta = if dir.join(META_FILE).exists() {
        serde_json::from_slice(&read_checked(dir, META_FILE)?)
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
    let jinja = match &meta.chat_template {
        Some(t) => Some(t.clone()),
        None if tokenizer.is_kiln() => None,
        None => hf_chat_template(dir)?,
    };
    let chat = chat_format(tokenizer, &meta.template, jinja.as_deref())
        .with_context(|| dir.display().to_string())?;
    meta.chat_template = jinja;
    Ok((meta, chat))
}
