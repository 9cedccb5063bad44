//! DPO and its variants: each loss and its gradient by hand, the whole gradient through a tiny
//! model against finite differences, ln 2 exactly at step 0, sequence log-probabilities over
//! response tokens only (packed or not), the reference cache across a resume, bad records, and the
//! real preference samples.

use kiln_data::datasets::{load_preferences, LoadOptions, Message, PrefRecord, RankedPrompt};
use kiln_data::template::{ChatTemplate, TextEncoder};
use kiln_model::{Activations, Arch, Input, Model, ModelConfig};
use kiln_train::dpo::{
    batch_loss, load_or_compute_reference, model_fingerprint, pair_loss, render_dpo_groups,
    response_kl, sequence_logps, DpoGroup, DpoLoss, DpoObjective, DpoOptions, DpoSettings, Origin,
    RefSource, Reference, REFERENCE_FILE,
};
use kiln_train::{Objective, RunDir, TrainConfig, Trainer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::f64::consts::LN_2;
use std::path::{Path, PathBuf};

const END: u32 = 5;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

fn settings(loss: DpoLoss, beta: f64) -> DpoSettings {
    DpoSettings {
        loss,
        beta,
        ..DpoSettings::default()
    }
}

/// A group whose responses have the given lengths (token values do not matter to `batch_loss`).
fn shaped(prompt_len: usize, resp_lens: &[usize], pairs: &[(usize, usize)]) -> DpoGroup {
    DpoGroup {
        seqs: resp_lens.iter().map(|&n| vec![9; prompt_len + n]).collect(),
        prompt_len,
        pairs: pairs.to_vec(),
    }
}

#[test]
fn each_loss_and_its_derivative_by_hand() {
    // sigmoid, β = 0.1, logits = 2: −log σ(0.2) = ln(1 + e^−0.2); d/dlogits = −β·σ(−0.2).
    let (l, d) = pair_loss(&settings(DpoLoss::Sigmoid, 0.1), 2.0);
    assert!(close(l, 0.598_138_869_381_591_8, 1e-14), "{l}");
    assert!(close(d, -0.045_016_600_268_752_22, 1e-14), "{d}");
    // At logits = 0 (policy = reference): ln 2, exactly.
    assert_eq!(pair_loss(&settings(DpoLoss::Sigmoid, 0.1), 0.0).0, LN_2);
    // Conservative DPO, ε = 0.1: 0.9·ln(1 + e^−0.2) + 0.1·ln(1 + e^0.2) = 0.598139 + 0.1·0.2.
    let cdpo = DpoSettings {
        label_smoothing: 0.1,
        ..settings(DpoLoss::Sigmoid, 0.1)
    };
    let (l, d) = pair_loss(&cdpo, 2.0);
    assert!(close(l, 0.618_138_869_381_591_8, 1e-14), "{l}");
    // β·(−0.9·σ(−0.2) + 0.1·σ(0.2)) = β·(−0.9·0.450166 + 0.1·0.549834).
    assert!(close(d, -0.035_016_600_268_752_22, 1e-14), "{d}");
    // IPO, β = 0.5: (logits − 1)², d = 2(logits − 1).
    assert_eq!(pair_loss(&settings(DpoLoss::Ipo, 0.5), 0.5), (0.25, -1.0));
    assert_eq!(pair_loss(&settings(DpoLoss::Ipo, 0.5), 1.0), (0.0, 0.0));
    // Hinge, β = 0.1: max(0, 1 − 0.1·logits).
    let h = settings(DpoLoss::Hinge, 0.1);
    let (l, d) = pair_loss(&h, 4.0);
    assert!(close(l, 0.6, 1e-15) && d == -0.1, "{l} {d}");
    assert_eq!(pair_loss(&h, 12.0), (0.0, 0.0));
}

#[test]
fn batch_losses_by_hand() {
    // Group A: a ranking of three with ranks 1, 2, 2 → pairs (0,1), (0,2) (the tie is never
    // paired). Group B: one pair. β = 0.5, sigmoid.
    let a = shaped(2, &[2, 3, 4], &[(0, 1), (0, 2)]);
    let b = shaped(3, &[1, 5], &[(0, 1)]);
    let logp = [-3.0, -5.0, -4.0, -2.0, -6.0];
    let refp = [-4.0, -4.0, -4.0, -3.0, -3.0];
    let s = settings(DpoLoss::Sigmoid, 0.5);
    let bl = batch_loss(&s, &[&a, &b], &logp, &refp);
    // logits: A(0,1) = (−3+4) − (−5+4) = 2, A(0,2) = 1 − 0 = 1, B = (−2+3) − (−6+3) = 4.
    // Losses ln(1+e^−1) = 0.3132617, ln(1+e^−0.5) = 0.4740770, ln(1+e^−2) = 0.1269280;
    // A's mean, then the mean over the two prompts.
    let (la, lb) = (
        (0.313_261_687_518_222_9 + 0.474_076_984_180_106_7) / 2.0,
        0.126_928_011_042_972_5,
    );
    assert!(close(bl.loss, (la + lb) / 2.0, 1e-14), "{}", bl.loss);
    // d/dlogits = −β·σ(−βx): −0.1344707, −0.1887703, −0.0596015; each pair weighs 1/(pairs·prompts).
    let (d01, d02, db) = (
        -0.134_470_710_684_997_55,
        -0.188_770_334_399_072_7,
        -0.059_601_461_011_058_77,
    );
    let want = [
        (d01 + d02) / 4.0,
        -d01 / 4.0,
        -d02 / 4.0,
        db / 2.0,
        -db / 2.0,
    ];
    for (g, w) in bl.dlogp.iter().zip(want) {
        assert!(close(*g, w, 1e-13), "{:?} vs {want:?}", bl.dlogp);
    }
    // TRL's metrics, over the 3 pairs: rewards β·(logπ − logref).
    let m = bl.metrics(false);
    assert!(close(
        m["rewards/chosen"],
        0.5 * (1.0 + 1.0 + 1.0) / 3.0,
        1e-15
    ));
    assert!(close(
        m["rewards/rejected"],
        0.5 * (-1.0 + 0.0 - 3.0) / 3.0,
        1e-15
    ));
    assert!(close(
        m["rewards/margins"],
        0.5 * (2.0 + 1.0 + 4.0) / 3.0,
        1e-15
    ));
    assert_eq!(m["rewards/accuracies"], 1.0);
    assert!(close(m["logps/chosen"], (-3.0 - 3.0 - 2.0) / 3.0, 1e-15));
    assert!(close(m["logps/rejected"], (-5.0 - 4.0 - 6.0) / 3.0, 1e-15));

    // IPO, β = 0.5, length-normalised: chosen −5 over 2 tokens (ref −6), rejected −3 over 3
    // (ref −3): logits = (−2.5 + 3) − (−1 + 1) = 0.5; loss (0.5 − 1)² = 0.25; d/dlogits = −1,
    // so d/dlogπ(y_w) = −1/2 and d/dlogπ(y_l) = +1/3.
    let g = shaped(4, &[2, 3], &[(0, 1)]);
    let bl = batch_loss(
        &settings(DpoLoss::Ipo, 0.5),
        &[&g],
        &[-5.0, -3.0],
        &[-6.0, -3.0],
    );
    assert!(close(bl.loss, 0.25, 1e-15));
    assert!(close(bl.dlogp[0], -0.5, 1e-15) && close(bl.dlogp[1], 1.0 / 3.0, 1e-15));
    let m = bl.metrics(false);
    // As TRL: IPO's rewards and logps are of the normalised log-probabilities.
    assert!(close(m["rewards/chosen"], 0.25, 1e-15) && m["rewards/rejected"] == 0.0);
    assert!(close(m["logps/chosen"], -2.5, 1e-15));

    // Hinge, β = 0.1: pair logits 4 → 0.6 (d −0.1), pair logits 12 → 0; mean over 2 prompts.
    let g1 = shaped(1, &[1, 1], &[(0, 1)]);
    let g2 = shaped(1, &[1, 1], &[(1, 0)]);
    let bl = batch_loss(
        &settings(DpoLoss::Hinge, 0.1),
        &[&g1, &g2],
        &[-1.0, -5.0, -20.0, -8.0],
        &[-2.0, -2.0, -2.0, -2.0],
    );
    assert!(close(bl.loss, 0.3, 1e-15));
    assert_eq!(bl.dlogp, vec![-0.05, 0.05, 0.0, 0.0]);

    // RPO: + sft_coef × the mean NLL per token of the preferred responses (A's rank 1 of 2
    // tokens, B's chosen of 1 token): 0.5 · (3 + 2)/3; each of their logps gets −0.5/3.
    let rpo = DpoSettings {
        sft_coef: 0.5,
        ..settings(DpoLoss::Sigmoid, 0.5)
    };
    let plain = batch_loss(&s, &[&a, &b], &logp, &refp);
    let bl = batch_loss(&rpo, &[&a, &b], &logp, &refp);
    assert!(close(bl.nll, 5.0 / 3.0, 1e-15));
    assert!(close(bl.loss, plain.loss + 0.5 * 5.0 / 3.0, 1e-14));
    for (i, (x, y)) in bl.dlogp.iter().zip(&plain.dlogp).enumerate() {
        let extra = if i == 0 || i == 3 { -0.5 / 3.0 } else { 0.0 };
        assert!(close(*x, y + extra, 1e-14), "{i}");
    }
}

#[test]
fn batch_loss_derivatives_match_finite_differences() {
    let a = shaped(2, &[2, 3, 4, 2], &[(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]);
    let b = shaped(3, &[1, 5], &[(1, 0)]);
    let logp = [-3.1, -5.2, -4.3, -2.2, -2.0, -6.5];
    let refp = [-4.0, -4.4, -3.9, -3.0, -3.3, -2.7];
    let variants = [
        settings(DpoLoss::Sigmoid, 0.3),
        DpoSettings {
            label_smoothing: 0.2,
            sft_coef: 0.7,
            ..settings(DpoLoss::Sigmoid, 0.3)
        },
        settings(DpoLoss::Ipo, 0.4),
        settings(DpoLoss::Hinge, 0.3),
    ];
    for s in variants {
        let bl = batch_loss(&s, &[&a, &b], &logp, &refp);
        for i in 0..logp.len() {
            let h = 1e-6;
            let (mut up, mut down) = (logp, logp);
            up[i] += h;
            down[i] -= h;
            let num = (batch_loss(&s, &[&a, &b], &up, &refp).loss
                - batch_loss(&s, &[&a, &b], &down, &refp).loss)
                / (2.0 * h);
            assert!(
                (num - bl.dlogp[i]).abs() < 1e-8,
                "{s:?} logp {i}: analytic {} numeric {num}",
                bl.dlogp[i]
            );
        }
    }
}

fn tiny_cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 24,
        n_ctx: 24,
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        arch: Arch::Decoder,
        ..ModelConfig::default()
    }
}

