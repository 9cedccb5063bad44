//! End-to-end tests of the `kiln` binary: the whole pipeline on tiny demo data, exact resume after
//! a crash, and clear errors (exit code 1, no panic) on bad input.

mod common;

use common::{copy_files, s, text};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const THREADS: usize = 2;

fn kiln(args: &[&str]) -> Output {
    common::kiln(THREADS)
        .args(args)
        .output()
        .expect("running kiln")
}

/// Runs kiln, asserting success; returns its stdout.
fn ok(args: &[&str]) -> String {
    text(&common::ok(THREADS, args).stdout)
}

/// Runs kiln expecting a clean failure (exit code 1, no panic) whose message contains `needle`.
fn fails(args: &[&str], needle: &str) {
    common::fails(THREADS, args, &[needle]);
}

#[test]
fn tiny_pipeline_end_to_end() {
    pipeline_check("gpt2");
}

/// The whole pipeline on the Llama family: every stage, command and checkpoint in its own form.
#[test]
fn tiny_pipeline_end_to_end_llama() {
    let (_dir, out) = pipeline_check("llama");
    for stage in ["pretrain", "sft", "rm", "ppo"] {
        let dir = out.join(stage).join(
            std::fs::read_to_string(out.join(stage).join("latest"))
                .unwrap()
                .trim(),
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], "llama", "{stage}: {cfg}");
        let want = if stage == "rm" {
            "LlamaForSequenceClassification"
        } else {
            "LlamaForCausalLM"
        };
        assert_eq!(cfg["architectures"][0], want, "{stage}");
    }
    // A malformed prompt record stops GRPO (naming its line) unless --skip-bad-records, which
    // counts it and trains on the rest; the same for PPO.
    let prompts = out.join("bad_prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"What is 2 plus 3?\"}\n{\"nope\": 1}\n{\"prompt\": \"What is 4 plus 1?\"}\n",
    )
    .unwrap();
    let sft = out.join("sft");
    let grpo = |extra: &[&str], dir: &str| {
        let mut args = vec![
            "grpo",
            "--actor",
            s(&sft),
            "--prompts",
            s(&prompts),
            "--reward",
            "format",
            "--iterations",
            "1",
            "--prompts-per-iter",
            "2",
            "--group-size",
            "2",
            "--set",
            "grpo.minibatch=4",
        ];
        let d = out.join(dir);
        args.extend(["--out", s(&d)]);
        args.extend(extra);
        kiln(&args)
    };
    let o = grpo(&[], "grpo_bad");
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("bad_prompts.jsonl:2"),
        "{}",
        text(&o.stderr)
    );
    let o = grpo(&["--skip-bad-records"], "grpo_skip");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("skipped 1 bad records"),
        "{}",
        text(&o.stderr)
    );
    // Finished stages are reused only for the configuration that made them.
    let o = kiln(&["demo", "--size", "tiny", "--out", s(&out), "--arch", "gpt2"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("another configuration") && err.contains("--fresh"),
        "{err}"
    );
}

