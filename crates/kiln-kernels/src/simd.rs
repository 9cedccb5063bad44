//! Small building blocks shared by the element-wise kernels: runtime CPU dispatch, lane-parallel
//! reductions, and branch-free `exp` / `ln` that the compiler can vectorise.
//!
//! Why: rustc targets baseline x86-64 (SSE2) unless told otherwise, and it never reassociates float
//! sums, so a plain `for x in row { s += x }` runs one scalar add at a time. We therefore
//! (1) keep `LANES` independent accumulators so reductions vectorise, reduced in a fixed tree order
//! (deterministic, and identical whatever the vector width), and (2) compile the hot row kernels twice,
//! once for AVX2+FMA, picked at runtime. No `mul_add` is used, so both builds give bit-identical results.

/// Number of independent accumulators in reductions (two AVX-512 / four AVX2 registers).
pub(crate) const LANES: usize = 32;

/// Which instruction set the multiversioned kernels run with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Level {
    Base,
    V3,
    V4,
}

/// Detected once, then a single relaxed load (integer atomics, not float ones).
#[inline]
pub(crate) fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::atomic::{AtomicU8, Ordering};
        static LEVEL: AtomicU8 = AtomicU8::new(u8::MAX);
        match LEVEL.load(Ordering::Relaxed) {
            0 => Level::Base,
            1 => Level::V3,
            2 => Level::V4,
            _ => {
                let v3 =
                    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
                let v4 = v3
                    && std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512dq")
                    && std::is_x86_feature_detected!("avx512vl");
                let detected = if v4 {
                    Level::V4
                } else if v3 {
                    Level::V3
                } else {
                    Level::Base
                };
                // KILN_SIMD caps the level, so one machine can run (and test) the paths of an
                // older CPU: `avx2` as on an AMD Zen 3, `base` for the portable code.
                let cap = match std::env::var("KILN_SIMD").ok().as_deref() {
                    Some("base") => Level::Base,
                    Some("avx2") => Level::V3,
                    _ => Level::V4,
                };
                let level = if (cap as u8) < (detected as u8) {
                    cap
                } else {
                    detected
                };
                LEVEL.store(level as u8, Ordering::Relaxed);
                level
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Level::Base
    }
}

/// Whether the CPU is AMD's (some kernel choices follow its narrower FMA throughput).
pub(crate) fn amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AMD.get_or_init(|| {
            let id = std::arch::x86_64::__cpuid(0);
            // "AuthenticAMD": the vendor string in ebx, edx, ecx.
            (id.ebx, id.edx, id.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163)
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines a function whose body is compiled three times (baseline, AVX2+FMA, AVX-512) and dispatched
/// at runtime.
/// The body must only call `#[inline(always)]` helpers in its inner loops, so they get the wide build.
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx,avx2,fma,bmi1,bmi2,lzcnt,popcnt,f16c")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx,avx2,fma,bmi1,bmi2,lzcnt,popcnt,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                match $crate::simd::level() {
                    // SAFETY: `level()` verified at runtime that the CPU supports these features.
                    $crate::simd::Level::V4 => return unsafe { v4($($arg),*) },
                    $crate::simd::Level::V3 => return unsafe { v3($($arg),*) },
                    $crate::simd::Level::Base => {}
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Fixed-order tree reduction of the lane accumulators.
#[inline(always)]
fn reduce_lanes(mut acc: [f32; LANES], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for k in 0..w {
            acc[k] = op(acc[k], acc[k + w]);
        }
        w /= 2;
    }
    acc[0]
}

/// Sum of `x`, vectorised, deterministic.
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut it = x.chunks_exact(LANES);
    for ch in &mut it {
        let ch: &[f32; LANES] = ch.try_into().unwrap();
        for k in 0..LANES {
            acc[k] += ch[k];
        }
    }
    for (a, &v) in acc.iter_mut().zip(it.remainder()) {
        *a += v;
    }
    reduce_lanes(acc, |a, b| a + b)
}

/// `x[i] = exp(x[i] - mx)` in place, returning the sum of the results: one pass instead of an
/// exponential pass and a [`sum`] (whose lane order and result it keeps, bit for bit).
#[inline(always)]
pub(crate) fn exp_sum(x: &mut [f32], mx: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut it = x.chunks_exact_mut(LANES);
    for ch in &mut it {
        let ch: &mut [f32; LANES] = ch.try_into().unwrap();
        for k in 0..LANES {
            ch[k] = exp(ch[k] - mx);
            acc[k] += ch[k];
        }
    }
    for (a, v) in acc.iter_mut().zip(it.into_remainder()) {
        *v = exp(*v - mx);
        *a += *v;
    }
    reduce_lanes(acc, |a, b| a + b)
}

