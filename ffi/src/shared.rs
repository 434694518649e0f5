//! lf_shared_cache: one volatile cache in a file in shared memory (/dev/shm), opened by name
//! by many processes, each with its own handle and its own regenerate function
//! (`lazyfree::SharedCache`).

use std::borrow::Cow;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use lazyfree::{Pressure, RegenError, SharedCache, SharedConfig, SharedStats};

use crate::config::ModeArg;

use crate::cache::lf_ctx_free_fn;
use crate::callback::{disarm, CCallback, KeyedFn};
use crate::handle::{self, Boxed, Opaque};
use crate::status::{borrow, ffi, lf_status, required, this_fn, Fail};

/// A process's handle to a shared cache (lf_shared_cache_create(), lf_shared_cache_open()).
/// Thread-safe: every function taking it may be called from any number of threads at once,
/// except lf_shared_cache_free(), which must be the last use. The pointers to entry bytes it
/// gives are valid until then. Each process opens the cache itself: in a forked child the
/// inherited handle gives LF_FORKED_CHILD (see lf_shared_cache_open()).
pub struct lf_shared_cache {
    boxed: Boxed<SharedState>,
}

/// Fills `buf` (`len` bytes) with the bytes at `offset` of the entry under `key`; returns 0 on
/// success, non-zero on failure. The one regenerate function of a shared cache in this process
/// (lf_shared_cache_create(), lf_shared_cache_open()), called with the `ctx` given there.
///
/// `offset` is a multiple of the cache's chunk (lf_shared_config.chunk); `len` is the chunk, or
/// what is left of the entry for its last chunk (the rest of that chunk reads as zeros). `buf` is
/// this process's scratch memory, not the shared file: write all `len` bytes. Any process may
/// rebuild any chunk, so every process's function must write the same bytes for a key and
/// offset. Each chunk is rebuilt once across all processes, and again only after a purge or a
/// failure.
///
/// Where it runs: on a worker thread of this process's handle, when a thread of this process
/// touches a missing chunk (never on the touching thread, which waits); or on the thread calling
/// lf_shared_cache_pin(), inside it. In a process that opened the cache in LF_MODE_SIGBUS, on
/// the touching thread itself, inside lazyfree's SIGBUS handler (see LF_MODE_SIGBUS). Calls for different chunks and keys run at the same time on
/// different threads, so `ctx` must be safe to use from several threads at once.
///
/// A callback may read other entries of the cache (their missing chunks are rebuilt by other
/// workers), nested at any depth. It must not: read the chunk it is rebuilding (the process
/// aborts with a message: it would wait for itself forever); call lf_shared_cache_free() on the
/// handle it runs for; longjmp or throw out of the callback; or touch `buf` after returning.
///
/// A non-zero return marks the chunk failed in the file, for every process: it reads as zeros,
/// lf_shared_cache_is_failed() says so, and lf_shared_cache_pin() retries it (and fails with
/// LF_REGENERATE_FAILED if it fails again).
pub type lf_shared_regen_fn = Option<
    unsafe extern "C" fn(
        ctx: *mut c_void,
        key: u64,
        offset: usize,
        buf: *mut u8,
        len: usize,
    ) -> c_int,
>;

/// Sizes of a new shared cache (lf_shared_cache_create()). Get the defaults with
/// lf_shared_config_default(), then change fields: fields may be added at the end in later
/// versions. Every process that opens the cache uses the sizes it was made with.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct lf_shared_config {
    /// Bytes of entry data the cache can hold, a non-zero multiple of `chunk` up to 1 TiB and
    /// 2^22 chunks:
    /// address space in each process and a sparse file, not memory. Entries are never removed
    /// and their spans never reused: size it for every entry the cache will ever hold. Default
    /// 1 GiB.
    pub capacity: usize,
    /// The unit of rebuilding and purging, a power of two from 4096 (4 KiB) to 64 MiB. Each
    /// entry starts at a chunk boundary. Default 65536.
    pub chunk: usize,
    /// Entries the cache can hold, rounded up to a power of two (at most 2^20). Default 4096.
    pub entries: usize,
    /// Resident bytes above which the cache purges itself (down to 7/8 of it), in every
    /// process. 0: no budget (the default).
    pub budget: usize,
    /// How the creating process serves its faults: LF_MODE_MONITOR (the default) or
    /// LF_MODE_SIGBUS (each process chooses its own: lf_shared_cache_open_in()).
    pub mode: ModeArg,
    /// Put the file in the first hugetlbfs mount instead of /dev/shm (huge pages; the chunk is
    /// raised to a huge page; LF_MODE_MONITOR only). Default false.
    pub huge_pages: bool,
    /// Purge on memory pressure too: every process watches a PSI trigger (its cgroup's
    /// memory.pressure, or /proc/pressure/memory) and purges down to half of the resident bytes
    /// when tasks stalled on memory for `pressure_stall_us` within `pressure_window_us`
    /// (500 ms to 10 s; a multiple of 2 s for a process without CAP_SYS_RESOURCE). 0: none
    /// (the default).
    pub pressure_stall_us: u64,
    /// See `pressure_stall_us`.
    pub pressure_window_us: u64,
}

