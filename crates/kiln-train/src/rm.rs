//! Reward model: a scalar head read at each response's last real token, trained on rankings (every
//! ordered pair of a prompt's choices, all K choices in one batch as InstructGPT), pairs, or scores.

use crate::trainer::{Metrics, Objective, StepStats};
use anyhow::{bail, Context, Result};
use kiln_data::chat_format::{ChatFormat, KilnChat};
use kiln_data::datasets::{expand_pairs, PrefRecord};
use kiln_data::template::{fit_example, ids, ChatTemplate, TextEncoder};
use kiln_model::{Activations, Arch, Input, Model};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RmLoss {
    /// −log σ(r_better − r_worse − margin) (Bradley–Terry).
    #[default]
    Pairwise,
    /// max(0, margin − (r_better − r_worse)).
    Hinge,
    /// (r − score)² on scored data.
    Mse,
}

/// One prompt's responses, rendered: all go through the model together.
#[derive(Clone, Debug)]
pub struct RmGroup {
    pub seqs: Vec<Vec<u32>>,
    /// Ranks (1 = best) for ranked data; empty for scored data.
    pub ranks: Vec<u32>,
    pub score: Option<f32>,
}

/// Renders preference records into groups fitting `max_len` tokens. Responses that do not fit are
/// dropped; a group left with fewer than two ranked responses is skipped. Returns (groups, skipped).
pub fn render_groups(
    enc: &dyn TextEncoder,
    template: &ChatTemplate,
    records: &[PrefRecord],
    max_len: usize,
) -> Result<(Vec<RmGroup>, usize)> {
    let chat = KilnChat {
        template: template.clone(),
        enc,
    };
    render_groups_with(&chat, records, max_len)
}

/// [`render_groups`] with any chat template ([`ChatFormat`]).
pub fn render_groups_with(
    chat: &dyn ChatFormat,
    records: &[PrefRecord],
    max_len: usize,
) -> Result<(Vec<RmGroup>, usize)> {
    let mut out = Vec::new();
    let mut skipped = 0;
    for (i, rec) in records.iter().enumerate() {
        let (prompt, responses, ranks, score) = match rec {
            PrefRecord::Ranked(r) => (
                &r.prompt,
                r.choices.iter().map(|c| c.0.clone()).collect::<Vec<_>>(),
                r.choices.iter().map(|c| c.1).collect::<Vec<_>>(),
                None,
            ),
            PrefRecord::Scored {
                prompt,
                response,
                score,
            } => (prompt, vec![response.clone()], Vec::new(), Some(*score)),
        };
        let mut seqs = Vec::new();
        let mut kept_ranks = Vec::new();
        for (j, resp) in responses.iter().enumerate() {
            let r = chat
                .render_prompt_response(prompt, resp)
                .with_context(|| format!("record {i}"))?;
            if let Some(fit) = fit_example(&r, max_len) {
                seqs.push(fit.tokens);
                if !ranks.is_empty() {
                    kept_ranks.push(ranks[j]);
                }
            }
        }
        let usable = if score.is_some() {
            seqs.len() == 1
        } else {
            !expand_pairs(&kept_ranks).is_empty()
        };
        if usable {
            out.push(RmGroup {
                seqs,
                ranks: kept_ranks,
                score,
            });
        } else {
            skipped += 1;
        }
    }
    Ok((out, skipped))
}

/// Sequences packed into rows for one forward pass: several short sequences share a row, kept apart
/// by segment ids (attention never crosses them) with positions restarting at 0, so each scores as it
/// would alone while padding, which costs as much as tokens, nearly disappears.
struct PackedRows {
    tokens: Vec<u32>,
    positions: Vec<u32>,
    valid: Vec<bool>,
    segments: Vec<u32>,
    b: usize,
    t: usize,
    /// Flat index of each sequence's score token: its last real token for a decoder, its [CLS]
    /// (first) token for an encoder.
    at: Vec<usize>,
}

