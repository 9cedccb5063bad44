//! The transformer over flat buffers, forward beside backward (as llm.c's train_gpt2.c), for every
//! family the spec describes (GPT-2; Llama, Mistral, Qwen2).
//!
//! One mechanism serves every stage: `forward` runs the blocks to the final norm's output (the
//! "hidden" states); a head reads them (the LM head giving token log-probabilities, or the scalar
//! score head); the head's backward leaves d(hidden) in the activations and `backward` carries it down to
//! the parameter gradients. Causal or bidirectional attention, padding and packing come from the mask.
//!
//! The layers (a linear, a norm, the MLP's activation, attention's positions) are defined once, below,
//! each forward beside its backward; the training block and the KV-cache step (`infer.rs`) are both
//! built from them.

use crate::config::{Arch, MlpKind, ModelConfig, NormKind};
use crate::lora::{LoraConfig, LoraSet, Site};
use crate::params::{init_params, Linear, Norm, ParamLayout, TensorInfo};
use anyhow::{bail, Result};
use kiln_kernels as k;
use kiln_kernels::{AttnMask, AttnShape, PackedFormat, PackedLinear};
use std::borrow::Cow;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// A batch of token rows as the model sees it: `b` rows of `t` tokens, their positions and mask.
#[derive(Clone, Copy)]
pub struct Input<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [u32],
    /// Real (non-padding) tokens; `None` means every token is real.
    pub valid: Option<&'a [bool]>,
    /// Packed-example ids; attention never crosses them. `None`: one example per row.
    pub segments: Option<&'a [u32]>,
    pub b: usize,
    pub t: usize,
}

impl<'a> Input<'a> {
    pub fn mask(&self, arch: Arch) -> AttnMask<'a> {
        AttnMask {
            causal: arch == Arch::Decoder,
            key_valid: self.valid,
            segments: self.segments,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Layers: each forward beside its backward.

/// `out = inp · w + b` (a linear layer of the spec).
pub(crate) fn linear_forward(
    prec: k::Precision,
    p: &[f32],
    lin: &Linear,
    out: &mut [f32],
    inp: &[f32],
    n: usize,
) {
    let bias = lin.b.as_ref().map(|b| &p[b.clone()]);
    k::linear_forward_with(prec, out, inp, &p[lin.w.clone()], bias, n, lin.i, lin.o);
}

/// Where a block linear's weight `[i, o]` comes from: the flat buffer, or the frozen base's packed
/// copy, dequantized into a pooled buffer for the length of `f` (one matrix at a time; O(i·o)
/// beside the O(n·i·o) matmuls it feeds).
pub(crate) fn with_weight<R>(
    p: &[f32],
    base: Option<&PackedBase>,
    layer: usize,
    site: Site,
    lin: &Linear,
    f: impl FnOnce(&[f32]) -> R,
) -> R {
    match base {
        None => f(&p[lin.w.clone()]),
        Some(pb) => {
            let mut buf = pb.pool.lock().expect("pool").pop().unwrap_or_default();
            buf.resize(lin.i * lin.o, 0.0);
            pb.linear(layer, site).dequantize_into(&mut buf);
            let r = f(&buf);
            pb.pool.lock().expect("pool").push(buf);
            r
        }
    }
}

/// Who sums a block linear's bias gradient (the column sums of `dout`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum BiasGrad {
    /// The linear's backward, from `dout`.
    Here,
    /// Already summed where `dout` was computed (the GELU backward, in the same pass).
    Summed,
}

/// Backward of a block linear that OVERWRITES d(input) (its buffer needs no zeroing first),
/// accumulates the weight and bias gradients into `g` (`None`: the base is frozen, only the input
/// gradient flows), and the adapters' gradients into `lora`.
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    prec: k::Precision,
    p: &[f32],
    base: Option<&PackedBase>,
    g: Option<&mut [f32]>,
    lora: Option<&mut LoraSet>,
    round: Option<u64>,
    (layer, site): (usize, Site),
    (lin, bias_grad): (&Linear, BiasGrad),
    dinp: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    n: usize,
) {
    let (i, o) = (lin.i, lin.o);
    let bias = lin.b.as_ref().filter(|_| bias_grad == BiasGrad::Here);
    with_weight(p, base, layer, site, lin, |w| {
        k::matmul_with(prec, dinp, dout, w, n, o, i, false, true, false);
        match (g, bias) {
            (None, _) => {}
            (Some(g), Some(b)) => {
                let [dw, db] = disjoint_mut(g, [&lin.w, b]);
                k::linear_backward_with(prec, None, dw, Some(db), dout, inp, w, n, i, o);
            }
            (Some(g), None) => {
                let dw = &mut g[lin.w.clone()];
                k::linear_backward_with(prec, None, dw, None, dout, inp, w, n, i, o);
            }
        }
    });
    if let Some(set) = lora {
        set.backward(layer, site, round, dinp, dout, inp, n, o);
    }
}

/// The spec's norm: LayerNorm saves `mean` and `rstd`, RMSNorm `rstd` only (`mean` may be empty).
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_forward(
    cfg: &ModelConfig,
    p: &[f32],
    norm: &Norm,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    n: usize,
) {
    let c = cfg.n_embd;
    let w = &p[norm.w.clone()];
    match cfg.norm_kind() {
        NormKind::LayerNorm => {
            let b = &p[norm.b.clone().expect("LayerNorm has a bias")];
            k::layernorm_forward(out, mean, rstd, x, w, b, n, c);
        }
        NormKind::RmsNorm => k::rmsnorm_forward(out, rstd, x, w, n, c, cfg.eps()),
    }
}

