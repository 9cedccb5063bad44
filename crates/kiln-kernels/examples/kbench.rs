use kiln_kernels::*;
use std::time::Instant;

fn time<F: FnMut()>(name: &str, work: f64, unit: &str, mut f: F) {
    f();
    let reps: usize = std::env::var("REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let mut dt = f64::MAX;
    for _ in 0..reps { let t0 = Instant::now(); f(); dt = dt.min(t0.elapsed().as_secs_f64()); }
    println!("{name:40} {:8.3} ms  {:8.2} {unit}", dt * 1e3, work / dt / 1e9);
}

fn main() {
    let (b, t, c, nh, v) = (4usize, 512usize, 768usize, 12usize, 50257usize);
    let n = b * t;
    let fill = |len: usize, s: f32| (0..len).map(|i| (((i * 2654435761) % 1000) as f32 / 500.0 - 1.0) * s).collect::<Vec<f32>>();
    let inp = fill(n * c, 1.0);
    let w = fill(c * 3 * c, 0.02);
    let bias = fill(3 * c, 0.1);
    let mut qkv = vec![0.0; n * 3 * c];
    let fl = 2.0 * (n * c * 3 * c) as f64;
    time("linear fwd 2048x768x2304", fl, "GFLOP/s", || linear_forward(&mut qkv, &inp, &w, Some(&bias), n, c, 3 * c));
    let mut dinp = vec![0.0; n * c];
    let mut dw = vec![0.0; c * 3 * c];
    let mut db = vec![0.0; 3 * c];
    time("linear bwd", 2.0 * fl, "GFLOP/s", || linear_backward(Some(&mut dinp), &mut dw, Some(&mut db), &qkv, &inp, &w, n, c, 3 * c));
    let mut out = vec![0.0; n * c];
    let mut att = vec![0.0; b * nh * t * t];
    let mask = AttnMask { causal: true, ..Default::default() };
    let afl = 2.0 * 2.0 * (b * nh * t * t * (c / nh)) as f64 / 2.0;
    time("attention fwd causal", afl, "GFLOP/s", || attention_forward(&mut out, &mut att, &qkv, b, t, c, nh, &mask));
    let mut dqkv = vec![0.0; n * 3 * c];
    time("attention bwd causal", 2.0 * afl, "GFLOP/s", || attention_backward(&mut dqkv, &inp, &qkv, &att, b, t, c, nh));
    let mut mean = vec![0.0; n];
    let mut rstd = vec![0.0; n];
    let lw = fill(c, 1.0);
    time("layernorm fwd", (n * c * 8) as f64, "GB/s", || layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &lw, &lw, n, c));
    let mut dlw = vec![0.0; c];
    let mut dlb = vec![0.0; c];
    time("layernorm bwd", (n * c * 12) as f64, "GB/s", || layernorm_backward(&mut dinp, &mut dlw, &mut dlb, &out, &inp, &lw, &mean, &rstd, n, c));
    let big = fill(n * 4 * c, 3.0);
    let mut gout = vec![0.0; n * 4 * c];
    time("gelu fwd", (n * 4 * c) as f64, "Gelem/s", || gelu_forward(&mut gout, &big));
    time("gelu bwd", (n * 4 * c) as f64, "Gelem/s", || gelu_backward(&mut gout, &big, &big));
    let rows = 512;
    let logits0 = fill(rows * v, 5.0);
    let mut logits = logits0.clone();
    let targets: Vec<u32> = (0..rows as u32).map(|i| i * 97 % v as u32).collect();
    let mut logp = vec![0.0; rows];
    let mut ent = vec![0.0; rows];
    let dl = vec![-1.0; rows];
    time("logprob fwd+entropy (512 x 50257)", (rows * v) as f64, "Gelem/s", || { logits.copy_from_slice(&logits0); token_logprob_forward(&mut logits, &targets, 1.0, &mut logp, Some(&mut ent), v) });
    time("logprob fwd (copy incl)", (rows * v) as f64, "Gelem/s", || { logits.copy_from_slice(&logits0); token_logprob_forward(&mut logits, &targets, 1.0, &mut logp, None, v) });
    time("logprob bwd plain", (rows * v) as f64, "Gelem/s", || token_logprob_backward(&mut logits, &targets, 1.0, &dl, None, v));
    time("logprob bwd entropy", (rows * v) as f64, "Gelem/s", || token_logprob_backward(&mut logits, &targets, 1.0, &dl, Some(&dl), v));
    let np = 10_000_000;
    let mut p = fill(np, 1.0);
    let g = fill(np, 0.01);
    let mut m = vec![0.0; np];
    let mut vv = vec![0.0; np];
    time("adamw 10M", np as f64, "Gelem/s", || adamw_update(&mut p, &g, &mut m, &mut vv, 1e-3, 0.9, 0.95, 1e-8, 0.1, 3));
    time("grad norm 10M", np as f64, "Gelem/s", || { std::hint::black_box(global_grad_norm(&[&g])); });
    let toks: Vec<u32> = (0..n as u32).map(|i| i * 7919 % v as u32).collect();
    let pos: Vec<u32> = (0..n as u32).map(|i| i % t as u32).collect();
    let wte = fill(v * c, 0.02);
    let wpe = fill(1024 * c, 0.02);
    time("embed fwd", (n * c) as f64, "Gelem/s", || embedding_forward(&mut out, &toks, &pos, &wte, &wpe, c));
    let mut dwte = vec![0.0; v * c];
    let mut dwpe = vec![0.0; 1024 * c];
    time("embed bwd", (n * c) as f64, "Gelem/s", || embedding_backward(&mut dwte, &mut dwpe, &inp, &toks, &pos, c));
}
