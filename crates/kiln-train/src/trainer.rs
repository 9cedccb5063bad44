//! The training loop every supervised stage shares (pretraining, MLM, SFT, reward model, DPO):
//! gradient accumulation, AdamW with warmup + cosine decay, evaluation and samples. What a stage
//! computes is its `Objective`; what every loop shares with PPO and GRPO (resume, metrics,
//! checkpoints, Ctrl-C, the non-finite guard) is its [`RunSession`].

use crate::dist::{self, Shard, StepSums};
use crate::optim::{AdamW, AdamWConfig, LrSchedule};
use crate::run::RunDir;
use crate::session::{self, RunSession, SessionConfig};
use anyhow::{bail, Context, Result};
use kiln_kernels::Precision;
use kiln_model::checkpoint::{map_checked, model_files, read_checked};
use kiln_model::Model;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

// Where the CLI, the pipeline and the tests have always found them.
pub use crate::session::{install_ctrlc, progress_bar, NonFinite, STOP};

/// Optimisation settings shared by every stage (TOML `[train]`, overridable by flags).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub max_steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// Global gradient-norm clip (0: off).
    pub grad_clip: f32,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: u64,
    /// Checkpoint every N steps (0: only at the end).
    pub ckpt_every: u64,
    /// Checkpoints kept (0: all).
    pub keep_last: usize,
    /// Print a text sample every N steps (0: never).
    pub sample_every: u64,
    pub seed: u64,
    pub non_finite: NonFinite,
    /// Stop after this many consecutive non-finite steps under `skip` (the learning rate has diverged).
    pub max_non_finite: u64,
    /// Arithmetic of the model's matmuls: `"f32"`, or `"bf16"` (bf16 operands with f32
    /// accumulation, on AMX or AVX512-BF16 where the CPU has them, and attention's products too
    /// with AVX512-BF16; weights, gradients and AdamW stay f32).
    #[serde(with = "precision_serde")]
    pub precision: Precision,
}

/// `Precision` as its TOML/JSON string ("f32", "bf16"); the kernels crate has no serde.
mod precision_serde {
    use kiln_kernels::Precision;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Precision, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Precision, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            max_steps: 1000,
            batch_size: 8,
            grad_accum: 1,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 50,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: 1.0,
            eval_every: 100,
            ckpt_every: 200,
            keep_last: 2,
            sample_every: 0,
            seed: 1337,
            non_finite: NonFinite::Skip,
            max_non_finite: 20,
            precision: Precision::F32,
        }
    }
}

/// One micro-batch's results.
#[derive(Clone, Debug, Default)]
pub struct StepStats {
    pub loss: f64,
    /// Tokens processed (for throughput).
    pub tokens: usize,
    pub extra: BTreeMap<String, f64>,
}

pub type Metrics = BTreeMap<String, f64>;

/// A training objective: what one stage computes on its data.
pub trait Objective {
    /// Forward and backward on the next micro-batch, adding `grad_scale` × its gradient into
    /// `model.grads`.
    fn micro_step(&mut self, model: &mut Model, grad_scale: f32) -> Result<StepStats>;
    /// Metrics on held-out data (names become `val_<name>` in the logs).
    fn evaluate(&mut self, model: &Model) -> Result<Metrics>;
    /// A text sample to show progress (optional).
    fn sample(&mut self, _model: &Model) -> Result<Option<String>> {
        Ok(None)
    }
    /// Statistics of the trained model that its final checkpoint records (e.g. a reward model's
    /// score mean and spread, which later stages normalise with).
    fn final_stats(&mut self, _model: &Model) -> Result<Metrics> {
        Ok(Metrics::new())
    }
    /// Advances past the next micro-batch exactly as `micro_step` would (data position, epoch,
    /// RNG), without computing it: another rank computes it (see [`crate::dist`]). Preparing the
    /// batch and dropping it is enough; only the forward and backward are saved.
    fn skip_micro_batch(&mut self) -> Result<()> {
        bail!("this objective cannot be trained on more than one process (no skip_micro_batch)")
    }
    /// Data position and RNG state, for exact resume.
    fn state(&self) -> serde_json::Value;
    fn restore(&mut self, state: &serde_json::Value) -> Result<()>;
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub final_loss: f64,
    pub eval: Metrics,
    /// The first evaluation's metrics (step 0, before training), for before/after reports.
    pub eval_start: Metrics,
    pub seconds: f64,
    pub tokens_per_sec: f64,
    pub skipped_non_finite: u64,
    pub interrupted: bool,
    /// The objective's [`Objective::final_stats`] when training reached its last step.
    #[serde(default)]
    pub final_stats: Metrics,
}

