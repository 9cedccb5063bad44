//! Post-training on a Hugging Face model directory (config.json, model.safetensors, tokenizer.json,
//! tokenizer_config.json; no kiln.json): a random-weight Llama-family model with a tokenizer built
//! by the `tokenizers` crate (ChatML specials at the end of the vocabulary) and a ChatML template.
//! `kiln sft --init` trains it (loss falls), `kiln chat` answers, the checkpoint carries the
//! tokenizer files and template; bad inputs give clear errors.

mod common;

#[path = "../../kiln-data/tests/common/hf.rs"]
mod hf;

use common::{fails, kiln, ok, s, text};
use kiln_model::{Family, Model, ModelConfig};
use std::path::{Path, PathBuf};

const THREADS: usize = 2;

/// Writes a Hugging Face Llama model directory with the GPT-2-layout tokenizer.
fn hf_model_dir(dir: &Path, model_vocab: Option<usize>, template: &str) -> tokenizers::Tokenizer {
    let tok = hf::gpt2_layout(600);
    let n = tok.get_vocab_size(true);
    // The embedding padded past the tokenizer's last id, as many hub models have it.
    let vocab_size = model_vocab.unwrap_or(n.div_ceil(64) * 64);
    let cfg = ModelConfig {
        vocab_size,
        n_ctx: 256,
        n_layer: 2,
        n_head: 4,
        n_kv_head: 2,
        n_embd: 64,
        family: Family::Llama,
        tie_embeddings: false,
        ..Default::default()
    };
    let model = Model::new(cfg, 7);
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in kiln_model::checkpoint::model_files(&model).unwrap() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    hf::write_tokenizer_dir(
        dir,
        &tok,
        None,
        Some("<|im_end|>"),
        Some("<|endoftext|>"),
        Some(template),
    );
    tok
}

fn alpaca(root: &Path) -> PathBuf {
    let shared = PathBuf::from("/work/shared/data/alpaca_tiny.json");
    if shared.is_file() {
        return shared;
    }
    eprintln!("(alpaca_tiny.json not present: a generated file instead)");
    let recs: Vec<serde_json::Value> = (0..64)
        .map(|i| {
            serde_json::json!({"instruction": format!("Add {i} and 2."), "input": "",
                               "output": format!("The sum is {}.", i + 2)})
        })
        .collect();
    let p = root.join("alpaca.json");
    std::fs::write(&p, serde_json::to_string(&recs).unwrap()).unwrap();
    p
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v.get("step")?;
            v.get("loss")?.as_f64()
        })
        .collect()
}

fn latest(run: &Path) -> PathBuf {
    run.join(std::fs::read_to_string(run.join("latest")).unwrap().trim())
}

