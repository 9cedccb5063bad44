//! `train.precision = "bf16"`: the shared training loop runs the model's matmuls with bf16 operands
//! (f32 accumulation, master weights and optimizer), and a small model's loss curve tracks f32's.

use anyhow::Result;
use kiln_kernels::Precision;
use kiln_model::{Activations, Arch, Input, Model, ModelConfig};
use kiln_train::{Metrics, Objective, RunDir, StepStats, TrainConfig, Trainer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

const V: usize = 48;
const B: usize = 8;
const T: usize = 32;

/// Next-token prediction on sequences that follow a fixed rule from a random start
/// (`x[i+1] = (5 x[i] + 3) mod V`, with a random token every 8th position), so the loss has
/// somewhere to go in a few dozen steps.
struct Pattern {
    rng: ChaCha8Rng,
    acts: Activations,
    losses: Vec<f64>,
}

impl Pattern {
    fn batch(&mut self) -> (Vec<u32>, Vec<u32>) {
        let (mut tokens, mut targets) = (Vec::new(), Vec::new());
        for _ in 0..B {
            let mut x = self.rng.gen_range(0..V as u32);
            let mut row = vec![x];
            for i in 1..=T {
                x = if i % 8 == 0 {
                    self.rng.gen_range(0..V as u32)
                } else {
                    (5 * x + 3) % V as u32
                };
                row.push(x);
            }
            tokens.extend_from_slice(&row[..T]);
            targets.extend_from_slice(&row[1..]);
        }
        (tokens, targets)
    }

    fn loss(&mut self, model: &Model, tokens: &[u32], targets: &[u32]) -> f64 {
        let positions: Vec<u32> = (0..B * T).map(|i| (i % T) as u32).collect();
        let input = Input {
            tokens,
            positions: &positions,
            valid: None,
            segments: None,
            b: B,
            t: T,
        };
        model.forward(&mut self.acts, &input);
        model.lm_head(&mut self.acts, targets, 1.0);
        -self.acts.logp.iter().map(|&l| l as f64).sum::<f64>() / (B * T) as f64
    }
}

impl Objective for Pattern {
    fn micro_step(&mut self, model: &mut Model, grad_scale: f32) -> Result<StepStats> {
        let (tokens, targets) = self.batch();
        let loss = self.loss(model, &tokens, &targets);
        let dlogp = vec![-grad_scale / (B * T) as f32; B * T];
        model.lm_head_backward(&mut self.acts, &dlogp, None);
        model.backward(&mut self.acts);
        self.losses.push(loss);
        Ok(StepStats {
            loss,
            tokens: B * T,
            extra: BTreeMap::new(),
        })
    }
    fn evaluate(&mut self, model: &Model) -> Result<Metrics> {
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        std::mem::swap(&mut rng, &mut self.rng);
        let (tokens, targets) = self.batch();
        std::mem::swap(&mut rng, &mut self.rng);
        let loss = self.loss(model, &tokens, &targets);
        Ok(Metrics::from([("loss".to_string(), loss)]))
    }
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn restore(&mut self, _: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}

/// Trains a fresh small model for `steps` steps through the shared loop; the per-step losses, the
/// final validation loss and the model's precision after training.
fn train(precision: Precision, steps: u64) -> (Vec<f64>, f64, Precision) {
    let cfg = ModelConfig {
        vocab_size: V,
        n_ctx: T,
        n_layer: 2,
        n_head: 2,
        n_embd: 64,
        arch: Arch::Decoder,
        score_head: false,
        ..ModelConfig::default()
    };
    let mut model = Model::new(cfg.clone(), 3);
    let mut obj = Pattern {
        rng: ChaCha8Rng::seed_from_u64(5),
        acts: Activations::new(&cfg, B, T, true),
        losses: Vec::new(),
    };
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    let trainer = Trainer {
        cfg: TrainConfig {
            max_steps: steps,
            batch_size: B,
            lr: 1e-2,
            min_lr: 1e-3,
            warmup_steps: 5,
            eval_every: 0,
            ckpt_every: 0,
            precision,
            ..TrainConfig::default()
        },
        run: &run,
        extra_files: Vec::new(),
        progress: false,
        label: "precision".into(),
        final_files: None,
    };
    let summary = trainer.train(&mut model, &mut obj, false).unwrap();
    (obj.losses, summary.eval["loss"], model.precision)
}

#[test]
fn bf16_loss_curve_tracks_f32() {
    let steps = 40;
    let (f32_losses, f32_val, p32) = train(Precision::F32, steps);
    let (bf16_losses, bf16_val, p16) = train(Precision::Bf16, steps);
    assert_eq!((p32, p16), (Precision::F32, Precision::Bf16));
    eprintln!("bf16 hardware: {:?}", kiln_kernels::bf16::hardware());
    for (i, (a, b)) in f32_losses.iter().zip(&bf16_losses).enumerate() {
        if i % 5 == 0 || i + 1 == f32_losses.len() {
            eprintln!("step {:>3}: f32 {a:.4}  bf16 {b:.4}", i + 1);
        }
    }
    eprintln!("val: f32 {f32_val:.4}  bf16 {bf16_val:.4}");
    // The setting reaches the matmuls: the runs differ...
    assert_ne!(f32_losses, bf16_losses, "bf16 run is bit-identical to f32");
    // ...the task is learnt...
    assert!(
        f32_losses[f32_losses.len() - 1] < 0.5 * f32_losses[0],
        "f32 did not learn"
    );
    // ...and bf16 follows f32 step by step, and ends at the same validation loss.
    for (i, (a, b)) in f32_losses.iter().zip(&bf16_losses).enumerate() {
        assert!(
            (a - b).abs() <= 0.03 * a.max(0.5),
            "step {}: f32 loss {a:.4} vs bf16 {b:.4}",
            i + 1
        );
    }
    assert!(
        (f32_val - bf16_val).abs() <= 0.03 * f32_val.max(0.5),
        "val loss f32 {f32_val:.4} vs bf16 {bf16_val:.4}"
    );
}
