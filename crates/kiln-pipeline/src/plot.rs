//! The report's charts, drawn with `plotters` into PNG files: line charts of training curves, a
//! scatter of accuracy against KL across post-training branches, and overlaid histograms. The font
//! travels with the binary (egui's Ubuntu Light), so a chart renders the same on any machine with
//! no system fonts; files are written whole under a temporary name and renamed.
//!
//! This module only draws what it is given: which charts exist, and their data, is the report's.

use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

const SIZE: (u32, u32) = (720, 420);
const FONT: &str = "sans-serif";
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// The n-th series colour.
fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn register_font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT)
            .is_ok()
    });
    ok.then_some(())
        .ok_or_else(|| anyhow!("the chart font failed to load"))
}

/// Draws into an RGB buffer with `draw`, then writes it as a PNG (atomically).
fn render(
    path: &Path,
    draw: impl FnOnce(DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    register_font()?;
    let (w, h) = SIZE;
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        draw(root.clone())?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header()?;
        wr.write_image_data(&rgb)?;
    }
    kiln_data::atomic_write(path, |f| f.write_all(&bytes))?;
    Ok(())
}

/// The range of `v` with a margin, never empty.
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.05
    } else {
        lo.abs().max(1.0) * 0.05
    };
    (lo - pad, hi + pad)
}

fn bounds(pts: impl Iterator<Item = (f64, f64)>) -> Option<(f64, f64, f64, f64)> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    let mut n = 0;
    for (x, y) in pts.filter(|p| p.0.is_finite() && p.1.is_finite()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
        n += 1;
    }
    (n > 0).then_some((x0, x1, y0, y1))
}

/// Plotters' errors carry the backend's error type; the report only needs their text.
fn e<E: std::fmt::Display>(err: E) -> anyhow::Error {
    anyhow!("{err}")
}

type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Every chart's frame: the title, the axes over `x` × `y` with their labels, a light grid.
fn frame<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    title: &str,
    (x, y): (std::ops::Range<f64>, std::ops::Range<f64>),
    (xlabel, ylabel): (&str, &str),
) -> Result<Chart<'a, 'b>> {
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x, y)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(xlabel)
        .y_desc(ylabel)
        .label_style((FONT, 13))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(e)?;
    Ok(chart)
}

/// The series' legend, boxed, at `pos`.
fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, pos: SeriesLabelPosition) -> Result<()> {
    chart
        .configure_series_labels()
        .position(pos)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(e)?;
    Ok(())
}

/// Named series of (x, y) points on shared axes. Returns false (and writes nothing) when there are
/// fewer than two finite points in all.
pub fn line_chart(
    path: &Path,
    title: &str,
    (xlabel, ylabel): (&str, &str),
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<bool> {
    let n_points: usize = series
        .iter()
        .map(|s| {
            s.1.iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .count()
        })
        .sum();
    let Some((x0, x1, y0, y1)) = bounds(series.iter().flat_map(|s| s.1.iter().copied())) else {
        return Ok(false);
    };
    if n_points < 2 {
        return Ok(false);
    }
    let (x0, x1) = if x1 > x0 { (x0, x1) } else { padded(x0, x1) };
    let (y0, y1) = padded(y0, y1);
    render(path, |root| {
        let mut chart = frame(&root, title, (x0..x1, y0..y1), (xlabel, ylabel))?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let c = colour(i);
            let pts: Vec<(f64, f64)> = pts
                .iter()
                .copied()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect();
            if pts.is_empty() {
                continue;
            }
            let style = c.stroke_width(2);
            let drawn = if pts.len() == 1 {
                chart.draw_series(std::iter::once(Circle::new(pts[0], 4, c.filled())))
            } else {
                chart.draw_series(LineSeries::new(pts.clone(), style))
            };
            drawn.map_err(e)?.label(*name).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
            });
            // Sparse series (evaluations) also get markers, so single points are visible.
            if pts.len() > 1 && pts.len() <= 30 {
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                    .map_err(e)?;
            }
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        Ok(())
    })?;
    Ok(true)
}

/// One labelled point with a vertical error bar (± `err`).
pub struct LabelledPoint {
    pub label: String,
    pub x: f64,
    pub y: f64,
    pub err: f64,
}

/// Labelled points with error bars, e.g. each branch's held-out accuracy against its KL to the
/// SFT model. Returns false when there are no finite points.
pub fn scatter_chart(
    path: &Path,
    title: &str,
    (xlabel, ylabel): (&str, &str),
    points: &[LabelledPoint],
) -> Result<bool> {
    let pts: Vec<&LabelledPoint> = points
        .iter()
        .filter(|p| p.x.is_finite() && p.y.is_finite())
        .collect();
    let Some((x0, x1, y0, y1)) = bounds(
        pts.iter()
            .flat_map(|p| [(p.x, p.y - p.err), (p.x, p.y + p.err)]),
    ) else {
        return Ok(false);
    };
    let (x0, x1) = padded(x0.min(0.0), x1);
    let (x0, x1) = (x0, x1 + (x1 - x0) * 0.15); // room for the labels
    let (y0, y1) = padded(y0, y1);
    render(path, |root| {
        let mut chart = frame(&root, title, (x0..x1, y0..y1), (xlabel, ylabel))?;
        for (i, p) in pts.iter().enumerate() {
            let c = colour(i);
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(p.x, p.y - p.err), (p.x, p.y + p.err)],
                    c.stroke_width(2),
                )))
                .map_err(e)?;
            chart
                .draw_series(std::iter::once(Circle::new((p.x, p.y), 5, c.filled())))
                .map_err(e)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    p.label.clone(),
                    (p.x, p.y),
                    (FONT, 15)
                        .into_font()
                        .color(&c)
                        .pos(plotters::style::text_anchor::Pos::new(
                            plotters::style::text_anchor::HPos::Left,
                            plotters::style::text_anchor::VPos::Bottom,
                        )),
                )))
                .map_err(e)?;
        }
        Ok(())
    })?;
    Ok(true)
}

