//! Small PNG line charts for the report (an 8×8 bitmap font and the `png` encoder: no system fonts
//! or graphics libraries needed, so the report renders the same on any machine).

use anyhow::Result;
use font8x8::UnicodeFonts;
use std::io::Write;
use std::path::Path;

const W: usize = 640;
const H: usize = 360;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 34;
const BOTTOM: usize = 40;
const COLOURS: [[u8; 3]; 4] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [148, 103, 189],
];

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            px: vec![255; W * H * 3],
        }
    }
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: bool) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            let (x, y) = (
                (x0 + (x1 - x0) * t).round() as i64,
                (y0 + (y1 - y0) * t).round() as i64,
            );
            self.set(x, y, c);
            if thick {
                self.set(x, y + 1, c);
                self.set(x + 1, y, c);
            }
        }
    }
    fn text(&mut self, x: usize, y: usize, s: &str, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            if let Some(glyph) = font8x8::BASIC_FONTS.get(ch) {
                for (row, bits) in glyph.iter().enumerate() {
                    for col in 0..8 {
                        if bits >> col & 1 == 1 {
                            self.set((x + k * 8 + col) as i64, (y + row) as i64, c);
                        }
                    }
                }
            }
        }
    }
    fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, W as u32, H as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header()?;
            w.write_image_data(&self.px)?;
        }
        Ok(kiln_data::atomic_write(path, |w| w.write_all(&bytes))?)
    }
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{:.0}", v)
    } else if v.abs() >= 10.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.3}", v)
    }
}

/// Draws named series of (x, y) points on shared axes and writes a PNG.
pub fn line_chart(
    path: &Path,
    title: &str,
    xlabel: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<bool> {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    if pts.len() < 2 {
        return Ok(false);
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in &pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    y0 -= pad;
    y1 += pad;
    let mut c = Canvas::new();
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let sx = |x: f64| LEFT as f64 + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP as f64 + (1.0 - (y - y0) / (y1 - y0)) * ph;
    let grey = [200, 200, 200];
    let black = [0, 0, 0];
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        c.line(
            (LEFT as f64, sy(y)),
            ((W - RIGHT) as f64, sy(y)),
            grey,
            false,
        );
        let label = fmt_tick(y);
        c.text(
            LEFT.saturating_sub(6 + 8 * label.len()),
            sy(y) as usize - 4,
            &label,
            black,
        );
        let x = x0 + (x1 - x0) * i as f64 / 4.0;
        let label = fmt_tick(x);
        c.text(
            (sx(x) as usize).saturating_sub(4 * label.len()),
            H - BOTTOM + 8,
            &label,
            black,
        );
    }
    c.line(
        (LEFT as f64, TOP as f64),
        (LEFT as f64, (H - BOTTOM) as f64),
        black,
        false,
    );
    c.line(
        (LEFT as f64, (H - BOTTOM) as f64),
        ((W - RIGHT) as f64, (H - BOTTOM) as f64),
        black,
        false,
    );
    c.text(LEFT, 10, title, black);
    c.text(W / 2 - 4 * xlabel.len(), H - 14, xlabel, black);
    let mut legend_x = W - RIGHT;
    for (i, (name, s)) in series.iter().enumerate().rev() {
        let col = COLOURS[i % COLOURS.len()];
        legend_x -= 8 * name.len() + 24;
        c.line(
            (legend_x as f64, 14.0),
            (legend_x as f64 + 12.0, 14.0),
            col,
            true,
        );
        c.text(legend_x + 16, 10, name, col);
        let mut prev: Option<(f64, f64)> = None;
        for &(x, y) in s.iter().filter(|p| p.0.is_finite() && p.1.is_finite()) {
            let p = (sx(x), sy(y));
            if let Some(q) = prev {
                c.line(q, p, col, true);
            } else if s.len() == 1 {
                c.line(p, p, col, true);
            }
            prev = Some(p);
        }
    }
    c.save(path)?;
    Ok(true)
}

/// A noisy per-step series as the running mean of its last `len / 50` points (at least 1), so the
/// trend shows through the batch-to-batch noise.
fn smoothed(v: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    let w = (v.len() / 50).max(1);
    let mut sum = 0.0;
    v.iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= w {
                sum -= v[i - w].1;
            }
            (x, sum / (i + 1).min(w) as f64)
        })
        .collect()
}

