//! Memory estimates: refuse a configuration that cannot fit before allocating it, with a clear
//! message, instead of letting the kernel's OOM killer end the run.

use crate::config::ModelConfig;
use anyhow::{bail, Result};
use kiln_kernels::Precision;

/// Environment variable that overrides the memory limit (MiB), e.g. so tests can trigger the refusal.
pub const LIMIT_ENV: &str = "KILN_MEMORY_LIMIT_MB";

/// Bytes of the activation and gradient-scratch buffers [`crate::Activations::new`] allocates for a
/// batch of `batch` rows of `seq` tokens (the same table of buffer lengths, so never hand-counted).
pub fn activation_bytes(cfg: &ModelConfig, batch: usize, seq: usize, lm_head: bool) -> usize {
    crate::Activations::bytes_for(cfg, batch, seq, lm_head)
}

/// The number of parameters of `cfg` (as [`crate::ParamLayout`] lays them out), or `None` when it
/// does not fit a `usize`: a check to make before building the layout of a config read from a file
/// (which allocates and loops per layer). Derived from the layout of a one-layer model of the same
/// widths: its blocks are all alike.
pub fn checked_num_params(cfg: &ModelConfig) -> Option<usize> {
    // Widths that overflow the layout's own arithmetic are refused before it runs.
    let c = cfg.n_embd;
    c.checked_mul(c)?.checked_mul(16)?;
    c.checked_mul(cfg.vocab_size.max(cfg.n_ctx))?
        .checked_mul(4)?;
    c.checked_mul(cfg.ffn())?.checked_mul(4)?;
    c.checked_mul(cfg.qkv_width())?.checked_mul(2)?;
    let one = ModelConfig {
        n_layer: 1,
        ..cfg.clone()
    };
    let lay = crate::params::ParamLayout::new(&one);
    let block: usize = lay
        .tensors
        .iter()
        .filter(|t| t.name.contains(".0."))
        .map(|t| t.len)
        .sum();
    let rest = lay.total - block;
    block.checked_mul(cfg.n_layer)?.checked_add(rest)
}

/// Bytes one training process needs for a model: parameters, gradients, the two AdamW moments
/// (4 copies of the parameters), the activations of one micro-batch, and the matmuls' operand
/// copies in `precision` ([`matmul_scratch_bytes`]).
pub fn training_bytes(
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    lm_head: bool,
    precision: Precision,
) -> usize {
    let params = crate::params::ParamLayout::new(cfg).total;
    params
        .saturating_mul(4 * 4)
        .saturating_add(activation_bytes(cfg, batch, seq, lm_head))
        .saturating_add(matmul_scratch_bytes(
            cfg,
            batch.saturating_mul(seq),
            lm_head,
            precision,
        ))
}

/// Bytes the matmuls keep beside the activations when training in `precision` (as this CPU runs
/// it, [`Precision::for_this_cpu`]) with `rows` tokens a micro-batch: none in f32 (`gemm` packs
/// cache-sized blocks); in bf16 both operands of the largest product, packed as bf16 on bf16
/// hardware (kept between calls) or rounded to bf16 values in f32 copies on the portable path.
/// The largest product is the LM head's backward (`rows x vocab` logits gradient against the
/// `vocab x c` head) when there is one, else the widest block matrix against its activations.
pub fn matmul_scratch_bytes(
    cfg: &ModelConfig,
    rows: usize,
    lm_head: bool,
    precision: Precision,
) -> usize {
    let per_value = match precision.for_this_cpu().0 {
        Precision::F32 => return 0,
        Precision::Bf16 if kiln_kernels::bf16::hardware().is_some() => 2,
        Precision::Bf16 => 4,
    };
    let lay = crate::params::ParamLayout::new(&ModelConfig {
        n_layer: 1,
        ..cfg.clone()
    });
    // (activation width, weight elements) of each product's operands.
    let mut largest = lay
        .layers
        .iter()
        .flat_map(|b| [&b.qkv, &b.o, &b.up, &b.down])
        .map(|l| rows.saturating_mul(l.i.max(l.o)).saturating_add(l.i * l.o))
        .max()
        .unwrap_or(0);
    if lm_head {
        let head = cfg.vocab_size.saturating_mul(cfg.n_embd);
        largest = largest.max(rows.saturating_mul(cfg.vocab_size).saturating_add(head));
    }
    largest.saturating_mul(per_value)
}

/// Bytes of one training process whose base may be frozen under LoRA adapters: without `lora`,
/// [`training_bytes`]; with it, the dense tensors in f32, the blocks' matrices in the base's format
/// (f32, bf16 or int8 with a scale per column), no base gradient or moment, the adapters (and a
/// saved score head) ×4 (values, gradients, two moments), a dequantization buffer of the widest
/// matrix for a packed base, and the activations.
pub fn training_bytes_with(
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    lm_head: bool,
    lora: Option<&crate::lora::LoraConfig>,
    precision: Precision,
) -> usize {
    let Some(lc) = lora else {
        return training_bytes(cfg, batch, seq, lm_head, precision);
    };
    let lay = crate::params::ParamLayout::new(cfg);
    let score = lay.score.as_ref().map(|r| vec![0.0f32; r.len()]);
    let trainable =
        crate::lora::LoraSet::new(cfg, &lay, lc, score.as_deref(), 0).map_or(0, |s| s.num_params());
    let matrices = lay.total - lay.dense;
    let (cols, widest): (usize, usize) = lay
        .layers
        .iter()
        .flat_map(|b| [&b.qkv, &b.o, &b.up, &b.down])
        .fold((0, 0), |(c, w), l| (c + l.o, w.max(l.i * l.o)));
    let base = match lc.base_weights {
        crate::WeightFormat::F32 => matrices.saturating_mul(4),
        // Weights, a scale and a bias copy per column, and one f32 matrix being dequantized.
        crate::WeightFormat::Bf16 => matrices * 2 + cols * 8 + widest * 4,
        crate::WeightFormat::Int8 => matrices + cols * 8 + widest * 4,
    };
    (lay.dense.saturating_mul(4))
        .saturating_add(base)
        .saturating_add(trainable.saturating_mul(16))
        .saturating_add(activation_bytes(cfg, batch, seq, lm_head))
        .saturating_add(matmul_scratch_bytes(
            cfg,
            batch.saturating_mul(seq),
            lm_head,
            precision,
        ))
}

