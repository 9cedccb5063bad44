//! Any `tokenizer.json` the `tokenizers` crate loads: GPT-2, Llama 3 and Llama 2 (byte fallback)
//! layouts built in the test; Kiln's ids equal the library's; special-token roles from the model
//! directory's files.

mod common;

#[path = "common/hf.rs"]
mod hf;

use kiln_data::{SpecialOverrides, SpecialTokens, TextStream, Tokenizer};
use proptest::prelude::*;
use std::sync::OnceLock;

struct Layout {
    name: &'static str,
    lib: tokenizers::Tokenizer,
    kiln: Tokenizer,
    _dir: tempfile::TempDir,
}

fn layouts() -> &'static [Layout] {
    static L: OnceLock<Vec<Layout>> = OnceLock::new();
    L.get_or_init(|| {
        let mk = |name, lib: tokenizers::Tokenizer, bos, eos, tpl| {
            let dir = tempfile::tempdir().unwrap();
            hf::write_tokenizer_dir(dir.path(), &lib, bos, eos, None, tpl);
            let kiln = Tokenizer::load_dir(dir.path()).unwrap();
            // The library as transformers uses it: loaded back from the file.
            let lib = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
            Layout {
                name,
                lib,
                kiln,
                _dir: dir,
            }
        };
        vec![
            mk(
                "gpt2",
                hf::gpt2_layout(600),
                None,
                Some("<|endoftext|>"),
                Some(hf::CHATML),
            ),
            mk(
                "llama3",
                hf::llama3_layout(600),
                Some("<|begin_of_text|>"),
                Some("<|end_of_text|>"),
                Some(hf::LLAMA3),
            ),
            mk(
                "llama2",
                hf::llama2_layout(),
                Some("<s>"),
                Some("</s>"),
                Some(hf::LLAMA2),
            ),
        ]
    })
}

fn lib_ids(t: &tokenizers::Tokenizer, text: &str) -> Vec<u32> {
    t.encode(text, false).unwrap().get_ids().to_vec()
}

#[test]
fn roles_are_read_from_the_model_directory() {
    let l = layouts();
    let g = &l[0].kiln;
    assert!(!g.is_kiln());
    let eot = g.token_to_id("<|endoftext|>").unwrap();
    let im_end = g.token_to_id("<|im_end|>").unwrap();
    // GPT-2 layout: the specials come after the learned vocabulary.
    assert!(eot as usize >= 500, "{eot}");
    assert_eq!(g.specials().eos, vec![eot]);
    assert_eq!(g.specials().bos, None);
    assert_eq!(g.specials().pad, None);
    // ChatML's end of turn is found from the template.
    assert_eq!(g.specials().end_of_turn, Some(im_end));
    assert_eq!(g.specials().stop_tokens(), vec![eot, im_end]);
    assert_eq!(g.vocab_size(), im_end as usize + 1);

    let l3 = &l[1].kiln;
    assert_eq!(
        l3.specials().end_of_turn,
        l3.token_to_id("<|eot_id|>"),
        "Llama 3's <|eot_id|> ends a turn"
    );
    assert_eq!(l3.specials().bos, l3.token_to_id("<|begin_of_text|>"));

    let l2 = &l[2].kiln;
    assert_eq!(l2.specials().bos, Some(1));
    assert_eq!(l2.specials().eos, vec![2]);
    assert_eq!(l2.specials().end_of_turn, Some(2));
    assert_eq!(l2.specials().unk, None);
    assert_eq!(l2.specials().strings["eos_token"], "</s>");
}

