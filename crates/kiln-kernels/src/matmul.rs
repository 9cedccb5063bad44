//! Matrix multiplication (through the `gemm` crate) and the linear layer built on it.
//!
//! Everything is expressed as strided `gemm` calls: transposes are just swapped strides, so no
//! operand is ever copied. Threads split the output (never the reduction dimension), so results do
//! not depend on scheduling or on the thread count.
#![allow(clippy::too_many_arguments)]

use gemm::Parallelism;
use rayon::prelude::*;

use crate::bf16::{matmul_bf16, Precision};
use crate::simd::{self, SyncPtr};

/// Most rows a product takes the skinny (few-row) kernels with, on CPUs where it does: above, the
/// product is a blocked one (`gemm`, or the packed f32 panels of batched decoding).
pub const SKINNY_ROWS: usize = skinny::MAX_ROWS;

/// Most rows a batched decode multiplies by a model's own plain-layout `[k, n]` f32 weight (the
/// skinny kernel) on this CPU; a decode of more rows runs on the weights packed into f32 panels
/// ([`crate::PackedFormat::F32`]) for the call (`gemm` would repack the weight on every step).
///
/// At most what the skinny kernel takes, and at most 3 rows with AVX-512, 1 with AVX2, where the
/// panels' tiles win. Measured on an AMD Zen 5 (`kiln bench generate`, 6 x 384 model, alternately,
/// tok/s, skinny -> panels): AVX-512 batch 2 1,374-1,509 -> 1,299-1,447, batch 4 2,270-2,393 ->
/// 2,376-2,526, batch 8 2,746-3,149 -> 3,637-3,720, batch 16 3,985-4,154 -> 5,086-5,228; as AVX2
/// (`KILN_SIMD=avx2`) batch 2 741-842 -> 1,139-1,455, batch 4 1,036 -> 2,041-2,521, batch 16
/// 2,612-2,837 -> 3,947-4,321; batch 1 stays skinny (bound by streaming the weights: 915-951 against
/// 786-897 on panels).
pub fn decode_skinny_rows(k: usize, n: usize) -> usize {
    let cap = match skinny::Path::best() {
        Some(skinny::Path::Avx512) => 3,
        Some(skinny::Path::Avx2) => 1,
        None => 0,
    };
    skinny::rows_for(k, n).min(cap)
}

/// Below this many multiply-adds a single thread is faster than waking the pool.
const PAR_THRESHOLD: usize = 64 * 64 * 64;

/// Elements per task of the element-wise passes here (bias broadcast).
const ELEMWISE_CHUNK: usize = 1 << 14;

/// Minimum rows per task when reducing over rows (bias gradients); see [`simd::rows_per_block`].
const ROW_BLOCK: usize = 64;

/// Strided `out = op(a) @ op(b)` (`+=` when `accumulate`) with an explicit parallelism, shared with
/// the attention kernel, which calls it single-threaded from inside its own rayon tasks.
///
/// # Safety
/// `out`, `a`, `b` must be valid for the `m x n`, `m x k`, `k x n` matrices described by the
/// given (row, column) strides, and `out` must not overlap `a` or `b`.
#[inline]
pub(crate) unsafe fn gemm_raw(
    out: *mut f32,
    out_rs: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(level) = capped::level() {
        capped::gemm(
            level,
            (m, n, k),
            (out, 1, out_rs as isize),
            accumulate,
            (a, a_cs as isize, a_rs as isize),
            (b, b_cs as isize, b_rs as isize),
            par,
        );
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        out,
        1,
        out_rs as isize,
        accumulate,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        1.0f32, // alpha: scale of the existing `out` (ignored unless accumulate)
        1.0f32, // beta: scale of the product
        false,
        false,
        false,
        par,
    );
}

/// `gemm` on the kernels of the SIMD level Kiln runs at when `KILN_SIMD` caps it below the CPU.
/// `gemm` picks its kernels from the CPU alone, so without this a `KILN_SIMD=avx2` run on an
/// AVX-512 machine would still multiply on AVX-512, and would be neither the run nor the test of
/// an AVX2-only CPU. The same steps as `gemm::gemm` (a row-major destination is computed as its
/// transpose, the layout `gemm`'s microkernels want), on the kernels `gemm` picks on a CPU of that
/// level: AVX2 + FMA, or its scalar ones for `base`.
#[cfg(target_arch = "x86_64")]
mod capped {
    use crate::simd::{self, Level};
    use gemm::Parallelism;
    use gemm_common::gemm::gemm_basic_generic;
    use gemm_common::simd::{MixedSimd, Scalar, V3};
    use std::sync::OnceLock;

    /// The level to run `gemm` at when it is below what `gemm` would pick itself, else `None`.
    pub(super) fn level() -> Option<Level> {
        static CAPPED: OnceLock<Option<Level>> = OnceLock::new();
        *CAPPED.get_or_init(|| {
            let gemm_level = if std::is_x86_feature_detected!("avx512f") {
                Level::V4
            } else if std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx2")
            {
                Level::V3
            } else {
                Level::Base
            };
            let ours = simd::level();
            ((ours as u8) < (gemm_level as u8)).then_some(ours)
        })
    }

    /// `dst (m x n) = [dst +] lhs (m x k) @ rhs (k x n)`, each as (pointer, column stride, row
    /// stride), as `gemm::gemm` takes them (alpha = beta = 1).
    ///
    /// # Safety
    /// As `gemm::gemm`: the strides must describe valid, non-negative-stride matrices, and `dst`
    /// must not overlap the operands.
    pub(super) unsafe fn gemm(
        level: Level,
        (m, n, k): (usize, usize, usize),
        (dst, dst_cs, dst_rs): (*mut f32, isize, isize),
        read_dst: bool,
        (lhs, lhs_cs, lhs_rs): (*const f32, isize, isize),
        (rhs, rhs_cs, rhs_rs): (*const f32, isize, isize),
        par: Parallelism,
    ) {
        debug_assert!(dst_cs >= 0 && dst_rs >= 0 && lhs_cs >= 0 && lhs_rs >= 0);
        debug_assert!(rhs_cs >= 0 && rhs_rs >= 0);
        // As gemm::gemm: a destination with unit column stride is computed as its transpose.
        let (m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs) = if dst_cs < dst_rs {
            (
                n, m, dst_rs, dst_cs, rhs, rhs_rs, rhs_cs, lhs, lhs_rs, lhs_cs,
            )
        } else {
            (
                m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs,
            )
        };
        // One call for either level: gemm's microkernels for `$simd` (`$lanes` f32 a vector).
        macro_rules! run {
            ($simd:ty, $lanes:literal, $uk:path) => {{
                use $uk as uk;
                let simd = <$simd as MixedSimd<f32, f32, f32, f32>>::try_new()
                    .expect("the capped level is one this CPU has");
                gemm_basic_generic::<
                    $simd,
                    f32,
                    $lanes,
                    { uk::MR_DIV_N * $lanes },
                    { uk::NR },
                    { uk::MR_DIV_N },
                    { uk::H_M },
                    { uk::H_N },
                >(
                    simd,
                    m,
                    n,
                    k,
                    dst,
                    dst_cs,
                    dst_rs,
                    read_dst,
                    lhs,
                    lhs_cs,
                    lhs_rs,
                    rhs,
                    rhs_cs,
                    rhs_rs,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    |a: f32, b: f32, c: f32| a * b + c,
                    &uk::UKR,
                    &uk::H_UKR,
                    false,
                    par,
                )
            }};
        }
        match level {
            Level::V3 => run!(V3, 8, gemm_f32::microkernel::fma::f32),
            Level::Base => run!(Scalar, 1, gemm_f32::microkernel::scalar::f32),
            Level::V4 => unreachable!("gemm is only capped below AVX-512"),
        }
    }
}

