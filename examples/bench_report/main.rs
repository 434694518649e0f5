//! Reads criterion's results of the lazyfree benches and writes `docs/BENCHMARKS.md` (ratios
//! against the baselines measured in the same run, the machine, targets met or missed) and
//! `docs/rebuild_cost.svg` (rebuild cost per page against entry size and chunk size). The
//! pressure bench's own results (`CRITERION_DIR/pressure/results.json`, not criterion's) make the
//! "Under memory pressure" section.
//!
//! ```text
//! cargo bench                                  # or LAZYFREE_BENCH_QUICK=1 cargo bench
//! cargo run --example bench_report [CRITERION_DIR] [OUT_DIR]
//! ```
//! CRITERION_DIR defaults to `$CRITERION_HOME`, `$CARGO_TARGET_DIR/criterion`, then
//! `target/criterion`; OUT_DIR to this crate's `docs/`. If `OUT_DIR/bench-notes.md` exists, it
//! is appended as the findings section. Only results written by the latest run of each bench
//! (per the side file it writes at its end) are used; older ones are listed as stale. So one
//! bench run alone (`cargo bench --bench shared`) replaces its own rows and keeps the others;
//! the header then names each run and the benches it ran.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

mod json;
mod pressure;
mod shared;
mod svg;

use json::Json;

/// One criterion result.
#[derive(Debug, Clone)]
struct Measure {
    group: String,
    function: String,
    value: String,
    /// Time per iteration, ns: point estimate and 95% interval.
    ns: f64,
    lo: f64,
    hi: f64,
    mtime: u64,
}

const GROUPS: [&str; 9] = [
    "bulk_rebuild",
    "random_page",
    "realistic",
    "resident_read",
    "pin_unpin",
    "two_threads",
    "bookkeeping",
    "pressure",
    "shared",
];

fn criterion_dir() -> PathBuf {
    if let Some(a) = std::env::args().nth(1) {
        return PathBuf::from(a);
    }
    if let Some(h) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(h);
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(t).join("criterion");
    }
    PathBuf::from("target/criterion")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "new") && p.join("estimates.json").exists() {
                out.push(p);
            } else {
                walk(&p, out);
            }
        }
    }
}

fn load(dir: &Path) -> Option<Measure> {
    let bench = json::parse(&std::fs::read_to_string(dir.join("benchmark.json")).ok()?)?;
    let est_path = dir.join("estimates.json");
    let est = json::parse(&std::fs::read_to_string(&est_path).ok()?)?;
    // What criterion prints as "time": the slope where it has one, else the mean.
    let e = est
        .get("slope")
        .filter(|s| !matches!(s, Json::Null))
        .or_else(|| est.get("mean"))?;
    let ci = e.get("confidence_interval")?;
    let mtime = std::fs::metadata(&est_path)
        .and_then(|m| m.modified())
        .ok()?
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(Measure {
        group: bench.get("group_id")?.str()?.to_string(),
        function: bench.get("function_id")?.str().unwrap_or("").to_string(),
        value: bench.get("value_str")?.str().unwrap_or("").to_string(),
        ns: e.get("point_estimate")?.num()?,
        lo: ci.get("lower_bound")?.num()?,
        hi: ci.get("upper_bound")?.num()?,
        mtime,
    })
}

/// The side files the benches write (`lazyfree-extra/<group>.json`).
fn extras(dir: &Path) -> BTreeMap<String, Json> {
    GROUPS
        .iter()
        .filter_map(|g| {
            let p = dir.join("lazyfree-extra").join(format!("{g}.json"));
            let j = json::parse(&std::fs::read_to_string(p).ok()?)?;
            Some((g.to_string(), j))
        })
        .collect()
}

