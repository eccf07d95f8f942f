//! `RUN_DIR/curves.png`: the training curves of `metrics.jsonl` drawn as a picture, one panel per
//! quantity (objective, noised NLL, alignment loss, mean cosine, gradient norm), so a person can see a
//! run's shape without a plotting tool. Drawn by hand into an RGB buffer (a 3×5 pixel font for the
//! numbers and names), which keeps the binary free of a plotting and font stack.

use std::path::Path;

use anyhow::Context;

const WIDTH: usize = 960;
const PANEL_HEIGHT: usize = 200;
const LEFT: usize = 84;
const RIGHT: usize = 16;
const TOP: usize = 22;
const BOTTOM: usize = 22;
const SCALE: usize = 2;

/// The quantities drawn, by their `metrics.jsonl` key; `cos` (an array) is drawn as its mean.
const PANELS: [(&str, [u8; 3]); 5] = [
    ("loss", [31, 119, 180]),
    ("nll_noised", [44, 160, 44]),
    ("align_loss", [214, 39, 40]),
    ("cos", [148, 103, 189]),
    ("grad_norm", [255, 127, 14]),
];

/// One panel's points (step, value), finite values only.
struct Series {
    name: &'static str,
    color: [u8; 3],
    points: Vec<(f64, f64)>,
}

/// Reads `metrics.jsonl` and writes the curves as a PNG (atomically). Lines that do not parse (a line
/// cut by a crash) are skipped; with fewer than two logged steps nothing is written.
pub fn write(metrics: &Path, out: &Path) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let series = parse(&text);
    if series.is_empty() {
        return Ok(false);
    }
    let png = render(&series)?;
    stages::atomic::write_bytes_atomic(out, &png)?;
    Ok(true)
}

fn parse(text: &str) -> Vec<Series> {
    let mut series: Vec<Series> = PANELS
        .iter()
        .map(|&(name, color)| Series {
            name,
            color,
            points: vec![],
        })
        .collect();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v.get("step").and_then(serde_json::Value::as_f64) else {
            continue;
        };
        for s in &mut series {
            let value = match v.get(s.name) {
                Some(serde_json::Value::Array(a)) if !a.is_empty() => {
                    let xs: Vec<f64> = a.iter().filter_map(serde_json::Value::as_f64).collect();
                    (xs.len() == a.len()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
                }
                Some(x) => x.as_f64(),
                None => None,
            };
            if let Some(y) = value.filter(|y| y.is_finite()) {
                s.points.push((step, y));
            }
        }
    }
    series.retain(|s| s.points.len() >= 2);
    series
}

struct Canvas {
    pixels: Vec<u8>,
    width: usize,
    height: usize,
}

