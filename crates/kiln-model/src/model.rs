//! The transformer: GPT-2 blocks over flat buffers, forward beside backward (as llm.c's train_gpt2.c).
//!
//! One mechanism serves every stage: `forward` runs the blocks to the final LayerNorm's output (the
//! "hidden" states); a head reads them (the tied LM head giving token log-probabilities, or the scalar
//! score head); the head's backward leaves d(hidden) in the activations and `backward` carries it down to
//! the parameter gradients. Causal or bidirectional attention, padding and packing come from the mask.

use crate::config::{Arch, ModelConfig};
use crate::params::{init_params, ParamLayout};
use kiln_kernels as k;
use kiln_kernels::AttnMask;
use std::ops::Range;

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

/// Saved activations of one block (what its backward needs).
struct LayerActs {
    ln1: Vec<f32>,
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    att: Vec<f32>,
    res2: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    fch: Vec<f32>,
    fch_gelu: Vec<f32>,
    res3: Vec<f32>,
}

/// Activations and gradient scratch for one batch shape, allocated once and reused every step.
pub struct Activations {
    /// The batch shape now in use (see `set_shape`).
    pub b: usize,
    pub t: usize,
    /// The shape the buffers were built for.
    cap: (usize, usize),
    tokens: Vec<u32>,
    positions: Vec<u32>,
    encoded: Vec<f32>,
    layers: Vec<LayerActs>,
    /// Output of the final LayerNorm, [b*t, c]: what the heads read.
    pub hidden: Vec<f32>,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    /// Logits, then probabilities after the LM head, then d(logits) after its backward. [b*t, vocab]
    pub logits: Vec<f32>,
    /// Log-probability of each row's target (LM head output), [b*t].
    pub logp: Vec<f32>,
    /// Entropy of each row's distribution (LM head output), [b*t].
    pub entropy: Vec<f32>,
    targets: Vec<u32>,
    temperature: f32,
    /// d(loss)/d(hidden), filled by the heads' backward and consumed by `Model::backward`.
    pub dhidden: Vec<f32>,
    // Backward scratch, one block's worth, reused by every layer.
    dres: Vec<f32>,
    dln: Vec<f32>,
    dqkv: Vec<f32>,
    datty: Vec<f32>,
    dfch_gelu: Vec<f32>,
    scratch: Vec<f32>,
}

impl Activations {
    pub fn new(cfg: &ModelConfig, b: usize, t: usize, with_lm_head: bool) -> Self {
        let n = b * t;
        let c = cfg.n_embd;
        let z = |len: usize| vec![0.0f32; len];
        let layers = (0..cfg.n_layer)
            .map(|_| LayerActs {
                ln1: z(n * c),
                ln1_mean: z(n),
                ln1_rstd: z(n),
                qkv: z(n * 3 * c),
                atty: z(n * c),
                att: z(b * cfg.n_head * t * t),
                res2: z(n * c),
                ln2: z(n * c),
                ln2_mean: z(n),
                ln2_rstd: z(n),
                fch: z(n * 4 * c),
                fch_gelu: z(n * 4 * c),
                res3: z(n * c),
            })
            .collect();
        Activations {
            b,
            t,
            cap: (b, t),
            tokens: vec![0; n],
            positions: vec![0; n],
            encoded: z(n * c),
            layers,
            hidden: z(n * c),
            lnf_mean: z(n),
            lnf_rstd: z(n),
            logits: if with_lm_head {
                z(n * cfg.vocab_size)
            } else {
                Vec::new()
            },
            logp: z(n),
            entropy: z(n),
            targets: vec![k::IGNORE; n],
            temperature: 1.0,
            dhidden: z(n * c),
            dres: z(n * c),
            dln: z(n * c),
            dqkv: z(n * 3 * c),
            datty: z(n * c),
            dfch_gelu: z(n * 4 * c),
            scratch: z(n * c),
        }
    }

