//! What the pressure bench found: the runs' results, the goals, the tables it prints and the
//! JSON file `bench_report` reads.

use std::fmt::Write as _;

use crate::workload::{Layout, Path};
use crate::LEVELS;

const MIB: f64 = 1024.0 * 1024.0;

/// One completed pass of a child.
pub struct Pass {
    pub n: usize,
    pub secs: f64,
    pub regenerated: u64,
    pub dropped: u64,
    pub limit_hits: u64,
    pub read_ahead: u64,
    pub lost: u64,
}

impl Pass {
    fn ratio(&self) -> Option<f64> {
        (self.dropped > 0).then(|| self.regenerated as f64 / self.dropped as f64)
    }
}

/// One child: a model at an overcommit level.
pub struct Run {
    pub model: &'static str,
    pub path: Path,
    pub level: (usize, usize),
    /// "completed", "OOM killed", ...
    pub outcome: String,
    pub oom_kills: u64,
    /// Bytes of MADV_FREE pages the kernel freed while the child ran, system-wide.
    pub lazyfreed: u64,
    /// Where the child ended if it did not complete: "load", "pass 2", ...
    pub ended_in: Option<String>,
    pub loaded: u64,
    pub load: Option<(f64, u64)>,
    pub passes: Vec<Pass>,
    pub compressed: u64,
    pub decode_mbs: f64,
    pub mode: String,
    pub summary: String,
}

impl Run {
    pub fn completed(&self) -> bool {
        self.outcome == "completed"
    }

    fn totals(&self) -> (u64, u64) {
        self.passes
            .iter()
            .fold((0, 0), |(r, d), p| (r + p.regenerated, d + p.dropped))
    }
}

pub fn level_name(l: (usize, usize)) -> String {
    format!("{}×", l.0 as f64 / l.1 as f64)
}

pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB)
}

/// A goal's outcome: the value judged (None: not measured) and the text shown for it.
pub struct Goal {
    pub name: String,
    pub target: &'static str,
    pub value: Option<f64>,
    pub met: bool,
    pub note: String,
}

fn find<'a>(runs: &'a [Run], model: &str, path: Path, level: (usize, usize)) -> Option<&'a Run> {
    runs.iter()
        .find(|r| r.model == model && r.path == path && r.level == level)
}