fn perturbed(seed: u64, scale: f32) -> Model {
    let mut m = Model::new(tiny_cfg(), 3);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for x in m.params.iter_mut() {
        *x += rng.gen_range(-scale..scale);
    }
    m
}

/// Random groups of tokens 8..24: a prompt, responses ending with the end-of-turn token; the
/// first group a ranking of three, the others pairs.
fn random_groups(n: usize, seed: u64) -> Vec<DpoGroup> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let prompt_len = rng.gen_range(2..6);
            let prompt: Vec<u32> = (0..prompt_len).map(|_| rng.gen_range(8..24)).collect();
            let k = if i == 0 { 3 } else { 2 };
            let seqs = (0..k)
                .map(|j| {
                    let mut s = prompt.clone();
                    s.extend((0..rng.gen_range(1..5)).map(|_| rng.gen_range(8..24)));
                    s.push(if j == 0 { 7 } else { 8 + j as u32 });
                    s.push(END);
                    s
                })
                .collect();
            let pairs = if k == 3 {
                vec![(0, 1), (0, 2), (1, 2)]
            } else {
                vec![(0, 1)]
            };
            DpoGroup {
                seqs,
                prompt_len,
                pairs,
            }
        })
        .collect()
}

fn options(s: DpoSettings, gpb: usize, packing: bool) -> DpoOptions {
    DpoOptions {
        settings: s,
        groups_per_batch: gpb,
        seq_len: 24,
        packing,
        seed: 7,
        kl_top_k: 8,
        kl_max_groups: 0,
    }
}

