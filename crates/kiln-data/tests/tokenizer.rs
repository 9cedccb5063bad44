//! Tokenizer tests: specials, round trips (property test + tinyshakespeare), save/load, errors.

mod common;

use common::{corpus, shared_file, tokenizer};
use kiln_data::tokenizer::{self, special, MIN_VOCAB_SIZE};
use kiln_data::{Error, Tokenizer};
use proptest::prelude::*;

#[test]
fn specials_have_fixed_ids() {
    let tok = tokenizer();
    assert_eq!(special::NAMES.len() as u32, special::COUNT);
    for (id, name) in special::NAMES.iter().enumerate() {
        assert_eq!(tok.token_to_id(name), Some(id as u32), "{name}");
        assert_eq!(tok.id_to_token(id as u32).as_deref(), Some(*name));
        assert_eq!(tok.decode(&[id as u32]), *name);
        assert_eq!(tok.decode_skip_special(&[id as u32]), "");
    }
    assert_eq!(special::EOT, 0);
    assert_eq!(tok.token_to_id("<|end|>"), Some(special::END));
    assert_eq!(tok.token_to_id("<|assistant|>"), Some(special::ASSISTANT));
}

#[test]
fn vocab_size_and_learned_merges() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 400);
    let text = "the tokenizer learns merges";
    let ids = tok.encode(text);
    assert!(ids.len() < text.len(), "merges should compress: {ids:?}");
    assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
    assert!(ids.iter().all(|&i| !special::is_special(i)));
}

#[test]
fn specials_in_user_text_are_plain_text_and_round_trip() {
    let tok = tokenizer();
    let text = "a<|end|>b <|endoftext|><|user|>";
    let ids = tok.encode(text);
    assert!(ids.iter().all(|&i| !special::is_special(i)), "{ids:?}");
    assert_eq!(tok.decode(&ids), text);
    assert_eq!(tok.decode_skip_special(&ids), text);
    // Explicit specials are kept by decode, dropped by decode_skip_special.
    let mut with = vec![special::USER];
    with.extend(tok.encode("hi"));
    with.push(special::END);
    assert_eq!(tok.decode(&with), "<|user|>hi<|end|>");
    assert_eq!(tok.decode_skip_special(&with), "hi");
    // encode_with_specials maps the exact strings to the special ids.
    let ids = tok.encode_with_specials("<|user|>hi<|end|>x<|end|>");
    assert_eq!(ids[0], special::USER);
    assert_eq!(tok.decode(&ids), "<|user|>hi<|end|>x<|end|>");
    assert_eq!(ids.iter().filter(|&&i| i == special::END).count(), 2);
}

#[test]
fn token_bytes_reassemble_the_text() {
    let tok = tokenizer();
    let text = "naïve 🦀 café\n\tend";
    let ids = tok.encode(text);
    let bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&i| tok.token_bytes(i).unwrap())
        .collect();
    assert_eq!(bytes, text.as_bytes());
    assert_eq!(tok.token_bytes(special::END).unwrap(), b"<|end|>");
    assert_eq!(tok.token_bytes(1_000_000), None);
}

#[test]
fn encode_batch_matches_encode() {
    let tok = tokenizer();
    let docs = corpus();
    let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
    let batch = tok.encode_batch(&refs);
    for (d, ids) in docs.iter().zip(&batch) {
        assert_eq!(&tok.encode(d), ids);
    }
}

#[test]
fn save_load_keeps_fingerprint_and_encoding() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/tokenizer.json");
    tok.save(&path).unwrap();
    assert_eq!(common::ls(&dir.path().join("sub")), vec!["tokenizer.json"]);
    let loaded = Tokenizer::load(&path).unwrap();
    assert_eq!(loaded.fingerprint(), tok.fingerprint());
    assert_eq!(loaded.fingerprint().len(), tokenizer::FINGERPRINT_LEN);
    assert!(loaded.fingerprint().chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(loaded.vocab_size(), tok.vocab_size());
    let text = "hello <|end|> world";
    assert_eq!(loaded.encode(text), tok.encode(text));
    // A tokenizer trained on other text has another fingerprint; retraining is deterministic.
    let other = Tokenizer::train_from_texts(["something else entirely".to_string()], 300).unwrap();
    assert_ne!(other.fingerprint(), tok.fingerprint());
    let again = Tokenizer::train_from_texts(corpus(), 400).unwrap();
    assert_eq!(again.fingerprint(), tok.fingerprint());
}

