//! RL with verifiable rewards, without a critic: GRPO (DeepSeek-R1), Dr. GRPO and RLOO.
//!
//! One iteration: take `prompts_per_iter` prompts, sample `group_size` responses to each (one batched
//! KV-cache decode over the whole batch) → score every response with the reward sources (a weighted
//! sum) → advantages relative to the response's group → `inner_epochs` passes of clipped policy
//! updates over minibatches, with an optional k3 KL penalty to a frozen reference. Old log-probs
//! come from the training forward in the first pass's minibatch order, so the first minibatch's
//! ratio is exactly 1. Per-token quantities are indexed by the position that PREDICTS the token.

use crate::dist::{self, StepSums};
use crate::optim::{AdamW, AdamWConfig};
use crate::ppo::{call_hook, prompt_order, row_len, PolicyEval};
use crate::reward::Weighted;
use crate::rollout::{sample_responses, Rows};
use crate::run::RunDir;
use crate::session::{self, Files, NonFinite, RunSession, SessionConfig};
use crate::trainer::{fmt_metrics, Metrics};
use anyhow::{bail, Context, Result};
use kiln_kernels::IGNORE;
use kiln_model::checkpoint::{map_checked, model_files, read_checked};
use kiln_model::{Activations, GenerateOptions, Model, PackedWeights, Sampling, WeightFormat};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// How a response's advantage is made from its group's rewards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Advantage {
    /// GRPO: (r − mean) / (std + 1e-4), std with Bessel's correction (as TRL).
    #[default]
    Group,
    /// Dr. GRPO: r − mean (no division by the std, which favours groups that are almost solved).
    Mean,
    /// RLOO: r minus the mean of the other responses of the group.
    Rloo,
}

/// How per-token losses are averaged into the minibatch's loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LossAgg {
    /// DAPO: the mean over every response token of the minibatch (long answers weigh more).
    #[default]
    Token,
    /// The original GRPO: each response's token mean, then the mean over responses.
    Sequence,
    /// Dr. GRPO: the token sum divided by (responses × max_new_tokens), a constant.
    Constant,
}

impl std::str::FromStr for Advantage {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "group" => Advantage::Group,
            "mean" => Advantage::Mean,
            "rloo" => Advantage::Rloo,
            _ => bail!("unknown advantage {s:?} (expected group, mean or rloo)"),
        })
    }
}

impl std::str::FromStr for LossAgg {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "token" => LossAgg::Token,
            "sequence" => LossAgg::Sequence,
            "constant" => LossAgg::Constant,
            _ => bail!("unknown loss aggregation {s:?} (expected token, sequence or constant)"),
        })
    }
}

/// Advantages of `rewards`, laid out as consecutive groups of `group` responses.
pub fn advantages(rewards: &[f32], group: usize, kind: Advantage) -> Vec<f32> {
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group) {
        let n = g.len() as f64;
        let mean = g.iter().map(|&r| r as f64).sum::<f64>() / n;
        match kind {
            Advantage::Group => {
                let var = if g.len() > 1 {
                    g.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)
                } else {
                    0.0
                };
                let std = var.sqrt();
                out.extend(g.iter().map(|&r| ((r as f64 - mean) / (std + 1e-4)) as f32));
            }
            Advantage::Mean => out.extend(g.iter().map(|&r| (r as f64 - mean) as f32)),
            Advantage::Rloo => {
                let sum: f64 = g.iter().map(|&r| r as f64).sum();
                out.extend(g.iter().map(|&r| {
                    if g.len() > 1 {
                        (r as f64 - (sum - r as f64) / (n - 1.0)) as f32
                    } else {
                        0.0
                    }
                }));
            }
        }
    }
    out
}

/// The weight of each token of each response in a minibatch's loss (`lens[i]` response tokens,
/// `keep[i]` false for responses left out, e.g. truncated ones), so that loss = Σ weight · token loss.
pub fn token_weights(
    lens: &[usize],
    keep: &[bool],
    agg: LossAgg,
    max_new_tokens: usize,
) -> Vec<f32> {
    let kept: Vec<usize> = (0..lens.len())
        .filter(|&i| keep[i] && lens[i] > 0)
        .collect();
    let n = kept.len().max(1) as f32;
    let total: usize = kept.iter().map(|&i| lens[i]).sum();
    (0..lens.len())
        .map(|i| {
            if !keep[i] || lens[i] == 0 {
                return 0.0;
            }
            match agg {
                LossAgg::Token => 1.0 / total.max(1) as f32,
                LossAgg::Sequence => 1.0 / (n * lens[i] as f32),
                LossAgg::Constant => 1.0 / (n * max_new_tokens.max(1) as f32),
            }
        })
        .collect()
}