#[test]
fn sft_and_chat_on_a_hugging_face_model_directory() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("hf");
    let lib = hf_model_dir(&model, None, hf::CHATML);
    assert!(!model.join("kiln.json").exists());
    let data = alpaca(root.path());
    let out = root.path().join("sft");
    ok(
        THREADS,
        &[
            "sft",
            "--init",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--max-steps",
            "40",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--warmup-steps",
            "2",
            "--eval-every",
            "1000",
            "--ckpt-every",
            "40",
            "--set",
            "seq_len=128",
        ],
    );
    let l = losses(&out);
    assert!(l.len() >= 20, "{l:?}");
    let first: f64 = l[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = l[l.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(
        last < first - 1.0,
        "loss should fall: {first:.3} -> {last:.3}"
    );

    // The checkpoint carries the Hugging Face tokenizer files and the template.
    let ckpt = latest(&out);
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["chat_template"], hf::CHATML);
    assert_eq!(tc["eos_token"]["content"], "<|im_end|>");
    let gc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ckpt.join("generation_config.json")).unwrap(),
    )
    .unwrap();
    let im_end = lib.token_to_id("<|im_end|>").unwrap();
    assert_eq!(gc["eos_token_id"], serde_json::json!([im_end]));
    assert_eq!(
        std::fs::read(ckpt.join("tokenizer.json")).unwrap(),
        std::fs::read(model.join("tokenizer.json")).unwrap()
    );

    // Chat renders with the template and stops at <|im_end|>.
    let o = ok(
        THREADS,
        &[
            "chat",
            "--model",
            s(&out),
            "--prompt",
            "Give three tips for staying healthy.",
            "--max-new-tokens",
            "16",
            "--temperature",
            "0",
        ],
    );
    assert!(!text(&o.stdout).trim().is_empty());
    ok(
        THREADS,
        &[
            "generate",
            "--model",
            s(&ckpt),
            "--prompt",
            "To be",
            "--max-new-tokens",
            "4",
        ],
    );

    // The template renders the same before and after training, and as the library encodes it.
    let msgs = root.path().join("m.json");
    std::fs::write(
        &msgs,
        r#"[{"role":"user","content":"hi there"},{"role":"assistant","content":"hello"}]"#,
    )
    .unwrap();
    let before = text(
        &ok(
            THREADS,
            &[
                "template",
                "render",
                "--model",
                s(&model),
                "--input",
                s(&msgs),
                "--ids",
            ],
        )
        .stdout,
    );
    let after = text(
        &ok(
            THREADS,
            &[
                "template",
                "render",
                "--model",
                s(&ckpt),
                "--input",
                s(&msgs),
                "--ids",
            ],
        )
        .stdout,
    );
    assert_eq!(before, after);
    let v: serde_json::Value = serde_json::from_str(&before).unwrap();
    let want = lib
        .encode(
            "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n",
            false,
        )
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(v["ids"], serde_json::json!(want));
    let mask: Vec<u64> = v["loss_mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    // "hello" and <|im_end|> are trained; the final newline is not.
    let trained: Vec<u32> = want
        .iter()
        .zip(&mask)
        .filter(|(_, &m)| m == 1)
        .map(|(&t, _)| t)
        .collect();
    assert_eq!(lib.decode(&trained, false).unwrap(), "hello<|im_end|>");
    let textual = text(
        &ok(
            THREADS,
            &[
                "template",
                "render",
                "--model",
                s(&model),
                "--input",
                s(&msgs),
            ],
        )
        .stdout,
    );
    assert!(
        textual.starts_with("<|im_start|>user\nhi there<|im_end|>"),
        "{textual}"
    );

    // Reward model, scoring and PPO on the Hugging Face tokenizer and template.
    let prefs = root.path().join("prefs.jsonl");
    let prompts = root.path().join("prompts.jsonl");
    let mut p = String::new();
    let mut q = String::new();
    for i in 0..16 {
        p.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": format!("Add {i} and 2."),
                               "chosen": format!("The sum is {}.", i + 2), "rejected": "I do not know."})
        ));
        q.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": format!("Add {i} and 3.")})
        ));
    }
    std::fs::write(&prefs, p).unwrap();
    std::fs::write(&prompts, q).unwrap();
    let rm = root.path().join("rm");
    ok(
        THREADS,
        &[
            "rm",
            "--init",
            s(&ckpt),
            "--data",
            s(&prefs),
            "--out",
            s(&rm),
            "--max-steps",
            "4",
            "--batch-size",
            "4",
            "--set",
            "val_fraction=0",
        ],
    );
    let rm_ckpt = latest(&rm);
    assert!(rm_ckpt.join("tokenizer_config.json").exists());
    let o = ok(
        THREADS,
        &[
            "rm",
            "score",
            "--model",
            s(&rm),
            "--prompt",
            "Add 1 and 2.",
            "--response",
            "3",
        ],
    );
    assert!(text(&o.stdout).starts_with("score "));
    let ppo = root.path().join("ppo");
    ok(
        THREADS,
        &[
            "ppo",
            "--actor",
            s(&out),
            "--reward-model",
            s(&rm),
            "--prompts",
            s(&prompts),
            "--out",
            s(&ppo),
            "--iterations",
            "1",
            "--set",
            "ppo.rollout_batch=4",
            "--set",
            "ppo.minibatch=2",
            "--set",
            "ppo.max_new_tokens=8",
        ],
    );
    let ppo_ckpt = latest(&ppo);
    let tc = std::fs::read_to_string(ppo_ckpt.join("tokenizer_config.json")).unwrap();
    assert!(tc.contains("im_start"), "{tc}");

    // Logits of the trained model for some ids.
    let o = ok(
        THREADS,
        &["logits", "--model", s(&ckpt), "--tokens", "1 2 3"],
    );
    assert!(text(&o.stdout).contains("\"logits\""));
}