impl Canvas {
    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&c);
        }
    }

    fn hline(&mut self, x0: usize, x1: usize, y: usize, c: [u8; 3]) {
        for x in x0..=x1 {
            self.put(x as i64, y as i64, c);
        }
    }

    fn vline(&mut self, x: usize, y0: usize, y1: usize, c: [u8; 3]) {
        for y in y0..=y1 {
            self.put(x as i64, y as i64, c);
        }
    }

    /// Bresenham, two pixels thick so the curve reads at a glance.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.put(x, y, c);
            self.put(x, y + 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text at (x, y) top-left; unknown characters are drawn as blanks.
    fn text(&mut self, x: usize, y: usize, s: &str, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        for dy in 0..SCALE {
                            for dx in 0..SCALE {
                                self.put(
                                    (x + k * 4 * SCALE + col * SCALE + dx) as i64,
                                    (y + r * SCALE + dy) as i64,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

fn text_width(s: &str) -> usize {
    s.chars().count() * 4 * SCALE
}

/// 3×5 glyphs, one row per entry, bit 2 = left column.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        '_' => [0, 0, 0, 0, 7],
        'a' => [0, 3, 5, 5, 3],
        'c' => [0, 3, 4, 4, 3],
        'd' => [1, 3, 5, 5, 3],
        'e' => [0, 6, 7, 4, 3],
        'g' => [3, 5, 3, 1, 6],
        'i' => [2, 0, 2, 2, 2],
        'k' => [4, 5, 6, 5, 5],
        'l' => [6, 2, 2, 2, 7],
        'm' => [0, 7, 7, 5, 5],
        'n' => [0, 6, 5, 5, 5],
        'o' => [0, 2, 5, 5, 2],
        'p' => [0, 6, 5, 6, 4],
        'r' => [0, 3, 4, 4, 4],
        's' => [0, 3, 6, 3, 6],
        't' => [2, 7, 2, 2, 1],
        _ => [0; 5],
    }
}

/// A short label: 3 significant digits, scientific outside 1e-3..1e5.
fn label(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else {
        let decimals = (2 - a.log10().floor() as i64).clamp(0, 4) as usize;
        format!("{v:.decimals$}")
    }
}

/// The y range of a panel: min to the 98th percentile, so a few early spikes do not flatten the rest.
fn y_range(points: &[(f64, f64)]) -> (f64, f64) {
    let mut ys: Vec<f64> = points.iter().map(|p| p.1).collect();
    ys.sort_by(f64::total_cmp);
    let lo = ys[0];
    let hi = ys[((ys.len() - 1) as f64 * 0.98).round() as usize];
    if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        let pad = (hi - lo) * 0.05;
        (lo - pad, hi + pad)
    }
}

fn render(series: &[Series]) -> anyhow::Result<Vec<u8>> {
    let height = series.len() * PANEL_HEIGHT;
    let mut c = Canvas {
        pixels: vec![255; WIDTH * height * 3],
        width: WIDTH,
        height,
    };
    let (grid, axis, ink) = ([225, 225, 225], [120, 120, 120], [40, 40, 40]);
    for (k, s) in series.iter().enumerate() {
        let top = k * PANEL_HEIGHT + TOP;
        let bottom = (k + 1) * PANEL_HEIGHT - BOTTOM;
        let (left, right) = (LEFT, WIDTH - RIGHT);
        let (x0, x1) = (
            s.points[0].0,
            s.points[s.points.len() - 1].0.max(s.points[0].0 + 1.0),
        );
        let (y0, y1) = y_range(&s.points);
        let px = |x: f64| left as f64 + (x - x0) / (x1 - x0) * (right - left) as f64;
        let py = |y: f64| {
            let y = y.clamp(y0, y1);
            bottom as f64 - (y - y0) / (y1 - y0) * (bottom - top) as f64
        };
        for i in 0..=4 {
            let v = y0 + (y1 - y0) * i as f64 / 4.0;
            let y = py(v).round() as usize;
            c.hline(left, right, y, grid);
            let l = label(v);
            c.text(
                left.saturating_sub(text_width(&l) + 6),
                y.saturating_sub(5),
                &l,
                ink,
            );
        }
        c.vline(left, top, bottom, axis);
        c.hline(left, right, bottom, axis);
        c.text(left, top - 16, s.name, s.color);
        for (x, align_right) in [(x0, false), (x1, true)] {
            let l = format!("step {}", label(x.round()));
            let at = if align_right {
                right - text_width(&l)
            } else {
                left
            };
            c.text(at, bottom + 6, &l, ink);
        }
        let mut prev: Option<(i64, i64)> = None;
        for &(x, y) in &s.points {
            let p = (px(x).round() as i64, py(y).round() as i64);
            if let Some(q) = prev {
                c.line(q, p, s.color);
            }
            prev = Some(p);
        }
    }
    crate::formats::grid::encode_png(&c.pixels, c.width, c.height)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A falling loss and a rising cosine: both panels drawn, the loss curve's pixels descend from
    /// left to right, a cut last line is skipped, and a run with one logged step draws nothing.
    #[test]
    fn draws_the_logged_curves() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        let mut text = String::new();
        for step in (10..=200).step_by(10) {
            let s = step as f64;
            text.push_str(&format!(
                "{{\"step\":{step},\"loss\":{},\"cos\":[{},{}],\"align_loss\":null}}\n",
                5.0 / s.sqrt(),
                s / 400.0,
                s / 300.0
            ));
        }
        text.push_str("{\"step\":210,\"loss\":0.");
        std::fs::write(&metrics, &text).unwrap();
        let out = dir.path().join("curves.png");
        assert!(write(&metrics, &out).unwrap());
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(img.width() as usize, WIDTH);
        assert_eq!(
            img.height() as usize,
            2 * PANEL_HEIGHT,
            "loss and cos panels"
        );
        let color = PANELS[0].1;
        let rows_at = |x: u32| -> Vec<u32> {
            (0..PANEL_HEIGHT as u32)
                .filter(|&y| img.get_pixel(x, y).0 == color)
                .collect()
        };
        let (early, late) = (
            rows_at(LEFT as u32 + 40),
            rows_at((WIDTH - RIGHT) as u32 - 40),
        );
        assert!(!early.is_empty() && !late.is_empty());
        assert!(
            early[0] < late[0],
            "the loss curve falls: {early:?} vs {late:?}"
        );

        std::fs::write(&metrics, "{\"step\":1,\"loss\":2.0}\n").unwrap();
        let none = dir.path().join("none.png");
        assert!(!write(&metrics, &none).unwrap());
        assert!(!none.exists());
    }

    #[test]
    fn labels_are_short() {
        assert_eq!(label(1.23456), "1.23");
        assert_eq!(label(-0.04567), "-0.0457");
        assert_eq!(label(12345.0), "12345");
        assert_eq!(label(400000.0), "4.0e5");
        assert_eq!(label(0.0), "0");
    }
}
