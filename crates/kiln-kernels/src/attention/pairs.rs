//! Attention's products in bf16 under [`crate::Precision::Bf16`], on CPUs with AVX512-BF16
//! (`VDPBF16PS`: 32 multiply-adds an instruction where an f32 FMA does 16).
//!
//! The arithmetic is the bf16 matmuls' (see [`crate::bf16`]): both operands rounded to bf16 (to
//! nearest, ties to even), products exact, sums in f32, outputs f32; the softmax stays f32. All
//! seven of attention's products take it. The scores `Q K^T` (forward, and the backward's
//! recomputation, so the two stay bit for bit equal), the value sums `P V`, and the backward's
//! `dP = dY V^T` and `dQ = dS K` read rows whose depth runs along the row (Q, dY, P, dS: converted
//! to rows of bf16 pairs) and the kv head's keys and values (packed once per task). The key and
//! value gradients, whose depth (the queries) runs across the rows of P and dS, are computed
//! transposed, `dV^T += dY^T P` and `dK^T += Q^T dS`, from the block's rows paired two by two
//! ([`interleaved`]), and added into `dqkv` transposed once per task ([`add_transposed`]).
//!
//! Layouts (a "word" is a u32 holding a pair of bf16: depth `2q` in the low half, `2q + 1` in the
//! high half, as `VDPBF16PS` reads them):
//! - A operand: row `r`'s word `q` at `a[r * a_rs + q * a_qs]`: rows of pairs ([`rows`], `a_qs =
//!   1`), or one panel of an [`interleaved`] operand read transposed (`a_rs = 1`, `a_qs = NR`).
//! - B operand: panels of [`NR`] columns; panel `p`'s depth pair `q` is the `NR` words at
//!   `b[p * b_ps + q * NR]`, zero past the matrix ([`transposed`] when the depth is the source's
//!   columns, [`interleaved`] when it is the source's rows).
//!
//! Every layout pads an odd depth with a zero, so a pair never reads past the data.
#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use super::tiles::{Out, Product, Trim};
use crate::bf16::f32_to_bf16;
use std::arch::x86_64::*;

/// Columns of a tile and of a packed panel (two vectors of 16 f32 sums).
pub(crate) const NR: usize = 32;
/// Rows of a tile: 8 × 2 accumulators, half of AVX-512's registers.
const MR: usize = 8;

/// Whether this process runs attention's bf16 products (AVX512-BF16 usable under `KILN_SIMD`).
pub(crate) fn available() -> bool {
    crate::bf16::tiled::dot_available()
}

/// One pair of bf16 as `VDPBF16PS` reads it.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    f32_to_bf16(lo) as u32 | (f32_to_bf16(hi) as u32) << 16
}

/// 32 consecutive f32 at `src` as 16 words (element order kept).
#[inline(always)]
unsafe fn cvt32(src: *const f32) -> __m512i {
    std::mem::transmute(_mm512_cvtne2ps_pbh(
        _mm512_loadu_ps(src.add(16)),
        _mm512_loadu_ps(src),
    ))
}

/// Words per row of depth `len`.
pub(crate) fn words(len: usize) -> usize {
    len.div_ceil(2)
}

/// `rows` rows of `len` floats at stride `rs` as A rows of [`words`]`(len)` words at stride `ws`.
///
/// # Safety
/// AVX512-BF16 ([`available`]); `src` must cover the rows; `dst` holds `rows * ws` words.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn rows(
    dst: &mut [u32],
    ws: usize,
    src: *const f32,
    rs: usize,
    rows: usize,
    len: usize,
) {
    let w = words(len);
    assert!(ws >= w && dst.len() >= rows.saturating_sub(1) * ws + w);
    for r in 0..rows {
        let s = src.add(r * rs);
        let d = dst.as_mut_ptr().add(r * ws);
        let mut q = 0;
        while 2 * q + 32 <= len {
            _mm512_storeu_si512(d.add(q).cast(), cvt32(s.add(2 * q)));
            q += 16;
        }
        while q < w {
            let lo = *s.add(2 * q);
            let hi = if 2 * q + 1 < len {
                *s.add(2 * q + 1)
            } else {
                0.0
            };
            *d.add(q) = pair(lo, hi);
            q += 1;
        }
    }
}

