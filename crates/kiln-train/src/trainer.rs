//! The one training loop every supervised stage shares (pretraining, MLM, SFT, reward model):
//! gradient accumulation, clipping, AdamW with warmup + cosine decay, evaluation, samples, metrics,
//! checkpoints, exact resume, non-finite guards and Ctrl-C. What a stage computes is its `Objective`.

use crate::dist::{self, Shard};
use crate::optim::{AdamW, AdamWConfig, LrSchedule, UpdateGuard};
use crate::run::RunDir;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_kernels::Precision;
use kiln_model::checkpoint::{model_files, read_checked};
use kiln_model::Model;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Set by Ctrl-C: the loop saves a checkpoint and stops at the end of the current step.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler that sets [`STOP`] (a second Ctrl-C exits at once).
pub fn install_ctrlc() {
    let _ = ctrlc_handler();
}

fn ctrlc_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit now)");
    })?;
    Ok(())
}

/// The progress bar every training loop shows (hidden when `show` is false): label, elapsed time,
/// bar, position of `len`, the loop's message and the ETA, starting at `pos` (a resumed run).
pub fn progress_bar(show: bool, label: &str, len: u64, pos: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>9} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg} eta {eta}",
        )
        .expect("a valid template"),
    );
    pb.set_prefix(label.to_string());
    pb.set_position(pos);
    pb
}

