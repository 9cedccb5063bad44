//! The model spec: one description of a transformer (GPT-2 or the Llama family), read from and
//! written to each family's own Hugging Face `config.json`. Everything else (the parameter layout,
//! the activation buffers, the memory estimate, the checkpoint names) is derived from it.

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

/// The model family: which block and which Hugging Face names and `config.json` schema.
///
/// - `Gpt2`: pre-LayerNorm (with bias), learned positions, GELU MLP `[c, 4c]`, fused biased `c_attn`,
///   tied head (`GPT2LMHeadModel`).
/// - `Llama` / `Mistral` / `Qwen2`: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention,
///   tied or untied head; Qwen2 has q/k/v biases (`LlamaForCausalLM`, `MistralForCausalLM`,
///   `Qwen2ForCausalLM`: the same block under three names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Gpt2,
    Llama,
    Mistral,
    Qwen2,
}

impl Family {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "gpt2" => Family::Gpt2,
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            _ => bail!("unknown model family {s:?} (expected gpt2, llama, mistral or qwen2)"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
        }
    }

    /// RMSNorm, RoPE and SwiGLU rather than GPT-2's LayerNorm, learned positions and GELU.
    pub fn is_llama_like(self) -> bool {
        self != Family::Gpt2
    }

    fn hf_prefix(self) -> &'static str {
        match self {
            Family::Gpt2 => "GPT2",
            Family::Llama => "Llama",
            Family::Mistral => "Mistral",
            Family::Qwen2 => "Qwen2",
        }
    }
}

/// Frequency scaling of rotary embeddings (`rope_scaling` in a transformers config.json).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.1's band-wise scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    pub fn to_kernel(&self) -> kiln_kernels::RopeScaling {
        match *self {
            RopeScaling::Linear { factor } => kiln_kernels::RopeScaling::Linear { factor },
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => kiln_kernels::RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            },
        }
    }
}

/// How each block normalises its inputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormKind {
    /// `(x - mean)/sqrt(var + eps) * w + b` (GPT-2).
    LayerNorm,
    /// `x/sqrt(mean(x²) + eps) * w` (Llama).
    RmsNorm,
}

/// The MLP of each block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MlpKind {
    /// `down(gelu(up x))`, with biases (GPT-2).
    Gelu,
    /// `down(silu(gate x) * up x)`, no biases (Llama); gate and up are one fused matmul.
    SwiGlu,
}

/// Shape of a transformer. Field names follow GPT-2's config (`n_embd`, `n_head`, ...); the Llama
/// family's extra fields default so that a GPT-2 config needs none of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    /// Context length (learned positions for GPT-2; the RoPE table and KV cache size otherwise).
    pub n_ctx: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    #[serde(default)]
    pub arch: Arch,
    /// A scalar head (`score.weight`, [1, n_embd]) for reward models and critics.
    #[serde(default)]
    pub score_head: bool,
    #[serde(default)]
    pub family: Family,
    /// Key/value heads (grouped-query attention); 0 means `n_head` (plain multi-head attention).
    #[serde(default)]
    pub n_kv_head: usize,
    /// The MLP's hidden width; 0 means the family's default (4·n_embd for GPT-2, about 8/3·n_embd
    /// rounded up to a multiple of 64 for the Llama family).
    #[serde(default)]
    pub ffn_hidden: usize,
    /// RoPE base frequency (Llama family); 0 means 10,000.
    #[serde(default)]
    pub rope_theta: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// The LM head shares the token embedding (always so for GPT-2).
    #[serde(default = "yes")]
    pub tie_embeddings: bool,
    /// Norm epsilon; 0 means 1e-5.
    #[serde(default)]
    pub norm_eps: f32,
    /// Biases on q/k/v (Llama family: Qwen2 has them, Llama's `attention_bias` too; GPT-2 always).
    #[serde(default)]
    pub qkv_bias: bool,
    /// A bias on the attention output projection (Llama's `attention_bias`; GPT-2 always).
    #[serde(default)]
    pub o_bias: bool,
}

fn yes() -> bool {
    true
}

