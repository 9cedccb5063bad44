//! The MPI process group (feature `mpi`): `mpirun -np N kiln pretrain ...` trains data-parallel.
//!
//! Gradients are summed by a reduce-scatter and an all-gather of our own over MPI's data movement
//! (all-to-all, all-gather), so the order of the sum is fixed (rank 0 + rank 1 + ...) whatever
//! algorithm the MPI library picks for its own `MPI_Allreduce`, and every rank gets the same bits:
//! each rank sums one slice of the buffer and hands it to the others. It moves 2·(N−1)/N of the
//! buffer per rank, as a ring allreduce does, in buckets so the scratch space stays small.
//!
//! A rank that dies must not leave the others waiting: MPI's default error handler aborts the job
//! on a broken connection, `mpirun` kills the job when a rank exits abnormally, a rank that fails
//! with an error (or panics) calls `MPI_Abort`, and a watchdog ends a process that waits in one
//! collective longer than `KILN_MPI_TIMEOUT` seconds (default 300: a hung or stopped rank).

use anyhow::{bail, Result};
use kiln_train::dist::Collective;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Elements reduced per round: bounds the scratch buffer (4 bytes each).
const BUCKET: usize = 1 << 22;

/// What the watchdog watches: when the current collective began (ms since start-up; 0: none).
static IN_COLLECTIVE_SINCE_MS: AtomicU64 = AtomicU64::new(0);
static COLLECTIVE_NAME: Mutex<&str> = Mutex::new("");

pub struct MpiWorld {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    /// Serializes MPI calls (MPI is initialised with `Threading::Serialized`) and holds the
    /// reduction's scratch buffers.
    scratch: Mutex<Scratch>,
    started: Instant,
}

#[derive(Default)]
struct Scratch {
    recv: Vec<f32>,
    reduced: Vec<f32>,
}

// SAFETY: the communicator is a handle to MPI's world; every call through it is made under the
// `scratch` mutex, which is what MPI_THREAD_SERIALIZED asks of a multi-threaded program.
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

/// Starts MPI when this process was launched by `mpirun` (or another MPI launcher); returns the
/// universe (finalized when dropped) and the world, or None for a plain launch.
pub fn init() -> Result<Option<(Universe, MpiWorld)>> {
    if !launched_by_mpi() {
        return Ok(None);
    }
    let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Serialized) else {
        bail!("MPI was already initialised");
    };
    if threading < Threading::Serialized {
        bail!("the MPI library gives thread level {threading:?}; Kiln needs at least Serialized");
    }
    let world = universe.world();
    let w = MpiWorld {
        rank: world.rank() as usize,
        size: world.size() as usize,
        world,
        scratch: Mutex::new(Scratch::default()),
        started: Instant::now(),
    };
    if w.size > 1 {
        start_watchdog(w.rank, w.started);
    }
    Ok(Some((universe, w)))
}

/// Open MPI, MPICH/Hydra and Slurm set these in every process they launch.
fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// Ranks launched on this machine (to divide its cores among them).
pub fn local_ranks() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(1)
}

fn timeout() -> Duration {
    let secs = std::env::var("KILN_MPI_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(300.0);
    Duration::from_secs_f64(secs)
}

fn start_watchdog(rank: usize, started: Instant) {
    let limit = timeout();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(250));
        let since = IN_COLLECTIVE_SINCE_MS.load(Ordering::SeqCst);
        if since == 0 {
            continue;
        }
        let now = started.elapsed().as_millis() as u64;
        if now.saturating_sub(since) > limit.as_millis() as u64 {
            let name = *COLLECTIVE_NAME.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!(
                "error: rank {rank}: no answer from the other ranks for {:.0} s in {name} (a rank died, hangs or is stopped); exiting (KILN_MPI_TIMEOUT sets the limit)",
                limit.as_secs_f64()
            );
            // Not MPI_Abort: the main thread is inside MPI. The launcher sees a rank exit without
            // finalizing and ends the others.
            std::process::exit(1);
        }
    });
}

impl MpiWorld {
    /// Runs one collective under the lock, with the watchdog's clock running.
    fn collective<T>(&self, name: &'static str, f: impl FnOnce(&mut Scratch) -> T) -> T {
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        *COLLECTIVE_NAME.lock().unwrap_or_else(|e| e.into_inner()) = name;
        let now = (self.started.elapsed().as_millis() as u64).max(1);
        IN_COLLECTIVE_SINCE_MS.store(now, Ordering::SeqCst);
        let out = f(&mut scratch);
        IN_COLLECTIVE_SINCE_MS.store(0, Ordering::SeqCst);
        out
    }
}

