//! Serving a fault on a shared chunk in this process: rebuild it if nobody has, wait if another
//! process is rebuilding or punching it, wake this process's faulting threads when it is there.
//!
//! A fill in one process installs pages into the file, so every process sees them at once; but
//! the kernel wakes only the filler's own waiters. A process whose thread faulted on a chunk that
//! another process was filling keeps the fault pending and, once the chunk is present, wakes its
//! thread with `UFFDIO_WAKE` (the thread retries and finds the page). The states are in
//! `state.rs`.
//!
//! In SIGBUS mode the same code runs inside the signal handler (`Ctx::Handler`): nothing here
//! allocates, locks or formats there (a failure's message is not kept; the next pin, outside the
//! handler, retries and keeps its own), the callback fills a pooled buffer that may be smaller
//! than a chunk (then it is called for page-aligned pieces), and no purge runs.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::file::File;
use super::procs;
use super::state::{self, ABSENT, FAILED, FILLING, PRESENT};
use crate::hook::{self, Step};
use crate::region::RegenError;
use crate::sys::shm;
use crate::sys::uffd::{Fill, FillOp, Uffd};
use std::os::fd::AsRawFd;

/// The cache's one regenerate function: key, offset in the entry, the bytes to write there.
pub type Regen = dyn Fn(u64, usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync;

/// Where a fill runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ctx {
    /// A worker or a pinning thread: may allocate and lock.
    Thread,
    /// The SIGBUS handler.
    Handler,
}

/// What this process holds of an open shared cache.
pub struct Core {
    pub file: File,
    /// This process's slot.
    pub me: usize,
    /// This process's mark in state words (`procs::mark_of`).
    pub mark: u32,
    pub uffd: Uffd,
    pub regen: Box<Regen>,
    /// The message of each failure this process saw outside the handler, by key.
    pub errors: Mutex<HashMap<u64, String>>,
    /// The fills running in this process now (`Fillers`).
    pub fillers: Fillers,
    /// This process's id when it opened the cache (a forked child serves nothing).
    pub pid: u32,
    /// Frees at least a chunk of the file if it can (a purge of the least recently used
    /// unpinned chunk); returns the chunks freed. Called outside the handler when installing
    /// pages fails for want of memory (a hugetlbfs file whose huge page pool is used up).
    pub make_room: fn(&Core) -> usize,
}

impl Drop for Core {
    /// The last holder of this process's state releases its slot in the file (its pins and
    /// marks with it). A forked child's copy releases nothing: the slot is the parent's.
    fn drop(&mut self) {
        if crate::sys::os::pid() == self.pid {
            procs::release(&self.file, self.me);
        }
    }
}

/// The fills running in this process now, as (chunk, thread) words, lock-free (the SIGBUS
/// handler registers its fills too): a fault from that thread on that chunk is a callback
/// reading its own output. Past `FILLERS` fills at once a fill goes unrecorded, and such a
/// self-read would wait instead of aborting.
pub struct Fillers(Box<[AtomicU64]>);

const FILLERS: usize = 1024;

impl Fillers {
    pub fn new() -> Fillers {
        Fillers((0..FILLERS).map(|_| AtomicU64::new(0)).collect())
    }