/// Words of a [`transposed`] or [`interleaved`] operand.
pub(crate) fn panel_words(cols: usize, depth: usize) -> usize {
    cols.div_ceil(NR) * NR * words(depth)
}

/// The B operand `X^T` of `rows` rows of `len` floats (`rs` apart): depth `len` (the rows'
/// elements), columns the rows (a kv head's keys for the scores, its values for `dP`).
///
/// # Safety
/// AVX512-BF16; `src` must cover the rows; `dst` holds [`panel_words`]`(rows, len)`.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn transposed(
    dst: &mut [u32],
    src: *const f32,
    rs: usize,
    rows: usize,
    len: usize,
) {
    let w = words(len);
    let dst = &mut dst[..panel_words(rows, len)];
    let ps = w * NR;
    let mut j0 = 0;
    // Whole blocks of 16 rows × 16 words: converted rows, transposed in registers.
    if len.is_multiple_of(32) {
        while j0 + 16 <= rows {
            let (p, half) = (j0 / NR, j0 % NR);
            for q0 in (0..w).step_by(16) {
                let mut block = [_mm512_setzero_si512(); 16];
                for (jj, v) in block.iter_mut().enumerate() {
                    *v = cvt32(src.add((j0 + jj) * rs + 2 * q0));
                }
                for (qq, v) in crate::simd::lanes::transpose16(&block).iter().enumerate() {
                    let at = p * ps + (q0 + qq) * NR + half;
                    _mm512_storeu_si512(dst.as_mut_ptr().add(at).cast(), *v);
                }
            }
            j0 += 16;
        }
    }
    for j in j0..rows.next_multiple_of(NR) {
        let (p, jj) = (j / NR, j % NR);
        for q in 0..w {
            dst[p * ps + q * NR + jj] = if j < rows {
                let s = src.add(j * rs);
                let hi = if 2 * q + 1 < len {
                    *s.add(2 * q + 1)
                } else {
                    0.0
                };
                pair(*s.add(2 * q), hi)
            } else {
                0
            };
        }
    }
}

/// The B operand `X` of `rows` rows of `cols` floats (`rs` apart): depth the rows (a kv head's
/// values for `P V`, its keys for `dQ`), columns their elements; rows paired two by two.
///
/// # Safety
/// AVX512-BF16; `src` must cover the rows; `dst` holds [`panel_words`]`(cols, rows)`.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn interleaved(
    dst: &mut [u32],
    src: *const f32,
    rs: usize,
    rows: usize,
    cols: usize,
) {
    let w = words(rows);
    let dst = &mut dst[..panel_words(cols, rows)];
    let ps = w * NR;
    // Element 2j takes lo[j] (element j of the conversion), 2j + 1 takes hi[j] (element 16 + j).
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    for q in 0..w {
        let lo = src.add(2 * q * rs);
        let both = 2 * q + 1 < rows;
        let mut c0 = 0;
        if both {
            let hi = src.add((2 * q + 1) * rs);
            while c0 + 16 <= cols {
                let cv: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(
                    _mm512_loadu_ps(hi.add(c0)),
                    _mm512_loadu_ps(lo.add(c0)),
                ));
                let at = c0 / NR * ps + q * NR + c0 % NR;
                _mm512_storeu_si512(
                    dst.as_mut_ptr().add(at).cast(),
                    _mm512_permutexvar_epi16(idx, cv),
                );
                c0 += 16;
            }
        }
        for c in c0..cols.next_multiple_of(NR) {
            let at = c / NR * ps + q * NR + c % NR;
            dst[at] = if c < cols {
                let hi = if both {
                    *src.add((2 * q + 1) * rs + c)
                } else {
                    0.0
                };
                pair(*lo.add(c), hi)
            } else {
                0
            };
        }
    }
}