/// Dot product of `a` and `b` (same length), vectorised, deterministic.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let b = &b[..a.len()];
    let mut acc = [0.0f32; LANES];
    let mut ia = a.chunks_exact(LANES);
    let mut ib = b.chunks_exact(LANES);
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        let ca: &[f32; LANES] = ca.try_into().unwrap();
        let cb: &[f32; LANES] = cb.try_into().unwrap();
        for k in 0..LANES {
            acc[k] += ca[k] * cb[k];
        }
    }
    for ((acc, &x), &y) in acc.iter_mut().zip(ia.remainder()).zip(ib.remainder()) {
        *acc += x * y;
    }
    reduce_lanes(acc, |a, b| a + b)
}

/// Maximum of `x` (`-inf` when empty), vectorised.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut it = x.chunks_exact(LANES);
    for ch in &mut it {
        let ch: &[f32; LANES] = ch.try_into().unwrap();
        for k in 0..LANES {
            // `if` form lowers to a single max instruction (f32::max adds NaN handling).
            acc[k] = if ch[k] > acc[k] { ch[k] } else { acc[k] };
        }
    }
    for (a, &v) in acc.iter_mut().zip(it.remainder()) {
        *a = if v > *a { v } else { *a };
    }
    reduce_lanes(acc, |a, b| if b > a { b } else { a })
}

/// Branch-free `e^x` (Cephes polynomial, ~1 ulp on the useful range), vectorisable.
/// Returns exactly 0 for x < -87.33 (and for -inf), so masked scores contribute exact zeros and
/// no denormals are produced; saturates near f32::MAX for x > 88.37.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let underflow = x < -87.33;
    let xc = x.clamp(-87.33, 88.37);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * z + r + 1.0;
    let pow2n = f32::from_bits(((ni + 127) as u32) << 23);
    if underflow {
        0.0
    } else {
        y * pow2n
    }
}

/// Branch-free natural log for positive normal `x` (Cephes polynomial, ~1 ulp), vectorisable.
/// For 0 and denormals it returns a finite value near -88 (instead of -inf), so `p * ln(p)` is 0
/// rather than NaN for p = 0, which is what entropy computations want.
#[inline(always)]
pub(crate) fn ln(x: f32) -> f32 {
    const SQRT2: f32 = std::f32::consts::SQRT_2;
    let bits = x.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // mantissa in [1, 2)
                                                                // Re-centre the mantissa on 1: [sqrt(1/2), sqrt(2)).
    let big = m > SQRT2;
    let m = if big { m * 0.5 } else { m };
    let e = (if big { e + 1 } else { e }) as f32;
    let f = m - 1.0;
    let z = f * f;
    let mut p = 7.037_683_6e-2f32;
    p = p * f - 1.151_461e-1;
    p = p * f + 1.167_699_9e-1;
    p = p * f - 1.242_014_1e-1;
    p = p * f + 1.424_932_3e-1;
    p = p * f - 1.666_805_8e-1;
    p = p * f + 2.000_071_4e-1;
    p = p * f - 2.499_999_4e-1;
    p = p * f + 3.333_333e-1;
    let y = p * f * z + e * -2.121_944_4e-4 - 0.5 * z;
    f + y + e * 0.693_359_4
}

/// `out[i] += x[i]`, vectorised (the compiler does this on its own for zipped slices).
#[inline(always)]
pub(crate) fn add_to(out: &mut [f32], x: &[f32]) {
    let x = &x[..out.len()];
    for (o, &v) in out.iter_mut().zip(x) {
        *o += v;
    }
}

/// Rows per task for row reductions with per-task partial sums (e.g. bias gradients): at least
/// `min_rows`, and few enough that there are at most 64 partials to allocate and add up. Depends
/// only on `n`, never on the thread count, so the summation order is fixed.
pub(crate) fn rows_per_block(n: usize, min_rows: usize) -> usize {
    min_rows.max(n.div_ceil(64)).max(1)
}

