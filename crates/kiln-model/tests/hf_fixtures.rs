//! Checkpoints that `transformers` itself wrote (random weights; `scripts/make_hf_fixtures.py`),
//! with the logits `transformers` computed for them: Kiln must read every family's files and give
//! the same logits (max |difference| <= 1e-4), in the training forward and the KV-cache path.

use kiln_model::checkpoint::load_model;
use kiln_model::{Family, KvCache, Model};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tokens(e: &serde_json::Value) -> Vec<u32> {
    e["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits of the whole sequence through the KV cache: the prompt's first half prefilled, the
/// rest fed one token at a time.
fn cached_logits(model: &Model, toks: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::new(model, 1);
    let half = toks.len() / 2;
    // The prefill returns only its last position; the earlier ones are checked by the full forward.
    let mut out = model.forward_cached(&mut cache, &[0], &toks[..half], half);
    for i in half..toks.len() {
        out.extend(model.forward_cached(&mut cache, &[0], &toks[i..i + 1], 1));
    }
    out
}

fn check(name: &str, family: Family) {
    let model = load_model(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert_eq!(model.cfg.family, family, "{name}");
    let e = expected(name);
    let toks = tokens(&e);
    let want: Vec<f32> = e["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    let got = model.logits(&toks);
    let d = max_diff(&got, &want);
    assert!(
        d <= 1e-4,
        "{name}: max |logit difference| {d:.2e} vs transformers"
    );
    let v = model.cfg.vocab_size;
    let from = toks.len() / 2 - 1;
    let cached = cached_logits(&model, &toks);
    let d = max_diff(&cached, &want[from * v..]);
    assert!(d <= 1e-4, "{name}: KV-cache logits differ by {d:.2e}");
}

#[test]
fn llama_gqa_untied() {
    check("llama_gqa2", Family::Llama);
}

/// A Llama 3 instruct layout: embedding padded past the tokenizer, eos_token_id a list.
#[test]
fn llama3_chat_model() {
    check("llama3_chat", Family::Llama);
}

#[test]
fn llama_mqa_rope_theta_5e5() {
    check("llama_mqa_theta5e5", Family::Llama);
}

#[test]
fn llama3_rope_scaling() {
    check("llama3_rope_scaling", Family::Llama);
    check("llama3_rope_scaling_v4config", Family::Llama);
}

#[test]
fn qwen2_biases_tied_head() {
    check("qwen2_tied", Family::Qwen2);
    // transformers 4's config layout, with the sliding window switched off as Qwen2.5 ships it.
    check("qwen2_v4config", Family::Qwen2);
}

#[test]
fn mistral() {
    check("mistral", Family::Mistral);
}

#[test]
fn llama_transformers4_config() {
    check("llama_v4config", Family::Llama);
}

#[test]
fn bf16_sharded_and_fp16() {
    check("llama_bf16_sharded", Family::Llama);
    check("llama_fp16", Family::Llama);
}

#[test]
fn gpt2() {
    check("gpt2", Family::Gpt2);
}

#[test]
fn llama_sequence_classifier_scores() {
    let model = load_model(&fixture("llama_seqcls")).unwrap();
    assert!(model.cfg.score_head);
    let e = expected("llama_seqcls");
    let toks = tokens(&e);
    let t = toks.len();
    let mut acts = kiln_model::Activations::new(&model.cfg, 1, t, false);
    let positions: Vec<u32> = (0..t as u32).collect();
    model.forward(
        &mut acts,
        &kiln_model::Input {
            tokens: &toks,
            positions: &positions,
            valid: None,
            segments: None,
            b: 1,
            t,
        },
    );
    let got = model.score_head(&acts);
    let want: Vec<f32> = e["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let d = max_diff(&got, &want);
    assert!(d <= 1e-4, "scores differ by {d:.2e}");
    let last = e["score_last"].as_f64().unwrap() as f32;
    assert!((got[t - 1] - last).abs() <= 1e-4);
}

/// A copy of a fixture in a temporary directory, to damage.
fn copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixture(name)).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    format!("{:#}", load_model(dir).unwrap_err())
}

#[test]
fn damaged_sharded_checkpoints_give_clear_errors() {
    // A truncated shard.
    let d = copy("llama_bf16_sharded");
    let shard = d.path().join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(d.path());
    assert!(
        err.contains("model-00002-of-00002.safetensors") && err.contains("truncated"),
        "{err}"
    );
    // An index naming a file that is not there.
    let d = copy("llama_bf16_sharded");
    std::fs::remove_file(d.path().join("model-00001-of-00002.safetensors")).unwrap();
    let err = load_err(d.path());
    assert!(
        err.contains("model-00001-of-00002.safetensors") && err.contains("names the shard"),
        "{err}"
    );
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn configs_kiln_cannot_run_are_refused_by_field() {
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "llama_gqa2",
            Box::new(|v| v["model_type"] = "qwen3_moe".into()),
            "model_type \"qwen3_moe\" is not supported",
        ),
        (
            "mistral",
            Box::new(|v| v["sliding_window"] = 16.into()),
            "sliding_window",
        ),
        (
            "qwen2_tied",
            Box::new(|v| {
                v["use_sliding_window"] = true.into();
                v["sliding_window"] = 8.into();
            }),
            "sliding_window",
        ),
        (
            "llama_gqa2",
            Box::new(|v| v["hidden_act"] = "gelu".into()),
            "hidden_act",
        ),
        (
            "llama_gqa2",
            Box::new(|v| v["num_local_experts"] = 8.into()),
            "num_local_experts",
        ),
        (
            "llama3_rope_scaling",
            Box::new(|v| v["rope_parameters"]["rope_type"] = "yarn".into()),
            "rope_type \"yarn\"",
        ),
    ];
    for (name, edit, want) in cases {
        let d = copy(name);
        edit_config(d.path(), edit);
        let err = load_err(d.path());
        assert!(err.contains(want), "{name}: {err}");
        assert!(err.contains("config.json"), "{name}: {err}");
    }
}
