//! Corrupt or mismatched state and bad data through the `kiln` binary: truncated and bit-flipped
//! checkpoint files, a checkpoint of another architecture, a tokenizer that does not match the
//! model, shards from another tokenizer or with damaged tokens, and datasets with a fraction of
//! malformed records. Each must fail with exit code 1 and a message naming the file (no panic), or,
//! with `--skip-bad-records`, report what was skipped.

mod common;

use common::{copy_files, s, text};
use std::path::{Path, PathBuf};
use std::process::Output;

const THREADS: usize = 1;

fn kiln(args: &[&str]) -> Output {
    common::kiln(THREADS)
        .args(args)
        .output()
        .expect("running kiln")
}

/// Runs kiln, asserting success; returns its stderr (where reports of skipped records go).
fn ok(args: &[&str]) -> String {
    text(&common::ok(THREADS, args).stderr)
}

fn fails(args: &[&str], needles: &[&str]) -> String {
    common::fails(THREADS, args, needles)
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    tok: PathBuf,
    shards: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let data = root.join("data");
    ok(&["data", "demo", "--out", s(&data), "--size", "tiny"]);
    let tok = root.join("tokenizer.json");
    ok(&[
        "tokenizer",
        "train",
        "--input",
        s(&data.join("corpus.jsonl")),
        "--vocab-size",
        "400",
        "--out",
        s(&tok),
    ]);
    let shards = root.join("shards");
    ok(&[
        "data",
        "prepare",
        "--tokenizer",
        s(&tok),
        "--input",
        s(&data.join("corpus.jsonl")),
        "--out",
        s(&shards),
        "--val-fraction",
        "0.05",
    ]);
    Fixture {
        _dir: dir,
        root,
        data,
        tok,
        shards,
    }
}

