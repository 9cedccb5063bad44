//! Whole-model checks: gradients against finite differences for every parameter tensor, the KV cache
//! against full recomputation, initial loss, overfitting, checkpoints.

use kiln_kernels::IGNORE;
use kiln_model::checkpoint::{load_model, model_files, write_checkpoint_dir};
use kiln_model::{
    generate, Activations, Arch, Family, GenerateOptions, Input, Model, ModelConfig, Sampling,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tiny(arch: Arch, score_head: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: 13,
        n_ctx: 8,
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        arch,
        score_head,
        ..ModelConfig::default()
    }
}

/// A tiny Llama-family model: GQA (4 query heads, 2 kv), SwiGLU, RMSNorm, RoPE, untied head;
/// `qwen` adds q/k/v biases (Qwen2) and ties the head.
fn tiny_llama(arch: Arch, score_head: bool, qwen: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: 13,
        n_ctx: 8,
        n_layer: 2,
        n_head: 4,
        n_embd: 16,
        arch,
        score_head,
        family: if qwen { Family::Qwen2 } else { Family::Llama },
        n_kv_head: 2,
        ffn_hidden: 12,
        rope_theta: 500.0,
        tie_embeddings: qwen,
        qkv_bias: qwen,
        norm_eps: 1e-6,
        ..ModelConfig::default()
    }
}

struct Case {
    tokens: Vec<u32>,
    positions: Vec<u32>,
    valid: Vec<bool>,
    segments: Vec<u32>,
    targets: Vec<u32>,
    weights: Vec<f32>,
    ent_w: Vec<f32>,
    score_w: Vec<f32>,
    b: usize,
    t: usize,
}

fn case(cfg: &ModelConfig, seed: u64) -> Case {
    let (b, t) = (2, 6);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tokens: Vec<u32> = (0..b * t)
        .map(|_| rng.gen_range(0..cfg.vocab_size as u32))
        .collect();
    // Row 1 is padded after 4 tokens and packs two segments; row 0 is one full example.
    let valid: Vec<bool> = (0..b * t).map(|i| i < t || i % t < 4).collect();
    let segments: Vec<u32> = (0..b * t)
        .map(|i| if i >= t && i % t >= 2 { 1 } else { 0 })
        .collect();
    let positions: Vec<u32> = (0..b * t)
        .map(|i| {
            if i >= t && i % t >= 2 {
                (i % t - 2) as u32
            } else {
                (i % t) as u32
            }
        })
        .collect();
    let targets: Vec<u32> = (0..b * t)
        .map(|i| {
            if i % 5 == 3 {
                IGNORE
            } else {
                rng.gen_range(0..cfg.vocab_size as u32)
            }
        })
        .collect();
    let weights: Vec<f32> = (0..b * t).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let ent_w: Vec<f32> = (0..b * t).map(|_| rng.gen_range(-0.5..0.5)).collect();
    let score_w: Vec<f32> = (0..b * t).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Case {
        tokens,
        positions,
        valid,
        segments,
        targets,
        weights,
        ent_w,
        score_w,
        b,
        t,
    }
}

/// L = Σ w_i·logp_i + Σ e_i·H_i (+ Σ s_i·score_i), evaluated in f64.
fn loss(model: &Model, acts: &mut Activations, c: &Case, temperature: f32) -> f64 {
    let input = Input {
        tokens: &c.tokens,
        positions: &c.positions,
        valid: Some(&c.valid),
        segments: Some(&c.segments),
        b: c.b,
        t: c.t,
    };
    model.forward(acts, &input);
    let mut l = 0.0f64;
    if model.cfg.score_head {
        let s = model.score_head(acts);
        l += s
            .iter()
            .zip(&c.score_w)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum::<f64>();
    }
    model.lm_head(acts, &c.targets, temperature);
    for i in 0..c.b * c.t {
        l += c.weights[i] as f64 * acts.logp[i] as f64 + c.ent_w[i] as f64 * acts.entropy[i] as f64;
    }
    l
}