impl lf_shared_config {
    fn from_config(c: &SharedConfig) -> lf_shared_config {
        lf_shared_config {
            capacity: c.capacity,
            chunk: c.chunk,
            entries: c.entries,
            budget: c.budget.unwrap_or(0),
            mode: crate::config::mode_arg(c.mode),
            huge_pages: c.huge_pages,
            pressure_stall_us: c.pressure.map_or(0, |p| p.stall.as_micros() as u64),
            pressure_window_us: c.pressure.map_or(0, |p| p.window.as_micros() as u64),
        }
    }

    /// The Rust configuration; range checks are the cache's (`SharedCache::create`).
    fn to_config(self) -> Result<SharedConfig, Fail> {
        if self.entries.checked_next_power_of_two().is_none() {
            return Err(Fail::new(
                lf_status::LF_INVALID_CONFIG,
                format!(
                    "entries {} is too large: a shared cache holds at most 2^20 entries",
                    self.entries
                ),
            ));
        }
        let pressure =
            (self.pressure_window_us != 0 || self.pressure_stall_us != 0).then(|| Pressure {
                stall: Duration::from_micros(self.pressure_stall_us),
                window: Duration::from_micros(self.pressure_window_us),
            });
        Ok(SharedConfig {
            capacity: self.capacity,
            chunk: self.chunk,
            entries: self.entries,
            budget: (self.budget != 0).then_some(self.budget),
            mode: crate::config::mode_of(self.mode)?,
            huge_pages: self.huge_pages,
            pressure,
        })
    }
}

/// Counts kept in a shared cache's file, over all processes (lf_shared_cache_stats()).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct lf_shared_stats {
    /// Entries made.
    pub entries: u64,
    /// Bytes of the chunks resident now (rebuilt and not purged since).
    pub present_bytes: u64,
    /// Chunks rebuilt by a regenerate callback, in all processes.
    pub fills: u64,
    /// Chunks whose callback failed.
    pub failures: u64,
    /// Chunks purged.
    pub purged_chunks: u64,
    /// Purges run.
    pub purges: u64,
    /// Memory pressure events (PSI triggers, lf_shared_config.pressure_stall_us) that led to a
    /// purge.
    pub pressure_purges: u64,
    /// The byte budget (the capacity when the cache was made without one; SIZE_MAX after
    /// lf_shared_cache_set_budget() with 0).
    pub budget: u64,
    /// Processes with the cache open now.
    pub processes: u32,
}

impl lf_shared_stats {
    /// The C view of the counts. As for lf_stats: the pattern names every field of SharedStats
    /// it carries, so one removed or renamed there stops this compiling; one added there is
    /// caught by the test `lf_shared_stats_has_every_shared_stats_field`.
    fn from_stats(s: SharedStats) -> lf_shared_stats {
        let SharedStats {
            entries,
            present_bytes,
            fills,
            failures,
            purged_chunks,
            purges,
            pressure_purges,
            budget,
            processes,
            ..
        } = s;
        lf_shared_stats {
            entries,
            present_bytes,
            fills,
            failures,
            purged_chunks,
            purges,
            pressure_purges,
            budget,
            processes,
        }
    }
}