#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    objective: serde_json::Value,
    skipped_non_finite: u64,
    tokens_seen: u64,
    eval_start: Metrics,
    config: TrainConfig,
    /// The next LoRA dropout round (exact resume of the dropout masks).
    #[serde(default)]
    lora_round: u64,
}

/// Puts a checkpoint's trained weights into `model`: all of them, or (a model with adapters) the
/// adapters' and saved score head's, checked against the model's architecture and adapter layout.
pub fn restore_trained(model: &mut Model, dir: &std::path::Path) -> Result<()> {
    match &mut model.lora {
        Some(set) => {
            let (saved, _) = kiln_model::lora::read_peft_config(
                &dir.join(kiln_model::lora::ADAPTER_CONFIG_FILE),
            )?;
            if saved.rank != set.cfg.rank || saved.alpha != set.cfg.alpha {
                bail!(
                    "{}: adapters of rank {} alpha {}, this run's are rank {} alpha {}",
                    dir.display(),
                    saved.rank,
                    saved.alpha,
                    set.cfg.rank,
                    set.cfg.alpha
                );
            }
            let f = kiln_model::lora::ADAPTER_FILE;
            let what = dir.join(f).display().to_string();
            let bytes = kiln_model::checkpoint::read_checked(dir, f)?;
            set.fill_from(
                &kiln_model::checkpoint::bytes_to_tensors(&bytes, &what)?,
                &what,
            )?;
        }
        None => {
            let resumed = kiln_model::checkpoint::load_model(dir)?;
            if resumed.cfg != model.cfg {
                bail!(
                    "{}: checkpoint of another architecture than this run's model",
                    dir.display()
                );
            }
            model.params = resumed.params;
        }
    }
    Ok(())
}

pub struct Trainer<'a> {
    pub cfg: TrainConfig,
    pub run: &'a RunDir,
    /// Files added to every checkpoint (tokenizer.json, kiln.json, ...).
    pub extra_files: Vec<(String, Vec<u8>)>,
    pub progress: bool,
    /// A label for the progress bar ("pretrain", "sft", ...).
    pub label: String,
    /// Files of the final checkpoint made from the objective's [`Objective::final_stats`]
    /// (replacing extra files of the same name), so a finished stage's checkpoint is complete
    /// when it is written, never patched afterwards.
    pub final_files: Option<FinalFiles<'a>>,
}

pub type FinalFiles<'a> = Box<dyn Fn(&Metrics) -> Result<Vec<(String, Vec<u8>)>> + 'a>;

