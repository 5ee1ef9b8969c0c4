//! A hand-written SVG chart for `transfer --plot`: bandwidth (GB/s, linear y) against object
//! size (log2 x), with the raw TCP baseline as a dashed horizontal reference line.

use std::fmt::Write;

use ferroplasma::ByteSize;

const W: f64 = 760.0;
const H: f64 = 460.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 75.0;
const BOTTOM: f64 = 70.0;

/// The chart as an SVG document. `points` are `(object bytes, GB/s)`; non-finite values and
/// zero sizes are left out. `raw` is the baseline in GB/s, if measured, named `raw_label` in
/// the legend.
pub fn transfer_svg(
    title: &str,
    points: &[(u64, f64)],
    raw: Option<f64>,
    raw_label: &str,
) -> String {
    let pts: Vec<(f64, f64)> = points
        .iter()
        .filter(|(b, g)| *b > 0 && g.is_finite())
        .map(|&(b, g)| (log2(b), g))
        .collect();
    let raw = raw.filter(|r| r.is_finite());

    // x range: whole powers of two around the data, at least one unit wide.
    let (mut x0, mut x1) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(x, _)| {
            (lo.min(x), hi.max(x))
        });
    if !x0.is_finite() {
        (x0, x1) = (20.0, 30.0);
    }
    x0 = x0.floor();
    x1 = x1.ceil().max(x0 + 1.0);
    let ymax_data = pts.iter().map(|p| p.1).chain(raw).fold(0.0, f64::max);
    let (ymax, ystep) = nice_axis(ymax_data * 1.1);

    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP + ph - y / ymax * ph;

    let mut s = String::new();
    // `write!` into a String cannot fail.
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="30" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
        W / 2.0,
        escape(title)
    );

    // Grid and y ticks.
    let mut y = 0.0;
    while y <= ymax + ystep * 1e-6 {
        let py = sy(y);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e0e0e0"/>"##,
            LEFT + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            py + 4.0,
            tick_label(y, ystep)
        );
        y += ystep;
    }
    // x ticks: every power of two, or every second/fourth one when there are many.
    let span = x1 - x0;
    let every = if span > 24.0 {
        4.0
    } else if span > 12.0 {
        2.0
    } else {
        1.0
    };
    let mut x = x0;
    while x <= x1 + 1e-9 {
        let px = sx(x);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="#333"/>"##,
            TOP + ph,
            TOP + ph + 5.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + ph + 20.0,
            pow2_label(x)
        );
        x += every;
    }
    // Axes and their titles.
    let _ = writeln!(
        s,
        r##"<path d="M{LEFT},{TOP} V{:.1} H{:.1}" fill="none" stroke="#333"/>"##,
        TOP + ph,
        LEFT + pw
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">object size (log2 scale)</text>"#,
        LEFT + pw / 2.0,
        H - 25.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(22,{:.1}) rotate(-90)" text-anchor="middle">bandwidth (GB/s, 1e9 bytes/s)</text>"#,
        TOP + ph / 2.0
    );

    // Raw TCP reference.
    if let Some(r) = raw {
        let py = sy(r);
        let _ = writeln!(
            s,
            r##"<line class="raw" x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#d62728" stroke-width="2" stroke-dasharray="6,4"/>"##,
            LEFT + pw
        );
    }
    // Measured series.
    if !pts.is_empty() {
        let coords: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline class="series" points="{}" fill="none" stroke="#1f77b4" stroke-width="2"/>"##,
            coords.join(" ")
        );
        for &(x, y) in &pts {
            let _ = writeln!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#1f77b4"><title>{}: {y:.3} GB/s</title></circle>"##,
                sx(x),
                sy(y),
                pow2_label(x)
            );
        }
    }

    // Legend in one row between the title and the plot, clear of the data.
    let ly = TOP - 18.0;
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="#1f77b4" stroke-width="2"/>"##,
        LEFT + 28.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}">ferroplasma remote get (median)</text>"#,
        LEFT + 36.0,
        ly + 4.0
    );
    if let Some(r) = raw {
        let lx = LEFT + 280.0;
        let _ = writeln!(
            s,
            r##"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="#d62728" stroke-width="2" stroke-dasharray="6,4"/>"##,
            lx + 28.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{} ({r:.2} GB/s)</text>"#,
            lx + 36.0,
            ly + 4.0,
            escape(raw_label)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[allow(
    clippy::cast_precision_loss,
    reason = "sizes far below 2^52 plot exactly"
)]
fn log2(b: u64) -> f64 {
    (b as f64).log2()
}

/// A round maximum and step for an axis starting at 0 that covers `v`.
fn nice_axis(v: f64) -> (f64, f64) {
    if !(v.is_finite() && v > 0.0) {
        return (1.0, 0.2);
    }
    let raw_step = v / 5.0;
    let mag = 10f64.powf(raw_step.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw_step)
        .unwrap_or(10.0 * mag);
    ((v / step).ceil() * step, step)
}

fn tick_label(y: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{y:.0}")
    } else if step >= 0.1 {
        format!("{y:.1}")
    } else {
        format!("{y:.2}")
    }
}

/// `2^x` bytes as `1MiB`, `4GiB`, ...
fn pow2_label(x: f64) -> String {
    let e = x.round().clamp(0.0, 63.0);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "clamped to 0..=63 just above"
    )]
    let e = e as u32;
    ByteSize(1u64 << e).to_string()
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(s: &str, pat: &str) -> usize {
        s.matches(pat).count()
    }

    #[test]
    fn draws_series_reference_axes_and_legend() {
        let pts = [
            (1u64 << 20, 0.8),
            (16 << 20, 2.1),
            (64 << 20, 2.9),
            (256 << 20, 3.2),
            (1 << 30, 3.3),
            (4 << 30, 3.35),
        ];
        let svg = transfer_svg(
            "transfer <tcp> & more",
            &pts,
            Some(3.6),
            "raw TCP, same endpoints",
        );
        // To look at the chart: FP_BENCH_PLOT_SAMPLE=/tmp/sample.svg cargo test -p ferroplasma-bench
        if let Some(p) = std::env::var_os("FP_BENCH_PLOT_SAMPLE") {
            std::fs::write(p, &svg).unwrap();
        }
        assert!(svg.starts_with("<svg "));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("transfer &lt;tcp&gt; &amp; more"));
        assert_eq!(count(&svg, "<circle"), 6);
        assert_eq!(count(&svg, "</circle>"), 6);
        let poly = svg
            .lines()
            .find(|l| l.contains("class=\"series\""))
            .unwrap();
        let inner = poly.split("points=\"").nth(1).unwrap();
        let inner = inner.split('"').next().unwrap();
        let xs: Vec<f64> = inner
            .split(' ')
            .map(|p| p.split(',').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(xs.len(), 6);
        assert!(xs.windows(2).all(|w| w[0] < w[1]), "x grows with size");
        // Equal steps in log2 size (x4 each except the 16x first) give proportional x steps.
        let d1 = xs[2] - xs[1];
        let d2 = xs[3] - xs[2];
        assert!((d1 - d2).abs() < 0.2, "{d1} vs {d2}");
        assert!(svg.contains("class=\"raw\""));
        assert!(svg.contains("raw TCP, same endpoints (3.60 GB/s)"));
        for label in ["1MiB", "16MiB", "1GiB", "4GiB", "object size", "GB/s"] {
            assert!(svg.contains(label), "missing {label}");
        }
        // y axis reaches past the largest value (the raw line) with round ticks.
        assert!(svg.contains(">4<"), "{svg}");
        assert_eq!(count(&svg, "<text"), count(&svg, "</text>"));
        assert_eq!(count(&svg, "<svg"), 1);
    }

    #[test]
    fn degenerate_inputs_still_make_a_chart() {
        let one = transfer_svg("one", &[(1 << 30, 2.0)], None, "raw");
        assert_eq!(count(&one, "<circle"), 1);
        assert!(!one.contains("class=\"raw\""));
        assert!(!one.contains("NaN") && !one.contains("inf"));
        let none = transfer_svg(
            "none",
            &[(0, 1.0), (1 << 20, f64::NAN)],
            Some(f64::NAN),
            "raw",
        );
        assert_eq!(count(&none, "<circle"), 0);
        assert!(!none.contains("NaN") && !none.contains("inf"));
    }

    #[test]
    fn nice_axes() {
        assert_eq!(nice_axis(3.96), (4.0, 1.0));
        assert_eq!(nice_axis(11.0), (12.5, 2.5));
        let (m, s) = nice_axis(0.33);
        assert!((m - 0.4).abs() < 1e-9 && (s - 0.1).abs() < 1e-9);
    }
}