/// Runs `out = op(a) @ op(b)` (strided, as [`gemm_raw`]) over the pool when it is big enough to
/// pay for it: the output is cut along its longer side into one part per thread (whole multiples
/// of [`PART_ALIGN`]), each a single-threaded `gemm`. Measured on the training step's shapes at 2
/// threads, this beats `gemm`'s own threading by 5-15 % on the weight gradients (`[in, out]` from a
/// reduction over 2048 tokens) and matches it elsewhere; each output element is the same sum in
/// the same order either way, so the bits do not depend on the split. Where the longer side is too
/// short for a part per thread, or past [`MAX_PART_THREADS`] threads (where every part would pack
/// the whole shared operand; not measured here), `gemm` threads the product itself.
///
/// # Safety
/// As [`gemm_raw`].
unsafe fn gemm_threaded(
    out: *mut f32,
    out_rs: usize,
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs, b_cs): (*const f32, usize, usize),
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
) {
    let threads = rayon::current_num_threads();
    let small = threads == 1 || m.saturating_mul(k).saturating_mul(n) < PAR_THRESHOLD;
    let along_rows = m >= n;
    let len = if along_rows { m } else { n };
    let part = len.div_ceil(threads).next_multiple_of(PART_ALIGN);
    // Fewer parts than threads (or many threads): gemm splits the product in two dimensions.
    if small || threads > MAX_PART_THREADS || part * (threads - 1) >= len {
        let par = if small {
            Parallelism::None
        } else {
            Parallelism::Rayon(threads)
        };
        gemm_raw(
            out, out_rs, a, a_rs, a_cs, b, b_rs, b_cs, m, k, n, accumulate, par,
        );
        return;
    }
    let (out, a, b) = (SyncPtr(out), SyncConst(a), SyncConst(b));
    (0..len.div_ceil(part)).into_par_iter().for_each(|p| {
        let (o, a, b) = (out.get(), a.get(), b.get());
        let (i0, i1) = (p * part, ((p + 1) * part).min(len));
        // SAFETY: each part is a disjoint block of `out`'s rows (or columns), and the operands'
        // sub-blocks stay inside what the caller vouched for.
        unsafe {
            let (o, a, b, rows, cols) = if along_rows {
                (o.add(i0 * out_rs), a.add(i0 * a_rs), b, i1 - i0, n)
            } else {
                (o.add(i0), a, b.add(i0 * b_cs), m, i1 - i0)
            };
            let par = Parallelism::None;
            gemm_raw(
                o, out_rs, a, a_rs, a_cs, b, b_rs, b_cs, rows, k, cols, accumulate, par,
            );
        }
    });
}

/// Parts of [`gemm_threaded`] start at multiples of this (whole register tiles of `gemm`).
const PART_ALIGN: usize = 64;

/// Most threads [`gemm_threaded`] cuts the output for.
const MAX_PART_THREADS: usize = 4;

/// A read-only operand pointer that rayon tasks may share.
#[derive(Clone, Copy)]
struct SyncConst(*const f32);
// SAFETY: only read, by tasks of a product whose caller guarantees the memory is valid.
unsafe impl Send for SyncConst {}
unsafe impl Sync for SyncConst {}

impl SyncConst {
    fn get(self) -> *const f32 {
        self.0
    }
}

/// Products with only a few rows (token-by-token inference: matrix-vector and batch-16 shapes), where
/// `gemm`'s packing costs as much as the arithmetic and its vector path is slow. The weights are
/// streamed once per group of rows straight from their row-major storage; the columns (or, for a
/// transposed `b`, the rows of `b`) are split into one contiguous part per thread. Each output
/// element is one dot product summed in `k` order whatever the split, so the result is independent
/// of the thread count. One generic body, compiled for AVX-512 (16 lanes) and AVX2 (8 lanes, fewer
/// accumulators for its 16 registers).
pub(crate) mod skinny {
    use rayon::prelude::*;

    /// At most this many rows take the skinny path.
    pub(crate) const MAX_ROWS: usize = 16;
    /// Below this many multiply-adds one thread does it all.
    const PAR_MACS: usize = 1 << 16;

