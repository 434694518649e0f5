//! Explicit mode: volatile memory without userfaultfd. Nothing catches a touch of a dropped page,
//! so the bytes are read only through a pin, and a pin finds the lost pages itself.
//!
//! ## Finding lost pages without faults
//! While an entry is unpinned, the first 8-byte word of each of its pages holds `MARKER` and the
//! word that was there is kept in `Inner::saved`; the pages are advised MADV_FREE. A pin
//! compare-and-swaps each page's word from `MARKER` back to the saved word:
//! - a page the kernel kept holds the marker: the swap succeeds, and being a write it cancels
//!   the pending free (the kernel decides per page, atomically with the dirty bit: the write
//!   lands either before a discard, and the page is kept, or after it, on a fresh zero page);
//! - a page the kernel dropped reads as zero, which is not the marker: the page is lost.
//!
//! The chunks (`Region::chunk_pages`) holding lost pages are regenerated into a scratch buffer
//! and only the lost pages are copied in; pages the kernel kept are left as they are. The last
//! unpin marks every page again and advises MADV_FREE.
//!
//! Invariant while unpinned: every page's first word is `MARKER` (with its real word in
//! `saved`) or zero (dropped by the kernel, never filled, or dropped by a failed pin). Zero is
//! never the marker, so a pin never mistakes a lost page for a kept one.
//!
//! ## Failures
//! Nothing is zero-filled: a failed callback makes the pin fail. The pages made valid so far are
//! marked again, the lost pages of the failed chunk are dropped (MADV_DONTNEED: they read zero,
//! so the next pin finds them lost again), and later chunks are left as they were (marked).
//!
//! ## Auto
//! `auto` resolves `Mode::Auto`: `LAZYFREE_MODE` first, then the monitor mode if a userfaultfd
//! can be had, else this mode, with the reason kept for `Stats::fallback_reason` and logged once.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::chunk::{Claim, Outcome};
use crate::error::Error;
use crate::region::Region;
use crate::runtime::Runtime;
use crate::sys::mem::{self, UncheckedAdvice, PAGE};
use crate::sys::os;

/// Written over the first word of each page of an unpinned entry. Any non-zero value works (a
/// dropped page reads zero); this one spells "lazyfree" in ASCII.
const MARKER: u64 = u64::from_be_bytes(*b"lazyfree");

/// Explicit-mode state of one entry, shared by its clones.
pub(crate) struct Pages {
    inner: Mutex<Inner>,
    /// The thread sweeping the entry in `pin` now (`thread_key`), 0 if none: a callback that pins
    /// its own entry gets an error instead of waiting for itself.
    sweeper: AtomicUsize,
}

struct Inner {
    pins: usize,
    /// The real first word of each page while it is marked; empty until first needed.
    saved: Vec<u64>,
}

/// A number unique to the calling thread while it lives (the address of a thread-local).
fn thread_key() -> usize {
    thread_local!(static KEY: u8 = const { 0 });
    KEY.with(|k| k as *const u8 as usize)
}

/// The first word of the page at `page` as an atomic.
///
/// # Safety
/// `page` must be a page-aligned address of a live region's span (mapped read-write).
unsafe fn word<'a>(page: usize) -> &'a AtomicU64 {
    // SAFETY: page-aligned, hence 8-byte aligned, and mapped by the caller's contract; the
    // word is only accessed atomically or by its pin's holder.
    unsafe { &*(page as *const AtomicU64) }
}

