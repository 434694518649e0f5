//! The SIGBUS handler's scratch buffers: a pool made in advance (the handler maps nothing), and
//! a stack buffer for a nested frame when every pooled buffer is taken.
//!
//! Pooled buffers are sized (outside the handler, by `grow`) to the largest fill chunk of the
//! SIGBUS-mode caches made: `FillChunk::Entry` counts as `ENTRY_SCRATCH`. A chunk larger than the
//! buffer at hand is regenerated in pieces of the buffer's size (`fault::serve` with a scratch
//! that cannot grow), so every size works; the callback then sees page-aligned parts of the
//! chunk. A thread not yet inside the handler waits for a pooled buffer (the frames holding them
//! finish without waiting for it); a nested frame never waits: if the pool is empty it uses
//! `STACK_SCRATCH` bytes of its stack. After each use a buffer is advised MADV_FREE: it holds a
//! copy of the bytes just installed, which must not stay in memory the kernel cannot take. A
//! one-page chunk is rebuilt into a page of the faulting thread's stack instead: no pool round
//! trip, no advice (about 2 µs a fault here); the stack keeps at most that page's copy until
//! its next use, in memory the thread has anyway.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use crossbeam_queue::ArrayQueue;

use crate::config::FillChunk;
use crate::error::Error;
use crate::fault::{Scratch, Served};
use crate::sys::mem::{self, pages_for, PAGE};
use crate::sys::os;

/// Stack bytes a nested frame uses when every pooled buffer is taken.
const STACK_SCRATCH: usize = 16 * 1024;
/// Pooled buffer size for `FillChunk::Entry` (the entry's size is not known in advance).
const ENTRY_SCRATCH: usize = 64 << 20;
/// Smallest pooled buffer.
const MIN_SCRATCH: usize = 64 * 1024;

static POOL: OnceLock<Pool> = OnceLock::new();

/// Makes the pool (once), outside the handler.
pub(super) fn init() {
    POOL.get_or_init(|| Pool::new(pool_size()));
}

/// Outside the handler: grows the pooled buffers to hold chunks of `chunk`.
pub(super) fn grow(chunk: FillChunk) -> Result<(), Error> {
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
                os::yield_now();
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

/// Runs `serve` for a chunk of `chunk_len` bytes with a pooled buffer, or with one on the stack:
/// for a one-page chunk (a page of the faulting thread's stack, reused by its next calls, costs
/// no pool round trip and no MADV_FREE afterwards), or nested with the pool empty.
pub(super) fn with_scratch(
    nested: bool,
    chunk_len: usize,
    serve: impl FnOnce(&mut Scratch) -> Served,
) -> Served {
    if chunk_len <= PAGE {
        return on_stack_page(serve);
    }
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
    // The buffer holds a copy of the bytes just installed: keep it, but where the kernel may
    // take it (no swap: dirty scratch would otherwise be a second, unreclaimable copy).
    scratch.forget_contents();
    drop(scratch);
    pool.put(i);
    served
}

/// One page of stack for a one-page chunk, out of line like `on_stack`.
#[inline(never)]
fn on_stack_page(serve: impl FnOnce(&mut Scratch) -> Served) -> Served {
    #[repr(C, align(4096))]
    struct Page([u8; PAGE]);
    let mut buf = Page([0; PAGE]);
    // SAFETY: page-aligned, writable, and used by nobody else during the call.
    let mut scratch = unsafe { Scratch::fixed(buf.0.as_mut_ptr(), PAGE) };
    serve(&mut scratch)
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