/// Bytes from a label like `64K`, `16M`.
fn label_bytes(s: &str) -> Option<f64> {
    let (n, mult) = if let Some(n) = s.strip_suffix('K') {
        (n, 1024.0)
    } else if let Some(n) = s.strip_suffix('M') {
        (n, 1024.0 * 1024.0)
    } else {
        (s.strip_suffix('B').unwrap_or(s), 1.0)
    };
    n.parse::<f64>().ok().map(|v| v * mult)
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

struct Results {
    all: Vec<Measure>,
}

impl Results {
    fn find(&self, group: &str, function: &str, value: &str) -> Option<&Measure> {
        self.all
            .iter()
            .find(|m| m.group == group && m.function == function && m.value == value)
    }
}

/// A ratio row: a ÷ b (or b ÷ a when `inverse`, for throughput ratios).
struct Ratio {
    name: String,
    target: String,
    check: Option<Box<dyn Fn(f64) -> bool>>,
    value: Option<(f64, f64, f64)>,
    /// The same ratio measured interleaved (A, B, A, B, ...): median of the per-pair ratios.
    paired: Option<f64>,
    note: String,
}

fn ratio(a: Option<&Measure>, b: Option<&Measure>, inverse: bool) -> Option<(f64, f64, f64)> {
    let (a, b) = (a?, b?);
    Some(if inverse {
        (b.ns / a.ns, b.lo / a.hi, b.hi / a.lo)
    } else {
        (a.ns / b.ns, a.lo / b.hi, a.hi / b.lo)
    })
}

fn num(ex: &BTreeMap<String, Json>, g: &str, k: &str) -> Option<f64> {
    ex.get(g)?.get(k)?.num()
}

fn text<'a>(ex: &'a BTreeMap<String, Json>, g: &str, k: &str) -> Option<&'a str> {
    ex.get(g)?.get(k)?.str()
}

