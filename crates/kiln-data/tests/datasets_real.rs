//! The readers on the real data samples in `../shared/data` (skipped when that folder is absent).

use std::path::PathBuf;

use kiln_data::datasets::{
    load_preferences, load_prompts, load_sft, LoadOptions, Message, PrefRecord, Role,
};
use kiln_data::template::{fit_example, ChatTemplate, TextEncoder};

const STRICT: LoadOptions = LoadOptions::STRICT;
const SKIP: LoadOptions = LoadOptions::SKIP_BAD;

fn data_file(name: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    let path = dir.join(name);
    if path.is_file() {
        Some(path)
    } else {
        println!(
            "skipping: {} not found (the shared data folder is absent)",
            path.display()
        );
        None
    }
}

struct ByteEnc;
impl TextEncoder for ByteEnc {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(|b| 100 + b as u32).collect()
    }
}

#[test]
fn alpaca_tiny() {
    let Some(path) = data_file("alpaca_tiny.json") else {
        return;
    };
    let l = load_sft(&path, &STRICT).unwrap();
    assert_eq!(l.records.len(), 100);
    assert_eq!(l.skipped, 0);
    let first = &l.records[0];
    assert_eq!(
        first.messages[0],
        Message::user("Give three tips for staying healthy.")
    );
    assert_eq!(first.messages[1].role, Role::Assistant);
    assert!(first.messages[1]
        .content
        .starts_with("1.Eat a balanced diet"));
    // Records with a non-empty input use instruction + "\n\n" + input.
    let raw: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut with_input = 0;
    for (rec, conv) in raw.iter().zip(&l.records) {
        let ins = rec["instruction"].as_str().unwrap();
        let input = rec["input"].as_str().unwrap_or("");
        let want = if input.is_empty() {
            ins.to_string()
        } else {
            with_input += 1;
            format!("{ins}\n\n{input}")
        };
        assert_eq!(conv.messages[0].content, want);
        assert_eq!(conv.messages[1].content, rec["output"].as_str().unwrap());
    }
    assert!(with_input > 0);

    // Every example renders; loss tokens = output bytes + END.
    let t = ChatTemplate::default();
    for conv in &l.records {
        let r = t.render_conversation(&ByteEnc, conv).unwrap();
        assert_eq!(r.num_targets(), conv.messages[1].content.len() + 1);
        if let Some(f) = fit_example(&r, 256) {
            assert!(f.len() <= 256);
            assert_eq!(f.num_targets(), r.num_targets());
        }
    }

    let prompts = load_prompts(&path, &STRICT).unwrap();
    assert_eq!(prompts.records.len(), 100);
    assert_eq!(
        prompts.records[0].raw,
        "Give three tips for staying healthy."
    );
}

#[test]
fn chat_tiny_sharegpt() {
    let Some(path) = data_file("chat_tiny.json") else {
        return;
    };
    let l = load_sft(&path, &STRICT).unwrap();
    assert_eq!(l.records.len(), 1);
    assert_eq!(
        l.records[0].messages,
        vec![
            Message::system("You are an AI assistant."),
            Message::user("What is the meaning of life?"),
            Message::assistant("The meaning of life is 42."),
            Message::user("That's ridiculous."),
            Message::assistant("I agree."),
        ]
    );
    let r = ChatTemplate::default()
        .render_conversation(&ByteEnc, &l.records[0])
        .unwrap();
    assert_eq!(
        r.num_targets(),
        "The meaning of life is 42.".len() + 1 + "I agree.".len() + 1
    );
}

#[test]
fn hh_rlhf_tiny_message_lists() {
    let Some(path) = data_file("hh_rlhf_tiny.json") else {
        return;
    };
    let l = load_preferences(&path, &STRICT).unwrap();
    assert_eq!(l.records.len(), 1);
    let PrefRecord::Ranked(r) = &l.records[0] else {
        panic!("expected Ranked");
    };
    assert_eq!(
        r.prompt,
        vec![Message::user(
            "What do I do when I have a hole in my trousers?"
        )]
    );
    assert_eq!(
        r.choices,
        vec![
            ("Fix the hole.".to_string(), 1),
            ("Take them off.".to_string(), 2)
        ]
    );
}