/// The Rust cache, this handle's C callback, and the process that opened it.
pub(crate) struct SharedState {
    /// None only while dropping.
    cache: Option<SharedCache>,
    /// The C callback. The cache's function holds a clone; this one goes last, in the drop,
    /// after the cache's function is gone, so that ctx_free runs in lf_shared_cache_free().
    /// None only while dropping.
    cb: Option<Arc<CCallback<KeyedFn>>>,
    /// Disconnected when the cache's function is dropped: when the last of this handle's
    /// threads (monitor, workers) is gone. Read only by the drop (the Mutex makes the state
    /// Sync: C uses a handle from many threads at once).
    gone: Mutex<Receiver<()>>,
    /// The process that opened the cache.
    pid: u32,
}

/// The Rust regenerate function given to the cache: calls the C one; its drop disconnects
/// `SharedState::gone`.
struct Held {
    cb: Arc<CCallback<KeyedFn>>,
    _gone: Sender<()>,
}

impl Held {
    fn call(&self, key: u64, offset: usize, buf: &mut [u8]) -> Result<(), RegenError> {
        self.cb.call(key, offset, buf)
    }
}

/// What `SharedState::start` hands `SharedCache::create` or `open`.
type RustRegen = Box<dyn Fn(u64, usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync>;

impl SharedState {
    /// Makes or opens a cache with `make`, given the Rust function calling the C one. On
    /// failure nothing is kept: ctx_free is not called and the caller still owns ctx.
    fn start(
        regen: KeyedFn,
        ctx: *mut c_void,
        ctx_free: lf_ctx_free_fn,
        make: impl FnOnce(RustRegen) -> Result<SharedCache, lazyfree::Error>,
    ) -> Result<SharedState, Fail> {
        let cb = CCallback::<KeyedFn>::new(regen, ctx, ctx_free);
        let (tx, gone) = channel();
        let held = Held {
            cb: cb.clone(),
            _gone: tx,
        };
        match make(Box::new(move |key, offset, buf: &mut [u8]| {
            held.call(key, offset, buf)
        })) {
            Ok(cache) => Ok(SharedState {
                cache: Some(cache),
                cb: Some(cb),
                gone: Mutex::new(gone),
                pid: std::process::id(),
            }),
            Err(e) => {
                // The function went with the failed call: the caller keeps ctx.
                disarm(cb);
                Err(e.into())
            }
        }
    }

    /// The cache, or LF_FORKED_CHILD in a process forked from the one that opened it.
    fn cache(&self) -> Result<&SharedCache, Fail> {
        if std::process::id() != self.pid {
            return Err(Fail::new(
                lf_status::LF_FORKED_CHILD,
                "this handle belongs to the process that opened the shared cache: in a forked \
                 child its memory is not mapped and its threads and userfaultfd are the \
                 parent's. To use the cache in the child, exec a program there that opens it by \
                 name with lf_shared_cache_open()",
            ));
        }
        Ok(self
            .cache
            .as_ref()
            .expect("the cache is taken out only by the drop"))
    }
}

impl Drop for SharedState {
    fn drop(&mut self) {
        if std::process::id() != self.pid {
            // A forked child's copy: the cache's threads, slot and pins are the parent's (the
            // Rust drop leaves them alone), and ctx is the parent's to free.
            drop(self.cache.take());
            std::mem::forget(self.cb.take());
            return;
        }
        // Stops the monitor and releases this process's slot; the workers end once their queue
        // is gone (one in a callback when it returns), the last one dropping the function.
        drop(self.cache.take());
        let _ = self
            .gone
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .recv();
        // The last reference now: ctx_free runs here, on the thread freeing the handle.
        drop(self.cb.take());
    }
}

// Every function but lf_shared_cache_free() may use a handle from many threads at once.
const _: fn() = || {
    fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<SharedState>();
};

impl Opaque for lf_shared_cache {
    type Value = SharedState;
    const NAME: &'static str = "lf_shared_cache";
    const MAGIC: u64 = 0x6c66_7368_6172_6564; // "lfshared"
    fn wrap(boxed: Boxed<SharedState>) -> Self {
        lf_shared_cache { boxed }
    }
    fn boxed(&self) -> &Boxed<SharedState> {
        &self.boxed
    }
    fn boxed_mut(&mut self) -> &mut Boxed<SharedState> {
        &mut self.boxed
    }
}

/// A cache name as Rust reads it: bytes that are not UTF-8 become U+FFFD, which the cache
/// refuses like any other character outside its set.
///
/// # Safety
/// `name` points to a NUL-terminated string, unchanged during the call.
unsafe fn name_arg<'a>(name: *const c_char) -> Cow<'a, str> {
    // SAFETY: by the caller's contract.
    unsafe { CStr::from_ptr(name) }.to_string_lossy()
}

/// Writes the default sizes of a shared cache to `*out` (capacity 1 GiB, chunk 64 KiB, 4096
/// entries, no budget).
///
/// # Safety
/// `out` is NULL (LF_NULL_ARGUMENT) or points to writable memory for one lf_shared_config.
#[no_mangle]
pub unsafe extern "C" fn lf_shared_config_default(out: *mut lf_shared_config) -> lf_status {
    ffi!({
        required!(out)?;
        let c = lf_shared_config::from_config(&SharedConfig::default());
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(c) };
        Ok(())
    })
}