fn ratios(r: &Results, ex: &BTreeMap<String, Json>) -> Vec<Ratio> {
    let bulk = |f: &str| r.find("bulk_rebuild", f, "1M");
    let base = bulk("fresh_memcpy");
    let mut v = Vec::new();
    for (f, what) in [
        (
            "lazyfree_chunk_64K",
            "monitor, default config: 64 KiB fill chunk, 512 KiB read-ahead",
        ),
        (
            "lazyfree_chunk_64K_no_read_ahead",
            "monitor, 64 KiB fill chunk, read-ahead off",
        ),
        ("lazyfree_chunk_entry", "monitor, fill chunk = whole entry"),
        ("lazyfree_chunk_4K", "monitor, fill chunk = one page"),
        (
            "sigbus_chunk_64K",
            "SIGBUS mode, default fill chunk of 64 KiB",
        ),
    ] {
        v.push(Ratio {
            name: format!(
                "bulk rebuild of a purged 1 MiB entry ({what}) ÷ writing 1 MiB into fresh memory"
            ),
            target: "≤ 1.0".into(),
            check: Some(Box::new(|x| x <= 1.0)),
            value: ratio(bulk(f), base, false),
            paired: num(
                ex,
                "bulk_rebuild",
                &format!("{}_1M_interleaved_ratio", f.trim_start_matches("lazyfree_")),
            ),
            note: String::new(),
        });
    }
    let rp = r
        .all
        .iter()
        .find(|m| m.group == "random_page" && m.function == "fresh_fault_memcpy");
    let rv = rp.map_or("", |m| m.value.as_str());
    v.push(Ratio {
        name: "random single-page rebuild, monitor ÷ first-touch fault + 4 KiB memcpy".into(),
        target: "≤ 4".into(),
        check: Some(Box::new(|x| x <= 4.0)),
        value: ratio(r.find("random_page", "monitor", rv), rp, false),
        paired: num(ex, "random_page", "monitor_interleaved_ratio"),
        note: num(ex, "random_page", "monitor_no_read_ahead_interleaved_ratio")
            .map_or(String::new(), |x| {
                format!("the same with read-ahead off: {x:.2} (random access gets none)")
            }),
    });
    let sig = r.find("random_page", "sigbus", rv);
    v.push(Ratio {
        name: "random single-page rebuild, SIGBUS ÷ first-touch fault + 4 KiB memcpy".into(),
        target: "≤ 2.5".into(),
        check: Some(Box::new(|x| x <= 2.5)),
        value: ratio(sig, rp, false),
        paired: num(ex, "random_page", "sigbus_interleaved_ratio"),
        note: if sig.is_none() {
            text(ex, "random_page", "sigbus")
                .unwrap_or("not measured")
                .to_string()
        } else {
            String::new()
        },
    });
    for size in ["256K", "1M", "16M"] {
        let val = ratio(
            r.find("resident_read", "lazyfree", size),
            r.find("resident_read", "vec", size),
            false,
        );
        if val.is_some() {
            v.push(Ratio {
                name: format!("resident read of {size} ÷ Vec read"),
                target: "1.00 ± 0.03".into(),
                check: Some(Box::new(|x| (0.97..=1.03).contains(&x))),
                value: val,
                paired: num(ex, "resident_read", &format!("{size}_interleaved_ratio")),
                note: String::new(),
            });
        }
    }
    v.push(Ratio {
        name: "pin+unpin of a resident 1 MiB entry ÷ Chromium-style lock+unlock".into(),
        target: "≤ 0.3".into(),
        check: Some(Box::new(|x| x <= 0.3)),
        value: ratio(
            r.find("pin_unpin", "lazyfree_pin_unpin", "1M"),
            r.find("pin_unpin", "chromium_lock_unlock", "1M"),
            false,
        ),
        paired: num(ex, "pin_unpin", "interleaved_ratio"),
        note: num(ex, "pin_unpin", "no_delay_interleaved_ratio").map_or(String::new(), |x| {
            format!("with unpin_delay = 0 (every unpin advises, every pin populates): {x:.2}")
        }),
    });
    let bk = |f: &str| {
        r.all
            .iter()
            .find(|m| m.group == "bookkeeping" && m.function == f)
    };
    v.push(Ratio {
        name: "cache get, random keys, two threads (half the keys each) ÷ one thread (throughput)"
            .into(),
        target: "≥ 1.8".into(),
        check: Some(Box::new(|x| x >= 1.8)),
        value: ratio(bk("get_two_threads"), bk("get"), true),
        paired: num(ex, "bookkeeping", "get_two_threads_speedup_interleaved"),
        note: num(
            ex,
            "bookkeeping",
            "quick_cache_get_two_threads_speedup_interleaved",
        )
        .map_or(String::new(), |q| {
            format!("quick_cache on the same machine and keys: {q:.2} (interleaved)")
        }),
    });
    v.push(Ratio {
        name: "cache get, one thread ÷ quick_cache get on the same keys (time)".into(),
        target: "≤ 1.5".into(),
        check: Some(Box::new(|x| x <= 1.5)),
        value: ratio(bk("get"), bk("quick_cache_get"), false),
        paired: num(ex, "bookkeeping", "get_vs_quick_cache_interleaved"),
        note: num(ex, "bookkeeping", "quick_cache_hit_fraction").map_or(String::new(), |h| {
            format!("quick_cache kept {:.1}% of the keys", h * 100.0)
        }),
    });
    let tt = r
        .all
        .iter()
        .find(|m| m.group == "two_threads" && m.function == "one_thread");
    let tv = tt.map_or("", |m| m.value.as_str());
    v.push(Ratio {
        name: "two-thread rebuild throughput ÷ one thread (LZ4 callback)".into(),
        target: "≥ 1.7".into(),
        check: Some(Box::new(|x| x >= 1.7)),
        value: ratio(r.find("two_threads", "two_threads", tv), tt, true),
        paired: num(ex, "two_threads", "interleaved_ratio"),
        note: String::new(),
    });
    for (what, f) in [("lz4", "lz4_"), ("png", "png_")] {
        let m = r
            .all
            .iter()
            .find(|m| m.group == "realistic" && m.function == "lazyfree" && m.value.starts_with(f));
        let val = m.and_then(|m| {
            ratio(
                Some(m),
                r.find("realistic", "decode_to_vec", &m.value),
                false,
            )
        });
        let note = match (
            num(
                ex,
                "realistic",
                &format!("{what}_bytes_returned_per_reclaim"),
            ),
            num(ex, "realistic", &format!("{what}_compressed_bytes")),
        ) {
            (Some(b), Some(c)) => format!(
                "kernel got back {:.0} KiB per reclaim; {:.0} KiB compressed kept to rebuild",
                b / 1024.0,
                c / 1024.0
            ),
            _ => String::new(),
        };
        v.push(Ratio {
            name: format!(
                "realistic rebuild on touch ({}) ÷ decoding into a new Vec",
                m.map_or(what, |m| m.value.as_str())
            ),
            target: if what == "lz4" { "≤ 1.3" } else { "≤ 1.15" }.into(),
            check: Some(if what == "lz4" {
                Box::new(|x| x <= 1.3)
            } else {
                Box::new(|x| x <= 1.15)
            }),
            value: val,
            paired: num(ex, "realistic", &format!("{what}_interleaved_ratio")),
            note,
        });
    }
    v.extend(shared::ratios(r, ex));
    v
}

