//! Filling one claimed chunk: shared by the fault paths (`serve`) and a pin's own rebuild.

use crate::chunk::{Outcome, PinGate};
use crate::config::FailurePolicy;
use crate::hook::{self, Step};
use crate::region::{Failure, Region};
use crate::sys::mem::{self, UncheckedAdvice, PAGE};
use crate::sys::uffd::{FillOp, Uffd, UFFD_FEATURE_POISON, UFFD_FEATURE_SIGBUS};

use super::readvise::{self, Cpus};
use super::runs::Runs;
use super::scratch::Scratch;

/// Who fills a claimed chunk, and so what the fill does besides installing its pages.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Filler {
    /// A fault path, for a fault on the chunk: re-advises the pages it installs, applies the
    /// failure policy on failure. Its copies do not wake anyone: the caller wakes the chunk
    /// once the pages are advised and the chunk released, so a thread that was waiting finds
    /// its pages volatile already (a copy that woke it first would let it race the advice: a
    /// reclaim it starts at once isolates the pages, the advice misses them, and they stay
    /// unreclaimable until their second advice; measured: one 64 KiB chunk of a 256 KiB entry
    /// left after three reclaims in 6-8% of rounds).
    Fault,
    /// A fault path filling ahead of a sequential fault: re-advises, but a failure changes
    /// nothing (the pages stay missing for their own fault).
    Ahead,
    /// A pin: no advice (the gate is closed); the failure policy applies.
    Pin,
}

/// How filling one claimed chunk went (its pages are counted in the region's stats already).
pub(crate) struct ChunkFill {
    pub installed: usize,
    /// The CPUs the pages were installed on.
    pub cpus: Cpus,
    pub outcome: Outcome,
    /// The callback failed and the failure policy applies (not when filling ahead): the
    /// failure was handed to the caller's `keep` and the chunk marked failed before its pages
    /// changed.
    pub failed: bool,
    pub raise: bool,
}

/// Fills chunk `c` of `r`, which the caller claimed: drops a failed chunk's pages first (so it is
/// rebuilt whole), regenerates, installs only the missing pages and, unless a pin fills it,
/// re-advises them MADV_FREE through the pin gate. On failure applies the failure policy to the
/// missing pages, unless filling ahead of a fault (then nothing changes). The caller releases
/// the chunk and wakes its waiters.
///
/// A failure is marked on the chunk (`Chunks::mark_failed`) and handed to `keep` (which records
/// its message) *before* the policy installs zero pages: a thread that reads those zeros
/// without faulting, between the install and the release, already finds the entry failed and
/// its message kept (tests/interleave.rs `zeros_read_during_a_failure_are_marked_*`).
///
/// A chunk that never held the entry's bytes and never failed has no present page (only a fill
/// of it installs pages): its pages are not looked up (no `mincore`).
pub(crate) fn fill_chunk(
    uffd: &Uffd,
    r: &Region,
    c: usize,
    was_failed: bool,
    scratch: &mut Scratch,
    by: Filler,
    keep: impl FnOnce(Failure),
) -> ChunkFill {
    let advise = by != Filler::Pin;
    let ahead = by == Filler::Ahead;
    let (first, n) = r.chunk_pages_of(c);
    let (start, bytes) = r.chunk_span(c);
    let filled_before = r.chunks().was_filled(c);
    // A failed chunk's pages hold zeros or poison, or are missing: drop them all, so that the
    // whole chunk is rebuilt and its mark can go. A fault path cannot while a pin holds the gate
    // (the drop could take pages the pin made resident): it fills what is missing and leaves
    // the mark, and the pin rebuilds the chunk itself.
    let mut dropped = false;
    if was_failed {
        let pass = if advise { r.gate().enter() } else { None };
        if !advise || pass.is_some() {
            // SAFETY: the chunk is ours (claimed) and its bytes are rebuilt below; nothing pins
            // it (the gate is open, or this is the pin that closed it and has not returned).
            let _ = unsafe { mem::advise_unchecked(start, bytes, UncheckedAdvice::DontNeed) };
            if r.has_protected() {
                // Emulated poison: open the (now empty) pages again, after the drop, so that no
                // access between the two reads the old contents.
                // SAFETY: the chunk's pages are missing and rebuilt below before anyone is
                // woken; accesses meanwhile fault and wait for this fill.
                let _ = unsafe { mem::protect(start, bytes, true) };
            }
            dropped = true;
        }
    }
    let kept = if was_failed && !dropped {
        Outcome::Unchanged
    } else {
        Outcome::Rebuilt
    };
    let runs = if filled_before || was_failed {
        Runs::of(start, n)
    } else {
        Runs::whole(n)
    };
    if runs.is_empty() {
        return ChunkFill {
            installed: 0,
            cpus: Cpus::UNKNOWN,
            outcome: kept,
            failed: false,
            raise: false,
        };
    }
    // Pages this fill dropped itself (a failed chunk's) were not the kernel's doing.
    let taken = filled_before && !dropped;
    let gate = advise.then(|| r.gate());
    let cpus = Cpus::start();
    // A scratch that cannot grow (the SIGBUS handler's) takes a larger chunk in pieces.
    let (installed, outcome) = if !scratch.can_grow() && scratch.capacity() < bytes {
        in_pieces(uffd, r, first, runs.all(), scratch, gate)
    } else {
        match scratch.get(bytes) {
            Some(buf) => match r.regenerate(first * PAGE, buf) {
                Ok(()) => {
                    hook::step(Step::FillRegenerated, start);
                    let src = buf.as_ptr();
                    let mut installed = 0;
                    for &(s, l) in runs.all() {
                        // SAFETY: src holds `bytes` readable bytes, of which this run is a part.
                        let run_src = unsafe { src.add(s * PAGE) };
                        let run = start + s * PAGE;
                        installed += install(uffd, FillOp::Copy(run_src), run, l * PAGE, gate);
                    }
                    (installed, Ok(()))
                }
                Err(f) => (0, Err(f)),
            },
            None => (0, Err(Failure::NoScratch)),
        }
    };
    let cpus = cpus.end();
    let reclaimed = if taken { installed / PAGE } else { 0 };
    r.counters().record_fill(installed / PAGE, reclaimed);
    match outcome {
        Ok(()) => ChunkFill {
            installed: installed / PAGE,
            cpus,
            outcome: kept,
            failed: false,
            raise: false,
        },
        // Filling ahead (nobody faulted there yet), a failure changes nothing: the pages stay
        // missing (not marked as having held the entry's bytes), so the chunk's own fault, if
        // one comes, calls the callback again and applies the policy then.
        Err(_) if ahead => ChunkFill {
            installed: installed / PAGE,
            cpus,
            outcome: Outcome::Unchanged,
            failed: false,
            raise: false,
        },
        Err(f) => {
            // Marked and kept first: the zero pages below are readable at once.
            r.chunks().mark_failed(c);
            keep(f);
            // Pages a piecewise fill installed before the failure are present: skipped.
            let raise = apply_failure(uffd, r, start, runs.all());
            hook::step(Step::FailureApplied, start);
            ChunkFill {
                installed: installed / PAGE,
                cpus,
                outcome: Outcome::Failed,
                failed: true,
                raise,
            }
        }
    }
}

