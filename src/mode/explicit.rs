//! Explicit mode: volatile memory without userfaultfd. Nothing catches a touch of a dropped page,
//! so the bytes are read only through a pin, and a pin finds the lost pages itself.
//!
//! ## Finding lost pages without faults
//! While an entry is unpinned, the first 8-byte word of each of its pages holds `MARKER` and the
//! word that was there is kept in the region's marks (`PinState::marks`, under its pin lock); the pages are advised MADV_FREE. A pin
//! compare-and-swaps each page's word from `MARKER` back to the saved word:
//! - a page the kernel kept holds the marker: the swap succeeds, and being a write it cancels
//!   the pending free (the kernel decides per page, atomically with the dirty bit: the write
//!   lands either before a discard, and the page is kept, or after it, on a fresh zero page);
//! - a page the kernel dropped reads as zero, which is not the marker: the page is lost.
//!
//! The chunks holding lost pages are regenerated into a scratch buffer and only the lost pages
//! are copied in; pages the kernel kept are left as they are. The last
//! unpin marks every page again and advises MADV_FREE.
//!
//! Invariant while unpinned: every page's first word is `MARKER` (with its real word in
//! `saved`) or zero (dropped by the kernel, never filled, or dropped by a failed pin). Zero is
//! never the marker, so a pin never mistakes a lost page for a kept one.
//!
//! ## Failures
//! Nothing is zero-filled: a failed callback makes the pin fail. The pages made valid so far are
//! marked again, the lost pages of the failed chunk are dropped (MADV_DONTNEED: they read zero,
//! so the next pin finds them lost again), and later chunks are left as they were (marked). The
//! failed chunk is marked failed (`chunk.rs`) until a pin rebuilds it.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::chunk::{Claim, Outcome};
use crate::error::Error;
use crate::fault::readvise;
use crate::region::Region;
use crate::sys::mem::{self, UncheckedAdvice, PAGE};

/// Written over the first word of each page of an unpinned entry. Any non-zero value works (a
/// dropped page reads zero); this one spells "lazyfree" in ASCII.
const MARKER: u64 = u64::from_be_bytes(*b"lazyfree");

/// The first word of the page at `page` as an atomic.
///
/// # Safety
/// `page` must be a page-aligned address of a live region's span (mapped read-write).
unsafe fn word<'a>(page: usize) -> &'a AtomicU64 {
    // SAFETY: page-aligned, hence 8-byte aligned, and mapped by the caller's contract; the
    // word is only accessed atomically or by its pin's holder.
    unsafe { &*(page as *const AtomicU64) }
}

/// The last unpin's work: marks every page and advises MADV_FREE.
pub(super) fn release(r: &Region, marks: &mut Vec<u64>) {
    mark(r, marks, 0..r.pages(), &[]);
    free(r, r.pages());
}

/// Copies `bytes` (the region's full length) into a fresh, unpinned region and makes it
/// volatile.
pub(super) fn fill_from(r: &Region, bytes: &[u8]) {
    assert_eq!(bytes.len(), r.len());
    // SAFETY: the region's span holds `pages * PAGE >= len` writable bytes that nobody reads
    // yet (the entry has not been handed out); `bytes` does not overlap it.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), r.base() as *mut u8, r.len()) };
    // The tail of the last page is zero already: spans come fresh (never touched, or dropped
    // with MADV_DONTNEED when last freed).
    r.chunks().mark_all_filled();
    r.with_marks(|marks| release(r, marks));
}

/// Marks pages `range` of `r` except those in `skip` (sorted): each page's first word goes to
/// `saved`, the marker takes its place. The pages must be present and valid (pinned).
fn mark(r: &Region, saved: &mut Vec<u64>, range: std::ops::Range<usize>, skip: &[usize]) {
    if saved.len() != r.pages() {
        saved.resize(r.pages(), 0);
    }
    let mut skip = skip.iter().peekable();
    for p in range {
        if skip.peek() == Some(&&p) {
            skip.next();
            continue;
        }
        // SAFETY: page `p` lies in the region's span.
        let w = unsafe { word(r.base() + p * PAGE) };
        saved[p] = w.load(Ordering::Relaxed);
        w.store(MARKER, Ordering::Relaxed);
    }
}

