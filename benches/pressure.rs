//! Bench 8, the value under real memory pressure: an image-viewer-like workload (many decoded
//! tiles of 1–8 MiB, read in passes with locality, a few pinned; `pressure/workload.rs`) inside
//! a memory cgroup at 1.5× and 2× overcommit (tiles of 1.5 and 2 times the cgroup's limit).
//! The viewport moves two ways: sweeping over the whole image in every pass (every tile read
//! in every pass: at 2× the kernel drops most of them between passes), and exploring (a random
//! walk: the viewer comes back to what it showed recently). The tiles are held three ways
//! (`pressure/models.rs`):
//!
//! - plain `Vec`s, which the OOM killer is expected to end (reported, not a failure);
//! - Chromium-style discardable buffers, locked around each use, a buffer with any page dropped
//!   lost whole and decoded again;
//! - lazyfree entries whose callback decodes the chunk asked for.
//!
//! Each runs in its own child process (this binary again, `LAZYFREE_PRESSURE_CHILD` naming the
//! case) in a memory cgroup of its own, as `tests/common`'s `cgroup_pressure` does. Per pass it
//! reports the time, the bytes decoded again, the bytes the kernel dropped and their ratio, and
//! OOM kills; then the goals, for each way of moving: lazyfree regenerates ≤ 1.1× the bytes
//! dropped, and finishes each pass in ≤ 0.5× the time of the whole-buffer model at 2×
//! overcommit (`pressure/results.rs`). Every byte read is
//! checked; a wrong one ends the bench with a message. Results go to
//! `<criterion dir>/pressure/results.json` (and the usual side file) for `bench_report`.
//!
//! No memory cgroup (or not root): prints `SKIPPED pressure bench: <reason>` and exits 0.
//! `LAZYFREE_BENCH_QUICK=1`: a 128 MiB limit and 2 passes instead of 256 MiB and 4.

#[path = "pressure/cgroup.rs"]
mod cgroup;
mod common;
#[path = "pressure/models.rs"]
mod models;
#[path = "pressure/results.rs"]
mod results;
#[path = "pressure/workload.rs"]
mod workload;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cgroup::MemCgroup;
use common::Extra;
use models::Spec;
use results::{goals, level_name, mib, print_tables, write_json, Goal, Pass, Run, DROPPED};
use workload::Path;

const CHILD_ENV: &str = "LAZYFREE_PRESSURE_CHILD";
const MODELS: [&str; 3] = ["vec", "discardable", "lazyfree"];
/// Working set ÷ limit, as (numerator, denominator).
pub const LEVELS: [(usize, usize); 2] = [(3, 2), (2, 1)];
/// A child that takes longer is killed and reported as hung.
const CHILD_TIMEOUT: Duration = Duration::from_secs(300);

fn skipped(why: &str) -> ! {
    let line = format!("SKIPPED pressure bench: {why}");
    println!(
        "\n{}\n{line}\n{}\n",
        "!".repeat(line.len()),
        "!".repeat(line.len())
    );
    eprintln!("{line}");
    std::process::exit(0)
}

/// Runs one model at one level in a child in a new memory cgroup; echoes its progress.
fn run_child(
    model: &'static str,
    path: Path,
    level: (usize, usize),
    limit: usize,
    passes: usize,
) -> Run {
    let tag = format!("{model} {} {}", path.name(), level_name(level));
    let cg = MemCgroup::create(
        &format!(
            "lazyfree-bench-pressure-{}-{model}-{}-{}-{}",
            std::process::id(),
            path.name(),
            level.0,
            level.1
        ),
        limit,
    )
    .unwrap_or_else(|e| skipped(&e));
    let spec = Spec {
        model: model.to_string(),
        path,
        working_set: limit * level.0 / level.1,
        passes,
        cgroup_kind: cg.kind.to_string(),
        cgroup_dir: cg.dir().to_path_buf(),
    };
    let mut child = Command::new(std::env::current_exe().expect("current_exe"))
        .env(CHILD_ENV, spec.encode())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let out = child.stdout.take().expect("stdout");
    let echo_tag = tag.clone();
    let lines = std::thread::spawn(move || {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .inspect(|l| echo(&echo_tag, l))
            .collect::<Vec<String>>()
    });
    let mut err = child.stderr.take().expect("stderr");
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let (t0, lazyfreed0) = (Instant::now(), pglazyfreed());
    let (status, hung) = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break (s, false);
        }
        if t0.elapsed() > CHILD_TIMEOUT {
            let _ = child.kill();
            break (child.wait().expect("wait"), true);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let lines = lines.join().expect("stdout reader");
    let stderr = errs.join().expect("stderr reader");
    let oom_kills = cg.oom_kills();
    let lazyfreed = pglazyfreed().saturating_sub(lazyfreed0) * 4096;
    let mut run = Run {
        model,
        path,
        level,
        outcome: String::new(),
        oom_kills,
        lazyfreed,
        ended_in: None,
        loaded: 0,
        load: None,
        passes: Vec::new(),
        compressed: 0,
        decode_mbs: 0.0,
        mode: String::new(),
        summary: String::new(),
    };
    let (mut started, mut done) = (0, false);
    for l in &lines {
        let (key, rest) = l.split_once(' ').unwrap_or((l, ""));
        let f: Vec<&str> = rest.split(' ').collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        match key {
            "STORE" => (run.compressed, run.decode_mbs) = (n(0) as u64, n(1)),
            "MODE" => run.mode = rest.to_string(),
            "LOADED" => run.loaded = n(0) as u64,
            "LOAD" => run.load = Some((n(0), n(1) as u64)),
            "START" => started = n(0) as usize,
            "PASS" => run.passes.push(Pass {
                n: n(0) as usize,
                secs: n(1),
                regenerated: n(2) as u64,
                dropped: n(3) as u64,
                limit_hits: n(4) as u64,
                read_ahead: n(5) as u64,
                lost: n(6) as u64,
            }),
            "SUMMARY" => run.summary = rest.to_string(),
            "DONE" => done = true,
            "WRONG" => {
                eprintln!(
                    "\npressure bench: WRONG BYTE in the {tag} child: {rest}\n\
                     correctness first: the bench stops here"
                );
                drop(cg);
                std::process::exit(1);
            }
            _ => {}
        }
    }
    run.outcome = if done && status.success() {
        "completed".into()
    } else if hung {
        format!("hung: killed after {} s", CHILD_TIMEOUT.as_secs())
    } else if status.signal() == Some(libc::SIGKILL) && oom_kills > 0 {
        "OOM killed".into()
    } else if let Some(sig) = status.signal() {
        format!("killed by signal {sig}")
    } else {
        format!("failed (exit code {:?})", status.code())
    };
    if !run.completed() {
        run.ended_in = Some(if run.load.is_none() {
            "load".into()
        } else if started > run.passes.len() {
            format!("pass {started}")
        } else {
            format!("after pass {}", run.passes.len())
        });
        println!("  [{tag}] {}", run.outcome);
        if !run.outcome.starts_with("OOM") {
            let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
            for l in tail.iter().rev() {
                println!("  [{tag}] stderr: {l}");
            }
        }
    }
    run
}

