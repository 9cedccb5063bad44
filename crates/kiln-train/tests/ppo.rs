//! PPO end to end on tiny random models: the first minibatch's ratio is exactly 1, a large β pins the
//! policy to the reference, β = 0 lets reward and KL grow, and resume continues exactly.

use kiln_model::{Arch, Model, ModelConfig};
use kiln_train::ppo::{Ppo, PpoConfig, PpoSummary, RewardModel};
use kiln_train::RunDir;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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

fn run(dir: &std::path::Path, beta: f32, iterations: u64, resume: bool) -> PpoSummary {
    run_with(dir, beta, iterations, resume, |_| {})
}

/// `run`, with `tweak` applied to the trainer before it starts.
fn run_with(
    dir: &std::path::Path,
    beta: f32,
    iterations: u64,
    resume: bool,
    tweak: impl FnOnce(&mut Ppo),
) -> PpoSummary {
    with_ppo(dir, beta, iterations, |p| {
        tweak(p);
        p.train(resume).unwrap()
    })
}

/// Builds the test's trainer and hands it to `f`.
fn with_ppo<T>(
    dir: &std::path::Path,
    beta: f32,
    iterations: u64,
    f: impl FnOnce(&mut Ppo) -> T,
) -> T {
    let actor = Model::new(cfg(false), 1);
    let mut rm = Model::new(cfg(true), 2);
    // A reward model with an opinion: random score weights (a fresh head is all zeros).
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let r = rm.layout.score.clone().unwrap();
    for x in &mut rm.params[r] {
        *x = rng.gen_range(-1.0..1.0);
    }
    let prompts: Vec<Vec<u32>> = (0..16).map(|i| vec![8 + (i % 10) as u32, 9, 4]).collect();
    let run_dir = RunDir::create(dir).unwrap();
    let mut ppo = Ppo {
        cfg: PpoConfig {
            iterations,
            rollout_batch: 16,
            minibatch: 8,
            ppo_epochs: 2,
            max_new_tokens: 6,
            actor_lr: 3e-3,
            critic_lr: 3e-3,
            kl_coef: beta,
            eval_every: 100,
            ckpt_every: 4,
            missing_end_penalty: 0.0,
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
        prompts,
        stop_tokens: vec![5],
        run: &run_dir,
        extra_files: vec![],
        eval: None,
        decode: Box::new(|t| format!("{t:?}")),
        progress: false,
        ptx: None,
        grader: None,
        grad_hook: None,
    };
    f(&mut ppo)
}

fn mean(h: &[kiln_train::Metrics], key: &str, range: std::ops::Range<usize>) -> f64 {
    let n = range.len() as f64;
    h[range].iter().map(|m| m[key]).sum::<f64>() / n
}

#[test]
fn first_minibatch_ratio_is_exactly_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = run(dir.path(), 0.05, 3, false);
    for m in &s.history {
        assert_eq!(
            m["first_ratio_err"], 0.0,
            "rollout and training forward passes disagree: {m:?}"
        );
        assert!(m["approx_kl"].is_finite());
    }
}

#[test]
fn beta_controls_the_drift_from_the_reference() {
    let d0 = tempfile::tempdir().unwrap();
    let free = run(d0.path(), 0.0, 16, false);
    let d1 = tempfile::tempdir().unwrap();
    let pinned = run(d1.path(), 5.0, 16, false);
    let (h0, h1) = (&free.history, &pinned.history);
    let kl_free = mean(h0, "kl", 12..16);
    let kl_pinned = mean(h1, "kl", 12..16);
    let gain_free = mean(h0, "reward", 12..16) - mean(h0, "reward", 0..4);
    let gain_pinned = mean(h1, "reward", 12..16) - mean(h1, "reward", 0..4);
    eprintln!("β=0: KL {kl_free:.4}, reward gain {gain_free:.4}; β=5: KL {kl_pinned:.4}, reward gain {gain_pinned:.4}");
    assert!(
        gain_free > 0.1,
        "with β = 0 the reward should rise: {gain_free}"
    );
    assert!(
        kl_free > 4.0 * kl_pinned.abs().max(1e-3),
        "KL: free {kl_free}, pinned {kl_pinned}"
    );
    // Over seeds 1-8 the pinned KL spans -0.02 to 0.25 (free: 1 to 2 nats); the sampled
    // responses, and so this figure, move with the seed.
    assert!(
        kl_pinned.abs() < 0.3,
        "a large β keeps the policy near the reference: KL {kl_pinned}"
    );
    assert!(
        gain_free > gain_pinned,
        "reward rises faster without the penalty"
    );
}

