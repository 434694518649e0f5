//! Shared by the benches: quick mode, criterion settings, dropping an entry's pages cheaply,
//! the fresh-memory baseline, test data, and the side file of numbers criterion does not keep.
//!
//! Each bench binary uses a part of this module.
#![allow(dead_code)] // reason: every bench binary compiles this module and uses only some of it

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use criterion::Criterion;
use lazyfree::{testing, Entry};

pub const PAGE: usize = 4096;

/// Quick mode: `LAZYFREE_BENCH_QUICK=1` (or criterion's own `--quick`) runs every bench briefly
/// with fewer sizes.
pub fn quick() -> bool {
    let env = std::env::var("LAZYFREE_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    env || std::env::args().any(|a| a == "--quick")
}

/// Criterion settings sized so the whole `cargo bench` stays within a few minutes on 2 CPUs.
/// Benches whose iterations take 0.1–400 ms (rebuilds) also set flat sampling: criterion's
/// default linear sampling runs 1 + 2 + … + 20 iterations whatever the time asked for.
pub fn criterion() -> Criterion {
    let c = Criterion::default();
    let c = if quick() {
        c.warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(300))
            .sample_size(10)
            .nresamples(2_000)
    } else {
        c.warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(1500))
            .sample_size(20)
            .nresamples(20_000)
    };
    c.configure_from_args()
}

/// `1K`, `64K`, `1M`, ... for byte counts that are powers of two.
pub fn size_label(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{}M", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes % (1 << 10) == 0 {
        format!("{}K", bytes >> 10)
    } else {
        format!("{bytes}B")
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), incompressible.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A deterministic permutation of `0..n` (Fisher-Yates with xorshift).
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let j = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// Reads one byte of every page of `bytes` (this is what makes a reclaimed entry rebuild).
#[inline(never)]
pub fn touch_pages(bytes: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut off = 0;
    while off < bytes.len() {
        // SAFETY: off < len, so the byte is inside the slice.
        sum += unsafe { std::ptr::read_volatile(bytes.as_ptr().add(off)) } as u64;
        off += PAGE;
    }
    sum
}

/// Sum of the little-endian u64 words of `bytes`: a full read the compiler vectorises.
#[inline(never)]
pub fn sum_words(bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .fold(0u64, u64::wrapping_add)
}

static CHEAP_DROPS: AtomicU64 = AtomicU64::new(0);
static DRAINED_DROPS: AtomicU64 = AtomicU64::new(0);
static PARTIAL_DROPS: AtomicU64 = AtomicU64::new(0);

/// Drops every page of `entry` through the kernel's real reclaim path and returns the pages
/// dropped.
///
/// `testing::reclaim` drains the per-CPU LRU batches before every MADV_PAGEOUT (an madvise
/// from each CPU, moving the thread), which costs more than rebuilding a small entry. So this
/// tries MADV_PAGEOUT alone first and falls back to `testing::reclaim` only when pages stayed
/// (they sat in another CPU's batch). How often each path ran is recorded (`reclaim_counts`).
pub fn drop_pages(entry: &Entry) -> usize {
    let pages = entry.len().div_ceil(PAGE);
    let before = entry.resident_pages();
    // SAFETY: the range is exactly the entry's pages, which are volatile (not pinned here):
    // dropping them is what memory pressure does, and the entry rebuilds them on touch.
    unsafe {
        libc::madvise(
            entry.as_ptr() as *mut libc::c_void,
            pages * PAGE,
            libc::MADV_PAGEOUT,
        )
    };
    let mut left = entry.resident_pages();
    if left == 0 {
        CHEAP_DROPS.fetch_add(1, Relaxed);
        return before;
    }
    for _ in 0..3 {
        testing::reclaim(entry);
        left = entry.resident_pages();
        if left == 0 {
            break;
        }
    }
    DRAINED_DROPS.fetch_add(1, Relaxed);
    if left > 0 {
        PARTIAL_DROPS.fetch_add(1, Relaxed);
    }
    before.saturating_sub(left)
}

/// (cheap MADV_PAGEOUT only, with the drain fallback, still partly resident after the fallback).
pub fn reclaim_counts() -> (u64, u64, u64) {
    (
        CHEAP_DROPS.load(Relaxed),
        DRAINED_DROPS.load(Relaxed),
        PARTIAL_DROPS.load(Relaxed),
    )
}

/// Fresh private anonymous memory, like `malloc` of a large block gets; THP off so that it is
/// faulted in 4 KiB pages like the entries (the slabs are MADV_NOHUGEPAGE).
pub struct Fresh {
    ptr: *mut u8,
    len: usize,
}

impl Fresh {
    pub fn map(len: usize) -> Fresh {
        // SAFETY: a new anonymous mapping at an address the kernel picks touches no other memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of {len} bytes failed");
        // SAFETY: our own new mapping.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        Fresh { ptr: p.cast(), len }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr maps len bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        // SAFETY: our own mapping; no slice into it outlives the borrow of self.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Where criterion writes (`CRITERION_HOME`, `$CARGO_TARGET_DIR/criterion`, or the `criterion`
/// folder of the target directory holding this bench binary), as criterion itself decides.
pub fn criterion_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(h);
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(t).join("criterion");
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(t) = exe.ancestors().find(|d| d.join("CACHEDIR.TAG").exists()) {
            return t.join("criterion");
        }
    }
    PathBuf::from("target/criterion")
}