fn machine(ex: &BTreeMap<String, Json>) -> String {
    let Some(j) = ex.values().next() else {
        return "unknown (no side files found)\n".into();
    };
    let f = |k: &str| j.get(k).and_then(Json::str).unwrap_or("?").to_string();
    let gib = |k: &str| {
        let kb = f(k)
            .trim_end_matches(" kB")
            .trim()
            .parse::<f64>()
            .unwrap_or(f64::NAN);
        format!("{:.1} GiB", kb / (1024.0 * 1024.0))
    };
    let mut s = format!(
        "- CPU: {} × {} ({}virtual machine)\n- memory: {}, swap: {}\n- kernel: Linux {}, \
         transparent huge pages: `{}`\n- {}\n- load average (1, 5, 15 min) when each bench \
         ended, a sign of other work on the machine:",
        f("machine_cpus"),
        f("machine_cpu"),
        if f("machine_virtual") == "yes" {
            ""
        } else {
            "not a "
        },
        gib("machine_mem"),
        gib("machine_swap"),
        f("machine_kernel"),
        f("machine_thp"),
        f("machine_rustc"),
    );
    for (g, j) in ex {
        let l = j.get("machine_loadavg").and_then(Json::str).unwrap_or("?");
        let _ = write!(s, " {g} {l};");
    }
    s.pop();
    s.push('\n');
    s
}

fn utc(secs: u64) -> String {
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64;
    let s = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y}-{m:02}-{d:02} {:02}:{:02} UTC",
        s / 3600,
        (s % 3600) / 60
    )
}

fn main() {
    let dir = criterion_dir();
    let out = std::env::args()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("docs"));
    let ex = extras(&dir);
    if ex.is_empty() {
        eprintln!(
            "no lazyfree bench results under {}: run `cargo bench` first (or pass the criterion \
             folder as the first argument)",
            dir.display()
        );
        std::process::exit(1);
    }
    let mut found = Vec::new();
    walk(&dir, &mut found);
    let mut all: Vec<Measure> = found.iter().filter_map(|p| load(p)).collect();
    // Keep only what the latest run of each bench wrote: it ends by writing its side file.
    let mut stale = Vec::new();
    all.retain(|m| {
        let end = num(&ex, &m.group, "machine_unix_time")
            .or_else(|| text(&ex, &m.group, "machine_unix_time").and_then(|s| s.parse().ok()));
        let fresh = end.is_some_and(|t| {
            let t = t as u64;
            m.mtime <= t + 5 && m.mtime + 1800 >= t
        });
        if !fresh {
            stale.push(format!("{}/{}/{}", m.group, m.function, m.value));
        }
        fresh
    });
    all.sort_by(|a, b| {
        (
            a.group.as_str(),
            &a.function,
            label_bytes(&a.value).unwrap_or(0.0) as u64,
        )
            .cmp(&(
                b.group.as_str(),
                &b.function,
                label_bytes(&b.value).unwrap_or(0.0) as u64,
            ))
    });
    let r = Results { all };
    let md = render(&r, &ex, &stale, &out, pressure::load(&dir).as_ref());
    std::fs::create_dir_all(&out).expect("create the output folder");
    std::fs::write(out.join("BENCHMARKS.md"), md).expect("write BENCHMARKS.md");
    let pts: Vec<_> = bulk_points(&r)
        .into_iter()
        .filter(|p| fully_dropped(&ex, &p.0, p.1))
        .collect();
    let plot = svg::rebuild_plot(&pts);
    std::fs::write(out.join("rebuild_cost.svg"), plot).expect("write rebuild_cost.svg");
    println!(
        "wrote {} and {} from {} results ({} stale ignored)",
        out.join("BENCHMARKS.md").display(),
        out.join("rebuild_cost.svg").display(),
        r.all.len(),
        stale.len()
    );
}

/// The bench-1 key of the side file for a series and size: `chunk_64K_1M`, `sigbus_chunk_64K_1M`.
fn bulk_key(chunk: &str, label: &str) -> String {
    match chunk.strip_prefix("sigbus_") {
        Some(k) => format!("sigbus_chunk_{k}_{label}"),
        None => format!("chunk_{chunk}_{label}"),
    }
}

