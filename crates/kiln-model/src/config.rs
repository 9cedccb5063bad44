//! Model configuration, stored as a GPT-2 style `config.json` (Hugging Face `transformers` reads it as is).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Which way attention looks: a GPT decoder (causal) or a BERT-style encoder (bidirectional).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    #[default]
    Decoder,
    Encoder,
}

/// Shape of a transformer: GPT-2 blocks (pre-LayerNorm, learned positions, GELU, tied embeddings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    /// Context length: the number of learned positions.
    pub n_ctx: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    #[serde(default)]
    pub arch: Arch,
    /// A scalar head (`score.weight`, [1, n_embd]) for reward models and critics.
    #[serde(default)]
    pub score_head: bool,
}

impl ModelConfig {
    pub fn validate(&self) -> Result<()> {
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            bail!(
                "model config: n_head ({}) must divide n_embd ({})",
                self.n_head,
                self.n_embd
            );
        }
        if self.vocab_size == 0 || self.n_ctx == 0 || self.n_layer == 0 {
            bail!("model config: vocab_size, n_ctx and n_layer must be positive");
        }
        Ok(())
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        crate::params::ParamLayout::new(self).total
    }

    /// Writes `config.json` in the GPT-2 format of `transformers`, plus Kiln's own fields.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let architectures = match (self.arch, self.score_head) {
            (_, true) => "GPT2ForSequenceClassification",
            _ => "GPT2LMHeadModel",
        };
        serde_json::json!({
            "model_type": "gpt2",
            "architectures": [architectures],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": null,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": true,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 1,
            "num_labels": 1,
            "torch_dtype": "float32",
            "kiln_arch": self.arch,
            "kiln_score_head": self.score_head,
        })
    }

    /// Reads a GPT-2 style `config.json` (written by Kiln or by `transformers`).
    pub fn from_hf_json(v: &serde_json::Value) -> Result<Self> {
        let get = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .with_context(|| format!("config.json: field \"{k}\" missing or not an integer"))
        };
        if let Some(act) = v.get("activation_function").and_then(|a| a.as_str()) {
            if act != "gelu_new" && act != "gelu_pytorch_tanh" {
                bail!("config.json: activation_function \"{act}\" is not supported (Kiln uses the tanh GELU, \"gelu_new\")");
            }
        }
        if let Some(inner) = v.get("n_inner").and_then(|x| x.as_u64()) {
            if inner as usize != 4 * get("n_embd")? {
                bail!("config.json: n_inner must be 4 * n_embd");
            }
        }
        let arch = match v.get("kiln_arch") {
            Some(a) => {
                serde_json::from_value(a.clone()).context("config.json: field \"kiln_arch\"")?
            }
            None => Arch::Decoder,
        };
        let score_head = v
            .get("kiln_score_head")
            .and_then(|x| x.as_bool())
            .unwrap_or(false);
        let n_ctx = get("n_positions").or_else(|_| get("n_ctx"))?;
        let cfg = ModelConfig {
            vocab_size: get("vocab_size")?,
            n_ctx,
            n_layer: get("n_layer")?,
            n_head: get("n_head")?,
            n_embd: get("n_embd")?,
            arch,
            score_head,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_hf_json(&v).with_context(|| format!("in {}", path.display()))
    }
}