/// Backward of [`norm_forward`], accumulating into `dinp` and the norm's gradients.
#[allow(clippy::too_many_arguments)]
fn norm_backward(
    cfg: &ModelConfig,
    p: &[f32],
    g: Option<&mut [f32]>,
    norm: &Norm,
    dinp: &mut [f32],
    dout: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
) {
    let c = cfg.n_embd;
    let w = &p[norm.w.clone()];
    // A frozen norm's gradients go to a scratch that is dropped (the kernels compute both).
    let mut scratch = Vec::new();
    let (dw, db): (&mut [f32], Option<&mut [f32]>) = match (g, &norm.b) {
        (Some(g), Some(b)) => {
            let [dw, db] = disjoint_mut(g, [&norm.w, b]);
            (dw, Some(db))
        }
        (Some(g), None) => (&mut g[norm.w.clone()], None),
        (None, b) => {
            scratch.resize(2 * c, 0.0);
            let (dw, db) = scratch.split_at_mut(c);
            (dw, b.as_ref().map(|_| db))
        }
    };
    match (db, cfg.norm_kind()) {
        (Some(db), NormKind::LayerNorm) => {
            k::layernorm_backward(dinp, dw, db, dout, x, w, mean, rstd, n, c);
        }
        _ => k::rmsnorm_backward(dinp, dw, dout, x, w, rstd, n, c),
    }
}

/// The MLP's activation: `act = gelu(h)` ([n, 4c]) or `act = silu(gate)·up` ([n, f] from [n, 2f]).
pub(crate) fn mlp_act_forward(cfg: &ModelConfig, act: &mut [f32], h: &[f32], n: usize) {
    match cfg.mlp_kind() {
        MlpKind::Gelu => k::gelu_forward(act, h),
        MlpKind::SwiGlu => k::swiglu_forward(act, h, n, cfg.ffn()),
    }
}

/// Backward of [`mlp_act_forward`]: d(h) from d(act). GELU works in place (returns `dact`) and,
/// given the up projection's bias gradient, sums it in the same pass; SwiGLU writes `dh`, twice as
/// wide (returns `dh`). The [`BiasGrad`] says whether the bias gradient is done.
fn mlp_act_backward<'a>(
    cfg: &ModelConfig,
    dact: &'a mut [f32],
    dh: &'a mut [f32],
    h: &[f32],
    n: usize,
    up_dbias: Option<&mut [f32]>,
) -> (&'a [f32], BiasGrad) {
    match (cfg.mlp_kind(), up_dbias) {
        (MlpKind::Gelu, Some(db)) => {
            let f = db.len();
            k::gelu_backward_inplace_bias(&mut dact[..n * f], &h[..n * f], db, f);
            (dact, BiasGrad::Summed)
        }
        (MlpKind::Gelu, None) => {
            k::gelu_backward_inplace(dact, h);
            (dact, BiasGrad::Here)
        }
        (MlpKind::SwiGlu, _) => {
            k::swiglu_backward(dh, h, dact, n, cfg.ffn());
            (dh, BiasGrad::Here)
        }
    }
}

/// Attention's head layout from the spec.
pub(crate) fn attn_shape(cfg: &ModelConfig) -> AttnShape {
    AttnShape {
        nh: cfg.n_head,
        nkv: cfg.kv_heads(),
        hs: cfg.head_size(),
    }
}

/// Token embedding, plus the learned position embedding where the spec has one.
pub(crate) fn embed_forward(
    cfg: &ModelConfig,
    p: &[f32],
    lay: &ParamLayout,
    out: &mut [f32],
    inp: &Input,
) {
    let wte = &p[lay.wte.clone()];
    match &lay.wpe {
        Some(wpe) => k::embedding_forward(
            out,
            inp.tokens,
            inp.positions,
            wte,
            &p[wpe.clone()],
            cfg.n_embd,
        ),
        None => k::embed::token_embedding_forward(out, inp.tokens, wte, cfg.n_embd),
    }
}

// ---------------------------------------------------------------------------------------------
// Activations: every buffer's length comes from one table per batch shape, which also gives the
// memory estimate.

/// Widths of the per-token buffers.
struct Widths {
    c: usize,
    qkv: usize,
    /// Attention output (heads concatenated).
    att_out: usize,
    up: usize,
    act: usize,
    /// Per-row mean of a LayerNorm (0 for RMSNorm).
    mean: usize,
}

impl Widths {
    fn new(cfg: &ModelConfig) -> Self {
        let f = cfg.ffn();
        Widths {
            c: cfg.n_embd,
            qkv: cfg.qkv_width(),
            att_out: cfg.n_head * cfg.head_size(),
            up: match cfg.mlp_kind() {
                MlpKind::Gelu => f,
                MlpKind::SwiGlu => 2 * f,
            },
            act: f,
            mean: usize::from(cfg.norm_kind() == NormKind::LayerNorm),
        }
    }
}

const LAYER_BUFS: usize = 13;
const SHARED_BUFS: usize = 15;

/// Buffer lengths of one block: ln1, ln1_mean, ln1_rstd, qkv, atty, att, res2, ln2, ln2_mean,
/// ln2_rstd, fch, fch_act, res3 (saturating, so absurd shapes give a huge estimate, not a wrap).
fn layer_lens(cfg: &ModelConfig, b: usize, t: usize) -> [usize; LAYER_BUFS] {
    let w = Widths::new(cfg);
    let n = b.saturating_mul(t);
    let x = |width: usize| n.saturating_mul(width);
    let att = b
        .saturating_mul(cfg.n_head)
        .saturating_mul(t)
        .saturating_mul(k::attention::STATS_PER_ROW);
    [
        x(w.c),
        x(w.mean),
        n,
        x(w.qkv),
        x(w.att_out),
        att,
        x(w.c),
        x(w.c),
        x(w.mean),
        n,
        x(w.up),
        x(w.act),
        x(w.c),
    ]
}