    fn add(&self, c: usize, tid: u32) -> Option<usize> {
        let word = ((c as u64 + 1) << 32) | tid as u64;
        let first = tid as usize % FILLERS;
        (0..FILLERS).map(|k| (first + k) % FILLERS).find(|&i| {
            self.0[i]
                .compare_exchange(0, word, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    }

    fn remove(&self, i: usize) {
        self.0[i].store(0, Ordering::Release);
    }

    /// The thread of this process running the callback for chunk `c`, if recorded.
    pub fn of(&self, c: usize) -> Option<u32> {
        self.0.iter().find_map(|w| {
            let v = w.load(Ordering::Acquire);
            (v >> 32 == c as u64 + 1).then_some(v as u32)
        })
    }
}

impl Default for Fillers {
    fn default() -> Self {
        Fillers::new()
    }
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
/// `scratch` holds at least a page.
pub fn claim(core: &Core, c: usize, scratch: &mut [u8], ctx: Ctx) -> Claim {
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
                if !state::claim_failed(w, core.mark) {
                    continue;
                }
                let installed = zeros(core, c, scratch, ctx);
                state::end_fill(w, core.mark, false);
                shm::futex_wake(w);
                // Wake either way: a page another process installed meanwhile is found by the
                // retried access.
                core.uffd.wake(f.chunk_addr(c), f.chunk);
                if installed.is_err() {
                    // No memory for them now: the fault stays pending and is tried again a
                    // little later (the monitor, every millisecond; the handler sleeps first).
                    return Claim::Busy;
                }
                return Claim::Served;
            }
            ABSENT => {
                if state::claim(w, core.mark) {
                    return Claim::Claimed;
                }
            }
            _ => {
                let s = state::owner(st).unwrap_or(core.mark);
                if s != core.mark && !procs::alive_mark(f, s) {
                    procs::abandon(f, c, s);
                    continue;
                }
                return Claim::Busy;
            }
        }
    }
}

/// Serves a fault on chunk `c` in the calling thread (or handler). `scratch` holds at least a
/// page.
pub fn serve(core: &Core, c: usize, scratch: &mut [u8], ctx: Ctx) -> Outcome {
    match claim(core, c, scratch, ctx) {
        Claim::Claimed => {
            fill(core, c, scratch, ctx);
            Outcome::Served { filled: true }
        }
        Claim::Served => Outcome::Served { filled: false },
        Claim::Busy => Outcome::Busy,
    }
}

/// Installs zero pages over the missing pages of chunk `c`, without waking. `scratch` holds
/// at least a page (a multiple of pages).
fn zeros(core: &Core, c: usize, scratch: &mut [u8], ctx: Ctx) -> Result<(), i32> {
    let f = &core.file;
    let piece = (scratch.len().min(f.chunk) / f.page) * f.page;
    scratch[..piece].fill(0);
    let mut done = 0;
    while done < f.chunk {
        let n = piece.min(f.chunk - done);
        install(core, &scratch[..n], f.chunk_addr(c) + done, ctx)?;
        done += n;
    }
    Ok(())
}

/// Rebuilds chunk `c`, which this process claimed (filling), and wakes every waiter. If the
/// claim was taken away meanwhile (this process was taken for dead after closing), the pages
/// it installed are right and the state is left to whoever took it. `scratch` holds at least
/// a page: a chunk larger than it is rebuilt in pieces of its size.
pub fn fill(core: &Core, c: usize, scratch: &mut [u8], ctx: Ctx) {
    let rec = core.fillers.add(c, crate::sys::os::gettid());
    fill_claimed(core, c, scratch, ctx);
    if let Some(i) = rec {
        core.fillers.remove(i);
    }
}

/// Installs `buf` at `dst`. Where memory runs out (a hugetlbfs pool used up), a thread makes
/// room by purging and tries again, up to 8 times; the handler does not purge.
fn install(core: &Core, buf: &[u8], dst: usize, ctx: Ctx) -> Result<(), i32> {
    let mut tries = 0;
    loop {
        let r = if core.file.page > crate::sys::mem::PAGE {
            install_huge(core, buf, dst)
        } else {
            // SAFETY: buf is readable for its length; the range lies in the registered data.
            unsafe {
                core.uffd
                    .fill_all(FillOp::Copy(buf.as_ptr()), dst, buf.len())
                    .map(|_| ())
                    .map_err(|(_, e)| e)
            }
        };
        match r {
            Ok(()) => return Ok(()),
            Err(libc::ENOMEM) if ctx == Ctx::Thread && tries < 8 => {
                tries += 1;
                if (core.make_room)(core) == 0 {
                    crate::sys::os::sleep_ms(10);
                }
            }
            Err(errno) => return Err(errno),
        }
    }
}

/// Installs `buf` at `dst` in a hugetlbfs file, a huge page at a time. The kernel answers
/// UFFDIO_COPY with EEXIST both for a page that is there and, when the huge page pool is used
/// up, for one it could not allocate (checked on 6.18). So a page reported present is checked:
/// mapped here (mincore), or its bytes in the file (pread) equal `buf`'s and are not all zero
/// (a hole reads as zeros). Otherwise ENOMEM.
fn install_huge(core: &Core, buf: &[u8], dst: usize) -> Result<(), i32> {
    let page = core.file.page;
    for (k, part) in buf.chunks(page).enumerate() {
        let at = dst + k * page;
        // SAFETY: part is readable for a huge page; the page lies in the registered data.
        match unsafe { core.uffd.copy_paged(at, part.as_ptr(), page, page) } {
            Fill::Done { installed } if installed == page => {}
            Fill::Done { .. } => {
                if !huge_page_there(core, at, part) {
                    return Err(libc::ENOMEM);
                }
            }
            Fill::Retry { .. } => return Err(libc::EAGAIN),
            Fill::Failed { errno, .. } => return Err(errno),
        }
    }
    Ok(())
}

/// Whether the huge page at `at` (this process's address) is in the file with `bytes`. Zeros
/// (a failed chunk's, or bytes that are all zero) cannot be told from a hole by reading the
/// file: there only a page mapped here counts.
fn huge_page_there(core: &Core, at: usize, bytes: &[u8]) -> bool {
    let mut v = [0u8; 1];
    if crate::sys::mem::mincore(at, 1, &mut v).is_ok() && v[0] & 1 != 0 {
        return true;
    }
    if bytes.iter().all(|&b| b == 0) {
        return false;
    }
    let off = core.file.data_off + (at - core.file.data as usize);
    let mut got = vec![0u8; bytes.len()];
    shm::read_at(core.file.fd.as_raw_fd(), off, &mut got).is_ok() && got == bytes
}

/// Why a fill failed, without allocating (the handler formats nothing).
enum Failure {
    Callback(RegenError),
    Panicked,
    Install(i32),
}

fn fill_claimed(core: &Core, c: usize, scratch: &mut [u8], ctx: Ctx) {
    let f = &core.file;
    let h = f.header();
    let word = f.chunk_word(c);
    let owner = word.owner.load(Ordering::Acquire) as usize;
    let addr = f.chunk_addr(c);
    let mine = FILLING | core.mark;
    if owner == 0 {
        // No entry's span holds it: a stray read past every entry. Zeros, and the chunk stays
        // absent (the insert that hands the span out punches them).
        let _ = zeros(core, c, scratch, ctx);
        let _ = word
            .state
            .compare_exchange(mine, ABSENT, Ordering::AcqRel, Ordering::Acquire);
    } else {
        let r = f.record(owner - 1);
        let key = r.key.load(Ordering::Relaxed);
        let off = c * f.chunk - r.offset.load(Ordering::Relaxed) as usize;
        let len = r.len.load(Ordering::Relaxed) as usize;
        hook::step(Step::SharedFillClaimed, addr);
        let piece = (scratch.len().min(f.chunk) / f.page) * f.page;
        let mut failure = None;
        let mut done = 0;
        while done < f.chunk && failure.is_none() {
            let n = piece.min(f.chunk - done);
            let at = off + done;
            let bytes = len.saturating_sub(at).min(n);
            let buf = &mut scratch[..n];
            buf[bytes..].fill(0);
            let called = if bytes == 0 {
                Ok(Ok(()))
            } else {
                catch_unwind(AssertUnwindSafe(|| {
                    (core.regen)(key, at, &mut buf[..bytes])
                }))
            };
            failure = match called {
                Ok(Ok(())) => install(core, buf, addr + done, ctx)
                    .err()
                    .map(Failure::Install),
                Ok(Err(e)) => Some(Failure::Callback(e)),
                Err(_) => Some(Failure::Panicked),
            };
            done += n;
        }
        match failure {
            None => {
                // Counted before it shows, so a count may run one ahead, never behind.
                h.present.fetch_add(1, Ordering::AcqRel);
                h.fills.fetch_add(1, Ordering::Relaxed);
                r.fills.fetch_add(1, Ordering::Relaxed);
                if !state::end_fill(&word.state, core.mark, true) {
                    h.present.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Some(why) => {
                if ctx == Ctx::Thread {
                    let what = match why {
                        Failure::Callback(e) => e.to_string(),
                        Failure::Panicked => "the regenerate callback panicked".to_string(),
                        Failure::Install(errno) => format!(
                            "installing the rebuilt bytes failed (UFFDIO_COPY: errno {errno})"
                        ),
                    };
                    core.errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key, format!("chunk at offset {off} of key {key}: {what}"));
                } else {
                    // The error may own heap memory: freeing it is not allowed here.
                    std::mem::forget(why);
                }
                // Marked failing before any zero is installed: a reader of the zeros sees it.
                if state::mark_failing(&word.state, core.mark) {
                    h.failures.fetch_add(1, Ordering::Relaxed);
                    // Pages it could not install (no memory) stay missing: a later fault on
                    // the failed chunk installs them, or waits until it can.
                    let _ = zeros(core, c, scratch, ctx);
                    state::end_fill(&word.state, core.mark, false);
                }
            }
        }
    }
    shm::futex_wake(&word.state);
    core.uffd.wake(addr, f.chunk);
}
