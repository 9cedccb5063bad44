//! How a stage puts LoRA adapters on the model it trains: fresh ones (`[lora]`, `--lora-*`), or a
//! PEFT adapter to continue (`--adapter DIR`); the same for every stage.

use anyhow::{bail, Context, Result};
use kiln_model::lora::LoraConfig;
use kiln_model::Model;
use std::path::Path;

/// Freezes `model`'s base under adapters: the PEFT adapter in `adapter` (whose settings are its
/// own), or fresh ones of `lora`; nothing without either. `base_dir` is the model's directory,
/// written into the checkpoints' `adapter_config.json` as `base_model_name_or_path`. Returns
/// whether adapters were attached.
pub fn attach(
    model: &mut Model,
    lora: Option<&LoraConfig>,
    adapter: Option<&Path>,
    base_dir: &Path,
    seed: u64,
) -> Result<bool> {
    match (adapter, lora) {
        (Some(_), Some(_)) => bail!(
            "--adapter continues a PEFT adapter with its own settings (adapter_config.json): drop the --lora-* settings"
        ),
        (Some(dir), None) => kiln_model::checkpoint::attach_peft(model, dir)
            .with_context(|| format!("loading the adapter {}", dir.display()))?,
        (None, Some(cfg)) => model.attach_lora(cfg, seed)?,
        (None, None) => return Ok(false),
    }
    let base = std::fs::canonicalize(base_dir).unwrap_or_else(|_| base_dir.to_path_buf());
    let set = model.lora.as_mut().expect("attached above");
    set.base_model = Some(base.display().to_string());
    eprintln!(
        "[lora] {} adapters, rank {}, alpha {}: {} trainable parameters of {} (base frozen in {})",
        set.adapters.len(),
        set.cfg.rank,
        set.cfg.alpha,
        set.num_params(),
        model.cfg.num_params(),
        set.cfg.base_weights
    );
    Ok(true)
}

/// The adapter settings a stage will train with: `lora`, or those of the adapter it continues (for
/// the memory estimate before anything is loaded).
pub fn settings(lora: Option<&LoraConfig>, adapter: Option<&Path>) -> Result<Option<LoraConfig>> {
    match adapter {
        Some(dir) => {
            let path = dir.join(kiln_model::lora::ADAPTER_CONFIG_FILE);
            Ok(Some(kiln_model::lora::read_peft_config(&path)?.0))
        }
        None => Ok(lora.cloned()),
    }
}