/// The report's charts; returns the file names written.
pub fn write_plots(
    out: &Path,
    pre: &Path,
    sft: &Path,
    rm: &Path,
    ppo: &Path,
    dpo: Option<&Path>,
    ppo_start: &kiln_train::Metrics,
) -> Result<Vec<String>> {
    use crate::report::series;
    // The evaluation before the first iteration (the SFT model) is iteration 0 of the curves.
    let with_start = |start_key: &str, key: &str| {
        let mut v: Vec<(f64, f64)> = ppo_start
            .get(start_key)
            .map(|&y| (0.0, y))
            .into_iter()
            .collect();
        v.extend(series(ppo, key));
        v
    };
    let mut names = Vec::new();
    let mut chart =
        |name: &str, title: &str, x: &str, s: Vec<(&str, Vec<(f64, f64)>)>| -> Result<()> {
            if line_chart(&out.join(name), title, x, &s)? {
                names.push(name.to_string());
            }
            Ok(())
        };
    chart(
        "pretrain_loss.png",
        "Pretraining loss",
        "step",
        vec![
            ("train", smoothed(series(pre, "loss"))),
            ("val", series(pre, "val_loss")),
        ],
    )?;
    chart(
        "sft.png",
        "SFT: response loss and task accuracy",
        "step",
        vec![
            ("train loss", smoothed(series(sft, "loss"))),
            ("val loss", series(sft, "val_loss")),
            ("accuracy", series(sft, "val_accuracy")),
        ],
    )?;
    chart(
        "rm.png",
        "Reward model: pairwise accuracy",
        "step",
        vec![
            ("train", smoothed(series(rm, "acc"))),
            ("val", series(rm, "val_acc")),
        ],
    )?;
    chart(
        "ppo_reward.png",
        "PPO: reward and KL to the reference",
        "iteration",
        vec![("reward", series(ppo, "reward")), ("KL", series(ppo, "kl"))],
    )?;
    chart(
        "ppo_accuracy.png",
        "PPO: task accuracy",
        "iteration",
        vec![
            ("held-out", with_start("accuracy", "eval_accuracy")),
            ("well-formed", with_start("well_formed", "eval_well_formed")),
            ("rollouts", series(ppo, "rollout_acc")),
        ],
    )?;
    if let Some(dpo) = dpo {
        chart(
            "dpo.png",
            "DPO: reward accuracy and held-out task accuracy",
            "step",
            vec![
                ("train pairs", smoothed(series(dpo, "rewards/accuracies"))),
                ("val pairs", series(dpo, "val_rewards/accuracies")),
                ("task accuracy", series(dpo, "val_accuracy")),
            ],
        )?;
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::smoothed;

    #[test]
    fn smoothing_is_a_trailing_mean() {
        // 100 points: a window of 2. Alternating 0/1 becomes 0.5 after the first point.
        let v: Vec<(f64, f64)> = (0..100).map(|i| (i as f64, (i % 2) as f64)).collect();
        let s = smoothed(v.clone());
        assert_eq!(s[0], (0.0, 0.0));
        assert!(s[1..].iter().all(|&(_, y)| (y - 0.5).abs() < 1e-12));
        assert_eq!(
            s.iter().map(|p| p.0).collect::<Vec<_>>(),
            (0..100).map(f64::from).collect::<Vec<_>>()
        );
        // Short series are left as they are.
        let short = v[..10].to_vec();
        assert_eq!(smoothed(short.clone()), short);
    }
}