#[test]
fn hh_rlhf_harmless_base_test_gz() {
    let Some(path) = data_file("hh_rlhf_harmless_base_test.jsonl.gz") else {
        return;
    };
    let l = load_preferences(&path, &SKIP).unwrap();
    println!(
        "hh-rlhf harmless-base test: {} pairs, {} skipped, first error: {:?}",
        l.records.len(),
        l.skipped,
        l.first_error
    );
    assert_eq!(l.records.len() + l.skipped, 2312);
    // Consecutive assistant turns are merged, so every record shares a prompt; the only bad
    // records are 4 whose chosen response is empty (lines 87, 517, 926, 1104).
    assert_eq!(l.skipped, 4, "{:?}", l.first_error);
    let first_error = l.first_error.as_deref().unwrap();
    assert!(
        first_error
            .ends_with("hh_rlhf_harmless_base_test.jsonl.gz:87: field \"chosen\": empty response"),
        "{first_error}"
    );
    let msg = load_preferences(&path, &STRICT).unwrap_err().to_string();
    assert_eq!(msg, first_error);
    for rec in &l.records {
        let PrefRecord::Ranked(r) = rec else {
            panic!("expected Ranked");
        };
        assert_eq!(r.choices.len(), 2);
        assert_eq!((r.choices[0].1, r.choices[1].1), (1, 2));
        assert_ne!(r.choices[0].0, r.choices[1].0);
        assert!(!r.choices[0].0.trim().is_empty() && !r.choices[1].0.trim().is_empty());
        assert_eq!(r.prompt.last().unwrap().role, Role::User);
        assert_eq!(r.prompt[0].role, Role::User);
        // Turns alternate after merging.
        for w in r.prompt.windows(2) {
            assert_ne!(w[0].role, w[1].role);
        }
    }
    let PrefRecord::Ranked(first) = &l.records[0] else {
        unreachable!()
    };
    assert_eq!(
        first.prompt[0],
        Message::user("what are some pranks with a pen i can do?")
    );
    assert_eq!(
        first.prompt[1],
        Message::assistant("Are you looking for practical joke ideas?")
    );
}

#[test]
fn stack_exchange_paired_tiny() {
    let Some(path) = data_file("stack_exchange_paired_tiny.json") else {
        return;
    };
    let l = load_preferences(&path, &STRICT).unwrap();
    assert_eq!(l.records.len(), 25);
    let raw: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (rec, pref) in raw.iter().zip(&l.records) {
        let PrefRecord::Ranked(r) = pref else {
            panic!("expected Ranked");
        };
        assert_eq!(
            r.prompt,
            vec![Message::user(rec["question"].as_str().unwrap())]
        );
        assert_eq!(
            r.choices[0],
            (rec["response_j"].as_str().unwrap().into(), 1)
        );
        assert_eq!(
            r.choices[1],
            (rec["response_k"].as_str().unwrap().into(), 2)
        );
        assert_eq!(r.pairs(), vec![(0, 1)]);
    }
}

#[test]
fn alpaca_seed_tasks_are_not_sft_records() {
    // Seed tasks keep their input/output in "instances": not an Alpaca record; the error names it.
    let Some(path) = data_file("alpaca_seed_tasks.jsonl") else {
        return;
    };
    let msg = load_sft(&path, &STRICT).unwrap_err().to_string();
    assert!(
        msg.contains("alpaca_seed_tasks.jsonl:1: field \"output\": missing"),
        "{msg}"
    );
    // As prompts they work (instruction only).
    let p = load_prompts(&path, &STRICT).unwrap();
    assert_eq!(p.records.len(), 175);
}
