//! Generation with packed (int8 / bf16 / f32 panels) weights: the same function as the f32 path on
//! the packed weights, close to the f32 model, and consistent across the KV cache and batching.

use kiln_kernels::{PackedFormat, PackedLinear};
use kiln_model::{
    generate_with, Arch, GenerateOptions, KvCache, Model, ModelConfig, PackedWeights, Sampling,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const FORMATS: [PackedFormat; 3] = [PackedFormat::Int8, PackedFormat::Bf16, PackedFormat::F32];

/// Odd sizes on purpose: widths and a vocabulary that are not multiples of the 64-column panels.
fn cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 203,
        n_ctx: 40,
        n_layer: 2,
        n_head: 3,
        n_embd: 48,
        arch: Arch::Decoder,
        score_head: false,
        ..ModelConfig::default()
    }
}

/// The same widths as a Llama-family model: grouped-query attention, SwiGLU, RoPE, untied head,
/// q/k/v biases.
fn llama_cfg() -> ModelConfig {
    ModelConfig {
        family: kiln_model::Family::Qwen2,
        n_head: 4,
        n_kv_head: 2,
        ffn_hidden: 72,
        tie_embeddings: false,
        qkv_bias: true,
        ..cfg()
    }
}

/// A random model with weights large enough that logits are decisive (std ~0.8 at init scale x4),
/// and non-trivial biases and norm parameters. Odd seeds are Llama-family models.
fn model(seed: u64) -> Model {
    let c = if seed % 2 == 1 { llama_cfg() } else { cfg() };
    let mut m = Model::new(c, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
    let names: Vec<_> = m.layout.tensors.clone();
    for t in names {
        let s = &mut m.params[t.range()];
        if t.name.ends_with(".bias") {
            s.iter_mut().for_each(|x| *x = rng.gen_range(-0.1..0.1));
        } else if t.role == kiln_model::Role::NormWeight || t.role == kiln_model::Role::NormBias {
            s.iter_mut().for_each(|x| *x += rng.gen_range(-0.2..0.2));
        } else {
            s.iter_mut().for_each(|x| *x *= 4.0);
        }
    }
    m
}

/// Replaces every matrix the packed path multiplies by with its own packed-then-unpacked value, so
/// the f32 path and the packed path compute with the same weights.
fn round_trip(model: &Model, fmt: PackedFormat) -> Model {
    let mut m = Model::new(model.cfg.clone(), 0);
    m.params.clone_from(&model.params);
    let c = m.cfg.n_embd;
    let lay = m.layout.clone();
    let mut set = |l: &kiln_model::Linear| {
        let p = PackedLinear::from_in_out(&m.params[l.w.clone()], None, l.i, l.o, fmt);
        m.params[l.w.clone()].copy_from_slice(&p.dequantize());
    };
    for o in &lay.layers {
        for l in [&o.qkv, &o.o, &o.up, &o.down] {
            set(l);
        }
    }
    // The LM head (tied or not) is quantized per vocabulary row: pack it as [out, in] and write
    // back the transpose of the [in, out] dequantized matrix.
    let v = m.cfg.vocab_size;
    let l = PackedLinear::from_out_in(&m.params[lay.head()], None, v, c, fmt);
    let d = l.dequantize();
    let wte = &mut m.params[lay.head()];
    for j in 0..v {
        for p in 0..c {
            wte[j * c + p] = d[p * v + j];
        }
    }
    m
}

/// Last-token logits of `tokens` fed in one call.
fn logits(model: &Model, packed: Option<&PackedWeights>, tokens: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::new(model, 1);
    model.forward_cached_with(packed, &mut cache, &[0], tokens, tokens.len())
}

fn prompt(seed: u64, len: usize) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(0..203)).collect()
}

fn argmax(x: &[f32]) -> usize {
    (0..x.len()).fold(0, |b, j| if x[j] > x[b] { j } else { b })
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Greedy decoding of `n` new tokens.
fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        sampling: Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        },
        stop_tokens: vec![],
    }
}

