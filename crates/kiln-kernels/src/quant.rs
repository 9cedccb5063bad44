//! Inference-only weight formats for the linear layers of token-by-token generation: weight-only int8
//! (symmetric, one f32 scale per output channel) and bf16, with a matrix–vector / few-row product that
//! converts the weights to f32 in registers; and the f32 weights themselves in the same panels
//! ([`PackedFormat::F32`]), whose product runs on attention's register tiles for batched decoding.
//!
//! Why: decoding one token at a time multiplies every weight once per token, so batch-1 generation
//! is bound by how fast the weights stream from cache/memory, not by arithmetic. int8 moves a quarter
//! of the bytes of f32 (bf16 half). Activations stay f32 and accumulation is f32, so the only error
//! is the weights' rounding: for int8 at most `scale/2 = max|w_col|/254` per weight.
//!
//! Layout: the weights are repacked into panels of [`PANEL`] output columns; panel `q` holds, for
//! every input `p` in order, the 64 weights `W[p, 64q .. 64q+64]` contiguously (the last panel is
//! zero-padded). A panel is therefore one sequential stream, read once per group of up to 4 rows of
//! `x`, and each input's 64 weights are one cache line (int8). f32 panels are stored as sub-panels
//! of the width the CPU's register tile reads (64 columns for AVX-512, 16 for AVX2: each `k x 16`
//! contiguous), so that a tile's operand is one sequential stream too. For every output element
//! the sum runs over `p` in order with one accumulator, whatever the thread count or the number of
//! rows in the call, so results are bit-identical across thread counts and batch compositions (on
//! a given code path).

use rayon::prelude::*;

use crate::simd::{self, SyncPtr};

/// Output columns per packed panel (four AVX-512 vectors).
pub const PANEL: usize = 64;

/// Below this many multiply-adds one thread does it all (waking the pool costs more).
const PAR_MACS: usize = 1 << 16;

/// Storage format of a [`PackedLinear`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackedFormat {
    /// Symmetric int8 per output channel: `w ≈ q · scale[j]`, `q` in [-127, 127].
    Int8,
    /// bfloat16 (round to nearest even): the top 16 bits of the f32.
    Bf16,
    /// The f32 weights themselves, only repacked (no rounding): for decoding batches of more
    /// than a few rows, where the product runs on 6 × 64 register tiles (AVX-512; 6 × 16 on
    /// AVX2) over contiguous panels instead of repacking the weights on every call as `gemm` did.
    /// Each output is one fused multiply-add chain over the inputs in order, whatever the number
    /// of rows or threads.
    F32,
}

#[derive(Clone, Debug)]
enum Data {
    I8(Vec<i8>),
    Bf16(Vec<u16>),
    /// f32 panels stored as sub-panels `sub` columns wide, each `k x sub` contiguous (see
    /// [`f32_sub_panel`]).
    F32 {
        w: Vec<f32>,
        sub: usize,
    },
}

/// Where the f32 weight `(p, c)` of a panel (`c < PANEL`) lies in it, for sub-panels `sub` wide.
#[inline(always)]
fn f32_at(k: usize, sub: usize, p: usize, c: usize) -> usize {
    (c / sub) * k * sub + p * sub + c % sub
}

/// The f32 layout that the widest tile `path` runs reads as one contiguous stream: AVX-512's 6 x 64
/// tiles read whole panel rows (`PANEL`), the 16-column AVX2 and portable tiles read sub-panels of
/// 16 columns. Measured on batched decoding (64 rows), Zen 5: AVX2 tiles on 16-column sub-panels
/// 14 % faster than on the 64-column rows (a 64-byte line out of every 256 bytes, four interleaved
/// streams); AVX-512 6 x 64 tiles (24 accumulators, 4 loads and 6 broadcasts per 24 multiply-adds)
/// 28 % faster than 8 x 32 ones.
fn f32_sub_panel(path: Path) -> usize {
    match path {
        Path::Avx512 => PANEL,
        Path::Avx2 | Path::Portable => 16,
    }
}

/// A linear layer `y[m, n] = x[m, k] · W[k, n] + bias[n]` with `W` stored in a compact format.
#[derive(Clone, Debug)]
pub struct PackedLinear {
    k: usize,
    n: usize,
    data: Data,
    /// Per output column (padded to whole panels with 0): the int8 step; 1.0 for bf16.
    scale: Vec<f32>,
    /// Per output column (padded with 0); zeros when the layer has no bias.
    bias: Vec<f32>,
}

/// f32 -> bf16 bits, round to nearest even; NaN stays NaN.
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// bf16 bits -> f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

impl PackedLinear {
    /// Packs a weight stored `[k (in), n (out)]` row-major, as GPT-2's `Conv1D` (and Kiln's linear
    /// layers) store it.
    pub fn from_in_out(
        w: &[f32],
        bias: Option<&[f32]>,
        k: usize,
        n: usize,
        fmt: PackedFormat,
    ) -> Self {
        assert!(w.len() >= k * n, "PackedLinear: weight too small");
        Self::build(
            |p, j| w[p * n + j],
            bias,
            k,
            n,
            fmt,
            f32_sub_panel(Path::best()),
        )
    }