impl Default for ModelConfig {
    /// A tiny GPT-2 decoder; struct literals override what they need.
    fn default() -> Self {
        ModelConfig {
            vocab_size: 256,
            n_ctx: 64,
            n_layer: 2,
            n_head: 2,
            n_embd: 32,
            arch: Arch::Decoder,
            score_head: false,
            family: Family::Gpt2,
            n_kv_head: 0,
            ffn_hidden: 0,
            rope_theta: 0.0,
            rope_scaling: None,
            tie_embeddings: true,
            norm_eps: 0.0,
            qkv_bias: false,
            o_bias: false,
        }
    }
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
        let kv = self.kv_heads();
        if kv == 0 || !self.n_head.is_multiple_of(kv) {
            bail!(
                "model config: n_kv_head ({kv}) must divide n_head ({})",
                self.n_head
            );
        }
        if self.family == Family::Gpt2 {
            if kv != self.n_head {
                bail!("model config: GPT-2 has no grouped-query attention (n_kv_head must equal n_head)");
            }
            if !self.tie_embeddings {
                bail!("model config: GPT-2's LM head is tied to the token embedding (tie_embeddings = false is for the Llama family)");
            }
            if self.ffn_hidden != 0 && self.ffn_hidden != 4 * self.n_embd {
                bail!(
                    "model config: GPT-2's MLP is 4 * n_embd wide (ffn_hidden {} given)",
                    self.ffn_hidden
                );
            }
        } else if !self.head_size().is_multiple_of(2) {
            bail!(
                "model config: rotary embeddings need an even head size (n_embd / n_head = {})",
                self.head_size()
            );
        }
        if !(self.rope_theta >= 0.0 && self.norm_eps >= 0.0) {
            bail!("model config: rope_theta and norm_eps must be non-negative");
        }
        Ok(())
    }

    /// The same spec with every default resolved (and the Llama family's fields cleared for
    /// GPT-2), so two specs of the same model compare equal however they were written.
    pub fn canonical(mut self) -> Self {
        if self.family == Family::Gpt2 {
            self.n_kv_head = 0;
            self.ffn_hidden = 0;
            self.rope_theta = 0.0;
            self.rope_scaling = None;
            self.tie_embeddings = true;
            self.norm_eps = 0.0;
            self.qkv_bias = false;
            self.o_bias = false;
        } else {
            self.n_kv_head = self.kv_heads();
            self.ffn_hidden = self.ffn();
            self.rope_theta = self.theta();
            self.norm_eps = self.eps();
        }
        self
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Key/value heads (n_head without grouped-query attention).
    pub fn kv_heads(&self) -> usize {
        if self.n_kv_head == 0 {
            self.n_head
        } else {
            self.n_kv_head
        }
    }

    /// Width of q, k and v together (one fused projection).
    pub fn qkv_width(&self) -> usize {
        self.n_head
            .saturating_add(self.kv_heads().saturating_mul(2))
            .saturating_mul(self.head_size())
    }

    pub fn norm_kind(&self) -> NormKind {
        if self.family.is_llama_like() {
            NormKind::RmsNorm
        } else {
            NormKind::LayerNorm
        }
    }

    pub fn mlp_kind(&self) -> MlpKind {
        if self.family.is_llama_like() {
            MlpKind::SwiGlu
        } else {
            MlpKind::Gelu
        }
    }

    /// Rotary positions (else learned positions).
    pub fn rope(&self) -> bool {
        self.family.is_llama_like()
    }

    /// The MLP's hidden width.
    pub fn ffn(&self) -> usize {
        match (self.ffn_hidden, self.mlp_kind()) {
            (0, MlpKind::Gelu) => self.n_embd.saturating_mul(4),
            (0, MlpKind::SwiGlu) => (self.n_embd.saturating_mul(8) / 3)
                .div_ceil(64)
                .saturating_mul(64),
            (f, _) => f,
        }
    }

    pub fn theta(&self) -> f32 {
        if self.rope_theta == 0.0 {
            10_000.0
        } else {
            self.rope_theta
        }
    }

    pub fn eps(&self) -> f32 {
        if self.norm_eps == 0.0 {
            1e-5
        } else {
            self.norm_eps
        }
    }

    /// Biases of (q/k/v, attention output, MLP) linears.
    pub fn biases(&self) -> (bool, bool, bool) {
        match self.family {
            Family::Gpt2 => (true, true, true),
            _ => (self.qkv_bias, self.o_bias, false),
        }
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        crate::params::ParamLayout::new(self).total
    }

    /// A one-line description for logs.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} {}: {} layers, {} heads",
            self.family.name(),
            match self.arch {
                Arch::Decoder => "decoder",
                Arch::Encoder => "encoder",
            },
            self.n_layer,
            self.n_head
        );
        if self.kv_heads() != self.n_head {
            s += &format!(" ({} kv)", self.kv_heads());
        }
        s += &format!(
            ", width {}, ffn {}, context {}, vocab {}",
            self.n_embd,
            self.ffn(),
            self.n_ctx,
            self.vocab_size
        );
        s
    }

    /// Writes `config.json` in the family's own `transformers` schema, plus Kiln's own fields.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let head = if self.score_head {
            "ForSequenceClassification"
        } else if self.family == Family::Gpt2 {
            "LMHeadModel"
        } else {
            "ForCausalLM"
        };
        let architectures = format!("{}{head}", self.family.hf_prefix());
        let mut v = match self.family {
            Family::Gpt2 => serde_json::json!({
                "model_type": "gpt2",
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
            }),
            f => {
                let mut v = serde_json::json!({
                    "model_type": f.name(),
                    "vocab_size": self.vocab_size,
                    "max_position_embeddings": self.n_ctx,
                    "hidden_size": self.n_embd,
                    "intermediate_size": self.ffn(),
                    "num_hidden_layers": self.n_layer,
                    "num_attention_heads": self.n_head,
                    "num_key_value_heads": self.kv_heads(),
                    "head_dim": self.head_size(),
                    "hidden_act": "silu",
                    "rms_norm_eps": self.eps(),
                    "rope_theta": self.theta(),
                    "rope_scaling": self.rope_scaling.as_ref().map(rope_scaling_json),
                    "tie_word_embeddings": self.tie_embeddings,
                    "attention_dropout": 0.0,
                    "initializer_range": 0.02,
                    "use_cache": true,
                    "bos_token_id": 0,
                    "eos_token_id": 0,
                    "pad_token_id": 1,
                });
                let m = v.as_object_mut().expect("object");
                match f {
                    Family::Llama => {
                        m.insert("attention_bias".into(), self.qkv_bias.into());
                        m.insert("mlp_bias".into(), false.into());
                        m.insert("pretraining_tp".into(), 1.into());
                    }
                    Family::Mistral => {
                        m.insert("sliding_window".into(), serde_json::Value::Null);
                    }
                    Family::Qwen2 => {
                        m.insert("use_sliding_window".into(), false.into());
                        m.insert("sliding_window".into(), serde_json::Value::Null);
                        m.insert("max_window_layers".into(), self.n_layer.into());
                    }
                    Family::Gpt2 => unreachable!(),
                }
                v
            }
        };
        let m = v.as_object_mut().expect("object");
        m.insert("architectures".into(), serde_json::json!([architectures]));
        m.insert("num_labels".into(), 1.into());
        m.insert("torch_dtype".into(), "float32".into());
        m.insert(
            "kiln_arch".into(),
            serde_json::to_value(self.arch).expect("arch"),
        );
        m.insert("kiln_score_head".into(), self.score_head.into());
        v
    }

    /// Reads a `config.json` written by Kiln or by `transformers` for GPT-2, Llama, Mistral or Qwen2.
    /// Anything Kiln cannot run (sliding-window attention, mixture of experts, another activation, ...)
    /// is an error naming the field.
    pub fn from_hf_json(v: &serde_json::Value) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(|m| m.as_str())
            .unwrap_or("gpt2");
        let family = match model_type {
            "gpt2" => Family::Gpt2,
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            other => bail!(
                "config.json: model_type \"{other}\" is not supported (Kiln runs gpt2, llama, mistral and qwen2)"
            ),
        };
        let arch = match v.get("kiln_arch") {
            Some(a) => {
                serde_json::from_value(a.clone()).context("config.json: field \"kiln_arch\"")?
            }
            None => Arch::Decoder,
        };
        let score_head = match v.get("kiln_score_head").and_then(|x| x.as_bool()) {
            Some(s) => s,
            // A transformers sequence classifier with one label is a reward model.
            None => v
                .get("architectures")
                .and_then(|a| a.as_array())
                .is_some_and(|a| {
                    a.iter().any(|x| {
                        x.as_str()
                            .is_some_and(|s| s.ends_with("ForSequenceClassification"))
                    })
                }),
        };
        let cfg = if family == Family::Gpt2 {
            gpt2_from_json(v, arch, score_head)?
        } else {
            llama_from_json(v, family, arch, score_head)?
        };
        cfg.validate()?;
        Ok(cfg.canonical())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_hf_json(&v).with_context(|| format!("in {}", path.display()))
    }
}

