//! RLHF with PPO: an actor (from SFT) and a critic (from the reward model) trained against a frozen
//! reward model, with a per-token KL penalty to a frozen reference (the SFT model).
//!
//! One iteration: sample responses (KV cache) → score them once with every model (old log-probs,
//! reference log-probs, values, reward) → rewards r_t = −β·(log π_old − log π_ref), plus the normalised
//! RM score at the last response token → GAE → several epochs of clipped policy and value updates.
//! Every per-token quantity is indexed by the position that PREDICTS the token (its target row).

use crate::dist::{self, StepSums};
use crate::optim::{AdamW, AdamWConfig};
use crate::rm::score_rows;
use crate::rollout::{sample_responses, Rows, Span};
use crate::run::RunDir;
use crate::session::{self, Files, NonFinite, RunSession, SessionConfig};
use crate::trainer::{fmt_metrics, Metrics};
use anyhow::{bail, Context, Result};
use kiln_kernels::IGNORE;
use kiln_model::checkpoint::{
    bytes_to_views, map_checked, model_files, params_from_tensors, read_checked,
};
use kiln_model::{Activations, GenerateOptions, Model, ModelConfig, Sampling};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// PPO settings (TOML `[ppo]`, overridable by flags). Defaults follow the mature implementations
/// (see the RLHF checklist in the README).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    pub iterations: u64,
    /// Prompts sampled per iteration.
    pub rollout_batch: usize,
    /// Sequences per gradient step.
    pub minibatch: usize,
    /// Sequences per forward/backward pass within a minibatch (0, or at least the minibatch: the
    /// whole minibatch at once); gradients accumulate into the minibatch's update, so only this
    /// many rows of activations are held (as GRPO's `micro_batch`).
    pub micro_batch: usize,
    pub ppo_epochs: usize,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub actor_lr: f32,
    pub critic_lr: f32,
    /// Critic warm-up: the first this many iterations update only the critic (OpenRLHF's
    /// `freezing_actor_steps`). A critic started from the reward model has only ever scored
    /// whole answers; until it has learnt values of partial ones, its noise swamps the
    /// advantages.
    pub freeze_actor_iters: u64,
    /// KL coefficient (initial value when adaptive).
    pub kl_coef: f32,
    /// Target KL (nats per sequence) for the adaptive controller; 0 keeps β fixed.
    pub kl_target: f32,
    pub kl_horizon: f32,
    pub gamma: f32,
    pub lam: f32,
    pub clip_eps: f32,
    pub value_clip: f32,
    pub vf_coef: f32,
    pub entropy_coef: f32,
    /// PPO-ptx (InstructGPT): add this × the pretraining LM loss to every policy update (0: off;
    /// needs `Ppo::ptx`).
    pub ptx_coef: f32,
    pub grad_clip: f32,
    /// Clip the normalised RM score to ±this (0: off).
    pub reward_clip: f32,
    /// Added to the score of a response that never emitted the end token (0: off).
    pub missing_end_penalty: f32,
    pub whiten_advantages: bool,
    pub eval_every: u64,
    pub ckpt_every: u64,
    pub keep_last: usize,
    pub seed: u64,
    /// What a non-finite loss or gradient does: skip the update (counted) or stop the run.
    pub non_finite: NonFinite,
    /// Consecutive non-finite updates (of the actor or the critic) that stop the run as diverged.
    pub max_non_finite: u64,
}

impl PpoConfig {
    /// Rows of each forward/backward pass on one of `ranks` processes ([`crate::rollout::micro_rows`]).
    pub fn micro_rows(&self, ranks: usize) -> usize {
        crate::rollout::micro_rows(self.minibatch, self.micro_batch, ranks)
    }
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            iterations: 40,
            rollout_batch: 64,
            minibatch: 16,
            micro_batch: 8,
            ppo_epochs: 2,
            max_new_tokens: 24,
            temperature: 1.0,
            actor_lr: 1e-5,
            critic_lr: 5e-5,
            freeze_actor_iters: 0,
            kl_coef: 0.05,
            kl_target: 0.0,
            kl_horizon: 10_000.0,
            gamma: 1.0,
            lam: 0.95,
            clip_eps: 0.2,
            value_clip: 0.2,
            vf_coef: 1.0,
            entropy_coef: 0.0,
            ptx_coef: 0.0,
            grad_clip: 1.0,
            reward_clip: 5.0,
            missing_end_penalty: -1.0,
            whiten_advantages: true,
            eval_every: 10,
            ckpt_every: 10,
            keep_last: 2,
            seed: 1337,
            non_finite: NonFinite::Skip,
            max_non_finite: 20,
        }
    }
}

