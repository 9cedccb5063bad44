//! Chat template rendering, loss masks, fitting, collation and packing.

use kiln_data::datasets::{Conversation, Message};
use kiln_data::template::{
    collate, fit_example, ids, pack, ChatTemplate, Rendered, TemplateError, TextEncoder, IGNORE,
};
use proptest::prelude::*;

/// One id per byte: id = 100 + byte.
struct ByteEnc;
impl TextEncoder for ByteEnc {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(|b| 100 + b as u32).collect()
    }
}

fn c(ch: char) -> u32 {
    100 + ch as u32
}

const S: u32 = ids::SYSTEM;
const U: u32 = ids::USER;
const A: u32 = ids::ASSISTANT;
const E: u32 = ids::END;

fn conv(messages: Vec<Message>) -> Conversation {
    Conversation { messages }
}

#[test]
fn special_ids_are_fixed() {
    assert_eq!(
        [
            ids::EOT,
            ids::PAD,
            ids::SYSTEM,
            ids::USER,
            ids::ASSISTANT,
            ids::END,
            ids::MASK,
            ids::SEP
        ],
        [0, 1, 2, 3, 4, 5, 6, 7]
    );
    // Template names agree with the tokenizer's token strings.
    for (name, id) in ids::ALL {
        assert_eq!(
            kiln_data::tokenizer::special::NAMES[id as usize],
            format!("<|{name}|>")
        );
        assert_eq!(ids::by_name(name), Some(id));
    }
    assert_eq!(ids::by_name("bogus"), None);
}

#[test]
fn alpaca_example_token_by_token() {
    // Alpaca {"instruction": "Add", "input": "1 2", "output": "3"} as loaded by load_sft.
    let conv = conv(vec![Message::user("Add\n\n1 2"), Message::assistant("3")]);
    let r = ChatTemplate::default()
        .render_conversation(&ByteEnc, &conv)
        .unwrap();
    let expected_tokens = vec![
        U,
        c('A'),
        c('d'),
        c('d'),
        c('\n'),
        c('\n'),
        c('1'),
        c(' '),
        c('2'),
        E,
        A,
        c('3'),
        E,
    ];
    let expected_mask = vec![
        false, false, false, false, false, false, false, false, false,
        false, // [USER] .. [END]
        false, // [ASSISTANT]
        true,  // "3"
        true,  // [END] of the assistant turn
    ];
    assert_eq!(r.tokens, expected_tokens);
    assert_eq!(r.loss_mask, expected_mask);
    assert_eq!(r.num_targets(), 2);
    // No EOT appended.
    assert_ne!(*r.tokens.last().unwrap(), ids::EOT);
}

#[test]
fn multi_turn_chat_token_by_token() {
    let conv = conv(vec![
        Message::system("S"),
        Message::user("a"),
        Message::assistant("bc"),
        Message::user("d"),
        Message::assistant("e"),
    ]);
    let r = ChatTemplate::default()
        .render_conversation(&ByteEnc, &conv)
        .unwrap();
    #[rustfmt::skip]
    let expected_tokens = vec![
        S, c('S'), E,
        U, c('a'), E,
        A, c('b'), c('c'), E,
        U, c('d'), E,
        A, c('e'), E,
    ];
    #[rustfmt::skip]
    let expected_mask = vec![
        false, false, false,
        false, false, false,
        false, true, true, true, // both assistant content tokens and its END
        false, false, false,     // user END carries no loss
        false, true, true,
    ];
    assert_eq!(r.tokens, expected_tokens);
    assert_eq!(r.loss_mask, expected_mask);
}

