//! Direct preference optimisation on the shared training loop: DPO (Rafailov et al. 2023), its
//! conservative variant (label smoothing), IPO (Azar et al. 2023) and a SLiC-style hinge, with an
//! optional NLL term on the preferred responses (RPO).
//!
//! With π the policy, ref the frozen reference and, for a prompt x with a preferred response y_w
//! and a dispreferred y_l, the sequence log-probabilities log π(y|x) summed over the response
//! tokens (the end-of-turn token included, the prompt and padding never), TRL's `logits` of a pair
//! is
//!
//! ```text
//! logits = (log π(y_w) − log ref(y_w)) − (log π(y_l) − log ref(y_l))
//! ```
//!
//! and the losses are, with β = `beta` and ε = `label_smoothing` (`trl.DPOTrainer`'s `loss_type`):
//!
//! ```text
//! sigmoid  −(1 − ε)·log σ(β·logits) − ε·log σ(−β·logits)     (ε = 0: DPO; ε > 0: conservative DPO)
//! ipo      (logits − 1/(2β))²   with every log-probability divided by its response's token count
//! hinge    max(0, 1 − β·logits)                                (SLiC, as TRL's "hinge")
//! ```
//!
//! RPO adds `sft_coef` × the mean negative log-likelihood per token of the preferred responses
//! (TRL's `rpo_alpha`; for a ranking: its top-ranked responses). A ranking of K responses gives
//! every ordered pair (ties never paired); all K go through the model once, in the same batch, and
//! the prompt's loss is the mean over its pairs (InstructGPT's grouping), the batch's the mean over
//! prompts. Sequences are packed several to a row (segments keep them apart, positions restart).
//!
//! Metrics (TRL's names, means over the batch's pairs): `rewards/chosen` = β·(log π(y_w) −
//! log ref(y_w)), `rewards/rejected` likewise, `rewards/margins` their difference,
//! `rewards/accuracies` the share of pairs with `rewards/chosen > rewards/rejected` (strictly, so
//! 0 at step 0), `logps/chosen`, `logps/rejected`, and `nll_loss` with RPO. For IPO, as in TRL,
//! these use the length-normalised log-probabilities. On validation data also `kl`: the mean over
//! responses of Σ_t KL(π(·|x, y<t) ‖ ref(·|x, y<t)) over the response positions, the reference's
//! distribution cached as its top `kl_top_k` tokens and the rest of the mass (a lower bound of the
//! exact KL, exact when `kl_top_k` covers the vocabulary).
//!
//! The reference log-probabilities are computed once, before training, and cached in the run
//! directory ([`REFERENCE_FILE`], with a fingerprint of the data, the reference and the settings),
//! so the run then holds one model, and a resumed run reads them back instead of recomputing them.
//! They are computed batch by batch in the first epoch's order with the training forward pass, so
//! while the policy equals the reference (step 1 of a run whose reference is its initial policy)
//! every logit is exactly 0 and the sigmoid loss exactly ln 2.

use crate::run::RunDir;
use crate::sft::ExtraEval;
use crate::trainer::{Metrics, Objective, StepStats};
use anyhow::{bail, Context, Result};
use kiln_data::chat_format::ChatFormat;
use kiln_data::datasets::{expand_pairs, DataError, PrefRecord, RecordLoc};
use kiln_data::template::ids;
use kiln_kernels::IGNORE;
use kiln_model::{Activations, Arch, Input, Model, ModelConfig};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;

/// The cached reference log-probabilities, in the run directory.
pub const REFERENCE_FILE: &str = "reference_logps.safetensors";
/// The [`CacheKey`] a run trained against, in each of its checkpoints.
pub const KEY_FILE: &str = "dpo_reference.json";
const CACHE_FORMAT: &str = "kiln-dpo-reference-v1";

// ---------------------------------------------------------------------------------------------
// Losses

/// The preference loss (`--loss`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    /// −(1 − ε)·log σ(β·logits) − ε·log σ(−β·logits) (DPO; conservative DPO with ε > 0).
    #[default]
    Sigmoid,
    /// (logits − 1/(2β))² over length-normalised log-probabilities (IPO).
    Ipo,
    /// max(0, 1 − β·logits) (SLiC's hinge).
    Hinge,
}

impl DpoLoss {
    pub fn name(self) -> &'static str {
        match self {
            DpoLoss::Sigmoid => "sigmoid",
            DpoLoss::Ipo => "ipo",
            DpoLoss::Hinge => "hinge",
        }
    }
}

/// What the loss is made of.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpoSettings {
    pub loss: DpoLoss,
    /// β: the strength of the implicit KL penalty (TRL's default 0.1).
    pub beta: f64,
    /// ε of conservative DPO: the probability that a label is flipped (sigmoid loss only).
    pub label_smoothing: f64,
    /// Weight of the NLL term on the preferred responses (RPO; 0: off).
    pub sft_coef: f64,
}

impl Default for DpoSettings {
    fn default() -> Self {
        DpoSettings {
            loss: DpoLoss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            sft_coef: 0.0,
        }
    }
}

impl DpoSettings {
    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            bail!("beta must be a positive number (got {})", self.beta);
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            bail!(
                "label_smoothing must be in [0, 0.5) (got {}): it is the probability that a preference label is wrong",
                self.label_smoothing
            );
        }
        if self.label_smoothing > 0.0 && self.loss != DpoLoss::Sigmoid {
            bail!(
                "label_smoothing applies to the sigmoid loss only (the loss is {})",
                self.loss.name()
            );
        }
        if !(self.sft_coef.is_finite() && self.sft_coef >= 0.0) {
            bail!("sft_coef must be 0 or more (got {})", self.sft_coef);
        }
        Ok(())
    }
}