fn get_usize(v: &serde_json::Value, k: &str) -> Result<usize> {
    v.get(k)
        .and_then(|x| x.as_u64())
        .map(|x| x as usize)
        .with_context(|| format!("config.json: field \"{k}\" missing or not an integer"))
}

fn opt_f32(v: &serde_json::Value, k: &str) -> Result<Option<f32>> {
    match v.get(k) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(|x| Some(x as f32))
            .with_context(|| format!("config.json: field \"{k}\" is not a number")),
    }
}

fn opt_bool(v: &serde_json::Value, k: &str) -> Result<Option<bool>> {
    match v.get(k) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(x) => x
            .as_bool()
            .map(Some)
            .with_context(|| format!("config.json: field \"{k}\" is not true or false")),
    }
}

fn gpt2_from_json(v: &serde_json::Value, arch: Arch, score_head: bool) -> Result<ModelConfig> {
    if let Some(act) = v.get("activation_function").and_then(|a| a.as_str()) {
        if act != "gelu_new" && act != "gelu_pytorch_tanh" {
            bail!("config.json: activation_function \"{act}\" is not supported (Kiln uses the tanh GELU, \"gelu_new\")");
        }
    }
    if let Some(inner) = v.get("n_inner").and_then(|x| x.as_u64()) {
        if inner as usize != 4 * get_usize(v, "n_embd")? {
            bail!("config.json: n_inner must be 4 * n_embd");
        }
    }
    if opt_bool(v, "tie_word_embeddings")? == Some(false) {
        bail!("config.json: tie_word_embeddings = false is not supported for GPT-2");
    }
    let n_ctx = get_usize(v, "n_positions").or_else(|_| get_usize(v, "n_ctx"))?;
    Ok(ModelConfig {
        vocab_size: get_usize(v, "vocab_size")?,
        n_ctx,
        n_layer: get_usize(v, "n_layer")?,
        n_head: get_usize(v, "n_head")?,
        n_embd: get_usize(v, "n_embd")?,
        arch,
        score_head,
        ..ModelConfig::default()
    })
}

