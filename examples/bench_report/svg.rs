//! The plot of bench 1, written as SVG by hand: rebuild cost per page (log scale) against entry
//! size (left) and against fill chunk size (right).

use std::fmt::Write as _;

const COLORS: [&str; 8] = [
    "#000000", "#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd", "#8c564b", "#e377c2",
];
/// Series of bench 1, in legend order: the baseline, monitor mode per fill chunk, SIGBUS mode.
pub const CHUNKS: [&str; 8] = [
    "baseline",
    "4K",
    "16K",
    "64K",
    "256K",
    "1M",
    "entry",
    "sigbus_64K",
];

/// The legend / column name of a series of [`CHUNKS`].
pub fn series_name(c: &str) -> String {
    match c {
        "baseline" => "fresh memory (baseline)".into(),
        "entry" => "chunk = entry".into(),
        _ => match c.strip_prefix("sigbus_") {
            Some(k) => format!("SIGBUS, chunk {k}"),
            None => format!("chunk {c}"),
        },
    }
}
const W: f64 = 520.0;
const H: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;

/// `64K`, `1M`, ... for a byte count.
pub fn size_label(bytes: f64) -> String {
    let b = bytes as u64;
    if b >= 1 << 20 && b % (1 << 20) == 0 {
        format!("{}M", b >> 20)
    } else if b >= 1 << 10 && b % (1 << 10) == 0 {
        format!("{}K", b >> 10)
    } else {
        format!("{b}B")
    }
}

fn ns_label(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{} µs", ns / 1e3)
    } else {
        format!("{ns} ns")
    }
}

/// A line of a panel: name, color, points as (x index, ns per page), dashed.
type Series = (String, &'static str, Vec<(usize, f64)>, bool);

struct Panel<'a> {
    x0: f64,
    title: &'a str,
    xlabel: &'a str,
    xs: Vec<String>,
    series: Vec<Series>,
}

fn draw(s: &mut String, p: &Panel<'_>, ylo: f64, yhi: f64) {
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let ox = p.x0 + LEFT;
    let x = |i: usize| {
        if p.xs.len() <= 1 {
            ox + pw / 2.0
        } else {
            ox + pw * i as f64 / (p.xs.len() - 1) as f64
        }
    };
    let y = |v: f64| TOP + ph * (1.0 - (v.log10() - ylo) / (yhi - ylo));
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        ox + pw / 2.0,
        p.title
    );
    // Grid: 1, 2, 5 per decade.
    let mut d = ylo.floor() as i32;
    while (d as f64) <= yhi {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(d);
            let lv = v.log10();
            if lv < ylo - 1e-9 || lv > yhi + 1e-9 {
                continue;
            }
            let yy = y(v);
            let major = m == 1.0;
            let _ = writeln!(
                s,
                r##"<line x1="{ox}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="{}" stroke-width="1"/>"##,
                ox + pw,
                if major { "#bbbbbb" } else { "#e5e5e5" }
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"#,
                ox - 6.0,
                yy + 4.0,
                ns_label(v)
            );
        }
        d += 1;
    }
    for (i, l) in p.xs.iter().enumerate() {
        let xx = x(i);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#eeeeee"/>"##,
            TOP + ph
        );
        let _ = writeln!(
            s,
            r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle" font-size="12">{l}</text>"#,
            TOP + ph + 18.0
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{ox}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">{}</text>"#,
        ox + pw / 2.0,
        H - 22.0,
        p.xlabel
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle" font-size="13">rebuild time per 4 KiB page</text>"#,
        p.x0 + 14.0,
        TOP + ph / 2.0
    );
    for (k, (name, color, pts, dashed)) in p.series.iter().enumerate() {
        if pts.is_empty() {
            continue;
        }
        let path: Vec<String> = pts
            .iter()
            .map(|&(i, v)| format!("{:.1},{:.1}", x(i), y(v)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{}/>"#,
            path.join(" "),
            if *dashed {
                r#" stroke-dasharray="6,4""#
            } else {
                ""
            }
        );
        for &(i, v) in pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"/>"#,
                x(i),
                y(v)
            );
        }
        // Legend, top right inside the panel.
        let ly = TOP + 14.0 + 16.0 * k as f64;
        let lx = ox + pw - 150.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{}/>"#,
            lx + 20.0,
            if *dashed {
                r#" stroke-dasharray="6,4""#
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="11">{name}</text>"#,
            lx + 25.0,
            ly + 4.0
        );
    }
}

/// `points`: (chunk label or "baseline", entry bytes, ns per page).
pub fn rebuild_plot(points: &[(String, f64, f64)]) -> String {
    let mut sizes: Vec<f64> = points.iter().map(|p| p.1).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    let chunks: Vec<&str> = CHUNKS
        .iter()
        .copied()
        .filter(|c| points.iter().any(|p| p.0 == *c))
        .collect();
    let vals: Vec<f64> = points.iter().map(|p| p.2).filter(|v| *v > 0.0).collect();
    let (lo, hi) = vals
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (ylo, yhi) = if vals.is_empty() {
        (2.0, 5.0)
    } else {
        // One decade of headroom on top for the legends.
        (
            (lo.log10() - 0.05).floor(),
            (hi.log10() + 0.05).ceil() + 1.0,
        )
    };

    let by_size = Panel {
        x0: 0.0,
        title: "Bulk rebuild: cost per page vs entry size",
        xlabel: "entry size (one line per fill chunk)",
        xs: sizes.iter().map(|&b| size_label(b)).collect(),
        series: chunks
            .iter()
            .enumerate()
            .map(|(k, &c)| {
                let pts = sizes
                    .iter()
                    .enumerate()
                    .filter_map(|(i, &sz)| {
                        points
                            .iter()
                            .find(|p| p.0 == c && p.1 == sz)
                            .map(|p| (i, p.2))
                    })
                    .collect();
                let dashed = c == "baseline" || c.starts_with("sigbus");
                (series_name(c), COLORS[k % COLORS.len()], pts, dashed)
            })
            .collect(),
    };
    let lazy_chunks: Vec<&str> = chunks
        .iter()
        .copied()
        .filter(|c| *c != "baseline" && !c.starts_with("sigbus"))
        .collect();
    let by_chunk = Panel {
        x0: W,
        title: "Bulk rebuild: cost per page vs fill chunk",
        xlabel: "fill chunk, monitor mode (one line per entry size)",
        xs: lazy_chunks.iter().map(|c| c.to_string()).collect(),
        series: sizes
            .iter()
            .enumerate()
            .map(|(k, &sz)| {
                // A chunk as large as the entry is the same fill as "entry".
                let pts = lazy_chunks
                    .iter()
                    .enumerate()
                    .filter_map(|(i, &c)| {
                        points
                            .iter()
                            .find(|p| p.0 == c && p.1 == sz)
                            .map(|p| (i, p.2))
                    })
                    .collect();
                (
                    format!("entry {}", size_label(sz)),
                    COLORS[(k + 1) % COLORS.len()],
                    pts,
                    false,
                )
            })
            .collect(),
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{H}" viewBox="0 0 {} {H}" font-family="sans-serif">"#,
        2.0 * W,
        2.0 * W
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{}" height="{H}" fill="white"/>"#,
        2.0 * W
    );
    draw(&mut s, &by_size, ylo, yhi);
    draw(&mut s, &by_chunk, ylo, yhi);
    s.push_str("</svg>\n");
    s
}
