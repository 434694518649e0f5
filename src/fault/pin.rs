//! A pin's own fill, and an entry's initial bytes.
//!
//! A pin does not fault its pages in through the fault paths: with the gate closed, it rebuilds
//! missing and failed chunks from its own thread (waiting for fills in flight), then writes
//! every page (`PinSweep`: `MADV_POPULATE_WRITE`, which returns an error instead of raising a
//! signal on a page that is missing or poisoned),
//! and goes round again until no page is missing and no chunk failed. So a pin never takes a
//! failure policy's SIGBUS and the fault paths need not treat its faults specially: a pin's
//! failed rebuild is applied like any other (zeros, poison, or pages left missing for the
//! SIGBUS handler), so other readers of that chunk get the failure policy, and the pin returns
//! `RegenerateFailed`.

use std::sync::atomic::{AtomicU32, AtomicU8, AtomicUsize, Ordering};

use super::fill::{fill_chunk, Filler};
use super::readvise::{readvise, Cpus};
use super::runs::{missing_runs, Runs};
use super::scratch::Scratch;
use crate::chunk::Claim;
use crate::error::Error;
use crate::hook::{self, Step};
use crate::region::Region;
use crate::sys::mem::{self, Advice, UncheckedAdvice, PAGE};
use crate::sys::uffd::{FillOp, Uffd};

/// Makes every page of `r` resident for its first pin, from the calling thread (the gate is
/// closed). On failure the pages made resident are advised MADV_FREE again (failed chunks keep
/// their zeros or poison: an advice could drop the poison).
pub(crate) fn make_resident(uffd: &Uffd, r: &Region) -> Result<(), Error> {
    let res = resident(uffd, r);
    // The pages it installed last wait in this CPU's per-CPU LRU batch (its fills advise
    // nothing while the gate is closed, so nothing drained it): onto the LRU lists now, where
    // the unpin's advice finds them from whatever CPU it runs on (MADV_FREE drains only its own
    // CPU's batches and skips pages in another's). Pages installed before this thread moved, or
    // by workers meanwhile, may still wait elsewhere: the monitor's end of lingering advises
    // from every CPU, and in monitor mode every unpin is followed by two later advices from every
    // CPU.
    super::readvise::drain_this_cpu();
    if res.is_err() {
        for c in 0..r.chunks().len() {
            if !r.chunks().is_failed(c) {
                let (s, len) = r.chunk_span(c);
                // SAFETY: the pin failed: these bytes are unpinned, volatile by contract.
                let _ = unsafe { mem::advise_unchecked(s, len, UncheckedAdvice::Free) };
            }
        }
    }
    res
}

fn resident(uffd: &Uffd, r: &Region) -> Result<(), Error> {
    let mut scratch = Scratch::new();
    let mut rounds = 0;
    loop {
        // Chunks with missing pages (one mincore pass over the region), failed chunks and
        // chunks being filled get the pin's attention; the others are resident already.
        let mut todo: Vec<usize> = Vec::new();
        missing_runs(r.base(), r.pages(), |s, l| {
            for c in r.chunk_of_page(s)..=r.chunk_of_page(s + l - 1) {
                if todo.last() != Some(&c) {
                    todo.push(c);
                }
            }
        });
        let chunks = r.chunks();
        if chunks.failed_chunks() > 0 || (0..chunks.len()).any(|c| chunks.is_filling(c)) {
            todo.extend((0..chunks.len()).filter(|&c| chunks.is_failed(c) || chunks.is_filling(c)));
            todo.sort_unstable();
            todo.dedup();
        }
        for c in todo {
            rebuild(uffd, r, c, &mut scratch)?;
        }
        let populated = populate(r.base(), r.pages());
        if populated.is_ok() && chunks.failed_chunks() == 0 {
            return Ok(());
        }
        // A page was dropped between the rebuild and the populate, or a fault path's fill of
        // it failed meanwhile: go round again.
        rounds += 1;
        if rounds >= 100 {
            return Err(match populated {
                Err(errno) => Error::Kernel {
                    op: "MADV_POPULATE_WRITE (pages kept being dropped)",
                    errno,
                },
                Ok(()) => Error::RegenerateFailed(r.error_text()),
            });
        }
    }
}