fn llama_from_json(
    v: &serde_json::Value,
    family: Family,
    arch: Arch,
    score_head: bool,
) -> Result<ModelConfig> {
    if let Some(act) = v.get("hidden_act").and_then(|a| a.as_str()) {
        if act != "silu" {
            bail!("config.json: hidden_act \"{act}\" is not supported (the Llama family's MLP is SwiGLU, \"silu\")");
        }
    }
    for moe in ["num_local_experts", "num_experts", "n_routed_experts"] {
        if v.get(moe).is_some_and(|x| !x.is_null()) {
            bail!("config.json: field \"{moe}\": mixture-of-experts models are not supported");
        }
    }
    if opt_bool(v, "mlp_bias")? == Some(true) {
        bail!("config.json: mlp_bias = true is not supported");
    }
    if v.get("pretraining_tp")
        .and_then(|x| x.as_u64())
        .unwrap_or(1)
        != 1
    {
        bail!("config.json: pretraining_tp other than 1 is not supported");
    }
    let n_ctx = get_usize(v, "max_position_embeddings")?;
    let sliding = v.get("sliding_window").and_then(|x| x.as_u64());
    let use_sliding = opt_bool(v, "use_sliding_window")?;
    // transformers 5 lists each layer's attention kind; Qwen2's window applies only when
    // use_sliding_window is set (real Qwen2.5 configs carry a window with it off).
    let sliding_layers = v
        .get("layer_types")
        .and_then(|l| l.as_array())
        .is_some_and(|l| l.iter().any(|x| x.as_str() == Some("sliding_attention")));
    let sliding_active = sliding_layers
        || match family {
            Family::Qwen2 => use_sliding == Some(true),
            _ => sliding.is_some(),
        };
    if sliding_active && sliding.is_some_and(|w| (w as usize) < n_ctx) {
        bail!(
            "config.json: field \"sliding_window\" ({}) is smaller than the context ({n_ctx}): \
             sliding-window attention is not supported",
            sliding.unwrap_or(0)
        );
    }
    let n_embd = get_usize(v, "hidden_size")?;
    let n_head = get_usize(v, "num_attention_heads")?;
    if let Some(hd) = v.get("head_dim").and_then(|x| x.as_u64()) {
        if n_head == 0 || hd as usize * n_head != n_embd {
            bail!(
                "config.json: field \"head_dim\" ({hd}) must equal hidden_size / num_attention_heads"
            );
        }
    }
    let attention_bias = opt_bool(v, "attention_bias")?.unwrap_or(false);
    let (qkv_bias, o_bias) = match family {
        Family::Qwen2 => (true, false),
        _ => (attention_bias, attention_bias),
    };
    // transformers 5 writes `rope_parameters` {rope_theta, rope_type, ...}; earlier versions (and
    // most published checkpoints) a top-level `rope_theta` and `rope_scaling`.
    let (rope_theta, rope_scaling) = match v.get("rope_parameters") {
        Some(rp) if rp.is_object() => (opt_f32(rp, "rope_theta")?, parse_rope_scaling(rp)?),
        _ => (
            opt_f32(v, "rope_theta")?,
            match v.get("rope_scaling") {
                None | Some(serde_json::Value::Null) => None,
                Some(s) => parse_rope_scaling(s)?,
            },
        ),
    };
    Ok(ModelConfig {
        vocab_size: get_usize(v, "vocab_size")?,
        n_ctx,
        n_layer: get_usize(v, "num_hidden_layers")?,
        n_head,
        n_embd,
        arch,
        score_head,
        family,
        n_kv_head: v
            .get("num_key_value_heads")
            .and_then(|x| x.as_u64())
            .map_or(n_head, |x| x as usize),
        ffn_hidden: get_usize(v, "intermediate_size")?,
        rope_theta: rope_theta.unwrap_or(10_000.0),
        rope_scaling,
        tie_embeddings: opt_bool(v, "tie_word_embeddings")?.unwrap_or(false),
        norm_eps: opt_f32(v, "rms_norm_eps")?.unwrap_or(1e-6),
        qkv_bias,
        o_bias,
    })
}

/// `rope_scaling` as transformers writes it (`rope_type`, or the older `type`).
fn parse_rope_scaling(s: &serde_json::Value) -> Result<Option<RopeScaling>> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|x| x.as_str())
        .context("config.json: field \"rope_scaling\" has no \"rope_type\"")?;
    let f = |k: &str| -> Result<f32> {
        opt_f32(s, k)?.with_context(|| format!("config.json: rope_scaling.{k} missing"))
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: f("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_max_position_embeddings: get_usize(s, "original_max_position_embeddings")
                .context("config.json: rope_scaling.original_max_position_embeddings")?,
        }),
        other => bail!(
            "config.json: field \"rope_scaling\": rope_type \"{other}\" is not supported (Kiln has default, linear and llama3)"
        ),
    })
}

fn rope_scaling_json(s: &RopeScaling) -> serde_json::Value {
    match s {
        RopeScaling::Linear { factor } => {
            serde_json::json!({"rope_type": "linear", "factor": factor})
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => serde_json::json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    }
}