/// Makes a new shared cache named `name` with the sizes in `config` (NULL: the defaults), opens
/// it in this process and writes the handle to `*out`. The name is 1 to 200 of
/// `A-Z a-z 0-9 . _ -`, not starting with '.'; the file is /dev/shm/lazyfree.<name> and stays
/// until lf_shared_cache_remove(), after every process has closed it too.
///
/// `regen` rebuilds the entries' bytes in this process (see lf_shared_regen_fn for where it
/// runs and what it may do); every process that opens the cache passes one that writes the same
/// bytes. `ctx` is passed to every `regen` call. On success the handle owns it: `ctx_free(ctx)`
/// (if `ctx_free` is not NULL) is called exactly once, inside lf_shared_cache_free(), on its
/// thread, after the last callback of this handle has returned. On failure nothing is kept:
/// ctx_free is not called and the caller still owns ctx.
///
/// Fails with LF_NULL_ARGUMENT (`name`, `regen` or `out` NULL), LF_INVALID_CONFIG (a bad name
/// or size: the message says which), LF_SHARED_EXISTS (the name is taken),
/// LF_USERFAULTFD_UNAVAILABLE, LF_KERNEL_ERROR (also where the kernel lacks userfaultfd on
/// shared memory, Linux 4.11), LF_UNSUPPORTED (a page size other than 4 KiB).
///
/// Each process serves its faults with a monitor thread and worker threads, as LF_MODE_MONITOR
/// does (lf_config does not apply): reading an entry's bytes through the pointer
/// lf_shared_cache_insert() or lf_shared_cache_get() gives rebuilds missing chunks as they are
/// touched.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string; `config` is NULL or points to an initialised
/// lf_shared_config; `out` is NULL or points to writable memory for one pointer; `regen`, `ctx`
/// and `ctx_free` follow the rules of lf_shared_regen_fn.
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_create(
    name: *const c_char,
    config: *const lf_shared_config,
    regen: lf_shared_regen_fn,
    ctx: *mut c_void,
    ctx_free: lf_ctx_free_fn,
    out: *mut *mut lf_shared_cache,
) -> lf_status {
    ffi!({
        // SAFETY: non-NULL, and NUL-terminated by the caller's contract.
        let name = unsafe { name_arg(required!(name)?) };
        let regen = required!(regen)?;
        required!(out)?;
        let config = if config.is_null() {
            SharedConfig::default()
        } else {
            // SAFETY: non-NULL and initialised by the caller's contract; every bit pattern of
            // its fields is valid.
            unsafe { config.read() }.to_config()?
        };
        let state = SharedState::start(regen, ctx, ctx_free, |f| {
            SharedCache::create(&name, &config, f)
        })?;
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(handle::into_handle::<lf_shared_cache>(state)) };
        Ok(())
    })
}

/// Opens the shared cache named `name`, made by lf_shared_cache_create() in this or another
/// process, and writes the handle to `*out`; `regen`, `ctx` and `ctx_free` as for
/// lf_shared_cache_create(). Up to 63 processes have a cache open at once.
///
/// In a process forked from one that has the cache open, the inherited handle gives
/// LF_FORKED_CHILD: a child that is to use the cache execs a program that calls this (before
/// exec, a forked child of a process with threads may only make async-signal-safe calls).
///
/// Fails with LF_NULL_ARGUMENT, LF_INVALID_CONFIG (a bad name), LF_SHARED_NOT_FOUND (no cache
/// of that name), LF_BAD_SHARED_FILE (a file of another version, size or kind: the message says
/// which), LF_SHARED_TOO_MANY_PROCESSES, LF_USERFAULTFD_UNAVAILABLE, LF_KERNEL_ERROR,
/// LF_UNSUPPORTED.
///
/// # Safety
/// As lf_shared_cache_create().
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_open(
    name: *const c_char,
    regen: lf_shared_regen_fn,
    ctx: *mut c_void,
    ctx_free: lf_ctx_free_fn,
    out: *mut *mut lf_shared_cache,
) -> lf_status {
    ffi!({
        // SAFETY: non-NULL, and NUL-terminated by the caller's contract.
        let name = unsafe { name_arg(required!(name)?) };
        let regen = required!(regen)?;
        required!(out)?;
        let state = SharedState::start(regen, ctx, ctx_free, |f| SharedCache::open(&name, f))?;
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(handle::into_handle::<lf_shared_cache>(state)) };
        Ok(())
    })
}