#[test]
fn save_to_unwritable_path_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plainfile");
    std::fs::write(&file, b"x").unwrap();
    let e = tokenizer().save(&file.join("tokenizer.json")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(e.to_string().contains("plainfile"), "{e}");
    let e = tokenizer().save(dir.path()).unwrap_err().to_string();
    assert!(e.contains("directory"), "{e}");
    assert_eq!(common::ls(dir.path()), vec!["plainfile"]);
}

#[test]
fn tokenizer_is_send_sync_clone() {
    fn check<T: Send + Sync + Clone>() {}
    check::<Tokenizer>();
    let t = tokenizer().clone();
    assert_eq!(t.encode("hi there"), tokenizer().encode("hi there"));
}

#[test]
fn load_rejects_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.json");
    let e = Tokenizer::load(&missing).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("nope.json"));

    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{not json").unwrap();
    let e = Tokenizer::load(&garbage).unwrap_err().to_string();
    assert!(
        e.contains("garbage.json") && e.contains("invalid tokenizer"),
        "{e}"
    );

    // Swap two specials: ids no longer 0..=7 as required.
    let good = dir.path().join("good.json");
    tokenizer().save(&good).unwrap();
    let json = std::fs::read_to_string(&good).unwrap();
    let swapped = json
        .replace("\"<|pad|>\"", "\"@@TMP@@\"")
        .replace("\"<|user|>\"", "\"<|pad|>\"")
        .replace("\"@@TMP@@\"", "\"<|user|>\"");
    let bad = dir.path().join("swapped.json");
    std::fs::write(&bad, swapped).unwrap();
    let e = Tokenizer::load(&bad).unwrap_err().to_string();
    assert!(
        e.contains("swapped.json") && e.contains("<|pad|>") && e.contains("expected 1"),
        "{e}"
    );
}

#[test]
fn vocab_size_too_small_is_an_error() {
    let e = Tokenizer::train_from_texts(["abc".to_string()], MIN_VOCAB_SIZE - 1).unwrap_err();
    assert!(
        matches!(
            e,
            Error::VocabTooSmall {
                requested: 263,
                min: 264
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("264"));
    // 264 works: bytes + specials only, and still round-trips anything.
    let tok = Tokenizer::train_from_texts(["abc abc".to_string()], MIN_VOCAB_SIZE).unwrap();
    assert_eq!(tok.vocab_size(), MIN_VOCAB_SIZE);
    let s = "any text ✓ \u{0}";
    assert_eq!(tok.encode(s).len(), s.len());
    assert_eq!(tok.decode(&tok.encode(s)), s);
}

#[test]
fn no_training_text_is_an_error() {
    let e = Tokenizer::train_from_texts(Vec::<String>::new(), 300).unwrap_err();
    assert!(matches!(e, Error::NoText { .. }), "{e}");
}

#[test]
fn small_corpus_gives_smaller_vocab() {
    let tok = Tokenizer::train_from_texts(["ab ab ab".to_string()], 5000).unwrap();
    assert!(tok.vocab_size() < 5000 && tok.vocab_size() >= MIN_VOCAB_SIZE);
}

#[test]
fn tinyshakespeare_round_trip() {
    let Some(path) = shared_file("tinyshakespeare.txt") else {
        return;
    };
    let text = std::fs::read_to_string(&path).unwrap();
    let docs = kiln_data::read_documents(&path, "text").unwrap();
    assert!(docs.len() > 1000, "{} documents", docs.len());
    // Train on a slice (fast), round-trip the whole file.
    let tok = Tokenizer::train_from_texts(docs.iter().take(2000), 512).unwrap();
    let ids = tok.encode_parallel(&text, 64 * 1024);
    assert_eq!(ids, tok.encode(&text));
    assert_eq!(ids, tok.encode_hf(&text), "fast encoder differs from HF");
    assert_eq!(tok.decode(&ids), text);
    let ratio = text.len() as f64 / ids.len() as f64;
    assert!(ratio > 1.5, "bytes/token {ratio}");
}

fn text_with_specials() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        any::<String>(),
        "\\PC*",
        "[ \n\t]*[a-z' ]{0,12}[ \n\r\t]*",
        prop::sample::select(special::NAMES.to_vec()).prop_map(str::to_string),
        Just("<|".to_string()),
        Just("|>".to_string()),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|v| v.concat())
}