    /// Reuses these buffers for a smaller batch shape (`b·t` and `b·t²` within what they were built
    /// for), without allocating: a batch of short rows then costs what its tokens cost, not the
    /// shape's maximum.
    pub fn set_shape(&mut self, cfg: &ModelConfig, b: usize, t: usize) {
        if (b, t) == (self.b, self.t) {
            return;
        }
        let (cb, ct) = self.cap;
        assert!(
            b * t <= cb * ct && b * t * t <= cb * ct * ct,
            "activations built for {cb}x{ct} cannot hold {b}x{t}"
        );
        let n = b * t;
        let c = cfg.n_embd;
        let att = b * cfg.n_head * t * t;
        let fit = |v: &mut Vec<f32>, len: usize| v.resize(len, 0.0);
        for a in &mut self.layers {
            for (v, w) in [
                (&mut a.ln1, c),
                (&mut a.atty, c),
                (&mut a.res2, c),
                (&mut a.ln2, c),
                (&mut a.res3, c),
                (&mut a.qkv, 3 * c),
                (&mut a.fch, 4 * c),
                (&mut a.fch_gelu, 4 * c),
                (&mut a.ln1_mean, 1),
                (&mut a.ln1_rstd, 1),
                (&mut a.ln2_mean, 1),
                (&mut a.ln2_rstd, 1),
            ] {
                fit(v, n * w);
            }
            fit(&mut a.att, att);
        }
        for (v, w) in [
            (&mut self.encoded, c),
            (&mut self.hidden, c),
            (&mut self.dhidden, c),
            (&mut self.dres, c),
            (&mut self.dln, c),
            (&mut self.datty, c),
            (&mut self.scratch, c),
            (&mut self.dqkv, 3 * c),
            (&mut self.dfch_gelu, 4 * c),
            (&mut self.lnf_mean, 1),
            (&mut self.lnf_rstd, 1),
            (&mut self.logp, 1),
            (&mut self.entropy, 1),
        ] {
            fit(v, n * w);
        }
        if !self.logits.is_empty() {
            fit(&mut self.logits, n * cfg.vocab_size);
        }
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
                a.ln1.len() * 5 + a.qkv.len() + a.att.len() + a.fch.len() * 2 + a.ln1_mean.len() * 4
            })
            .sum();
        4 * (l
            + self.encoded.len() * 9
            + self.logits.len()
            + self.dqkv.len()
            + self.dfch_gelu.len())
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
    /// weights): `Bf16` rounds their operands to bf16 with f32 accumulation; parameters, gradients
    /// and every other kernel stay f32. Inference (`infer.rs`) always runs in f32.
    pub precision: k::Precision,
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

/// A linear layer's backward that OVERWRITES d(input) (its buffer needs no zeroing first) and
/// accumulates the weight and bias gradients.
#[allow(clippy::too_many_arguments)]
fn linear_backward_overwrite(
    prec: k::Precision,
    dinp: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    n: usize,
    i: usize,
    o: usize,
) {
    k::matmul_with(prec, dinp, dout, w, n, o, i, false, true, false);
    k::linear_backward_with(prec, None, dw, Some(db), dout, inp, w, n, i, o);
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Model({:?}, {} parameters)", self.cfg, self.params.len())
    }
}

impl Model {
    /// A fresh model with GPT-2 initialisation.
    pub fn new(cfg: ModelConfig, seed: u64) -> Self {
        let layout = ParamLayout::new(&cfg);
        let params = init_params(&cfg, &layout, seed);
        Self::from_params(cfg, params)
    }

    pub fn from_params(cfg: ModelConfig, params: Vec<f32>) -> Self {
        let layout = ParamLayout::new(&cfg);
        assert_eq!(params.len(), layout.total);
        let grads = vec![0.0; layout.total];
        Model {
            cfg,
            layout,
            params,
            grads,
            precision: k::Precision::F32,
        }
    }

    pub fn zero_grads(&mut self) {
        self.grads.fill(0.0);
    }