/// Makes a new shared cache without a name (a memfd) and writes the handle to `*out`; `config`
/// (NULL: defaults), `regen`, `ctx` and `ctx_free` as for lf_shared_cache_create(). Other
/// processes get it by fd: lf_shared_cache_fd() here, lf_shared_cache_open_fd() there (an fd
/// inherited over exec, or passed over a Unix socket with SCM_RIGHTS). Its memory goes with the
/// last process that has it open. LF_INVALID_CONFIG with huge_pages (they need a named cache).
///
/// # Safety
/// As for lf_shared_cache_create(), without the name.
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_create_anonymous(
    config: *const lf_shared_config,
    regen: lf_shared_regen_fn,
    ctx: *mut c_void,
    ctx_free: lf_ctx_free_fn,
    out: *mut *mut lf_shared_cache,
) -> lf_status {
    ffi!({
        let regen = required!(regen)?;
        required!(out)?;
        let config = if config.is_null() {
            SharedConfig::default()
        } else {
            // SAFETY: non-NULL and initialised by the caller's contract; every bit pattern of
            // its fields is valid.
            unsafe { config.read() }.to_config()?
        };
        let state = SharedState::start(regen, ctx, ctx_free, |f| {
            SharedCache::create_anonymous(&config, f)
        })?;
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(handle::into_handle::<lf_shared_cache>(state)) };
        Ok(())
    })
}

/// Writes the cache's file descriptor to `*out`, to hand to another process (which calls
/// lf_shared_cache_open_fd()). It stays the handle's: do not close it. It is close-on-exec: give
/// a child a copy without the flag (dup2 after fork).
///
/// # Safety
/// `cache` is NULL or a live handle; `out` is NULL or writable for one int.
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_fd(
    cache: *const lf_shared_cache,
    out: *mut c_int,
) -> lf_status {
    ffi!({
        let cache = borrow!(cache)?.cache()?;
        required!(out)?;
        use std::os::fd::AsRawFd;
        let fd = cache.fd().as_raw_fd();
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(fd) };
        Ok(())
    })
}

/// Opens the shared cache whose file is `fd` (from lf_shared_cache_fd() in another process;
/// the handle keeps its own copy, so the caller may close `fd`), serving its faults in `mode`;
/// `regen`, `ctx` and `ctx_free` as for lf_shared_cache_open(). The same checks as
/// lf_shared_cache_open() (LF_BAD_SHARED_FILE for a file that is not a cache of this version).
///
/// # Safety
/// As for lf_shared_cache_open(); `fd` is an open file descriptor of this process.
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_open_fd(
    fd: c_int,
    mode: ModeArg,
    regen: lf_shared_regen_fn,
    ctx: *mut c_void,
    ctx_free: lf_ctx_free_fn,
    out: *mut *mut lf_shared_cache,
) -> lf_status {
    ffi!({
        let regen = required!(regen)?;
        required!(out)?;
        let mode = crate::config::mode_of(mode)?;
        if fd < 0 {
            return Err(Fail::new(
                lf_status::LF_INVALID_CONFIG,
                format!("fd {fd} is not a file descriptor"),
            ));
        }
        // SAFETY: the caller's contract: `fd` is open for the call (open_fd takes its own copy).
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let state = SharedState::start(regen, ctx, ctx_free, |f| {
            SharedCache::open_fd(borrowed, mode, f)
        })?;
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(handle::into_handle::<lf_shared_cache>(state)) };
        Ok(())
    })
}