impl Pages {
    pub(crate) fn new() -> Pages {
        Pages {
            inner: Mutex::new(Inner {
                pins: 0,
                saved: Vec::new(),
            }),
            sweeper: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pins `r`: the first pin finds the pages the kernel dropped and regenerates them. Pins
    /// nest; a failed pin leaves the entry unpinned (and marked failed).
    pub(crate) fn pin(&self, r: &Region) -> Result<(), Error> {
        if self.sweeper.load(Ordering::SeqCst) == thread_key() {
            return Err(Error::RegenerateFailed(
                "the regenerate callback pinned (or read) the entry it is rebuilding; it must \
                 compute the bytes without reading them (explicit mode)"
                    .into(),
            ));
        }
        let mut g = self.lock();
        if g.pins == 0 {
            self.sweeper.store(thread_key(), Ordering::SeqCst);
            let res = sweep(r, &mut g);
            self.sweeper.store(0, Ordering::SeqCst);
            res?;
        }
        g.pins += 1;
        r.pinned.store(g.pins, Ordering::Release);
        Ok(())
    }

    /// Ends one pin; the last marks the pages and advises MADV_FREE. False if not pinned.
    pub(crate) fn unpin(&self, r: &Region) -> bool {
        let mut g = self.lock();
        if g.pins == 0 {
            return false;
        }
        g.pins -= 1;
        if g.pins == 0 {
            mark(r, &mut g.saved, 0..r.pages, &[]);
            free(r, r.pages);
        }
        r.pinned.store(g.pins, Ordering::Release);
        true
    }

    /// Copies `bytes` (the region's full length) into a fresh, unpinned region and makes it
    /// volatile.
    pub(crate) fn fill_from(&self, r: &Region, bytes: &[u8]) {
        assert_eq!(bytes.len(), r.len);
        let mut g = self.lock();
        debug_assert_eq!(g.pins, 0);
        // SAFETY: the region's span holds `pages * PAGE >= len` writable bytes that nobody
        // reads yet (the entry has not been handed out); `bytes` does not overlap it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), r.base as *mut u8, r.len) };
        // The tail of the last page is zero already: spans come fresh (never touched, or
        // dropped with MADV_DONTNEED when last freed).
        mark(r, &mut g.saved, 0..r.pages, &[]);
        free(r, r.pages);
    }
}

/// Marks pages `range` of `r` except those in `skip` (sorted): each page's first word goes to
/// `saved`, the marker takes its place. The pages must be present and valid (pinned).
fn mark(r: &Region, saved: &mut Vec<u64>, range: std::ops::Range<usize>, skip: &[usize]) {
    if saved.len() != r.pages {
        saved.resize(r.pages, 0);
    }
    let mut skip = skip.iter().peekable();
    for p in range {
        if skip.peek() == Some(&&p) {
            skip.next();
            continue;
        }
        // SAFETY: page `p` lies in the region's span.
        let w = unsafe { word(r.base + p * PAGE) };
        saved[p] = w.load(Ordering::Relaxed);
        w.store(MARKER, Ordering::Relaxed);
    }
}

/// Advises the first `pages` pages of `r` MADV_FREE.
fn free(r: &Region, pages: usize) {
    // SAFETY: the pages are marked (their real first words kept aside) or zero, and unpinned:
    // nobody may read them until a pin checks every page and rebuilds the lost ones.
    let _ = unsafe { mem::advise_unchecked(r.base, pages * PAGE, UncheckedAdvice::Free) };
}

/// The first pin's work: restores kept pages, regenerates the chunks holding lost ones.
fn sweep(r: &Region, g: &mut Inner) -> Result<(), Error> {
    if g.saved.len() != r.pages {
        // Never marked: every page is fresh and reads zero, so every page is found lost.
        g.saved.resize(r.pages, 0);
    }
    let mut lost: Vec<usize> = Vec::new();
    let mut scratch: Vec<u8> = Vec::new();
    let mut rebuilt = false;
    let mut c = 0;
    while c < r.pages {
        let n = r.chunk_pages.min(r.pages - c);
        lost.clear();
        for p in c..c + n {
            // SAFETY: page `p` lies in the region's span.
            let w = unsafe { word(r.base + p * PAGE) };
            // Success is a write, which cancels the pending free of a kept page. A dropped page
            // reads 0 and fails; its bytes are written below either way.
            if w.compare_exchange(MARKER, g.saved[p], Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
            {
                lost.push(p);
            }
        }
        if !lost.is_empty() {
            let off = c * PAGE;
            let data_len = (n * PAGE).min(r.len - off);
            scratch.resize(data_len, 0);
            if let Err(msg) = regenerate(r, off, &mut scratch) {
                // Pages before this chunk, and its kept pages, are valid: mark them again.
                mark(r, &mut g.saved, 0..c + n, &lost);
                for &p in &lost {
                    // SAFETY: the page holds no valid bytes; dropped, it reads zero and is
                    // found lost by the next pin.
                    let _ = unsafe {
                        mem::advise_unchecked(r.base + p * PAGE, PAGE, UncheckedAdvice::DontNeed)
                    };
                }
                free(r, c + n);
                r.counters.regen_failures.fetch_add(1, Ordering::Relaxed);
                *r.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
                set_chunk(r, r.chunk_of_page(c), Outcome::Failed);
                return Err(Error::RegenerateFailed(msg));
            }
            for &p in &lost {
                let start = p * PAGE - off;
                let end = ((p + 1) * PAGE - off).min(data_len);
                let dst = r.base + p * PAGE;
                // SAFETY: page `p` lies in the region's span, which only this pin's sweep uses
                // now (pins are 0 and the mutex is held); scratch holds `end` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        scratch.as_ptr().add(start),
                        dst as *mut u8,
                        end - start,
                    );
                    // Past the entry's end the page reads zero, as in every mode.
                    std::ptr::write_bytes((dst + end - start) as *mut u8, 0, PAGE - (end - start));
                }
            }
            r.counters
                .pages_regenerated
                .fetch_add(lost.len() as u64, Ordering::Relaxed);
            rebuilt = true;
        }
        c += n;
    }
    if rebuilt {
        drain_this_cpu();
    }
    // Every lost page of every chunk was rebuilt: no chunk is failed any more.
    for c in 0..r.chunks.len() {
        if r.chunks.is_failed(c) {
            set_chunk(r, c, Outcome::Rebuilt);
        }
    }
    Ok(())
}

/// Records how chunk `c`'s rebuild ended. Pins are serialized by the mutex, so the claim always
/// succeeds: only a pin's sweep fills in this mode.
fn set_chunk(r: &Region, c: usize, outcome: Outcome) {
    if let Claim::Owned { .. } = r.chunks.try_claim(c) {
        r.chunks.release(c, outcome);
    }
}

/// Moves the pages this CPU faulted in recently from its per-CPU LRU batch onto the LRU lists.
/// MADV_FREE skips pages still sitting in such a batch (KERNEL-NOTES) and only drains the batch
/// of the CPU it runs on: pages a pin rebuilt on one CPU and unpinned from another would stay
/// unreclaimable until the next unpin. Any MADV_FREE call drains the calling CPU's batch first,
/// so one on a page reserved for this (never touched: nothing to free) does it for ~1 µs.
fn drain_this_cpu() {
    static PAGE_FOR_DRAIN: OnceLock<Option<usize>> = OnceLock::new();
    let page = PAGE_FOR_DRAIN.get_or_init(|| mem::map_anon(PAGE).ok().map(|p| p as usize));
    if let Some(page) = *page {
        // SAFETY: the page is ours, never used for anything: there is nothing to lose.
        let _ = unsafe { mem::advise_unchecked(page, PAGE, UncheckedAdvice::Free) };
    }
}

/// Calls the callback for `buf.len()` bytes at `off`, catching panics; the error's text.
fn regenerate(r: &Region, off: usize, buf: &mut [u8]) -> Result<(), String> {
    let t0 = os::now_ns();
    let res = catch_unwind(AssertUnwindSafe(|| (r.regen)(off, buf)));
    r.counters.record_regen(os::now_ns().saturating_sub(t0));
    match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the callback panicked".into()),
    }
}

