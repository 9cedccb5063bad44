//! Pretraining objectives over token shards: next-token prediction (GPT) and masked-LM (BERT-style).

use crate::trainer::{Metrics, Objective, StepStats};
use anyhow::{bail, Context, Result};
use kiln_data::shards::ShardSet;
use kiln_data::tokenizer::{special, Tokenizer};
use kiln_kernels::IGNORE;
use kiln_model::{Activations, Arch, GenerateOptions, Input, Model, Sampling};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Which pretraining objective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PretrainKind {
    /// Next-token prediction with causal attention (GPT).
    Causal,
    /// Masked-LM with bidirectional attention (BERT): 15% of positions, 80/10/10.
    Mlm,
}

/// BERT masking of one sequence, in place. Chooses round(`rate`·n) of the n non-special positions
/// (at least one); of those 80% become `<|mask|>`, 10% a random non-special token, 10% stay. Returns the
/// targets: the original token at chosen positions, `IGNORE` elsewhere.
pub fn mlm_mask<R: Rng>(tokens: &mut [u32], vocab: usize, rate: f64, rng: &mut R) -> Vec<u32> {
    let mut targets = vec![IGNORE; tokens.len()];
    let mut eligible: Vec<usize> = (0..tokens.len())
        .filter(|&i| tokens[i] >= special::COUNT)
        .collect();
    if eligible.is_empty() {
        return targets;
    }
    let n_choose = ((eligible.len() as f64 * rate).round() as usize).clamp(1, eligible.len());
    // Partial Fisher–Yates: the first n_choose entries become a uniform random subset.
    for i in 0..n_choose {
        let j = rng.gen_range(i..eligible.len());
        eligible.swap(i, j);
    }
    for &pos in &eligible[..n_choose] {
        targets[pos] = tokens[pos];
        let u: f64 = rng.gen();
        if u < 0.8 {
            tokens[pos] = special::MASK;
        } else if u < 0.9 {
            tokens[pos] = rng.gen_range(special::COUNT..vocab as u32);
        }
    }
    targets
}

/// Reads `out.len()` tokens starting at `start`, wrapping around the end of the split.
fn read_wrapping(set: &ShardSet, start: usize, out: &mut [u32]) {
    let len = set.len();
    let mut filled = 0;
    let mut pos = start % len;
    while filled < out.len() {
        let take = (len - pos).min(out.len() - filled);
        set.read(pos, &mut out[filled..filled + take]);
        filled += take;
        pos = (pos + take) % len;
    }
}

#[derive(Serialize, Deserialize)]
struct LmState {
    pos: usize,
    rng: [u8; 32],
    rng_word: u128,
}

/// Pretraining on shards written by `kiln data prepare`.
pub struct LmObjective {
    kind: PretrainKind,
    train: ShardSet,
    val: ShardSet,
    b: usize,
    t: usize,
    vocab: usize,
    eval_batches: usize,
    pos: usize,
    rng: ChaCha8Rng,
    acts: Activations,
    tokenizer: Option<Tokenizer>,
    sample_rng: ChaCha8Rng,
    buf: Vec<u32>,
}

