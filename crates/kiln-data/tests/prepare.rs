//! Corpus preparation: exact token streams, deterministic disjoint splits, sharding, failures.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use kiln_data::prepare::{split_hash, Split, META_FILE};
use kiln_data::{prepare, special, PrepareMeta, ShardSet, Tokenizer};

fn docs_corpus(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "Document number {i}.\nIt has two lines, and word{} here.",
                i * 7 % 13
            )
        })
        .collect()
}

fn write_txt(dir: &Path, name: &str, docs: &[String]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, docs.join("\n\n")).unwrap();
    p
}

/// Splits a token stream at EOT and decodes each document.
fn stream_docs(tok: &Tokenizer, set: &ShardSet) -> Vec<String> {
    let mut all = vec![0; set.len()];
    set.read(0, &mut all);
    if all.is_empty() {
        return vec![];
    }
    assert_eq!(all[0], special::EOT, "stream must start with EOT");
    all[1..]
        .split(|&t| t == special::EOT)
        .map(|ids| tok.decode(ids))
        .collect()
}

#[test]
fn shards_hold_eot_plus_tokens_of_each_document() {
    let tok = common::tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    let docs = docs_corpus(30);
    write_txt(&inputs, "a.txt", &docs[..20]);
    let jsonl: String = docs[20..]
        .iter()
        .map(|d| serde_json::json!({ "text": d }).to_string() + "\n")
        .collect();
    std::fs::write(inputs.join("b.jsonl"), jsonl).unwrap();
    let out = dir.path().join("out");
    let stats = prepare(
        tok,
        std::slice::from_ref(&inputs),
        "text",
        &out,
        0.2,
        7,
        1_000_000,
        false,
    )
    .unwrap();
    assert_eq!(
        common::ls(&out),
        vec!["meta.json", "train_000.bin", "val_000.bin"]
    );

    let split = Split::new(7, 30, 0.2).unwrap();
    let (mut want_train, mut want_val) = (Vec::new(), Vec::new());
    for (i, d) in docs.iter().enumerate() {
        let target = if split.is_val(i as u64) {
            &mut want_val
        } else {
            &mut want_train
        };
        target.push(special::EOT);
        target.extend(tok.encode(d));
    }
    let train = ShardSet::open_dir(&out, "train").unwrap();
    let val = ShardSet::open_dir(&out, "val").unwrap();
    let read_all = |s: &ShardSet| {
        let mut v = vec![0; s.len()];
        s.read(0, &mut v);
        v
    };
    assert_eq!(read_all(&train), want_train);
    assert_eq!(read_all(&val), want_val);
    assert!(!want_val.is_empty());
    train.check_fingerprint(tok.fingerprint()).unwrap();
    assert_eq!(train.vocab_size(), tok.vocab_size());

    assert_eq!(stats.documents, 30);
    assert_eq!(stats.train_documents + stats.val_documents, 30);
    assert_eq!(stats.train_tokens as usize, want_train.len());
    assert_eq!(stats.val_tokens as usize, want_val.len());
    assert_eq!(
        stats.bytes as usize,
        docs.iter().map(String::len).sum::<usize>()
    );
    assert!(stats.seconds > 0.0 && stats.mb_per_sec() > 0.0);
    let shown = stats.to_string();
    assert!(
        shown.contains("documents: 30") && shown.contains("MB/s"),
        "{shown}"
    );

    let meta = PrepareMeta::load(&out).unwrap();
    assert_eq!(meta.tokenizer_fingerprint, tok.fingerprint());
    assert_eq!(meta.vocab_size, tok.vocab_size());
    assert_eq!(meta.token_width, 2);
    assert_eq!((meta.seed, meta.val_fraction), (7, 0.2));
    assert_eq!(meta.train_tokens, stats.train_tokens);
    assert_eq!(meta.train_shards, vec!["train_000.bin"]);
    assert_eq!(meta.inputs.len(), 2);
    assert!(meta.inputs[0].ends_with("a.txt") && meta.inputs[1].ends_with("b.jsonl"));
}

