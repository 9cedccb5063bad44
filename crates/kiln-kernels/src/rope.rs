//! Rotary position embeddings (RoPE) in the rotate-half convention of transformers' Llama, with the
//! "linear" and "llama3" frequency scalings of a `rope_scaling` config entry.
//!
//! The cos/sin tables are built once per model (angles in f64, stored as f32), so a rotation costs
//! four multiplies per pair; the same code rotates by `-angle` for the backward, which is the
//! rotation's transpose.

use rayon::prelude::*;

use crate::simd;

/// Below this many elements (`n * row`) the rotation runs on the calling thread: one decoded token
/// is cheaper to rotate than to hand to the pool.
const PAR_MIN: usize = 1 << 15;

/// Elements per rayon task (rounded to whole rows): fixed, and large enough to amortise scheduling.
const CHUNK: usize = 1 << 14;

/// Frequency scaling of rotary embeddings, as `rope_scaling` in a transformers config.json.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// "linear": positions divided by factor (inv_freq / factor).
    Linear { factor: f32 },
    /// "llama3" (Llama 3.1+): transformers' `_compute_llama3_parameters`.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// The scaled inverse frequency of one rotation pair.
    fn apply(&self, inv_freq: f64) -> f64 {
        match *self {
            RopeScaling::Linear { factor } => inv_freq / factor as f64,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                // Long wavelengths (beyond the original context / low_freq_factor) are slowed down by
                // `factor`, short ones (below old_ctx / high_freq_factor) kept, and those in between
                // interpolated; written as transformers' `torch.where` chain, in f64.
                let (factor, lo, hi) = (
                    factor as f64,
                    low_freq_factor as f64,
                    high_freq_factor as f64,
                );
                let old_ctx = original_max_position_embeddings as f64;
                let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                let low_freq_wavelen = old_ctx / lo;
                let high_freq_wavelen = old_ctx / hi;
                let inv_freq_llama = if wavelen > low_freq_wavelen {
                    inv_freq / factor
                } else {
                    inv_freq
                };
                let smooth = (old_ctx / wavelen - lo) / (hi - lo);
                let smoothed = (1.0 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama;
                // Negated comparisons as transformers writes them (`~(a < b) * ~(a > c)`).
                #[allow(clippy::neg_cmp_op_on_partial_ord)]
                let is_medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
                if is_medium {
                    smoothed
                } else {
                    inv_freq_llama
                }
            }
        }
    }
}

/// cos/sin tables for rotary position embeddings of one head width (the rotate-half convention of
/// transformers' Llama: the head's dims i and i + hs/2 form a pair rotated by angle
/// pos * inv_freq[i], inv_freq[i] = theta^(-2i/hs)).
pub struct Rope {
    head_dim: usize,
    max_pos: usize,
    /// `[max_pos, head_dim/2]`: `cos(pos * inv_freq[i])`.
    cos: Vec<f32>,
    /// `[max_pos, head_dim/2]`: `sin(pos * inv_freq[i])`.
    sin: Vec<f32>,
}

impl Rope {
    /// Tables for positions `0..max_pos` (`head_dim` even), frequencies `theta^(-2i/head_dim)`,
    /// optionally rescaled.
    pub fn new(head_dim: usize, max_pos: usize, theta: f32, scaling: Option<&RopeScaling>) -> Self {
        assert!(
            head_dim > 0 && head_dim.is_multiple_of(2),
            "Rope: head_dim must be even and positive, got {head_dim}"
        );
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let f = (theta as f64).powf(-((2 * i) as f64) / head_dim as f64);
                scaling.map_or(f, |s| s.apply(f))
            })
            .collect();
        let mut cos = vec![0.0f32; max_pos * half];
        let mut sin = vec![0.0f32; max_pos * half];
        for (pos, (c, s)) in cos
            .chunks_exact_mut(half)
            .zip(sin.chunks_exact_mut(half))
            .enumerate()
        {
            for ((c, s), &f) in c.iter_mut().zip(s.iter_mut()).zip(&inv_freq) {
                let (sa, ca) = (pos as f64 * f).sin_cos();
                (*c, *s) = (ca as f32, sa as f32);
            }
        }
        Rope {
            head_dim,
            max_pos,
            cos,
            sin,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn max_pos(&self) -> usize {
        self.max_pos
    }
}

