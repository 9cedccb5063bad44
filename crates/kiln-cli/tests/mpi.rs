//! Data parallel on MPI (`--features mpi`; needs `mpirun`): `mpirun -np 2` with one thread per rank
//! against one process with two threads, same global batch and seed — the losses and final weights
//! agree to 1e-5 for pretraining, SFT, GRPO and PPO; a rank killed mid-run stops the other within seconds,
//! a stopped rank trips the watchdog, a rank's error ends the job, and `--resume` from the killed
//! run's checkpoint with 1 or 2 ranks gives the uninterrupted run's figures.
#![cfg(feature = "mpi")]

mod common;

use common::{ok, s, text};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `mpirun -np N kiln --quiet --threads 1 ARGS` (allowed as root, as CI runs).
fn mpirun(n: usize, args: &[String]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &n.to_string(), "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(["--quiet", "--threads", "1"])
        .args(args);
    c
}

fn mpi_ok(n: usize, args: &[String]) -> Output {
    let o = mpirun(n, args).output().expect("running mpirun");
    assert!(
        o.status.success(),
        "mpirun -np {n} kiln {args:?} failed:\n{}",
        text(&o.stderr)
    );
    o
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

/// A small Llama-family pretraining run: 2 micro-batches of 4 sequences per step.
fn pretrain_args(f: &Fixture, out: &Path, steps: u64, ckpt_every: u64) -> Vec<String> {
    let mut a = strings(&[
        "pretrain",
        "--arch",
        "llama",
        "--kv-heads",
        "1",
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
        "--grad-accum",
        "2",
        "--eval-every",
        "25",
        "--set",
        "train.keep_last=3",
    ]);
    a.extend(strings(&["--data", s(&f.shards), "--tokenizer", s(&f.tok)]));
    a.extend(strings(&["--out", s(out)]));
    a.extend(strings(&["--max-steps", &steps.to_string()]));
    a.extend(strings(&["--ckpt-every", &ckpt_every.to_string()]));
    a
}

/// (step, loss) of every training step in metrics.jsonl.
fn losses(run: &Path, key: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((v["step"].as_u64()?, v.get(key)?.as_f64()?))
        })
        .collect()
}

fn final_params(run: &Path) -> Vec<f32> {
    let latest = std::fs::read_to_string(run.join("latest")).unwrap();
    kiln_model::checkpoint::load_model(&run.join(latest.trim()))
        .unwrap()
        .params
}

/// The two runs' losses agree to `rel` (relative) at every step and their final weights to `abs`.
fn assert_close(what: &str, a: &Path, b: &Path, key: &str, steps: usize, rel: f64, abs: f32) {
    let (la, lb) = (losses(a, key), losses(b, key));
    assert_eq!(
        la.len(),
        steps,
        "{what}: {} {key} lines in {}",
        la.len(),
        a.display()
    );
    assert_eq!(
        la.iter().map(|x| x.0).collect::<Vec<_>>(),
        lb.iter().map(|x| x.0).collect::<Vec<_>>(),
        "{what}: logged at other steps"
    );
    let worst = la
        .iter()
        .zip(&lb)
        .map(|(x, y)| (x.1 - y.1).abs() / y.1.abs().max(1e-12))
        .fold(0.0, f64::max);
    assert!(
        worst <= rel,
        "{what}: {key} differs by {worst:e} (relative)"
    );
    let (pa, pb) = (final_params(a), final_params(b));
    assert_eq!(pa.len(), pb.len());
    let wmax = pa
        .iter()
        .zip(&pb)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(wmax <= abs, "{what}: final weights differ by {wmax:e}");
    eprintln!(
        "{what}: max relative {key} difference {worst:.2e}, max weight difference {wmax:.2e}"
    );
}

