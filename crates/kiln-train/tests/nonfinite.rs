//! Numerical faults in the shared training loop: a NaN/Inf loss or gradient skips the step (counted,
//! weights and optimizer untouched) or stops the run with the last good checkpoint kept; too many
//! consecutive bad steps (a diverging learning rate) stop the run with a message saying so.

use anyhow::Result;
use kiln_model::{Arch, Model, ModelConfig};
use kiln_train::trainer::NonFinite;
use kiln_train::{Metrics, Objective, RunDir, StepStats, TrainConfig, Trainer};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug)]
enum Fault {
    NanLoss,
    InfLoss,
    NanGrad,
    InfGrad,
}

/// A quadratic pull of every weight towards 0.5 that injects faults at chosen (1-based) steps and
/// records the weights each step started from.
struct Faulty {
    faults: BTreeMap<u64, Fault>,
    step: u64,
    /// Weights at the start of step i+1 (index i).
    seen: Vec<Vec<f32>>,
}

impl Faulty {
    fn new(faults: &[(u64, Fault)]) -> Self {
        Faulty {
            faults: faults.iter().copied().collect(),
            step: 0,
            seen: Vec::new(),
        }
    }
}

impl Objective for Faulty {
    fn micro_step(&mut self, model: &mut Model, grad_scale: f32) -> Result<StepStats> {
        self.step += 1;
        self.seen.push(model.params.clone());
        let mut loss = 0.0f64;
        for (g, &p) in model.grads.iter_mut().zip(&model.params) {
            let d = p - 0.5;
            // Computed in f32 like the real kernels, so weights of 1e30 overflow to inf.
            loss += (d * d) as f64;
            *g += grad_scale * 2.0 * d;
        }
        match self.faults.get(&self.step) {
            Some(Fault::NanLoss) => loss = f64::NAN,
            Some(Fault::InfLoss) => loss = f64::INFINITY,
            Some(Fault::NanGrad) => model.grads[3] = f32::NAN,
            Some(Fault::InfGrad) => model.grads[7] = f32::NEG_INFINITY,
            None => {}
        }
        Ok(StepStats {
            loss,
            tokens: 1,
            extra: BTreeMap::new(),
        })
    }
    fn evaluate(&mut self, model: &Model) -> Result<Metrics> {
        let l: f64 = model
            .params
            .iter()
            .map(|&p| ((p - 0.5) * (p - 0.5)) as f64)
            .sum();
        Ok(Metrics::from([("loss".to_string(), l)]))
    }
    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "step": self.step })
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.step = state["step"].as_u64().unwrap_or(0);
        Ok(())
    }
}

fn model() -> Model {
    let cfg = ModelConfig {
        vocab_size: 8,
        n_ctx: 4,
        n_layer: 1,
        n_head: 1,
        n_embd: 4,
        arch: Arch::Decoder,
        score_head: false,
        ..ModelConfig::default()
    };
    Model::new(cfg, 7)
}

fn train_cfg(max_steps: u64) -> TrainConfig {
    TrainConfig {
        max_steps,
        batch_size: 1,
        grad_accum: 1,
        lr: 1e-2,
        min_lr: 1e-3,
        warmup_steps: 0,
        eval_every: 0,
        ckpt_every: 2,
        keep_last: 0,
        ..TrainConfig::default()
    }
}

fn train(
    dir: &std::path::Path,
    cfg: TrainConfig,
    obj: &mut Faulty,
) -> (Result<kiln_train::TrainSummary>, Model) {
    let run = RunDir::create(dir).unwrap();
    let trainer = Trainer {
        cfg,
        run: &run,
        extra_files: Vec::new(),
        progress: false,
        label: "test".into(),
        final_files: None,
    };
    let mut m = model();
    let r = trainer.train(&mut m, obj, false);
    (r, m)
}

#[test]
fn a_bad_step_is_skipped_and_counted_with_the_weights_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let faults = [
        (3, Fault::NanLoss),
        (5, Fault::InfGrad),
        (6, Fault::NanGrad),
        (9, Fault::InfLoss),
    ];
    let mut obj = Faulty::new(&faults);
    let (r, m) = train(dir.path(), train_cfg(10), &mut obj);
    let s = r.unwrap();
    assert_eq!(s.steps, 10);
    assert_eq!(s.skipped_non_finite, 4);
    assert!(m.params.iter().all(|p| p.is_finite()));
    let seen = &obj.seen;
    assert_eq!(seen.len(), 10);
    for step in 1..10u64 {
        let (before, after) = (&seen[step as usize - 1], &seen[step as usize]);
        if faults.iter().any(|(s, _)| *s == step) {
            assert_eq!(
                before, after,
                "step {step} was bad: the weights must not change"
            );
        } else {
            assert_ne!(
                before, after,
                "step {step} was good: the weights must change"
            );
        }
    }
    // The count is also in the checkpoint's trainer state.
    let st: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("ckpt-0000010/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(st["skipped_non_finite"], 4);
}

