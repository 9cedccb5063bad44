//! Multi-head and grouped-query scaled dot-product attention with causal / padding / packed-segment
//! masks.
//!
//! Layout follows GPT-2's fused `c_attn`: `qkv` is `[b, t, 3c]` with q | k | v along the last dim and
//! head `h` owning columns `h*hs..(h+1)*hs` of each; grouped-query attention ([`AttnShape`]) narrows
//! the k and v sections to `nkv` heads. One rayon task per (batch, head) in the forward, per
//! (batch, kv head) in the backward (whose query heads share dk/dv); inside it, query rows are
//! processed in blocks of 64 with single-threaded `gemm` calls, and a block only touches the keys
//! some row of it may attend to (so causal attention does ~half the work).
//!
//! Flash-style memory: the `t × t` probabilities live only in a per-task scratch of one block of
//! rows (in cache); the forward saves two numbers a query row (its largest scaled score and the
//! inverse of its softmax sum), from which the backward recomputes each block's probabilities
//! with the same products and the same arithmetic, so bit for bit. Memory per layer is `O(b·nh·t)`
//! instead of `O(b·nh·t²)` (at context 1024, 6 heads, batch 8: 0.4 MB instead of 200 MB).
#![allow(clippy::too_many_arguments)]

use gemm::Parallelism;
use rayon::prelude::*;

use crate::matmul::gemm_raw;
use crate::simd::{self, SyncPtr};

/// Query rows per block.
const QB: usize = 64;

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