fn grad_check(cfg: ModelConfig) {
    let score_head = cfg.score_head;
    let mut model = Model::new(cfg.clone(), 3);
    // Non-trivial LayerNorm parameters and score head, so their gradients are exercised too.
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for x in model.params.iter_mut() {
        *x += rng.gen_range(-0.05..0.05);
    }
    let c = case(&cfg, 5);
    let temperature = 0.7;
    let mut acts = Activations::new(&cfg, c.b, c.t, true);
    model.zero_grads();
    loss(&model, &mut acts, &c, temperature);
    if score_head {
        let s = c.score_w.clone();
        model.score_head_backward(&mut acts, &s);
    }
    model.lm_head_backward(&mut acts, &c.weights.clone(), Some(&c.ent_w.clone()));
    model.backward(&mut acts);
    let analytic = model.grads.clone();
    // f32 forward passes: 1e-2 balances rounding noise against truncation error.
    let eps = 1e-2f32;
    for t in model.layout.tensors.clone() {
        let g = &analytic[t.range()];
        let norm: f32 = g.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(norm > 0.0, "{} gets no gradient", t.name);
        // Check a spread of entries of every tensor.
        let stride = (t.len / 12).max(1);
        let (mut diff2, mut num2) = (0.0f64, 0.0f64);
        for j in (0..t.len).step_by(stride) {
            let i = t.offset + j;
            let orig = model.params[i];
            model.params[i] = orig + eps;
            let lp = loss(&model, &mut acts, &c, temperature);
            model.params[i] = orig - eps;
            let lm = loss(&model, &mut acts, &c, temperature);
            model.params[i] = orig;
            let num = (lp - lm) / (2.0 * eps as f64);
            diff2 += (num - analytic[i] as f64).powi(2);
            num2 += num * num;
        }
        // Relative error of the sampled gradient vector (a missing or wrong term gives O(1)).
        let rel = diff2.sqrt() / num2.sqrt().max(1e-3);
        assert!(rel < 2e-2, "{}: relative gradient error {rel}", t.name);
    }
}

#[test]
fn gradients_match_finite_differences_decoder() {
    grad_check(tiny(Arch::Decoder, true));
}

#[test]
fn gradients_match_finite_differences_llama_decoder() {
    grad_check(tiny_llama(Arch::Decoder, true, false));
}

#[test]
fn gradients_match_finite_differences_qwen2_decoder() {
    grad_check(tiny_llama(Arch::Decoder, false, true));
}

#[test]
fn gradients_match_finite_differences_llama_encoder() {
    grad_check(tiny_llama(Arch::Encoder, false, false));
}

#[test]
fn gradients_match_finite_differences_encoder() {
    grad_check(tiny(Arch::Encoder, false));
}

#[test]
fn initial_loss_is_ln_vocab() {
    let cfg = ModelConfig {
        vocab_size: 512,
        n_ctx: 32,
        n_layer: 2,
        n_head: 4,
        n_embd: 64,
        arch: Arch::Decoder,
        score_head: false,
        ..ModelConfig::default()
    };
    let model = Model::new(cfg.clone(), 1);
    let (b, t) = (4, 32);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.gen_range(0..512)).collect();
    let targets: Vec<u32> = (0..b * t).map(|_| rng.gen_range(0..512)).collect();
    let positions: Vec<u32> = (0..b * t).map(|i| (i % t) as u32).collect();
    let mut acts = Activations::new(&cfg, b, t, true);
    model.forward(
        &mut acts,
        &Input {
            tokens: &tokens,
            positions: &positions,
            valid: None,
            segments: None,
            b,
            t,
        },
    );
    model.lm_head(&mut acts, &targets, 1.0);
    let l = -acts.logp.iter().map(|&x| x as f64).sum::<f64>() / (b * t) as f64;
    assert!(
        (l - (512f64).ln()).abs() < 0.1,
        "initial loss {l} vs ln V {}",
        (512f64).ln()
    );
}