/// The runtime for a `Mode::Auto` cache, and why it is explicit if it is.
pub(crate) fn auto() -> Result<(Arc<Runtime>, Option<String>), Error> {
    match std::env::var("LAZYFREE_MODE") {
        Ok(v) => match v.trim() {
            "explicit" => {
                let why = "LAZYFREE_MODE=explicit".to_string();
                log_once(&why);
                return Ok((Runtime::explicit()?, Some(why)));
            }
            "monitor" => return Ok((Runtime::monitor()?, None)),
            "auto" | "" => {}
            other => {
                return Err(Error::InvalidConfig(format!(
                    "LAZYFREE_MODE={other:?}: use explicit, monitor or auto (or unset it)"
                )))
            }
        },
        Err(std::env::VarError::NotPresent) => {}
        Err(std::env::VarError::NotUnicode(v)) => {
            return Err(Error::InvalidConfig(format!(
                "LAZYFREE_MODE={v:?}: use explicit, monitor or auto (or unset it)"
            )))
        }
    }
    match Runtime::monitor() {
        Ok(rt) => Ok((rt, None)),
        Err(e @ Error::UserfaultfdUnavailable { .. }) => {
            let why = e.to_string();
            log_once(&why);
            Ok((Runtime::explicit()?, Some(why)))
        }
        Err(e) => Err(e),
    }
}

/// One line on stderr, the first time a `Mode::Auto` cache ends up explicit.
fn log_once(why: &str) {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    if !LOGGED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "lazyfree: Mode::Auto uses the explicit mode (entries are read through pin()): {why}"
        );
    }
}
