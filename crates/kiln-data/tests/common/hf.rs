//! Tokenizers in the layouts of Hugging Face models, built with the `tokenizers` crate (shared by
//! the kiln-data and kiln-cli tests): GPT-2 (byte-level BPE, specials at the end of the
//! vocabulary), Llama 3 (byte-level BPE behind Llama 3's split regex) and Llama 2 (BPE over
//! sentencepiece-style `▁` pieces with byte fallback).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, NormalizerWrapper, SplitDelimiterBehavior, Tokenizer};

pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

pub const LLAMA3: &str = "{{- bos_token }}\n{%- for message in messages %}\n{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n";

pub const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

pub const ZEPHYR: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

pub const ALPACA: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}";

/// Llama 3's pre-tokenizer pattern.
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Training text: tinyshakespeare's first 200 kB when present, else a small varied text.
pub fn training_text() -> String {
    if let Some(p) = shakespeare() {
        let t = std::fs::read_to_string(p).unwrap();
        let mut end = 200_000.min(t.len());
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        return t[..end].to_string();
    }
    let mut s = String::new();
    for i in 0..300 {
        s.push_str(&format!(
            "Line {i}: the quick brown fox jumps over the lazy dog; ünïcödé café {}.\n",
            i * 7
        ));
    }
    s
}

/// `tinyshakespeare.txt` of the shared data, if present.
pub fn shakespeare() -> Option<PathBuf> {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    [here, PathBuf::from("/work/shared/data")]
        .into_iter()
        .map(|d| d.join("tinyshakespeare.txt"))
        .find(|p| p.is_file())
}

fn train(mut tok: Tokenizer, vocab: usize, text: &str) -> Tokenizer {
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(0)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::from(trainer);
    let docs: Vec<&str> = text.split("\n\n").collect();
    tok.train(&mut trainer, docs.into_iter()).unwrap();
    tok
}

fn specials(tok: &mut Tokenizer, names: &[&str]) {
    let added: Vec<AddedToken> = names.iter().map(|n| AddedToken::from(*n, true)).collect();
    tok.add_special_tokens(&added);
}

/// GPT-2 / Qwen layout: byte-level BPE, `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` after the
/// learned vocabulary.
pub fn gpt2_layout(vocab: usize) -> Tokenizer {
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    let mut tok = train(tok, vocab, &training_text());
    specials(&mut tok, &["<|endoftext|>", "<|im_start|>", "<|im_end|>"]);
    tok
}

/// Llama 3 layout: byte-level BPE behind Llama 3's split regex, its specials at the end.
pub fn llama3_layout(vocab: usize) -> Tokenizer {
    let mut tok = Tokenizer::new(BPE::default());
    let split = Split::new(
        SplitPattern::Regex(LLAMA3_PATTERN.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .unwrap();
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(PreSequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
    ]))));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    let mut tok = train(tok, vocab, &training_text());
    specials(
        &mut tok,
        &[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
    );
    tok
}

/// Llama 2 / Mistral / TinyLlama layout: `<unk>`, `<s>`, `</s>` at ids 0..=2, the 256 byte-fallback
/// tokens `<0x00>`..`<0xFF>`, then `▁`-pieces; normalizer prepends `▁` and replaces spaces.
pub fn llama2_layout() -> Tokenizer {
    let mut vocab: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    for b in 0..=255u8 {
        vocab.push(format!("<0x{b:02X}>"));
    }
    for c in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'-\n".chars() {
        vocab.push(c.to_string());
    }
    let mut merges: Vec<(String, String)> = Vec::new();
    for m in [
        "▁ t", "h e", "▁t he", "i n", "a n", "e r", "▁ a", "o u", "r e", "o n", "▁ s", "e n",
        "▁ w", "▁ o", "▁ m", "▁ b", "i s", "a t", "o r", "e s", "▁a n", "▁an d", "▁ I", "l l",
        "▁ h", "▁ f", "in g", "▁ y", "ou r", "▁y our", "▁ d", "▁ c", "▁ l", "▁o f", "▁t o",
    ] {
        let (a, b) = m.split_once(' ').unwrap();
        merges.push((a.into(), b.into()));
        let ab = format!("{a}{b}");
        if !vocab.contains(&ab) {
            vocab.push(ab);
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(
            vocab
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), i as u32))
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .unk_token("<unk>".into())
        .byte_fallback(true)
        .fuse_unk(true)
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(NormalizerWrapper::Sequence(NormSequence::new(vec![
        NormalizerWrapper::Prepend(Prepend::new("▁".into())),
        NormalizerWrapper::Replace(Replace::new(" ", "▁").unwrap()),
    ]))));
    tok.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(vec![
        DecoderWrapper::Replace(Replace::new("▁", " ").unwrap()),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
        DecoderWrapper::Strip(Strip::new(' ', 1, 0)),
    ]))));
    specials(&mut tok, &["<unk>", "<s>", "</s>"]);
    tok
}

/// Writes a model directory's tokenizer files: `tokenizer.json` and a `tokenizer_config.json`
/// with these roles and chat template.
pub fn write_tokenizer_dir(
    dir: &Path,
    tok: &Tokenizer,
    bos: Option<&str>,
    eos: Option<&str>,
    pad: Option<&str>,
    chat_template: Option<&str>,
) {
    std::fs::create_dir_all(dir).unwrap();
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos.map(|e| serde_json::json!({"content": e, "lstrip": false, "rstrip": false, "normalized": false, "single_word": false, "special": true})),
        "pad_token": pad,
        "chat_template": chat_template,
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": false,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
}