/// Rotates, in place, heads 0..heads (each rope.head_dim() wide, contiguous from column 0) of each
/// of the n rows of x (row width `row`, heads*head_dim <= row; columns beyond are untouched), row i
/// at position positions[i] (< max_pos, assert). Used on a fused [q | k | v] buffer with
/// heads = n_q_heads + n_kv_heads so q and k are rotated and v is not.
///
/// Per pair: out_i = x_i cos - x_{i+h} sin; out_{i+h} = x_{i+h} cos + x_i sin (h = head_dim/2).
pub fn rope_forward(
    x: &mut [f32],
    positions: &[u32],
    rope: &Rope,
    n: usize,
    row: usize,
    heads: usize,
) {
    let _span = crate::profile::span(crate::profile::Kind::Rope);
    rotate(x, positions, rope, n, row, heads, 1.0);
}

/// Backward of rope_forward, in place on the gradient buffer (OVERWRITES: the transpose of the
/// rotation, i.e. rotation by -angle).
pub fn rope_backward(
    dx: &mut [f32],
    positions: &[u32],
    rope: &Rope,
    n: usize,
    row: usize,
    heads: usize,
) {
    let _span = crate::profile::span(crate::profile::Kind::Rope);
    rotate(dx, positions, rope, n, row, heads, -1.0);
}

/// Rotation by `sign * angle` (`sign` is +1 or -1, so flipping it is exact).
fn rotate(
    x: &mut [f32],
    positions: &[u32],
    rope: &Rope,
    n: usize,
    row: usize,
    heads: usize,
    sign: f32,
) {
    let hd = rope.head_dim;
    assert!(
        heads * hd <= row,
        "rope: {heads} heads of {hd} do not fit a row of {row}"
    );
    assert!(x.len() >= n * row, "rope: x too small");
    assert!(positions.len() >= n, "rope: positions too small");
    let positions = &positions[..n];
    if let Some(&p) = positions.iter().find(|&&p| p as usize >= rope.max_pos) {
        panic!("rope: position {p} >= max_pos {}", rope.max_pos);
    }
    if n == 0 || heads == 0 {
        return;
    }
    let one_row = |xr: &mut [f32], pos: u32| {
        let t = pos as usize * (hd / 2);
        let (cos, sin) = (&rope.cos[t..t + hd / 2], &rope.sin[t..t + hd / 2]);
        rope_row(&mut xr[..heads * hd], cos, sin, sign);
    };
    let x = &mut x[..n * row];
    if n * row < PAR_MIN {
        for (xr, &pos) in x.chunks_exact_mut(row).zip(positions) {
            one_row(xr, pos);
        }
    } else {
        let rows = (CHUNK / row).max(1);
        x.par_chunks_mut(rows * row)
            .zip(positions.par_chunks(rows))
            .for_each(|(xs, ps)| {
                for (xr, &pos) in xs.chunks_exact_mut(row).zip(ps) {
                    one_row(xr, pos);
                }
            });
    }
}

