//! LoRA adapters (Hu et al. 2021) in PEFT's conventions: a frozen linear `y = x·W + b` gains
//! `scale · (x·Aᵀ)·Bᵀ` with `A` `[r, in]` and `B` `[out, r]` (`B` starts at zero, so training starts
//! from the base model), `scale = alpha / r` (or `alpha / √r` with rsLoRA).
//!
//! Kiln fuses q/k/v (and SwiGLU's gate/up) into one linear; an adapter on `q_proj` sits on the
//! `q` column slice of the fused output, so an adapter is (layer, [`Site`], column range). The set's
//! trainable tensors (every `A` and `B`, and PEFT's `modules_to_save` copy of a score head) live in
//! one flat buffer with their own gradients, which is all AdamW, clipping and checkpoints see; the
//! base allocates no gradient at all.
//!
//! Files are PEFT's: `adapter_model.safetensors` (tensors `base_model.model.<module>.lora_A.weight`,
//! `...lora_B.weight`, and `base_model.model.score.weight` for a saved score head) and
//! `adapter_config.json`, loadable by `peft.PeftModel.from_pretrained`.

use crate::config::{Family, ModelConfig};
use crate::infer::WeightFormat;
use crate::params::{Linear, ParamLayout, Role, TensorInfo};
use anyhow::{bail, Context, Result};
use kiln_kernels::{self as k, Strided};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// Kiln's own adapter settings beside PEFT's (which warns about keys it does not know): the format
/// the base was held in while the adapters trained.
pub const KILN_LORA_FILE: &str = "kiln_lora.json";
/// PEFT's prefix of every saved tensor name (`PeftModel.base_model.model`).
pub const PEFT_PREFIX: &str = "base_model.model.";
/// What `--lora-targets` takes for every linear layer of the blocks (PEFT's spelling).
pub const ALL_LINEAR: &str = "all-linear";

/// One of a block's four linear layers (see [`crate::params::BlockLayout`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    Qkv,
    O,
    Up,
    Down,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::Qkv, Site::O, Site::Up, Site::Down];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn linear(self, b: &crate::params::BlockLayout) -> &Linear {
        match self {
            Site::Qkv => &b.qkv,
            Site::O => &b.o,
            Site::Up => &b.up,
            Site::Down => &b.down,
        }
    }
}

/// A run's LoRA settings (TOML `[lora]` of a stage; `--lora-*` flags).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    /// Dropout on an adapter's input during training (PEFT's `lora_dropout`).
    pub dropout: f32,
    /// Module names (`q_proj`, `c_attn`, ...), or `all-linear`.
    pub targets: Vec<String>,
    /// rsLoRA: scale `alpha / √r` instead of `alpha / r`.
    pub rslora: bool,
    /// How the frozen base weights are held: f32, or packed to bf16 / int8 (QLoRA-style).
    #[serde(with = "format_serde")]
    pub base_weights: WeightFormat,
}

mod format_serde {
    use crate::infer::WeightFormat;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(f: &WeightFormat, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&f.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<WeightFormat, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec![ALL_LINEAR.into()],
            rslora: false,
            base_weights: WeightFormat::F32,
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("LoRA rank must be at least 1");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!("LoRA alpha must be positive (got {})", self.alpha);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("LoRA dropout must be in [0, 1) (got {})", self.dropout);
        }
        if self.targets.is_empty() {
            bail!("LoRA needs target modules (--lora-targets q_proj,v_proj or all-linear)");
        }
        Ok(())
    }
}

/// One adapter: `A` `[r, i]` and `B` `[o, r]` (PEFT's layouts) in the set's buffer, on columns
/// `cols` of one block linear.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// The Hugging Face module path (`model.layers.0.self_attn.q_proj`, `transformer.h.0.attn.c_attn`).
    pub module: String,
    pub layer: usize,
    pub site: Site,
    pub cols: Range<usize>,
    pub i: usize,
    pub a: Range<usize>,
    pub b: Range<usize>,
}

impl Adapter {
    pub fn o(&self) -> usize {
        self.cols.len()
    }
}

