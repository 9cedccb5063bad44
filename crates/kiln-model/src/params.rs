//! Where each parameter tensor lives in the one flat parameter buffer, under its Hugging Face name.
//!
//! One flat buffer (as llm.c) makes AdamW, clipping, zeroing and checkpointing single loops, and the
//! gradient buffer shares the layout.

use crate::config::ModelConfig;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr_normal::normal;
use std::ops::Range;

/// One named tensor: its GPT-2 (`transformers`) name, shape, place in the flat buffer.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    /// AdamW weight decay applies (matrices only; not biases, norms or embeddings).
    pub decay: bool,
}

impl TensorInfo {
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// Offsets of one block's tensors.
#[derive(Clone, Debug)]
pub struct LayerOffsets {
    pub ln1_w: Range<usize>,
    pub ln1_b: Range<usize>,
    pub attn_w: Range<usize>,
    pub attn_b: Range<usize>,
    pub proj_w: Range<usize>,
    pub proj_b: Range<usize>,
    pub ln2_w: Range<usize>,
    pub ln2_b: Range<usize>,
    pub fc_w: Range<usize>,
    pub fc_b: Range<usize>,
    pub fcproj_w: Range<usize>,
    pub fcproj_b: Range<usize>,
}

#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub tensors: Vec<TensorInfo>,
    pub wte: Range<usize>,
    pub wpe: Range<usize>,
    pub layers: Vec<LayerOffsets>,
    pub lnf_w: Range<usize>,
    pub lnf_b: Range<usize>,
    pub score: Option<Range<usize>>,
    pub total: usize,
}

impl ParamLayout {
    pub fn new(cfg: &ModelConfig) -> Self {
        let (v, t, c) = (cfg.vocab_size, cfg.n_ctx, cfg.n_embd);
        let mut tensors = Vec::new();
        let mut offset = 0;
        let mut add = |name: String, shape: Vec<usize>, decay: bool| -> Range<usize> {
            let len = shape.iter().product();
            tensors.push(TensorInfo {
                name,
                shape,
                offset,
                len,
                decay,
            });
            offset += len;
            offset - len..offset
        };
        let wte = add("transformer.wte.weight".into(), vec![v, c], false);
        let wpe = add("transformer.wpe.weight".into(), vec![t, c], false);
        let mut layers = Vec::new();
        for l in 0..cfg.n_layer {
            let p = format!("transformer.h.{l}.");
            layers.push(LayerOffsets {
                ln1_w: add(format!("{p}ln_1.weight"), vec![c], false),
                ln1_b: add(format!("{p}ln_1.bias"), vec![c], false),
                attn_w: add(format!("{p}attn.c_attn.weight"), vec![c, 3 * c], true),
                attn_b: add(format!("{p}attn.c_attn.bias"), vec![3 * c], false),
                proj_w: add(format!("{p}attn.c_proj.weight"), vec![c, c], true),
                proj_b: add(format!("{p}attn.c_proj.bias"), vec![c], false),
                ln2_w: add(format!("{p}ln_2.weight"), vec![c], false),
                ln2_b: add(format!("{p}ln_2.bias"), vec![c], false),
                fc_w: add(format!("{p}mlp.c_fc.weight"), vec![c, 4 * c], true),
                fc_b: add(format!("{p}mlp.c_fc.bias"), vec![4 * c], false),
                fcproj_w: add(format!("{p}mlp.c_proj.weight"), vec![4 * c, c], true),
                fcproj_b: add(format!("{p}mlp.c_proj.bias"), vec![c], false),
            });
        }
        let lnf_w = add("transformer.ln_f.weight".into(), vec![c], false);
        let lnf_b = add("transformer.ln_f.bias".into(), vec![c], false);
        let score = cfg
            .score_head
            .then(|| add("score.weight".into(), vec![1, c], false));
        ParamLayout {
            tensors,
            wte,
            wpe,
            layers,
            lnf_w,
            lnf_b,
            score,
            total: offset,
        }
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// GPT-2 initialisation: N(0, 0.02) for matrices and embeddings, residual projections scaled by
/// 1/sqrt(2·layers), zero biases, unit LayerNorm gains, zero score head (a neutral start for a reward or
/// value head, as OpenAI's lm-human-preferences).
pub fn init_params(cfg: &ModelConfig, layout: &ParamLayout, seed: u64) -> Vec<f32> {
    let mut p = vec![0.0f32; layout.total];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let resid_std = 0.02 / (2.0 * cfg.n_layer as f32).sqrt();
    for t in &layout.tensors {
        let slice = &mut p[t.range()];
        let n = &t.name;
        if n.ends_with(".bias") || n == "score.weight" {
            continue;
        } else if n.contains("ln_") {
            slice.fill(1.0);
        } else {
            let std = if n.ends_with("c_proj.weight") {
                resid_std
            } else {
                0.02
            };
            for x in slice.iter_mut() {
                *x = normal(&mut rng) * std;
            }
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