    /// The vector paths of the skinny product.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Path {
        Avx2,
        Avx512,
    }

    impl Path {
        pub(crate) const ALL: [Path; 2] = [Path::Avx2, Path::Avx512];

        pub(crate) fn available(self) -> bool {
            match self {
                Path::Avx2 => crate::simd::level() != crate::simd::Level::Base,
                Path::Avx512 => crate::simd::level() == crate::simd::Level::V4,
            }
        }

        pub(crate) fn best() -> Option<Path> {
            Path::ALL.into_iter().rev().find(|p| p.available())
        }
    }

    /// `out[m,n] (+)= a[m,k] @ op(b)`; returns false (doing nothing) when the shape or CPU is not
    /// one this path handles.
    pub(super) fn matmul(
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        m: usize,
        k: usize,
        n: usize,
        trans_b: bool,
        accumulate: bool,
    ) -> bool {
        if m == 0 || k == 0 || n == 0 {
            return false;
        }
        let Some(path) = Path::best() else {
            return false;
        };
        // Where this path beats gemm (measured on an AVX-512 Xeon, with KILN_SIMD=avx2 for the
        // 8-lane path; `examples/matmul_shapes.rs`, and the demo model's decoding): a transposed
        // `b` (gemm's slow case) up to 16 rows; a plain one while the product is bound by
        // streaming `b` (few rows), or `b` is too small for gemm's packing to pay (under 1 MiB).
        // On AMD Zen 4 (one 512-bit FMA a cycle, against two on the Xeon, so re-reading `b` from
        // L2 for each group of 4 rows costs less than gemm's packing) a plain `b` up to 16 rows:
        // `kiln bench generate` batch 8 / 16, 3 rounds alternately: 943-972 -> 991-1125 and
        // 1238-1414 -> 1322-1531 tok/s. On AMD Zen 3 (AVX2 only) likewise: batch 16 501-552 ->
        // 661-707 tok/s, batch 4 249-261 -> 264-285 (2 rounds alternately; gemm at 16 rows of a
        // 384 x 1152 weight 64 GFLOP/s hot, this kernel 81).
        if m > max_rows(path, trans_b, small(k, n)) {
            return false;
        }
        matmul_on(path, out, a, b, m, k, n, trans_b, accumulate);
        true
    }

    /// Most rows [`matmul`] takes on `path`, for a transposed `b` or not, and a `b` under 1 MiB
    /// (`small_b`) or not.
    fn max_rows(path: Path, trans_b: bool, small_b: bool) -> usize {
        match path {
            _ if trans_b || small_b || crate::simd::amd() => MAX_ROWS,
            Path::Avx512 => 4,
            Path::Avx2 => 1,
        }
    }

    /// Most rows of a product by a plain-layout `[k, n]` `b` [`matmul`] takes on this CPU (0 where
    /// it has no vector path).
    pub(crate) fn rows_for(k: usize, n: usize) -> usize {
        Path::best().map_or(0, |path| max_rows(path, false, small(k, n)))
    }

    /// A `b` too small (under 1 MiB) for gemm's packing to pay.
    fn small(k: usize, n: usize) -> bool {
        k * n < 1 << 18
    }

    /// [`matmul`] on a given path (which must be available), for tests that compare the paths.
    pub(crate) fn matmul_on(
        path: Path,
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        m: usize,
        k: usize,
        n: usize,
        trans_b: bool,
        accumulate: bool,
    ) {
        assert!(path.available(), "{path:?} is not available on this CPU");
        assert!(out.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
        #[cfg(target_arch = "x86_64")]
        {
            let threads = if m * k * n >= PAR_MACS {
                rayon::current_num_threads().max(1)
            } else {
                1
            };
            // Columns per part, a multiple of 16 (one vector) so parts never share a vector.
            let per = n.div_ceil(threads).div_ceil(16) * 16;
            let parts = n.div_ceil(per);
            let out_p = crate::simd::SyncPtr(out.as_mut_ptr());
            let run = |part: usize| {
                let (j0, j1) = (part * per, ((part + 1) * per).min(n));
                let o = out_p.get();
                // SAFETY: the asserts above cover the buffers; parts write disjoint column ranges;
                // `path` is available (asserted).
                unsafe {
                    match (path, trans_b) {
                        (Path::Avx512, false) => {
                            x86::nn_avx512(o, a, b, m, k, n, j0, j1, accumulate)
                        }
                        (Path::Avx512, true) => {
                            x86::nt_avx512(o, a, b, m, k, n, j0, j1, accumulate)
                        }
                        (Path::Avx2, false) => x86::nn_avx2(o, a, b, m, k, n, j0, j1, accumulate),
                        (Path::Avx2, true) => x86::nt_avx2(o, a, b, m, k, n, j0, j1, accumulate),
                    }
                }
            };
            if parts == 1 {
                run(0);
            } else {
                (0..parts).into_par_iter().for_each(run);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (out, a, b, trans_b, accumulate);
            unreachable!("no vector path off x86-64");
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use crate::simd::lanes::{Lanes, L16, L8};

        /// Lanes of vector `v` of a block of `cols` columns.
        #[inline(always)]
        fn lanes_of<S: Lanes>(cols: usize, v: usize) -> usize {
            cols.saturating_sub(v * S::W).min(S::W)
        }

        /// Columns `j0..j1` of `out = a @ b` for `b` stored `[k, n]`: blocks of `V` vectors of
        /// columns times groups of up to `R` rows (at most 4), the block's rows of `b` loaded once
        /// per row group.
        #[inline(always)]
        unsafe fn nn_cols<S: Lanes, const R: usize, const V: usize>(
            out: *mut f32,
            a: &[f32],
            b: &[f32],
            m: usize,
            k: usize,
            n: usize,
            j0: usize,
            j1: usize,
            acc: bool,
        ) {
            // Rows of `b` in chunks: all column blocks and row groups of a chunk before the next,
            // so `b` streams in whole rows (a block of 64 columns alone is a new page every row,
            // which the prefetchers do not follow) and a group re-reads its block from L1.
            // Each sum still runs over `p` in order (the partial sums pass through `out` exactly).
            for p0 in (0..k).step_by(NN_ROWS) {
                let ps = (p0, (p0 + NN_ROWS).min(k));
                let acc = acc || p0 > 0;
                let mut j = j0;
                while j < j1 {
                    let cols = (j1 - j).min(V * S::W);
                    let mut r = 0;
                    while r < m {
                        // Whole blocks take a copy without lane masks.
                        match ((m - r).min(R), cols == V * S::W) {
                            (1, true) => {
                                nn_block::<S, 1, V, true>(out, a, b, r, k, ps, n, j, cols, acc)
                            }
                            (2, true) => {
                                nn_block::<S, 2, V, true>(out, a, b, r, k, ps, n, j, cols, acc)
                            }
                            (3, true) => {
                                nn_block::<S, 3, V, true>(out, a, b, r, k, ps, n, j, cols, acc)
                            }
                            (_, true) => {
                                nn_block::<S, 4, V, true>(out, a, b, r, k, ps, n, j, cols, acc)
                            }
                            (1, false) => {
                                nn_block::<S, 1, V, false>(out, a, b, r, k, ps, n, j, cols, acc)
                            }
                            (2, false) => {
                                nn_block::<S, 2, V, false>(out, a, b, r, k, ps, n, j, cols, acc)
                            }
                            (3, false) => {
                                nn_block::<S, 3, V, false>(out, a, b, r, k, ps, n, j, cols, acc)
                            }
                            (_, false) => {
                                nn_block::<S, 4, V, false>(out, a, b, r, k, ps, n, j, cols, acc)
                            }
                        }
                        r += R.min(4);
                    }
                    j += cols;
                }
            }
        }

        /// Rows of `b` per chunk of [`nn_cols`].
        const NN_ROWS: usize = 64;

        #[inline(always)]
        unsafe fn nn_block<S: Lanes, const R: usize, const V: usize, const FULL: bool>(
            out: *mut f32,
            a: &[f32],
            b: &[f32],
            r0: usize,
            k: usize,
            (p0, p1): (usize, usize),
            n: usize,
            j: usize,
            cols: usize,
            acc: bool,
        ) {
            let lanes = |v: usize| if FULL { S::W } else { lanes_of::<S>(cols, v) };
            let mut s = [[S::zero(); V]; R];
            if acc {
                for (r, sr) in s.iter_mut().enumerate() {
                    let o = out.wrapping_add((r0 + r) * n + j);
                    for (v, sv) in sr.iter_mut().enumerate() {
                        *sv = S::load(o.wrapping_add(v * S::W), lanes(v));
                    }
                }
            }
            let ap = a.as_ptr().add(r0 * k);
            let bp = b.as_ptr().wrapping_add(j);
            for p in p0..p1 {
                let br = bp.wrapping_add(p * n);
                let mut w = [S::zero(); V];
                for (v, wv) in w.iter_mut().enumerate() {
                    *wv = S::load(br.wrapping_add(v * S::W), lanes(v));
                }
                for (r, sr) in s.iter_mut().enumerate() {
                    let x = S::splat(*ap.add(r * k + p));
                    for v in 0..V {
                        sr[v] = sr[v].fma(x, w[v]);
                    }
                }
            }
            for (r, sr) in s.iter().enumerate() {
                let o = out.wrapping_add((r0 + r) * n + j);
                for (v, sv) in sr.iter().enumerate() {
                    sv.store(o.wrapping_add(v * S::W), lanes(v));
                }
            }
        }

        /// Columns `j0..j1` of `out = a @ b^T` for `b` stored `[n, k]`: dot products of rows, up to
        /// `J` rows of `b` times up to `R` rows of `a` at a time (both at most 4).
        #[inline(always)]
        unsafe fn nt_cols<S: Lanes, const R: usize, const J: usize>(
            out: *mut f32,
            a: &[f32],
            b: &[f32],
            m: usize,
            k: usize,
            n: usize,
            j0: usize,
            j1: usize,
            acc: bool,
        ) {
            let mut j = j0;
            while j < j1 {
                let cnt = (j1 - j).min(J);
                let mut r = 0;
                while r < m {
                    // (rows of a, rows of b) of this block.
                    match ((m - r).min(R), cnt) {
                        (1, 1) => nt_block::<S, 1, 1>(out, a, b, r, k, n, j, acc),
                        (1, 2) => nt_block::<S, 1, 2>(out, a, b, r, k, n, j, acc),
                        (1, 3) => nt_block::<S, 1, 3>(out, a, b, r, k, n, j, acc),
                        (1, _) => nt_block::<S, 1, 4>(out, a, b, r, k, n, j, acc),
                        (2, 1) => nt_block::<S, 2, 1>(out, a, b, r, k, n, j, acc),
                        (2, 2) => nt_block::<S, 2, 2>(out, a, b, r, k, n, j, acc),
                        (2, 3) => nt_block::<S, 2, 3>(out, a, b, r, k, n, j, acc),
                        (2, _) => nt_block::<S, 2, 4>(out, a, b, r, k, n, j, acc),
                        (3, 1) => nt_block::<S, 3, 1>(out, a, b, r, k, n, j, acc),
                        (3, 2) => nt_block::<S, 3, 2>(out, a, b, r, k, n, j, acc),
                        (3, 3) => nt_block::<S, 3, 3>(out, a, b, r, k, n, j, acc),
                        (3, _) => nt_block::<S, 3, 4>(out, a, b, r, k, n, j, acc),
                        (_, 1) => nt_block::<S, 4, 1>(out, a, b, r, k, n, j, acc),
                        (_, 2) => nt_block::<S, 4, 2>(out, a, b, r, k, n, j, acc),
                        (_, 3) => nt_block::<S, 4, 3>(out, a, b, r, k, n, j, acc),
                        (_, _) => nt_block::<S, 4, 4>(out, a, b, r, k, n, j, acc),
                    }
                    r += R.min(4);
                }
                j += cnt;
            }
        }

        #[inline(always)]
        unsafe fn nt_block<S: Lanes, const R: usize, const J: usize>(
            out: *mut f32,
            a: &[f32],
            b: &[f32],
            r0: usize,
            k: usize,
            n: usize,
            j: usize,
            acc: bool,
        ) {
            let mut s = [[S::zero(); J]; R];
            let ap = a.as_ptr().add(r0 * k);
            let bp = b.as_ptr().add(j * k);
            // Whole vectors of k, then one masked tail.
            let mut p = 0;
            while p < k {
                let cnt = (k - p).min(S::W);
                let mut w = [S::zero(); J];
                if cnt == S::W {
                    for (q, wq) in w.iter_mut().enumerate() {
                        *wq = S::load(bp.add(q * k + p), S::W);
                    }
                    for (r, sr) in s.iter_mut().enumerate() {
                        let x = S::load(ap.add(r * k + p), S::W);
                        for q in 0..J {
                            sr[q] = sr[q].fma(x, w[q]);
                        }
                    }
                } else {
                    for (q, wq) in w.iter_mut().enumerate() {
                        *wq = S::load(bp.wrapping_add(q * k + p), cnt);
                    }
                    for (r, sr) in s.iter_mut().enumerate() {
                        let x = S::load(ap.wrapping_add(r * k + p), cnt);
                        for q in 0..J {
                            sr[q] = sr[q].fma(x, w[q]);
                        }
                    }
                }
                p += S::W;
            }
            for (r, sr) in s.iter().enumerate() {
                for (q, &sq) in sr.iter().enumerate() {
                    let o = out.add((r0 + r) * n + j + q);
                    let d = sq.sum();
                    *o = if acc { *o + d } else { d };
                }
            }
        }

        // The entry points: the generic bodies compiled with each instruction set. AVX-512 has 32
        // registers (4 rows x 4 vectors of accumulators); AVX2 16 (1 x 8 or 4 x 2).

        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn nn_avx512(
            out: *mut f32,
            a: &[f32],
            b: &[f32],
            m: usize,
            k: usize,
            n: usize,
            j0: usize,
            j1: usize,
            acc: bool,
        ) {
            nn_cols::<L16, 4, 4>(out, a, b, m, k, n, j0, j1, acc)
        }

        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn nt_avx512(
            out: *mut f32,
            a: &[f32],
            b: &[f32],
            m: usize,
            k: usize,
            n: usize,
            j0: usize,
            j1: usize,
            acc: bool,
        ) {
            nt_cols::<L16, 4, 4>(out, a, b, m, k, n, j0, j1, acc)
        }

        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn nn_avx2(
            out: *mut f32,
            a: &[f32],
            b: &[f32],
            m: usize,
            k: usize,
            n: usize,
            j0: usize,
            j1: usize,
            acc: bool,
        ) {
            // One row: a whole 64-column block (8 accumulators) per pass over `b`'s rows, as
            // AVX-512 streams it; more rows: four at a time over 16 columns (one cache line).
            if m == 1 {
                nn_cols::<L8, 1, 8>(out, a, b, m, k, n, j0, j1, acc)
            } else {
                nn_cols::<L8, 4, 2>(out, a, b, m, k, n, j0, j1, acc)
            }
        }

        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn nt_avx2(
            out: *mut f32,
            a: &[f32],
            b: &[f32],
            m: usize,
            k: usize,
            n: usize,
            j0: usize,
            j1: usize,
            acc: bool,
        ) {
            if m == 1 {
                nt_cols::<L8, 1, 4>(out, a, b, m, k, n, j0, j1, acc)
            } else {
                nt_cols::<L8, 4, 2>(out, a, b, m, k, n, j0, j1, acc)
            }
        }
    }
}

/// `out[m,n] (+)= op(a)[m,k] @ op(b)[k,n]`.
///
/// `a` is stored `[m,k]` (or `[k,m]` when `trans_a`), `b` is stored `[k,n]` (or `[n,k]` when
/// `trans_b`), all row-major. With `accumulate` the product is added into `out` instead of
/// overwriting it. Only the first `m*n` (resp. `m*k`, `k*n`) elements of the buffers are used.
pub fn matmul(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) {
    assert!(out.len() >= m * n, "matmul: out too small");
    assert!(a.len() >= m * k, "matmul: a too small");
    assert!(b.len() >= k * n, "matmul: b too small");
    let _span = crate::profile::matmul_span(m, k, n);
    // A transpose is the same memory read with row and column strides swapped.
    if !trans_a && skinny::matmul(out, a, b, m, k, n, trans_b, accumulate) {
        return;
    }
    let (a_rs, a_cs) = if trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k) } else { (n, 1) };
    // SAFETY: the length asserts above cover every element the strides reach; `out` is a unique
    // borrow so it cannot alias `a` or `b`.
    unsafe {
        gemm_threaded(
            out.as_mut_ptr(),
            n,
            (a.as_ptr(), a_rs, a_cs),
            (b.as_ptr(), b_rs, b_cs),
            (m, k, n),
            accumulate,
        );
    }
}

