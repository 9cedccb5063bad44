//! Fuzzing the checkpoint readers under proptest: safetensors headers and data, `config.json`,
//! `checksums.json` and whole model directories, on random bytes and on mutations of the seed
//! corpus in `crates/kiln-data/fuzz/corpus/{safetensors,model_config,checksums}/`. Every input gives
//! a model or a clear error naming the file: no panic, no hang, bounded memory.
//!
//! `PROPTEST_CASES=N cargo test --release -p kiln-model --test fuzz_checkpoint -- --ignored` runs
//! the sustained variant.

#[path = "../../kiln-data/fuzz/harness.rs"]
mod harness;

use harness::{fuzz, guarded, Counting};
use kiln_model::checkpoint::{
    bytes_to_tensors, load_model, model_files, read_checked, write_checkpoint_dir, CHECKSUMS_FILE,
    CONFIG_FILE, MODEL_FILE,
};
use kiln_model::{Arch, Model, ModelConfig};
use std::path::Path;

#[global_allocator]
static ALLOC: Counting = Counting;

const QUICK: u32 = 150;

fn tiny(score_head: bool) -> Model {
    let cfg = ModelConfig {
        vocab_size: 12,
        n_ctx: 4,
        n_layer: 1,
        n_head: 2,
        n_embd: 4,
        arch: Arch::Decoder,
        score_head,
        ..ModelConfig::default()
    };
    Model::new(cfg, 3)
}

fn mem_limit(bytes: &[u8]) -> usize {
    (16 << 20) + 64 * bytes.len()
}

fn names(err: &str, file: &str, what: &str) {
    assert!(
        err.contains(file),
        "{what}: the error does not name {file}: {err}"
    );
}

/// A model directory with the given config.json and model.safetensors (no checksums, so the
/// parsers see the bytes).
fn load_dir(what: &str, config: &[u8], weights: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(CONFIG_FILE), config).unwrap();
    std::fs::write(dir.path().join(MODEL_FILE), weights).unwrap();
    let p = dir.path().to_path_buf();
    let r = guarded(what, mem_limit(config) + mem_limit(weights), move || {
        load_model(&p)
            .map(|m| m.params.len())
            .map_err(|e| format!("{e:#}"))
    });
    if let Err(e) = r {
        assert!(
            e.contains(CONFIG_FILE) || e.contains(MODEL_FILE),
            "{what}: the error names no file: {e}"
        );
    }
}

fn valid_config() -> Vec<u8> {
    model_files(&tiny(false)).unwrap()[1].1.clone()
}

fn valid_weights() -> Vec<u8> {
    model_files(&tiny(false)).unwrap()[0].1.clone()
}

fn check_safetensors(name: &str, bytes: &[u8]) {
    let b = bytes.to_vec();
    let r = guarded(name, mem_limit(bytes), move || {
        bytes_to_tensors(&b, "x/model.safetensors")
            .map(|t| t.len())
            .map_err(|e| format!("{e:#}"))
    });
    if let Err(e) = r {
        names(&e, "model.safetensors", name);
    }
    load_dir(name, &valid_config(), bytes);
}

fn check_config(name: &str, bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(CONFIG_FILE);
    std::fs::write(&path, bytes).unwrap();
    let r = guarded(name, mem_limit(bytes), move || {
        ModelConfig::load(&path).map_err(|e| format!("{e:#}"))
    });
    if let Err(e) = r {
        names(&e, CONFIG_FILE, name);
    }
    load_dir(name, bytes, &valid_weights());
}

fn check_checksums(name: &str, bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint_dir(
        &dir.path().join("ckpt"),
        &model_files(&tiny(false)).unwrap(),
    )
    .unwrap();
    let ck = dir.path().join("ckpt");
    std::fs::write(ck.join(CHECKSUMS_FILE), bytes).unwrap();
    let r = guarded(name, mem_limit(bytes) + (1 << 20), move || {
        read_checked(&ck, MODEL_FILE)
            .map(|b| b.len())
            .map_err(|e| format!("{e:#}"))
    });
    if let Err(e) = r {
        assert!(
            e.contains(CHECKSUMS_FILE) || e.contains(MODEL_FILE),
            "{name}: {e}"
        );
    }
}

#[test]
fn fuzz_safetensors() {
    fuzz("safetensors", QUICK, check_safetensors);
}

#[test]
fn fuzz_model_config() {
    fuzz("model_config", QUICK, check_config);
}

#[test]
fn fuzz_checksums() {
    fuzz("checksums", 60, check_checksums);
}

#[test]
fn seed_corpus_is_current() {
    // The seeds are what this build writes (regenerate with `-- --ignored write_seed_corpus`).
    let root = harness::corpus_root();
    assert_eq!(
        std::fs::read(root.join("safetensors/tiny_model.safetensors")).unwrap(),
        valid_weights()
    );
    assert_eq!(
        std::fs::read(root.join("model_config/tiny_config.json")).unwrap(),
        valid_config()
    );
}

#[test]
#[ignore]
fn write_seed_corpus() {
    let root = harness::corpus_root();
    std::fs::write(
        root.join("safetensors/tiny_model.safetensors"),
        valid_weights(),
    )
    .unwrap();
    let rm = model_files(&tiny(true)).unwrap();
    std::fs::write(
        root.join("safetensors/tiny_reward_model.safetensors"),
        &rm[0].1,
    )
    .unwrap();
    std::fs::write(root.join("model_config/tiny_config.json"), valid_config()).unwrap();
    std::fs::write(root.join("model_config/tiny_rm_config.json"), &rm[1].1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint_dir(&dir.path().join("c"), &model_files(&tiny(false)).unwrap()).unwrap();
    std::fs::copy(
        dir.path().join("c").join(CHECKSUMS_FILE),
        root.join("checksums/tiny_checksums.json"),
    )
    .unwrap();
    let _ = Path::new(".");
}

/// `PROPTEST_CASES=N cargo test --release -p kiln-model --test fuzz_checkpoint -- --ignored --nocapture fuzz_sustained`
#[test]
#[ignore]
fn fuzz_sustained() {
    let n = harness::cases(0, true);
    let t0 = std::time::Instant::now();
    fuzz("safetensors", n, check_safetensors);
    fuzz("model_config", n, check_config);
    fuzz("checksums", (n / 4).max(1), check_checksums);
    eprintln!(
        "fuzz_sustained: {} executions in {:.0}s",
        harness::EXECS.load(std::sync::atomic::Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
    );
}