#[test]
fn resume_continues_exactly() {
    let full_dir = tempfile::tempdir().unwrap();
    let full = run(full_dir.path(), 0.05, 8, false);
    // Same run, stopped after the checkpoint at iteration 4, then resumed.
    let part_dir = tempfile::tempdir().unwrap();
    run(part_dir.path(), 0.05, 8, false);
    {
        // (The run folder is locked while a RunDir lives: this one goes before the resume.)
        let rd = RunDir::create(part_dir.path()).unwrap();
        for (step, p) in rd.checkpoints().unwrap() {
            if step > 4 {
                std::fs::remove_dir_all(p).unwrap();
            }
        }
    }
    std::fs::write(part_dir.path().join("latest"), RunDir::checkpoint_name(4)).unwrap();
    let resumed = run(part_dir.path(), 0.05, 8, true);
    assert_eq!(resumed.history.len(), 8);
    for (i, (a, b)) in full.history.iter().zip(&resumed.history).enumerate() {
        assert_eq!(a["reward"], b["reward"], "iteration {}", i + 1);
        assert_eq!(a["kl"], b["kl"]);
        assert_eq!(a["value_loss"], b["value_loss"]);
    }
}

/// Records how PPO calls the PPO-ptx objective.
struct CountingPtx {
    calls: std::rc::Rc<std::cell::RefCell<Vec<f32>>>,
}

impl kiln_train::Objective for CountingPtx {
    fn micro_step(
        &mut self,
        model: &mut Model,
        grad_scale: f32,
    ) -> anyhow::Result<kiln_train::StepStats> {
        self.calls.borrow_mut().push(grad_scale);
        // A gradient that only this objective produces: the policy update must include it.
        model.grads[0] += grad_scale;
        Ok(kiln_train::StepStats {
            loss: 2.0,
            tokens: 1,
            extra: Default::default(),
        })
    }
    fn evaluate(&mut self, _: &Model) -> anyhow::Result<kiln_train::Metrics> {
        Ok(Default::default())
    }
    fn state(&self) -> serde_json::Value {
        serde_json::json!(self.calls.borrow().len())
    }
    fn restore(&mut self, _: &serde_json::Value) -> anyhow::Result<()> {
        Ok(())
    }
}