/// Generalised advantage estimation for one sequence: returns (advantages, returns = adv + values).
pub fn gae(rewards: &[f32], values: &[f32], gamma: f32, lam: f32) -> (Vec<f32>, Vec<f32>) {
    let n = rewards.len();
    let mut adv = vec![0.0f32; n];
    let mut last = 0.0f32;
    for t in (0..n).rev() {
        let next_v = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_v - values[t];
        last = delta + gamma * lam * last;
        adv[t] = last;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// Whitens values in place (mean 0, std 1), as most PPO implementations do with advantages.
pub fn whiten(x: &mut [f32]) {
    let n = x.len().max(1) as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var.sqrt() + 1e-8);
    for v in x.iter_mut() {
        *v = ((*v as f64 - mean) * inv) as f32;
    }
}

/// Clipped surrogate for one token: returns (loss, dloss/dlogp_new, clipped?).
/// loss = max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(logp_new − logp_old).
pub fn policy_loss(logp_new: f32, logp_old: f32, adv: f32, eps: f32) -> (f32, f32, bool) {
    let ratio = (logp_new - logp_old).exp();
    let unclipped = -adv * ratio;
    let clipped = -adv * ratio.clamp(1.0 - eps, 1.0 + eps);
    if unclipped >= clipped {
        (unclipped, -adv * ratio, false)
    } else {
        (clipped, 0.0, true)
    }
}

/// Clipped value loss for one token: returns (loss, dloss/dv). loss = ½·max((v−R)², (v_clip−R)²)
/// with v_clip = v_old + clip(v − v_old, −ε, ε).
pub fn value_loss(v: f32, v_old: f32, ret: f32, eps: f32) -> (f32, f32) {
    let vc = v_old + (v - v_old).clamp(-eps, eps);
    let (a, b) = ((v - ret).powi(2), (vc - ret).powi(2));
    if a >= b {
        (0.5 * a, v - ret)
    } else {
        let inside = (v - v_old).abs() < eps;
        (0.5 * b, if inside { vc - ret } else { 0.0 })
    }
}

/// The adaptive KL controller of InstructGPT / TRL: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon).
pub fn update_beta(beta: f32, kl: f32, target: f32, n_steps: usize, horizon: f32) -> f32 {
    if target <= 0.0 {
        return beta;
    }
    let e = (kl / target - 1.0).clamp(-0.2, 0.2);
    beta * (1.0 + e * n_steps as f32 / horizon)
}

/// Everything about one rollout batch: the sampled rows and what every model made of them.
struct Rollout {
    rows: Rows,
    old_logp: Vec<f32>,
    values: Vec<f32>,
    adv: Vec<f32>,
    returns: Vec<f32>,
    scores: Vec<f32>,
    kl: Vec<f32>,
}

#[derive(Serialize, Deserialize, Clone)]
struct PpoState {
    iteration: u64,
    beta: f32,
    prompt_epoch: u64,
    prompt_idx: usize,
    rng: [u8; 32],
    rng_word: u128,
    /// Optimizer updates taken (AdamW's bias correction depends on them).
    actor_updates: u64,
    critic_updates: u64,
    /// Data position of the PPO-ptx objective.
    #[serde(default)]
    ptx: serde_json::Value,
    /// Actor and critic updates skipped for a non-finite loss or gradient.
    #[serde(default)]
    skipped_non_finite: u64,
    history: Vec<Metrics>,
}

/// The frozen reward model and the statistics that normalise its scores.
pub struct RewardModel {
    pub model: Model,
    pub mean: f32,
    pub std: f32,
}

/// Turns token ids into text.
pub type Decode<'a> = Box<dyn Fn(&[u32]) -> String + 'a>;

/// Evaluates a policy on held-out prompts (e.g. the demo judge); returns metrics.
pub type PolicyEval<'a> = Box<dyn FnMut(&Model) -> Result<Metrics> + 'a>;

/// Grades one sampled response (prompt index, response tokens): 1 right, 0 wrong, None when it
/// cannot tell. A diagnostic only, never a reward: it shows whether the reward model's scores
/// agree with a ground truth on the policy's own samples.
pub type Grader<'a> = Box<dyn Fn(usize, &[u32]) -> Option<f64> + 'a>;

pub struct Ppo<'a> {
    pub cfg: PpoConfig,
    pub actor: Model,
    pub critic: Model,
    /// The frozen reference; `None`: the actor with its LoRA adapters switched off (its base, with
    /// no second copy of the weights).
    pub reference: Option<Model>,
    pub reward: RewardModel,
    /// Prompts, already rendered with the chat template (ending in the assistant prefix).
    pub prompts: Vec<Vec<u32>>,
    pub stop_tokens: Vec<u32>,
    pub run: &'a RunDir,
    pub extra_files: Vec<(String, Vec<u8>)>,
    pub eval: Option<PolicyEval<'a>>,
    /// Turns tokens into text for the logged samples.
    pub decode: Decode<'a>,
    pub progress: bool,
    /// PPO-ptx: the pretraining objective mixed into the policy updates with `cfg.ptx_coef`.
    pub ptx: Option<Box<dyn crate::trainer::Objective + 'a>>,
    /// Grades every rollout response: logged as `rollout_acc`, and `rm_gap` (mean normalised
    /// RM score of responses graded right minus of those graded wrong).
    pub grader: Option<Grader<'a>>,
    /// Called with ("actor" or "critic", iteration, model) after each backward, before the update:
    /// a place to inspect gradients (tests inject faults here).
    pub grad_hook: Option<GradHook<'a>>,
}

/// See [`Ppo::grad_hook`].
pub type GradHook<'a> = Box<dyn FnMut(&str, u64, &mut Model) + 'a>;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PpoSummary {
    pub iterations: u64,
    pub history: Vec<Metrics>,
    pub eval_start: Metrics,
    pub eval_end: Metrics,
    pub seconds: f64,
    pub interrupted: bool,
}

impl<'a> Ppo<'a> {
    /// Sequence length of the training rows: the longest prompt plus the response budget.
    fn row_len(&self) -> usize {
        row_len(&self.prompts, self.cfg.max_new_tokens, self.actor.cfg.n_ctx)
    }