fn pretrain(f: &Fixture, out: &Path, dim: &str, extra: &[&str]) -> Output {
    let mut a = vec![
        "pretrain",
        "--data",
        s(&f.shards),
        "--tokenizer",
        s(&f.tok),
        "--out",
        s(out),
    ];
    a.extend([
        "--layers",
        "1",
        "--heads",
        "2",
        "--dim",
        dim,
        "--ctx",
        "16",
        "--max-steps",
        "4",
        "--batch-size",
        "2",
        "--ckpt-every",
        "2",
    ]);
    a.extend(["--set", "train.keep_last=0"]);
    a.extend(extra);
    kiln(&a)
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    let i = at.min(b.len() - 1);
    b[i] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

fn truncate(path: &Path, keep: usize) {
    let b = std::fs::read(path).unwrap();
    std::fs::write(path, &b[..keep.min(b.len())]).unwrap();
}

#[test]
fn corrupt_and_mismatched_state_is_detected() {
    let f = fixture();
    let run = f.root.join("run");
    assert!(pretrain(&f, &run, "16", &[]).status.success());
    let ckpt = run.join("ckpt-0000004");
    let fresh = |name: &str| -> PathBuf {
        let d = f.root.join(name);
        copy_files(&ckpt, &d);
        d
    };
    let generate = |dir: &Path| {
        kiln(&[
            "generate",
            "--model",
            s(dir),
            "--prompt",
            "Mia",
            "--max-new-tokens",
            "2",
        ])
    };
    assert!(generate(&ckpt).status.success());
    let gen_fails = |dir: &Path, needles: &[&str]| {
        fails(
            &[
                "generate",
                "--model",
                s(dir),
                "--prompt",
                "Mia",
                "--max-new-tokens",
                "2",
            ],
            needles,
        );
    };

    // Truncated and bit-flipped weights: the checksum names the file.
    let d = fresh("truncated");
    truncate(&d.join("model.safetensors"), 1000);
    gen_fails(&d, &["model.safetensors", "checksum mismatch"]);
    let d = fresh("flipped");
    flip(&d.join("model.safetensors"), 5000);
    gen_fails(&d, &["model.safetensors", "checksum mismatch"]);
    // Without checksums (a directory from elsewhere) the format checks still name the file.
    for (name, cut) in [("truncated_nosum", 1000), ("header_only", 6)] {
        let d = fresh(name);
        std::fs::remove_file(d.join("checksums.json")).unwrap();
        truncate(&d.join("model.safetensors"), cut);
        gen_fails(&d, &["model.safetensors"]);
    }
    let d = fresh("bad_checksums");
    std::fs::write(d.join("checksums.json"), "{\"model.safetensors\": ").unwrap();
    gen_fails(&d, &["checksums.json"]);
    let d = fresh("bad_config");
    std::fs::write(
        d.join("config.json"),
        "{\"vocab_size\": 400, \"n_embd\": 16}",
    )
    .unwrap();
    gen_fails(&d, &["config.json", "missing or not an integer"]);

    // A checkpoint of another architecture: its config.json and weights disagree.
    let other = f.root.join("other");
    assert!(pretrain(&f, &other, "32", &[]).status.success());
    let d = fresh("arch");
    std::fs::copy(
        other.join("ckpt-0000004/config.json"),
        d.join("config.json"),
    )
    .unwrap();
    std::fs::remove_file(d.join("checksums.json")).unwrap();
    gen_fails(&d, &["model.safetensors", "another architecture"]);
    // ... and resuming a run with another shape than its checkpoints.
    let o = pretrain(&f, &run, "32", &["--resume"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("ckpt-0000004")
            && err.contains("another architecture")
            && !err.contains("panicked"),
        "{err}"
    );

    // Damaged optimizer or trainer state in the checkpoint a resume starts from.
    for file in ["optimizer.safetensors", "trainer_state.json"] {
        let r = f.root.join(format!("resume_{file}"));
        copy_files(&run, &r);
        for c in ["ckpt-0000002", "ckpt-0000004"] {
            copy_files(&run.join(c), &r.join(c));
        }
        flip(&r.join("ckpt-0000004").join(file), 100);
        let o = pretrain(&f, &r, "16", &["--resume"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains(file) && err.contains("checksum mismatch") && !err.contains("panicked"),
            "{err}"
        );
    }

    // A tokenizer that does not match the model: another vocabulary size, or the same size but
    // other merges.
    let small = f.root.join("small_tok.json");
    ok(&[
        "tokenizer",
        "train",
        "--input",
        s(&f.data.join("corpus.jsonl")),
        "--vocab-size",
        "300",
        "--out",
        s(&small),
    ]);
    let d = fresh("tok_size");
    std::fs::copy(&small, d.join("tokenizer.json")).unwrap();
    gen_fails(&d, &["tokenizer.json", "400", "300"]);
    let same_size = f.root.join("same_size_tok.json");
    ok(&[
        "tokenizer",
        "train",
        "--input",
        s(&f.data.join("sft_train.jsonl")),
        "--field",
        "output",
        "--vocab-size",
        "400",
        "--out",
        s(&same_size),
    ]);
    let d = fresh("tok_other");
    std::fs::copy(&same_size, d.join("tokenizer.json")).unwrap();
    gen_fails(&d, &["tokenizer.json", "does not match"]);
    let d = fresh("tok_garbage");
    std::fs::write(d.join("tokenizer.json"), "{\"model\": ").unwrap();
    gen_fails(&d, &["tokenizer.json"]);

    // Shards from another tokenizer.
    let o = kiln(&[
        "pretrain",
        "--data",
        s(&f.shards),
        "--tokenizer",
        s(&same_size),
        "--out",
        s(&f.root.join("x")),
        "--max-steps",
        "1",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("tokenizer") && err.contains("kiln data prepare") && !err.contains("panicked"),
        "{err}"
    );
    // Damaged shards: a token beyond the vocabulary, a truncated file, a bad header.
    for (name, damage) in [("token", 0usize), ("truncated", 1), ("magic", 2)] {
        let sh = f.root.join(format!("shards_{name}"));
        copy_files(&f.shards, &sh);
        let file = sh.join("train_000.bin");
        match damage {
            0 => {
                let mut b = std::fs::read(&file).unwrap();
                b[64 + 2 * 100] = 0xff;
                b[64 + 2 * 100 + 1] = 0xff;
                std::fs::write(&file, b).unwrap();
            }
            1 => {
                let len = std::fs::metadata(&file).unwrap().len() as usize;
                truncate(&file, len - 3);
            }
            _ => flip(&file, 2),
        }
        let o = kiln(&[
            "pretrain",
            "--data",
            s(&sh),
            "--tokenizer",
            s(&f.tok),
            "--out",
            s(&f.root.join(format!("p_{name}"))),
            "--max-steps",
            "1",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains("train_000.bin") && !err.contains("panicked"),
            "{name}: {err}"
        );
    }
}

/// Writes `records` with every `every`-th one replaced by a malformed record (cycling through a
/// few kinds of damage); returns the 1-based line of the first bad one and how many are bad.
fn with_bad_records(src: &Path, dst: &Path, every: usize, bad: &[&str]) -> (usize, usize) {
    let text = std::fs::read_to_string(src).unwrap();
    let mut out = String::new();
    let (mut first, mut n) = (0, 0);
    for (i, line) in text.lines().enumerate() {
        if i % every == every - 1 {
            out.push_str(bad[n % bad.len()]);
            n += 1;
            if first == 0 {
                first = i + 1;
            }
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    std::fs::write(dst, out).unwrap();
    (first, n)
}

#[test]
fn bad_records_fail_with_file_and_line_or_are_skipped_and_counted() {
    let f = fixture();
    let model = f.root.join("model");
    assert!(pretrain(&f, &model, "16", &[]).status.success());
    let sft_bad = f.root.join("sft_bad.jsonl");
    let bad_sft = [
        "{\"instruction\": \"x\"",
        "{\"instruction\": \"q\", \"output\": 5}",
        "[1, 2]",
        "{\"messages\": [{\"role\": \"robot\", \"content\": \"hi\"}]}",
        "\u{0}\u{1}garbage",
    ];
    let (first, n) = with_bad_records(&f.data.join("sft_train.jsonl"), &sft_bad, 10, &bad_sft);
    let common = [
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--ckpt-every",
        "2",
        "--eval-every",
        "2",
    ];
    let sft_val = f.data.join("sft_val.jsonl");
    let mut a = vec![
        "sft",
        "--init",
        s(&model),
        "--data",
        s(&sft_bad),
        "--val-data",
        s(&sft_val),
        "--out",
    ];
    let out = f.root.join("sft1");
    a.push(s(&out));
    a.extend(common);
    fails(&a, &[&format!("sft_bad.jsonl:{first}:")]);
    a.push("--skip-bad-records");
    let err = ok(&a);
    assert!(err.contains(&format!("skipped {n} bad records")), "{err}");

    let rm_bad = f.root.join("rm_bad.jsonl");
    let bad_rm = [
        "{\"input\": \"x\", \"choices\": [{\"text\": \"a\", \"rank\": 0}]}",
        "{\"prompt\": \"p\", \"chosen\": 3, \"rejected\": \"r\"}",
        "not json",
        "{\"input\": \"x\", \"output\": \"y\", \"score\": \"high\"}",
    ];
    let (first, n) = with_bad_records(&f.data.join("rm_train.jsonl"), &rm_bad, 7, &bad_rm);
    let rm_val = f.data.join("rm_val.jsonl");
    let mut a = vec![
        "rm",
        "--init",
        s(&model),
        "--data",
        s(&rm_bad),
        "--val-data",
        s(&rm_val),
        "--out",
    ];
    let out = f.root.join("rm1");
    a.push(s(&out));
    a.extend(common);
    fails(&a, &[&format!("rm_bad.jsonl:{first}:")]);
    a.push("--skip-bad-records");
    let err = ok(&a);
    assert!(err.contains(&format!("skipped {n} bad records")), "{err}");
    // A file that is bad as a whole (not JSON at all) fails even with --skip-bad-records.
    let junk = f.root.join("junk.jsonl");
    std::fs::write(&junk, b"\x1f\x8b\x08garbage").unwrap();
    let o = f.root.join("rm2");
    fails(
        &[
            "rm",
            "--init",
            s(&model),
            "--data",
            s(&junk),
            "--out",
            s(&o),
            "--skip-bad-records",
            "--max-steps",
            "1",
        ],
        &["junk.jsonl"],
    );
}
