//! Bench 6, scaling: two threads each rebuilding their own reclaimed entry (LZ4 callback, one
//! block per 64 KiB fill chunk) against one thread rebuilding both, one after the other. Both
//! variants start their thread(s) inside the timed part, so the spawn cost is on both sides.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{drop_pages, size_label, touch_pages, Extra};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use lazyfree::{Cache, Config, Entry, FillChunk};

const BLOCK: usize = 64 << 10;

/// Compressible bytes: runs of repeated words with varying numbers.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = seed;
    while out.len() < len {
        i = i
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let line = format!("key={} value={} state=ready\n", i >> 40, (i >> 20) % 1000);
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(len);
    out
}

fn lz4_entry(cache: &Cache<u32>, key: u32, len: usize) -> (Entry, Vec<u8>) {
    let t = text(len, key as u64 + 1);
    let blocks: Vec<Vec<u8>> = t.chunks(BLOCK).map(lz4_flex::block::compress).collect();
    let e = cache
        .insert(key, len, move |off, buf: &mut [u8]| {
            lz4_flex::block::decompress_into(&blocks[off / BLOCK], buf)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .expect("insert");
    touch_pages(&e);
    assert!(e[..] == t[..], "LZ4 rebuild differs from the text");
    (e, t)
}

fn bench(c: &mut Criterion, extra: &mut Extra) {
    let len = if common::quick() { 1 << 20 } else { 8 << 20 };
    let cache: Cache<u32> = Cache::new(Config::default().fill_chunk(FillChunk::Bytes(BLOCK)))
        .expect("a monitor-mode cache (needs userfaultfd)");
    let (a, ta) = lz4_entry(&cache, 1, len);
    let (b, tb) = lz4_entry(&cache, 2, len);
    let (a, b) = (Arc::new(a), Arc::new(b));
    let label = format!("2x{}", size_label(len));

    let mut g = c.benchmark_group("two_threads");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Bytes(2 * len as u64));
    let one = || {
        drop_pages(&a);
        drop_pages(&b);
        let (a, b) = (a.clone(), b.clone());
        let t = Instant::now();
        std::thread::spawn(move || black_box(touch_pages(&a) + touch_pages(&b)))
            .join()
            .expect("thread");
        t.elapsed()
    };
    let two = || {
        drop_pages(&a);
        drop_pages(&b);
        let (a, b) = (a.clone(), b.clone());
        let t = Instant::now();
        let ha = std::thread::spawn(move || black_box(touch_pages(&a)));
        let hb = std::thread::spawn(move || black_box(touch_pages(&b)));
        ha.join().expect("thread");
        hb.join().expect("thread");
        t.elapsed()
    };
    g.bench_function(BenchmarkId::new("one_thread", &label), |bn| {
        bn.iter_custom(|iters| (0..iters).map(|_| one()).sum::<Duration>())
    });
    g.bench_function(BenchmarkId::new("two_threads", &label), |bn| {
        bn.iter_custom(|iters| (0..iters).map(|_| two()).sum::<Duration>())
    });
    g.finish();
    let rounds = if common::quick() { 5 } else { 41 };
    extra.num("interleaved_ratio", common::paired_ratio(rounds, one, two));
    assert!(
        a[..] == ta[..] && b[..] == tb[..],
        "LZ4 rebuild differs from the text"
    );
    let st = cache.stats();
    extra
        .num("entry_bytes", len as f64)
        .num("worker_threads_after", cache.worker_threads() as f64)
        .num("faults", st.faults_handled as f64);
}

fn main() {
    let mut c = common::criterion();
    let mut extra = Extra::default();
    bench(&mut c, &mut extra);
    extra.write("two_threads");
    c.final_summary();
}
