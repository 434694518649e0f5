//! Ranges the SIGBUS handler serves for another part of lazyfree: a shared cache opened in
//! SIGBUS mode registers its mapping here with a serving function, and the handler calls it for
//! a missing page there (inside the handler: the function follows the handler's rules).
//!
//! ## States of a slot
//! free (`start` 0) → claimed (`start` = `CLAIMING`, only the adder writes the fields) →
//! published (`start` = the range's start, release) → retired (`start` 0 again, by
//! `remove`, which then waits until no handler is inside (`active` 0) before the owner frees
//! what `ctx` points to). A handler counts itself in (`active`), *then* checks that the slot
//! still holds the range (both SeqCst), so a remove that saw `active` 0 after retiring the slot
//! has no handler left that could use `ctx`.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::Error;

/// Serves a missing page at `addr` with `scratch` (page-aligned, at least a page); `ctx` is
/// what was registered. Returns false if the address is not one it serves after all.
pub(crate) type ServeFn = fn(ctx: usize, addr: usize, scratch: &mut [u8]) -> bool;

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    serve: AtomicUsize,
    ctx: AtomicUsize,
    /// The largest chunk the serving function wants a buffer for.
    chunk: AtomicUsize,
    active: AtomicUsize,
}

const SLOTS: usize = 64;
const CLAIMING: usize = 1;

#[allow(clippy::declare_interior_mutable_const)] // the const only seeds the static array
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    serve: AtomicUsize::new(0),
    ctx: AtomicUsize::new(0),
    chunk: AtomicUsize::new(0),
    active: AtomicUsize::new(0),
};
static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
/// 1 + the highest slot ever claimed: the handler scans no further. 0 while no shared cache was
/// ever opened in SIGBUS mode, so a private SIGBUS-mode fault pays one load here, not a scan.
static HIGH: AtomicUsize = AtomicUsize::new(0);

/// Registers `[start, start + len)`; returns the slot to give to `remove`.
pub(crate) fn add(
    start: usize,
    len: usize,
    chunk: usize,
    serve: ServeFn,
    ctx: usize,
) -> Result<usize, Error> {
    for (i, s) in TABLE.iter().enumerate() {
        if s.start
            .compare_exchange(0, CLAIMING, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            // Raised before the range is published: a handler that sees the range sees it.
            HIGH.fetch_max(i + 1, Ordering::SeqCst);
            s.end.store(start + len, Ordering::Relaxed);
            s.serve.store(serve as usize, Ordering::Relaxed);
            s.ctx.store(ctx, Ordering::Relaxed);
            s.chunk.store(chunk, Ordering::Relaxed);
            s.start.store(start, Ordering::SeqCst);
            return Ok(i);
        }
    }
    Err(Error::InvalidConfig(format!(
        "more than {SLOTS} shared caches open in SIGBUS mode in one process: close one, or \
         open it in monitor mode"
    )))
}

/// Retires slot `i` and waits until no handler uses it: afterwards its `ctx` may be freed.
pub(crate) fn remove(i: usize) {
    let s = &TABLE[i];
    s.start.store(0, Ordering::SeqCst);
    let mut spins = 0;
    while s.active.load(Ordering::SeqCst) != 0 {
        crate::sync::backoff(&mut spins);
    }
}

/// The registered ranges holding `addr`: calls `with(serve, ctx, chunk)` for each, counted in,
/// until one serves it; `Some(true)` then, `None` if none did.
pub(super) fn serve_at(addr: usize, with: impl Fn(ServeFn, usize, usize) -> bool) -> Option<bool> {
    let high = HIGH.load(Ordering::Acquire);
    for s in TABLE[..high].iter() {
        let start = s.start.load(Ordering::Acquire);
        if start <= CLAIMING || addr < start || addr >= s.end.load(Ordering::Relaxed) {
            continue;
        }
        s.active.fetch_add(1, Ordering::SeqCst);
        if s.start.load(Ordering::SeqCst) != start {
            // Retired meanwhile: its owner may be freeing `ctx`.
            s.active.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let raw = s.serve.load(Ordering::Relaxed);
        // SAFETY: only `add` stores non-zero values here, each a `ServeFn`.
        let f: ServeFn = unsafe { std::mem::transmute::<usize, ServeFn>(raw) };
        let served = with(
            f,
            s.ctx.load(Ordering::Relaxed),
            s.chunk.load(Ordering::Relaxed),
        );
        s.active.fetch_sub(1, Ordering::SeqCst);
        if served {
            return Some(true);
        }
        // Not served there (a forked child's copy of its parent's range, which the child may
        // have mapped again): another range may hold the address.
    }
    None
}
