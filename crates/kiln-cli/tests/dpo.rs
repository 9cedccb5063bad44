//! `kiln dpo` end to end on tiny demo models: every loss, bad records (an error naming the file and
//! line, or skipped and counted), a resume that reads the cached reference log-probabilities and
//! continues bit-for-bit, another reference model, and the real preference samples.

mod common;

use common::{fails, kiln, ok, s, text};
use std::path::{Path, PathBuf};

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    shards: PathBuf,
    tok: PathBuf,
    pretrained: PathBuf,
    sft: PathBuf,
    train: PathBuf,
    val: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let data = root.join("data");
    ok(1, &["data", "demo", "--out", s(&data), "--size", "tiny"]);
    let tok = root.join("tokenizer.json");
    let corpus = data.join("corpus.jsonl");
    ok(
        1,
        &[
            "tokenizer",
            "train",
            "--input",
            s(&corpus),
            "--vocab-size",
            "400",
            "--out",
            s(&tok),
        ],
    );
    let shards = root.join("shards");
    ok(
        1,
        &[
            "data",
            "prepare",
            "--tokenizer",
            s(&tok),
            "--input",
            s(&corpus),
            "--out",
            s(&shards),
            "--val-fraction",
            "0.05",
        ],
    );
    let pretrained = root.join("pretrain");
    ok(
        1,
        &[
            "pretrain",
            "--data",
            s(&shards),
            "--tokenizer",
            s(&tok),
            "--out",
            s(&pretrained),
            "--layers",
            "2",
            "--heads",
            "2",
            "--dim",
            "32",
            "--ctx",
            "64",
            "--batch-size",
            "4",
            "--max-steps",
            "30",
            "--eval-every",
            "30",
        ],
    );
    let sft = root.join("sft");
    ok(
        1,
        &[
            "sft",
            "--init",
            s(&pretrained),
            "--data",
            s(&data.join("sft_train.jsonl")),
            "--val-data",
            s(&data.join("sft_val.jsonl")),
            "--out",
            s(&sft),
            "--max-steps",
            "20",
            "--batch-size",
            "4",
            "--eval-every",
            "20",
        ],
    );
    Fixture {
        _dir: dir,
        root,
        train: data.join("rm_train.jsonl"),
        val: data.join("rm_val.jsonl"),
        data,
        shards,
        tok,
        pretrained,
        sft,
    }
}

fn dpo_args<'a>(f: &'a Fixture, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "dpo",
        "--init",
        s(&f.sft),
        "--data",
        s(&f.train),
        "--val-data",
        s(&f.val),
        "--out",
        s(out),
    ];
    a.extend([
        "--batch-size",
        "2",
        "--eval-every",
        "4",
        "--ckpt-every",
        "4",
    ]);
    a.extend(extra);
    a
}

/// metrics.jsonl without the wall-clock fields.
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tok_per_s");
            v
        })
        .collect()
}

