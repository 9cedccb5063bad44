//! The run session every training loop shares (the supervised [`crate::Trainer`], PPO, GRPO): the
//! run directory, exact resume from its newest checkpoint, the progress bar, metrics lines, Ctrl-C,
//! the checkpoint cadence (every N steps, the last step, an interrupt) and the non-finite policy of
//! every update. A loop says only what is its own: its state, what its checkpoints hold, and what
//! one step does.

use crate::dist;
use crate::optim::{AdamW, Optimizer, UpdateGuard};
use crate::run::RunDir;
use crate::trainer::Metrics;
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Set by Ctrl-C: the loop saves a checkpoint and stops at the end of the current step.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler that sets [`STOP`] (a second Ctrl-C exits at once).
pub fn install_ctrlc() {
    let _ = ctrlc_handler();
}

fn ctrlc_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit now)");
    })?;
    Ok(())
}

/// Whether this process was asked to stop (Ctrl-C). A data-parallel loop shares the flag with the
/// other ranks, so that every rank stops, and rank 0 saves, at the same step.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// What to do when a step's loss or gradient is NaN or infinite.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum NonFinite {
    /// Skip the update (the weights stay as they were) and count it.
    #[default]
    Skip,
    /// Stop the run with an error; the last checkpoint stays the last good state.
    Stop,
}

/// The progress bar every training loop shows (hidden when `show` is false): label, elapsed time,
/// bar, position of `len`, the loop's message and the ETA, starting at `pos` (a resumed run).
pub fn progress_bar(show: bool, label: &str, len: u64, pos: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>9} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg} eta {eta}",
        )
        .expect("a valid template"),
    );
    pb.set_prefix(label.to_string());
    pb.set_position(pos);
    pb
}

/// Prints a line above the progress bar, or to stderr when there is none (--quiet, CI logs).
/// Only rank 0 speaks when several processes train together.
pub(crate) fn say(pb: &ProgressBar, line: String) {
    if !dist::is_root() {
        return;
    }
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

/// Files of a checkpoint: (name, contents).
pub type Files = Vec<(String, Vec<u8>)>;

/// The settings of a loop that its session acts on.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Names the loop in messages, on the progress bar and as `stage` in metrics lines.
    pub label: String,
    /// What the loop calls one step in messages ("step", "iteration").
    pub unit: &'static str,
    /// The step the run ends at.
    pub total: u64,
    /// Checkpoint every N steps (0: only at the end and on an interrupt).
    pub ckpt_every: u64,
    /// Checkpoints kept (0: all).
    pub keep_last: usize,
    pub non_finite: NonFinite,
    /// Consecutive non-finite updates of one model that stop the run as diverged.
    pub max_non_finite: u64,
    /// Global gradient-norm clip of every update (0: off).
    pub grad_clip: f32,
    pub progress: bool,
}

/// One run of a training loop in its run directory (which the caller's [`RunDir`] keeps locked
/// against a second process while it lives).
pub struct RunSession<'a> {
    run: &'a RunDir,
    cfg: SessionConfig,
    /// Files added to every checkpoint (tokenizer, kiln.json, ...), unless the loop writes a file
    /// of the same name itself.
    extra_files: Files,
    pb: ProgressBar,
    started: Instant,
}

impl<'a> RunSession<'a> {
    pub fn new(run: &'a RunDir, cfg: SessionConfig, extra_files: Files) -> Self {
        RunSession {
            run,
            cfg,
            extra_files,
            // Until `start`, `say` writes to stderr.
            pb: ProgressBar::hidden(),
            started: Instant::now(),
        }
    }

    /// With `resume`, rank 0 finds the run's newest checkpoint (repairing an interrupted write),
    /// `load` restores the loop from it into `state` and returns the step it holds, and the
    /// metrics logged after that step (by a run killed before its next checkpoint) are dropped, so
    /// the resumed run's metrics read as one uninterrupted run. Then every rank of a data-parallel
    /// run gets rank 0's `state` (each loop broadcasts its own weights).
    pub fn resume<S: Serialize + DeserializeOwned>(
        &self,
        resume: bool,
        state: &mut S,
        load: impl FnOnce(&Path, &mut S) -> Result<u64>,
    ) -> Result<()> {
        if resume && dist::is_root() {
            if let Some(dir) = self.run.latest_checkpoint()? {
                let step = load(&dir, state)?;
                self.run.truncate_metrics_after(step)?;
                eprintln!(
                    "[{}] resumed from {} ({} {step})",
                    self.cfg.label,
                    dir.display(),
                    self.cfg.unit
                );
            }
        }
        let world = dist::world();
        if world.size() > 1 {
            *state = dist::broadcast_json(world, state)?;
        }
        Ok(())
    }