/// The two goals, at the highest overcommit, for the viewer moving along `path`.
pub fn goals(runs: &[Run], path: Path, passes: usize) -> Vec<Goal> {
    let level = LEVELS[LEVELS.len() - 1];
    let lz = find(runs, "lazyfree", path, level);
    let dc = find(runs, "discardable", path, level);
    let regen = lz.and_then(|r| {
        let (g, d) = r.totals();
        (r.completed() && d > 0).then(|| g as f64 / d as f64)
    });
    let mut per_pass = Vec::new();
    if let (Some(lz), Some(dc)) = (lz, dc) {
        for p in 1..=passes {
            let a = lz.passes.iter().find(|x| x.n == p);
            let b = dc.passes.iter().find(|x| x.n == p);
            if let (Some(a), Some(b)) = (a, b) {
                per_pass.push(a.secs / b.secs);
            }
        }
    }
    let worst = (per_pass.len() == passes && passes > 0)
        .then(|| per_pass.iter().copied().fold(0.0, f64::max));
    let lvl = format!("{}, {}", path.name(), level_name(level));
    vec![
        Goal {
            name: format!(
                "lazyfree: bytes regenerated ÷ bytes the kernel dropped, all passes ({lvl} \
                 overcommit)"
            ),
            target: "≤ 1.1",
            value: regen,
            met: regen.is_some_and(|x| x <= 1.1),
            note: match (lz, dc) {
                (Some(r), _) if !r.completed() => format!("lazyfree run {}", r.outcome),
                (Some(r), _) if r.totals().1 == 0 => "the kernel dropped nothing".into(),
                (_, Some(d)) if d.completed() && d.totals().1 > 0 => format!(
                    "the whole-buffer model: {:.2}",
                    d.totals().0 as f64 / d.totals().1 as f64
                ),
                _ => String::new(),
            },
        },
        Goal {
            name: format!(
                "lazyfree pass time ÷ whole-buffer (discardable) pass time, worst pass ({lvl} \
                 overcommit)"
            ),
            target: "≤ 0.5",
            value: worst,
            met: worst.is_some_and(|x| x <= 0.5),
            note: match (lz, dc) {
                (Some(lz), Some(dc)) if !per_pass.is_empty() => format!(
                    "per pass: {}; bytes regenerated in all passes: lazyfree {}, whole-buffer {}",
                    per_pass
                        .iter()
                        .map(|x| format!("{x:.2}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    mib(lz.totals().0),
                    mib(dc.totals().0)
                ),
                _ => "not measured: a run did not complete its passes".into(),
            },
        },
    ]
}

/// One line of a table: model, pass, time, regenerated, dropped, ratio, OOM kills, limit hits.
fn row(cells: [&str; 8], note: &str) {
    let [a, b, c, d, e, f, g, h] = cells;
    println!("{a:<12} {b:<6} {c:>9} {d:>12} {e:>12} {f:>10} {g:>4} {h:>10}  {note}");
}

pub fn print_tables(runs: &[Run], limit: usize, kind: &str) {
    for (&level, path) in LEVELS.iter().flat_map(|l| Path::ALL.map(|p| (l, p))) {
        let layout = Layout::new(limit * level.0 / level.1);
        println!(
            "\n{} overcommit, {}: {} of decoded tiles ({} tiles of 1–8 MiB, {} pinned) in a {} \
             memory cgroup ({kind})",
            level_name(level),
            path.name(),
            mib(layout.total() as u64),
            layout.tiles(),
            layout.pinned.len(),
            mib(limit as u64),
        );
        let head = [
            "model",
            "pass",
            "time",
            "regenerated",
            "dropped",
            "regen÷drop",
            "OOM",
            "limit hits",
        ];
        row(head, "note");
        for r in runs.iter().filter(|r| r.level == level && r.path == path) {
            let m = r.model;
            match r.load {
                Some((secs, hits)) => row(
                    [
                        m,
                        "load",
                        &format!("{secs:.2} s"),
                        "–",
                        "–",
                        "–",
                        "0",
                        &hits.to_string(),
                    ],
                    if m == "lazyfree" { &r.mode } else { "" },
                ),
                None => row(
                    [m, "load", "–", "–", "–", "–", &r.oom_kills.to_string(), "–"],
                    &format!(
                        "{} while loading (had decoded {})",
                        r.outcome,
                        mib(r.loaded)
                    ),
                ),
            }
            for p in &r.passes {
                let note = match m {
                    "lazyfree" => format!("read ahead {}", mib(p.read_ahead)),
                    "discardable" => format!("{} buffers lost", p.lost),
                    _ => String::new(),
                };
                let ratio = p.ratio().map_or("–".into(), |x| format!("{x:.2}"));
                let cells = [
                    m,
                    &p.n.to_string(),
                    &format!("{:.2} s", p.secs),
                    &mib(p.regenerated),
                    &mib(p.dropped),
                    &ratio,
                    "0",
                    &p.limit_hits.to_string(),
                ];
                row(cells, &note);
            }
            if let Some(at) = r.ended_in.as_deref().filter(|a| *a != "load") {
                let at = at.trim_start_matches("pass ");
                let kills = r.oom_kills.to_string();
                row([m, at, "–", "–", "–", "–", &kills, "–"], &r.outcome);
            }
        }
        let freed: Vec<String> = runs
            .iter()
            .filter(|r| r.level == level && r.path == path && r.model != "vec")
            .map(|r| format!("{} {}", r.model, mib(r.lazyfreed)))
            .collect();
        println!(
            "MADV_FREE pages the kernel freed during each run, load included (/proc/vmstat \
             pglazyfreed, system-wide): {}",
            freed.join(", ")
        );
    }
}

fn js(s: &str) -> String {
    let s = s.replace('\\', "\\\\").replace('"', "\\\"");
    format!("\"{}\"", s.replace('\n', "\\n"))
}

fn jn(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v}"),
        _ => "null".into(),
    }
}

