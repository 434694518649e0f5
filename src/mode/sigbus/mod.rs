//! SIGBUS mode: a userfaultfd opened with `UFFD_FEATURE_SIGBUS` makes a missing page raise SIGBUS
//! in the thread that touched it, and the process-wide handler here rebuilds the chunk on that
//! thread (`fault::serve` with a fixed scratch buffer) and returns; the kernel retries the access.
//! No thread is started. What a callback may do there is written once, on
//! [`Mode::Sigbus`](crate::Mode::Sigbus).
//!
//! ## What the handler may do
//! It runs inside whatever code was interrupted, so: no allocation, no freeing, no lock the
//! interrupted code could hold, no panic escaping, `errno` saved and restored (and given to a
//! chained handler as the interrupted code had it), fatal paths write(2) a message and abort.
//! Everything it reads is made before it is installed and reached through atomics
//! (`OnceLock::get` is one acquire load): the arena and userfaultfd (kept, like the handler, for
//! the rest of the process), the scratch pool (`scratch.rs`), the failure reserves
//! (`reserves.rs`), the nesting depth (`frames.rs`). The address → region lookup is the arena's
//! lock-free slots under a hazard pointer, so entries can be removed while handlers run. Under
//! the poison policy a failed rebuild leaves the pages missing and passes this SIGBUS on
//! (`Served::Raise`) instead of poisoning them. A fault on a chunk another thread is rebuilding
//! waits in the handler until that rebuild ends, then retries the access.
//!
//! ## Flags
//! - `SA_SIGINFO`: the handler needs `si_addr` (which page) and `si_code` (a missing page is
//!   `BUS_ADRERR`; a hardware memory error, `BUS_MCEERR_*`, or a signal sent with kill(2) is not
//!   ours and goes to the previous action).
//! - `SA_NODEFER`: a callback may read another SIGBUS-mode entry whose page is missing, raising
//!   SIGBUS inside this handler. The kernel kills a process that takes a fault signal while it is
//!   blocked, so SIGBUS must stay unblocked here; the per-thread frame count bounds the
//!   nesting instead.
//! - `SA_RESTART` only if the previous action had it: it matters only for a SIGBUS sent with
//!   kill(2) to a thread inside a system call, which is chained, so that call behaves as before.
//! - Not `SA_ONSTACK`. Rust's std gives each of its threads a small alternate signal stack (a few
//!   pages) for its stack-overflow handler; the callback is arbitrary code with arbitrary locals
//!   and would overflow it (a 64 KiB array does). Installing a larger alternate stack instead
//!   would need a `sigaltstack` in every thread that may touch cache memory, including threads
//!   lazyfree never sees start, and would fight std, which unmaps its own at thread exit. Without
//!   `SA_ONSTACK` the handler runs on the stack the thread was using, below the interrupted frame:
//!   the callback gets the room the thread's own code has. The price: a SIGBUS taken with that
//!   stack almost exhausted cannot be delivered and the kernel turns it into SIGSEGV; and code
//!   already running on an alternate stack (inside another SA_ONSTACK handler) that reads cache
//!   memory gives the callback what is left of that stack.
//!
//! ## Chaining
//! A signal that is not ours goes to the action that was there before ours. If that handler
//! replaces itself (Rust's std "unregisters" its stack-overflow handler with SIG_DFL on a SIGBUS
//! that is not a stack overflow), its replacement becomes the previous action and ours is
//! installed again, so SIGBUS mode keeps working for the life of the process.
//!
//! ## Nesting
//! A nested fault runs the handler again on the same stack (`frames.rs`); a nested frame never
//! waits for a pooled buffer (`scratch.rs`). So no frame waits on a frame that waits on it. A
//! fault on the chunk the thread's own callback is rebuilding (a callback reading its own
//! output, in a handler frame or a pin) aborts with a message; a nested fault on a chunk an outer
//! frame only waits for (another thread rebuilds it; a signal handler run meanwhile reads it)
//! waits too.

pub(crate) mod foreign;
mod frames;
mod reserves;
mod scratch;

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::arena::Arena;
use crate::config::FillChunk;
use crate::error::Error;
use crate::fault::{self, readvise, Path, Served};
use crate::region::{Failure, Region};
use crate::sys::os;
use crate::sys::signal::{self, c_int, siginfo_t, Action};
use crate::sys::uffd::Uffd;
use frames::Frame;

static SERVED: OnceLock<(Arc<Arena>, Arc<Uffd>)> = OnceLock::new();
/// Whether the handler is installed; its lock also orders `start` calls.
static INSTALLED: Mutex<bool> = Mutex::new(false);

/// Makes what the handler reads, then installs it (once). Returns the arena and userfaultfd the
/// handler serves: these, or the ones kept from an earlier call.
pub(crate) fn start(arena: Arc<Arena>, uffd: Arc<Uffd>) -> Result<(Arc<Arena>, Arc<Uffd>), Error> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
    let served = SERVED.get_or_init(|| (arena, uffd)).clone();
    scratch::init();
    reserves::init();
    if !*installed {
        install()?;
        *installed = true;
    }
    Ok(served)
}