/// How a pin makes every page of its entry written (so none is volatile) after rebuilding the
/// missing ones: [`Populate`](PinSweep::Populate), unless forced otherwise by
/// [`set_pin_sweep`](crate::testing::set_pin_sweep) (for benches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinSweep {
    /// `MADV_POPULATE_WRITE` over the span (Linux 5.14; atomic writes on older kernels), one
    /// system call. A page dropped since the rebuild whose callback then fails gives the call an
    /// error, never the pinning thread a signal: the pin goes round again and returns the
    /// failure.
    Populate,
    /// One atomic read-modify-write per page from the pinning thread. Measured faster on a
    /// resident 1 MiB entry (bench `pin_unpin`, `atomic_sweep_over_populate_ratio`: 0.62), but
    /// not the default: under the poison policy a page dropped since the rebuild, whose callback
    /// then fails, raises SIGBUS in the pinning thread (`tests/pin_sweep.rs`), and with it as the
    /// default `tests/unpin_delay.rs` saw pages that never became reclaimable again after the
    /// unpin (2 of 64, in 3 of 7 runs; none in 8 runs with `Populate`).
    Atomic,
}

/// 0: the default; else a forced `PinSweep` + 1.
static SWEEP: AtomicU8 = AtomicU8::new(0);

pub(crate) fn set_pin_sweep(s: Option<PinSweep>) {
    SWEEP.store(s.map_or(0, |s| s as u8 + 1), Ordering::Relaxed);
}

/// Makes the pages of the whole span present and written, so none is volatile (see
/// [`PinSweep`]).
fn populate(base: usize, pages: usize) -> Result<(), i32> {
    let atomic = || {
        for p in 0..pages {
            // SAFETY: the page lies in a live region's span, mapped writable and aligned; the
            // write leaves the bytes as they are.
            unsafe { mem::touch_write(base + p * PAGE) };
        }
        Ok(())
    };
    let sweep = match SWEEP.load(Ordering::Relaxed) {
        2 => PinSweep::Atomic,
        _ => PinSweep::Populate,
    };
    if sweep == PinSweep::Atomic || !mem::has_populate_write() {
        return atomic();
    }
    // An error (EFAULT, or EINVAL at pages the emulated poison made inaccessible on kernels
    // without UFFDIO_POISON) makes the pin go round again: it rebuilds the failed chunk.
    mem::advise(base, pages * PAGE, Advice::PopulateWrite)
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EFAULT))
}

/// How many pins' rebuilds [`PinFill`] records at once; one past them is not recorded (its
/// callback reading its own chunk then hangs instead of aborting with a message).
const PIN_FILLS: usize = 64;
/// Thread id (0: free) and chunk start of each pin's rebuild in flight.
static PIN_TID: [AtomicU32; PIN_FILLS] = [const { AtomicU32::new(0) }; PIN_FILLS];
static PIN_CHUNK: [AtomicUsize; PIN_FILLS] = [const { AtomicUsize::new(0) }; PIN_FILLS];
/// Records in use: most faults find none and skip the table.
static PIN_FILLS_IN_USE: AtomicUsize = AtomicUsize::new(0);

/// Records, for its lifetime, that this thread rebuilds the chunk at a start address for a pin:
/// a pin's callback runs in the pinning thread, outside any fault path, so the monitor would
/// not know that a fault of this thread on this chunk is its callback reading its own output
/// (it would wait for itself for good). [`pin_filling`] tells it.
struct PinFill(Option<usize>);

impl PinFill {
    fn enter(start: usize) -> PinFill {
        let tid = crate::sys::os::gettid();
        for (i, t) in PIN_TID.iter().enumerate() {
            if t.load(Ordering::Relaxed) == 0
                && t.compare_exchange(0, tid, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                PIN_CHUNK[i].store(start, Ordering::Release);
                PIN_FILLS_IN_USE.fetch_add(1, Ordering::AcqRel);
                return PinFill(Some(i));
            }
        }
        PinFill(None)
    }
}

impl Drop for PinFill {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            PIN_FILLS_IN_USE.fetch_sub(1, Ordering::AcqRel);
            PIN_CHUNK[i].store(0, Ordering::Relaxed);
            PIN_TID[i].store(0, Ordering::Release);
        }
    }
}

