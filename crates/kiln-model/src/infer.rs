//! Inference: a forward pass with a KV cache, and sampling (temperature, top-k, top-p).
//!
//! Each cache slot holds one sequence; rows of a batch may sit at different lengths, so prompts of any
//! lengths are batched without padding (each prompt is prefilled into its slot, then all rows decode
//! one token per step together).

use crate::config::Arch;
use crate::lora::Site;
use crate::model::{attn_shape, linear_forward, mlp_act_forward, norm_forward, Model};
use anyhow::{bail, Result};
use kiln_kernels as k;
use kiln_kernels::{PackedFormat, PackedLinear};
use rand::Rng;
use rayon::prelude::*;
use std::fmt;
use std::str::FromStr;

/// Keys and values of every layer for `slots` sequences of up to `n_ctx` tokens (`kv` wide: the
/// key/value heads, fewer than the query heads with grouped-query attention).
pub struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    /// Tokens already in each slot.
    pub len: Vec<usize>,
    slots: usize,
    n_ctx: usize,
    kv: usize,
}

impl KvCache {
    /// A cache of `slots` sequences of up to the model's whole context.
    pub fn new(model: &Model, slots: usize) -> Self {
        Self::with_len(model, slots, model.cfg.n_ctx)
    }

    /// A cache of `slots` sequences of up to `max_len` tokens (at most the context): a model with a
    /// long context (Llama 3's 131,072) needs only what a generation will use.
    pub fn with_len(model: &Model, slots: usize, max_len: usize) -> Self {
        let cfg = &model.cfg;
        let kv = cfg.kv_heads() * cfg.head_size();
        let n_ctx = max_len.min(cfg.n_ctx);
        let size = cfg.n_layer * slots * n_ctx * kv;
        KvCache {
            k: vec![0.0; size],
            v: vec![0.0; size],
            len: vec![0; slots],
            slots,
            n_ctx,
            kv,
        }
    }

    /// Bytes of keys and values a cache of this shape holds.
    pub fn bytes_for(model: &Model, slots: usize, max_len: usize) -> usize {
        let cfg = &model.cfg;
        2 * 4 * cfg.n_layer * slots * max_len.min(cfg.n_ctx) * cfg.kv_heads() * cfg.head_size()
    }

    /// Tokens each slot can hold.
    pub fn capacity(&self) -> usize {
        self.n_ctx
    }

    fn offset(&self, layer: usize, slot: usize, pos: usize) -> usize {
        ((layer * self.slots + slot) * self.n_ctx + pos) * self.kv
    }
}

/// Which weights generation multiplies by: the model's own f32 parameters, or an inference-only
/// packed copy of its matrices (see [`PackedWeights`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// The model's own f32 values: its parameters, or, decoding more rows at a time than
    /// [`kiln_kernels::matmul::decode_skinny_rows`] (4 or more with AVX-512, 2 or more with AVX2),
    /// an f32 copy of its matrices packed into panels for the duration of the call (the same
    /// values, faster products; memory for one more copy of the matrices).
    #[default]
    F32,
    /// bfloat16 matrices: half the bytes, ~3 significant digits per weight.
    Bf16,
    /// int8 matrices with one f32 scale per output channel: a quarter of the bytes.
    Int8,
}

impl WeightFormat {
    /// The packed format, or `None` for the model's own f32 weights.
    pub fn packed(self) -> Option<PackedFormat> {
        match self {
            WeightFormat::F32 => None,
            WeightFormat::Bf16 => Some(PackedFormat::Bf16),
            WeightFormat::Int8 => Some(PackedFormat::Int8),
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Int8 => "int8",
        })
    }
}

impl FromStr for WeightFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(WeightFormat::F32),
            "bf16" => Ok(WeightFormat::Bf16),
            "int8" => Ok(WeightFormat::Int8),
            _ => bail!("unknown weight format {s:?} (expected f32, bf16 or int8)"),
        }
    }
}