/// `S[i0..i1, 0..klim] = Q[i0..i1] @ K[0..klim]^T` into `s` (row stride `t`): the one product both
/// passes use, so the backward's scores are the forward's bits.
///
/// # Safety
/// `q` and `k` must cover rows `i0..i1` and `0..klim` of `hs` floats at stride `rw`; `s` holds
/// `(i1 - i0) * t`.
unsafe fn scores(
    s: &mut [f32],
    q: *const f32,
    k: *const f32,
    (i0, i1, klim): (usize, usize, usize),
    t: usize,
    hs: usize,
    rw: usize,
) {
    // K^T is K read with swapped strides.
    gemm_raw(
        s.as_mut_ptr(),
        t,
        q.add(i0 * rw),
        rw,
        1,
        k,
        1,
        rw,
        i1 - i0,
        hs,
        klim,
        false,
        Parallelism::None,
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
    let scale = 1.0 / (hs as f32).sqrt();
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let mask = *mask;

    stats[..stats_len(b, nh, t)]
        .par_chunks_mut(t * STATS_PER_ROW)
        .enumerate()
        .for_each_init(
            // One block of probabilities, reused across the tasks a worker runs.
            || vec![0.0f32; QB * t],
            |p, (bh, stats_bh)| {
                let (bi, h) = (bh / nh, bh % nh);
                let kvh = h / group;
                let key_valid = mask.key_valid.map(|kv| &kv[bi * t..(bi + 1) * t]);
                let segments = mask.segments.map(|s| &s[bi * t..(bi + 1) * t]);
                let kmax = key_limit(&mask, bi, t);
                let row0 = bi * t * rw;
                let q = qkv[row0 + h * hs..].as_ptr();
                let k = qkv[row0 + (nh + kvh) * hs..].as_ptr();
                let v = qkv[row0 + (nh + nkv + kvh) * hs..].as_ptr();
                // SAFETY (pointer offsets below): all row/column indices stay inside this sequence
                // and head, which the length asserts above cover.
                let y = unsafe { out_ptr.get().add(bi * t * c + h * hs) };

                for i0 in (0..t).step_by(QB) {
                    let i1 = (i0 + QB).min(t);
                    // Keys a row of this block may see: up to the block end when causal, never past `kmax`.
                    let klim = kmax.min(if mask.causal { i1 } else { t });
                    let p = &mut p[..(i1 - i0) * t];
                    unsafe { scores(p, q, k, (i0, i1, klim), t, hs, rw) };
                    for i in i0..i1 {
                        let row = &mut p[(i - i0) * t..(i - i0) * t + klim];
                        let lim = kmax.min(if mask.causal { i + 1 } else { t });
                        let (live, dead) = row.split_at_mut(lim);
                        let (mx, inv) = masked_softmax_row(
                            live,
                            scale,
                            key_valid,
                            segments,
                            segments.map_or(0, |s| s[i]),
                        );
                        dead.fill(0.0);
                        stats_bh[i * STATS_PER_ROW] = mx;
                        stats_bh[i * STATS_PER_ROW + 1] = inv;
                    }
                    // Y[i0..i1] = P[i0..i1, 0..klim] @ V[0..klim], written straight into this head's columns.
                    // SAFETY: tasks write disjoint (batch, head) column blocks of `out`.
                    unsafe {
                        gemm_raw(
                            y.add(i0 * c),
                            c,
                            p.as_ptr(),
                            t,
                            1,
                            v,
                            rw,
                            1,
                            i1 - i0,
                            klim,
                            hs,
                            false,
                            Parallelism::None,
                        );
                    }
                }
            },
        );
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
        for (h, s) in scores.chunks_exact_mut(len).enumerate() {
            let qh = &q[h * hs..(h + 1) * hs];
            for (j, s) in s.iter_mut().enumerate() {
                *s = simd::dot(qh, &keys[j * stride..j * stride + hs]) * scale;
            }
        }
        let mut inv = [0.0f32; GROUP_CHUNK];
        for h0 in (0..group).step_by(GROUP_CHUNK) {
            let heads = (group - h0).min(GROUP_CHUNK);
            for (hh, inv) in inv[..heads].iter_mut().enumerate() {
                let s = &mut scores[(h0 + hh) * len..(h0 + hh + 1) * len];
                let mx = simd::max(s);
                for x in s.iter_mut() {
                    *x = simd::exp(*x - mx);
                }
                *inv = 1.0 / simd::sum(s);
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
    /// In place: raw scores -> masked softmax probabilities for one query row (restricted to the
    /// keys `0..row.len()`). Returns the row's largest scaled score and the inverse of its sum,
    /// which [`softmax_row_again`] recomputes the row from; a row with no allowed key becomes all
    /// zeros (returned as `(-inf, 0)`).
    fn masked_softmax_row(
        row: &mut [f32],
        scale: f32,
        key_valid: Option<&[bool]>,
        segments: Option<&[u32]>,
        seg_i: u32,
    ) -> (f32, f32) {
        scale_and_mask(row, scale, key_valid, segments, seg_i);
        let mx = simd::max(row);
        if mx == f32::NEG_INFINITY {
            row.fill(0.0);
            return (mx, 0.0);
        }
        // exp(-inf) is exactly 0, so masked keys get probability 0.
        for s in row.iter_mut() {
            *s = simd::exp(*s - mx);
        }
        let inv = 1.0 / simd::sum(row);
        for s in row.iter_mut() {
            *s *= inv;
        }
        (mx, inv)
    }
}

simd::multiversion! {
    /// The backward's copy of [`masked_softmax_row`]: the same raw scores and the saved `(mx, inv)`
    /// give the same probabilities, bit for bit (the same operations in the same order).
    fn softmax_row_again(
        row: &mut [f32],
        scale: f32,
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
        scale_and_mask(row, scale, key_valid, segments, seg_i);
        for s in row.iter_mut() {
            *s = simd::exp(*s - mx) * inv;
        }
    }
}

/// Scores times `scale`, and `-inf` for the keys the mask hides.
#[inline(always)]
fn scale_and_mask(
    row: &mut [f32],
    scale: f32,
    key_valid: Option<&[bool]>,
    segments: Option<&[u32]>,
    seg_i: u32,
) {
    let n = row.len();
    // Selects rather than branches, so these loops vectorise.
    match key_valid {
        Some(kv) => {
            for (s, &ok) in row.iter_mut().zip(&kv[..n]) {
                *s = if ok { *s * scale } else { f32::NEG_INFINITY };
            }
        }
        None => row.iter_mut().for_each(|s| *s *= scale),
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
    let scale = 1.0 / (hs as f32).sqrt();
    let dqkv_ptr = SyncPtr(dqkv.as_mut_ptr());
    let mask = *mask;

    (0..b * nkv).into_par_iter().for_each_init(
        // One block's probabilities and dS; reused across the tasks a worker runs.
        || (vec![0.0f32; QB * t], vec![0.0f32; QB * t]),
        |(p, ds), bkv| {
            let (bi, kvh) = (bkv / nkv, bkv % nkv);
            let row0 = bi * t * rw;
            let k = qkv[row0 + (nh + kvh) * hs..].as_ptr();
            let v = qkv[row0 + (nh + nkv + kvh) * hs..].as_ptr();
            let seq = Seq {
                key_valid: mask.key_valid.map(|kv| &kv[bi * t..(bi + 1) * t]),
                segments: mask.segments.map(|s| &s[bi * t..(bi + 1) * t]),
                causal: mask.causal,
                kmax: key_limit(&mask, bi, t),
            };
            // SAFETY (all pointer uses below): offsets stay inside this sequence and its heads, covered
            // by the asserts above; this task alone writes kv head `kvh`'s dk/dv columns and its query
            // heads' dq columns of sequence `bi`.
            let (dk, dv) = unsafe {
                let p = dqkv_ptr.get().add(row0);
                (p.add((nh + kvh) * hs), p.add((nh + nkv + kvh) * hs))
            };
            for h in kvh * group..(kvh + 1) * group {
                let bh = bi * nh + h;
                let stats_bh = &stats[bh * t * STATS_PER_ROW..(bh + 1) * t * STATS_PER_ROW];
                let q = qkv[row0 + h * hs..].as_ptr();
                let dy = dout[bi * t * c + h * hs..].as_ptr();
                // SAFETY: as above; query head `h`'s columns belong to this task alone.
                unsafe {
                    let dq = dqkv_ptr.get().add(row0 + h * hs);
                    head_backward(
                        (p, ds),
                        &seq,
                        stats_bh,
                        (q, k, v, dy),
                        (dq, dk, dv),
                        (t, hs, rw, c),
                        scale,
                    );
                }
            }
        },
    );
}

/// One sequence's mask, as a task of the backward sees it.
struct Seq<'a> {
    key_valid: Option<&'a [bool]>,
    segments: Option<&'a [u32]>,
    causal: bool,
    /// See [`key_limit`].
    kmax: usize,
}

/// One query head's share of the backward: adds into its `dq` and into its kv head's `dk`, `dv`.
/// `q`, `k`, `v`, `dq`, `dk`, `dv` have row stride `rw` and `dy` row stride `c`; `p` and `ds` are
/// scratch of `QB * t`.
///
/// # Safety
/// The pointers must cover `t` rows of `hs` columns at those strides, and no other thread may access
/// `dq`, `dk`, `dv` during the call.
unsafe fn head_backward(
    (p, ds): (&mut [f32], &mut [f32]),
    seq: &Seq,
    stats_bh: &[f32],
    (q, k, v, dy): (*const f32, *const f32, *const f32, *const f32),
    (dq, dk, dv): (*mut f32, *mut f32, *mut f32),
    (t, hs, rw, c): (usize, usize, usize, usize),
    scale: f32,
) {
    for i0 in (0..t).step_by(QB) {
        let i1 = (i0 + QB).min(t);
        let m = i1 - i0;
        let klim = seq.kmax.min(if seq.causal { i1 } else { t });
        if klim == 0 {
            continue; // no query here attends to anything: no gradient flows
        }
        let (p, ds) = (&mut p[..m * t], &mut ds[..m * t]);
        // P[i0..i1, 0..klim], as the forward had it.
        scores(p, q, k, (i0, i1, klim), t, hs, rw);
        for i in i0..i1 {
            let row = &mut p[(i - i0) * t..(i - i0) * t + klim];
            let lim = seq.kmax.min(if seq.causal { i + 1 } else { t });
            let (live, dead) = row.split_at_mut(lim);
            let saved = (stats_bh[i * STATS_PER_ROW], stats_bh[i * STATS_PER_ROW + 1]);
            let seg_i = seq.segments.map_or(0, |s| s[i]);
            softmax_row_again(live, scale, seq.key_valid, seq.segments, seg_i, saved);
            dead.fill(0.0);
        }
        // SAFETY (every product): the caller's contract (see above).
        // dP[i0..i1, 0..klim] = dY[i0..i1] @ V[0..klim]^T
        gemm_raw(
            ds.as_mut_ptr(),
            t,
            dy.add(i0 * c),
            c,
            1,
            v,
            1,
            rw,
            m,
            hs,
            klim,
            false,
            Parallelism::None,
        );
        // Softmax backward, row by row: dS = P * (dP - sum(P * dP)) * scale.
        for (ii, ds_row) in ds.chunks_exact_mut(t).enumerate() {
            softmax_backward_row(&mut ds_row[..klim], &p[ii * t..ii * t + klim], scale);
        }
        // dV[0..klim] += P[i0..i1, 0..klim]^T @ dY[i0..i1]
        gemm_raw(
            dv,
            rw,
            p.as_ptr(),
            1,
            t,
            dy.add(i0 * c),
            c,
            1,
            klim,
            m,
            hs,
            true,
            Parallelism::None,
        );
        // dQ[i0..i1] += dS[i0..i1, 0..klim] @ K[0..klim]
        gemm_raw(
            dq.add(i0 * rw),
            rw,
            ds.as_ptr(),
            t,
            1,
            k,
            rw,
            1,
            m,
            klim,
            hs,
            true,
            Parallelism::None,
        );
        // dK[0..klim] += dS[i0..i1, 0..klim]^T @ Q[i0..i1]
        gemm_raw(
            dk,
            rw,
            ds.as_ptr(),
            1,
            t,
            q.add(i0 * rw),
            rw,
            1,
            klim,
            m,
            hs,
            true,
            Parallelism::None,
        );
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
        let scale = 1.0 / (hs as f32).sqrt();
        let mut att = vec![0.0f32; b * nh * t * t];
        for bi in 0..b {
            let kmax = key_limit(mask, bi, t);
            for h in 0..nh {
                let row0 = bi * t * rw;
                let q = qkv[row0 + h * hs..].as_ptr();
                let k = qkv[row0 + (nh + h / group) * hs..].as_ptr();
                let bh = bi * nh + h;
                let att_bh = &mut att[bh * t * t..(bh + 1) * t * t];
                for i0 in (0..t).step_by(QB) {
                    let i1 = (i0 + QB).min(t);
                    let klim = kmax.min(if mask.causal { i1 } else { t });
                    unsafe { scores(&mut att_bh[i0 * t..i1 * t], q, k, (i0, i1, klim), t, hs, rw) };
                    for i in i0..i1 {
                        let row = &mut att_bh[i * t..(i + 1) * t];
                        let lim = kmax.min(if mask.causal { i + 1 } else { t });
                        let (live, dead) = row.split_at_mut(lim);
                        let at = (bh * t + i) * STATS_PER_ROW;
                        softmax_row_again(
                            live,
                            scale,
                            mask.key_valid.map(|kv| &kv[bi * t..(bi + 1) * t]),
                            mask.segments.map(|s| &s[bi * t..(bi + 1) * t]),
                            mask.segments.map_or(0, |s| s[bi * t + i]),
                            (stats[at], stats[at + 1]),
                        );
                        dead.fill(0.0);
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

    /// The multi-head kernels as they were before grouped-query attention, frozen: the wrappers
    /// must still reproduce them bit for bit (same gemm calls, same task split).
    mod legacy {
        use super::super::{masked_softmax_row, softmax_backward_row, AttnMask, QB};
        use crate::matmul::gemm_raw;
        use crate::simd::SyncPtr;
        use gemm::Parallelism;
        use rayon::prelude::*;

        pub fn attention_forward(
            out: &mut [f32],
            att: &mut [f32],
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
            assert!(
                qkv.len() >= b * t * 3 * c,
                "attention_forward: qkv too small"
            );
            assert!(out.len() >= b * t * c, "attention_forward: out too small");
            assert!(
                att.len() >= b * nh * t * t,
                "attention_forward: att too small"
            );
            if let Some(kv) = mask.key_valid {
                assert!(kv.len() >= b * t, "attention_forward: key_valid too small");
            }
            if let Some(seg) = mask.segments {
                assert!(seg.len() >= b * t, "attention_forward: segments too small");
            }
            if b * t == 0 || c == 0 {
                return;
            }
            let hs = c / nh;
            let scale = 1.0 / (hs as f32).sqrt();
            let c3 = 3 * c;
            let out_ptr = SyncPtr(out.as_mut_ptr());
            let mask = *mask;

            att[..b * nh * t * t]
                .par_chunks_mut(t * t)
                .enumerate()
                .for_each(|(bh, att_bh)| {
                    let (bi, h) = (bh / nh, bh % nh);
                    let key_valid = mask.key_valid.map(|kv| &kv[bi * t..(bi + 1) * t]);
                    let segments = mask.segments.map(|s| &s[bi * t..(bi + 1) * t]);
                    // Keys past the last valid one are never attended to (right padding): skip them entirely.
                    let kmax =
                        key_valid.map_or(t, |kv| kv.iter().rposition(|&v| v).map_or(0, |j| j + 1));
                    let base = bi * t * c3 + h * hs;
                    let q = qkv[base..].as_ptr();
                    let k = qkv[base + c..].as_ptr();
                    let v = qkv[base + 2 * c..].as_ptr();
                    // SAFETY (pointer offsets below): all row/column indices stay inside this sequence and
                    // head, which the length asserts above cover.
                    let y = unsafe { out_ptr.get().add(bi * t * c + h * hs) };

                    for i0 in (0..t).step_by(QB) {
                        let i1 = (i0 + QB).min(t);
                        // Keys a row of this block may see: up to the block end when causal, never past `kmax`.
                        let klim = kmax.min(if mask.causal { i1 } else { t });
                        // S[i0..i1, 0..klim] = Q[i0..i1] @ K[0..klim]^T  (K^T is K read with swapped strides)
                        unsafe {
                            gemm_raw(
                                att_bh[i0 * t..].as_mut_ptr(),
                                t,
                                q.add(i0 * c3),
                                c3,
                                1,
                                k,
                                1,
                                c3,
                                i1 - i0,
                                hs,
                                klim,
                                false,
                                Parallelism::None,
                            );
                        }
                        for i in i0..i1 {
                            let row = &mut att_bh[i * t..(i + 1) * t];
                            let lim = kmax.min(if mask.causal { i + 1 } else { t });
                            let (live, dead) = row.split_at_mut(lim);
                            masked_softmax_row(
                                live,
                                scale,
                                key_valid,
                                segments,
                                segments.map_or(0, |s| s[i]),
                            );
                            dead.fill(0.0);
                        }
                        // Y[i0..i1] = P[i0..i1, 0..klim] @ V[0..klim], written straight into this head's columns.
                        // SAFETY: tasks write disjoint (batch, head) column blocks of `out`; `att_bh` is ours.
                        unsafe {
                            gemm_raw(
                                y.add(i0 * c),
                                c,
                                att_bh[i0 * t..].as_ptr(),
                                t,
                                1,
                                v,
                                c3,
                                1,
                                i1 - i0,
                                klim,
                                hs,
                                false,
                                Parallelism::None,
                            );
                        }
                    }
                });
        }

        pub fn attention_backward(
            dqkv: &mut [f32],
            dout: &[f32],
            qkv: &[f32],
            att: &[f32],
            b: usize,
            t: usize,
            c: usize,
            nh: usize,
        ) {
            assert!(
                c.checked_rem(nh) == Some(0),
                "attention: c must be a multiple of nh"
            );
            assert!(
                qkv.len() >= b * t * 3 * c,
                "attention_backward: qkv too small"
            );
            assert!(
                dqkv.len() >= b * t * 3 * c,
                "attention_backward: dqkv too small"
            );
            assert!(
                dout.len() >= b * t * c,
                "attention_backward: dout too small"
            );
            assert!(
                att.len() >= b * nh * t * t,
                "attention_backward: att too small"
            );
            if b * t == 0 || c == 0 {
                return;
            }
            let hs = c / nh;
            let scale = 1.0 / (hs as f32).sqrt();
            let c3 = 3 * c;
            let dqkv_ptr = SyncPtr(dqkv.as_mut_ptr());

            (0..b * nh).into_par_iter().for_each_init(
                // dS for one block of query rows; reused across the tasks a worker runs.
                || vec![0.0f32; QB * t],
                |ds, bh| {
                    let (bi, h) = (bh / nh, bh % nh);
                    let att_bh = &att[bh * t * t..(bh + 1) * t * t];
                    let base = bi * t * c3 + h * hs;
                    let q = qkv[base..].as_ptr();
                    let k = qkv[base + c..].as_ptr();
                    let v = qkv[base + 2 * c..].as_ptr();
                    let dy = dout[bi * t * c + h * hs..].as_ptr();
                    // SAFETY (all pointer uses below): offsets stay inside this (batch, head), covered by the
                    // asserts above; tasks write disjoint (batch, head) column blocks of `dqkv`.
                    let (dq, dk, dv) = unsafe {
                        let p = dqkv_ptr.get().add(base);
                        (p, p.add(c), p.add(2 * c))
                    };

                    for i0 in (0..t).step_by(QB) {
                        let i1 = (i0 + QB).min(t);
                        let m = i1 - i0;
                        let klim = (i0..i1)
                            .map(|i| {
                                att_bh[i * t..(i + 1) * t]
                                    .iter()
                                    .rposition(|&p| p != 0.0)
                                    .map_or(0, |j| j + 1)
                            })
                            .max()
                            .unwrap_or(0);
                        if klim == 0 {
                            continue; // no query here attends to anything: no gradient flows
                        }
                        let ds = &mut ds[..m * t];
                        unsafe {
                            // dP[i0..i1, 0..klim] = dY[i0..i1] @ V[0..klim]^T
                            gemm_raw(
                                ds.as_mut_ptr(),
                                t,
                                dy.add(i0 * c),
                                c,
                                1,
                                v,
                                1,
                                c3,
                                m,
                                hs,
                                klim,
                                false,
                                Parallelism::None,
                            );
                        }
                        // Softmax backward, row by row: dS = P * (dP - sum(P * dP)) * scale.
                        for (ii, ds_row) in ds.chunks_exact_mut(t).enumerate() {
                            let i = i0 + ii;
                            softmax_backward_row(
                                &mut ds_row[..klim],
                                &att_bh[i * t..i * t + klim],
                                scale,
                            );
                        }
                        let p = att_bh[i0 * t..].as_ptr();
                        unsafe {
                            // dV[0..klim] += P[i0..i1, 0..klim]^T @ dY[i0..i1]
                            gemm_raw(
                                dv,
                                c3,
                                p,
                                1,
                                t,
                                dy.add(i0 * c),
                                c,
                                1,
                                klim,
                                m,
                                hs,
                                true,
                                Parallelism::None,
                            );
                            // dQ[i0..i1] += dS[i0..i1, 0..klim] @ K[0..klim]
                            gemm_raw(
                                dq.add(i0 * c3),
                                c3,
                                ds.as_ptr(),
                                t,
                                1,
                                k,
                                c3,
                                1,
                                m,
                                klim,
                                hs,
                                true,
                                Parallelism::None,
                            );
                            // dK[0..klim] += dS[i0..i1, 0..klim]^T @ Q[i0..i1]
                            gemm_raw(
                                dk,
                                c3,
                                ds.as_ptr(),
                                1,
                                t,
                                q.add(i0 * c3),
                                c3,
                                1,
                                klim,
                                m,
                                hs,
                                true,
                                Parallelism::None,
                            );
                        }
                    }
                },
            );
        }
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

    #[test]
    fn mha_matches_pre_gqa_implementation_bitwise() {
        let mut rng = rng(40);
        for case in mha_cases() {
            let (b, t, c, nh) = (case.b, case.t, case.c, case.nh);
            let qkv = randn(&mut rng, b * t * 3 * c, 1.5);
            let dout = randn(&mut rng, b * t * c, 1.0);
            let (mut out0, mut att0) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
            legacy::attention_forward(&mut out0, &mut att0, &qkv, b, t, c, nh, &case.mask());
            let mut d0 = randn(&mut rng, qkv.len(), 1.0);
            let mut d1 = d0.clone();
            let mut d2 = d0.clone();
            legacy::attention_backward(&mut d0, &dout, &qkv, &att0, b, t, c, nh);
            // The `c, nh` wrappers and the `_gqa` entry points with nkv == nh; the saved statistics
            // give back the legacy kernels' saved probabilities bit for bit, and the recomputing
            // backward their gradients.
            let (out1, saved1) = case.forward(&qkv);
            case.backward(&mut d1, &dout, &qkv, &saved1);
            let (mut out2, mut stats2) = (vec![0.0; b * t * c], vec![0.0; stats_len(b, nh, t)]);
            let (shape, mask) = (case.shape(), case.mask());
            attention_forward_gqa(&mut out2, &mut stats2, &qkv, b, t, shape, &mask);
            attention_backward_gqa(&mut d2, &dout, &qkv, &stats2, b, t, shape, &mask);
            let att2 = probabilities(&qkv, &stats2, b, t, shape, &mask);
            let reference = (out0, att0, d0);
            assert!(
                reference.bits() == (out1, saved1.probs, d1).bits(),
                "wrappers differ"
            );
            assert!(
                reference.bits() == (out2, att2, d2).bits(),
                "_gqa with nkv == nh differs"
            );
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