#[test]
fn two_ranks_match_one_process_with_two_threads() {
    let f = fixture();
    let (one, two) = (f.root.join("pre1"), f.root.join("pre2"));
    ok(2, &pretrain_args(&f, &one, 50, 25));
    mpi_ok(2, &pretrain_args(&f, &two, 50, 25));
    assert_close("pretrain", &one, &two, "loss", 50, 1e-5, 1e-5);
    // Rank 0 alone wrote the run directory: one line per step plus step 0.
    assert_eq!(losses(&two, "val_loss").len(), 3);

    let sft = |out: &Path| {
        let mut a = strings(&["sft", "--init", s(&one), "--out", s(out)]);
        a.extend(strings(&[
            "--data",
            s(&f.data.join("sft_train.jsonl")),
            "--val-data",
            s(&f.data.join("sft_val.jsonl")),
            "--batch-size",
            "4",
            "--grad-accum",
            "2",
            "--max-steps",
            "30",
            "--eval-every",
            "15",
            "--ckpt-every",
            "15",
        ]));
        a
    };
    let (one_sft, two_sft) = (f.root.join("sft1"), f.root.join("sft2"));
    ok(2, &sft(&one_sft));
    mpi_ok(2, &sft(&two_sft));
    assert_close("sft", &one_sft, &two_sft, "loss", 30, 1e-5, 1e-5);

    let grpo = |out: &Path| {
        let mut a = strings(&["grpo", "--actor", s(&one_sft), "--out", s(out)]);
        a.extend(strings(&[
            "--prompts",
            s(&f.data.join("ppo_prompts.jsonl")),
            "--reward",
            "format",
            "--iterations",
            "8",
            "--set",
            "grpo.prompts_per_iter=4",
            "--set",
            "grpo.group_size=4",
            "--set",
            "grpo.minibatch=8",
            "--set",
            "grpo.inner_epochs=2",
            "--set",
            "grpo.max_new_tokens=8",
            "--set",
            "grpo.lr=1e-4",
            "--set",
            "grpo.ckpt_every=4",
        ]));
        a
    };
    let (one_grpo, two_grpo) = (f.root.join("grpo1"), f.root.join("grpo2"));
    ok(2, &grpo(&one_grpo));
    mpi_ok(2, &grpo(&two_grpo));
    assert_close("grpo", &one_grpo, &two_grpo, "reward", 8, 1e-5, 1e-5);
    assert_close("grpo", &one_grpo, &two_grpo, "loss", 8, 1e-5, 1e-5);
    // The rewards moved: the comparison is of a run that learns something.
    let r = losses(&one_grpo, "reward");
    assert!(r.iter().any(|x| x.1 != r[0].1), "constant rewards {r:?}");

    // PPO: a reward model from the SFT model (one process), then actor and critic trained on 2
    // ranks against one process: 8 responses per iteration, minibatches of 4, 2 epochs.
    let rm = f.root.join("rm");
    let mut a = strings(&["rm", "--init", s(&one_sft), "--out", s(&rm)]);
    a.extend(strings(&[
        "--data",
        s(&f.data.join("rm_train.jsonl")),
        "--val-data",
        s(&f.data.join("rm_val.jsonl")),
        "--batch-size",
        "4",
        "--max-steps",
        "20",
        "--eval-every",
        "20",
    ]));
    ok(2, &a);
    let ppo = |out: &Path| {
        let mut a = strings(&["ppo", "--actor", s(&one_sft), "--reward-model", s(&rm)]);
        a.extend(strings(&[
            "--prompts",
            s(&f.data.join("ppo_prompts.jsonl")),
            "--out",
            s(out),
            "--iterations",
            "6",
            "--set",
            "ppo.rollout_batch=8",
            "--set",
            "ppo.minibatch=4",
            "--set",
            "ppo.ppo_epochs=2",
            "--set",
            "ppo.max_new_tokens=8",
            "--set",
            "ppo.actor_lr=1e-4",
            "--set",
            "ppo.ckpt_every=3",
            "--set",
            "ppo.eval_every=3",
        ]));
        a
    };
    let (one_ppo, two_ppo) = (f.root.join("ppo1"), f.root.join("ppo2"));
    ok(2, &ppo(&one_ppo));
    mpi_ok(2, &ppo(&two_ppo));
    for key in ["reward", "value_loss", "entropy"] {
        assert_close("ppo", &one_ppo, &two_ppo, key, 6, 1e-5, 1e-5);
    }
    // The policy loss (whitened advantages: a mean of terms summing to about zero) and the KL (a
    // sum of log-probability differences, zero at the start) cancel: compared absolutely.
    for key in ["policy_loss", "kl"] {
        let (a, b) = (losses(&one_ppo, key), losses(&two_ppo, key));
        assert_eq!(a.len(), 6, "ppo: {key} lines");
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x.1 - y.1).abs())
            .fold(0.0, f64::max);
        eprintln!("ppo: {key} one process {a:?}, max absolute difference {worst:.2e}");
        assert!(worst <= 1e-5, "ppo: {key} {a:?} vs {b:?}");
    }
    let r = losses(&one_ppo, "reward");
    assert!(r.iter().any(|x| x.1 != r[0].1), "constant rewards {r:?}");
}