fn pipeline_check(arch: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    ok(&["demo", "--size", "tiny", "--out", s(&out), "--arch", arch]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for (stage, key) in [
        ("pretrain", "val_loss"),
        ("pretrain", "accuracy"),
        ("sft", "val_loss"),
        ("sft", "accuracy"),
        ("rm", "accuracy"),
        ("ppo", "reward_start"),
        ("ppo", "reward_end"),
        ("ppo", "kl_end"),
        ("ppo", "kl_heldout"),
        ("ppo", "accuracy"),
        ("dpo", "accuracy"),
        ("dpo", "well_formed"),
        ("dpo", "rm_score"),
        ("dpo", "kl_heldout"),
        ("dpo", "val_kl"),
        ("dpo", "val_reward_accuracy"),
        ("seconds", "dpo"),
    ] {
        assert!(
            summary[stage][key].is_number(),
            "summary.json lacks {stage}.{key}: {summary}"
        );
    }
    // Pretraining lowered the validation loss from its starting point (≈ ln 512).
    assert!(
        summary["pretrain"]["val_loss"].as_f64().unwrap()
            < summary["pretrain"]["val_loss_start"].as_f64().unwrap() - 0.5
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("side by side"), "{report}");
    assert!(
        report.contains("| DPO | ") && report.contains("RM + PPO"),
        "{report}"
    );
    // DPO starts from the SFT model, its own reference: ln 2 and no drift at step 0.
    assert_eq!(
        summary["dpo"]["val_loss_start"].as_f64(),
        Some(std::f64::consts::LN_2)
    );
    assert!(out.join("pretrain_loss.png").exists());
    // Every stage's output is a model directory the other commands accept.
    let gen = ok(&[
        "generate",
        "--model",
        s(&out.join("pretrain")),
        "--prompt",
        "Mia",
        "--max-new-tokens",
        "8",
        "--seed",
        "1",
    ]);
    assert!(gen.starts_with("Mia"), "{gen}");
    ok(&[
        "chat",
        "--model",
        s(&out.join("ppo")),
        "--prompt",
        "What is 2 plus 3?",
        "--max-new-tokens",
        "8",
    ]);
    let score = ok(&[
        "rm",
        "score",
        "--model",
        s(&out.join("rm")),
        "--prompt",
        "What is 2 plus 3?",
        "--response",
        "2 plus 3 is 5.",
    ]);
    assert!(score.starts_with("score "), "{score}");
    // `kiln eval --reward`: a checker program in another language, fed the prompt records' own
    // fields, scores the answers exactly as the demo judge does.
    let data = out.join("data");
    let mine = out.join("mine.jsonl");
    let mut lines = String::new();
    for l in std::fs::read_to_string(data.join("eval_prompts.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let q = v["prompt"].as_str().unwrap();
        let w: Vec<&str> = q.trim_end_matches('?').split(' ').collect();
        if let ["What", "is", a, op @ ("plus" | "minus"), b] = w[..] {
            let (a, b): (i64, i64) = (a.parse().unwrap(), b.parse().unwrap());
            let ans = if op == "plus" { a + b } else { a - b };
            lines += &format!(
                "{}\n",
                serde_json::json!({"prompt": q, "answer": ans.to_string(), "kind": op})
            );
        }
    }
    std::fs::write(&mine, lines).unwrap();
    let checker = "python3 -u -c 'import sys,json,re\nfor l in sys.stdin:\n r=json.loads(l); n=re.findall(r\"-?[0-9]+\",r[\"response\"]); print(1.0 if n and n[-1]==r[\"answer\"] else 0.0)'";
    let sft_dir = out.join("sft");
    let program = format!("cmd:{checker}");
    let o = ok(&[
        "eval",
        "--model",
        s(&sft_dir),
        "--prompts",
        s(&mine),
        "--by",
        "kind",
        "--show",
        "1000",
        "--reward",
        &program,
        "--reward",
        "format",
        "--reward-weight",
        "1",
        "--reward-weight",
        "0",
    ]);
    // Every shown answer's reward is what the checker's rule gives (the last number is the answer).
    let answers: std::collections::HashMap<String, String> = std::fs::read_to_string(&mine)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["prompt"].as_str().unwrap().to_string(),
                v["answer"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let (mut shown, mut right) = (0, 0);
    for l in o
        .lines()
        .filter(|l| l.starts_with('+') || l.starts_with('-'))
    {
        let (score, rest) = l.split_once(' ').unwrap();
        let (q, a) = rest.split_once(" -> ").unwrap();
        let (q, a): (String, String) = (
            serde_json::from_str(q).unwrap(),
            serde_json::from_str(a).unwrap(),
        );
        let last = a
            .split(|c: char| !(c.is_ascii_digit() || c == '-'))
            .rfind(|w| w.parse::<i64>().is_ok());
        let want = if last == Some(answers[&q].as_str()) {
            1.0
        } else {
            0.0
        };
        assert_eq!(score.parse::<f64>().unwrap(), want, "{l}");
        shown += 1;
        right += want as usize;
    }
    assert_eq!(shown, answers.len(), "{o}");
    let acc = format!("accuracy {:.4}", right as f64 / shown as f64);
    assert!(o.contains(&acc), "{acc} in {o}");
    assert!(
        o.contains("reward/format") && o.contains("by kind:") && o.contains("plus n"),
        "{o}"
    );
    // A second run reuses every finished stage.
    let o = kiln(&["demo", "--size", "tiny", "--out", s(&out), "--arch", arch]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("[ppo] finished earlier"), "{err}");
    assert!(err.contains("[dpo] finished earlier"), "{err}");
    (dir, out)
}

fn losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_u64()?, v.get("loss")?.as_f64()?))
        })
        .collect()
}