/// Lengths of the shared f32 buffers: encoded, hidden, lnf_mean, lnf_rstd, logits, logp, entropy,
/// dhidden, dres, dln, dqkv, datty, dact, dfch, scratch.
fn shared_lens(cfg: &ModelConfig, b: usize, t: usize, lm_head: bool) -> [usize; SHARED_BUFS] {
    let w = Widths::new(cfg);
    let n = b.saturating_mul(t);
    let x = |width: usize| n.saturating_mul(width);
    [
        x(w.c),
        x(w.c),
        x(w.mean),
        n,
        if lm_head { x(cfg.vocab_size) } else { 0 },
        n,
        n,
        x(w.c),
        x(w.c),
        x(w.c),
        x(w.qkv),
        x(w.att_out),
        x(w.act),
        if cfg.mlp_kind() == MlpKind::SwiGlu {
            x(w.up)
        } else {
            0
        },
        x(w.c),
    ]
}

/// Saved activations of one block (what its backward needs).
struct LayerActs {
    ln1: Vec<f32>,
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    /// Attention's saved softmax statistics, `[b, nh, t, 2]` (it recomputes the probabilities).
    att_stats: Vec<f32>,
    res2: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    fch: Vec<f32>,
    fch_act: Vec<f32>,
    res3: Vec<f32>,
}

impl LayerActs {
    fn new(lens: [usize; LAYER_BUFS]) -> Self {
        let [a, b, c, d, e, f, g, h, i, j, k, l, m] = lens.map(|n| vec![0.0f32; n]);
        LayerActs {
            ln1: a,
            ln1_mean: b,
            ln1_rstd: c,
            qkv: d,
            atty: e,
            att_stats: f,
            res2: g,
            ln2: h,
            ln2_mean: i,
            ln2_rstd: j,
            fch: k,
            fch_act: l,
            res3: m,
        }
    }

    fn bufs(&mut self) -> [&mut Vec<f32>; LAYER_BUFS] {
        [
            &mut self.ln1,
            &mut self.ln1_mean,
            &mut self.ln1_rstd,
            &mut self.qkv,
            &mut self.atty,
            &mut self.att_stats,
            &mut self.res2,
            &mut self.ln2,
            &mut self.ln2_mean,
            &mut self.ln2_rstd,
            &mut self.fch,
            &mut self.fch_act,
            &mut self.res3,
        ]
    }
}

/// Activations and gradient scratch for one batch shape, allocated once and reused every step.
pub struct Activations {
    /// The batch shape now in use (see `set_shape`).
    pub b: usize,
    pub t: usize,
    /// The shape the buffers were built for.
    cap: (usize, usize),
    with_lm_head: bool,
    tokens: Vec<u32>,
    positions: Vec<u32>,
    /// The forward's attention mask (valid keys, packed segments; empty when the input had none),
    /// which the backward's attention recomputes its probabilities under.
    key_valid: Vec<bool>,
    segments: Vec<u32>,
    layers: Vec<LayerActs>,
    encoded: Vec<f32>,
    /// Output of the final norm, [b*t, c]: what the heads read.
    pub hidden: Vec<f32>,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    /// Logits, then probabilities after the LM head, then d(logits) after its backward. [b*t, vocab]
    pub logits: Vec<f32>,
    /// Log-probability of each row's target (LM head output), [b*t].
    pub logp: Vec<f32>,
    /// Entropy of each row's distribution (LM head output), [b*t].
    pub entropy: Vec<f32>,
    /// d(loss)/d(hidden), filled by the heads' backward and consumed by `Model::backward`.
    pub dhidden: Vec<f32>,
    // Backward scratch, one block's worth, reused by every layer.
    dres: Vec<f32>,
    dln: Vec<f32>,
    dqkv: Vec<f32>,
    datty: Vec<f32>,
    dact: Vec<f32>,
    dfch: Vec<f32>,
    scratch: Vec<f32>,
    targets: Vec<u32>,
    temperature: f32,
    /// The LoRA dropout round of the last forward (its backward redraws the same masks).
    lora_round: Option<u64>,
}

impl Activations {
    pub fn new(cfg: &ModelConfig, b: usize, t: usize, with_lm_head: bool) -> Self {
        let n = b * t;
        let layers = (0..cfg.n_layer)
            .map(|_| LayerActs::new(layer_lens(cfg, b, t)))
            .collect();
        let [encoded, hidden, lnf_mean, lnf_rstd, logits, logp, entropy, dhidden, dres, dln, dqkv, datty, dact, dfch, scratch] =
            shared_lens(cfg, b, t, with_lm_head).map(|n| vec![0.0f32; n]);
        Activations {
            b,
            t,
            cap: (b, t),
            with_lm_head,
            tokens: vec![0; n],
            positions: vec![0; n],
            key_valid: Vec::new(),
            segments: Vec::new(),
            layers,
            encoded,
            hidden,
            lnf_mean,
            lnf_rstd,
            logits,
            logp,
            entropy,
            dhidden,
            dres,
            dln,
            dqkv,
            datty,
            dact,
            dfch,
            scratch,
            targets: vec![k::IGNORE; n],
            temperature: 1.0,
            lora_round: None,
        }
    }