/// A raw pointer that rayon tasks may share. Used only where tasks provably write disjoint
/// (strided) regions of one buffer, e.g. one attention head's columns.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub *mut f32);
// SAFETY: users guarantee disjoint writes (see each use site).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// Accessor, so closures capture the whole `SyncPtr` (edition 2021 would capture the raw field).
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// One vector register of f32 lanes, for kernels written once for AVX-512 (16 lanes) and AVX2
/// (8 lanes): the generic body is `#[inline(always)]` and each width's entry point enables its
/// target features. [`P8`] is a portable stand-in for CPUs with neither.
pub(crate) mod lanes {
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// One vector register of f32 lanes; `cnt` arguments are the lanes in use (the rest are
    /// neither read nor written, so tails never touch memory past a row).
    pub(crate) trait Lanes: Copy {
        const W: usize;
        unsafe fn zero() -> Self;
        unsafe fn load(p: *const f32, cnt: usize) -> Self;
        unsafe fn store(self, p: *mut f32, cnt: usize);
        unsafe fn splat(x: f32) -> Self;
        /// `a * b + self`, fused (except on [`P8`]).
        unsafe fn fma(self, a: Self, b: Self) -> Self;
        unsafe fn add(self, a: Self) -> Self;
        unsafe fn mul(self, a: Self) -> Self;
        unsafe fn sum(self) -> f32;
    }

    /// Eight lanes in plain arrays (the compiler vectorises what the baseline target allows);
    /// multiply and add are separate, as anywhere else in the portable build.
    #[derive(Clone, Copy)]
    pub(crate) struct P8(pub(crate) [f32; 8]);

