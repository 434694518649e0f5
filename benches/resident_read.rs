//! Bench 4, resident reads: the read throughput of a volatile entry whose pages are all present,
//! against a plain `Vec<u8>` holding the same bytes. The target is equality: reading present
//! pages goes through no lazyfree code at all.

mod common;

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;

use common::{size_label, sum_words, Extra, PAGE};
use criterion::{BenchmarkId, Criterion, Throughput};
use lazyfree::{Cache, Config};

fn bench(c: &mut Criterion, extra: &mut Extra) {
    let sizes: &[usize] = if common::quick() {
        &[256 << 10, 1 << 20]
    } else {
        &[256 << 10, 1 << 20, 16 << 20]
    };
    let cache: Cache<usize> =
        Cache::new(Config::default()).expect("a monitor-mode cache (needs userfaultfd)");
    let mut g = c.benchmark_group("resident_read");
    for &size in sizes {
        let label = size_label(size);
        let src = Arc::new(common::random_bytes(size, size as u64));
        let s = src.clone();
        let entry = cache
            .insert_with(size, &src, move |off, buf: &mut [u8]| {
                buf.copy_from_slice(&s[off..off + buf.len()]);
                Ok::<(), Infallible>(())
            })
            .expect("insert_with");
        let vec: Vec<u8> = src.to_vec();
        let want = sum_words(&vec);
        assert_eq!(sum_words(&entry), want, "entry bytes differ from the Vec");
        let pages = size / PAGE;
        assert_eq!(entry.resident_pages(), pages, "entry not resident");

        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("vec", &label), &size, |b, _| {
            b.iter(|| black_box(sum_words(black_box(&vec))))
        });
        g.bench_with_input(BenchmarkId::new("lazyfree", &label), &size, |b, _| {
            b.iter(|| black_box(sum_words(black_box(&entry))))
        });
        let paired = common::interleaved_ratio(
            2001,
            || {
                black_box(sum_words(black_box(&entry)));
            },
            || {
                black_box(sum_words(black_box(&vec)));
            },
        );
        // Nothing may have been rebuilt meanwhile, or this measured rebuilds, not reads.
        let st = cache.stats();
        extra
            .num(&format!("{label}_interleaved_ratio"), paired)
            .num(
                &format!("{label}_resident_pages_after"),
                entry.resident_pages() as f64,
            )
            .num(&format!("{label}_pages"), pages as f64)
            .num(&format!("{label}_faults_during"), st.faults_handled as f64);
    }
    g.finish();
}

fn main() {
    let mut c = common::criterion();
    let mut extra = Extra::default();
    bench(&mut c, &mut extra);
    extra.write("resident_read");
    c.final_summary();
}