/// Numbers criterion does not keep (bytes given back, VMAs, faults per rebuild...), written as a
/// flat JSON object to `<criterion dir>/lazyfree-extra/<name>.json` for the report tool.
#[derive(Default)]
pub struct Extra {
    fields: Vec<(String, String)>,
}

impl Extra {
    pub fn num(&mut self, key: &str, v: f64) -> &mut Self {
        self.fields.push((key.to_string(), format!("{v}")));
        self
    }

    pub fn text(&mut self, key: &str, v: &str) -> &mut Self {
        let esc = v.replace('\\', "\\\\").replace('"', "\\\"");
        self.fields.push((key.to_string(), format!("\"{esc}\"")));
        self
    }

    /// Writes the file (and prints the numbers); the machine description goes with it. Not
    /// written when a filter was given on the command line: the numbers would not belong to
    /// the results of the last full run that the report pairs them with.
    pub fn write(&mut self, name: &str) {
        let filtered = std::env::args().skip(1).any(|a| !a.starts_with('-'));
        if filtered {
            println!("a bench filter was given: side file {name}.json not written");
            return;
        }
        let (cheap, drained, partial) = reclaim_counts();
        self.num("reclaim_cheap", cheap as f64)
            .num("reclaim_drained", drained as f64)
            .num("reclaim_partial", partial as f64)
            .num("quick", quick() as u8 as f64);
        let m = machine();
        for (k, v) in &m {
            self.text(k, v);
        }
        let mut s = String::from("{\n");
        for (i, (k, v)) in self.fields.iter().enumerate() {
            let comma = if i + 1 < self.fields.len() { "," } else { "" };
            let _ = writeln!(s, "  \"{k}\": {v}{comma}");
        }
        s.push_str("}\n");
        let dir = criterion_dir().join("lazyfree-extra");
        let path = dir.join(format!("{name}.json"));
        match std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, &s)) {
            Ok(()) => println!("extra numbers for the report: {}", path.display()),
            Err(e) => eprintln!("could not write {}: {e}", path.display()),
        }
        for (k, v) in &self.fields {
            if !k.starts_with("machine_") {
                println!("  {name}.{k} = {v}");
            }
        }
    }
}

fn first_line_with(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// What the benches ran on.
pub fn machine() -> Vec<(&'static str, String)> {
    let cpu = first_line_with("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = first_line_with("/proc/meminfo", "MemTotal").unwrap_or_default();
    let swap = first_line_with("/proc/meminfo", "SwapTotal").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let hyper = first_line_with("/proc/cpuinfo", "flags")
        .map(|f| f.split(' ').any(|x| x == "hypervisor"))
        .unwrap_or(false);
    let rustc = std::process::Command::new(std::env::var("RUSTC").unwrap_or("rustc".into()))
        .arg("-V")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    vec![
        ("machine_cpu", cpu),
        ("machine_cpus", cpus.to_string()),
        ("machine_mem", mem),
        ("machine_swap", swap),
        ("machine_kernel", kernel),
        ("machine_thp", thp),
        (
            "machine_virtual",
            if hyper { "yes" } else { "no" }.to_string(),
        ),
        ("machine_rustc", rustc),
        ("machine_loadavg", load),
        ("machine_unix_time", secs.to_string()),
    ]
}

/// Interleaved A/B timing, robust to the drift of a shared machine: runs `a` and `b` in turn
/// `rounds` times and returns the median of the per-round ratios time(a) / time(b).
pub fn interleaved_ratio(rounds: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> f64 {
    let time = |f: &mut dyn FnMut()| {
        let t = std::time::Instant::now();
        f();
        t.elapsed()
    };
    paired_ratio(rounds, || time(&mut a), || time(&mut b))
}

/// Like [`interleaved_ratio`] for closures that time themselves (to leave their setup out)
/// and return the time measured.
pub fn paired_ratio(
    rounds: usize,
    mut a: impl FnMut() -> Duration,
    mut b: impl FnMut() -> Duration,
) -> f64 {
    let mut r: Vec<f64> = (0..rounds)
        .map(|_| {
            let ta = a().as_nanos() as f64;
            ta / b().as_nanos().max(1) as f64
        })
        .collect();
    r.sort_by(f64::total_cmp);
    r[r.len() / 2]
}

/// One rebuild of a reclaimed entry: drops its pages (not timed), then reads one byte per page.
pub fn timed_rebuild(entry: &Entry) -> Duration {
    drop_pages(entry);
    let t = std::time::Instant::now();
    std::hint::black_box(touch_pages(entry));
    t.elapsed()
}

/// Copies `src` into fresh anonymous memory; only the copy (first-touch faults included) is
/// timed.
pub fn timed_fresh_copy(src: &[u8]) -> Duration {
    let mut m = Fresh::map(src.len());
    let t = std::time::Instant::now();
    m.as_mut_slice().copy_from_slice(src);
    std::hint::black_box(m.as_ptr());
    t.elapsed()
}
