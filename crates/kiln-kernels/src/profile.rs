//! Where a step's time goes: wall time per kind of kernel (`kiln bench train` prints it).
//!
//! Every public kernel opens a [`Span`] of its kind. A kind's time is the wall time during which at
//! least one of its spans is open, so spans of one kind running side by side on several threads
//! count once. Kernels of different kinds never nest, so the kinds' times add up to at most the
//! step, and what is left is the glue between kernels. Off by default: then a span costs one
//! relaxed atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The kinds of kernel a profile tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Matrix products (the linear layers, the LM head; attention's own small products are not).
    Matmul,
    /// Attention: scores, softmax, weighted sum, and their backward.
    Attention,
    /// LayerNorm / RMSNorm.
    Norm,
    /// GELU / SwiGLU.
    Activation,
    /// Rotary position embedding.
    Rope,
    /// Token (and position) embedding lookups and their gradients.
    Embedding,
    /// Log-probabilities of the targets from the logits (softmax, entropy) and their backward.
    Loss,
    /// Gradient norm, scaling and AdamW.
    Optimizer,
    /// Residual adds, bias broadcasts and sums, zeroing of buffers.
    Elementwise,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Matmul,
        Kind::Attention,
        Kind::Norm,
        Kind::Activation,
        Kind::Rope,
        Kind::Embedding,
        Kind::Loss,
        Kind::Optimizer,
        Kind::Elementwise,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Matmul => "matmul",
            Kind::Attention => "attention",
            Kind::Norm => "norm",
            Kind::Activation => "activation",
            Kind::Rope => "rope",
            Kind::Embedding => "embedding",
            Kind::Loss => "loss",
            Kind::Optimizer => "optimizer",
            Kind::Elementwise => "elementwise",
        }
    }
}

const N: usize = Kind::ALL.len();

struct Counter {
    /// Spans of this kind open now.
    active: AtomicUsize,
    /// When the first of them opened (nanoseconds since [`now`]'s base).
    since: AtomicU64,
    nanos: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: Counter = Counter {
    active: AtomicUsize::new(0),
    since: AtomicU64::new(0),
    nanos: AtomicU64::new(0),
};
static COUNTERS: [Counter; N] = [ZERO; N];
static ON: AtomicBool = AtomicBool::new(false);
static MATMUL_FLOPS: AtomicU64 = AtomicU64::new(0);

fn now() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Starts (or stops) counting, from zero.
pub fn enable(on: bool) {
    let _ = take();
    ON.store(on, Ordering::SeqCst);
}

/// Time per kind since the last [`take`] (or [`enable`]).
#[derive(Clone, Debug, Default)]
pub struct Profile {
    nanos: [u64; N],
    /// Floating-point operations of the matrix products (2·m·k·n each).
    pub matmul_flops: u64,
}

impl Profile {
    pub fn time(&self, kind: Kind) -> Duration {
        Duration::from_nanos(self.nanos[kind as usize])
    }

    /// The sum over every kind.
    pub fn total(&self) -> Duration {
        Duration::from_nanos(self.nanos.iter().sum())
    }
}

/// The counts since the last call, and restarts them.
pub fn take() -> Profile {
    let mut p = Profile::default();
    for (i, c) in COUNTERS.iter().enumerate() {
        p.nanos[i] = c.nanos.swap(0, Ordering::SeqCst);
    }
    p.matmul_flops = MATMUL_FLOPS.swap(0, Ordering::SeqCst);
    p
}

/// Counts the time of one kernel of a kind while alive.
pub struct Span(Option<usize>);

pub fn span(kind: Kind) -> Span {
    if !ON.load(Ordering::Relaxed) {
        return Span(None);
    }
    let c = &COUNTERS[kind as usize];
    if c.active.fetch_add(1, Ordering::SeqCst) == 0 {
        c.since.store(now(), Ordering::SeqCst);
    }
    Span(Some(kind as usize))
}

/// A [`Kind::Matmul`] span that also counts the product's flops.
pub fn matmul_span(m: usize, k: usize, n: usize) -> Span {
    if ON.load(Ordering::Relaxed) {
        MATMUL_FLOPS.fetch_add((2 * m * k * n) as u64, Ordering::Relaxed);
    }
    span(Kind::Matmul)
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            let c = &COUNTERS[i];
            if c.active.fetch_sub(1, Ordering::SeqCst) == 1 {
                let start = c.since.load(Ordering::SeqCst);
                c.nanos
                    .fetch_add(now().saturating_sub(start), Ordering::SeqCst);
            }
        }
    }
}

/// The machine's read bandwidth from memory (bytes/s): the best of 5 passes over 512 MiB (far
/// beyond any cache), summed on every thread of the pool.
pub fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 512 << 20 >> 2;
    let buf: Vec<f32> = (0..n).map(|i| (i & 0xff) as f32).collect();
    let mut best = f64::MAX;
    let mut check = 0.0f32;
    for _ in 0..5 {
        let t0 = Instant::now();
        let total: f32 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                // 16 independent sums: the loop vectorises.
                let mut acc = [0.0f32; 16];
                for w in c.chunks_exact(16) {
                    for (a, x) in acc.iter_mut().zip(w) {
                        *a += x;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        best = best.min(t0.elapsed().as_secs_f64());
        check += total;
    }
    std::hint::black_box(check);
    (n * 4) as f64 / best
}