#[test]
fn ppo_ptx_mixes_the_pretraining_loss_into_every_policy_update() {
    let dir = tempfile::tempdir().unwrap();
    let calls = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let actor = Model::new(cfg(false), 1);
    let rm = Model::new(cfg(true), 2);
    let run_dir = RunDir::create(dir.path()).unwrap();
    let mut ppo = Ppo {
        cfg: PpoConfig {
            iterations: 2,
            rollout_batch: 16,
            minibatch: 8,
            ppo_epochs: 2,
            max_new_tokens: 4,
            ptx_coef: 0.5,
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
        prompts: (0..16).map(|i| vec![8 + (i % 10) as u32, 9]).collect(),
        stop_tokens: vec![5],
        run: &run_dir,
        extra_files: vec![],
        eval: None,
        decode: Box::new(|t| format!("{t:?}")),
        progress: false,
        ptx: Some(Box::new(CountingPtx {
            calls: calls.clone(),
        })),
        grader: None,
        grad_hook: None,
    };
    let s = ppo.train(false).unwrap();
    // 2 iterations × 2 epochs × 2 minibatches, each with the coefficient as the gradient scale.
    assert_eq!(*calls.borrow(), vec![0.5; 8]);
    assert_eq!(s.history[0]["ptx_loss"], 2.0);
    // Without data, a positive coefficient is refused up front.
    ppo.ptx = None;
    let err = ppo.train(false).unwrap_err().to_string();
    assert!(err.contains("ptx"), "{err}");
}

#[test]
fn a_frozen_actor_stays_at_the_reference_while_the_critic_learns() {
    let dir = tempfile::tempdir().unwrap();
    let s = run_with(dir.path(), 0.0, 4, false, |p| p.cfg.freeze_actor_iters = 2);
    // Rollouts of iterations 1-2 come from the untouched actor: KL to the reference exactly 0.
    assert_eq!(s.history[0]["kl"], 0.0);
    assert_eq!(s.history[1]["kl"], 0.0);
    // The critic was learning meanwhile, and the actor moves once released.
    assert!(s.history[1]["value_loss"] < s.history[0]["value_loss"]);
    assert!(s.history[3]["kl"].abs() > 0.0, "{:?}", s.history[3]);
}

#[test]
fn the_grader_reports_rollout_accuracy_and_the_reward_gap() {
    let dir = tempfile::tempdir().unwrap();
    // "Right" when the first response token is even; prompts 0..16 alternate two first tokens.
    let s = run_with(dir.path(), 0.05, 2, false, |p| {
        p.grader = Some(Box::new(|i: usize, resp: &[u32]| {
            (i % 4 != 3).then(|| f64::from(u8::from(resp.first().is_some_and(|t| t % 2 == 0))))
        }))
    });
    for m in &s.history {
        let acc = m["rollout_acc"];
        assert!(acc > 0.0 && acc < 1.0, "{m:?}");
        assert!(m["rm_gap"].is_finite());
    }
    // Everything right: accuracy 1 and no gap (nothing to compare against).
    let dir = tempfile::tempdir().unwrap();
    let s = run_with(dir.path(), 0.05, 1, false, |p| {
        p.grader = Some(Box::new(|_, _| Some(1.0)))
    });
    assert_eq!(s.history[0]["rollout_acc"], 1.0);
    assert!(!s.history[0].contains_key("rm_gap"));
}

/// Trains with `tweak` applied; returns the trainer's result (not unwrapped) and the final actor.
fn try_run(
    dir: &std::path::Path,
    iterations: u64,
    tweak: impl FnOnce(&mut Ppo),
) -> (anyhow::Result<PpoSummary>, Vec<f32>) {
    with_ppo(dir, 0.05, iterations, |p| {
        tweak(p);
        let r = p.train(false);
        (r, p.actor.params.clone())
    })
}

/// A NaN in a gradient skips that update (counted; the weights it would have moved stay as they
/// were) or, with non_finite = stop, ends the run with an error and the last checkpoint intact.
#[test]
fn non_finite_gradients_are_skipped_or_stop_the_run() {
    use kiln_train::trainer::NonFinite;
    // Reference: no fault.
    let d0 = tempfile::tempdir().unwrap();
    let (clean, clean_params) = try_run(d0.path(), 3, |_| {});
    let clean = clean.unwrap();
    assert!(clean.history.iter().all(|m| m["skipped_non_finite"] == 0.0));
    // Every actor gradient of iteration 2 poisoned: those updates are skipped.
    let d1 = tempfile::tempdir().unwrap();
    let poisoned_at = |it: u64| {
        move |who: &str, i: u64, m: &mut Model| {
            if who == "actor" && i == it {
                m.grads[5] = f32::NAN;
            }
        }
    };
    let (skipped, skipped_params) = try_run(d1.path(), 3, |p| {
        p.grad_hook = Some(Box::new(poisoned_at(2)));
    });
    let skipped = skipped.unwrap();
    let counts: Vec<f64> = skipped
        .history
        .iter()
        .map(|m| m["skipped_non_finite"])
        .collect();
    // 16 rollouts, minibatch 8, 2 epochs: 4 actor updates per iteration, all skipped in iteration 2.
    assert_eq!(counts, vec![0.0, 4.0, 4.0], "{counts:?}");
    assert!(skipped_params.iter().all(|x| x.is_finite()));
    assert_eq!(
        skipped.history[0]["reward"], clean.history[0]["reward"],
        "iteration 1 is untouched"
    );
    assert_ne!(
        skipped_params, clean_params,
        "the skipped updates changed nothing?"
    );
    // Stop: the run ends with an error naming the fault, and the checkpoint of iteration 4 (the
    // fault is in iteration 5) is the last one, intact.
    let d2 = tempfile::tempdir().unwrap();
    let (stopped, _) = try_run(d2.path(), 6, |p| {
        p.cfg.non_finite = NonFinite::Stop;
        p.grad_hook = Some(Box::new(poisoned_at(5)));
    });
    let err = format!("{:#}", stopped.unwrap_err());
    assert!(
        err.contains("non-finite") && err.contains("ppo actor"),
        "{err}"
    );
    let run = kiln_train::RunDir::create(d2.path()).unwrap();
    let last = run
        .latest_checkpoint()
        .unwrap()
        .expect("checkpoint of iteration 4");
    assert!(last.ends_with("ckpt-0000004"), "{}", last.display());
    let m = kiln_model::checkpoint::load_model(&last).unwrap();
    assert!(m.params.iter().all(|x| x.is_finite()));
}

/// PPO with LoRA on the actor and the critic: the reference is the actor's base (adapters off, no
/// copy held), the first ratio is 1, the KL to the base grows from 0, and an interrupted run
/// resumes exactly (actor and critic adapters, the critic's saved score head).
#[test]
fn lora_actor_and_critic_resume_exactly() {
    let lora = kiln_model::LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..Default::default()
    };
    let go = |dir: &std::path::Path, resume: bool| {
        with_ppo(dir, 0.0, 6, |p| {
            for x in p.actor.params.iter_mut() {
                *x *= 4.0;
            }
            p.actor.attach_lora(&lora, 1).unwrap();
            p.critic.attach_lora(&lora, 2).unwrap();
            p.reference = None;
            let s = p.train(resume).unwrap();
            assert!(p.actor.grads.is_empty() && p.critic.grads.is_empty());
            (
                s,
                p.actor.lora.clone().unwrap().params,
                p.critic.lora.clone().unwrap().params,
            )
        })
    };
    let full_dir = tempfile::tempdir().unwrap();
    let (full, actor_full, critic_full) = go(full_dir.path(), false);
    for m in &full.history {
        assert_eq!(m["first_ratio_err"], 0.0, "{m:?}");
    }
    assert_eq!(full.history[0]["kl"], 0.0, "the policy starts at its base");
    assert!(full.history.last().unwrap()["kl"] > 0.0);
    let part = tempfile::tempdir().unwrap();
    go(part.path(), false);
    {
        let rd = RunDir::create(part.path()).unwrap();
        for (step, p) in rd.checkpoints().unwrap() {
            if step > 4 {
                std::fs::remove_dir_all(p).unwrap();
            }
        }
    }
    std::fs::write(part.path().join("latest"), RunDir::checkpoint_name(4)).unwrap();
    let (resumed, actor_r, critic_r) = go(part.path(), true);
    assert!(actor_r == actor_full, "actor adapters differ after resume");
    assert!(
        critic_r == critic_full,
        "critic adapters differ after resume"
    );
    for (a, b) in full.history.iter().zip(&resumed.history) {
        assert_eq!(a["reward"], b["reward"]);
    }
}

