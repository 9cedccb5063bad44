//! Crash safety: `kill -9` at many moments of pretraining, SFT, reward-model training, PPO and DPO
//! (before the first checkpoint, inside checkpoint writes, between a checkpoint and its `latest`
//! pointer, between steps, at the very end), then `--resume` to completion: the metrics must be
//! identical to an uninterrupted run's (same seed, same --threads). Also a full disk (a file-size
//! limit) during a checkpoint write: the previous checkpoint stays intact and resumable.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn kiln() -> Command {
    common::kiln(1)
}

fn s(p: &Path) -> String {
    common::s(p).to_string()
}

fn ok(args: &[String]) {
    common::ok(1, args);
}

/// When to kill a run.
#[derive(Clone, Copy, Debug)]
enum When {
    /// This long after the start (before the first checkpoint, usually).
    After(Duration),
    /// `metrics.jsonl` has this many lines.
    Lines(usize),
    /// A temporary directory of checkpoint `step` (or later) appears: inside the write.
    CkptWrite(u64),
    /// Checkpoint `step` (or later) has its name: before or just after `latest` is updated.
    Ckpt(u64),
}

fn ckpt_step(name: &str) -> Option<(u64, bool)> {
    if let Some(rest) = name.strip_prefix(".ckpt-") {
        let (num, kind) = rest.split_once('.')?;
        return Some((num.parse().ok()?, kind.starts_with("tmp-")));
    }
    Some((name.strip_prefix("ckpt-")?.parse().ok()?, false))
}

/// (newest temporary checkpoint step, newest named checkpoint step)
fn scan(out: &Path) -> (Option<u64>, Option<u64>) {
    let (mut tmp, mut named) = (None, None);
    if let Ok(rd) = std::fs::read_dir(out) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            match ckpt_step(&name) {
                Some((st, true)) => tmp = tmp.max(Some(st)),
                Some((st, false)) if !name.starts_with('.') => named = named.max(Some(st)),
                _ => {}
            }
        }
    }
    (tmp, named)
}

fn metric_lines(out: &Path) -> usize {
    std::fs::read(out.join("metrics.jsonl"))
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

#[derive(Default, Debug)]
struct Tally {
    /// Kills that interrupted a running process.
    interrupted: usize,
    /// ... of which landed inside a checkpoint write (a temporary directory was left behind).
    in_ckpt_write: usize,
    /// Kill points the run finished before reaching.
    missed: usize,
}

/// Starts `args`, kills it with SIGKILL at `when`; returns whether the kill interrupted it.
fn run_and_kill(args: &[String], out: &Path, when: When, tally: &mut Tally) {
    let log = out.with_extension("stderr");
    let err = std::fs::File::create(&log).unwrap();
    let mut child = kiln()
        .args(args)
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("spawning kiln");
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let e = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                status.success(),
                "kiln {args:?} failed before the kill point {when:?}: {status}\n{e}"
            );
            tally.missed += 1;
            return;
        }
        let hit = match when {
            When::After(d) => t0.elapsed() >= d,
            When::Lines(n) => metric_lines(out) >= n,
            When::CkptWrite(k) => {
                scan(out).0.is_some_and(|s| s >= k) || scan(out).1.is_some_and(|s| s > k)
            }
            When::Ckpt(k) => scan(out).1.is_some_and(|s| s >= k),
        };
        if hit {
            let _ = child.kill();
            let status = child.wait().unwrap();
            if status.signal() == Some(9) {
                tally.interrupted += 1;
                if scan(out).0.is_some() {
                    tally.in_ckpt_write += 1;
                }
            } else {
                assert!(status.success(), "kiln {args:?}: {status}");
                tally.missed += 1;
            }
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "kiln {args:?} ran too long"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// metrics.jsonl without the wall-clock fields.
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", out.display()));
            v.as_object_mut()
                .unwrap()
                .retain(|k, _| !k.contains("per_s") && !k.contains("seconds"));
            v
        })
        .collect()
}