/// A row-major matrix inside a slice: element `(r, c)` is `data[r * rs + c * cs]` (a transpose is
/// the same memory with the strides swapped; a block of columns is the slice from its first
/// column with the whole row's stride).
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Strided<'a> {
    /// `rows x cols` stored contiguously, row after row.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of this view.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Asserts that a `rows x cols` matrix at these strides lies inside the slice.
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "matmul_strided: {what} too small");
        }
    }
}

/// `out[m,n] (+)= a[m,k] @ b[k,n]` on strided views: the output's rows are `out_rs` apart (it may
/// be a block of columns of a wider matrix, `out` starting at its first element), and the operands
/// are any [`Strided`] views (blocks of columns, transposes), read in place with no copy. Each
/// output element is the same sum in the same order as [`matmul`]'s `gemm` path gives it.
pub fn matmul_strided(
    out: &mut [f32],
    out_rs: usize,
    a: Strided,
    b: Strided,
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
) {
    if m > 0 && n > 0 {
        assert!(out_rs >= n, "matmul_strided: output rows overlap");
        assert!(
            (m - 1) * out_rs + n <= out.len(),
            "matmul_strided: out too small"
        );
    }
    a.check(m, k, "a");
    b.check(k, n, "b");
    let _span = crate::profile::matmul_span(m, k, n);
    // SAFETY: the asserts above cover every element the strides reach; `out` is a unique borrow
    // so it cannot alias `a` or `b`, and its rows (at least `n` apart) do not overlap.
    unsafe {
        gemm_threaded(
            out.as_mut_ptr(),
            out_rs,
            (a.data.as_ptr(), a.rs, a.cs),
            (b.data.as_ptr(), b.rs, b.cs),
            (m, k, n),
            accumulate,
        );
    }
}

