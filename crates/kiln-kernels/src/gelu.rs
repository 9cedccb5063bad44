//! GELU, tanh approximation (GPT-2's `gelu_new`, PyTorch's `F.gelu(x, approximate="tanh")`):
//! `gelu(x) = 0.5 x (1 + tanh(u))`, `u = sqrt(2/pi) (x + 0.044715 x^3)`.
//!
//! We use the identity `0.5 (1 + tanh(u)) = sigmoid(2u)`, so one vectorised `exp` and one division
//! per element, and no cancellation for small `u` (matches `tanh` to ~1e-7 relative).

use rayon::prelude::*;

use crate::simd;

/// Elements per rayon task: fixed, and large enough to amortise scheduling.
const CHUNK: usize = 1 << 14;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// `out = gelu(inp)`, elementwise (`out` and `inp` have the same length).
pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    let _span = crate::profile::span(crate::profile::Kind::Activation);
    assert_eq!(out.len(), inp.len(), "gelu_forward: length mismatch");
    out.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .for_each(|(o, x)| gelu_forward_chunk(o, x));
}

simd::multiversion! {
    fn gelu_forward_chunk(out: &mut [f32], inp: &[f32]) {
        let inp = &inp[..out.len()];
        for (o, &x) in out.iter_mut().zip(inp) {
            let u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
            // x * sigmoid(2u)
            *o = x / (1.0 + simd::exp(-2.0 * u));
        }
    }
}

/// `dinp += gelu'(inp) * dout`, elementwise.
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    let _span = crate::profile::span(crate::profile::Kind::Activation);
    assert_eq!(dinp.len(), inp.len(), "gelu_backward: length mismatch");
    assert_eq!(dinp.len(), dout.len(), "gelu_backward: length mismatch");
    dinp.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK).zip(dout.par_chunks(CHUNK)))
        .for_each(|(d, (x, dy))| gelu_backward_chunk(d, x, dy));
}

simd::multiversion! {
    fn gelu_backward_chunk(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        let n = dinp.len();
        let (inp, dout) = (&inp[..n], &dout[..n]);
        for ((d, &x), &dy) in dinp.iter_mut().zip(inp).zip(dout) {
            *d += gelu_grad(x) * dy;
        }
    }
}

/// `gelu'(x)`.
#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    let x2 = x * x;
    let u = SQRT_2_OVER_PI * (x + GELU_C * x2 * x);
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x2);
    let s = 1.0 / (1.0 + simd::exp(-2.0 * u)); // = 0.5 (1 + tanh u)
                                               // d/dx [x s(2u)] = s + x * 2 s (1 - s) u'   (since 1 - tanh^2 = 4 s (1 - s))
    s + 2.0 * x * s * (1.0 - s) * du
}

/// In place: `d = gelu'(inp) * d` (the backward of [`gelu_forward`] when nothing else has added into
/// the input gradient yet, so no zeroed buffer is needed).
pub fn gelu_backward_inplace(d: &mut [f32], inp: &[f32]) {
    let _span = crate::profile::span(crate::profile::Kind::Activation);
    assert_eq!(d.len(), inp.len(), "gelu_backward_inplace: length mismatch");
    d.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .for_each(|(d, x)| gelu_backward_inplace_chunk(d, x));
}

simd::multiversion! {
    fn gelu_backward_inplace_chunk(d: &mut [f32], inp: &[f32]) {
        let inp = &inp[..d.len()];
        for (d, &x) in d.iter_mut().zip(inp) {
            *d *= gelu_grad(x);
        }
    }
}