/// ln(1 + eˣ), without overflow.
fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// σ(x) = 1 / (1 + e⁻ˣ), without overflow.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// One pair's loss and its derivative with respect to `logits` (see the module documentation;
/// for IPO `logits` is of length-normalised log-probabilities).
pub fn pair_loss(s: &DpoSettings, logits: f64) -> (f64, f64) {
    let beta = s.beta;
    match s.loss {
        DpoLoss::Sigmoid => {
            // −log σ(z) = softplus(−z), d/dz = −σ(−z); −log σ(−z) = softplus(z), d/dz = σ(z).
            let z = beta * logits;
            let eps = s.label_smoothing;
            let loss = (1.0 - eps) * softplus(-z) + eps * softplus(z);
            let d = beta * (-(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z));
            (loss, d)
        }
        DpoLoss::Ipo => {
            let e = logits - 1.0 / (2.0 * beta);
            (e * e, 2.0 * e)
        }
        DpoLoss::Hinge => {
            let m = 1.0 - beta * logits;
            if m > 0.0 {
                (m, -beta)
            } else {
                (0.0, 0.0)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Data

/// One prompt's responses, rendered with the chat template: all go through the model together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DpoGroup {
    /// `prompt ++ response` tokens of each response (the response ends with the end-of-turn token).
    pub seqs: Vec<Vec<u32>>,
    /// The prompt's length, the same in every sequence: responses start here.
    pub prompt_len: usize,
    /// `(chosen, rejected)` indices into `seqs`.
    pub pairs: Vec<(usize, usize)>,
}

impl DpoGroup {
    /// Tokens of response `i` (its log-probability sums over these).
    pub fn response_len(&self, i: usize) -> usize {
        self.seqs[i].len() - self.prompt_len
    }

    /// Responses chosen in some pair and rejected in none: a pair's chosen, a ranking's first
    /// (RPO's NLL term falls on them).
    pub fn top(&self) -> Vec<usize> {
        (0..self.seqs.len())
            .filter(|&i| {
                self.pairs.iter().any(|p| p.0 == i) && !self.pairs.iter().any(|p| p.1 == i)
            })
            .collect()
    }
}

/// Where a preference record came from, for errors found when rendering it.
#[derive(Clone, Debug)]
pub struct Origin {
    pub file: PathBuf,
    pub loc: Option<RecordLoc>,
}

/// What rendering left out.
#[derive(Clone, Debug, Default)]
pub struct RenderReport {
    /// Records skipped as bad (with `skip_bad`), by reason.
    pub skipped: BTreeMap<&'static str, usize>,
    /// The first skipped record's error.
    pub first_error: Option<String>,
    /// Prompts whose start was cut so the longest response fits (as SFT and the reward model do).
    pub truncated_prompts: usize,
}

impl RenderReport {
    pub fn total_skipped(&self) -> usize {
        self.skipped.values().sum()
    }
}

/// Renders preference records into groups of at most `max_len` tokens per sequence. A bad
/// record (no preference between responses, a chosen response equal to its rejected one, a prompt
/// that leaves no room for a response, a response longer than the context) fails with its file,
/// record and reason, or with `skip_bad` is skipped and counted by reason. A prompt that fits but
/// not with its longest response is cut at its start, the same for all its responses.
///
/// Any chat format renders them (Kiln's template, a Hugging Face Jinja template): each response
/// is rendered after its prompt as one conversation, and the tokens the format trains on (the
/// response and its end-of-turn token) are the response, what comes before it the prompt.
pub fn render_dpo_groups(
    chat: &dyn ChatFormat,
    records: &[PrefRecord],
    origins: &[Origin],
    max_len: usize,
    skip_bad: bool,
) -> Result<(Vec<DpoGroup>, RenderReport)> {
    assert_eq!(records.len(), origins.len(), "one origin per record");
    let mut out = Vec::with_capacity(records.len());
    let mut report = RenderReport::default();
    for (rec, origin) in records.iter().zip(origins) {
        match render_one(chat, rec, max_len).with_context(|| origin_label(origin))? {
            Rendered::Group(g, cut) => {
                report.truncated_prompts += usize::from(cut);
                out.push(g);
            }
            Rendered::Bad {
                reason,
                field,
                message,
            } => {
                let err = DataError {
                    file: origin.file.clone(),
                    record: origin.loc,
                    field,
                    message,
                };
                if !skip_bad {
                    return Err(anyhow::Error::new(err).context(
                        "bad preference record (--skip-bad-records skips and counts such records)",
                    ));
                }
                *report.skipped.entry(reason).or_default() += 1;
                report.first_error.get_or_insert_with(|| err.to_string());
            }
        }
    }
    Ok((out, report))
}

/// One record rendered: a group (and whether its prompt was cut), or why it is bad.
enum Rendered {
    Group(DpoGroup, bool),
    Bad {
        reason: &'static str,
        field: Option<String>,
        message: String,
    },
}

fn bad(reason: &'static str, field: Option<&str>, message: String) -> Result<Rendered> {
    Ok(Rendered::Bad {
        reason,
        field: field.map(String::from),
        message,
    })
}

/// A response rendered after its prompt: the tokens up to the end of the response (its
/// end-of-turn token included; what a template adds after it is left out), and where the response
/// starts.
fn render_reply(
    chat: &dyn ChatFormat,
    prompt: &[kiln_data::datasets::Message],
    response: &str,
) -> Result<(Vec<u32>, usize)> {
    let r = chat.render_prompt_response(prompt, response)?;
    let Some(start) = r.loss_mask.iter().position(|&m| m) else {
        anyhow::bail!("the chat template renders no tokens for the response");
    };
    let end = r.loss_mask.iter().rposition(|&m| m).expect("one is true") + 1;
    let mut tokens = r.tokens;
    tokens.truncate(end);
    Ok((tokens, start))
}

fn render_one(chat: &dyn ChatFormat, rec: &PrefRecord, max_len: usize) -> Result<Rendered> {
    let r =
        match rec {
            PrefRecord::Ranked(r) => r,
            PrefRecord::Scored { .. } => return bad(
                "scored record",
                Some("score"),
                "a scored record {input, output, score} states no preference between responses: \
                 DPO needs rankings or chosen/rejected pairs"
                    .into(),
            ),
        };
    let ranks: Vec<u32> = r.choices.iter().map(|c| c.1).collect();
    let pairs = expand_pairs(&ranks);
    if pairs.is_empty() {
        return bad(
            "all tied",
            Some("choices"),
            "all choices share one rank: no preference to learn".into(),
        );
    }
    let replies: Vec<(Vec<u32>, usize)> = r
        .choices
        .iter()
        .map(|c| render_reply(chat, &r.prompt, &c.0))
        .collect::<Result<_>>()?;
    // The shared prompt: what comes before every response (a template that merges the start of
    // a response into the prompt's last token leaves that token to the responses).
    let first = &replies[0].0;
    let prompt_len = replies
        .iter()
        .map(|(seq, start)| (*start).min(first.iter().zip(seq).take_while(|(a, b)| a == b).count()))
        .min()
        .expect("a ranking has at least two responses");
    for &(w, l) in &pairs {
        if replies[w].0 == replies[l].0 {
            return bad(
                "chosen equals rejected",
                None,
                format!(
                    "response {} (rank {}) and response {} (rank {}) are the same text: a pair \
                     whose chosen equals its rejected teaches nothing",
                    w + 1,
                    ranks[w],
                    l + 1,
                    ranks[l]
                ),
            );
        }
    }
    if prompt_len >= max_len {
        return bad(
            "prompt longer than the context",
            None,
            format!(
                "the prompt is {prompt_len} tokens, longer than the context allows ({max_len} tokens with \
                 at least one for the response)"
            ),
        );
    }
    let (longest_i, longest) = replies
        .iter()
        .enumerate()
        .map(|(i, (seq, _))| (i, seq.len() - prompt_len))
        .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))
        .expect("a ranking has at least two responses");
    if longest + 1 > max_len {
        return bad(
            "response longer than the context",
            None,
            format!(
                "response {} is {longest} tokens: with its prompt it does not fit the context of \
                 {max_len} tokens",
                longest_i + 1
            ),
        );
    }
    let keep = prompt_len.min(max_len - longest);
    let cut = keep < prompt_len;
    let seqs = replies
        .iter()
        .map(|(seq, _)| seq[prompt_len - keep..].to_vec())
        .collect();
    Ok(Rendered::Group(
        DpoGroup {
            seqs,
            prompt_len: keep,
            pairs,
        },
        cut,
    ))
}

fn origin_label(o: &Origin) -> String {
    DataError {
        file: o.file.clone(),
        record: o.loc,
        field: None,
        message: "cannot render".into(),
    }
    .to_string()
}

// ---------------------------------------------------------------------------------------------
// Batches

/// Sequences laid out in rows for one forward pass.
struct Rows {
    tokens: Vec<u32>,
    positions: Vec<u32>,
    valid: Vec<bool>,
    segments: Vec<u32>,
    /// Next-token targets: each response token at the position that predicts it, IGNORE elsewhere
    /// (prompt, padding).
    targets: Vec<u32>,
    b: usize,
    t: usize,
    /// Per sequence: the flat index of the position predicting its first response token, and
    /// the response length (its targets are `start..start + len`).
    spans: Vec<(usize, usize)>,
}

/// Lays `seqs` (tokens, prompt length) out in rows of at most `t` tokens: with `packing`, several
/// to a row (longest first, each into the first row with room; deterministic), kept apart by
/// segment ids with positions restarting at 0; without, one per row.
fn layout(seqs: &[(&[u32], usize)], t: usize, packing: bool) -> Rows {
    let n = seqs.len();
    let mut place = vec![(0usize, 0usize); n];
    let mut fill: Vec<usize> = Vec::new();
    if packing {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].0.len()));
        for &i in &order {
            let len = seqs[i].0.len();
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
    } else {
        for (i, s) in seqs.iter().enumerate() {
            place[i] = (i, 0);
            fill.push(s.0.len());
        }
    }
    let b = fill.len().max(1);
    let t = fill.iter().copied().max().unwrap_or(1).max(1);
    let mut rows = Rows {
        tokens: vec![ids::PAD; b * t],
        positions: vec![0; b * t],
        valid: vec![false; b * t],
        segments: vec![u32::MAX; b * t],
        targets: vec![IGNORE; b * t],
        b,
        t,
        spans: Vec::with_capacity(n),
    };
    for (i, &(toks, prompt_len)) in seqs.iter().enumerate() {
        let (r, off) = place[i];
        let base = r * t + off;
        for (j, &tok) in toks.iter().enumerate() {
            rows.tokens[base + j] = tok;
            rows.positions[base + j] = j as u32;
            rows.valid[base + j] = true;
            rows.segments[base + j] = i as u32;
            if j >= prompt_len {
                rows.targets[base + j - 1] = tok;
            }
        }
        rows.spans
            .push((base + prompt_len - 1, toks.len() - prompt_len));
    }
    rows
}

