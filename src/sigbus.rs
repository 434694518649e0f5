//! SIGBUS mode: a userfaultfd opened with `UFFD_FEATURE_SIGBUS` makes a missing page raise SIGBUS
//! in the thread that touched it, and the process-wide handler here rebuilds the chunk on that
//! thread (`fill::serve` without allocation) and returns; the kernel retries the access. No thread
//! is started.
//!
//! ## What the handler may do
//! It runs inside whatever code was interrupted, so: no allocation, no freeing, no lock the
//! interrupted code could hold, no panic escaping, `errno` saved and restored, fatal paths write(2)
//! a message and abort. Everything it reads is made before it is installed and reached through
//! atomics (`OnceLock::get` is one acquire load): the arena (kept, like the handler, for the rest
//! of the process), the scratch pool, the failure reserves, the frame table. The address → region
//! lookup is the arena's lock-free slots under a hazard pointer, so entries can be removed while
//! handlers run. Under the poison policy a failed rebuild leaves the pages missing and passes this
//! SIGBUS on (`Served::Raise`) instead of poisoning them. A callback's boxed error (or panic payload) must not be dropped in the handler: it
//! is parked in `Reserves::leftovers` and dropped by the next `prepare`, and its text goes into a
//! `String` allocated in advance (`Reserves::texts`).
//!
//! ## Flags
//! - `SA_SIGINFO`: the handler needs `si_addr` (which page) and `si_code` (a missing page is
//!   `BUS_ADRERR`; a hardware memory error, `BUS_MCEERR_*`, or a signal sent with kill(2) is not
//!   ours and goes to the previous action).
//! - `SA_NODEFER`: a callback may read another SIGBUS-mode entry whose page is missing, raising
//!   SIGBUS inside this handler. The kernel kills a process that takes a fault signal while it is
//!   blocked, so SIGBUS must stay unblocked here; the frame table bounds the nesting instead.
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
//! ## Nesting
//! A nested fault runs the handler again on the same stack. The frame table records, per running
//! frame, the thread and the chunk it rebuilds: a fault on a chunk an outer frame of the same
//! thread is rebuilding would recurse forever, so it aborts with a message, as does nesting deeper
//! than `MAX_NESTING`. A thread not yet inside the handler waits for a pooled buffer (the frames
//! holding them finish without waiting for it); a nested frame never waits: if the pool is empty
//! it uses `STACK_SCRATCH` bytes of its stack, regenerating larger chunks in pieces. So no frame
//! waits on a frame that waits on it.
//!
//! ## Scratch sizes
//! Pooled buffers are sized (outside the handler, by `prepare`) to the largest fill chunk of the
//! SIGBUS-mode caches made: `FillChunk::Entry` counts as `ENTRY_SCRATCH`. A chunk larger than the
//! buffer at hand is regenerated in pieces of the buffer's size (`fill::serve` without
//! `may_allocate`), so every size works; the callback then sees page-aligned parts of the chunk.

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::fmt::{self, Write as _};
use std::mem::MaybeUninit;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};

use crossbeam_queue::ArrayQueue;
use libc::{c_int, siginfo_t};

use crate::arena::Arena;
use crate::config::FillChunk;
use crate::error::Error;
use crate::fill::{self, Failure, Scratch, Served};
use crate::sys::mem::{self, pages_for, UncheckedAdvice, PAGE};
use crate::sys::os;

/// Handler frames one thread may stack up (callbacks reading entries whose callbacks read...).
const MAX_NESTING: usize = 16;
/// Handler frames recorded at once, over all threads.
const FRAMES: usize = 256;
/// Stack bytes a nested frame uses when every pooled buffer is taken.
const STACK_SCRATCH: usize = 16 * 1024;
/// Pooled buffer size for `FillChunk::Entry` (the entry's size is not known in advance).
const ENTRY_SCRATCH: usize = 64 << 20;
/// Smallest pooled buffer.
const MIN_SCRATCH: usize = 64 * 1024;
/// Message buffers kept ready for `Region::last_error`, and the bytes of each.
const TEXTS: usize = 64;
const TEXT_CAP: usize = 512;
/// Failures (boxed errors, panic payloads, displaced texts) waiting to be dropped.
const LEFTOVERS: usize = 1024;

