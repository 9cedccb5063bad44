//! Where each parameter tensor lives in the one flat parameter buffer, derived from the model spec,
//! with typed per-layer views and the family's Hugging Face names.
//!
//! One flat buffer (as llm.c) makes AdamW, clipping, zeroing and checkpointing single loops, and the
//! gradient buffer shares the layout. Every matrix is stored `[in, out]` (GPT-2's Conv1D layout, the
//! one the kernels take); q/k/v are one fused projection and SwiGLU's gate/up another. Each tensor
//! records how it is assembled from the family's own checkpoint tensors (`hf`), so checkpoint I/O
//! is one generic loop and nothing else knows names.

use crate::config::{Family, MlpKind, ModelConfig, NormKind};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr_normal::normal;
use std::ops::Range;

/// What a tensor is, for initialisation and weight decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Embedding,
    /// A matrix feeding the residual stream (attention output, MLP down): GPT-2 scales its init.
    ResidualMatrix,
    Matrix,
    Bias,
    NormWeight,
    NormBias,
    /// The scalar score head (zero at init).
    Score,
}

/// One checkpoint tensor that makes up a column block of a Kiln tensor.
#[derive(Clone, Debug)]
pub struct HfPart {
    pub name: String,
    /// Columns of the Kiln tensor it fills (its width along the output dimension).
    pub cols: usize,
    /// Stored `[out, in]` (`nn.Linear`) in the checkpoint, `[in, out]` in Kiln.
    pub transposed: bool,
}

/// One named tensor: its Kiln name, shape, place in the flat buffer, and checkpoint parts.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    /// AdamW weight decay applies (matrices only; not biases, norms or embeddings).
    pub decay: bool,
    pub role: Role,
    /// The checkpoint tensors this one is assembled from, in column order.
    pub hf: Vec<HfPart>,
    /// The weight of one of a block's linear layers: laid out after every other tensor (see
    /// [`ParamLayout::dense`]), so a frozen base packed to bf16/int8 drops them from the buffer.
    pub block_matrix: bool,
}

impl TensorInfo {
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// A linear layer's weight `[i, o]` and optional bias `[o]`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub w: Range<usize>,
    pub b: Option<Range<usize>>,
    pub i: usize,
    pub o: usize,
}

/// A norm's gain and (LayerNorm only) bias, each `[c]`.
#[derive(Clone, Debug)]
pub struct Norm {
    pub w: Range<usize>,
    pub b: Option<Range<usize>>,
}

/// One block's parameters.
#[derive(Clone, Debug)]
pub struct BlockLayout {
    pub norm1: Norm,
    /// q | k | v, fused.
    pub qkv: Linear,
    pub o: Linear,
    pub norm2: Norm,
    /// GELU: `c_fc` `[c, 4c]`; SwiGLU: gate | up fused, `[c, 2f]`.
    pub up: Linear,
    pub down: Linear,
}

#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub tensors: Vec<TensorInfo>,
    pub wte: Range<usize>,
    /// Learned positions (GPT-2); `None` with rotary embeddings.
    pub wpe: Option<Range<usize>>,
    pub layers: Vec<BlockLayout>,
    pub norm_f: Norm,
    /// An untied LM head `[vocab, c]` (`None`: tied to `wte`, or a scored model).
    pub lm_head: Option<Range<usize>>,
    pub score: Option<Range<usize>>,
    pub total: usize,
    /// Length of the buffer's first part: every tensor but the blocks' linear weights, which fill
    /// `dense..total` (what a packed frozen base holds in its own format instead).
    pub dense: usize,
}

/// Builds the layout tensor by tensor. Block matrices get offsets in a second region (counted
/// from 0, then moved after the rest by [`Builder::finish`]).
struct Builder {
    tensors: Vec<TensorInfo>,
    /// Next offset of the dense region and of the block-matrix region.
    offset: [usize; 2],
}

impl Builder {
    fn add(
        &mut self,
        name: String,
        shape: Vec<usize>,
        role: Role,
        hf: Vec<HfPart>,
        block_matrix: bool,
    ) -> Range<usize> {
        let len = shape.iter().product();
        let region = usize::from(block_matrix);
        let offset = self.offset[region];
        self.tensors.push(TensorInfo {
            name,
            shape,
            offset,
            len,
            decay: matches!(role, Role::Matrix | Role::ResidualMatrix),
            role,
            hf,
            block_matrix,
        });
        self.offset[region] += len;
        offset..offset + len
    }