/// Overlaid histograms (outlines) of several samples on shared bins, e.g. the reward model's
/// scores of each model's answers. Returns false when there are no finite values.
pub fn histogram_chart(
    path: &Path,
    title: &str,
    xlabel: &str,
    samples: &[(&str, Vec<f64>)],
) -> Result<bool> {
    let all: Vec<f64> = samples
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    if all.is_empty() {
        return Ok(false);
    }
    let (lo, hi) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (lo, hi) = padded(lo, hi);
    let bins = 24usize;
    let width = (hi - lo) / bins as f64;
    let counts: Vec<Vec<f64>> = samples
        .iter()
        .map(|(_, v)| {
            let mut c = vec![0.0; bins];
            let n = v.iter().filter(|x| x.is_finite()).count().max(1) as f64;
            for &x in v.iter().filter(|x| x.is_finite()) {
                let b = (((x - lo) / width) as usize).min(bins - 1);
                c[b] += 1.0 / n;
            }
            c
        })
        .collect();
    let top = counts.iter().flatten().fold(0.0f64, |a, &b| a.max(b)) * 1.1;
    render(path, |root| {
        let mut chart = frame(
            &root,
            title,
            (lo..hi, 0.0..top.max(1e-9)),
            (xlabel, "share of answers"),
        )?;
        for (i, ((name, _), c)) in samples.iter().zip(&counts).enumerate() {
            let col = colour(i);
            // A step outline: up and across each bin.
            let mut pts = vec![(lo, 0.0)];
            for (b, &h) in c.iter().enumerate() {
                let x = lo + b as f64 * width;
                pts.push((x, h));
                pts.push((x + width, h));
            }
            pts.push((hi, 0.0));
            chart
                .draw_series(LineSeries::new(pts, col.stroke_width(2)))
                .map_err(e)?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(2))
                });
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        Ok(())
    })?;
    Ok(true)
}

/// A noisy per-step series as the running mean of its last `len / 50` points (at least 1), so the
/// trend shows through the batch-to-batch noise.
pub fn smoothed(v: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_a_trailing_mean() {
        // 100 points: a window of 2. Alternating 0/1 becomes 0.5 after the first point.
        let v: Vec<(f64, f64)> = (0..100).map(|i| (i as f64, (i % 2) as f64)).collect();
        let s = smoothed(v.clone());
        assert_eq!(s[0].1, 0.0);
        assert!(s[1..].iter().all(|p| (p.1 - 0.5).abs() < 1e-12));
        assert_eq!(s.len(), v.len());
    }

    /// The decoded PNG: (width, height, RGB bytes).
    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    /// Pixels of exactly the n-th series colour.
    fn count_colour(rgb: &[u8], c: RGBColor) -> usize {
        rgb.chunks(3).filter(|p| p == &[c.0, c.1, c.2]).count()
    }

    #[test]
    fn charts_draw_their_series_and_skip_empty_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        let rising: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, i as f64 * 0.1)).collect();
        let flat: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, 2.0)).collect();
        assert!(line_chart(&p, "t", ("step", "loss"), &[("a", rising), ("b", flat)]).unwrap());
        let (w, h, rgb) = decode(&p);
        assert_eq!((w, h), SIZE);
        // Both series' colours are on the canvas (line and legend), and it is mostly white.
        assert!(count_colour(&rgb, colour(0)) > 100);
        assert!(count_colour(&rgb, colour(1)) > 100);
        assert!(count_colour(&rgb, RGBColor(255, 255, 255)) > (w * h / 2) as usize);
        // Nothing finite to draw: no file.
        let q = dir.path().join("b.png");
        assert!(!line_chart(&q, "t", ("x", "y"), &[("a", vec![(0.0, f64::NAN)])]).unwrap());
        assert!(!q.exists());
        let s = dir.path().join("s.png");
        let pts = [
            LabelledPoint {
                label: "SFT".into(),
                x: 0.0,
                y: 0.4,
                err: 0.05,
            },
            LabelledPoint {
                label: "PPO".into(),
                x: 3.0,
                y: 0.55,
                err: 0.05,
            },
        ];
        assert!(scatter_chart(&s, "acc vs KL", ("KL", "accuracy"), &pts).unwrap());
        assert!(count_colour(&decode(&s).2, colour(1)) > 20);
        let hst = dir.path().join("h.png");
        assert!(histogram_chart(
            &hst,
            "scores",
            "score",
            &[("a", vec![0.0, 1.0, 1.0]), ("b", vec![2.0])]
        )
        .unwrap());
        assert!(count_colour(&decode(&hst).2, colour(1)) > 20);
    }
}
