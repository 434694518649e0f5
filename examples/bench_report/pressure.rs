//! The "Under memory pressure" section, from the pressure bench's `pressure/results.json`.

use std::fmt::Write as _;
use std::path::Path;

use crate::json::{self, Json};

const MIB: f64 = 1024.0 * 1024.0;

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / MIB)
}

fn level(x: f64) -> String {
    format!("{x}×")
}

/// Reads `<dir>/pressure/results.json`, if the bench wrote one.
pub fn load(dir: &Path) -> Option<Json> {
    json::parse(&std::fs::read_to_string(dir.join("pressure").join("results.json")).ok()?)
}

pub fn section(s: &mut String, j: Option<&Json>) {
    let _ = writeln!(s, "## Under memory pressure\n");
    let Some(j) = j else {
        let _ = writeln!(
            s,
            "Not measured: no `pressure/results.json` in the criterion folder (`cargo bench \
             --bench pressure` writes it; it prints `SKIPPED` where no memory cgroup can be \
             made).\n"
        );
        return;
    };
    let num = |k: &str| j.get(k).and_then(Json::num).unwrap_or(f64::NAN);
    let text = |k: &str| j.get(k).and_then(Json::str).unwrap_or("").to_string();
    let quick = j.get("quick").and_then(Json::bool).unwrap_or(false);
    let _ = writeln!(
        s,
        "Bench `pressure`, run finished {}{}: each model in a child process in a memory cgroup \
         ({}) limited to {}, {} passes. {}\n\n{}\n",
        crate::utc(num("unix_time") as u64),
        if quick { " in QUICK mode" } else { "" },
        text("cgroup"),
        mib(num("limit_bytes")),
        num("passes"),
        text("workload"),
        text("measures"),
    );
    let _ = writeln!(
        s,
        "| goal | target | measured | met? | note |\n|---|---|---|---|---|"
    );
    for g in j.get("goals").and_then(Json::arr).unwrap_or(&[]) {
        let f = |k: &str| g.get(k).and_then(Json::str).unwrap_or("");
        let value = g.get("value").and_then(Json::num);
        let met = match (value, g.get("met").and_then(Json::bool)) {
            (None, _) => "**gap**",
            (Some(_), Some(true)) => "**met**",
            _ => "**missed**",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {met} | {} |",
            f("name"),
            f("target"),
            value.map_or("not measured".into(), |v| format!("{v:.2}")),
            f("note")
        );
    }
    let _ = writeln!(s);
    let runs = j.get("runs").and_then(Json::arr).unwrap_or(&[]);
    let mut tables: Vec<(f64, String)> = Vec::new();
    for r in runs {
        let key = (
            r.get("overcommit").and_then(Json::num).unwrap_or(0.0),
            r.get("path").and_then(Json::str).unwrap_or("").to_string(),
        );
        if !tables.contains(&key) {
            tables.push(key);
        }
    }
    for (over, path) in tables {
        let rs: Vec<&Json> = runs
            .iter()
            .filter(|r| {
                r.get("overcommit").and_then(Json::num) == Some(over)
                    && r.get("path").and_then(Json::str) == Some(path.as_str())
            })
            .collect();
        let ws = rs
            .first()
            .and_then(|r| r.get("working_set_bytes")?.num())
            .unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "### {} overcommit, {path}: {} of tiles\n\n\
             | model | pass | time | regenerated | dropped | regenerated ÷ dropped | OOM kills \
             | limit hits | note |\n|---|---|---|---|---|---|---|---|---|",
            level(over),
            mib(ws)
        );
        for r in &rs {
            run_rows(s, r);
        }
        let freed: Vec<String> = rs
            .iter()
            .filter(|r| r.get("model").and_then(Json::str) != Some("vec"))
            .filter_map(|r| {
                let m = r.get("model")?.str()?;
                Some(format!("{m} {}", mib(r.get("pglazyfreed_bytes")?.num()?)))
            })
            .collect();
        let _ = writeln!(
            s,
            "\nThe kernel's own count of MADV_FREE pages it freed during each run, load included \
             (`/proc/vmstat` `pglazyfreed`, system-wide): {}.\n",
            freed.join(", ")
        );
    }
    let lz: Vec<String> = runs
        .iter()
        .filter(|r| r.get("model").and_then(Json::str) == Some("lazyfree"))
        .filter_map(|r| r.get("mode")?.str().map(str::to_string))
        .collect();
    let dec: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.get("decode_mb_per_s")?.num())
        .filter(|&x| x > 0.0)
        .collect();
    let _ = writeln!(
        s,
        "lazyfree ran in {} mode. Decoding (LZ4) ran at {:.0}–{:.0} MB/s into memory already \
         touched; a real image decoder is slower, which makes each whole buffer lost cost \
         more. Limit hits: times the cgroup's usage reached its limit (v1 `memory.failcnt`, v2 \
         `max` events).\n",
        lz.first().map_or("an unknown", String::as_str),
        dec.iter().copied().fold(f64::INFINITY, f64::min),
        dec.iter().copied().fold(0.0, f64::max),
    );
}

fn run_rows(s: &mut String, r: &Json) {
    let text = |k: &str| r.get(k).and_then(Json::str).unwrap_or("");
    let num = |k: &str| r.get(k).and_then(Json::num);
    let model = text("model");
    let outcome = text("outcome");
    match num("load_secs") {
        Some(secs) => {
            let _ = writeln!(
                s,
                "| {model} | load | {secs:.2} s | – | – | – | 0 | {:.0} | first decode of \
                 every tile |",
                num("load_limit_hits").unwrap_or(0.0)
            );
        }
        None => {
            let _ = writeln!(
                s,
                "| {model} | load | – | – | – | – | {:.0} | – | **{outcome}** while \
                 loading (had decoded {}) |",
                num("oom_kills").unwrap_or(0.0),
                mib(num("loaded_bytes").unwrap_or(0.0))
            );
        }
    }
    for p in r.get("passes").and_then(Json::arr).unwrap_or(&[]) {
        let n = |k: &str| p.get(k).and_then(Json::num).unwrap_or(0.0);
        let note = match model {
            "lazyfree" => format!("read ahead {}", mib(n("read_ahead_bytes"))),
            "discardable" => format!("{:.0} buffers lost", n("buffers_lost")),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "| {model} | {:.0} | {:.2} s | {} | {} | {} | {:.0} | {:.0} | {note} |",
            n("pass"),
            n("secs"),
            mib(n("regenerated_bytes")),
            mib(n("dropped_bytes")),
            p.get("ratio")
                .and_then(Json::num)
                .map_or("–".into(), |x| format!("{x:.2}")),
            n("oom_kills"),
            n("limit_hits"),
        );
    }
    if let Some(at) = r
        .get("ended_in")
        .and_then(Json::str)
        .filter(|a| *a != "load")
    {
        let _ = writeln!(
            s,
            "| {model} | {} | – | – | – | – | {:.0} | – | **{outcome}** |",
            at.trim_start_matches("pass "),
            num("oom_kills").unwrap_or(0.0)
        );
    }
}
