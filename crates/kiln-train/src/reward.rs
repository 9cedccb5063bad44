//! Reward sources for RL: a function of (prompt, response) → number. The demo judge, a reward model,
//! an external program and a format check all implement [`RewardSource`]; an RL loop takes a
//! weighted sum of several.

use crate::ppo::RewardModel;
use crate::rm::score_rows;
use anyhow::{bail, Context, Result};
use kiln_model::Activations;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

/// Scores responses. `prompts[i]` is the index (into the loop's prompt list) of the prompt that
/// response `i` answers; `responses[i]` its tokens (the stop token included when it ended).
pub trait RewardSource {
    fn name(&self) -> String;
    fn score(&mut self, prompts: &[usize], responses: &[Vec<u32>]) -> Result<Vec<f32>>;
}

/// A source with its weight in the total reward.
pub struct Weighted<'a> {
    pub source: Box<dyn RewardSource + 'a>,
    pub weight: f32,
}

/// 1 when the response ended with a stop token (a well-formed turn), else 0.
pub struct FormatReward {
    pub stop_tokens: Vec<u32>,
}

impl RewardSource for FormatReward {
    fn name(&self) -> String {
        "format".into()
    }
    fn score(&mut self, _: &[usize], responses: &[Vec<u32>]) -> Result<Vec<f32>> {
        Ok(responses
            .iter()
            .map(|r| {
                let ended = r.last().is_some_and(|t| self.stop_tokens.contains(t));
                if ended {
                    1.0
                } else {
                    0.0
                }
            })
            .collect())
    }
}

/// A reward model's score of prompt + response, normalised by its training statistics.
pub struct ModelReward {
    pub rm: RewardModel,
    /// The rendered prompts, as the loop has them.
    pub prompts: Vec<Vec<u32>>,
    pub batch: usize,
}

impl RewardSource for ModelReward {
    fn name(&self) -> String {
        "rm".into()
    }
    fn score(&mut self, prompts: &[usize], responses: &[Vec<u32>]) -> Result<Vec<f32>> {
        let seqs: Vec<Vec<u32>> = prompts
            .iter()
            .zip(responses)
            .map(|(&p, r)| {
                let mut s = self.prompts[p].clone();
                s.extend_from_slice(r);
                s.truncate(self.rm.model.cfg.n_ctx);
                s
            })
            .collect();
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(1).max(1);
        let b = self.batch.max(1);
        let mut acts = Activations::new(&self.rm.model.cfg, b, t, false);
        let mut out = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(b) {
            for x in score_rows(&self.rm.model, &mut acts, chunk) {
                out.push((x - self.rm.mean) / self.rm.std);
            }
        }
        Ok(out)
    }
}

/// Scores one response: (prompt index, response tokens) → reward.
pub type ScoreFn<'a> = Box<dyn FnMut(usize, &[u32]) -> f32 + 'a>;

/// A closure as a source (the demo judge: 1 for a right answer, 0 otherwise).
pub struct FnReward<'a> {
    pub name: String,
    pub f: ScoreFn<'a>,
}

impl RewardSource for FnReward<'_> {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn score(&mut self, prompts: &[usize], responses: &[Vec<u32>]) -> Result<Vec<f32>> {
        Ok(prompts
            .iter()
            .zip(responses)
            .map(|(&p, r)| (self.f)(p, r))
            .collect())
    }
}

/// An external program, run once and kept running: for each response Kiln writes one JSON line
/// (`prompt`, `response`, and every other field of the prompt's record, e.g. a reference answer) to
/// its standard input and reads one number per line from its standard output. A program that
/// exits, hangs past the timeout, or prints something that is not a number stops the run with an
/// error naming it.
pub struct CommandReward<'a> {
    command: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<std::io::Result<String>>,
    pub timeout: Duration,
    /// Each prompt's record: its text and extra fields.
    pub records: Vec<serde_json::Map<String, serde_json::Value>>,
    pub decode: crate::ppo::Decode<'a>,
}

impl<'a> CommandReward<'a> {
    /// Starts `command` with `sh -c`.
    pub fn start(
        command: &str,
        records: Vec<serde_json::Map<String, serde_json::Value>>,
        decode: crate::ppo::Decode<'a>,
        timeout: Duration,
    ) -> Result<Self> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the reward program {command:?}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("reward program stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(CommandReward {
            command: command.to_string(),
            child,
            stdin,
            lines: rx,
            timeout,
            records,
            decode,
        })
    }
}