static ARENA: OnceLock<Arc<Arena>> = OnceLock::new();
static POOL: OnceLock<Pool> = OnceLock::new();
static RESERVES: OnceLock<Reserves> = OnceLock::new();
/// Whether the handler is installed; its lock also orders `start` calls.
static INSTALLED: Mutex<bool> = Mutex::new(false);

/// Makes what the handler reads, then installs it (once). Returns the arena the handler serves:
/// `arena`, or the one kept from an earlier call.
pub(crate) fn start(arena: Arc<Arena>) -> Result<Arc<Arena>, Error> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
    let arena = ARENA.get_or_init(|| arena).clone();
    POOL.get_or_init(|| Pool::new(pool_size()));
    RESERVES.get_or_init(|| Reserves {
        texts: ArrayQueue::new(TEXTS),
        leftovers: ArrayQueue::new(LEFTOVERS),
    });
    if !*installed {
        install()?;
        *installed = true;
    }
    Ok(arena)
}

/// Outside the handler, for each SIGBUS-mode cache made: drops parked failures, tops up the
/// message buffers, and grows the pooled buffers to `chunk`.
pub(crate) fn prepare(chunk: FillChunk) -> Result<(), Error> {
    if let Some(res) = RESERVES.get() {
        while let Some(l) = res.leftovers.pop() {
            drop(l);
        }
        while res.texts.len() < TEXTS {
            if res.texts.push(String::with_capacity(TEXT_CAP)).is_err() {
                break;
            }
        }
    }
    let want = match chunk {
        FillChunk::Page => PAGE,
        FillChunk::Bytes(n) => pages_for(n) * PAGE,
        FillChunk::Entry => ENTRY_SCRATCH,
    };
    POOL.get().map_or(Ok(()), |p| p.grow(want.max(MIN_SCRATCH)))
}