#[test]
fn the_whole_dpo_gradient_matches_finite_differences() {
    let groups = random_groups(4, 11);
    let reference = perturbed(2, 0.3);
    let variants = [
        settings(DpoLoss::Sigmoid, 0.5),
        DpoSettings {
            label_smoothing: 0.1,
            sft_coef: 0.3,
            ..settings(DpoLoss::Sigmoid, 0.5)
        },
        settings(DpoLoss::Ipo, 0.5),
        settings(DpoLoss::Hinge, 0.2),
    ];
    for s in variants {
        let mut model = perturbed(1, 0.3);
        // One batch holds every prompt; the validation set is the same prompts, so evaluate()'s
        // loss is the function micro_step differentiates.
        let mut obj = DpoObjective::new(
            &model,
            groups.clone(),
            groups.clone(),
            options(s, groups.len(), true),
            None,
        )
        .unwrap();
        let r = obj.compute_reference(&reference).unwrap();
        obj.use_reference(r).unwrap();
        model.zero_grads();
        let step = obj.micro_step(&mut model, 1.0).unwrap();
        let at = obj.evaluate(&model).unwrap()["loss"];
        assert!(close(step.loss, at, 1e-5), "{s:?}: {} vs {at}", step.loss);
        let analytic = model.grads.clone();
        let eps = 1e-2f32;
        for t in model.layout.tensors.clone() {
            let stride = (t.len / 10).max(1);
            let (mut diff2, mut num2) = (0.0f64, 0.0f64);
            for j in (0..t.len).step_by(stride) {
                let i = t.offset + j;
                let orig = model.params[i];
                model.params[i] = orig + eps;
                let lp = obj.evaluate(&model).unwrap()["loss"];
                model.params[i] = orig - eps;
                let lm = obj.evaluate(&model).unwrap()["loss"];
                model.params[i] = orig;
                let num = (lp - lm) / (2.0 * eps as f64);
                diff2 += (num - analytic[i] as f64).powi(2);
                num2 += num * num;
            }
            let rel = diff2.sqrt() / num2.sqrt().max(1e-4);
            assert!(
                rel < 3e-2,
                "{s:?} {}: relative gradient error {rel}",
                t.name
            );
        }
    }
}