/// Whether reclaim dropped (nearly) every page before each timed rebuild of this series and
/// size; if not, the time is of a partial rebuild and is left out of the plot.
fn fully_dropped(ex: &BTreeMap<String, Json>, chunk: &str, bytes: f64) -> bool {
    if chunk == "baseline" {
        return true;
    }
    let key = format!(
        "{}_pages_dropped_per_rebuild",
        bulk_key(chunk, &svg::size_label(bytes))
    );
    num(ex, "bulk_rebuild", &key).map_or(true, |d| d >= 0.98 * bytes / 4096.0)
}

/// (chunk label, entry bytes, ns per page); chunk "baseline" is the fresh-memory copy.
fn bulk_points(r: &Results) -> Vec<(String, f64, f64)> {
    r.all
        .iter()
        .filter(|m| m.group == "bulk_rebuild")
        .filter_map(|m| {
            let bytes = label_bytes(&m.value)?;
            let chunk = if m.function == "fresh_memcpy" {
                "baseline".to_string()
            } else if let Some(c) = m.function.strip_prefix("sigbus_chunk_") {
                format!("sigbus_{c}")
            } else {
                m.function.strip_prefix("lazyfree_chunk_")?.to_string()
            };
            Some((chunk, bytes, m.ns / (bytes / 4096.0)))
        })
        .collect()
}