const WORKLOAD: &str = "An image viewer: a grid of decoded tiles 1024 pixels wide (4 KiB per \
    row, one page), 1, 2, 3, 4, 5 or 8 MiB each by grid row, 32 MiB per column of tiles; three \
    tiles (2, 1 and 3 MiB) stay pinned for the whole run. Decoding is LZ4 decompression \
    (lz4_flex, 64 KiB blocks: lazyfree's default fill chunk); the compressed tiles are made \
    before the child joins the cgroup, so the limit is for decoded memory. A 2048 × 1024-pixel \
    viewport moves 512 pixels across (or, exploring, 256 rows up or down) per frame; each frame \
    reads the visible rows and bytes of every tile it overlaps and checks every byte read. \
    Sweep: a pass pans over the whole image in horizontal bands (serpentine), so each row is \
    shown in 4 frames in a row and every tile in every pass. Explore: a random walk with \
    momentum (it keeps its direction 3 times in 4, turns back at the edges), as many frames per \
    pass as a sweep, each pass going on from where the last ended. Each model runs in a child \
    process in a memory cgroup of its own; the time of a pass is that child's wall time for \
    its frames.";

pub const DROPPED: &str = "Bytes regenerated: for lazyfree, the bytes its callbacks produced \
    (whole 64 KiB chunks, of which only the missing pages are installed); for the discardable \
    model, the whole buffer each time a lock finds a page gone. Bytes dropped: for lazyfree, \
    `Stats::pages_reclaimed` × 4096 (pages the kernel took back that a read then rebuilt, \
    read-ahead included); for the discardable model, the pages a lock found gone (`mincore`, \
    or a cookie word gone) × 4096. Pages dropped and never read again count in neither.";

pub fn write_json(runs: &[Run], goals: &[Goal], limit: usize, kind: &str, passes: usize) -> String {
    let mut s = String::from("{\n");
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let _ = writeln!(
        s,
        "  \"unix_time\": {secs},\n  \"quick\": {},\n  \"cgroup\": {},\n  \"limit_bytes\": \
         {limit},\n  \"passes\": {passes},\n  \"workload\": {},\n  \"measures\": {},",
        crate::common::quick(),
        js(kind),
        js(WORKLOAD),
        js(DROPPED)
    );
    s.push_str("  \"goals\": [\n");
    for (i, g) in goals.iter().enumerate() {
        let _ = writeln!(
            s,
            "    {{\"name\": {}, \"target\": {}, \"value\": {}, \"met\": {}, \"note\": {}}}{}",
            js(&g.name),
            js(g.target),
            jn(g.value),
            g.met,
            js(&g.note),
            if i + 1 < goals.len() { "," } else { "" }
        );
    }
    s.push_str("  ],\n  \"runs\": [\n");
    for (i, r) in runs.iter().enumerate() {
        let ws = limit * r.level.0 / r.level.1;
        let _ = write!(
            s,
            "    {{\"model\": {}, \"path\": {}, \"overcommit\": {}, \"working_set_bytes\": {ws}, \
             \"outcome\": {}, \"ended_in\": {}, \"oom_kills\": {}, \"pglazyfreed_bytes\": {}, \
             \"loaded_bytes\": {}, \"load_secs\": {}, \"load_limit_hits\": {}, \
             \"compressed_bytes\": {}, \"decode_mb_per_s\": {:.0}, \"mode\": {}, \
             \"summary\": {},\n     \"passes\": [",
            js(r.model),
            js(r.path.name()),
            r.level.0 as f64 / r.level.1 as f64,
            js(&r.outcome),
            r.ended_in.as_deref().map_or("null".into(), js),
            r.oom_kills,
            r.lazyfreed,
            r.loaded,
            jn(r.load.map(|l| l.0)),
            r.load.map_or(0, |l| l.1),
            r.compressed,
            r.decode_mbs,
            js(&r.mode),
            js(&r.summary),
        );
        for (j, p) in r.passes.iter().enumerate() {
            let _ = write!(
                s,
                "\n       {{\"pass\": {}, \"secs\": {}, \"regenerated_bytes\": {}, \
                 \"dropped_bytes\": {}, \"ratio\": {}, \"oom_kills\": 0, \"limit_hits\": {}, \
                 \"read_ahead_bytes\": {}, \"buffers_lost\": {}}}{}",
                p.n,
                p.secs,
                p.regenerated,
                p.dropped,
                jn(p.ratio()),
                p.limit_hits,
                p.read_ahead,
                p.lost,
                if j + 1 < r.passes.len() { "," } else { "" }
            );
        }
        let _ = writeln!(s, "]}}{}", if i + 1 < runs.len() { "," } else { "" });
    }
    s.push_str("  ]\n}\n");
    s
}