    /// Bytes [`Activations::new`] allocates for this shape (the memory estimate).
    pub fn bytes_for(cfg: &ModelConfig, b: usize, t: usize, with_lm_head: bool) -> usize {
        let per_layer: usize = layer_lens(cfg, b, t)
            .iter()
            .fold(0usize, |a, &x| a.saturating_add(x));
        let shared: usize = shared_lens(cfg, b, t, with_lm_head)
            .iter()
            .fold(0usize, |a, &x| a.saturating_add(x));
        // tokens, positions, targets: u32.
        per_layer
            .saturating_mul(cfg.n_layer)
            .saturating_add(shared)
            .saturating_add(b.saturating_mul(t).saturating_mul(3))
            .saturating_mul(4)
    }

    fn shared_bufs(&mut self) -> [&mut Vec<f32>; SHARED_BUFS] {
        [
            &mut self.encoded,
            &mut self.hidden,
            &mut self.lnf_mean,
            &mut self.lnf_rstd,
            &mut self.logits,
            &mut self.logp,
            &mut self.entropy,
            &mut self.dhidden,
            &mut self.dres,
            &mut self.dln,
            &mut self.dqkv,
            &mut self.datty,
            &mut self.dact,
            &mut self.dfch,
            &mut self.scratch,
        ]
    }

    /// Reuses these buffers for a smaller batch shape (`b·t` within what they were built for; every
    /// buffer is linear in it, attention's included), without allocating: a batch of short rows
    /// then costs what its tokens cost, not the shape's maximum.
    pub fn set_shape(&mut self, cfg: &ModelConfig, b: usize, t: usize) {
        if (b, t) == (self.b, self.t) {
            return;
        }
        let (cb, ct) = self.cap;
        assert!(
            b * t <= cb * ct,
            "activations built for {cb}x{ct} cannot hold {b}x{t}"
        );
        let lens = layer_lens(cfg, b, t);
        for a in &mut self.layers {
            for (v, len) in a.bufs().into_iter().zip(lens) {
                v.resize(len, 0.0);
            }
        }
        let lens = shared_lens(cfg, b, t, self.with_lm_head);
        for (v, len) in self.shared_bufs().into_iter().zip(lens) {
            v.resize(len, 0.0);
        }
        let n = b * t;
        self.tokens.resize(n, 0);
        self.positions.resize(n, 0);
        self.targets.resize(n, k::IGNORE);
        self.b = b;
        self.t = t;
    }

    /// The (rows, length) the buffers were built for: the most `set_shape` can ask.
    pub fn capacity(&self) -> (usize, usize) {
        self.cap
    }

    /// Bytes held by these buffers (for memory estimates).
    pub fn bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|a| {
                [
                    &a.ln1,
                    &a.ln1_mean,
                    &a.ln1_rstd,
                    &a.qkv,
                    &a.atty,
                    &a.att_stats,
                    &a.res2,
                    &a.ln2,
                    &a.ln2_mean,
                    &a.ln2_rstd,
                    &a.fch,
                    &a.fch_act,
                    &a.res3,
                ]
                .iter()
                .map(|v| v.len())
                .sum::<usize>()
            })
            .sum();
        let s: usize = [
            &self.encoded,
            &self.hidden,
            &self.lnf_mean,
            &self.lnf_rstd,
            &self.logits,
            &self.logp,
            &self.entropy,
            &self.dhidden,
            &self.dres,
            &self.dln,
            &self.dqkv,
            &self.datty,
            &self.dact,
            &self.dfch,
            &self.scratch,
        ]
        .iter()
        .map(|v| v.len())
        .sum();
        4 * (l + s + self.tokens.len() * 3)
    }
}

/// Parameters and their gradients, in the flat layout of [`ParamLayout`].
#[derive(Clone)]
pub struct Model {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    pub params: Vec<f32>,
    pub grads: Vec<f32>,
    /// Arithmetic of the training forward/backward matmuls (a run setting, not saved with the
    /// weights): `Bf16` rounds their operands to bf16 with f32 accumulation, and on CPUs with
    /// AVX512-BF16 attention's products too (`kiln_kernels::attention_forward_with`);
    /// parameters, gradients and every other kernel stay f32. Inference (`infer.rs`) always runs in
    /// f32.
    pub precision: k::Precision,
    /// Rotary embedding tables (Llama family), for positions up to the context.
    pub(crate) rope: Option<Arc<k::Rope>>,
    /// LoRA adapters: with them the base is frozen (`grads` is empty and the backward computes
    /// only input gradients through it); they and a saved score head are what trains.
    pub lora: Option<LoraSet>,
    /// The frozen base's block matrices packed to bf16/int8 (then `params` holds only
    /// `layout.dense` values: the blocks' matrices are not in it). Shared by clones.
    pub base: Option<Arc<PackedBase>>,
}

/// A frozen base's block matrices in a packed format (QLoRA-style): the training matmuls read
/// each one dequantized to f32 in turn; the KV-cache path multiplies by it directly.
#[derive(Debug)]
pub struct PackedBase {
    pub format: PackedFormat,
    /// Per layer, the four linears in [`Site`] order (biases included, for the cached path).
    blocks: Vec<[PackedLinear; 4]>,
    /// Dequantization buffers, reused.
    pool: Mutex<Vec<Vec<f32>>>,
}

impl PackedBase {
    pub fn linear(&self, layer: usize, site: Site) -> &PackedLinear {
        &self.blocks[layer][site.index()]
    }