fn render(
    r: &Results,
    ex: &BTreeMap<String, Json>,
    stale: &[String],
    out: &Path,
    pressure: Option<&Json>,
) -> String {
    let mut s = String::new();
    let runs = runs(ex);
    let when = runs.iter().map(|r| r.0).max().map_or("unknown".into(), utc);
    let quick = ex
        .values()
        .any(|j| j.get("quick").and_then(Json::num).unwrap_or(0.0) > 0.0);
    let _ = writeln!(s, "# Benchmarks\n");
    if runs.len() <= 1 {
        let quick = if quick {
            " in QUICK mode (short measurements, fewer sizes: indicative only)"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "Generated by `cargo run --example bench_report` from the criterion results of one \
             `cargo bench` run{quick} finished {when}. Every ratio divides two results of that \
             run, measured one after the other in the same bench binary.\n",
        );
    } else {
        let list: Vec<String> = runs
            .iter()
            .map(|(t, g)| {
                let q = g.iter().any(|g| num(ex, g, "quick").unwrap_or(0.0) > 0.0);
                let q = if q { " (in QUICK mode)" } else { "" };
                format!("{} finished {}{q}", g.join(", "), utc(*t))
            })
            .collect();
        let _ = writeln!(
            s,
            "Generated by `cargo run --example bench_report` from the criterion results of \
             {} separate `cargo bench` runs: {}. Every ratio divides two results of one \
             run, measured one after the other in the same bench binary.\n",
            runs.len(),
            list.join("; "),
        );
    }
    let _ = writeln!(s, "## Machine\n\n{}", machine(ex));
    let _ = writeln!(s, "## Targets\n");
    let _ = writeln!(
        s,
        "Two measurements of each ratio, both from this run: criterion's (each side measured \
         for its own stretch of time, one after the other; 95% interval from the two \
         intervals) and an interleaved one (A, B, A, B, … for 30–200 pairs right after; the \
         median of the per-pair ratios), which the drift of a shared machine cannot bias. \
         **met?** judges the interleaved median where there is one.\n"
    );
    let _ = writeln!(
        s,
        "| ratio | target | criterion (95% interval) | interleaved median | met? | note |\n\
         |---|---|---|---|---|---|"
    );
    for row in ratios(r, ex) {
        let crit = row.value.map_or("not measured".into(), |(x, lo, hi)| {
            format!("{x:.3} ({lo:.2}–{hi:.2})")
        });
        let paired = row.paired.map_or("–".into(), |x| format!("{x:.3}"));
        let judged = row.paired.or(row.value.map(|v| v.0));
        let met = match (judged, &row.check) {
            (Some(x), Some(c)) => {
                if c(x) {
                    "**met**"
                } else {
                    "**missed**"
                }
            }
            (Some(_), None) => "–",
            (None, _) => "**gap**",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {crit} | {paired} | {met} | {} |",
            row.name, row.target, row.note
        );
    }
    let _ = writeln!(s);

    let _ = writeln!(s, "## Rebuild cost per page\n");
    let _ = writeln!(
        s,
        "![rebuild cost per page against entry size and fill chunk](rebuild_cost.svg)\n\n\
         Bench 1: each point is the time to rebuild a whole reclaimed entry (read one byte per \
         page), divided by its pages. The baseline copies the same bytes into fresh anonymous \
         memory (first-touch faults included).\n"
    );
    bulk_table(&mut s, r, ex);
    fault_latency(&mut s, ex);
    pressure::section(&mut s, pressure);

    let _ = writeln!(s, "## Scale of bookkeeping\n");
    let n = num(ex, "bookkeeping", "entries").unwrap_or(0.0);
    // The label the bench gave its entry count (a quick run's results, of another count, may
    // still be in the directory and fresh).
    let label = if n == 1e6 {
        "1M".to_string()
    } else {
        format!("{:.0}K", n / 1000.0)
    };
    let per = |f: &str| {
        r.all
            .iter()
            .find(|m| m.group == "bookkeeping" && m.function == f && m.value == label)
            .map_or("not measured".into(), |m| {
                format!("{} per entry ({:.2} M/s)", fmt_ns(m.ns / n), n / m.ns * 1e3)
            })
    };
    let _ = writeln!(
        s,
        "{n:.0} entries of 4 KiB, inserted lazily (nothing computed), then fetched in random \
         order (by two threads, each half of the keys, for the third row; the quick_cache rows \
         are a reference on the same keys).\n\n| what | measured |\n|---|---|\n\
         | insert | {} |\n| insert, one function for the cache (`with_regen`) | {} |\n\
         | get | {} |\n| get, two threads | {} |\n| quick_cache insert | {} |\n\
         | quick_cache get | {} |\n\
         | VMAs added | {:.0} |\n| heap metadata per entry | {:.0} bytes |\n\
         | heap metadata per entry, one function for the cache | {:.0} bytes |\n\
         | resident memory per entry (VmRSS) | {:.0} bytes |\n\
         | resident memory per entry, one function for the cache | {:.0} bytes |\n\
         | heap metadata per entry, a cache with a budget | {:.0} bytes |\n\
         | resident memory per entry, a cache with a budget | {:.0} bytes |\n\
         | dropping the cache | {} per entry |\n",
        per("insert"),
        per("insert_keyed"),
        per("get"),
        per("get_two_threads"),
        per("quick_cache_insert"),
        per("quick_cache_get"),
        num(ex, "bookkeeping", "vmas_added").unwrap_or(f64::NAN),
        num(ex, "bookkeeping", "heap_bytes_per_entry").unwrap_or(f64::NAN),
        num(ex, "bookkeeping", "keyed_heap_bytes_per_entry").unwrap_or(f64::NAN),
        num(ex, "bookkeeping", "rss_bytes_per_entry").unwrap_or(f64::NAN),
        num(ex, "bookkeeping", "keyed_rss_bytes_per_entry").unwrap_or(f64::NAN),
        num(ex, "bookkeeping", "budget_heap_bytes_per_entry").unwrap_or(f64::NAN),
        num(ex, "bookkeeping", "budget_rss_bytes_per_entry").unwrap_or(f64::NAN),
        fmt_ns(num(ex, "bookkeeping", "drop_ns_per_entry").unwrap_or(f64::NAN)),
    );
    shared::section(&mut s, r, ex);

    let _ = writeln!(s, "## Every result\n");
    let _ = writeln!(
        s,
        "| bench | function | size | time per iteration (95% interval) |\n|---|---|---|---|"
    );
    for m in &r.all {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} ({} – {}) |",
            m.group,
            m.function,
            m.value,
            fmt_ns(m.ns),
            fmt_ns(m.lo),
            fmt_ns(m.hi)
        );
    }
    let _ = writeln!(s);
    reclaim_note(&mut s, ex);
    if !stale.is_empty() {
        let _ = writeln!(
            s,
            "Ignored {} older results left in the criterion folder by earlier runs.\n",
            stale.len()
        );
    }
    if let Ok(notes) = std::fs::read_to_string(out.join("bench-notes.md")) {
        s.push_str(&notes);
    }
    s
}