/// lf_shared_cache_open() with this process serving the cache's faults in `mode`:
/// LF_MODE_MONITOR (a thread and workers) or LF_MODE_SIGBUS (the faulting thread, in lazyfree's
/// SIGBUS handler; see LF_MODE_SIGBUS for what the callback may do there). Processes of both
/// modes share one cache. LF_INVALID_CONFIG for another mode, or LF_MODE_SIGBUS on a cache made
/// with huge pages.
///
/// # Safety
/// As for lf_shared_cache_open().
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_open_in(
    name: *const c_char,
    mode: ModeArg,
    regen: lf_shared_regen_fn,
    ctx: *mut c_void,
    ctx_free: lf_ctx_free_fn,
    out: *mut *mut lf_shared_cache,
) -> lf_status {
    ffi!({
        // SAFETY: non-NULL, and NUL-terminated by the caller's contract.
        let name = unsafe { name_arg(required!(name)?) };
        let regen = required!(regen)?;
        required!(out)?;
        let mode = crate::config::mode_of(mode)?;
        let state = SharedState::start(regen, ctx, ctx_free, |f| {
            SharedCache::open_in(&name, mode, f)
        })?;
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(handle::into_handle::<lf_shared_cache>(state)) };
        Ok(())
    })
}

/// Closes this process's handle. NULL is a no-op. Stops its threads, waiting for callbacks in
/// flight to return; ends its pins; then calls ctx_free, on this thread. The cache and its
/// entries stay for the other processes (and for a later lf_shared_cache_open()): entries are
/// removed only with the cache, by lf_shared_cache_remove().
///
/// In a forked child it frees the child's copy of the handle only: the parent's threads, pins
/// and ctx are left alone and no ctx_free is called.
///
/// # Safety
/// `cache` is NULL or a handle from lf_shared_cache_create() or lf_shared_cache_open() not freed
/// before, and no other thread uses it (or a pointer it gave) during or after this call, and no
/// callback of it calls this. Freeing twice is undefined behaviour (debug builds abort).
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_free(cache: *mut lf_shared_cache) {
    ffi!({
        // SAFETY: by the caller's contract.
        unsafe { handle::release(this_fn!(), cache, |_| ()) };
        Ok(())
    })
}

/// Removes the name of a shared cache: nobody can open it any more, processes that have it open
/// keep using it, and its memory is freed when the last of them closes it. Fails with
/// LF_NULL_ARGUMENT, LF_INVALID_CONFIG (a bad name), LF_SHARED_NOT_FOUND.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_remove(name: *const c_char) -> lf_status {
    ffi!({
        // SAFETY: non-NULL, and NUL-terminated by the caller's contract.
        let name = unsafe { name_arg(required!(name)?) };
        SharedCache::remove(&name)?;
        Ok(())
    })
}

/// Makes the entry of `key` with `len` bytes if no process has (nothing is rebuilt now: the
/// first touch of each chunk is), and writes the address of its bytes in this process to `*data`
/// if `data` is not NULL. Reading through it rebuilds missing chunks (a chunk whose callback
/// failed reads as zeros: check with lf_shared_cache_is_failed(), or read through
/// lf_shared_cache_pin()); it stays valid until lf_shared_cache_free(). Do not write through it
/// (the bytes are every process's), and pin the entry before handing them to a system call
/// (where the kernel's own faults are not served, a missing chunk gives EFAULT there).
///
/// Fails with LF_INVALID_LENGTH (`len` 0 or over the capacity), LF_SHARED_LENGTH_MISMATCH (the
/// key exists with another length), LF_SHARED_FULL, LF_FORKED_CHILD (in a forked child).
///
/// # Safety
/// `cache` is NULL or a live handle; `data` is NULL or points to writable memory for one
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_insert(
    cache: *mut lf_shared_cache,
    key: u64,
    len: usize,
    data: *mut *const u8,
) -> lf_status {
    ffi!({
        let cache = borrow!(cache)?.cache()?;
        let entry = cache.insert(key, len)?;
        if !data.is_null() {
            // SAFETY: non-NULL and writable by the caller's contract.
            unsafe { data.write(entry.as_ptr()) };
        }
        Ok(())
    })
}

