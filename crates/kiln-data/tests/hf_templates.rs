//! Hugging Face Jinja chat templates (ChatML, Llama 3, Llama 2 `[INST]`, Zephyr, Alpaca) rendered
//! with minijinja: the loss mask, found by rendering prefix by prefix, covers exactly each assistant
//! message's tokens and its end-of-turn token. Kiln's JSON template through the same trait.

mod common;

#[path = "common/hf.rs"]
mod hf;

use kiln_data::chat_format::{ChatFormat, JinjaChat, KilnChat};
use kiln_data::datasets::{Conversation, Message};
use kiln_data::template::{ChatTemplate, TemplateError};
use kiln_data::Tokenizer;

fn tokenizer(lib: tokenizers::Tokenizer, bos: Option<&str>, eos: &str, tpl: &str) -> Tokenizer {
    let dir = tempfile::tempdir().unwrap();
    hf::write_tokenizer_dir(dir.path(), &lib, bos, Some(eos), None, Some(tpl));
    Tokenizer::load_dir(dir.path()).unwrap()
}

struct Case {
    name: &'static str,
    chat: JinjaChat,
    tok: Tokenizer,
    /// What each assistant message adds, as text: `{}` is the content.
    trained: &'static str,
    system: bool,
}

fn cases() -> Vec<Case> {
    let gpt2 = hf::gpt2_layout(500);
    let llama2 = hf::llama2_layout();
    let mk = |name, lib: &tokenizers::Tokenizer, bos, eos, tpl: &str, trained, system| {
        let tok = tokenizer(lib.clone(), bos, eos, tpl);
        Case {
            name,
            chat: JinjaChat::new(tpl, tok.clone()).unwrap(),
            tok,
            trained,
            system,
        }
    };
    vec![
        mk(
            "chatml",
            &gpt2,
            None,
            "<|endoftext|>",
            hf::CHATML,
            "{}<|im_end|>",
            true,
        ),
        mk(
            "llama3",
            &hf::llama3_layout(500),
            Some("<|begin_of_text|>"),
            "<|end_of_text|>",
            hf::LLAMA3,
            "{}<|eot_id|>",
            true,
        ),
        mk(
            "llama2",
            &llama2,
            Some("<s>"),
            "</s>",
            hf::LLAMA2,
            "{} </s>",
            true,
        ),
        mk(
            "zephyr",
            &llama2,
            Some("<s>"),
            "</s>",
            hf::ZEPHYR,
            "{}</s>",
            true,
        ),
        mk(
            "alpaca",
            &gpt2,
            None,
            "<|endoftext|>",
            hf::ALPACA,
            "{}<|endoftext|>",
            false,
        ),
    ]
}

fn conversation(system: bool) -> Vec<Message> {
    let mut m = Vec::new();
    if system {
        m.push(Message::system("you are a helpful assistant"));
    }
    m.extend([
        Message::user("what is the capital of france"),
        Message::assistant("the capital is paris"),
        Message::user("and of italy"),
        Message::assistant("it is rome, I think"),
    ]);
    m
}

