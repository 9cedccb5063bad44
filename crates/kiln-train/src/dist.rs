//! Data parallelism across processes: the few collective operations the training loops need, behind
//! a trait, so the loops do not depend on MPI (the `kiln` binary's `mpi` feature installs an MPI
//! implementation with [`set_world`]; without it every process is a world of one).
//!
//! The rules every loop follows: the global batch is dealt out by micro-batch ([`Shard`]), every
//! rank walks the whole data stream (skipping the other ranks' micro-batches) so the data order and
//! the saved position depend on the global batch alone; gradients are summed with
//! [`Collective::allreduce_sum`] (in rank order, bit-identical on every rank) and every rank takes
//! the same optimizer step; rank 0 alone writes checkpoints and metrics, and at the start its state
//! is broadcast to the others ([`broadcast_f32`](Collective::broadcast_f32)), so a run resumes from
//! a checkpoint with any number of ranks.

use crate::trainer::Metrics;
use anyhow::{bail, Context, Result};
use std::sync::OnceLock;
use std::time::Instant;

/// The collective operations of a group of processes ("ranks").
pub trait Collective: Send + Sync {
    /// This process's index, 0-based.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn size(&self) -> usize;
    /// Element-wise sum over every rank, in place. The sum is taken in rank order (0, 1, ..., N-1)
    /// and the result is bit-identical on every rank, so every rank takes the same optimizer step.
    fn allreduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Rank `root`'s values, copied into `buf` on every rank (the same length everywhere).
    fn broadcast_f32(&self, root: usize, buf: &mut [f32]) -> Result<()>;
    /// Rank `root`'s bytes to every rank (`buf` is replaced on the others).
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<()>;
    /// Every rank's bytes, in rank order.
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Waits until every rank is here.
    fn barrier(&self) -> Result<()>;
}

/// A world of one process: every operation is the identity.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn allreduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f32(&self, _root: usize, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _root: usize, _buf: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

static WORLD: OnceLock<Box<dyn Collective>> = OnceLock::new();

/// Installs the process group (once, at start-up, before any training loop runs).
pub fn set_world(world: Box<dyn Collective>) -> Result<()> {
    if WORLD.set(world).is_err() {
        bail!("the process group is already set");
    }
    Ok(())
}

/// The process group: the one [`set_world`] installed, or a world of one.
pub fn world() -> &'static dyn Collective {
    WORLD.get_or_init(|| Box::new(SingleProcess)).as_ref()
}

/// True on the rank that writes checkpoints, metrics and console output (rank 0).
pub fn is_root() -> bool {
    world().rank() == 0
}

/// Which of a step's micro-batches this rank computes: a contiguous block of `per_rank`, so the sum
/// over ranks in rank order adds the micro-batches' gradients in their order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub size: usize,
    /// Micro-batches per step on each rank.
    pub per_rank: usize,
}

impl Shard {
    /// Deals `micro_batches` per step out to the ranks of `world`; they must divide evenly, so the
    /// global batch (and so the run's figures) does not change with the number of ranks.
    pub fn new(world: &dyn Collective, micro_batches: usize, what: &str) -> Result<Shard> {
        let size = world.size();
        if micro_batches == 0 || !micro_batches.is_multiple_of(size) {
            bail!(
                "{what} ({micro_batches}) must be a multiple of the number of processes ({size}): the global batch is dealt out whole micro-batches at a time"
            );
        }
        Ok(Shard {
            rank: world.rank(),
            size,
            per_rank: micro_batches / size,
        })
    }

    /// Whether micro-batch `i` of a step is this rank's.
    pub fn owns(&self, i: usize) -> bool {
        i / self.per_rank == self.rank
    }
}

/// Sums metrics over the ranks (keys missing on a rank count as zero there), adding in rank order
/// so every rank gets the same figures.
pub fn sum_metrics(world: &dyn Collective, mine: &Metrics) -> Result<Metrics> {
    if world.size() == 1 {
        return Ok(mine.clone());
    }
    let all = world.all_gather_bytes(&serde_json::to_vec(mine)?)?;
    let mut out = Metrics::new();
    for (rank, bytes) in all.iter().enumerate() {
        let m: Metrics = serde_json::from_slice(bytes)
            .with_context(|| format!("metrics from rank {rank} do not parse"))?;
        for (k, v) in m {
            *out.entry(k).or_default() += v;
        }
    }
    Ok(out)
}

/// Rank 0's value of any serializable state, on every rank.
pub fn broadcast_json<T: serde::Serialize + serde::de::DeserializeOwned>(
    world: &dyn Collective,
    value: &T,
) -> Result<T> {
    let mut bytes = if world.rank() == 0 {
        serde_json::to_vec(value)?
    } else {
        Vec::new()
    };
    world.broadcast_bytes(0, &mut bytes)?;
    serde_json::from_slice(&bytes).context("state broadcast from rank 0 does not parse")
}

/// Every rank's value of any serializable thing, in rank order.
pub fn all_gather_json<T: serde::Serialize + serde::de::DeserializeOwned>(
    world: &dyn Collective,
    mine: &T,
) -> Result<Vec<T>> {
    world
        .all_gather_bytes(&serde_json::to_vec(mine)?)?
        .iter()
        .enumerate()
        .map(|(rank, b)| {
            serde_json::from_slice(b).with_context(|| format!("data from rank {rank} do not parse"))
        })
        .collect()
}

