//! LoRA on the command line: the `--lora-*` flags every training stage shares, `--adapter` on the
//! commands that use a model, and `kiln lora merge`.

use crate::bundle::{load_bundle, Bundle, KilnMeta, META_FILE};
use crate::config::Overrides;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kiln_model::checkpoint::{attach_peft, model_files, read_checked, write_checkpoint_dir};
use kiln_model::{Model, ModelConfig};
use std::path::{Path, PathBuf};

/// LoRA flags of `sft`, `rm`, `dpo`, `grpo` and `ppo` (the stage config's `[lora]` table and
/// `adapter`).
#[derive(Args, Clone, Debug, Default)]
pub struct LoraFlags {
    /// Train rank-r LoRA adapters on a frozen base instead of every weight (`[lora] rank`).
    #[arg(long)]
    pub lora_rank: Option<i64>,
    /// LoRA alpha: the adapters are scaled by alpha / rank (default 16).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the adapters' input during training (default 0).
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Modules to adapt, comma-separated: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
    /// (Llama family), c_attn,c_proj,c_fc (GPT-2), or all-linear (the default).
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Vec<String>,
    /// rsLoRA: scale by alpha / √rank.
    #[arg(long)]
    pub lora_rslora: bool,
    /// How the frozen base is held: f32 (default), bf16 or int8 (QLoRA-style; adapters and
    /// activations stay f32).
    #[arg(long)]
    pub base_weights: Option<String>,
    /// Continue training a PEFT adapter directory (its adapter_config.json gives rank, alpha and
    /// targets) on this stage's model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

impl LoraFlags {
    pub fn apply(&self, o: &mut Overrides) -> Result<()> {
        let rest = self.lora_alpha.is_some()
            || self.lora_dropout.is_some()
            || !self.lora_targets.is_empty()
            || self.lora_rslora
            || self.base_weights.is_some();
        if rest && self.lora_rank.is_none() {
            bail!("--lora-alpha, --lora-dropout, --lora-targets, --lora-rslora and --base-weights need --lora-rank");
        }
        o.opt("lora.rank", self.lora_rank);
        o.opt("lora.alpha", self.lora_alpha);
        o.opt("lora.dropout", self.lora_dropout);
        if !self.lora_targets.is_empty() {
            o.set(
                "lora.targets",
                toml::Value::Array(
                    self.lora_targets
                        .iter()
                        .map(|t| toml::Value::String(t.trim().to_string()))
                        .collect(),
                ),
            );
        }
        if self.lora_rslora {
            o.set("lora.rslora", true);
        }
        o.opt("lora.base_weights", self.base_weights.clone());
        o.path("adapter", &self.adapter);
        Ok(())
    }
}

/// `model` with the PEFT adapter in `adapter` merged in (for inference: the adapters' results at
/// the speed of the plain model).
pub fn merge_adapter(model: Model, adapter: Option<&Path>) -> Result<Model> {
    let Some(dir) = adapter else {
        return Ok(model);
    };
    let own = dir.join(kiln_model::checkpoint::CONFIG_FILE);
    // A LoRA reward model's adapters come with the score head its base lacks.
    let mut model = if own.exists() {
        let score = ModelConfig::load(&own)?.score_head;
        model.with_score_head(score)
    } else {
        model
    };
    attach_peft(&mut model, dir)
        .with_context(|| format!("loading the adapter {}", dir.display()))?;
    model.merge_lora();
    Ok(model)
}

/// [`load_bundle`] with a PEFT adapter merged in.
pub fn load_bundle_adapted(model: &Path, adapter: Option<&Path>) -> Result<Bundle> {
    let mut b = load_bundle(model)?;
    b.model = merge_adapter(b.model, adapter)?;
    Ok(b)
}

#[derive(Subcommand)]
pub enum LoraCmd {
    /// Fold a PEFT adapter into its base and write the full model (weights, config, tokenizer).
    Merge(MergeArgs),
}

#[derive(Args)]
pub struct MergeArgs {
    /// The base model (checkpoint or run directory, Kiln's or Hugging Face's).
    #[arg(long)]
    model: PathBuf,
    /// The PEFT adapter directory (adapter_model.safetensors + adapter_config.json).
    #[arg(long)]
    adapter: PathBuf,
    /// Where to write the merged model.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(c: LoraCmd) -> Result<()> {
    match c {
        LoraCmd::Merge(a) => {
            if a.out.exists() {
                bail!("{} already exists: choose another --out", a.out.display());
            }
            let b = load_bundle_adapted(&a.model, Some(&a.adapter))?;
            // The adapter's own kiln.json (a LoRA stage's: its stage, reward statistics) when it
            // has one, else the base's.
            let meta: KilnMeta = if a.adapter.join(META_FILE).exists() {
                serde_json::from_slice(&read_checked(&a.adapter, META_FILE)?)
                    .with_context(|| format!("{}/{META_FILE}", a.adapter.display()))?
            } else {
                b.meta.clone()
            };
            let mut files = model_files(&b.model)?;
            files.extend(b.stage_files(&meta)?);
            write_checkpoint_dir(&a.out, &files)?;
            println!(
                "merged {} into {}: {}",
                a.adapter.display(),
                b.dir.display(),
                a.out.display()
            );
            Ok(())
        }
    }
}
