//! Pages lazyfree installs become volatile again at once (re-advised MADV_FREE), in every mode:
//! after `insert_with` and after each rebuild, reclaim drops (nearly) every page.
//!
//! In a binary of its own, the modes one after the other: other tests reclaim too, and
//! `testing::reclaim` compacts memory, which takes pages off the LRU lists for a moment; an
//! advice given then misses them until lazyfree advises them again (50 ms later; in SIGBUS mode
//! at the next fault, pin or unpin), and this test checks the advice right after the rebuild.

mod common;

use common::readvise;
use common::PAGE;
use lazyfree::{Cache, Config, Mode};

/// The tests here run one at a time: each checks advice right after a rebuild, which a
/// `testing::reclaim` of the other (compacting memory) can make miss.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn readvise_every_mode() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    for mode in [Mode::Monitor, Mode::Sigbus, Mode::Explicit] {
        readvise(Config::default().mode(mode));
    }
}

/// A thread that faulted finds the pages rebuilt for it volatile already: the fill advises them
/// MADV_FREE before it wakes the thread (monitor) or returns from the handler (SIGBUS). Each
/// round reads a reclaimed 256 KiB entry (64 KiB chunks, read-ahead on) front to back and at
/// once gives it `MADV_PAGEOUT`, with no draining and no delay: every page should go. A page can
/// miss its first advice for reasons of the kernel's own (another CPU's LRU batch, a scanner
/// holding it off the LRU for a moment), so a few rounds may keep pages; a wake that came before
/// the advice kept a chunk in 183 of 200 rounds of the same loop, and so did a missing drain
/// of the serving CPU's batches after the advice (the advice's own marks wait in one: 81-100 of
/// 100 rounds).
#[test]
fn a_reader_finds_its_rebuilt_pages_volatile() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    for mode in [Mode::Monitor, Mode::Sigbus] {
        let cache: Cache<u64> = Cache::new(Config::default().mode(mode)).expect("cache");
        let len = 256 << 10;
        let e = cache.insert(1, len, common::regen(31)).expect("insert");
        let rounds = 100;
        let mut kept = 0;
        for _ in 0..rounds {
            let sum: u64 = (0..len).step_by(PAGE).map(|o| e[o] as u64).sum();
            std::hint::black_box(sum);
            // SAFETY: the entry's own pages, volatile (not pinned): dropping them is what
            // memory pressure does, and they are rebuilt on the next read.
            unsafe { libc::madvise(e.as_ptr() as *mut libc::c_void, len, libc::MADV_PAGEOUT) };
            kept += (e.resident_pages() > 0) as usize;
        }
        assert_eq!(common::mismatches(&e, 31), 0);
        common::report(format_args!(
            "{mode:?}: {kept} of {rounds} rounds kept pages after an immediate MADV_PAGEOUT"
        ));
        assert!(
            kept <= rounds / 4,
            "{mode:?}: {kept} of {rounds} rounds kept pages a reader had just been given"
        );
    }
}