#[test]
fn overfits_one_batch() {
    let cfg = ModelConfig {
        vocab_size: 64,
        n_ctx: 16,
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        arch: Arch::Decoder,
        score_head: false,
        ..ModelConfig::default()
    };
    let mut model = Model::new(cfg.clone(), 4);
    let (b, t) = (2, 16);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let seq: Vec<u32> = (0..b * t + 1).map(|_| rng.gen_range(0..64)).collect();
    let (tokens, targets) = (&seq[..b * t], &seq[1..]);
    let positions: Vec<u32> = (0..b * t).map(|i| (i % t) as u32).collect();
    let mut acts = Activations::new(&cfg, b, t, true);
    let (mut m, mut v) = (vec![0.0; model.params.len()], vec![0.0; model.params.len()]);
    let mut last = f64::MAX;
    for step in 1..=300 {
        model.zero_grads();
        model.forward(
            &mut acts,
            &Input {
                tokens,
                positions: &positions,
                valid: None,
                segments: None,
                b,
                t,
            },
        );
        model.lm_head(&mut acts, targets, 1.0);
        last = -acts.logp.iter().map(|&x| x as f64).sum::<f64>() / (b * t) as f64;
        let d = vec![-1.0 / (b * t) as f32; b * t];
        model.lm_head_backward(&mut acts, &d, None);
        model.backward(&mut acts);
        kiln_kernels::adamw_update(
            &mut model.params,
            &model.grads,
            &mut m,
            &mut v,
            3e-3,
            0.9,
            0.99,
            1e-8,
            0.0,
            step,
        );
    }
    assert!(last < 0.05, "loss after overfitting: {last}");
}

#[test]
fn kv_cache_generation_equals_recomputation() {
    kv_cache_check(ModelConfig {
        vocab_size: 50,
        n_ctx: 24,
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        arch: Arch::Decoder,
        score_head: false,
        ..ModelConfig::default()
    });
}

#[test]
fn kv_cache_generation_equals_recomputation_llama() {
    for (kv, qwen) in [(1, false), (2, true), (4, false)] {
        kv_cache_check(ModelConfig {
            vocab_size: 50,
            n_ctx: 24,
            n_embd: 32,
            n_kv_head: kv,
            ..tiny_llama(Arch::Decoder, false, qwen)
        });
    }
}

fn kv_cache_check(cfg: ModelConfig) {
    let mut model = Model::new(cfg.clone(), 8);
    // Larger weights make the logits decisive, so greedy choices are not decided by rounding.
    for x in model.params.iter_mut() {
        *x *= 8.0;
    }
    let prompts = vec![vec![3u32, 7, 9], vec![1u32, 2, 3, 4, 5, 6]];
    let opts = GenerateOptions {
        max_new_tokens: 12,
        sampling: Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        },
        stop_tokens: vec![],
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let cached = generate(&model, &prompts, &opts, &mut rng, |_, _| {}).unwrap();
    for (p, got) in prompts.iter().zip(&cached) {
        let mut seq = p.clone();
        for _ in 0..12 {
            let t = seq.len();
            let mut acts = Activations::new(&cfg, 1, t, true);
            let positions: Vec<u32> = (0..t as u32).collect();
            model.forward(
                &mut acts,
                &Input {
                    tokens: &seq,
                    positions: &positions,
                    valid: None,
                    segments: None,
                    b: 1,
                    t,
                },
            );
            model.lm_head(&mut acts, &vec![IGNORE; t], 1.0);
            let v = cfg.vocab_size;
            let row = &acts.logits[(t - 1) * v..t * v];
            let next = row
                .iter()
                .enumerate()
                .fold(0, |b, (j, &x)| if x > row[b] { j } else { b });
            seq.push(next as u32);
        }
        assert_eq!(
            &seq[p.len()..],
            &got[..],
            "KV-cache generation differs from recomputation"
        );
    }
}

#[test]
fn checkpoint_round_trip_llama_family() {
    for cfg in [
        tiny_llama(Arch::Decoder, true, false),
        tiny_llama(Arch::Decoder, false, true),
        ModelConfig {
            family: Family::Mistral,
            rope_scaling: Some(kiln_model::RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 4,
            }),
            ..tiny_llama(Arch::Encoder, false, false)
        },
    ] {
        let model = Model::new(cfg, 12);
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("ckpt");
        write_checkpoint_dir(&ck, &model_files(&model).unwrap()).unwrap();
        let back = load_model(&ck).unwrap();
        assert_eq!(back.cfg, model.cfg);
        assert_eq!(back.params, model.params);
        // The family's own names and nn.Linear layout: q_proj is [q heads * head size, hidden].
        let bytes = std::fs::read(ck.join("model.safetensors")).unwrap();
        let t = kiln_model::checkpoint::bytes_to_tensors(&bytes, "x").unwrap();
        let q = &t["model.layers.1.self_attn.q_proj.weight"];
        assert_eq!(q.0, vec![16, 16]);
        assert_eq!(t["model.layers.0.self_attn.k_proj.weight"].0, vec![8, 16]);
        assert_eq!(t["model.layers.0.mlp.down_proj.weight"].0, vec![16, 12]);
        let untied_lm = !model.cfg.tie_embeddings && !model.cfg.score_head;
        assert_eq!(t.contains_key("lm_head.weight"), untied_lm);
        assert!(!t
            .keys()
            .any(|k| k.contains("qkv_proj") || k.contains("gate_up")));
    }
}