/// The runs the side files come from: benches that ended within 30 minutes of the one before
/// are one run. (End of the run's last bench, its benches), oldest first.
fn runs(ex: &BTreeMap<String, Json>) -> Vec<(u64, Vec<String>)> {
    let mut ends: Vec<(u64, &String)> = ex
        .iter()
        .filter_map(|(g, j)| Some((j.get("machine_unix_time")?.str()?.parse().ok()?, g)))
        .collect();
    ends.sort();
    let mut runs: Vec<(u64, Vec<String>)> = Vec::new();
    for (t, g) in ends {
        match runs.last_mut() {
            Some(r) if t <= r.0 + 1800 => {
                r.0 = t;
                r.1.push(g.clone());
            }
            _ => runs.push((t, vec![g.clone()])),
        }
    }
    runs
}

fn bulk_table(s: &mut String, r: &Results, ex: &BTreeMap<String, Json>) {
    let pts = bulk_points(r);
    let mut sizes: Vec<f64> = pts.iter().map(|p| p.1).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    let order = svg::CHUNKS;
    let chunks: Vec<&str> = order
        .iter()
        .copied()
        .filter(|c| pts.iter().any(|p| p.0 == *c))
        .collect();
    let _ = write!(s, "| entry size |");
    for c in &chunks {
        let _ = write!(s, " {} |", svg::series_name(c));
    }
    let _ = write!(s, "\n|---|");
    for _ in &chunks {
        let _ = write!(s, "---|");
    }
    let _ = writeln!(s);
    for &size in &sizes {
        let label = svg::size_label(size);
        let _ = write!(s, "| {label} |");
        for c in &chunks {
            let cell = pts
                .iter()
                .find(|p| p.0 == *c && p.1 == size)
                .map_or("–".into(), |p| {
                    let key = format!("{}_faults_per_rebuild", bulk_key(c, &label));
                    let cell = match num(ex, "bulk_rebuild", &key) {
                        Some(f) if (f - 1.0).abs() < 0.05 => format!("{} (1 fault)", fmt_ns(p.2)),
                        Some(f) => format!("{} ({f:.0} faults)", fmt_ns(p.2)),
                        None => fmt_ns(p.2),
                    };
                    if fully_dropped(ex, c, size) {
                        cell
                    } else {
                        format!("{cell} ⚠ not all pages dropped: invalid")
                    }
                });
            let _ = write!(s, " {cell} |");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "\nTimes are per 4 KiB page. ⚠ marks a series where reclaim left some pages resident \
         before the timed rebuilds (see the note on dropping pages below): its time is of a \
         partial rebuild, and it is left out of the plot.\n"
    );
}

fn reclaim_note(s: &mut String, ex: &BTreeMap<String, Json>) {
    let sum = |k: &str| ex.keys().filter_map(|g| num(ex, g, k)).sum::<f64>();
    let (cheap, drained, partial) = (
        sum("reclaim_cheap"),
        sum("reclaim_drained"),
        sum("reclaim_partial"),
    );
    let _ = writeln!(
        s,
        "Dropping an entry's pages between iterations (not timed): MADV_PAGEOUT alone emptied \
         the entry {cheap:.0} times; {drained:.0} times pages stayed (they sat in another CPU's \
         LRU batch) and `testing::reclaim` (drain, then MADV_PAGEOUT) was needed; after that, \
         {partial:.0} times some pages still stayed resident, so that iteration rebuilt less \
         than the whole entry (see `pages_dropped_per_rebuild` in \
         `target/criterion/lazyfree-extra/`).\n"
    );
}

/// Bench 2's per-fault latencies (three rebuilds timed page by page after the criterion run).
fn fault_latency(s: &mut String, ex: &BTreeMap<String, Json>) {
    let _ = writeln!(s, "## Latency of one page fault\n");
    let _ = writeln!(
        s,
        "Bench 2: each read of one lost page (one-page fill chunk, random order), timed one by \
         one over three rebuilds of the entry.\n\n| mode | p50 | p90 | p99 |\n|---|---|---|---|"
    );
    for mode in ["monitor", "sigbus"] {
        let q = |p: &str| {
            num(ex, "random_page", &format!("{mode}_page_{p}_ns")).map_or("–".into(), fmt_ns)
        };
        let _ = writeln!(s, "| {mode} | {} | {} | {} |", q("p50"), q("p90"), q("p99"));
    }
    let _ = writeln!(s);
}