/// MADV_FREE pages the kernel has freed, system-wide (`/proc/vmstat`); v1 cgroups keep no
/// count of their own.
fn pglazyfreed() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("pglazyfreed "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn echo(tag: &str, line: &str) {
    let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
    let f: Vec<&str> = rest.split(' ').collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    match key {
        "MODE" => println!("  [{tag}] mode {rest}"),
        "LOAD" => println!("  [{tag}] loaded in {:.2} s", n(0)),
        "PASS" => println!(
            "  [{tag}] pass {}: {:.2} s, regenerated {}, dropped {}",
            n(0),
            n(1),
            mib(n(2) as u64),
            mib(n(3) as u64)
        ),
        "ERROR" => println!("  [{tag}] error: {rest}"),
        _ => {}
    }
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        models::run(&Spec::decode(&spec));
    }
    // `cargo bench -- <filter>` passes the filter to every bench: run only if it names this one.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !filters.is_empty() && !filters.iter().any(|f| "pressure".contains(f.as_str())) {
        println!("pressure: not selected by the filter {filters:?}");
        return;
    }
    let kind = MemCgroup::available().unwrap_or_else(|e| skipped(&e));
    let quick = common::quick();
    let (limit, passes) = if quick {
        (128 << 20, 2)
    } else {
        (256 << 20, 4)
    };
    println!(
        "pressure: {} memory cgroup ({kind}) per run, tiles of {} and {}, {passes} passes",
        mib(limit as u64),
        mib((limit * 3 / 2) as u64),
        mib((limit * 2) as u64)
    );
    let t0 = Instant::now();
    let mut runs = Vec::new();
    for &level in &LEVELS {
        for path in Path::ALL {
            for model in MODELS {
                runs.push(run_child(model, path, level, limit, passes));
            }
        }
    }
    print_tables(&runs, limit, kind);
    let goals: Vec<Goal> = Path::ALL
        .into_iter()
        .flat_map(|p| goals(&runs, p, passes))
        .collect();
    println!("\n{DROPPED}\n\nGoals:");
    for g in &goals {
        println!(
            "  {} {}: {} — {}{}",
            g.name,
            g.target,
            g.value.map_or("not measured".into(), |v| format!("{v:.2}")),
            if g.met { "met" } else { "MISSED" },
            if g.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", g.note)
            }
        );
    }
    let dir = common::criterion_dir().join("pressure");
    let path = dir.join("results.json");
    let json = write_json(&runs, &goals, limit, kind, passes);
    match std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, json)) {
        Ok(()) => println!("\nresults: {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
    let mut extra = Extra::default();
    extra
        .num("limit_bytes", limit as f64)
        .num("passes", passes as f64)
        .num("secs", t0.elapsed().as_secs_f64());
    let keys = Path::ALL.map(|p| {
        [
            format!("{}_regen_ratio_goal", p.name()),
            format!("{}_time_ratio_goal", p.name()),
        ]
    });
    for (key, g) in keys.iter().flatten().zip(&goals) {
        if let Some(v) = g.value {
            extra.num(key, v);
        }
        extra.num(&format!("{key}_met"), g.met as u8 as f64);
    }
    extra.write("pressure");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average (1, 5, 15 min) at the end, a sign of other work on the machine: {}",
        load.split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    let failed: Vec<String> = runs
        .iter()
        .filter(|r| !(r.completed() || r.model == "vec" && r.outcome == "OOM killed"))
        .map(|r| {
            let l = level_name(r.level);
            format!("{} {} {l}: {}", r.model, r.path.name(), r.outcome)
        })
        .collect();
    if !failed.is_empty() {
        println!("\nruns that did not complete (reported above): {failed:?}");
    }
}