/// The matrices of one block, packed (the same four linears as [`crate::params::BlockLayout`]).
struct PackedBlock {
    qkv: PackedLinear,
    o: PackedLinear,
    up: PackedLinear,
    down: PackedLinear,
}

/// An inference-only copy of a decoder's matrix weights (attention q/k/v and output, MLP in and out,
/// and the LM head, except in [`PackedWeights::f32_blocks`]) in a compact format, for
/// [`Model::forward_cached_with`] and [`generate_with`]. Embeddings, norms and biases keep being
/// read from the model in f32.
///
/// It is a snapshot: build it again after the model's parameters change.
pub struct PackedWeights {
    format: PackedFormat,
    blocks: Vec<PackedBlock>,
    /// `None`: the LM head multiplies by the model's own weight (see [`Self::f32_blocks`]).
    lm_head: Option<PackedLinear>,
}

impl PackedWeights {
    /// Packs the model's current weights (once; a few tens of milliseconds for small models).
    pub fn new(model: &Model, format: PackedFormat) -> Self {
        Self::build(model, format, true)
    }

    /// The block matrices alone in f32 panels, the LM head left on the model's own weight: on a
    /// CPU with AVX2 each decoded row then gets exactly the logits it gets decoding alone on the
    /// model's weights (as `kiln chat` does), whatever else shares the call, and a batch of rows
    /// streams each block weight once instead of once per few rows. What `kiln serve` decodes on
    /// (one more copy of the block matrices in memory).
    pub fn f32_blocks(model: &Model) -> Self {
        Self::build(model, PackedFormat::F32, false)
    }

    fn build(model: &Model, format: PackedFormat, head: bool) -> Self {
        let cfg = &model.cfg;
        assert_eq!(cfg.arch, Arch::Decoder, "packed weights are for decoders");
        let (p, lay) = (&model.params, &model.layout);
        let pack = |layer: usize, site: Site| {
            let l = site.linear(&lay.layers[layer]);
            PackedLinear::from_in_out(
                &model.block_weight(layer, site),
                l.b.as_ref().map(|b| &p[b.clone()]),
                l.i,
                l.o,
                format,
            )
        };
        let blocks = (0..lay.layers.len())
            .map(|l| PackedBlock {
                qkv: pack(l, Site::Qkv),
                o: pack(l, Site::O),
                up: pack(l, Site::Up),
                down: pack(l, Site::Down),
            })
            .collect();
        // The LM head (tied or not) is stored [vocab, n_embd] = [out, in].
        let lm_head = head.then(|| {
            PackedLinear::from_out_in(&p[lay.head()], None, cfg.vocab_size, cfg.n_embd, format)
        });
        PackedWeights {
            format,
            blocks,
            lm_head,
        }
    }

    pub fn format(&self) -> PackedFormat {
        self.format
    }

    /// Bytes of packed matrices (scales included): what one decoding step streams of them (the LM
    /// head's only when it is packed).
    pub fn bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| {
                b.qkv.weight_bytes()
                    + b.o.weight_bytes()
                    + b.up.weight_bytes()
                    + b.down.weight_bytes()
            })
            .sum::<usize>()
            + self.lm_head.as_ref().map_or(0, |h| h.weight_bytes())
    }

    fn check(&self, cfg: &crate::config::ModelConfig) {
        assert!(
            self.blocks.len() == cfg.n_layer
                && self
                    .lm_head
                    .as_ref()
                    .is_none_or(|h| h.n() == cfg.vocab_size && h.k() == cfg.n_embd),
            "packed weights were built for a different model shape"
        );
    }
}

impl PackedBlock {
    fn get(&self, site: Site) -> &PackedLinear {
        match site {
            Site::Qkv => &self.qkv,
            Site::O => &self.o,
            Site::Up => &self.up,
            Site::Down => &self.down,
        }
    }
}

