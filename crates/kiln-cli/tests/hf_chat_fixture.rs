//! Every post-training route on a model directory that `transformers` wrote (the `llama3_chat`
//! fixture: its own tokenizer, the Llama 3 chat template, two end-of-sequence ids, no pad token),
//! on Parquet data that pyarrow wrote: SFT, then DPO, GRPO and eval from the SFT model, each
//! rendering with the model's Jinja template. Bad Parquet input fails with exit code 1 and an
//! error naming the file, row and column.

mod common;

use common::{fails, ok, s, text};
use std::path::{Path, PathBuf};

const THREADS: usize = 2;

fn fixture_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kiln-model/tests/fixtures/llama3_chat")
}

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../kiln-data/tests/fixtures/parquet")
        .join(name)
}

fn latest(run: &Path) -> PathBuf {
    run.join(std::fs::read_to_string(run.join("latest")).unwrap().trim())
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn sft_dpo_grpo_and_eval_on_a_transformers_directory_with_parquet_data() {
    let root = tempfile::tempdir().unwrap();
    let model = fixture_model();
    let expected = json(&model.join("chat_expected.json"));
    let eot = expected["specials"]["<|eot_id|>"].as_u64().unwrap();
    let end_of_text = expected["specials"]["<|end_of_text|>"].as_u64().unwrap();

    // SFT on two Parquet files: a chat column, and question/response columns mapped by --field.
    let sft = root.path().join("sft");
    let o = ok(
        THREADS,
        &[
            "sft",
            "--init",
            s(&model),
            "--data",
            s(&data("sft_chat.parquet")),
            "--data",
            s(&data("renamed.parquet")),
            "--field",
            "instruction=question",
            "--field",
            "output=response",
            "--out",
            s(&sft),
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--set",
            "val_fraction=0",
            "--ckpt-every",
            "3",
        ],
    );
    let err = text(&o.stderr);
    assert!(err.contains("5 train"), "{err}");
    let ckpt = latest(&sft);
    let gc = json(&ckpt.join("generation_config.json"));
    assert_eq!(gc["eos_token_id"], serde_json::json!([eot, end_of_text]));
    let tc = json(&ckpt.join("tokenizer_config.json"));
    assert!(
        tc["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|start_header_id|>"),
        "{tc}"
    );

    // A reward model straight from the hub directory, with the end-of-sequence tokens given by
    // flags (their order wins over the files'), carried into its checkpoint.
    let rm = root.path().join("rm");
    ok(
        THREADS,
        &[
            "rm",
            "--init",
            s(&model),
            "--data",
            s(&data("prefs.parquet")),
            "--out",
            s(&rm),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--set",
            "val_fraction=0",
            "--eos-token",
            "<|end_of_text|>",
            "--eos-token",
            "<|eot_id|>",
        ],
    );
    let gc = json(&latest(&rm).join("generation_config.json"));
    assert_eq!(gc["eos_token_id"], serde_json::json!([end_of_text, eot]));

    // DPO from the SFT model on pyarrow's preference pairs.
    let dpo = root.path().join("dpo");
    ok(
        THREADS,
        &[
            "dpo",
            "--init",
            s(&sft),
            "--data",
            s(&data("prefs.parquet")),
            "--val-data",
            s(&data("prefs.jsonl")),
            "--out",
            s(&dpo),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--eval-every",
            "2",
            "--ckpt-every",
            "2",
        ],
    );
    let m = std::fs::read_to_string(dpo.join("metrics.jsonl")).unwrap();
    assert!(m.contains("reward_acc") || m.contains("loss"), "{m}");
    assert!(json(&latest(&dpo).join("tokenizer_config.json"))["chat_template"].is_string());

    // GRPO with the format reward (an answer that ends its turn with one of the stop tokens).
    let grpo = root.path().join("grpo");
    let o = ok(
        THREADS,
        &[
            "grpo",
            "--actor",
            s(&sft),
            "--prompts",
            s(&data("prompts.parquet")),
            "--reward",
            "format",
            "--out",
            s(&grpo),
            "--iterations",
            "1",
            "--group-size",
            "2",
            "--prompts-per-iter",
            "2",
            "--set",
            "grpo.minibatch=2",
            "--set",
            "grpo.max_new_tokens=6",
            "--set",
            "grpo.ckpt_every=1",
        ],
    );
    assert!(
        text(&o.stdout).contains("grpo: 1 iterations"),
        "{}",
        text(&o.stdout)
    );
    assert!(
        latest(&grpo).join("chat_template.jinja").exists() || {
            let tc = json(&latest(&grpo).join("tokenizer_config.json"));
            tc["chat_template"].is_string()
        }
    );

    // Eval with a reward source, broken down by a column of the Parquet prompts.
    let o = ok(
        THREADS,
        &[
            "eval",
            "--model",
            s(&sft),
            "--prompts",
            s(&data("prompts.parquet")),
            "--reward",
            "format",
            "--by",
            "answer",
            "--max-new-tokens",
            "6",
        ],
    );
    let out = text(&o.stdout);
    assert!(out.contains("by answer"), "{out}");
}

#[test]
fn bad_parquet_data_fails_with_exit_code_1() {
    let root = tempfile::tempdir().unwrap();
    let model = fixture_model();
    let sft = |data: &Path, extra: &[&str], needles: &[&str]| {
        let out = root.path().join("out");
        let mut a = vec![
            "sft",
            "--init",
            s(&model),
            "--data",
            s(data),
            "--out",
            s(&out),
            "--max-steps",
            "1",
        ];
        a.extend(extra);
        fails(THREADS, &a, needles);
    };
    // Columns of no SFT format (a preference file): the error lists the file's columns.
    sft(
        &data("prefs.parquet"),
        &[],
        &[
            "prefs.parquet: row 0 (row group 0): unrecognized SFT record",
            "(the file's columns: prompt, chosen, rejected)",
        ],
    );
    // A missing column, named through --field.
    sft(
        &data("renamed.parquet"),
        &["--field", "instruction=question", "--field", "output=answer"],
        &[
            "renamed.parquet: row 0 (row group 0): column \"answer\": missing (--field output=answer)",
            "the file has no column \"answer\" (its columns: question, response",
        ],
    );
    // A column of the wrong type: a list where a string is read.
    sft(
        &data("ranked.parquet"),
        &["--field", "instruction=prompt", "--field", "output=choices"],
        &["column \"choices\": expected a string, found an array (--field output=choices) (the Parquet column is group (LIST))"],
    );
    // A truncated footer.
    let bytes = std::fs::read(data("sft_chat.parquet")).unwrap();
    let cut = root.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    sft(&cut, &[], &["cut.parquet: not a readable Parquet file"]);
    // A --field naming no Kiln field.
    sft(
        &data("renamed.parquet"),
        &["--field", "response=output"],
        &["\"response\" is not a field Kiln reads"],
    );
}
