//! The six products of attention (scores, probabilities × values, and the backward's four) on
//! register tiles of our own, instead of general `gemm` calls.
//!
//! Why: attention's products are small and oddly shaped (depth 64 for the scores, 64 columns for
//! the value sums, transposed operands in the backward), and `gemm` repacked the same keys for every
//! block of 64 queries; it ran them at about half its rate on large products. Here the one operand
//! that must be transposed (keys for the scores, values for the backward's dP) is packed once per
//! head into zero-padded panels; every other operand is read where it lies: broadcasts from A at any
//! pair of strides (so `P^T` and `dS^T` cost nothing), B rows read as whole vectors. And the tiles
//! follow the causal mask at the granularity of a tile's rows rather than of a 64-query block: a row
//! tile computes scores only up to its last query, value sums stop there, and the key gradients of a
//! key tile start at its first key's query.
//!
//! One generic body per instruction set ([`Path`]), compiled with its target features: AVX-512 tiles
//! are 8 rows × 32 columns (16 of its 32 registers accumulate; the products one head of at most 64
//! wide take 6 × 64, [`product_wide`], with B's rows read in place), AVX2 6 × 16 (12 of 16), and a
//! portable 4 × 16 for CPUs with neither. Each output element is one sum in depth order, so results
//! do not depend on the thread count; causal trimming only skips terms that are exactly zero.
//!
//! Also used outside attention's blocks: batched decoding's f32 weight panels
//! ([`crate::PackedFormat::F32`]) run [`product`] over them, and a query row's scores against its
//! KV cache come from [`dot_rows`].

use crate::simd::lanes::{Lanes, P8};
#[cfg(target_arch = "x86_64")]
use crate::simd::lanes::{L16, L8};

/// The instruction sets the tiles are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    Portable,
    Avx2,
    Avx512,
}

impl Path {
    #[cfg(test)]
    pub(crate) const ALL: [Path; 3] = [Path::Portable, Path::Avx2, Path::Avx512];

    pub(crate) fn available(self) -> bool {
        use crate::simd::{level, Level};
        match self {
            Path::Portable => true,
            Path::Avx2 => cfg!(target_arch = "x86_64") && level() != Level::Base,
            Path::Avx512 => cfg!(target_arch = "x86_64") && level() == Level::V4,
        }
    }

    /// The widest path this CPU (and `KILN_SIMD`) allows.
    pub(crate) fn best() -> Path {
        [Path::Avx512, Path::Avx2]
            .into_iter()
            .find(|p| p.available())
            .unwrap_or(Path::Portable)
    }

    /// Columns of a tile, and so the width of a packed panel.
    pub(crate) fn nr(self) -> usize {
        match self {
            Path::Avx512 => 32,
            Path::Avx2 | Path::Portable => 16,
        }
    }
}

/// What a tile does with its sums.
#[derive(Clone, Copy)]
pub(crate) enum Out {
    /// `C = alpha * sums`.
    Store(f32),
    /// `C += sums`.
    Add,
    /// `C += sums` as one chain: the sums start from C's values, so each element is C's value
    /// followed by every multiply-add in depth order, exactly what the skinny kernel gives when it
    /// accumulates onto a bias (`matmul::skinny`): batched decoding's panels (see
    /// [`crate::PackedFormat::F32`]) then give the bits of decoding one row on the model's weights.
    Chain,
}

/// How the causal mask trims a row tile `r0..r1` of a product over a block of queries starting at
/// query `i0` (all terms skipped are exactly zero).
#[derive(Clone, Copy)]
pub(crate) enum Trim {
    None,
    /// Rows are queries `i0 + r`, columns keys: the tile needs keys `< i0 + r1`.
    Cols(usize),
    /// Rows are queries `i0 + r`, depth keys: the tile's sums stop at key `i0 + r1`.
    DepthEnd(usize),
    /// Rows are keys `r`, depth queries `i0 + d`: the tile's sums start at its first key's query.
    DepthStart(usize),
    /// Columns are keys `j`, depth queries `i0 + d`: a column tile's sums start at its first key's
    /// query (the bf16 key gradients, computed transposed; the f32 tiles do not trim it).
    #[cfg_attr(
        not(all(target_arch = "x86_64", target_os = "linux")),
        allow(dead_code)
    )]
    ColsStart(usize),
}