/// [`matmul`] in the given arithmetic: `F32` is exactly [`matmul`]; `Bf16` rounds both operands to
/// bf16 and accumulates in f32 (see [`crate::bf16`]).
pub fn matmul_with(
    prec: Precision,
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) {
    match prec {
        Precision::F32 => matmul(out, a, b, m, k, n, trans_a, trans_b, accumulate),
        Precision::Bf16 => {
            let _span = crate::profile::matmul_span(m, k, n);
            matmul_bf16(out, a, b, m, k, n, trans_a, trans_b, accumulate)
        }
    }
}

/// `out[n,o] = inp[n,i] @ w[i,o] + bias[o]`.
///
/// Weights are in `[in, out]` layout, as HF GPT-2's `Conv1D` stores them, so the checkpoint
/// loads without a transpose.
pub fn linear_forward(
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    i: usize,
    o: usize,
) {
    linear_forward_with(Precision::F32, out, inp, w, bias, n, i, o);
}

/// [`linear_forward`] with its matmul in the given arithmetic (the bias add is f32 either way).
pub fn linear_forward_with(
    prec: Precision,
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    i: usize,
    o: usize,
) {
    linear_forward_residual_with(prec, out, None, inp, w, bias, n, i, o);
}

/// `out[n,o] = residual[n,o] + inp[n,i] @ w[i,o] + bias[o]` (either addend optional): with a
/// residual, a linear layer whose output joins the residual stream (attention's output projection,
/// the MLP's down projection). The residual and/or bias are written first and `gemm` accumulates
/// the product onto them, so there is no second pass over `out` and no separate residual add.
pub fn linear_forward_residual_with(
    prec: Precision,
    out: &mut [f32],
    residual: Option<&[f32]>,
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    i: usize,
    o: usize,
) {
    assert!(out.len() >= n * o, "linear_forward: out too small");
    let out = &mut out[..n * o];
    let residual = residual.map(|r| {
        assert!(r.len() >= n * o, "linear_forward: residual too small");
        &r[..n * o]
    });
    let bias = bias.map(|b| &b[..o]);
    let prefill = residual.is_some() || bias.is_some();
    if prefill && o > 0 {
        let _span = crate::profile::span(crate::profile::Kind::Elementwise);
        // Whole rows per task, ~16K elements each (a task per row cost more than the copy).
        let rows = (ELEMWISE_CHUNK / o).max(1);
        out.par_chunks_mut(o * rows)
            .enumerate()
            .for_each(|(bi, block)| {
                for (r, row) in block.chunks_exact_mut(o).enumerate() {
                    let at = (bi * rows + r) * o;
                    match (residual.map(|x| &x[at..at + o]), bias) {
                        (Some(res), Some(b)) => add_rows(row, res, b),
                        (Some(res), None) => row.copy_from_slice(res),
                        (None, Some(b)) => row.copy_from_slice(b),
                        (None, None) => unreachable!(),
                    }
                }
            });
    }
    matmul_with(prec, out, inp, w, n, i, o, false, false, prefill);
}

/// Backward of [`linear_forward`], accumulating:
/// `dinp += dout @ w^T` (skipped when `None`), `dw += inp^T @ dout`, `dbias += column sums of dout`.
pub fn linear_backward(
    dinp: Option<&mut [f32]>,
    dw: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    n: usize,
    i: usize,
    o: usize,
) {
    linear_backward_with(Precision::F32, dinp, dw, dbias, dout, inp, w, n, i, o);
}