/// Ends every rank at once (after an error or a panic on this one).
pub fn abort_all(code: i32) -> ! {
    SimpleCommunicator::world().abort(code)
}

/// Slice `k` of `len` elements split into `parts` nearly equal pieces.
fn piece(len: usize, parts: usize, k: usize) -> (usize, usize) {
    (len * k / parts, len * (k + 1) / parts)
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn allreduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let (p, me) = (self.size, self.rank);
        if p == 1 {
            return Ok(());
        }
        self.collective("the gradient allreduce", |s| {
            for bucket in buf.chunks_mut(BUCKET) {
                let len = bucket.len();
                let pieces: Vec<(usize, usize)> = (0..p).map(|k| piece(len, p, k)).collect();
                let counts: Vec<i32> = pieces.iter().map(|&(a, b)| (b - a) as i32).collect();
                let displs: Vec<i32> = pieces.iter().map(|&(a, _)| a as i32).collect();
                let mine = counts[me] as usize;
                s.recv.resize(mine * p, 0.0);
                // Reduce-scatter: rank k receives every rank's piece k, in rank order...
                {
                    let recv_counts = vec![mine as i32; p];
                    let recv_displs: Vec<i32> = (0..p).map(|k| (k * mine) as i32).collect();
                    let send = Partition::new(&*bucket, &counts[..], &displs[..]);
                    let mut recv =
                        PartitionMut::new(&mut s.recv[..], &recv_counts[..], &recv_displs[..]);
                    self.world.all_to_all_varcount_into(&send, &mut recv);
                }
                // ...and sums them in that order (the fixed order of the sum)...
                s.reduced.clear();
                s.reduced.extend_from_slice(&s.recv[..mine]);
                for k in 1..p {
                    for (r, x) in s.reduced.iter_mut().zip(&s.recv[k * mine..(k + 1) * mine]) {
                        *r += *x;
                    }
                }
                // ...then every rank gathers every summed piece.
                let mut out = PartitionMut::new(&mut *bucket, &counts[..], &displs[..]);
                self.world
                    .all_gather_varcount_into(&s.reduced[..], &mut out);
            }
        });
        Ok(())
    }

    fn broadcast_f32(&self, root: usize, buf: &mut [f32]) -> Result<()> {
        self.collective("a broadcast", |_| {
            for chunk in buf.chunks_mut(BUCKET) {
                self.world
                    .process_at_rank(root as i32)
                    .broadcast_into(chunk);
            }
        });
        Ok(())
    }

    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        self.collective("a broadcast", |_| {
            let proc = self.world.process_at_rank(root as i32);
            let mut len = buf.len() as u64;
            proc.broadcast_into(&mut len);
            buf.resize(len as usize, 0);
            for chunk in buf.chunks_mut(1 << 30) {
                proc.broadcast_into(chunk);
            }
        });
        Ok(())
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        if mine.len() > i32::MAX as usize {
            bail!("all_gather_bytes: {} bytes is too many", mine.len());
        }
        let p = self.size;
        let all = self.collective("a metrics exchange", |_| {
            let mut lens = vec![0i32; p];
            self.world
                .all_gather_into(&(mine.len() as i32), &mut lens[..]);
            let displs: Vec<i32> = lens
                .iter()
                .scan(0i32, |acc, &l| {
                    let d = *acc;
                    *acc += l;
                    Some(d)
                })
                .collect();
            let total: usize = lens.iter().map(|&l| l as usize).sum();
            let mut flat = vec![0u8; total];
            // (MPI refuses the empty buffers of a gather with nothing in it.)
            if total > 0 {
                let mut out = PartitionMut::new(&mut flat[..], &lens[..], &displs[..]);
                self.world.all_gather_varcount_into(mine, &mut out);
            }
            (0..p)
                .map(|k| {
                    let a = displs[k] as usize;
                    flat[a..a + lens[k] as usize].to_vec()
                })
                .collect()
        });
        Ok(all)
    }

    fn barrier(&self) -> Result<()> {
        self.collective("a barrier", |_| self.world.barrier());
        Ok(())
    }
}