    impl Lanes for P8 {
        const W: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            P8([0.0; 8])
        }
        #[inline(always)]
        unsafe fn load(p: *const f32, cnt: usize) -> Self {
            let mut v = [0.0; 8];
            for (i, x) in v.iter_mut().enumerate().take(cnt) {
                *x = *p.add(i);
            }
            P8(v)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, cnt: usize) {
            for (i, &x) in self.0.iter().enumerate().take(cnt) {
                *p.add(i) = x;
            }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            P8([x; 8])
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            P8(std::array::from_fn(|i| a.0[i] * b.0[i] + self.0[i]))
        }
        #[inline(always)]
        unsafe fn add(self, a: Self) -> Self {
            P8(std::array::from_fn(|i| self.0[i] + a.0[i]))
        }
        #[inline(always)]
        unsafe fn mul(self, a: Self) -> Self {
            P8(std::array::from_fn(|i| self.0[i] * a.0[i]))
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            self.0.iter().sum()
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[derive(Clone, Copy)]
    pub(crate) struct L16(pub(crate) __m512);

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn mask16(cnt: usize) -> __mmask16 {
        if cnt >= 16 {
            0xffff
        } else {
            ((1u32 << cnt) - 1) as __mmask16
        }
    }

    #[cfg(target_arch = "x86_64")]
    impl Lanes for L16 {
        const W: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            L16(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn load(p: *const f32, cnt: usize) -> Self {
            L16(_mm512_maskz_loadu_ps(mask16(cnt), p))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, cnt: usize) {
            _mm512_mask_storeu_ps(p, mask16(cnt), self.0)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            L16(_mm512_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            L16(_mm512_fmadd_ps(a.0, b.0, self.0))
        }
        #[inline(always)]
        unsafe fn add(self, a: Self) -> Self {
            L16(_mm512_add_ps(self.0, a.0))
        }
        #[inline(always)]
        unsafe fn mul(self, a: Self) -> Self {
            L16(_mm512_mul_ps(self.0, a.0))
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            _mm512_reduce_add_ps(self.0)
        }
    }

    /// Transpose of a 16 x 16 matrix of 32-bit elements, one row per register.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(crate) unsafe fn transpose16(r: &[__m512i; 16]) -> [__m512i; 16] {
        // Rows 4g..4g+4: u[4g + s] holds, in 128-bit lane L, column 4L + s of those rows.
        let mut u = [_mm512_setzero_si512(); 16];
        for g in 0..4 {
            let (a, b, c, d) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
            let (ab_lo, ab_hi) = (_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
            let (cd_lo, cd_hi) = (_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
            u[4 * g] = _mm512_unpacklo_epi64(ab_lo, cd_lo);
            u[4 * g + 1] = _mm512_unpackhi_epi64(ab_lo, cd_lo);
            u[4 * g + 2] = _mm512_unpacklo_epi64(ab_hi, cd_hi);
            u[4 * g + 3] = _mm512_unpackhi_epi64(ab_hi, cd_hi);
        }
        // Gather the four row groups' lanes of each column.
        let mut out = [_mm512_setzero_si512(); 16];
        for s in 0..4 {
            let v88 = _mm512_shuffle_i32x4::<0x88>(u[s], u[4 + s]);
            let vdd = _mm512_shuffle_i32x4::<0xdd>(u[s], u[4 + s]);
            let w88 = _mm512_shuffle_i32x4::<0x88>(u[8 + s], u[12 + s]);
            let wdd = _mm512_shuffle_i32x4::<0xdd>(u[8 + s], u[12 + s]);
            out[s] = _mm512_shuffle_i32x4::<0x88>(v88, w88);
            out[8 + s] = _mm512_shuffle_i32x4::<0xdd>(v88, w88);
            out[4 + s] = _mm512_shuffle_i32x4::<0x88>(vdd, wdd);
            out[12 + s] = _mm512_shuffle_i32x4::<0xdd>(vdd, wdd);
        }
        out
    }

    /// Transpose of an 8 x 8 matrix of f32, one row per register.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(crate) unsafe fn transpose8(r: &[__m256; 8]) -> [__m256; 8] {
        // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves exchanged.
        // Written out (no closures: those are not compiled with the caller's target features).
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let q = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xee>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xee>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xee>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xee>(t[5], t[7]),
        ];
        [
            _mm256_permute2f128_ps::<0x20>(q[0], q[4]),
            _mm256_permute2f128_ps::<0x20>(q[1], q[5]),
            _mm256_permute2f128_ps::<0x20>(q[2], q[6]),
            _mm256_permute2f128_ps::<0x20>(q[3], q[7]),
            _mm256_permute2f128_ps::<0x31>(q[0], q[4]),
            _mm256_permute2f128_ps::<0x31>(q[1], q[5]),
            _mm256_permute2f128_ps::<0x31>(q[2], q[6]),
            _mm256_permute2f128_ps::<0x31>(q[3], q[7]),
        ]
    }

    #[cfg(target_arch = "x86_64")]
    #[derive(Clone, Copy)]
    pub(crate) struct L8(pub(crate) __m256);

    /// Lane masks for AVX2's masked loads and stores: 8 lanes on, then 8 off.
    #[cfg(target_arch = "x86_64")]
    static MASK8: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn mask8(cnt: usize) -> __m256i {
        _mm256_loadu_si256(MASK8.as_ptr().add(8 - cnt.min(8)) as *const __m256i)
    }

    #[cfg(target_arch = "x86_64")]
    impl Lanes for L8 {
        const W: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            L8(_mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn load(p: *const f32, cnt: usize) -> Self {
            if cnt >= 8 {
                L8(_mm256_loadu_ps(p))
            } else {
                L8(_mm256_maskload_ps(p, mask8(cnt)))
            }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, cnt: usize) {
            if cnt >= 8 {
                _mm256_storeu_ps(p, self.0)
            } else {
                _mm256_maskstore_ps(p, mask8(cnt), self.0)
            }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            L8(_mm256_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            L8(_mm256_fmadd_ps(a.0, b.0, self.0))
        }
        #[inline(always)]
        unsafe fn add(self, a: Self) -> Self {
            L8(_mm256_add_ps(self.0, a.0))
        }
        #[inline(always)]
        unsafe fn mul(self, a: Self) -> Self {
            L8(_mm256_mul_ps(self.0, a.0))
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let s = _mm_add_ps(
                _mm256_castps256_ps128(self.0),
                _mm256_extractf128_ps::<1>(self.0),
            );
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_ln_accuracy() {
        let mut worst_exp = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let a = exp(x) as f64;
            let r = (x as f64).exp();
            worst_exp = worst_exp.max(((a - r) / r).abs());
            x += 0.0137;
        }
        assert!(worst_exp < 5e-7, "exp rel err {worst_exp}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);

        let mut worst_ln = 0f64;
        let mut x = 1e-30f32;
        while x < 1e30 {
            let a = ln(x) as f64;
            let r = (x as f64).ln();
            worst_ln = worst_ln.max((a - r).abs() / r.abs().max(1.0));
            x *= 1.0173;
        }
        assert!(worst_ln < 5e-7, "ln err {worst_ln}");
        assert!(ln(0.0).is_finite() && ln(0.0) < -80.0);
        assert_eq!(0.0 * ln(0.0), 0.0);
    }

    #[test]
    fn reductions() {
        let x: Vec<f32> = (0..101).map(|i| ((i * 37) % 23) as f32 - 11.0).collect();
        let y: Vec<f32> = (0..101).map(|i| ((i * 13) % 7) as f32 * 0.5).collect();
        assert_eq!(sum(&x), x.iter().sum::<f32>());
        assert_eq!(
            dot(&x, &y),
            x.iter().zip(&y).map(|(a, b)| a * b).sum::<f32>()
        );
        assert_eq!(max(&x), 11.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let mut e = x.clone();
        let total = exp_sum(&mut e, 3.0);
        let want: Vec<f32> = x.iter().map(|&v| exp(v - 3.0)).collect();
        assert_eq!(e, want);
        assert_eq!(total.to_bits(), sum(&want).to_bits());
        assert_eq!(sum(&[]), 0.0);
    }
}