    /// Bytes of the packed matrices (scales and panel padding included).
    pub fn bytes(&self) -> usize {
        self.blocks
            .iter()
            .flat_map(|b| b.iter())
            .map(|l| l.weight_bytes() + 4 * l.n())
            .sum()
    }
}

/// What the optimizer updates: the model's own tensors (full fine-tuning) or its adapter set's.
pub struct Trainable<'a> {
    pub tensors: &'a [TensorInfo],
    pub params: &'a mut [f32],
    pub grads: &'a [f32],
}

/// Splits one buffer into several disjoint mutable slices (the flat gradient buffer holds every
/// tensor; a kernel needs two or three of them at once).
fn disjoint_mut<'a, const N: usize>(
    buf: &'a mut [f32],
    ranges: [&Range<usize>; N],
) -> [&'a mut [f32]; N] {
    for (i, a) in ranges.iter().enumerate() {
        assert!(a.end <= buf.len());
        for b in &ranges[i + 1..] {
            assert!(a.end <= b.start || b.end <= a.start, "overlapping tensors");
        }
    }
    let ptr = buf.as_mut_ptr();
    // SAFETY: the ranges are in bounds and pairwise disjoint (checked above).
    ranges.map(|r| unsafe { std::slice::from_raw_parts_mut(ptr.add(r.start), r.len()) })
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Model({:?}, {} parameters)", self.cfg, self.params.len())
    }
}

impl Model {
    /// A fresh model with GPT-2-style initialisation.
    pub fn new(cfg: ModelConfig, seed: u64) -> Self {
        let layout = ParamLayout::new(&cfg);
        let params = init_params(&cfg, &layout, seed);
        Self::from_params(cfg, params)
    }

    pub fn from_params(cfg: ModelConfig, params: Vec<f32>) -> Self {
        let cfg = cfg.canonical();
        let layout = ParamLayout::new(&cfg);
        assert_eq!(params.len(), layout.total);
        let grads = vec![0.0; layout.total];
        let rope = cfg.rope().then(|| {
            let scaling = cfg.rope_scaling.as_ref().map(|s| s.to_kernel());
            Arc::new(k::Rope::new(
                cfg.head_size(),
                cfg.n_ctx,
                cfg.theta(),
                scaling.as_ref(),
            ))
        });
        Model {
            cfg,
            layout,
            params,
            grads,
            precision: k::Precision::F32,
            rope,
            lora: None,
            base: None,
        }
    }

    pub fn zero_grads(&mut self) {
        k::zero(&mut self.grads);
        if let Some(l) = &mut self.lora {
            k::zero(&mut l.grads);
        }
    }

