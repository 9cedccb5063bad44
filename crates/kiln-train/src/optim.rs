//! AdamW over the model's flat parameters, with per-tensor weight decay and state that checkpoints,
//! behind the non-finite guard every loop's updates go through ([`Optimizer::update`]).

use crate::dist::{self, StepSums};
use crate::session::NonFinite;
use anyhow::{bail, Context, Result};
use kiln_kernels as k;
use kiln_model::checkpoint::{bytes_to_views, tensors_to_bytes};
use kiln_model::Model;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// AdamW moments for every trained parameter (the flat layout of [`Model::trainable`]: all the
/// model's, or only its adapters' when the base is frozen).
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Updates taken so far (bias correction uses step + 1).
    pub step: u64,
}

impl AdamW {
    pub fn new(model: &Model, cfg: AdamWConfig) -> Self {
        AdamW {
            cfg,
            m: vec![0.0; model.num_trainable()],
            v: vec![0.0; model.num_trainable()],
            step: 0,
        }
    }

    /// One update with learning rate `lr`; weight decay only on the tensors marked for it (matrices).
    pub fn update(&mut self, model: &mut Model, lr: f32) {
        self.update_scaled(model, lr, 1.0);
    }

    /// [`Self::update`] on the gradient times `grad_scale` (clipping), scaled inside the update's
    /// pass; the gradient buffer is left as it was.
    pub fn update_scaled(&mut self, model: &mut Model, lr: f32, grad_scale: f32) {
        self.step += 1;
        let tr = model.trainable();
        for t in tr.tensors {
            let r = t.range();
            let wd = if t.decay { self.cfg.weight_decay } else { 0.0 };
            k::adamw_update_scaled(
                &mut tr.params[r.clone()],
                &tr.grads[r.clone()],
                &mut self.m[r.clone()],
                &mut self.v[r.clone()],
                lr,
                self.cfg.beta1,
                self.cfg.beta2,
                self.cfg.eps,
                wd,
                self.step,
                grad_scale,
            );
        }
    }

    /// Moments as safetensors (`exp_avg.<name>`, `exp_avg_sq.<name>`, as PyTorch's AdamW calls them).
    pub fn to_bytes(&self, model: &Model) -> Result<Vec<u8>> {
        let mut tensors = Vec::new();
        for t in model.trainable_tensors() {
            tensors.push((
                format!("exp_avg.{}", t.name),
                t.shape.clone(),
                &self.m[t.range()],
            ));
            tensors.push((
                format!("exp_avg_sq.{}", t.name),
                t.shape.clone(),
                &self.v[t.range()],
            ));
        }
        tensors_to_bytes(&tensors)
    }