/// Σ over response tokens of log softmax(logits of the position before)[token], from the model's
/// plain logits of the sequence alone (no batching, no padding, no packing).
fn brute_logp(model: &Model, seq: &[u32], prompt_len: usize) -> f64 {
    let logits = model.logits(seq);
    let v = model.cfg.vocab_size;
    (prompt_len..seq.len())
        .map(|j| {
            let z = &logits[(j - 1) * v..j * v];
            let mx = z.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            let lse = mx + z.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
            z[seq[j] as usize] as f64 - lse
        })
        .sum()
}

#[test]
fn sequence_logps_sum_the_response_tokens_only() {
    let model = perturbed(4, 0.3);
    let groups = random_groups(6, 5);
    let want: Vec<f64> = groups
        .iter()
        .flat_map(|g| g.seqs.iter().map(|s| brute_logp(&model, s, g.prompt_len)))
        .collect();
    // Packed several to a row, one per row (right-padded), in batches of 1 and of 4 prompts.
    for (gpb, packing) in [(4, true), (4, false), (1, true), (6, true)] {
        let got = sequence_logps(&model, &groups, gpb, 24, packing);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                close(*g, *w, 1e-5),
                "gpb {gpb} packing {packing} seq {i}: {g} vs {w}"
            );
        }
    }
    // The end-of-turn token counts: dropping it changes the sum by its log-probability.
    let g = &groups[1];
    let without: Vec<u32> = g.seqs[0][..g.seqs[0].len() - 1].to_vec();
    let end_lp = want[3] - brute_logp(&model, &without, g.prompt_len);
    assert!(end_lp < -1e-3, "the end token's log-probability {end_lp}");
    // Prompt tokens do not count: a longer prompt with the same response changes the sum only
    // through the conditioning, and a response of one token is one term.
    let one = DpoGroup {
        seqs: vec![vec![9, 10, 11, END], vec![9, 10, 11, 12]],
        prompt_len: 3,
        pairs: vec![(0, 1)],
    };
    let lp = sequence_logps(&model, std::slice::from_ref(&one), 1, 24, true);
    let logits = model.logits(&[9, 10, 11]);
    let v = model.cfg.vocab_size;
    let z = &logits[2 * v..3 * v];
    let lse = z.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
    assert!(close(lp[0], z[END as usize] as f64 - lse, 1e-5));
    assert!(close(lp[1], z[12] as f64 - lse, 1e-5));
}

fn train_cfg(steps: u64) -> TrainConfig {
    TrainConfig {
        max_steps: steps,
        batch_size: 2,
        lr: 3e-3,
        min_lr: 3e-3,
        warmup_steps: 2,
        weight_decay: 0.0,
        eval_every: 3,
        ckpt_every: 3,
        keep_last: 0,
        seed: 7,
        ..TrainConfig::default()
    }
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tok_per_s");
            v
        })
        .collect()
}

/// A DPO run the way the stage does it: the reference (the initial policy) through the run's
/// cache, then the trainer. Returns where the reference came from.
fn dpo_run(dir: &Path, steps: u64, resume: bool, s: DpoSettings) -> RefSource {
    let mut model = perturbed(1, 0.2);
    let groups = random_groups(10, 3);
    let val = random_groups(3, 4);
    let run = RunDir::create(dir).unwrap();
    let mut obj = DpoObjective::new(&model, groups, val, options(s, 2, true), None).unwrap();
    let key = obj.cache_key(&model_fingerprint(&model), model.precision);
    let resuming = resume && run.latest_checkpoint().unwrap().is_some();
    let (r, src) =
        load_or_compute_reference(&run, &key, resuming, || obj.compute_reference(&model)).unwrap();
    obj.use_reference(r).unwrap();
    let trainer = Trainer {
        cfg: train_cfg(steps),
        run: &run,
        extra_files: vec![],
        progress: false,
        label: "dpo".into(),
        final_files: None,
    };
    trainer.train(&mut model, &mut obj, resume).unwrap();
    src
}