    /// Freezes the base and attaches fresh adapters (`cfg.base_weights` packs the base); a score
    /// head gets a trainable copy (PEFT's `modules_to_save`).
    pub fn attach_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        let score = self.layout.score.clone().map(|r| self.params[r].to_vec());
        let set = LoraSet::new(&self.cfg, &self.layout, cfg, score.as_deref(), seed)?;
        self.attach_adapters(set)
    }

    /// Freezes the base and attaches `set` (fresh, or read with [`LoraSet::load_peft`]).
    pub fn attach_adapters(&mut self, set: LoraSet) -> Result<()> {
        if self.lora.is_some() {
            bail!("the model already has LoRA adapters (merge them first)");
        }
        let format = set.cfg.base_weights.packed();
        self.lora = Some(set);
        self.grads = Vec::new();
        if let Some(f) = format {
            self.pack_base(f);
        }
        Ok(())
    }

    /// Holds the block matrices in `format` instead of f32 (the base must be frozen: adapters
    /// attached). `params` shrinks to the dense tensors.
    fn pack_base(&mut self, format: PackedFormat) {
        assert!(self.lora.is_some(), "only a frozen base is packed");
        if self.base.is_some() {
            return;
        }
        let p = &self.params;
        let blocks = self
            .layout
            .layers
            .iter()
            .map(|b| {
                Site::ALL.map(|s| {
                    let l = s.linear(b);
                    let bias = l.b.as_ref().map(|r| &p[r.clone()]);
                    PackedLinear::from_in_out(&p[l.w.clone()], bias, l.i, l.o, format)
                })
            })
            .collect();
        self.base = Some(Arc::new(PackedBase {
            format,
            blocks,
            pool: Mutex::new(Vec::new()),
        }));
        self.params.truncate(self.layout.dense);
        self.params.shrink_to_fit();
    }

    /// The f32 weight `[i, o]` of a block linear (dequantized when the base is packed).
    pub fn block_weight(&self, layer: usize, site: Site) -> Cow<'_, [f32]> {
        let lin = site.linear(&self.layout.layers[layer]);
        match &self.base {
            None => Cow::Borrowed(&self.params[lin.w.clone()]),
            Some(pb) => Cow::Owned(pb.linear(layer, site).dequantize()),
        }
    }

    /// Folds the adapters into the weights (`W += scale·Aᵀ·Bᵀ`, the saved score head into the
    /// score head) and unfreezes: the plain model the adapters made (a packed base is dequantized
    /// first: the merge is onto the weights the adapters were trained over).
    pub fn merge_lora(&mut self) {
        let Some(set) = self.lora.take() else {
            return;
        };
        if let Some(pb) = self.base.take() {
            self.params.resize(self.layout.total, 0.0);
            for (l, b) in self.layout.layers.iter().enumerate() {
                for s in Site::ALL {
                    let lin = s.linear(b);
                    pb.linear(l, s)
                        .dequantize_into(&mut self.params[lin.w.clone()]);
                }
            }
        }
        for a in &set.adapters {
            let lin = a.site.linear(&self.layout.layers[a.layer]).clone();
            let d = set.delta(a);
            let w = &mut self.params[lin.w.clone()];
            for (row, dr) in w.chunks_exact_mut(lin.o).zip(d.chunks_exact(a.o())) {
                k::add_inplace(&mut row[a.cols.clone()], dr);
            }
        }
        if let (Some(s), Some(b)) = (&set.score, &self.layout.score) {
            self.params[b.clone()].copy_from_slice(&set.params[s.clone()]);
        }
        self.grads = vec![0.0; self.layout.total];
    }

    /// The tensors the optimizer updates, their values and gradients.
    pub fn trainable(&mut self) -> Trainable<'_> {
        match &mut self.lora {
            Some(l) => Trainable {
                tensors: &l.tensors,
                params: &mut l.params,
                grads: &l.grads,
            },
            None => Trainable {
                tensors: &self.layout.tensors,
                params: &mut self.params,
                grads: &self.grads,
            },
        }
    }

    pub fn trainable_tensors(&self) -> &[TensorInfo] {
        match &self.lora {
            Some(l) => &l.tensors,
            None => &self.layout.tensors,
        }
    }

    pub fn trainable_grads_mut(&mut self) -> &mut [f32] {
        match &mut self.lora {
            Some(l) => &mut l.grads,
            None => &mut self.grads,
        }
    }

    /// Number of trained parameters (all, or the adapters').
    pub fn num_trainable(&self) -> usize {
        self.trainable_tensors().iter().map(|t| t.len).sum()
    }

    /// Turns the adapters off (`false`: the model computes as its frozen base, the RL reference)
    /// or back on.
    pub fn set_adapters_enabled(&mut self, on: bool) {
        if let Some(l) = &mut self.lora {
            l.enabled = on;
        }
    }

    /// Training mode (LoRA dropout on) or evaluation mode.
    pub fn set_training(&mut self, on: bool) {
        if let Some(l) = &mut self.lora {
            l.training = on;
        }
    }

    /// A block linear of the training forward: the base (f32 or dequantized) and its adapters,
    /// `out = inp · w + b`, plus `residual` when the output joins the residual stream (added as the
    /// product accumulates: no separate pass).
    #[allow(clippy::too_many_arguments)]
    fn block_linear(
        &self,
        layer: usize,
        site: Site,
        round: Option<u64>,
        out: &mut [f32],
        residual: Option<&[f32]>,
        inp: &[f32],
        n: usize,
    ) {
        let (p, prec) = (&self.params, self.precision);
        let lin = site.linear(&self.layout.layers[layer]);
        let bias = lin.b.as_ref().map(|b| &p[b.clone()]);
        with_weight(p, self.base.as_deref(), layer, site, lin, |w| {
            k::linear_forward_residual_with(prec, out, residual, inp, w, bias, n, lin.i, lin.o)
        });
        if let Some(set) = &self.lora {
            set.forward(layer, site, round, out, inp, n, lin.o);
        }
    }

    /// The score head's weights `[c]`: the adapters' trainable copy when there is one.
    fn score_weights(&self) -> &[f32] {
        match self
            .lora
            .as_ref()
            .and_then(|l| l.score.clone().map(|r| (l, r)))
        {
            Some((l, r)) => &l.params[r],
            None => &self.params[self.layout.score.clone().expect("model has no score head")],
        }
    }

    /// Runs the blocks; leaves the final norm's output in `acts.hidden`.
    pub fn forward(&self, acts: &mut Activations, input: &Input) {
        let cfg = &self.cfg;
        let (b, t, c) = (input.b, input.t, cfg.n_embd);
        assert_eq!(
            (acts.b, acts.t),
            (b, t),
            "activations were built for another batch shape"
        );
        assert!(
            t <= cfg.n_ctx,
            "sequence length {t} exceeds the context {}",
            cfg.n_ctx
        );
        let n = b * t;
        assert_eq!(input.tokens.len(), n);
        let (p, lay) = (&self.params, &self.layout);
        let shape = attn_shape(cfg);
        let round = self.lora.as_ref().and_then(|l| l.next_round());
        acts.lora_round = round;
        acts.tokens.copy_from_slice(input.tokens);
        acts.positions.copy_from_slice(input.positions);
        acts.key_valid.clear();
        acts.key_valid.extend_from_slice(input.valid.unwrap_or(&[]));
        acts.segments.clear();
        acts.segments
            .extend_from_slice(input.segments.unwrap_or(&[]));
        embed_forward(cfg, p, lay, &mut acts.encoded, input);
        let mask = input.mask(cfg.arch);
        for l in 0..cfg.n_layer {
            let o = &lay.layers[l];
            let (prev, rest) = acts.layers.split_at_mut(l);
            let a = &mut rest[0];
            let x_in: &[f32] = if l == 0 {
                &acts.encoded
            } else {
                &prev[l - 1].res3
            };
            norm_forward(
                cfg,
                p,
                &o.norm1,
                &mut a.ln1,
                &mut a.ln1_mean,
                &mut a.ln1_rstd,
                x_in,
                n,
            );
            self.block_linear(l, Site::Qkv, round, &mut a.qkv, None, &a.ln1, n);
            if let Some(rope) = &self.rope {
                // q and k are rotated in place; attention saves them rotated.
                k::rope_forward(
                    &mut a.qkv,
                    input.positions,
                    rope,
                    n,
                    o.qkv.o,
                    shape.nh + shape.nkv,
                );
            }
            let prec = self.precision;
            k::attention_forward_with(
                prec,
                &mut a.atty,
                &mut a.att_stats,
                &a.qkv,
                b,
                t,
                shape,
                &mask,
            );
            // res2 = x + attn(x), res3 = res2 + mlp(res2): the projections accumulate onto the stream.
            self.block_linear(l, Site::O, round, &mut a.res2, Some(x_in), &a.atty, n);
            norm_forward(
                cfg,
                p,
                &o.norm2,
                &mut a.ln2,
                &mut a.ln2_mean,
                &mut a.ln2_rstd,
                &a.res2,
                n,
            );
            self.block_linear(l, Site::Up, round, &mut a.fch, None, &a.ln2, n);
            mlp_act_forward(cfg, &mut a.fch_act, &a.fch, n);
            self.block_linear(
                l,
                Site::Down,
                round,
                &mut a.res3,
                Some(&a.res2),
                &a.fch_act,
                n,
            );
        }
        let last = &acts.layers[cfg.n_layer - 1].res3;
        norm_forward(
            cfg,
            p,
            &lay.norm_f,
            &mut acts.hidden,
            &mut acts.lnf_mean,
            &mut acts.lnf_rstd,
            last,
            n,
        );
        debug_assert_eq!(acts.hidden.len(), n * c);
        k::zero(&mut acts.dhidden);
    }

    /// The blocks run over one whole sequence (positions from 0, no mask beyond the family's).
    fn forward_sequence(&self, tokens: &[u32]) -> Activations {
        let t = tokens.len();
        let mut acts = Activations::new(&self.cfg, 1, t, false);
        let positions: Vec<u32> = (0..t as u32).collect();
        let input = Input {
            tokens,
            positions: &positions,
            valid: None,
            segments: None,
            b: 1,
            t,
        };
        self.forward(&mut acts, &input);
        acts
    }

    /// Logits of every position of one sequence, `[t, vocab]` (for checks against other
    /// implementations, as `kiln logits`).
    pub fn logits(&self, tokens: &[u32]) -> Vec<f32> {
        let t = tokens.len();
        let acts = self.forward_sequence(tokens);
        let (c, v) = (self.cfg.n_embd, self.cfg.vocab_size);
        let mut logits = vec![0.0f32; t * v];
        let w = &self.params[self.layout.head()];
        k::matmul(&mut logits, &acts.hidden, w, t, c, v, false, true, false);
        logits
    }

    /// The score head's value at every position of one sequence (a reward model's or critic's).
    pub fn position_scores(&self, tokens: &[u32]) -> Vec<f32> {
        self.score_head(&self.forward_sequence(tokens))
    }

    /// The LM head (tied to the token embedding, or untied): logits = hidden · Wᵀ, then log p(target)
    /// and entropy per row at `temperature`. Results in `acts.logp` / `acts.entropy`; `acts.logits`
    /// keeps the probabilities for the backward.
    pub fn lm_head(&self, acts: &mut Activations, targets: &[u32], temperature: f32) {
        let (n, c, v) = (acts.b * acts.t, self.cfg.n_embd, self.cfg.vocab_size);
        assert!(
            !acts.logits.is_empty(),
            "activations were built without an LM head"
        );
        let w = &self.params[self.layout.head()];
        k::matmul_with(
            self.precision,
            &mut acts.logits,
            &acts.hidden,
            w,
            n,
            c,
            v,
            false,
            true,
            false,
        );
        acts.targets.copy_from_slice(targets);
        acts.temperature = temperature;
        k::token_logprob_forward(
            &mut acts.logits,
            targets,
            temperature,
            &mut acts.logp,
            Some(&mut acts.entropy),
            v,
        );
    }

    /// Backward of [`Model::lm_head`] given dL/dlogp and optionally dL/dentropy per row: accumulates the
    /// head's gradient and adds into `acts.dhidden`.
    pub fn lm_head_backward(
        &mut self,
        acts: &mut Activations,
        dlogp: &[f32],
        dentropy: Option<&[f32]>,
    ) {
        let (n, c, v) = (acts.b * acts.t, self.cfg.n_embd, self.cfg.vocab_size);
        k::token_logprob_backward(
            &mut acts.logits,
            &acts.targets,
            acts.temperature,
            dlogp,
            dentropy,
            v,
        );
        let head = self.layout.head();
        let w = &self.params[head.clone()];
        k::matmul_with(
            self.precision,
            &mut acts.dhidden,
            &acts.logits,
            w,
            n,
            v,
            c,
            false,
            false,
            true,
        );
        if self.lora.is_some() {
            // A frozen head: no weight gradient (the largest matmul of a small model's step).
            return;
        }
        k::matmul_with(
            self.precision,
            &mut self.grads[head],
            &acts.logits,
            &acts.hidden,
            v,
            n,
            c,
            true,
            false,
            true,
        );
    }

    /// The scalar head: score_i = hidden_i · w for every row (reward model / critic).
    pub fn score_head(&self, acts: &Activations) -> Vec<f32> {
        let c = self.cfg.n_embd;
        let w = self.score_weights();
        acts.hidden
            .chunks_exact(c)
            .map(|h| h.iter().zip(w).map(|(a, b)| a * b).sum())
            .collect()
    }

    /// Backward of [`Model::score_head`] given dL/dscore per row.
    pub fn score_head_backward(&mut self, acts: &mut Activations, dscore: &[f32]) {
        let c = self.cfg.n_embd;
        let base = self.layout.score.clone().expect("model has no score head");
        // The trained copy: the adapters' saved score head, the model's own, or none (frozen).
        let (w, mut dw): (&[f32], Option<&mut [f32]>) = match &mut self.lora {
            Some(l) => match l.score.clone() {
                Some(r) => (&l.params[r.clone()], Some(&mut l.grads[r])),
                None => (&self.params[base], None),
            },
            None => (&self.params[base.clone()], Some(&mut self.grads[base])),
        };
        for ((h, dh), &d) in acts
            .hidden
            .chunks_exact(c)
            .zip(acts.dhidden.chunks_exact_mut(c))
            .zip(dscore)
        {
            if d == 0.0 {
                continue;
            }
            for i in 0..c {
                dh[i] += d * w[i];
            }
            if let Some(dw) = dw.as_deref_mut() {
                for i in 0..c {
                    dw[i] += d * h[i];
                }
            }
        }
    }

    /// Carries `acts.dhidden` down through the blocks, accumulating every parameter gradient (with
    /// adapters: theirs only; the frozen base passes input gradients through).
    pub fn backward(&mut self, acts: &mut Activations) {
        let cfg = &self.cfg;
        let (b, t, c) = (acts.b, acts.t, cfg.n_embd);
        let n = b * t;
        let prec = self.precision;
        let shape = attn_shape(cfg);
        let p = &self.params;
        let lay = &self.layout;
        let base = self.base.as_deref();
        let frozen = self.lora.is_some();
        let mut lora = self.lora.as_mut();
        let g = &mut self.grads;
        let round = acts.lora_round;
        // The base's gradient buffer, or None when it is frozen.
        macro_rules! grads {
            () => {
                (!frozen).then_some(&mut g[..])
            };
        }
        k::zero(&mut acts.dres);
        {
            let last = &acts.layers[cfg.n_layer - 1].res3;
            norm_backward(
                cfg,
                p,
                grads!(),
                &lay.norm_f,
                &mut acts.dres,
                &acts.dhidden,
                last,
                &acts.lnf_mean,
                &acts.lnf_rstd,
                n,
            );
        }
        for l in (0..cfg.n_layer).rev() {
            let o = &lay.layers[l];
            let a = &acts.layers[l];
            let x_in: &[f32] = if l == 0 {
                &acts.encoded
            } else {
                &acts.layers[l - 1].res3
            };
            // res3 = res2 + mlp(res2): dres is d(res3); the MLP branch adds into it through norm2.
            // Input gradients that nothing else adds into are written, not accumulated, by the
            // matmuls (no zeroing pass over the scratch).
            linear_backward(
                prec,
                p,
                base,
                grads!(),
                lora.as_deref_mut(),
                round,
                (l, Site::Down),
                (&o.down, BiasGrad::Here),
                &mut acts.dact,
                &acts.dres,
                &a.fch_act,
                n,
            );
            let up_dbias = match (grads!(), &o.up.b) {
                (Some(g), Some(b)) => Some(&mut g[b.clone()]),
                _ => None,
            };
            let (dfch, up_bias) =
                mlp_act_backward(cfg, &mut acts.dact, &mut acts.dfch, &a.fch, n, up_dbias);
            linear_backward(
                prec,
                p,
                base,
                grads!(),
                lora.as_deref_mut(),
                round,
                (l, Site::Up),
                (&o.up, up_bias),
                &mut acts.dln,
                dfch,
                &a.ln2,
                n,
            );
            norm_backward(
                cfg,
                p,
                grads!(),
                &o.norm2,
                &mut acts.dres,
                &acts.dln,
                &a.res2,
                &a.ln2_mean,
                &a.ln2_rstd,
                n,
            );
            // res2 = x + attn(x): dres is now d(res2).
            linear_backward(
                prec,
                p,
                base,
                grads!(),
                lora.as_deref_mut(),
                round,
                (l, Site::O),
                (&o.o, BiasGrad::Here),
                &mut acts.datty,
                &acts.dres,
                &a.atty,
                n,
            );
            k::zero(&mut acts.dqkv);
            let mask = k::AttnMask {
                causal: cfg.arch == Arch::Decoder,
                key_valid: (!acts.key_valid.is_empty()).then_some(&acts.key_valid[..]),
                segments: (!acts.segments.is_empty()).then_some(&acts.segments[..]),
            };
            k::attention_backward_with(
                self.precision,
                &mut acts.dqkv,
                &acts.datty,
                &a.qkv,
                &a.att_stats,
                b,
                t,
                shape,
                &mask,
            );
            if let Some(rope) = &self.rope {
                k::rope_backward(
                    &mut acts.dqkv,
                    &acts.positions,
                    rope,
                    n,
                    o.qkv.o,
                    shape.nh + shape.nkv,
                );
            }
            linear_backward(
                prec,
                p,
                base,
                grads!(),
                lora.as_deref_mut(),
                round,
                (l, Site::Qkv),
                (&o.qkv, BiasGrad::Here),
                &mut acts.dln,
                &acts.dqkv,
                &a.ln1,
                n,
            );
            norm_backward(
                cfg,
                p,
                grads!(),
                &o.norm1,
                &mut acts.dres,
                &acts.dln,
                x_in,
                &a.ln1_mean,
                &a.ln1_rstd,
                n,
            );
        }
        if frozen {
            return;
        }
        match &lay.wpe {
            Some(wpe) => {
                let [dwte, dwpe] = disjoint_mut(g, [&lay.wte, wpe]);
                k::embedding_backward(dwte, dwpe, &acts.dres, &acts.tokens, &acts.positions, c);
            }
            None => {
                let dwte = &mut g[lay.wte.clone()];
                k::embed::token_embedding_backward(dwte, &acts.dres, &acts.tokens, c);
            }
        }
    }
}