simd::multiversion! {
    /// Rotates every head of `x` (a whole number of heads, each `2 * cos.len()` wide) by one
    /// position's angles.
    fn rope_row(x: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
        let h = cos.len();
        let sin = &sin[..h];
        for head in x.chunks_exact_mut(2 * h) {
            let (lo, hi) = head.split_at_mut(h);
            for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cos).zip(sin) {
                let s = s * sign;
                let (x0, x1) = (*a, *b);
                *a = x0 * c - x1 * s;
                *b = x1 * c + x0 * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    /// Packed segments: positions restart at 0 mid-batch.
    fn packed_positions(n: usize) -> Vec<u32> {
        let lens = [3, 5, 1, 7, 4];
        let mut pos = Vec::with_capacity(n);
        let mut k = 0;
        while pos.len() < n {
            pos.extend((0..lens[k % lens.len()]).take(n - pos.len()));
            k += 1;
        }
        pos
    }

    /// Direct f64 rotation, from the formula (no tables).
    fn reference(
        x: &[f32],
        positions: &[u32],
        hd: usize,
        theta: f64,
        row: usize,
        heads: usize,
    ) -> Vec<f64> {
        let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let h = hd / 2;
        for (r, &p) in positions.iter().enumerate() {
            for hh in 0..heads {
                let base = r * row + hh * hd;
                for i in 0..h {
                    let ang = p as f64 / theta.powf(2.0 * i as f64 / hd as f64);
                    let (a, b) = (x[base + i] as f64, x[base + i + h] as f64);
                    out[base + i] = a * ang.cos() - b * ang.sin();
                    out[base + i + h] = b * ang.cos() + a * ang.sin();
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_reference() {
        let mut rng = rng(60);
        let (hd, heads) = (16, 3);
        let row = heads * hd + hd + 5; // one untouched "v" head and a ragged tail
        let n = 23;
        let positions = packed_positions(n);
        let rope = Rope::new(hd, 64, 10000.0, None);
        assert_eq!((rope.head_dim(), rope.max_pos()), (hd, 64));
        let x = randn(&mut rng, n * row, 2.0);
        let mut got = x.clone();
        rope_forward(&mut got, &positions, &rope, n, row, heads);
        let want = reference(&x, &positions, hd, 10000.0, row, heads);
        assert_close(&got, &want, 1e-6, "rope forward");
        for r in 0..n {
            assert_eq!(
                got[r * row + heads * hd..(r + 1) * row],
                x[r * row + heads * hd..(r + 1) * row]
            );
        }
        // Position 0 is the identity, exactly.
        assert_eq!(got[..heads * hd], x[..heads * hd]);
    }

    #[test]
    fn rotation_preserves_pair_norms() {
        let mut rng = rng(61);
        let (hd, heads, n) = (32, 2, 40);
        let row = heads * hd;
        let positions: Vec<u32> = (0..n as u32).map(|i| i * 97).collect();
        let rope = Rope::new(hd, 4000, 500000.0, None);
        let x = randn(&mut rng, n * row, 1.0);
        let mut y = x.clone();
        rope_forward(&mut y, &positions, &rope, n, row, heads);
        let h = hd / 2;
        for head in 0..n * heads {
            for i in 0..h {
                let (j, k) = (head * hd + i, head * hd + i + h);
                let before = (x[j] as f64).powi(2) + (x[k] as f64).powi(2);
                let after = (y[j] as f64).powi(2) + (y[k] as f64).powi(2);
                assert!(
                    (before - after).abs() <= 1e-6 * before.max(1e-3),
                    "pair norm"
                );
            }
        }
    }

    #[test]
    fn backward_inverts_forward() {
        let mut rng = rng(62);
        let (hd, heads, n) = (8, 5, 50);
        let row = heads * hd + 3;
        let positions = packed_positions(n);
        let rope = Rope::new(hd, 16, 10000.0, None);
        let x = randn(&mut rng, n * row, 3.0);
        let mut y = x.clone();
        rope_forward(&mut y, &positions, &rope, n, row, heads);
        assert!(y != x);
        rope_backward(&mut y, &positions, &rope, n, row, heads);
        let want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        assert_close(&y, &want, 1e-5, "rope backward(forward(x))");
    }

    #[test]
    fn backward_finite_differences() {
        let mut rng = rng(63);
        let (hd, heads, n) = (6, 3, 17);
        let row = (heads + 1) * hd; // [q q | k | v]: the last head is not rotated
        let positions = packed_positions(n);
        assert!(positions.windows(2).any(|w| w[1] < w[0]));
        let rope = Rope::new(hd, 8, 100.0, None);
        let x = randn(&mut rng, n * row, 1.0);
        let lw = randn(&mut rng, n * row, 1.0);
        // Overwrites: the result must not depend on what the buffer held besides dout.
        let mut dx = lw.clone();
        rope_backward(&mut dx, &positions, &rope, n, row, heads);
        let num = numgrad(&x, 1e-2, |x| {
            let mut y = x.to_vec();
            rope_forward(&mut y, &positions, &rope, n, row, heads);
            weighted_sum(&y, &lw)
        });
        assert_grad(&dx, &num, "rope dx");
    }

    /// Llama 3.1's scaling (factor 8, 1, 4, 8192), written as Meta's reference `apply_scaling`
    /// (branches, not transformers' `where` chain).
    fn llama3_independent(hd: usize, theta: f64, pos: usize) -> (Vec<f64>, [usize; 3]) {
        let (factor, lo, hi, old) = (8.0f64, 1.0f64, 4.0f64, 8192.0f64);
        let mut regimes = [0usize; 3];
        let ang = (0..hd / 2)
            .map(|i| {
                let f = 1.0 / theta.powf((2 * i) as f64 / hd as f64);
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let g = if wavelen < old / hi {
                    regimes[0] += 1;
                    f
                } else if wavelen > old / lo {
                    regimes[2] += 1;
                    f / factor
                } else {
                    regimes[1] += 1;
                    let s = (old / wavelen - lo) / (hi - lo);
                    (1.0 - s) * f / factor + s * f
                };
                pos as f64 * g
            })
            .collect();
        (ang, regimes)
    }

    fn table(rope: &Rope, pos: usize) -> (&[f32], &[f32]) {
        let h = rope.head_dim / 2;
        (
            &rope.cos[pos * h..(pos + 1) * h],
            &rope.sin[pos * h..(pos + 1) * h],
        )
    }

    #[test]
    fn llama3_scaling_matches_formula() {
        let (hd, theta, max_pos) = (128, 500000.0, 3000);
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let rope = Rope::new(hd, max_pos, theta as f32, Some(&scaling));
        let plain = Rope::new(hd, max_pos, theta as f32, None);
        let (_, regimes) = llama3_independent(hd, theta, 1);
        assert!(
            regimes.iter().all(|&k| k > 0),
            "all three regimes: {regimes:?}"
        );
        for pos in [0, 1, 2, 77, 1000, max_pos - 1] {
            let (ang, _) = llama3_independent(hd, theta, pos);
            let (c, s) = table(&rope, pos);
            assert_close(
                c,
                &ang.iter().map(|a| a.cos()).collect::<Vec<_>>(),
                1e-6,
                "llama3 cos",
            );
            assert_close(
                s,
                &ang.iter().map(|a| a.sin()).collect::<Vec<_>>(),
                1e-6,
                "llama3 sin",
            );
            // High frequencies are untouched, the lowest slowed down by the factor.
            let (pc, _) = table(&plain, pos);
            assert_eq!(c[0], pc[0]);
        }
        let (c, _) = table(&rope, max_pos - 1);
        let (pc, _) = table(&plain, max_pos - 1);
        assert!((c[hd / 2 - 1] - pc[hd / 2 - 1]).abs() > 1e-6);
    }

    #[test]
    fn unit_factor_scaling_is_no_scaling() {
        let (hd, theta, max_pos) = (64, 500000.0f32, 2000);
        let plain = Rope::new(hd, max_pos, theta, None);
        for scaling in [
            RopeScaling::Linear { factor: 1.0 },
            RopeScaling::Llama3 {
                factor: 1.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        ] {
            let r = Rope::new(hd, max_pos, theta, Some(&scaling));
            let want = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            assert_close(&r.cos, &want(&plain.cos), 1e-6, "factor-1 cos");
            assert_close(&r.sin, &want(&plain.sin), 1e-6, "factor-1 sin");
        }
    }

    #[test]
    fn linear_scaling_divides_positions() {
        let hd = 16;
        let plain = Rope::new(hd, 50, 10000.0, None);
        let lin = Rope::new(hd, 100, 10000.0, Some(&RopeScaling::Linear { factor: 2.0 }));
        for p in 0..50 {
            // (2p) * (f / 2) == p * f exactly in binary floating point.
            assert_eq!(table(&lin, 2 * p), table(&plain, p));
        }
        assert_ne!(table(&lin, 1), table(&plain, 1));
    }

    #[test]
    fn parallel_path_matches_row_by_row() {
        let mut rng = rng(64);
        let (hd, heads) = (64, 6);
        let row = heads * hd + 2 * hd;
        let n = PAR_MIN / row + 37;
        assert!(n * row >= PAR_MIN);
        let positions = packed_positions(n);
        let rope = Rope::new(hd, 8, 10000.0, None);
        let x = randn(&mut rng, n * row, 1.0);
        let mut par = x.clone();
        rope_forward(&mut par, &positions, &rope, n, row, heads);
        let mut seq = x.clone();
        for (xr, p) in seq.chunks_exact_mut(row).zip(&positions) {
            rope_forward(xr, std::slice::from_ref(p), &rope, 1, row, heads);
        }
        assert_eq!(par.bits(), seq.bits());
        let run = || {
            let mut y = x.clone();
            rope_forward(&mut y, &positions, &rope, n, row, heads);
            rope_backward(&mut y, &positions, &rope, n, row, heads);
            y
        };
        assert_thread_independent(&run(), run);
    }

    #[test]
    #[should_panic(expected = "max_pos")]
    fn position_out_of_range_panics() {
        let rope = Rope::new(4, 3, 10000.0, None);
        let mut x = vec![0.0; 8];
        rope_forward(&mut x, &[2, 3], &rope, 2, 4, 1);
    }
}
