//! Supervised fine-tuning: next-token loss on response tokens only (prompt and padding ignored).

use crate::trainer::{Metrics, Objective, StepStats};
use anyhow::{bail, Context, Result};
use kiln_data::chat_format::{ChatFormat, KilnChat};
use kiln_data::datasets::Conversation;
use kiln_data::template::{collate, fit_example, pack, Batch, ChatTemplate, Rendered, TextEncoder};
use kiln_kernels::IGNORE;
use kiln_model::{Activations, Input, Model};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// An extra evaluation run alongside the loss (e.g. the demo judge's task accuracy).
pub type ExtraEval<'a> = Box<dyn FnMut(&Model) -> Result<Metrics> + 'a>;

/// Renders conversations with the template and fits them to `max_len` tokens. Returns the examples
/// and how many were skipped because even their response does not fit.
pub fn render_examples(
    enc: &dyn TextEncoder,
    template: &ChatTemplate,
    convs: &[Conversation],
    max_len: usize,
) -> Result<(Vec<Rendered>, usize)> {
    let chat = KilnChat {
        template: template.clone(),
        enc,
    };
    render_examples_with(&chat, convs, max_len)
}

/// [`render_examples`] with any chat template ([`ChatFormat`]): the loss mask is the rendering's.
pub fn render_examples_with(
    chat: &dyn ChatFormat,
    convs: &[Conversation],
    max_len: usize,
) -> Result<(Vec<Rendered>, usize)> {
    let mut out = Vec::with_capacity(convs.len());
    let mut skipped = 0;
    for (i, c) in convs.iter().enumerate() {
        let r = chat
            .render_conversation(c)
            .with_context(|| format!("record {i}"))?;
        match fit_example(&r, max_len) {
            Some(r) => out.push(r),
            None => skipped += 1,
        }
    }
    Ok((out, skipped))
}

#[derive(Serialize, Deserialize)]
struct SftState {
    epoch: u64,
    idx: usize,
}

pub struct SftObjective<'a> {
    train: Vec<Rendered>,
    val: Vec<Rendered>,
    b: usize,
    t: usize,
    seed: u64,
    epoch: u64,
    idx: usize,
    order: Vec<usize>,
    /// With packing: this epoch's examples packed into rows (attention never crosses examples).
    packed: Option<Batch>,
    acts: Activations,
    extra_eval: Option<ExtraEval<'a>>,
}

impl<'a> SftObjective<'a> {
    /// `packing`: several short examples share a row, with attention kept inside each example.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: &Model,
        train: Vec<Rendered>,
        val: Vec<Rendered>,
        b: usize,
        t: usize,
        seed: u64,
        packing: bool,
        extra_eval: Option<ExtraEval<'a>>,
    ) -> Result<Self> {
        if train.is_empty() {
            bail!(
                "no SFT training examples (the dataset is empty, or no example fits the context)"
            );
        }
        if t > model.cfg.n_ctx {
            bail!(
                "sequence length {t} exceeds the model's context {}",
                model.cfg.n_ctx
            );
        }
        // Without packing, rows need only be as long as the longest example.
        let longest = train
            .iter()
            .chain(&val)
            .map(|r| r.tokens.len())
            .max()
            .unwrap_or(1);
        let t = if packing { t } else { t.min(longest) };
        let mut s = SftObjective {
            train,
            val,
            b,
            t,
            seed,
            epoch: 0,
            idx: 0,
            order: Vec::new(),
            packed: packing.then(Batch::default),
            acts: Activations::new(&model.cfg, b, t, true),
            extra_eval,
        };
        s.shuffle();
        Ok(s)
    }

    /// The order of an epoch is a function of (seed, epoch), so resuming needs only (epoch, idx).
    fn shuffle(&mut self) {
        self.order = (0..self.train.len()).collect();
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(1_000_003).wrapping_add(self.epoch));
        self.order.shuffle(&mut rng);
        if self.packed.is_some() {
            let examples: Vec<Rendered> =
                self.order.iter().map(|&i| self.train[i].clone()).collect();
            self.packed = Some(pack(&examples, self.t));
        }
    }

    /// Steps in one epoch: examples, or packed rows.
    fn epoch_len(&self) -> usize {
        self.packed.as_ref().map_or(self.order.len(), |p| p.b)
    }

    /// Forward over one batch of examples; returns (summed loss, number of targets, the targets).
    fn forward(&mut self, model: &Model, examples: &[Rendered]) -> (f64, usize, Vec<u32>) {
        self.forward_batch(model, collate(examples, self.t))
    }

    fn forward_batch(&mut self, model: &Model, batch: Batch) -> (f64, usize, Vec<u32>) {
        let mut full = batch.clone();
        if batch.b < self.b {
            // A short last batch: pad with empty rows (no loss, all keys invalid).
            let extra = (self.b - batch.b) * self.t;
            full.tokens
                .extend(std::iter::repeat_n(kiln_data::template::ids::PAD, extra));
            full.targets.extend(std::iter::repeat_n(IGNORE, extra));
            full.valid.extend(std::iter::repeat_n(false, extra));
            full.segments.extend(std::iter::repeat_n(0, extra));
            full.positions
                .extend((0..extra).map(|i| (i % self.t) as u32));
            full.b = self.b;
        }
        let input = Input {
            tokens: &full.tokens,
            positions: &full.positions,
            valid: Some(&full.valid),
            segments: Some(&full.segments),
            b: self.b,
            t: self.t,
        };
        model.forward(&mut self.acts, &input);
        model.lm_head(&mut self.acts, &full.targets, 1.0);
        let count = full.targets.iter().filter(|&&x| x != IGNORE).count();
        let loss: f64 = full
            .targets
            .iter()
            .zip(&self.acts.logp)
            .filter(|(t, _)| **t != IGNORE)
            .map(|(_, &l)| -(l as f64))
            .sum();
        (loss, count, full.targets)
    }
}

