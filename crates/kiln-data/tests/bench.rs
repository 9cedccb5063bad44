//! Tokenizer benchmark: a quick sanity test, and the tinyshakespeare run
//! (`cargo test --release -p kiln-data --test bench -- --ignored --nocapture`).

mod common;

use kiln_data::bench_tokenizer;

#[test]
fn bench_on_small_corpus() {
    let b = bench_tokenizer(&common::corpus(), 300).unwrap();
    assert!(b.round_trip_ok);
    assert_eq!(b.vocab_size, 300);
    assert!(b.tokens > 0 && b.single_thread_mb_s > 0.0 && b.parallel_mb_s > 0.0);
    assert!(b.to_string().contains("MB/s"));
    assert!(bench_tokenizer(&[String::new()], 300).is_err());
    assert!(bench_tokenizer(&common::corpus(), 100).is_err());
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_tinyshakespeare() {
    let Some(path) = common::shared_file("tinyshakespeare.txt") else {
        return;
    };
    let docs = kiln_data::read_documents(&path, "text").unwrap();
    for vocab in [512, 4096] {
        let b = bench_tokenizer(&docs, vocab).unwrap();
        println!("--- vocab {vocab}\n{b}");
        assert!(b.round_trip_ok);
    }
}
