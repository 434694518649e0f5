//! Bench 1, bulk rebuild: drop every page of an entry of 64 KiB … 16 MiB through real reclaim,
//! then read one byte of each page, which rebuilds it all. The regenerate callback is a memcpy
//! from a source buffer, so this measures lazyfree's own overhead. Swept over the fill chunk
//! (4 KiB … whole entry).
//!
//! SIGBUS mode is measured too, with the default fill chunk (64 KiB), and the monitor's default
//! without filling ahead (`read_ahead(0)`: `lazyfree_chunk_64K_no_read_ahead`).
//!
//! Baseline, same run: copy the same bytes into freshly mmapped anonymous memory (first-touch
//! faults included; the mmap and munmap are not timed, as the entry's allocation is not).

mod common;

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{drop_pages, size_label, touch_pages, Extra, Fresh};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use lazyfree::{Cache, Config, FillChunk, Mode};
// (Every Config below is the default one but for the mode, the fill chunk or read-ahead.)

fn sizes() -> Vec<usize> {
    if common::quick() {
        vec![64 << 10, 1 << 20]
    } else {
        vec![64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]
    }
}

fn chunks(size: usize) -> Vec<(String, FillChunk)> {
    let explicit: &[usize] = if common::quick() {
        &[4 << 10, 64 << 10]
    } else {
        &[4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
    };
    let mut v: Vec<(String, FillChunk)> = explicit
        .iter()
        .filter(|&&c| c < size)
        .map(|&c| {
            let fc = if c == common::PAGE {
                FillChunk::Page
            } else {
                FillChunk::Bytes(c)
            };
            (size_label(c), fc)
        })
        .collect();
    v.push(("entry".to_string(), FillChunk::Entry));
    v
}

fn bench(c: &mut Criterion, extra: &mut Extra) {
    let max = *sizes().iter().max().expect("sizes");
    let src = Arc::new(common::random_bytes(max, 0x1234_5678));
    let mut g = c.benchmark_group("bulk_rebuild");
    g.sampling_mode(SamplingMode::Flat);
    for size in sizes() {
        let label = size_label(size);
        g.throughput(Throughput::Bytes(size as u64));

        g.bench_with_input(
            BenchmarkId::new("fresh_memcpy", &label),
            &size,
            |b, &size| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let mut m = Fresh::map(size);
                        let t = Instant::now();
                        m.as_mut_slice().copy_from_slice(&src[..size]);
                        black_box(m.as_ptr());
                        total += t.elapsed();
                    }
                    total
                })
            },
        );

        let mut configs: Vec<(String, Config)> = chunks(size)
            .into_iter()
            .map(|(l, c)| {
                let config = Config::default().mode(Mode::Monitor).fill_chunk(c);
                (format!("lazyfree_chunk_{l}"), config)
            })
            .collect();
        if size > 64 << 10 {
            configs.push((
                "sigbus_chunk_64K".into(),
                Config::default().mode(Mode::Sigbus),
            ));
            // The default without filling ahead: what the default cost before it.
            configs.push((
                "lazyfree_chunk_64K_no_read_ahead".into(),
                Config::default().mode(Mode::Monitor).read_ahead(0),
            ));
        }
        for (name, config) in configs {
            let cache: Cache<u32> =
                Cache::new(config).expect("a monitor-mode cache (needs userfaultfd)");
            let s = src.clone();
            let entry = cache
                .insert(0, size, move |off, buf: &mut [u8]| {
                    buf.copy_from_slice(&s[off..off + buf.len()]);
                    Ok::<(), Infallible>(())
                })
                .expect("insert");
            touch_pages(&entry);
            assert!(
                entry[..] == src[..size],
                "rebuilt bytes differ from the source"
            );
            let base = cache.stats();
            let mut rebuilds = 0u64;
            let mut dropped = 0u64;
            g.bench_with_input(BenchmarkId::new(&name, &label), &size, |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        dropped += drop_pages(&entry) as u64;
                        rebuilds += 1;
                        let t = Instant::now();
                        black_box(touch_pages(&entry));
                        total += t.elapsed();
                    }
                    total
                })
            });
            assert!(
                entry[..] == src[..size],
                "rebuilt bytes differ from the source"
            );
            let st = cache.stats();
            let n = rebuilds.max(1) as f64;
            let key = format!("{}_{label}", name.trim_start_matches("lazyfree_"));
            extra
                .num(
                    &format!("{key}_faults_per_rebuild"),
                    (st.faults_handled - base.faults_handled) as f64 / n,
                )
                .num(
                    &format!("{key}_regen_calls_per_rebuild"),
                    (st.regenerate_calls - base.regenerate_calls) as f64 / n,
                )
                .num(
                    &format!("{key}_pages_dropped_per_rebuild"),
                    dropped as f64 / n,
                );
            let paired_cfg = [
                "lazyfree_chunk_64K",
                "lazyfree_chunk_64K_no_read_ahead",
                "lazyfree_chunk_entry",
                "sigbus_chunk_64K",
            ];
            if size == 1 << 20 && paired_cfg.contains(&name.as_str()) {
                let rounds = if common::quick() { 21 } else { 201 };
                let r = common::paired_ratio(
                    rounds,
                    || common::timed_rebuild(&entry),
                    || common::timed_fresh_copy(&src[..size]),
                );
                extra.num(&format!("{key}_interleaved_ratio"), r);
            }
        }
    }
    g.finish();
}

fn main() {
    let mut c = common::criterion();
    let mut extra = Extra::default();
    bench(&mut c, &mut extra);
    extra.write("bulk_rebuild");
    c.final_summary();
}