impl Model {
    /// A block linear of the cached forward: through its packed inference copy when there is one,
    /// else the packed frozen base, else the f32 layer of the training forward; then the adapters.
    fn cached_linear(
        &self,
        packed: Option<&PackedWeights>,
        (layer, site): (usize, Site),
        out: &mut [f32],
        inp: &[f32],
        n: usize,
    ) {
        let lin = site.linear(&self.layout.layers[layer]);
        match (packed, &self.base) {
            (Some(pw), _) => pw.blocks[layer].get(site).forward(out, inp, n),
            (None, Some(pb)) => pb.linear(layer, site).forward(out, inp, n),
            (None, None) => linear_forward(k::Precision::F32, &self.params, lin, out, inp, n),
        }
        if let Some(set) = &self.lora {
            set.forward(layer, site, None, out, inp, n, lin.o);
        }
    }
}

impl Model {
    /// Feeds `tq` new tokens to each of the given cache slots (rows: `slots.len()`, tokens row-major
    /// [rows, tq]) and returns the logits of each row's last new token, [rows, vocab].
    pub fn forward_cached(
        &self,
        cache: &mut KvCache,
        slots: &[usize],
        tokens: &[u32],
        tq: usize,
    ) -> Vec<f32> {
        self.forward_cached_with(None, cache, slots, tokens, tq)
    }