/// Micro-batches accumulate into each minibatch's actor and critic updates: minibatches of 8 run
/// as 3 + 3 + 2 rows train the same actor and critic as whole minibatches, to rounding, with the
/// first ratio still exactly 1 (the rollout's log-probs come from the same passes).
#[test]
fn micro_batches_give_the_minibatchs_updates() {
    let train = |micro: usize| {
        let dir = tempfile::tempdir().unwrap();
        with_ppo(dir.path(), 0.05, 2, |p| {
            p.cfg.micro_batch = micro;
            let s = p.train(false).unwrap();
            (s, p.actor.params.clone(), p.critic.params.clone())
        })
    };
    let (whole, wa, wc) = train(0);
    let (parts, pa, pc) = train(3);
    for (a, b) in whole.history.iter().zip(&parts.history) {
        assert_eq!(b["first_ratio_err"], 0.0, "{b:?}");
        assert!(
            (a["approx_kl"] - b["approx_kl"]).abs() < 1e-6,
            "{a:?} vs {b:?}"
        );
    }
    let start_actor = Model::new(cfg(false), 1).params;
    for (name, w, p, start) in [
        ("actor", &wa, &pa, Some(&start_actor)),
        ("critic", &wc, &pc, None),
    ] {
        if let Some(s) = start {
            let moved = w
                .iter()
                .zip(s)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(moved > 1e-3, "training moved the {name} ({moved})");
        }
        let diff = w
            .iter()
            .zip(p)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "micro-batched {name} differs by {diff}");
    }
}