impl<'a> Trainer<'a> {
    /// Runs (or, with `resume`, continues) training to `cfg.max_steps`.
    pub fn train(
        &self,
        model: &mut Model,
        obj: &mut dyn Objective,
        resume: bool,
    ) -> Result<TrainSummary> {
        let cfg = &self.cfg;
        if cfg.grad_accum == 0 || cfg.batch_size == 0 {
            bail!("batch_size and grad_accum must be at least 1");
        }
        model.precision = cfg.precision;
        kiln_kernels::flush_denormals_everywhere();
        let mut session = RunSession::new(
            self.run,
            SessionConfig {
                label: self.label.clone(),
                unit: "step",
                total: cfg.max_steps,
                ckpt_every: cfg.ckpt_every,
                keep_last: cfg.keep_last,
                non_finite: cfg.non_finite,
                max_non_finite: cfg.max_non_finite,
                grad_clip: cfg.grad_clip,
                progress: self.progress,
            },
            self.extra_files.clone(),
        );
        let mut adamw = AdamW::new(
            model,
            AdamWConfig {
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: 1e-8,
                weight_decay: cfg.weight_decay,
            },
        );
        let sched = LrSchedule {
            max_lr: cfg.lr,
            min_lr: cfg.min_lr,
            warmup: cfg.warmup_steps,
            total: cfg.max_steps,
        };
        let world = dist::world();
        let shard = Shard::new(world, cfg.grad_accum, "grad_accum")?;
        let mut resumed: Option<TrainerState> = None;
        session.resume(resume, &mut resumed, |dir, resumed| {
            restore_trained(model, dir)?;
            let st: TrainerState =
                serde_json::from_slice(&read_checked(dir, "trainer_state.json")?)
                    .with_context(|| format!("{}/trainer_state.json", dir.display()))?;
            adamw.load_bytes(
                model,
                &map_checked(dir, "optimizer.safetensors")?,
                st.step,
                &format!("{}/optimizer.safetensors", dir.display()),
            )?;
            let step = st.step;
            *resumed = Some(st);
            Ok(step)
        })?;
        if world.size() > 1 {
            // Every rank starts from rank 0's weights and moments.
            dist::broadcast_start(world, model, &mut adamw.m, &mut adamw.v)?;
            adamw.step = resumed.as_ref().map_or(0, |st| st.step);
        }
        let mut step = 0u64;
        let mut skipped = 0u64;
        let mut tokens_seen = 0u64;
        let mut eval_start = Metrics::new();
        if let Some(st) = resumed {
            obj.restore(&st.objective)?;
            if let Some(set) = &model.lora {
                set.set_round(st.lora_round);
            }
            step = st.step;
            skipped = st.skipped_non_finite;
            tokens_seen = st.tokens_seen;
            eval_start = st.eval_start;
        }
        let mut summary = TrainSummary::default();
        if step == 0 {
            // The starting point, for before/after comparisons.
            eval_start = obj.evaluate(model)?;
            let mut line = serde_json::json!({"step": 0, "stage": self.label});
            for (k, v) in &eval_start {
                line[format!("val_{k}")] = serde_json::json!(v);
            }
            session.log(&line)?;
            session.say(format!(
                "[{}] step 0 | val {}",
                self.label,
                fmt_metrics(&eval_start)
            ));
        }
        session.start(step);
        let start_step = step;
        let mut run_tokens = 0u64;
        let mut opt = session.optimizer(&self.label, adamw, skipped);
        let mut last_loss = f64::NAN;
        while step < cfg.max_steps {
            model.zero_grads();
            let mut loss = 0.0;
            let mut extra: Metrics = BTreeMap::new();
            let scale = 1.0 / cfg.grad_accum as f32;
            let mut step_tokens = 0u64;
            // Adapter dropout during the micro-steps only (never in evaluation or samples).
            model.set_training(true);
            for i in 0..cfg.grad_accum {
                if !shard.owns(i) {
                    obj.skip_micro_batch()?;
                    continue;
                }
                let s = obj.micro_step(model, scale);
                let s = match s {
                    Ok(s) => s,
                    Err(e) => {
                        model.set_training(false);
                        return Err(e);
                    }
                };
                loss += s.loss / cfg.grad_accum as f64;
                step_tokens += s.tokens as u64;
                for (k, v) in s.extra {
                    *extra.entry(k).or_default() += v / cfg.grad_accum as f64;
                }
            }
            model.set_training(false);
            // Data parallel: the ranks' gradients, losses and statistics summed (and the stop
            // flag shared, so every rank stops, and rank 0 saves, at the same step).
            let mut sums = StepSums {
                loss,
                tokens: step_tokens,
                extra,
                stop: session::stop_requested(),
            };
            let lr = sched.at(step);
            let upd = opt.update(model, lr, &mut sums, step + 1, |_| {}, |m| session.say(m))?;
            let StepSums {
                loss,
                tokens: step_tokens,
                extra,
                stop,
            } = sums;
            run_tokens += step_tokens;
            tokens_seen += step_tokens;
            let norm = upd.norm;
            if upd.applied {
                last_loss = loss;
            }
            step += 1;
            let secs = session.seconds().max(1e-9);
            let tps = run_tokens as f64 / secs;
            let mut line = serde_json::json!({
                "step": step, "stage": self.label, "loss": loss, "lr": lr, "grad_norm": norm,
                "tokens": tokens_seen, "tok_per_s": tps,
            });
            for (k, v) in &extra {
                line[k.as_str()] = serde_json::json!(v);
            }
            if world.size() > 1 {
                line["allreduce_s"] = serde_json::json!(upd.comm_seconds);
            }
            session.progress(step, format!("loss {loss:.4} {tps:.0} tok/s"));
            let last = step == cfg.max_steps;
            if (cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every)) || last {
                let m = obj.evaluate(model)?;
                session.say(format!(
                    "[{}] step {step} train loss {loss:.4} | val {}",
                    self.label,
                    fmt_metrics(&m)
                ));
                for (k, v) in &m {
                    line[format!("val_{k}")] = serde_json::json!(v);
                }
                summary.eval = m;
            }
            if cfg.sample_every > 0 && step.is_multiple_of(cfg.sample_every) {
                if let Some(s) = obj.sample(model)? {
                    session.say(format!("[{}] sample: {}", self.label, s.replace('\n', " ")));
                }
            }
            session.log(&line)?;
            let stopped = session.end_step(step, stop, |finished| {
                // The finished stage's statistics, before the objective's state is saved.
                let stats = if finished {
                    let m = obj.final_stats(model)?;
                    summary.final_stats = m.clone();
                    Some(m)
                } else {
                    None
                };
                let mut files = model_files(model)?;
                files.push(("optimizer.safetensors".into(), opt.adamw.to_bytes(model)?));
                let st = TrainerState {
                    step,
                    objective: obj.state(),
                    skipped_non_finite: opt.guard.skipped,
                    tokens_seen,
                    eval_start: eval_start.clone(),
                    config: cfg.clone(),
                    lora_round: model.lora.as_ref().map_or(0, |l| l.round()),
                };
                files.push(("trainer_state.json".into(), serde_json::to_vec_pretty(&st)?));
                if let (Some(stats), Some(f)) = (stats, &self.final_files) {
                    files.extend(f(&stats)?);
                }
                Ok(files)
            })?;
            if stopped {
                summary.interrupted = true;
                break;
            }
        }
        let secs = session.finish();
        summary.steps = step;
        summary.final_loss = last_loss;
        summary.seconds = secs;
        summary.tokens_per_sec = run_tokens as f64 / secs.max(1e-9);
        summary.skipped_non_finite = opt.guard.skipped;
        summary.eval_start = eval_start;
        if step == start_step && summary.eval.is_empty() {
            summary.eval = obj.evaluate(model)?;
        }
        Ok(summary)
    }
}

/// Metrics on one line for the console (per-kind breakdowns `acc_*` stay in metrics.jsonl).
pub fn fmt_metrics(m: &Metrics) -> String {
    let shown: Vec<String> = m
        .iter()
        .filter(|(k, _)| !k.starts_with("acc_"))
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect();
    if shown.is_empty() {
        // A run without held-out data (too few records to split, or `val_fraction = 0`).
        return "- (no validation data)".into();
    }
    shown.join(" ")
}
