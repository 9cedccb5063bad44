//! `kiln pipeline example`: a configuration as TOML with a one-line comment on every key, so the
//! printed file is the user's template and manual at once. The comments live in one table here; a
//! test fails when a key has none, so they cannot fall behind the configs.

use crate::spec::PipelineConfig;
use anyhow::Result;

/// The comment of `key` in the TOML table `table` (`""` at the top, `branch` for `[[branch]]`).
/// Keys that mean the same in every table are looked up by name alone.
fn comment(table: &str, key: &str) -> Option<&'static str> {
    let by_table = match (table, key) {
        ("", "out") => "run folder: every stage's output goes below it",
        ("", "seed") => "seed of the whole run (data order, initialisation, sampling); replaces each stage's own seed",
        ("", "prompts") => "prompts for the RL branches (PPO, GRPO): {\"prompt\", ...}, Alpaca or chat records; part is held out for evaluation",
        ("corpus", "input") => "pretraining text: .txt/.md files, folders, or JSONL with a text field",
        ("corpus", "field") => "the text field of JSONL corpus records",
        ("corpus", "vocab_size") => "BPE vocabulary size of the tokenizer trained on the corpus",
        ("corpus", "val_fraction") => "share of corpus documents held out for validation loss",
        ("eval", "prompts") => "held-out prompts every model answers (default: heldout_fraction of `prompts`)",
        ("eval", "heldout_fraction") => "share of `prompts` held out of RL training for evaluation",
        ("eval", "limit") => "at most this many held-out prompts (0: all)",
        ("eval", "max_new_tokens") => "longest answer in the evaluation (tokens)",
        ("eval", "rewards") => "reward sources scoring the answers: exact (the record's `answer`), cmd:PROGRAM, format",
        ("eval", "reward_weights") => "one weight per eval reward source (default 1 each)",
        ("pretrain", "objective") => "causal (GPT next-token) or mlm (BERT-style masked LM)",
        ("pretrain", "seq_len") => "tokens per training row (0: the model's context)",
        ("pretrain", "eval_batches") => "validation batches per evaluation",
        ("pretrain.model", "arch") => "model family: llama (RMSNorm, RoPE, SwiGLU, grouped-query attention) or gpt2",
        ("pretrain.model", "n_layer") => "transformer blocks",
        ("pretrain.model", "n_head") => "attention heads",
        ("pretrain.model", "n_embd") => "model width",
        ("pretrain.model", "n_ctx") => "context length in tokens: longer records are skipped (counted)",
        ("pretrain.model", "n_kv_head") => "key/value heads for grouped-query attention (0: as many as n_head)",
        ("pretrain.model", "ffn_hidden") => "SwiGLU hidden size (0: 8/3 of n_embd rounded up to 64)",
        ("pretrain.model", "rope_theta") => "RoPE base frequency",
        ("pretrain.model", "tie_embeddings") => "the output head shares the token embedding",
        ("sft", "data") => "instruction data: Alpaca, chat {\"messages\"} or ShareGPT records (JSON, JSONL, .gz, Parquet)",
        ("sft", "val_data") => "held-out SFT data (default: val_fraction of data)",
        ("sft", "val_fraction") => "share of data held out for validation when val_data is absent",
        ("sft", "seq_len") => "tokens per row (0: the model's context)",
        ("sft", "packing") => "pack several short examples per row (attention never crosses them)",
        ("sft", "skip_bad_records") => "skip malformed records (counted, first error shown) instead of stopping",
        ("sft", "template") => "chat template: Kiln's JSON or a Hugging Face .jinja file",
        ("rm", "data") => "preference data: rankings, pairs, HH-RLHF or Stack Exchange records",
        ("rm", "val_data") => "held-out preferences (default: val_fraction of data)",
        ("rm", "test_data") => "preferences evaluated once at the end (e.g. unseen topics)",
        ("rm", "val_fraction") => "share of data held out for validation when val_data is absent",
        ("rm", "seq_len") => "tokens per sequence (0: the model's context)",
        ("rm", "loss") => "pairwise (Bradley-Terry over every ranked pair) or listwise",
        ("rm", "margin") => "margin added inside the pairwise loss",
        ("rm", "center") => "λ of the penalty λ·r² that keeps rewards centred on 0",
        ("rm", "skip_bad_records") => "skip malformed records (counted, first error shown) instead of stopping",
        ("branch", "name") => "the branch's run folder under `out` and its label in the report",
        ("branch", "method") => "ppo (RM + PPO), dpo (DPO/IPO/hinge) or grpo (GRPO/RLOO, verifiable rewards)",
        ("branch", "prompts") => "this branch's prompts (default: the top-level `prompts`)",
        ("branch", "critic") => "PPO critic's starting model (default: the reward model)",
        ("branch", "ptx_data") => "pretraining shards for PPO-ptx (default: the pipeline's)",
        ("branch", "data") => "DPO preference data (default: rm.data and rm.val_data)",
        ("branch", "val_data") => "DPO held-out preferences",
        ("branch", "val_fraction") => "share of DPO data held out when val_data is absent",
        ("branch", "reference") => "DPO reference model (default: the SFT model)",
        ("branch", "seq_len") => "tokens per DPO sequence (0: the model's context)",
        ("branch", "loss") => "DPO loss: sigmoid (DPO), ipo or hinge (SLiC)",
        ("branch", "beta") => "DPO β: strength of the implicit KL to the reference",
        ("branch", "label_smoothing") => "conservative DPO's ε (sigmoid loss only)",
        ("branch", "sft_coef") => "RPO: weight of the NLL of chosen responses",
        ("branch", "packing") => "pack several sequences per row",
        ("branch", "kl_top_k") => "reference tokens kept per position for the validation KL (0: all)",
        ("branch", "kl_max_prompts") => "validation prompts the KL is measured on (0: all)",
        ("branch", "skip_bad_records") => "skip malformed records (DPO data, RL prompts; counted) instead of stopping",
        ("branch", "rewards") => "GRPO reward sources: judge, rm (the pipeline's reward model), rm:DIR, exact[:FIELD], format, cmd:PROGRAM",
        ("branch", "reward_weights") => "one weight per reward source (default 1 each)",
        ("branch", "reward_timeout_s") => "seconds a reward program may take per answer",
        ("branch.grpo", "beta") => "KL coefficient to a frozen reference (0: none held, as DAPO)",
        ("branch.grpo", "lr") => "learning rate of the policy",
        _ => "",
    };
    if !by_table.is_empty() {
        return Some(by_table);
    }
    Some(match key {
        // The shared training loop ([*.train]).
        "lr" => "peak learning rate (AdamW)",
        "min_lr" => "learning rate at the end of the cosine decay",
        "beta1" => "AdamW β1 (first-moment decay)",
        "beta2" => "AdamW β2 (second-moment decay)",
        "warmup_steps" => "linear warm-up steps",
        "max_steps" => "optimizer steps",
        "batch_size" => "rows (or prompts) per step",
        "grad_accum" => "micro-batches accumulated per step",
        "weight_decay" => "AdamW weight decay (not on norms and biases)",
        "grad_clip" => "clip the gradient's global norm to this (0: off)",
        "eval_every" => "evaluate every this many steps/iterations",
        "ckpt_every" => "checkpoint every this many steps/iterations",
        "keep_last" => "checkpoints kept",
        "sample_every" => "print a sample every this many steps (0: never)",
        "precision" => "f32, or bf16 matmuls (f32 where the CPU lacks bf16)",
        "seed" => "replaced by the pipeline's seed",
        "non_finite" => "on a NaN/inf loss or gradient: skip the update, or stop",
        "max_non_finite" => "stop after this many skipped updates",
        "max_new_tokens" => "longest sampled response (tokens)",
        "temperature" => "sampling temperature of rollouts",
        "iterations" => "RL iterations (sample, score, update)",
        "minibatch" => "sequences per gradient step",
        "micro_batch" => {
            "sequences per forward/backward pass (0: the whole minibatch); bounds memory"
        }
        // PPO.
        "actor_lr" => "policy learning rate",
        "critic_lr" => "value model learning rate",
        "rollout_batch" => "prompts sampled per iteration",
        "ppo_epochs" => "passes over each rollout batch",
        "clip_eps" => "PPO ratio clip ε",
        "value_clip" => "value clip around the old values",
        "vf_coef" => "weight of the value loss",
        "entropy_coef" => "entropy bonus",
        "kl_coef" => "KL penalty coefficient to the SFT model (per token)",
        "kl_target" => "adaptive KL target (0: fixed kl_coef)",
        "kl_horizon" => "horizon of the adaptive KL controller",
        "gamma" => "discount",
        "lam" => "GAE λ",
        "whiten_advantages" => "normalise advantages per batch",
        "reward_clip" => "clip normalised rewards to ± this",
        "missing_end_penalty" => "reward of a response cut at the length limit",
        "freeze_actor_iters" => "iterations that train only the critic",
        "ptx_coef" => "weight of the pretraining loss mixed in (PPO-ptx; 0: off)",
        // GRPO.
        "prompts_per_iter" => "prompts per iteration",
        "group_size" => "samples per prompt (a group)",
        "inner_epochs" => "passes over each group batch (1: on-policy, ratio 1)",
        "advantage" => "group ((r−mean)/std), mean (Dr. GRPO) or rloo (leave-one-out)",
        "loss_agg" => "token (DAPO), sequence (GRPO) or constant (Dr. GRPO) averaging",
        "clip_low" => "ratio clip below 1",
        "clip_high" => "ratio clip above 1 (DAPO's clip-higher when larger)",
        "mask_truncated" => "no loss on responses cut at the length limit",
        "dynamic_sampling" => {
            "DAPO: drop groups with equal rewards and sample more prompts until the batch is full"
        }
        "max_sample_rounds" => "sampling rounds per iteration at most (dynamic sampling)",
        "sample_weights" => "weights rollouts sample with: f32, bf16 or int8",
        _ => return None,
    })
}