/// Forward over `seqs` and the LM head at temperature 1: returns the rows and each sequence's
/// summed response log-probability. `acts.logits` then holds every position's probabilities.
fn forward_logps(
    model: &Model,
    acts: &mut Activations,
    seqs: &[(&[u32], usize)],
    packing: bool,
) -> (Rows, Vec<f64>) {
    let (cap_b, cap_t) = acts.capacity();
    assert!(seqs.len() <= cap_b, "more sequences than activation rows");
    let rows = layout(seqs, cap_t, packing);
    acts.set_shape(&model.cfg, rows.b, rows.t);
    let input = Input {
        tokens: &rows.tokens,
        positions: &rows.positions,
        valid: Some(&rows.valid),
        segments: Some(&rows.segments),
        b: rows.b,
        t: rows.t,
    };
    model.forward(acts, &input);
    model.lm_head(acts, &rows.targets, 1.0);
    let logps = rows
        .spans
        .iter()
        .map(|&(start, len)| {
            acts.logp[start..start + len]
                .iter()
                .map(|&x| x as f64)
                .sum()
        })
        .collect();
    (rows, logps)
}

/// Each sequence's summed response log-probability under `model` through the training forward
/// pass (batches of `groups_per_batch` prompts in rows of at most `seq_len` tokens, packed or one
/// sequence per row), flat in group order.
pub fn sequence_logps(
    model: &Model,
    groups: &[DpoGroup],
    groups_per_batch: usize,
    seq_len: usize,
    packing: bool,
) -> Vec<f64> {
    let max_k = groups.iter().map(|g| g.seqs.len()).max().unwrap_or(1);
    let mut acts = Activations::new(&model.cfg, groups_per_batch * max_k, seq_len, true);
    let mut out = Vec::new();
    for chunk in groups.chunks(groups_per_batch.max(1)) {
        let refs: Vec<&DpoGroup> = chunk.iter().collect();
        out.extend(forward_logps(model, &mut acts, &DpoObjective::seqs_of(&refs), packing).1);
    }
    out
}

/// The policy's and the reference's log-probabilities of one batch's responses, and what the loss
/// makes of them.
#[derive(Clone, Debug, Default)]
pub struct BatchLoss {
    /// The mean over prompts of each prompt's mean pair loss, plus `sft_coef` × `nll`.
    pub loss: f64,
    /// The preference part of `loss`.
    pub pref_loss: f64,
    /// `pref_loss` minus the loss of a pair whose logits are 0 (see [`batch_loss`]).
    pub pref_excess: f64,
    /// Mean negative log-likelihood per token of the preferred responses (0 without RPO).
    pub nll: f64,
    /// d(loss)/d(log π(y)) of each sequence (summed log-probability).
    pub dlogp: Vec<f64>,
    /// Sums over pairs, for the metrics.
    pub pairs: usize,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    pub correct: f64,
    pub logp_chosen: f64,
    pub logp_rejected: f64,
}

impl BatchLoss {
    /// The TRL-named metrics of these pairs.
    pub fn metrics(&self, with_nll: bool) -> Metrics {
        let n = self.pairs.max(1) as f64;
        let mut m = Metrics::new();
        m.insert("rewards/chosen".into(), self.reward_chosen / n);
        m.insert("rewards/rejected".into(), self.reward_rejected / n);
        m.insert(
            "rewards/margins".into(),
            (self.reward_chosen - self.reward_rejected) / n,
        );
        m.insert("rewards/accuracies".into(), self.correct / n);
        m.insert("logps/chosen".into(), self.logp_chosen / n);
        m.insert("logps/rejected".into(), self.logp_rejected / n);
        if with_nll {
            m.insert("nll_loss".into(), self.nll);
        }
        m
    }
}