/// Packs `seqs` into at most `seqs.len()` rows of at most `t` tokens, longest first, each into the
/// first row with room (deterministic). The encoder's rows get a [CLS] (<|endoftext|>) in front of
/// every sequence; sequences longer than a row are truncated.
fn pack_rows(arch: Arch, seqs: &[Vec<u32>], t: usize) -> PackedRows {
    let rows: Vec<Vec<u32>> = seqs
        .iter()
        .map(|s| match arch {
            Arch::Encoder => std::iter::once(ids::EOT)
                .chain(s.iter().copied())
                .take(t)
                .collect(),
            Arch::Decoder => s[..s.len().min(t)].to_vec(),
        })
        .collect();
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(rows[i].len()));
    // (row, offset) of each sequence, and each row's fill.
    let mut place = vec![(0usize, 0usize); rows.len()];
    let mut fill: Vec<usize> = Vec::new();
    for &i in &order {
        let len = rows[i].len();
        let r = match fill.iter().position(|&f| f + len <= t) {
            Some(r) => r,
            None => {
                fill.push(0);
                fill.len() - 1
            }
        };
        place[i] = (r, fill[r]);
        fill[r] += len;
    }
    let b = fill.len().max(1);
    let t = fill.iter().copied().max().unwrap_or(1).max(1);
    let mut p = PackedRows {
        tokens: vec![ids::PAD; b * t],
        positions: vec![0; b * t],
        valid: vec![false; b * t],
        segments: vec![u32::MAX; b * t],
        b,
        t,
        at: Vec::with_capacity(rows.len()),
    };
    for (i, row) in rows.iter().enumerate() {
        let (r, off) = place[i];
        let base = r * t + off;
        for (j, &tok) in row.iter().enumerate() {
            p.tokens[base + j] = tok;
            p.positions[base + j] = j as u32;
            p.valid[base + j] = true;
            p.segments[base + j] = i as u32;
        }
        p.at.push(match arch {
            Arch::Decoder => base + row.len().max(1) - 1,
            Arch::Encoder => base,
        });
    }
    p
}

/// Scores sequences in one forward pass, packed into rows of at most the `t` that `acts` was built
/// for (see [`PackedRows`]). Returns each sequence's score and the flat index it was read at (where
/// the score head's backward puts its gradient).
fn score_packed(
    model: &Model,
    acts: &mut Activations,
    seqs: &[Vec<u32>],
) -> (Vec<f32>, Vec<usize>) {
    let (cap_b, cap_t) = acts.capacity();
    assert!(seqs.len() <= cap_b, "more sequences than activation rows");
    let p = pack_rows(model.cfg.arch, seqs, cap_t);
    acts.set_shape(&model.cfg, p.b, p.t);
    let input = Input {
        tokens: &p.tokens,
        positions: &p.positions,
        valid: Some(&p.valid),
        segments: Some(&p.segments),
        b: p.b,
        t: p.t,
    };
    model.forward(acts, &input);
    let all = model.score_head(acts);
    (p.at.iter().map(|&i| all[i]).collect(), p.at)
}

/// Each sequence's score: read at its last real token (decoder) or its [CLS] (encoder), with the
/// sequences packed into the rows `acts` was built for. `acts` must have at least `seqs.len()` rows.
pub fn score_rows(model: &Model, acts: &mut Activations, seqs: &[Vec<u32>]) -> Vec<f32> {
    score_packed(model, acts, seqs).0
}

#[derive(Serialize, Deserialize)]
struct RmState {
    epoch: u64,
    idx: usize,
}

pub struct RmObjective {
    train: Vec<RmGroup>,
    val: Vec<RmGroup>,
    loss: RmLoss,
    margin: f32,
    center: f32,
    groups_per_batch: usize,
    seed: u64,
    epoch: u64,
    idx: usize,
    order: Vec<usize>,
    /// Where the last `scores` call read each score (for the score head's backward).
    score_at: Vec<usize>,
    acts: Activations,
}