/// `C[m, n] (=|+=) A[m, k] · B[k, n]`.
///
/// A's element `(r, d)` is `a[r * a_rs + d * a_ds]`. B is read in panels of [`Path::nr`] columns:
/// panel `p`'s row `d` is the `nr` floats at `b[p * b_ps + d * b_ds]` (plain row-major B: `b_ds` its
/// row stride, `b_ps = nr`; packed panels: `b_ds = nr`, `b_ps = k * nr`). C's rows are `c_rs` apart.
/// With `padded`, B's last panel is zero-padded and C has room for whole panels, so every tile
/// writes all `nr` columns; without, the last tile's columns past `n` are neither read nor written.
#[derive(Clone, Copy)]
pub(crate) struct Product {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trim: Trim,
    pub padded: bool,
    pub out: Out,
}

/// Runs `prod` on `path`: C `(pointer, row stride)`, A `(pointer, a_rs, a_ds)`, B `(pointer, b_ds,
/// b_ps)`.
///
/// # Safety
/// `path` must be available; the pointers must cover every element the product reads or writes
/// (see [`Product`]), and no other thread may touch the written part of C meanwhile.
pub(crate) unsafe fn product(
    path: Path,
    c: (*mut f32, usize),
    a: (*const f32, usize, usize),
    b: (*const f32, usize, usize),
    prod: Product,
) {
    product_on::<false>(path, c, a, b, prod, NO_PREFETCH)
}

/// [`product`] that also prefetches `next` (pointer, floats) into L2, a line every few depth steps
/// spread over all its tiles: the weight panel a caller will multiply next. Batched decoding streams
/// every weight from memory once per token; its first row tile of a panel would otherwise wait on
/// memory while the rest find the panel in cache (measured: 15-25 % under the same products in
/// cache). Prefetching a whole panel at once after each row tile instead stalled on the queue of
/// outstanding misses and measured no better.
///
/// # Safety
/// As [`product`]; `next` may point anywhere (prefetches do not fault), ideally at readable memory.
pub(crate) unsafe fn product_prefetching(
    path: Path,
    c: (*mut f32, usize),
    a: (*const f32, usize, usize),
    b: (*const f32, usize, usize),
    prod: Product,
    next: (*const f32, usize),
) {
    product_on::<true>(path, c, a, b, prod, next)
}

const NO_PREFETCH: (*const f32, usize) = (std::ptr::null(), 0);

