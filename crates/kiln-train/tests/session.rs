//! The run session the supervised trainer, PPO and GRPO share: while any of them trains, its run
//! folder is refused to a second session; and each resumes through it, so the metrics a killed run
//! logged after its last checkpoint are dropped and every step is logged once.

use anyhow::Result;
use kiln_model::{Arch, Model, ModelConfig};
use kiln_train::grpo::{Grpo, GrpoConfig};
use kiln_train::ppo::{Ppo, PpoConfig, RewardModel};
use kiln_train::reward::{FnReward, Weighted};
use kiln_train::{Metrics, Objective, RunDir, StepStats, TrainConfig, Trainer};
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

fn cfg(score: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: 24,
        n_ctx: 24,
        n_layer: 1,
        n_head: 2,
        n_embd: 16,
        arch: Arch::Decoder,
        score_head: score,
        ..ModelConfig::default()
    }
}

/// What a second session on `dir` gets: the error's text, or None when it was let in.
fn second_session(dir: &Path) -> Option<String> {
    RunDir::create(dir).err().map(|e| e.to_string())
}

/// The refusals seen from inside a loop (one per probe).
type Probes = Rc<RefCell<Vec<Option<String>>>>;

/// A quadratic pull of every weight towards 0.5 that probes the run folder at every micro-step.
struct Probing {
    dir: std::path::PathBuf,
    probes: Probes,
    steps: u64,
}

impl Objective for Probing {
    fn micro_step(&mut self, model: &mut Model, grad_scale: f32) -> Result<StepStats> {
        self.probes.borrow_mut().push(second_session(&self.dir));
        self.steps += 1;
        let mut loss = 0.0;
        for (g, &p) in model.grads.iter_mut().zip(&model.params) {
            loss += ((p - 0.5) * (p - 0.5)) as f64;
            *g += grad_scale * 2.0 * (p - 0.5);
        }
        Ok(StepStats {
            loss,
            tokens: 1,
            extra: Default::default(),
        })
    }
    fn evaluate(&mut self, _: &Model) -> Result<Metrics> {
        Ok(Metrics::new())
    }
    fn state(&self) -> serde_json::Value {
        serde_json::json!(self.steps)
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.steps = state.as_u64().unwrap_or(0);
        Ok(())
    }
}

fn train(dir: &Path, steps: u64, resume: bool, probes: &Probes) {
    let run = RunDir::create(dir).unwrap();
    let mut model = Model::new(cfg(false), 1);
    let mut obj = Probing {
        dir: dir.to_path_buf(),
        probes: probes.clone(),
        steps: 0,
    };
    Trainer {
        cfg: TrainConfig {
            max_steps: steps,
            batch_size: 1,
            eval_every: 0,
            ckpt_every: 2,
            keep_last: 0,
            ..TrainConfig::default()
        },
        run: &run,
        extra_files: Vec::new(),
        progress: false,
        label: "test".into(),
        final_files: None,
    }
    .train(&mut model, &mut obj, resume)
    .unwrap();
}

fn ppo(dir: &Path, iterations: u64, resume: bool, probes: &Probes) {
    let actor = Model::new(cfg(false), 1);
    let rm = Model::new(cfg(true), 2);
    let run = RunDir::create(dir).unwrap();
    let (d, p) = (dir.to_path_buf(), probes.clone());
    Ppo {
        cfg: PpoConfig {
            iterations,
            rollout_batch: 8,
            minibatch: 8,
            ppo_epochs: 1,
            max_new_tokens: 4,
            ckpt_every: 2,
            keep_last: 0,
            ..PpoConfig::default()
        },
        reference: Some(actor.clone()),
        actor,
        critic: rm.clone(),
        reward: RewardModel {
            model: rm,
            mean: 0.0,
            std: 1.0,
        },
        prompts: (0..8).map(|i| vec![8 + i as u32, 9]).collect(),
        stop_tokens: vec![5],
        run: &run,
        extra_files: vec![],
        eval: None,
        decode: Box::new(|t| format!("{t:?}")),
        progress: false,
        ptx: None,
        grader: None,
        grad_hook: Some(Box::new(move |_, _, _| {
            p.borrow_mut().push(second_session(&d))
        })),
    }
    .train(resume)
    .unwrap();
}

fn grpo(dir: &Path, iterations: u64, resume: bool, probes: &Probes) {
    let run = RunDir::create(dir).unwrap();
    let (d, p) = (dir.to_path_buf(), probes.clone());
    Grpo {
        cfg: GrpoConfig {
            iterations,
            prompts_per_iter: 2,
            group_size: 4,
            minibatch: 8,
            max_new_tokens: 4,
            ckpt_every: 2,
            keep_last: 0,
            ..GrpoConfig::default()
        },
        reference: None,
        actor: Model::new(cfg(false), 1),
        rewards: vec![Weighted {
            source: Box::new(FnReward {
                name: "sevens".into(),
                f: Box::new(|_, r: &[u32]| r.iter().filter(|&&t| t == 7).count() as f32),
            }),
            weight: 1.0,
        }],
        prompts: (0..8).map(|i| vec![8 + i as u32, 9]).collect(),
        stop_tokens: vec![5],
        run: &run,
        extra_files: vec![],
        eval: None,
        decode: Box::new(|t| format!("{t:?}")),
        progress: false,
        grad_hook: Some(Box::new(move |_, _, _| {
            p.borrow_mut().push(second_session(&d))
        })),
    }
    .train(resume)
    .unwrap();
}

/// The steps metrics.jsonl holds, in order.
fn logged_steps(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// Each loop, run for 6 steps, killed after step 5 (its checkpoint 6 never written, a line of step
/// 5 logged twice), and resumed.
fn check(name: &str, run: fn(&Path, u64, bool, &Probes), first_logged: u64) {
    let dir = tempfile::tempdir().unwrap();
    let probes = Probes::default();
    run(dir.path(), 6, false, &probes);
    // While training, a second session on the folder was refused, naming this process.
    let seen = probes.borrow().clone();
    assert!(!seen.is_empty(), "{name}: never probed");
    for p in &seen {
        let err = p
            .as_deref()
            .unwrap_or_else(|| panic!("{name}: a second session got in"));
        assert!(
            err.contains(&format!(
                "in use by another Kiln process (pid {})",
                std::process::id()
            )),
            "{name}: {err}"
        );
    }
    // Once it has finished, the folder is free.
    assert_eq!(second_session(dir.path()), None, "{name}");
    std::fs::remove_dir_all(dir.path().join(RunDir::checkpoint_name(6))).unwrap();
    std::fs::write(dir.path().join("latest"), RunDir::checkpoint_name(4)).unwrap();
    let mut metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let step5 = metrics
        .lines()
        .find(|l| l.contains("\"step\":5"))
        .unwrap()
        .to_string();
    metrics.push_str(&format!("{step5}\n"));
    std::fs::write(dir.path().join("metrics.jsonl"), metrics).unwrap();
    run(dir.path(), 6, true, &probes);
    assert_eq!(
        logged_steps(dir.path()),
        (first_logged..=6).collect::<Vec<_>>(),
        "{name}"
    );
    assert!(probes.borrow().iter().all(|p| p.is_some()), "{name}");
}

#[test]
fn the_trainer_ppo_and_grpo_share_the_run_session() {
    // The trainer also logs its step-0 evaluation.
    check("trainer", train, 0);
    check("ppo", ppo, 1);
    check("grpo", grpo, 1);
}