/// Installs the handler (once) for ranges served by `foreign` (a shared cache in SIGBUS mode),
/// and grows the pooled buffers to `chunk`.
pub(crate) fn start_foreign(chunk: usize) -> Result<(), Error> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
    scratch::init();
    reserves::init();
    if !*installed {
        install()?;
        *installed = true;
    }
    drop(installed);
    scratch::grow(FillChunk::Bytes(chunk))
}

/// Outside the handler, for each SIGBUS-mode cache made: drops parked failures, tops up the
/// message buffers, and grows the pooled buffers to `chunk`.
pub(crate) fn prepare(chunk: FillChunk) -> Result<(), Error> {
    reserves::refresh();
    scratch::grow(chunk)
}

/// How the handler serves faults: nothing is allocated or freed (a failure is kept in reserves),
/// and a fault on a chunk another thread fills waits here until that fill ends.
struct Handler;

impl Path for Handler {
    fn keep_failure(&self, r: &Region, f: Failure) {
        reserves::keep_failure(r, f);
    }

    fn busy(&self, r: &Region, c: usize) {
        let mut spins = 0;
        while r.chunks().is_filling(c) {
            crate::sync::backoff(&mut spins);
        }
    }
}

const INTERNAL: &str = "lazyfree: internal error (a panic) in the SIGBUS handler; aborting\n";

// ---------------------------------------------------------------------------------------------
// The previous action

/// The action SIGBUS had before ours, which signals that are not ours go to. Written in
/// `install`, and again each time a chained handler replaced ours (see `restore_after_chain`):
/// each write goes to a fresh slot, published by `PREV_IDX`, so a handler running on another
/// thread never reads a slot being written.
struct Prev(UnsafeCell<MaybeUninit<Action>>);
// SAFETY: each slot is written once, by the thread that took its index from PREV_NEXT, before
// PREV_IDX publishes it (release); afterwards only read (after an acquire load of PREV_IDX).
unsafe impl Sync for Prev {}
const PREV_SLOTS: usize = 16;
#[allow(clippy::declare_interior_mutable_const)] // the const only seeds the static array
const PREV_EMPTY: Prev = Prev(UnsafeCell::new(MaybeUninit::uninit()));
static PREV: [Prev; PREV_SLOTS] = [PREV_EMPTY; PREV_SLOTS];
/// The next free slot.
static PREV_NEXT: AtomicUsize = AtomicUsize::new(0);
/// One past the slot in force (0: none yet).
static PREV_IDX: AtomicUsize = AtomicUsize::new(0);

/// Records `act` as the previous action in a fresh slot; false if none is left.
fn set_prev(act: &Action) -> bool {
    let i = PREV_NEXT.fetch_add(1, Ordering::AcqRel);
    if i >= PREV_SLOTS {
        return false;
    }
    // SAFETY: slot `i` is ours alone (see `Prev`).
    unsafe { (*PREV[i].0.get()).write(*act) };
    PREV_IDX.fetch_max(i + 1, Ordering::AcqRel);
    true
}

/// Our action: SA_SIGINFO | SA_NODEFER (see the module docs), SA_RESTART as `prev` had it.
fn our_action(prev: &Action) -> Action {
    signal::info_action(
        on_sigbus,
        libc::SA_NODEFER | (prev.sa_flags & libc::SA_RESTART),
    )
}

/// After a chained handler ran: if it replaced our action, its replacement becomes the previous
/// action and ours is installed again (see "Chaining" in the module docs).
fn restore_after_chain() {
    let Ok(cur) = signal::current(libc::SIGBUS) else {
        return;
    };
    if signal::calls(&cur, on_sigbus) {
        return;
    }
    set_prev(&cur);
    let _ = signal::set(libc::SIGBUS, &our_action(&cur));
}

fn install() -> Result<(), Error> {
    let old = signal::current(libc::SIGBUS).map_err(|e| Error::kernel("sigaction(SIGBUS)", e))?;
    set_prev(&old);
    signal::set(libc::SIGBUS, &our_action(&old)).map_err(|e| Error::kernel("sigaction(SIGBUS)", e))
}

// ---------------------------------------------------------------------------------------------
// The handler

extern "C" fn on_sigbus(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    let saved = os::errno();
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let serve = AssertUnwindSafe(|| unsafe { serve_if_ours(info) });
    let handled = match catch_unwind(serve) {
        Ok(handled) => handled,
        Err(payload) => {
            std::mem::forget(payload); // freeing it is not allowed here either
            os::fatal(INTERNAL)
        }
    };
    // The previous handler, too, sees the errno the interrupted code had.
    os::set_errno(saved);
    if !handled {
        // SAFETY: forwarding the kernel's own arguments to the previous action.
        if unsafe { chain(sig, info, ctx) } {
            restore_after_chain();
        }
        os::set_errno(saved);
    }
}

