//! Multi-head and grouped-query scaled dot-product attention with causal / padding / packed-segment
//! masks.
//!
//! Layout follows GPT-2's fused `c_attn`: `qkv` is `[b, t, 3c]` with q | k | v along the last dim and
//! head `h` owning columns `h*hs..(h+1)*hs` of each; grouped-query attention ([`AttnShape`]) narrows
//! the k and v sections to `nkv` heads. One rayon task per (batch, head) in the forward, per
//! (batch, kv head) in the backward (whose query heads share dk/dv); inside it, query rows are
//! processed in blocks of 64 with the register-tile products of [`tiles`], which only touch the
//! keys some row of a tile may attend to (so causal attention does about half the work). Under
//! `Precision::Bf16` on CPUs with AVX512-BF16 the products take bf16 pairs instead ([`pairs`]:
//! `VDPBF16PS`, twice the multiply-adds of an f32 FMA); the softmax and its statistics stay f32.
//!
//! Flash-style memory: the `t × t` probabilities live only in a per-task scratch of one block of
//! rows (in cache); the forward saves two numbers a query row (its largest scaled score and the
//! inverse of its softmax sum), from which the backward recomputes each block's probabilities
//! with the same products and the same arithmetic, so bit for bit. Memory per layer is `O(b·nh·t)`
//! instead of `O(b·nh·t²)` (at context 1024, 6 heads, batch 8: 0.4 MB instead of 200 MB).
#![allow(clippy::too_many_arguments)]

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(crate) mod pairs;
pub(crate) mod tiles;

use rayon::prelude::*;

use crate::simd::{self, SyncPtr};
use crate::Precision;
use tiles::{Out, Path, Product, Trim};

/// Query rows per block.
const QB: usize = 64;

/// How one call runs its products: f32 tiles on `path`, or with `bf16` the bf16 pairs of
/// [`pairs`].
#[derive(Clone, Copy, Debug)]
struct Arith {
    path: Path,
    bf16: bool,
}

impl Arith {
    fn f32(path: Path) -> Arith {
        Arith { path, bf16: false }
    }

    /// The arithmetic `prec` asks for, on this CPU: bf16 products where AVX512-BF16 runs them
    /// (elsewhere f32, also when bf16 is forced: see [`attention_forward_with`]).
    fn for_precision(prec: Precision) -> Arith {
        let path = Path::best();
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if prec == Precision::Bf16 && pairs::available() {
            return Arith { path, bf16: true };
        }
        let _ = prec;
        Arith::f32(path)
    }

    /// Whether the products one head wide (`P V`, `dS K`, `P^T dY`, `dS^T Q`) run on AVX-512's
    /// 6 x 64 tile, reading their B rows where they lie in `qkv` / `dout` ([`tiles::product_wide`]):
    /// no packed copy of V, K, or a block's Q and dY, and 4 vector loads and 6 broadcasts per 24
    /// multiply-adds instead of 2 and 8 per 16. Measured at 2 x 1024 tokens (`attention_bench`, 6
    /// rounds alternately, Zen 5, medians): forward 7.16 -> 7.03 ms, backward 16.8 -> 16.0 ms.
    fn wide(self, hs: usize) -> bool {
        cfg!(target_arch = "x86_64") && self.path == Path::Avx512 && !self.bf16 && hs <= 64
    }
}

/// Floats the forward saves per query row for the backward (see [`attention_forward_gqa`]).
pub const STATS_PER_ROW: usize = 2;

/// Length of the saved statistics of a `[b, t]` batch with `nh` query heads.
pub fn stats_len(b: usize, nh: usize, t: usize) -> usize {
    b * nh * t * STATS_PER_ROW
}

/// Which keys a query may attend to: key `j` is allowed for query `i` (same sequence `b`) iff
/// `(!causal || j <= i) && key_valid[b*t + j]` (when `Some`) `&& segments[b*t+i] == segments[b*t+j]`
/// (when `Some`).
///
/// `key_valid` marks real (non-padding) tokens; `segments` gives packed examples distinct ids so
/// attention never crosses example boundaries.
#[derive(Clone, Copy, Default)]
pub struct AttnMask<'a> {
    pub causal: bool,
    pub key_valid: Option<&'a [bool]>,
    pub segments: Option<&'a [u32]>,
}

/// Attention's head layout: `nh` query heads and `nkv` key/value heads (`nh` a multiple of `nkv`;
/// query head `h` reads kv head `h / (nh/nkv)`), each `hs` wide. `qkv` rows are
/// `[q (nh*hs) | k (nkv*hs) | v (nkv*hs)]`; `out` rows `nh*hs`.
///
/// `nkv == nh` is multi-head attention (GPT-2's `c_attn` layout), `nkv < nh` grouped-query attention
/// (Llama): fewer kv heads shrink the KV cache and the k/v projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub nh: usize,
    pub nkv: usize,
    pub hs: usize,
}

impl AttnMask<'_> {
    fn check(&self, b: usize, t: usize) {
        if let Some(kv) = self.key_valid {
            assert!(kv.len() >= b * t, "attention: key_valid too small");
        }
        if let Some(seg) = self.segments {
            assert!(seg.len() >= b * t, "attention: segments too small");
        }
    }
}

impl AttnShape {
    /// Width of one `qkv` row.
    fn qkv_row(&self) -> usize {
        (self.nh + 2 * self.nkv) * self.hs
    }

    /// Query heads per kv head.
    fn group(&self) -> usize {
        self.nh / self.nkv
    }

    fn check(&self) {
        assert!(
            self.nkv > 0 && self.nh.is_multiple_of(self.nkv),
            "attention: nh ({}) must be a positive multiple of nkv ({})",
            self.nh,
            self.nkv
        );
    }
}

/// Multi-head attention forward.
///
/// `qkv`: `[b, t, 3c]` (q | k | v along the last dim; head `h` uses columns `h*hs..(h+1)*hs` of each,
/// `hs = c/nh`). `out`: `[b, t, c]` (heads concatenated). `stats`: `[b, nh, t, 2]` (see
/// [`stats_len`]), what the backward needs: per query row its largest scaled score and the inverse
/// of its softmax sum. Scores are scaled by `1/sqrt(hs)`. A query row with no allowed key gets a
/// zero output (no NaN).
pub fn attention_forward(
    out: &mut [f32],
    stats: &mut [f32],
    qkv: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    mask: &AttnMask,
) {
    assert!(
        c.checked_rem(nh) == Some(0),
        "attention: c must be a multiple of nh"
    );
    let shape = AttnShape {
        nh,
        nkv: nh,
        hs: c / nh,
    };
    attention_forward_gqa(out, stats, qkv, b, t, shape, mask);
}

/// Keys a query row of sequence `bi` may see at most: past the last valid key nothing is attended
/// to (right padding), so those keys are skipped entirely.
fn key_limit(mask: &AttnMask, bi: usize, t: usize) -> usize {
    mask.key_valid.map_or(t, |kv| {
        kv[bi * t..(bi + 1) * t]
            .iter()
            .rposition(|&v| v)
            .map_or(0, |j| j + 1)
    })
}

/// One sequence's mask, as a task sees it.
struct Seq<'a> {
    key_valid: Option<&'a [bool]>,
    segments: Option<&'a [u32]>,
    causal: bool,
    /// See [`key_limit`].
    kmax: usize,
}

impl<'a> Seq<'a> {
    fn new(mask: &AttnMask<'a>, bi: usize, t: usize) -> Self {
        Seq {
            key_valid: mask.key_valid.map(|kv| &kv[bi * t..(bi + 1) * t]),
            segments: mask.segments.map(|s| &s[bi * t..(bi + 1) * t]),
            causal: mask.causal,
            kmax: key_limit(mask, bi, t),
        }
    }

    /// Keys some query of `i0..i1` may see: up to the block end when causal, never past `kmax`.
    fn block_keys(&self, i1: usize, t: usize) -> usize {
        self.kmax.min(if self.causal { i1 } else { t })
    }

    /// Keys query `i` may see (the rest of its row is masked).
    fn row_keys(&self, i: usize, t: usize) -> usize {
        self.kmax.min(if self.causal { i + 1 } else { t })
    }

    fn seg(&self, i: usize) -> u32 {
        self.segments.map_or(0, |s| s[i])
    }

    /// `trim` when causal (the trims follow the causal mask), else none.
    fn trim(&self, trim: Trim) -> Trim {
        if self.causal {
            trim
        } else {
            Trim::None
        }
    }
}

/// One head's operands as a task sees them: pointers to its first row, the qkv row stride `rw`,
/// and the head size.
#[derive(Clone, Copy)]
struct Head {
    q: *const f32,
    k: *const f32,
    v: *const f32,
    rw: usize,
    hs: usize,
}

/// The products' scratch of one task (reused across the tasks a worker runs): a block's
/// probabilities and dS (`QB` rows at stride `tp`, `t` rounded up to whole panels); the task's kv
/// head packed for the products that read it (see [`tiles::pack_transposed`] and
/// [`tiles::pack_rows`]): keys transposed (`kt`), values transposed (`vt`, backward only), and
/// values (forward) or keys (backward) as rows (`rows`); and the backward's block of queries and
/// output gradients as rows.
#[derive(Default)]
struct Scratch {
    p: Vec<f32>,
    ds: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    rows: Vec<f32>,
    q_block: Vec<f32>,
    dy_block: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// The bf16 products' operands (see [`pairs`]), when the call runs them.
    words: Words,
}