#[test]
fn prompt_plus_response_equals_conversation() {
    let t = ChatTemplate::default();
    let prompt = vec![
        Message::system("sys"),
        Message::user("q1"),
        Message::assistant("a1"),
        Message::user("q2"),
    ];
    let p = t.render_prompt(&ByteEnc, &prompt).unwrap();
    assert_eq!(*p.last().unwrap(), A, "prompt ends with [ASSISTANT]");
    let r = t.render_response(&ByteEnc, "a2").unwrap();
    assert_eq!(r, vec![c('a'), c('2'), E]);
    let mut full = prompt.clone();
    full.push(Message::assistant("a2"));
    let whole = t.render_conversation(&ByteEnc, &conv(full)).unwrap();
    let joined: Vec<u32> = p.iter().chain(&r).copied().collect();
    assert_eq!(whole.tokens, joined);

    let pr = t.render_prompt_response(&ByteEnc, &prompt, "a2").unwrap();
    assert_eq!(pr.tokens, joined);
    let mut mask = vec![false; p.len()];
    mask.extend([true, true, true]);
    assert_eq!(pr.loss_mask, mask, "only the final response carries loss");
}

#[test]
fn custom_template_with_text_and_json_roundtrip() {
    let t = ChatTemplate {
        system: "<|system|>{content}<|end|>".into(),
        user: "<|user|>\n{content}<|end|>".into(),
        assistant: "<|assistant|>{content}<|end|>\n".into(),
    };
    let r = t
        .render_conversation(
            &ByteEnc,
            &conv(vec![Message::user("q"), Message::assistant("r")]),
        )
        .unwrap();
    assert_eq!(r.tokens, vec![U, c('\n'), c('q'), E, A, c('r'), E, c('\n')]);
    assert_eq!(
        r.loss_mask,
        vec![false, false, false, false, false, true, true, true]
    );
    let back = ChatTemplate::from_json(&t.to_json()).unwrap();
    assert_eq!(back, t);
    assert_eq!(t.stop_tokens().unwrap(), vec![E, ids::EOT]);
    let d = ChatTemplate::from_json(&ChatTemplate::default().to_json()).unwrap();
    assert_eq!(d, ChatTemplate::default());
}

