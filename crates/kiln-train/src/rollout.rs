//! The RL core's rollout pieces, shared by PPO and GRPO: sampled responses laid out as training rows
//! (right-padded prompt + response, next-token targets on the response only), and their
//! log-probabilities through the training forward at the sampling temperature.
//!
//! Per-token quantities are indexed by the position that PREDICTS the token (its target row).

use crate::dist::{self, Collective};
use kiln_data::template::ids;
use kiln_kernels::IGNORE;
use kiln_model::{generate_rows_with, Activations, GenerateOptions, Input, Model, PackedWeights};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Rows of each forward/backward pass of PPO's and GRPO's training on one of `ranks` processes:
/// its part of a minibatch, or `micro_batch` of them (0: the whole part).
pub fn micro_rows(minibatch: usize, micro_batch: usize, ranks: usize) -> usize {
    let part = (minibatch / ranks.max(1)).max(1);
    match micro_batch {
        0 => part,
        m => m.min(part),
    }
}

/// One response's place in its row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// The position predicting the response's first token (the prompt's last token).
    pub start: usize,
    /// Response tokens (the stop token included when it ended).
    pub len: usize,
    /// It ended with a stop token (rather than running out of tokens).
    pub ended: bool,
}

/// Sampled responses as training rows of `t` tokens.
pub struct Rows {
    pub t: usize,
    /// Right-padded rows [n, t].
    pub tokens: Vec<u32>,
    /// Next-token targets: the response tokens at the positions predicting them, IGNORE elsewhere.
    pub targets: Vec<u32>,
    pub valid: Vec<bool>,
    pub spans: Vec<Span>,
    pub responses: Vec<Vec<u32>>,
}

impl Rows {
    /// Lays out `prompts[i]` + `responses[i]` (cut to fit `t`) as row i.
    pub fn build(
        prompts: &[Vec<u32>],
        responses: &[Vec<u32>],
        t: usize,
        stop_tokens: &[u32],
    ) -> Self {
        let n = prompts.len();
        let mut rows = Rows {
            t,
            tokens: vec![ids::PAD; n * t],
            targets: vec![IGNORE; n * t],
            valid: vec![false; n * t],
            spans: Vec::with_capacity(n),
            responses: Vec::with_capacity(n),
        };
        for (r, (p, resp)) in prompts.iter().zip(responses).enumerate() {
            let resp: Vec<u32> = resp.iter().copied().take(t - p.len()).collect();
            let ended = resp.last().is_some_and(|x| stop_tokens.contains(x));
            let row = &mut rows.tokens[r * t..(r + 1) * t];
            row[..p.len()].copy_from_slice(p);
            row[p.len()..p.len() + resp.len()].copy_from_slice(&resp);
            rows.valid[r * t..r * t + p.len() + resp.len()].fill(true);
            for (j, &tok) in resp.iter().enumerate() {
                rows.targets[r * t + p.len() - 1 + j] = tok;
            }
            rows.spans.push(Span {
                start: p.len() - 1,
                len: resp.len(),
                ended,
            });
            rows.responses.push(resp);
        }
        rows
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Rows `idx` as a batch: (tokens, targets, valid, positions).
    pub fn gather(&self, idx: &[usize]) -> (Vec<u32>, Vec<u32>, Vec<bool>, Vec<u32>) {
        let t = self.t;
        let mut tokens = Vec::with_capacity(idx.len() * t);
        let mut targets = Vec::with_capacity(idx.len() * t);
        let mut valid = Vec::with_capacity(idx.len() * t);
        for &r in idx {
            tokens.extend_from_slice(&self.tokens[r * t..(r + 1) * t]);
            targets.extend_from_slice(&self.targets[r * t..(r + 1) * t]);
            valid.extend_from_slice(&self.valid[r * t..(r + 1) * t]);
        }
        let positions = (0..idx.len() * t).map(|i| (i % t) as u32).collect();
        (tokens, targets, valid, positions)
    }

    /// Runs `model`'s training forward over rows `idx` (leaving the hidden states in `acts`).
    pub fn forward(&self, model: &Model, acts: &mut Activations, idx: &[usize]) -> Vec<u32> {
        let (tokens, targets, valid, positions) = self.gather(idx);
        // The last minibatch of an iteration may be short (GRPO's dynamic sampling).
        acts.set_shape(&model.cfg, idx.len(), self.t);
        let input = Input {
            tokens: &tokens,
            positions: &positions,
            valid: Some(&valid),
            segments: None,
            b: idx.len(),
            t: self.t,
        };
        model.forward(acts, &input);
        targets
    }

    /// Log-probabilities (at `temperature`) and entropies of rows `idx` through `model`'s training
    /// forward, [idx.len() · t]; `acts` keeps what the LM head's backward needs.
    pub fn logprobs(
        &self,
        model: &Model,
        acts: &mut Activations,
        idx: &[usize],
        temperature: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let targets = self.forward(model, acts, idx);
        model.lm_head(acts, &targets, temperature);
        (acts.logp.clone(), acts.entropy.clone())
    }
}

/// Responses to `prompts` sampled for RL, the same on every rank: each rank decodes its block of
/// the batch (all of it on one process) in one batched KV-cache decode, each response drawing from
/// its own random stream (seeded from `rng`), so what is sampled does not depend on how the batch
/// is dealt out; then every rank gets every response.
pub fn sample_responses(
    world: &dyn Collective,
    model: &Model,
    packed: Option<&PackedWeights>,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let (lo, hi) = dist::block(world, prompts.len());
    let base: u64 = rng.gen();
    let mut row_rngs: Vec<ChaCha8Rng> = (lo..hi)
        .map(|i| {
            let mut r = ChaCha8Rng::seed_from_u64(base);
            r.set_stream(i as u64);
            r
        })
        .collect();
    let mine = generate_rows_with(
        model,
        packed,
        &prompts[lo..hi],
        opts,
        &mut row_rngs,
        |_, _| {},
    )?;
    Ok(dist::all_gather_json(world, &mine)?.concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_by_hand() {
        let rows = Rows::build(
            &[vec![1, 2], vec![3]],
            &[vec![7, 5], vec![8, 9, 9, 9]],
            4,
            &[5],
        );
        assert_eq!(rows.tokens, vec![1, 2, 7, 5, 3, 8, 9, 9]);
        assert_eq!(rows.targets, vec![IGNORE, 7, 5, IGNORE, 8, 9, 9, IGNORE]);
        assert_eq!(rows.valid, vec![true; 8]);
        assert_eq!(
            rows.spans[0],
            Span {
                start: 1,
                len: 2,
                ended: true
            }
        );
        // Cut to the row: 3 of 4 tokens fit, no stop token.
        assert_eq!(
            rows.spans[1],
            Span {
                start: 0,
                len: 3,
                ended: false
            }
        );
        let (tok, tgt, _, pos) = rows.gather(&[1]);
        assert_eq!(
            (tok, tgt, pos),
            (vec![3, 8, 9, 9], vec![8, 9, 9, IGNORE], vec![0, 1, 2, 3])
        );
    }
}