/// [`linear_backward`] with its two matmuls in the given arithmetic (the bias gradient is f32).
pub fn linear_backward_with(
    prec: Precision,
    dinp: Option<&mut [f32]>,
    dw: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    n: usize,
    i: usize,
    o: usize,
) {
    if let Some(dinp) = dinp {
        // w is stored [i,o] = "[n,k]" of the product dout[n,o] @ w^T[o,i].
        matmul_with(prec, dinp, dout, w, n, o, i, false, true, true);
    }
    // inp is stored [n,i] = "[k,m]" of the product inp^T[i,n] @ dout[n,o].
    matmul_with(prec, dw, inp, dout, i, n, o, true, false, true);
    if let Some(dbias) = dbias {
        col_sum_accumulate(&mut dbias[..o], &dout[..n * o], o);
    }
}

/// `dst[j] += sum_r src[r, j]` for a row-major `src` with `c` columns.
///
/// Rows are summed in blocks whose size depends only on the row count, then the block partials are
/// added in block order: deterministic, and more accurate than one long running sum. Tasks own
/// disjoint column ranges (so nothing is allocated and no partials are exchanged).
pub(crate) fn col_sum_accumulate(dst: &mut [f32], src: &[f32], c: usize) {
    if c == 0 || src.is_empty() {
        return;
    }
    let _span = crate::profile::span(crate::profile::Kind::Elementwise);
    let rows = src.len() / c;
    let rb = simd::rows_per_block(rows, ROW_BLOCK);
    let src = &src[..rows * c];
    dst[..c]
        .par_chunks_mut(COL_BLOCK)
        .enumerate()
        .for_each(|(ci, d)| {
            let j0 = ci * COL_BLOCK;
            let w = d.len();
            let mut part = [0.0f32; COL_BLOCK];
            for block in src.chunks(rb * c) {
                let part = &mut part[..w];
                part.fill(0.0);
                for row in block.chunks_exact(c) {
                    add_row(part, &row[j0..j0 + w]);
                }
                add_row(d, part);
            }
        });
}

/// Applies `f(row_index, row)` to every row of the row-major `src` (`c` columns) in place, and adds
/// the column sums of the result into `dst`, in one pass over `src`: bit for bit `f` over all rows
/// followed by [`col_sum_accumulate`] (the same row blocks, summed in the same order), for a bias
/// gradient taken from a gradient that is computed right there (e.g. through GELU).
pub(crate) fn map_rows_col_sum(
    dst: &mut [f32],
    src: &mut [f32],
    c: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) {
    if c == 0 || src.is_empty() {
        return;
    }
    let rows = src.len() / c;
    let rb = simd::rows_per_block(rows, ROW_BLOCK);
    let mut parts = vec![0.0f32; rows.div_ceil(rb) * c];
    src[..rows * c]
        .par_chunks_mut(rb * c)
        .zip(parts.par_chunks_mut(c))
        .enumerate()
        .for_each(|(bi, (block, part))| {
            for (r, row) in block.chunks_exact_mut(c).enumerate() {
                f(bi * rb + r, row);
                add_row(part, row);
            }
        });
    // (No span of its own: it runs inside its caller's kernel.)
    dst[..c]
        .par_chunks_mut(COL_BLOCK)
        .enumerate()
        .for_each(|(ci, d)| {
            let j0 = ci * COL_BLOCK;
            for part in parts.chunks_exact(c) {
                add_row(d, &part[j0..j0 + d.len()]);
            }
        });
}

/// Columns per task in [`col_sum_accumulate`].
const COL_BLOCK: usize = 64;

simd::multiversion! {
    /// `out = x + y` for one row.
    fn add_rows(out: &mut [f32], x: &[f32], y: &[f32]) {
        for ((o, a), b) in out.iter_mut().zip(x).zip(y) {
            *o = a + b;
        }
    }
}