/// The entry of `key`, made by any process: writes the address of its bytes in this process to
/// `*data` (as lf_shared_cache_insert() does) and its length to `*len` if `len` is not NULL.
/// LF_NOT_FOUND if no process made it; LF_FORKED_CHILD in a forked child.
///
/// # Safety
/// `cache` is NULL or a live handle; `data` is NULL or points to writable memory for one
/// pointer; `len` is NULL or points to writable memory for one size_t.
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_get(
    cache: *const lf_shared_cache,
    key: u64,
    data: *mut *const u8,
    len: *mut usize,
) -> lf_status {
    ffi!({
        let cache = borrow!(cache)?.cache()?;
        required!(data)?;
        let entry = cache.get(key)?.ok_or_else(|| not_found(key))?;
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { data.write(entry.as_ptr()) };
        if !len.is_null() {
            // SAFETY: non-NULL and writable by the caller's contract.
            unsafe { len.write(entry.len()) };
        }
        Ok(())
    })
}

fn not_found(key: u64) -> Fail {
    Fail::new(
        lf_status::LF_NOT_FOUND,
        format!("no entry under key {key} in the shared cache: lf_shared_cache_insert() it"),
    )
}

/// Makes every chunk of the entry of `key` resident, rebuilding missing ones on this thread (or
/// waiting for the process rebuilding them) and retrying failed ones, and keeps it so until the
/// matching lf_shared_cache_unpin(): no process purges a pinned entry. Writes the address of its
/// bytes to `*data` (read-only: they are every process's) and its length to `*len` if `len` is
/// not NULL. Pins nest and belong to this handle; lf_shared_cache_free() ends those left.
///
/// Fails with LF_NOT_FOUND (no such key), LF_REGENERATE_FAILED (a chunk's callback failed, here
/// or in the process that rebuilt it; nothing is pinned then and a later pin retries),
/// LF_FORKED_CHILD (in a forked child).
///
/// # Safety
/// `cache` is NULL or a live handle; `data` is NULL or points to writable memory for one
/// pointer; `len` is NULL or points to writable memory for one size_t.
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_pin(
    cache: *mut lf_shared_cache,
    key: u64,
    data: *mut *const u8,
    len: *mut usize,
) -> lf_status {
    ffi!({
        let cache = borrow!(cache)?.cache()?;
        required!(data)?;
        let entry = cache.get(key)?.ok_or_else(|| not_found(key))?;
        entry.pin_unguarded()?;
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { data.write(entry.as_ptr()) };
        if !len.is_null() {
            // SAFETY: non-NULL and writable by the caller's contract.
            unsafe { len.write(entry.len()) };
        }
        Ok(())
    })
}

/// Ends one pin of the entry of `key` taken through this handle; with the last, its chunks may
/// be purged again. LF_NOT_PINNED if this handle holds no pin of it (an unpin without a pin, or
/// a second unpin of one pin); LF_NOT_FOUND if there is no such key; LF_FORKED_CHILD in a forked
/// child.
///
/// # Safety
/// `cache` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_unpin(cache: *mut lf_shared_cache, key: u64) -> lf_status {
    ffi!({
        let cache = borrow!(cache)?.cache()?;
        let entry = cache.get(key)?.ok_or_else(|| not_found(key))?;
        entry.unpin_unguarded()?;
        Ok(())
    })
}

/// Writes to `*out` whether a chunk of the entry of `key` failed to rebuild (it reads as zeros
/// until lf_shared_cache_pin() retries it successfully), in any process. LF_NOT_FOUND if there is
/// no such key; LF_FORKED_CHILD in a forked child.
///
/// # Safety
/// `cache` is NULL or a live handle; `out` is NULL or points to writable memory for one bool.
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_is_failed(
    cache: *const lf_shared_cache,
    key: u64,
    out: *mut bool,
) -> lf_status {
    ffi!({
        let cache = borrow!(cache)?.cache()?;
        required!(out)?;
        let entry = cache.get(key)?.ok_or_else(|| not_found(key))?;
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(entry.is_failed()) };
        Ok(())
    })
}

/// Writes to `*out` how many chunks of the entry of `key` were rebuilt so far, by all processes
/// (each chunk once, and again after a purge). LF_NOT_FOUND if there is no such key;
/// LF_FORKED_CHILD in a forked child.
///
/// # Safety
/// `cache` is NULL or a live handle; `out` is NULL or points to writable memory for one
/// uint64_t.
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_fills(
    cache: *const lf_shared_cache,
    key: u64,
    out: *mut u64,
) -> lf_status {
    ffi!({
        let cache = borrow!(cache)?.cache()?;
        required!(out)?;
        let entry = cache.get(key)?.ok_or_else(|| not_found(key))?;
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(entry.fills()) };
        Ok(())
    })
}