/// Installs `len` bytes at `dst` by `op` (a copy; present pages skipped) and, given the region's
/// gate, re-advises them MADV_FREE unless a pin closed it; returns the bytes installed.
fn install(uffd: &Uffd, op: FillOp, dst: usize, len: usize, gate: Option<&PinGate>) -> usize {
    let cpus = Cpus::start();
    // SAFETY: the callers pass a copy whose source is readable for `len` bytes and
    // `dst..dst+len` inside a region.
    let got = unsafe { uffd.fill_all(op, dst, len) }.unwrap_or_else(|(n, _)| n);
    let cpus = cpus.end();
    hook::step(Step::FillInstalled, dst);
    if let Some(gate) = gate {
        readvise::readvise(gate, dst, len, cpus);
    }
    got
}

/// The path for a chunk larger than a scratch buffer that cannot grow: regenerates only the
/// missing runs, in pieces of at most the buffer's size, installing each piece before the next.
/// `first` is the chunk's first page in the region; `runs` are relative to it. Returns the bytes
/// installed and how it ended.
fn in_pieces(
    uffd: &Uffd,
    r: &Region,
    first: usize,
    runs: &[(usize, usize)],
    scratch: &mut Scratch,
    gate: Option<&PinGate>,
) -> (usize, Result<(), Failure>) {
    let piece_pages = scratch.capacity() / PAGE;
    let Some(buf) = scratch.get(piece_pages * PAGE).filter(|_| piece_pages > 0) else {
        return (0, Err(Failure::NoScratch));
    };
    let mut installed = 0;
    for &(s, l) in runs {
        let mut p = 0;
        while p < l {
            let n = (l - p).min(piece_pages);
            let page = first + s + p;
            let piece = &mut buf[..n * PAGE];
            if let Err(f) = r.regenerate(page * PAGE, piece) {
                return (installed, Err(f));
            }
            let dst = r.base() + page * PAGE;
            installed += install(uffd, FillOp::Copy(piece.as_ptr()), dst, n * PAGE, gate);
            p += n;
        }
    }
    (installed, Ok(()))
}

/// Applies the failure policy to the missing pages of `runs` (relative to `start`). Returns
/// true if the faulting access must raise SIGBUS itself (the pages stay missing).
///
/// The poison policy: UFFDIO_POISON where the kernel has it (6.6). Without it (Linux 6.1 to
/// 6.5) it is emulated: the missing pages are left missing and made inaccessible
/// (`mprotect(PROT_NONE)`), so an access from the program dies of SIGSEGV and a system call
/// reading them (`write(2)` from the entry) fails with EFAULT; nothing ever reads zeros. The
/// pages open again when their chunk is rebuilt (a pin) or the region's span is freed. Each
/// protected run can split the slab's mapping: up to two more VMAs per failed chunk, until it
/// is rebuilt.
fn apply_failure(uffd: &Uffd, r: &Region, start: usize, runs: &[(usize, usize)]) -> bool {
    let op = match r.policy() {
        FailurePolicy::Zero => FillOp::Zero,
        // The SIGBUS mode's uffd raises SIGBUS on a missing page by itself: leave them missing.
        FailurePolicy::Poison if uffd.has(UFFD_FEATURE_SIGBUS) => return true,
        FailurePolicy::Poison if uffd.has(UFFD_FEATURE_POISON) => FillOp::Poison,
        FailurePolicy::Poison => {
            r.mark_protected();
            for &(s, l) in runs {
                // SAFETY: these pages hold nothing (missing) and must not be read: that is the
                // point. The chunk is claimed, so no fill installs them meanwhile.
                let _ = unsafe { mem::protect(start + s * PAGE, l * PAGE, false) };
            }
            return false;
        }
    };
    for &(s, l) in runs {
        // SAFETY: the runs lie in the region's span; zero and poison read no source.
        let _ = unsafe { uffd.fill_all(op, start + s * PAGE, l * PAGE) };
    }
    false
}
