//! GRPO end to end on tiny random models: the first minibatch's ratio is exactly 1, a verifiable
//! reward rises, resume continues exactly, a non-finite gradient is skipped or stops the run, and a
//! reward program that fails stops the run with a clear error and an intact checkpoint.

use kiln_model::{Arch, Model, ModelConfig};
use kiln_train::grpo::{Advantage, Grpo, GrpoConfig, GrpoSummary, LossAgg};
use kiln_train::reward::{CommandReward, FnReward, Weighted};
use kiln_train::RunDir;

fn cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 24,
        n_ctx: 24,
        n_layer: 1,
        n_head: 2,
        n_embd: 16,
        arch: Arch::Decoder,
        ..ModelConfig::default()
    }
}

/// Reward: the share of response tokens equal to 7 (a "right answer" the policy can learn).
fn sevens() -> Weighted<'static> {
    Weighted {
        source: Box::new(FnReward {
            name: "judge".into(),
            f: Box::new(|_, r: &[u32]| {
                r.iter().filter(|&&t| t == 7).count() as f32 / r.len().max(1) as f32
            }),
        }),
        weight: 1.0,
    }
}

fn with_grpo<T>(
    dir: &std::path::Path,
    iterations: u64,
    rewards: Vec<Weighted<'static>>,
    f: impl FnOnce(&mut Grpo) -> T,
) -> T {
    let actor = Model::new(cfg(), 1);
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| vec![8 + (i % 6) as u32, 9, 4]).collect();
    let run = RunDir::create(dir).unwrap();
    let mut g = Grpo {
        cfg: GrpoConfig {
            iterations,
            prompts_per_iter: 4,
            group_size: 4,
            minibatch: 8,
            max_new_tokens: 6,
            lr: 3e-3,
            eval_every: 100,
            ckpt_every: 4,
            ..GrpoConfig::default()
        },
        reference: None,
        actor,
        rewards,
        prompts,
        stop_tokens: vec![5],
        run: &run,
        extra_files: vec![],
        eval: None,
        decode: Box::new(|t| format!("{t:?}")),
        progress: false,
        grad_hook: None,
    };
    f(&mut g)
}

fn run(
    dir: &std::path::Path,
    iterations: u64,
    resume: bool,
    tweak: impl FnOnce(&mut Grpo),
) -> GrpoSummary {
    with_grpo(dir, iterations, vec![sevens()], |g| {
        tweak(g);
        g.train(resume).unwrap()
    })
}

fn mean(h: &[kiln_train::Metrics], key: &str, r: std::ops::Range<usize>) -> f64 {
    let n = r.len() as f64;
    h[r].iter().map(|m| m[key]).sum::<f64>() / n
}

#[test]
fn first_ratio_is_one_and_the_reward_rises() {
    for (adv, agg, beta) in [
        (Advantage::Group, LossAgg::Token, 0.0),
        (Advantage::Rloo, LossAgg::Sequence, 0.0),
        (Advantage::Mean, LossAgg::Constant, 0.05),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let s = run(dir.path(), 24, false, |g| {
            g.cfg.advantage = adv;
            g.cfg.loss_agg = agg;
            g.cfg.beta = beta;
            if beta > 0.0 {
                g.reference = Some(g.actor.clone());
            }
        });
        for m in &s.history {
            assert_eq!(m["first_ratio_err"], 0.0, "{adv:?}: {m:?}");
        }
        let (early, late) = (
            mean(&s.history, "reward", 0..4),
            mean(&s.history, "reward", 20..24),
        );
        eprintln!("{adv:?} {agg:?} β={beta}: reward {early:.3} → {late:.3}");
        assert!(
            late > early + 0.1,
            "{adv:?} {agg:?}: reward {early} → {late}"
        );
        if beta > 0.0 {
            assert!(s.history.iter().all(|m| m["kl"] >= 0.0));
            assert!(s.history.last().unwrap()["kl"] > 0.0);
        }
    }
}

/// The responses of an iteration need not fill whole minibatches: 4 prompts × 5 answers in
/// minibatches of 8 train as 8 + 8 + 4, on-policy (first ratio exactly 1), and still learn.
#[test]
fn a_short_last_minibatch_trains() {
    let dir = tempfile::tempdir().unwrap();
    let s = run(dir.path(), 24, false, |g| {
        g.cfg.group_size = 5;
        g.cfg.minibatch = 8;
    });
    assert_eq!(s.history.len(), 24);
    for m in &s.history {
        assert_eq!(m["first_ratio_err"], 0.0, "{m:?}");
        assert!(m["loss"].is_finite());
    }
    let (early, late) = (
        mean(&s.history, "reward", 0..4),
        mean(&s.history, "reward", 20..24),
    );
    assert!(late > early + 0.1, "reward {early} → {late}");
}

