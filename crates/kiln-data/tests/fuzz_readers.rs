//! Fuzzing the data readers under proptest: the corpus reader (text, JSONL, gzip), the SFT,
//! preference and prompt dataset readers, the token shard header and tokenizer.json loading, on
//! random bytes and on mutations of the seed corpus in `fuzz/corpus/<reader>/`. Every input must
//! give a result or a clear error naming the file: no panic, no hang, bounded memory.
//!
//! The default runs are quick; `cargo test --release -p kiln-data --test fuzz_readers -- --ignored`
//! runs the sustained variant (`PROPTEST_CASES` cases per reader, default 20000).

#[path = "../fuzz/harness.rs"]
mod harness;

use harness::{fuzz, guarded, Counting};
use kiln_data::datasets::{load_preferences, load_prompts, load_sft, LoadOptions};
use kiln_data::shards::Shard;
use kiln_data::Tokenizer;
use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOC: Counting = Counting;

const QUICK: u32 = 150;

/// Writes `bytes` as `name` in a fresh temporary directory.
fn file(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

fn mem_limit(bytes: &[u8]) -> usize {
    (32 << 20) + 512 * bytes.len()
}

/// An error message must name the file it is about.
fn names_file(err: &str, path: &Path, what: &str) {
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(
        err.contains(&*name),
        "{what}: the error does not name the file: {err}"
    );
}

fn check_corpus(name: &str, bytes: &[u8]) {
    let (_d, path) = file(name, bytes);
    let p = path.clone();
    let r = guarded(name, mem_limit(bytes), move || {
        kiln_data::corpus::read_documents(&p, "text").map_err(|e| e.to_string())
    });
    match r {
        Ok(docs) => assert!(
            docs.iter().all(|d| !d.is_empty()),
            "{name}: an empty document"
        ),
        Err(e) => names_file(&e, &path, name),
    }
}

fn check_dataset(name: &str, bytes: &[u8], kind: &'static str) {
    let (_d, path) = file(name, bytes);
    for skip_bad in [false, true] {
        let p = path.clone();
        let opts = LoadOptions {
            skip_bad,
            ..Default::default()
        };
        let r = guarded(name, mem_limit(bytes), move || match kind {
            "sft" => load_sft(&p, &opts).map(|l| (l.records.len(), l.skipped, l.first_error)),
            "preferences" => {
                load_preferences(&p, &opts).map(|l| (l.records.len(), l.skipped, l.first_error))
            }
            _ => load_prompts(&p, &opts).map(|l| (l.records.len(), l.skipped, l.first_error)),
        });
        match r {
            Ok((_, skipped, first)) => {
                assert!(
                    skip_bad || skipped == 0,
                    "{name}: skipped records without --skip-bad-records"
                );
                assert_eq!(
                    skipped > 0,
                    first.is_some(),
                    "{name}: skipped {skipped} but first error {first:?}"
                );
            }
            Err(e) => names_file(&e.to_string(), &path, name),
        }
    }
}

fn check_shard(name: &str, bytes: &[u8]) {
    let (_d, path) = file("train_000.bin", bytes);
    let p = path.clone();
    let r = guarded(name, mem_limit(bytes), move || {
        Shard::open(&p)
            .map(|s| (s.vocab_size(), s.to_vec()))
            .map_err(|e| e.to_string())
    });
    match r {
        Ok((vocab, tokens)) => {
            assert!(
                tokens.len() * 2 + 64 <= bytes.len(),
                "{name}: more tokens than bytes"
            );
            assert!(
                tokens.iter().all(|&t| (t as usize) < vocab),
                "{name}: a token out of the vocabulary"
            );
        }
        Err(e) => names_file(&e, &path, name),
    }
}

fn check_tokenizer(name: &str, bytes: &[u8]) {
    let (_d, path) = file("tokenizer.json", bytes);
    let p = path.clone();
    let r = guarded(name, (64 << 20) + 512 * bytes.len(), move || {
        Tokenizer::load(&p).map_err(|e| e.to_string()).map(|t| {
            let text = "Mia has 3 red balls. <|user|>Hi<|end|> \u{e9}\u{1F600}\n\t  x";
            let ids = t.encode(text);
            let ids2 = t.encode_with_specials(text);
            let back = t.decode(&ids);
            (t.vocab_size(), ids, ids2, back)
        })
    });
    match r {
        Ok((vocab, ids, ids2, _)) => {
            assert!(
                ids.iter().chain(&ids2).all(|&i| (i as usize) < vocab),
                "{name}: an id out of the vocabulary"
            );
        }
        Err(e) => names_file(&e, &path, name),
    }
}

#[test]
fn fuzz_corpus_text() {
    fuzz("corpus_text", QUICK, check_corpus);
}

#[test]
fn fuzz_corpus_jsonl() {
    fuzz("corpus_jsonl", QUICK, check_corpus);
}

#[test]
fn fuzz_corpus_gz() {
    fuzz("corpus_gz", QUICK, check_corpus);
}

#[test]
fn fuzz_sft() {
    fuzz("sft", QUICK, |n, b| check_dataset(n, b, "sft"));
}

#[test]
fn fuzz_preferences() {
    fuzz("preferences", QUICK, |n, b| {
        check_dataset(n, b, "preferences")
    });
}

#[test]
fn fuzz_prompts() {
    fuzz("prompts", QUICK, |n, b| check_dataset(n, b, "prompts"));
}

#[test]
fn fuzz_shard_header() {
    fuzz("shard", QUICK, check_shard);
}

#[test]
fn fuzz_tokenizer_json() {
    fuzz("tokenizer", 40, check_tokenizer);
}

/// The sustained run: `PROPTEST_CASES=N cargo test --release -p kiln-data --test fuzz_readers -- --ignored --nocapture`.
#[test]
#[ignore]
fn fuzz_sustained() {
    let n = harness::cases(0, true);
    let t0 = std::time::Instant::now();
    fuzz("corpus_text", n, check_corpus);
    fuzz("corpus_jsonl", n, check_corpus);
    fuzz("corpus_gz", n, check_corpus);
    fuzz("sft", n, |n, b| check_dataset(n, b, "sft"));
    fuzz("preferences", n, |n, b| check_dataset(n, b, "preferences"));
    fuzz("prompts", n, |n, b| check_dataset(n, b, "prompts"));
    fuzz("shard", n, check_shard);
    fuzz("tokenizer", (n / 10).max(1), check_tokenizer);
    eprintln!(
        "fuzz_sustained: {} executions in {:.0}s",
        harness::EXECS.load(std::sync::atomic::Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
    );
}