/// Every rank's floats, in rank order (bit for bit).
pub fn all_gather_f32(world: &dyn Collective, mine: &[f32]) -> Result<Vec<Vec<f32>>> {
    let bytes: Vec<u8> = mine.iter().flat_map(|x| x.to_le_bytes()).collect();
    Ok(world
        .all_gather_bytes(&bytes)?
        .iter()
        .map(|b| {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
        .collect())
}

/// This rank's part `[start, end)` of `n` items dealt out in contiguous blocks (`n` a multiple of
/// the number of ranks).
pub fn block(world: &dyn Collective, n: usize) -> (usize, usize) {
    part_of(n, world.rank(), world.size())
}

/// Rank `rank`'s block of `n` items among `size` ranks.
pub fn part_of(n: usize, rank: usize, size: usize) -> (usize, usize) {
    (n * rank / size, n * (rank + 1) / size)
}

/// Copies rank 0's weights and AdamW moments to every rank (at the start of a run, fresh or
/// resumed), so every rank begins from the same state whatever it read from disk.
pub fn broadcast_start(
    world: &dyn Collective,
    model: &mut kiln_model::Model,
    m: &mut [f32],
    v: &mut [f32],
) -> Result<()> {
    // What trains (all weights, or the adapters: a frozen base is loaded alike on every rank).
    world.broadcast_f32(0, model.trainable().params)?;
    world.broadcast_f32(0, m)?;
    world.broadcast_f32(0, v)
}

/// What a data-parallel update adds up over the ranks along with the gradient: its loss, and what
/// the loop reports per step (tokens, statistics, the stop flag).
#[derive(Clone, Debug, Default)]
pub struct StepSums {
    /// This rank's share of the loss (already divided by the global number of micro-batches).
    pub loss: f64,
    pub tokens: u64,
    pub extra: Metrics,
    /// In: this rank was asked to stop (Ctrl-C); out: any rank was.
    pub stop: bool,
}

// Keys of the step's scalars inside the metrics exchange; a NUL never starts a metric's name.
const LOSS_KEY: &str = "\0loss";
const TOKENS_KEY: &str = "\0tokens";
const STOP_KEY: &str = "\0stop";

/// The data-parallel step: sums every rank's gradient (in rank order) and its `sums` (each already
/// divided by the global number of micro-batches), ORing the stop flags. Returns the seconds this
/// rank spent in the collectives (waiting for the slowest rank included). A world of one returns
/// at once.
pub fn reduce_step(world: &dyn Collective, grads: &mut [f32], sums: &mut StepSums) -> Result<f64> {
    if world.size() == 1 {
        return Ok(0.0);
    }
    let t = Instant::now();
    world.allreduce_sum(grads)?;
    let mut mine = sums.extra.clone();
    mine.insert(LOSS_KEY.into(), sums.loss);
    mine.insert(TOKENS_KEY.into(), sums.tokens as f64);
    mine.insert(STOP_KEY.into(), if sums.stop { 1.0 } else { 0.0 });
    let mut all = sum_metrics(world, &mine)?;
    sums.loss = all.remove(LOSS_KEY).unwrap_or(0.0);
    sums.tokens = all.remove(TOKENS_KEY).unwrap_or(0.0) as u64;
    sums.stop = all.remove(STOP_KEY).unwrap_or(0.0) > 0.0;
    sums.extra = all;
    Ok(t.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_contiguous_blocks() {
        struct Fake(usize, usize);
        impl Collective for Fake {
            fn rank(&self) -> usize {
                self.0
            }
            fn size(&self) -> usize {
                self.1
            }
            fn allreduce_sum(&self, _: &mut [f32]) -> Result<()> {
                Ok(())
            }
            fn broadcast_f32(&self, _: usize, _: &mut [f32]) -> Result<()> {
                Ok(())
            }
            fn broadcast_bytes(&self, _: usize, _: &mut Vec<u8>) -> Result<()> {
                Ok(())
            }
            fn all_gather_bytes(&self, m: &[u8]) -> Result<Vec<Vec<u8>>> {
                Ok(vec![m.to_vec()])
            }
            fn barrier(&self) -> Result<()> {
                Ok(())
            }
        }
        let s = Shard::new(&Fake(1, 2), 4, "grad_accum").unwrap();
        let owned: Vec<usize> = (0..4).filter(|&i| s.owns(i)).collect();
        assert_eq!(owned, vec![2, 3]);
        let s = Shard::new(&Fake(0, 1), 3, "grad_accum").unwrap();
        assert!((0..3).all(|i| s.owns(i)));
        let e = Shard::new(&Fake(0, 2), 3, "grad_accum").unwrap_err();
        assert!(e.to_string().contains("grad_accum (3) must be a multiple"));
    }

    #[test]
    fn single_process_metrics_pass_through() {
        let mut m = Metrics::new();
        m.insert("loss".into(), 1.5);
        assert_eq!(sum_metrics(&SingleProcess, &m).unwrap(), m);
        assert_eq!(
            broadcast_json(&SingleProcess, &vec![1u64, 2]).unwrap(),
            vec![1, 2]
        );
    }
}