#[test]
fn dpo_trains_resumes_from_its_cache_and_rejects_bad_input() {
    let f = fixture();
    let root = &f.root;
    let nowhere = root.join("nowhere");
    let file = root.join("prefs.jsonl");

    // Every loss runs; at step 0 the sigmoid loss is exactly ln 2 and the KL to the reference 0.
    let base = root.join("sigmoid");
    let o = ok(1, &dpo_args(&f, &base, &["--max-steps", "4"]));
    assert!(
        text(&o.stdout).starts_with("dpo: 4 steps"),
        "{}",
        text(&o.stdout)
    );
    let m = metrics(&base);
    assert_eq!(m[0]["val_loss"].as_f64(), Some(std::f64::consts::LN_2));
    assert_eq!(m[0]["val_kl"].as_f64(), Some(0.0));
    assert_eq!(m[1]["loss"].as_f64(), Some(std::f64::consts::LN_2));
    for k in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(
            m[4][k].is_number() && m[4][format!("val_{k}")].is_number(),
            "{k}: {}",
            m[4]
        );
    }
    assert!(m[4]["val_kl"].as_f64().unwrap() > 0.0);
    let conf = std::fs::read_to_string(base.join("run_config.toml")).unwrap();
    assert!(
        conf.contains("loss = \"sigmoid\"") && conf.contains("beta = 0.1"),
        "{conf}"
    );
    for (name, extra) in [
        ("ipo", &["--loss", "ipo", "--beta", "0.5"][..]),
        ("hinge", &["--loss", "hinge"][..]),
        ("cdpo", &["--label-smoothing", "0.1"][..]),
        ("rpo", &["--sft-coef", "0.5"][..]),
    ] {
        let out = root.join(name);
        let mut a = dpo_args(&f, &out, &["--max-steps", "2"]);
        a.extend(extra);
        ok(1, &a);
        let m = metrics(&out);
        assert!(
            m[2]["loss"].as_f64().unwrap().is_finite(),
            "{name}: {}",
            m[2]
        );
        assert_eq!(
            m[2].get("nll_loss").is_some(),
            name == "rpo",
            "{name}: {}",
            m[2]
        );
    }
    // Settings that make no sense are refused.
    let bad_out = root.join("bad");
    let mut a = dpo_args(&f, &bad_out, &["--loss", "ipo", "--label-smoothing", "0.1"]);
    fails(1, &a, &["label_smoothing applies to the sigmoid loss only"]);
    a = dpo_args(&f, &bad_out, &["--beta", "0"]);
    fails(1, &a, &["beta must be a positive number"]);
    a = dpo_args(&f, &bad_out, &["--loss", "kto"]);
    fails(1, &a, &["unknown variant `kto`", "sigmoid"]);
    a = dpo_args(&f, &bad_out, &[]);
    a[2] = s(&nowhere);
    fails(1, &a, &["nowhere"]);

    // Resume: 4 steps, then --resume to 8, against 8 straight (constant learning rate, so the
    // first part's schedule is the whole run's). The cache is read back, not recomputed.
    let constant = [
        "--set",
        "train.min_lr=5e-5",
        "--set",
        "train.warmup_steps=0",
    ];
    let whole = root.join("whole");
    let mut a = dpo_args(&f, &whole, &["--max-steps", "8"]);
    a.extend(constant);
    ok(1, &a);
    let parts = root.join("parts");
    let mut a = dpo_args(&f, &parts, &["--max-steps", "4"]);
    a.extend(constant);
    let o = ok(1, &a);
    assert!(
        text(&o.stderr).contains("computed in"),
        "{}",
        text(&o.stderr)
    );
    let cache = parts.join("reference_logps.safetensors");
    let (bytes, mtime) = (
        std::fs::read(&cache).unwrap(),
        std::fs::metadata(&cache).unwrap().modified().unwrap(),
    );
    let mut a = dpo_args(&f, &parts, &["--max-steps", "8", "--resume"]);
    a.extend(constant);
    let o = ok(1, &a);
    let err = text(&o.stderr);
    assert!(
        err.contains("not recomputed") && !err.contains("computed in"),
        "{err}"
    );
    assert!(std::fs::read(&cache).unwrap() == bytes, "the cache changed");
    assert_eq!(
        std::fs::metadata(&cache).unwrap().modified().unwrap(),
        mtime
    );
    assert_eq!(metrics(&whole), metrics(&parts), "resumed run differs");
    // Resuming against another reference is refused (the first steps used the cached numbers).
    let mut a = dpo_args(&f, &parts, &["--max-steps", "8", "--resume"]);
    a.extend(["--reference", s(&f.pretrained)]);
    fails(1, &a, &["another reference model", "fresh run"]);
    // ... even with the cache gone: every checkpoint names the reference its steps used.
    std::fs::remove_file(&cache).unwrap();
    fails(1, &a, &["ckpt-0000008", "another reference model"]);
    // A fresh run without --resume refuses the directory, like every stage.
    fails(
        1,
        &dpo_args(&f, &parts, &[]),
        &["already holds checkpoints"],
    );

    // --reference: another model as the reference (the step-0 loss is then not ln 2).
    let other = root.join("other_ref");
    let mut a = dpo_args(&f, &other, &["--max-steps", "2"]);
    a.extend(["--reference", s(&f.pretrained)]);
    ok(1, &a);
    let m = metrics(&other);
    assert_ne!(m[0]["val_loss"].as_f64(), Some(std::f64::consts::LN_2));
    assert!(m[0]["val_kl"].as_f64().unwrap() > 0.0, "{}", m[0]);

    // Bad records: each kind fails with the file and line, or is skipped and counted.
    let good: Vec<String> = std::fs::read_to_string(f.data.join("rm_train.jsonl"))
        .unwrap()
        .lines()
        .take(6)
        .map(String::from)
        .collect();
    let long_prompt = "tell me more ".repeat(60);
    let bads = [
        (
            r#"{"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "4"}"#.to_string(),
            "chosen and rejected are identical",
        ),
        (
            r#"{"input": "What is 2 plus 2?", "choices": [{"text": "4", "rank": 1}, {"text": "4", "rank": 2}]}"#
                .to_string(),
            "are the same text",
        ),
        (
            r#"{"prompt": "What is 2 plus 2?", "chosen": "", "rejected": "5"}"#.to_string(),
            "empty response",
        ),
        (
            format!(r#"{{"prompt": "{long_prompt}", "chosen": "a", "rejected": "b"}}"#),
            "longer than the context",
        ),
        (
            r#"{"input": "What is 2 plus 2?", "choices": [{"text": "4", "rank": 1}, {"text": "5", "rank": 1}]}"#
                .to_string(),
            "all choices share one rank",
        ),
    ];
    for (bad, needle) in &bads {
        let lines = [&good[..3], std::slice::from_ref(bad), &good[3..]].concat();
        std::fs::write(&file, lines.join("\n")).unwrap();
        let out = root.join("bad_records");
        let _ = std::fs::remove_dir_all(&out);
        let mut a = dpo_args(&f, &out, &["--max-steps", "1"]);
        a[4] = s(&file);
        fails(1, &a, &["prefs.jsonl:4", needle]);
    }
    let all: Vec<String> = good
        .iter()
        .cloned()
        .chain(bads.iter().map(|b| b.0.clone()))
        .collect();
    std::fs::write(&file, all.join("\n")).unwrap();
    let out = root.join("skipped");
    let mut a = dpo_args(&f, &out, &["--max-steps", "1", "--skip-bad-records"]);
    a[4] = s(&file);
    let o = ok(1, &a);
    assert!(
        text(&o.stdout).contains("(5 bad records skipped)"),
        "{}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    let err = text(&o.stderr);
    assert!(err.contains("6 train prompts"), "{err}");
    assert!(
        err.contains("prefs.jsonl:7"),
        "the first skipped record is named: {err}"
    );
}

#[test]
fn dpo_runs_on_the_real_preference_samples() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    let shared = if shared.exists() {
        shared
    } else {
        PathBuf::from("/work/shared/data")
    };
    let (hh, se) = (
        shared.join("hh_rlhf_harmless_base_test.jsonl.gz"),
        shared.join("stack_exchange_paired_tiny.json"),
    );
    if !hh.exists() || !se.exists() {
        eprintln!("skipping: the shared data folder is absent");
        return;
    }
    let f = fixture();
    // A model with room for real dialogues (1 layer, context 512), briefly pretrained.
    let model = f.root.join("long");
    ok(
        1,
        &[
            "pretrain",
            "--data",
            s(&f.shards),
            "--tokenizer",
            s(&f.tok),
            "--out",
            s(&model),
            "--layers",
            "1",
            "--heads",
            "1",
            "--dim",
            "16",
            "--ctx",
            "512",
            "--batch-size",
            "1",
            "--max-steps",
            "2",
            "--eval-every",
            "2",
        ],
    );
    let out = f.root.join("real");
    let o = kiln(1)
        .args([
            "dpo",
            "--init",
            s(&model),
            "--data",
            s(&hh),
            "--data",
            s(&se),
            "--out",
            s(&out),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--eval-every",
            "2",
            "--skip-bad-records",
        ])
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    // Long dialogues do not fit 512 tokens: skipped and counted; the rest trains.
    assert!(err.contains("response longer than the context"), "{err}");
    let line = err.lines().find(|l| l.contains("train prompts")).unwrap();
    let n: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(n > 100, "{line}");
    let m = metrics(&out);
    assert_eq!(m[0]["val_loss"].as_f64(), Some(std::f64::consts::LN_2));
    assert!(m[2]["loss"].as_f64().unwrap().is_finite());
}
