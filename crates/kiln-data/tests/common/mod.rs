//! Shared helpers of the kiln-data integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use kiln_data::Tokenizer;

/// A small, varied training corpus (English, code, numbers, non-ASCII, chat markers).
pub fn corpus() -> Vec<String> {
    let mut docs = vec![
        "The quick brown fox jumps over the lazy dog.".to_string(),
        "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
            .to_string(),
        "fn main() { println!(\"hello, world\"); }".to_string(),
        "Numbers 12345 and 3.14159, dates 2024-01-01.".to_string(),
        "Ünïcödé: naïve café, 日本語のテキスト, emoji 🦀🔥, Ελληνικά, русский.".to_string(),
        "<|user|> hi there <|end|><|assistant|> hello! <|end|>".to_string(),
    ];
    for i in 0..40 {
        docs.push(format!(
            "Document {i}: the tokenizer learns merges from repeated words like the, and, of, to."
        ));
    }
    docs
}

/// A tokenizer trained once on [`corpus`] (vocab 400).
pub fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::train_from_texts(corpus(), 400).expect("train"))
}

/// `/work/shared/data` (i.e. `../shared/data` beside the repository), if present.
pub fn shared_data() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    dir.is_dir().then_some(dir)
}

/// Path of a shared data file, or None (and a skip message) when absent.
pub fn shared_file(name: &str) -> Option<PathBuf> {
    let p = shared_data().map(|d| d.join(name)).filter(|p| p.is_file());
    if p.is_none() {
        eprintln!("SKIP: ../shared/data/{name} not present");
    }
    p
}

/// Names of the files in a directory (sorted).
pub fn ls(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