/// Clipped surrogate with separate bounds (DAPO's clip-higher): returns (loss, dloss/dlogp,
/// clipped?). loss = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)), ρ = exp(logp − logp_old).
pub fn clipped_loss(
    logp: f32,
    old: f32,
    adv: f32,
    eps_low: f32,
    eps_high: f32,
) -> (f32, f32, bool) {
    let ratio = (logp - old).exp();
    let unclipped = -adv * ratio;
    let clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high);
    if unclipped >= clipped {
        (unclipped, -adv * ratio, false)
    } else {
        (clipped, 0.0, true)
    }
}

/// The k3 estimator of KL(π‖π_ref) at one token (Schulman): exp(ref − logp) − (ref − logp) − 1,
/// always ≥ 0; returns (kl, dkl/dlogp).
pub fn k3(logp: f32, ref_logp: f32) -> (f32, f32) {
    let d = ref_logp - logp;
    let e = d.exp();
    (e - d - 1.0, 1.0 - e)
}

/// GRPO settings (TOML `[grpo]`, overridable by flags).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    pub iterations: u64,
    /// Distinct prompts per iteration.
    pub prompts_per_iter: usize,
    /// Responses sampled per prompt.
    pub group_size: usize,
    /// Responses per optimizer step.
    pub minibatch: usize,
    /// Responses per forward/backward pass within a minibatch (0, or at least the minibatch: the
    /// whole minibatch at once).
    /// Gradients accumulate over the passes into the minibatch's one update (the same update to
    /// rounding), so only the activations of this many rows are held: what bounds memory with
    /// long prompts (TRL's per-device batch under gradient accumulation).
    pub micro_batch: usize,
    /// Passes over each iteration's responses (1: on-policy, every ratio of the first pass near 1).
    pub inner_epochs: usize,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub lr: f32,
    pub advantage: Advantage,
    pub loss_agg: LossAgg,
    pub clip_low: f32,
    pub clip_high: f32,
    /// Weight of the k3 KL penalty to the reference (0: no reference model is held).
    pub beta: f32,
    /// Leave responses that hit max_new_tokens without a stop token out of the loss.
    pub mask_truncated: bool,
    /// DAPO's dynamic sampling: groups whose rewards are all equal (no advantage, no gradient)
    /// are dropped and more prompts sampled until `prompts_per_iter` groups with signal are
    /// collected, or `max_sample_rounds` rounds were drawn.
    pub dynamic_sampling: bool,
    pub max_sample_rounds: usize,
    pub grad_clip: f32,
    /// Weights the sampler multiplies by (f32: the training weights; bf16/int8: packed copies,
    /// rebuilt each iteration; the old log-probs always come from the f32 training forward).
    pub sample_weights: String,
    pub eval_every: u64,
    pub ckpt_every: u64,
    pub keep_last: usize,
    pub seed: u64,
    pub non_finite: NonFinite,
    pub max_non_finite: u64,
}

impl GrpoConfig {
    /// Rows of each forward/backward pass on one of `ranks` processes ([`crate::rollout::micro_rows`]).
    pub fn micro_rows(&self, ranks: usize) -> usize {
        crate::rollout::micro_rows(self.minibatch, self.micro_batch, ranks)
    }
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            iterations: 40,
            prompts_per_iter: 16,
            group_size: 8,
            minibatch: 32,
            micro_batch: 8,
            inner_epochs: 1,
            max_new_tokens: 24,
            temperature: 1.0,
            lr: 5e-5,
            advantage: Advantage::Group,
            loss_agg: LossAgg::Token,
            clip_low: 0.2,
            clip_high: 0.28,
            beta: 0.0,
            mask_truncated: false,
            dynamic_sampling: false,
            max_sample_rounds: 4,
            grad_clip: 1.0,
            sample_weights: "f32".into(),
            eval_every: 10,
            ckpt_every: 10,
            keep_last: 2,
            seed: 1337,
            non_finite: NonFinite::Skip,
            max_non_finite: 20,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Default)]
struct GrpoState {
    iteration: u64,
    prompt_epoch: u64,
    prompt_idx: usize,
    rng: [u8; 32],
    rng_word: u128,
    updates: u64,
    skipped_non_finite: u64,
    history: Vec<Metrics>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GrpoSummary {
    pub iterations: u64,
    pub history: Vec<Metrics>,
    pub eval_start: Metrics,
    pub eval_end: Metrics,
    pub seconds: f64,
    pub interrupted: bool,
}

pub struct Grpo<'a> {
    pub cfg: GrpoConfig,
    pub actor: Model,
    /// The frozen reference, needed only when `cfg.beta > 0`.
    pub reference: Option<Model>,
    pub rewards: Vec<Weighted<'a>>,
    /// Rendered prompts (ending in the assistant prefix).
    pub prompts: Vec<Vec<u32>>,
    pub stop_tokens: Vec<u32>,
    pub run: &'a RunDir,
    pub extra_files: Vec<(String, Vec<u8>)>,
    pub eval: Option<PolicyEval<'a>>,
    pub decode: crate::ppo::Decode<'a>,
    pub progress: bool,
    /// Called with ("actor", iteration, model) after each backward, before the update.
    pub grad_hook: Option<crate::ppo::GradHook<'a>>,
}

