//! Bench 7, scale of bookkeeping: insert, then get, 1,000,000 lazy entries of 4 KiB (100,000 in
//! quick mode). Reports the throughput (criterion), and in the side file the VMAs the entries
//! added (`/proc/self/maps`), the heap bytes of metadata per entry (a counting global allocator
//! in this binary) and the resident memory per entry (`VmRSS`). Gets are also measured from two
//! threads (each half of the keys) and against `quick_cache` on the same keys, with interleaved
//! medians of both ratios in the side file. Entries are inserted each with its own callback
//! (`Cache::insert`) and, in a second cache, with one function for the cache
//! (`Cache::with_regen`, `insert_lazy`): inserts and footprint are reported for both.
//!
//! A small cache is kept alive throughout so the process-wide runtime (its threads and slabs)
//! is not torn down between iterations: the slabs grown for the first million entries are
//! reused, as in a long-running program.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Extra, PAGE};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use lazyfree::{Cache, Config};

/// Counts the live heap bytes of this process.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every method forwards to the system allocator with the caller's arguments, whose
// contracts are the same; the counter is a side effect only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded under the caller's contract.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded under the caller's contract.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded under the caller's contract.
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size() as isize, Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: forwarded under the caller's contract.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_add(new as isize - l.size() as isize, Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn vmas() -> usize {
    std::fs::read_to_string("/proc/self/maps").map_or(0, |s| s.lines().count())
}

fn rss_bytes() -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn fill(cache: &Cache<u64>, n: u64) {
    for k in 0..n {
        let e = cache
            .insert(k, PAGE, move |_off, buf: &mut [u8]| {
                buf.fill(k as u8);
                Ok::<(), Infallible>(())
            })
            .expect("insert");
        drop(e);
    }
}

/// A cache whose entries share one regenerate function (`Cache::with_regen`).
fn keyed_cache() -> Cache<u64> {
    Cache::with_regen(Config::default(), |&k: &u64, _off, buf: &mut [u8]| {
        buf.fill(k as u8);
        Ok::<(), Infallible>(())
    })
    .expect("a monitor-mode cache")
}

fn fill_keyed(cache: &Cache<u64>, n: u64) {
    for k in 0..n {
        drop(cache.insert_lazy(k, PAGE).expect("insert"));
    }
}