impl SftObjective<'_> {
    /// The next micro-batch's span `[start, end)` of this epoch (rows when packed, else examples
    /// in `order`), starting a new epoch when this one is used up.
    fn next_span(&mut self) -> (usize, usize) {
        if self.idx >= self.epoch_len() {
            self.epoch += 1;
            self.idx = 0;
            self.shuffle();
        }
        let start = self.idx;
        self.idx = (self.idx + self.b).min(self.epoch_len());
        (start, self.idx)
    }
}

impl Objective for SftObjective<'_> {
    fn micro_step(&mut self, model: &mut Model, grad_scale: f32) -> Result<StepStats> {
        let (start, end) = self.next_span();
        let (loss, count, targets, tokens) = if let Some(p) = &self.packed {
            let rows = p.slice_rows(start, end);
            let tokens = rows.valid.iter().filter(|&&v| v).count();
            let (l, c, t) = self.forward_batch(model, rows);
            (l, c, t, tokens)
        } else {
            let examples: Vec<Rendered> = self.order[start..end]
                .iter()
                .map(|&i| self.train[i].clone())
                .collect();
            let tokens = examples.iter().map(|e| e.tokens.len()).sum();
            let (l, c, t) = self.forward(model, &examples);
            (l, c, t, tokens)
        };
        let w = -grad_scale / count.max(1) as f32;
        let dlogp: Vec<f32> = targets
            .iter()
            .map(|&t| if t == IGNORE { 0.0 } else { w })
            .collect();
        model.lm_head_backward(&mut self.acts, &dlogp, None);
        model.backward(&mut self.acts);
        let mut extra = Metrics::new();
        extra.insert(
            "epoch".into(),
            self.epoch as f64 + self.idx as f64 / self.epoch_len() as f64,
        );
        Ok(StepStats {
            loss: loss / count.max(1) as f64,
            tokens,
            extra,
        })
    }

    fn skip_micro_batch(&mut self) -> Result<()> {
        self.next_span();
        Ok(())
    }

    fn evaluate(&mut self, model: &Model) -> Result<Metrics> {
        let mut m = Metrics::new();
        if !self.val.is_empty() {
            let (mut loss, mut count) = (0.0, 0);
            let val = std::mem::take(&mut self.val);
            for chunk in val.chunks(self.b) {
                let (l, c, _) = self.forward(model, chunk);
                loss += l;
                count += c;
            }
            self.val = val;
            let loss = loss / count.max(1) as f64;
            m.insert("loss".into(), loss);
            m.insert("ppl".into(), loss.exp());
        }
        if let Some(f) = self.extra_eval.as_mut() {
            m.extend(f(model)?);
        }
        Ok(m)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(SftState {
            epoch: self.epoch,
            idx: self.idx,
        })
        .unwrap()
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let s: SftState =
            serde_json::from_value(state.clone()).context("trainer_state.json: SFT state")?;
        self.epoch = s.epoch;
        self.idx = s.idx;
        self.shuffle();
        Ok(())
    }
}