#[test]
fn small_shards_split_the_stream() {
    let tok = common::tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let input = write_txt(dir.path(), "c.txt", &docs_corpus(40));
    let out = dir.path().join("out");
    let stats = prepare(
        tok,
        std::slice::from_ref(&input),
        "text",
        &out,
        0.1,
        0,
        64,
        false,
    )
    .unwrap();
    let train = ShardSet::open_dir(&out, "train").unwrap();
    assert_eq!(train.shards().len(), stats.train_shards);
    assert!(stats.train_shards > 5);
    let n = train.shards().len();
    for s in &train.shards()[..n - 1] {
        assert_eq!(s.len(), 64);
    }
    // Same stream as one big shard.
    let out2 = dir.path().join("out2");
    prepare(
        tok,
        std::slice::from_ref(&input),
        "text",
        &out2,
        0.1,
        0,
        1 << 20,
        false,
    )
    .unwrap();
    let one = ShardSet::open_dir(&out2, "train").unwrap();
    assert_eq!(one.shards().len(), 1);
    let (mut a, mut b) = (vec![0; train.len()], vec![0; one.len()]);
    train.read(0, &mut a);
    one.read(0, &mut b);
    assert_eq!(a, b);

    // Re-preparing into the same dir with bigger shards removes the stale extra shards.
    prepare(tok, &[input], "text", &out, 0.1, 0, 1 << 20, false).unwrap();
    assert_eq!(
        common::ls(&out),
        vec!["meta.json", "train_000.bin", "val_000.bin"]
    );
}

#[test]
fn val_split_is_disjoint_and_deterministic() {
    let tok = common::tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let docs = docs_corpus(200);
    let input = write_txt(dir.path(), "c.txt", &docs);
    let run = |seed: u64, name: &str| {
        let out = dir.path().join(name);
        prepare(
            tok,
            std::slice::from_ref(&input),
            "text",
            &out,
            0.2,
            seed,
            1 << 20,
            false,
        )
        .unwrap();
        let train = stream_docs(tok, &ShardSet::open_dir(&out, "train").unwrap());
        let val = stream_docs(tok, &ShardSet::open_dir(&out, "val").unwrap());
        (out, train, val)
    };
    let (out_a, train_a, val_a) = run(1, "a");
    let (out_b, train_b, val_b) = run(1, "b");
    let (_, _, val_c) = run(2, "c");

    let train_set: BTreeSet<&String> = train_a.iter().collect();
    let val_set: BTreeSet<&String> = val_a.iter().collect();
    assert!(train_set.is_disjoint(&val_set));
    assert_eq!(train_a.len() + val_a.len(), docs.len());
    let all: BTreeSet<&String> = docs.iter().collect();
    assert_eq!(
        train_set.union(&val_set).copied().collect::<BTreeSet<_>>(),
        all
    );
    // Roughly the requested fraction.
    assert!((20..=60).contains(&val_a.len()), "{} val docs", val_a.len());

    // Same seed: the same split and byte-identical files.
    assert_eq!((train_a, val_a.clone()), (train_b, val_b));
    for f in ["train_000.bin", "val_000.bin"] {
        assert_eq!(
            std::fs::read(out_a.join(f)).unwrap(),
            std::fs::read(out_b.join(f)).unwrap()
        );
    }
    // Another seed: another split.
    assert_ne!(val_a, val_c);
}

#[test]
fn split_guarantees() {
    // At least one val doc when fraction > 0 and >= 2 docs.
    for seed in 0..50 {
        let s = Split::new(seed, 2, 1e-9).unwrap();
        assert_eq!((0..2).filter(|&i| s.is_val(i)).count(), 1);
        // At least one train doc.
        let s = Split::new(seed, 3, 0.999_999).unwrap();
        assert_eq!((0..3).filter(|&i| !s.is_val(i)).count(), 1);
    }
    let s = Split::new(0, 1, 0.5).unwrap();
    assert!(!s.is_val(0) || split_hash(0, 0) < 0.5);
    let s = Split::new(0, 100, 0.0).unwrap();
    assert!((0..100).all(|i| !s.is_val(i)));
    assert!(Split::new(0, 10, 1.0).is_err());
    assert!(Split::new(0, 10, -0.1).is_err());
    assert!(Split::new(0, 10, f64::NAN).is_err());
}