impl<'a> Grpo<'a> {
    pub fn validate(&self) -> Result<()> {
        let c = &self.cfg;
        if self.prompts.is_empty() {
            bail!("no prompts for GRPO");
        }
        if self.rewards.is_empty() {
            bail!("GRPO needs at least one reward source (--reward)");
        }
        if c.group_size < 2 {
            bail!("group_size must be at least 2 (advantages are relative to the group)");
        }
        // The responses of an iteration need not fill whole minibatches: the last one may be
        // shorter (dynamic sampling makes the count vary anyway).
        if c.minibatch == 0 {
            bail!("minibatch must be at least 1");
        }
        if c.beta > 0.0 {
            match &self.reference {
                Some(r) if r.cfg == self.actor.cfg => {}
                Some(_) => bail!("the reference model's architecture differs from the actor's"),
                // The actor's base (adapters off) is the reference.
                None if self.actor.lora.is_some() => {}
                None => bail!("beta > 0 needs a reference model"),
            }
        }
        if !(c.clip_low >= 0.0 && c.clip_high >= 0.0 && c.temperature > 0.0) {
            bail!("clip_low, clip_high must be >= 0 and temperature > 0");
        }
        c.sample_weights.parse::<WeightFormat>()?;
        let ranks = dist::world().size();
        if !c.prompts_per_iter.is_multiple_of(ranks) || !c.minibatch.is_multiple_of(ranks) {
            bail!(
                "prompts_per_iter ({}) and minibatch ({}) must be multiples of the number of processes ({ranks}): each rank samples whole groups and computes an equal part of every minibatch",
                c.prompts_per_iter,
                c.minibatch
            );
        }
        Ok(())
    }