    /// `adamw` behind a guard with this run's non-finite policy and gradient clip; `what` names
    /// the model in its messages, `skipped` is the count of skipped updates it resumes with.
    pub fn optimizer(&self, what: &str, adamw: AdamW, skipped: u64) -> Optimizer {
        Optimizer {
            adamw,
            guard: UpdateGuard::new(what, self.cfg.non_finite, self.cfg.max_non_finite, skipped),
            grad_clip: self.cfg.grad_clip,
        }
    }

    /// Shows progress from `step` on (a resumed run's) and starts the clock.
    pub fn start(&mut self, step: u64) {
        self.pb = progress_bar(
            self.cfg.progress && dist::is_root(),
            &self.cfg.label,
            self.cfg.total,
            step,
        );
        self.started = Instant::now();
    }

    /// Prints a line (rank 0 only) above the progress bar, or to stderr when there is none.
    pub fn say(&self, line: String) {
        say(&self.pb, line)
    }

    /// Moves the progress bar to `step`, with `message` beside it.
    pub fn progress(&self, step: u64, message: String) {
        self.pb.set_message(message);
        self.pb.set_position(step);
    }

    /// A metrics line of step `step`: the step, the loop's label as `stage`, and `metrics`.
    pub fn metrics_line(&self, step: u64, metrics: &Metrics) -> serde_json::Value {
        let mut line = serde_json::json!({"step": step, "stage": self.cfg.label});
        for (k, v) in metrics {
            line[k.as_str()] = serde_json::json!(v);
        }
        line
    }

    /// Appends `line` to `metrics.jsonl` (rank 0 only).
    pub fn log(&self, line: &serde_json::Value) -> Result<()> {
        self.run.log(line)
    }

    /// Ends step `step` (1-based, the steps done so far): when a checkpoint is due (every
    /// `ckpt_every` steps, at the last step, or when `stop`), rank 0 writes `files` (told whether
    /// this is the finished run's final checkpoint) with the run's extra files, keeping the newest
    /// `keep_last`. Returns `stop`: the loop ends here, interrupted, to be resumed.
    pub fn end_step(
        &self,
        step: u64,
        stop: bool,
        files: impl FnOnce(bool) -> Result<Files>,
    ) -> Result<bool> {
        let last = step == self.cfg.total;
        let due =
            (self.cfg.ckpt_every > 0 && step.is_multiple_of(self.cfg.ckpt_every)) || last || stop;
        if due && dist::is_root() {
            let mut files = files(last && !stop)?;
            let extra: Vec<_> = self
                .extra_files
                .iter()
                .filter(|(n, _)| !files.iter().any(|(m, _)| m == n))
                .cloned()
                .collect();
            files.extend(extra);
            self.run.save_checkpoint(step, &files, self.cfg.keep_last)?;
        }
        if stop {
            self.pb.abandon_with_message(format!(
                "interrupted at {} {step}; resume with --resume",
                self.cfg.unit
            ));
        }
        Ok(stop)
    }

    /// Seconds since [`start`](Self::start).
    pub fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Clears the progress bar; returns the seconds since [`start`](Self::start).
    pub fn finish(self) -> f64 {
        self.pb.finish_and_clear();
        self.seconds()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(total: u64) -> SessionConfig {
        SessionConfig {
            label: "test".into(),
            unit: "step",
            total,
            ckpt_every: 2,
            keep_last: 2,
            non_finite: NonFinite::Skip,
            max_non_finite: 5,
            grad_clip: 1.0,
            progress: false,
        }
    }

    fn session(run: &RunDir, total: u64) -> RunSession<'_> {
        let extra = vec![
            ("extra.txt".to_string(), b"extra".to_vec()),
            ("shared.json".to_string(), b"extra".to_vec()),
        ];
        RunSession::new(run, config(total), extra)
    }

    /// The loop's own files at `step`: its state, and a file that an extra file also names.
    fn files(step: u64) -> Result<Files> {
        Ok(vec![
            ("state.json".into(), step.to_string().into_bytes()),
            ("shared.json".into(), b"loop".to_vec()),
        ])
    }

