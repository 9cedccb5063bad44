//! Matrix multiplication (through the `gemm` crate) and the linear layer built on it.
//!
//! Everything is expressed as one strided `gemm` call: transposes are just swapped strides, so no
//! operand is ever copied. `gemm` splits the output (never the reduction dimension) across threads,
//! so results do not depend on scheduling.
#![allow(clippy::too_many_arguments)]

use gemm::Parallelism;
use rayon::prelude::*;

use crate::simd;

/// Below this many multiply-adds a single thread is faster than waking the pool.
const PAR_THRESHOLD: usize = 64 * 64 * 64;

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

/// Thread the product over the pool only when it is big enough to pay for it.
fn parallelism_for(m: usize, k: usize, n: usize) -> Parallelism {
    if m.saturating_mul(k).saturating_mul(n) >= PAR_THRESHOLD && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
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
    // A transpose is the same memory read with row and column strides swapped.
    let (a_rs, a_cs) = if trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k) } else { (n, 1) };
    // SAFETY: the length asserts above cover every element the strides reach; `out` is a unique
    // borrow so it cannot alias `a` or `b`.
    unsafe {
        gemm_raw(
            out.as_mut_ptr(),
            n,
            a.as_ptr(),
            a_rs,
            a_cs,
            b.as_ptr(),
            b_rs,
            b_cs,
            m,
            k,
            n,
            accumulate,
            parallelism_for(m, k, n),
        );
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
    assert!(out.len() >= n * o, "linear_forward: out too small");
    let out = &mut out[..n * o];
    match bias {
        Some(bias) => {
            // Broadcast the bias first and let gemm accumulate onto it: no second pass over `out`.
            let bias = &bias[..o];
            out.par_chunks_mut(o.max(1))
                .for_each(|row| row.copy_from_slice(bias));
            matmul(out, inp, w, n, i, o, false, false, true);
        }
        None => matmul(out, inp, w, n, i, o, false, false, false),
    }
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
    if let Some(dinp) = dinp {
        // w is stored [i,o] = "[n,k]" of the product dout[n,o] @ w^T[o,i].
        matmul(dinp, dout, w, n, o, i, false, true, true);
    }
    // inp is stored [n,i] = "[k,m]" of the product inp^T[i,n] @ dout[n,o].
    matmul(dw, inp, dout, i, n, o, true, false, true);
    if let Some(dbias) = dbias {
        col_sum_accumulate(&mut dbias[..o], &dout[..n * o], o);
    }
}

/// `dst[j] += sum_r src[r, j]` for a row-major `src` with `c` columns.
///
/// Rows are summed in blocks whose size depends only on the row count (one rayon task each), then
/// the block partials are added in block order: deterministic, parallel, and more accurate than one
/// long running sum.
pub(crate) fn col_sum_accumulate(dst: &mut [f32], src: &[f32], c: usize) {
    if c == 0 || src.is_empty() {
        return;
    }
    let rows = src.len() / c;
    let rb = simd::rows_per_block(rows, ROW_BLOCK);
    let nblocks = rows.div_ceil(rb);
    let mut partials = vec![0.0f32; nblocks * c];
    partials
        .par_chunks_mut(c)
        .zip(src[..rows * c].par_chunks(rb * c))
        .for_each(|(part, block)| {
            for row in block.chunks_exact(c) {
                add_row(part, row);
            }
        });
    for part in partials.chunks_exact(c) {
        add_row(dst, part);
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