fn prepare_tiny(root: &Path) -> (PathBuf, PathBuf) {
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
    (tok, shards)
}

#[test]
fn resume_after_crash_continues_exactly() {
    resume_check(&[]);
}

#[test]
fn resume_after_crash_continues_exactly_llama() {
    resume_check(&["--arch", "llama", "--kv-heads", "1", "--ffn", "48"]);
}

fn resume_check(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let (tok, shards) = prepare_tiny(dir.path());
    let common = |out: &Path| -> Vec<String> {
        [
            "pretrain",
            "--data",
            s(&shards),
            "--tokenizer",
            s(&tok),
            "--out",
            s(out),
            "--layers",
            "2",
            "--heads",
            "2",
            "--dim",
            "32",
            "--ctx",
            "32",
            "--max-steps",
            "30",
            "--batch-size",
            "4",
            "--ckpt-every",
            "10",
            "--eval-every",
            "10",
            "--set",
            "train.keep_last=0",
        ]
        .iter()
        .chain(extra)
        .map(|x| x.to_string())
        .collect()
    };
    let a = dir.path().join("a");
    let args: Vec<String> = common(&a);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let full = losses(&a);
    // Steps 1..=30 log a loss (step 0 logs only the starting evaluation).
    assert_eq!(full.len(), 30, "{full:?}");
    // A crash after step 10's checkpoint: later checkpoints never written, metrics logged past it.
    let b = dir.path().join("b");
    std::fs::create_dir_all(&b).unwrap();
    for f in ["metrics.jsonl", "run_config.toml"] {
        std::fs::copy(a.join(f), b.join(f)).unwrap();
    }
    copy_files(&a.join("ckpt-0000010"), &b.join("ckpt-0000010"));
    std::fs::write(b.join("latest"), "ckpt-0000010").unwrap();
    // A half-written later checkpoint (no checksums file) must be ignored.
    std::fs::create_dir_all(b.join(".ckpt-0000020.tmp-1")).unwrap();
    let mut args = common(&b);
    args.push("--resume".into());
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let resumed = losses(&b);
    assert_eq!(resumed.len(), full.len(), "{resumed:?}");
    for (x, y) in full.iter().zip(&resumed) {
        assert_eq!(x, y, "losses differ after resume");
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fails(
        &[
            "tokenizer",
            "train",
            "--input",
            s(&d.join("missing.txt")),
            "--vocab-size",
            "300",
            "--out",
            s(&d.join("t.json")),
        ],
        "missing.txt",
    );
    std::fs::write(d.join("bad.jsonl"), "{\"text\": \"ok\"}\n{not json\n").unwrap();
    fails(
        &[
            "tokenizer",
            "train",
            "--input",
            s(&d.join("bad.jsonl")),
            "--vocab-size",
            "300",
            "--out",
            s(&d.join("t.json")),
        ],
        "bad.jsonl:2",
    );
    std::fs::write(d.join("a.txt"), "hello world\n").unwrap();
    fails(
        &[
            "tokenizer",
            "train",
            "--input",
            s(&d.join("a.txt")),
            "--vocab-size",
            "100",
            "--out",
            s(&d.join("t.json")),
        ],
        "too small",
    );
    fails(
        &["generate", "--model", s(&d.join("nope")), "--prompt", "x"],
        "nope",
    );
    let (tok, shards) = prepare_tiny(d);
    fails(
        &[
            "pretrain",
            "--data",
            s(&shards),
            "--tokenizer",
            s(&tok),
            "--out",
            s(&d.join("p")),
            "--heads",
            "5",
            "--dim",
            "32",
            "--max-steps",
            "1",
        ],
        "must divide",
    );
    fails(
        &[
            "pretrain",
            "--data",
            s(&shards),
            "--tokenizer",
            s(&tok),
            "--set",
            "train.bogus=1",
        ],
        "bogus",
    );
}

fn shared_data() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if p.join("alpaca_tiny.json").exists() {
        Some(p)
    } else {
        eprintln!("skipping: ../shared/data is absent");
        None
    }
}