    pub fn validate(&self) -> Result<()> {
        let n_ctx = self.actor.cfg.n_ctx;
        if self.prompts.is_empty() {
            bail!("no prompts for PPO");
        }
        for (i, p) in self.prompts.iter().enumerate() {
            if p.len() >= n_ctx {
                bail!("prompt {i} has {} tokens, the actor's context is {n_ctx}: no room for a response", p.len());
            }
        }
        for (name, m) in [
            ("reference", self.reference.as_ref().unwrap_or(&self.actor)),
            ("critic", &self.critic),
            ("reward model", &self.reward.model),
        ] {
            if m.cfg.vocab_size != self.actor.cfg.vocab_size {
                bail!(
                    "the {name} has a vocabulary of {} tokens but the actor has {} (models from different tokenizers?)",
                    m.cfg.vocab_size,
                    self.actor.cfg.vocab_size
                );
            }
        }
        match &self.reference {
            Some(r) if r.cfg != self.actor.cfg => {
                bail!("the reference model's architecture differs from the actor's")
            }
            None if self.actor.lora.is_none() => {
                bail!("no reference model: only an actor with LoRA adapters is its own reference (adapters off)")
            }
            _ => {}
        }
        if !self.critic.cfg.score_head || !self.reward.model.cfg.score_head {
            bail!("the critic and the reward model need a score head");
        }
        if self.cfg.ptx_coef > 0.0 && self.ptx.is_none() {
            bail!(
                "ptx_coef is {} but no pretraining data was given for PPO-ptx",
                self.cfg.ptx_coef
            );
        }
        if !self.cfg.rollout_batch.is_multiple_of(self.cfg.minibatch) {
            bail!(
                "rollout_batch ({}) must be a multiple of minibatch ({})",
                self.cfg.rollout_batch,
                self.cfg.minibatch
            );
        }
        let ranks = dist::world().size();
        if !self.cfg.rollout_batch.is_multiple_of(ranks)
            || !self.cfg.minibatch.is_multiple_of(ranks)
        {
            bail!(
                "rollout_batch ({}) and minibatch ({}) must be multiples of the number of processes ({ranks}): each rank samples an equal part of the batch and computes an equal part of every minibatch",
                self.cfg.rollout_batch,
                self.cfg.minibatch
            );
        }
        Ok(())
    }

    /// The critic's values at every position of rows `idx`.
    fn values(model: &Model, acts: &mut Activations, rows: &Rows, idx: &[usize]) -> Vec<f32> {
        rows.forward(model, acts, idx);
        model.score_head(acts)
    }

    /// Samples responses and scores them with every model.
    fn rollout(
        &mut self,
        prompt_ids: &[usize],
        beta: f32,
        rng: &mut ChaCha8Rng,
        order0: &[usize],
        t: usize,
    ) -> Result<Rollout> {
        let cfg = &self.cfg;
        let prompts: Vec<Vec<u32>> = prompt_ids
            .iter()
            .map(|&i| self.prompts[i].clone())
            .collect();
        let opts = GenerateOptions {
            max_new_tokens: cfg.max_new_tokens,
            sampling: Sampling {
                temperature: cfg.temperature,
                top_k: 0,
                top_p: 1.0,
            },
            stop_tokens: self.stop_tokens.clone(),
        };
        let world = dist::world();
        let (size, rank) = (world.size(), world.rank());
        let n = prompts.len();
        let responses = sample_responses(world, &self.actor, None, &prompts, &opts, rng)?;
        // Each rank scores its own block of the batch.
        let (lo, hi) = dist::block(world, n);
        let mut ro = Rollout {
            rows: Rows::build(&prompts, &responses, t, &self.stop_tokens),
            old_logp: vec![0.0; n * t],
            values: vec![0.0; n * t],
            adv: vec![0.0; n * t],
            returns: vec![0.0; n * t],
            scores: vec![0.0; n],
            kl: vec![0.0; n],
        };
        // Old log-probs, reference log-probs and values, computed minibatch by minibatch in the
        // order of the first PPO epoch, each rank its part of every minibatch as in training (so
        // the first minibatch's ratio is exactly 1); then every rank gets all of them.
        let micro = cfg.micro_rows(size);
        let mut acts = Activations::new(&self.actor.cfg, micro, t, true);
        let mut ref_acts = self
            .reference
            .as_ref()
            .map(|r| Activations::new(&r.cfg, micro, t, true));
        let mut vacts = Activations::new(&self.critic.cfg, micro, t, false);
        let (mut own_old, mut own_ref, mut own_val) = (Vec::new(), Vec::new(), Vec::new());
        // In the training passes' micro-batches, so that they recompute these bits exactly.
        for idx in order0.chunks(cfg.minibatch).flat_map(|chunk| {
            let (a, b) = dist::part_of(chunk.len(), rank, size);
            chunk[a..b].chunks(micro)
        }) {
            let (lp, _) = ro
                .rows
                .logprobs(&self.actor, &mut acts, idx, cfg.temperature);
            let (rlp, _) = match (&self.reference, ref_acts.as_mut()) {
                (Some(r), Some(ra)) => ro.rows.logprobs(r, ra, idx, cfg.temperature),
                _ => {
                    self.actor.set_adapters_enabled(false);
                    let out = ro
                        .rows
                        .logprobs(&self.actor, &mut acts, idx, cfg.temperature);
                    self.actor.set_adapters_enabled(true);
                    out
                }
            };
            let v = Self::values(&self.critic, &mut vacts, &ro.rows, idx);
            let rows_t = idx.len() * t;
            own_old.extend_from_slice(&lp[..rows_t]);
            own_ref.extend_from_slice(&rlp[..rows_t]);
            own_val.extend_from_slice(&v[..rows_t]);
        }
        let mut ref_logp = vec![0.0f32; n * t];
        let all_old = dist::all_gather_f32(world, &own_old)?;
        let all_ref = dist::all_gather_f32(world, &own_ref)?;
        let all_val = dist::all_gather_f32(world, &own_val)?;
        for q in 0..size {
            let mut k = 0;
            for chunk in order0.chunks(cfg.minibatch) {
                let (a, b) = dist::part_of(chunk.len(), q, size);
                for &r in &chunk[a..b] {
                    let (row, from) = (r * t..(r + 1) * t, k * t..(k + 1) * t);
                    ro.old_logp[row.clone()].copy_from_slice(&all_old[q][from.clone()]);
                    ref_logp[row.clone()].copy_from_slice(&all_ref[q][from.clone()]);
                    ro.values[row].copy_from_slice(&all_val[q][from]);
                    k += 1;
                }
            }
        }
        // Reward-model scores at each response's last token, normalised with the RM's training
        // statistics; each rank scores its block of the batch.
        let seqs: Vec<Vec<u32>> = (lo..hi)
            .map(|r| {
                let sp = ro.rows.spans[r];
                ro.rows.tokens[r * t..r * t + sp.start + 1 + sp.len].to_vec()
            })
            .collect();
        let mut racts = Activations::new(&self.reward.model.cfg, micro, t, false);
        let mut own_scores = Vec::with_capacity(hi - lo);
        for chunk in seqs.chunks(micro) {
            for x in score_rows(&self.reward.model, &mut racts, chunk) {
                let mut z = (x - self.reward.mean) / self.reward.std;
                if cfg.reward_clip > 0.0 {
                    z = z.clamp(-cfg.reward_clip, cfg.reward_clip);
                }
                own_scores.push(z);
            }
        }
        ro.scores = dist::all_gather_f32(world, &own_scores)?.concat();
        if ro.scores.len() != n {
            bail!("{} reward scores for {n} responses", ro.scores.len());
        }
        // Every rank has the whole batch from here on: the rewards, GAE and the whitening
        // statistics below are the same on every rank.
        // Per-token rewards and GAE over each response.
        for r in 0..n {
            let Span { start, len, ended } = ro.rows.spans[r];
            if len == 0 {
                continue;
            }
            let span = r * t + start..r * t + start + len;
            let mut rewards: Vec<f32> = span
                .clone()
                .map(|i| -beta * (ro.old_logp[i] - ref_logp[i]))
                .collect();
            ro.kl[r] = span.clone().map(|i| ro.old_logp[i] - ref_logp[i]).sum();
            let mut score = ro.scores[r];
            if !ended {
                score += cfg.missing_end_penalty;
            }
            *rewards.last_mut().unwrap() += score;
            let (adv, ret) = gae(&rewards, &ro.values[span.clone()], cfg.gamma, cfg.lam);
            ro.adv[span.clone()].copy_from_slice(&adv);
            ro.returns[span].copy_from_slice(&ret);
        }
        if cfg.whiten_advantages {
            let idx: Vec<usize> = (0..n * t)
                .filter(|&i| ro.rows.targets[i] != IGNORE)
                .collect();
            let mut a: Vec<f32> = idx.iter().map(|&i| ro.adv[i]).collect();
            whiten(&mut a);
            for (k, &i) in idx.iter().enumerate() {
                ro.adv[i] = a[k];
            }
        }
        Ok(ro)
    }