    pub fn load_bytes(&mut self, model: &Model, bytes: &[u8], step: u64, what: &str) -> Result<()> {
        let map = bytes_to_views(bytes, what)?;
        for t in model.trainable_tensors() {
            for (prefix, buf) in [("exp_avg", &mut self.m), ("exp_avg_sq", &mut self.v)] {
                let name = format!("{prefix}.{}", t.name);
                let (shape, data) = map
                    .get(&name)
                    .with_context(|| format!("{what}: optimizer tensor {name} missing"))?;
                if shape != &t.shape {
                    bail!(
                        "{what}: optimizer tensor {name} has shape {shape:?}, expected {:?}",
                        t.shape
                    );
                }
                data.copy_to(&mut buf[t.range()]);
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm` (0: no clipping). Returns the norm
/// before clipping.
pub fn clip_grad_norm(model: &mut Model, max_norm: f32) -> f32 {
    let grads = model.trainable_grads_mut();
    let (norm, s) = clip_scale(grads, max_norm);
    if s != 1.0 {
        k::scale(grads, s);
    }
    norm
}

/// The gradient's global norm, and the factor that clips it to `max_norm` (1 when it is within it,
/// clipping is off, or the norm is not finite).
pub fn clip_scale(grads: &[f32], max_norm: f32) -> (f32, f32) {
    let norm = k::global_grad_norm(&[grads]);
    if max_norm > 0.0 && norm > max_norm && norm.is_finite() {
        (norm, max_norm / (norm + 1e-6))
    } else {
        (norm, 1.0)
    }
}

/// What became of one optimizer step (see [`UpdateGuard::step`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Update {
    /// The gradient's global norm before clipping.
    pub norm: f32,
    /// False when the step was skipped for a non-finite loss or gradient.
    pub applied: bool,
    /// Seconds spent summing the gradient over the ranks (0 on one process).
    pub comm_seconds: f64,
}

/// The non-finite guard of every optimizer step (taken through [`Optimizer::update`], so no loop
/// can forget it): the gradient is clipped, and AdamW runs only when the loss and the gradient norm
/// are finite. A non-finite step is counted and skipped (the weights and moments stay as they
/// were) or, with [`NonFinite::Stop`] or after `max_consecutive` in a row, stops the run with an
/// error.
#[derive(Clone, Debug)]
pub struct UpdateGuard {
    pub policy: NonFinite,
    pub max_consecutive: u64,
    consecutive: u64,
    /// Steps skipped so far (restored on resume).
    pub skipped: u64,
    label: String,
}

impl UpdateGuard {
    pub fn new(label: &str, policy: NonFinite, max_consecutive: u64, skipped: u64) -> Self {
        UpdateGuard {
            policy,
            max_consecutive,
            consecutive: 0,
            skipped,
            label: label.to_string(),
        }
    }

    /// Clips `model`'s gradient to `grad_clip` and applies `opt` at `lr` unless `loss` or the norm
    /// is non-finite. `step` (1-based) names the step in messages; `warn` receives the warning of a
    /// skipped step.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        model: &mut Model,
        opt: &mut AdamW,
        lr: f32,
        grad_clip: f32,
        loss: f64,
        step: u64,
        warn: impl FnOnce(String),
    ) -> Result<Update> {
        // Clipping happens inside the update's pass over the gradient.
        let (norm, clip) = clip_scale(model.trainable_grads_mut(), grad_clip);
        if loss.is_finite() && norm.is_finite() {
            opt.update_scaled(model, lr, clip);
            self.consecutive = 0;
            return Ok(Update {
                norm,
                applied: true,
                comm_seconds: 0.0,
            });
        }
        self.skipped += 1;
        self.consecutive += 1;
        let msg = format!(
            "step {step}: non-finite loss ({loss}) or gradient norm ({norm}); update skipped"
        );
        if self.policy == NonFinite::Stop {
            bail!(
                "[{}] {msg}; stopping (the last checkpoint holds the last good weights)",
                self.label
            );
        }
        warn(format!("[{}] warning: {msg}", self.label));
        if self.consecutive >= self.max_consecutive {
            bail!(
                "{} consecutive non-finite steps: training has diverged (lower the learning rate, now {lr})",
                self.consecutive
            );
        }
        Ok(Update {
            norm,
            applied: false,
            comm_seconds: 0.0,
        })
    }
}

/// One trained model's optimizer: AdamW behind its non-finite guard (the trainer's model, PPO's
/// actor and critic, GRPO's actor each have one; see [`crate::session::RunSession::optimizer`]).
pub struct Optimizer {
    pub adamw: AdamW,
    pub guard: UpdateGuard,
    /// Global gradient-norm clip (0: off).
    pub grad_clip: f32,
}

impl Optimizer {
    /// The one way every loop updates a model: its gradient and `sums` added up over the ranks
    /// (data parallel; `sums` then holds the totals), `hook` shown the summed gradient (tests
    /// inject faults there), then the guarded step at `lr`. `step` (1-based) names the update in
    /// messages; `warn` receives the warning of a skipped one.
    pub fn update(
        &mut self,
        model: &mut Model,
        lr: f32,
        sums: &mut StepSums,
        step: u64,
        hook: impl FnOnce(&mut Model),
        warn: impl FnOnce(String),
    ) -> Result<Update> {
        let comm_seconds = dist::reduce_step(dist::world(), model.trainable_grads_mut(), sums)?;
        hook(model);
        let upd = self.guard.step(
            model,
            &mut self.adamw,
            lr,
            self.grad_clip,
            sums.loss,
            step,
            warn,
        )?;
        Ok(Update {
            comm_seconds,
            ..upd
        })
    }

    /// The 1-based number of the next update tried, applied or skipped (the RL loops' messages
    /// name updates by it).
    pub fn next_update(&self) -> u64 {
        self.guard.skipped + self.adamw.step + 1
    }
}

/// Linear warmup to `max_lr`, then cosine decay to `min_lr` at `total` steps (constant after).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LrSchedule {
    pub max_lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    pub total: u64,
}

impl LrSchedule {
    pub fn at(&self, step: u64) -> f32 {
        if step < self.warmup {
            return self.max_lr * (step + 1) as f32 / self.warmup as f32;
        }
        if step >= self.total {
            return self.min_lr;
        }
        let span = (self.total - self.warmup).max(1) as f32;
        let progress = (step - self.warmup) as f32 / span;
        self.min_lr
            + 0.5 * (self.max_lr - self.min_lr) * (1.0 + (std::f32::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = LrSchedule {
            max_lr: 1.0,
            min_lr: 0.1,
            warmup: 10,
            total: 110,
        };
        assert!((s.at(0) - 0.1).abs() < 1e-6);
        assert!((s.at(9) - 1.0).abs() < 1e-6);
        assert!((s.at(10) - 1.0).abs() < 1e-6);
        assert!((s.at(60) - 0.55).abs() < 1e-5);
        assert!((s.at(110) - 0.1).abs() < 1e-6);
        assert!(s.at(30) > s.at(40));
    }
}