#[test]
fn skipped_steps_leave_the_optimizer_moments_alone() {
    // After skipping step 2, the AdamW moments equal those of step 1's state, so the run's weights
    // after step 3 equal the weights of a run whose step 2 never happened (a run with one step fewer
    // between, at the same learning rate: a constant schedule).
    let mut cfg = train_cfg(3);
    cfg.min_lr = cfg.lr;
    let dir = tempfile::tempdir().unwrap();
    let mut obj = Faulty::new(&[(2, Fault::NanGrad)]);
    let (r, m) = train(dir.path(), cfg.clone(), &mut obj);
    assert_eq!(r.unwrap().skipped_non_finite, 1);
    // The optimizer file of the final checkpoint holds moments of 2 updates (not 3).
    let dir2 = tempfile::tempdir().unwrap();
    cfg.max_steps = 2;
    let mut clean = Faulty::new(&[]);
    let (r2, m2) = train(dir2.path(), cfg, &mut clean);
    r2.unwrap();
    // AdamW's bias correction uses its own update count, so two good updates give the same
    // weights whether or not a skipped step sat between them.
    assert_eq!(m.params, m2.params);
    let o1 = std::fs::read(dir.path().join("ckpt-0000003/optimizer.safetensors")).unwrap();
    let o2 = std::fs::read(dir2.path().join("ckpt-0000002/optimizer.safetensors")).unwrap();
    assert_eq!(o1, o2, "the skipped step touched the optimizer moments");
}

#[test]
fn stop_policy_fails_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = train_cfg(10);
    cfg.non_finite = NonFinite::Stop;
    let mut obj = Faulty::new(&[(5, Fault::NanGrad)]);
    let (r, _) = train(dir.path(), cfg, &mut obj);
    let err = format!("{:#}", r.unwrap_err());
    assert!(
        err.contains("step 5") && err.contains("non-finite") && err.contains("stopping"),
        "{err}"
    );
    let run = RunDir::create(dir.path()).unwrap();
    let last = run.latest_checkpoint().unwrap().unwrap();
    assert!(last.ends_with("ckpt-0000004"), "{}", last.display());
    let good = kiln_model::checkpoint::load_model(&last).unwrap();
    assert_eq!(
        good.params, obj.seen[4],
        "the last checkpoint holds the weights step 5 started from"
    );
    assert!(!dir.path().join("ckpt-0000005").exists());
}

#[test]
fn stop_is_selected_by_the_toml_option() {
    let cfg: TrainConfig = toml::from_str("non_finite = \"stop\"\nmax_non_finite = 3").unwrap();
    assert_eq!(cfg.non_finite, NonFinite::Stop);
    assert_eq!(cfg.max_non_finite, 3);
    assert!(toml::from_str::<TrainConfig>("non_finite = \"maybe\"").is_err());
}

#[test]
fn too_many_consecutive_bad_steps_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = train_cfg(20);
    cfg.max_non_finite = 3;
    let faults = [
        (4, Fault::NanLoss),
        (5, Fault::InfGrad),
        (6, Fault::NanGrad),
        (7, Fault::NanLoss),
    ];
    let mut obj = Faulty::new(&faults);
    let (r, _) = train(dir.path(), cfg.clone(), &mut obj);
    let err = format!("{:#}", r.unwrap_err());
    assert!(
        err.contains("3 consecutive non-finite steps") && err.contains("diverged"),
        "{err}"
    );
    assert_eq!(obj.step, 6, "stopped at the third bad step in a row");
    // As many bad steps, not in a row, are skipped and the run completes.
    let dir2 = tempfile::tempdir().unwrap();
    let spread = [
        (4, Fault::NanLoss),
        (6, Fault::InfGrad),
        (8, Fault::NanGrad),
        (10, Fault::InfLoss),
    ];
    let mut obj2 = Faulty::new(&spread);
    let (r2, _) = train(dir2.path(), cfg, &mut obj2);
    assert_eq!(r2.unwrap().skipped_non_finite, 4);
}

#[test]
fn a_diverging_learning_rate_is_reported() {
    // No injected fault: a learning rate of 1e30 throws the weights to ±1e30, whose squares overflow.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = train_cfg(50);
    cfg.lr = 1e30;
    cfg.min_lr = 1e30;
    cfg.max_non_finite = 5;
    let mut obj = Faulty::new(&[]);
    let (r, _) = train(dir.path(), cfg, &mut obj);
    let err = format!("{:#}", r.unwrap_err());
    assert!(
        err.contains("diverged") && err.contains("learning rate"),
        "{err}"
    );
}
