//! Shared test helpers: seeded data, f64 loss sums, central finite differences, comparisons.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform in [-scale, scale).
pub fn randn(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
        .collect()
}

/// The scalar test loss `L = sum(out * weights)`, summed in f64.
pub fn weighted_sum(out: &[f32], weights: &[f32]) -> f64 {
    assert_eq!(out.len(), weights.len());
    out.iter()
        .zip(weights)
        .map(|(&o, &w)| o as f64 * w as f64)
        .sum()
}

/// Central differences `(L(x + eps e_i) - L(x - eps e_i)) / 2 eps` for every element of `x`,
/// perturbing in f32 and dividing by the step actually taken.
pub fn numgrad(x: &[f32], eps: f32, mut loss: impl FnMut(&[f32]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = x[i];
            x[i] = orig + eps;
            let hi = x[i];
            let lp = loss(&x);
            x[i] = orig - eps;
            let lo = x[i];
            let lm = loss(&x);
            x[i] = orig;
            (lp - lm) / (hi as f64 - lo as f64)
        })
        .collect()
}

/// Gradient check: max |analytic - numeric| <= 1e-2 * max(1, |numeric|), elementwise.
pub fn assert_grad(analytic: &[f32], numeric: &[f64], what: &str) {
    assert_close(analytic, numeric, 1e-2, what);
}

/// Elementwise |got - want| <= tol * max(1, |want|); panics with the worst element.
pub fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs() / w.abs().max(1.0);
        assert!(!err.is_nan(), "{what}: NaN at {i} (got {g}, want {w})");
        if err > worst.0 {
            worst = (err, i);
        }
    }
    let i = worst.1;
    assert!(
        worst.0 <= tol,
        "{what}: error {:.3e} > {tol:.1e} at {i}: got {}, want {}",
        worst.0,
        got[i],
        want[i]
    );
}

/// Bit patterns of f32 buffers, for determinism checks (stricter than `==`: NaN and -0 count).
pub trait Bits {
    fn bits(&self) -> Vec<u32>;
}
impl Bits for Vec<f32> {
    fn bits(&self) -> Vec<u32> {
        self.iter().map(|v| v.to_bits()).collect()
    }
}
impl<A: Bits, B: Bits> Bits for (A, B) {
    fn bits(&self) -> Vec<u32> {
        [self.0.bits(), self.1.bits()].concat()
    }
}
impl<A: Bits, B: Bits, C: Bits> Bits for (A, B, C) {
    fn bits(&self) -> Vec<u32> {
        [self.0.bits(), self.1.bits(), self.2.bits()].concat()
    }
}
impl<A: Bits, B: Bits, C: Bits, D: Bits> Bits for (A, B, C, D) {
    fn bits(&self) -> Vec<u32> {
        [self.0.bits(), self.1.bits(), self.2.bits(), self.3.bits()].concat()
    }
}

/// Runs `f` in pools of 1, 2 and 3 threads: each must give `reference`'s bits exactly.
pub fn assert_thread_independent<T: Bits + Send>(reference: &T, f: impl Fn() -> T + Send + Sync) {
    for threads in [1, 2, 3] {
        let pool = crate::thread_pool_builder(Some(threads)).build().unwrap();
        assert!(
            reference.bits() == pool.install(&f).bits(),
            "{threads} threads give other results"
        );
    }
}

pub fn assert_bits_eq<T: Bits>(a: &T, b: &T) {
    assert!(
        a.bits() == b.bits(),
        "results differ between two identical runs"
    );
}