/// Pairwise accuracy's credit for one pair: 1 when the better response scores higher, ½ for a tie
/// (a model that scores everything alike, as at initialisation, is at chance, not at 0).
fn pair_credit(better: f32, worse: f32) -> f64 {
    match better.partial_cmp(&worse) {
        Some(std::cmp::Ordering::Greater) => 1.0,
        Some(std::cmp::Ordering::Equal) => 0.5,
        _ => 0.0,
    }
}

/// Loss and d(loss)/d(score) for one group.
fn group_loss(g: &RmGroup, r: &[f32], loss: RmLoss, margin: f32) -> (f64, Vec<f32>) {
    let mut d = vec![0.0f32; r.len()];
    if let Some(target) = g.score {
        let e = r[0] - target;
        d[0] = 2.0 * e;
        return ((e * e) as f64, d);
    }
    let pairs = expand_pairs(&g.ranks);
    let np = pairs.len() as f32;
    let mut total = 0.0f64;
    for &(bi, wi) in &pairs {
        let diff = r[bi] - r[wi];
        let (l, dl) = match loss {
            // −log σ(x) = softplus(−x); its derivative is −σ(−x).
            RmLoss::Pairwise | RmLoss::Mse => {
                let x = diff - margin;
                let l = if x > 0.0 {
                    (-x).exp().ln_1p()
                } else {
                    -x + x.exp().ln_1p()
                };
                (l, -1.0 / (1.0 + x.exp()))
            }
            RmLoss::Hinge => {
                if margin - diff > 0.0 {
                    (margin - diff, -1.0)
                } else {
                    (0.0, 0.0)
                }
            }
        };
        total += l as f64 / np as f64;
        d[bi] += dl / np;
        d[wi] -= dl / np;
    }
    (total, d)
}

impl RmObjective {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: &Model,
        train: Vec<RmGroup>,
        val: Vec<RmGroup>,
        loss: RmLoss,
        margin: f32,
        center: f32,
        groups_per_batch: usize,
        t: usize,
        seed: u64,
    ) -> Result<Self> {
        if !model.cfg.score_head {
            bail!("the reward model needs a score head");
        }
        if train.is_empty() {
            bail!("no reward-model training examples (empty dataset, or nothing fits the context)");
        }
        if loss == RmLoss::Mse && train.iter().any(|g| g.score.is_none()) {
            bail!("--loss mse needs scored data ({{\"input\",\"output\",\"score\"}} records)");
        }
        let max_k = train
            .iter()
            .chain(&val)
            .map(|g| g.seqs.len())
            .max()
            .unwrap_or(1);
        let rows = groups_per_batch * max_k;
        // Rows of the full length `t`: batches pack several short sequences into each.
        let mut s = RmObjective {
            train,
            val,
            loss,
            margin,
            center,
            groups_per_batch,
            seed,
            epoch: 0,
            idx: 0,
            order: Vec::new(),
            score_at: Vec::new(),
            acts: Activations::new(&model.cfg, rows, t, false),
        };
        s.shuffle();
        Ok(s)
    }

    fn shuffle(&mut self) {
        self.order = (0..self.train.len()).collect();
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(7_000_003).wrapping_add(self.epoch));
        self.order.shuffle(&mut rng);
    }

    /// Scores of every response of `groups` (one forward pass).
    fn scores(&mut self, model: &Model, groups: &[&RmGroup]) -> Vec<Vec<f32>> {
        let seqs: Vec<Vec<u32>> = groups.iter().flat_map(|g| g.seqs.iter().cloned()).collect();
        let (flat, at) = score_packed(model, &mut self.acts, &seqs);
        self.score_at = at;
        let mut out = Vec::new();
        let mut at = 0;
        for g in groups {
            out.push(flat[at..at + g.seqs.len()].to_vec());
            at += g.seqs.len();
        }
        out
    }

    /// Loss, pairwise accuracy and margin (and MSE/correlation for scored data) on `val`.
    pub fn evaluate_groups(&mut self, model: &Model, val: &[RmGroup]) -> Metrics {
        let (mut pairs, mut correct, mut margin_sum, mut loss_sum) =
            (0usize, 0.0f64, 0.0f64, 0.0f64);
        let (mut preds, mut targets) = (Vec::new(), Vec::new());
        for chunk in val.chunks(self.groups_per_batch) {
            let refs: Vec<&RmGroup> = chunk.iter().collect();
            let scores = self.scores(model, &refs);
            for (g, r) in chunk.iter().zip(&scores) {
                loss_sum += group_loss(g, r, self.loss, self.margin).0;
                if let Some(s) = g.score {
                    preds.push(r[0] as f64);
                    targets.push(s as f64);
                }
                for (bi, wi) in expand_pairs(&g.ranks) {
                    pairs += 1;
                    correct += pair_credit(r[bi], r[wi]);
                    margin_sum += (r[bi] - r[wi]) as f64;
                }
            }
        }
        let n = val.len();
        let mut m = Metrics::new();
        if n == 0 {
            return m;
        }
        m.insert("loss".into(), loss_sum / n as f64);
        if pairs > 0 {
            m.insert("acc".into(), correct / pairs as f64);
            m.insert("margin".into(), margin_sum / pairs as f64);
        }
        if !preds.is_empty() {
            let k = preds.len() as f64;
            m.insert(
                "mse".into(),
                preds
                    .iter()
                    .zip(&targets)
                    .map(|(p, t)| (p - t).powi(2))
                    .sum::<f64>()
                    / k,
            );
            m.insert("corr".into(), pearson(&preds, &targets));
        }
        m
    }

    /// Mean and standard deviation of the rewards of the training responses (an evenly spread sample
    /// of at most `STATS_GROUPS` prompts: plenty for two moments), saved with the model so PPO can
    /// normalise its rewards.
    pub fn reward_stats(&mut self, model: &Model) -> (f64, f64) {
        const STATS_GROUPS: usize = 2048;
        let mut all = Vec::new();
        let train = std::mem::take(&mut self.train);
        let stride = train.len().div_ceil(STATS_GROUPS).max(1);
        let sample: Vec<&RmGroup> = train.iter().step_by(stride).collect();
        for chunk in sample.chunks(self.groups_per_batch) {
            all.extend(self.scores(model, chunk).into_iter().flatten());
        }
        self.train = train;
        let n = all.len().max(1) as f64;
        let mean = all.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = all.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt().max(1e-6))
    }
}