/// Parses `MemAvailable` (kB) out of the text of `/proc/meminfo`, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<usize> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        let kb: usize = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        kb.checked_mul(1024)
    })
}

/// The memory this process may use, in bytes: `KILN_MEMORY_LIMIT_MB` when set, else `MemAvailable`
/// from `/proc/meminfo`; `None` when neither can be read.
pub fn memory_limit() -> Result<Option<(usize, &'static str)>> {
    if let Ok(v) = std::env::var(LIMIT_ENV) {
        let mb: usize = match v.trim().parse() {
            Ok(mb) => mb,
            Err(_) => bail!("{LIMIT_ENV}={v:?}: expected a whole number of MiB"),
        };
        return Ok(Some((mb.saturating_mul(1 << 20), LIMIT_ENV)));
    }
    Ok(std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_mem_available(&t))
        .map(|b| (b, "available memory (MemAvailable in /proc/meminfo)")))
}

fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

/// Fails with a clear message when `needed` bytes (for `what`, e.g. "pretraining a 12-layer model
/// with batch 16 × 128") exceed the memory limit; does nothing when the limit cannot be read.
pub fn check_memory(needed: usize, what: &str) -> Result<()> {
    let Some((limit, source)) = memory_limit()? else {
        return Ok(());
    };
    if needed > limit {
        bail!(
            "{what} needs about {} of memory, but only {} is available ({source}); use a smaller \
             batch size, sequence length or model",
            human(needed),
            human(limit)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Activations, Arch, ModelConfig};

    fn cfg(score_head: bool) -> ModelConfig {
        ModelConfig {
            vocab_size: 300,
            n_ctx: 16,
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            arch: Arch::Decoder,
            score_head,
            ..ModelConfig::default()
        }
    }

    /// A Llama-family model with grouped-query attention and an untied head.
    fn llama(score_head: bool) -> ModelConfig {
        ModelConfig {
            family: crate::config::Family::Llama,
            n_head: 4,
            n_kv_head: 2,
            ffn_hidden: 24,
            tie_embeddings: false,
            ..cfg(score_head)
        }
    }

    #[test]
    fn activation_estimate_matches_the_buffers() {
        for lm in [true, false] {
            for (b, t) in [(1, 1), (3, 16), (4, 7)] {
                for c in [cfg(!lm), llama(!lm)] {
                    let mut a = Activations::new(&c, b, t, lm);
                    assert_eq!(activation_bytes(&c, b, t, lm), a.bytes(), "{c:?}");
                    // A smaller shape in the same buffers holds what a fresh one would.
                    a.set_shape(&c, 1, t.min(3));
                    assert_eq!(activation_bytes(&c, 1, t.min(3), lm), a.bytes());
                }
            }
        }
    }

    #[test]
    fn training_bytes_counts_four_copies_of_the_parameters() {
        let c = cfg(false);
        let p = c.num_params();
        assert_eq!(
            training_bytes(&c, 2, 8, true, Precision::F32),
            16 * p + activation_bytes(&c, 2, 8, true)
        );
        // bf16 adds the largest product's operand copies: here the LM head's backward.
        let head = 16 * c.vocab_size + c.vocab_size * c.n_embd;
        let per_value = match (
            Precision::Bf16.for_this_cpu().0,
            kiln_kernels::bf16::hardware(),
        ) {
            (Precision::F32, _) => 0,
            (_, Some(_)) => 2,
            (_, None) => 4,
        };
        assert!(
            head > 16 * 4 * c.n_embd + 4 * c.n_embd * c.n_embd,
            "the head is the largest"
        );
        assert_eq!(
            training_bytes(&c, 2, 8, true, Precision::Bf16),
            16 * p + activation_bytes(&c, 2, 8, true) + per_value * head
        );
        // Huge shapes saturate instead of overflowing.
        let big = ModelConfig {
            n_embd: usize::MAX / 2,
            n_head: 1,
            ..c
        };
        assert_eq!(activation_bytes(&big, usize::MAX, 2, true), usize::MAX);
    }

    #[test]
    fn the_env_limit_refuses_what_cannot_fit() {
        // The only test in this crate that sets the variable.
        std::env::set_var(LIMIT_ENV, "1");
        let err = check_memory(2 << 20, "pretraining a test model")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pretraining a test model") && err.contains(LIMIT_ENV),
            "{err}"
        );
        check_memory(1 << 19, "a small thing").unwrap();
        std::env::set_var(LIMIT_ENV, "lots");
        assert!(check_memory(1, "x").is_err());
        std::env::remove_var(LIMIT_ENV);
    }

    #[test]
    fn checked_param_count_matches_the_layout() {
        for score in [false, true] {
            for c in [cfg(score), llama(score)] {
                assert_eq!(checked_num_params(&c), Some(c.num_params()));
            }
        }
        let huge = ModelConfig {
            n_layer: usize::MAX / 4,
            ..cfg(false)
        };
        assert_eq!(checked_num_params(&huge), None);
    }

    #[test]
    fn meminfo_parsing() {
        let t = "MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(parse_mem_available(t), Some(8_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots\n"), None);
    }
}