    /// Packs a weight stored `[n (out), k (in)]` row-major, as `nn.Linear` (and the tied LM head,
    /// i.e. the token embedding) store it.
    pub fn from_out_in(
        w: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        k: usize,
        fmt: PackedFormat,
    ) -> Self {
        assert!(w.len() >= k * n, "PackedLinear: weight too small");
        Self::build(
            |p, j| w[j * k + p],
            bias,
            k,
            n,
            fmt,
            f32_sub_panel(Path::best()),
        )
    }

    fn build(
        get: impl Fn(usize, usize) -> f32 + Sync,
        bias: Option<&[f32]>,
        k: usize,
        n: usize,
        fmt: PackedFormat,
        sub: usize,
    ) -> Self {
        assert!(k > 0 && n > 0, "PackedLinear: empty weight");
        let panels = n.div_ceil(PANEL);
        let np = panels * PANEL;
        let mut padded_bias = vec![0.0f32; np];
        if let Some(b) = bias {
            padded_bias[..n].copy_from_slice(&b[..n]);
        }
        let mut scale = vec![0.0f32; np];
        let data = match fmt {
            PackedFormat::Int8 => {
                // Symmetric per column: the largest |w| maps to ±127 (so -128 is never used and
                // the range is symmetric); an all-zero column gets scale 0 and zero codes.
                scale[..n].par_iter_mut().enumerate().for_each(|(j, s)| {
                    let amax = (0..k).map(|p| get(p, j).abs()).fold(0.0f32, f32::max);
                    *s = amax / 127.0;
                });
                let mut q = vec![0i8; panels * k * PANEL];
                q.par_chunks_mut(k * PANEL)
                    .enumerate()
                    .for_each(|(pi, panel)| {
                        for p in 0..k {
                            for c in 0..PANEL {
                                let j = pi * PANEL + c;
                                if j < n && scale[j] > 0.0 {
                                    let v = (get(p, j) / scale[j]).round().clamp(-127.0, 127.0);
                                    panel[p * PANEL + c] = v as i8;
                                }
                            }
                        }
                    });
                Data::I8(q)
            }
            PackedFormat::Bf16 => {
                scale[..n].fill(1.0);
                let mut h = vec![0u16; panels * k * PANEL];
                h.par_chunks_mut(k * PANEL)
                    .enumerate()
                    .for_each(|(pi, panel)| {
                        for p in 0..k {
                            for c in 0..PANEL {
                                let j = pi * PANEL + c;
                                if j < n {
                                    panel[p * PANEL + c] = f32_to_bf16(get(p, j));
                                }
                            }
                        }
                    });
                Data::Bf16(h)
            }
            PackedFormat::F32 => {
                scale[..n].fill(1.0);
                let mut f = vec![0.0f32; panels * k * PANEL];
                f.par_chunks_mut(k * PANEL)
                    .enumerate()
                    .for_each(|(pi, panel)| {
                        let cols = (n - pi * PANEL).min(PANEL);
                        for p in 0..k {
                            for c in 0..cols {
                                panel[f32_at(k, sub, p, c)] = get(p, pi * PANEL + c);
                            }
                        }
                    });
                Data::F32 { w: f, sub }
            }
        };
        PackedLinear {
            k,
            n,
            data,
            scale,
            bias: padded_bias,
        }
    }

    pub fn format(&self) -> PackedFormat {
        match self.data {
            Data::I8(_) => PackedFormat::Int8,
            Data::Bf16(_) => PackedFormat::Bf16,
            Data::F32 { .. } => PackedFormat::F32,
        }
    }

    /// Input width.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output width.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes of packed weights and scales (what one product streams), padding included.
    pub fn weight_bytes(&self) -> usize {
        let w = match &self.data {
            Data::I8(q) => q.len(),
            Data::Bf16(h) => 2 * h.len(),
            Data::F32 { w, .. } => 4 * w.len(),
        };
        w + 4 * self.scale.len()
    }

    /// The weights this layer effectively multiplies by, `[k, n]` row-major f32 (for tests and
    /// error measurements).
    pub fn dequantize(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut w = vec![0.0f32; k * n];
        for p in 0..k {
            for j in 0..n {
                let i = (j / PANEL) * k * PANEL + p * PANEL + j % PANEL;
                w[p * n + j] = match &self.data {
                    Data::I8(q) => q[i] as f32 * self.scale[j],
                    Data::Bf16(h) => bf16_to_f32(h[i]),
                    Data::F32 { w, sub } => {
                        w[(j / PANEL) * k * PANEL + f32_at(k, *sub, p, j % PANEL)]
                    }
                };
            }
        }
        w
    }