#[test]
fn at_step_zero_the_sigmoid_loss_is_ln2_exactly_and_the_kl_zero() {
    let dir = tempfile::tempdir().unwrap();
    dpo_run(dir.path(), 2, false, settings(DpoLoss::Sigmoid, 0.1));
    let m = metrics(dir.path());
    // The evaluation before training: validation pairs, policy = reference.
    assert_eq!(m[0]["step"], 0);
    assert_eq!(m[0]["val_loss"].as_f64(), Some(LN_2), "{}", m[0]);
    assert_eq!(m[0]["val_kl"].as_f64(), Some(0.0), "{}", m[0]);
    assert_eq!(m[0]["val_rewards/margins"].as_f64(), Some(0.0));
    assert_eq!(m[0]["val_rewards/accuracies"].as_f64(), Some(0.0));
    // The first training step (before any update): every logit exactly 0.
    assert_eq!(m[1]["loss"].as_f64(), Some(LN_2), "{}", m[1]);
    assert_eq!(m[1]["rewards/chosen"].as_f64(), Some(0.0));
    assert_eq!(m[1]["rewards/rejected"].as_f64(), Some(0.0));
    // After one update the policy has moved: the loss is below ln 2 and the KL positive.
    assert!(m[2]["loss"].as_f64().unwrap() < LN_2, "{}", m[2]);
    assert!(m[2]["val_loss"].as_f64().unwrap() < LN_2, "{}", m[2]);
    assert!(m[2]["val_kl"].as_f64().unwrap() > 0.0, "{}", m[2]);
    assert!(
        m[2]["val_rewards/margins"].as_f64().unwrap() > 0.0,
        "{}",
        m[2]
    );
}

#[test]
fn a_resumed_run_reads_the_cache_and_continues_bit_for_bit() {
    let s = DpoSettings {
        sft_coef: 0.2,
        ..settings(DpoLoss::Sigmoid, 0.1)
    };
    let whole = tempfile::tempdir().unwrap();
    assert!(matches!(
        dpo_run(whole.path(), 6, false, s),
        RefSource::Computed(_)
    ));
    // The same run in two parts: 3 steps (a checkpoint at 3), then --resume to 6. The learning
    // rate is constant, so stopping at 3 changes no schedule.
    let parts = tempfile::tempdir().unwrap();
    let first = dpo_run(parts.path(), 3, false, s);
    assert_eq!(first, RefSource::Computed("no cache yet".into()));
    let cache = parts.path().join(REFERENCE_FILE);
    let bytes = std::fs::read(&cache).unwrap();
    let second = dpo_run(parts.path(), 6, true, s);
    assert_eq!(
        second,
        RefSource::Loaded,
        "the resumed run recomputed the reference"
    );
    assert!(
        std::fs::read(&cache).unwrap() == bytes,
        "the cache was rewritten"
    );
    let (a, b) = (metrics(whole.path()), metrics(parts.path()));
    assert_eq!(a.len(), 7);
    assert_eq!(a, b, "a resumed DPO run differs from an uninterrupted one");
    // The cache is the same numbers an uninterrupted run computed.
    assert!(std::fs::read(whole.path().join(REFERENCE_FILE)).unwrap() == bytes);
}

#[test]
fn the_cache_is_checked_against_its_data_reference_and_settings() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    let model = perturbed(1, 0.2);
    let mut obj = DpoObjective::new(
        &model,
        random_groups(4, 3),
        random_groups(2, 4),
        options(settings(DpoLoss::Sigmoid, 0.1), 2, true),
        None,
    )
    .unwrap();
    let key = obj.cache_key(&model_fingerprint(&model), model.precision);
    let computed = obj.compute_reference(&model).unwrap();
    let (r, src) = load_or_compute_reference(&run, &key, false, || Ok(computed.clone())).unwrap();
    assert_eq!(
        (r.clone(), src),
        (computed.clone(), RefSource::Computed("no cache yet".into()))
    );
    // The file round-trips exactly.
    let never = || -> anyhow::Result<Reference> { panic!("recomputed a valid cache") };
    let (back, src) = load_or_compute_reference(&run, &key, true, never).unwrap();
    assert_eq!((back, src), (computed.clone(), RefSource::Loaded));
    // Another reference: refused when resuming, recomputed on a fresh run.
    let other = obj.cache_key(&model_fingerprint(&perturbed(9, 0.2)), model.precision);
    let err = load_or_compute_reference(&run, &other, true, never).unwrap_err();
    assert!(
        format!("{err:#}").contains("another reference model"),
        "{err:#}"
    );
    let (_, src) = load_or_compute_reference(&run, &other, false, || Ok(computed.clone())).unwrap();
    assert!(
        matches!(src, RefSource::Computed(ref why) if why.contains("another reference")),
        "{src:?}"
    );
    // Other data.
    let mut obj2 = DpoObjective::new(
        &model,
        random_groups(4, 30),
        random_groups(2, 4),
        options(settings(DpoLoss::Sigmoid, 0.1), 2, true),
        None,
    )
    .unwrap();
    let key2 = obj2.cache_key(&model_fingerprint(&perturbed(9, 0.2)), model.precision);
    let err = load_or_compute_reference(&run, &key2, true, never).unwrap_err();
    assert!(format!("{err:#}").contains("other data"), "{err:#}");
    // Reference numbers of other data do not fit.
    assert!(obj2.use_reference(Reference::default()).is_err());
    // A corrupt cache is recomputed, even when resuming.
    let path = dir.path().join(REFERENCE_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let (_, src) = load_or_compute_reference(&run, &other, true, || Ok(computed.clone())).unwrap();
    assert!(
        matches!(src, RefSource::Computed(ref why) if why.contains("corrupt")),
        "{src:?}"
    );
}