/// `C[m, n] (=|+=) A[m, k] · B[k, n]` on bf16 pairs: A `(a, a_rs, a_qs)`, B panels `(b, b_ps)`
/// (see the module documentation), C `(pointer, row stride)`. `prod.k` is the depth in elements;
/// the trims are [`Product`]'s ([`Trim::DepthStart`] is not used here). A trimmed depth that ends
/// or starts inside a pair takes the pair's other element too, which is zero there (masked
/// probabilities and their gradients); with `prod.padded` C has room for whole panels.
///
/// # Safety
/// AVX512-BF16; the pointers must cover what the product reads and writes; no other thread may
/// touch the written part of C.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn product(
    (c, c_rs): (*mut f32, usize),
    (a, a_rs, a_qs): (*const u32, usize, usize),
    (b, b_ps): (*const u32, usize),
    prod: Product,
) {
    debug_assert!(!matches!(prod.trim, Trim::DepthStart(_)));
    let mut r0 = 0;
    while r0 < prod.m {
        let rows = (prod.m - r0).min(MR);
        let r1 = r0 + rows;
        let n = match prod.trim {
            Trim::Cols(i0) => prod.n.min(i0 + r1),
            _ => prod.n,
        };
        let depth = match prod.trim {
            Trim::DepthEnd(i0) => prod.k.min(i0 + r1),
            _ => prod.k,
        };
        let mut j = 0;
        while j < n {
            let cols = if prod.padded { NR } else { (n - j).min(NR) };
            let q0 = match prod.trim {
                Trim::ColsStart(i0) => (j.saturating_sub(i0) / 2).min(words(depth)),
                _ => 0,
            };
            let t = Tile {
                a: a.add(r0 * a_rs + q0 * a_qs),
                a_rs,
                a_qs,
                pairs: words(depth) - q0,
                c_rs,
                out: prod.out,
            };
            let cp = c.add(r0 * c_rs + j);
            let bp = b.add(j / NR * b_ps + q0 * NR);
            macro_rules! rows {
                ($($r:literal)*) => {
                    match rows {
                        $($r => tile::<$r>(&t, bp, cp, cols),)*
                        _ => unreachable!("tile of {rows} rows"),
                    }
                };
            }
            rows!(1 2 3 4 5 6 7 8);
            j += NR;
        }
        r0 = r1;
    }
}

/// One row tile's A operand and C, shared by its column tiles.
struct Tile {
    a: *const u32,
    a_rs: usize,
    a_qs: usize,
    pairs: usize,
    c_rs: usize,
    out: Out,
}

/// `R` rows × [`NR`] columns of C, `t.pairs` steps of `VDPBF16PS` summed in registers; the first
/// `cols` columns written.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile<const R: usize>(t: &Tile, b: *const u32, c: *mut f32, cols: usize) {
    let mut s = [[_mm512_setzero_ps(); 2]; R];
    for q in 0..t.pairs {
        let br = b.add(q * NR);
        let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(br.cast()));
        let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(br.add(16).cast()));
        for (r, sr) in s.iter_mut().enumerate() {
            let x: __m512bh =
                std::mem::transmute(_mm512_set1_epi32(*t.a.add(r * t.a_rs + q * t.a_qs) as i32));
            sr[0] = _mm512_dpbf16_ps(sr[0], x, w0);
            sr[1] = _mm512_dpbf16_ps(sr[1], x, w1);
        }
    }
    for (r, sr) in s.iter().enumerate() {
        let o = c.add(r * t.c_rs);
        for (v, &sv) in sr.iter().enumerate() {
            let n = cols.saturating_sub(16 * v).min(16);
            if n == 0 {
                continue;
            }
            let mask: __mmask16 = if n == 16 { !0 } else { (1u16 << n) - 1 };
            let o = o.add(16 * v);
            let out = match t.out {
                Out::Store(alpha) => _mm512_mul_ps(sv, _mm512_set1_ps(alpha)),
                Out::Add => _mm512_add_ps(_mm512_maskz_loadu_ps(mask, o), sv),
                Out::Chain => unreachable!("bf16 pairs do not continue f32 chains"),
            };
            _mm512_mask_storeu_ps(o, mask, out);
        }
    }
}