/// DAPO's dynamic sampling: with a reward that is flat for half the prompts (0 whatever the
/// answer), the groups trained on all carry signal, more rounds are drawn to fill the batch, and a
/// resumed run continues exactly. Without it, flat groups are trained on.
#[test]
fn dynamic_sampling_trains_only_on_groups_with_signal() {
    let half_flat = || Weighted {
        source: Box::new(FnReward {
            name: "judge".into(),
            f: Box::new(|p, r: &[u32]| {
                if p % 2 == 0 {
                    0.0
                } else {
                    r.iter().filter(|&&t| t == 7).count() as f32 / r.len().max(1) as f32
                }
            }),
        }),
        weight: 1.0,
    };
    let go_rounds =
        |dir: &std::path::Path, dynamic: bool, iterations: u64, resume: bool, rounds: usize| {
            with_grpo(dir, iterations, vec![half_flat()], |g| {
                g.cfg.dynamic_sampling = dynamic;
                g.cfg.max_sample_rounds = rounds;
                g.train(resume).unwrap()
            })
        };
    let go = |dir: &std::path::Path, dynamic: bool, iterations: u64, resume: bool| {
        go_rounds(dir, dynamic, iterations, resume, 8)
    };
    // One round only: batches come out short (fewer groups than prompts_per_iter, the last
    // minibatch shorter than the others) and still train.
    let short_dir = tempfile::tempdir().unwrap();
    let short = go_rounds(short_dir.path(), true, 4, false, 1);
    assert!(
        short.history.iter().any(|m| m["groups_trained"] < 4.0),
        "{:?}",
        short.history
    );
    let dir = tempfile::tempdir().unwrap();
    let s = go(dir.path(), true, 8, false);
    for m in &s.history {
        assert_eq!(m["groups_trained"], 4.0, "{m:?}");
        assert_eq!(m["zero_std_trained"], 0.0, "{m:?}");
    }
    assert!(s.history.iter().any(|m| m["sample_rounds"] > 1.0));
    assert!(s.history.iter().all(|m| m["zero_std_frac"] > 0.0));
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = go(plain_dir.path(), false, 4, false);
    assert!(plain.history.iter().all(|m| m["sample_rounds"] == 1.0));
    assert!(plain.history.iter().any(|m| m["zero_std_trained"] >= 0.5));
    // Resume from iteration 4 of the dynamic run: the same figures as without the interruption.
    let part = tempfile::tempdir().unwrap();
    go(part.path(), true, 8, false);
    {
        let rd = RunDir::create(part.path()).unwrap();
        for (step, p) in rd.checkpoints().unwrap() {
            if step > 4 {
                std::fs::remove_dir_all(p).unwrap();
            }
        }
    }
    std::fs::write(part.path().join("latest"), RunDir::checkpoint_name(4)).unwrap();
    let resumed = go(part.path(), true, 8, true);
    for (a, b) in s.history.iter().zip(&resumed.history) {
        for k in ["reward", "loss", "sample_rounds", "zero_std_frac"] {
            assert_eq!(a[k], b[k], "{k}");
        }
    }
}

#[test]
fn resume_continues_exactly() {
    let full_dir = tempfile::tempdir().unwrap();
    let full = run(full_dir.path(), 8, false, |_| {});
    let part = tempfile::tempdir().unwrap();
    run(part.path(), 8, false, |_| {});
    {
        let rd = RunDir::create(part.path()).unwrap();
        for (step, p) in rd.checkpoints().unwrap() {
            if step > 4 {
                std::fs::remove_dir_all(p).unwrap();
            }
        }
    }
    std::fs::write(part.path().join("latest"), RunDir::checkpoint_name(4)).unwrap();
    let resumed = run(part.path(), 8, true, |_| {});
    assert_eq!(resumed.history.len(), 8);
    for (i, (a, b)) in full.history.iter().zip(&resumed.history).enumerate() {
        for k in ["reward", "entropy", "loss", "clip_frac"] {
            assert_eq!(a[k], b[k], "iteration {} {k}", i + 1);
        }
    }
}

#[test]
fn a_nan_gradient_is_skipped_or_stops_the_run() {
    use kiln_train::trainer::NonFinite;
    let poison = |at: u64| {
        move |_: &str, it: u64, m: &mut Model| {
            if it == at {
                m.grads[3] = f32::NAN;
            }
        }
    };
    let d = tempfile::tempdir().unwrap();
    let s = run(d.path(), 3, false, |g| {
        g.grad_hook = Some(Box::new(poison(2)))
    });
    let counts: Vec<f64> = s.history.iter().map(|m| m["skipped_non_finite"]).collect();
    // 16 responses, minibatch 8: two updates per iteration, both skipped in iteration 2.
    assert_eq!(counts, vec![0.0, 2.0, 2.0]);
    let d = tempfile::tempdir().unwrap();
    let err = with_grpo(d.path(), 6, vec![sevens()], |g| {
        g.cfg.non_finite = NonFinite::Stop;
        g.grad_hook = Some(Box::new(poison(5)));
        g.train(false).unwrap_err()
    });
    let err = format!("{err:#}");
    assert!(
        err.contains("[grpo]") && err.contains("non-finite"),
        "{err}"
    );
    let rd = RunDir::create(d.path()).unwrap();
    let last = rd.latest_checkpoint().unwrap().unwrap();
    assert!(last.ends_with("ckpt-0000004"));
}