/// Text → ids 8..24 (one per character; a fake tokenizer for the tiny model).
/// Kiln's template over a test encoder, as the chat format DPO renders with.
fn kiln_chat<E: TextEncoder>(enc: E, tpl: &ChatTemplate) -> kiln_data::chat_format::KilnChat<E> {
    kiln_data::chat_format::KilnChat {
        template: tpl.clone(),
        enc,
    }
}

struct Chars;
impl TextEncoder for Chars {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(|b| 8 + (b as u32 % 16)).collect()
    }
}

fn ranked(prompt: &str, choices: &[(&str, u32)]) -> PrefRecord {
    PrefRecord::Ranked(RankedPrompt {
        prompt: vec![Message::user(prompt)],
        choices: choices.iter().map(|&(t, r)| (t.to_string(), r)).collect(),
    })
}

fn origins(n: usize) -> Vec<Origin> {
    (0..n)
        .map(|i| Origin {
            file: PathBuf::from("prefs.jsonl"),
            loc: Some(kiln_data::datasets::RecordLoc::Line(i + 1)),
        })
        .collect()
}

#[test]
fn bad_records_fail_with_their_place_or_are_skipped_and_counted() {
    let tpl = ChatTemplate::default();
    let good = ranked("ab", &[("c", 1), ("d", 2), ("e", 3)]);
    let cases: [(PrefRecord, &str); 4] = [
        (
            ranked("ab", &[("same", 1), ("same", 2), ("x", 3)]),
            "are the same text",
        ),
        (
            ranked(&"p".repeat(30), &[("c", 1), ("d", 2)]),
            "the prompt is",
        ),
        (
            ranked("ab", &[(&"r".repeat(30), 1), ("d", 2)]),
            "does not fit",
        ),
        (
            PrefRecord::Scored {
                prompt: vec![Message::user("ab")],
                response: "c".into(),
                score: 1.0,
            },
            "no preference",
        ),
    ];
    for (bad, needle) in &cases {
        let records = vec![good.clone(), bad.clone(), good.clone()];
        let err = render_dpo_groups(&kiln_chat(Chars, &tpl), &records, &origins(3), 24, false)
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("prefs.jsonl:2: ") && msg.contains(needle),
            "{msg}"
        );
        assert!(msg.contains("--skip-bad-records"), "{msg}");
        let (groups, report) =
            render_dpo_groups(&kiln_chat(Chars, &tpl), &records, &origins(3), 24, true).unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(report.total_skipped(), 1, "{report:?}");
        assert!(report.first_error.as_deref().unwrap().contains(needle));
    }
    // Ties within a ranking are fine (never paired); a good ranking gives every ordered pair.
    let (groups, _) = render_dpo_groups(
        &kiln_chat(Chars, &tpl),
        &[ranked("ab", &[("c", 1), ("d", 2), ("e", 2), ("f", 3)])],
        &origins(1),
        24,
        false,
    )
    .unwrap();
    assert_eq!(
        groups[0].pairs,
        vec![(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    );
    assert_eq!(groups[0].top(), vec![0]);
    // Every response ends with the end-of-turn token and follows the same prompt.
    let g = &groups[0];
    for s in &g.seqs {
        assert_eq!(*s.last().unwrap(), END);
        assert_eq!(s[..g.prompt_len], g.seqs[0][..g.prompt_len]);
    }
    // A prompt that fits but not with its longest response is cut at its start, for every
    // response alike.
    let (groups, report) = render_dpo_groups(
        &kiln_chat(Chars, &tpl),
        &[ranked(&"p".repeat(16), &[("rrrrrr", 1), ("d", 2)])],
        &origins(1),
        24,
        false,
    )
    .unwrap();
    assert_eq!(report.truncated_prompts, 1);
    let g = &groups[0];
    assert_eq!(g.seqs[0].len(), 24);
    assert_eq!(g.prompt_len, 24 - 7);
    assert_eq!(g.seqs[1].len(), g.prompt_len + 2);
}

#[test]
fn loader_level_bad_records_are_counted_too() {
    // Empty responses and all-tied rankings are the reader's to catch (file, line, field).
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.jsonl");
    std::fs::write(
        &p,
        concat!(
            "{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\"}\n",
            "{\"prompt\": \"q\", \"chosen\": \"  \", \"rejected\": \"b\"}\n",
            "{\"input\": \"q\", \"choices\": [{\"text\": \"a\", \"rank\": 1}, {\"text\": \"b\", \"rank\": 1}]}\n",
            "{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"a\"}\n",
        ),
    )
    .unwrap();
    let err = load_preferences(&p, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("p.jsonl:2: field \"chosen\": empty response"),
        "{err}"
    );
    let l = load_preferences(&p, &LoadOptions::SKIP_BAD).unwrap();
    assert_eq!((l.records.len(), l.skipped), (1, 3));
    assert_eq!(l.locations, vec![kiln_data::datasets::RecordLoc::Line(1)]);
}

fn shared_data(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data")
        .join(name);
    let alt = PathBuf::from("/work/shared/data").join(name);
    [p, alt].into_iter().find(|p| p.exists())
}

/// Bytes → ids 8..264 (a lossless byte-level stand-in for the tokenizer).
struct Bytes;
impl TextEncoder for Bytes {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(|b| 8 + b as u32).collect()
    }
}