/// What to do when a step's loss or gradient is NaN or infinite.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum NonFinite {
    /// Skip the update (the weights stay as they were) and count it.
    #[default]
    Skip,
    /// Stop the run with an error; the last checkpoint stays the last good state.
    Stop,
}

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
    /// accumulation, on AMX where the CPU has it; weights, gradients and AdamW stay f32).
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
        let mut opt = AdamW::new(
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
        let mut step = 0u64;
        let mut skipped = 0u64;
        let mut tokens_seen = 0u64;
        let mut eval_start = Metrics::new();
        let world = dist::world();
        let shard = Shard::new(world, cfg.grad_accum, "grad_accum")?;
        let mut resumed_state = None;
        if resume && dist::is_root() {
            if let Some(dir) = self.run.latest_checkpoint()? {
                let resumed = kiln_model::checkpoint::load_model(&dir)?;
                if resumed.cfg != model.cfg {
                    bail!(
                        "{}: checkpoint of another architecture than this run's model",
                        dir.display()
                    );
                }
                model.params = resumed.params;
                let st: TrainerState =
                    serde_json::from_slice(&read_checked(&dir, "trainer_state.json")?)
                        .with_context(|| format!("{}/trainer_state.json", dir.display()))?;
                let opt_bytes = read_checked(&dir, "optimizer.safetensors")?;
                opt.load_bytes(
                    model,
                    &opt_bytes,
                    st.step,
                    &format!("{}/optimizer.safetensors", dir.display()),
                )?;
                self.run.truncate_metrics_after(st.step)?;
                eprintln!(
                    "[{}] resumed from {} (step {})",
                    self.label,
                    dir.display(),
                    st.step
                );
                resumed_state = Some(st);
            }
        }
        if world.size() > 1 {
            // Every rank starts from rank 0's weights, moments and data position.
            dist::broadcast_start(world, model, &mut opt.m, &mut opt.v)?;
            resumed_state = dist::broadcast_json(world, &resumed_state)?;
            opt.step = resumed_state.as_ref().map_or(0, |st| st.step);
        }
        if let Some(st) = resumed_state {
            obj.restore(&st.objective)?;
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
            self.run.log(&line)?;
            if dist::is_root() {
                eprintln!("[{}] step 0 | val {}", self.label, fmt_metrics(&eval_start));
            }
        }
        let pb = progress_bar(
            self.progress && dist::is_root(),
            &self.label,
            cfg.max_steps,
            step,
        );
        let start = Instant::now();
        let start_step = step;
        let mut run_tokens = 0u64;
        let mut guard = UpdateGuard::new(&self.label, cfg.non_finite, cfg.max_non_finite, skipped);
        let mut last_loss = f64::NAN;
        let save = |model: &Model,
                    opt: &AdamW,
                    obj: &dyn Objective,
                    step: u64,
                    skipped: u64,
                    tokens_seen: u64,
                    eval_start: &Metrics,
                    last: Option<&Metrics>|
         -> Result<()> {
            let mut files = model_files(model)?;
            files.push(("optimizer.safetensors".into(), opt.to_bytes(model)?));
            let st = TrainerState {
                step,
                objective: obj.state(),
                skipped_non_finite: skipped,
                tokens_seen,
                eval_start: eval_start.clone(),
                config: cfg.clone(),
            };
            files.push(("trainer_state.json".into(), serde_json::to_vec_pretty(&st)?));
            let finals = match (last, &self.final_files) {
                (Some(stats), Some(f)) => f(stats)?,
                _ => Vec::new(),
            };
            files.extend(
                self.extra_files
                    .iter()
                    .filter(|(n, _)| !finals.iter().any(|(m, _)| m == n))
                    .cloned(),
            );
            files.extend(finals);
            self.run.save_checkpoint(step, &files, cfg.keep_last)?;
            Ok(())
        };
        while step < cfg.max_steps {
            model.zero_grads();
            let mut loss = 0.0;
            let mut extra: Metrics = BTreeMap::new();
            let scale = 1.0 / cfg.grad_accum as f32;
            let mut step_tokens = 0u64;
            for i in 0..cfg.grad_accum {
                if !shard.owns(i) {
                    obj.skip_micro_batch()?;
                    continue;
                }
                let s = obj.micro_step(model, scale)?;
                loss += s.loss / cfg.grad_accum as f64;
                step_tokens += s.tokens as u64;
                for (k, v) in s.extra {
                    *extra.entry(k).or_default() += v / cfg.grad_accum as f64;
                }
            }
            // Data parallel: the ranks' gradients, losses and statistics summed (and the stop
            // flag shared, so every rank stops, and rank 0 saves, at the same step).
            let comm = dist::reduce_step(
                world,
                &mut model.grads,
                &mut loss,
                &mut step_tokens,
                &mut extra,
                STOP.load(Ordering::SeqCst),
            )?;
            run_tokens += step_tokens;
            tokens_seen += step_tokens;
            let lr = sched.at(step);
            let upd = guard.step(model, &mut opt, lr, cfg.grad_clip, loss, step + 1, |m| {
                say(&pb, m)
            })?;
            let norm = upd.norm;
            if upd.applied {
                last_loss = loss;
            }
            step += 1;
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            let tps = run_tokens as f64 / secs;
            let mut line = serde_json::json!({
                "step": step, "stage": self.label, "loss": loss, "lr": lr, "grad_norm": norm,
                "tokens": tokens_seen, "tok_per_s": tps,
            });
            for (k, v) in &extra {
                line[k.as_str()] = serde_json::json!(v);
            }
            if world.size() > 1 {
                line["allreduce_s"] = serde_json::json!(comm.seconds);
            }
            pb.set_message(format!("loss {loss:.4} {tps:.0} tok/s"));
            pb.set_position(step);
            let last = step == cfg.max_steps;
            if (cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every)) || last {
                let m = obj.evaluate(model)?;
                say(
                    &pb,
                    format!(
                        "[{}] step {step} train loss {loss:.4} | val {}",
                        self.label,
                        fmt_metrics(&m)
                    ),
                );
                for (k, v) in &m {
                    line[format!("val_{k}")] = serde_json::json!(v);
                }
                summary.eval = m;
            }
            if cfg.sample_every > 0 && step.is_multiple_of(cfg.sample_every) {
                if let Some(s) = obj.sample(model)? {
                    say(
                        &pb,
                        format!("[{}] sample: {}", self.label, s.replace('\n', " ")),
                    );
                }
            }
            self.run.log(&line)?;
            let stop = comm.stop;
            let due = (cfg.ckpt_every > 0 && step.is_multiple_of(cfg.ckpt_every)) || last || stop;
            if due && dist::is_root() {
                let stats = if last && !stop {
                    let m = obj.final_stats(model)?;
                    summary.final_stats = m.clone();
                    Some(m)
                } else {
                    None
                };
                save(
                    model,
                    &opt,
                    obj,
                    step,
                    guard.skipped,
                    tokens_seen,
                    &eval_start,
                    stats.as_ref(),
                )?;
            }
            if stop {
                pb.abandon_with_message(format!(
                    "interrupted at step {step}; resume with --resume"
                ));
                summary.interrupted = true;
                break;
            }
        }
        pb.finish_and_clear();
        let secs = start.elapsed().as_secs_f64();
        summary.steps = step;
        summary.final_loss = last_loss;
        summary.seconds = secs;
        summary.tokens_per_sec = run_tokens as f64 / secs.max(1e-9);
        summary.skipped_non_finite = guard.skipped;
        summary.eval_start = eval_start;
        if step == start_step && summary.eval.is_empty() {
            summary.eval = obj.evaluate(model)?;
        }
        Ok(summary)
    }
}

/// Metrics on one line for the console (per-kind breakdowns `acc_*` stay in metrics.jsonl).
pub fn fmt_metrics(m: &Metrics) -> String {
    m.iter()
        .filter(|(k, _)| !k.starts_with("acc_"))
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints a line above the progress bar, or to stderr when there is none (--quiet, CI logs).
/// Only rank 0 speaks when several processes train together.
pub(crate) fn say(pb: &indicatif::ProgressBar, line: String) {
    if !dist::is_root() {
        return;
    }
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}
