//! Bench 2, random single-page rebuild: every page of a reclaimed entry (fill chunk: one page)
//! is read once, in random order, so each read is one fault and one 4 KiB rebuild.
//!
//! Baseline, same run: the same random order of first-touch faults on fresh anonymous memory,
//! each followed by a 4 KiB memcpy of the page's bytes.
//!
//! Modes: monitor (a fault is handed to the monitor thread and served by a worker), the same with
//! read-ahead off, and SIGBUS (the faulting thread rebuilds the page in its own signal handler).

mod common;

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{drop_pages, size_label, Extra, Fresh, PAGE};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use lazyfree::{Cache, Config, Entry, FillChunk, Mode};

/// Reads one byte of each page of `entry` in `order`.
#[inline(never)]
fn touch_in_order(entry: &Entry, order: &[usize]) -> u64 {
    let p = entry.as_ptr();
    let mut sum = 0u64;
    for &i in order {
        // SAFETY: i < pages, so the byte lies inside the entry, which is mapped while borrowed.
        sum += unsafe { std::ptr::read_volatile(p.add(i * PAGE)) } as u64;
    }
    sum
}

/// Per-page latencies (ns) of one rebuild in `order`, for the side file.
fn page_latencies(entry: &Entry, order: &[usize]) -> Vec<u64> {
    let p = entry.as_ptr();
    order
        .iter()
        .map(|&i| {
            let t = Instant::now();
            // SAFETY: as in `touch_in_order`.
            black_box(unsafe { std::ptr::read_volatile(p.add(i * PAGE)) });
            t.elapsed().as_nanos() as u64
        })
        .collect()
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize] as f64
}

fn bench(c: &mut Criterion, extra: &mut Extra) {
    let size: usize = if common::quick() { 1 << 20 } else { 4 << 20 };
    let pages = size / PAGE;
    let label = size_label(size);
    let src = Arc::new(common::random_bytes(size, 0xfeed));
    let order = common::shuffled(pages, 42);
    let mut g = c.benchmark_group("random_page");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(pages as u64));

    // The baseline: first-touch faults on fresh memory in the same order, each followed by a
    // 4 KiB copy; only the faults and copies are timed.
    let fresh = || {
        let mut m = Fresh::map(size);
        let dst = m.as_mut_slice();
        let t = Instant::now();
        for &i in &order {
            let r = i * PAGE..(i + 1) * PAGE;
            dst[r.clone()].copy_from_slice(&src[r]);
        }
        black_box(dst.as_ptr());
        t.elapsed()
    };
    g.bench_with_input(
        BenchmarkId::new("fresh_fault_memcpy", &label),
        &size,
        |b, _| b.iter_custom(|iters| (0..iters).map(|_| fresh()).sum::<Duration>()),
    );

    // monitor_no_read_ahead: the same without filling ahead, to show that read-ahead (on by
    // default) costs a random pattern nothing.
    let modes: &[(&str, Mode, usize)] = &[
        ("monitor", Mode::Monitor, Config::default().read_ahead),
        ("monitor_no_read_ahead", Mode::Monitor, 0),
        ("sigbus", Mode::Sigbus, Config::default().read_ahead),
    ];
    for &(name, mode, read_ahead) in modes {
        let config = Config::default()
            .mode(mode)
            .fill_chunk(FillChunk::Page)
            .read_ahead(read_ahead);
        let cache: Cache<u32> = Cache::new(config).expect("a cache (needs userfaultfd)");
        let s = src.clone();
        let entry = cache
            .insert(0, size, move |off, buf: &mut [u8]| {
                buf.copy_from_slice(&s[off..off + buf.len()]);
                Ok::<(), Infallible>(())
            })
            .expect("insert");
        touch_in_order(&entry, &order);
        assert!(entry[..] == src[..], "rebuilt bytes differ from the source");
        let base = cache.stats();
        let mut rebuilds = 0u64;
        let mut dropped = 0u64;
        g.bench_with_input(BenchmarkId::new(name, &label), &size, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    dropped += drop_pages(&entry) as u64;
                    rebuilds += 1;
                    let t = Instant::now();
                    black_box(touch_in_order(&entry, &order));
                    total += t.elapsed();
                }
                total
            })
        });
        let st = cache.stats();
        let n = rebuilds.max(1) as f64;
        extra
            .num(
                &format!("{name}_faults_per_page"),
                (st.faults_handled - base.faults_handled) as f64 / n / pages as f64,
            )
            .num(
                &format!("{name}_pages_dropped_per_rebuild"),
                dropped as f64 / n,
            );

        let rounds = if common::quick() { 5 } else { 31 };
        let r = common::paired_ratio(
            rounds,
            || {
                drop_pages(&entry);
                let t = Instant::now();
                black_box(touch_in_order(&entry, &order));
                t.elapsed()
            },
            fresh,
        );
        extra.num(&format!("{name}_interleaved_ratio"), r);
        let mut lat = Vec::new();
        for _ in 0..3 {
            drop_pages(&entry);
            lat.extend(page_latencies(&entry, &order));
        }
        lat.sort_unstable();
        extra
            .num(&format!("{name}_page_p50_ns"), percentile(&lat, 0.5))
            .num(&format!("{name}_page_p90_ns"), percentile(&lat, 0.9))
            .num(&format!("{name}_page_p99_ns"), percentile(&lat, 0.99));
        assert!(entry[..] == src[..], "rebuilt bytes differ from the source");
    }
    g.finish();
}

fn main() {
    let mut c = common::criterion();
    let mut extra = Extra::default();
    bench(&mut c, &mut extra);
    extra.write("random_page");
    c.final_summary();
}