simd::multiversion! {
    /// `out += x` for one row.
    fn add_row(out: &mut [f32], x: &[f32]) {
        simd::add_to(out, x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    /// Naive triple loop in f64 on the logical (already transposed) operands.
    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f64> {
        let mut out = vec![0.0f64; m * n];
        for r in 0..m {
            for col in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if ta { a[p * m + r] } else { a[r * k + p] };
                    let bv = if tb { b[col * k + p] } else { b[p * n + col] };
                    s += av as f64 * bv as f64;
                }
                out[r * n + col] = s;
            }
        }
        out
    }

    /// Blocks of columns and transposes read in place: the product of views inside wider
    /// matrices, written into a block of columns of a wider output, equals the product of the
    /// copied-out operands (and leaves the output's other columns alone), sizes that take the
    /// threaded split along rows and along columns, accumulating or not.
    #[test]
    fn strided_views_multiply_in_place() {
        let mut rng = rng(21);
        for &(m, k, n) in &[(1, 3, 2), (9, 16, 33), (300, 16, 70), (40, 200, 300)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                // Each operand lives at column offset 3 of a matrix 5 columns wider than it.
                let (ar, ac) = if ta { (k, m) } else { (m, k) };
                let (br, bc) = if tb { (n, k) } else { (k, n) };
                let wide_a = randn(&mut rng, ar * (ac + 5), 1.0);
                let wide_b = randn(&mut rng, br * (bc + 5), 1.0);
                let block = |w: &[f32], r: usize, c: usize| -> Vec<f32> {
                    (0..r)
                        .flat_map(|i| w[i * (c + 5) + 3..][..c].to_vec())
                        .collect()
                };
                let (a, b) = (block(&wide_a, ar, ac), block(&wide_b, br, bc));
                let init = randn(&mut rng, m * (n + 7), 1.0);
                for acc in [false, true] {
                    let mut want = vec![0.0f32; m * n];
                    if acc {
                        want = block_of(&init, m, n, 7);
                    }
                    matmul(&mut want, &a, &b, m, k, n, ta, tb, acc);
                    let mut got = init.clone();
                    let (va, vb) = (view(&wide_a, ac, ta), view(&wide_b, bc, tb));
                    matmul_strided(&mut got[2..], n + 7, va, vb, (m, k, n), acc);
                    for i in 0..m {
                        for j in 0..n + 7 {
                            let g = got[i * (n + 7) + j];
                            let w = match j.checked_sub(2).filter(|&c| c < n) {
                                Some(c) => want[i * n + c],
                                None => init[i * (n + 7) + j],
                            };
                            let tol = 1e-5 * (1.0 + w.abs()) * (k as f32).sqrt();
                            assert!(
                                (g - w).abs() <= tol,
                                "{m}x{k}x{n} ta={ta} tb={tb} acc={acc}: ({i},{j}) {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The `? x c` block at column 3 of a matrix 5 columns wider, or its transpose.
    fn view(w: &[f32], c: usize, t: bool) -> Strided<'_> {
        let v = Strided {
            data: &w[3..],
            rs: c + 5,
            cs: 1,
        };
        if t {
            v.t()
        } else {
            v
        }
    }

    /// Columns `2..2 + n` of a `rows x (n + extra)` matrix.
    fn block_of(x: &[f32], rows: usize, n: usize, extra: usize) -> Vec<f32> {
        (0..rows)
            .flat_map(|i| x[i * (n + extra) + 2..][..n].to_vec())
            .collect()
    }

    /// `gemm` capped to each level below AVX-512 this CPU has (what `KILN_SIMD=avx2` / `base` run)
    /// computes the product, for every transpose, accumulating or not, sizes around its register
    /// blocks and both threadings; and on the AVX2 level it is exactly what `gemm` gives on an
    /// AVX2-only CPU, i.e. its own choice where the CPU has no AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn capped_gemm_matches_reference_on_every_lower_level() {
        let mut rng = rng(9);
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        let levels = [(simd::Level::V3, avx2), (simd::Level::Base, true)];
        for (level, present) in levels {
            if !present {
                continue;
            }
            for &(m, k, n) in &[(1, 1, 1), (7, 33, 5), (64, 48, 70), (130, 257, 95)] {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let a = randn(&mut rng, m * k, 1.0);
                    let b = randn(&mut rng, k * n, 1.0);
                    let init = randn(&mut rng, m * n, 1.0);
                    let want = naive(&a, &b, m, k, n, ta, tb);
                    let (a_rs, a_cs) = if ta { (1, m) } else { (k, 1) };
                    let (b_rs, b_cs) = if tb { (1, k) } else { (n, 1) };
                    for acc in [false, true] {
                        for par in [Parallelism::None, Parallelism::Rayon(2)] {
                            let mut out = init.clone();
                            // SAFETY: the strides describe the m x k, k x n and m x n buffers.
                            unsafe {
                                capped::gemm(
                                    level,
                                    (m, n, k),
                                    (out.as_mut_ptr(), 1, n as isize),
                                    acc,
                                    (a.as_ptr(), a_cs as isize, a_rs as isize),
                                    (b.as_ptr(), b_cs as isize, b_rs as isize),
                                    par,
                                )
                            };
                            for (i, (&got, &w)) in out.iter().zip(&want).enumerate() {
                                let w = if acc { w + init[i] as f64 } else { w };
                                let tol = 1e-5 * (1.0 + w.abs()) * (k as f64).sqrt();
                                assert!(
                                    (got as f64 - w).abs() <= tol,
                                    "{level:?} {m}x{k}x{n} ta={ta} tb={tb} acc={acc}: [{i}] {got} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
        if !std::is_x86_feature_detected!("avx512f") && avx2 {
            // No AVX-512: what gemm picks itself must be the capped AVX2 path, bit for bit.
            let (m, k, n) = (70, 90, 60);
            let a = randn(&mut rng, m * k, 1.0);
            let b = randn(&mut rng, k * n, 1.0);
            let (mut own, mut capped) = (vec![0.0; m * n], vec![0.0; m * n]);
            // SAFETY: as above.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    own.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
                capped::gemm(
                    simd::Level::V3,
                    (m, n, k),
                    (capped.as_mut_ptr(), 1, n as isize),
                    false,
                    (a.as_ptr(), 1, k as isize),
                    (b.as_ptr(), 1, n as isize),
                    Parallelism::None,
                );
            }
            assert!(own
                .iter()
                .zip(&capped)
                .all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }

    /// The product cut into one part per thread (along rows or columns) gives the single-threaded
    /// bits, for every transpose, with and without accumulating, and at any thread count.
    #[test]
    fn threaded_parts_give_the_single_threaded_bits() {
        let mut rng = rng(8);
        // Longer side rows, longer side columns, and both sides too short for parts (gemm threads).
        for &(m, k, n) in &[(300, 70, 130), (70, 90, 300), (100, 120, 100)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = randn(&mut rng, m * k, 1.0);
                let b = randn(&mut rng, k * n, 1.0);
                let init = randn(&mut rng, m * n, 1.0);
                let run = |acc: bool| {
                    let mut out = init.clone();
                    matmul(&mut out, &a, &b, m, k, n, ta, tb, acc);
                    out
                };
                for acc in [false, true] {
                    let one = crate::thread_pool_builder(Some(1)).build().unwrap();
                    let reference = one.install(|| run(acc));
                    assert_thread_independent(&reference, || run(acc));
                }
            }
        }
    }

    #[test]
    fn matmul_all_transposes_and_accumulate() {
        let mut rng = rng(1);
        // Include a size above the parallel threshold and odd sizes that exercise gemm's edges.
        for &(m, k, n) in &[(3, 5, 7), (17, 33, 9), (1, 64, 1), (70, 65, 66), (5, 0, 4)] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let a = randn(&mut rng, m * k, 1.0);
                    let b = randn(&mut rng, k * n, 1.0);
                    let want = naive(&a, &b, m, k, n, ta, tb);
                    let mut out = vec![f32::NAN; m * n];
                    matmul(&mut out, &a, &b, m, k, n, ta, tb, false);
                    assert_close(&out, &want, 1e-5, "matmul");
                    let init = randn(&mut rng, m * n, 1.0);
                    let mut acc = init.clone();
                    matmul(&mut acc, &a, &b, m, k, n, ta, tb, true);
                    let want_acc: Vec<f64> =
                        want.iter().zip(&init).map(|(w, i)| w + *i as f64).collect();
                    assert_close(&acc, &want_acc, 1e-5, "matmul accumulate");
                }
            }
        }
    }

    #[test]
    fn skinny_shapes_match_naive_and_thread_counts_on_every_path() {
        use super::skinny::{matmul_on, Path};
        let mut rng = rng(6);
        let paths: Vec<Path> = Path::ALL.into_iter().filter(|p| p.available()).collect();
        eprintln!("skinny matmul paths on this CPU: {paths:?}");
        for &(m, k, n) in &[
            (1, 384, 1152),
            (1, 37, 70),
            (2, 64, 33),
            (5, 19, 130),
            (16, 96, 1000),
            (9, 200, 17),
            (3, 7, 5),
        ] {
            for (tb, acc) in [(false, false), (false, true), (true, false), (true, true)] {
                let a = randn(&mut rng, m * k, 1.0);
                let b = randn(&mut rng, k * n, 1.0);
                let init = randn(&mut rng, m * n, 1.0);
                let want: Vec<f64> = naive(&a, &b, m, k, n, false, tb)
                    .iter()
                    .zip(&init)
                    .map(|(w, i)| if acc { w + *i as f64 } else { *w })
                    .collect();
                // What `matmul` picks, then every vector path forced.
                let run = || {
                    let mut out = init.clone();
                    matmul(&mut out, &a, &b, m, k, n, false, tb, acc);
                    out
                };
                let got = run();
                assert_close(&got, &want, 1e-5, "skinny matmul");
                assert_thread_independent(&got, run);
                for &path in &paths {
                    let run = || {
                        let mut out = init.clone();
                        matmul_on(path, &mut out, &a, &b, m, k, n, tb, acc);
                        out
                    };
                    let got = run();
                    assert_close(
                        &got,
                        &want,
                        1e-5,
                        &format!("skinny {path:?} {m}x{k}x{n} tb={tb} acc={acc}"),
                    );
                    assert_thread_independent(&got, run);
                }
            }
        }
    }

    #[test]
    fn linear_forward_matches_naive() {
        let mut rng = rng(2);
        let (n, i, o) = (13, 24, 19);
        let inp = randn(&mut rng, n * i, 1.0);
        let w = randn(&mut rng, i * o, 0.5);
        let bias = randn(&mut rng, o, 1.0);
        let mut out = vec![f32::NAN; n * o];
        linear_forward(&mut out, &inp, &w, Some(&bias), n, i, o);
        let mut want = naive(&inp, &w, n, i, o, false, false);
        for (idx, v) in want.iter_mut().enumerate() {
            *v += bias[idx % o] as f64;
        }
        assert_close(&out, &want, 1e-5, "linear with bias");
        linear_forward(&mut out, &inp, &w, None, n, i, o);
        assert_close(
            &out,
            &naive(&inp, &w, n, i, o, false, false),
            1e-5,
            "linear no bias",
        );
    }

    #[test]
    fn linear_backward_finite_differences() {
        let mut rng = rng(3);
        let (n, i, o) = (6, 5, 7);
        let inp = randn(&mut rng, n * i, 1.0);
        let w = randn(&mut rng, i * o, 0.5);
        let bias = randn(&mut rng, o, 0.5);
        let lw = randn(&mut rng, n * o, 1.0); // L = sum(out * lw) => dout = lw
        let loss = |inp: &[f32], w: &[f32], bias: &[f32]| {
            let mut out = vec![0.0; n * o];
            linear_forward(&mut out, inp, w, Some(bias), n, i, o);
            weighted_sum(&out, &lw)
        };
        // Start from non-zero gradients to check that backward accumulates.
        let g0 = 0.25f32;
        let mut dinp = vec![g0; n * i];
        let mut dw = vec![g0; i * o];
        let mut db = vec![g0; o];
        linear_backward(
            Some(&mut dinp),
            &mut dw,
            Some(&mut db),
            &lw,
            &inp,
            &w,
            n,
            i,
            o,
        );
        let sub = |g: &[f32]| g.iter().map(|v| v - g0).collect::<Vec<_>>();
        let num = numgrad(&inp, 1e-2, |x| loss(x, &w, &bias));
        assert_grad(&sub(&dinp), &num, "linear dinp");
        let num = numgrad(&w, 1e-2, |x| loss(&inp, x, &bias));
        assert_grad(&sub(&dw), &num, "linear dw");
        let num = numgrad(&bias, 1e-2, |x| loss(&inp, &w, x));
        assert_grad(&sub(&db), &num, "linear dbias");

        // dinp = None must still produce dw and dbias.
        let mut dw2 = vec![g0; i * o];
        let mut db2 = vec![g0; o];
        linear_backward(None, &mut dw2, Some(&mut db2), &lw, &inp, &w, n, i, o);
        assert_eq!(dw, dw2);
        assert_eq!(db, db2);
    }

    #[test]
    fn col_sum_many_blocks() {
        let mut rng = rng(4);
        for (rows, c) in [(3 * ROW_BLOCK + 5, 11), (100 * ROW_BLOCK + 1, 3)] {
            let src = randn(&mut rng, rows * c, 1.0);
            let mut dst = vec![1.0f32; c];
            col_sum_accumulate(&mut dst, &src, c);
            let want: Vec<f64> = (0..c)
                .map(|j| 1.0 + (0..rows).map(|r| src[r * c + j] as f64).sum::<f64>())
                .collect();
            assert_close(&dst, &want, 1e-5, "col sums");
        }
    }

    #[test]
    fn map_rows_col_sum_is_map_then_col_sum_bitwise() {
        let mut rng = rng(6);
        for (rows, c) in [(3 * ROW_BLOCK + 5, 70), (1, 9), (100 * ROW_BLOCK + 1, 3)] {
            let src = randn(&mut rng, rows * c, 1.0);
            let f = |r: usize, row: &mut [f32]| {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = *v * 1.5 + (r + j) as f32 * 1e-3;
                }
            };
            let mut two_pass = src.clone();
            for (r, row) in two_pass.chunks_exact_mut(c).enumerate() {
                f(r, row);
            }
            let mut want = vec![0.25f32; c];
            col_sum_accumulate(&mut want, &two_pass, c);
            let mut fused = src.clone();
            let mut got = vec![0.25f32; c];
            map_rows_col_sum(&mut got, &mut fused, c, f);
            assert_bits_eq(&fused, &two_pass);
            assert_bits_eq(&got, &want);
        }
    }

    #[test]
    fn residual_linear_adds_the_residual() {
        let mut rng = rng(7);
        let (n, i, o) = (37, 50, 70);
        let inp = randn(&mut rng, n * i, 1.0);
        let w = randn(&mut rng, i * o, 1.0);
        let bias = randn(&mut rng, o, 1.0);
        let res = randn(&mut rng, n * o, 3.0);
        for prec in [Precision::F32, Precision::Bf16] {
            for b in [Some(&bias[..]), None] {
                let mut lin = vec![0.0; n * o];
                linear_forward_with(prec, &mut lin, &inp, &w, b, n, i, o);
                let want: Vec<f64> = lin.iter().zip(&res).map(|(l, r)| (l + r) as f64).collect();
                let mut out = vec![f32::NAN; n * o];
                linear_forward_residual_with(prec, &mut out, Some(&res), &inp, &w, b, n, i, o);
                assert_close(&out, &want, 1e-5, "residual linear");
            }
        }
    }

    #[test]
    fn deterministic() {
        let mut rng = rng(5);
        let (n, i, o) = (200, 96, 130);
        let inp = randn(&mut rng, n * i, 1.0);
        let w = randn(&mut rng, i * o, 1.0);
        let dout = randn(&mut rng, n * o, 1.0);
        let run = || {
            let mut out = vec![0.0; n * o];
            linear_forward(&mut out, &inp, &w, Some(&w[..o]), n, i, o);
            let mut dinp = vec![0.0; n * i];
            let mut dw = vec![0.0; i * o];
            let mut db = vec![0.0; o];
            linear_backward(
                Some(&mut dinp),
                &mut dw,
                Some(&mut db),
                &dout,
                &inp,
                &w,
                n,
                i,
                o,
            );
            (out, dinp, dw, db)
        };
        assert_bits_eq(&run(), &run());
    }
}