#[test]
fn template_without_response_slot_is_a_clear_error() {
    let t = ChatTemplate {
        assistant: "<|assistant|><|end|>".into(),
        ..ChatTemplate::default()
    };
    let err = t.validate().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("\"assistant\""), "{msg}");
    assert!(msg.contains("{content}"), "{msg}");
    assert!(msg.contains("response slot"), "{msg}");
    assert!(matches!(err, TemplateError::Invalid { .. }));
    let conv = conv(vec![Message::user("q"), Message::assistant("r")]);
    assert!(t.render_conversation(&ByteEnc, &conv).is_err());
    assert!(t.render_prompt(&ByteEnc, &conv.messages).is_err());
    assert!(t.render_response(&ByteEnc, "r").is_err());

    let json = r#"{"system":"<|system|>{content}<|end|>","user":"<|user|>{content}<|end|>","assistant":"<|assistant|>"}"#;
    let msg = ChatTemplate::from_json(json).unwrap_err().to_string();
    assert!(msg.contains("response slot"), "{msg}");

    for (bad, needle) in [
        ("<|assistant|>{content}", "end-of-turn"),
        ("<|assistant|>{content}{content}<|end|>", "more than once"),
        (
            "<|assistant|>{content}<|ed|>",
            "unknown special token <|ed|>",
        ),
        ("<|assistant|>{content}<|end", "unterminated"),
    ] {
        let t = ChatTemplate {
            assistant: bad.into(),
            ..ChatTemplate::default()
        };
        let msg = t.validate().unwrap_err().to_string();
        assert!(msg.contains(needle), "{bad}: {msg}");
    }
    let t = ChatTemplate {
        user: "<|user|>".into(),
        ..ChatTemplate::default()
    };
    assert!(t.validate().unwrap_err().to_string().contains("\"user\""));
    assert!(ChatTemplate::from_json(r#"{"system":"x"}"#).is_err());
}

#[test]
fn conversation_without_assistant_turn_is_an_error() {
    let err = ChatTemplate::default()
        .render_conversation(&ByteEnc, &conv(vec![Message::user("q")]))
        .unwrap_err();
    assert!(err.to_string().contains("no assistant turn"), "{err}");
}

fn rendered(tokens: &[u32], mask: &[u8]) -> Rendered {
    assert_eq!(tokens.len(), mask.len());
    Rendered {
        tokens: tokens.to_vec(),
        loss_mask: mask.iter().map(|&m| m == 1).collect(),
    }
}

#[test]
fn collate_pads_and_aligns_targets() {
    let a = rendered(&[U, 10, E, A, 20, 21, E], &[0, 0, 0, 0, 1, 1, 1]);
    let b = rendered(&[U, 11, E, A, 30, E], &[0, 0, 0, 0, 1, 1]);
    let batch = collate(&[a, b], 9);
    assert_eq!((batch.b, batch.t), (2, 9));
    let m = IGNORE;
    let p = ids::PAD;
    assert_eq!(
        batch.tokens,
        vec![U, 10, E, A, 20, 21, E, p, p, U, 11, E, A, 30, E, p, p, p]
    );
    // Position i predicts token i+1 where token i+1 is a target.
    assert_eq!(
        batch.targets,
        vec![m, m, m, 20, 21, E, m, m, m, m, m, m, 30, E, m, m, m, m]
    );
    let v: Vec<bool> = [1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]
        .iter()
        .map(|&x| x == 1)
        .collect();
    assert_eq!(batch.valid, v);
    for i in 0..batch.tokens.len() {
        if !batch.valid[i] {
            assert_eq!(batch.targets[i], IGNORE, "padding {i} carries loss");
            assert_eq!(batch.tokens[i], ids::PAD);
        }
    }
    assert!(batch.segments.iter().all(|&s| s == 0));
    assert_eq!(batch.positions[..9], [0, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(batch.num_targets(), 5);
    let second = batch.slice_rows(1, 2);
    assert_eq!(second.b, 1);
    assert_eq!(second.tokens, batch.tokens[9..]);
}

#[test]
#[should_panic(expected = "fit_example")]
fn collate_rejects_too_long_examples() {
    let a = rendered(&[U, 10, E, A, 20, E], &[0, 0, 0, 0, 1, 1]);
    collate(&[a], 5);
}

#[test]
fn fit_example_keeps_response_and_drops_prompt_start() {
    let t = ChatTemplate::default();
    let conv = conv(vec![Message::user("abcdefgh"), Message::assistant("xyz")]);
    let r = t.render_conversation(&ByteEnc, &conv).unwrap();
    // [U] a b c d e f g h [E] [A] x y z [E]  = 15 tokens
    assert_eq!(r.len(), 15);
    assert_eq!(fit_example(&r, 15).unwrap(), r);
    assert_eq!(fit_example(&r, 100).unwrap(), r);

    let f = fit_example(&r, 8).unwrap();
    assert_eq!(
        f.tokens,
        vec![c('g'), c('h'), E, A, c('x'), c('y'), c('z'), E]
    );
    assert_eq!(
        f.loss_mask,
        vec![false, false, false, false, true, true, true, true]
    );
    // The response (4 tokens) plus one prompt token is the minimum.
    let f = fit_example(&r, 5).unwrap();
    assert_eq!(f.tokens, vec![A, c('x'), c('y'), c('z'), E]);
    assert!(
        fit_example(&r, 4).is_none(),
        "response alone leaves no prompt token"
    );
    assert!(fit_example(&r, 2).is_none(), "response does not fit");
    // No target at all.
    assert!(fit_example(&rendered(&[1, 2, 3], &[0, 0, 0]), 2).is_none());
}

#[test]
fn fit_example_multi_turn_keeps_only_last_response_whole() {
    let t = ChatTemplate::default();
    let conv = conv(vec![
        Message::user("a"),
        Message::assistant("bb"),
        Message::user("c"),
        Message::assistant("dd"),
    ]);
    let r = t.render_conversation(&ByteEnc, &conv).unwrap();
    // [U] a [E] [A] b b [E] [U] c [E] [A] d d [E] = 14
    let f = fit_example(&r, 9).unwrap();
    assert_eq!(
        f.tokens,
        vec![c('b'), E, U, c('c'), E, A, c('d'), c('d'), E]
    );
    assert_eq!(
        f.loss_mask,
        vec![true, true, false, false, false, false, true, true, true]
    );
}

#[test]
fn pack_separates_segments() {
    let a = rendered(&[U, 10, A, 20, E], &[0, 0, 0, 1, 1]);
    let b = rendered(&[U, 11, A, 30, E], &[0, 0, 0, 1, 1]);
    let d = rendered(&[U, 12, A, 40, 41, 42, E], &[0, 0, 0, 1, 1, 1, 1]);
    let batch = pack(&[a, b, d], 12);
    // a + b share row 0 (10 tokens), d (7) opens row 1.
    assert_eq!(batch.b, 2);
    let m = IGNORE;
    let p = ids::PAD;
    assert_eq!(batch.tokens[..12], [U, 10, A, 20, E, U, 11, A, 30, E, p, p]);
    assert_eq!(batch.targets[..12], [m, m, 20, E, m, m, m, 30, E, m, m, m]);
    assert_eq!(batch.segments[..12], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2]);
    assert_eq!(batch.positions[..12], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]);
    assert_eq!(batch.valid[10..12], [false, false]);
    assert_eq!(batch.tokens[12..19], [U, 12, A, 40, 41, 42, E]);
    assert_eq!(batch.num_targets(), 8);
}

proptest! {
    #[test]
    fn pack_and_collate_keep_every_target(
        exs in proptest::collection::vec(
            proptest::collection::vec((8u32..500, any::<bool>()), 1..12), 0..20),
        extra in 0usize..5,
    ) {
        let examples: Vec<Rendered> = exs.iter().map(|e| Rendered {
            tokens: e.iter().map(|x| x.0).collect(),
            loss_mask: e.iter().map(|x| x.1).collect(),
        }).collect();
        let t = 12 + extra;
        // Targets an example contributes: tokens j>=1 with loss.
        let want: usize = examples.iter()
            .map(|e| e.loss_mask.iter().skip(1).filter(|&&m| m).count()).sum();
        for batch in [collate(&examples, t), pack(&examples, t)] {
            prop_assert_eq!(batch.tokens.len(), batch.b * batch.t);
            prop_assert_eq!(batch.num_targets(), want);
            for i in 0..batch.tokens.len() {
                if batch.targets[i] != IGNORE {
                    // Target is the next token, in the same row and segment, and real.
                    prop_assert!(batch.valid[i]);
                    prop_assert!((i + 1) % t != 0);
                    prop_assert!(batch.valid[i + 1]);
                    prop_assert_eq!(batch.segments[i], batch.segments[i + 1]);
                    prop_assert_eq!(batch.targets[i], batch.tokens[i + 1]);
                    prop_assert_eq!(batch.positions[i] + 1, batch.positions[i + 1]);
                } else if !batch.valid[i] {
                    prop_assert_eq!(batch.tokens[i], ids::PAD);
                }
            }
        }
    }

    #[test]
    fn fit_example_properties(
        prompt_len in 1usize..30, resp_len in 0usize..10, max_len in 1usize..40,
    ) {
        let t = ChatTemplate::default();
        let conv = Conversation { messages: vec![
            Message::user("p".repeat(prompt_len)),
            Message::assistant("r".repeat(resp_len.max(1))),
        ]};
        let r = t.render_conversation(&ByteEnc, &conv).unwrap();
        let resp = resp_len.max(1) + 1;
        match fit_example(&r, max_len) {
            Some(f) => {
                prop_assert!(f.len() <= max_len);
                prop_assert!(f.len() > resp);
                prop_assert_eq!(&f.tokens[..], &r.tokens[r.len() - f.len()..]);
                prop_assert_eq!(f.num_targets(), resp);
            }
            None => prop_assert!(resp + 1 > max_len),
        }
    }
}