impl RmObjective {
    /// The next micro-batch's groups (indices into the training set), cycling through shuffled
    /// epochs.
    fn next_groups(&mut self) -> Vec<usize> {
        let mut picked = Vec::with_capacity(self.groups_per_batch);
        while picked.len() < self.groups_per_batch {
            if self.idx >= self.order.len() {
                self.epoch += 1;
                self.idx = 0;
                self.shuffle();
            }
            picked.push(self.order[self.idx]);
            self.idx += 1;
        }
        picked
    }
}

impl Objective for RmObjective {
    /// The mean and spread of the scores of the training responses (`reward_mean`,
    /// `reward_std`), which PPO and GRPO normalise rewards with.
    fn final_stats(&mut self, model: &Model) -> Result<Metrics> {
        let (mean, std) = self.reward_stats(model);
        Ok(Metrics::from([
            ("reward_mean".to_string(), mean),
            ("reward_std".to_string(), std),
        ]))
    }

    fn micro_step(&mut self, model: &mut Model, grad_scale: f32) -> Result<StepStats> {
        let picked = self.next_groups();
        let groups: Vec<RmGroup> = picked.iter().map(|&i| self.train[i].clone()).collect();
        let refs: Vec<&RmGroup> = groups.iter().collect();
        let scores = self.scores(model, &refs);
        let (b, t) = (self.acts.b, self.acts.t);
        let mut dscore = vec![0.0f32; b * t];
        let mut loss = 0.0f64;
        let (mut correct, mut pairs) = (0.0f64, 0usize);
        let ng = groups.len() as f32;
        let rows: usize = groups.iter().map(|g| g.seqs.len()).sum();
        let mut row = 0;
        let mut center_loss = 0.0f64;
        for (g, r) in groups.iter().zip(&scores) {
            let (l, d) = group_loss(g, r, self.loss, self.margin);
            loss += l / ng as f64;
            for j in 0..g.seqs.len() {
                let mut dd = d[j] / ng;
                // λ·mean(r²) keeps rewards centred near zero.
                if self.center > 0.0 {
                    dd += self.center * 2.0 * r[j] / rows as f32;
                    center_loss += (self.center * r[j] * r[j]) as f64 / rows as f64;
                }
                dscore[self.score_at[row]] = dd * grad_scale;
                row += 1;
            }
            for (bi, wi) in expand_pairs(&g.ranks) {
                pairs += 1;
                correct += pair_credit(r[bi], r[wi]);
            }
        }
        model.score_head_backward(&mut self.acts, &dscore);
        model.backward(&mut self.acts);
        let mut extra = Metrics::new();
        if pairs > 0 {
            extra.insert("acc".into(), correct / pairs as f64);
        }
        let tokens = groups
            .iter()
            .flat_map(|g| g.seqs.iter())
            .map(|s| s.len())
            .sum();
        Ok(StepStats {
            loss: loss + center_loss,
            tokens,
            extra,
        })
    }