#[test]
fn hugging_face_directories_with_bad_parts_give_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    let data = alpaca(root.path());
    let sft = |model: &Path, needles: &[&str]| {
        let out = root.path().join("out");
        let _ = std::fs::remove_dir_all(&out);
        fails(
            THREADS,
            &[
                "sft",
                "--init",
                s(model),
                "--data",
                s(&data),
                "--out",
                s(&out),
                "--max-steps",
                "1",
            ],
            needles,
        );
    };
    // A model whose vocabulary is smaller than its tokenizer's.
    let small = root.path().join("small");
    let tok = hf_model_dir(&small, Some(300), hf::CHATML);
    let n = tok.get_vocab_size(true).to_string();
    sft(&small, &["vocabulary has 300 tokens", &n]);
    // A tokenizer without any end-of-sequence token.
    let no_eos = root.path().join("no_eos");
    let tok = hf_model_dir(&no_eos, None, hf::CHATML);
    hf::write_tokenizer_dir(&no_eos, &tok, None, None, None, Some(hf::CHATML));
    sft(&no_eos, &["no end-of-sequence token"]);
    // ... which a flag supplies, and the checkpoint keeps.
    let out = root.path().join("with_eos");
    ok(
        THREADS,
        &[
            "sft",
            "--init",
            s(&no_eos),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--max-steps",
            "2",
            "--eos-token",
            "<|im_end|>",
            "--set",
            "seq_len=64",
            "--batch-size",
            "2",
        ],
    );
    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(latest(&out).join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tc["eos_token"], "<|im_end|>");
    ok(
        THREADS,
        &[
            "chat",
            "--model",
            s(&out),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ],
    );
    fails(
        THREADS,
        &[
            "sft",
            "--init",
            s(&no_eos),
            "--data",
            s(&data),
            "--out",
            s(&root.path().join("x")),
            "--eos-token",
            "<|nope|>",
        ],
        &["the eos token \"<|nope|>\" is not in the vocabulary"],
    );
    // A template that raises.
    let raises = root.path().join("raises");
    hf_model_dir(&raises, None, "{{ raise_exception('only ChatML here') }}");
    sft(&raises, &["the chat template raised: only ChatML here"]);
    // A template that renders no assistant turn.
    let users = root.path().join("users");
    hf_model_dir(
        &users,
        None,
        "{% for m in messages %}{% if m.role == 'user' %}<|im_start|>user\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}",
    );
    sft(&users, &["renders nothing for assistant message"]);
    // No template at all.
    let none = root.path().join("none");
    let tok = hf_model_dir(&none, None, hf::CHATML);
    hf::write_tokenizer_dir(&none, &tok, None, Some("<|im_end|>"), None, None);
    sft(&none, &["no chat template", "--template FILE.jinja"]);
    // ... which --template FILE.jinja gives.
    let tpl = root.path().join("chatml.jinja");
    std::fs::write(&tpl, hf::CHATML).unwrap();
    let out = root.path().join("with_tpl");
    ok(
        THREADS,
        &[
            "sft",
            "--init",
            s(&none),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--max-steps",
            "2",
            "--template",
            s(&tpl),
            "--set",
            "seq_len=64",
            "--batch-size",
            "2",
        ],
    );
    let tc = std::fs::read_to_string(latest(&out).join("tokenizer_config.json")).unwrap();
    assert!(tc.contains("im_start"), "{tc}");
    let _ = kiln;
}