    /// [`Self::dequantize`] into `w` (`[k, n]` row-major f32, overwritten), rows in parallel: how a
    /// frozen packed base hands its weight to the training matmuls, one layer at a time.
    pub fn dequantize_into(&self, w: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        assert!(
            w.len() >= k * n,
            "PackedLinear::dequantize_into: buffer too small"
        );
        let rows = w[..k * n].par_chunks_mut(n).enumerate();
        // One loop per format (the branch outside), over slices the compiler vectorises.
        match &self.data {
            Data::I8(d) => rows.for_each(|(p, row)| {
                for (q, cols) in row.chunks_mut(PANEL).enumerate() {
                    let at = q * k * PANEL + p * PANEL;
                    let src = &d[at..at + cols.len()];
                    let sc = &self.scale[q * PANEL..q * PANEL + cols.len()];
                    for ((x, &v), &s) in cols.iter_mut().zip(src).zip(sc) {
                        *x = v as f32 * s;
                    }
                }
            }),
            Data::Bf16(h) => rows.for_each(|(p, row)| {
                for (q, cols) in row.chunks_mut(PANEL).enumerate() {
                    let at = q * k * PANEL + p * PANEL;
                    let src = &h[at..at + cols.len()];
                    for (x, &v) in cols.iter_mut().zip(src) {
                        *x = bf16_to_f32(v);
                    }
                }
            }),
            Data::F32 { w, sub } => rows.for_each(|(p, row)| {
                for (q, cols) in row.chunks_mut(*sub).enumerate() {
                    let at = (q * sub / PANEL) * k * PANEL + f32_at(k, *sub, p, q * sub % PANEL);
                    cols.copy_from_slice(&w[at..at + cols.len()]);
                }
            }),
        }
    }

    /// The bias (zeros when the layer has none).
    pub fn bias(&self) -> &[f32] {
        &self.bias[..self.n]
    }

    /// `out[m, n] = x[m, k] · W + bias`, overwriting `out`. Output panels are split into one
    /// contiguous part per thread; the fastest [`Path`] this CPU has.
    pub fn forward(&self, out: &mut [f32], x: &[f32], m: usize) {
        let _span = crate::profile::matmul_span(m, self.k, self.n);
        self.forward_on(Path::best(), out, x, m);
    }

    /// [`Self::forward`] on the portable path whatever the CPU (for tests and comparisons).
    pub fn forward_portable(&self, out: &mut [f32], x: &[f32], m: usize) {
        self.forward_on(Path::Portable, out, x, m);
    }

    /// [`Self::forward`] on a given path (for tests that compare every path the CPU offers).
    /// Panics when the CPU lacks it (see [`Path::available`]).
    pub fn forward_on(&self, path: Path, out: &mut [f32], x: &[f32], m: usize) {
        assert!(path.available(), "{path:?} is not available on this CPU");
        self.forward_impl(out, x, m, path);
    }

    fn forward_impl(&self, out: &mut [f32], x: &[f32], m: usize, path: Path) {
        let (k, n) = (self.k, self.n);
        assert!(x.len() >= m * k, "PackedLinear::forward: x too small");
        assert!(out.len() >= m * n, "PackedLinear::forward: out too small");
        if m == 0 {
            return;
        }
        let panels = n.div_ceil(PANEL);
        let threads = if m * k * n >= PAR_MACS {
            rayon::current_num_threads().max(1)
        } else {
            1
        };
        let per = panels.div_ceil(threads);
        let parts = panels.div_ceil(per);
        let out_p = SyncPtr(out.as_mut_ptr());
        let run = |part: usize| {
            let (q0, q1) = (part * per, ((part + 1) * per).min(panels));
            // SAFETY: the asserts above cover every row of `x` and `out` the kernels touch; parts
            // write disjoint column ranges (whole panels) of `out`.
            unsafe { self.run_panels(out_p.get(), x, m, q0, q1, path) };
        };
        if parts == 1 {
            run(0);
        } else {
            (0..parts).into_par_iter().for_each(run);
        }
    }