    /// Runs the blocks; leaves the final LayerNorm output in `acts.hidden`.
    pub fn forward(&self, acts: &mut Activations, input: &Input) {
        let cfg = &self.cfg;
        let (b, t, c, nh) = (input.b, input.t, cfg.n_embd, cfg.n_head);
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
        let p = &self.params;
        let lay = &self.layout;
        acts.tokens.copy_from_slice(input.tokens);
        acts.positions.copy_from_slice(input.positions);
        k::embedding_forward(
            &mut acts.encoded,
            input.tokens,
            input.positions,
            &p[lay.wte.clone()],
            &p[lay.wpe.clone()],
            c,
        );
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
            k::layernorm_forward(
                &mut a.ln1,
                &mut a.ln1_mean,
                &mut a.ln1_rstd,
                x_in,
                &p[o.ln1_w.clone()],
                &p[o.ln1_b.clone()],
                n,
                c,
            );
            k::linear_forward_with(
                self.precision,
                &mut a.qkv,
                &a.ln1,
                &p[o.attn_w.clone()],
                Some(&p[o.attn_b.clone()]),
                n,
                c,
                3 * c,
            );
            k::attention_forward(&mut a.atty, &mut a.att, &a.qkv, b, t, c, nh, &mask);
            k::linear_forward_with(
                self.precision,
                &mut acts.scratch,
                &a.atty,
                &p[o.proj_w.clone()],
                Some(&p[o.proj_b.clone()]),
                n,
                c,
                c,
            );
            for ((r, x), y) in a.res2.iter_mut().zip(x_in).zip(&acts.scratch) {
                *r = x + y;
            }
            k::layernorm_forward(
                &mut a.ln2,
                &mut a.ln2_mean,
                &mut a.ln2_rstd,
                &a.res2,
                &p[o.ln2_w.clone()],
                &p[o.ln2_b.clone()],
                n,
                c,
            );
            k::linear_forward_with(
                self.precision,
                &mut a.fch,
                &a.ln2,
                &p[o.fc_w.clone()],
                Some(&p[o.fc_b.clone()]),
                n,
                c,
                4 * c,
            );
            k::gelu_forward(&mut a.fch_gelu, &a.fch);
            k::linear_forward_with(
                self.precision,
                &mut acts.scratch,
                &a.fch_gelu,
                &p[o.fcproj_w.clone()],
                Some(&p[o.fcproj_b.clone()]),
                n,
                4 * c,
                c,
            );
            for ((r, x), y) in a.res3.iter_mut().zip(&a.res2).zip(&acts.scratch) {
                *r = x + y;
            }
        }
        let last = &acts.layers[cfg.n_layer - 1].res3;
        k::layernorm_forward(
            &mut acts.hidden,
            &mut acts.lnf_mean,
            &mut acts.lnf_rstd,
            last,
            &p[lay.lnf_w.clone()],
            &p[lay.lnf_b.clone()],
            n,
            c,
        );
        acts.dhidden.fill(0.0);
    }

    /// The tied LM head: logits = hidden · wteᵀ, then log p(target) and entropy per row at `temperature`.
    /// Results in `acts.logp` / `acts.entropy`; `acts.logits` keeps the probabilities for the backward.
    pub fn lm_head(&self, acts: &mut Activations, targets: &[u32], temperature: f32) {
        let (n, c, v) = (acts.b * acts.t, self.cfg.n_embd, self.cfg.vocab_size);
        assert!(
            !acts.logits.is_empty(),
            "activations were built without an LM head"
        );
        let wte = &self.params[self.layout.wte.clone()];
        k::matmul_with(
            self.precision,
            &mut acts.logits,
            &acts.hidden,
            wte,
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
    /// tied embedding's gradient and adds into `acts.dhidden`.
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
        let wte = &self.params[self.layout.wte.clone()];
        k::matmul_with(
            self.precision,
            &mut acts.dhidden,
            &acts.logits,
            wte,
            n,
            v,
            c,
            false,
            false,
            true,
        );
        let dwte = &mut self.grads[self.layout.wte.clone()];
        k::matmul_with(
            self.precision,
            dwte,
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
        let w = &self.params[self.layout.score.clone().expect("model has no score head")];
        acts.hidden
            .chunks_exact(c)
            .map(|h| h.iter().zip(w).map(|(a, b)| a * b).sum())
            .collect()
    }

    /// Backward of [`Model::score_head`] given dL/dscore per row.
    pub fn score_head_backward(&mut self, acts: &mut Activations, dscore: &[f32]) {
        let c = self.cfg.n_embd;
        let range = self.layout.score.clone().expect("model has no score head");
        let w = &self.params[range.clone()];
        let dw = &mut self.grads[range];
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
                dw[i] += d * h[i];
            }
        }
    }

    /// Carries `acts.dhidden` down through the blocks, accumulating every parameter gradient.
    pub fn backward(&mut self, acts: &mut Activations) {
        let cfg = &self.cfg;
        let (b, t, c, nh) = (acts.b, acts.t, cfg.n_embd, cfg.n_head);
        let n = b * t;
        let prec = self.precision;
        let p = &self.params;
        let lay = &self.layout;
        let g = &mut self.grads;
        acts.dres.fill(0.0);
        {
            let last = &acts.layers[cfg.n_layer - 1].res3;
            let [dw, db] = disjoint_mut(g, [&lay.lnf_w, &lay.lnf_b]);
            k::layernorm_backward(
                &mut acts.dres,
                dw,
                db,
                &acts.dhidden,
                last,
                &p[lay.lnf_w.clone()],
                &acts.lnf_mean,
                &acts.lnf_rstd,
                n,
                c,
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
            // res3 = res2 + mlp(res2): dres is d(res3); the MLP branch adds into it through ln_2.
            // Input gradients that nothing else adds into are written, not accumulated, by the
            // matmuls (no zeroing pass over the scratch), and gelu's backward runs in place.
            let [dw, db] = disjoint_mut(g, [&o.fcproj_w, &o.fcproj_b]);
            linear_backward_overwrite(
                prec,
                &mut acts.dfch_gelu,
                dw,
                db,
                &acts.dres,
                &a.fch_gelu,
                &p[o.fcproj_w.clone()],
                n,
                4 * c,
                c,
            );
            k::gelu_backward_inplace(&mut acts.dfch_gelu, &a.fch);
            let [dw, db] = disjoint_mut(g, [&o.fc_w, &o.fc_b]);
            linear_backward_overwrite(
                prec,
                &mut acts.dln,
                dw,
                db,
                &acts.dfch_gelu,
                &a.ln2,
                &p[o.fc_w.clone()],
                n,
                c,
                4 * c,
            );
            let [dw, db] = disjoint_mut(g, [&o.ln2_w, &o.ln2_b]);
            k::layernorm_backward(
                &mut acts.dres,
                dw,
                db,
                &acts.dln,
                &a.res2,
                &p[o.ln2_w.clone()],
                &a.ln2_mean,
                &a.ln2_rstd,
                n,
                c,
            );
            // res2 = x + attn(x): dres is now d(res2).
            let [dw, db] = disjoint_mut(g, [&o.proj_w, &o.proj_b]);
            linear_backward_overwrite(
                prec,
                &mut acts.datty,
                dw,
                db,
                &acts.dres,
                &a.atty,
                &p[o.proj_w.clone()],
                n,
                c,
                c,
            );
            acts.dqkv.fill(0.0);
            k::attention_backward(&mut acts.dqkv, &acts.datty, &a.qkv, &a.att, b, t, c, nh);
            let [dw, db] = disjoint_mut(g, [&o.attn_w, &o.attn_b]);
            linear_backward_overwrite(
                prec,
                &mut acts.dln,
                dw,
                db,
                &acts.dqkv,
                &a.ln1,
                &p[o.attn_w.clone()],
                n,
                c,
                3 * c,
            );
            let [dw, db] = disjoint_mut(g, [&o.ln1_w, &o.ln1_b]);
            k::layernorm_backward(
                &mut acts.dres,
                dw,
                db,
                &acts.dln,
                x_in,
                &p[o.ln1_w.clone()],
                &a.ln1_mean,
                &a.ln1_rstd,
                n,
                c,
            );
        }
        let [dwte, dwpe] = disjoint_mut(g, [&lay.wte, &lay.wpe]);
        k::embedding_backward(dwte, dwpe, &acts.dres, &acts.tokens, &acts.positions, c);
    }
}