fn bench(c: &mut Criterion, extra: &mut Extra) {
    let n: u64 = if common::quick() { 100_000 } else { 1_000_000 };
    let anchor: Cache<u64> = Cache::new(Config::default()).expect("a monitor-mode cache");
    let label = if n == 1_000_000 {
        "1M".to_string()
    } else {
        format!("{}K", n / 1000)
    };

    // One measured build for the side file.
    let cache: Cache<u64> = Cache::new(Config::default()).expect("a monitor-mode cache");
    let (v0, h0, r0) = (vmas(), LIVE.load(Relaxed), rss_bytes());
    let t = Instant::now();
    fill(&cache, n);
    let build = t.elapsed();
    let (v1, h1, r1) = (vmas(), LIVE.load(Relaxed), rss_bytes());
    assert_eq!(cache.len(), n as usize);
    for k in (0..n).step_by((n / 100) as usize) {
        let e = cache.get(&k).expect("entry");
        assert!(e.iter().all(|&b| b == k as u8), "entry {k} rebuilt wrong");
    }
    extra
        .num("entries", n as f64)
        .num(
            "first_build_ns_per_insert",
            build.as_nanos() as f64 / n as f64,
        )
        .num("vmas_before", v0 as f64)
        .num("vmas_added", v1 as f64 - v0 as f64)
        .num("heap_bytes_per_entry", (h1 - h0) as f64 / n as f64)
        .num("rss_bytes_per_entry", (r1 as f64 - r0 as f64) / n as f64);

    // The same with one function for the cache: built while the first cache lives, so both are
    // fresh growth of the heap and the slabs.
    let keyed = keyed_cache();
    let (h0, r0) = (LIVE.load(Relaxed), rss_bytes());
    let t = Instant::now();
    fill_keyed(&keyed, n);
    let build = t.elapsed();
    let (h1, r1) = (LIVE.load(Relaxed), rss_bytes());
    for k in (0..n).step_by((n / 100) as usize) {
        let e = keyed.get(&k).expect("entry");
        assert!(
            e.iter().all(|&b| b == k as u8),
            "keyed entry {k} rebuilt wrong"
        );
    }
    extra
        .num(
            "keyed_first_build_ns_per_insert",
            build.as_nanos() as f64 / n as f64,
        )
        .num("keyed_heap_bytes_per_entry", (h1 - h0) as f64 / n as f64)
        .num(
            "keyed_rss_bytes_per_entry",
            (r1 as f64 - r0 as f64) / n as f64,
        );
    // With a budget (never reached here): an entry also carries its recency stamps, and its
    // shard's order lists it. Built while the others live: fresh growth of the heap too.
    let budgeted: Cache<u64> = Cache::new(Config::default().budget(Some(4 * n as usize * PAGE)))
        .expect("a monitor-mode cache");
    let (h0, r0) = (LIVE.load(Relaxed), rss_bytes());
    fill(&budgeted, n);
    let (h1, r1) = (LIVE.load(Relaxed), rss_bytes());
    assert_eq!(budgeted.len(), n as usize, "the budget evicted");
    extra
        .num("budget_heap_bytes_per_entry", (h1 - h0) as f64 / n as f64)
        .num(
            "budget_rss_bytes_per_entry",
            (r1 as f64 - r0 as f64) / n as f64,
        );
    drop(budgeted);

    drop(keyed);

    let mut g = c.benchmark_group("bookkeeping");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    g.throughput(Throughput::Elements(n));
    let order = common::shuffled(n as usize, 9);
    g.bench_function(BenchmarkId::new("get", &label), |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                for &k in &order {
                    black_box(cache.get(&(k as u64)));
                }
            }
            t.elapsed()
        })
    });
    // Gets from two threads, each half of the keys, against one thread doing all of them; and
    // one thread's gets against quick_cache's on the same keys, values also behind an Arc.
    let get_all = |keys: &[usize]| {
        for &k in keys {
            black_box(cache.get(&(k as u64)));
        }
    };
    let (first, second) = order.split_at(order.len() / 2);
    let two_threads = || {
        std::thread::scope(|s| {
            s.spawn(|| get_all(first));
            get_all(second);
        })
    };
    g.bench_function(BenchmarkId::new("get_two_threads", &label), |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                two_threads();
            }
            t.elapsed()
        })
    });
    let qc: quick_cache::sync::Cache<u64, Arc<u64>> = quick_cache::sync::Cache::new(n as usize);
    for k in 0..n {
        qc.insert(k, Arc::new(k));
    }
    let qc_hits = order
        .iter()
        .filter(|&&k| qc.get(&(k as u64)).is_some())
        .count();
    let qc_get_all = || {
        for &k in &order {
            black_box(qc.get(&(k as u64)));
        }
    };
    g.bench_function(BenchmarkId::new("quick_cache_get", &label), |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                qc_get_all();
            }
            t.elapsed()
        })
    });
    let qc_get_half = |keys: &[usize]| {
        for &k in keys {
            black_box(qc.get(&(k as u64)));
        }
    };
    let qc_two_threads = || {
        std::thread::scope(|s| {
            s.spawn(|| qc_get_half(first));
            qc_get_half(second);
        })
    };
    let rounds = if common::quick() { 5 } else { 21 };
    extra
        .num(
            "get_two_threads_speedup_interleaved",
            common::interleaved_ratio(rounds, || get_all(&order), two_threads),
        )
        .num(
            "get_vs_quick_cache_interleaved",
            common::interleaved_ratio(rounds, || get_all(&order), qc_get_all),
        )
        .num(
            "quick_cache_get_two_threads_speedup_interleaved",
            common::interleaved_ratio(rounds, qc_get_all, qc_two_threads),
        )
        .num("quick_cache_hit_fraction", qc_hits as f64 / n as f64);
    drop(qc);

    let t = Instant::now();
    drop(cache);
    extra.num(
        "drop_ns_per_entry",
        t.elapsed().as_nanos() as f64 / n as f64,
    );

    g.bench_function(BenchmarkId::new("insert", &label), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let cache: Cache<u64> =
                    Cache::new(Config::default()).expect("a monitor-mode cache");
                let t = Instant::now();
                fill(&cache, n);
                total += t.elapsed();
            }
            total
        })
    });
    g.bench_function(BenchmarkId::new("insert_keyed", &label), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let cache = keyed_cache();
                let t = Instant::now();
                fill_keyed(&cache, n);
                total += t.elapsed();
            }
            total
        })
    });
    // A reference for the insert rate: quick_cache inserting the same keys, each value behind
    // an Arc as an entry is (it makes no mapping, region or callback).
    g.bench_function(BenchmarkId::new("quick_cache_insert", &label), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let qc: quick_cache::sync::Cache<u64, Arc<u64>> =
                    quick_cache::sync::Cache::new(n as usize);
                let t = Instant::now();
                for k in 0..n {
                    qc.insert(k, Arc::new(k));
                }
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
    drop(anchor);
}

fn main() {
    let mut c = common::criterion();
    let mut extra = Extra::default();
    bench(&mut c, &mut extra);
    extra.write("bookkeeping");
    c.final_summary();
}