/// The configuration as TOML with a comment above every key.
pub fn commented_toml(cfg: &PipelineConfig) -> Result<String> {
    let text = cfg.to_toml()?;
    let mut out = String::from(
        "# A Kiln pipeline: corpus → tokenizer → pretraining → SFT → reward model → every [[branch]]\n\
         # from the SFT model → held-out evaluation → report.md. Name your data in the my_* paths;\n\
         # paths between stages are derived from `out`. Check it: kiln pipeline check FILE.toml\n\n",
    );
    let mut table = String::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix("[[").and_then(|h| h.strip_suffix("]]")) {
            table = h.to_string();
        } else if let Some(h) = t.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            table = h.to_string();
        } else if let Some((key, _)) = t.split_once(" = ") {
            if let Some(c) = comment(&table, key) {
                out.push_str(&format!("# {c}\n"));
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_demo::Size;
    use kiln_model::Family;

    /// Every key of the printed configurations has its comment, and the commented file reads back
    /// as the same configuration, numbers as written.
    #[test]
    fn every_key_is_commented_and_reads_back() {
        for arch in [Family::Llama, Family::Gpt2] {
            let cfg = crate::spec::example_config(Size::Small, arch);
            let text = commented_toml(&cfg).unwrap();
            let mut table = String::new();
            let mut missing = Vec::new();
            for line in text.lines().map(str::trim) {
                if line.starts_with('[') {
                    table = line.trim_matches(|c| c == '[' || c == ']').to_string();
                } else if let Some((key, _)) = line.split_once(" = ") {
                    if comment(&table, key).is_none() {
                        missing.push(format!("{table}.{key}"));
                    }
                }
            }
            assert!(missing.is_empty(), "keys without a comment: {missing:?}");
            let back = PipelineConfig::from_table(
                toml::from_str(&text).unwrap(),
                std::path::Path::new("x"),
            )
            .unwrap();
            assert_eq!(back.to_toml().unwrap(), cfg.to_toml().unwrap());
            // Numbers print as the user would write them.
            assert!(text.contains("lr = 0.002\n"), "{text}");
            assert!(!text.contains("0000000"), "{text}");
        }
    }
}