/// Serves the fault if it is a missing page of ours; false to chain.
///
/// # Safety
/// `info` must be null or the siginfo the kernel passed.
unsafe fn serve_if_ours(info: *const siginfo_t) -> bool {
    if info.is_null() {
        return false;
    }
    // SAFETY: by the caller's contract.
    let info = unsafe { &*info };
    // A missing page under UFFD_FEATURE_SIGBUS is BUS_ADRERR. Memory errors (BUS_MCEERR_*) and
    // signals sent with kill(2) (si_code <= 0) are not ours. (Nothing in this arena is ever
    // poisoned with UFFDIO_POISON: that would fault with BUS_ADRERR too on kernels without
    // CONFIG_MEMORY_FAILURE, and look missing to mincore, so it would loop here.)
    if info.si_code != libc::BUS_ADRERR {
        return false;
    }
    // SAFETY: for a fault, si_addr is the faulting address.
    let addr = unsafe { info.si_addr() } as usize;
    let foreign = foreign::serve_at(addr, |serve, ctx, chunk| {
        let frame = Frame::enter();
        let served = scratch::with_scratch(frame.outer > 0, chunk, |s| {
            let len = s.capacity().min(chunk);
            match s.get(len) {
                Some(buf) => {
                    if serve(ctx, addr, buf) {
                        Served::Present
                    } else {
                        Served::Unowned
                    }
                }
                None => Served::Unowned,
            }
        });
        drop(frame);
        !matches!(served, Served::Unowned)
    });
    if let Some(served) = foreign {
        return served;
    }
    let Some((arena, uffd)) = SERVED.get() else {
        return false;
    };
    let Some((_, chunk_len)) = fault::chunk_of(arena, addr) else {
        return false;
    };
    // A forked child: the slabs are not mapped here (MADV_DONTFORK) and the fd is the
    // parent's, so a SIGBUS at one of their addresses is about memory the child mapped there
    // since: not ours, and no callback may run for it.
    if arena.forked() {
        return false;
    }
    // This thread's own callback (a pin's rebuild, or an outer handler frame's) reading the
    // chunk it rebuilds: that chunk is claimed by this very thread and would never be released.
    if crate::region::filling_chunk_here(addr) {
        frames::self_read();
    }
    let frame = Frame::enter();
    let served = scratch::with_scratch(frame.outer > 0, chunk_len, |s| {
        fault::serve(arena, uffd, addr, s, &Handler)
    });
    drop(frame);
    // No thread in this mode: faults give earlier fills their second advice.
    readvise::due(arena, 2, readvise::Runner::Program);
    // Unowned: the region went away under us, so the access is to freed memory; retrying would
    // fault forever. Raise: the poison policy wants this access to raise SIGBUS. Either way the
    // previous action gets the signal (every resource of this frame is released by now).
    !matches!(served, Served::Unowned | Served::Raise)
}

/// Hands a signal that is not ours to the previous action. Returns whether a handler ran (false:
/// the default action was applied, which for a fault re-arms SIG_DFL on purpose).
///
/// # Safety
/// The arguments must be the kernel's, from inside the SIGBUS handler.
unsafe fn chain(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) -> bool {
    let idx = PREV_IDX.load(Ordering::Acquire);
    if idx == 0 {
        // SAFETY: forwarded from our caller.
        unsafe { default_action(sig, info, false) };
        return false;
    }
    // SAFETY: slot idx-1 was written before PREV_IDX published it and is never written again.
    let prev = unsafe { (*PREV[idx - 1].0.get()).assume_init_ref() };
    if let Some(ignored) = signal::builtin(prev) {
        // SAFETY: forwarded from our caller.
        unsafe { default_action(sig, info, ignored) };
        return false;
    }
    // SAFETY: `prev` holds a handler; the arguments are the kernel's.
    unsafe { signal::call(prev, sig, info, ctx) };
    true
}

/// What the kernel does with no handler: a SIGBUS raised by a fault kills the process (with a
/// core dump where enabled) even when ignored; one sent with kill(2) kills under SIG_DFL and is
/// dropped under SIG_IGN.
///
/// # Safety
/// As for `chain`.
unsafe fn default_action(sig: c_int, info: *const siginfo_t, ignored: bool) {
    // SAFETY: info is null or the kernel's siginfo.
    let sent = info.is_null() || unsafe { (*info).si_code } <= 0;
    if sent && ignored {
        return;
    }
    let _ = signal::set(sig, &signal::default_action());
    if sent {
        // Not blocked (SA_NODEFER): delivered, with the default action, before raise returns.
        signal::raise(sig);
    }
    // A fault: returning retries the access, which faults again under the default action.
}