impl LmObjective {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: PretrainKind,
        data_dir: &Path,
        model: &Model,
        b: usize,
        t: usize,
        eval_batches: usize,
        seed: u64,
        tokenizer: Option<Tokenizer>,
    ) -> Result<Self> {
        let train = ShardSet::open_dir(data_dir, "train")
            .with_context(|| format!("opening the train shards in {}", data_dir.display()))?;
        let val = ShardSet::open_dir(data_dir, "val")
            .with_context(|| format!("opening the val shards in {}", data_dir.display()))?;
        let vocab = model.cfg.vocab_size;
        for (name, set) in [("train", &train), ("val", &val)] {
            if set.is_empty() {
                bail!("{}: the {name} split has no tokens", data_dir.display());
            }
            if set.vocab_size() > vocab {
                bail!(
                    "{}: shards use a vocabulary of {} tokens but the model has {vocab} (shards from another tokenizer?)",
                    data_dir.display(),
                    set.vocab_size()
                );
            }
        }
        if let Some(tok) = &tokenizer {
            if train.fingerprint() != tok.fingerprint() {
                bail!(
                    "{}: shards were made with tokenizer {} but the run uses tokenizer {} (re-run kiln data prepare)",
                    data_dir.display(),
                    train.fingerprint(),
                    tok.fingerprint()
                );
            }
        }
        if t > model.cfg.n_ctx {
            bail!(
                "sequence length {t} exceeds the model's context {}",
                model.cfg.n_ctx
            );
        }
        let expected = match kind {
            PretrainKind::Causal => Arch::Decoder,
            PretrainKind::Mlm => Arch::Encoder,
        };
        if model.cfg.arch != expected {
            bail!("objective {kind:?} needs a model of arch {expected:?}");
        }
        Ok(LmObjective {
            kind,
            train,
            val,
            b,
            t,
            vocab,
            eval_batches,
            pos: 0,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x6d6c6d),
            acts: Activations::new(&model.cfg, b, t, true),
            tokenizer,
            sample_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x73616d70),
            buf: vec![0; b * t + 1],
        })
    }

    /// Builds (tokens, targets) for one batch starting at `start` of `split`.
    fn batch(
        &mut self,
        from_val: bool,
        start: usize,
        rng_seed: Option<u64>,
    ) -> (Vec<u32>, Vec<u32>) {
        let (b, t) = (self.b, self.t);
        let set = if from_val { &self.val } else { &self.train };
        read_wrapping(set, start, &mut self.buf);
        match self.kind {
            PretrainKind::Causal => (self.buf[..b * t].to_vec(), self.buf[1..].to_vec()),
            PretrainKind::Mlm => {
                // Each row starts with <|endoftext|> as its [CLS] token.
                let mut tokens = vec![0u32; b * t];
                for r in 0..b {
                    tokens[r * t] = special::EOT;
                    tokens[r * t + 1..(r + 1) * t].copy_from_slice(&self.buf[r * t..r * t + t - 1]);
                }
                let mut targets = Vec::with_capacity(b * t);
                let mut eval_rng = rng_seed.map(ChaCha8Rng::seed_from_u64);
                for row in tokens.chunks_mut(t) {
                    let rng: &mut ChaCha8Rng = match eval_rng.as_mut() {
                        Some(r) => r,
                        None => &mut self.rng,
                    };
                    targets.extend(mlm_mask(row, self.vocab, 0.15, rng));
                }
                (tokens, targets)
            }
        }
    }

    /// The next training batch, advancing the data position (and the masking RNG).
    fn next_train_batch(&mut self) -> (Vec<u32>, Vec<u32>) {
        let batch = self.batch(false, self.pos, None);
        self.pos = (self.pos + self.b * self.t) % self.train.len();
        batch
    }

    fn forward_loss(
        &mut self,
        model: &Model,
        tokens: &[u32],
        targets: &[u32],
    ) -> (f64, usize, usize) {
        let (b, t) = (self.b, self.t);
        let positions: Vec<u32> = (0..b * t).map(|i| (i % t) as u32).collect();
        let input = Input {
            tokens,
            positions: &positions,
            valid: None,
            segments: None,
            b,
            t,
        };
        model.forward(&mut self.acts, &input);
        model.lm_head(&mut self.acts, targets, 1.0);
        let mut loss = 0.0f64;
        let mut count = 0;
        let mut correct = 0;
        let v = self.vocab;
        for (i, &tg) in targets.iter().enumerate() {
            if tg == IGNORE {
                continue;
            }
            loss -= self.acts.logp[i] as f64;
            count += 1;
            let row = &self.acts.logits[i * v..(i + 1) * v];
            let argmax = row
                .iter()
                .enumerate()
                .fold(0, |best, (j, &p)| if p > row[best] { j } else { best });
            if argmax as u32 == tg {
                correct += 1;
            }
        }
        (loss / count.max(1) as f64, count, correct)
    }
}

impl Objective for LmObjective {
    fn micro_step(&mut self, model: &mut Model, grad_scale: f32) -> Result<StepStats> {
        let n = self.b * self.t;
        let (tokens, targets) = self.next_train_batch();
        let (loss, count, correct) = self.forward_loss(model, &tokens, &targets);
        let w = -grad_scale / count.max(1) as f32;
        let dlogp: Vec<f32> = targets
            .iter()
            .map(|&tg| if tg == IGNORE { 0.0 } else { w })
            .collect();
        model.lm_head_backward(&mut self.acts, &dlogp, None);
        model.backward(&mut self.acts);
        let mut extra = Metrics::new();
        if self.kind == PretrainKind::Mlm {
            extra.insert("mlm_acc".into(), correct as f64 / count.max(1) as f64);
        }
        Ok(StepStats {
            loss,
            tokens: n,
            extra,
        })
    }

    fn skip_micro_batch(&mut self) -> Result<()> {
        // MLM masks draw a data-dependent number of random values: make the batch to skip it.
        self.next_train_batch();
        Ok(())
    }