/// The loss of a batch of groups given each sequence's summed response log-probability under the
/// policy (`logp`) and the reference (`ref_logp`), flat in group order, and its derivative with
/// respect to every `logp` (see the module documentation for the formulas).
pub fn batch_loss(
    s: &DpoSettings,
    groups: &[&DpoGroup],
    logp: &[f64],
    ref_logp: &[f64],
) -> BatchLoss {
    let n: usize = groups.iter().map(|g| g.seqs.len()).sum();
    assert_eq!(logp.len(), n);
    assert_eq!(ref_logp.len(), n);
    let mut out = BatchLoss {
        dlogp: vec![0.0; n],
        ..Default::default()
    };
    let ng = groups.len().max(1) as f64;
    // Means are taken of each pair's loss in excess of a zero-logits pair's, ℓ(0), added back at
    // the end: mathematically the same, and a batch whose logits are all 0 (policy = reference)
    // has a loss of exactly ℓ(0) (ln 2 for the sigmoid loss) whatever its rounding of the means.
    let l0 = pair_loss(s, 0.0).0;
    // RPO: tokens of the preferred responses in the whole batch.
    let top: Vec<Vec<usize>> = groups.iter().map(|g| g.top()).collect();
    let nll_tokens: usize = groups
        .iter()
        .zip(&top)
        .map(|(g, t)| t.iter().map(|&i| g.response_len(i)).sum::<usize>())
        .sum();
    let mut off = 0;
    for (g, top) in groups.iter().zip(&top) {
        // IPO compares mean log-probabilities per token (TRL divides both by the length).
        let norm = |i: usize| match s.loss {
            DpoLoss::Ipo => 1.0 / g.response_len(i) as f64,
            _ => 1.0,
        };
        let np = g.pairs.len() as f64;
        let mut group_excess = 0.0;
        for &(w, l) in &g.pairs {
            let (cw, cl) = (norm(w), norm(l));
            let (pw, pl) = (logp[off + w] * cw, logp[off + l] * cl);
            let (rw, rl) = (ref_logp[off + w] * cw, ref_logp[off + l] * cl);
            let logits = (pw - rw) - (pl - rl);
            let (loss, d) = pair_loss(s, logits);
            group_excess += (loss - l0) / np;
            out.dlogp[off + w] += d * cw / (np * ng);
            out.dlogp[off + l] -= d * cl / (np * ng);
            let (chosen, rejected) = (s.beta * (pw - rw), s.beta * (pl - rl));
            out.pairs += 1;
            out.reward_chosen += chosen;
            out.reward_rejected += rejected;
            out.correct += f64::from(u8::from(chosen > rejected));
            out.logp_chosen += pw;
            out.logp_rejected += pl;
        }
        out.pref_excess += group_excess / ng;
        if s.sft_coef > 0.0 && nll_tokens > 0 {
            for &i in top {
                out.nll -= logp[off + i] / nll_tokens as f64;
                out.dlogp[off + i] -= s.sft_coef / nll_tokens as f64;
            }
        }
        off += g.seqs.len();
    }
    out.pref_loss = l0 + out.pref_excess;
    out.loss = out.pref_loss + s.sft_coef * out.nll;
    out
}

// ---------------------------------------------------------------------------------------------
// The reference

/// The reference's log-probabilities of every response, and its next-token distributions over the
/// validation responses that the KL is measured on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reference {
    /// Summed response log-probability of every training sequence, flat in group order.
    pub train: Vec<f64>,
    /// ... of every validation sequence.
    pub val: Vec<f64>,
    /// Tokens kept per KL position (the reference's most likely ones).
    pub kl_k: usize,
    /// `[positions, kl_k]`: token ids at each response position of the first KL groups.
    pub kl_ids: Vec<u32>,
    /// `[positions, kl_k]`: the reference's probabilities of those tokens.
    pub kl_probs: Vec<f32>,
}

/// What identifies a cache: hashes of the data and the reference, and the settings that shape
/// the numbers (readable, so a mismatch can be explained). Every checkpoint carries it too
/// ([`KEY_FILE`]), so a resume is checked even when the cache file is gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    pub data: String,
    pub reference: String,
    pub settings: String,
}

/// Where the reference log-probabilities came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefSource {
    /// Read back from the run's cache.
    Loaded,
    /// Computed now; why.
    Computed(String),
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a model's configuration and weights (identifies a reference).
pub fn model_fingerprint(model: &Model) -> String {
    let mut h = Sha256::new();
    h.update(format!("{:?}", model.cfg).as_bytes());
    for x in &model.params {
        h.update(x.to_le_bytes());
    }
    hex(&h.finalize())
}

fn hash_groups(h: &mut Sha256, groups: &[DpoGroup]) {
    h.update((groups.len() as u64).to_le_bytes());
    for g in groups {
        h.update((g.prompt_len as u64).to_le_bytes());
        h.update((g.seqs.len() as u64).to_le_bytes());
        for s in &g.seqs {
            h.update((s.len() as u64).to_le_bytes());
            for &t in s {
                h.update(t.to_le_bytes());
            }
        }
        h.update((g.pairs.len() as u64).to_le_bytes());
        for &(w, l) in &g.pairs {
            h.update((w as u64).to_le_bytes());
            h.update((l as u64).to_le_bytes());
        }
    }
}

fn view<'a>(dtype: Dtype, shape: Vec<usize>, bytes: &'a [u8]) -> Result<TensorView<'a>> {
    Ok(TensorView::new(dtype, shape, bytes)?)
}

impl Reference {
    fn tensors_bytes(&self) -> [Vec<u8>; 4] {
        [
            self.train.iter().flat_map(|x| x.to_le_bytes()).collect(),
            self.val.iter().flat_map(|x| x.to_le_bytes()).collect(),
            self.kl_ids.iter().flat_map(|x| x.to_le_bytes()).collect(),
            self.kl_probs.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ]
    }

    /// The cache file's bytes: safetensors with the key and a checksum of the tensors in its metadata.
    pub fn to_bytes(&self, key: &CacheKey) -> Result<Vec<u8>> {
        let raw = self.tensors_bytes();
        let mut sum = Sha256::new();
        for r in &raw {
            sum.update(r);
        }
        let k = self.kl_k.max(1);
        let npos = self.kl_ids.len() / k;
        let views = vec![
            (
                "train_logps",
                view(Dtype::F64, vec![self.train.len()], &raw[0])?,
            ),
            (
                "val_logps",
                view(Dtype::F64, vec![self.val.len()], &raw[1])?,
            ),
            ("val_kl_ids", view(Dtype::U32, vec![npos, k], &raw[2])?),
            ("val_kl_probs", view(Dtype::F32, vec![npos, k], &raw[3])?),
        ];
        // One metadata entry holding a sorted JSON object: the file's bytes are a function of its
        // contents (safetensors writes a map's entries in hash order).
        let fields: BTreeMap<&str, String> = [
            ("format", CACHE_FORMAT.to_string()),
            ("data_sha256", key.data.clone()),
            ("reference_sha256", key.reference.clone()),
            ("settings", key.settings.clone()),
            ("kl_k", self.kl_k.to_string()),
            ("content_sha256", hex(&sum.finalize())),
        ]
        .into_iter()
        .collect();
        let meta: HashMap<String, String> =
            [("kiln".to_string(), serde_json::to_string(&fields)?)].into();
        Ok(safetensors::serialize(views, Some(meta))?)
    }

