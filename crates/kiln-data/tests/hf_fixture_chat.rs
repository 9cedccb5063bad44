//! The `llama3_chat` fixture (a Llama 3 instruct directory as transformers saves it;
//! `scripts/make_hf_fixtures.py`): roles from tokenizer_config.json, config.json and
//! generation_config.json (two end-of-sequence ids, as Llama 3 has), and the chat template's ids
//! equal to transformers' `apply_chat_template`, with the loss on the assistant's tokens.

use kiln_data::chat_format::{ChatFormat, JinjaChat};
use kiln_data::datasets::{Message, Role};
use kiln_data::{SpecialOverrides, Tokenizer};
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kiln-model/tests/fixtures/llama3_chat")
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("chat_expected.json")).unwrap())
        .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn roles_come_from_the_model_directory() {
    let e = expected();
    let id = |name: &str| e["specials"][name].as_u64().unwrap() as u32;
    let tok = Tokenizer::load_dir(&fixture()).unwrap();
    assert!(!tok.is_kiln());
    let sp = tok.specials();
    assert_eq!(sp.bos, Some(id("<|begin_of_text|>")));
    // tokenizer_config.json's eos_token first, then generation_config.json's other ids.
    assert_eq!(sp.eos, vec![id("<|eot_id|>"), id("<|end_of_text|>")]);
    assert_eq!(sp.end_of_turn, Some(id("<|eot_id|>")));
    assert_eq!(
        sp.pad, None,
        "Llama 3 has no pad token: batches pad with a masked id"
    );
    assert_eq!(sp.strings["bos_token"], "<|begin_of_text|>");
    assert_eq!(
        tok.vocab_size(),
        e["tokenizer_size"].as_u64().unwrap() as usize
    );
    // Flags win over the files: one end-of-sequence token, or several.
    let o = SpecialOverrides {
        eos: vec!["<|end_of_text|>".into(), "<|eot_id|>".into()],
        ..Default::default()
    };
    let t = Tokenizer::load_dir_with(&fixture(), &o).unwrap();
    assert_eq!(
        t.specials().eos,
        vec![id("<|end_of_text|>"), id("<|eot_id|>")]
    );
    // Without generation_config.json, config.json's list is read.
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "config.json", "chat_template.jinja"] {
        std::fs::copy(fixture().join(f), dir.path().join(f)).unwrap();
    }
    let t = Tokenizer::load_dir(dir.path()).unwrap();
    assert_eq!(
        t.specials().eos,
        vec![id("<|end_of_text|>"), id("<|eot_id|>")]
    );
    assert_eq!(t.specials().bos, Some(id("<|begin_of_text|>")));
}

#[test]
fn the_template_renders_as_transformers_does() {
    let e = expected();
    let tok = Tokenizer::load_dir(&fixture()).unwrap();
    let src = std::fs::read_to_string(fixture().join("chat_template.jinja")).unwrap();
    let chat = JinjaChat::new(&src, tok.clone()).unwrap();
    let msgs: Vec<Message> = e["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            Message::new(
                Role::parse(m["role"].as_str().unwrap()).unwrap(),
                m["content"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(chat.render_text(&msgs, false).unwrap(), e["text"]);
    let r = chat.render(&msgs, false).unwrap();
    assert_eq!(r.tokens, ids(&e["ids"]));
    assert_eq!(
        chat.render_prompt(&msgs[..1]).unwrap(),
        ids(&e["prompt_ids"])
    );
    let trained: Vec<u32> = r
        .tokens
        .iter()
        .zip(&r.loss_mask)
        .filter(|(_, &m)| m)
        .map(|(&t, _)| t)
        .collect();
    assert_eq!(tok.decode(&trained), "The sum is 5.<|eot_id|>");
    assert_eq!(chat.stop_tokens().unwrap(), tok.specials().stop_tokens());
}