#[test]
fn a_failing_reward_program_stops_the_run_with_its_checkpoint_intact() {
    // Answers well for 4 iterations (16 answers each), then prints garbage.
    let prog = r#"python3 -c '
import sys
n = 0
for line in sys.stdin:
    n += 1
    print("0.5" if n <= 64 else "oops", flush=True)
'"#;
    let records = (0..8)
        .map(|i| {
            let mut m = serde_json::Map::new();
            m.insert("prompt".into(), format!("p{i}").into());
            m
        })
        .collect();
    let src = CommandReward::start(
        prog,
        records,
        Box::new(|t: &[u32]| format!("{t:?}")),
        std::time::Duration::from_secs(20),
    )
    .unwrap();
    let d = tempfile::tempdir().unwrap();
    let err = with_grpo(
        d.path(),
        8,
        vec![Weighted {
            source: Box::new(src),
            weight: 1.0,
        }],
        |g| g.train(false).unwrap_err(),
    );
    let err = format!("{err:#}");
    assert!(
        err.contains("\"oops\"") && err.contains("not a number"),
        "{err}"
    );
    let rd = RunDir::create(d.path()).unwrap();
    let last = rd.latest_checkpoint().unwrap().unwrap();
    assert!(last.ends_with("ckpt-0000004"), "{}", last.display());
    kiln_model::checkpoint::load_model(&last).unwrap();
}

/// GRPO with LoRA: the reference is the actor with its adapters off (no second model), sampling
/// goes through the adapters, the reward still rises, the KL to the base is positive, and only the
/// adapters change (the int8 base too).
#[test]
fn lora_actor_is_its_own_reference() {
    for base in [
        kiln_model::WeightFormat::F32,
        kiln_model::WeightFormat::Int8,
    ] {
        let dir = tempfile::tempdir().unwrap();
        // Larger base weights than the fresh init's, so a frozen head has the leverage to move the
        // policy (a fresh 16-wide model's logits are all near zero whatever its hidden states).
        let mut before = Model::new(cfg(), 1);
        for x in before.params.iter_mut() {
            *x *= 4.0;
        }
        let s = with_grpo(dir.path(), 24, vec![sevens()], |g| {
            g.actor = before.clone();
            g.cfg.beta = 0.05;
            g.cfg.lr = 2e-2;
            g.actor
                .attach_lora(
                    &kiln_model::LoraConfig {
                        rank: 4,
                        alpha: 8.0,
                        base_weights: base,
                        ..Default::default()
                    },
                    3,
                )
                .unwrap();
            let s = g.train(false).unwrap();
            assert!(g.actor.grads.is_empty());
            let n = g.actor.params.len();
            assert!(g.actor.params[..] == before.params[..n], "the base changed");
            // Adapters off: the base's logits exactly.
            let toks = [8u32, 9, 4, 7];
            let mut off = g.actor.clone();
            off.set_adapters_enabled(false);
            if base == kiln_model::WeightFormat::F32 {
                assert_eq!(off.logits(&toks), before.logits(&toks));
            }
            assert_ne!(
                g.actor.logits(&toks),
                off.logits(&toks),
                "the adapters trained"
            );
            s
        });
        for m in &s.history {
            assert_eq!(m["first_ratio_err"], 0.0, "{base}: {m:?}");
        }
        let (early, late) = (
            mean(&s.history, "reward", 0..4),
            mean(&s.history, "reward", 20..24),
        );
        eprintln!("LoRA {base}: reward {early:.3} → {late:.3}");
        assert!(late > early + 0.1, "{base}: reward {early} → {late}");
        assert!(
            s.history.last().unwrap()["kl"] > 0.0,
            "{base}: KL to the base"
        );
    }
}

/// Micro-batches accumulate into the minibatch's update: minibatches of 8 run as 3 + 3 + 2 rows
/// (and a short last one, 4, as 3 + 1) train the same weights as whole minibatches, to rounding,
/// with every first ratio still exactly 1 (the old log-probs come from the same passes).
#[test]
fn micro_batches_give_the_minibatchs_update() {
    let train = |micro: usize| {
        let dir = tempfile::tempdir().unwrap();
        with_grpo(dir.path(), 2, vec![sevens()], |g| {
            g.cfg.group_size = 5;
            g.cfg.micro_batch = micro;
            g.cfg.beta = 0.05;
            g.reference = Some(g.actor.clone());
            let s = g.train(false).unwrap();
            (s, g.actor.params.clone())
        })
    };
    let (whole, w) = train(0);
    let (parts, p) = train(3);
    for (a, b) in whole.history.iter().zip(&parts.history) {
        assert_eq!(b["first_ratio_err"], 0.0, "{b:?}");
        assert!((a["loss"] - b["loss"]).abs() < 1e-6, "{a:?} vs {b:?}");
        assert_eq!(a["reward"], b["reward"], "the same samples");
    }
    let moved = w
        .iter()
        .zip(&Model::new(cfg(), 1).params)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let diff = w
        .iter()
        .zip(&p)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(moved > 1e-3, "training moved the weights ({moved})");
    assert!(
        diff < 1e-5,
        "micro-batched weights differ by {diff} (moved {moved})"
    );
}