    /// Parses a cache file: its key and contents (the checksum verified).
    pub fn from_bytes(bytes: &[u8]) -> Result<(CacheKey, Reference)> {
        let st = safetensors::SafeTensors::deserialize(bytes)?;
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)?;
        let meta: BTreeMap<String, String> = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("kiln"))
            .map(|j| serde_json::from_str(j))
            .transpose()
            .context("metadata")?
            .with_context(|| format!("not a {CACHE_FORMAT} file (no \"kiln\" metadata)"))?;
        let get = |k: &str| {
            meta.get(k)
                .cloned()
                .with_context(|| format!("no \"{k}\" in its metadata"))
        };
        if get("format")? != CACHE_FORMAT {
            bail!("not a {CACHE_FORMAT} file");
        }
        let key = CacheKey {
            data: get("data_sha256")?,
            reference: get("reference_sha256")?,
            settings: get("settings")?,
        };
        let kl_k: usize = get("kl_k")?.parse().context("kl_k")?;
        let tensor = |name: &str, dtype: Dtype| -> Result<Vec<u8>> {
            let t = st.tensor(name)?;
            if t.dtype() != dtype {
                bail!("{name}: {:?}, expected {dtype:?}", t.dtype());
            }
            Ok(t.data().to_vec())
        };
        let raw = [
            tensor("train_logps", Dtype::F64)?,
            tensor("val_logps", Dtype::F64)?,
            tensor("val_kl_ids", Dtype::U32)?,
            tensor("val_kl_probs", Dtype::F32)?,
        ];
        let mut sum = Sha256::new();
        for r in &raw {
            sum.update(r);
        }
        if hex(&sum.finalize()) != get("content_sha256")? {
            bail!("checksum mismatch (the file is corrupt)");
        }
        let f64s = |b: &[u8]| -> Vec<f64> {
            b.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let r = Reference {
            train: f64s(&raw[0]),
            val: f64s(&raw[1]),
            kl_k,
            kl_ids: raw[2]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            kl_probs: raw[3]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        };
        Ok((key, r))
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        8 * (self.train.len() + self.val.len()) + 4 * (self.kl_ids.len() + self.kl_probs.len())
    }
}

/// The run's reference log-probabilities: read back from [`REFERENCE_FILE`] when its key matches,
/// else computed with `compute` and written there (atomically). A cache of other data, another
/// reference or other settings is recomputed on a fresh run but refused when `resuming` (the
/// steps already taken were against the cached numbers); an unreadable one is recomputed.
pub fn load_or_compute_reference(
    run: &RunDir,
    key: &CacheKey,
    resuming: bool,
    compute: impl FnOnce() -> Result<Reference>,
) -> Result<(Reference, RefSource)> {
    let path = run.root.join(REFERENCE_FILE);
    if resuming {
        // The checkpoint names what its steps were taken against.
        if let Some(dir) = run.latest_checkpoint()? {
            if dir.join(KEY_FILE).exists() {
                let bytes = kiln_model::checkpoint::read_checked(&dir, KEY_FILE)?;
                let started: CacheKey = serde_json::from_slice(&bytes)
                    .with_context(|| format!("{}/{KEY_FILE}", dir.display()))?;
                if let Some(what) = key_difference(&started, key) {
                    bail!(
                        "{}: the run was trained against the reference log-probabilities of {what}; \
                         resuming would continue against other numbers than its first steps used. \
                         Resume with the run's data, reference and settings, or start a fresh run \
                         in another --out",
                        dir.display()
                    );
                }
            }
        }
    }
    let reason = match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "no cache yet".to_string(),
        Err(e) => format!("{} is unreadable ({e})", path.display()),
        Ok(bytes) => match Reference::from_bytes(&bytes) {
            Err(e) => format!("{} is unusable ({e:#})", path.display()),
            Ok((cached, r)) if &cached == key => return Ok((r, RefSource::Loaded)),
            Ok((cached, _)) => {
                let what = key_difference(&cached, key).unwrap_or_default();
                if resuming {
                    bail!(
                        "{}: the run's reference log-probabilities were computed for {what}; \
                         resuming would continue against other numbers than its first steps \
                         used. Resume with the run's data, reference and settings, or start a \
                         fresh run in another --out",
                        path.display()
                    );
                }
                format!("the cache was computed for {what}")
            }
        },
    };
    let r = compute()?;
    // In a data-parallel run every rank computes the same numbers; rank 0 keeps them.
    if crate::dist::is_root() {
        let bytes = r.to_bytes(key)?;
        kiln_data::atomic_write(&path, |w| w.write_all(&bytes))?;
    }
    Ok((r, RefSource::Computed(reason)))
}