#[test]
fn real_preference_samples_render_as_pairs() {
    let tpl = ChatTemplate::default();
    for (name, min_records) in [
        ("hh_rlhf_harmless_base_test.jsonl.gz", 2000),
        ("hh_rlhf_tiny.json", 1),
        ("stack_exchange_paired_tiny.json", 20),
    ] {
        let Some(path) = shared_data(name) else {
            eprintln!("skipping {name}: the shared data folder is absent");
            continue;
        };
        let l = load_preferences(&path, &LoadOptions::SKIP_BAD).unwrap();
        assert!(
            l.records.len() >= min_records,
            "{name}: {}",
            l.records.len()
        );
        let o: Vec<Origin> = l
            .locations
            .iter()
            .map(|&loc| Origin {
                file: path.clone(),
                loc: Some(loc),
            })
            .collect();
        let (groups, report) =
            render_dpo_groups(&kiln_chat(Bytes, &tpl), &l.records, &o, 4096, true).unwrap();
        assert!(
            groups.len() + report.total_skipped() == l.records.len() && !groups.is_empty(),
            "{name}: {} groups, {report:?}",
            groups.len()
        );
        for g in &groups {
            assert_eq!(g.pairs, vec![(0, 1)], "{name}: one pair per record");
            assert_eq!(
                g.seqs[0][g.prompt_len - 1],
                kiln_data::template::ids::ASSISTANT
            );
            assert!(g.seqs.iter().all(|s| *s.last().unwrap() == END));
            assert_ne!(g.seqs[0], g.seqs[1]);
        }
        // A short context skips the long dialogues (counted) and keeps the rest.
        let (short, r) =
            render_dpo_groups(&kiln_chat(Bytes, &tpl), &l.records, &o, 256, true).unwrap();
        assert_eq!(short.len() + r.total_skipped(), l.records.len(), "{name}");
    }
}

#[test]
fn dpo_learns_a_preference_it_is_shown() {
    // Each prompt prefers the response ending in token 7 to those ending in 9 or 10: after training,
    // held-out pairs of the same kind are ranked right and the margins are positive.
    let mut model = perturbed(1, 0.05);
    let train = random_groups(24, 21);
    let val = random_groups(8, 22);
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    let mut obj = DpoObjective::new(
        &model,
        train,
        val,
        options(settings(DpoLoss::Sigmoid, 0.5), 4, true),
        None,
    )
    .unwrap();
    let r = obj.compute_reference(&model).unwrap();
    obj.use_reference(r).unwrap();
    let trainer = Trainer {
        cfg: TrainConfig {
            max_steps: 60,
            lr: 1e-2,
            min_lr: 1e-3,
            warmup_steps: 5,
            eval_every: 60,
            ckpt_every: 60,
            ..train_cfg(60)
        },
        run: &run,
        extra_files: vec![],
        progress: false,
        label: "dpo".into(),
        final_files: None,
    };
    let s = trainer.train(&mut model, &mut obj, false).unwrap();
    assert_eq!(s.eval_start["loss"], LN_2);
    // 10 held-out pairs: 7 of "7 over 9" and the ranking's 3 (its "9 over 10" is a coin toss).
    assert!(s.eval["rewards/accuracies"] >= 0.8, "{:?}", s.eval);
    assert!(s.eval["rewards/margins"] > 0.5, "{:?}", s.eval);
    assert!(s.eval["loss"] < 0.4, "{:?}", s.eval);
    assert!(s.eval["kl"] > 0.0);
}