/// Every adapter of a model, their trainable buffer and gradients.
#[derive(Debug)]
pub struct LoraSet {
    pub cfg: LoraConfig,
    pub adapters: Vec<Adapter>,
    /// The trainable tensors in `params` (PEFT names): each adapter's A and B, then the score head.
    pub tensors: Vec<TensorInfo>,
    pub params: Vec<f32>,
    pub grads: Vec<f32>,
    /// PEFT's `modules_to_save` copy of the score head (reward models, critics): trained in full,
    /// read instead of the base's (which stays as it was).
    pub score: Option<Range<usize>>,
    /// False: the model computes as its base (the RL reference, with no second copy of the weights).
    pub enabled: bool,
    /// Dropout is applied only while this is set (the training loop's micro-steps, not evaluation).
    pub training: bool,
    /// Dropout masks are a hash of (seed, round, adapter, element): recomputed in the backward, so
    /// no mask is stored. Each training forward takes the next round.
    pub dropout_seed: u64,
    round: AtomicU64,
    /// The base model's directory, as `adapter_config.json`'s `base_model_name_or_path` names it.
    pub base_model: Option<String>,
}

impl Clone for LoraSet {
    fn clone(&self) -> Self {
        LoraSet {
            cfg: self.cfg.clone(),
            adapters: self.adapters.clone(),
            tensors: self.tensors.clone(),
            params: self.params.clone(),
            grads: self.grads.clone(),
            score: self.score.clone(),
            enabled: self.enabled,
            training: self.training,
            dropout_seed: self.dropout_seed,
            round: AtomicU64::new(self.round()),
            base_model: self.base_model.clone(),
        }
    }
}

/// The module names a family's blocks offer as targets.
pub fn module_names(family: Family) -> &'static [&'static str] {
    match family {
        Family::Gpt2 => &["c_attn", "c_proj", "c_fc"],
        _ => &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    }
}

fn matches(module: &str, target: &str) -> bool {
    target == ALL_LINEAR || module == target || module.ends_with(&format!(".{target}"))
}