/// How `then` differs from `now`, in words (None when equal).
fn key_difference(then: &CacheKey, now: &CacheKey) -> Option<String> {
    if then.reference != now.reference {
        Some("another reference model".into())
    } else if then.data != now.data {
        Some("other data".into())
    } else if then.settings != now.settings {
        Some(format!(
            "other settings ({} then, {} now)",
            then.settings, now.settings
        ))
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------------
// The objective

/// How the objective batches and measures (the loss itself is [`DpoSettings`]).
#[derive(Clone, Debug)]
pub struct DpoOptions {
    pub settings: DpoSettings,
    /// Prompts per micro-batch (each with all its responses).
    pub groups_per_batch: usize,
    /// Longest sequence, and the row length when packing.
    pub seq_len: usize,
    pub packing: bool,
    pub seed: u64,
    /// Reference tokens kept per position for the validation KL (0: the whole vocabulary).
    pub kl_top_k: usize,
    /// Validation prompts the KL is measured on (the first ones; 0: all).
    pub kl_max_groups: usize,
}

impl Default for DpoOptions {
    fn default() -> Self {
        DpoOptions {
            settings: DpoSettings::default(),
            groups_per_batch: 4,
            seq_len: 0,
            packing: true,
            seed: 1337,
            kl_top_k: 64,
            kl_max_groups: 256,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct DpoState {
    epoch: u64,
    idx: usize,
}

pub struct DpoObjective<'a> {
    train: Vec<DpoGroup>,
    val: Vec<DpoGroup>,
    /// Index of each group's first sequence in the flat per-sequence arrays.
    train_off: Vec<usize>,
    val_off: Vec<usize>,
    opts: DpoOptions,
    kl_k: usize,
    kl_groups: usize,
    epoch: u64,
    idx: usize,
    order: Vec<usize>,
    reference: Option<Reference>,
    /// The policy's configuration (the activations are built for it).
    cfg: ModelConfig,
    acts: Activations,
    extra_eval: Option<ExtraEval<'a>>,
}

fn offsets(groups: &[DpoGroup]) -> Vec<usize> {
    let mut off = 0;
    groups
        .iter()
        .map(|g| {
            let o = off;
            off += g.seqs.len();
            o
        })
        .collect()
}

impl<'a> DpoObjective<'a> {
    pub fn new(
        model: &Model,
        train: Vec<DpoGroup>,
        val: Vec<DpoGroup>,
        opts: DpoOptions,
        extra_eval: Option<ExtraEval<'a>>,
    ) -> Result<Self> {
        opts.settings.validate()?;
        if model.cfg.arch != Arch::Decoder || model.cfg.score_head {
            bail!("DPO trains a decoder language model (not an encoder or a reward model)");
        }
        if train.is_empty() {
            bail!("no DPO training pairs (the dataset is empty, or every record was bad)");
        }
        if opts.groups_per_batch == 0 {
            bail!("batch_size (prompts per micro-batch) must be at least 1");
        }
        if opts.seq_len == 0 || opts.seq_len > model.cfg.n_ctx {
            bail!(
                "sequence length {} must be between 1 and the model's context {}",
                opts.seq_len,
                model.cfg.n_ctx
            );
        }
        let all = || train.iter().chain(&val).flat_map(|g| &g.seqs);
        if let Some(s) = all().find(|s| s.len() > opts.seq_len) {
            bail!(
                "a sequence of {} tokens is longer than the sequence length {} (render with the same max_len)",
                s.len(),
                opts.seq_len
            );
        }
        for g in train.iter().chain(&val) {
            if g.pairs.is_empty()
                || g.prompt_len == 0
                || g.seqs.iter().any(|s| s.len() <= g.prompt_len)
                || g.pairs
                    .iter()
                    .any(|&(w, l)| w >= g.seqs.len() || l >= g.seqs.len() || w == l)
            {
                bail!("a DPO group without pairs, prompt or responses (render with render_dpo_groups)");
            }
        }
        let max_k = train
            .iter()
            .chain(&val)
            .map(|g| g.seqs.len())
            .max()
            .unwrap();
        // Without packing rows need only be as long as the longest sequence.
        let longest = all().map(|s| s.len()).max().unwrap_or(1);
        let t = if opts.packing {
            opts.seq_len
        } else {
            opts.seq_len.min(longest)
        };
        let kl_k = match opts.kl_top_k {
            0 => model.cfg.vocab_size,
            k => k.min(model.cfg.vocab_size),
        };
        let kl_groups = match opts.kl_max_groups {
            0 => val.len(),
            n => n.min(val.len()),
        };
        let mut s = DpoObjective {
            train_off: offsets(&train),
            val_off: offsets(&val),
            train,
            val,
            acts: Activations::new(&model.cfg, opts.groups_per_batch * max_k, t, true),
            opts,
            kl_k,
            kl_groups,
            epoch: 0,
            idx: 0,
            order: Vec::new(),
            reference: None,
            cfg: model.cfg.clone(),
            extra_eval,
        };
        s.shuffle();
        Ok(s)
    }

    /// Bytes of the activations (for memory estimates).
    pub fn activation_bytes(&self) -> usize {
        self.acts.bytes()
    }

    /// Validation prompts.
    pub fn val_prompts(&self) -> usize {
        self.val.len()
    }

    /// Validation responses.
    pub fn val_responses(&self) -> usize {
        self.val.iter().map(|g| g.seqs.len()).sum()
    }

    /// Rows of the activations (every response of a micro-batch's prompts, unpacked).
    pub fn activation_rows(&self) -> usize {
        self.acts.capacity().0
    }

    /// Bytes the reference log-probabilities will hold.
    pub fn reference_bytes(&self) -> usize {
        let seqs: usize = self
            .train
            .iter()
            .chain(&self.val)
            .map(|g| g.seqs.len())
            .sum();
        let kl_pos: usize = self.val[..self.kl_groups]
            .iter()
            .flat_map(|g| (0..g.seqs.len()).map(|i| g.response_len(i)))
            .sum();
        8 * seqs + 8 * kl_pos * self.kl_k
    }

    /// Training prompts, pairs and sequences.
    pub fn counts(&self) -> (usize, usize, usize) {
        let pairs = self.train.iter().map(|g| g.pairs.len()).sum();
        let seqs = self.train.iter().map(|g| g.seqs.len()).sum();
        (self.train.len(), pairs, seqs)
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.opts.seed.wrapping_mul(9_000_011).wrapping_add(epoch));
        order.shuffle(&mut rng);
        order
    }

    fn shuffle(&mut self) {
        self.order = self.epoch_order(self.epoch);
    }

    /// The cache key of these data with this reference (see [`model_fingerprint`]) and settings.
    pub fn cache_key(
        &self,
        reference_fingerprint: &str,
        precision: kiln_kernels::Precision,
    ) -> CacheKey {
        let mut h = Sha256::new();
        h.update(b"train");
        hash_groups(&mut h, &self.train);
        h.update(b"val");
        hash_groups(&mut h, &self.val);
        CacheKey {
            data: hex(&h.finalize()),
            reference: reference_fingerprint.to_string(),
            settings: format!(
                "precision={} seq_len={} batch_size={} packing={} seed={} kl_top_k={} kl_groups={}",
                precision.as_str(),
                self.opts.seq_len,
                self.opts.groups_per_batch,
                self.opts.packing,
                self.opts.seed,
                self.kl_k,
                self.kl_groups
            ),
        }
    }

    fn seqs_of<'g>(groups: &[&'g DpoGroup]) -> Vec<(&'g [u32], usize)> {
        groups
            .iter()
            .flat_map(|g| g.seqs.iter().map(|s| (s.as_slice(), g.prompt_len)))
            .collect()
    }

    /// Computes the reference's log-probabilities with `reference` (the initial policy, or another
    /// model of the same tokenizer): the training groups batch by batch in the first epoch's order,
    /// the validation groups in evaluation's batches, so both pass through exactly the arithmetic
    /// the policy's forward will (set `reference.precision` as training will).
    pub fn compute_reference(&mut self, reference: &Model) -> Result<Reference> {
        if reference.cfg.vocab_size != self.cfg.vocab_size {
            bail!(
                "the reference has a vocabulary of {} tokens but the policy has {} (models of different tokenizers?)",
                reference.cfg.vocab_size,
                self.cfg.vocab_size
            );
        }
        if reference.cfg.arch != Arch::Decoder || reference.cfg.n_ctx < self.opts.seq_len {
            bail!(
                "the reference must be a decoder with a context of at least {} tokens",
                self.opts.seq_len
            );
        }
        kiln_kernels::flush_denormals_everywhere();
        let order0 = self.epoch_order(0);
        let (cb, ct) = self.acts.capacity();
        let mut own;
        let acts = if reference.cfg == self.cfg {
            &mut self.acts
        } else {
            own = Activations::new(&reference.cfg, cb, ct, true);
            &mut own
        };
        let (gpb, packing) = (self.opts.groups_per_batch, self.opts.packing);
        let n_train: usize = self.train.iter().map(|g| g.seqs.len()).sum();
        let mut r = Reference {
            train: vec![0.0; n_train],
            kl_k: self.kl_k,
            ..Default::default()
        };
        for chunk in order0.chunks(gpb) {
            let groups: Vec<&DpoGroup> = chunk.iter().map(|&i| &self.train[i]).collect();
            let (_, lp) = forward_logps(reference, acts, &Self::seqs_of(&groups), packing);
            let mut k = 0;
            for &i in chunk {
                for j in 0..self.train[i].seqs.len() {
                    r.train[self.train_off[i] + j] = lp[k];
                    k += 1;
                }
            }
        }
        let v = reference.cfg.vocab_size;
        for (c, chunk) in self.val.chunks(gpb).enumerate() {
            let groups: Vec<&DpoGroup> = chunk.iter().collect();
            let (rows, lp) = forward_logps(reference, acts, &Self::seqs_of(&groups), packing);
            r.val.extend(lp);
            let mut k = 0;
            for (gi, g) in chunk.iter().enumerate() {
                for _ in &g.seqs {
                    if c * gpb + gi < self.kl_groups {
                        let (start, len) = rows.spans[k];
                        for pos in start..start + len {
                            top_k(
                                &acts.logits[pos * v..(pos + 1) * v],
                                self.kl_k,
                                &mut r.kl_ids,
                                &mut r.kl_probs,
                            );
                        }
                    }
                    k += 1;
                }
            }
        }
        Ok(r)
    }

    /// Sets the reference log-probabilities (computed by [`compute_reference`](Self::compute_reference)
    /// on these data, or read back from the cache), checking that they fit the data.
    pub fn use_reference(&mut self, r: Reference) -> Result<()> {
        let n_train: usize = self.train.iter().map(|g| g.seqs.len()).sum();
        let n_val: usize = self.val.iter().map(|g| g.seqs.len()).sum();
        let kl_pos: usize = self.val[..self.kl_groups]
            .iter()
            .flat_map(|g| (0..g.seqs.len()).map(|i| g.response_len(i)))
            .sum();
        if r.train.len() != n_train
            || r.val.len() != n_val
            || r.kl_k != self.kl_k
            || r.kl_ids.len() != kl_pos * self.kl_k
            || r.kl_probs.len() != r.kl_ids.len()
        {
            bail!(
                "reference log-probabilities of other data ({} / {} sequences, {} KL positions × {}; \
                 the data have {n_train} / {n_val}, {kl_pos} × {})",
                r.train.len(),
                r.val.len(),
                r.kl_ids.len() / r.kl_k.max(1),
                r.kl_k,
                self.kl_k
            );
        }
        if let Some(i) = r.train.iter().chain(&r.val).position(|x| !x.is_finite()) {
            bail!("reference log-probability {i} is not finite ({})", {
                let all: Vec<&f64> = r.train.iter().chain(&r.val).collect();
                all[i]
            });
        }
        self.reference = Some(r);
        Ok(())
    }

    /// Metrics of `val`-like groups under `model` (loss, the TRL metrics, and the KL to the
    /// reference on the first KL groups).
    fn eval_val(&mut self, model: &Model) -> Result<Metrics> {
        let reference = self
            .reference
            .as_ref()
            .context("DPO: the reference log-probabilities are not set")?;
        let s = self.opts.settings;
        let gpb = self.opts.groups_per_batch;
        let v = model.cfg.vocab_size;
        let k = self.kl_k;
        let mut tot = BatchLoss::default();
        let (mut excess_sum, mut nll_sum, mut nll_tokens) = (0.0, 0.0, 0usize);
        let (mut kl_sum, mut kl_seqs, mut kl_pos) = (0.0f64, 0usize, 0usize);
        for (c, chunk) in self.val.chunks(gpb).enumerate() {
            let groups: Vec<&DpoGroup> = chunk.iter().collect();
            let (rows, lp) = forward_logps(
                model,
                &mut self.acts,
                &Self::seqs_of(&groups),
                self.opts.packing,
            );
            let off = self.val_off[c * gpb];
            let refs = &reference.val[off..off + lp.len()];
            let bl = batch_loss(&s, &groups, &lp, refs);
            excess_sum += bl.pref_excess * groups.len() as f64;
            let tokens: usize = groups
                .iter()
                .map(|g| g.top().iter().map(|&i| g.response_len(i)).sum::<usize>())
                .sum();
            nll_sum += bl.nll * tokens as f64;
            nll_tokens += tokens;
            tot.pairs += bl.pairs;
            tot.reward_chosen += bl.reward_chosen;
            tot.reward_rejected += bl.reward_rejected;
            tot.correct += bl.correct;
            tot.logp_chosen += bl.logp_chosen;
            tot.logp_rejected += bl.logp_rejected;
            let mut q = 0;
            for (gi, g) in chunk.iter().enumerate() {
                for _ in &g.seqs {
                    if c * gpb + gi < self.kl_groups {
                        let (start, len) = rows.spans[q];
                        for pos in start..start + len {
                            let at = kl_pos * k..(kl_pos + 1) * k;
                            kl_sum += coarse_kl(
                                &self.acts.logits[pos * v..(pos + 1) * v],
                                &reference.kl_ids[at.clone()],
                                &reference.kl_probs[at],
                            );
                            kl_pos += 1;
                        }
                        kl_seqs += 1;
                    }
                    q += 1;
                }
            }
        }
        tot.nll = nll_sum / nll_tokens.max(1) as f64;
        let mut m = tot.metrics(s.sft_coef > 0.0);
        let pref = pair_loss(&s, 0.0).0 + excess_sum / self.val.len().max(1) as f64;
        m.insert("loss".into(), pref + s.sft_coef * tot.nll);
        if kl_seqs > 0 {
            m.insert("kl".into(), kl_sum / kl_seqs as f64);
        }
        Ok(m)
    }
}

/// Appends the `k` most likely tokens of a probability row (ids ascending) and their probabilities.
fn top_k(probs: &[f32], k: usize, ids: &mut Vec<u32>, out: &mut Vec<f32>) {
    if k >= probs.len() {
        ids.extend(0..probs.len() as u32);
        out.extend_from_slice(probs);
        return;
    }
    let mut idx: Vec<u32> = (0..probs.len() as u32).collect();
    // Most likely first, ties by id: a total order, so the choice is deterministic.
    idx.select_nth_unstable_by(k - 1, |a, b| {
        probs[*b as usize]
            .total_cmp(&probs[*a as usize])
            .then(a.cmp(b))
    });
    idx.truncate(k);
    idx.sort_unstable();
    for i in idx {
        ids.push(i);
        out.push(probs[i as usize]);
    }
}

/// KL(p ‖ q) of a full distribution `p` against `q` known on the tokens `ids` only, the rest of
/// either's mass pooled into one outcome: a lower bound of the exact KL (coarsening never raises a
/// KL), equal to it when `ids` covers the vocabulary.
fn coarse_kl(p: &[f32], ids: &[u32], q: &[f32]) -> f64 {
    const FLOOR: f64 = 1e-30;
    let (mut sp, mut sq, mut kl) = (0.0f64, 0.0f64, 0.0f64);
    for (&i, &qj) in ids.iter().zip(q) {
        let (pj, qj) = (p[i as usize] as f64, qj as f64);
        sp += pj;
        sq += qj;
        if pj > 0.0 {
            kl += pj * (pj.ln() - qj.max(FLOOR).ln());
        }
    }
    if ids.len() < p.len() {
        let (pr, qr) = ((1.0 - sp).max(0.0), (1.0 - sq).max(0.0));
        if pr > 0.0 {
            kl += pr * (pr.ln() - qr.max(FLOOR).ln());
        }
    }
    kl
}

impl DpoObjective<'_> {
    /// The next micro-batch's groups (indices into the training set), cycling through shuffled
    /// epochs.
    fn next_groups(&mut self) -> Vec<usize> {
        let mut picked = Vec::with_capacity(self.opts.groups_per_batch);
        while picked.len() < self.opts.groups_per_batch {
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

impl Objective for DpoObjective<'_> {
    fn micro_step(&mut self, model: &mut Model, grad_scale: f32) -> Result<StepStats> {
        let picked = self.next_groups();
        let reference = self
            .reference
            .as_ref()
            .context("DPO: the reference log-probabilities are not set")?;
        let groups: Vec<&DpoGroup> = picked.iter().map(|&i| &self.train[i]).collect();
        let refs: Vec<f64> = picked
            .iter()
            .flat_map(|&i| {
                let off = self.train_off[i];
                reference.train[off..off + self.train[i].seqs.len()]
                    .iter()
                    .copied()
            })
            .collect();
        let seqs = Self::seqs_of(&groups);
        let (rows, lp) = forward_logps(model, &mut self.acts, &seqs, self.opts.packing);
        let s = self.opts.settings;
        let bl = batch_loss(&s, &groups, &lp, &refs);
        let mut dlogp = vec![0.0f32; rows.b * rows.t];
        for (&(start, len), &d) in rows.spans.iter().zip(&bl.dlogp) {
            dlogp[start..start + len].fill((d * grad_scale as f64) as f32);
        }
        model.lm_head_backward(&mut self.acts, &dlogp, None);
        model.backward(&mut self.acts);
        let mut extra = bl.metrics(s.sft_coef > 0.0);
        extra.insert(
            "epoch".into(),
            self.epoch as f64 + self.idx as f64 / self.order.len() as f64,
        );
        Ok(StepStats {
            loss: bl.loss,
            tokens: seqs.iter().map(|s| s.0.len()).sum(),
            extra,
        })
    }

    fn evaluate(&mut self, model: &Model) -> Result<Metrics> {
        let mut m = if self.val.is_empty() {
            Metrics::new()
        } else {
            self.eval_val(model)?
        };
        if let Some(f) = self.extra_eval.as_mut() {
            m.extend(f(model)?);
        }
        Ok(m)
    }

    fn skip_micro_batch(&mut self) -> Result<()> {
        self.next_groups();
        Ok(())
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(DpoState {
            epoch: self.epoch,
            idx: self.idx,
        })
        .unwrap()
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let s: DpoState =
            serde_json::from_value(state.clone()).context("trainer_state.json: DPO state")?;
        self.epoch = s.epoch;
        self.idx = s.idx;
        self.shuffle();
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Drift along samples

/// For each `(prompt, response)` token pair: Σ over the response's tokens of
/// KL(π(·|x, y<t) ‖ ref(·|x, y<t)), exact over the vocabulary (f64 log-softmax of both models'
/// logits). With responses sampled from `policy` its mean estimates the sequence-level
/// KL(π ‖ ref) without the noise (and the negative values) of the sampled log-ratio.
pub fn response_kl(
    policy: &Model,
    reference: &Model,
    items: &[(Vec<u32>, Vec<u32>)],
) -> Result<Vec<f64>> {
    if policy.cfg.vocab_size != reference.cfg.vocab_size {
        bail!("the two models have different vocabularies");
    }
    let v = policy.cfg.vocab_size;
    let log_softmax = |z: &[f32]| -> Vec<f64> {
        let mx = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = mx + z.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
        z.iter().map(|&x| x as f64 - lse).collect()
    };
    items
        .iter()
        .map(|(prompt, resp)| {
            if prompt.is_empty() {
                bail!("response_kl: empty prompt");
            }
            if resp.is_empty() {
                return Ok(0.0);
            }
            let seq: Vec<u32> = prompt.iter().chain(resp).copied().collect();
            let n = seq.len() - 1;
            if n > policy.cfg.n_ctx.min(reference.cfg.n_ctx) {
                bail!(
                    "response_kl: a sequence of {} tokens exceeds the context",
                    seq.len()
                );
            }
            let (lp, lq) = (policy.logits(&seq[..n]), reference.logits(&seq[..n]));
            let mut kl = 0.0;
            for pos in prompt.len() - 1..n {
                let p = log_softmax(&lp[pos * v..(pos + 1) * v]);
                let q = log_softmax(&lq[pos * v..(pos + 1) * v]);
                kl += p
                    .iter()
                    .zip(&q)
                    .map(|(a, b)| a.exp() * (a - b))
                    .sum::<f64>();
            }
            Ok(kl)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softplus_and_sigmoid_are_stable() {
        assert_eq!(softplus(0.0), std::f64::consts::LN_2);
        assert!((softplus(800.0) - 800.0).abs() < 1e-12);
        assert!(softplus(-800.0) >= 0.0 && softplus(-800.0) < 1e-300);
        assert_eq!(sigmoid(0.0), 0.5);
        assert!(sigmoid(-800.0) >= 0.0 && sigmoid(800.0) == 1.0);
    }

    #[test]
    fn top_k_keeps_the_most_likely_tokens_by_id() {
        let p = [0.1f32, 0.4, 0.05, 0.4, 0.05];
        let (mut ids, mut q) = (Vec::new(), Vec::new());
        top_k(&p, 3, &mut ids, &mut q);
        assert_eq!(ids, vec![0, 1, 3]);
        assert_eq!(q, vec![0.1, 0.4, 0.4]);
        // Ties broken by id: of the two 0.05s, token 2.
        top_k(&p, 4, &mut ids, &mut q);
        assert_eq!(&ids[3..], &[0, 1, 2, 3]);
    }

    #[test]
    fn coarse_kl_by_hand() {
        // p = (0.5, 0.3, 0.15, 0.05) against q = (0.6, 0.3, 0.05, 0.05), q known on {0, 1} only:
        // the rest pools tokens 2 and 3 (p 0.2, q 0.1).
        let p = [0.5f32, 0.3, 0.15, 0.05];
        let q = [0.6f32, 0.3, 0.05, 0.05];
        let f = |x: f32| x as f64;
        let got = coarse_kl(&p, &[0, 1], &q[..2]);
        let (pr, qr) = (1.0 - f(p[0]) - f(p[1]), 1.0 - f(q[0]) - f(q[1]));
        let want = f(p[0]) * (f(p[0]) / f(q[0])).ln()
            + f(p[1]) * (f(p[1]) / f(q[1])).ln()
            + pr * (pr / qr).ln();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // 0.5·ln(5/6) + 0.2·ln 2 = 0.047467.
        assert!((got - 0.047_467).abs() < 1e-5, "{got}");
        // Coarsening never raises a KL: the exact one (every token known) is larger here.
        let exact = coarse_kl(&p, &[0, 1, 2, 3], &q);
        let by_hand = 0.5 * (0.5f64 / 0.6).ln() + 0.15 * 3f64.ln();
        assert!((exact - by_hand).abs() < 1e-6, "{exact} vs {by_hand}");
        assert!(got < exact);
        assert_eq!(coarse_kl(&p, &[0, 1], &p[..2]), 0.0);
    }
}
