//! Token + position embeddings.

use rayon::prelude::*;

use crate::simd;

/// `out[i,:] = wte[tokens[i],:] + wpe[positions[i],:]` for `i in 0..n` (`n = tokens.len()`).
///
/// Positions are explicit (not `i % t`) so packed sequences can restart them at each example.
pub fn embedding_forward(
    out: &mut [f32],
    tokens: &[u32],
    positions: &[u32],
    wte: &[f32],
    wpe: &[f32],
    c: usize,
) {
    let _span = crate::profile::span(crate::profile::Kind::Embedding);
    let n = tokens.len();
    assert_eq!(
        positions.len(),
        n,
        "embedding_forward: tokens/positions length mismatch"
    );
    assert!(out.len() >= n * c, "embedding_forward: out too small");
    if n == 0 || c == 0 {
        return;
    }
    out[..n * c]
        .par_chunks_mut(c)
        .zip(tokens.par_iter().zip(positions.par_iter()))
        .for_each(|(o, (&tok, &pos))| {
            let (tok, pos) = (tok as usize, pos as usize);
            add_rows(
                o,
                &wte[tok * c..(tok + 1) * c],
                &wpe[pos * c..(pos + 1) * c],
            );
        });
}

/// `out[i,:] = wte[tokens[i],:]`: token embeddings alone (models with rotary positions).
pub fn token_embedding_forward(out: &mut [f32], tokens: &[u32], wte: &[f32], c: usize) {
    let _span = crate::profile::span(crate::profile::Kind::Embedding);
    let n = tokens.len();
    assert!(out.len() >= n * c, "token_embedding_forward: out too small");
    if n == 0 || c == 0 {
        return;
    }
    out[..n * c]
        .par_chunks_mut(c)
        .zip(tokens.par_iter())
        .for_each(|(o, &tok)| {
            let tok = tok as usize;
            o.copy_from_slice(&wte[tok * c..(tok + 1) * c]);
        });
}

/// Backward of [`token_embedding_forward`]: `dwte[tokens[i]] += dout[i]` (deterministic).
pub fn token_embedding_backward(dwte: &mut [f32], dout: &[f32], tokens: &[u32], c: usize) {
    let _span = crate::profile::span(crate::profile::Kind::Embedding);
    let n = tokens.len();
    assert!(
        dout.len() >= n * c,
        "token_embedding_backward: dout too small"
    );
    if n == 0 || c == 0 {
        return;
    }
    scatter_add_rows(dwte, dout, tokens, c);
}

simd::multiversion! {
    fn add_rows(out: &mut [f32], a: &[f32], b: &[f32]) {
        let n = out.len();
        let (a, b) = (&a[..n], &b[..n]);
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
    }
}

/// Backward of [`embedding_forward`]: `dwte[tokens[i]] += dout[i]`, `dwpe[positions[i]] += dout[i]`.
///
/// Deterministic without atomics: occurrences are bucketed by row id (a counting sort that keeps
/// them in increasing `i`), then each table row, in parallel, sums its own occurrences in order.
pub fn embedding_backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dout: &[f32],
    tokens: &[u32],
    positions: &[u32],
    c: usize,
) {
    let _span = crate::profile::span(crate::profile::Kind::Embedding);
    let n = tokens.len();
    assert_eq!(
        positions.len(),
        n,
        "embedding_backward: tokens/positions length mismatch"
    );
    assert!(dout.len() >= n * c, "embedding_backward: dout too small");
    if n == 0 || c == 0 {
        return;
    }
    scatter_add_rows(dwte, dout, tokens, c);
    scatter_add_rows(dwpe, dout, positions, c);
}

/// `table[ids[i]] += src[i]` for every `i`, in increasing `i` per table row.
fn scatter_add_rows(table: &mut [f32], src: &[f32], ids: &[u32], c: usize) {
    let rows = table.len() / c;
    // Counting sort of the occurrence indices by id: bucket `r` is order[start[r]..start[r+1]].
    let mut start = vec![0u32; rows + 1];
    for &id in ids {
        assert!(
            (id as usize) < rows,
            "embedding_backward: id {id} out of range ({rows} rows)"
        );
        start[id as usize + 1] += 1;
    }
    for r in 0..rows {
        start[r + 1] += start[r];
    }
    let mut fill = start.clone();
    let mut order = vec![0u32; ids.len()];
    for (i, &id) in ids.iter().enumerate() {
        order[fill[id as usize] as usize] = i as u32;
        fill[id as usize] += 1;
    }
    table[..rows * c]
        .par_chunks_mut(c)
        .zip(start.par_windows(2))
        // Most rows (e.g. unused vocabulary) are empty: give rayon coarse tasks.
        .with_min_len(64)
        .for_each(|(row, w)| {
            for &i in &order[w[0] as usize..w[1] as usize] {
                let i = i as usize;
                add_row(row, &src[i * c..(i + 1) * c]);
            }
        });
}

simd::multiversion! {
    fn add_row(out: &mut [f32], x: &[f32]) {
        simd::add_to(out, x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn forward_and_backward() {
        let mut rng = rng(40);
        let (vocab, maxpos, c) = (11, 6, 5);
        let tokens = vec![3u32, 3, 0, 10, 7, 3, 0, 1];
        let positions = vec![0u32, 1, 2, 3, 0, 1, 2, 5];
        let n = tokens.len();
        let wte = randn(&mut rng, vocab * c, 1.0);
        let wpe = randn(&mut rng, maxpos * c, 1.0);
        let fwd = |wte: &[f32], wpe: &[f32]| {
            let mut out = vec![0.0; n * c];
            embedding_forward(&mut out, &tokens, &positions, wte, wpe, c);
            out
        };
        let out = fwd(&wte, &wpe);
        for i in 0..n {
            for j in 0..c {
                let want = wte[tokens[i] as usize * c + j] + wpe[positions[i] as usize * c + j];
                assert_eq!(out[i * c + j], want);
            }
        }
        let lw = randn(&mut rng, n * c, 1.0);
        let g0 = 0.5f32;
        let (mut dwte, mut dwpe) = (vec![g0; vocab * c], vec![g0; maxpos * c]);
        embedding_backward(&mut dwte, &mut dwpe, &lw, &tokens, &positions, c);
        let sub = |g: &[f32]| g.iter().map(|v| v - g0).collect::<Vec<_>>();
        let num = numgrad(&wte, 1e-2, |x| weighted_sum(&fwd(x, &wpe), &lw));
        assert_grad(&sub(&dwte), &num, "dwte");
        let num = numgrad(&wpe, 1e-2, |x| weighted_sum(&fwd(&wte, x), &lw));
        assert_grad(&sub(&dwpe), &num, "dwpe");
    }

    #[test]
    fn deterministic() {
        let mut rng = rng(41);
        let (vocab, maxpos, c, n) = (1000, 64, 48, 4000);
        let tokens: Vec<u32> = (0..n).map(|i| ((i * 7919) % 97) as u32).collect();
        let positions: Vec<u32> = (0..n).map(|i| (i % maxpos) as u32).collect();
        let dout = randn(&mut rng, n * c, 1.0);
        let run = || {
            let (mut dwte, mut dwpe) = (vec![0.0; vocab * c], vec![0.0; maxpos * c]);
            embedding_backward(&mut dwte, &mut dwpe, &dout, &tokens, &positions, c);
            (dwte, dwpe)
        };
        assert_bits_eq(&run(), &run());
    }
}