/// `x *= s` (an adapter's `[n, r]` intermediates: small, so no pool).
fn scale_by(x: &mut [f32], s: f32) {
    if s != 1.0 {
        x.iter_mut().for_each(|v| *v *= s);
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl LoraSet {
    /// Adapters on every block linear (or column slice of one) whose module `cfg.targets` names,
    /// `A` drawn as PEFT does (Kaiming-uniform, bound 1/√in) and `B` zero; with `score`, a
    /// trainable copy of the model's score head (`score_init`).
    pub fn new(
        model_cfg: &ModelConfig,
        layout: &ParamLayout,
        cfg: &LoraConfig,
        score_init: Option<&[f32]>,
        seed: u64,
    ) -> Result<Self> {
        cfg.validate()?;
        let r = cfg.rank;
        let mut adapters = Vec::new();
        let mut tensors = Vec::new();
        let mut offset = 0;
        let mut used = vec![false; cfg.targets.len()];
        let mut add = |tensors: &mut Vec<TensorInfo>, name: String, shape: Vec<usize>, role| {
            let len: usize = shape.iter().product();
            tensors.push(TensorInfo {
                name,
                shape,
                offset,
                len,
                decay: role == Role::Matrix,
                role,
                hf: Vec::new(),
                block_matrix: false,
            });
            offset += len;
            offset - len..offset
        };
        for (l, block) in layout.layers.iter().enumerate() {
            for site in Site::ALL {
                let lin = site.linear(block);
                let t = layout
                    .tensors
                    .iter()
                    .find(|t| t.offset == lin.w.start && t.block_matrix)
                    .expect("every block linear is a tensor");
                let mut col = 0;
                for part in &t.hf {
                    let module = part.name.trim_end_matches(".weight").to_string();
                    let cols = col..col + part.cols;
                    col += part.cols;
                    let mut hit = false;
                    for (u, target) in used.iter_mut().zip(&cfg.targets) {
                        if matches(&module, target) {
                            *u = true;
                            hit = true;
                        }
                    }
                    if !hit {
                        continue;
                    }
                    let p = format!("{PEFT_PREFIX}{module}");
                    let a = add(
                        &mut tensors,
                        format!("{p}.lora_A.weight"),
                        vec![r, lin.i],
                        Role::Matrix,
                    );
                    let b = add(
                        &mut tensors,
                        format!("{p}.lora_B.weight"),
                        vec![cols.len(), r],
                        Role::Matrix,
                    );
                    adapters.push(Adapter {
                        module,
                        layer: l,
                        site,
                        cols,
                        i: lin.i,
                        a,
                        b,
                    });
                }
            }
        }
        if let Some((t, _)) = cfg.targets.iter().zip(&used).find(|(_, u)| !**u) {
            bail!(
                "LoRA target {t:?} names no linear layer of this {:?} model (its modules: {}, or {ALL_LINEAR})",
                model_cfg.family,
                module_names(model_cfg.family).join(", ")
            );
        }
        let score = if model_cfg.score_head {
            Some(add(
                &mut tensors,
                format!("{PEFT_PREFIX}score.weight"),
                vec![1, model_cfg.n_embd],
                Role::Score,
            ))
        } else {
            None
        };
        let mut params = vec![0.0f32; offset];
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for a in &adapters {
            let bound = 1.0 / (a.i as f32).sqrt();
            for x in &mut params[a.a.clone()] {
                *x = rng.gen_range(-bound..bound);
            }
        }
        if let (Some(s), Some(init)) = (&score, score_init) {
            params[s.clone()].copy_from_slice(init);
        }
        Ok(LoraSet {
            cfg: cfg.clone(),
            adapters,
            tensors,
            grads: vec![0.0; params.len()],
            params,
            score,
            enabled: true,
            training: false,
            dropout_seed: splitmix(seed ^ 0x10ba),
            round: AtomicU64::new(0),
            base_model: None,
        })
    }

    pub fn scale(&self) -> f32 {
        self.cfg.scale()
    }

    /// Trainable parameters (adapters and a saved score head).
    pub fn num_params(&self) -> usize {
        self.params.len()
    }

    /// The dropout round the next training forward takes (saved for exact resume).
    pub fn round(&self) -> u64 {
        self.round.load(Ordering::Relaxed)
    }

    pub fn set_round(&self, r: u64) {
        self.round.store(r, Ordering::Relaxed);
    }

    /// The round a forward uses: a fresh one while training with dropout, else 0 (no dropout).
    pub(crate) fn next_round(&self) -> Option<u64> {
        (self.training && self.cfg.dropout > 0.0)
            .then(|| self.round.fetch_add(1, Ordering::Relaxed))
    }

    fn on(&self, layer: usize, site: Site) -> impl Iterator<Item = (usize, &Adapter)> {
        self.adapters
            .iter()
            .enumerate()
            .filter(move |(_, a)| a.layer == layer && a.site == site)
    }

    /// `x` with this adapter's dropout mask applied (scaled by 1/(1-p)), or `None` without dropout.
    fn dropped(&self, round: Option<u64>, idx: usize, x: &[f32]) -> Option<Vec<f32>> {
        let round = round?;
        let p = self.cfg.dropout;
        let keep = 1.0 / (1.0 - p);
        let threshold = (p as f64 * u64::MAX as f64) as u64;
        let base = splitmix(self.dropout_seed ^ splitmix(round ^ splitmix(idx as u64)));
        Some(
            x.iter()
                .enumerate()
                .map(|(e, &v)| {
                    if splitmix(base ^ e as u64) >= threshold {
                        v * keep
                    } else {
                        0.0
                    }
                })
                .collect(),
        )
    }

    /// Adds every adapter of (`layer`, `site`) into `out` `[n, width]`: `out[:, cols] += scale·(x·Aᵀ)·Bᵀ`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        layer: usize,
        site: Site,
        round: Option<u64>,
        out: &mut [f32],
        x: &[f32],
        n: usize,
        width: usize,
    ) {
        if !self.enabled {
            return;
        }
        let (r, scale) = (self.cfg.rank, self.scale());
        for (idx, a) in self.on(layer, site) {
            let xd = self.dropped(round, idx, &x[..n * a.i]);
            let x = xd.as_deref().unwrap_or(x);
            let o = a.o();
            // u = scale·(x·Aᵀ) [n, r]; then out[:, cols] += u·Bᵀ in place (no [n, o] temporary).
            let mut u = vec![0.0f32; n * r];
            k::matmul(
                &mut u,
                x,
                &self.params[a.a.clone()],
                n,
                a.i,
                r,
                false,
                true,
                false,
            );
            scale_by(&mut u, scale);
            let b = Strided::rows(&self.params[a.b.clone()], r).t();
            let out = &mut out[a.cols.start..];
            k::matmul_strided(out, width, Strided::rows(&u, r), b, (n, r, o), true);
        }
    }

    /// Backward of [`Self::forward`] given d(out) `[n, width]`: accumulates the A and B gradients and
    /// adds the adapters' share of d(x) into `dx` `[n, i]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &mut self,
        layer: usize,
        site: Site,
        round: Option<u64>,
        dx: &mut [f32],
        dout: &[f32],
        x: &[f32],
        n: usize,
        width: usize,
    ) {
        if !self.enabled {
            return;
        }
        let (r, scale) = (self.cfg.rank, self.scale());
        let idxs: Vec<usize> = self.on(layer, site).map(|(i, _)| i).collect();
        for idx in idxs {
            let a = self.adapters[idx].clone();
            let (i, o) = (a.i, a.o());
            let xd = self.dropped(round, idx, &x[..n * i]);
            let xin = xd.as_deref().unwrap_or(x);
            // d(out)[:, cols] read in place, [n, o] at the row stride of `out`.
            let dy = Strided {
                data: &dout[a.cols.start..],
                rs: width,
                cs: 1,
            };
            // u = scale·(x·Aᵀ) [n, r], as the forward had it.
            let mut u = vec![0.0f32; n * r];
            k::matmul(
                &mut u,
                xin,
                &self.params[a.a.clone()],
                n,
                i,
                r,
                false,
                true,
                false,
            );
            scale_by(&mut u, scale);
            // dB [o, r] += dyᵀ·u; du [n, r] = scale·(dy·B); dA [r, i] += duᵀ·x.
            let db = &mut self.grads[a.b.clone()];
            k::matmul_strided(db, r, dy.t(), Strided::rows(&u, r), (o, n, r), true);
            let mut du = vec![0.0f32; n * r];
            let b = Strided::rows(&self.params[a.b.clone()], r);
            k::matmul_strided(&mut du, r, dy, b, (n, o, r), false);
            scale_by(&mut du, scale);
            let da = &mut self.grads[a.a.clone()];
            k::matmul(da, &du, xin, r, n, i, true, false, true);
            // dx += (du·A) ⊙ mask/(1-p): the mask's derivative is the same mask.
            let w_a = &self.params[a.a.clone()];
            match xd {
                None => k::matmul(dx, &du, w_a, n, r, i, false, false, true),
                Some(_) => {
                    let mut dxd = vec![0.0f32; n * i];
                    k::matmul(&mut dxd, &du, w_a, n, r, i, false, false, false);
                    let masked = self.dropped(round, idx, &dxd).expect("dropout is on");
                    k::add_inplace(&mut dx[..n * i], &masked);
                }
            }
        }
    }

    /// The merged weight delta of adapter `a` in Kiln's `[i, o]` layout: `scale · Aᵀ·Bᵀ`.
    pub fn delta(&self, a: &Adapter) -> Vec<f32> {
        let (r, o) = (self.cfg.rank, a.o());
        let mut d = vec![0.0f32; a.i * o];
        k::matmul(
            &mut d,
            &self.params[a.a.clone()],
            &self.params[a.b.clone()],
            a.i,
            r,
            o,
            true,
            true,
            false,
        );
        k::scale(&mut d, self.scale());
        d
    }

    /// PEFT's `adapter_config.json` for this set on a model of `model_cfg`, whose base
    /// `base_model_name_or_path` names.
    pub fn peft_config(&self, model_cfg: &ModelConfig, base: &str) -> serde_json::Value {
        let mut targets: Vec<String> = Vec::new();
        for a in &self.adapters {
            let short = a.module.rsplit('.').next().unwrap_or(&a.module).to_string();
            if !targets.contains(&short) {
                targets.push(short);
            }
        }
        let task = if model_cfg.score_head {
            "SEQ_CLS"
        } else {
            "CAUSAL_LM"
        };
        let modules_to_save = self.score.as_ref().map(|_| vec!["score"]);
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": task,
            "base_model_name_or_path": base,
            "r": self.cfg.rank,
            "lora_alpha": self.cfg.alpha,
            "lora_dropout": self.cfg.dropout,
            "target_modules": targets,
            "use_rslora": self.cfg.rslora,
            // GPT-2's Conv1D stores weights [in, out]: PEFT transposes its merged delta.
            "fan_in_fan_out": model_cfg.family == Family::Gpt2,
            "bias": "none",
            "modules_to_save": modules_to_save,
            "init_lora_weights": true,
            "inference_mode": true,
            "use_dora": false,
            "rank_pattern": {},
            "alpha_pattern": {},
            "layers_to_transform": null,
            "layers_pattern": null,
            "revision": null,
        })
    }

    /// The adapter file's tensors (name, shape, values).
    pub fn peft_tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        self.tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone(), &self.params[t.range()]))
            .collect()
    }

    /// Reads a PEFT adapter directory for a model of `model_cfg` / `layout`.
    pub fn load_peft(dir: &Path, model_cfg: &ModelConfig, layout: &ParamLayout) -> Result<Self> {
        let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
        let (cfg, base) = read_peft_config(&cfg_path)?;
        let mut set = LoraSet::new(model_cfg, layout, &cfg, None, 0)
            .with_context(|| format!("{}", cfg_path.display()))?;
        set.base_model = base;
        let bytes = crate::checkpoint::read_checked(dir, ADAPTER_FILE)?;
        let what = dir.join(ADAPTER_FILE).display().to_string();
        let tensors = crate::checkpoint::bytes_to_tensors(&bytes, &what)?;
        set.fill_from(&tensors, &what)?;
        Ok(set)
    }

    /// Sets every trainable tensor from an adapter file's tensors (all must be there, in shape;
    /// none may be left over).
    pub fn fill_from<S: crate::checkpoint::TensorSource>(
        &mut self,
        tensors: &S,
        what: &str,
    ) -> Result<()> {
        for t in &self.tensors {
            let (shape, data) = tensors.tensor(&t.name).with_context(|| {
                format!(
                    "{what}: tensor {} missing (adapter of another model or targets?)",
                    t.name
                )
            })?;
            if shape != t.shape.as_slice() {
                bail!(
                    "{what}: tensor {} has shape {shape:?}, expected {:?} (adapter of another model shape or rank?)",
                    t.name,
                    t.shape
                );
            }
            data.copy_to(&mut self.params[t.range()]);
        }
        if let Some(extra) = tensors
            .names()
            .into_iter()
            .find(|n| !self.tensors.iter().any(|t| &t.name == n))
        {
            bail!("{what}: tensor {extra} belongs to no adapter of this model (a score head on a language model, or other targets?)");
        }
        Ok(())
    }
}