#[test]
fn real_data_samples_load_and_train_a_few_steps() {
    let Some(shared) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tok = d.join("tokenizer.json");
    let shakespeare = shared.join("tinyshakespeare.txt");
    ok(&[
        "tokenizer",
        "train",
        "--input",
        s(&shakespeare),
        "--vocab-size",
        "600",
        "--out",
        s(&tok),
    ]);
    ok(&[
        "data",
        "prepare",
        "--tokenizer",
        s(&tok),
        "--input",
        s(&shakespeare),
        "--out",
        s(&d.join("shards")),
    ]);
    let pre = d.join("pre");
    ok(&[
        "pretrain",
        "--data",
        s(&d.join("shards")),
        "--tokenizer",
        s(&tok),
        "--out",
        s(&pre),
        "--layers",
        "1",
        "--heads",
        "2",
        "--dim",
        "32",
        "--ctx",
        "128",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
    ]);
    for (i, f) in ["alpaca_tiny.json", "chat_tiny.json"].iter().enumerate() {
        let out = d.join(format!("sft{i}"));
        let o = ok(&[
            "sft",
            "--init",
            s(&pre),
            "--data",
            s(&shared.join(f)),
            "--out",
            s(&out),
            "--max-steps",
            "3",
            "--batch-size",
            "2",
        ]);
        assert!(o.contains("sft: 3 steps"), "{o}");
    }
    for (i, f) in [
        "hh_rlhf_harmless_base_test.jsonl.gz",
        "stack_exchange_paired_tiny.json",
        "hh_rlhf_tiny.json",
    ]
    .iter()
    .enumerate()
    {
        let out = d.join(format!("rm{i}"));
        let o = ok(&[
            "rm",
            "--init",
            s(&pre),
            "--data",
            s(&shared.join(f)),
            "--out",
            s(&out),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--skip-bad-records",
            "--set",
            "val_fraction=0",
        ]);
        assert!(o.contains("rm: 2 steps"), "{o}");
    }
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, shards) = prepare_tiny(dir.path());
    let out = dir.path().join("run");
    let args = [
        "--quiet",
        "pretrain",
        "--data",
        s(&shards),
        "--tokenizer",
        s(&tok),
        "--out",
        s(&out),
        "--layers",
        "2",
        "--heads",
        "2",
        "--dim",
        "32",
        "--ctx",
        "32",
        "--max-steps",
        "100000",
        "--batch-size",
        "4",
        "--ckpt-every",
        "0",
        "--eval-every",
        "0",
    ];
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way, then interrupt it as Ctrl-C would.
    let metrics = out.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics)
        .map(|m| m.lines().count())
        .unwrap_or(0)
        < 5
    {
        assert!(t0.elapsed().as_secs() < 60, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("checkpoint saved at step"), "{err}");
    let saved = std::fs::read_to_string(out.join("latest")).unwrap();
    let step: u64 = saved.trim().trim_start_matches("ckpt-").parse().unwrap();
    assert!((4..100_000).contains(&step), "{saved}");
    // A fresh run into the same folder is refused: it would mix with the saved one.
    fails(
        &[
            "pretrain",
            "--data",
            s(&shards),
            "--tokenizer",
            s(&tok),
            "--out",
            s(&out),
            "--layers",
            "2",
            "--heads",
            "2",
            "--dim",
            "32",
            "--ctx",
            "32",
            "--max-steps",
            "5",
        ],
        "--resume",
    );
}