/// bf16 pair operands of one task: the kv head's keys transposed (`kt`, the scores' B), values
/// transposed (`vt`, dP's B, backward) and values (forward) or keys (backward) interleaved by pairs
/// of rows (`rows`, the B of `P V` / `dS K`); a block's queries (`q`) and output gradients (`dy`),
/// and its probabilities (forward) or dS (backward) (`a`), as rows of pairs; the backward's
/// transposed key gradients' operands, a block's dY or Q (`ti`) and P or dS (`pi`) interleaved,
/// and their sums `dK^T`, `dV^T` (`dkt`, `dvt`: `hs` rows at stride `tp`).
#[derive(Default)]
#[cfg_attr(
    not(all(target_arch = "x86_64", target_os = "linux")),
    allow(dead_code)
)]
struct Words {
    kt: Vec<u32>,
    vt: Vec<u32>,
    rows: Vec<u32>,
    q: Vec<u32>,
    dy: Vec<u32>,
    a: Vec<u32>,
    ti: Vec<u32>,
    pi: Vec<u32>,
    dkt: Vec<f32>,
    dvt: Vec<f32>,
}

thread_local! {
    /// Each worker's scratch, kept between calls: allocating it per task made the kernel map and
    /// unmap (and zero) pages on every call.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

impl Scratch {
    /// Runs `f` with this thread's scratch.
    fn with<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
        SCRATCH.with(|s| f(&mut s.borrow_mut()))
    }

    fn fit(&mut self, arith: Arith, t: usize, hs: usize, backward: bool) -> usize {
        let path = arith.path;
        let tp = t.next_multiple_of(path.nr());
        let hp = hs.next_multiple_of(path.nr());
        fn grow<T: Copy + Default>(v: &mut Vec<T>, n: usize) {
            if v.len() < n {
                v.resize(n, T::default());
            }
        }
        grow(&mut self.p, QB * tp);
        if backward {
            grow(&mut self.ds, QB * tp);
        }
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if arith.bf16 {
            let w = &mut self.words;
            grow(&mut w.kt, pairs::panel_words(t, hs));
            grow(&mut w.rows, pairs::panel_words(hs, t));
            grow(&mut w.q, QB * pairs::words(hs));
            grow(&mut w.a, QB * pairs::words(tp));
            if backward {
                grow(&mut w.vt, pairs::panel_words(t, hs));
                grow(&mut w.dy, QB * pairs::words(hs));
                grow(&mut w.ti, pairs::panel_words(hs, QB));
                grow(&mut w.pi, pairs::panel_words(tp, QB));
                grow(&mut w.dkt, hs * tp);
                grow(&mut w.dvt, hs * tp);
            }
            return tp;
        }
        grow(&mut self.kt, hs * tp);
        // The wide tile reads these operands in place.
        let packed_rows = !arith.wide(hs);
        if packed_rows {
            grow(&mut self.rows, hp * t);
        }
        if backward {
            grow(&mut self.vt, hs * tp);
            if packed_rows {
                grow(&mut self.q_block, hp * QB);
                grow(&mut self.dy_block, hp * QB);
            }
            grow(&mut self.dk, hs * t);
            grow(&mut self.dv, hs * t);
        }
        tp
    }
}

/// Scaled scores of queries `i0..i1` (`klim` keys, see [`Seq::block_keys`]) into `p` at row stride
/// `tp`, from the packed keys: the one product both passes use, so the backward's scores are the
/// forward's bits. Each row is valid up to its own keys ([`Seq::row_keys`]).
///
/// # Safety
/// `head.q` must cover rows `i0..i1`; `kt` holds the packed keys `0..klim` (see
/// [`tiles::pack_transposed`]), or under bf16 `words.kt` (see [`pairs::transposed`]).
unsafe fn block_scores(
    arith: Arith,
    p: &mut [f32],
    tp: usize,
    head: &Head,
    kt: &[f32],
    words: &mut Words,
    (i0, i1, klim): (usize, usize, usize),
    seq: &Seq,
) {
    let (path, nr) = (arith.path, arith.path.nr());
    let scale = 1.0 / (head.hs as f32).sqrt();
    assert!(p.len() >= (i1 - i0) * tp);
    let prod = Product {
        m: i1 - i0,
        n: klim,
        k: head.hs,
        trim: seq.trim(Trim::Cols(i0)),
        padded: true,
        out: Out::Store(scale),
    };
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if arith.bf16 {
        let hw = pairs::words(head.hs);
        assert!(words.kt.len() >= pairs::panel_words(klim, head.hs));
        pairs::rows(
            &mut words.q,
            hw,
            head.q.add(i0 * head.rw),
            head.rw,
            i1 - i0,
            head.hs,
        );
        let b = (words.kt.as_ptr(), hw * pairs::NR);
        pairs::product((p.as_mut_ptr(), tp), (words.q.as_ptr(), hw, 1), b, prod);
        return;
    }
    let _ = words;
    assert!(kt.len() >= klim.next_multiple_of(nr) * head.hs);
    tiles::product(
        path,
        (p.as_mut_ptr(), tp),
        (head.q.add(i0 * head.rw), head.rw, 1),
        (kt.as_ptr(), nr, head.hs * nr),
        prod,
    );
}

/// Grouped-query attention forward: as [`attention_forward`], with the head layout of `shape`
/// (`out` `[b, t, nh*hs]`, `stats` `[b, nh, t, 2]`). One rayon task per (batch, query head), so
/// the work splits as finely as multi-head attention's; kv heads are only read here.
pub fn attention_forward_gqa(
    out: &mut [f32],
    stats: &mut [f32],
    qkv: &[f32],
    b: usize,
    t: usize,
    shape: AttnShape,
    mask: &AttnMask,
) {
    forward_on(Arith::f32(Path::best()), out, stats, qkv, b, t, shape, mask)
}

/// [`attention_forward_gqa`] with the products in `prec`: under [`Precision::Bf16`], on a CPU with
/// AVX512-BF16, the scores and the value sums take bf16 operands with f32 sums (as the bf16
/// matmuls do; the softmax stays f32); elsewhere (no such hardware, even with `KILN_FORCE_BF16`)
/// they stay f32. The backward must be given the same precision (it recomputes the forward's
/// scores).
pub fn attention_forward_with(
    prec: Precision,
    out: &mut [f32],
    stats: &mut [f32],
    qkv: &[f32],
    b: usize,
    t: usize,
    shape: AttnShape,
    mask: &AttnMask,
) {
    forward_on(
        Arith::for_precision(prec),
        out,
        stats,
        qkv,
        b,
        t,
        shape,
        mask,
    )
}

/// [`attention_forward_gqa`] with the products in `arith` (whose path must be available).
fn forward_on(
    arith: Arith,
    out: &mut [f32],
    stats: &mut [f32],
    qkv: &[f32],
    b: usize,
    t: usize,
    shape: AttnShape,
    mask: &AttnMask,
) {
    assert!(
        arith.path.available(),
        "attention: {arith:?} is not available on this CPU"
    );
    let _span = crate::profile::span(crate::profile::Kind::Attention);
    shape.check();
    let AttnShape { nh, nkv, hs } = shape;
    let (c, rw, group) = (nh * hs, shape.qkv_row(), shape.group());
    assert!(qkv.len() >= b * t * rw, "attention_forward: qkv too small");
    assert!(out.len() >= b * t * c, "attention_forward: out too small");
    assert!(
        stats.len() >= stats_len(b, nh, t),
        "attention_forward: stats too small"
    );
    mask.check(b, t);
    if b * t == 0 || c == 0 {
        return;
    }
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let mask = *mask;

    stats[..stats_len(b, nh, t)]
        .par_chunks_mut(t * STATS_PER_ROW)
        .enumerate()
        .for_each(|(bh, stats_bh)| {
            Scratch::with(|scratch| {
                let (bi, h) = (bh / nh, bh % nh);
                let kvh = h / group;
                let seq = Seq::new(&mask, bi, t);
                let row0 = bi * t * rw;
                let head = Head {
                    q: qkv[row0 + h * hs..].as_ptr(),
                    k: qkv[row0 + (nh + kvh) * hs..].as_ptr(),
                    v: qkv[row0 + (nh + nkv + kvh) * hs..].as_ptr(),
                    rw,
                    hs,
                };
                // SAFETY (pointer uses below): all row/column indices stay inside this sequence and
                // head, which the length asserts above cover; tasks write disjoint (batch, head)
                // column blocks of `out`.
                unsafe {
                    let y = out_ptr.get().add(bi * t * c + h * hs);
                    forward_head(arith, scratch, &seq, &head, stats_bh, (y, c), t);
                }
            })
        });
}