/// Pooled buffers: enough for the threads that usually fault at once; more wait briefly.
/// `LAZYFREE_SIGBUS_SCRATCH_BUFFERS` (1..=1024) sets the number.
fn pool_size() -> usize {
    if let Some(n) = std::env::var("LAZYFREE_SIGBUS_SCRATCH_BUFFERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| (1..=1024).contains(n))
    {
        return n;
    }
    let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
    (cpus * 4).clamp(16, 64)
}

// ---------------------------------------------------------------------------------------------
// Scratch pool

struct Buf {
    ptr: AtomicUsize,
    cap: AtomicUsize,
}

/// Scratch buffers, handed out by index through a lock-free queue. A buffer's fields change only
/// while its index is out of the queue, in `grow` (the queue's push/pop order those writes).
struct Pool {
    free: ArrayQueue<usize>,
    bufs: Box<[Buf]>,
    /// The size every buffer is grown to; held while growing.
    target: Mutex<usize>,
}

impl Pool {
    fn new(n: usize) -> Pool {
        let pool = Pool {
            free: ArrayQueue::new(n),
            bufs: (0..n)
                .map(|_| Buf {
                    ptr: AtomicUsize::new(0),
                    cap: AtomicUsize::new(0),
                })
                .collect(),
            target: Mutex::new(0),
        };
        for i in 0..n {
            let _ = pool.free.push(i);
        }
        pool
    }

    /// Outside the handler: raises the target to `want` and remaps the free buffers below it.
    /// Buffers in use now are remapped by a later call.
    fn grow(&self, want: usize) -> Result<(), Error> {
        let mut target = self.target.lock().unwrap_or_else(|p| p.into_inner());
        *target = (*target).max(want);
        let mut taken = Vec::with_capacity(self.bufs.len());
        while let Some(i) = self.free.pop() {
            taken.push(i);
        }
        let mut res = Ok(());
        for &i in &taken {
            let b = &self.bufs[i];
            let (old, old_cap) = (b.ptr.load(Ordering::Relaxed), b.cap.load(Ordering::Relaxed));
            if old_cap >= *target || res.is_err() {
                continue;
            }
            match mem::map_anon(*target) {
                Ok(p) => {
                    if old != 0 {
                        // SAFETY: our mapping; its index is out of the queue, so nobody uses it.
                        unsafe { mem::unmap(old as *mut u8, old_cap) };
                    }
                    b.ptr.store(p as usize, Ordering::Relaxed);
                    b.cap.store(*target, Ordering::Relaxed);
                }
                Err(e) => {
                    res = Err(Error::kernel(
                        "mmap of the SIGBUS handler's scratch buffers",
                        e,
                    ))
                }
            }
        }
        for i in taken {
            let _ = self.free.push(i);
        }
        res
    }

    /// A buffer index. A frame not nested waits for one: the frames holding them do not wait
    /// for it. A nested frame gets `None` when none is free.
    fn take(&self, nested: bool) -> Option<usize> {
        let mut tries = 0u32;
        loop {
            if let Some(i) = self.free.pop() {
                return Some(i);
            }
            if nested {
                return None;
            }
            tries += 1;
            if tries < 64 {
                // SAFETY: sched_yield has no preconditions (and is async-signal-safe).
                unsafe { libc::sched_yield() };
            } else {
                os::sleep_ms(1);
            }
        }
    }

    fn put(&self, i: usize) {
        // Cannot be full: there are exactly as many indices as slots.
        let _ = self.free.push(i);
    }
}

/// Runs `serve` with a pooled buffer, or (nested, pool empty) with one on the stack.
fn with_scratch(nested: bool, serve: impl FnOnce(&mut Scratch) -> Served) -> Served {
    let Some((pool, i)) = POOL.get().and_then(|p| p.take(nested).map(|i| (p, i))) else {
        return on_stack(serve);
    };
    let b = &pool.bufs[i];
    let (ptr, cap) = (b.ptr.load(Ordering::Relaxed), b.cap.load(Ordering::Relaxed));
    if cap < PAGE {
        // Never mapped (its mmap failed): do without it.
        pool.put(i);
        return on_stack(serve);
    }
    // SAFETY: buffer `i` was mapped page-aligned with `cap` bytes by `grow` and is ours until
    // we put its index back.
    let mut scratch = unsafe { Scratch::fixed(ptr as *mut u8, cap) };
    let served = serve(&mut scratch);
    drop(scratch);
    // The buffer holds a copy of the bytes just installed: keep it, but where the kernel may
    // take it (no swap: dirty scratch would otherwise be a second, unreclaimable copy).
    // SAFETY: scratch bytes mean nothing once served, and the buffer is still ours.
    let _ = unsafe { mem::advise_unchecked(ptr, cap, UncheckedAdvice::Free) };
    pool.put(i);
    served
}

/// The stack fallback, out of line so its buffer is only on the stack when used.
#[inline(never)]
fn on_stack(serve: impl FnOnce(&mut Scratch) -> Served) -> Served {
    #[repr(C, align(4096))]
    struct Pages([u8; STACK_SCRATCH]);
    let mut buf = Pages([0; STACK_SCRATCH]);
    // SAFETY: page-aligned, writable, and used by nobody else during the call.
    let mut scratch = unsafe { Scratch::fixed(buf.0.as_mut_ptr(), STACK_SCRATCH) };
    serve(&mut scratch)
}

// ---------------------------------------------------------------------------------------------
// Failures: nothing is formatted into new memory or dropped in the handler

/// What the handler must not drop.
enum Leftover {
    // The fields are only held, to be dropped outside the handler.
    Failure(#[allow(dead_code)] Failure),
    Text(#[allow(dead_code)] String),
}

struct Reserves {
    /// Empty `String`s of `TEXT_CAP` bytes for failure messages.
    texts: ArrayQueue<String>,
    leftovers: ArrayQueue<Leftover>,
}

impl Reserves {
    fn recycle(&self, text: String) {
        if text.capacity() >= TEXT_CAP {
            if let Err(t) = self.texts.push(text) {
                self.park(Leftover::Text(t));
            }
        } else {
            self.park(Leftover::Text(text));
        }
    }

    fn park(&self, l: Leftover) {
        if let Err(l) = self.leftovers.push(l) {
            // Full: leaking is the only way not to free memory here (documented on Mode::Sigbus).
            std::mem::forget(l);
        }
    }
}

/// Appends to a `String` only within its capacity (no reallocation), cutting at a char boundary.
struct Bounded<'a>(&'a mut String);

impl fmt::Write for Bounded<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.0.capacity() - self.0.len();
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.0.push_str(&s[..n]);
        if n < s.len() {
            Err(fmt::Error)
        } else {
            Ok(())
        }
    }
}