#[test]
fn generation_config_eos_list_and_config_ids() {
    let dir = tempfile::tempdir().unwrap();
    let lib = hf::llama3_layout(400);
    hf::write_tokenizer_dir(
        dir.path(),
        &lib,
        Some("<|begin_of_text|>"),
        None,
        None,
        None,
    );
    let eot = lib.token_to_id("<|eot_id|>").unwrap();
    let end = lib.token_to_id("<|end_of_text|>").unwrap();
    // No eos_token in tokenizer_config.json: config.json's list is used...
    std::fs::write(
        dir.path().join("config.json"),
        format!(r#"{{"eos_token_id": {end}, "pad_token_id": {end}}}"#),
    )
    .unwrap();
    let t = Tokenizer::load_dir(dir.path()).unwrap();
    assert_eq!(t.specials().eos, vec![end]);
    assert_eq!(t.specials().pad, Some(end));
    assert_eq!(t.specials().strings["eos_token"], "<|end_of_text|>");
    // ...and generation_config.json's list (an int or a list, as Llama 3) wins over config.json.
    std::fs::write(
        dir.path().join("generation_config.json"),
        format!(r#"{{"eos_token_id": [{end}, {eot}]}}"#),
    )
    .unwrap();
    let t = Tokenizer::load_dir(dir.path()).unwrap();
    assert_eq!(t.specials().eos, vec![end, eot]);
    // Flags win over the files.
    let o = SpecialOverrides {
        eos: vec!["<|eot_id|>".into()],
        pad: Some("<|end_of_text|>".into()),
        ..Default::default()
    };
    let t = Tokenizer::load_dir_with(dir.path(), &o).unwrap();
    assert_eq!(t.specials().eos, vec![eot]);
    assert_eq!(t.specials().pad, Some(end));
    let bad = SpecialOverrides {
        eos: vec!["<|nope|>".into()],
        ..Default::default()
    };
    let e = Tokenizer::load_dir_with(dir.path(), &bad).unwrap_err();
    assert!(e.to_string().contains("<|nope|>"), "{e}");
}

#[test]
fn a_tokenizer_without_end_of_sequence_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    hf::write_tokenizer_dir(dir.path(), &hf::gpt2_layout(400), None, None, None, None);
    let e = Tokenizer::load_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("no end-of-sequence token"), "{e}");
    assert!(e.contains("tokenizer.json"), "{e}");
    // A role naming a token the tokenizer does not have.
    hf::write_tokenizer_dir(
        dir.path(),
        &hf::gpt2_layout(400),
        None,
        Some("</s>"),
        None,
        None,
    );
    let e = Tokenizer::load_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("\"</s>\" is not a token"), "{e}");
}

#[test]
fn kiln_tokenizers_keep_their_fixed_ids_and_fast_encoder() {
    let tok = common::tokenizer();
    assert!(tok.is_kiln());
    assert_eq!(tok.specials(), &SpecialTokens::kiln());
    let dir = tempfile::tempdir().unwrap();
    tok.save(&dir.path().join("tokenizer.json")).unwrap();
    let back = Tokenizer::load_dir(dir.path()).unwrap();
    assert!(back.is_kiln());
    assert_eq!(back.fingerprint(), tok.fingerprint());
    // The same tokenizer through the library (as any other tokenizer) gives the same ids as
    // Kiln's fast encoder.
    let lib = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let via_lib = Tokenizer::from_hf(lib, SpecialTokens::kiln()).unwrap();
    assert!(!via_lib.is_kiln());
    let text = hf::training_text();
    assert_eq!(tok.encode(&text), via_lib.encode(&text));
    for doc in common::corpus() {
        assert_eq!(tok.encode(&doc), via_lib.encode(&doc), "{doc:?}");
    }
}

#[test]
fn ids_equal_the_library_on_tinyshakespeare() {
    let Some(path) = hf::shakespeare() else {
        eprintln!("SKIP: tinyshakespeare.txt not present");
        return;
    };
    let text = std::fs::read_to_string(path).unwrap();
    for l in layouts() {
        let ids = l.kiln.encode(&text);
        assert_eq!(ids, lib_ids(&l.lib, &text), "{}", l.name);
        assert!(ids.len() < text.len(), "{}", l.name);
        assert_eq!(l.kiln.decode(&ids), l.lib.decode(&ids, false).unwrap());
    }
}