    /// Moves the block matrices after the dense tensors; returns (dense, total).
    fn finish(&mut self, layers: &mut [BlockLayout]) -> (usize, usize) {
        let dense = self.offset[0];
        for t in self.tensors.iter_mut().filter(|t| t.block_matrix) {
            t.offset += dense;
        }
        for b in layers {
            for lin in [&mut b.qkv, &mut b.o, &mut b.up, &mut b.down] {
                lin.w = lin.w.start + dense..lin.w.end + dense;
            }
        }
        (dense, dense + self.offset[1])
    }

    /// A tensor stored under its own name in the checkpoint, in the same layout.
    fn plain(&mut self, name: String, shape: Vec<usize>, role: Role) -> Range<usize> {
        let cols = *shape.last().unwrap_or(&1);
        let hf = vec![HfPart {
            name: name.clone(),
            cols,
            transposed: false,
        }];
        self.add(name, shape, role, hf, false)
    }

    fn norm(&mut self, prefix: &str, c: usize, kind: NormKind) -> Norm {
        let w = self.plain(format!("{prefix}.weight"), vec![c], Role::NormWeight);
        let b = (kind == NormKind::LayerNorm)
            .then(|| self.plain(format!("{prefix}.bias"), vec![c], Role::NormBias));
        Norm { w, b }
    }

    /// A Llama-family linear made of `nn.Linear` checkpoint tensors `[out, in]` (several fused
    /// along the output), with or without biases.
    fn fused(
        &mut self,
        name: String,
        parts: &[(String, usize)],
        i: usize,
        bias: bool,
        role: Role,
    ) -> Linear {
        let o: usize = parts.iter().map(|p| p.1).sum();
        let hf = |suffix: &str, transposed: bool| -> Vec<HfPart> {
            parts
                .iter()
                .map(|(n, cols)| HfPart {
                    name: format!("{n}.{suffix}"),
                    cols: *cols,
                    transposed,
                })
                .collect()
        };
        let w = self.add(
            format!("{name}.weight"),
            vec![i, o],
            role,
            hf("weight", true),
            true,
        );
        let b = bias.then(|| {
            self.add(
                format!("{name}.bias"),
                vec![o],
                Role::Bias,
                hf("bias", false),
                false,
            )
        });
        Linear { w, b, i, o }
    }
}