/// The pid of rank `rank` among `mpirun`'s children.
fn rank_pid(mpirun: &Child, rank: usize) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The parent pid is the 2nd field after the command's closing parenthesis.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid != Some(mpirun.id()) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// Starts `args` on 2 ranks, waits for `ready`, sends `signal` to rank 1, and returns how long
/// mpirun took to exit afterwards, with its output.
fn signal_rank_1(
    args: &[String],
    env: &[(&str, &str)],
    ready: &dyn Fn() -> bool,
    signal: i32,
) -> (Duration, Output) {
    let mut cmd = mpirun(2, args);
    cmd.envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("starting mpirun");
    let t0 = Instant::now();
    while !ready() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the run never got ready"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let pid = rank_pid(&child, 1).expect("rank 1's pid");
    unsafe { libc::kill(pid as i32, signal) };
    let hit = Instant::now();
    let out = child.wait_with_output().unwrap();
    let took = hit.elapsed();
    // A stopped rank is killed by mpirun; make sure nothing is left behind either way.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    (took, out)
}

#[test]
fn a_dead_rank_stops_the_job_and_resume_works_with_any_rank_count() {
    let f = fixture();
    let steps = 120;
    let reference = f.root.join("uninterrupted");
    mpi_ok(2, &pretrain_args(&f, &reference, steps, 10));

    // kill -9 rank 1 once checkpoint 20 exists: rank 0 must not wait for it.
    let killed = f.root.join("killed");
    let ckpt = killed.join("ckpt-0000020");
    let (took, out) = signal_rank_1(
        &pretrain_args(&f, &killed, steps, 10),
        &[],
        &|| ckpt.exists(),
        libc::SIGKILL,
    );
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "the job survived a dead rank:\n{err}"
    );
    assert!(
        took < Duration::from_secs(10),
        "the job took {took:?} to stop:\n{err}"
    );
    assert!(
        err.contains("rank 1"),
        "the error does not name the dead rank:\n{err}"
    );
    let done = losses(&killed, "loss").len();
    assert!(done < steps as usize, "the run finished before the kill");

    // Resume from its last checkpoint with one process (two threads) and with two ranks.
    let (r1, r2) = (f.root.join("resumed1"), f.root.join("resumed2"));
    for r in [&r1, &r2] {
        common::copy_files(&killed, r);
        for e in std::fs::read_dir(&killed).unwrap().flatten() {
            if e.path().is_dir() {
                common::copy_files(&e.path(), &r.join(e.file_name()));
            }
        }
    }
    let mut a1 = pretrain_args(&f, &r1, steps, 10);
    a1.push("--resume".into());
    ok(2, &a1);
    let mut a2 = pretrain_args(&f, &r2, steps, 10);
    a2.push("--resume".into());
    let o = mpi_ok(2, &a2);
    assert!(text(&o.stderr).contains("resumed from"));
    assert_close(
        "resume on 2 ranks",
        &r2,
        &reference,
        "loss",
        steps as usize,
        0.0,
        0.0,
    );
    assert_close(
        "resume on 1 process",
        &r1,
        &reference,
        "loss",
        steps as usize,
        1e-5,
        1e-5,
    );
}

#[test]
fn a_stopped_rank_trips_the_watchdog() {
    let f = fixture();
    let out_dir = f.root.join("stopped");
    let ckpt = out_dir.join("ckpt-0000010");
    let (took, out) = signal_rank_1(
        &pretrain_args(&f, &out_dir, 100_000, 10),
        &[("KILN_MPI_TIMEOUT", "2")],
        &|| ckpt.exists(),
        libc::SIGSTOP,
    );
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("rank 0: no answer from the other ranks for 2 s"),
        "no watchdog message:\n{err}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}:\n{err}");
}

#[test]
fn an_error_on_the_ranks_ends_the_job_with_its_message() {
    let f = fixture();
    let mut args = pretrain_args(&f, &f.root.join("odd"), 10, 10);
    // 3 micro-batches cannot be dealt out to 2 ranks.
    let i = args.iter().position(|a| a == "--grad-accum").unwrap();
    args[i + 1] = "3".into();
    let t0 = Instant::now();
    let o = mpirun(2, &args).output().unwrap();
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("grad_accum (3) must be a multiple of the number of processes (2)"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(30));
}
