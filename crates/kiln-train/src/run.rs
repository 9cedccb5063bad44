//! A run directory: numbered checkpoints (atomic, checksummed, the last K kept), a `latest` pointer,
//! `metrics.jsonl`, and the run's recorded configuration.

use anyhow::{Context, Result};
use kiln_data::atomic_write;
use kiln_model::checkpoint::{recover_interrupted, write_checkpoint_dir, CHECKSUMS_FILE};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct RunDir {
    pub root: PathBuf,
    /// `run.lock`, held locked (an advisory `flock`) while this value lives: a second process on the
    /// same folder is refused. The kernel drops the lock when the process dies, so a run killed with
    /// SIGKILL never blocks its own resume. None on a follower.
    _lock: Option<fs::File>,
    /// False on ranks other than 0 of a data-parallel run: rank 0 alone writes the run directory
    /// (and holds its lock); the others' writes are no-ops and they read nothing that rank 0
    /// repairs.
    writer: bool,
}

pub const LOCK_FILE: &str = "run.lock";

impl RunDir {
    /// Creates (or opens) a run directory and locks it for this process. On ranks other than 0 of a
    /// data-parallel run (see [`crate::dist`]) it only names the directory.
    pub fn create(root: &Path) -> Result<Self> {
        if !crate::dist::is_root() {
            return Ok(RunDir {
                root: root.to_path_buf(),
                _lock: None,
                writer: false,
            });
        }
        fs::create_dir_all(root)
            .with_context(|| format!("creating run directory {}", root.display()))?;
        let path = root.join(LOCK_FILE);
        let mut lock = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                anyhow::bail!(
                    "{} is in use by another Kiln process ({}): wait for it to finish, stop it, or choose another --out",
                    root.display(),
                    if holder.is_empty() { "pid unknown".to_string() } else { holder.to_string() }
                );
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        lock.set_len(0)?;
        write!(lock, "pid {}", std::process::id())?;
        lock.sync_all()?;
        Ok(RunDir {
            root: root.to_path_buf(),
            _lock: Some(lock),
            writer: true,
        })
    }

    /// Whether this process writes the run directory (false on ranks other than 0).
    pub fn writes(&self) -> bool {
        self.writer
    }

    pub fn checkpoint_name(step: u64) -> String {
        format!("ckpt-{step:07}")
    }

    /// Appends one JSON line to `metrics.jsonl`.
    pub fn log(&self, value: &serde_json::Value) -> Result<()> {
        if !self.writer {
            return Ok(());
        }
        let path = self.root.join("metrics.jsonl");
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{value}")?;
        Ok(())
    }

    /// Drops metric lines logged after `step` (by a run that was killed before its next checkpoint), so a
    /// resumed run's metrics read as one uninterrupted run.
    pub fn truncate_metrics_after(&self, step: u64) -> Result<()> {
        if !self.writer {
            return Ok(());
        }
        let path = self.root.join("metrics.jsonl");
        let Ok(text) = fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        Ok(atomic_write(&path, |w| w.write_all(kept.as_bytes()))?)
    }

    /// Writes checkpoint `step`, points `latest` at it, and keeps only the newest `keep_last`.
    pub fn save_checkpoint(
        &self,
        step: u64,
        files: &[(String, Vec<u8>)],
        keep_last: usize,
    ) -> Result<PathBuf> {
        let name = Self::checkpoint_name(step);
        let dir = self.root.join(&name);
        if !self.writer {
            return Ok(dir);
        }
        write_checkpoint_dir(&dir, files)?;
        atomic_write(&self.root.join("latest"), |w| w.write_all(name.as_bytes()))?;
        if keep_last > 0 {
            let all = self.checkpoints()?;
            if all.len() > keep_last {
                for (_, old) in &all[..all.len() - keep_last] {
                    if old != &dir {
                        remove_checkpoint(old);
                    }
                }
            }
        }
        Ok(dir)
    }

    /// Complete checkpoints (those with a checksums file), oldest first.
    pub fn checkpoints(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Ok(out);
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(num) = name.strip_prefix("ckpt-") {
                if let Ok(step) = num.parse::<u64>() {
                    if e.path().join(CHECKSUMS_FILE).exists() {
                        out.push((step, e.path()));
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The checkpoint to resume from: the newest complete one (normally the one `latest` names; a
    /// run killed between writing a checkpoint and updating `latest` leaves `latest` one behind).
    /// First repairs what a kill inside a checkpoint write left behind. When there is no
    /// checkpoint, the run starts over, so the metrics a killed run logged are discarded.
    pub fn latest_checkpoint(&self) -> Result<Option<PathBuf>> {
        if !self.writer {
            // A follower reads what rank 0 left and repairs nothing.
            return Ok(self.checkpoints()?.pop().map(|(_, p)| p));
        }
        for name in recover_interrupted(&self.root)? {
            eprintln!(
                "note: restored {} after an interrupted checkpoint write",
                self.root.join(name).display()
            );
        }
        let newest = self.checkpoints()?.pop();
        if let Ok(name) = fs::read_to_string(self.root.join("latest")) {
            let p = self.root.join(name.trim());
            let named_step = name
                .trim()
                .strip_prefix("ckpt-")
                .and_then(|n| n.parse::<u64>().ok());
            if p.join(CHECKSUMS_FILE).exists()
                && newest
                    .as_ref()
                    .is_none_or(|(s, _)| named_step.is_none_or(|n| n >= *s))
            {
                return Ok(Some(p));
            }
        }
        match newest {
            Some((step, p)) => {
                // Point `latest` at it, so what reads the run directory next (the next stage,
                // `generate`) sees the same checkpoint even if no new one is written.
                atomic_write(&self.root.join("latest"), |w| {
                    w.write_all(Self::checkpoint_name(step).as_bytes())
                })?;
                Ok(Some(p))
            }
            None => {
                let metrics = self.root.join("metrics.jsonl");
                if metrics.exists() {
                    fs::remove_file(&metrics)
                        .with_context(|| format!("removing {}", metrics.display()))?;
                }
                Ok(None)
            }
        }
    }
}

/// Deletes a checkpoint: first renamed to a hidden name, so a kill in the middle never leaves a
/// partly deleted directory that still looks complete.
fn remove_checkpoint(dir: &Path) {
    let name = dir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let parent = dir.parent().unwrap_or(Path::new("."));
    let hidden = parent.join(format!(".{name}.del-{}", std::process::id()));
    if fs::rename(dir, &hidden).is_ok() {
        let _ = fs::remove_dir_all(&hidden);
    } else {
        let _ = fs::remove_dir_all(dir);
    }
}