    /// Runs GRPO (or, with `resume`, continues it) for `cfg.iterations` iterations.
    pub fn train(&mut self, resume: bool) -> Result<GrpoSummary> {
        self.validate()?;
        kiln_kernels::flush_denormals_everywhere();
        let cfg = self.cfg.clone();
        let n_ctx = self.actor.cfg.n_ctx;
        // Over-long prompts are skipped with a count, as SFT and RM skip over-long records.
        let usable: Vec<usize> = (0..self.prompts.len())
            .filter(|&i| self.prompts[i].len() < n_ctx)
            .collect();
        if usable.is_empty() {
            bail!("every prompt is at least as long as the actor's context ({n_ctx} tokens)");
        }
        if usable.len() < self.prompts.len() {
            eprintln!(
                "[grpo] {} of {} prompts skipped: no room for a response in the context of {n_ctx}",
                self.prompts.len() - usable.len(),
                self.prompts.len()
            );
        }
        let usable_prompts: Vec<Vec<u32>> =
            usable.iter().map(|&i| self.prompts[i].clone()).collect();
        let t = row_len(&usable_prompts, cfg.max_new_tokens, n_ctx);
        let sample_weights: WeightFormat = cfg.sample_weights.parse()?;
        let mut session = RunSession::new(
            self.run,
            SessionConfig {
                label: "grpo".into(),
                unit: "iteration",
                total: cfg.iterations,
                ckpt_every: cfg.ckpt_every,
                keep_last: cfg.keep_last,
                non_finite: cfg.non_finite,
                max_non_finite: cfg.max_non_finite,
                grad_clip: cfg.grad_clip,
                progress: self.progress,
            },
            self.extra_files.clone(),
        );
        let mut adamw = AdamW::new(
            &self.actor,
            AdamWConfig {
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
        );
        let mut st = GrpoState {
            rng: ChaCha8Rng::seed_from_u64(cfg.seed).get_seed(),
            ..Default::default()
        };
        let world = dist::world();
        session.resume(resume, &mut st, |dir, st| {
            self.load_state(dir, &mut adamw, st)?;
            Ok(st.iteration)
        })?;
        if world.size() > 1 {
            // Every rank starts from rank 0's weights and moments.
            dist::broadcast_start(world, &mut self.actor, &mut adamw.m, &mut adamw.v)?;
            adamw.step = st.updates;
        }
        let mut rng = ChaCha8Rng::from_seed(st.rng);
        rng.set_word_pos(st.rng_word);
        let mut summary = GrpoSummary::default();
        if let Some(f) = self.eval.as_mut() {
            summary.eval_start = f(&self.actor)?;
            session.say(format!("[grpo] start {}", fmt_metrics(&summary.eval_start)));
        }
        session.start(st.iteration);
        let mut opt = session.optimizer("grpo", adamw, st.skipped_non_finite);
        let mb = cfg.minibatch;
        let g = cfg.group_size;
        // Each rank runs its part of every minibatch.
        let micro = cfg.micro_rows(world.size());
        let mut acts = Activations::new(&self.actor.cfg, micro, t, true);
        let mut ref_acts = self
            .reference
            .as_ref()
            .filter(|_| cfg.beta > 0.0)
            .map(|r| Activations::new(&r.cfg, micro, t, true));
        while st.iteration < cfg.iterations {
            let it_start = Instant::now();
            // Sampling rounds: each draws the next prompts (cycling through a shuffled list) and
            // samples each g times in one batched decode; with dynamic sampling, groups without
            // signal are dropped and another round drawn until the batch is full.
            let t_sample = Instant::now();
            let packed = sample_weights
                .packed()
                .map(|f| PackedWeights::new(&self.actor, f));
            let opts = GenerateOptions {
                max_new_tokens: cfg.max_new_tokens,
                sampling: Sampling {
                    temperature: cfg.temperature,
                    top_k: 0,
                    top_p: 1.0,
                },
                stop_tokens: self.stop_tokens.clone(),
            };
            let mut m = Metrics::new();
            // What the policy scored on everything it sampled, per source: (sum, sum of squares).
            let mut source_sums: Vec<(String, f64, f64)> = Vec::new();
            let (mut all_reward_sum, mut all_right, mut all_judged) = (0.0f64, 0usize, 0usize);
            let (mut drawn, mut flat_groups, mut rounds, mut sampled_tokens) =
                (0usize, 0usize, 0usize, 0usize);
            let mut prompt_of: Vec<usize> = Vec::new();
            let mut kept_sampled: Vec<Vec<u32>> = Vec::new();
            let mut reward: Vec<f32> = Vec::new();
            loop {
                let mut picked = Vec::with_capacity(cfg.prompts_per_iter);
                while picked.len() < cfg.prompts_per_iter {
                    if st.prompt_idx >= usable.len() {
                        st.prompt_epoch += 1;
                        st.prompt_idx = 0;
                    }
                    let order = prompt_order(usable.len(), cfg.seed, st.prompt_epoch);
                    picked.push(usable[order[st.prompt_idx]]);
                    st.prompt_idx += 1;
                }
                let round_prompts: Vec<usize> = picked
                    .iter()
                    .flat_map(|&p| std::iter::repeat_n(p, g))
                    .collect();
                let rn = round_prompts.len();
                let batch_prompts: Vec<Vec<u32>> = round_prompts
                    .iter()
                    .map(|&p| self.prompts[p].clone())
                    .collect();
                let sampled = sample_responses(
                    world,
                    &self.actor,
                    packed.as_ref(),
                    &batch_prompts,
                    &opts,
                    &mut rng,
                )?;
                // Each rank scores its own block of the round.
                let (lo, hi) = dist::block(world, rn);
                let round_rows = Rows::build(&batch_prompts, &sampled, t, &self.stop_tokens);
                sampled_tokens += round_rows.spans.iter().map(|s| s.len).sum::<usize>();
                // Rewards: the weighted sum of every source.
                let mut round_reward = vec![0.0f32; rn];
                for (k, w) in self.rewards.iter_mut().enumerate() {
                    let name = w.source.name();
                    // Each rank scores its own responses.
                    let own = w
                        .source
                        .score(&round_prompts[lo..hi], &round_rows.responses[lo..hi])?;
                    if own.len() != hi - lo {
                        bail!(
                            "reward source {name} returned {} scores for {} responses",
                            own.len(),
                            hi - lo
                        );
                    }
                    let s = dist::all_gather_f32(world, &own)?.concat();
                    if source_sums.len() <= k {
                        source_sums.push((name.clone(), 0.0, 0.0));
                    }
                    source_sums[k].1 += s.iter().map(|&x| x as f64).sum::<f64>();
                    source_sums[k].2 += s.iter().map(|&x| (x as f64).powi(2)).sum::<f64>();
                    if name == "judge" {
                        all_right += s.iter().filter(|&&x| x > 0.5).count();
                        all_judged += rn;
                    }
                    for (r, x) in round_reward.iter_mut().zip(&s) {
                        *r += w.weight * x;
                    }
                }
                all_reward_sum += round_reward.iter().map(|&x| x as f64).sum::<f64>();
                drawn += rn;
                rounds += 1;
                let last_round = rounds >= cfg.max_sample_rounds.max(1);
                let mut keep_group = |gi: usize, prompt_of: &mut Vec<usize>| {
                    let r = gi * g..(gi + 1) * g;
                    prompt_of.extend_from_slice(&round_prompts[r.clone()]);
                    kept_sampled.extend(r.clone().map(|i| sampled[i].clone()));
                    reward.extend_from_slice(&round_reward[r]);
                };
                for (gi, grp) in round_reward.chunks(g).enumerate() {
                    let flat = grp.iter().all(|&x| x == grp[0]);
                    flat_groups += usize::from(flat);
                    let room = prompt_of.len() < cfg.prompts_per_iter * g;
                    if (!flat || !cfg.dynamic_sampling) && room {
                        keep_group(gi, &mut prompt_of);
                    }
                }
                // When no round found a group with signal, the last round's groups are kept (their
                // zero advantages move nothing but the KL term) so every iteration has a batch.
                if last_round && prompt_of.is_empty() {
                    for gi in 0..rn / g {
                        keep_group(gi, &mut prompt_of);
                    }
                }
                let full = prompt_of.len() >= cfg.prompts_per_iter * g;
                if !cfg.dynamic_sampling || full || last_round {
                    break;
                }
            }
            let sample_secs = t_sample.elapsed().as_secs_f64();
            let n = prompt_of.len();
            let batch_prompts: Vec<Vec<u32>> =
                prompt_of.iter().map(|&p| self.prompts[p].clone()).collect();
            let rows = Rows::build(&batch_prompts, &kept_sampled, t, &self.stop_tokens);
            for (name, sum, sq) in &source_sums {
                let mean = sum / drawn as f64;
                m.insert(format!("reward/{name}"), mean);
                m.insert(
                    format!("reward_std/{name}"),
                    (sq / drawn as f64 - mean * mean).max(0.0).sqrt(),
                );
            }
            if all_judged > 0 {
                m.insert("rollout_acc".into(), all_right as f64 / all_judged as f64);
            }
            m.insert("sample_rounds".into(), rounds as f64);
            m.insert("groups_trained".into(), (n / g) as f64);
            m.insert(
                "zero_std_trained".into(),
                reward
                    .chunks(g)
                    .filter(|grp| grp.iter().all(|&x| x == grp[0]))
                    .count() as f64
                    / (n / g).max(1) as f64,
            );
            let adv = advantages(&reward, g, cfg.advantage);
            let keep: Vec<bool> = rows
                .spans
                .iter()
                .map(|s| s.ended || !cfg.mask_truncated)
                .collect();
            // Old (and reference) log-probs in the first pass's minibatch order.
            let orders: Vec<Vec<usize>> = (0..cfg.inner_epochs)
                .map(|e| {
                    let mut o: Vec<usize> = (0..n).collect();
                    o.shuffle(&mut ChaCha8Rng::seed_from_u64(
                        cfg.seed ^ (st.iteration << 8) ^ e as u64 ^ 0x6772_706f,
                    ));
                    o
                })
                .collect();
            let t_train = Instant::now();
            // Each rank computes its part of every minibatch (on one process, all of it).
            let (size, rank) = (world.size(), world.rank());
            let part = |chunk: &[usize], q: usize| {
                let (a, b) = dist::part_of(chunk.len(), q, size);
                (a, b)
            };
            let (mut own_old, mut own_ref) = (Vec::new(), Vec::new());
            for idx in orders[0].chunks(mb).flat_map(|chunk| {
                let (a, b) = part(chunk, rank);
                chunk[a..b].chunks(micro)
            }) {
                let (lp, _) = rows.logprobs(&self.actor, &mut acts, idx, cfg.temperature);
                own_old.extend_from_slice(&lp[..idx.len() * t]);
                if let (Some(r), Some(ra)) = (&self.reference, ref_acts.as_mut()) {
                    let (rlp, _) = rows.logprobs(r, ra, idx, cfg.temperature);
                    own_ref.extend_from_slice(&rlp[..idx.len() * t]);
                } else if self.reference.is_none() && cfg.beta > 0.0 {
                    // LoRA: the reference is the actor with its adapters off.
                    self.actor.set_adapters_enabled(false);
                    let (rlp, _) = rows.logprobs(&self.actor, &mut acts, idx, cfg.temperature);
                    self.actor.set_adapters_enabled(true);
                    own_ref.extend_from_slice(&rlp[..idx.len() * t]);
                }
            }
            let mut old_logp = vec![0.0f32; n * t];
            let mut ref_logp = vec![0.0f32; n * t];
            let all_old = dist::all_gather_f32(world, &own_old)?;
            let all_ref = dist::all_gather_f32(world, &own_ref)?;
            for q in 0..size {
                let mut k = 0;
                for chunk in orders[0].chunks(mb) {
                    let (a, b) = part(chunk, q);
                    for &r in &chunk[a..b] {
                        old_logp[r * t..(r + 1) * t]
                            .copy_from_slice(&all_old[q][k * t..(k + 1) * t]);
                        if !all_ref[q].is_empty() {
                            ref_logp[r * t..(r + 1) * t]
                                .copy_from_slice(&all_ref[q][k * t..(k + 1) * t]);
                        }
                        k += 1;
                    }
                }
            }
            let mut comm_secs = 0.0;
            let (mut clipped, mut ntok, mut ent_sum, mut kl_sum, mut loss_sum) =
                (0usize, 0usize, 0.0f64, 0.0f64, 0.0f64);
            let mut first_ratio_err = 0.0f64;
            for (e, order) in orders.iter().enumerate() {
                for (bi, chunk) in order.chunks(mb).enumerate() {
                    // The loss weights of the whole minibatch; this rank's part of it.
                    let lens: Vec<usize> = chunk.iter().map(|&r| rows.spans[r].len).collect();
                    let kp: Vec<bool> = chunk.iter().map(|&r| keep[r]).collect();
                    let w_all = token_weights(&lens, &kp, cfg.loss_agg, cfg.max_new_tokens);
                    let (a, b) = part(chunk, rank);
                    let (own, w_own) = (&chunk[a..b], &w_all[a..b]);
                    self.actor.zero_grads();
                    let mut mb_loss = 0.0f64;
                    // Micro-batches: their gradients add up to the minibatch's.
                    for (mi, idx) in own.chunks(micro).enumerate() {
                        let w = &w_own[mi * micro..];
                        let (lp, ent) = rows.logprobs(&self.actor, &mut acts, idx, cfg.temperature);
                        let targets = rows.gather(idx).1;
                        let mut dlogp = vec![0.0f32; idx.len() * t];
                        for (k, &r) in idx.iter().enumerate() {
                            for j in 0..t {
                                let (i, gi) = (k * t + j, r * t + j);
                                if targets[i] == IGNORE {
                                    continue;
                                }
                                let (l, d, c) = clipped_loss(
                                    lp[i],
                                    old_logp[gi],
                                    adv[r],
                                    cfg.clip_low,
                                    cfg.clip_high,
                                );
                                let (mut tl, mut td) = (l, d);
                                if cfg.beta > 0.0 {
                                    let (kl, dkl) = k3(lp[i], ref_logp[gi]);
                                    tl += cfg.beta * kl;
                                    td += cfg.beta * dkl;
                                    kl_sum += kl as f64;
                                }
                                dlogp[i] = w[k] * td;
                                mb_loss += (w[k] * tl) as f64;
                                clipped += c as usize;
                                ntok += 1;
                                ent_sum += ent[i] as f64;
                                if e == 0 && bi == 0 && mi == 0 {
                                    let diff = (lp[i] - old_logp[gi]) as f64;
                                    first_ratio_err = first_ratio_err.max((diff.exp() - 1.0).abs());
                                }
                            }
                        }
                        self.actor.lm_head_backward(&mut acts, &dlogp, None);
                        self.actor.backward(&mut acts);
                    }
                    // Data parallel: the minibatch's gradient and loss, summed over the ranks.
                    let mut sums = StepSums {
                        loss: mb_loss,
                        ..StepSums::default()
                    };
                    let step = opt.next_update();
                    let upd = opt.update(
                        &mut self.actor,
                        cfg.lr,
                        &mut sums,
                        step,
                        |m| call_hook(&mut self.grad_hook, "actor", st.iteration + 1, m),
                        |s| session.say(s),
                    )?;
                    comm_secs += upd.comm_seconds;
                    loss_sum += sums.loss;
                }
            }
            // The iteration's token statistics over every rank (and whether any was interrupted).
            let mut own = Metrics::new();
            own.insert("clipped".into(), clipped as f64);
            own.insert("ntok".into(), ntok as f64);
            own.insert("ent".into(), ent_sum);
            own.insert("kl".into(), kl_sum);
            own.insert("stop".into(), session::stop_requested() as u8 as f64);
            let all = dist::sum_metrics(world, &own)?;
            (clipped, ntok) = (all["clipped"] as usize, all["ntok"] as usize);
            (ent_sum, kl_sum) = (all["ent"], all["kl"]);
            let stop = all["stop"] > 0.0;
            first_ratio_err = dist::all_gather_f32(world, &[first_ratio_err as f32])?
                .concat()
                .into_iter()
                .fold(0.0f64, |m, x| m.max(x as f64));
            let train_secs = t_train.elapsed().as_secs_f64();
            let it_secs = it_start.elapsed().as_secs_f64();
            st.iteration += 1;
            st.skipped_non_finite = opt.guard.skipped;
            let nt = ntok.max(1) as f64;
            let n_f = n as f64;
            m.insert("iteration".into(), st.iteration as f64);
            m.insert("reward".into(), all_reward_sum / drawn.max(1) as f64);
            m.insert(
                "zero_std_frac".into(),
                flat_groups as f64 / (drawn / g).max(1) as f64,
            );
            m.insert("entropy".into(), ent_sum / nt);
            m.insert("clip_frac".into(), clipped as f64 / nt);
            m.insert(
                "loss".into(),
                loss_sum / (orders.len() * n.div_ceil(mb)) as f64,
            );
            if cfg.beta > 0.0 {
                m.insert("kl".into(), kl_sum / nt);
            }
            m.insert(
                "response_len".into(),
                rows.spans.iter().map(|s| s.len as f64).sum::<f64>() / n_f,
            );
            m.insert(
                "response_len_max".into(),
                rows.spans.iter().map(|s| s.len).max().unwrap_or(0) as f64,
            );
            m.insert(
                "truncated_frac".into(),
                rows.spans.iter().filter(|s| !s.ended).count() as f64 / n_f,
            );
            m.insert("first_ratio_err".into(), first_ratio_err);
            m.insert("sampled_tokens".into(), sampled_tokens as f64);
            m.insert("train_tokens".into(), ntok as f64);
            m.insert(
                "sample_tok_per_s".into(),
                sampled_tokens as f64 / sample_secs.max(1e-9),
            );
            m.insert(
                "train_tok_per_s".into(),
                (ntok as f64) / train_secs.max(1e-9),
            );
            m.insert("sample_share".into(), sample_secs / it_secs.max(1e-9));
            m.insert("skipped_non_finite".into(), st.skipped_non_finite as f64);
            if world.size() > 1 {
                m.insert("allreduce_share".into(), comm_secs / it_secs.max(1e-9));
            }
            let last = st.iteration == cfg.iterations;
            if (cfg.eval_every > 0 && st.iteration.is_multiple_of(cfg.eval_every)) || last {
                if let Some(f) = self.eval.as_mut() {
                    for (k, v) in f(&self.actor)? {
                        m.insert(format!("eval_{k}"), v);
                    }
                }
            }
            let mut line = session.metrics_line(st.iteration, &m);
            let samples: Vec<String> = rows
                .responses
                .iter()
                .step_by(g)
                .take(3)
                .map(|r| (self.decode)(r))
                .collect();
            line["samples"] = serde_json::json!(samples);
            session.log(&line)?;
            session.progress(
                st.iteration,
                format!("reward {:.3} len {:.1}", m["reward"], m["response_len"]),
            );
            if st.iteration == 1 || st.iteration.is_multiple_of(cfg.eval_every.max(1)) || last {
                session.say(
                    format!(
                        "[grpo] it {} reward {:.3} flat groups {:.2} ent {:.3} clip {:.3} len {:.1} sampling {:.0}% ({:.0} tok/s){}{} | {}",
                        st.iteration,
                        m["reward"],
                        m["zero_std_frac"],
                        m["entropy"],
                        m["clip_frac"],
                        m["response_len"],
                        100.0 * m["sample_share"],
                        m["sample_tok_per_s"],
                        m.get("rollout_acc").map(|a| format!(" rollout acc {a:.3}")).unwrap_or_default(),
                        m.get("eval_accuracy").map(|a| format!(" acc {a:.3}")).unwrap_or_default(),
                        samples.first().cloned().unwrap_or_default().replace('\n', " ")
                    ),
                );
            }
            st.history.push(m.clone());
            summary.eval_end = m
                .iter()
                .filter_map(|(k, v)| k.strip_prefix("eval_").map(|k| (k.to_string(), *v)))
                .collect();
            let stopped = session.end_step(st.iteration, stop, |_| {
                st.rng = rng.get_seed();
                st.rng_word = rng.get_word_pos();
                st.updates = opt.adamw.step;
                self.checkpoint_files(&opt.adamw, &st)
            })?;
            if stopped {
                summary.interrupted = true;
                break;
            }
        }
        summary.seconds = session.finish();
        summary.iterations = st.iteration;
        summary.history = st.history;
        if summary.eval_end.is_empty() {
            if let Some(f) = self.eval.as_mut() {
                summary.eval_end = f(&self.actor)?;
            }
        }
        Ok(summary)
    }

    /// A checkpoint's own files (the session adds the run's extra files): the actor's at the top
    /// level (the checkpoint is a chat model), with the optimizer and the loop's state beside them.
    fn checkpoint_files(&self, opt: &AdamW, st: &GrpoState) -> Result<Files> {
        let mut files = model_files(&self.actor)?;
        files.push(("optimizer.safetensors".into(), opt.to_bytes(&self.actor)?));
        files.push((
            "grpo_state.json".into(),
            serde_json::to_vec_pretty(&serde_json::json!({"state": st, "config": self.cfg}))?,
        ));
        Ok(files)
    }

    fn load_state(
        &mut self,
        dir: &std::path::Path,
        opt: &mut AdamW,
        st: &mut GrpoState,
    ) -> Result<()> {
        crate::trainer::restore_trained(&mut self.actor, dir)?;
        let v: serde_json::Value = serde_json::from_slice(&read_checked(dir, "grpo_state.json")?)?;
        *st = serde_json::from_value(v["state"].clone()).context("grpo_state.json")?;
        opt.load_bytes(
            &self.actor,
            &map_checked(dir, "optimizer.safetensors")?,
            st.updates,
            "optimizer.safetensors",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn advantages_by_hand() {
        // Two groups of 3: [1, 0, 0] and [2, 2, 2].
        let r = [1.0, 0.0, 0.0, 2.0, 2.0, 2.0];
        // mean 1/3, Bessel std sqrt(((2/3)² + 2·(1/3)²)/2) = sqrt(1/3) = 0.57735.
        let s = (1.0f32 / 3.0).sqrt() + 1e-4;
        close(
            &advantages(&r, 3, Advantage::Group),
            &[
                (2.0 / 3.0) / s,
                (-1.0 / 3.0) / s,
                (-1.0 / 3.0) / s,
                0.0,
                0.0,
                0.0,
            ],
        );
        close(
            &advantages(&r, 3, Advantage::Mean),
            &[2.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0, 0.0, 0.0, 0.0],
        );
        // RLOO: 1 − mean(0, 0) = 1; 0 − mean(1, 0) = −0.5.
        close(
            &advantages(&r, 3, Advantage::Rloo),
            &[1.0, -0.5, -0.5, 0.0, 0.0, 0.0],
        );
    }

    #[test]
    fn loss_aggregation_by_hand() {
        let lens = [2, 4, 0, 6];
        let keep = [true, true, true, false];
        // Token: 1 / (2 + 4) for every kept token.
        close(
            &token_weights(&lens, &keep, LossAgg::Token, 8),
            &[1.0 / 6.0, 1.0 / 6.0, 0.0, 0.0],
        );
        // Sequence: 1 / (2 kept responses × own length).
        close(
            &token_weights(&lens, &keep, LossAgg::Sequence, 8),
            &[0.25, 0.125, 0.0, 0.0],
        );
        // Constant: 1 / (2 × 8).
        close(
            &token_weights(&lens, &keep, LossAgg::Constant, 8),
            &[1.0 / 16.0, 1.0 / 16.0, 0.0, 0.0],
        );
        // Each response's weights sum to what the aggregation promises.
        let w = token_weights(&lens, &keep, LossAgg::Sequence, 8);
        assert!((w[0] * 2.0 + w[1] * 4.0 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn clip_higher_and_k3_by_hand() {
        // A > 0 and ratio e^0.24 = 1.271: inside 1 + 0.28, so not clipped; beyond 1 + 0.2 it would be.
        let (l, d, c) = clipped_loss(-0.76, -1.0, 1.0, 0.2, 0.28);
        let r = 0.24f32.exp();
        assert!(!c && (l + r).abs() < 1e-6 && (d + r).abs() < 1e-6);
        let (_, d, c) = clipped_loss(-0.76, -1.0, 1.0, 0.2, 0.2);
        assert!(c && d == 0.0);
        // A < 0 and ratio e^-0.5 = 0.61 < 1 − 0.2: clipped at 0.8.
        let (l, d, c) = clipped_loss(-1.5, -1.0, -1.0, 0.2, 0.28);
        assert!(c && (l - 0.8).abs() < 1e-6 && d == 0.0);
        // k3 is 0 with its gradient when the policy equals the reference, positive otherwise.
        assert_eq!(k3(-2.0, -2.0), (0.0, 0.0));
        let (kl, dkl) = k3(-1.0, -2.0);
        let e = (-1.0f32).exp();
        assert!((kl - (e + 1.0 - 1.0)).abs() < 1e-6 && (dkl - (1.0 - e)).abs() < 1e-6);
        // Its gradient by central differences.
        let h = 1e-3;
        let num = (k3(-1.0 + h, -2.0).0 - k3(-1.0 - h, -2.0).0) / (2.0 * h);
        assert!((num - dkl).abs() < 1e-3);
    }
}