/// A tokenizer with many whitespace merges (" \n", "\n\n", "  ", ...), so that cutting a text in
/// the wrong place visibly changes its tokens.
fn whitespace_tokenizer() -> &'static Tokenizer {
    static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOK.get_or_init(|| {
        let mut docs = Vec::new();
        for i in 0..300 {
            let ws = [" ", "\n", " \n", "\n\n", "  ", "\t", " \n\n", "\r\n", "\n "][i % 9];
            let w = ["a", "ab", "b", "é", "1", "'", "."][i % 7];
            docs.push(format!("{w}{ws}{w}{ws}{ws}b{ws}a.{ws}"));
        }
        Tokenizer::train_from_texts(docs, 600).unwrap()
    })
}

/// A tokenizer with merges for long runs of letters, digits, punctuation and spaces (pieces longer
/// than the fast encoder's rescanning limit go through its heap path).
fn runs_tokenizer() -> &'static Tokenizer {
    static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOK.get_or_init(|| {
        let mut docs = Vec::new();
        for n in 1..120 {
            docs.push(format!(
                "{} {} {} {}{}",
                "a".repeat(n),
                "ab".repeat(n % 40),
                "1".repeat(n % 50),
                ".".repeat(n % 30),
                " ".repeat(n % 20)
            ));
        }
        Tokenizer::train_from_texts(docs, 900).unwrap()
    })
}

fn long_runs() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        (1usize..150).prop_map(|n| "a".repeat(n)),
        (1usize..80).prop_map(|n| "ab".repeat(n)),
        (1usize..120).prop_map(|n| "1".repeat(n)),
        (1usize..100).prop_map(|n| ".".repeat(n)),
        (1usize..100).prop_map(|n| " ".repeat(n)),
        (1usize..60).prop_map(|n| "é".repeat(n)),
        "[ab1. \n']{0,20}",
    ];
    prop::collection::vec(piece, 0..6).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn prop_fast_encoder_matches_hf(s in text_with_specials(), r in long_runs()) {
        for tok in [tokenizer(), whitespace_tokenizer(), runs_tokenizer()] {
            prop_assert_eq!(tok.encode(&s), tok.encode_hf(&s), "{:?}", s);
            prop_assert_eq!(tok.encode(&r), tok.encode_hf(&r), "{:?}", r);
        }
    }

    #[test]
    fn prop_round_trip(s in text_with_specials()) {
        let tok = tokenizer();
        let ids = tok.encode(&s);
        prop_assert_eq!(tok.decode(&ids), s.clone());
        prop_assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
        // Token bytes always reassemble the exact input.
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| tok.token_bytes(i).unwrap()).collect();
        prop_assert_eq!(bytes, s.as_bytes().to_vec());
        let ids = tok.encode_with_specials(&s);
        prop_assert_eq!(tok.decode(&ids), s);
    }

    #[test]
    fn prop_parallel_split_is_exact(
        s in "([ab é1'.\n\t]|\r\n| \n|\n\n){0,200}",
        piece in 1usize..40,
    ) {
        let tok = whitespace_tokenizer();
        let pieces = tokenizer::split_for_parallel(&s, piece);
        prop_assert_eq!(pieces.concat(), s.clone());
        let joined: Vec<u32> = pieces.iter().flat_map(|p| tok.encode(p)).collect();
        prop_assert_eq!(joined, tok.encode(&s));
    }
}