/// Purges unpinned chunks, least recently used entries first, until at most `keep` bytes are
/// resident, and writes the number of chunks punched to `*punched` (which may be NULL): 0 when
/// nothing had to go, or when another process is purging now. A purged chunk is rebuilt when
/// next touched. LF_FORKED_CHILD in a forked child.
///
/// # Safety
/// `cache` is NULL or a live handle; `punched` is NULL or points to writable memory for one
/// size_t.
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_purge(
    cache: *mut lf_shared_cache,
    keep: usize,
    punched: *mut usize,
) -> lf_status {
    ffi!({
        let cache = borrow!(cache)?.cache()?;
        let n = cache.purge(keep)?;
        if !punched.is_null() {
            // SAFETY: non-NULL and writable by the caller's contract.
            unsafe { punched.write(n) };
        }
        Ok(())
    })
}

/// Sets the byte budget of the cache, for every process (as lf_shared_config.budget: 0 is no
/// budget), and purges now if the resident bytes exceed it. LF_FORKED_CHILD in a forked child.
///
/// # Safety
/// `cache` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_set_budget(
    cache: *mut lf_shared_cache,
    bytes: usize,
) -> lf_status {
    ffi!({
        let cache = borrow!(cache)?.cache()?;
        cache.set_budget(if bytes == 0 { usize::MAX } else { bytes })?;
        Ok(())
    })
}

/// Writes the counts kept in the cache's file, over all processes, to `*out`. LF_FORKED_CHILD
/// in a forked child.
///
/// # Safety
/// `cache` is NULL or a live handle; `out` is NULL or points to writable memory for one
/// lf_shared_stats.
#[no_mangle]
pub unsafe extern "C" fn lf_shared_cache_stats(
    cache: *const lf_shared_cache,
    out: *mut lf_shared_stats,
) -> lf_status {
    ffi!({
        let cache = borrow!(cache)?.cache()?;
        required!(out)?;
        let stats = lf_shared_stats::from_stats(cache.stats());
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(stats) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The top-level field names in a derived `{:#?}` of a struct.
    fn debug_fields(pretty: &str) -> BTreeSet<String> {
        let fields: BTreeSet<String> = pretty
            .lines()
            .filter_map(|l| l.strip_prefix("    "))
            .filter(|l| !l.starts_with(' '))
            .filter_map(|l| l.split_once(':'))
            .map(|(name, _)| name.to_string())
            .collect();
        assert!(fields.len() > 1, "no fields found in {pretty}");
        fields
    }

    #[test]
    fn lf_shared_stats_has_every_shared_stats_field() {
        // A real snapshot: SharedStats has no Default, and a literal would not compile once a
        // field is added, which is what this test is to report.
        let name = format!("ffi-stats-test-{}", std::process::id());
        let config = SharedConfig {
            capacity: 1 << 20,
            entries: 4,
            ..SharedConfig::default()
        };
        let cache = SharedCache::create(&name, &config, |_, _, _| Ok(()))
            .unwrap_or_else(|e| panic!("a shared cache for the test: {e}"));
        let _ = SharedCache::remove(&name);
        let stats = cache.stats();
        let want = debug_fields(&format!("{stats:#?}"));
        let c = lf_shared_stats::from_stats(stats);
        assert_eq!(
            debug_fields(&format!("{c:#?}")),
            want,
            "lazyfree::SharedStats and lf_shared_stats differ: carry the new field in \
             lf_shared_stats (and lf_shared_stats::from_stats)"
        );
        assert_eq!(
            format!("{c:?}"),
            format!("{stats:?}").replace("SharedStats", "lf_shared_stats")
        );
    }

    #[test]
    fn the_default_config_round_trips() {
        let d = SharedConfig::default();
        let c = lf_shared_config::from_config(&d).to_config().unwrap();
        assert_eq!(
            (c.capacity, c.chunk, c.entries, c.budget),
            (d.capacity, d.chunk, d.entries, d.budget)
        );
        let huge = lf_shared_config {
            entries: usize::MAX,
            ..lf_shared_config::from_config(&d)
        };
        assert_eq!(
            huge.to_config().err().map(|f| f.status),
            Some(lf_status::LF_INVALID_CONFIG)
        );
    }
}
