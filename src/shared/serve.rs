//! Serving a fault on a shared chunk in this process: rebuild it if nobody has, wait if another
//! process is rebuilding or punching it, wake this process's faulting threads when it is there.
//!
//! A fill in one process installs pages into the file, so every process sees them at once; but
//! the kernel wakes only the filler's own waiters. A process whose thread faulted on a chunk that
//! another process was filling keeps the fault pending and, once the chunk is present, wakes its
//! thread with `UFFDIO_WAKE` (the thread retries and finds the page). The states are in
//! `state.rs`.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use super::file::File;
use super::procs;
use super::state::{self, ABSENT, FAILED, FILLING, PRESENT};
use crate::hook::{self, Step};
use crate::region::RegenError;
use crate::sys::shm;
use crate::sys::uffd::{FillOp, Uffd};

/// The cache's one regenerate function: key, offset in the entry, the bytes to write there.
pub type Regen = dyn Fn(u64, usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync;

/// What this process holds of an open shared cache.
pub struct Core {
    pub file: File,
    /// This process's slot.
    pub me: usize,
    pub uffd: Uffd,
    pub regen: Box<Regen>,
    /// The message of each failure this process saw, by key.
    pub errors: Mutex<HashMap<u64, String>>,
    /// Chunks whose callback runs in this process now → the thread running it (a fault from
    /// that thread on that chunk is a callback reading its own output).
    pub filling: Mutex<HashMap<usize, u32>>,
}

/// What serving a chunk came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The chunk is present or failed (zeros in place), and this process's waiters are woken.
    /// `filled`: this call ran the callback.
    Served { filled: bool },
    /// Another live process (or another thread here) is filling or punching it: try again later.
    Busy,
}

/// What a look at a faulted chunk came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This process now fills it: call [`fill`].
    Claimed,
    /// It is present or failed (zeros in place) and this process's waiters are woken.
    Served,
    /// Another live process, or another thread here, fills or punches it: try again later.
    Busy,
}

/// Claims chunk `c` for filling if it is absent; otherwise serves what needs no callback.
pub fn claim(core: &Core, c: usize, scratch: &mut [u8]) -> Claim {
    let f = &core.file;
    let w = &f.chunk_word(c).state;
    loop {
        let st = w.load(Ordering::Acquire);
        match st {
            PRESENT => {
                core.uffd.wake(f.chunk_addr(c), f.chunk);
                return Claim::Served;
            }
            FAILED => {
                zeros(core, c, scratch);
                core.uffd.wake(f.chunk_addr(c), f.chunk);
                return Claim::Served;
            }
            ABSENT => {
                if state::claim(w, core.me) {
                    return Claim::Claimed;
                }
            }
            _ => {
                let s = state::owner(st).unwrap_or(core.me);
                if s != core.me && !procs::alive(f, s) {
                    procs::abandon(f, c, s);
                    continue;
                }
                return Claim::Busy;
            }
        }
    }
}

/// Serves a fault on chunk `c` in the calling thread. `scratch` holds at least one chunk.
pub fn serve(core: &Core, c: usize, scratch: &mut [u8]) -> Outcome {
    match claim(core, c, scratch) {
        Claim::Claimed => {
            fill(core, c, scratch);
            Outcome::Served { filled: true }
        }
        Claim::Served => Outcome::Served { filled: false },
        Claim::Busy => Outcome::Busy,
    }
}

/// The thread of this process running the callback for chunk `c`, if any.
pub fn filler_of(core: &Core, c: usize) -> Option<u32> {
    core.filling
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&c)
        .copied()
}

/// Installs zero pages over the missing pages of chunk `c`, without waking.
fn zeros(core: &Core, c: usize, scratch: &mut [u8]) {
    let f = &core.file;
    scratch[..f.chunk].fill(0);
    // SAFETY: scratch is readable for a chunk; the chunk lies in the registered data mapping.
    let _ = unsafe {
        core.uffd
            .fill_all(FillOp::Copy(scratch.as_ptr()), f.chunk_addr(c), f.chunk)
    };
}

/// Rebuilds chunk `c`, which this process claimed (filling), and wakes every waiter. If the
/// claim was taken away meanwhile (this process was taken for dead after closing), the pages
/// it installed are right and the state is left to whoever took it.
pub fn fill(core: &Core, c: usize, scratch: &mut [u8]) {
    let tid = crate::sys::os::gettid();
    let reg = |on: bool| {
        let mut m = core.filling.lock().unwrap_or_else(|p| p.into_inner());
        if on {
            m.insert(c, tid);
        } else {
            m.remove(&c);
        }
    };
    reg(true);
    fill_claimed(core, c, scratch);
    reg(false);
}

fn fill_claimed(core: &Core, c: usize, scratch: &mut [u8]) {
    let f = &core.file;
    let h = f.header();
    let word = f.chunk_word(c);
    let owner = word.owner.load(Ordering::Acquire) as usize;
    let addr = f.chunk_addr(c);
    let mine = FILLING | core.me as u32;
    if owner == 0 {
        // No entry's span holds it: a stray read past every entry. Zeros, and the chunk stays
        // absent (the insert that hands the span out punches them).
        zeros(core, c, scratch);
        let _ = word
            .state
            .compare_exchange(mine, ABSENT, Ordering::AcqRel, Ordering::Acquire);
    } else {
        let r = f.record(owner - 1);
        let key = r.key.load(Ordering::Relaxed);
        let off = c * f.chunk - r.offset.load(Ordering::Relaxed) as usize;
        let n = (r.len.load(Ordering::Relaxed) as usize - off).min(f.chunk);
        scratch[n..f.chunk].fill(0);
        hook::step(Step::SharedFillClaimed, addr);
        let called = catch_unwind(AssertUnwindSafe(|| {
            (core.regen)(key, off, &mut scratch[..n])
        }));
        let failure = match called {
            Ok(Ok(())) => {
                // SAFETY: scratch is readable for a chunk; the chunk lies in the registered data.
                match unsafe {
                    core.uffd
                        .fill_all(FillOp::Copy(scratch.as_ptr()), addr, f.chunk)
                } {
                    Ok(_) => None,
                    Err((_, errno)) => Some(format!(
                        "installing the rebuilt bytes failed (UFFDIO_COPY: errno {errno})"
                    )),
                }
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("the regenerate callback panicked".to_string()),
        };
        match failure {
            None => {
                // Counted before it shows, so a count may run one ahead, never behind.
                h.present.fetch_add(1, Ordering::AcqRel);
                h.fills.fetch_add(1, Ordering::Relaxed);
                r.fills.fetch_add(1, Ordering::Relaxed);
                if !state::end_fill(&word.state, core.me, true) {
                    h.present.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Some(msg) => {
                let msg = format!("chunk at offset {off} of key {key}: {msg}");
                core.errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, msg);
                // Marked failing before any zero is installed: a reader of the zeros sees it.
                if state::mark_failing(&word.state, core.me) {
                    h.failures.fetch_add(1, Ordering::Relaxed);
                    zeros(core, c, scratch);
                    state::end_fill(&word.state, core.me, false);
                }
            }
        }
    }
    shm::futex_wake(&word.state);
    core.uffd.wake(addr, f.chunk);
}