    /// Runs PPO (or, with `resume`, continues it) for `cfg.iterations` iterations.
    pub fn train(&mut self, resume: bool) -> Result<PpoSummary> {
        self.validate()?;
        kiln_kernels::flush_denormals_everywhere();
        let cfg = self.cfg.clone();
        let t = self.row_len();
        let mut session = RunSession::new(
            self.run,
            SessionConfig {
                label: "ppo".into(),
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
        let adamw = |model: &Model| {
            AdamW::new(
                model,
                AdamWConfig {
                    weight_decay: 0.0,
                    ..AdamWConfig::default()
                },
            )
        };
        let (mut actor_adamw, mut critic_adamw) = (adamw(&self.actor), adamw(&self.critic));
        let mut st = PpoState {
            iteration: 0,
            beta: cfg.kl_coef,
            prompt_epoch: 0,
            prompt_idx: 0,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed).get_seed(),
            rng_word: 0,
            actor_updates: 0,
            critic_updates: 0,
            ptx: serde_json::Value::Null,
            skipped_non_finite: 0,
            history: Vec::new(),
        };
        let mut summary = PpoSummary::default();
        let world = dist::world();
        let (size, rank) = (world.size(), world.rank());
        session.resume(resume, &mut st, |dir, st| {
            self.load_state(dir, &mut actor_adamw, &mut critic_adamw, st)?;
            Ok(st.iteration)
        })?;
        if size > 1 {
            // Every rank starts from rank 0's actor, critic and moments.
            dist::broadcast_start(
                world,
                &mut self.actor,
                &mut actor_adamw.m,
                &mut actor_adamw.v,
            )?;
            dist::broadcast_start(
                world,
                &mut self.critic,
                &mut critic_adamw.m,
                &mut critic_adamw.v,
            )?;
            actor_adamw.step = st.actor_updates;
            critic_adamw.step = st.critic_updates;
        }
        let mut rng = ChaCha8Rng::from_seed(st.rng);
        rng.set_word_pos(st.rng_word);
        if let Some(f) = self.eval.as_mut() {
            summary.eval_start = f(&self.actor)?;
            session.say(format!("[ppo] start {}", fmt_metrics(&summary.eval_start)));
        }
        session.start(st.iteration);
        let mb = cfg.minibatch;
        // An optimizer (and guard) per model; the state counts their skipped updates together.
        let mut actor_opt = session.optimizer("ppo actor", actor_adamw, st.skipped_non_finite);
        let mut critic_opt = session.optimizer("ppo critic", critic_adamw, 0);
        // Each rank computes its part of every minibatch (on one process, all of it).
        let micro = cfg.micro_rows(size);
        let mut acts = Activations::new(&self.actor.cfg, micro, t, true);
        let mut vacts = Activations::new(&self.critic.cfg, micro, t, false);
        while st.iteration < cfg.iterations {
            // The next prompts, cycling through a shuffled prompt list.
            let mut ids_ = Vec::with_capacity(cfg.rollout_batch);
            while ids_.len() < cfg.rollout_batch {
                if st.prompt_idx >= self.prompts.len() {
                    st.prompt_epoch += 1;
                    st.prompt_idx = 0;
                }
                let order = prompt_order(self.prompts.len(), cfg.seed, st.prompt_epoch);
                ids_.push(order[st.prompt_idx]);
                st.prompt_idx += 1;
            }
            let n = ids_.len();
            let epoch_orders: Vec<Vec<usize>> = (0..cfg.ppo_epochs)
                .map(|e| {
                    let mut o: Vec<usize> = (0..n).collect();
                    o.shuffle(&mut ChaCha8Rng::seed_from_u64(
                        cfg.seed ^ (st.iteration << 8) ^ e as u64,
                    ));
                    o
                })
                .collect();
            let ro = self.rollout(&ids_, st.beta, &mut rng, &epoch_orders[0], t)?;
            let mut m = Metrics::new();
            let (mut ptx_loss, mut ptx_steps) = (0.0f64, 0usize);
            let (mut clipped, mut ntok, mut approx_kl, mut ent_sum, mut vloss_sum, mut pg_sum) =
                (0usize, 0usize, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
            let mut first_ratio_err = 0.0f64;
            for (e, order) in epoch_orders.iter().enumerate() {
                for (bi, chunk) in order.chunks(mb).enumerate() {
                    // The losses are means over the whole minibatch's response tokens (on every
                    // rank); this rank computes its part of the minibatch.
                    let count = chunk
                        .iter()
                        .map(|&r| ro.rows.spans[r].len)
                        .sum::<usize>()
                        .max(1) as f32;
                    let (a, b) = dist::part_of(chunk.len(), rank, size);
                    let own = &chunk[a..b];
                    let train_actor = st.iteration >= cfg.freeze_actor_iters;
                    // Actor: clipped surrogate (+ entropy bonus), micro-batch by micro-batch,
                    // the gradients adding up to the minibatch's.
                    self.actor.zero_grads();
                    let mut mb_loss = 0.0f64;
                    for (mi, rows) in own.chunks(micro).enumerate() {
                        let targets: Vec<u32> = ro.rows.gather(rows).1;
                        let (lp, ent) =
                            ro.rows
                                .logprobs(&self.actor, &mut acts, rows, cfg.temperature);
                        let mut dlogp = vec![0.0f32; rows.len() * t];
                        let mut dent = vec![0.0f32; rows.len() * t];
                        for (k, &r) in rows.iter().enumerate() {
                            for j in 0..t {
                                let (i, g) = (k * t + j, r * t + j);
                                if targets[i] == IGNORE {
                                    continue;
                                }
                                let (l, d, c) =
                                    policy_loss(lp[i], ro.old_logp[g], ro.adv[g], cfg.clip_eps);
                                dlogp[i] = d / count;
                                dent[i] = -cfg.entropy_coef / count;
                                pg_sum += l as f64;
                                mb_loss += (l - cfg.entropy_coef * ent[i]) as f64 / count as f64;
                                clipped += c as usize;
                                ntok += 1;
                                let diff = (lp[i] - ro.old_logp[g]) as f64;
                                approx_kl += 0.5 * diff * diff;
                                ent_sum += ent[i] as f64;
                                if e == 0 && bi == 0 && mi == 0 {
                                    first_ratio_err = first_ratio_err.max((diff.exp() - 1.0).abs());
                                }
                            }
                        }
                        if train_actor {
                            let use_ent = cfg.entropy_coef != 0.0;
                            self.actor.lm_head_backward(
                                &mut acts,
                                &dlogp,
                                use_ent.then_some(&dent[..]),
                            );
                            self.actor.backward(&mut acts);
                        }
                    }
                    if train_actor {
                        // PPO-ptx's term is added once per update: by rank 0, whose gradient
                        // carries it into the sum (rank 0 alone walks and saves the ptx data).
                        if cfg.ptx_coef > 0.0 && rank == 0 {
                            let ptx = self
                                .ptx
                                .as_mut()
                                .context("ptx_coef > 0 needs pretraining data (ptx_data)")?;
                            ptx_loss += ptx.micro_step(&mut self.actor, cfg.ptx_coef)?.loss;
                            ptx_steps += 1;
                        }
                        // Data parallel: the minibatch's gradient and loss, summed over the ranks.
                        let step = actor_opt.next_update();
                        actor_opt.update(
                            &mut self.actor,
                            cfg.actor_lr,
                            &mut StepSums {
                                loss: mb_loss,
                                ..StepSums::default()
                            },
                            step,
                            |m| call_hook(&mut self.grad_hook, "actor", st.iteration + 1, m),
                            |m| session.say(m),
                        )?;
                    }
                    // Critic: clipped value loss, micro-batch by micro-batch likewise.
                    self.critic.zero_grads();
                    let mut mb_vloss = 0.0f64;
                    for rows in own.chunks(micro) {
                        let targets: Vec<u32> = ro.rows.gather(rows).1;
                        let v = Self::values(&self.critic, &mut vacts, &ro.rows, rows);
                        let mut dv = vec![0.0f32; rows.len() * t];
                        for (k, &r) in rows.iter().enumerate() {
                            for j in 0..t {
                                let (i, g) = (k * t + j, r * t + j);
                                if targets[i] == IGNORE {
                                    continue;
                                }
                                let (l, d) =
                                    value_loss(v[i], ro.values[g], ro.returns[g], cfg.value_clip);
                                dv[i] = cfg.vf_coef * d / count;
                                vloss_sum += l as f64;
                                mb_vloss += l as f64 / count as f64;
                            }
                        }
                        self.critic.score_head_backward(&mut vacts, &dv);
                        self.critic.backward(&mut vacts);
                    }
                    let step = critic_opt.next_update();
                    critic_opt.update(
                        &mut self.critic,
                        cfg.critic_lr,
                        &mut StepSums {
                            loss: mb_vloss,
                            ..StepSums::default()
                        },
                        step,
                        |m| call_hook(&mut self.grad_hook, "critic", st.iteration + 1, m),
                        |m| session.say(m),
                    )?;
                }
            }
            // The iteration's token statistics over every rank (and whether any was interrupted).
            let mut own = Metrics::new();
            own.insert("clipped".into(), clipped as f64);
            own.insert("ntok".into(), ntok as f64);
            own.insert("approx_kl".into(), approx_kl);
            own.insert("ent".into(), ent_sum);
            own.insert("vloss".into(), vloss_sum);
            own.insert("pg".into(), pg_sum);
            own.insert("ptx_loss".into(), ptx_loss);
            own.insert("ptx_steps".into(), ptx_steps as f64);
            own.insert("stop".into(), session::stop_requested() as u8 as f64);
            let all = dist::sum_metrics(world, &own)?;
            (clipped, ntok) = (all["clipped"] as usize, all["ntok"] as usize);
            (approx_kl, ent_sum, vloss_sum, pg_sum) =
                (all["approx_kl"], all["ent"], all["vloss"], all["pg"]);
            (ptx_loss, ptx_steps) = (all["ptx_loss"], all["ptx_steps"] as usize);
            let stop = all["stop"] > 0.0;
            if size > 1 {
                first_ratio_err = dist::all_gather_f32(world, &[first_ratio_err as f32])?
                    .concat()
                    .into_iter()
                    .fold(0.0f64, |m, x| m.max(x as f64));
            }
            // Iteration metrics.
            let nt = ntok.max(1) as f64;
            let n_f = n as f64;
            let mean_kl = ro.kl.iter().map(|&x| x as f64).sum::<f64>() / n_f;
            let resp_tokens: Vec<usize> = (0..n * t)
                .filter(|&i| ro.rows.targets[i] != IGNORE)
                .collect();
            let ev = explained_variance(
                &resp_tokens
                    .iter()
                    .map(|&i| ro.values[i] as f64)
                    .collect::<Vec<_>>(),
                &resp_tokens
                    .iter()
                    .map(|&i| ro.returns[i] as f64)
                    .collect::<Vec<_>>(),
            );
            st.iteration += 1;
            m.insert("iteration".into(), st.iteration as f64);
            m.insert(
                "reward".into(),
                ro.scores.iter().map(|&x| x as f64).sum::<f64>() / n_f,
            );
            m.insert("kl".into(), mean_kl);
            m.insert("beta".into(), st.beta as f64);
            m.insert("entropy".into(), ent_sum / nt);
            m.insert("clip_frac".into(), clipped as f64 / nt);
            m.insert("approx_kl".into(), approx_kl / nt);
            m.insert("policy_loss".into(), pg_sum / nt);
            m.insert("value_loss".into(), vloss_sum / nt);
            m.insert("explained_var".into(), ev);
            m.insert(
                "sampled_tokens".into(),
                ro.rows.spans.iter().map(|s| s.len as f64).sum::<f64>(),
            );
            m.insert("train_tokens".into(), ntok as f64);
            m.insert(
                "response_len".into(),
                ro.rows.spans.iter().map(|s| s.len as f64).sum::<f64>() / n_f,
            );
            m.insert(
                "ended_frac".into(),
                ro.rows.spans.iter().filter(|s| s.ended).count() as f64 / n_f,
            );
            m.insert("first_ratio_err".into(), first_ratio_err);
            st.skipped_non_finite = actor_opt.guard.skipped + critic_opt.guard.skipped;
            m.insert("skipped_non_finite".into(), st.skipped_non_finite as f64);
            if let Some(grade) = &self.grader {
                let (mut right, mut wrong) = (Vec::new(), Vec::new());
                for ((&p, resp), &score) in ids_.iter().zip(&ro.rows.responses).zip(&ro.scores) {
                    match grade(p, resp) {
                        Some(g) if g > 0.5 => right.push(score as f64),
                        Some(_) => wrong.push(score as f64),
                        None => {}
                    }
                }
                let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
                let graded = right.len() + wrong.len();
                if graded > 0 {
                    m.insert("rollout_acc".into(), right.len() as f64 / graded as f64);
                }
                if !right.is_empty() && !wrong.is_empty() {
                    m.insert("rm_gap".into(), mean(&right) - mean(&wrong));
                }
            }
            if ptx_steps > 0 {
                m.insert("ptx_loss".into(), ptx_loss / ptx_steps as f64);
            }
            st.beta = update_beta(st.beta, mean_kl as f32, cfg.kl_target, n, cfg.kl_horizon);
            let last = st.iteration == cfg.iterations;
            if (cfg.eval_every > 0 && st.iteration.is_multiple_of(cfg.eval_every)) || last {
                if let Some(f) = self.eval.as_mut() {
                    for (k, v) in f(&self.actor)? {
                        m.insert(format!("eval_{k}"), v);
                    }
                }
            }
            let mut line = session.metrics_line(st.iteration, &m);
            let samples: Vec<String> = ro
                .rows
                .responses
                .iter()
                .take(3)
                .map(|r| (self.decode)(r))
                .collect();
            line["samples"] = serde_json::json!(samples);
            session.log(&line)?;
            session.progress(
                st.iteration,
                format!(
                    "reward {:.3} kl {:.3} len {:.1}",
                    m["reward"], m["kl"], m["response_len"]
                ),
            );
            if st.iteration == 1 || st.iteration.is_multiple_of(cfg.eval_every.max(1)) || last {
                session.say(format!(
                    "[ppo] it {} reward {:.3} kl {:.3} beta {:.4} ent {:.3} clip {:.3} vloss {:.4} len {:.1}{} | {}",
                    st.iteration, m["reward"], m["kl"], m["beta"], m["entropy"], m["clip_frac"], m["value_loss"], m["response_len"],
                    m.get("rollout_acc").map(|a| format!(" rollout acc {a:.3} rm gap {:.2}", m.get("rm_gap").unwrap_or(&f64::NAN))).unwrap_or_default()
                        + &m.get("eval_accuracy").map(|a| format!(" acc {a:.3}")).unwrap_or_default(),
                    samples.first().cloned().unwrap_or_default().replace('\n', " ")
                ));
            }
            st.history.push(m.clone());
            summary.eval_end = m
                .iter()
                .filter_map(|(k, v)| k.strip_prefix("eval_").map(|k| (k.to_string(), *v)))
                .collect();
            let stopped = session.end_step(st.iteration, stop, |_| {
                st.rng = rng.get_seed();
                st.rng_word = rng.get_word_pos();
                st.actor_updates = actor_opt.adamw.step;
                st.critic_updates = critic_opt.adamw.step;
                st.ptx = self.ptx.as_ref().map(|p| p.state()).unwrap_or_default();
                self.checkpoint_files(&actor_opt.adamw, &critic_opt.adamw, &st)
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

    /// A checkpoint's own files (the session adds the run's extra files). The actor's are at the
    /// top level, so the checkpoint is itself a chat model; the critic and both optimizers sit
    /// beside them.
    fn checkpoint_files(
        &self,
        actor_opt: &AdamW,
        critic_opt: &AdamW,
        st: &PpoState,
    ) -> Result<Files> {
        let mut files = model_files(&self.actor)?;
        files.push((
            "optimizer.safetensors".into(),
            actor_opt.to_bytes(&self.actor)?,
        ));
        let critic = model_files(&self.critic)?;
        files.push(("critic.safetensors".into(), critic[0].1.clone()));
        files.push(("critic_config.json".into(), critic[1].1.clone()));
        files.push((
            "critic_optimizer.safetensors".into(),
            critic_opt.to_bytes(&self.critic)?,
        ));
        files.push((
            "ppo_state.json".into(),
            serde_json::to_vec_pretty(&serde_json::json!({"state": st, "config": self.cfg}))?,
        ));
        Ok(files)
    }

    fn load_state(
        &mut self,
        dir: &std::path::Path,
        actor_opt: &mut AdamW,
        critic_opt: &mut AdamW,
        st: &mut PpoState,
    ) -> Result<()> {
        crate::trainer::restore_trained(&mut self.actor, dir)?;
        let what = format!("{}/critic.safetensors", dir.display());
        let file = map_checked(dir, "critic.safetensors")?;
        let tensors = bytes_to_views(&file, &what)?;
        match &mut self.critic.lora {
            // A critic with adapters saves those (and its score head) only, and its
            // adapter_config.json as critic_config.json.
            Some(set) => set.fill_from(&tensors, &what)?,
            None => {
                let ccfg: serde_json::Value =
                    serde_json::from_slice(&read_checked(dir, "critic_config.json")?)?;
                let ccfg = ModelConfig::from_hf_json(&ccfg)?;
                self.critic.params = params_from_tensors(&ccfg, &tensors, &what)?;
            }
        }
        let v: serde_json::Value = serde_json::from_slice(&read_checked(dir, "ppo_state.json")?)?;
        *st = serde_json::from_value(v["state"].clone()).context("ppo_state.json")?;
        if let Some(p) = self.ptx.as_mut() {
            if !st.ptx.is_null() {
                p.restore(&st.ptx)?;
            }
        }
        actor_opt.load_bytes(
            &self.actor,
            &map_checked(dir, "optimizer.safetensors")?,
            st.actor_updates,
            "optimizer.safetensors",
        )?;
        critic_opt.load_bytes(
            &self.critic,
            &map_checked(dir, "critic_optimizer.safetensors")?,
            st.critic_updates,
            "critic_optimizer.safetensors",
        )?;
        Ok(())
    }
}

/// Calls the gradient hook, if there is one, with `who` (the model's role) and the iteration.
pub(crate) fn call_hook(hook: &mut Option<GradHook>, who: &str, iteration: u64, model: &mut Model) {
    if let Some(h) = hook.as_mut() {
        h(who, iteration, model);
    }
}

/// Length of PPO's training rows: the longest prompt plus the response budget, within the context.
pub fn row_len(prompts: &[Vec<u32>], max_new_tokens: usize, n_ctx: usize) -> usize {
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(1);
    (longest + max_new_tokens).min(n_ctx)
}

pub(crate) fn prompt_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut o: Vec<usize> = (0..n).collect();
    o.shuffle(&mut ChaCha8Rng::seed_from_u64(
        seed.wrapping_add(epoch.wrapping_mul(0x9e37_79b9)),
    ));
    o
}

/// 1 − Var(returns − values) / Var(returns): how much of the return the critic explains.
pub fn explained_variance(values: &[f64], returns: &[f64]) -> f64 {
    let n = values.len().max(1) as f64;
    let var = |x: &[f64]| {
        let m = x.iter().sum::<f64>() / n;
        x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / n
    };
    let diff: Vec<f64> = returns.iter().zip(values).map(|(r, v)| r - v).collect();
    let vr = var(returns);
    if vr < 1e-12 {
        return 0.0;
    }
    1.0 - var(&diff) / vr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gae_by_hand() {
        // γ = 1, λ = 0.5; rewards [0, 0, 1], values [0.5, 0.2, 0.4].
        let (adv, ret) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.2, 0.4], 1.0, 0.5);
        // δ2 = 1 − 0.4 = 0.6; δ1 = 0 + 0.4 − 0.2 = 0.2; δ0 = 0 + 0.2 − 0.5 = −0.3
        // A2 = 0.6; A1 = 0.2 + 0.5·0.6 = 0.5; A0 = −0.3 + 0.5·0.5 = −0.05
        let expect = [-0.05f32, 0.5, 0.6];
        for (a, e) in adv.iter().zip(expect) {
            assert!((a - e).abs() < 1e-6, "{adv:?}");
        }
        let expect_ret = [0.45f32, 0.7, 1.0];
        for (a, e) in ret.iter().zip(expect_ret) {
            assert!((a - e).abs() < 1e-6, "{ret:?}");
        }
        // With λ = 1 and γ = 1 the return is the sum of future rewards.
        let (_, ret) = gae(&[0.1, 0.2, 0.3], &[9.0, -4.0, 2.0], 1.0, 1.0);
        for (a, e) in ret.iter().zip([0.6f32, 0.5, 0.3]) {
            assert!((a - e).abs() < 1e-5, "{ret:?}");
        }
    }

    #[test]
    fn clipped_policy_loss_by_hand() {
        // Ratio 1: loss = −A, gradient −A.
        let (l, d, c) = policy_loss(-1.0, -1.0, 2.0, 0.2);
        assert_eq!((l, d, c), (-2.0, -2.0, false));
        // Ratio e^0.5 ≈ 1.65 with A > 0: clipped at 1.2, no gradient.
        let (l, d, c) = policy_loss(-0.5, -1.0, 2.0, 0.2);
        assert!((l + 2.4).abs() < 1e-6 && d == 0.0 && c);
        // Same ratio with A < 0: the unclipped term is the max, gradient flows.
        let r = 0.5f32.exp();
        let (l, d, c) = policy_loss(-0.5, -1.0, -2.0, 0.2);
        assert!((l - 2.0 * r).abs() < 1e-5 && (d - 2.0 * r).abs() < 1e-5 && !c);
        // Ratio e^-0.5 ≈ 0.61 with A < 0: clipped at 0.8.
        let (l, d, c) = policy_loss(-1.5, -1.0, -2.0, 0.2);
        assert!((l - 1.6).abs() < 1e-6 && d == 0.0 && c);
    }

    #[test]
    fn clipped_value_loss_by_hand() {
        // Inside the clip range: plain squared error.
        let (l, d) = value_loss(1.1, 1.0, 2.0, 0.2);
        assert!((l - 0.5 * 0.81).abs() < 1e-6 && (d + 0.9).abs() < 1e-6);
        // Moved past the range, away from the return: the clipped error is larger and flat in v.
        let (l, d) = value_loss(0.5, 1.0, 2.0, 0.2);
        // unclipped (0.5−2)² = 2.25, clipped (0.8−2)² = 1.44 → max is unclipped, gradient v − R = −1.5
        assert!((l - 1.125).abs() < 1e-6 && (d + 1.5).abs() < 1e-6);
        let (l, d) = value_loss(1.5, 1.0, 0.0, 0.2);
        // unclipped 2.25, clipped (1.2)² = 1.44 → unclipped
        assert!((l - 1.125).abs() < 1e-6 && (d - 1.5).abs() < 1e-6);
        let (l, d) = value_loss(1.5, 1.0, 2.0, 0.2);
        // unclipped 0.25, clipped (1.2−2)² = 0.64 → clipped, outside the range: no gradient
        assert!((l - 0.32).abs() < 1e-6 && d == 0.0);
    }

    #[test]
    fn adaptive_beta_moves_toward_target() {
        let up = update_beta(0.1, 12.0, 6.0, 64, 10_000.0);
        let down = update_beta(0.1, 1.0, 6.0, 64, 10_000.0);
        assert!(up > 0.1 && down < 0.1);
        assert!((up - 0.1 * (1.0 + 0.2 * 64.0 / 10_000.0)).abs() < 1e-7);
        assert_eq!(update_beta(0.1, 100.0, 0.0, 64, 10_000.0), 0.1);
    }

    #[test]
    fn whitening() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        whiten(&mut x);
        let m: f32 = x.iter().sum::<f32>() / 4.0;
        let v: f32 = x.iter().map(|a| (a - m).powi(2)).sum::<f32>() / 4.0;
        assert!(m.abs() < 1e-6 && (v - 1.0).abs() < 1e-4);
    }
}