/// The LoRA settings of a PEFT `adapter_config.json`, and its `base_model_name_or_path`.
pub fn read_peft_config(path: &Path) -> Result<(LoraConfig, Option<String>)> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let what = path.display();
    let field = |name: &str| v.get(name).filter(|x| !x.is_null());
    match field("peft_type").and_then(|x| x.as_str()) {
        Some("LORA") => {}
        other => bail!("{what}: peft_type is {other:?}; Kiln reads LoRA adapters (\"LORA\")"),
    }
    let rank = field("r")
        .and_then(|x| x.as_u64())
        .with_context(|| format!("{what}: field \"r\" (the rank) missing or not an integer"))?
        as usize;
    let alpha = field("lora_alpha")
        .and_then(|x| x.as_f64())
        .with_context(|| format!("{what}: field \"lora_alpha\" missing or not a number"))?
        as f32;
    let dropout = field("lora_dropout")
        .and_then(|x| x.as_f64())
        .unwrap_or(0.0) as f32;
    let rslora = field("use_rslora")
        .and_then(|x| x.as_bool())
        .unwrap_or(false);
    let targets = match field("target_modules") {
        Some(serde_json::Value::String(s)) if s == ALL_LINEAR => vec![ALL_LINEAR.to_string()],
        Some(serde_json::Value::String(s)) => {
            bail!("{what}: target_modules is the pattern {s:?}; Kiln reads a list of module names or \"all-linear\"")
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("{what}: target_modules holds a non-string {x}"))
            })
            .collect::<Result<_>>()?,
        _ => bail!("{what}: field \"target_modules\" missing"),
    };
    for (name, off) in [("use_dora", false), ("lora_bias", false)] {
        if field(name).and_then(|x| x.as_bool()).unwrap_or(off) {
            bail!("{what}: {name} is set; Kiln reads plain LoRA adapters");
        }
    }
    if field("bias")
        .and_then(|x| x.as_str())
        .is_some_and(|b| b != "none")
    {
        bail!("{what}: bias is not \"none\"; Kiln's adapters train no biases");
    }
    for name in ["rank_pattern", "alpha_pattern"] {
        if field(name)
            .and_then(|x| x.as_object())
            .is_some_and(|o| !o.is_empty())
        {
            bail!("{what}: {name} is set; Kiln reads adapters of one rank and alpha");
        }
    }
    if field("layers_to_transform").is_some() {
        bail!("{what}: layers_to_transform is set; Kiln adapts every layer");
    }
    let kiln = path.with_file_name(KILN_LORA_FILE);
    let base_weights = match std::fs::read(&kiln) {
        Ok(bytes) => {
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: not valid JSON", kiln.display()))?;
            v.get("base_weights")
                .and_then(|x| x.as_str())
                .map(str::parse)
                .transpose()
                .with_context(|| format!("{}: base_weights", kiln.display()))?
                .unwrap_or_default()
        }
        Err(_) => WeightFormat::F32,
    };
    let cfg = LoraConfig {
        rank,
        alpha,
        dropout,
        targets,
        rslora,
        base_weights,
    };
    cfg.validate().with_context(|| format!("{what}"))?;
    let base = field("base_model_name_or_path")
        .and_then(|x| x.as_str())
        .map(str::to_string);
    Ok((cfg, base))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Arch;

    /// One adapter on the `v` columns of a fused q|k|v linear: d/dA, d/dB and d/dx of
    /// L = Σ w ⊙ out against central differences in f64 terms, with and without dropout.
    #[test]
    fn lora_linear_matches_finite_differences() {
        let mcfg = ModelConfig {
            vocab_size: 11,
            n_ctx: 8,
            n_layer: 1,
            n_head: 4,
            n_embd: 16,
            arch: Arch::Decoder,
            family: Family::Llama,
            n_kv_head: 2,
            ffn_hidden: 12,
            ..ModelConfig::default()
        };
        let layout = ParamLayout::new(&mcfg);
        for dropout in [0.0, 0.4] {
            let cfg = LoraConfig {
                rank: 3,
                alpha: 5.0,
                dropout,
                targets: vec!["v_proj".into()],
                ..LoraConfig::default()
            };
            let mut set = LoraSet::new(&mcfg, &layout, &cfg, None, 1).unwrap();
            set.training = true;
            assert_eq!(set.adapters.len(), 1);
            assert_eq!(set.adapters[0].cols, 24..32);
            let mut rng = ChaCha8Rng::seed_from_u64(2);
            for x in set.params.iter_mut() {
                *x = rng.gen_range(-0.5..0.5);
            }
            let (n, i, width) = (5, 16, layout.layers[0].qkv.o);
            let x: Vec<f32> = (0..n * i).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..n * width).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let round = set.next_round();
            assert_eq!(round.is_some(), dropout > 0.0);
            let loss = |set: &LoraSet, x: &[f32]| -> f64 {
                let mut out = vec![0.0f32; n * width];
                set.forward(0, Site::Qkv, round, &mut out, x, n, width);
                out.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum()
            };
            let mut dx = vec![0.0f32; n * i];
            set.backward(0, Site::Qkv, round, &mut dx, &w, &x, n, width);
            let eps = 1e-2f32;
            // The loss is linear in A, in B and in x separately, so differences are exact up to
            // f32 rounding.
            for j in 0..set.params.len() {
                let orig = set.params[j];
                set.params[j] = orig + eps;
                let lp = loss(&set, &x);
                set.params[j] = orig - eps;
                let lm = loss(&set, &x);
                set.params[j] = orig;
                let num = (lp - lm) / (2.0 * eps as f64);
                assert!(
                    (num - set.grads[j] as f64).abs() < 1e-3,
                    "param {j}: {num} vs {}",
                    set.grads[j]
                );
            }
            let mut xp = x.clone();
            for j in 0..x.len() {
                xp[j] = x[j] + eps;
                let lp = loss(&set, &xp);
                xp[j] = x[j] - eps;
                let lm = loss(&set, &xp);
                xp[j] = x[j];
                let num = (lp - lm) / (2.0 * eps as f64);
                assert!(
                    (num - dx[j] as f64).abs() < 1e-3,
                    "x {j}: {num} vs {}",
                    dx[j]
                );
            }
            assert!(dx.iter().any(|v| *v != 0.0));
            // Dropout zeroes some inputs' contributions (a dropped x has zero gradient).
            let zeros = dx.iter().filter(|v| **v == 0.0).count();
            assert_eq!(
                zeros > 0,
                dropout > 0.0,
                "dropout {dropout}: {zeros} zero input gradients"
            );
        }
    }
}