    fn evaluate(&mut self, model: &Model) -> Result<Metrics> {
        let n = self.b * self.t;
        let batches = self
            .eval_batches
            .max(1)
            .min(self.val.len().div_ceil(n).max(1));
        let (mut loss, mut count, mut correct) = (0.0, 0usize, 0usize);
        let mut freq = std::collections::HashMap::<u32, usize>::new();
        for i in 0..batches {
            // Fixed masks for evaluation, so figures are comparable across steps.
            let (tokens, targets) = self.batch(true, i * n, Some(0xe7a1 + i as u64));
            for &t in targets.iter().filter(|&&t| t != IGNORE) {
                *freq.entry(t).or_default() += 1;
            }
            let (l, c, k) = self.forward_loss(model, &tokens, &targets);
            loss += l * c as f64;
            count += c;
            correct += k;
        }
        let loss = loss / count.max(1) as f64;
        let mut m = Metrics::new();
        m.insert("loss".into(), loss);
        m.insert("ppl".into(), loss.exp());
        if self.kind == PretrainKind::Mlm {
            m.insert("mlm_acc".into(), correct as f64 / count.max(1) as f64);
            // Always guessing the most frequent masked token: the bar accuracy must clear.
            let top = freq.values().copied().max().unwrap_or(0);
            m.insert("mlm_baseline".into(), top as f64 / count.max(1) as f64);
        }
        Ok(m)
    }

    fn sample(&mut self, model: &Model) -> Result<Option<String>> {
        let Some(tok) = &self.tokenizer else {
            return Ok(None);
        };
        if self.kind != PretrainKind::Causal {
            return Ok(None);
        }
        let opts = GenerateOptions {
            max_new_tokens: 48.min(model.cfg.n_ctx - 1),
            sampling: Sampling {
                temperature: 0.8,
                top_k: 40,
                top_p: 1.0,
            },
            stop_tokens: vec![special::EOT],
        };
        let out = kiln_model::generate(
            model,
            &[vec![special::EOT]],
            &opts,
            &mut self.sample_rng,
            |_, _| {},
        )?;
        Ok(Some(tok.decode_skip_special(&out[0])))
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(LmState {
            pos: self.pos,
            rng: self.rng.get_seed(),
            rng_word: self.rng.get_word_pos(),
        })
        .unwrap()
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let s: LmState =
            serde_json::from_value(state.clone()).context("trainer_state.json: objective state")?;
        self.pos = s.pos;
        self.rng = ChaCha8Rng::from_seed(s.rng);
        self.rng.set_word_pos(s.rng_word);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlm_masking_statistics() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (mut chosen, mut masked, mut random, mut kept, mut eligible) = (0, 0, 0, 0, 0);
        for s in 0..2000 {
            // Sequences with special tokens sprinkled in, which must never be chosen.
            let orig: Vec<u32> = (0..64)
                .map(|i| {
                    if (i + s) % 9 == 0 {
                        special::EOT
                    } else {
                        100 + ((i * 7 + s) % 300) as u32
                    }
                })
                .collect();
            let mut toks = orig.clone();
            let targets = mlm_mask(&mut toks, 500, 0.15, &mut rng);
            for i in 0..64 {
                if orig[i] < special::COUNT {
                    assert_eq!(targets[i], IGNORE, "special token chosen");
                    assert_eq!(toks[i], orig[i]);
                    continue;
                }
                eligible += 1;
                if targets[i] == IGNORE {
                    assert_eq!(toks[i], orig[i]);
                    continue;
                }
                chosen += 1;
                assert_eq!(targets[i], orig[i]);
                if toks[i] == special::MASK {
                    masked += 1;
                } else if toks[i] == orig[i] {
                    kept += 1;
                } else {
                    assert!(toks[i] >= special::COUNT);
                    random += 1;
                }
            }
        }
        let rate = chosen as f64 / eligible as f64;
        assert!((rate - 0.15).abs() < 0.01, "chosen rate {rate}");
        let c = chosen as f64;
        assert!(
            (masked as f64 / c - 0.8).abs() < 0.02,
            "mask {}",
            masked as f64 / c
        );
        // A random token may equal the original by chance (1/492): that counts as kept.
        assert!(
            (random as f64 / c - 0.1).abs() < 0.02,
            "random {}",
            random as f64 / c
        );
        assert!(
            (kept as f64 / c - 0.1).abs() < 0.02,
            "kept {}",
            kept as f64 / c
        );
    }
}