/// Advises the first `pages` pages of `r` MADV_FREE.
fn free(r: &Region, pages: usize) {
    // SAFETY: the pages are marked (their real first words kept aside) or zero, and unpinned:
    // nobody may read them until a pin checks every page and rebuilds the lost ones.
    let _ = unsafe { mem::advise_unchecked(r.base(), pages * PAGE, UncheckedAdvice::Free) };
}

/// The first pin's work: restores kept pages, regenerates the chunks holding lost ones.
pub(super) fn sweep(r: &Region, saved: &mut Vec<u64>) -> Result<(), Error> {
    if saved.len() != r.pages() {
        // Never marked: every page is fresh and reads zero, so every page is found lost.
        saved.resize(r.pages(), 0);
    }
    let mut lost: Vec<usize> = Vec::new();
    let mut scratch: Vec<u8> = Vec::new();
    let mut rebuilt = false;
    for c in 0..r.chunks().len() {
        let (first, n) = r.chunk_pages_of(c);
        lost.clear();
        for (p, &real) in saved.iter().enumerate().skip(first).take(n) {
            // SAFETY: page `p` lies in the region's span.
            let w = unsafe { word(r.base() + p * PAGE) };
            // Success is a write, which cancels the pending free of a kept page. A dropped page
            // reads 0 and fails; its bytes are written below either way.
            if w.compare_exchange(MARKER, real, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
            {
                lost.push(p);
            }
        }
        if lost.is_empty() {
            continue;
        }
        let off = first * PAGE;
        let data_len = (n * PAGE).min(r.len() - off);
        scratch.resize(data_len, 0);
        if let Err(f) = r.regenerate(off, &mut scratch) {
            // Pages before this chunk, and its kept pages, are valid: mark them again.
            mark(r, saved, 0..first + n, &lost);
            for &p in &lost {
                // SAFETY: the page holds no valid bytes; dropped, it reads zero and is found
                // lost by the next pin.
                let _ = unsafe {
                    mem::advise_unchecked(r.base() + p * PAGE, PAGE, UncheckedAdvice::DontNeed)
                };
            }
            free(r, first + n);
            let msg = f.to_string();
            r.record_failure(msg.clone());
            set_chunk(r, c, Outcome::Failed);
            return Err(Error::RegenerateFailed(msg));
        }
        for &p in &lost {
            let start = p * PAGE - off;
            let end = ((p + 1) * PAGE - off).min(data_len);
            let dst = r.base() + p * PAGE;
            // SAFETY: page `p` lies in the region's span, which only this pin's sweep uses now
            // (the pin count is 0 and its lock is held); scratch holds `end` bytes.
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
        let reclaimed = if r.chunks().was_filled(c) {
            lost.len()
        } else {
            0
        };
        r.counters().record_fill(lost.len(), reclaimed);
        set_chunk(r, c, Outcome::Rebuilt);
        rebuilt = true;
    }
    if rebuilt {
        readvise::drain_this_cpu();
    }
    // Every lost page of every chunk was rebuilt: no chunk is failed any more.
    for c in 0..r.chunks().len() {
        if r.chunks().is_failed(c) {
            set_chunk(r, c, Outcome::Rebuilt);
        }
    }
    Ok(())
}

/// Records how chunk `c`'s rebuild ended. Pins are serialized by the pin lock, so the claim
/// always succeeds: only a pin's sweep fills in this mode.
fn set_chunk(r: &Region, c: usize, outcome: Outcome) {
    if let Claim::Owned { .. } = r.chunks().try_claim(c) {
        // No fault path in this mode notes itself waiting.
        let _ = r.chunks().release(c, outcome);
    }
}