    fn evaluate(&mut self, model: &Model) -> Result<Metrics> {
        let val = std::mem::take(&mut self.val);
        let m = self.evaluate_groups(model, &val);
        self.val = val;
        Ok(m)
    }

    fn skip_micro_batch(&mut self) -> Result<()> {
        self.next_groups();
        Ok(())
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(RmState {
            epoch: self.epoch,
            idx: self.idx,
        })
        .unwrap()
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let s: RmState =
            serde_json::from_value(state.clone()).context("trainer_state.json: RM state")?;
        self.epoch = s.epoch;
        self.idx = s.idx;
        self.shuffle();
        Ok(())
    }
}

pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va.sqrt() * vb.sqrt()).max(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_loss_and_gradient_by_hand() {
        let g = RmGroup {
            seqs: vec![vec![], vec![], vec![]],
            ranks: vec![1, 2, 2],
            score: None,
        };
        let r = [1.0f32, 0.0, -1.0];
        let (l, d) = group_loss(&g, &r, RmLoss::Pairwise, 0.0);
        // Pairs (0,1) and (0,2); the tie (1,2) is never paired.
        let s = |x: f64| 1.0 / (1.0 + (-x).exp());
        let expect = (-(s(1.0)).ln() - (s(2.0)).ln()) / 2.0;
        assert!((l - expect).abs() < 1e-6, "{l} vs {expect}");
        let d1 = -(1.0 - s(1.0)) / 2.0;
        let d2 = -(1.0 - s(2.0)) / 2.0;
        assert!((d[0] as f64 - (d1 + d2)).abs() < 1e-6);
        assert!((d[1] as f64 + d1).abs() < 1e-6);
        assert!((d[2] as f64 + d2).abs() < 1e-6);
    }

    #[test]
    fn ties_count_half() {
        assert_eq!(pair_credit(1.0, 0.0), 1.0);
        assert_eq!(pair_credit(0.3, 0.3), 0.5);
        assert_eq!(pair_credit(0.0, 1.0), 0.0);
        assert_eq!(pair_credit(f32::NAN, 0.0), 0.0);
    }

    #[test]
    fn hinge_and_mse_by_hand() {
        let g = RmGroup {
            seqs: vec![vec![], vec![]],
            ranks: vec![2, 1],
            score: None,
        };
        let (l, d) = group_loss(&g, &[0.2, 0.0], RmLoss::Hinge, 1.0);
        // Better is index 1: margin 1 − (0 − 0.2) = 1.2.
        assert!((l - 1.2).abs() < 1e-6);
        assert_eq!(d, vec![1.0, -1.0]);
        let s = RmGroup {
            seqs: vec![vec![]],
            ranks: vec![],
            score: Some(0.5),
        };
        let (l, d) = group_loss(&s, &[1.5], RmLoss::Mse, 0.0);
        assert!((l - 1.0).abs() < 1e-6);
        assert_eq!(d, vec![2.0]);
    }
}