#[test]
fn tiny_corpora_and_zero_fraction() {
    let tok = common::tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let two = write_txt(dir.path(), "two.txt", &docs_corpus(2));
    let stats = prepare(
        tok,
        &[two],
        "text",
        &dir.path().join("o2"),
        0.001,
        3,
        100,
        false,
    )
    .unwrap();
    assert_eq!((stats.train_documents, stats.val_documents), (1, 1));

    let many = write_txt(dir.path(), "many.txt", &docs_corpus(20));
    let out = dir.path().join("o0");
    let stats = prepare(tok, &[many], "text", &out, 0.0, 3, 100, false).unwrap();
    assert_eq!(stats.val_documents, 0);
    let val = ShardSet::open_dir(&out, "val").unwrap();
    assert!(val.is_empty(), "val split exists but is empty");
}

#[test]
fn failures_leave_the_output_untouched() {
    let tok = common::tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let good = write_txt(dir.path(), "good.txt", &docs_corpus(10));
    let out = dir.path().join("out");
    prepare(
        tok,
        std::slice::from_ref(&good),
        "text",
        &out,
        0.1,
        0,
        1000,
        false,
    )
    .unwrap();
    let before: Vec<(String, Vec<u8>)> = common::ls(&out)
        .into_iter()
        .map(|f| (f.clone(), std::fs::read(out.join(&f)).unwrap()))
        .collect();

    // Malformed JSONL after a good file: error names file and line, nothing changes.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{oops}\n").unwrap();
    let e = prepare(tok, &[good.clone(), bad], "text", &out, 0.5, 9, 5, false).unwrap_err();
    assert!(e.to_string().contains("bad.jsonl:2"), "{e}");
    let after: Vec<(String, Vec<u8>)> = common::ls(&out)
        .into_iter()
        .map(|f| (f.clone(), std::fs::read(out.join(&f)).unwrap()))
        .collect();
    assert_eq!(before, after);

    // Invalid UTF-8.
    let bin = dir.path().join("bin.txt");
    std::fs::write(&bin, b"hello\n\xff\xfe\n").unwrap();
    let e = prepare(tok, &[bin], "text", &out, 0.5, 9, 5, false).unwrap_err();
    assert!(e.to_string().contains("bin.txt:2"), "{e}");

    // Missing input.
    let e = prepare(
        tok,
        &[dir.path().join("nope.txt")],
        "text",
        &out,
        0.1,
        0,
        5,
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("nope.txt"), "{e}");

    // Output directory under a regular file.
    let e = prepare(
        tok,
        std::slice::from_ref(&good),
        "text",
        &good.join("out"),
        0.1,
        0,
        5,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("good.txt") && e.contains("output directory"),
        "{e}"
    );

    // Bad arguments.
    assert!(prepare(
        tok,
        std::slice::from_ref(&good),
        "text",
        &out,
        1.0,
        0,
        5,
        false
    )
    .is_err());
    assert!(prepare(tok, &[good], "text", &out, 0.1, 0, 0, false).is_err());
    assert_eq!(
        common::ls(&out),
        before.iter().map(|(f, _)| f.clone()).collect::<Vec<_>>()
    );
    assert!(common::ls(&out).iter().all(|f| !f.ends_with(".tmp")));
    assert!(out.join(META_FILE).is_file());
}

#[test]
fn tinyshakespeare_prepare() {
    let Some(path) = common::shared_file("tinyshakespeare.txt") else {
        return;
    };
    let docs = kiln_data::read_documents(&path, "text").unwrap();
    let tok = Tokenizer::train_from_texts(docs.iter().take(1000), 512).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stats = prepare(
        &tok,
        std::slice::from_ref(&path),
        "text",
        dir.path(),
        0.01,
        0,
        200_000,
        false,
    )
    .unwrap();
    eprintln!("{stats}");
    assert_eq!(stats.documents as usize, docs.len());
    assert!(stats.train_shards > 1);
    let train = stream_docs(&tok, &ShardSet::open_dir(dir.path(), "train").unwrap());
    let val = stream_docs(&tok, &ShardSet::open_dir(dir.path(), "val").unwrap());
    assert!(!val.is_empty());
    let mut got: Vec<String> = train.into_iter().chain(val).collect();
    let mut want = docs;
    got.sort();
    want.sort();
    assert_eq!(got, want);
}
