//! Latency percentile plots as hand-written SVG (no plotting dependency).
//!
//! Each chart shows latency (log scale, ms) against percentile on the
//! usual HdrHistogram axis, where 90 %, 99 %, 99.9 %… are equally spaced,
//! so the tail is as readable as the median.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

pub struct Series {
    pub name: String,
    /// Microseconds.
    pub hist: Histogram<u64>,
}

pub struct Chart {
    pub title: String,
    pub series: Vec<Series>,
}

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn pct_label(t: u32) -> String {
    match t {
        0 => "0%".into(),
        1 => "90%".into(),
        n => format!("99.{}%", "9".repeat(n as usize - 2)).replace("99.%", "99%"),
    }
}

/// Every chart, stacked, in one SVG document.
pub fn svg(charts: &[Chart]) -> String {
    let total_h = HEIGHT * charts.len().max(1) as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{total_h}" viewBox="0 0 {WIDTH} {total_h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="{WIDTH}" height="{total_h}" fill="white"/>"#
    );
    for (i, c) in charts.iter().enumerate() {
        chart(&mut s, c, HEIGHT * i as f64);
    }
    s.push_str("</svg>\n");
    s
}

fn chart(s: &mut String, c: &Chart, y0: f64) {
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let count = c.series.iter().map(|x| x.hist.len()).max().unwrap_or(0);
    // As many nines as the sample supports (at least 99 %, at most 99.9999 %).
    let nines = ((count.max(1) as f64).log10().ceil() as u32).clamp(2, 6);
    let (mut lo, mut hi) = (f64::MAX, 0f64);
    for x in c.series.iter().filter(|x| !x.hist.is_empty()) {
        lo = lo.min(x.hist.min().max(1) as f64 / 1000.0);
        hi = hi.max(x.hist.max().max(1) as f64 / 1000.0);
    }
    if hi == 0.0 {
        lo = 0.1;
        hi = 1.0;
    }
    let dlo = lo.log10().floor();
    let dhi = hi.log10().ceil().max(dlo + 1.0);
    let px = |t: f64| LEFT + t / nines as f64 * plot_w;
    let py = |ms: f64| y0 + TOP + plot_h - (ms.max(1e-9).log10() - dlo) / (dhi - dlo) * plot_h;

    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="14" font-weight="bold">{}</text>"#,
        LEFT,
        y0 + 24.0,
        esc(&c.title)
    );
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>"##,
        y0 + TOP
    );
    // y grid: decades and 2x, 5x
    let mut d = dlo;
    while d <= dhi {
        for (m, major) in [(1.0, true), (2.0, false), (5.0, false)] {
            let v = m * 10f64.powf(d);
            if v.log10() > dhi + 1e-9 {
                continue;
            }
            let y = py(v);
            let stroke = if major { "#bbb" } else { "#eee" };
            let _ = writeln!(
                s,
                r#"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{stroke}"/>"#,
                LEFT + plot_w
            );
            let label = if v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            };
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="{}">{label}</text>"#,
                LEFT - 6.0,
                y + 4.0,
                if major { "#000" } else { "#888" }
            );
        }
        d += 1.0;
    }
    // x grid: 0 %, 90 %, 99 %, …
    for t in 0..=nines {
        let x = px(t as f64);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            y0 + TOP,
            y0 + TOP + plot_h
        );
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            y0 + TOP + plot_h + 16.0,
            pct_label(t)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + plot_w / 2.0,
        y0 + HEIGHT - 10.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">latency, ms (log)</text>"#,
        y0 + TOP + plot_h / 2.0
    );
    // curves (the first series, "all", drawn last so it stays on top) and legend
    for (i, x) in c.series.iter().enumerate().rev() {
        if x.hist.is_empty() {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        let mut pts = String::new();
        let steps = nines * 50;
        for k in 0..=steps {
            let t = k as f64 / 50.0;
            let q = 1.0 - 10f64.powf(-t);
            let v = if k == steps {
                x.hist.max()
            } else {
                x.hist.value_at_quantile(q)
            };
            let _ = write!(pts, "{:.1},{:.1} ", px(t), py(v.max(1) as f64 / 1000.0));
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="{}" points="{}"/>"#,
            if i == 0 { 2.5 } else { 1.5 },
            pts.trim_end()
        );
        let ly = y0 + TOP + 10.0 + 18.0 * i as f64;
        let lx = LEFT + plot_w + 14.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="3"/>"#,
            lx + 20.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{} (p50 {:.2})</text>"#,
            lx + 26.0,
            ly + 4.0,
            esc(&x.name),
            x.hist.value_at_quantile(0.5) as f64 / 1000.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::new_hist;

    #[test]
    fn svg_is_well_formed_enough() {
        let mut h = new_hist();
        for v in 1..10_000u64 {
            h.record(v * 3).unwrap();
        }
        let doc = svg(&[Chart {
            title: "a < b & c".into(),
            series: vec![
                Series {
                    name: "all".into(),
                    hist: h.clone(),
                },
                Series {
                    name: "empty".into(),
                    hist: new_hist(),
                },
            ],
        }]);
        assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
        assert!(doc.contains("a &lt; b &amp; c"));
        assert_eq!(doc.matches("<polyline").count(), 1);
        assert!(doc.contains(">99.9%<"));
        assert!(!doc.contains("NaN"));
    }

    #[test]
    fn percentile_labels() {
        assert_eq!(pct_label(0), "0%");
        assert_eq!(pct_label(1), "90%");
        assert_eq!(pct_label(2), "99%");
        assert_eq!(pct_label(4), "99.99%");
    }
}