/// A BERT-style encoder of either family: masked-LM pretraining, then fill-mask on its checkpoint.
#[test]
fn mlm_encoder_of_either_family() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, shards) = prepare_tiny(dir.path());
    for arch in ["gpt2", "llama"] {
        let out = dir.path().join(format!("mlm-{arch}"));
        let o = ok(&[
            "pretrain",
            "--objective",
            "mlm",
            "--arch",
            arch,
            "--data",
            s(&shards),
            "--tokenizer",
            s(&tok),
            "--out",
            s(&out),
            "--layers",
            "1",
            "--heads",
            "2",
            "--dim",
            "32",
            "--ctx",
            "32",
            "--max-steps",
            "5",
            "--batch-size",
            "4",
        ]);
        assert!(o.contains("pretrain: 5 steps"), "{o}");
        let fill = ok(&["fill-mask", "--model", s(&out), "The ball is <|mask|>."]);
        assert!(!fill.trim().is_empty(), "{arch}: {fill}");
    }
}

/// A run folder in use is locked: a second trainer on it stops at once naming the first's pid; after
/// the first is killed with SIGKILL, `--resume` is not blocked by the stale lock.
#[test]
fn a_second_trainer_on_a_running_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, shards) = prepare_tiny(dir.path());
    let out = dir.path().join("run");
    let args = |steps: &str, extra: &[&str]| -> Vec<String> {
        [
            "pretrain",
            "--data",
            s(&shards),
            "--tokenizer",
            s(&tok),
            "--out",
            s(&out),
            "--layers",
            "2",
            "--heads",
            "2",
            "--dim",
            "32",
            "--ctx",
            "32",
            "--max-steps",
            steps,
            "--batch-size",
            "4",
            "--ckpt-every",
            "5",
            "--eval-every",
            "0",
        ]
        .iter()
        .chain(extra)
        .map(|x| x.to_string())
        .collect()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--quiet")
        .args(args("1000000", &[]))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !out.join("latest").exists() {
        assert!(t0.elapsed().as_secs() < 60, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = args("10", &["--resume"]);
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    fails(
        &second,
        &format!("in use by another Kiln process (pid {})", child.id()),
    );
    child.kill().unwrap();
    child.wait().unwrap();
    // The killed run's lock went with it: the same resume now runs.
    let o = kiln(&second);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `--precision bf16` trains in f32 where bf16 has no hardware (here forced with KILN_AMX=0 and
/// KILN_SIMD=avx2, which turn off AMX and AVX512-BF16), and says so; KILN_FORCE_BF16=1 keeps bf16.
#[test]
fn bf16_falls_back_to_f32_without_bf16_hardware_and_says_so() {
    let args = [
        "bench",
        "train",
        "--layers",
        "1",
        "--dim",
        "32",
        "--heads",
        "2",
        "--ctx",
        "16",
        "--vocab",
        "128",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--precision",
        "bf16",
    ];
    let o = common::kiln(THREADS)
        .env("KILN_AMX", "0")
        .env("KILN_SIMD", "avx2")
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success());
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(out.contains("precision=f32"), "{out}");
    assert!(err.contains("training in f32"), "{err}");
    let o = common::kiln(THREADS)
        .env("KILN_AMX", "0")
        .env("KILN_SIMD", "avx2")
        .env("KILN_FORCE_BF16", "1")
        .args(args)
        .output()
        .unwrap();
    assert!(
        text(&o.stdout).contains("precision=bf16 (no bf16 hardware"),
        "{}",
        text(&o.stdout)
    );
}
