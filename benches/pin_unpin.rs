//! Bench 5, pin/unpin of a resident 1 MiB entry (with the default unpin delay, and without:
//! `lazyfree_pin_unpin_no_delay`, whose pins write every page: by MADV_POPULATE_WRITE, the
//! default, or by atomic writes, `..._atomic_sweep`; `atomic_sweep_over_populate_ratio` compares
//! the two interleaved), against a Chromium-style discardable buffer
//! implemented here: unlock writes a cookie word into every page and advises MADV_FREE; lock
//! compare-and-swaps the cookie of every page (a write, which cancels the pending free) and
//! reports the whole buffer lost if any page was dropped (its cookie then reads as zero).

mod common;

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use common::{size_label, Extra, Fresh, PAGE};
use criterion::{BenchmarkId, Criterion, Throughput};
use lazyfree::testing::{self, PinSweep};
use lazyfree::{Cache, Config};

const COOKIE: u64 = 0x6c61_7a79_6672_6565;
const LOCKED: u64 = 0x4c4f_434b_4544_2121;

struct Discardable {
    mem: Fresh,
    pages: usize,
}

impl Discardable {
    fn new(bytes: &[u8]) -> Discardable {
        let mut mem = Fresh::map(bytes.len());
        mem.as_mut_slice().copy_from_slice(bytes);
        let d = Discardable {
            mem,
            pages: bytes.len() / PAGE,
        };
        d.unlock();
        d
    }

    fn word(&self, page: usize) -> &AtomicU64 {
        // SAFETY: the page lies in our mapping, which lives as long as self; page starts are
        // 8-byte aligned, and the word is only accessed atomically.
        unsafe { &*(self.mem.as_ptr().add(page * PAGE) as *const AtomicU64) }
    }

    /// Makes the buffer non-discardable; false if any page was dropped (the contents are lost).
    fn lock(&self) -> bool {
        let mut kept = true;
        for p in 0..self.pages {
            kept &= self
                .word(p)
                .compare_exchange(COOKIE, LOCKED, Relaxed, Relaxed)
                .is_ok();
        }
        kept
    }

    fn unlock(&self) {
        for p in 0..self.pages {
            self.word(p).store(COOKIE, Relaxed);
        }
        // SAFETY: the buffer is unlocked: the kernel may drop its pages, which `lock` detects.
        unsafe { libc::madvise(self.mem.as_ptr().cast(), self.pages * PAGE, libc::MADV_FREE) };
    }
}

fn bench(c: &mut Criterion, extra: &mut Extra) {
    let size = 1 << 20;
    let label = size_label(size);
    let src = Arc::new(common::random_bytes(size, 5));
    let cache: Cache<u32> =
        Cache::new(Config::default()).expect("a monitor-mode cache (needs userfaultfd)");
    let s = src.clone();
    let entry = cache
        .insert_with(0, &src, move |off, buf: &mut [u8]| {
            buf.copy_from_slice(&s[off..off + buf.len()]);
            Ok::<(), Infallible>(())
        })
        .expect("insert_with");
    let chrome = Discardable::new(&src);
    // The same entry in a cache without the unpin delay: every unpin advises at once and every
    // pin makes the pages resident again (what every pin and unpin cost before the delay).
    let eager: Cache<u32> = Cache::new(Config::default().unpin_delay(std::time::Duration::ZERO))
        .expect("a monitor-mode cache");
    let s = src.clone();
    let eager_entry = eager
        .insert_with(0, &src, move |off, buf: &mut [u8]| {
            buf.copy_from_slice(&s[off..off + buf.len()]);
            Ok::<(), Infallible>(())
        })
        .expect("insert_with");

    let mut g = c.benchmark_group("pin_unpin");
    g.throughput(Throughput::Elements(1));
    let mut lost = 0u64;
    g.bench_with_input(
        BenchmarkId::new("chromium_lock_unlock", &label),
        &size,
        |b, _| {
            b.iter(|| {
                lost += !chrome.lock() as u64;
                chrome.unlock();
            })
        },
    );
    g.bench_with_input(
        BenchmarkId::new("lazyfree_pin_unpin", &label),
        &size,
        |b, _| {
            b.iter(|| {
                let p = entry.pin().expect("pin");
                black_box(p.len());
            })
        },
    );
    g.bench_with_input(
        BenchmarkId::new("lazyfree_pin_unpin_no_delay", &label),
        &size,
        |b, _| {
            b.iter(|| {
                let p = eager_entry.pin().expect("pin");
                black_box(p.len());
            })
        },
    );
    // The same with the pin's sweep made of atomic writes.
    testing::set_pin_sweep(Some(PinSweep::Atomic));
    g.bench_with_input(
        BenchmarkId::new("lazyfree_pin_unpin_no_delay_atomic_sweep", &label),
        &size,
        |b, _| {
            b.iter(|| {
                let p = eager_entry.pin().expect("pin");
                black_box(p.len());
            })
        },
    );
    testing::set_pin_sweep(None);
    g.finish();
    // Which sweep is faster for a pin of a resident, volatile entry.
    let sweep_ratio = common::interleaved_ratio(
        2_001,
        || {
            testing::set_pin_sweep(Some(PinSweep::Atomic));
            drop(eager_entry.pin().expect("pin"));
        },
        || {
            testing::set_pin_sweep(Some(PinSweep::Populate));
            drop(eager_entry.pin().expect("pin"));
        },
    );
    testing::set_pin_sweep(None);
    let paired_eager = common::interleaved_ratio(
        2_001,
        || drop(eager_entry.pin().expect("pin")),
        || {
            lost += !chrome.lock() as u64;
            chrome.unlock();
        },
    );
    let paired = common::interleaved_ratio(
        20_001,
        || drop(entry.pin().expect("pin")),
        || {
            lost += !chrome.lock() as u64;
            chrome.unlock();
        },
    );
    assert!(entry[..] == src[..], "pinning changed the entry's bytes");
    assert!(
        eager_entry[..] == src[..],
        "pinning changed the entry's bytes"
    );
    let st = cache.stats();
    extra
        .num("interleaved_ratio", paired)
        .num("no_delay_interleaved_ratio", paired_eager)
        .num("atomic_sweep_over_populate_ratio", sweep_ratio)
        .num("chromium_buffers_lost", lost as f64)
        .num("lazyfree_faults_during", st.faults_handled as f64)
        .num(
            "lazyfree_resident_pages_after",
            entry.resident_pages() as f64,
        );
}

fn main() {
    let mut c = common::criterion();
    let mut extra = Extra::default();
    bench(&mut c, &mut extra);
    extra.write("pin_unpin");
    c.final_summary();
}
