//! LoRA: gradients of a model with adapters against finite differences (Llama family and GPT-2,
//! f32 and packed bases, dropout, a saved score head), the frozen base, the KV-cache path, merging,
//! switching adapters off, and PEFT files.

use kiln_kernels::IGNORE;
use kiln_model::checkpoint::{load_model, load_model_unmerged, model_files, write_checkpoint_dir};
use kiln_model::lora::{LoraConfig, ALL_LINEAR};
use kiln_model::{
    generate, Activations, Arch, Family, GenerateOptions, Input, Model, ModelConfig, Sampling,
    WeightFormat,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn gpt2(score_head: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: 13,
        n_ctx: 8,
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        arch: Arch::Decoder,
        score_head,
        ..ModelConfig::default()
    }
}

fn llama(score_head: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: 13,
        n_ctx: 8,
        n_layer: 2,
        n_head: 4,
        n_embd: 16,
        arch: Arch::Decoder,
        score_head,
        family: Family::Llama,
        n_kv_head: 2,
        ffn_hidden: 12,
        rope_theta: 500.0,
        tie_embeddings: false,
        norm_eps: 1e-6,
        ..ModelConfig::default()
    }
}

fn lora(targets: &[&str], dropout: f32, base: WeightFormat) -> LoraConfig {
    LoraConfig {
        rank: 3,
        alpha: 6.0,
        dropout,
        targets: targets.iter().map(|s| s.to_string()).collect(),
        rslora: false,
        base_weights: base,
    }
}

/// A model with adapters whose B is non-zero (fresh adapters have B = 0, which would hide any
/// error in A's gradient) and a score head that is not zero.
fn adapted(cfg: &ModelConfig, lc: &LoraConfig) -> Model {
    let mut model = Model::new(cfg.clone(), 3);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for x in model.params.iter_mut() {
        *x += rng.gen_range(-0.05..0.05);
    }
    model.attach_lora(lc, 4).unwrap();
    let set = model.lora.as_mut().unwrap();
    for x in set.params.iter_mut() {
        *x += rng.gen_range(-0.1..0.1);
    }
    model
}

struct Batch {
    tokens: Vec<u32>,
    positions: Vec<u32>,
    valid: Vec<bool>,
    targets: Vec<u32>,
    w: Vec<f32>,
    s: Vec<f32>,
}