/// `p` decoded alone on `packed`.
fn alone(m: &Model, packed: &PackedWeights, p: &[u32], opts: &GenerateOptions) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let out = generate_with(m, Some(packed), &[p.to_vec()], opts, &mut rng, |_, _| {});
    out.unwrap().remove(0)
}

#[test]
fn packed_path_equals_f32_path_on_the_packed_weights() {
    for (fmt, seed) in FORMATS.into_iter().flat_map(|f| [(f, 1), (f, 2)]) {
        let rt = round_trip(&model(seed), fmt);
        let packed = PackedWeights::new(&rt, fmt);
        // Packing is idempotent, so `packed` multiplies by exactly `rt`'s matrices; what is left is
        // f32 summation order (and fused multiply-adds) in two different kernels.
        for seed in 0..4 {
            let toks = prompt(seed, 5 + 7 * seed as usize);
            let want = logits(&rt, None, &toks);
            let got = logits(&rt, Some(&packed), &toks);
            let scale = want.iter().map(|x| x.abs()).fold(0.0, f32::max);
            let d = max_abs_diff(&got, &want);
            assert!(
                d <= 1e-4 * scale.max(1.0),
                "{fmt:?} seed {seed}: max |dlogit| {d} (logit scale {scale})"
            );
        }
    }
}

#[test]
fn packed_logits_close_to_f32_model() {
    let m = model(2);
    // Measured: int8 0.038, bf16 0.009 logit standard deviations; f32 panels are the same weights.
    for (fmt, tol) in [
        (PackedFormat::Int8, 0.06f32),
        (PackedFormat::Bf16, 0.02),
        (PackedFormat::F32, 1e-5),
    ] {
        let packed = PackedWeights::new(&m, fmt);
        let (mut worst, mut agree, mut total) = (0.0f32, 0, 0);
        for seed in 0..8 {
            let toks = prompt(10 + seed, 3 + 4 * seed as usize);
            let want = logits(&m, None, &toks);
            let got = logits(&m, Some(&packed), &toks);
            let spread = {
                let mean = want.iter().sum::<f32>() / want.len() as f32;
                (want.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / want.len() as f32).sqrt()
            };
            worst = worst.max(max_abs_diff(&got, &want) / spread);
            agree += (argmax(&got) == argmax(&want)) as usize;
            total += 1;
        }
        println!("{fmt:?}: max |dlogit| / logit std = {worst:.4}, top-1 agreement {agree}/{total}");
        assert!(
            worst <= tol,
            "{fmt:?}: max |dlogit| is {worst} logit standard deviations (tolerance {tol})"
        );
        assert_eq!(agree, total, "{fmt:?}: top-1 token changed");
    }
}