    /// # Safety
    /// `out` must be valid for `m * n` floats and `x` hold `m * k`; `q0..q1` are panel indices.
    unsafe fn run_panels(
        &self,
        out: *mut f32,
        x: &[f32],
        m: usize,
        q0: usize,
        q1: usize,
        path: Path,
    ) {
        let (k, n) = (self.k, self.n);
        for q in q0..q1 {
            let cols = (n - q * PANEL).min(PANEL);
            let sc = &self.scale[q * PANEL..(q + 1) * PANEL];
            let bi = &self.bias[q * PANEL..(q + 1) * PANEL];
            let o = out.add(q * PANEL);
            let panel = q * k * PANEL..(q + 1) * k * PANEL;
            // f32 panels run on the register tiles on every path.
            if let Data::F32 { w, sub } = &self.data {
                // The part's next panel, prefetched while this one is computed.
                let next = if q + 1 < q1 {
                    &w[panel.end..panel.end + k * PANEL]
                } else {
                    &[]
                };
                tiles_panel(path, o, n, x, &w[panel], next, *sub, bi, m, k, cols);
                continue;
            }
            #[cfg(target_arch = "x86_64")]
            match (path, &self.data) {
                (Path::Avx512, Data::I8(w)) => {
                    x86::panel(o, n, x, &w[panel], sc, bi, m, k, cols);
                    continue;
                }
                (Path::Avx512, Data::Bf16(w)) => {
                    x86::panel(o, n, x, &w[panel], sc, bi, m, k, cols);
                    continue;
                }
                (Path::Avx2, Data::I8(w)) => {
                    x86::panel_avx2(o, n, x, &w[panel], sc, bi, m, k, cols);
                    continue;
                }
                (Path::Avx2, Data::Bf16(w)) => {
                    x86::panel_avx2(o, n, x, &w[panel], sc, bi, m, k, cols);
                    continue;
                }
                _ => {}
            }
            // Portable path: each row computed into a local panel-wide buffer, then copied out.
            let mut acc = [0.0f32; PANEL];
            for r in 0..m {
                let xr = &x[r * k..(r + 1) * k];
                match &self.data {
                    Data::I8(w) => portable_i8(&mut acc, xr, &w[panel.clone()], sc, bi),
                    Data::Bf16(w) => portable_bf16(&mut acc, xr, &w[panel.clone()], sc, bi),
                    Data::F32 { .. } => unreachable!("f32 panels run on the tiles"),
                }
                let dst = std::slice::from_raw_parts_mut(o.add(r * n), cols);
                dst.copy_from_slice(&acc[..cols]);
            }
        }
    }
}

/// The code paths of the packed product. Both vector paths run the same fused multiply-adds in the
/// same order, so they give the same bits; the portable path rounds products and sums separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Portable,
    /// AVX2 + FMA, 8 lanes (e.g. AMD Zen 3, Intel Haswell and later).
    Avx2,
    /// AVX-512F, 16 lanes.
    Avx512,
}

impl Path {
    pub const ALL: [Path; 3] = [Path::Portable, Path::Avx2, Path::Avx512];

    pub fn available(self) -> bool {
        match self {
            Path::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => simd::level() != simd::Level::Base,
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => simd::level() == simd::Level::V4,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest path this CPU has.
    pub fn best() -> Path {
        *Path::ALL
            .iter()
            .rev()
            .find(|p| p.available())
            .unwrap_or(&Path::Portable)
    }
}

/// One row times one panel: `acc[c] = (sum_p x[p] · w[p, c]) · scale[c] + bias[c]`, products and
/// sums rounded separately (no fused multiply-add), summed in `p` order.
#[inline(always)]
fn portable_row<E: Copy>(
    acc: &mut [f32; PANEL],
    x: &[f32],
    w: &[E],
    scale: &[f32],
    bias: &[f32],
    to_f32: impl Fn(E) -> f32,
) {
    acc.fill(0.0);
    for (p, &xp) in x.iter().enumerate() {
        let wp: &[E; PANEL] = w[p * PANEL..(p + 1) * PANEL].try_into().unwrap();
        for c in 0..PANEL {
            acc[c] += xp * to_f32(wp[c]);
        }
    }
    for c in 0..PANEL {
        acc[c] = acc[c] * scale[c] + bias[c];
    }
}

simd::multiversion! {
    fn portable_i8(acc: &mut [f32; PANEL], x: &[f32], w: &[i8], scale: &[f32], bias: &[f32]) {
        portable_row(acc, x, w, scale, bias, |q| q as f32)
    }
}

/// One f32 panel (`cols` live columns of `PANEL`, stored in sub-panels `sub` wide) for all `m`
/// rows on attention's register tiles, then the bias added while the block is in cache: 6 x 64
/// AVX-512 tiles on whole panel rows, else tiles 16 columns wide (AVX2's 6 x 16 on an AVX-512 CPU
/// too when the panels were packed for it), each sub-panel read as its own product's B.
///
/// # Safety
/// `out` must be valid for rows `0..m` at stride `n` and columns `0..cols`; `x` holds `m * k`;
/// `path` is a path this CPU has.
#[allow(clippy::too_many_arguments)]
unsafe fn tiles_panel(
    path: Path,
    out: *mut f32,
    n: usize,
    x: &[f32],
    w: &[f32],
    next: &[f32],
    sub: usize,
    bias: &[f32],
    m: usize,
    k: usize,
    cols: usize,
) {
    use crate::attention::tiles::{self, Out, Path as Tiles, Product, Trim};
    // Each output starts from its bias and takes the multiply-adds in depth order, as the skinny
    // kernel accumulates onto a bias: a decoded row has the same bits on these panels as on the
    // model's own weights (see `Out::Chain`).
    for r in 0..m {
        let row = std::slice::from_raw_parts_mut(out.add(r * n), cols);
        row.copy_from_slice(&bias[..cols]);
    }
    let prod = Product {
        m,
        n: cols,
        k,
        trim: Trim::None,
        padded: false,
        out: Out::Chain,
    };
    let (c, a) = ((out, n), (x.as_ptr(), k, 1));
    let next = (next.as_ptr(), next.len());
    match (path, sub) {
        #[cfg(target_arch = "x86_64")]
        (Path::Avx512, PANEL) => {
            tiles::product_wide_prefetching(c, a, (w.as_ptr(), PANEL), prod, next)
        }
        _ => {
            let tp = match path {
                Path::Avx512 | Path::Avx2 => Tiles::Avx2,
                Path::Portable => Tiles::Portable,
            };
            debug_assert_eq!(tp.nr(), 16);
            // Sub-panels of 16 are the tiles' panels (`k * 16` apart); in 64-wide rows they are
            // 16 floats apart.
            let b_ps = if sub == 16 { k * 16 } else { 16 };
            tiles::product_prefetching(tp, c, a, (w.as_ptr(), sub, b_ps), prod, next);
        }
    }
}

simd::multiversion! {
    fn portable_bf16(acc: &mut [f32; PANEL], x: &[f32], w: &[u16], scale: &[f32], bias: &[f32]) {
        portable_row(acc, x, w, scale, bias, bf16_to_f32)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::PANEL;
    use crate::simd::lanes::{Lanes, L16, L8};
    use std::arch::x86_64::*;

    /// Software prefetch distance into the packed panel stream (16 inputs of an int8 panel, 8 of
    /// bf16). Measured on batch-1 decoding: the hardware prefetcher alone leaves the stream a little
    /// short of L3 bandwidth.
    const PREFETCH_BYTES: usize = 1024;

    /// A packed weight element that widens to f32 lanes of `S`.
    pub(super) trait Widen<S: Lanes>: Copy {
        /// `S::W` consecutive elements at `p` as f32.
        ///
        /// # Safety
        /// `p` must be valid for `S::W` elements; the CPU must have `S`'s instruction set.
        unsafe fn widen(p: *const Self) -> S;
    }

    impl Widen<L16> for i8 {
        #[inline(always)]
        unsafe fn widen(p: *const i8) -> L16 {
            // vpmovsxbd (sign-extend 16 bytes to 16 i32) + vcvtdq2ps: exact for |q| <= 127.
            L16(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                p as *const __m128i,
            ))))
        }
    }