fn batch(cfg: &ModelConfig) -> Batch {
    let n = 2 * 6;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let v = cfg.vocab_size as u32;
    Batch {
        tokens: (0..n).map(|_| rng.gen_range(0..v)).collect(),
        positions: (0..n).map(|i| (i % 6) as u32).collect(),
        valid: (0..n).map(|i| i < 6 || i % 6 < 4).collect(),
        targets: (0..n)
            .map(|i| {
                if i % 5 == 3 {
                    IGNORE
                } else {
                    rng.gen_range(0..v)
                }
            })
            .collect(),
        w: (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect(),
        s: (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect(),
    }
}

/// L = Σ w·logp (+ Σ s·score); a fixed dropout round so every evaluation draws the same masks.
fn loss(model: &Model, acts: &mut Activations, c: &Batch) -> f64 {
    if let Some(l) = &model.lora {
        l.set_round(7);
    }
    let input = Input {
        tokens: &c.tokens,
        positions: &c.positions,
        valid: Some(&c.valid),
        segments: None,
        b: 2,
        t: 6,
    };
    model.forward(acts, &input);
    let mut l = 0.0f64;
    if model.cfg.score_head {
        l += model
            .score_head(acts)
            .iter()
            .zip(&c.s)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum::<f64>();
    }
    model.lm_head(acts, &c.targets, 1.0);
    l + acts
        .logp
        .iter()
        .zip(&c.w)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum::<f64>()
}

/// Every adapter tensor's gradient (and the saved score head's) against central differences.
fn grad_check(cfg: ModelConfig, lc: LoraConfig) {
    let mut model = adapted(&cfg, &lc);
    model.set_training(lc.dropout > 0.0);
    let c = batch(&cfg);
    let mut acts = Activations::new(&cfg, 2, 6, true);
    model.zero_grads();
    loss(&model, &mut acts, &c);
    if cfg.score_head {
        model.score_head_backward(&mut acts, &c.s.clone());
    }
    model.lm_head_backward(&mut acts, &c.w.clone(), None);
    model.backward(&mut acts);
    assert!(model.grads.is_empty(), "a frozen base holds no gradient");
    let set = model.lora.as_ref().unwrap();
    let analytic = set.grads.clone();
    let tensors = set.tensors.clone();
    assert_eq!(
        tensors.len(),
        set.adapters.len() * 2 + usize::from(cfg.score_head)
    );
    let eps = 1e-2f32;
    for t in tensors {
        let g = &analytic[t.range()];
        assert!(g.iter().any(|x| *x != 0.0), "{} gets no gradient", t.name);
        let (mut diff2, mut num2) = (0.0f64, 0.0f64);
        for j in (0..t.len).step_by((t.len / 10).max(1)) {
            let i = t.offset + j;
            let orig = model.lora.as_ref().unwrap().params[i];
            model.lora.as_mut().unwrap().params[i] = orig + eps;
            let lp = loss(&model, &mut acts, &c);
            model.lora.as_mut().unwrap().params[i] = orig - eps;
            let lm = loss(&model, &mut acts, &c);
            model.lora.as_mut().unwrap().params[i] = orig;
            let num = (lp - lm) / (2.0 * eps as f64);
            diff2 += (num - analytic[i] as f64).powi(2);
            num2 += num * num;
        }
        // 2 % of the gradient's size, plus f32 rounding of the loss (~1e-5 per entry at this eps).
        let (err, size) = (diff2.sqrt(), num2.sqrt());
        assert!(
            err < 2e-2 * size + 1e-4,
            "{}: gradient error {err:.3e} for a gradient of size {size:.3e}",
            t.name
        );
    }
}

#[test]
fn lora_gradients_match_finite_differences_llama() {
    grad_check(llama(false), lora(&[ALL_LINEAR], 0.0, WeightFormat::F32));
    // Column slices of the fused q|k|v and gate|up, with dropout and rsLoRA.
    let mut lc = lora(&["q_proj", "v_proj", "up_proj"], 0.3, WeightFormat::F32);
    lc.rslora = true;
    grad_check(llama(false), lc);
}

#[test]
fn lora_gradients_match_finite_differences_gpt2() {
    grad_check(
        gpt2(false),
        lora(&["c_attn", "c_proj", "c_fc"], 0.0, WeightFormat::F32),
    );
    grad_check(gpt2(false), lora(&["c_attn"], 0.2, WeightFormat::F32));
}

#[test]
fn lora_gradients_with_a_saved_score_head() {
    grad_check(
        llama(true),
        lora(&["q_proj", "down_proj"], 0.0, WeightFormat::F32),
    );
    grad_check(gpt2(true), lora(&["c_proj"], 0.0, WeightFormat::F32));
}

#[test]
fn lora_gradients_over_packed_bases() {
    for f in [WeightFormat::Bf16, WeightFormat::Int8] {
        grad_check(llama(false), lora(&[ALL_LINEAR], 0.0, f));
        grad_check(gpt2(true), lora(&[ALL_LINEAR], 0.0, f));
    }
}

#[test]
fn packed_base_drops_its_matrices() {
    // Widths of whole 64-column panels, so the packed sizes are exact.
    let cfg = ModelConfig {
        n_embd: 64,
        n_head: 4,
        n_kv_head: 4,
        ffn_hidden: 128,
        ..llama(false)
    };
    for (f, ratio) in [(WeightFormat::Bf16, 0.55), (WeightFormat::Int8, 0.3)] {
        let mut m = Model::new(cfg.clone(), 1);
        let matrices = 4 * (m.layout.total - m.layout.dense);
        m.attach_lora(&lora(&["q_proj"], 0.0, f), 1).unwrap();
        assert_eq!(
            m.params.len(),
            m.layout.dense,
            "{f}: the f32 buffer keeps the dense tensors"
        );
        let packed = m.base.as_ref().unwrap().bytes();
        assert!(
            (packed as f64) < ratio * matrices as f64,
            "{f}: {packed} bytes packed for {matrices} bytes of f32 matrices"
        );
    }
}

#[test]
fn unknown_target_is_refused() {
    let mut m = Model::new(gpt2(false), 1);
    let e = m
        .attach_lora(&lora(&["q_proj"], 0.0, WeightFormat::F32), 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("q_proj") && e.contains("c_attn"), "{e}");
}

fn logits_of(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let t = tokens.len();
    let mut acts = Activations::new(&model.cfg, 1, t, true);
    let positions: Vec<u32> = (0..t as u32).collect();
    model.forward(
        &mut acts,
        &Input {
            tokens,
            positions: &positions,
            valid: None,
            segments: None,
            b: 1,
            t,
        },
    );
    model.lm_head(&mut acts, &vec![IGNORE; t], 1.0);
    // lm_head leaves probabilities; compare those.
    acts.logits.clone()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn merge_equals_adapters_and_off_equals_base() {
    for (cfg, targets) in [
        (
            llama(false),
            vec!["q_proj", "k_proj", "o_proj", "gate_proj"],
        ),
        (gpt2(false), vec![ALL_LINEAR]),
    ] {
        let base = Model::new(cfg.clone(), 3);
        let mut m = adapted(&cfg, &lora(&targets, 0.1, WeightFormat::F32));
        let toks = [1u32, 5, 7, 2, 9, 3];
        let with = logits_of(&m, &toks);
        let mut merged = m.clone();
        merged.merge_lora();
        assert!(merged.lora.is_none() && merged.grads.len() == merged.params.len());
        let d = max_diff(&with, &logits_of(&merged, &toks));
        assert!(d < 1e-5, "merged vs adapters: {d}");
        m.set_adapters_enabled(false);
        // `adapted` perturbed the base too; compare with the same perturbation.
        let mut perturbed = base.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for x in perturbed.params.iter_mut() {
            *x += rng.gen_range(-0.05..0.05);
        }
        assert_eq!(logits_of(&m, &toks), logits_of(&perturbed, &toks));
        assert!(max_diff(&with, &logits_of(&perturbed, &toks)) > 1e-4);
    }
}

#[test]
fn kv_cache_with_adapters_equals_recomputation() {
    for f in [WeightFormat::F32, WeightFormat::Int8] {
        let cfg = ModelConfig {
            vocab_size: 40,
            n_ctx: 24,
            ..llama(false)
        };
        let mut model = Model::new(cfg.clone(), 8);
        for x in model.params.iter_mut() {
            *x *= 8.0;
        }
        model.attach_lora(&lora(&[ALL_LINEAR], 0.0, f), 2).unwrap();
        for x in model.lora.as_mut().unwrap().params.iter_mut() {
            *x += 0.5;
        }
        let prompt = vec![3u32, 7, 9];
        let opts = GenerateOptions {
            max_new_tokens: 10,
            sampling: Sampling {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
            },
            stop_tokens: vec![],
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let got = generate(
            &model,
            std::slice::from_ref(&prompt),
            &opts,
            &mut rng,
            |_, _| {},
        )
        .unwrap();
        let mut seq = prompt.clone();
        for _ in 0..10 {
            let p = logits_of(&model, &seq);
            let v = cfg.vocab_size;
            let row = &p[(seq.len() - 1) * v..];
            let next = row
                .iter()
                .enumerate()
                .fold(0, |b, (j, &x)| if x > row[b] { j } else { b });
            seq.push(next as u32);
        }
        assert_eq!(
            &seq[3..],
            &got[0][..],
            "{f}: cached generation with adapters"
        );
    }
}

#[test]
fn peft_files_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let base_dir = dir.path().join("base");
    let cfg = llama(true);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut base = Model::new(cfg.clone(), 3);
    for x in base.params.iter_mut() {
        *x += rng.gen_range(-0.05..0.05);
    }
    write_checkpoint_dir(&base_dir, &model_files(&base).unwrap()).unwrap();
    let mut m = base.clone();
    m.attach_lora(&lora(&["q_proj", "v_proj"], 0.0, WeightFormat::Int8), 5)
        .unwrap();
    let set = m.lora.as_mut().unwrap();
    for x in set.params.iter_mut() {
        *x += rng.gen_range(-0.3..0.3);
    }
    set.base_model = Some(base_dir.display().to_string());
    let files = model_files(&m).unwrap();
    let names: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "adapter_model.safetensors",
            "adapter_config.json",
            "config.json",
            "kiln_lora.json"
        ]
    );
    let cfg_json: serde_json::Value = serde_json::from_slice(&files[1].1).unwrap();
    assert_eq!(cfg_json["r"], 3);
    assert_eq!(
        cfg_json["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    assert_eq!(cfg_json["modules_to_save"], serde_json::json!(["score"]));
    let ad = dir.path().join("adapter");
    write_checkpoint_dir(&ad, &files).unwrap();
    let back = load_model_unmerged(&ad).unwrap();
    let bset = back.lora.as_ref().unwrap();
    assert_eq!(bset.params, m.lora.as_ref().unwrap().params);
    assert_eq!(
        bset.tensors[0].name,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    );
    assert_eq!(bset.tensors[0].shape, vec![3, 16]);
    assert_eq!(bset.tensors[1].shape, vec![16, 3]);
    assert!(
        back.base.is_some(),
        "the adapter's base format (int8) is kept"
    );
    let toks = [1u32, 4, 2];
    let mut merged = load_model(&ad).unwrap();
    assert!(merged.lora.is_none());
    let d = max_diff(&logits_of(&merged, &toks), &logits_of(&m, &toks));
    assert!(d < 1e-5, "merged adapter dir vs adapters: {d}");
    merged.merge_lora();
    // A damaged adapter file is named in the error.
    let bad = dir.path().join("bad");
    let mut files2 = files.clone();
    files2[0].1 = kiln_model::checkpoint::tensors_to_bytes(&[(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
        vec![2, 16],
        &[0.0; 32][..],
    )])
    .unwrap();
    write_checkpoint_dir(&bad, &files2).unwrap();
    let e = format!("{:#}", load_model(&bad).unwrap_err());
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("shape"),
        "{e}"
    );
}