#[test]
fn packed_kv_cache_and_batching_are_consistent() {
    let m = model(3);
    for fmt in FORMATS {
        let packed = PackedWeights::new(&m, fmt);
        // One call with the whole prompt (the blocked attention of a fresh prompt), or one token
        // per call through the cache (attention over the cached rows): the same logits up to
        // f32 summation order (the packed product of a row does not depend on the other rows).
        // A prompt continued in a second call takes the cached path for its tail.
        let toks = prompt(7, 19);
        let whole = logits(&m, Some(&packed), &toks);
        let mut cache = KvCache::new(&m, 1);
        let mut last = Vec::new();
        for &t in &toks {
            last = m.forward_cached_with(Some(&packed), &mut cache, &[0], &[t], 1);
        }
        let mut cache = KvCache::new(&m, 1);
        m.forward_cached_with(Some(&packed), &mut cache, &[0], &toks[..7], 7);
        let split = m.forward_cached_with(Some(&packed), &mut cache, &[0], &toks[7..], 12);
        let spread = whole.iter().map(|x| x.abs()).fold(0.0, f32::max);
        for (other, what) in [(&last, "token-by-token"), (&split, "7 + 12 tokens")] {
            let diff = max_abs_diff(&whole, other);
            assert!(
                diff <= 1e-5 * spread,
                "{fmt:?}: prefill and {what} differ by {diff} (largest logit {spread})"
            );
            assert_eq!(
                argmax(&whole),
                argmax(other),
                "{fmt:?}: {what} changes the top token"
            );
        }

        // Greedy generation of a batch equals each prompt generated alone, and equals argmax over
        // the cached forward done by hand.
        let prompts = vec![prompt(8, 4), prompt(9, 11), prompt(10, 1)];
        let opts = greedy(15);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let batch = generate_with(&m, Some(&packed), &prompts, &opts, &mut rng, |_, _| {}).unwrap();
        for (p, got) in prompts.iter().zip(&batch) {
            let alone = alone(&m, &packed, p, &opts);
            assert_eq!(&alone, got, "{fmt:?}: batched generation differs");
            let mut cache = KvCache::new(&m, 1);
            let mut l = m.forward_cached_with(Some(&packed), &mut cache, &[0], p, p.len());
            for &tok in got {
                assert_eq!(tok as usize, argmax(&l), "{fmt:?}: not the greedy token");
                l = m.forward_cached_with(Some(&packed), &mut cache, &[0], &[tok], 1);
            }
        }
    }
}

/// Decoding more rows than the skinny kernel takes for the model's MLP weight on this CPU in a
/// decode (`decode_skinny_rows`: 3 rows with AVX-512, 1 with AVX2) with the model's f32 weights
/// runs on f32 panels packed for the call: the same tokens as with those panels given explicitly,
/// and each row's tokens the same as when it decodes alone on them (a row's products do not depend
/// on the batch).
#[test]
fn large_f32_batches_decode_on_f32_panels() {
    for seed in [2, 3] {
        let m = model(seed);
        let skinny = kiln_kernels::matmul::decode_skinny_rows(m.cfg.n_embd, m.cfg.ffn());
        assert!(skinny <= kiln_kernels::matmul::SKINNY_ROWS);
        let panels = PackedWeights::new(&m, PackedFormat::F32);
        let chosen = kiln_model::infer::decode_panels(&m, None, 20).map(|p| p.format());
        assert_eq!(chosen, Some(PackedFormat::F32), "20 rows");
        let chosen = kiln_model::infer::decode_panels(&m, None, skinny + 1).map(|p| p.format());
        assert_eq!(chosen, Some(PackedFormat::F32), "{} rows", skinny + 1);
        assert!(
            kiln_model::infer::decode_panels(&m, None, skinny).is_none(),
            "{skinny} rows"
        );
        assert!(
            kiln_model::infer::decode_panels(&m, Some(&panels), 20).is_none(),
            "given"
        );
        let prompts: Vec<Vec<u32>> = (0..20)
            .map(|i| prompt(30 + i, 1 + i as usize % 6))
            .collect();
        let opts = greedy(12);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let auto = generate_with(&m, None, &prompts, &opts, &mut rng, |_, _| {}).unwrap();
        let given = generate_with(&m, Some(&panels), &prompts, &opts, &mut rng, |_, _| {}).unwrap();
        assert_eq!(
            auto, given,
            "seed {seed}: a batch of 20 did not decode on f32 panels"
        );
        for (p, got) in prompts.iter().zip(&auto) {
            assert_eq!(
                &alone(&m, &panels, p, &opts),
                got,
                "seed {seed}: a row decodes differently in the batch"
            );
        }
    }
}

#[test]
#[should_panic(expected = "different model shape")]
fn packed_weights_of_another_shape_are_refused() {
    let m = model(4);
    let mut other_cfg = cfg();
    other_cfg.vocab_size = 100;
    let other = Model::new(other_cfg, 0);
    let packed = PackedWeights::new(&other, PackedFormat::Int8);
    logits(&m, Some(&packed), &[1, 2, 3]);
}