impl Drop for CommandReward<'_> {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RewardSource for CommandReward<'_> {
    fn name(&self) -> String {
        "cmd".into()
    }
    fn score(&mut self, prompts: &[usize], responses: &[Vec<u32>]) -> Result<Vec<f32>> {
        let cmd = self.command.clone();
        let stdin = self
            .stdin
            .as_mut()
            .with_context(|| format!("reward program {cmd:?}: its input is closed"))?;
        let mut input = String::new();
        for (&p, r) in prompts.iter().zip(responses) {
            let mut rec = self.records.get(p).cloned().unwrap_or_default();
            rec.insert("response".into(), (self.decode)(r).into());
            input.push_str(&serde_json::Value::Object(rec).to_string());
            input.push('\n');
        }
        stdin
            .write_all(input.as_bytes())
            .and_then(|_| stdin.flush())
            .with_context(|| {
                format!("reward program {cmd:?} stopped reading its input (did it exit?)")
            })?;
        let mut out = Vec::with_capacity(responses.len());
        for i in 0..responses.len() {
            let line = match self.lines.recv_timeout(self.timeout) {
                Ok(Ok(l)) => l,
                Ok(Err(e)) => bail!("reward program {cmd:?}: reading its output: {e}"),
                Err(RecvTimeoutError::Timeout) => bail!(
                    "reward program {cmd:?} gave no answer for record {} within {:.0?}",
                    i + 1,
                    self.timeout
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait().ok().flatten();
                    bail!(
                        "reward program {cmd:?} exited ({}) after {i} of {} answers",
                        status.map_or("still running".to_string(), |s| s.to_string()),
                        responses.len()
                    )
                }
            };
            let v: f32 = line.trim().parse().map_err(|_| {
                anyhow::anyhow!(
                    "reward program {cmd:?} printed {line:?} for record {}, not a number",
                    i + 1
                )
            })?;
            if !v.is_finite() {
                bail!("reward program {cmd:?} printed {v} for record {}", i + 1);
            }
            out.push(v);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(n: usize) -> Vec<serde_json::Map<String, serde_json::Value>> {
        (0..n)
            .map(|i| {
                let mut m = serde_json::Map::new();
                m.insert("prompt".into(), format!("p{i}").into());
                m.insert("answer".into(), format!("{i}").into());
                m
            })
            .collect()
    }

    fn decode() -> crate::ppo::Decode<'static> {
        Box::new(|t: &[u32]| {
            t.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
    }

    #[test]
    fn a_program_scores_with_the_prompt_record() {
        // Reward 1 when the response's text equals the record's answer.
        let py = r#"python3 -c '
import sys, json
for line in sys.stdin:
    r = json.loads(line)
    print(1.0 if r["response"] == r["answer"] else 0.0, flush=True)
'"#;
        let mut c = CommandReward::start(py, recs(3), decode(), Duration::from_secs(20)).unwrap();
        let s = c
            .score(&[0, 1, 2, 1], &[vec![0], vec![5], vec![2], vec![1]])
            .unwrap();
        assert_eq!(s, vec![1.0, 0.0, 1.0, 1.0]);
        // The process stays up between calls.
        assert_eq!(c.score(&[2], &[vec![2]]).unwrap(), vec![1.0]);
    }

    #[test]
    fn a_broken_program_is_a_clear_error() {
        let d = Duration::from_millis(500);
        let mut c =
            CommandReward::start("echo hello; cat > /dev/null", recs(1), decode(), d).unwrap();
        let e = c.score(&[0], &[vec![1]]).unwrap_err().to_string();
        assert!(e.contains("\"hello\"") && e.contains("not a number"), "{e}");
        let mut c = CommandReward::start("sleep 5", recs(1), decode(), d).unwrap();
        let e = c.score(&[0], &[vec![1]]).unwrap_err().to_string();
        assert!(e.contains("no answer") && e.contains("within"), "{e}");
        let mut c = CommandReward::start("exit 3", recs(1), decode(), d).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let e = format!("{:#}", c.score(&[0], &[vec![1]]).unwrap_err());
        assert!(e.contains("exit") || e.contains("stopped reading"), "{e}");
    }

    #[test]
    fn format_reward() {
        let mut f = FormatReward {
            stop_tokens: vec![5],
        };
        let s = f
            .score(&[0, 0, 0], &[vec![1, 5], vec![1, 2], vec![]])
            .unwrap();
        assert_eq!(s, vec![1.0, 0.0, 0.0]);
    }
}