#[test]
fn trusted_text_parses_specials_plain_text_does_not() {
    for l in layouts() {
        let (open, close) = match l.name {
            "gpt2" => ("<|im_start|>", "<|im_end|>"),
            "llama3" => ("<|start_header_id|>", "<|eot_id|>"),
            _ => ("<s>", "</s>"),
        };
        let text = format!("{open}user\nhello there{close}");
        let trusted = l.kiln.encode_trusted(&text);
        assert_eq!(trusted, lib_ids(&l.lib, &text), "{}", l.name);
        let o = l.kiln.token_to_id(open).unwrap();
        let c = l.kiln.token_to_id(close).unwrap();
        assert!(trusted.contains(&o) && trusted.contains(&c), "{}", l.name);
        // User text cannot forge a special token.
        let plain = l.kiln.encode(&text);
        assert!(!plain.contains(&o) && !plain.contains(&c), "{}", l.name);
    }
}

#[test]
fn byte_fallback_covers_unknown_characters() {
    let t = &layouts()[2].kiln;
    let ids = t.encode("日本 🦀");
    assert!(ids.iter().any(|&i| (3..259).contains(&i)), "{ids:?}");
    assert_eq!(t.decode(&ids), "日本 🦀");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn ids_equal_the_library_on_unicode(s in "\\PC{0,40}", t in "[ a-z\\n]{0,20}\\PC{0,5}") {
        for l in layouts() {
            for text in [&s, &t] {
                let ids = l.kiln.encode(text);
                prop_assert_eq!(&ids, &lib_ids(&l.lib, text), "{}", l.name);
                prop_assert!(ids.iter().all(|&i| (i as usize) < l.kiln.vocab_size()));
                if l.name != "llama2" {
                    // Byte-level: every string round-trips.
                    prop_assert_eq!(&l.kiln.decode(&ids), text);
                }
            }
        }
    }
}

/// Streams `ids` through a [`TextStream`]: every piece is final (the text so far begins the whole
/// list's decode), and once finished the text is that decode. `stable` says the decoder never
/// rewrites text that later ids follow; Llama 2's byte fallback does (`<0x00>` then a lone
/// `<0x80>` decode to two U+FFFD, not `"\0"` and one), and then only the text's validity and the
/// case without U+FFFD are checked.
fn stream_equals_decode(tok: &Tokenizer, ids: &[u32], stable: bool) -> Result<(), TestCaseError> {
    let whole = tok.decode_skip_special(ids);
    let checked = stable || !whole.contains('\u{fffd}');
    let mut st = TextStream::new();
    let mut pieces = String::new();
    for (i, &id) in ids.iter().enumerate() {
        pieces.push_str(st.push(tok, id));
        if checked {
            prop_assert!(
                whole.starts_with(st.text()),
                "after {} ids: {:?} does not begin {:?}",
                i + 1,
                st.text(),
                whole
            );
        }
    }
    pieces.push_str(st.finish(tok));
    prop_assert_eq!(&pieces, st.text());
    if checked {
        prop_assert_eq!(st.text(), &whole);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Streamed text equals decoding every id at once: text with cut characters, and any ids
    /// (specials, lone bytes, leading spaces) of each layout.
    #[test]
    fn a_text_stream_is_the_whole_decode(
        s in "\\PC{0,30}",
        raw in proptest::collection::vec(any::<u32>(), 0..50),
    ) {
        for l in layouts() {
            let v = l.kiln.vocab_size() as u32;
            let stable = l.name != "llama2";
            stream_equals_decode(&l.kiln, &l.kiln.encode(&s), stable)?;
            let ids: Vec<u32> = raw.iter().map(|r| r % v).collect();
            stream_equals_decode(&l.kiln, &ids, stable)?;
        }
    }
}
