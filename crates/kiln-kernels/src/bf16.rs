//! bf16 matrix multiplication with f32 accumulation: the optional fast path behind [`Precision::Bf16`].
//!
//! Semantics (the same on every CPU): both operands are rounded from f32 to bf16 (round to nearest,
//! ties to even), every product of two bf16 values is exact in f32, and the products are summed in
//! f32. Outputs, and anything accumulated into, stay f32. Only the matmuls change (and, on CPUs with
//! AVX512-BF16, attention's products: `crate::attention::attention_forward_with`): master weights,
//! gradients, the optimizer and every other kernel remain f32.
//!
//! Two kinds of bf16 hardware run the product on packed bf16 operands (see [`tiled`]):
//! - AMX (Intel Sapphire Rapids and later): `TDPBF16PS` does a 16x16 (f32) += 16x32 (bf16) ·
//!   32x16 (bf16) block per instruction, an order of magnitude more multiply-adds per cycle than
//!   AVX-512 FMA. `KILN_AMX=0` turns it off.
//! - AVX512-BF16 without AMX (AMD Zen 4 and later; Intel Cooper Lake): `VDPBF16PS` does 32
//!   multiply-adds per 512-bit instruction where an f32 FMA does 16, measured 234 against 116
//!   GFLOP/s a core on a Zen 4 EPYC. Off under `KILN_SIMD=avx2` / `base` (like every AVX-512 path).
//!
//! Elsewhere the operands are rounded to bf16 values held in f32 and the f32 matmul runs on them:
//! the same arithmetic, at f32 speed, so a run behaves the same (up to f32 summation order).
//!
//! One hardware quirk: both instructions treat bf16 subnormals (magnitude below ~1.2e-38) as zero,
//! which the portable path does not. Such values never matter next to the normal ones in a sum.
#![allow(clippy::too_many_arguments)]

use std::fmt;
use std::str::FromStr;

/// Arithmetic of the matmuls ([`crate::matmul_with`], [`crate::linear_forward_with`],
/// [`crate::linear_backward_with`]); everything else is always f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Plain f32 (the default; results are those of the f32 kernels).
    #[default]
    F32,
    /// bf16 operands, f32 accumulation and outputs (see the module documentation).
    Bf16,
}

impl Precision {
    /// The arithmetic a user's request runs in on this CPU, and why when it differs: bf16 pays
    /// off only on bf16 hardware ([`hardware`]); elsewhere the portable bf16 path costs more than
    /// f32 (measured 0.92× on an AVX2-only Zen 3), so f32 is used instead. `KILN_FORCE_BF16=1`
    /// keeps bf16 anyway (results are then bf16's on any CPU).
    pub fn for_this_cpu(self) -> (Precision, Option<&'static str>) {
        match self {
            Precision::Bf16
                if hardware().is_none()
                    && !std::env::var("KILN_FORCE_BF16").is_ok_and(|v| v == "1") =>
            {
                (
                    Precision::F32,
                    Some("bf16 requested, but this CPU has no bf16 matmul hardware (AMX tiles or AVX512-BF16; or they are turned off: KILN_AMX=0, KILN_SIMD), where Kiln's bf16 matmuls are slower than f32: training in f32 (KILN_FORCE_BF16=1 keeps bf16)"),
                )
            }
            p => (p, None),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision {s:?} (expected f32 or bf16)")),
        }
    }
}

/// f32 → bf16 bits, rounding to nearest, ties to even; NaN stays a (quiet) NaN of the same sign.
/// Branch-free so loops over it vectorise.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) | 0x40) as u16;
    if (b & 0x7fff_ffff) > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

/// bf16 bits → f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to the nearest bf16 value, as an f32.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

/// The bf16 hardware this process's bf16 matmuls run on (`"AMX"`, `"AVX512-BF16"`), or `None`
/// when they take the portable path.
pub fn hardware() -> Option<&'static str> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        tiled::engine().map(tiled::Engine::name)
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        None
    }
}

/// `out[m,n] (+)= op(a)[m,k] @ op(b)[k,n]` with bf16 operands and f32 accumulation; the layout
/// conventions are those of [`crate::matmul`]. Deterministic, and independent of the thread count.
pub fn matmul_bf16(
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
    assert!(out.len() >= m * n, "matmul_bf16: out too small");
    assert!(a.len() >= m * k, "matmul_bf16: a too small");
    assert!(b.len() >= k * n, "matmul_bf16: b too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out[..m * n].fill(0.0);
        }
        return;
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if let Some(engine) = tiled::engine() {
        tiled::matmul(
            engine,
            &mut out[..m * n],
            &a[..m * k],
            &b[..k * n],
            m,
            k,
            n,
            trans_a,
            trans_b,
            accumulate,
        );
        return;
    }
    portable(out, a, b, m, k, n, trans_a, trans_b, accumulate);
}