impl ParamLayout {
    pub fn new(cfg: &ModelConfig) -> Self {
        let (v, t, c) = (cfg.vocab_size, cfg.n_ctx, cfg.n_embd);
        let mut bld = Builder {
            tensors: Vec::new(),
            offset: [0, 0],
        };
        let layout = match cfg.family {
            Family::Gpt2 => {
                let wte = bld.plain("transformer.wte.weight".into(), vec![v, c], Role::Embedding);
                let wpe = bld.plain("transformer.wpe.weight".into(), vec![t, c], Role::Embedding);
                let mut layers = Vec::new();
                for l in 0..cfg.n_layer {
                    let p = format!("transformer.h.{l}.");
                    let lin =
                        |bld: &mut Builder, name: &str, i: usize, o: usize, role: Role| Linear {
                            w: {
                                let n = format!("{p}{name}.weight");
                                let hf = vec![HfPart {
                                    name: n.clone(),
                                    cols: o,
                                    transposed: false,
                                }];
                                bld.add(n, vec![i, o], role, hf, true)
                            },
                            b: Some(bld.plain(format!("{p}{name}.bias"), vec![o], Role::Bias)),
                            i,
                            o,
                        };
                    // In GPT-2's checkpoint order.
                    let n1 = bld.norm(&format!("{p}ln_1"), c, NormKind::LayerNorm);
                    let qkv = lin(&mut bld, "attn.c_attn", c, 3 * c, Role::Matrix);
                    let o = lin(&mut bld, "attn.c_proj", c, c, Role::ResidualMatrix);
                    let n2 = bld.norm(&format!("{p}ln_2"), c, NormKind::LayerNorm);
                    let up = lin(&mut bld, "mlp.c_fc", c, 4 * c, Role::Matrix);
                    let down = lin(&mut bld, "mlp.c_proj", 4 * c, c, Role::ResidualMatrix);
                    layers.push(BlockLayout {
                        norm1: n1,
                        qkv,
                        o,
                        norm2: n2,
                        up,
                        down,
                    });
                }
                let norm_f = bld.norm("transformer.ln_f", c, NormKind::LayerNorm);
                (wte, Some(wpe), layers, norm_f)
            }
            _ => {
                let wte = bld.plain(
                    "model.embed_tokens.weight".into(),
                    vec![v, c],
                    Role::Embedding,
                );
                let (hs, kv, f) = (cfg.head_size(), cfg.kv_heads(), cfg.ffn());
                let (qkv_bias, o_bias, _) = cfg.biases();
                let mut layers = Vec::new();
                for l in 0..cfg.n_layer {
                    let p = format!("model.layers.{l}.");
                    let norm1 = bld.norm(&format!("{p}input_layernorm"), c, NormKind::RmsNorm);
                    let at = |n: &str| format!("{p}self_attn.{n}");
                    let qkv = bld.fused(
                        at("qkv_proj"),
                        &[
                            (at("q_proj"), cfg.n_head * hs),
                            (at("k_proj"), kv * hs),
                            (at("v_proj"), kv * hs),
                        ],
                        c,
                        qkv_bias,
                        Role::Matrix,
                    );
                    let o = bld.fused(
                        at("o_proj"),
                        &[(at("o_proj"), c)],
                        cfg.n_head * hs,
                        o_bias,
                        Role::ResidualMatrix,
                    );
                    let norm2 = bld.norm(
                        &format!("{p}post_attention_layernorm"),
                        c,
                        NormKind::RmsNorm,
                    );
                    let up = bld.fused(
                        format!("{p}mlp.gate_up_proj"),
                        &[
                            (format!("{p}mlp.gate_proj"), f),
                            (format!("{p}mlp.up_proj"), f),
                        ],
                        c,
                        false,
                        Role::Matrix,
                    );
                    let down = bld.fused(
                        format!("{p}mlp.down_proj"),
                        &[(format!("{p}mlp.down_proj"), c)],
                        f,
                        false,
                        Role::ResidualMatrix,
                    );
                    layers.push(BlockLayout {
                        norm1,
                        qkv,
                        o,
                        norm2,
                        up,
                        down,
                    });
                }
                let norm_f = bld.norm("model.norm", c, NormKind::RmsNorm);
                (wte, None, layers, norm_f)
            }
        };
        let (wte, wpe, mut layers, norm_f) = layout;
        // A scored model (reward model, critic) has no LM head of its own, as a transformers
        // sequence classifier has none.
        let lm_head = (!cfg.tie_embeddings && !cfg.score_head)
            .then(|| bld.plain("lm_head.weight".into(), vec![v, c], Role::Matrix));
        let score = cfg
            .score_head
            .then(|| bld.plain("score.weight".into(), vec![1, c], Role::Score));
        debug_assert!(
            cfg.mlp_kind() == MlpKind::Gelu || layers.iter().all(|b| b.up.o == 2 * cfg.ffn())
        );
        let (dense, total) = bld.finish(&mut layers);
        ParamLayout {
            tensors: bld.tensors,
            wte,
            wpe,
            layers,
            norm_f,
            lm_head,
            score,
            total,
            dense,
        }
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The LM head's weight `[vocab, c]`: the untied head, or the token embedding.
    pub fn head(&self) -> Range<usize> {
        self.lm_head.clone().unwrap_or_else(|| self.wte.clone())
    }
}

/// GPT-2 initialisation for every family: N(0, 0.02) for matrices and embeddings, residual
/// projections scaled by 1/sqrt(2·layers), zero biases, unit norm gains, zero score head (a neutral
/// start for a reward or value head, as OpenAI's lm-human-preferences).
pub fn init_params(cfg: &ModelConfig, layout: &ParamLayout, seed: u64) -> Vec<f32> {
    let mut p = vec![0.0f32; layout.total];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let resid_std = 0.02 / (2.0 * cfg.n_layer as f32).sqrt();
    for t in &layout.tensors {
        let slice = &mut p[t.range()];
        let std = match t.role {
            Role::Bias | Role::NormBias | Role::Score => continue,
            Role::NormWeight => {
                slice.fill(1.0);
                continue;
            }
            Role::ResidualMatrix => resid_std,
            Role::Embedding | Role::Matrix => 0.02,
        };
        for x in slice.iter_mut() {
            *x = normal(&mut rng) * std;
        }
    }
    p
}

/// A tiny Box–Muller normal sampler (avoids a dependency for one function).
mod rand_distr_normal {
    use rand::Rng;
    pub fn normal<R: Rng>(rng: &mut R) -> f32 {
        let u1: f64 = rng.gen::<f64>().max(1e-300);
        let u2: f64 = rng.gen();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}