/// Whether thread `tid` rebuilds the chunk at `start()` for a pin now (`start` is called only if
/// some pin's rebuild is recorded). Read by the monitor for a fault of `tid`, which cannot change
/// its record while it waits in that fault.
pub(crate) fn pin_filling(tid: u32, start: impl FnOnce() -> Option<usize>) -> bool {
    if PIN_FILLS_IN_USE.load(Ordering::Acquire) == 0 {
        return false;
    }
    let Some(start) = start() else {
        return false;
    };
    PIN_TID
        .iter()
        .zip(&PIN_CHUNK)
        .any(|(t, c)| t.load(Ordering::Acquire) == tid && c.load(Ordering::Acquire) == start)
}

/// For a pin: rebuilds chunk `c` if it failed or has missing pages, waiting for a fill in flight.
fn rebuild(uffd: &Uffd, r: &Region, c: usize, scratch: &mut Scratch) -> Result<(), Error> {
    let (first, n) = r.chunk_pages_of(c);
    let (start, bytes) = r.chunk_span(c);
    let mut spins = 0;
    loop {
        let chunks = r.chunks();
        if !chunks.is_failed(c)
            && !chunks.is_filling(c)
            && Runs::of(r.base() + first * PAGE, n).is_empty()
        {
            return Ok(());
        }
        let was_failed = match chunks.try_claim(c) {
            Claim::Owned { failed } => failed,
            Claim::Busy => {
                crate::sync::backoff(&mut spins);
                continue;
            }
        };
        hook::step(Step::FillClaimed, start);
        let mut failure = None;
        let _recorded = PinFill::enter(start);
        let f = fill_chunk(uffd, r, c, was_failed, scratch, Filler::Pin, |f| {
            let text = f.to_string();
            r.record_failure(text.clone());
            failure = Some(text);
        });
        // Copies without wake: the chunk's waiters are woken here, noted or not.
        let _ = chunks.release(c, f.outcome);
        uffd.wake(start, bytes);
        return match failure {
            Some(text) => Err(Error::RegenerateFailed(text)),
            None => Ok(()),
        };
    }
}

/// Copies `bytes` (the region's length) into a fresh region with batched UFFDIO_COPY and makes
/// them volatile. A source the kernel cannot read (a reclaimed page of a SIGBUS-mode entry, or
/// of any entry under a user-mode-only userfaultfd: EFAULT) is copied through a bounce buffer
/// by ordinary reads, which rebuild it.
pub(crate) fn fill_from(uffd: &Uffd, r: &Region, bytes: &[u8]) -> Result<(), Error> {
    debug_assert_eq!(bytes.len(), r.len());
    let total = r.pages() * PAGE;
    let full = r.len() / PAGE * PAGE;
    let cpus = Cpus::start();
    let mut done = 0;
    let mut bounce: Vec<u8> = Vec::new();
    while done < total {
        let direct = bounce.is_empty() && done < full;
        let (src, len) = if direct {
            // SAFETY: `done < full <= bytes.len()`.
            (unsafe { bytes.as_ptr().add(done) }, full - done)
        } else {
            // The tail page (zero past the entry's end), or the bounce path.
            let len = (total - done).min(1 << 20);
            if bounce.len() < len {
                bounce.resize(len, 0);
            }
            let avail = bytes.len().saturating_sub(done).min(len);
            bounce[..avail].copy_from_slice(&bytes[done..done + avail]);
            bounce[avail..len].fill(0);
            (bounce.as_ptr(), len)
        };
        // SAFETY: `src` is readable for `len` bytes; the destination lies in the region's span.
        match unsafe { uffd.fill_all(FillOp::Copy(src), r.base() + done, len) } {
            Ok(_) => done += len,
            Err((installed, libc::EFAULT)) if direct => {
                // The source page at `done + installed` is not readable by the kernel: from
                // here on through the bounce buffer.
                done += installed;
                bounce.resize(PAGE, 0);
            }
            Err((_, errno)) => {
                return Err(Error::Kernel {
                    op: "UFFDIO_COPY",
                    errno,
                })
            }
        }
    }
    r.chunks().mark_all_filled();
    readvise(r.gate(), r.base(), total, cpus.end());
    Ok(())
}