fn compare(stage: &str, reference: &[serde_json::Value], got: &[serde_json::Value], keys: &[&str]) {
    assert_eq!(
        reference.len(),
        got.len(),
        "{stage}: {} metric lines after resume, {} uninterrupted",
        got.len(),
        reference.len()
    );
    for (a, b) in reference.iter().zip(got) {
        for k in keys {
            assert!(
                a.get(k).is_some() || a["step"] == 0,
                "{stage}: no {k} in {a}"
            );
        }
        assert_eq!(a, b, "{stage}: metrics differ after kill -9 and --resume");
    }
}

/// Runs `args` (a stage writing to `out`) killed at each of `points`, resuming each time, then to
/// completion; the metrics must equal `reference`'s.
fn crash_and_resume(
    stage: &str,
    args: &dyn Fn(&Path) -> Vec<String>,
    root: &Path,
    points: &[When],
    keys: &[&str],
    tally: &mut Tally,
) {
    let reference = root.join(format!("{stage}_ref"));
    ok(&args(&reference));
    let out = root.join(format!("{stage}_crash"));
    for (i, &when) in points.iter().enumerate() {
        let mut a = args(&out);
        if i > 0 {
            a.push("--resume".into());
        }
        run_and_kill(&a, &out, when, tally);
    }
    let mut a = args(&out);
    a.push("--resume".into());
    ok(&a);
    compare(stage, &metrics(&reference), &metrics(&out), keys);
    // No leftovers of the interrupted writes once a resumed run has written its own checkpoints.
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".ckpt-"))
        .collect();
    assert!(left.is_empty(), "{stage}: leftovers {left:?}");
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
    ok(&["data", "demo", "--out", &s(&data), "--size", "tiny"].map(String::from));
    let tok = root.join("tokenizer.json");
    ok(&[
        "tokenizer",
        "train",
        "--input",
        &s(&data.join("corpus.jsonl")),
        "--vocab-size",
        "400",
        "--out",
        &s(&tok),
    ]
    .map(String::from));
    let shards = root.join("shards");
    ok(&[
        "data",
        "prepare",
        "--tokenizer",
        &s(&tok),
        "--input",
        &s(&data.join("corpus.jsonl")),
        "--out",
        &s(&shards),
        "--val-fraction",
        "0.05",
    ]
    .map(String::from));
    Fixture {
        _dir: dir,
        root,
        data,
        tok,
        shards,
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn pretrain_args(f: &Fixture, out: &Path, steps: u64) -> Vec<String> {
    let mut a = strings(&[
        "pretrain",
        "--layers",
        "2",
        "--heads",
        "2",
        "--dim",
        "32",
        "--ctx",
        "32",
        "--batch-size",
        "4",
        "--ckpt-every",
        "5",
    ]);
    a.extend([
        "--data".into(),
        s(&f.shards),
        "--tokenizer".into(),
        s(&f.tok),
        "--out".into(),
        s(out),
    ]);
    a.extend(strings(&[
        "--eval-every",
        "10",
        "--set",
        "train.keep_last=2",
        "--max-steps",
    ]));
    a.push(steps.to_string());
    a
}

#[test]
fn kill_9_at_many_moments_then_resume_matches_an_uninterrupted_run() {
    let t0 = Instant::now();
    let f = fixture();
    let root = f.root.clone();
    let mut tally = Tally::default();
    let ms = Duration::from_millis;

    // Pretraining: 40 steps, a checkpoint every 5 (2 kept), 41 metric lines (step 0 included).
    let pre = |out: &Path| pretrain_args(&f, out, 40);
    let points = [
        When::After(ms(15)),
        When::CkptWrite(5),
        When::Lines(13),
        When::Ckpt(15),
        When::CkptWrite(20),
        When::Lines(29),
        When::CkptWrite(30),
        When::Ckpt(35),
        When::CkptWrite(40),
    ];
    crash_and_resume(
        "pretrain",
        &pre,
        &root,
        &points,
        &["loss", "grad_norm", "lr"],
        &mut tally,
    );
    let pretrained = root.join("pretrain_ref");

    // SFT from the pretrained model: 30 steps, a checkpoint every 5.
    let d = &f.data;
    let sft = |out: &Path| -> Vec<String> {
        let mut a = strings(&[
            "sft",
            "--batch-size",
            "4",
            "--ckpt-every",
            "5",
            "--eval-every",
            "10",
            "--max-steps",
            "30",
            "--set",
            "train.keep_last=2",
        ]);
        a.extend([
            "--init".into(),
            s(&pretrained),
            "--data".into(),
            s(&d.join("sft_train.jsonl")),
            "--val-data".into(),
            s(&d.join("sft_val.jsonl")),
        ]);
        a.extend(["--out".into(), s(out)]);
        a
    };
    let points = [
        When::After(ms(10)),
        When::CkptWrite(5),
        When::Lines(12),
        When::Ckpt(15),
        When::CkptWrite(20),
        When::Lines(27),
        When::CkptWrite(30),
    ];
    crash_and_resume(
        "sft",
        &sft,
        &root,
        &points,
        &["loss", "grad_norm"],
        &mut tally,
    );
    let sft_model = root.join("sft_ref");

    // Reward model from the SFT model: 20 steps, a checkpoint every 4; its last checkpoint is
    // rewritten after training (reward statistics), a second write the kills can land in.
    let rm = |out: &Path| -> Vec<String> {
        let mut a = strings(&[
            "rm",
            "--batch-size",
            "2",
            "--ckpt-every",
            "4",
            "--eval-every",
            "10",
            "--max-steps",
            "20",
            "--set",
            "train.keep_last=2",
        ]);
        a.extend([
            "--init".into(),
            s(&sft_model),
            "--data".into(),
            s(&d.join("rm_train.jsonl")),
            "--val-data".into(),
            s(&d.join("rm_val.jsonl")),
        ]);
        a.extend(["--out".into(), s(out)]);
        a
    };
    let points = [
        When::After(ms(10)),
        When::CkptWrite(4),
        When::Lines(9),
        When::Ckpt(12),
        When::CkptWrite(16),
        When::CkptWrite(20),
        When::Ckpt(20),
    ];
    crash_and_resume(
        "rm",
        &rm,
        &root,
        &points,
        &["loss", "grad_norm"],
        &mut tally,
    );
    let rm_model = root.join("rm_ref");
    // The resumed reward model carries its reward statistics like the uninterrupted one.
    let meta = |dir: &Path| -> serde_json::Value {
        let latest = std::fs::read_to_string(dir.join("latest")).unwrap();
        serde_json::from_slice(&std::fs::read(dir.join(latest.trim()).join("kiln.json")).unwrap())
            .unwrap()
    };
    assert_eq!(
        meta(&rm_model)["reward_mean"],
        meta(&root.join("rm_crash"))["reward_mean"]
    );
    assert!(meta(&rm_model)["reward_mean"].is_number());

    // PPO: 8 iterations, a checkpoint every 2.
    let ppo = |out: &Path| -> Vec<String> {
        let mut a = strings(&[
            "ppo",
            "--iterations",
            "8",
            "--set",
            "ppo.rollout_batch=8",
            "--set",
            "ppo.minibatch=4",
            "--set",
            "ppo.ckpt_every=2",
        ]);
        a.extend(strings(&[
            "--set",
            "ppo.max_new_tokens=8",
            "--set",
            "ppo.eval_every=4",
            "--set",
            "ppo.keep_last=2",
        ]));
        a.extend([
            "--actor".into(),
            s(&sft_model),
            "--reward-model".into(),
            s(&rm_model),
            "--prompts".into(),
            s(&d.join("ppo_prompts.jsonl")),
        ]);
        a.extend(["--out".into(), s(out)]);
        a
    };
    let points = [
        When::After(ms(20)),
        When::CkptWrite(2),
        When::Lines(3),
        When::Ckpt(4),
        When::CkptWrite(6),
        When::Lines(7),
        When::CkptWrite(8),
    ];
    crash_and_resume("ppo", &ppo, &root, &points, &["reward", "kl"], &mut tally);

    // DPO from the SFT model on the rankings: 12 steps, a checkpoint every 3. The first kill lands
    // while the reference log-probabilities are computed or cached; later runs read the cache.
    let dpo = |out: &Path| -> Vec<String> {
        let mut a = strings(&[
            "dpo",
            "--batch-size",
            "2",
            "--ckpt-every",
            "3",
            "--eval-every",
            "6",
            "--max-steps",
            "12",
            "--set",
            "train.keep_last=2",
        ]);
        a.extend([
            "--init".into(),
            s(&sft_model),
            "--data".into(),
            s(&d.join("rm_train.jsonl")),
            "--val-data".into(),
            s(&d.join("rm_val.jsonl")),
        ]);
        a.extend(["--out".into(), s(out)]);
        a
    };
    let points = [
        When::After(ms(10)),
        When::CkptWrite(3),
        When::Lines(5),
        When::Ckpt(6),
        When::CkptWrite(9),
        When::Lines(12),
        When::CkptWrite(12),
    ];
    crash_and_resume(
        "dpo",
        &dpo,
        &root,
        &points,
        &["loss", "grad_norm", "rewards/margins"],
        &mut tally,
    );
    // The interrupted run's cache holds the same numbers as the uninterrupted run's.
    let cache =
        |stage: &str| std::fs::read(root.join(stage).join("reference_logps.safetensors")).unwrap();
    assert!(
        cache("dpo_ref") == cache("dpo_crash"),
        "the reference caches differ"
    );

    eprintln!(
        "crash test: {} kill -9 interruptions ({} inside a checkpoint write), {} kill points reached after the run had finished; {:.1}s",
        tally.interrupted,
        tally.in_ckpt_write,
        tally.missed,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        tally.interrupted >= 15,
        "too few real interruptions: {tally:?}"
    );
    assert!(
        tally.in_ckpt_write >= 3,
        "too few kills inside a checkpoint write: {tally:?}"
    );
}

#[test]
fn a_full_disk_during_a_checkpoint_keeps_the_previous_one() {
    let f = fixture();
    let reference = f.root.join("ref");
    ok(&pretrain_args(&f, &reference, 20));
    let out = f.root.join("full");
    let mut tally = Tally::default();
    run_and_kill(
        &pretrain_args(&f, &out, 20),
        &out,
        When::Ckpt(10),
        &mut tally,
    );
    let (_, named) = scan(&out);
    let good = named.expect("a checkpoint before the disk fills");
    assert!(tally.interrupted == 1 && good >= 10, "{tally:?} {named:?}");
    let mut resume = pretrain_args(&f, &out, 20);
    resume.push("--resume".into());
    // The next checkpoint's weights (160 KB) exceed a 64-block file-size limit; metrics do not.
    // 1. SIGXFSZ's default action kills the process in the middle of the write.
    let quoted: Vec<String> = resume.iter().map(|a| format!("'{a}'")).collect();
    let bin = env!("CARGO_BIN_EXE_kiln");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -f 64; exec '{bin}' --quiet --threads 1 {}",
            quoted.join(" ")
        ))
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "the run should not survive a full disk"
    );
    assert_eq!(o.status.signal(), Some(libc_sigxfsz()), "{o:?}");
    // 2. With SIGXFSZ ignored the write fails with EFBIG: a clear error, exit code 1, no panic.
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f 64; exec '{bin}' --quiet --threads 1 {}",
            quoted.join(" ")
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("writing checkpoint") && err.contains("previous checkpoints are intact"),
        "{err}"
    );
    // The previous checkpoint is the newest complete one, it loads, and --resume finishes exactly.
    assert_eq!(
        scan(&out).1,
        Some(good),
        "a checkpoint after the failed write appeared"
    );
    let ckpt = out.join(format!("ckpt-{good:07}"));
    let o = kiln()
        .args([
            "generate",
            "--model",
            &s(&ckpt),
            "--prompt",
            "Mia",
            "--max-new-tokens",
            "4",
            "--seed",
            "1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ok(&resume);
    compare("pretrain", &metrics(&reference), &metrics(&out), &["loss"]);
    // A kill between the two renames of a checkpoint rewrite (the old copy moved aside, the new
    // one not yet in place) leaves no `ckpt-0000020`: --resume puts the complete copy back.
    let last = out.join("ckpt-0000020");
    std::fs::rename(&last, out.join(".ckpt-0000020.old-999999")).unwrap();
    ok(&resume);
    assert!(last.join("checksums.json").exists());
    assert_eq!(
        std::fs::read_to_string(out.join("latest")).unwrap(),
        "ckpt-0000020"
    );
    assert!(!out.join(".ckpt-0000020.old-999999").exists());
    compare("pretrain", &metrics(&reference), &metrics(&out), &["loss"]);
}

/// SIGXFSZ on Linux.
fn libc_sigxfsz() -> i32 {
    25
}