    /// [`Self::forward_cached`] multiplying by `packed` matrices (built from this model) instead of
    /// the f32 parameters when given.
    ///
    /// The block is the training block's layers (norm, linear, positions, MLP activation) with the
    /// attention reading its keys and values from the cache.
    pub fn forward_cached_with(
        &self,
        packed: Option<&PackedWeights>,
        cache: &mut KvCache,
        slots: &[usize],
        tokens: &[u32],
        tq: usize,
    ) -> Vec<f32> {
        let cfg = &self.cfg;
        assert_eq!(cfg.arch, Arch::Decoder, "the KV cache is for decoders");
        if let Some(pw) = packed {
            pw.check(cfg);
        }
        let c = cfg.n_embd;
        let shape = attn_shape(cfg);
        let (nh, hs, group) = (shape.nh, shape.hs, shape.nh / shape.nkv);
        let (qw, kvw) = (nh * hs, shape.nkv * hs);
        let qkvw = qw + 2 * kvw;
        let rows = slots.len();
        let n = rows * tq;
        assert_eq!(tokens.len(), n);
        let p = &self.params;
        let lay = &self.layout;
        let start: Vec<usize> = slots.iter().map(|&s| cache.len[s]).collect();
        for &s0 in &start {
            assert!(
                s0 + tq <= cache.n_ctx,
                "KV cache full: it holds {} tokens per sequence",
                cache.n_ctx
            );
        }
        let positions: Vec<u32> = (0..n).map(|i| (start[i / tq] + i % tq) as u32).collect();
        let mut x = vec![0.0f32; n * c];
        let input = crate::model::Input {
            tokens,
            positions: &positions,
            valid: None,
            segments: None,
            b: rows,
            t: tq,
        };
        crate::model::embed_forward(cfg, p, lay, &mut x, &input);
        let mean_w = usize::from(cfg.norm_kind() == crate::config::NormKind::LayerNorm);
        let mut ln = vec![0.0f32; n * c];
        let (mut mean, mut rstd) = (vec![0.0f32; n * mean_w], vec![0.0f32; n]);
        let mut qkv = vec![0.0f32; n * qkvw];
        let mut atty = vec![0.0f32; n * qw];
        let mut tmp = vec![0.0f32; n * c];
        let mut fch = vec![0.0f32; n * lay.layers[0].up.o];
        let mut fch_act = vec![0.0f32; n * cfg.ffn()];
        let scale = 1.0 / (hs as f32).sqrt();
        // Whole prompts into empty slots: positions 0..tq of every row attend causally among
        // themselves, which is the training forward's blocked attention (matrix products over
        // blocks of queries), far faster than a dot product per (query, key) pair.
        let fresh = tq > 1 && start.iter().all(|&s0| s0 == 0);
        let mut stats = match fresh {
            true => vec![0.0f32; k::attention::stats_len(rows, nh, tq)],
            false => Vec::new(),
        };
        let causal = k::AttnMask {
            causal: true,
            ..Default::default()
        };
        for l in 0..cfg.n_layer {
            let o = &lay.layers[l];
            norm_forward(cfg, p, &o.norm1, &mut ln, &mut mean, &mut rstd, &x, n);
            self.cached_linear(packed, (l, Site::Qkv), &mut qkv, &ln, n);
            if let Some(rope) = &self.rope {
                k::rope_forward(&mut qkv, &positions, rope, n, qkvw, nh + shape.nkv);
            }
            // Append this step's keys and values to the cache.
            for i in 0..n {
                let off = cache.offset(l, slots[i / tq], positions[i] as usize);
                let row = &qkv[i * qkvw..(i + 1) * qkvw];
                cache.k[off..off + kvw].copy_from_slice(&row[qw..qw + kvw]);
                cache.v[off..off + kvw].copy_from_slice(&row[qw + kvw..]);
            }
            // Each token's query heads attend to its slot's keys up to its own position, the heads
            // that share a kv head together (the cache is read once per kv head): one task per
            // token and kv head when there is enough work for the pool, in line for a single token.
            let cache_ref = &*cache;
            let nkv = shape.nkv;
            let kv_head = |idx: usize, out: &mut [f32], scores: &mut Vec<f32>| {
                let (i, kvh) = (idx / nkv, idx % nkv);
                let len = positions[i] as usize + 1;
                let base = cache_ref.offset(l, slots[i / tq], 0) + kvh * hs;
                scores.resize(group * len, 0.0);
                let q0 = i * qkvw + kvh * group * hs;
                k::attention_cached_row(
                    out,
                    &qkv[q0..q0 + group * hs],
                    hs,
                    &cache_ref.k[base..],
                    &cache_ref.v[base..],
                    kvw,
                    len,
                    scale,
                    scores,
                );
            };
            if fresh {
                k::attention_forward_gqa(&mut atty, &mut stats, &qkv, rows, tq, shape, &causal);
            } else if n == 1 {
                let mut scores = Vec::new();
                for (idx, out) in atty.chunks_mut(group * hs).enumerate() {
                    kv_head(idx, out, &mut scores);
                }
            } else {
                atty.par_chunks_mut(group * hs)
                    .enumerate()
                    .for_each_init(Vec::new, |scores, (idx, out)| kv_head(idx, out, scores));
            }
            self.cached_linear(packed, (l, Site::O), &mut tmp, &atty, n);
            k::add_inplace(&mut x, &tmp);
            norm_forward(cfg, p, &o.norm2, &mut ln, &mut mean, &mut rstd, &x, n);
            self.cached_linear(packed, (l, Site::Up), &mut fch, &ln, n);
            mlp_act_forward(cfg, &mut fch_act, &fch, n);
            self.cached_linear(packed, (l, Site::Down), &mut tmp, &fch_act, n);
            k::add_inplace(&mut x, &tmp);
        }
        for &s in slots {
            cache.len[s] += tq;
        }
        // Only each row's last token needs logits.
        let mut last = vec![0.0f32; rows * c];
        for r in 0..rows {
            last[r * c..(r + 1) * c].copy_from_slice(&x[((r + 1) * tq - 1) * c..(r + 1) * tq * c]);
        }
        let mut lnl = vec![0.0f32; rows * c];
        let (mut m2, mut r2) = (vec![0.0f32; rows * mean_w], vec![0.0f32; rows]);
        norm_forward(cfg, p, &lay.norm_f, &mut lnl, &mut m2, &mut r2, &last, rows);
        let v = cfg.vocab_size;
        let mut logits = vec![0.0f32; rows * v];
        match packed.and_then(|pw| pw.lm_head.as_ref()) {
            Some(head) => head.forward(&mut logits, &lnl, rows),
            None => k::matmul(
                &mut logits,
                &lnl,
                &p[lay.head()],
                rows,
                c,
                v,
                false,
                true,
                false,
            ),
        }
        logits
    }
}