/// The same product through the f32 matmul on operands rounded to bf16 values: bf16 × bf16 products
/// are exact in f32, so this is bf16 arithmetic with f32 accumulation on any CPU.
pub(crate) fn portable(
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
    use rayon::prelude::*;
    let round = |x: &[f32]| -> Vec<f32> { x.par_iter().map(|&v| round_bf16(v)).collect() };
    let (ra, rb) = (round(&a[..m * k]), round(&b[..k * n]));
    crate::matmul(out, &ra, &rb, m, k, n, trans_a, trans_b, accumulate);
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(crate) mod tiled {
    //! The hardware paths. Both operands are packed into 1 KiB tiles (A: 16 rows x 32 bf16; B: 16
    //! rows of 16 column-pairs, the "VNNI" layout `TDPBF16PS` and `VDPBF16PS` want, where row `r`
    //! holds k = 2r and 2r+1 interleaved), consecutive along k so the inner loop streams contiguous
    //! memory. Edges are zero-padded (zeros add nothing), and the tile counts along m and n are
    //! rounded up to even so one 2x2-tile microkernel does every block; C tiles that cross the
    //! matrix edge go through a 16x16 scratch.
    //!
    //! The layout serves both engines: on AMX the microkernel holds its 4 C tiles, 2 A and 2 B
    //! tiles in the 8 tile registers; with AVX512-BF16 one row of a B tile is one 512-bit register
    //! (16 columns x a k pair) and one A row's k pair is a 32-bit broadcast, so C is computed 8
    //! rows x 32 columns at a time in 16 vector accumulators.
    //!
    //! Each output tile sums its k blocks in order, whichever task computes it, so results do not
    //! depend on how the output is split between threads.

    use super::f32_to_bf16;
    use crate::simd::{self, SyncPtr};
    use rayon::prelude::*;
    use std::arch::asm;
    use std::cell::RefCell;
    use std::sync::OnceLock;

    /// Rows of an A (and C) tile.
    const TM: usize = 16;
    /// Columns of a B (and C) tile.
    const TN: usize = 16;
    /// bf16 elements along k in one tile (64 bytes per tile row).
    const TK: usize = 32;
    /// bf16 elements in one packed tile (1 KiB).
    const TILE: usize = TM * TK;
    /// k tiles per pass over a block of C. Every pass loads and stores the C tiles, and the tile
    /// unit waits for those (tile registers are not renamed), so passes should be long; but the
    /// B tiles of a column pair for one pass (2 x KC KiB) should stay near L1 while the task's row
    /// pairs go by, and its A rows (MB x KC KiB) in L2. (The vector kernel, which prefetches the
    /// next k tile, ran the same with KC = 8 on a Zen 4.)
    const KC: usize = 16;
    /// Largest task, in tiles of C (rows x columns). B is re-read from memory once per MB rows of
    /// tiles.
    const MB: usize = 16;
    const NB: usize = 16;
    /// Most tile rows (columns) per packing task: more means fewer passes over the pages of a
    /// source with long rows (each pass touches one page per source row: TLB misses).
    const PACK_GROUP: usize = 32;
    /// Below this many multiply-adds one thread does the whole product.
    const PAR_MACS: usize = 1 << 20;

    /// The instructions a product runs on.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub(crate) enum Engine {
        /// AMX tiles (`TDPBF16PS`).
        Amx,
        /// AVX-512 vectors (`VDPBF16PS`).
        Dot,
    }

    impl Engine {
        pub(crate) fn name(self) -> &'static str {
            match self {
                Engine::Amx => "AMX",
                Engine::Dot => "AVX512-BF16",
            }
        }
    }

    /// The fastest engine this process may use: AMX, else AVX512-BF16 (when the SIMD level is
    /// AVX-512, so `KILN_SIMD=avx2` turns it off with the other AVX-512 paths), else none.
    pub(crate) fn engine() -> Option<Engine> {
        static ENGINE: OnceLock<Option<Engine>> = OnceLock::new();
        *ENGINE.get_or_init(|| {
            if amx_available() {
                Some(Engine::Amx)
            } else if dot_available() {
                Some(Engine::Dot)
            } else {
                None
            }
        })
    }

    /// AVX512-BF16 present and AVX-512 in use.
    pub(crate) fn dot_available() -> bool {
        simd::level() == simd::Level::V4 && std::is_x86_feature_detected!("avx512bf16")
    }

    /// AMX-BF16 present (CPUID) and the kernel lets this process use tile data (Linux asks every
    /// process to request it once, with `arch_prctl(ARCH_REQ_XCOMP_PERM)`; the permission covers all
    /// its threads). `KILN_AMX=0` turns the path off.
    pub(crate) fn amx_available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            if std::env::var("KILN_AMX").is_ok_and(|v| v == "0") {
                return false;
            }
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
            if !(amx_bf16 && amx_tile) {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain syscall with integer arguments; failure is reported, not UB.
            unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                ) == 0
            }
        })
    }

    thread_local! {
        /// Packed operands, kept between calls so every step does not fault in fresh pages.
        static PACK: RefCell<(Vec<u16>, Vec<u16>)> = const { RefCell::new((Vec::new(), Vec::new())) };
        /// A task's block of out^T (swapped products), kept for the same reason.
        static LOCAL_C: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    pub(crate) fn matmul(
        engine: Engine,
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
        // The tile unit wants A with k contiguous per row and B with k in (interleaved) pairs per
        // column. When both are stored k-major (`trans_a && !trans_b`: weight gradients,
        // inp^T @ dout), A must be transposed while packing, which is slow; if A is the larger
        // one (dwte = logits^T @ hidden: 8192 x 2048 against 2048 x 384) compute out^T =
        // B^T @ A instead, transposing only B, and write each task's tiles out transposed.
        let swap = trans_a && !trans_b && n < m;
        let (cm, cn) = if swap { (n, m) } else { (m, n) };
        let mt = cm.div_ceil(TM).next_multiple_of(2);
        let nt = cn.div_ceil(TN).next_multiple_of(2);
        let kt = k.div_ceil(TK);
        // Take the buffers out of the cell (and put them back after): a rayon thread that steals
        // another matmul while this one waits just allocates its own.
        let (mut pa, mut pb) = PACK.with(|p| std::mem::take(&mut *p.borrow_mut()));
        pa.resize(mt * kt * TILE, 0);
        pb.resize(nt * kt * TILE, 0);
        let par = m * k * n >= PAR_MACS && rayon::current_num_threads() > 1;
        // Packing works on groups of tile rows (columns), see `pack_a`: up to PACK_GROUP, but
        // small enough to give every thread a few groups.
        let threads = if par { rayon::current_num_threads() } else { 1 };
        let group = |tiles: usize| tiles.div_ceil(4 * threads).clamp(4, PACK_GROUP);
        let (ga, gb) = (group(mt), group(nt));
        let pack_a_rows = |(g, dst): (usize, &mut [u16])| {
            if swap {
                // b is stored [k, n] = B^T's transpose.
                pack_a_any(dst, b, n, k, true, g * ga)
            } else {
                pack_a_any(dst, a, m, k, trans_a, g * ga)
            }
        };
        let pack_b_cols = |(g, dst): (usize, &mut [u16])| {
            if swap {
                // a is stored [k, m]: A as the right-hand operand, untransposed.
                pack_b_any(dst, a, k, m, false, g * gb)
            } else {
                pack_b_any(dst, b, k, n, trans_b, g * gb)
            }
        };
        let (pa_rows, pb_cols) = (&mut pa[..mt * kt * TILE], &mut pb[..nt * kt * TILE]);
        let (chunk_a, chunk_b) = (ga * kt * TILE, gb * kt * TILE);
        if par {
            pa_rows
                .par_chunks_mut(chunk_a)
                .enumerate()
                .for_each(pack_a_rows);
            pb_cols
                .par_chunks_mut(chunk_b)
                .enumerate()
                .for_each(pack_b_cols);
        } else {
            pa_rows
                .chunks_mut(chunk_a)
                .enumerate()
                .for_each(pack_a_rows);
            pb_cols
                .chunks_mut(chunk_b)
                .enumerate()
                .for_each(pack_b_cols);
        }

        // Tasks: blocks of C tiles, halved (rows first) until there are enough to keep the pool busy.
        let (mut mb, mut nb) = (MB.min(mt), NB.min(nt));
        let tasks = |mb: usize, nb: usize| mt.div_ceil(mb) * nt.div_ceil(nb);
        while tasks(mb, nb) < 4 * threads && (mb > 2 || nb > 2) {
            if mb >= nb && mb > 2 {
                mb = (mb / 2).next_multiple_of(2);
            } else {
                nb = (nb / 2).next_multiple_of(2);
            }
        }
        let (mblocks, nblocks) = (mt.div_ceil(mb), nt.div_ceil(nb));
        let out_p = SyncPtr(out.as_mut_ptr());
        let (pa_s, pb_s) = (&pa[..mt * kt * TILE], &pb[..nt * kt * TILE]);
        let run = |task: usize| {
            let (bi, bj) = (task / nblocks, task % nblocks);
            let rows = bi * mb..((bi + 1) * mb).min(mt);
            let cols = bj * nb..((bj + 1) * nb).min(nt);
            let (r0, c0) = (rows.start * TM, cols.start * TN);
            let out = out_p.get();
            if !swap {
                // SAFETY: the packed buffers hold mt x kt and nt x kt tiles; tasks write
                // disjoint blocks of C, all inside `out` (m x n) or in their own scratch.
                unsafe {
                    block(
                        engine,
                        out.add(r0 * n + c0),
                        n,
                        m - r0.min(m),
                        n - c0.min(n),
                        accumulate,
                        pa_s,
                        pb_s,
                        kt,
                        rows,
                        cols,
                    )
                };
                return;
            }
            // This task's block of out^T, computed in a local buffer of whole tiles.
            let (lh, lw) = (rows.len() * TM, cols.len() * TN);
            let (h, w) = ((cm - r0.min(cm)).min(lh), (cn - c0.min(cn)).min(lw));
            // Whatever a reused buffer holds outside the valid h x w corner only ever reaches
            // tiles of that region, which are never copied out.
            let mut local = LOCAL_C.with(|c| std::mem::take(&mut *c.borrow_mut()));
            local.resize(lh * lw, 0.0);
            // out^T[r0 + i, c0 + j] is out[c0 + j, r0 + i]; out has n = cm columns.
            if accumulate {
                // SAFETY: rows c0..c0 + w <= m of out, columns r0..r0 + h <= n; disjoint per task.
                unsafe { transpose(local.as_mut_ptr(), lw, out.add(c0 * n + r0), n, w, h) };
            }
            // SAFETY: as above; `local` holds every tile of the block.
            unsafe {
                block(
                    engine,
                    local.as_mut_ptr(),
                    lw,
                    lh,
                    lw,
                    accumulate,
                    pa_s,
                    pb_s,
                    kt,
                    rows,
                    cols,
                )
            };
            for j in 0..w {
                // SAFETY: as above.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.add((c0 + j) * n + r0), h) };
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = local[i * lw + j];
                }
            }
            LOCAL_C.with(|c| *c.borrow_mut() = local);
        };
        if par {
            (0..mblocks * nblocks).into_par_iter().for_each(run);
        } else {
            (0..mblocks * nblocks).for_each(run);
        }
        PACK.with(|p| *p.borrow_mut() = (pa, pb));
    }

    /// `dst[j, i] = src[i, j]` for `i < h`, `j < w` (row strides `ld_dst`, `ld_src`): a swapped
    /// product's block of out^T to and from `out`. 16 x 16 blocks in registers where AVX-512 is
    /// in use (every CPU with either engine has it): the element-by-element loop read `src` a column
    /// at a time, one cache line per element.
    ///
    /// # Safety
    /// `src` must be valid for `h` rows of `w` and `dst` for `w` rows of `h` at their strides,
    /// not overlapping.
    unsafe fn transpose(
        dst: *mut f32,
        ld_dst: usize,
        src: *const f32,
        ld_src: usize,
        h: usize,
        w: usize,
    ) {
        let (mut i0, mut j0) = (0, 0);
        // The SIMD level, not the bare CPU flag: `KILN_SIMD=avx2` keeps this on the scalar loop too.
        if simd::level() == simd::Level::V4 {
            (i0, j0) = (h / 16 * 16, w / 16 * 16);
            fast::transpose_blocks(dst, ld_dst, src, ld_src, i0, j0);
        }
        // What the blocks leave: the bottom rows (all columns), then the right columns.
        for (rows, cols) in [(i0..h, 0..w), (0..i0, j0..w)] {
            for i in rows {
                for j in cols.clone() {
                    *dst.add(j * ld_dst + i) = *src.add(i * ld_src + j);
                }
            }
        }
    }

    /// [`pack_a`], with the AVX512-BF16 conversions where the CPU has them.
    fn pack_a_any(dst: &mut [u16], a: &[f32], m: usize, k: usize, trans: bool, mi0: usize) {
        if dot_available() {
            // SAFETY: the CPU has AVX-512 (F, BW) and AVX512-BF16.
            unsafe { fast::pack_a(dst, a, m, k, trans, mi0) }
        } else {
            pack_a(dst, a, m, k, trans, mi0)
        }
    }

    /// [`pack_b`], with the AVX512-BF16 conversions where the CPU has them.
    fn pack_b_any(dst: &mut [u16], b: &[f32], k: usize, n: usize, trans: bool, ni0: usize) {
        if dot_available() {
            // SAFETY: as in `pack_a_any`.
            unsafe { fast::pack_b(dst, b, k, n, trans, ni0) }
        } else {
            pack_b(dst, b, k, n, trans, ni0)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::testutil::*;

        /// The swapped product's transpose moves every element of the block, and nothing else,
        /// for sizes around the 16 x 16 register blocks and padded strides.
        #[test]
        fn transpose_moves_every_element_and_nothing_else() {
            for &(h, w) in &[
                (1, 1),
                (3, 17),
                (16, 16),
                (17, 16),
                (16, 33),
                (40, 35),
                (64, 48),
            ] {
                let (ld_src, ld_dst) = (w + 3, h + 5);
                let src: Vec<f32> = (0..h * ld_src).map(|i| i as f32).collect();
                let mut dst = vec![-1.0f32; w * ld_dst];
                // SAFETY: both buffers hold their rows at their strides.
                unsafe { transpose(dst.as_mut_ptr(), ld_dst, src.as_ptr(), ld_src, h, w) };
                for j in 0..w {
                    for i in 0..ld_dst {
                        let want = if i < h { src[i * ld_src + j] } else { -1.0 };
                        assert_eq!(dst[j * ld_dst + i], want, "{h}x{w}: dst[{j}, {i}]");
                    }
                }
            }
        }

        /// The AVX512-BF16 packing writes the scalar packing's tiles bit for bit (full tiles,
        /// edge tiles, both layouts of each operand, several groups).
        #[test]
        fn fast_packing_writes_the_scalar_tiles() {
            if !dot_available() {
                eprintln!("no AVX512-BF16: skipped");
                return;
            }
            let mut rng = rng(21);
            for &(rows, k) in &[(16, 32), (48, 96), (70, 65), (33, 300), (5, 7)] {
                let src = randn(&mut rng, rows * k, 1.0);
                let kt = k.div_ceil(TK);
                for trans in [false, true] {
                    let tiles = rows.div_ceil(16);
                    for (first, count) in [(0, tiles), (tiles / 2, tiles - tiles / 2)] {
                        let len = count * kt * TILE;
                        let (mut want, mut got) = (vec![7u16; len], vec![9u16; len]);
                        pack_a(&mut want, &src, rows, k, trans, first);
                        // SAFETY: checked above.
                        unsafe { fast::pack_a(&mut got, &src, rows, k, trans, first) };
                        assert_eq!(want, got, "A rows={rows} k={k} trans={trans} first={first}");
                        let (mut want, mut got) = (vec![7u16; len], vec![9u16; len]);
                        pack_b(&mut want, &src, k, rows, trans, first);
                        // SAFETY: checked above.
                        unsafe { fast::pack_b(&mut got, &src, k, rows, trans, first) };
                        assert_eq!(want, got, "B k={k} cols={rows} trans={trans} first={first}");
                    }
                }
            }
        }
    }

    mod fast {
        //! The packing of [`super::pack_a`] / [`super::pack_b`] with `VCVTNE2PS2BF16` (32 f32 to
        //! bf16 per instruction, rounding to nearest even like [`super::f32_to_bf16`]; it reads
        //! f32 subnormals as zero, which both engines do with bf16 ones anyway) and in-register
        //! interleaves and 16 x 16 transposes of k pairs. Same tiles, same order of memory
        //! traffic; tiles at the matrix edge take the scalar per-tile path.

        use super::{f32_to_bf16, TILE, TK, TM, TN};
        use crate::simd::lanes::transpose16;
        use std::arch::x86_64::*;

        /// 32 consecutive f32 at `src` as 32 bf16 (element order kept).
        #[inline(always)]
        unsafe fn cvt32(src: *const f32) -> __m512i {
            std::mem::transmute(_mm512_cvtne2ps_pbh(
                _mm512_loadu_ps(src.add(16)),
                _mm512_loadu_ps(src),
            ))
        }

        /// 16 f32 at `lo` and 16 at `hi` as 16 (lo, hi) bf16 pairs, one per 32-bit lane.
        #[inline(always)]
        unsafe fn pairs(lo: *const f32, hi: *const f32) -> __m512i {
            let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(
                _mm512_loadu_ps(hi),
                _mm512_loadu_ps(lo),
            ));
            // Element 2j takes lo[j] (element j), 2j + 1 takes hi[j] (element 16 + j).
            let idx = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
            );
            _mm512_permutexvar_epi16(idx, both)
        }

        /// [`super::transpose`] of the whole 16 x 16 blocks of the top-left `h` x `w` (multiples
        /// of 16).
        ///
        /// # Safety
        /// AVX-512F; as [`super::transpose`].
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn transpose_blocks(
            dst: *mut f32,
            ld_dst: usize,
            src: *const f32,
            ld_src: usize,
            h: usize,
            w: usize,
        ) {
            for i in (0..h).step_by(16) {
                for j in (0..w).step_by(16) {
                    let mut rows = [_mm512_setzero_si512(); 16];
                    for (r, v) in rows.iter_mut().enumerate() {
                        *v = _mm512_loadu_si512(src.add((i + r) * ld_src + j).cast());
                    }
                    for (c, v) in transpose16(&rows).iter().enumerate() {
                        _mm512_storeu_si512(dst.add((j + c) * ld_dst + i).cast(), *v);
                    }
                }
            }
        }

        #[inline(always)]
        unsafe fn store_rows(tile: &mut [u16], rows: &[__m512i; 16]) {
            for (q, &v) in rows.iter().enumerate() {
                _mm512_storeu_si512(tile[q * TK..].as_mut_ptr().cast(), v);
            }
        }

        /// One A tile the slow way: element (r, c) is op(A)[m0 + r, k0 + c], zero outside.
        fn tile_a(
            tile: &mut [u16],
            a: &[f32],
            m: usize,
            k: usize,
            trans: bool,
            m0: usize,
            k0: usize,
        ) {
            for r in 0..TM {
                for c in 0..TK {
                    let (i, p) = (m0 + r, k0 + c);
                    tile[r * TK + c] = if i < m && p < k {
                        f32_to_bf16(if trans { a[p * m + i] } else { a[i * k + p] })
                    } else {
                        0
                    };
                }
            }
        }

        /// One B tile the slow way, in VNNI order.
        fn tile_b(
            tile: &mut [u16],
            b: &[f32],
            k: usize,
            n: usize,
            trans: bool,
            n0: usize,
            k0: usize,
        ) {
            for q in 0..TK / 2 {
                for j in 0..TN {
                    for h in 0..2 {
                        let (p, c) = (k0 + 2 * q + h, n0 + j);
                        tile[q * TK + 2 * j + h] = if p < k && c < n {
                            f32_to_bf16(if trans { b[c * k + p] } else { b[p * n + c] })
                        } else {
                            0
                        };
                    }
                }
            }
        }

        /// # Safety
        /// The CPU must have AVX-512 F and BW and AVX512-BF16.
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        pub(super) unsafe fn pack_a(
            dst: &mut [u16],
            a: &[f32],
            m: usize,
            k: usize,
            trans: bool,
            mi0: usize,
        ) {
            let kt = k.div_ceil(TK);
            let tiles = dst.len() / (kt * TILE);
            // Source rows are read in order: by tile row for A stored [m, k], by k tile (32 source
            // rows of 64 bytes per tile of the group) for A stored [k, m].
            for (g, ki) in (0..tiles * kt).map(|t| {
                if trans {
                    (t % tiles, t / tiles)
                } else {
                    (t / kt, t % kt)
                }
            }) {
                let (m0, k0) = ((mi0 + g) * TM, ki * TK);
                let tile = &mut dst[(g * kt + ki) * TILE..][..TILE];
                if m0 + TM > m || k0 + TK > k {
                    tile_a(tile, a, m, k, trans, m0, k0);
                } else if !trans {
                    for r in 0..TM {
                        let v = cvt32(a.as_ptr().add((m0 + r) * k + k0));
                        _mm512_storeu_si512(tile[r * TK..].as_mut_ptr().cast(), v);
                    }
                } else {
                    // Lane r of pair row q: (A[m0 + r, k0 + 2q], A[m0 + r, k0 + 2q + 1]).
                    let mut q_rows = [_mm512_setzero_si512(); 16];
                    for (q, v) in q_rows.iter_mut().enumerate() {
                        let lo = a.as_ptr().add((k0 + 2 * q) * m + m0);
                        *v = pairs(lo, lo.add(m));
                    }
                    store_rows(tile, &transpose16(&q_rows));
                }
            }
        }

        /// # Safety
        /// As [`pack_a`].
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        pub(super) unsafe fn pack_b(
            dst: &mut [u16],
            b: &[f32],
            k: usize,
            n: usize,
            trans: bool,
            ni0: usize,
        ) {
            let kt = k.div_ceil(TK);
            let tiles = dst.len() / (kt * TILE);
            for ki in 0..kt {
                for g in 0..tiles {
                    let (n0, k0) = ((ni0 + g) * TN, ki * TK);
                    let tile = &mut dst[(g * kt + ki) * TILE..][..TILE];
                    if n0 + TN > n || k0 + TK > k {
                        tile_b(tile, b, k, n, trans, n0, k0);
                    } else if !trans {
                        for q in 0..TK / 2 {
                            let lo = b.as_ptr().add((k0 + 2 * q) * n + n0);
                            let v = pairs(lo, lo.add(n));
                            _mm512_storeu_si512(tile[q * TK..].as_mut_ptr().cast(), v);
                        }
                    } else {
                        // B stored [n, k]: column j's 32 k values are contiguous, 16 pairs.
                        let mut cols = [_mm512_setzero_si512(); 16];
                        for (j, v) in cols.iter_mut().enumerate() {
                            *v = cvt32(b.as_ptr().add((n0 + j) * k + k0));
                        }
                        store_rows(tile, &transpose16(&cols));
                    }
                }
            }
        }
    }

    simd::multiversion! {
        /// Tile rows `mi0..` of op(A) (as many as `dst` holds, each with all its k tiles), rounded
        /// to bf16 and zero-padded. For a transposed A (stored [k, m]) one tile reads 32 rows of
        /// only 64 bytes each, so the group's tiles are done k tile by k tile: the 32 source rows
        /// are read (64 bytes per tile of the group) once, contiguously, instead of one cache line
        /// per row per pass over k.
        fn pack_a(dst: &mut [u16], a: &[f32], m: usize, k: usize, trans: bool, mi0: usize) {
            let kt = k.div_ceil(TK);
            let tiles = dst.len() / (kt * TILE);
            if !trans {
                for g in 0..tiles {
                    let m0 = (mi0 + g) * TM;
                    let rows = m.saturating_sub(m0).min(TM);
                    let dst = &mut dst[g * kt * TILE..(g + 1) * kt * TILE];
                    for r in 0..TM {
                        // Row r of every k tile: the source row converted 32 values at a time.
                        let src = if r < rows { &a[(m0 + r) * k..(m0 + r + 1) * k] } else { &[][..] };
                        for (ki, tile) in dst.chunks_exact_mut(TILE).enumerate() {
                            let d: &mut [u16; TK] = (&mut tile[r * TK..(r + 1) * TK]).try_into().unwrap();
                            let s = src.get(ki * TK..(ki + 1) * TK);
                            match s {
                                Some(s) => {
                                    let s: &[f32; TK] = s.try_into().unwrap();
                                    for (dc, &sc) in d.iter_mut().zip(s) {
                                        *dc = f32_to_bf16(sc);
                                    }
                                }
                                None => {
                                    let s = src.get(ki * TK..).unwrap_or(&[]);
                                    for (c, dc) in d.iter_mut().enumerate() {
                                        *dc = s.get(c).map_or(0, |&v| f32_to_bf16(v));
                                    }
                                }
                            }
                        }
                    }
                }
                return;
            }
            let mut buf = [0.0f32; TILE];
            for ki in 0..kt {
                let k0 = ki * TK;
                let depth = (k - k0).min(TK);
                for g in 0..tiles {
                    let m0 = (mi0 + g) * TM;
                    let rows = m.saturating_sub(m0).min(TM);
                    if rows < TM || depth < TK {
                        buf.fill(0.0);
                    }
                    if rows == TM {
                        // Full height: fixed-size rows, so the transpose is unrolled.
                        for c in 0..depth {
                            let src: &[f32; TM] = a[(k0 + c) * m + m0..][..TM].try_into().unwrap();
                            for r in 0..TM {
                                buf[r * TK + c] = src[r];
                            }
                        }
                    } else {
                        // Rows past m (including a padding tile row) stay zero.
                        for c in 0..depth {
                            for r in 0..rows {
                                buf[r * TK + c] = a[(k0 + c) * m + m0 + r];
                            }
                        }
                    }
                    convert(&mut dst[(g * kt + ki) * TILE..][..TILE], &buf);
                }
            }
        }
    }

    simd::multiversion! {
        /// Tile columns `ni0..` of op(B) into `dst` in VNNI order: tile row `q` holds
        /// (B[2q, j], B[2q+1, j]) for the tile's 16 columns j. Grouped like [`pack_a`] (here the
        /// untransposed B, stored [k, n], is the one read 64 bytes per row).
        fn pack_b(dst: &mut [u16], b: &[f32], k: usize, n: usize, trans: bool, ni0: usize) {
            let kt = k.div_ceil(TK);
            let tiles = dst.len() / (kt * TILE);
            let mut buf = [0.0f32; TILE];
            for ki in 0..kt {
                let k0 = ki * TK;
                let depth = (k - k0).min(TK);
                for g in 0..tiles {
                    let n0 = (ni0 + g) * TN;
                    let cols = n.saturating_sub(n0).min(TN);
                    let tile: &mut [u16; TILE] =
                        (&mut dst[(g * kt + ki) * TILE..][..TILE]).try_into().unwrap();
                    if cols == TN && depth == TK && !trans {
                        // Full tile: interleave pairs of source rows straight into the tile.
                        for q in 0..TK / 2 {
                            let r0: &[f32; TN] = b[(k0 + 2 * q) * n + n0..][..TN].try_into().unwrap();
                            let r1: &[f32; TN] =
                                b[(k0 + 2 * q + 1) * n + n0..][..TN].try_into().unwrap();
                            for j in 0..TN {
                                tile[q * TK + 2 * j] = f32_to_bf16(r0[j]);
                                tile[q * TK + 2 * j + 1] = f32_to_bf16(r1[j]);
                            }
                        }
                        continue;
                    }
                    if cols < TN || depth < TK {
                        buf.fill(0.0);
                    }
                    if cols == 0 {
                        // A padding tile column: all zeros.
                    } else if trans {
                        // B stored [n, k]: each column's k values are contiguous.
                        for j in 0..cols {
                            let src = &b[(n0 + j) * k + k0..][..depth];
                            for (p, &v) in src.iter().enumerate() {
                                buf[(p >> 1) * TK + 2 * j + (p & 1)] = v;
                            }
                        }
                    } else {
                        for p in 0..depth {
                            let src = &b[(k0 + p) * n + n0..][..cols];
                            let row = &mut buf[(p >> 1) * TK + (p & 1)..];
                            for (j, &v) in src.iter().enumerate() {
                                row[2 * j] = v;
                            }
                        }
                    }
                    convert(tile, &buf);
                }
            }
        }
    }

    #[inline(always)]
    fn convert(dst: &mut [u16], src: &[f32; TILE]) {
        for (d, &s) in dst[..TILE].iter_mut().zip(src) {
            *d = f32_to_bf16(s);
        }
    }

    /// C tiles (row-major f32, 64-byte aligned) for blocks that cross the matrix edge.
    #[repr(C, align(64))]
    struct Scratch([[f32; TM * TN]; 4]);

    /// Computes C tiles `rows` x `cols` (even ranges, in tiles) from the packed operands into the
    /// block at `out` (row stride `ldc`), of which the first `m` rows and `n` columns exist.
    ///
    /// # Safety
    /// `engine` must be available ([`amx_available`], [`dot_available`]); `out` must be valid for
    /// those `m x n` f32 with no other writer; `pa` / `pb` must hold the packed tile rows / columns
    /// covering `rows` / `cols` with `kt` k tiles each.
    unsafe fn block(
        engine: Engine,
        out: *mut f32,
        ldc: usize,
        m: usize,
        n: usize,
        accumulate: bool,
        pa: &[u16],
        pb: &[u16],
        kt: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) {
        assert!(rows.end * kt * TILE <= pa.len() && cols.end * kt * TILE <= pb.len());
        if engine == Engine::Amx {
            configure();
        }
        let mut scratch = Scratch([[0.0; TM * TN]; 4]);
        for kc0 in (0..kt).step_by(KC) {
            let kcn = (kt - kc0).min(KC);
            // The first pass overwrites C unless the product is accumulated into it.
            let zero = kc0 == 0 && !accumulate;
            // Micro-blocks of 2x2 C tiles, column pair by column pair: the B pair for this pass
            // is reused from L1 / L2 by every row pair.
            let pairs = (rows.len() / 2) * (cols.len() / 2);
            // Local pair coordinates (in tiles, from the block's corner).
            let pair = |p: usize| (2 * (p % (rows.len() / 2)), 2 * (p / (rows.len() / 2)));
            for p in 0..pairs {
                let (li, lj) = pair(p);
                let (ti, tj) = (rows.start + li, cols.start + lj);
                if p + 1 < pairs {
                    // While this block computes, bring the next block's C into cache: the tile
                    // loads of C would otherwise stall the tile unit on memory.
                    let (ni, nj) = pair(p + 1);
                    for (i, j) in [(ni, nj), (ni, nj + 1), (ni + 1, nj), (ni + 1, nj + 1)] {
                        if (i + 1) * TM <= m && (j + 1) * TN <= n {
                            for r in 0..TM {
                                prefetch(out.add((i * TM + r) * ldc + j * TN));
                            }
                        }
                    }
                }
                let tiles = [(li, lj), (li, lj + 1), (li + 1, lj), (li + 1, lj + 1)];
                let mut c = [(std::ptr::null_mut::<f32>(), 0usize); 4];
                for (t, &(i, j)) in tiles.iter().enumerate() {
                    let (r0, c0) = (i * TM, j * TN);
                    let (h, w) = (m.saturating_sub(r0).min(TM), n.saturating_sub(c0).min(TN));
                    if h == TM && w == TN {
                        c[t] = (out.add(r0 * ldc + c0), ldc * 4);
                    } else {
                        let s = &mut scratch.0[t];
                        if !zero {
                            for r in 0..h {
                                let src =
                                    std::slice::from_raw_parts(out.add((r0 + r) * ldc + c0), w);
                                s[r * TN..r * TN + w].copy_from_slice(src);
                            }
                        }
                        c[t] = (s.as_mut_ptr(), TN * 4);
                    }
                }
                let (a0, a1) = (
                    pa.as_ptr().add((ti * kt + kc0) * TILE),
                    pa.as_ptr().add(((ti + 1) * kt + kc0) * TILE),
                );
                let (b0, b1) = (
                    pb.as_ptr().add((tj * kt + kc0) * TILE),
                    pb.as_ptr().add(((tj + 1) * kt + kc0) * TILE),
                );
                match engine {
                    Engine::Amx => {
                        if zero {
                            zero_c();
                        } else {
                            load_c(&c);
                        }
                        kernel_2x2(a0, a1, b0, b1, kcn);
                        store_c(&c);
                    }
                    Engine::Dot => {
                        // Rows 0-7 and 8-15 of each A tile, against both B tiles.
                        for (t, a) in [(0, a0), (2, a1)] {
                            for half in [0, TM / 2] {
                                let (left, right) = (c[t], c[t + 1]);
                                dot_8x32(
                                    left.0.add(half * left.1 / 4),
                                    left.1 / 4,
                                    right.0.add(half * right.1 / 4),
                                    right.1 / 4,
                                    a.add(half * TK),
                                    b0,
                                    b1,
                                    kcn,
                                    zero,
                                );
                            }
                        }
                    }
                }
                for (t, &(i, j)) in tiles.iter().enumerate() {
                    let (r0, c0) = (i * TM, j * TN);
                    let (h, w) = (m.saturating_sub(r0).min(TM), n.saturating_sub(c0).min(TN));
                    if h < TM || w < TN {
                        let s = &scratch.0[t];
                        for r in 0..h {
                            let dst =
                                std::slice::from_raw_parts_mut(out.add((r0 + r) * ldc + c0), w);
                            dst.copy_from_slice(&s[r * TN..r * TN + w]);
                        }
                    }
                }
            }
        }
        if engine == Engine::Amx {
            release();
        }
    }

    /// C[8 rows, 32 columns] (+)= A[8 rows of a tile] · B[2 tiles] over `count` consecutive k tiles
    /// (1 KiB apart), with `VDPBF16PS`: per k pair, each B tile's row is one register and each A
    /// row's pair one broadcast. `left` / `right` are the two 16-column halves of C (row strides
    /// in f32); with `zero` C is overwritten, else accumulated into.
    ///
    /// # Safety
    /// AVX512-BF16 must be [`dot_available`]; C's 8 rows must be valid for 16 f32 on both sides;
    /// `a` must hold 8 tile rows and `b0` / `b1` a tile each, for each of the `count` k tiles.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dot_8x32(
        left: *mut f32,
        ld_left: usize,
        right: *mut f32,
        ld_right: usize,
        a: *const u16,
        b0: *const u16,
        b1: *const u16,
        count: usize,
        zero: bool,
    ) {
        use std::arch::x86_64::*;
        const R: usize = TM / 2;
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if !zero {
            for (i, row) in acc.iter_mut().enumerate() {
                row[0] = _mm512_loadu_ps(left.add(i * ld_left));
                row[1] = _mm512_loadu_ps(right.add(i * ld_right));
            }
        }
        for t in 0..count {
            let (a, b0, b1) = (a.add(t * TILE), b0.add(t * TILE), b1.add(t * TILE));
            if t + 1 < count {
                // The next k tile's lines: 8 of A, 16 of each B tile.
                for l in 0..R {
                    _mm_prefetch::<_MM_HINT_T0>(a.add(TILE + l * TK).cast());
                }
                for l in 0..TM {
                    _mm_prefetch::<_MM_HINT_T0>(b0.add(TILE + l * TK).cast());
                    _mm_prefetch::<_MM_HINT_T0>(b1.add(TILE + l * TK).cast());
                }
            }
            for q in 0..TK / 2 {
                let bv0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b0.add(q * TK).cast()));
                let bv1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1.add(q * TK).cast()));
                for (i, row) in acc.iter_mut().enumerate() {
                    let pair = a.add(i * TK + 2 * q).cast::<i32>().read_unaligned();
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    row[0] = _mm512_dpbf16_ps(row[0], av, bv0);
                    row[1] = _mm512_dpbf16_ps(row[1], av, bv1);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            _mm512_storeu_ps(left.add(i * ld_left), row[0]);
            _mm512_storeu_ps(right.add(i * ld_right), row[1]);
        }
    }

    #[inline(always)]
    unsafe fn prefetch(p: *const f32) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
    }

    /// Tile configuration: palette 1, all 8 tiles 16 rows x 64 bytes (tmm0-3: C, tmm4-5: A,
    /// tmm6-7: B). The configuration is per thread, so every task loads it.
    #[repr(C, align(64))]
    struct TileCfg([u8; 64]);

    #[inline]
    unsafe fn configure() {
        let mut cfg = TileCfg([0; 64]);
        cfg.0[0] = 1;
        for t in 0..8 {
            cfg.0[16 + 2 * t] = (TK * 2) as u8; // bytes per row (u16 little-endian)
            cfg.0[48 + t] = TM as u8; // rows
        }
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    }

    /// Returns the tile registers to their initial state (cheaper context switches).
    #[inline]
    unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    // The tile registers are not visible to the compiler, which never uses them: they keep their
    // contents from one `asm!` block to the next on this thread.

    #[inline]
    unsafe fn zero_c() {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
    }

    #[inline]
    unsafe fn load_c(c: &[(*mut f32, usize); 4]) {
        asm!(
            "tileloadd tmm0, [{p0} + {s0} * 1]",
            "tileloadd tmm1, [{p1} + {s1} * 1]",
            "tileloadd tmm2, [{p2} + {s2} * 1]",
            "tileloadd tmm3, [{p3} + {s3} * 1]",
            p0 = in(reg) c[0].0, s0 = in(reg) c[0].1,
            p1 = in(reg) c[1].0, s1 = in(reg) c[1].1,
            p2 = in(reg) c[2].0, s2 = in(reg) c[2].1,
            p3 = in(reg) c[3].0, s3 = in(reg) c[3].1,
            options(nostack, readonly)
        );
    }

    #[inline]
    unsafe fn store_c(c: &[(*mut f32, usize); 4]) {
        asm!(
            "tilestored [{p0} + {s0} * 1], tmm0",
            "tilestored [{p1} + {s1} * 1], tmm1",
            "tilestored [{p2} + {s2} * 1], tmm2",
            "tilestored [{p3} + {s3} * 1], tmm3",
            p0 = in(reg) c[0].0, s0 = in(reg) c[0].1,
            p1 = in(reg) c[1].0, s1 = in(reg) c[1].1,
            p2 = in(reg) c[2].0, s2 = in(reg) c[2].1,
            p3 = in(reg) c[3].0, s3 = in(reg) c[3].1,
            options(nostack)
        );
    }

    /// C[2x2 tiles] += A[2 tiles] · B[2 tiles] over `count` consecutive k tiles (each operand's
    /// tiles are 1 KiB apart).
    #[inline]
    unsafe fn kernel_2x2(
        a0: *const u16,
        a1: *const u16,
        b0: *const u16,
        b1: *const u16,
        count: usize,
    ) {
        debug_assert!(count > 0);
        asm!(
            "2:",
            "tileloadd tmm4, [{a0} + {s} * 1]",
            "tileloadd tmm6, [{b0} + {s} * 1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {s} * 1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {s} * 1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 1024",
            "add {a1}, 1024",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {count}",
            "jnz 2b",
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a1 => _,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b1 => _,
            count = inout(reg) count => _,
            s = in(reg) TK * 2,
            options(nostack, readonly)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn rounding_to_nearest_even() {
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one (1).
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        // Just above the halfway point rounds up.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(f32_to_bf16(-2.5), 0xc020);
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16(f32::NEG_INFINITY), 0xff80);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80, "overflow rounds to infinity");
        assert!(round_bf16(f32::NAN).is_nan());
        assert!(
            round_bf16(f32::from_bits(0x7f80_0001)).is_nan(),
            "NaN with low payload"
        );
        assert_eq!(round_bf16(0.1), f32::from_bits(0x3dcd_0000));
        assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
        assert_eq!("F32".parse::<Precision>(), Ok(Precision::F32));
        assert!("f16".parse::<Precision>().is_err());
    }

    /// f64 reference on the logical operands, after rounding them to bf16, plus the scale
    /// `sum_p |a_rp b_pc|` of each output for error bounds.
    fn reference(
        a: &[f32],
        b: &[f32],
        m: usize,
        k: usize,
        n: usize,
        ta: bool,
        tb: bool,
        round: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let q = |x: f32| {
            if round {
                round_bf16(x) as f64
            } else {
                x as f64
            }
        };
        let mut out = vec![0.0f64; m * n];
        let mut scale = vec![0.0f64; m * n];
        for r in 0..m {
            for c in 0..n {
                let (mut s, mut sa) = (0.0f64, 0.0f64);
                for p in 0..k {
                    let av = q(if ta { a[p * m + r] } else { a[r * k + p] });
                    let bv = q(if tb { b[c * k + p] } else { b[p * n + c] });
                    s += av * bv;
                    sa += (av * bv).abs();
                }
                out[r * n + c] = s;
                scale[r * n + c] = sa;
            }
        }
        (out, scale)
    }

    /// |got - want| <= tol * (scale + |want|) elementwise (scale: sum of |products|).
    fn assert_within(got: &[f32], want: &[f64], scale: &[f64], tol: f64, what: &str) {
        for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
            let bound = tol * (s + w.abs()) + 1e-30;
            assert!(
                (g as f64 - w).abs() <= bound,
                "{what}: element {i}: got {g}, want {w} (bound {bound:.3e})"
            );
        }
    }

    type Mm = fn(&mut [f32], &[f32], &[f32], usize, usize, usize, bool, bool, bool);

    /// Odd shapes (edges in every dimension), several k passes, blocks larger than one task, and
    /// sizes above the parallel threshold; every transpose and accumulate variant.
    fn check(f: Mm, what: &str) {
        let mut rng = rng(11);
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (17, 33, 9),
            (1, 64, 1),
            (70, 65, 66),
            (33, 300, 47),
            (300, 270, 290),
        ] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let a = randn(&mut rng, m * k, 1.0);
                    let b = randn(&mut rng, k * n, 1.0);
                    let (want, scale) = reference(&a, &b, m, k, n, ta, tb, true);
                    let ctx = format!("{what} m={m} k={k} n={n} ta={ta} tb={tb}");
                    let mut out = vec![f32::NAN; m * n];
                    f(&mut out, &a, &b, m, k, n, ta, tb, false);
                    // f32 accumulation of exact products: far below this bound for these k.
                    assert_within(&out, &want, &scale, 1e-5, &ctx);
                    // Against the unrounded f32 product: each bf16 operand is within 2^-9
                    // (relative), so each product within about 2^-8.
                    let mut f32_out = vec![0.0; m * n];
                    crate::matmul(&mut f32_out, &a, &b, m, k, n, ta, tb, false);
                    let (exact, exact_scale) = reference(&a, &b, m, k, n, ta, tb, false);
                    assert_within(&f32_out, &exact, &exact_scale, 1e-5, &ctx);
                    let f32_64: Vec<f64> = f32_out.iter().map(|&v| v as f64).collect();
                    assert_within(&out, &f32_64, &exact_scale, 5e-3, &ctx);

                    let init = randn(&mut rng, m * n, 1.0);
                    let mut acc = init.clone();
                    f(&mut acc, &a, &b, m, k, n, ta, tb, true);
                    let want_acc: Vec<f64> =
                        want.iter().zip(&init).map(|(w, i)| w + *i as f64).collect();
                    assert_within(&acc, &want_acc, &scale, 1e-5, &format!("{ctx} acc"));
                }
            }
        }
    }

    #[test]
    fn bf16_matmul_matches_reference() {
        eprintln!("bf16 hardware: {:?}", hardware());
        check(matmul_bf16, "bf16 matmul");
    }

    #[test]
    fn portable_path_matches_reference() {
        check(portable, "portable bf16 matmul");
    }

    /// Every hardware engine this CPU offers, each forced in turn (an AMX machine also runs the
    /// AVX512-BF16 kernel here).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn every_bf16_engine_of_this_cpu_matches_reference() {
        use tiled::{matmul, Engine};
        if tiled::amx_available() {
            check(
                |o, a, b, m, k, n, ta, tb, acc| matmul(Engine::Amx, o, a, b, m, k, n, ta, tb, acc),
                "AMX",
            );
        }
        if tiled::dot_available() {
            check(
                |o, a, b, m, k, n, ta, tb, acc| matmul(Engine::Dot, o, a, b, m, k, n, ta, tb, acc),
                "AVX512-BF16",
            );
        }
        eprintln!(
            "tested: AMX {}, AVX512-BF16 {}",
            tiled::amx_available(),
            tiled::dot_available()
        );
    }

    #[test]
    fn bf16_matmul_deterministic_across_thread_counts() {
        let mut rng = rng(12);
        let (m, k, n) = (200, 384, 150);
        for (ta, tb) in [(false, false), (false, true), (true, false)] {
            let a = randn(&mut rng, m * k, 1.0);
            let b = randn(&mut rng, k * n, 1.0);
            let init = randn(&mut rng, m * n, 1.0);
            let run = || {
                let mut out = init.clone();
                matmul_bf16(&mut out, &a, &b, m, k, n, ta, tb, true);
                out
            };
            let reference = run();
            assert_bits_eq(&reference, &run());
            assert_thread_independent(&reference, run);
        }
    }

    #[test]
    fn precision_switch() {
        let mut rng = rng(13);
        let (n, i, o) = (40, 70, 50);
        let inp = randn(&mut rng, n * i, 1.0);
        let w = randn(&mut rng, i * o, 1.0);
        let bias = randn(&mut rng, o, 1.0);
        // F32 is exactly the f32 kernel.
        let (mut x, mut y) = (vec![0.0; n * o], vec![0.0; n * o]);
        crate::linear_forward(&mut x, &inp, &w, Some(&bias), n, i, o);
        crate::linear_forward_with(Precision::F32, &mut y, &inp, &w, Some(&bias), n, i, o);
        assert_bits_eq(&x, &y);
        // Bf16 is the f32 kernel on rounded operands (up to summation order), not the f32 result.
        let (ri, rw): (Vec<f32>, Vec<f32>) = (
            inp.iter().map(|&v| round_bf16(v)).collect(),
            w.iter().map(|&v| round_bf16(v)).collect(),
        );
        crate::linear_forward(&mut x, &ri, &rw, Some(&bias), n, i, o);
        crate::linear_forward_with(Precision::Bf16, &mut y, &inp, &w, Some(&bias), n, i, o);
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        assert_close(&y, &x64, 1e-5, "bf16 linear");
        let mut z = vec![0.0; n * o];
        crate::linear_forward(&mut z, &inp, &w, Some(&bias), n, i, o);
        assert_ne!(y, z, "bf16 path gave the f32 result");

        let dout = randn(&mut rng, n * o, 1.0);
        let run = |prec: Precision, inp: &[f32], w: &[f32], dout: &[f32]| {
            let (mut dinp, mut dw, mut db) = (vec![0.5; n * i], vec![0.5; i * o], vec![0.5; o]);
            crate::linear_backward_with(
                prec,
                Some(&mut dinp),
                &mut dw,
                Some(&mut db),
                dout,
                inp,
                w,
                n,
                i,
                o,
            );
            (dinp, dw, db)
        };
        let rd: Vec<f32> = dout.iter().map(|&v| round_bf16(v)).collect();
        let want = run(Precision::F32, &ri, &rw, &rd);
        let got = run(Precision::Bf16, &inp, &w, &dout);
        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        assert_close(&got.0, &f64s(&want.0), 1e-5, "bf16 dinp");
        assert_close(&got.1, &f64s(&want.1), 1e-5, "bf16 dw");
        // The bias gradient is an f32 column sum of the unrounded dout.
        assert_bits_eq(&got.2, &run(Precision::F32, &inp, &w, &dout).2);
    }
}