/// `dst[j * d_rs + r] += src[r * s_rs + j]` for `r < rows`, `j < cols`: a task's transposed key
/// or value gradient into its `dqkv` columns, 16 × 16 blocks through registers.
///
/// # Safety
/// AVX-512F; `dst` must cover `cols` rows of `rows` floats at stride `d_rs`, written by no other
/// thread; `src` `rows` rows of `cols` at `s_rs`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn add_transposed(
    dst: *mut f32,
    d_rs: usize,
    src: &[f32],
    s_rs: usize,
    rows: usize,
    cols: usize,
) {
    assert!(rows == 0 || cols == 0 || src.len() >= (rows - 1) * s_rs + cols);
    let (rb, cb) = (rows / 16 * 16, cols / 16 * 16);
    for r0 in (0..rb).step_by(16) {
        for j0 in (0..cb).step_by(16) {
            let mut block = [_mm512_setzero_si512(); 16];
            for (rr, v) in block.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(src.as_ptr().add((r0 + rr) * s_rs + j0).cast());
            }
            for (jj, v) in crate::simd::lanes::transpose16(&block).iter().enumerate() {
                let d = dst.add((j0 + jj) * d_rs + r0);
                _mm512_storeu_ps(
                    d,
                    _mm512_add_ps(_mm512_loadu_ps(d), _mm512_castsi512_ps(*v)),
                );
            }
        }
    }
    // The edges: columns past the whole blocks for every row, rows past them for the rest.
    for r in 0..rows {
        let from = if r < rb { cb } else { 0 };
        for j in from..cols {
            *dst.add(j * d_rs + r) += src[r * s_rs + j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16::round_bf16;
    use crate::testutil::*;

    /// `[m, n]` f64 sums of bf16-rounded operands: `a(r, d) * b(d, j)` over `d < depth(r)`.
    fn reference(
        m: usize,
        n: usize,
        depth: impl Fn(usize) -> usize,
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
    ) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..depth(r))
                    .map(|d| round_bf16(a(r, d)) as f64 * round_bf16(b(d, j)) as f64)
                    .sum();
            }
        }
        out
    }

    fn close(got: f32, want: f64, what: &str) {
        assert!(
            (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "{what}: {got} vs {want}"
        );
    }

    /// Each packing against its definition, at sizes around the vector and block widths.
    #[test]
    fn packings_hold_the_pairs_they_define() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16");
            return;
        }
        let mut rng = rng(5);
        for (nrows, len, stride) in [
            (1, 1, 1),
            (5, 7, 9),
            (16, 32, 40),
            (37, 64, 70),
            (70, 33, 33),
        ] {
            let x = randn(&mut rng, nrows * stride, 1.0);
            let at = |r: usize, e: usize| {
                if r < nrows && e < len {
                    x[r * stride + e]
                } else {
                    0.0
                }
            };
            let ws = words(len) + 3;
            let mut a = vec![7u32; nrows * ws];
            unsafe { rows(&mut a, ws, x.as_ptr(), stride, nrows, len) };
            for r in 0..nrows {
                for q in 0..words(len) {
                    assert_eq!(a[r * ws + q], pair(at(r, 2 * q), at(r, 2 * q + 1)), "rows");
                }
                assert_eq!(a[r * ws + words(len)], 7, "rows wrote past a row");
            }
            let mut t = vec![7u32; panel_words(nrows, len)];
            unsafe { transposed(&mut t, x.as_ptr(), stride, nrows, len) };
            for j in 0..nrows.next_multiple_of(NR) {
                for q in 0..words(len) {
                    let got = t[j / NR * words(len) * NR + q * NR + j % NR];
                    assert_eq!(got, pair(at(j, 2 * q), at(j, 2 * q + 1)), "transposed");
                }
            }
            let mut i = vec![7u32; panel_words(len, nrows)];
            unsafe { interleaved(&mut i, x.as_ptr(), stride, nrows, len) };
            for c in 0..len.next_multiple_of(NR) {
                for q in 0..words(nrows) {
                    let got = i[c / NR * words(nrows) * NR + q * NR + c % NR];
                    assert_eq!(got, pair(at(2 * q, c), at(2 * q + 1, c)), "interleaved");
                }
            }
        }
    }

    /// The product on both B layouts, every output mode and trim, against f64 sums of the rounded
    /// operands; what a tile must not write stays untouched.
    #[test]
    fn product_matches_rounded_reference() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16");
            return;
        }
        let mut rng = rng(6);
        for (m, n, k) in [
            (1, 1, 1),
            (8, 32, 64),
            (13, 45, 37),
            (64, 64, 130),
            (64, 200, 64),
        ] {
            let av = randn(&mut rng, m * k, 1.0);
            let bt = randn(&mut rng, n * k, 1.0); // B^T rows (keys): B(d, j) = bt[j * k + d]
            let ws = words(k);
            let mut a = vec![0u32; m * ws];
            let mut bp = vec![0u32; panel_words(n, k)];
            unsafe {
                rows(&mut a, ws, av.as_ptr(), k, m, k);
                transposed(&mut bp, bt.as_ptr(), k, n, k);
            }
            let (fa, fb) = (
                |r: usize, d: usize| av[r * k + d],
                |d: usize, j: usize| bt[j * k + d],
            );
            let b_ps = words(k) * NR;
            // Store(alpha), scores-like, with and without the causal column trim.
            for (trim, i0) in [(Trim::None, 0), (Trim::Cols(3), 3)] {
                let cs = n.next_multiple_of(NR);
                let mut c = vec![f32::NAN; m * cs];
                let prod = Product {
                    m,
                    n,
                    k,
                    trim,
                    padded: true,
                    out: Out::Store(0.5),
                };
                unsafe {
                    product(
                        (c.as_mut_ptr(), cs),
                        (a.as_ptr(), ws, 1),
                        (bp.as_ptr(), b_ps),
                        prod,
                    )
                };
                let want = reference(m, n, |_| k, fa, fb);
                for r in 0..m {
                    let lim = if matches!(trim, Trim::Cols(_)) {
                        n.min(i0 + (r / MR + 1) * MR)
                    } else {
                        n
                    };
                    for j in 0..lim {
                        close(c[r * cs + j], 0.5 * want[r * n + j], "store");
                    }
                }
            }
            // Add on interleaved B (depth = rows of the source), unpadded C, depth trimmed.
            let bx = randn(&mut rng, k * n, 1.0); // B(d, j) = bx[d * n + j]
            let mut bi = vec![0u32; panel_words(n, k)];
            unsafe { interleaved(&mut bi, bx.as_ptr(), n, k, n) };
            let fb2 = |d: usize, j: usize| bx[d * n + j];
            for (trim, i0) in [(Trim::None, 0), (Trim::DepthEnd(5), 5)] {
                // Zero A past each row's own query (i0 + r) as causal masking leaves it, so a pair
                // straddling the trimmed depth reads a zero.
                let mut masked = av.clone();
                if let Trim::DepthEnd(_) = trim {
                    for r in 0..m {
                        for d in (i0 + r + 1).min(k)..k {
                            masked[r * k + d] = 0.0;
                        }
                    }
                }
                unsafe { rows(&mut a, ws, masked.as_ptr(), k, m, k) };
                let c0 = randn(&mut rng, m * (n + 3), 1.0);
                let mut c = c0.clone();
                let prod = Product {
                    m,
                    n,
                    k,
                    trim,
                    padded: false,
                    out: Out::Add,
                };
                unsafe {
                    product(
                        (c.as_mut_ptr(), n + 3),
                        (a.as_ptr(), ws, 1),
                        (bi.as_ptr(), b_ps),
                        prod,
                    )
                };
                let want = reference(m, n, |_| k, |r, d| masked[r * k + d], fb2);
                for r in 0..m {
                    for j in 0..n + 3 {
                        let at = r * (n + 3) + j;
                        if j < n {
                            close(c[at], c0[at] as f64 + want[r * n + j], "add");
                        } else {
                            assert_eq!(c[at].to_bits(), c0[at].to_bits(), "wrote past n");
                        }
                    }
                }
            }
        }
    }

    /// The transposed key gradients' shape: A one panel of an interleaved operand read transposed
    /// (`a_rs = 1`, `a_qs = NR`), B interleaved, the causal column-start trim, accumulating.
    #[test]
    fn transposed_a_with_column_start_trim_matches_reference() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16");
            return;
        }
        let mut rng = rng(7);
        // (queries m, keys n, rows hs, block start i0)
        for (m, n, hs, i0) in [
            (64, 128, 64, 64),
            (21, 85, 37, 64),
            (7, 40, 32, 33),
            (64, 64, 80, 0),
        ] {
            let x = randn(&mut rng, m * hs, 1.0); // X[q][c]: dY or Q rows
                                                  // A[q][j]: P or dS rows, zero where key j is past query i0 + q (causal).
            let mut a = randn(&mut rng, m * n, 1.0);
            for q in 0..m {
                for j in (i0 + q + 1).min(n)..n {
                    a[q * n + j] = 0.0;
                }
            }
            let (mut ti, mut pi) = (
                vec![0u32; panel_words(hs, m)],
                vec![0u32; panel_words(n, m)],
            );
            unsafe {
                interleaved(&mut ti, x.as_ptr(), hs, m, hs);
                interleaved(&mut pi, a.as_ptr(), n, m, n);
            }
            let tp = n.next_multiple_of(NR);
            let d0 = randn(&mut rng, hs * tp, 1.0);
            let mut d = d0.clone();
            let ps = words(m) * NR;
            for c0 in (0..hs).step_by(NR) {
                let prod = Product {
                    m: (hs - c0).min(NR),
                    n,
                    k: m,
                    trim: Trim::ColsStart(i0),
                    padded: true,
                    out: Out::Add,
                };
                let a_op = (ti.as_ptr().wrapping_add(c0 / NR * ps), 1, NR);
                unsafe {
                    product(
                        (d.as_mut_ptr().add(c0 * tp), tp),
                        a_op,
                        (pi.as_ptr(), ps),
                        prod,
                    )
                };
            }
            let want = reference(hs, n, |_| m, |c, q| x[q * hs + c], |q, j| a[q * n + j]);
            for c in 0..hs {
                for j in 0..tp {
                    let at = c * tp + j;
                    if j < n {
                        close(d[at], d0[at] as f64 + want[c * n + j], "transposed A");
                    } else {
                        assert_eq!(d[at], d0[at], "padding columns changed");
                    }
                }
            }
        }
    }

    /// [`add_transposed`] adds every element once, to its transposed place, and nothing else.
    #[test]
    fn add_transposed_moves_every_element_once() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16");
            return;
        }
        let mut rng = rng(8);
        for (rows, cols) in [(1, 1), (5, 3), (16, 16), (37, 70), (64, 256)] {
            let (s_rs, d_rs) = (cols + 5, rows + 3);
            let src = randn(&mut rng, rows * s_rs, 1.0);
            let d0 = randn(&mut rng, cols * d_rs, 1.0);
            let mut d = d0.clone();
            unsafe { add_transposed(d.as_mut_ptr(), d_rs, &src, s_rs, rows, cols) };
            for j in 0..cols {
                for r in 0..d_rs {
                    let want = if r < rows {
                        d0[j * d_rs + r] + src[r * s_rs + j]
                    } else {
                        d0[j * d_rs + r]
                    };
                    assert_eq!(
                        d[j * d_rs + r].to_bits(),
                        want.to_bits(),
                        "{rows}x{cols} at {j},{r}"
                    );
                }
            }
        }
    }
}