/// How to pick the next token.
#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0: off).
    pub top_p: f32,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

/// Picks one token from a row of logits.
pub fn sample_token<R: Rng>(logits: &[f32], s: &Sampling, rng: &mut R) -> u32 {
    if s.temperature <= 0.0 {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let mut w = vec![0.0f32; logits.len()];
    let total = kiln_kernels::softmax_weights(&mut w, logits, 1.0 / s.temperature);
    if s.top_k == 0 && s.top_p >= 1.0 {
        // Plain sampling: walk the weights in id order.
        let mut u = rng.gen::<f32>() * total;
        for (id, &p) in w.iter().enumerate() {
            if u < p {
                return id as u32;
            }
            u -= p;
        }
        return w.iter().rposition(|&p| p > 0.0).unwrap_or(0) as u32;
    }
    let mut probs: Vec<(u32, f32)> = w
        .into_iter()
        .enumerate()
        .map(|(i, p)| (i as u32, p))
        .collect();
    // Stable sort keeps ties in id order, so sampling is deterministic.
    probs.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
    if s.top_k > 0 && s.top_k < probs.len() {
        probs.truncate(s.top_k);
    }
    if s.top_p < 1.0 {
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p.1 / total;
            if acc >= s.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    let total: f32 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.gen::<f32>() * total;
    for &(id, p) in &probs {
        if u < p {
            return id;
        }
        u -= p;
    }
    probs.last().map(|p| p.0).unwrap_or(0)
}

/// Generation settings.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation of a row ends after it emits one of these (the stop token is kept in the output).
    pub stop_tokens: Vec<u32>,
}

/// Generates a continuation of each prompt (batched, KV cache). `on_token(row, token)` is called as each
/// token is chosen, for streaming. Returns the new tokens of each row.
pub fn generate<R: Rng>(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    rng: &mut R,
    on_token: impl FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    generate_with(model, None, prompts, opts, rng, on_token)
}

/// [`generate`] multiplying by `packed` matrices (built from `model`) when given.
pub fn generate_with<R: Rng>(
    model: &Model,
    packed: Option<&PackedWeights>,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    rng: &mut R,
    on_token: impl FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    let s = &opts.sampling;
    decode(
        model,
        packed,
        prompts,
        opts,
        |_, logits| sample_token(logits, s, rng),
        on_token,
    )
}

/// [`generate_with`] drawing row `r`'s tokens from `rngs[r]` alone, so a row's sample does not
/// depend on which other rows share the batch (data-parallel RL splits a batch across processes).
pub fn generate_rows_with<R: Rng>(
    model: &Model,
    packed: Option<&PackedWeights>,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    rngs: &mut [R],
    on_token: impl FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    if rngs.len() != prompts.len() {
        bail!(
            "{} random generators for {} prompts",
            rngs.len(),
            prompts.len()
        );
    }
    let s = &opts.sampling;
    decode(
        model,
        packed,
        prompts,
        opts,
        |r, logits| sample_token(logits, s, &mut rngs[r]),
        on_token,
    )
}

/// Most prompt tokens one prefill call takes (its activations are `O(tokens)`).
const PREFILL_TOKENS: usize = 4096;

/// The f32 panels a decode of `rows` rows multiplies by, packed for the call, if any: decoding more
/// rows than [`k::matmul::decode_skinny_rows`] gives for the model's MLP weight (its largest plain
/// matrix), the model's f32 matrices are packed into the panels of [`PackedFormat::F32`] (the same
/// values, laid out for the register tiles), where `gemm` repacked every weight on every step (a
/// fifth of a 64-row rollout; on an AVX-512 Xeon batch 8 and 16 ran 1.3x faster on the panels).
/// Packed weights the caller gave, or a frozen packed base, are used as they are.
pub fn decode_panels(
    model: &Model,
    packed: Option<&PackedWeights>,
    rows: usize,
) -> Option<PackedWeights> {
    let skinny = k::matmul::decode_skinny_rows(model.cfg.n_embd, model.cfg.ffn());
    (packed.is_none() && model.base.is_none() && rows > skinny)
        .then(|| PackedWeights::new(model, PackedFormat::F32))
}

/// The batched KV-cache decode; `sample(row, logits)` picks each row's next token.
fn decode(
    model: &Model,
    packed: Option<&PackedWeights>,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    mut sample: impl FnMut(usize, &[f32]) -> u32,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    let n_ctx = model.cfg.n_ctx;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            bail!("prompt {i} is empty");
        }
        if p.len() >= n_ctx {
            bail!(
                "prompt {i} has {} tokens; the model's context is {n_ctx}, leaving no room to generate",
                p.len()
            );
        }
        if let Some(&bad) = p.iter().find(|&&t| t as usize >= model.cfg.vocab_size) {
            bail!(
                "prompt {i} has token id {bad}, outside the model's vocabulary ({})",
                model.cfg.vocab_size
            );
        }
    }
    let rows = prompts.len();
    let v = model.cfg.vocab_size;
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut cache = KvCache::with_len(model, rows, longest + opts.max_new_tokens);
    let mut next_logits = vec![0.0f32; rows * v];
    // Prompts of one length prefill together, up to PREFILL_TOKENS a call: one forward pass with
    // matrix products over all their tokens (16-token prompts one at a time took a third of an
    // RL rollout). Each row's attention is its own either way.
    let mut by_len: Vec<usize> = (0..rows).collect();
    by_len.sort_by_key(|&r| (prompts[r].len(), r));
    for same in by_len.chunk_by(|&a, &b| prompts[a].len() == prompts[b].len()) {
        let len = prompts[same[0]].len();
        for group in same.chunks((PREFILL_TOKENS / len).max(1)) {
            let tokens: Vec<u32> = group.iter().flat_map(|&r| prompts[r].clone()).collect();
            let l = model.forward_cached_with(packed, &mut cache, group, &tokens, len);
            for (i, &r) in group.iter().enumerate() {
                next_logits[r * v..(r + 1) * v].copy_from_slice(&l[i * v..(i + 1) * v]);
            }
        }
    }
    // Packed after the first tokens are chosen, so the time to the first token does not wait for it.
    let mut panels: Option<Option<PackedWeights>> = None;
    let mut out = vec![Vec::new(); rows];
    let mut active: Vec<usize> = (0..rows).collect();
    for _ in 0..opts.max_new_tokens {
        let mut step_tokens = Vec::with_capacity(active.len());
        let mut still = Vec::with_capacity(active.len());
        for &r in &active {
            let tok = sample(r, &next_logits[r * v..(r + 1) * v]);
            out[r].push(tok);
            on_token(r, tok);
            if !opts.stop_tokens.contains(&tok) && cache.len[r] < cache.capacity() {
                still.push(r);
                step_tokens.push(tok);
            }
        }
        active = still;
        if active.is_empty() {
            break;
        }
        let panels = panels.get_or_insert_with(|| decode_panels(model, packed, rows));
        let weights = packed.or(panels.as_ref());
        let l = model.forward_cached_with(weights, &mut cache, &active, &step_tokens, 1);
        for (i, &r) in active.iter().enumerate() {
            next_logits[r * v..(r + 1) * v].copy_from_slice(&l[i * v..(i + 1) * v]);
        }
    }
    Ok(out)
}