/// One (sequence, query head) of the forward: its output columns `y` (row stride `c`) and statistics.
///
/// # Safety
/// `head` must cover `t` rows of its sequence, `y` `t` rows of `hs` columns at stride `c`, which no
/// other thread touches.
unsafe fn forward_head(
    arith: Arith,
    scratch: &mut Scratch,
    seq: &Seq,
    head: &Head,
    stats_bh: &mut [f32],
    (y, c): (*mut f32, usize),
    t: usize,
) {
    let (hs, rw, path) = (head.hs, head.rw, arith.path);
    let (tp, nr) = (scratch.fit(arith, t, hs, false), path.nr());
    if arith.bf16 {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            pairs::transposed(&mut scratch.words.kt, head.k, rw, seq.kmax, hs);
            pairs::interleaved(&mut scratch.words.rows, head.v, rw, seq.kmax, hs);
        }
    } else {
        tiles::pack_transposed(path, &mut scratch.kt, head.k, rw, seq.kmax, hs);
        if !arith.wide(hs) {
            tiles::pack_rows(path, &mut scratch.rows, head.v, rw, seq.kmax, hs);
        }
    }
    for i0 in (0..t).step_by(QB) {
        let i1 = (i0 + QB).min(t);
        let klim = seq.block_keys(i1, t);
        let p = &mut scratch.p[..(i1 - i0) * tp];
        let words = &mut scratch.words;
        block_scores(arith, p, tp, head, &scratch.kt, words, (i0, i1, klim), seq);
        for i in i0..i1 {
            let row = &mut p[(i - i0) * tp..(i - i0) * tp + klim];
            let (live, dead) = row.split_at_mut(seq.row_keys(i, t));
            let (mx, inv) = masked_softmax_row(live, seq.key_valid, seq.segments, seq.seg(i));
            dead.fill(0.0);
            stats_bh[i * STATS_PER_ROW] = mx;
            stats_bh[i * STATS_PER_ROW + 1] = inv;
        }
        // Y[i0..i1] = P[i0..i1, 0..klim] @ V[0..klim], straight into this head's columns.
        let prod = Product {
            m: i1 - i0,
            n: hs,
            k: klim,
            trim: seq.trim(Trim::DepthEnd(i0)),
            padded: false,
            out: Out::Store(1.0),
        };
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if arith.bf16 {
            let aw = pairs::words(tp);
            pairs::rows(&mut words.a, aw, p.as_ptr(), tp, i1 - i0, klim);
            let b = (words.rows.as_ptr(), pairs::words(seq.kmax) * pairs::NR);
            pairs::product((y.add(i0 * c), c), (words.a.as_ptr(), aw, 1), b, prod);
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if arith.wide(hs) {
            tiles::product_wide((y.add(i0 * c), c), (p.as_ptr(), tp, 1), (head.v, rw), prod);
            continue;
        }
        tiles::product(
            path,
            (y.add(i0 * c), c),
            (p.as_ptr(), tp, 1),
            (scratch.rows.as_ptr(), nr, seq.kmax * nr),
            prod,
        );
    }
}

/// One query row of each of the query heads that share a kv head, against `len` cached keys and
/// values (token-by-token inference with a KV cache): for each head `h` of the group,
/// `out_h = softmax(scale * q_h . K[0..len]^T) @ V[0..len]`, no mask (the cache holds only visible
/// positions). `q` and `out` hold the group's heads one after the other, `hs` floats each; key and
/// value `j` are `keys[j*stride..][..hs]` / `values[j*stride..][..hs]`; `scores` is scratch of at
/// least `group * len`. Every value row is read once for the whole group, and the keys once from
/// memory (grouped-query models read the cache once, not once per query head); each head's result
/// is bit for bit what a group of one gives.
pub fn attention_cached_row(
    out: &mut [f32],
    q: &[f32],
    hs: usize,
    keys: &[f32],
    values: &[f32],
    stride: usize,
    len: usize,
    scale: f32,
    scores: &mut [f32],
) {
    let _span = crate::profile::span(crate::profile::Kind::Attention);
    assert!(
        hs > 0 && q.len().is_multiple_of(hs),
        "attention_cached_row: q is not whole heads"
    );
    assert_eq!(
        out.len(),
        q.len(),
        "attention_cached_row: out and q differ in length"
    );
    let group = q.len() / hs;
    assert!(
        scores.len() >= group * len,
        "attention_cached_row: scores too small"
    );
    if len == 0 {
        out.fill(0.0);
        return;
    }
    let need = (len - 1) * stride + hs;
    assert!(
        keys.len() >= need && values.len() >= need,
        "attention_cached_row: cache too small"
    );
    cached_rows(
        out,
        q,
        hs,
        keys,
        values,
        stride,
        &mut scores[..group * len],
        scale,
    );
}

simd::multiversion! {
    fn cached_rows(out: &mut [f32], q: &[f32], hs: usize, keys: &[f32], values: &[f32], stride: usize, scores: &mut [f32], scale: f32) {
        let group = q.len() / hs;
        let len = scores.len() / group;
        // Scores `[group, len]`, a head at a time (the keys come from memory for the first head
        // and from cache for the rest; with the loop over the heads inside the one over the keys,
        // the compiler vectorised across the heads with gathers, and long-context prefill ran
        // 1.35x slower).
        let path = Path::best();
        for (h, s) in scores.chunks_exact_mut(len).enumerate() {
            let qh = &q[h * hs..(h + 1) * hs];
            // SAFETY: the caller checked that `keys` holds `len` rows of `hs` at `stride`.
            unsafe { tiles::dot_rows(path, s, qh, keys.as_ptr(), stride, scale) };
        }
        let mut inv = [0.0f32; GROUP_CHUNK];
        for h0 in (0..group).step_by(GROUP_CHUNK) {
            let heads = (group - h0).min(GROUP_CHUNK);
            for (hh, inv) in inv[..heads].iter_mut().enumerate() {
                let s = &mut scores[(h0 + hh) * len..(h0 + hh + 1) * len];
                let mx = simd::max(s);
                *inv = 1.0 / simd::exp_sum(s, mx);
            }
            let s = &scores[h0 * len..(h0 + heads) * len];
            let o = &mut out[h0 * hs..(h0 + heads) * hs];
            match heads {
                1 => value_sum::<1>(o, s, &inv, values, stride, hs),
                2 => value_sum::<2>(o, s, &inv, values, stride, hs),
                3 => value_sum::<3>(o, s, &inv, values, stride, hs),
                _ => value_sum::<GROUP_CHUNK>(o, s, &inv, values, stride, hs),
            }
        }
    }
}

/// Query heads whose value sums share one pass over the cached values (4 heads x 4 vectors of
/// accumulators: half of AVX-512's registers).
const GROUP_CHUNK: usize = 4;