/// [`gelu_backward_inplace`] that also adds the column sums of the result into `dbias` (`c`
/// columns): the bias gradient of the linear layer that produced `inp`, taken while each row is in
/// cache instead of in a second pass. Bit for bit the two-pass result (same elementwise arithmetic,
/// same row blocks and summation order as the linear layer's bias gradient).
pub fn gelu_backward_inplace_bias(d: &mut [f32], inp: &[f32], dbias: &mut [f32], c: usize) {
    let _span = crate::profile::span(crate::profile::Kind::Activation);
    assert_eq!(
        d.len(),
        inp.len(),
        "gelu_backward_inplace_bias: length mismatch"
    );
    assert!(
        c > 0 && d.len().is_multiple_of(c) && dbias.len() >= c,
        "gelu_backward_inplace_bias: {} elements, {c} columns, bias {}",
        d.len(),
        dbias.len()
    );
    crate::matmul::map_rows_col_sum(dbias, d, c, |r, row| {
        gelu_backward_inplace_chunk(row, &inp[r * c..(r + 1) * c])
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn gelu_ref(x: f64) -> f64 {
        let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
        0.5 * x * (1.0 + u.tanh())
    }

    #[test]
    fn forward_matches_tanh_formula() {
        let inp: Vec<f32> = (-4000..4000)
            .map(|i| i as f32 * 0.0031)
            .chain([1e-6, -1e-6, 0.0, 30.0, -30.0])
            .collect();
        let mut out = vec![0.0; inp.len()];
        gelu_forward(&mut out, &inp);
        for (&x, &y) in inp.iter().zip(&out) {
            let r = gelu_ref(x as f64);
            // ~1e-6 relative where the output is not tiny, absolute for tiny outputs.
            assert!(
                (y as f64 - r).abs() <= 2e-6 * r.abs().max(1e-3),
                "gelu({x}) = {y}, want {r}"
            );
        }
        let mut huge = vec![0.0; 2];
        gelu_forward(&mut huge, &[-1e4, 1e4]);
        assert_eq!(huge[1], 1e4);
        assert!(huge[0].abs() < 1e-30);
    }

    #[test]
    fn backward_finite_differences() {
        let mut rng = rng(20);
        let n = 50;
        let inp = randn(&mut rng, n, 3.0);
        let lw = randn(&mut rng, n, 1.0);
        let g0 = 0.1f32;
        let mut dinp = vec![g0; n];
        gelu_backward(&mut dinp, &inp, &lw);
        let d: Vec<f32> = dinp.iter().map(|v| v - g0).collect();
        let num = numgrad(&inp, 1e-3, |x| {
            let mut out = vec![0.0; n];
            gelu_forward(&mut out, x);
            weighted_sum(&out, &lw)
        });
        assert_grad(&d, &num, "gelu dinp");
        // The in-place form gives the same gradient (from zero), bit for bit.
        let mut inplace = lw.clone();
        gelu_backward_inplace(&mut inplace, &inp);
        let mut from_zero = vec![0.0; n];
        gelu_backward(&mut from_zero, &inp, &lw);
        assert_eq!(inplace, from_zero);
        // The bias-fused form: the same gradient and the linear layer's own bias sums, bit for bit.
        let c = 10;
        let mut fused = lw.clone();
        let mut db = vec![0.5f32; c];
        gelu_backward_inplace_bias(&mut fused, &inp, &mut db, c);
        assert_eq!(fused, inplace);
        let mut db_want = vec![0.5f32; c];
        let mut dw = vec![0.0f32; c * c];
        let w = vec![0.0f32; c * c];
        crate::linear_backward(
            None,
            &mut dw,
            Some(&mut db_want),
            &inplace,
            &inp,
            &w,
            n / c,
            c,
            c,
        );
        assert_eq!(db, db_want);
        // And against the analytic tanh-form derivative in f64, tightly.
        for i in 0..n {
            let x = inp[i] as f64;
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let u = k * (x + 0.044715 * x.powi(3));
            let t = u.tanh();
            let g = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x);
            assert!(
                (d[i] as f64 - g * lw[i] as f64).abs() < 1e-5,
                "gelu' at {x}"
            );
        }
    }

    #[test]
    fn deterministic() {
        let mut rng = rng(21);
        let n = 3 * CHUNK + 17;
        let inp = randn(&mut rng, n, 4.0);
        let dout = randn(&mut rng, n, 1.0);
        let run = || {
            let mut out = vec![0.0; n];
            gelu_forward(&mut out, &inp);
            let mut d = vec![0.0; n];
            gelu_backward(&mut d, &inp, &dout);
            (out, d)
        };
        assert_bits_eq(&run(), &run());
    }
}