unsafe fn product_on<const PF: bool>(
    path: Path,
    c: (*mut f32, usize),
    a: (*const f32, usize, usize),
    b: (*const f32, usize, usize),
    prod: Product,
    next: (*const f32, usize),
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => product_avx512::<PF>(c, a, b, prod, next),
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => product_avx2::<PF>(c, a, b, prod, next),
        _ => product_with::<P8, 4, 2, PF>(c, a, b, prod, next),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn product_avx512<const PF: bool>(
    c: (*mut f32, usize),
    a: (*const f32, usize, usize),
    b: (*const f32, usize, usize),
    prod: Product,
    next: (*const f32, usize),
) {
    product_with::<L16, 8, 2, PF>(c, a, b, prod, next)
}

/// [`product`] on AVX-512 tiles of 6 rows x 64 columns (24 of the 32 registers accumulate: 4
/// vector loads and 6 broadcasts per 24 multiply-adds, against 2 and 8 per 16 for the 8 x 32 tile),
/// with B `(pointer, row stride)` one panel of at most 64 columns (`prod.n <= 64`): batched
/// decoding's f32 weight panels, prefetching `next` as [`product_prefetching`].
///
/// # Safety
/// As [`product_prefetching`]; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
pub(crate) unsafe fn product_wide_prefetching(
    c: (*mut f32, usize),
    a: (*const f32, usize, usize),
    (b, b_ds): (*const f32, usize),
    prod: Product,
    next: (*const f32, usize),
) {
    debug_assert!(prod.n <= 64);
    product_with::<L16, 6, 4, true>(c, a, (b, b_ds, 0), prod, next)
}

/// [`product`] with B `(pointer, row stride)` a single panel of at most 64 columns read where its
/// rows lie (no packing), on AVX-512's 6 x 64 tile: attention's products whose outputs are one
/// head wide (`P V`, `dS K`, and the key gradients `P^T dY`, `dS^T Q`), with `hs <= 64`.
///
/// # Safety
/// As [`product`]; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
pub(crate) unsafe fn product_wide(
    c: (*mut f32, usize),
    a: (*const f32, usize, usize),
    (b, b_ds): (*const f32, usize),
    prod: Product,
) {
    debug_assert!(prod.n <= 64);
    product_with::<L16, 6, 4, false>(c, a, (b, b_ds, 0), prod, NO_PREFETCH)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn product_avx2<const PF: bool>(
    c: (*mut f32, usize),
    a: (*const f32, usize, usize),
    b: (*const f32, usize, usize),
    prod: Product,
    next: (*const f32, usize),
) {
    product_with::<L8, 6, 2, PF>(c, a, b, prod, next)
}

/// Floats in a 64-byte cache line.
const LINE: usize = 16;

/// The product in row tiles of `R` and column tiles of `V` vectors; with `PF`, `next`'s lines are
/// dealt out evenly to the tiles in order and each tile prefetches its share spread over its depth.
#[inline(always)]
unsafe fn product_with<S: Lanes, const R: usize, const V: usize, const PF: bool>(
    (c, c_rs): (*mut f32, usize),
    (a, a_rs, a_ds): (*const f32, usize, usize),
    (b, b_ds, b_ps): (*const f32, usize, usize),
    prod: Product,
    (next, next_len): (*const f32, usize),
) {
    let nr = V * S::W;
    let (tiles, lines) = match PF {
        true => (
            prod.m.div_ceil(R) * prod.n.div_ceil(nr),
            next_len.div_ceil(LINE),
        ),
        false => (1, 0),
    };
    let mut tile_no = 0;
    let mut r0 = 0;
    while r0 < prod.m {
        let rows = (prod.m - r0).min(R);
        let r1 = r0 + rows;
        let n = match prod.trim {
            Trim::Cols(i0) => prod.n.min(i0 + r1),
            _ => prod.n,
        };
        let (d0, d1) = match prod.trim {
            Trim::DepthEnd(i0) => (0, prod.k.min(i0 + r1)),
            Trim::DepthStart(i0) => (r0.saturating_sub(i0).min(prod.k), prod.k),
            _ => (0, prod.k),
        };
        let mut tile = Tile {
            a: a.wrapping_add(r0 * a_rs + d0 * a_ds),
            a_rs,
            a_ds,
            b_ds,
            depth: d1 - d0,
            c_rs,
            out: prod.out,
            pf: (std::ptr::null(), 0, 1),
        };
        let b = b.wrapping_add(d0 * b_ds);
        let mut j = 0;
        while j < n {
            let cols = if prod.padded { nr } else { (n - j).min(nr) };
            let cp = c.wrapping_add(r0 * c_rs + j);
            let bp = b.wrapping_add(j / nr * b_ps);
            if PF {
                let (l0, l1) = (tile_no * lines / tiles, (tile_no + 1) * lines / tiles);
                let every = (tile.depth / (l1 - l0).max(1)).max(1);
                tile.pf = (next.wrapping_add(l0 * LINE), l1 - l0, every);
                tile_no += 1;
            }
            tile_rows::<S, R, V, PF>(rows, cols, &tile, bp, cp);
            j += nr;
        }
        r0 = r1;
    }
}

/// One row tile's operands (see [`Product`]), shared by its column tiles.
struct Tile {
    a: *const f32,
    a_rs: usize,
    a_ds: usize,
    b_ds: usize,
    depth: usize,
    c_rs: usize,
    out: Out,
    /// Lines to prefetch: (first, count, one every so many depth steps).
    pf: (*const f32, usize, usize),
}

/// [`tile`] with `rows <= R` rows.
#[inline(always)]
unsafe fn tile_rows<S: Lanes, const R: usize, const V: usize, const PF: bool>(
    rows: usize,
    cols: usize,
    t: &Tile,
    b: *const f32,
    c: *mut f32,
) {
    let full = cols == V * S::W;
    macro_rules! rows {
        ($($r:literal)*) => {
            match (rows, full) {
                $(
                    ($r, true) if $r <= R => tile::<S, $r, V, true, PF>(t, b, c, cols),
                    ($r, false) if $r <= R => tile::<S, $r, V, false, PF>(t, b, c, cols),
                )*
                _ => unreachable!("tile of {rows} rows"),
            }
        };
    }
    rows!(1 2 3 4 5 6 7 8)
}

/// `R` rows × `V` vectors of C from `t.depth` steps of broadcasts of A and vectors of B, summed in
/// registers; `cols` columns written (all of them when `FULL`).
#[inline(always)]
unsafe fn tile<S: Lanes, const R: usize, const V: usize, const FULL: bool, const PF: bool>(
    t: &Tile,
    b: *const f32,
    c: *mut f32,
    cols: usize,
) {
    let lanes = |v: usize| {
        if FULL {
            S::W
        } else {
            cols.saturating_sub(v * S::W).min(S::W)
        }
    };
    let mut s = [[S::zero(); V]; R];
    if let Out::Chain = t.out {
        for (r, sr) in s.iter_mut().enumerate() {
            let o = c.wrapping_add(r * t.c_rs);
            for (v, sv) in sr.iter_mut().enumerate() {
                *sv = S::load(o.wrapping_add(v * S::W), lanes(v));
            }
        }
    }
    let (mut pf, mut pf_left, every) = t.pf;
    let mut countdown = every;
    for d in 0..t.depth {
        if PF && pf_left > 0 {
            countdown -= 1;
            if countdown == 0 {
                countdown = every;
                prefetch_l2(pf);
                pf = pf.wrapping_add(LINE);
                pf_left -= 1;
            }
        }
        let br = b.wrapping_add(d * t.b_ds);
        let mut w = [S::zero(); V];
        for (v, wv) in w.iter_mut().enumerate() {
            *wv = S::load(br.wrapping_add(v * S::W), lanes(v));
        }
        let ar = t.a.wrapping_add(d * t.a_ds);
        for (r, sr) in s.iter_mut().enumerate() {
            let x = S::splat(*ar.add(r * t.a_rs));
            for v in 0..V {
                sr[v] = sr[v].fma(x, w[v]);
            }
        }
    }
    for (r, sr) in s.iter().enumerate() {
        let o = c.wrapping_add(r * t.c_rs);
        for (v, &sv) in sr.iter().enumerate() {
            let (o, n) = (o.wrapping_add(v * S::W), lanes(v));
            if n == 0 {
                continue;
            }
            match t.out {
                Out::Store(alpha) => sv.mul(S::splat(alpha)).store(o, n),
                Out::Add => S::load(o, n).add(sv).store(o, n),
                Out::Chain => sv.store(o, n),
            }
        }
    }
}

/// Asks for the line at `p` in L2 (a hint: never faults, whatever `p`).
#[inline(always)]
fn prefetch_l2(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch does not access memory architecturally.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        _mm_prefetch::<_MM_HINT_T1>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// `s[j] = scale * (q · key_j)` for the `s.len()` keys at `keys + j * stride` (`q.len()` floats
/// each): a query row against a KV cache. A vector of partial products per key for a block of
/// keys as wide as the vector (16 on AVX-512, 8 on AVX2), then one in-register transpose and a sum
/// of the transposed vectors gives the block's scores in one vector, instead of a horizontal
/// reduction per key. Each score is a fixed sum (lanes in depth order, then the lanes in order).
///
/// # Safety
/// `path` must be available; `keys` must cover `s.len()` rows of `q.len()` floats at `stride`.
pub(crate) unsafe fn dot_rows(
    path: Path,
    s: &mut [f32],
    q: &[f32],
    keys: *const f32,
    stride: usize,
    scale: f32,
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => dot_rows_avx512(s, q, keys, stride, scale),
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => dot_rows_avx2(s, q, keys, stride, scale),
        _ => {
            for (j, s) in s.iter_mut().enumerate() {
                let key = std::slice::from_raw_parts(keys.add(j * stride), q.len());
                *s = crate::simd::dot(q, key) * scale;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn dot_rows_avx512(s: &mut [f32], q: &[f32], keys: *const f32, stride: usize, scale: f32) {
    dot_rows_with::<L16, 16>(s, q, keys, stride, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2(s: &mut [f32], q: &[f32], keys: *const f32, stride: usize, scale: f32) {
    dot_rows_with::<L8, 8>(s, q, keys, stride, scale)
}

#[inline(always)]
unsafe fn dot_rows_with<S: Transpose<N>, const N: usize>(
    s: &mut [f32],
    q: &[f32],
    keys: *const f32,
    stride: usize,
    scale: f32,
) {
    let len = s.len();
    let mut j0 = 0;
    while j0 < len {
        let cnt = (len - j0).min(N);
        let block = if cnt == N {
            dot_block::<S, N, true>(q, keys.add(j0 * stride), stride, cnt)
        } else {
            dot_block::<S, N, false>(q, keys.add(j0 * stride), stride, cnt)
        };
        let t = S::transpose(&block);
        let mut sum = t[0];
        for v in &t[1..] {
            sum = sum.add(*v);
        }
        sum.mul(S::splat(scale)).store(s.as_mut_ptr().add(j0), cnt);
        j0 += N;
    }
}

/// Per key `jj < cnt` of a block (all `N` when `FULL`), the lane-wise partial products with `q`.
#[inline(always)]
unsafe fn dot_block<S: Lanes, const N: usize, const FULL: bool>(
    q: &[f32],
    keys: *const f32,
    stride: usize,
    cnt: usize,
) -> [S; N] {
    let hs = q.len();
    let mut acc = [S::zero(); N];
    let mut c = 0;
    while c < hs {
        let w = (hs - c).min(N);
        let qv = S::load(q.as_ptr().add(c), w);
        for (jj, acc) in acc.iter_mut().enumerate() {
            if FULL || jj < cnt {
                *acc = acc.fma(qv, S::load(keys.add(jj * stride + c), w));
            }
        }
        c += N;
    }
    acc
}

/// Rows `0..rows` of one head's keys (or values), `hs` wide at row stride `rs`, as the B operand of
/// a product with them as columns: zero-padded panels of [`Path::nr`] rows, transposed (panel `p`
/// holds `[hs][nr]`, element `(d, jj)` = row `p * nr + jj`, column `d`). Fills
/// `rows.div_ceil(nr) * nr * hs` floats of `dst`. The vector paths transpose in registers
/// (16 x 16 / 8 x 8 blocks); every path writes the same bits.
///
/// # Safety
/// `path` must be available; `src` must cover `rows` rows of `hs` floats at stride `rs`.
pub(crate) unsafe fn pack_transposed(
    path: Path,
    dst: &mut [f32],
    src: *const f32,
    rs: usize,
    rows: usize,
    hs: usize,
) {
    let nr = path.nr();
    if hs == 0 || rows == 0 {
        return;
    }
    let dst = &mut dst[..rows.div_ceil(nr) * nr * hs];
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => pack_transposed_avx512(dst, src, rs, rows, hs),
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => pack_transposed_avx2(dst, src, rs, rows, hs),
        _ => pack_transposed_scalar(dst, src, rs, rows, hs, nr),
    }
}

unsafe fn pack_transposed_scalar(
    dst: &mut [f32],
    src: *const f32,
    rs: usize,
    rows: usize,
    hs: usize,
    nr: usize,
) {
    for (p, panel) in dst.chunks_exact_mut(nr * hs).enumerate() {
        let live = (rows - p * nr).min(nr);
        if live < nr {
            panel.fill(0.0);
        }
        for jj in 0..live {
            let row = std::slice::from_raw_parts(src.add((p * nr + jj) * rs), hs);
            for (d, &x) in row.iter().enumerate() {
                panel[d * nr + jj] = x;
            }
        }
    }
}

/// Lanes that transpose an `N x N` block (`N` their width) in registers.
trait Transpose<const N: usize>: Lanes {
    /// # Safety
    /// The CPU must have the lanes' instruction set.
    unsafe fn transpose(block: &[Self; N]) -> [Self; N];
}

#[cfg(target_arch = "x86_64")]
impl Transpose<16> for L16 {
    #[inline(always)]
    unsafe fn transpose(block: &[L16; 16]) -> [L16; 16] {
        use std::arch::x86_64::*;
        // Plain loops, not `map`: a closure is not compiled with the caller's target features,
        // so its intrinsics would become calls.
        let mut rows = [_mm512_setzero_si512(); 16];
        for (r, b) in rows.iter_mut().zip(block) {
            *r = _mm512_castps_si512(b.0);
        }
        let cols = crate::simd::lanes::transpose16(&rows);
        let mut out = [L16(_mm512_setzero_ps()); 16];
        for (o, c) in out.iter_mut().zip(&cols) {
            *o = L16(_mm512_castsi512_ps(*c));
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
impl Transpose<8> for L8 {
    #[inline(always)]
    unsafe fn transpose(block: &[L8; 8]) -> [L8; 8] {
        use std::arch::x86_64::*;
        let mut rows = [_mm256_setzero_ps(); 8];
        for (r, b) in rows.iter_mut().zip(block) {
            *r = b.0;
        }
        let cols = crate::simd::lanes::transpose8(&rows);
        let mut out = [L8(_mm256_setzero_ps()); 8];
        for (o, c) in out.iter_mut().zip(&cols) {
            *o = L8(*c);
        }
        out
    }
}

/// Panels of `2 * N` rows from `N x N` blocks, each transposed in registers.
#[inline(always)]
unsafe fn pack_transposed_with<S: Transpose<N>, const N: usize>(
    dst: &mut [f32],
    src: *const f32,
    rs: usize,
    rows: usize,
    hs: usize,
) {
    debug_assert_eq!(N, S::W);
    let nr = 2 * N;
    for (p, panel) in dst.chunks_exact_mut(nr * hs).enumerate() {
        for half in 0..2 {
            let j0 = p * nr + half * N;
            let live = rows.saturating_sub(j0).min(N);
            for d0 in (0..hs).step_by(N) {
                let cnt = (hs - d0).min(N);
                let mut block = [S::zero(); N];
                for (jj, r) in block.iter_mut().enumerate().take(live) {
                    *r = S::load(src.add((j0 + jj) * rs + d0), cnt);
                }
                for (dd, col) in S::transpose(&block).iter().enumerate().take(cnt) {
                    col.store(panel.as_mut_ptr().add((d0 + dd) * nr + half * N), N);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn pack_transposed_avx512(
    dst: &mut [f32],
    src: *const f32,
    rs: usize,
    rows: usize,
    hs: usize,
) {
    pack_transposed_with::<L16, 16>(dst, src, rs, rows, hs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_transposed_avx2(
    dst: &mut [f32],
    src: *const f32,
    rs: usize,
    rows: usize,
    hs: usize,
) {
    pack_transposed_with::<L8, 8>(dst, src, rs, rows, hs)
}

/// Rows `0..rows` of `hs` floats at stride `rs` as the B operand of a product with them as depth:
/// panels of [`Path::nr`] columns (panel `p` holds `[rows][nr]`: columns `p * nr..`, zero past
/// `hs`), read as B `(dst, nr, rows * nr)`. Streams one contiguous panel instead of rows a whole
/// `qkv` row apart (which cost a TLB miss every few rows).
///
/// # Safety
/// `src` must cover `rows` rows of `hs` floats at stride `rs`.
pub(crate) unsafe fn pack_rows(
    path: Path,
    dst: &mut [f32],
    src: *const f32,
    rs: usize,
    rows: usize,
    hs: usize,
) {
    let nr = path.nr();
    if hs == 0 || rows == 0 {
        return;
    }
    for (p, panel) in dst[..hs.div_ceil(nr) * nr * rows]
        .chunks_exact_mut(nr * rows)
        .enumerate()
    {
        let cols = (hs - p * nr).min(nr);
        for (j, out) in panel.chunks_exact_mut(nr).enumerate() {
            out[..cols].copy_from_slice(std::slice::from_raw_parts(src.add(j * rs + p * nr), cols));
            out[cols..].fill(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    /// Every path of this CPU against an f64 product, for every trim, both outputs, padded and
    /// plain B, and row/column counts around the tile sizes. As in attention, A is zero where a trim
    /// may skip terms, so the result must be the whole product; columns a trim leaves out are only
    /// checked not to be written past the end.
    #[test]
    fn every_path_of_this_cpu_matches_reference() {
        let mut rng = rng(70);
        for path in Path::ALL.into_iter().filter(|p| p.available()) {
            let nr = path.nr();
            for (m, n, k) in [
                (1, 1, 1),
                (13, 37, 9),
                (8, 32, 64),
                (70, 45, 33),
                (6, 16, 0),
            ] {
                for trim in [
                    Trim::None,
                    Trim::Cols(3),
                    Trim::DepthEnd(2),
                    Trim::DepthStart(5),
                ] {
                    for padded in [false, true] {
                        for out in [Out::Store(0.5), Out::Add, Out::Chain] {
                            check_product(&mut rng, path, nr, (m, n, k), trim, padded, out);
                        }
                    }
                }
            }
        }
    }

    /// Each path's scores of a query against cached keys match an f64 dot product, for key
    /// counts around the block width and head sizes with and without a lane tail; the keys past
    /// `len` (NaN here) are never read, and nothing past `len` is written.
    #[test]
    fn dot_rows_of_every_path_match_reference() {
        let mut rng = rng(72);
        for path in Path::ALL.into_iter().filter(|p| p.available()) {
            for hs in [1, 7, 20, 64, 80] {
                for len in [1, 7, 8, 15, 16, 17, 40] {
                    let stride = hs + 5;
                    let q = randn(&mut rng, hs, 1.0);
                    let mut keys = randn(&mut rng, (len + 1) * stride, 1.0);
                    keys[len * stride..].fill(f32::NAN);
                    let mut s = vec![f32::NAN; len + 1];
                    unsafe { dot_rows(path, &mut s[..len], &q, keys.as_ptr(), stride, 0.5) };
                    for (j, &got) in s[..len].iter().enumerate() {
                        let want: f64 = (0..hs)
                            .map(|d| q[d] as f64 * keys[j * stride + d] as f64)
                            .sum::<f64>()
                            * 0.5;
                        let tol = 1e-5 * (1.0 + want.abs());
                        assert!(
                            (got as f64 - want).abs() <= tol,
                            "{path:?} hs {hs} len {len} key {j}: {got} vs {want}"
                        );
                    }
                    assert!(s[len].is_nan(), "{path:?} wrote past len");
                }
            }
        }
    }

    /// The vector paths' in-register transposes write what the scalar packing writes, and packed
    /// rows hold the rows; at sizes around the blocks, rows past the end are zero.
    #[test]
    fn packing_of_every_path_matches_scalar() {
        let mut rng = rng(71);
        for path in Path::ALL.into_iter().filter(|p| p.available()) {
            let nr = path.nr();
            for (rows, hs) in [(1, 1), (5, 7), (16, 16), (33, 64), (40, 80), (100, 17)] {
                let rs = hs + 3;
                let src = randn(&mut rng, rows * rs, 1.0);
                let len = rows.div_ceil(nr) * nr * hs;
                let (mut got, mut want) = (vec![f32::NAN; len], vec![f32::NAN; len]);
                unsafe {
                    pack_transposed(path, &mut got, src.as_ptr(), rs, rows, hs);
                    pack_transposed_scalar(&mut want, src.as_ptr(), rs, rows, hs, nr);
                }
                assert_eq!(got.bits(), want.bits(), "{path:?} transposed {rows} x {hs}");
                for (i, &x) in got.iter().enumerate() {
                    let (p, d, jj) = (i / (nr * hs), i / nr % hs, i % nr);
                    let j = p * nr + jj;
                    let expect = if j < rows { src[j * rs + d] } else { 0.0 };
                    assert_eq!(
                        x.to_bits(),
                        expect.to_bits(),
                        "{path:?} transposed ({j}, {d})"
                    );
                }
                let mut packed = vec![f32::NAN; hs.div_ceil(nr) * nr * rows];
                unsafe { pack_rows(path, &mut packed, src.as_ptr(), rs, rows, hs) };
                for (i, &x) in packed.iter().enumerate() {
                    let (p, j, cc) = (i / (nr * rows), i / nr % rows, i % nr);
                    let col = p * nr + cc;
                    let expect = if col < hs { src[j * rs + col] } else { 0.0 };
                    assert_eq!(x.to_bits(), expect.to_bits(), "{path:?} rows ({j}, {col})");
                }
            }
        }
    }

    fn check_product(
        rng: &mut rand_chacha::ChaCha8Rng,
        path: Path,
        nr: usize,
        (m, n, k): (usize, usize, usize),
        trim: Trim,
        padded: bool,
        out: Out,
    ) {
        // A stored transposed ([k, m]), so both of its strides are exercised.
        let mut a = randn(rng, m * k, 1.0);
        for r in 0..m {
            for d in 0..k {
                let skippable = match trim {
                    Trim::DepthEnd(i0) => d > i0 + r,
                    Trim::DepthStart(i0) => d + i0 < r,
                    _ => false,
                };
                if skippable {
                    a[d * m + r] = 0.0;
                }
            }
        }
        let b = randn(rng, k * n, 1.0);
        let panels = n.div_ceil(nr);
        let cw = if padded { panels * nr } else { n } + 3;
        let c0 = randn(rng, m * cw, 1.0);
        let mut c = c0.clone();
        let packed = if padded {
            // B's columns are the rows a head's keys would be.
            let cols: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let mut bt = vec![f32::NAN; panels * nr * k];
            unsafe { pack_transposed(path, &mut bt, cols.as_ptr(), k, n, k) };
            bt
        } else {
            b.clone()
        };
        let (b_ds, b_ps) = if padded { (nr, k * nr) } else { (n, nr) };
        let prod = Product {
            m,
            n,
            k,
            trim,
            padded,
            out,
        };
        unsafe {
            product(
                path,
                (c.as_mut_ptr(), cw),
                (a.as_ptr(), 1, m),
                (packed.as_ptr(), b_ds, b_ps),
                prod,
            )
        };
        for r in 0..m {
            for j in 0..cw {
                let (got, was) = (c[r * cw + j], c0[r * cw + j]);
                if j >= n {
                    if !padded || j >= panels * nr {
                        assert_eq!(
                            got.to_bits(),
                            was.to_bits(),
                            "{path:?} wrote column {j} of {n}"
                        );
                    }
                    continue;
                }
                if let Trim::Cols(i0) = trim {
                    if j > i0 + r {
                        continue;
                    }
                }
                let sum: f64 = (0..k)
                    .map(|d| a[d * m + r] as f64 * b[d * n + j] as f64)
                    .sum();
                let want = match out {
                    Out::Store(alpha) => alpha as f64 * sum,
                    Out::Add | Out::Chain => was as f64 + sum,
                };
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs() + k as f64),
                    "{path:?} {m}x{n}x{k} row {r} col {j}: {got} vs {want}"
                );
            }
        }
    }
}