#[test]
fn response_kl_is_exact_and_zero_against_itself() {
    let (p, q) = (perturbed(1, 0.3), perturbed(2, 0.3));
    let items = vec![
        (vec![9u32, 10, 11], vec![12u32, END]),
        (vec![13u32], vec![14u32, 15, 16, END]),
        (vec![13u32, 8], vec![]),
    ];
    let same = response_kl(&p, &p, &items).unwrap();
    assert!(same.iter().all(|&x| x.abs() < 1e-12), "{same:?}");
    let kl = response_kl(&p, &q, &items).unwrap();
    assert!(kl[0] > 0.0 && kl[1] > 0.0 && kl[2] == 0.0, "{kl:?}");
    // A one-token response: KL of the two next-token distributions, here from the training forward
    // pass's probabilities (another code path).
    let probs = |m: &Model| {
        let mut acts = Activations::new(&m.cfg, 1, 3, true);
        let input = Input {
            tokens: &[9, 10, 11],
            positions: &[0, 1, 2],
            valid: None,
            segments: None,
            b: 1,
            t: 3,
        };
        m.forward(&mut acts, &input);
        m.lm_head(&mut acts, &[u32::MAX; 3], 1.0);
        acts.logits[2 * 24..3 * 24].to_vec()
    };
    let (pp, qq) = (probs(&p), probs(&q));
    let want: f64 = pp
        .iter()
        .zip(&qq)
        .map(|(&a, &b)| a as f64 * ((a as f64).ln() - (b as f64).ln()))
        .sum();
    let one = response_kl(&p, &q, &[(vec![9, 10, 11], vec![12])]).unwrap();
    assert!(close(one[0], want, 1e-5), "{} vs {want}", one[0]);
}

/// A Hugging Face model's own tokenizer and Jinja template (the `llama3_chat` fixture, made by
/// transformers): each sequence is exactly what `apply_chat_template` gives for the conversation
/// (prompt, response) up to the response's end-of-turn token, and the prompt part is the
/// generation prompt's ids.
#[test]
fn dpo_groups_render_with_a_hugging_face_template() {
    use kiln_data::chat_format::JinjaChat;
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../kiln-model/tests/fixtures/llama3_chat");
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("chat_expected.json")).unwrap())
            .unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let tok = kiln_data::Tokenizer::load_dir(&dir).unwrap();
    let src = std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap();
    let chat = JinjaChat::new(&src, tok.clone()).unwrap();
    let question = e["messages"][0]["content"].as_str().unwrap();
    let answer = e["messages"][1]["content"].as_str().unwrap();
    let records = vec![PrefRecord::Ranked(RankedPrompt {
        prompt: vec![Message::user(question)],
        choices: vec![(answer.to_string(), 1), ("I do not know.".to_string(), 2)],
    })];
    let origins = vec![Origin {
        file: PathBuf::from("prefs.jsonl"),
        loc: None,
    }];
    let (groups, report) = render_dpo_groups(&chat, &records, &origins, 64, false).unwrap();
    assert_eq!(report.total_skipped(), 0);
    let g = &groups[0];
    let prompt = ids(&e["prompt_ids"]);
    assert_eq!(g.prompt_len, prompt.len());
    assert_eq!(
        g.seqs[0],
        ids(&e["ids"]),
        "the chosen conversation, as transformers renders it"
    );
    assert_eq!(&g.seqs[1][..g.prompt_len], &prompt[..]);
    assert_eq!(
        tok.decode(&g.seqs[1][g.prompt_len..]),
        "I do not know.<|eot_id|>"
    );
    assert_eq!(g.pairs, vec![(0, 1)]);
    // A template that renders no assistant turn is a clear error naming the record.
    let users = JinjaChat::new(
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}<|eot_id|>{% endif %}{% endfor %}",
        tok,
    )
    .unwrap();
    let err = render_dpo_groups(&users, &records, &origins, 64, false).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("prefs.jsonl"), "{msg}");
    assert!(
        msg.contains("renders nothing for assistant message"),
        "{msg}"
    );
}