/// The no-allocation path's failure record (called from `fill::serve` in the handler): the
/// message goes into a reserved `String` in `slot`, the failure is parked to be dropped later.
pub(crate) fn keep_failure(slot: &Mutex<Option<String>>, failure: Failure) {
    let Some(res) = RESERVES.get() else {
        std::mem::forget(failure);
        return;
    };
    if let Some(mut text) = res.texts.pop() {
        text.clear();
        let _ = write!(Bounded(&mut text), "{failure}");
        let guard = match slot.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        match guard {
            Some(mut g) => {
                if let Some(old) = g.replace(text) {
                    res.recycle(old);
                }
            }
            None => res.recycle(text),
        }
    }
    res.park(Leftover::Failure(failure));
}

// ---------------------------------------------------------------------------------------------
// Frames: which thread rebuilds which chunk, for nesting checks

#[allow(clippy::declare_interior_mutable_const)] // the const only seeds the static arrays
const ZERO: AtomicUsize = AtomicUsize::new(0);
/// Thread id of the frame in each slot (0: free).
static FRAME_TID: [AtomicUsize; FRAMES] = [ZERO; FRAMES];
/// Start address of the chunk that frame rebuilds.
static FRAME_CHUNK: [AtomicUsize; FRAMES] = [ZERO; FRAMES];

struct Frame {
    slot: Option<usize>,
    /// Frames of this thread below this one.
    outer: usize,
}

impl Frame {
    /// Records that thread `tid` rebuilds `chunk`; aborts on self-recursion or nesting too deep.
    fn enter(tid: usize, chunk: usize) -> Frame {
        loop {
            let mut outer = 0;
            for (t, c) in FRAME_TID.iter().zip(FRAME_CHUNK.iter()) {
                // Only this thread writes slots holding its id, so these reads are exact.
                if t.load(Ordering::Acquire) == tid {
                    outer += 1;
                    if c.load(Ordering::Relaxed) == chunk {
                        fatal(SELF_READ);
                    }
                }
            }
            if outer >= MAX_NESTING {
                fatal(TOO_DEEP);
            }
            for (i, t) in FRAME_TID.iter().enumerate() {
                if t.load(Ordering::Relaxed) == 0
                    && t.compare_exchange(0, tid, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                {
                    FRAME_CHUNK[i].store(chunk, Ordering::Release);
                    return Frame {
                        slot: Some(i),
                        outer,
                    };
                }
            }
            if outer > 0 {
                // Table full: a nested frame must not wait; it goes on unrecorded.
                return Frame { slot: None, outer };
            }
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            FRAME_CHUNK[i].store(0, Ordering::Relaxed);
            FRAME_TID[i].store(0, Ordering::Release);
        }
    }
}

const SELF_READ: &str = "lazyfree: a regenerate callback of a SIGBUS-mode entry read the chunk it \
is rebuilding (it would call itself forever); aborting\n";
const TOO_DEEP: &str = "lazyfree: SIGBUS-mode regenerate callbacks nested more than 16 deep \
(callbacks reading entries whose callbacks read entries...); aborting\n";
const INTERNAL: &str = "lazyfree: internal error (a panic) in the SIGBUS handler; aborting\n";

/// Writes `msg` to stderr with write(2) and aborts.
fn fatal(msg: &str) -> ! {
    let mut rest = msg.as_bytes();
    while !rest.is_empty() {
        // SAFETY: writes from a valid buffer to fd 2.
        let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            // SAFETY: reading this thread's errno.
            if n < 0 && unsafe { *libc::__errno_location() } == libc::EINTR {
                continue;
            }
            break;
        }
        rest = &rest[n as usize..];
    }
    std::process::abort()
}

// ---------------------------------------------------------------------------------------------
// The handler