#[test]
fn checkpoint_round_trip_and_corruption() {
    let cfg = tiny(Arch::Decoder, true);
    let model = Model::new(cfg, 11);
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ckpt");
    write_checkpoint_dir(&ck, &model_files(&model).unwrap()).unwrap();
    let back = load_model(&ck).unwrap();
    assert_eq!(back.params, model.params);
    assert_eq!(back.cfg, model.cfg);
    // A bit flip is caught by the checksum.
    let path = ck.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let err = load_model(&ck).unwrap_err().to_string();
    assert!(err.contains("checksum"), "{err}");
    // A truncated file without checksums gives a clear error, not a panic.
    std::fs::remove_file(ck.join("checksums.json")).unwrap();
    std::fs::write(&path, &bytes[..n / 2]).unwrap();
    let err = format!("{:#}", load_model(&ck).unwrap_err());
    assert!(err.contains("not a valid safetensors"), "{err}");
}

#[test]
fn bad_config_is_rejected() {
    let cfg = ModelConfig {
        vocab_size: 50,
        n_ctx: 24,
        n_layer: 2,
        n_head: 5,
        n_embd: 16,
        arch: Arch::Decoder,
        score_head: false,
        ..ModelConfig::default()
    };
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("must divide"), "{err}");
}

#[test]
fn prompt_longer_than_context_is_an_error() {
    let cfg = ModelConfig {
        vocab_size: 50,
        n_ctx: 8,
        n_layer: 1,
        n_head: 2,
        n_embd: 8,
        arch: Arch::Decoder,
        score_head: false,
        ..ModelConfig::default()
    };
    let model = Model::new(cfg, 1);
    let opts = GenerateOptions {
        max_new_tokens: 4,
        sampling: Sampling::default(),
        stop_tokens: vec![],
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let err = generate(&model, &[vec![1; 9]], &opts, &mut rng, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("context"), "{err}");
}

/// Sampled frequencies follow softmax(logits / temperature), and top-k / top-p keep only the
/// tokens they should, renormalised.
#[test]
fn sampling_follows_the_softmax() {
    let logits = [1.0f32, 2.5, -1.0, 0.3, 2.0, f32::NEG_INFINITY];
    let freq = |s: &Sampling| {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut counts = [0usize; 6];
        let n = 40_000;
        for _ in 0..n {
            counts[kiln_model::sample_token(&logits, s, &mut rng) as usize] += 1;
        }
        counts.map(|c| c as f64 / n as f64)
    };
    let softmax = |keep: &[usize], t: f64| {
        let mut p = [0.0f64; 6];
        for &i in keep {
            p[i] = (logits[i] as f64 / t).exp();
        }
        let z: f64 = p.iter().sum();
        p.map(|v| v / z)
    };
    let check = |got: [f64; 6], want: [f64; 6], what: &str| {
        for i in 0..6 {
            assert!(
                (got[i] - want[i]).abs() < 0.01,
                "{what}: token {i} sampled {:.4}, want {:.4}",
                got[i],
                want[i]
            );
        }
    };
    let plain = Sampling {
        temperature: 0.8,
        top_k: 0,
        top_p: 1.0,
    };
    check(freq(&plain), softmax(&[0, 1, 2, 3, 4], 0.8), "plain");
    let top2 = Sampling { top_k: 2, ..plain };
    check(freq(&top2), softmax(&[1, 4], 0.8), "top-k 2");
    // At temperature 1 the two most likely tokens hold 0.82 of the mass: top-p 0.75 keeps them.
    let nucleus = Sampling {
        temperature: 1.0,
        top_k: 0,
        top_p: 0.75,
    };
    check(freq(&nucleus), softmax(&[1, 4], 1.0), "top-p 0.75");
    let greedy = Sampling {
        temperature: 0.0,
        ..plain
    };
    check(freq(&greedy), [0.0, 1.0, 0.0, 0.0, 0.0, 0.0], "greedy");
}