    impl Widen<L16> for u16 {
        #[inline(always)]
        unsafe fn widen(p: *const u16) -> L16 {
            // bf16 is the high half of an f32: zero-extend to 32 bits and shift left by 16.
            let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            L16(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(h)))
        }
    }

    impl Widen<L8> for i8 {
        #[inline(always)]
        unsafe fn widen(p: *const i8) -> L8 {
            L8(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                p as *const __m128i,
            ))))
        }
    }

    impl Widen<L8> for u16 {
        #[inline(always)]
        unsafe fn widen(p: *const u16) -> L8 {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            L8(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(h)))
        }
    }

    /// All `m` rows of `x` times one panel `w` (`k * PANEL` elements), written to the first `cols`
    /// columns at `out` (row stride `n`): column blocks of `V` vectors, rows in groups of up to
    /// `R`, each group streaming its columns of the panel once (the weight vectors widened once per
    /// input, then one FMA per row and vector). Every path runs the same FMAs in the same order,
    /// so the vector widths give the same bits.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn panel_cols<S: Lanes, E: Widen<S>, const R: usize, const V: usize>(
        out: *mut f32,
        n: usize,
        x: &[f32],
        w: &[E],
        scale: &[f32],
        bias: &[f32],
        m: usize,
        k: usize,
        cols: usize,
    ) {
        debug_assert!(w.len() >= k * PANEL && x.len() >= m * k);
        let mut c0 = 0;
        while c0 < cols {
            let mut r = 0;
            while r < m {
                let rows = (m - r).min(R);
                macro_rules! block {
                    ($($r:literal)*) => {
                        match rows {
                            $($r => block::<S, E, $r, V>(out, n, x, w, scale, bias, r, k, c0, cols),)*
                            _ => unreachable!(),
                        }
                    };
                }
                block!(1 2 3 4 5 6);
                r += rows;
            }
            c0 += V * S::W;
        }
    }

    /// Rows `r0..r0+R` times columns `c0..c0+V·W` of one panel (stores stop at `cols`).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<S: Lanes, E: Widen<S>, const R: usize, const V: usize>(
        out: *mut f32,
        n: usize,
        x: &[f32],
        w: &[E],
        scale: &[f32],
        bias: &[f32],
        r0: usize,
        k: usize,
        c0: usize,
        cols: usize,
    ) {
        let mut acc = [[S::zero(); V]; R];
        let xp = x.as_ptr().add(r0 * k);
        let wp = w.as_ptr().add(c0);
        for p in 0..k {
            let wr = wp.add(p * PANEL);
            // Ask for the block's lines a little ahead of use (wrapping: past the end is harmless).
            let ahead = (wr as *const i8).wrapping_add(PREFETCH_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            if std::mem::size_of::<E>() * V * S::W > 64 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            }
            let mut wv = [S::zero(); V];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = E::widen(wr.add(v * S::W));
            }
            for (r, ar) in acc.iter_mut().enumerate() {
                let xb = S::splat(*xp.add(r * k + p));
                for v in 0..V {
                    ar[v] = ar[v].fma(xb, wv[v]);
                }
            }
        }
        for v in 0..V {
            let c = c0 + v * S::W;
            if c >= cols {
                break;
            }
            let lanes = (cols - c).min(S::W);
            let sc = S::load(scale.as_ptr().add(c), S::W);
            let bi = S::load(bias.as_ptr().add(c), S::W);
            for (r, ar) in acc.iter().enumerate() {
                // acc · scale + bias, fused.
                bi.fma(ar[v], sc).store(out.add((r0 + r) * n + c), lanes);
            }
        }
    }

    /// # Safety
    /// AVX-512F; `out` valid for `m` rows of stride `n` with `cols` columns; `x` holds `m * k`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn panel<E: Widen<L16>>(
        out: *mut f32,
        n: usize,
        x: &[f32],
        w: &[E],
        scale: &[f32],
        bias: &[f32],
        m: usize,
        k: usize,
        cols: usize,
    ) {
        // The whole panel (4 vectors) for up to 6 rows: 24 accumulators, 4 weight vectors and a
        // broadcast are 29 of the 32 registers; each widened weight vector feeds 6 rows, which is
        // what bounds a large batch (RL rollouts), where the panel already sits in cache.
        panel_cols::<L16, E, 6, 4>(out, n, x, w, scale, bias, m, k, cols)
    }

    /// [`panel`] with 8-lane AVX2 vectors. AVX2 has 16 registers, so one row takes the whole panel
    /// (8 accumulators) and several rows go two at a time over each half panel.
    ///
    /// # Safety
    /// AVX2 and FMA; `out` valid for `m` rows of stride `n` with `cols` columns; `x` holds `m * k`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn panel_avx2<E: Widen<L8>>(
        out: *mut f32,
        n: usize,
        x: &[f32],
        w: &[E],
        scale: &[f32],
        bias: &[f32],
        m: usize,
        k: usize,
        cols: usize,
    ) {
        if m == 1 {
            panel_cols::<L8, E, 1, 8>(out, n, x, w, scale, bias, m, k, cols)
        } else {
            panel_cols::<L8, E, 2, 4>(out, n, x, w, scale, bias, m, k, cols)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    /// f64 reference on the dequantized weights, `x · W + bias`, and for each element the rigorous
    /// bound on f32 rounding error of a `k`-term sum, a scale and a bias: `(k + 3) u (sum |x w| + |b|)`
    /// with `u = 2^-24`.
    fn reference(l: &PackedLinear, x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
        let (k, n) = (l.k(), l.n());
        let w = l.dequantize();
        let b = l.bias();
        let u = (k + 3) as f64 * f64::powi(2.0, -24);
        let (mut y, mut bound) = (vec![0.0f64; m * n], vec![0.0f64; m * n]);
        for r in 0..m {
            for j in 0..n {
                let mut s = b[j] as f64;
                let mut a = (b[j] as f64).abs();
                for p in 0..k {
                    let t = x[r * k + p] as f64 * w[p * n + j] as f64;
                    s += t;
                    a += t.abs();
                }
                y[r * n + j] = s;
                bound[r * n + j] = u * a;
            }
        }
        (y, bound)
    }

    fn assert_within(got: &[f32], want: &[f64], bound: &[f64], what: &str) {
        for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
            let err = (g as f64 - w).abs();
            assert!(
                err <= b,
                "{what}: element {i}: got {g}, want {w}, err {err:.3e} > {b:.3e}"
            );
        }
    }

    /// Every format, f32 in both of its layouts (the sub-panel width is ignored by the others).
    const LAYOUTS: [(PackedFormat, usize); 4] = [
        (PackedFormat::Int8, PANEL),
        (PackedFormat::Bf16, PANEL),
        (PackedFormat::F32, PANEL),
        (PackedFormat::F32, 16),
    ];

    #[test]
    fn dequantize_into_matches_dequantize() {
        for (fmt, sub) in LAYOUTS {
            for &(k, n) in &[(1, 1), (17, 70), (33, 129), (64, 64)] {
                let w: Vec<f32> = (0..k * n)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 41.0)
                    .collect();
                let l = PackedLinear::build(|p, j| w[p * n + j], None, k, n, fmt, sub);
                let mut got = vec![f32::NAN; k * n];
                l.dequantize_into(&mut got);
                let d = l.dequantize();
                assert_eq!(got, d, "{fmt:?} ({sub}) {k}x{n}");
                if fmt == PackedFormat::F32 {
                    assert_eq!(d, w, "{fmt:?} ({sub}) {k}x{n}: not the packed weights");
                }
            }
        }
    }

    const SHAPES: [(usize, usize, usize); 11] = [
        (1, 1, 1),
        (1, 384, 1152),
        (2, 17, 70),
        (3, 33, 129),
        (4, 64, 64),
        (5, 100, 200),
        (7, 1536, 65),
        (16, 40, 191),
        (9, 3, 300),
        (40, 70, 129),
        (67, 384, 200),
    ];

    #[test]
    fn int8_quantization_error_is_half_a_step() {
        let mut g = rng(1);
        let (k, n) = (77, 131);
        let mut w = randn(&mut g, k * n, 0.3);
        // An all-zero column and one with a single large weight.
        for p in 0..k {
            w[p * n + 5] = 0.0;
        }
        w[3 * n + 9] = 40.0;
        let l = PackedLinear::from_in_out(&w, None, k, n, PackedFormat::Int8);
        let d = l.dequantize();
        for j in 0..n {
            let amax = (0..k).map(|p| w[p * n + j].abs()).fold(0.0f32, f32::max);
            let step = amax / 127.0;
            for p in 0..k {
                let err = (d[p * n + j] - w[p * n + j]).abs();
                assert!(
                    err <= step * 0.5 * (1.0 + 1e-5) + 1e-12,
                    "col {j} row {p}: err {err} > step/2 {}",
                    step * 0.5
                );
            }
        }
        assert_eq!(
            d[3 * n + 9],
            40.0,
            "the column maximum is represented exactly"
        );
        assert!((0..k).all(|p| d[p * n + 5] == 0.0));
    }

    #[test]
    fn bf16_rounding() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(bf16_to_f32(f32_to_bf16(-2.5)), -2.5);
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to even (1).
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        let mut g = rng(2);
        for &v in &randn(&mut g, 1000, 10.0) {
            let r = bf16_to_f32(f32_to_bf16(v));
            assert!(((r - v) / v).abs() <= 1.0 / 256.0, "{v} -> {r}");
        }
    }

    #[test]
    fn forward_matches_f64_reference_on_every_path_and_format() {
        let mut g = rng(3);
        let paths: Vec<Path> = Path::ALL.into_iter().filter(|p| p.available()).collect();
        eprintln!("packed product paths on this CPU: {paths:?}");
        for (fmt, sub) in LAYOUTS {
            for &(m, k, n) in &SHAPES {
                let w = randn(&mut g, k * n, 0.5);
                let b = randn(&mut g, n, 0.5);
                let x = randn(&mut g, m * k, 1.0);
                let l = PackedLinear::build(|p, j| w[p * n + j], Some(&b), k, n, fmt, sub);
                let (want, bound) = reference(&l, &x, m);
                let what = format!("{fmt:?} (f32 sub-panels {sub}) m={m} k={k} n={n}");
                let mut vector_bits: Option<(Path, Vec<u32>)> = None;
                for &path in &paths {
                    let mut y = vec![f32::NAN; m * n];
                    l.forward_on(path, &mut y, &x, m);
                    assert_within(&y, &want, &bound, &format!("{what} {path:?}"));
                    if path == Path::Portable {
                        continue;
                    }
                    // The vector paths run the same fused multiply-adds in the same order.
                    match &vector_bits {
                        None => vector_bits = Some((path, y.bits())),
                        Some((first, bits)) => {
                            assert_eq!(&y.bits(), bits, "{what}: {path:?} differs from {first:?}")
                        }
                    }
                }
                if sub != f32_sub_panel(Path::best()) {
                    continue;
                }
                let mut best = vec![f32::NAN; m * n];
                l.forward(&mut best, &x, m);
                let mut on_best = vec![f32::NAN; m * n];
                l.forward_on(Path::best(), &mut on_best, &x, m);
                assert_eq!(
                    best.bits(),
                    on_best.bits(),
                    "{what}: forward is not the best path"
                );
            }
        }
    }

    #[test]
    fn out_in_layout_matches_in_out() {
        let mut g = rng(4);
        let (k, n, m) = (45, 100, 3);
        let w = randn(&mut g, k * n, 1.0);
        let mut wt = vec![0.0; k * n];
        for p in 0..k {
            for j in 0..n {
                wt[j * k + p] = w[p * n + j];
            }
        }
        let x = randn(&mut g, m * k, 1.0);
        for fmt in [PackedFormat::Int8, PackedFormat::Bf16, PackedFormat::F32] {
            let a = PackedLinear::from_in_out(&w, None, k, n, fmt);
            let b = PackedLinear::from_out_in(&wt, None, n, k, fmt);
            assert_eq!(a.dequantize().bits(), b.dequantize().bits());
            let (mut ya, mut yb) = (vec![0.0; m * n], vec![0.0; m * n]);
            a.forward(&mut ya, &x, m);
            b.forward(&mut yb, &x, m);
            assert_eq!(ya.bits(), yb.bits());
            assert_eq!(a.bias(), vec![0.0; n].as_slice());
        }
    }

    #[test]
    fn deterministic_across_threads_and_batch_composition() {
        let mut g = rng(5);
        let (m, k, n) = (11, 300, 777);
        let w = randn(&mut g, k * n, 0.5);
        let b = randn(&mut g, n, 0.5);
        let x = randn(&mut g, m * k, 1.0);
        for (fmt, sub) in LAYOUTS {
            let l = PackedLinear::build(|p, j| w[p * n + j], Some(&b), k, n, fmt, sub);
            for path in Path::ALL.into_iter().filter(|p| p.available()) {
                let run = |rows: &[f32], mm: usize| {
                    let mut y = vec![0.0; mm * n];
                    l.forward_on(path, &mut y, rows, mm);
                    y
                };
                let reference = run(&x, m);
                assert_thread_independent(&reference, || run(&x, m));
                // Each row alone gives the same bits as inside the batch.
                for r in 0..m {
                    let alone = run(&x[r * k..(r + 1) * k], 1);
                    assert_eq!(
                        alone.bits(),
                        reference[r * n..(r + 1) * n].to_vec().bits(),
                        "{fmt:?} ({sub}) {path:?}: row {r} depends on its batch"
                    );
                }
            }
        }
    }

    #[test]
    fn int8_close_to_f32_product() {
        // The end-to-end error against the unquantized weights is bounded by the rounding:
        // |sum_p x_p (w_p - q_p s)| <= s/2 · sum_p |x_p|.
        let mut g = rng(6);
        let (m, k, n) = (2, 384, 150);
        let w = randn(&mut g, k * n, 0.1);
        let x = randn(&mut g, m * k, 1.0);
        let l = PackedLinear::from_in_out(&w, None, k, n, PackedFormat::Int8);
        let mut y = vec![0.0; m * n];
        l.forward(&mut y, &x, m);
        for r in 0..m {
            let l1: f64 = x[r * k..(r + 1) * k].iter().map(|v| v.abs() as f64).sum();
            for j in 0..n {
                let exact: f64 = (0..k)
                    .map(|p| x[r * k + p] as f64 * w[p * n + j] as f64)
                    .sum();
                let amax = (0..k).map(|p| w[p * n + j].abs()).fold(0.0f32, f32::max);
                let bound = amax as f64 / 254.0 * l1 + 1e-5;
                let err = (y[r * n + j] as f64 - exact).abs();
                assert!(err <= bound, "row {r} col {j}: err {err} > bound {bound}");
            }
        }
    }

    /// A decoded row has the same bits on f32 panels as on the weights themselves: for every row
    /// count the skinny kernel takes, with and without a bias, on each vector path in both panel
    /// layouts, the panel product equals the skinny product accumulated onto the bias (how
    /// `linear_forward` decodes). What lets `kiln serve` decode on panels and still give a
    /// sequence the logits it has alone in `kiln chat`.
    #[test]
    fn f32_panels_give_the_skinny_kernels_bits() {
        use crate::matmul::skinny;
        let mut g = rng(9);
        let pairs = [
            (Path::Avx512, skinny::Path::Avx512),
            (Path::Avx2, skinny::Path::Avx2),
        ];
        let mut ran = 0;
        for (path, sk) in pairs.into_iter().filter(|(p, _)| p.available()) {
            for &(k, n) in &[(37usize, 150usize), (96, 64), (200, 70)] {
                let w = randn(&mut g, k * n, 0.5);
                let bias = randn(&mut g, n, 0.5);
                for with_bias in [false, true] {
                    for sub in [PANEL, 16] {
                        let b = with_bias.then_some(&bias[..]);
                        let l = PackedLinear::build(
                            |p, j| w[p * n + j],
                            b,
                            k,
                            n,
                            PackedFormat::F32,
                            sub,
                        );
                        for m in 1..=skinny::MAX_ROWS {
                            let x = randn(&mut g, m * k, 1.0);
                            let mut want = vec![0.0f32; m * n];
                            if with_bias {
                                want.chunks_mut(n).for_each(|r| r.copy_from_slice(&bias));
                            }
                            skinny::matmul_on(sk, &mut want, &x, &w, m, k, n, false, with_bias);
                            let mut got = vec![f32::NAN; m * n];
                            l.forward_on(path, &mut got, &x, m);
                            let diff = got
                                .iter()
                                .zip(&want)
                                .position(|(a, b)| a.to_bits() != b.to_bits());
                            assert!(
                                diff.is_none(),
                                "{path:?} {k}x{n} bias {with_bias} sub {sub} rows {m}: element {diff:?} differs"
                            );
                            ran += 1;
                        }
                    }
                }
            }
        }
        if ran == 0 {
            eprintln!("no vector path on this CPU: f32 panels and the skinny kernel not compared");
        }
    }
}