/// The action SIGBUS had before ours, which signals that are not ours go to. Written in
/// `install`, and again each time a chained handler replaced ours (see `restore_after_chain`):
/// each write goes to a fresh slot, published by `PREV_IDX`, so a handler running on another
/// thread never reads a slot being written.
struct Prev(UnsafeCell<MaybeUninit<libc::sigaction>>);
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
fn set_prev(act: &libc::sigaction) -> bool {
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
fn our_action(prev: &libc::sigaction) -> libc::sigaction {
    // SAFETY: all-zero is a valid sigaction; the fields are set below.
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(c_int, *mut siginfo_t, *mut c_void) = on_sigbus;
    new.sa_sigaction = handler as libc::sighandler_t;
    new.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | (prev.sa_flags & libc::SA_RESTART);
    // SAFETY: a valid sigset_t to clear: no other signal is blocked while the handler runs.
    unsafe { libc::sigemptyset(&mut new.sa_mask) };
    new
}

/// After a chained handler ran: if it replaced our action (Rust's std stack-overflow handler
/// "unregisters itself" with SIG_DFL on a SIGBUS that is not a stack overflow), its replacement
/// becomes the previous action and ours is installed again, so SIGBUS mode keeps working for
/// the life of the process while foreign signals still get what they would without lazyfree.
fn restore_after_chain() {
    // SAFETY: all-zero is a valid sigaction.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a query (null new action) into a valid out-pointer; async-signal-safe.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut cur) } != 0 {
        return;
    }
    let ours: extern "C" fn(c_int, *mut siginfo_t, *mut c_void) = on_sigbus;
    if cur.sa_sigaction == ours as libc::sighandler_t {
        return;
    }
    set_prev(&cur);
    let new = our_action(&cur);
    // SAFETY: a valid action; the handler is async-signal-safe.
    unsafe { libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) };
}

fn install() -> Result<(), Error> {
    // SAFETY: all-zero is a valid sigaction (SIG_DFL, empty mask, no flags).
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a query (null new action) into a valid out-pointer.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } != 0 {
        return Err(Error::kernel(
            "sigaction(SIGBUS)",
            std::io::Error::last_os_error(),
        ));
    }
    set_prev(&old);
    let new = our_action(&old);
    // SAFETY: a valid action; the handler is async-signal-safe (see the module docs).
    if unsafe { libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) } != 0 {
        return Err(Error::kernel(
            "sigaction(SIGBUS)",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

extern "C" fn on_sigbus(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    // SAFETY: __errno_location returns this thread's errno slot, valid for the thread's life.
    let errno = unsafe { libc::__errno_location() };
    // SAFETY: as above.
    let saved = unsafe { *errno };
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let serve = AssertUnwindSafe(|| unsafe { serve_if_ours(info) });
    let handled = match catch_unwind(serve) {
        Ok(handled) => handled,
        Err(payload) => {
            std::mem::forget(payload); // freeing it is not allowed here either
            fatal(INTERNAL)
        }
    };
    // SAFETY: as above. The previous handler, too, sees the errno the interrupted code had.
    unsafe { *errno = saved };
    if !handled {
        // SAFETY: forwarding the kernel's own arguments to the previous action.
        if unsafe { chain(sig, info, ctx) } {
            restore_after_chain();
        }
        // SAFETY: as above.
        unsafe { *errno = saved };
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
    let Some(arena) = ARENA.get() else {
        return false;
    };
    // SAFETY: for a fault, si_addr is the faulting address.
    let addr = unsafe { info.si_addr() } as usize;
    let Some(chunk) = fill::chunk_of(arena, addr) else {
        return false;
    };
    let frame = Frame::enter(os::gettid() as usize, chunk);
    let served = with_scratch(frame.outer > 0, |s| fill::serve(arena, addr, s, false));
    drop(frame);
    // No thread in this mode: faults give earlier fills their second advice.
    fill::readvise_due(arena, 2);
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
    let h = prev.sa_sigaction;
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        // SAFETY: forwarded from our caller.
        unsafe { default_action(sig, info, h == libc::SIG_IGN) };
        return false;
    }
    if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: with SA_SIGINFO the action holds a three-argument handler.
        let f: extern "C" fn(c_int, *mut siginfo_t, *mut c_void) =
            unsafe { std::mem::transmute(h) };
        f(sig, info, ctx)
    } else {
        // SAFETY: without SA_SIGINFO the action holds a one-argument handler.
        let f: extern "C" fn(c_int) = unsafe { std::mem::transmute(h) };
        f(sig)
    }
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
    // SAFETY: all-zero is SIG_DFL with no flags.
    let dfl: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a valid action.
    unsafe { libc::sigaction(sig, &dfl, std::ptr::null_mut()) };
    if sent {
        // Not blocked (SA_NODEFER): delivered, with the default action, before raise returns.
        // SAFETY: raise is async-signal-safe.
        unsafe { libc::raise(sig) };
    }
    // A fault: returning retries the access, which faults again under the default action.
}