/// The runs of consecutive masked positions.
fn runs(mask: &[bool]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < mask.len() {
        if mask[i] {
            let s = i;
            while i < mask.len() && mask[i] {
                i += 1;
            }
            out.push((s, i));
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn mask_covers_exactly_the_assistant_tokens_and_their_end_of_turn() {
    for c in cases() {
        let msgs = conversation(c.system);
        let r = c.chat.render(&msgs, false).unwrap();
        assert_eq!(r.tokens.len(), r.loss_mask.len());
        // The whole rendering is the template's text tokenized at once, as transformers does.
        let text = c.chat.render_text(&msgs, false).unwrap();
        assert_eq!(r.tokens, c.tok.encode_trusted(&text), "{}", c.name);
        let runs = runs(&r.loss_mask);
        let answers: Vec<&str> = msgs
            .iter()
            .filter(|m| m.role == kiln_data::datasets::Role::Assistant)
            .map(|m| m.content.as_str())
            .collect();
        assert_eq!(runs.len(), answers.len(), "{}: {runs:?}", c.name);
        let stops = c.chat.stop_tokens().unwrap();
        for (&(s, e), a) in runs.iter().zip(&answers) {
            let got = c.tok.decode(&r.tokens[s..e]);
            let want = c.trained.replace("{}", a);
            assert_eq!(got.trim_start(), want.trim_start(), "{}", c.name);
            assert!(
                stops.contains(&r.tokens[e - 1]),
                "{}: ends in a stop",
                c.name
            );
            assert!(!stops.contains(&r.tokens[s]), "{}", c.name);
        }
        // Nothing else is trained: the unmasked text holds every user and system message.
        let unmasked: Vec<u32> = r
            .tokens
            .iter()
            .zip(&r.loss_mask)
            .filter(|(_, &m)| !m)
            .map(|(&t, _)| t)
            .collect();
        let rest = c.tok.decode(&unmasked);
        for a in &answers {
            assert!(!rest.contains(a), "{}: {rest:?}", c.name);
        }
        for m in &msgs {
            if m.role != kiln_data::datasets::Role::Assistant {
                assert!(rest.contains(&m.content), "{}: {rest:?}", c.name);
            }
        }
        // The generation prompt is a token prefix of the conversation that continues it.
        let prompt = c.chat.render_prompt(&msgs[..msgs.len() - 1]).unwrap();
        assert_eq!(&r.tokens[..prompt.len()], &prompt[..], "{}", c.name);
        assert_eq!(prompt.len(), runs[1].0, "{}", c.name);
        // Prompt + response: the loss only on the last response.
        let pr = c
            .chat
            .render_prompt_response(&msgs[..msgs.len() - 1], answers[1])
            .unwrap();
        assert_eq!(pr.tokens, r.tokens, "{}", c.name);
        assert_eq!(crate::runs(&pr.loss_mask), vec![runs[1]], "{}", c.name);
    }
}

#[test]
fn rendered_text_matches_the_templates() {
    let c = &cases()[0];
    let msgs = vec![Message::user("hi"), Message::assistant("hello")];
    assert_eq!(
        c.chat.render_text(&msgs, false).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    );
    assert_eq!(
        c.chat.render_text(&msgs[..1], true).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let l3 = &cases()[1];
    assert_eq!(
        l3.chat.render_text(&msgs, false).unwrap(),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
    );
    let l2 = &cases()[2];
    let sys = vec![
        Message::system("be brief"),
        Message::user(" hi "),
        Message::assistant("hello"),
    ];
    assert_eq!(
        l2.chat.render_text(&sys, false).unwrap(),
        "<s>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\n hi [/INST] hello </s>"
    );
    let z = &cases()[3];
    assert_eq!(
        z.chat.render_text(&msgs[..1], true).unwrap(),
        "<|user|>\nhi</s>\n<|assistant|>\n"
    );
}

#[test]
fn tojson_and_pycompat_methods() {
    let tok = cases().remove(0).tok;
    let tpl = "{{ messages | tojson }}|{{ messages[0].content.strip().upper() }}|{{ 'a,b'.split(',') | length }}";
    let chat = JinjaChat::new(tpl, tok).unwrap();
    let text = chat
        .render_text(&[Message::user("  café <b> ")], false)
        .unwrap();
    assert_eq!(
        text,
        r#"[{"role": "user", "content": "  café <b> "}]|CAFÉ <B>|2"#
    );
}

#[test]
fn a_template_that_raises_is_an_error_with_its_message() {
    let c = &cases()[2];
    let bad = vec![Message::user("a"), Message::user("b")];
    let e = c.chat.render(&bad, true).unwrap_err();
    assert!(matches!(e, TemplateError::Conversation(_)), "{e:?}");
    assert!(
        e.to_string()
            .contains("Conversation roles must alternate user/assistant"),
        "{e}"
    );
}

#[test]
fn a_template_without_assistant_turns_or_end_of_turn_is_an_error() {
    let tok = cases().remove(0).tok;
    let conv = Conversation {
        messages: vec![Message::user("q"), Message::assistant("a")],
    };
    let users_only = "{% for m in messages %}{% if m.role == 'user' %}<|im_start|>user\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}";
    let e = JinjaChat::new(users_only, tok.clone())
        .unwrap()
        .render_conversation(&conv)
        .unwrap_err()
        .to_string();
    assert!(e.contains("renders nothing for assistant message 2"), "{e}");
    let no_end = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}";
    let e = JinjaChat::new(no_end, tok.clone())
        .unwrap()
        .render_conversation(&conv)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no end-of-turn or end-of-sequence token"), "{e}");
    let e = JinjaChat::new("{% for m in messages %}", tok)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("Jinja chat template"), "{e}");
}

#[test]
fn kiln_template_through_the_trait_is_unchanged() {
    let tok = common::tokenizer();
    let t = ChatTemplate::default();
    let chat = KilnChat {
        template: t.clone(),
        enc: tok,
    };
    let msgs = conversation(true);
    let conv = Conversation {
        messages: msgs.clone(),
    };
    assert_eq!(
        chat.render(&msgs, false).unwrap(),
        t.render_conversation(tok, &conv).unwrap()
    );
    assert_eq!(
        chat.render_prompt(&msgs[..3]).unwrap(),
        t.render_prompt(tok, &msgs[..3]).unwrap()
    );
    assert_eq!(
        chat.render(&msgs[..3], true).unwrap().tokens,
        t.render_prompt(tok, &msgs[..3]).unwrap()
    );
    assert_eq!(
        chat.render_prompt_response(&msgs[..3], "x").unwrap(),
        t.render_prompt_response(tok, &msgs[..3], "x").unwrap()
    );
    assert_eq!(chat.stop_tokens().unwrap(), t.stop_tokens().unwrap());
    // Without an assistant turn and without the generation prompt: no assistant prefix.
    let r = chat.render(&msgs[..1], false).unwrap();
    assert_eq!(
        *r.tokens.last().unwrap(),
        kiln_data::special::END,
        "{:?}",
        r.tokens
    );
    assert_eq!(r.num_targets(), 0);
}

/// The bug TRL users hit: with the pad token equal to the end-of-sequence token, masking "pad"
/// positions by id drops the end of sequence from the loss and the model never learns to stop.
/// Kiln masks padding by position, so the end-of-sequence target stays.
#[test]
fn end_of_sequence_equal_to_pad_is_still_trained() {
    use kiln_data::template::{collate, pack, IGNORE};
    let dir = tempfile::tempdir().unwrap();
    let lib = hf::llama3_layout(500);
    hf::write_tokenizer_dir(
        dir.path(),
        &lib,
        Some("<|begin_of_text|>"),
        Some("<|end_of_text|>"),
        Some("<|end_of_text|>"),
        Some(hf::ALPACA),
    );
    let tok = Tokenizer::load_dir(dir.path()).unwrap();
    let eos = tok.token_to_id("<|end_of_text|>").unwrap();
    assert_eq!(tok.specials().pad, Some(eos));
    assert_eq!(tok.specials().eos, vec![eos]);
    let chat = JinjaChat::new(hf::ALPACA, tok).unwrap();
    let short = chat
        .render_conversation(&Conversation {
            messages: vec![Message::user("hi"), Message::assistant("hello")],
        })
        .unwrap();
    let long = chat
        .render_conversation(&Conversation {
            messages: vec![
                Message::user("tell me a longer story"),
                Message::assistant("once upon a time there was a fox"),
            ],
        })
        .unwrap();
    let last = short.loss_mask.iter().rposition(|&m| m).unwrap();
    assert_eq!(short.tokens[last], eos);
    for batch in [
        collate(&[short.clone(), long.clone()], 64),
        pack(&[short, long], 64),
    ] {
        // Every row's end-of-sequence token is a target...
        let eos_targets = batch.targets.iter().filter(|&&t| t == eos).count();
        assert_eq!(eos_targets, 2);
        // ...and padding never is, whatever its id.
        for i in 0..batch.tokens.len() {
            if !batch.valid[i] {
                assert_eq!(batch.targets[i], IGNORE);
            }
        }
    }
}