/// `out_h = sum_j p_h[j] * inv_h * V[j]` for `H` heads (`p` `[H, len]`, `out` `[H, hs]`), each
/// value row read once for all of them. The weighted sum runs 64 columns at a time in local
/// accumulators the compiler keeps in registers (accumulating into `out` made every key wait for
/// the last key's stores); per head, the same operations in the same order as a plain loop.
#[inline(always)]
fn value_sum<const H: usize>(
    out: &mut [f32],
    p: &[f32],
    inv: &[f32; GROUP_CHUNK],
    values: &[f32],
    stride: usize,
    hs: usize,
) {
    let len = p.len() / H;
    let mut c0 = 0;
    while c0 + ROW_COLS <= hs {
        let mut acc = [[0.0f32; ROW_COLS]; H];
        for j in 0..len {
            let v: &[f32; ROW_COLS] = values[j * stride + c0..j * stride + c0 + ROW_COLS]
                .try_into()
                .unwrap();
            for (h, acc) in acc.iter_mut().enumerate() {
                let w = p[h * len + j] * inv[h];
                for d in 0..ROW_COLS {
                    acc[d] += w * v[d];
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            out[h * hs + c0..h * hs + c0 + ROW_COLS].copy_from_slice(acc);
        }
        c0 += ROW_COLS;
    }
    if c0 < hs {
        for h in 0..H {
            let out = &mut out[h * hs + c0..(h + 1) * hs];
            out.fill(0.0);
            for j in 0..len {
                let w = p[h * len + j] * inv[h];
                let v = &values[j * stride + c0..j * stride + hs];
                for (o, &x) in out.iter_mut().zip(v) {
                    *o += w * x;
                }
            }
        }
    }
}

/// Columns of the cached-row value sum kept in registers at a time (four AVX-512 vectors).
const ROW_COLS: usize = 64;

simd::multiversion! {
    /// In place: scaled scores -> masked softmax probabilities for one query row (restricted to the
    /// keys `0..row.len()`). Returns the row's largest score and the inverse of its sum, which
    /// [`softmax_row_again`] recomputes the row from; a row with no allowed key becomes all zeros
    /// (returned as `(-inf, 0)`).
    fn masked_softmax_row(
        row: &mut [f32],
        key_valid: Option<&[bool]>,
        segments: Option<&[u32]>,
        seg_i: u32,
    ) -> (f32, f32) {
        apply_mask(row, key_valid, segments, seg_i);
        let mx = simd::max(row);
        if mx == f32::NEG_INFINITY {
            row.fill(0.0);
            return (mx, 0.0);
        }
        // exp(-inf) is exactly 0, so masked keys get probability 0.
        let inv = 1.0 / simd::exp_sum(row, mx);
        for s in row.iter_mut() {
            *s *= inv;
        }
        (mx, inv)
    }
}

simd::multiversion! {
    /// The backward's copy of [`masked_softmax_row`]: the same scores and the saved `(mx, inv)`
    /// give the same probabilities, bit for bit (the same operations in the same order).
    fn softmax_row_again(
        row: &mut [f32],
        key_valid: Option<&[bool]>,
        segments: Option<&[u32]>,
        seg_i: u32,
        saved: (f32, f32),
    ) {
        let (mx, inv) = saved;
        if mx == f32::NEG_INFINITY {
            row.fill(0.0);
            return;
        }
        apply_mask(row, key_valid, segments, seg_i);
        for s in row.iter_mut() {
            *s = simd::exp(*s - mx) * inv;
        }
    }
}

/// `-inf` for the keys the mask hides.
#[inline(always)]
fn apply_mask(row: &mut [f32], key_valid: Option<&[bool]>, segments: Option<&[u32]>, seg_i: u32) {
    let n = row.len();
    // Selects rather than branches, so these loops vectorise.
    if let Some(kv) = key_valid {
        for (s, &ok) in row.iter_mut().zip(&kv[..n]) {
            *s = if ok { *s } else { f32::NEG_INFINITY };
        }
    }
    if let Some(seg) = segments {
        for (s, &sj) in row.iter_mut().zip(&seg[..n]) {
            *s = if sj == seg_i { *s } else { f32::NEG_INFINITY };
        }
    }
}

/// Multi-head attention backward: `dqkv += ...`, given `dout` `[b,t,c]`, the forward's `qkv`,
/// `stats` and mask.
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    stats: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    mask: &AttnMask,
) {
    assert!(
        c.checked_rem(nh) == Some(0),
        "attention: c must be a multiple of nh"
    );
    let shape = AttnShape {
        nh,
        nkv: nh,
        hs: c / nh,
    };
    attention_backward_gqa(dqkv, dout, qkv, stats, b, t, shape, mask);
}

/// Grouped-query attention backward: as [`attention_backward`], with the head layout of `shape`.
///
/// The query heads of a group all add into their kv head's dk/dv, so there is one rayon task per
/// (batch, kv head) that runs its query heads one after the other in head order: no two tasks
/// write the same columns, and the sums into dk/dv have a fixed order. Each block of query rows
/// first recomputes its probabilities (the forward's score product and softmax, from `stats`).
pub fn attention_backward_gqa(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    stats: &[f32],
    b: usize,
    t: usize,
    shape: AttnShape,
    mask: &AttnMask,
) {
    backward_on(
        Arith::f32(Path::best()),
        dqkv,
        dout,
        qkv,
        stats,
        b,
        t,
        shape,
        mask,
    )
}

/// [`attention_backward_gqa`] with the products in `prec` (the forward's, see
/// [`attention_forward_with`]): under bf16 its five products (the recomputed scores, `dP = dY V^T`,
/// `dQ = dS K`, and the key and value gradients, computed transposed) take bf16 operands.
pub fn attention_backward_with(
    prec: Precision,
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    stats: &[f32],
    b: usize,
    t: usize,
    shape: AttnShape,
    mask: &AttnMask,
) {
    backward_on(
        Arith::for_precision(prec),
        dqkv,
        dout,
        qkv,
        stats,
        b,
        t,
        shape,
        mask,
    )
}

/// [`attention_backward_gqa`] with the products in `arith` (whose path must be available; the
/// forward's statistics must come from the same arithmetic).
fn backward_on(
    arith: Arith,
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    stats: &[f32],
    b: usize,
    t: usize,
    shape: AttnShape,
    mask: &AttnMask,
) {
    assert!(
        arith.path.available(),
        "attention: {arith:?} is not available on this CPU"
    );
    let path = arith.path;
    let _span = crate::profile::span(crate::profile::Kind::Attention);
    shape.check();
    let AttnShape { nh, nkv, hs } = shape;
    let (c, rw, group) = (nh * hs, shape.qkv_row(), shape.group());
    assert!(qkv.len() >= b * t * rw, "attention_backward: qkv too small");
    assert!(
        dqkv.len() >= b * t * rw,
        "attention_backward: dqkv too small"
    );
    assert!(
        dout.len() >= b * t * c,
        "attention_backward: dout too small"
    );
    assert!(
        stats.len() >= stats_len(b, nh, t),
        "attention_backward: stats too small"
    );
    mask.check(b, t);
    if b * t == 0 || c == 0 {
        return;
    }
    let dqkv_ptr = SyncPtr(dqkv.as_mut_ptr());
    let mask = *mask;

    (0..b * nkv).into_par_iter().for_each(|bkv| {
        Scratch::with(|scratch| {
            let (bi, kvh) = (bkv / nkv, bkv % nkv);
            let row0 = bi * t * rw;
            let seq = Seq::new(&mask, bi, t);
            let (k, v) = (
                qkv[row0 + (nh + kvh) * hs..].as_ptr(),
                qkv[row0 + (nh + nkv + kvh) * hs..].as_ptr(),
            );
            let tp = scratch.fit(arith, t, hs, true);
            // SAFETY (all pointer uses below): offsets stay inside this sequence and its heads,
            // covered by the asserts above; this task alone writes kv head `kvh`'s dk/dv columns
            // and its query heads' dq columns of sequence `bi`.
            unsafe {
                if arith.bf16 {
                    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
                    {
                        let w = &mut scratch.words;
                        pairs::transposed(&mut w.kt, k, rw, seq.kmax, hs);
                        pairs::transposed(&mut w.vt, v, rw, seq.kmax, hs);
                        pairs::interleaved(&mut w.rows, k, rw, seq.kmax, hs);
                    }
                } else {
                    tiles::pack_transposed(path, &mut scratch.kt, k, rw, seq.kmax, hs);
                    tiles::pack_transposed(path, &mut scratch.vt, v, rw, seq.kmax, hs);
                    if !arith.wide(hs) {
                        tiles::pack_rows(path, &mut scratch.rows, k, rw, seq.kmax, hs);
                    }
                }
                let base = dqkv_ptr.get().add(row0);
                if arith.bf16 {
                    scratch.words.dkt[..hs * tp].fill(0.0);
                    scratch.words.dvt[..hs * tp].fill(0.0);
                } else {
                    scratch.dk[..seq.kmax * hs].fill(0.0);
                    scratch.dv[..seq.kmax * hs].fill(0.0);
                }
                for h in kvh * group..(kvh + 1) * group {
                    let bh = bi * nh + h;
                    let head = Head {
                        q: qkv[row0 + h * hs..].as_ptr(),
                        k,
                        v,
                        rw,
                        hs,
                    };
                    let grads = Grads {
                        dy: dout[bi * t * c + h * hs..].as_ptr(),
                        c,
                        dq: base.add(h * hs),
                    };
                    let stats_bh = &stats[bh * t * STATS_PER_ROW..(bh + 1) * t * STATS_PER_ROW];
                    head_backward(arith, scratch, tp, &seq, stats_bh, &head, &grads, t);
                }
                #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
                if arith.bf16 {
                    // The group's dK^T / dV^T, transposed into their qkv columns.
                    let w = &scratch.words;
                    for (sum, col) in [(&w.dkt, nh + kvh), (&w.dvt, nh + nkv + kvh)] {
                        pairs::add_transposed(base.add(col * hs), rw, sum, tp, hs, seq.kmax);
                    }
                    return;
                }
                // The group's dk / dv, summed in contiguous rows, into their qkv columns.
                for (sum, col) in [(&scratch.dk, nh + kvh), (&scratch.dv, nh + nkv + kvh)] {
                    for j in 0..seq.kmax {
                        let d = std::slice::from_raw_parts_mut(base.add(j * rw + col * hs), hs);
                        simd::add_to(d, &sum[j * hs..(j + 1) * hs]);
                    }
                }
            }
        })
    });
}

/// One query head's gradients: `dy` its output gradient (row stride `c`), `dq` its query columns
/// (row stride `rw`).
struct Grads {
    dy: *const f32,
    c: usize,
    dq: *mut f32,
}

/// One query head's share of the backward: adds into its `dq` and into its kv head's `dk`, `dv`,
/// with the kv head's keys and values already packed in `scratch`.
///
/// # Safety
/// The pointers must cover `t` rows of `hs` columns at their strides, and no other thread may
/// access `dq` during the call.
unsafe fn head_backward(
    arith: Arith,
    scratch: &mut Scratch,
    tp: usize,
    seq: &Seq,
    stats_bh: &[f32],
    head: &Head,
    g: &Grads,
    t: usize,
) {
    let (hs, rw, path) = (head.hs, head.rw, arith.path);
    let nr = path.nr();
    let scale = 1.0 / (hs as f32).sqrt();
    let Scratch {
        p,
        ds,
        kt,
        vt,
        rows: k_rows,
        q_block,
        dy_block,
        dk,
        dv,
        words,
    } = scratch;
    for i0 in (0..t).step_by(QB) {
        let i1 = (i0 + QB).min(t);
        let m = i1 - i0;
        let klim = seq.block_keys(i1, t);
        if klim == 0 {
            continue; // no query here attends to anything: no gradient flows
        }
        let (p, ds) = (&mut p[..m * tp], &mut ds[..m * tp]);
        let wide = arith.wide(hs);
        if !arith.bf16 && !wide {
            tiles::pack_rows(path, q_block, head.q.add(i0 * rw), rw, m, hs);
            tiles::pack_rows(path, dy_block, g.dy.add(i0 * g.c), g.c, m, hs);
        }
        // P[i0..i1, 0..klim], as the forward had it.
        block_scores(arith, p, tp, head, kt, words, (i0, i1, klim), seq);
        for i in i0..i1 {
            let row = &mut p[(i - i0) * tp..(i - i0) * tp + klim];
            let (live, dead) = row.split_at_mut(seq.row_keys(i, t));
            let saved = (stats_bh[i * STATS_PER_ROW], stats_bh[i * STATS_PER_ROW + 1]);
            softmax_row_again(live, seq.key_valid, seq.segments, seq.seg(i), saved);
            dead.fill(0.0);
        }
        // dP[i0..i1, 0..klim] = dY[i0..i1] @ V[0..klim]^T
        let prod = Product {
            m,
            n: klim,
            k: hs,
            trim: seq.trim(Trim::Cols(i0)),
            padded: true,
            out: Out::Store(1.0),
        };
        let dp_bf16 = {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            if arith.bf16 {
                let hw = pairs::words(hs);
                pairs::rows(&mut words.dy, hw, g.dy.add(i0 * g.c), g.c, m, hs);
                let b = (words.vt.as_ptr(), hw * pairs::NR);
                pairs::product((ds.as_mut_ptr(), tp), (words.dy.as_ptr(), hw, 1), b, prod);
            }
            arith.bf16
        };
        if !dp_bf16 {
            let a = (g.dy.add(i0 * g.c), g.c, 1);
            tiles::product(
                path,
                (ds.as_mut_ptr(), tp),
                a,
                (vt.as_ptr(), nr, hs * nr),
                prod,
            );
        }
        // Softmax backward, row by row: dS = P * (dP - sum(P * dP)) * scale (zero where masked).
        for i in i0..i1 {
            let at = (i - i0) * tp;
            let lim = seq.row_keys(i, t);
            softmax_backward_row(&mut ds[at..at + lim], &p[at..at + lim], scale);
            ds[at + lim..at + klim].fill(0.0);
        }
        // dV[0..klim] += P[i0..i1, 0..klim]^T @ dY[i0..i1] (under bf16 as dV^T += dY^T P)
        let key_trim = seq.trim(Trim::DepthStart(i0));
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        let trim_t = seq.trim(Trim::ColsStart(i0));
        if arith.bf16 {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            {
                let (x, a) = ((g.dy.add(i0 * g.c), g.c), (p.as_ptr(), tp));
                let ops = (&mut words.ti[..], &mut words.pi[..]);
                key_grads_t(&mut words.dvt, tp, ops, x, a, (m, klim, hs), trim_t);
            }
        } else {
            let b = match wide {
                true => BlockRows::InPlace(g.dy.add(i0 * g.c), g.c),
                false => BlockRows::Packed(dy_block),
            };
            add_key_grads(path, dv, (p, tp), b, (m, klim, hs), key_trim);
        }
        // dQ[i0..i1] += dS[i0..i1, 0..klim] @ K[0..klim]
        let prod = Product {
            m,
            n: hs,
            k: klim,
            trim: seq.trim(Trim::DepthEnd(i0)),
            padded: false,
            out: Out::Add,
        };
        let dq_bf16 = {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            if arith.bf16 {
                let aw = pairs::words(tp);
                pairs::rows(&mut words.a, aw, ds.as_ptr(), tp, m, klim);
                let b = (words.rows.as_ptr(), pairs::words(seq.kmax) * pairs::NR);
                pairs::product((g.dq.add(i0 * rw), rw), (words.a.as_ptr(), aw, 1), b, prod);
            }
            arith.bf16
        };
        if !dq_bf16 {
            let (c, a) = ((g.dq.add(i0 * rw), rw), (ds.as_ptr(), tp, 1));
            match wide {
                #[cfg(target_arch = "x86_64")]
                true => tiles::product_wide(c, a, (head.k, rw), prod),
                _ => tiles::product(path, c, a, (k_rows.as_ptr(), nr, seq.kmax * nr), prod),
            }
        }
        // dK[0..klim] += dS[i0..i1, 0..klim]^T @ Q[i0..i1] (under bf16 as dK^T += Q^T dS)
        if arith.bf16 {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            {
                let (x, a) = ((head.q.add(i0 * rw), rw), (ds.as_ptr(), tp));
                let ops = (&mut words.ti[..], &mut words.pi[..]);
                key_grads_t(&mut words.dkt, tp, ops, x, a, (m, klim, hs), trim_t);
            }
        } else {
            let b = match wide {
                true => BlockRows::InPlace(head.q.add(i0 * rw), rw),
                false => BlockRows::Packed(q_block),
            };
            add_key_grads(path, dk, (ds, tp), b, (m, klim, hs), key_trim);
        }
    }
}

/// `D^T[.., 0..klim] += X[i0..i1]^T @ A[i0..i1, 0..klim]` in bf16 pairs: a kv head's transposed
/// gradient (`dV^T` from dY and P, `dK^T` from Q and dS) at row stride `tp`, from a block's `m`
/// rows of X (`hs` wide, at stride `x_rs`) and of A (`klim` wide, at `a_rs`), both interleaved by
/// pairs of rows into `ti` / `pi` (X's panels then read transposed as the A operand).
///
/// # Safety
/// AVX512-BF16; the pointers must cover the block's rows.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
unsafe fn key_grads_t(
    dt: &mut [f32],
    tp: usize,
    (ti, pi): (&mut [u32], &mut [u32]),
    (x, x_rs): (*const f32, usize),
    (a, a_rs): (*const f32, usize),
    (m, klim, hs): (usize, usize, usize),
    trim: Trim,
) {
    use pairs::NR;
    assert!(dt.len() >= hs * tp && klim <= tp);
    pairs::interleaved(ti, x, x_rs, m, hs);
    pairs::interleaved(pi, a, a_rs, m, klim);
    let ps = pairs::words(m) * NR;
    for c0 in (0..hs).step_by(NR) {
        pairs::product(
            (dt.as_mut_ptr().add(c0 * tp), tp),
            (ti.as_ptr().add(c0 / NR * ps), 1, NR),
            (pi.as_ptr(), ps),
            Product {
                m: (hs - c0).min(NR),
                n: klim,
                k: m,
                trim,
                padded: true,
                out: Out::Add,
            },
        );
    }
}

/// Where a key gradient's B (a block's `m` rows of dY or Q) is read from.
#[derive(Clone, Copy)]
enum BlockRows<'a> {
    /// As packed by [`tiles::pack_rows`], on the path's tiles.
    Packed(&'a [f32]),
    /// Where they lie, `(pointer, row stride)`, on AVX-512's wide tile (see [`Arith::wide`]).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    InPlace(*const f32, usize),
}

/// `D[0..klim] += A[.., 0..klim]^T @ B`: a kv head's gradient (dV from P and dY, dK from dS and Q),
/// summed in contiguous rows of `hs`, from a block's `m` rows of A at stride `tp` and the block's
/// `m` rows of B.
///
/// # Safety
/// `path` must be available (AVX-512F for [`BlockRows::InPlace`]); B must cover `m` rows of `hs`.
unsafe fn add_key_grads(
    path: Path,
    d: &mut [f32],
    (a, tp): (&[f32], usize),
    b: BlockRows,
    (m, klim, hs): (usize, usize, usize),
    trim: Trim,
) {
    assert!(d.len() >= klim * hs && a.len() >= (m - 1) * tp + klim);
    let prod = Product {
        m: klim,
        n: hs,
        k: m,
        trim,
        padded: false,
        out: Out::Add,
    };
    let (c, a) = ((d.as_mut_ptr(), hs), (a.as_ptr(), 1, tp));
    match b {
        BlockRows::Packed(b) => {
            let nr = path.nr();
            assert!(b.len() >= m * hs);
            tiles::product(path, c, a, (b.as_ptr(), nr, m * nr), prod);
        }
        #[cfg(target_arch = "x86_64")]
        BlockRows::InPlace(b, rs) => tiles::product_wide(c, a, (b, rs), prod),
        #[cfg(not(target_arch = "x86_64"))]
        BlockRows::InPlace(..) => unreachable!("the wide tile is AVX-512's"),
    }
}

simd::multiversion! {
    /// In place: `dp` (dL/dP for one row) -> dL/dS = `p * (dp - <p, dp>) * scale`.
    fn softmax_backward_row(dp: &mut [f32], p: &[f32], scale: f32) {
        let p = &p[..dp.len()];
        let d = simd::dot(p, dp);
        for (g, &pj) in dp.iter_mut().zip(p) {
            *g = pj * (*g - d) * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    /// What a forward leaves for the backward, and the probabilities it implies.
    struct Saved {
        /// `[b, nh, t, t]`, recomputed from `stats` as the backward does.
        probs: Vec<f32>,
        stats: Vec<f32>,
    }

    /// The softmax probabilities `[b, nh, t, t]` that `stats` and the scores give: the backward's
    /// own recomputation (score product, then `softmax_row_again`), exactly zero where masked.
    fn probabilities(
        qkv: &[f32],
        stats: &[f32],
        b: usize,
        t: usize,
        shape: AttnShape,
        mask: &AttnMask,
    ) -> Vec<f32> {
        let AttnShape { nh, hs, .. } = shape;
        let (rw, group) = (shape.qkv_row(), shape.group());
        let path = Path::best();
        let mut scratch = Scratch::default();
        let tp = scratch.fit(Arith::f32(path), t, hs, false);
        let mut att = vec![0.0f32; b * nh * t * t];
        for bi in 0..b {
            let seq = Seq::new(mask, bi, t);
            for h in 0..nh {
                let row0 = bi * t * rw;
                let head = Head {
                    q: qkv[row0 + h * hs..].as_ptr(),
                    k: qkv[row0 + (nh + h / group) * hs..].as_ptr(),
                    v: qkv[row0 + (nh + shape.nkv + h / group) * hs..].as_ptr(),
                    rw,
                    hs,
                };
                let bh = bi * nh + h;
                let att_bh = &mut att[bh * t * t..(bh + 1) * t * t];
                unsafe { tiles::pack_transposed(path, &mut scratch.kt, head.k, rw, seq.kmax, hs) };
                for i0 in (0..t).step_by(QB) {
                    let i1 = (i0 + QB).min(t);
                    let klim = seq.block_keys(i1, t);
                    let p = &mut scratch.p[..(i1 - i0) * tp];
                    let words = &mut scratch.words;
                    let arith = Arith::f32(path);
                    unsafe {
                        block_scores(
                            arith,
                            p,
                            tp,
                            &head,
                            &scratch.kt,
                            words,
                            (i0, i1, klim),
                            &seq,
                        )
                    };
                    for i in i0..i1 {
                        let row = &mut p[(i - i0) * tp..][..klim];
                        let lim = seq.row_keys(i, t);
                        let at = (bh * t + i) * STATS_PER_ROW;
                        let live = &mut row[..lim];
                        softmax_row_again(
                            live,
                            seq.key_valid,
                            seq.segments,
                            seq.seg(i),
                            (stats[at], stats[at + 1]),
                        );
                        att_bh[i * t..i * t + lim].copy_from_slice(live);
                    }
                }
            }
        }
        att
    }

    struct Case {
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
        nkv: usize,
        causal: bool,
        key_valid: Option<Vec<bool>>,
        segments: Option<Vec<u32>>,
    }

    impl Case {
        fn mask(&self) -> AttnMask<'_> {
            AttnMask {
                causal: self.causal,
                key_valid: self.key_valid.as_deref(),
                segments: self.segments.as_deref(),
            }
        }
        fn allowed(&self, bi: usize, i: usize, j: usize) -> bool {
            let t = self.t;
            (!self.causal || j <= i)
                && self
                    .key_valid
                    .as_ref()
                    .map(|kv| kv[bi * t + j])
                    .unwrap_or(true)
                && self
                    .segments
                    .as_ref()
                    .map(|s| s[bi * t + i] == s[bi * t + j])
                    .unwrap_or(true)
        }
        fn shape(&self) -> AttnShape {
            AttnShape {
                nh: self.nh,
                nkv: self.nkv,
                hs: self.c / self.nh,
            }
        }
        /// Width of a `qkv` row.
        fn rw(&self) -> usize {
            self.shape().qkv_row()
        }
        /// Multi-head cases go through the `c, nh` entry points, grouped-query ones through `_gqa`.
        fn forward(&self, qkv: &[f32]) -> (Vec<f32>, Saved) {
            let (b, t, c, nh) = (self.b, self.t, self.c, self.nh);
            let mut out = vec![f32::NAN; b * t * c];
            let mut stats = vec![f32::NAN; stats_len(b, nh, t)];
            if self.nkv == nh {
                attention_forward(&mut out, &mut stats, qkv, b, t, c, nh, &self.mask());
            } else {
                let shape = self.shape();
                attention_forward_gqa(&mut out, &mut stats, qkv, b, t, shape, &self.mask());
            }
            let probs = probabilities(qkv, &stats, b, t, self.shape(), &self.mask());
            (out, Saved { probs, stats })
        }
        fn backward(&self, dqkv: &mut [f32], dout: &[f32], qkv: &[f32], saved: &Saved) {
            let (b, t, c, nh) = (self.b, self.t, self.c, self.nh);
            let (stats, mask) = (&saved.stats, self.mask());
            if self.nkv == nh {
                attention_backward(dqkv, dout, qkv, stats, b, t, c, nh, &mask);
            } else {
                attention_backward_gqa(dqkv, dout, qkv, stats, b, t, self.shape(), &mask);
            }
        }
        /// Straightforward f64 reference.
        #[allow(clippy::needless_range_loop)]
        fn reference(&self, qkv: &[f32]) -> (Vec<f64>, Vec<f64>) {
            let (b, t, c, nh, nkv) = (self.b, self.t, self.c, self.nh, self.nkv);
            let (hs, rw) = (c / nh, self.rw());
            let mut out = vec![0.0f64; b * t * c];
            let mut att = vec![0.0f64; b * nh * t * t];
            // Section `sec` (q, k, v) of row `i`, column `d` of query head `d / hs`'s data.
            let at = |bi: usize, i: usize, sec: usize, d: usize| {
                let (h, dd) = (d / hs, d % hs);
                let col = match sec {
                    0 => d,
                    1 => (nh + h / (nh / nkv)) * hs + dd,
                    _ => (nh + nkv + h / (nh / nkv)) * hs + dd,
                };
                qkv[(bi * t + i) * rw + col] as f64
            };
            for bi in 0..b {
                for h in 0..nh {
                    for i in 0..t {
                        let mut s = vec![f64::NEG_INFINITY; t];
                        for j in 0..t {
                            if self.allowed(bi, i, j) {
                                s[j] = (0..hs)
                                    .map(|d| at(bi, i, 0, h * hs + d) * at(bi, j, 1, h * hs + d))
                                    .sum::<f64>()
                                    / (hs as f64).sqrt();
                            }
                        }
                        let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        if mx == f64::NEG_INFINITY {
                            continue;
                        }
                        let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for j in 0..t {
                            let p = e[j] / z;
                            att[((bi * nh + h) * t + i) * t + j] = p;
                            for d in 0..hs {
                                out[(bi * t + i) * c + h * hs + d] += p * at(bi, j, 2, h * hs + d);
                            }
                        }
                    }
                }
            }
            (out, att)
        }
    }

    fn check(case: &Case, seed: u64) {
        let (b, t, c, nh) = (case.b, case.t, case.c, case.nh);
        let mut rng = rng(seed);
        let qkv = randn(&mut rng, b * t * case.rw(), 1.5);
        let (out, att) = case.forward(&qkv);
        let (rout, ratt) = case.reference(&qkv);
        assert_close(&out, &rout, 1e-5, "attention out");
        assert_close(&att.probs, &ratt, 1e-5, "attention att");
        for bi in 0..b {
            for h in 0..nh {
                for i in 0..t {
                    for j in 0..t {
                        if !case.allowed(bi, i, j) {
                            assert_eq!(
                                att.probs[((bi * nh + h) * t + i) * t + j],
                                0.0,
                                "masked prob must be exactly 0"
                            );
                        }
                    }
                }
            }
        }
        let lw = randn(&mut rng, b * t * c, 1.0);
        let g0 = 0.3f32;
        let mut dqkv = vec![g0; qkv.len()];
        case.backward(&mut dqkv, &lw, &qkv, &att);
        let d: Vec<f32> = dqkv.iter().map(|v| v - g0).collect();
        let num = numgrad(&qkv, 1e-2, |x| weighted_sum(&case.forward(x).0, &lw));
        assert_grad(&d, &num, "attention dqkv");
    }

    #[test]
    fn cached_row_matches_causal_forward() {
        let (b, t, c, nh) = (1, 37, 64, 2);
        let hs = c / nh;
        let mut rng = rng(33);
        let qkv = randn(&mut rng, b * t * 3 * c, 1.5);
        let case = Case {
            b,
            t,
            c,
            nh,
            nkv: nh,
            causal: true,
            key_valid: None,
            segments: None,
        };
        let (rout, _) = case.reference(&qkv);
        let mut got = vec![0.0f32; t * c];
        let mut scores = vec![0.0f32; t];
        for i in 0..t {
            for h in 0..nh {
                let q = &qkv[i * 3 * c + h * hs..i * 3 * c + (h + 1) * hs];
                attention_cached_row(
                    &mut got[i * c + h * hs..i * c + (h + 1) * hs],
                    q,
                    hs,
                    &qkv[c + h * hs..],
                    &qkv[2 * c + h * hs..],
                    3 * c,
                    i + 1,
                    1.0 / (hs as f32).sqrt(),
                    &mut scores,
                );
            }
        }
        assert_close(&got, &rout, 1e-5, "cached attention row");
    }

    /// The query heads of a group in one call: each head bit for bit its own call, for groups
    /// around the chunk of heads summed together and head sizes with and without a column tail.
    #[test]
    fn cached_rows_of_a_group_equal_one_head_at_a_time() {
        let mut rng = rng(34);
        for hs in [64, 32, 80, 128] {
            for group in 1..=7 {
                let (len, stride) = (29, hs + 5);
                let q = randn(&mut rng, group * hs, 1.0);
                let keys = randn(&mut rng, len * stride, 1.0);
                let values = randn(&mut rng, len * stride, 1.0);
                let scale = 1.0 / (hs as f32).sqrt();
                let mut together = vec![f32::NAN; group * hs];
                let mut scores = vec![0.0; group * len];
                attention_cached_row(
                    &mut together,
                    &q,
                    hs,
                    &keys,
                    &values,
                    stride,
                    len,
                    scale,
                    &mut scores,
                );
                let mut alone = vec![f32::NAN; group * hs];
                for h in 0..group {
                    attention_cached_row(
                        &mut alone[h * hs..(h + 1) * hs],
                        &q[h * hs..(h + 1) * hs],
                        hs,
                        &keys,
                        &values,
                        stride,
                        len,
                        scale,
                        &mut scores,
                    );
                }
                assert_eq!(together.bits(), alone.bits(), "hs {hs} group {group}");
            }
        }
    }

    #[test]
    fn causal() {
        check(
            &Case {
                b: 2,
                t: 7,
                c: 8,
                nh: 2,
                nkv: 2,
                causal: true,
                key_valid: None,
                segments: None,
            },
            30,
        );
    }

    #[test]
    fn bidirectional() {
        check(
            &Case {
                b: 2,
                t: 6,
                c: 6,
                nh: 3,
                nkv: 3,
                causal: false,
                key_valid: None,
                segments: None,
            },
            31,
        );
    }

    #[test]
    fn key_padding() {
        // Right padding in sequence 0, left padding in sequence 1; bidirectional and causal.
        let kv = vec![
            true, true, true, true, false, false, //
            false, false, true, true, true, true,
        ];
        for causal in [false, true] {
            check(
                &Case {
                    b: 2,
                    t: 6,
                    c: 4,
                    nh: 2,
                    nkv: 2,
                    causal,
                    key_valid: Some(kv.clone()),
                    segments: None,
                },
                32,
            );
        }
    }

    #[test]
    fn segments() {
        let seg = vec![0, 0, 0, 1, 1, 2, 2, 2, /**/ 5, 5, 5, 5, 5, 9, 9, 9];
        let kv: Vec<bool> = (0..16).map(|i| i != 7 && i != 12).collect();
        for causal in [false, true] {
            check(
                &Case {
                    b: 2,
                    t: 8,
                    c: 4,
                    nh: 2,
                    nkv: 2,
                    causal,
                    key_valid: None,
                    segments: Some(seg.clone()),
                },
                33,
            );
            check(
                &Case {
                    b: 2,
                    t: 8,
                    c: 4,
                    nh: 2,
                    nkv: 2,
                    causal,
                    key_valid: Some(kv.clone()),
                    segments: Some(seg.clone()),
                },
                34,
            );
        }
    }

    #[test]
    fn no_allowed_key_gives_zeros() {
        // Causal with left padding: queries 0 and 1 of sequence 1 see no valid key at all.
        // Sequence 0 is all padding (no valid key anywhere).
        let (b, t, c, nh) = (2, 5, 4, 2);
        let kv = vec![
            false, false, false, false, false, false, false, true, true, true,
        ];
        let case = Case {
            b,
            t,
            c,
            nh,
            nkv: nh,
            causal: true,
            key_valid: Some(kv),
            segments: None,
        };
        let mut rng = rng(35);
        let qkv = randn(&mut rng, b * t * 3 * c, 1.0);
        let (out, att) = case.forward(&qkv);
        assert!(out
            .iter()
            .chain(&att.probs)
            .chain(&att.stats)
            .all(|v| v.is_finite() || *v == f32::NEG_INFINITY));
        for i in 0..t {
            assert!(out[i * c..(i + 1) * c].iter().all(|&v| v == 0.0));
        }
        for i in 0..2 {
            assert!(out[(t + i) * c..(t + i + 1) * c].iter().all(|&v| v == 0.0));
            for h in 0..nh {
                assert!(att.probs[((nh + h) * t + i) * t..][..t]
                    .iter()
                    .all(|&v| v == 0.0));
            }
        }
        let mut dqkv = vec![0.0; qkv.len()];
        let dout = randn(&mut rng, b * t * c, 1.0);
        case.backward(&mut dqkv, &dout, &qkv, &att);
        assert!(dqkv.iter().all(|v| v.is_finite()));
        check(&case, 36);
    }

    #[test]
    fn longer_than_a_block() {
        // t > QB exercises the query blocking and the causal key limit.
        check(
            &Case {
                b: 1,
                t: QB + 9,
                c: 4,
                nh: 2,
                nkv: 2,
                causal: true,
                key_valid: None,
                segments: None,
            },
            37,
        );
        let kv: Vec<bool> = (0..QB + 9).map(|j| j < QB + 3).collect();
        check(
            &Case {
                b: 1,
                t: QB + 9,
                c: 4,
                nh: 1,
                nkv: 1,
                causal: false,
                key_valid: Some(kv),
                segments: None,
            },
            38,
        );
    }

    #[test]
    fn deterministic() {
        let (b, t, c, nh) = (3, 100, 32, 4);
        let mut rng = rng(39);
        let qkv = randn(&mut rng, b * t * 3 * c, 1.0);
        let dout = randn(&mut rng, b * t * c, 1.0);
        let mask = AttnMask {
            causal: true,
            ..Default::default()
        };
        let run = || {
            let mut out = vec![0.0; b * t * c];
            let mut stats = vec![0.0; stats_len(b, nh, t)];
            attention_forward(&mut out, &mut stats, &qkv, b, t, c, nh, &mask);
            let mut dqkv = vec![0.0; qkv.len()];
            attention_backward(&mut dqkv, &dout, &qkv, &stats, b, t, c, nh, &mask);
            (out, stats, dqkv)
        };
        assert_bits_eq(&run(), &run());
    }

    /// Cases over all masks, a sequence longer than a query block, and a ragged head width.
    fn mha_cases() -> Vec<Case> {
        let (b, t) = (2, QB + 9);
        let kv: Vec<bool> = (0..b * t).map(|i| i % t < t - 5 && i != t + 3).collect();
        let seg: Vec<u32> = (0..b * t).map(|i| (i / 23) as u32).collect();
        let mut cases = Vec::new();
        for (causal, with_kv, with_seg) in [
            (true, false, false),
            (false, false, false),
            (true, true, false),
            (true, true, true),
            (false, true, true),
        ] {
            cases.push(Case {
                b,
                t,
                c: 4 * 7,
                nh: 4,
                nkv: 4,
                causal,
                key_valid: with_kv.then(|| kv.clone()),
                segments: with_seg.then(|| seg.clone()),
            });
        }
        cases
    }

    /// The `c, nh` wrappers are the `_gqa` entry points with `nkv == nh`, bit for bit.
    #[test]
    fn mha_wrappers_equal_gqa_entry_points() {
        let mut rng = rng(40);
        for case in mha_cases() {
            let (b, t, c, nh) = (case.b, case.t, case.c, case.nh);
            let qkv = randn(&mut rng, b * t * 3 * c, 1.5);
            let dout = randn(&mut rng, b * t * c, 1.0);
            let mut d1 = randn(&mut rng, qkv.len(), 1.0);
            let mut d2 = d1.clone();
            let (out1, saved1) = case.forward(&qkv);
            case.backward(&mut d1, &dout, &qkv, &saved1);
            let (mut out2, mut stats2) = (vec![0.0; b * t * c], vec![0.0; stats_len(b, nh, t)]);
            let (shape, mask) = (case.shape(), case.mask());
            attention_forward_gqa(&mut out2, &mut stats2, &qkv, b, t, shape, &mask);
            attention_backward_gqa(&mut d2, &dout, &qkv, &stats2, b, t, shape, &mask);
            assert!(
                (out1, saved1.stats, d1).bits() == (out2, stats2, d2).bits(),
                "_gqa with nkv == nh differs"
            );
        }
    }

    /// Gradients of the reference forward in f64 (`dout` the output's gradient): `(dq, dk, dv)`
    /// laid out as `qkv`.
    #[allow(clippy::needless_range_loop)]
    fn reference_backward(case: &Case, qkv: &[f32], dout: &[f32]) -> Vec<f64> {
        let (b, t, c, nh, nkv) = (case.b, case.t, case.c, case.nh, case.nkv);
        let (hs, rw, group) = (c / nh, case.rw(), nh / nkv);
        let scale = 1.0 / (hs as f64).sqrt();
        let (_, att) = case.reference(qkv);
        let mut d = vec![0.0f64; qkv.len()];
        let x = |i: usize| qkv[i] as f64;
        for bi in 0..b {
            for h in 0..nh {
                let (qc, kc, vc) = (h * hs, (nh + h / group) * hs, (nh + nkv + h / group) * hs);
                let row = |i: usize| (bi * t + i) * rw;
                for i in 0..t {
                    let p = &att[((bi * nh + h) * t + i) * t..][..t];
                    let dy = |e: usize| dout[(bi * t + i) * c + h * hs + e] as f64;
                    let dp: Vec<f64> = (0..t)
                        .map(|j| (0..hs).map(|e| dy(e) * x(row(j) + vc + e)).sum())
                        .collect();
                    let dot: f64 = (0..t).map(|j| p[j] * dp[j]).sum();
                    for j in 0..t {
                        let ds = p[j] * (dp[j] - dot) * scale;
                        for e in 0..hs {
                            d[row(j) + vc + e] += p[j] * dy(e);
                            d[row(i) + qc + e] += ds * x(row(j) + kc + e);
                            d[row(j) + kc + e] += ds * x(row(i) + qc + e);
                        }
                    }
                }
            }
        }
        d
    }

    /// Every product path this CPU offers (f32 tiles on each instruction set, and bf16 pairs where
    /// AVX512-BF16 runs them), at head sizes that fill whole register tiles (64) and leave a column
    /// tail (80; 37 is odd, so the bf16 pairs end in a padded one), over several query blocks,
    /// multi-head and grouped-query, causal with padding and bidirectional with segments: forward
    /// and backward against f64. bf16 within its rounding (operands to 8 bits of mantissa), and
    /// not the f32 result (so its products did run).
    #[test]
    fn every_path_of_this_cpu_matches_reference() {
        let mut rng = rng(41);
        let (b, t) = (2, 2 * QB + 21);
        let kv: Vec<bool> = (0..b * t).map(|i| i % t < t - 7 && i != t + 3).collect();
        let seg: Vec<u32> = (0..b * t).map(|i| (i / 50) as u32).collect();
        let mut ariths: Vec<(Arith, f64, f64)> = Path::ALL
            .into_iter()
            .filter(|p| p.available())
            .map(|p| (Arith::f32(p), 1e-5, 1e-4))
            .collect();
        let bf16 = Arith::for_precision(Precision::Bf16);
        if bf16.bf16 {
            ariths.push((bf16, 1e-2, 1e-2));
        } else {
            eprintln!("bf16 attention products not run: no AVX512-BF16");
        }
        for (arith, tol_out, tol_grad) in ariths {
            let path = arith.path;
            for (hs, nh, nkv, causal) in [
                (64, 2, 2, true),
                (80, 4, 2, true),
                (64, 3, 1, false),
                (37, 2, 1, true),
            ] {
                let case = Case {
                    b,
                    t,
                    c: nh * hs,
                    nh,
                    nkv,
                    causal,
                    key_valid: Some(kv.clone()),
                    segments: (!causal).then(|| seg.clone()),
                };
                let (shape, mask) = (case.shape(), case.mask());
                let qkv = randn(&mut rng, b * t * case.rw(), 1.0);
                let dout = randn(&mut rng, b * t * case.c, 1.0);
                let mut out = vec![f32::NAN; b * t * case.c];
                let mut stats = vec![f32::NAN; stats_len(b, nh, t)];
                forward_on(arith, &mut out, &mut stats, &qkv, b, t, shape, &mask);
                let mut dqkv = vec![0.0; qkv.len()];
                backward_on(arith, &mut dqkv, &dout, &qkv, &stats, b, t, shape, &mask);
                let (rout, _) = case.reference(&qkv);
                let what = format!("{arith:?} hs {hs} nh {nh} nkv {nkv} causal {causal}");
                assert_close(&out, &rout, tol_out, &format!("{what}: out"));
                let rd = reference_backward(&case, &qkv, &dout);
                assert_close(&dqkv, &rd, tol_grad, &format!("{what}: dqkv"));
                if arith.bf16 {
                    let mut f32_out = vec![f32::NAN; out.len()];
                    let f = Arith::f32(path);
                    forward_on(f, &mut f32_out, &mut stats, &qkv, b, t, shape, &mask);
                    assert!(
                        out.iter().zip(&f32_out).any(|(a, b)| a != b),
                        "{what}: f32 bits"
                    );
                }
            }
        }
    }

    /// A GQA `qkv` expanded to MHA: each query head gets its own copy of its kv head's k and v.
    fn duplicate_kv(qkv: &[f32], rows: usize, shape: AttnShape) -> Vec<f32> {
        let AttnShape { nh, nkv, hs } = shape;
        let (c, rw, g) = (nh * hs, shape.qkv_row(), shape.group());
        let mut out = Vec::with_capacity(rows * 3 * c);
        for r in qkv[..rows * rw].chunks_exact(rw) {
            out.extend_from_slice(&r[..c]);
            for sec in 0..2 {
                for h in 0..nh {
                    let col = (nh + sec * nkv + h / g) * hs;
                    out.extend_from_slice(&r[col..col + hs]);
                }
            }
        }
        out
    }

    #[test]
    fn gqa_equals_mha_with_duplicated_kv() {
        let mut rng = rng(41);
        for mha in mha_cases() {
            for nkv in [1, 2] {
                let case = Case {
                    b: mha.b,
                    t: mha.t,
                    c: mha.c,
                    nh: mha.nh,
                    nkv,
                    causal: mha.causal,
                    key_valid: mha.key_valid.clone(),
                    segments: mha.segments.clone(),
                };
                let (b, t, c, nh) = (case.b, case.t, case.c, case.nh);
                let shape = case.shape();
                let (hs, rw, g) = (shape.hs, shape.qkv_row(), shape.group());
                let qkv = randn(&mut rng, b * t * rw, 1.5);
                let wide = duplicate_kv(&qkv, b * t, shape);
                let (out, att) = case.forward(&qkv);
                let (out_m, att_m) = mha.forward(&wide);
                let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                assert_close(&out, &f64s(&out_m), 1e-6, "gqa out vs duplicated mha");
                assert_close(
                    &att.probs,
                    &f64s(&att_m.probs),
                    1e-6,
                    "gqa att vs duplicated mha",
                );
                let dout = randn(&mut rng, b * t * c, 1.0);
                let mut dqkv = vec![0.0; qkv.len()];
                case.backward(&mut dqkv, &dout, &qkv, &att);
                let mut dwide = vec![0.0; wide.len()];
                mha.backward(&mut dwide, &dout, &wide, &att_m);
                // dq equal; each kv head's dk / dv the sum over its query heads' duplicates.
                let mut want = vec![0.0f64; qkv.len()];
                for (w, d) in want.chunks_exact_mut(rw).zip(dwide.chunks_exact(3 * c)) {
                    for j in 0..c {
                        w[j] = d[j] as f64;
                    }
                    for sec in 0..2 {
                        for h in 0..nh {
                            let col = (nh + sec * nkv + h / g) * hs;
                            for dd in 0..hs {
                                w[col + dd] += d[(1 + sec) * c + h * hs + dd] as f64;
                            }
                        }
                    }
                }
                assert_close(&dqkv, &want, 1e-6, "gqa dqkv vs summed mha duplicates");
            }
        }
    }

    #[test]
    fn gqa_finite_differences() {
        // nh = 4 query heads over 1 or 2 kv heads, hs = 2; causal with padding and packed segments.
        let kv: Vec<bool> = (0..16).map(|i| i != 6 && i != 7 && i != 8).collect();
        let seg = vec![0, 0, 0, 1, 1, 2, 2, 2, /**/ 5, 5, 5, 5, 5, 9, 9, 9];
        for nkv in [1, 2] {
            for (causal, with_kv, with_seg) in [
                (true, false, false),
                (true, true, false),
                (true, true, true),
                (false, true, true),
            ] {
                check(
                    &Case {
                        b: 2,
                        t: 8,
                        c: 8,
                        nh: 4,
                        nkv,
                        causal,
                        key_valid: with_kv.then(|| kv.clone()),
                        segments: with_seg.then(|| seg.clone()),
                    },
                    42 + nkv as u64,
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "multiple of nkv")]
    fn gqa_rejects_uneven_groups() {
        let shape = AttnShape {
            nh: 4,
            nkv: 3,
            hs: 2,
        };
        let (mut out, mut att) = (vec![0.0; 8], vec![0.0; 4]);
        attention_forward_gqa(
            &mut out,
            &mut att,
            &[0.0; 20],
            1,
            1,
            shape,
            &AttnMask::default(),
        );
    }

    #[test]
    fn gqa_deterministic_across_thread_counts() {
        let (b, t, nh, nkv, hs) = (3, 100, 8, 2, 8);
        let shape = AttnShape { nh, nkv, hs };
        let mut rng = rng(44);
        let qkv = randn(&mut rng, b * t * shape.qkv_row(), 1.0);
        let dout = randn(&mut rng, b * t * nh * hs, 1.0);
        let mask = AttnMask {
            causal: true,
            ..Default::default()
        };
        let run = || {
            let mut out = vec![0.0; b * t * nh * hs];
            let mut stats = vec![0.0; stats_len(b, nh, t)];
            attention_forward_gqa(&mut out, &mut stats, &qkv, b, t, shape, &mask);
            let mut dqkv = vec![0.0; qkv.len()];
            attention_backward_gqa(&mut dqkv, &dout, &qkv, &stats, b, t, shape, &mask);
            (out, stats, dqkv)
        };
        let reference = run();
        assert_bits_eq(&reference, &run());
        assert_thread_independent(&reference, run);
    }
}