    fn logged_steps(run: &RunDir) -> Vec<u64> {
        std::fs::read_to_string(run.root.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    /// Runs steps `from..=to` of a session: a metrics line each, checkpoints when due. Returns
    /// the checkpoints written: (step, whether it was the final one).
    fn steps(s: &RunSession, from: u64, to: u64) -> Vec<(u64, bool)> {
        let mut saved = Vec::new();
        for step in from..=to {
            let m = Metrics::from([("v".to_string(), step as f64)]);
            s.log(&s.metrics_line(step, &m)).unwrap();
            let stop = s
                .end_step(step, false, |finished| {
                    saved.push((step, finished));
                    files(step)
                })
                .unwrap();
            assert!(!stop);
        }
        saved
    }

    /// Checkpoints every `ckpt_every` steps and at the last (marked final), the newest `keep_last`
    /// kept, the run's extra files in each (but the loop's file wins over an extra of its name);
    /// a resume restores the newest checkpoint's state and drops the metrics logged after it.
    #[test]
    fn checkpoints_resume_and_metrics_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path()).unwrap();
        let s = session(&run, 8);
        // Killed after step 7, whose metrics were logged but whose checkpoint was not due.
        assert_eq!(steps(&s, 1, 7), vec![(2, false), (4, false), (6, false)]);
        let kept: Vec<u64> = run.checkpoints().unwrap().iter().map(|c| c.0).collect();
        assert_eq!(kept, vec![4, 6]);
        let ckpt = run.root.join(RunDir::checkpoint_name(6));
        let read = |f: &str| String::from_utf8(std::fs::read(ckpt.join(f)).unwrap()).unwrap();
        assert_eq!(read("state.json"), "6");
        assert_eq!(read("extra.txt"), "extra");
        assert_eq!(read("shared.json"), "loop");
        let text = std::fs::read_to_string(run.root.join("metrics.jsonl")).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(
            line,
            serde_json::json!({"step": 1, "stage": "test", "v": 1.0})
        );
        drop(s);

        // Without --resume nothing is read.
        let s = session(&run, 8);
        let mut state = 0u64;
        s.resume(false, &mut state, |_, _| panic!("no resume asked"))
            .unwrap();
        assert_eq!((state, logged_steps(&run).len()), (0, 7));
        // With it: the state of checkpoint 6, and step 7's metrics line gone.
        s.resume(true, &mut state, |dir, st| {
            *st = std::fs::read_to_string(dir.join("state.json"))?.parse()?;
            Ok(*st)
        })
        .unwrap();
        assert_eq!(state, 6);
        assert_eq!(logged_steps(&run), vec![1, 2, 3, 4, 5, 6]);
        // The resumed run's last step writes the final checkpoint.
        assert_eq!(steps(&s, 7, 8), vec![(8, true)]);
        assert_eq!(logged_steps(&run), (1..=8).collect::<Vec<_>>());
        assert_eq!(
            run.latest_checkpoint().unwrap(),
            Some(run.root.join(RunDir::checkpoint_name(8)))
        );
    }

    /// An interrupt checkpoints at once, off the cadence and not as the final checkpoint, and ends
    /// the loop.
    #[test]
    fn an_interrupt_checkpoints_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path()).unwrap();
        let s = session(&run, 8);
        let mut saved = None;
        let stop = s
            .end_step(3, true, |finished| {
                saved = Some(finished);
                files(3)
            })
            .unwrap();
        assert!(stop);
        assert_eq!(saved, Some(false));
        assert_eq!(run.checkpoints().unwrap()[0].0, 3);
    }

    /// A resume with no checkpoint starts over: the killed run's metrics are discarded.
    #[test]
    fn a_resume_without_a_checkpoint_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path()).unwrap();
        let s = session(&run, 8);
        s.log(&s.metrics_line(1, &Metrics::new())).unwrap();
        let mut state = 0u64;
        s.resume(true, &mut state, |_, _| panic!("no checkpoint to load"))
            .unwrap();
        assert!(logged_steps(&run).is_empty());
    }

    /// The session's optimizers carry its non-finite policy and gradient clip, and the skipped
    /// count they resume with.
    #[test]
    fn optimizers_follow_the_session_policy() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path()).unwrap();
        let s = session(&run, 8);
        let model = kiln_model::Model::new(
            kiln_model::ModelConfig {
                vocab_size: 8,
                n_ctx: 4,
                n_layer: 1,
                n_head: 1,
                n_embd: 4,
                ..Default::default()
            },
            1,
        );
        let opt = s.optimizer("test model", AdamW::new(&model, Default::default()), 3);
        assert_eq!(opt.guard.policy, NonFinite::Skip);
        assert_eq!(opt.guard.max_consecutive, 5);
        assert_eq!((opt.guard.skipped, opt.grad_clip), (3, 1.0));
        assert_eq!(opt.next_update(), 4);
    }
}
