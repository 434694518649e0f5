//! lf_cache: a cache of volatile entries keyed by uint64_t.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Arc, Mutex};

use lazyfree::{Cache, Entry, RegenError};

use crate::callback::{disarm, CCallback, EntryFn, KeyedFn};
use crate::config::{lf_config, mode_arg, ModeArg};
use crate::entry::{lf_entry, EntryState};
use crate::handle::{self, Boxed, Opaque};
use crate::status::{borrow, ffi, lf_status, required, this_fn, Fail};

/// A cache of volatile entries keyed by uint64_t. Thread-safe: every function taking a cache may
/// be called from any number of threads at once, except lf_cache_free(), which must be the last
/// use. Entries (lf_entry) stay valid after the cache is freed.
pub struct lf_cache {
    boxed: Boxed<CacheState>,
}

/// The Rust cache and what the C side reads of it.
pub(crate) struct CacheState {
    cache: Cache<u64>,
    /// `Stats::fallback_reason` as C reads it (fixed when the cache is made).
    fallback_reason: Option<CString>,
}

impl CacheState {
    fn of(cache: Cache<u64>) -> CacheState {
        // Fixed for the cache's life; no entries yet, so the snapshot costs nothing.
        let fallback_reason = cache
            .stats()
            .fallback_reason
            .map(|r| CString::new(r.replace('\0', " ")).unwrap_or_default());
        CacheState {
            cache,
            fallback_reason,
        }
    }
}

impl Opaque for lf_cache {
    type Value = CacheState;
    const NAME: &'static str = "lf_cache";
    const MAGIC: u64 = 0x6c66_6361_6368_6521; // "lfcache!"
    fn wrap(boxed: Boxed<CacheState>) -> Self {
        lf_cache { boxed }
    }
    fn boxed(&self) -> &Boxed<CacheState> {
        &self.boxed
    }
    fn boxed_mut(&mut self) -> &mut Boxed<CacheState> {
        &mut self.boxed
    }
}

/// Fills `buf` (`len` bytes, page-aligned) with the entry's bytes at `offset`; returns 0 on
/// success, non-zero on failure (handled by the cache's lf_failure_policy).
///
/// Called with the `ctx` given to lf_cache_insert(). Where it runs depends on the cache's mode:
/// - LF_MODE_MONITOR: on one of the monitor's threads, never on the thread that touched the
///   page. Calls for different chunks of one entry, and for different entries, may run at the
///   same time on different threads, so `ctx` must be safe to use from several threads.
/// - LF_MODE_EXPLICIT (and LF_MODE_AUTO where it falls back to it): on the thread calling
///   lf_entry_pin(), inside it; pins of other entries may run callbacks at the same time.
/// - LF_MODE_SIGBUS: on the thread that touched the page, inside lazyfree's SIGBUS handler, in
///   the middle of whatever that thread was doing, on that thread's stack. Other threads may run
///   it at the same time for other chunks. It must not take a lock the program may hold while it
///   reads an entry (the thread would wait for itself), and may call malloc() only if the
///   program never reads entries from inside its allocator. errno is saved and restored for it.
///
/// `offset` is a multiple of 4096 (of the fill chunk in LF_MODE_MONITOR); `len` is the chunk,
/// shorter for the entry's last chunk (LF_MODE_SIGBUS may ask for a large chunk in smaller
/// pieces). Write all `len` bytes, the same bytes every time: a page is rebuilt whenever the
/// kernel dropped it. Bytes past the entry's length in its last page read as zero.
///
/// A callback may read other entries (LF_MODE_SIGBUS: nested at most 16 deep), call
/// lf_cache_get(), and release handles other than the last one of an entry. It must not: read or
/// pin the entry it is rebuilding (LF_MODE_MONITOR: it would wait for itself forever;
/// LF_MODE_SIGBUS: the process aborts with a message); release the last handle of,
/// lf_cache_remove() or replace the entry it is rebuilding, or lf_cache_free() its cache;
/// (LF_MODE_EXPLICIT) pin the entry it is rebuilding (that pin fails with LF_REGENERATE_FAILED),
/// or pin an entry whose callback pins this one (the two would wait for each other);
/// longjmp or throw out of the callback; or touch `buf` after returning.
pub type lf_regen_fn = Option<
    unsafe extern "C" fn(ctx: *mut c_void, offset: usize, buf: *mut u8, len: usize) -> c_int,
>;

/// Frees a callback's `ctx`: called once, when the entry's last reference is gone.
pub type lf_ctx_free_fn = Option<unsafe extern "C" fn(ctx: *mut c_void)>;

/// The one regenerate function of a cache made by lf_cache_new_keyed(): fills `buf` (`len`
/// bytes, page-aligned) with the bytes at `offset` of the entry under `key`; returns 0 on
/// success, non-zero on failure. Called with the `ctx` given to lf_cache_new_keyed(), under the
/// same rules as lf_regen_fn (where it runs, what it must not do), for any of the cache's keys
/// at once from several threads.
pub type lf_keyed_regen_fn = Option<
    unsafe extern "C" fn(
        ctx: *mut c_void,
        key: u64,
        offset: usize,
        buf: *mut u8,
        len: usize,
    ) -> c_int,
>;

/// Latency histogram buckets in lf_stats.regenerate_latency.
pub const LF_LATENCY_BUCKETS: usize = 7;

/// A snapshot of a cache (lf_cache_stats()).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct lf_stats {
    /// Entries in the cache (removed entries still held by a handle are not counted).
    pub entries: usize,
    /// Their bytes, as inserted.
    pub bytes: usize,
    /// Their bytes present in memory now, in whole pages: the sum of the next two.
    pub resident_bytes: usize,
    /// Of those, bytes of pinned entries (a first pin under way included, and entries unpinned
    /// less than the unpin delay, 10 ms, ago): memory the kernel cannot take back now.
    pub resident_pinned_bytes: usize,
    /// Of those, bytes of unpinned entries: volatile, reclaimable at once under pressure.
    pub resident_volatile_bytes: usize,
    /// Entries pinned now, or whose first pin is under way.
    pub pinned_entries: usize,
    /// Entries whose last regeneration failed.
    pub failed_entries: usize,
    /// Missing-page faults served for this cache's entries.
    pub faults_handled: u64,
    /// Pages installed by regeneration.
    pub pages_regenerated: u64,
    /// Of those, pages that had held the entry's bytes before: the kernel took them back and a
    /// touch or pin rebuilt them.
    pub pages_reclaimed: u64,
    /// Of pages_regenerated, pages filled ahead of sequential faults (monitor mode), before
    /// anything touched them.
    pub pages_read_ahead: u64,
    /// Calls of regenerate callbacks.
    pub regenerate_calls: u64,
    /// Calls that failed.
    pub regenerate_failures: u64,
    /// Time spent inside regenerate callbacks, in nanoseconds.
    pub regenerate_time_ns: u64,
    /// Callback latency histogram: bucket i counts calls that took under 10^(i+1) microseconds
    /// (10 us, 100 us, 1 ms, 10 ms, 100 ms, 1 s); the last bucket counts the rest.
    pub regenerate_latency: [u64; LF_LATENCY_BUCKETS],
    /// Entries evicted by the byte budget.
    pub evictions: u64,
    /// How the userfaultfd was obtained (a static string: "userfaultfd(2)", "/dev/userfaultfd",
    /// "userfaultfd(UFFD_USER_MODE_ONLY)", or "none (explicit mode)").
    pub uffd_kind: *const c_char,
    /// Whether faults taken inside the kernel (a write(2) from an entry) are served; if not, such
    /// a syscall fails with EFAULT on a dropped page: pin the entry first. False in
    /// LF_MODE_EXPLICIT, where every read, system calls included, goes through a pin.
    pub kernel_faults_handled: bool,
    /// Whether LF_FAILURE_POISON makes an access to a failed page fault loudly here (SIGBUS with
    /// kernel poisoning from Linux 6.6 and in LF_MODE_SIGBUS; before 6.6 the monitor makes the
    /// pages inaccessible: SIGSEGV, EFAULT for system calls). False in LF_MODE_EXPLICIT.
    pub poison_supported: bool,
    /// The mode the cache runs in: the one configured, or for LF_MODE_AUTO the one chosen
    /// (LF_MODE_MONITOR or LF_MODE_EXPLICIT; lf_cache_fallback_reason() says why explicit).
    pub mode: ModeArg,
}

impl lf_stats {
    /// The C view of a Stats snapshot.
    ///
    /// Kept in step with `lazyfree::Stats` two ways. The pattern below names every field of
    /// Stats, so a field removed or renamed there stops this from compiling, and the struct
    /// literal names every field of lf_stats. Stats is `#[non_exhaustive]`, so outside its crate
    /// the pattern must end in `..` and a field *added* to Stats still compiles: the test
    /// `lf_stats_has_every_stats_field` catches that, comparing the field names of Stats with
    /// those of lf_stats (both from their derived Debug) and the list of fields deliberately
    /// left out of lf_stats (`NOT_IN_LF_STATS` there, bound to `_` here).
    fn from_stats(s: lazyfree::Stats) -> lf_stats {
        let lazyfree::Stats {
            entries,
            bytes,
            resident_bytes,
            resident_pinned_bytes,
            resident_volatile_bytes,
            pinned_entries,
            failed_entries,
            faults_handled,
            pages_regenerated,
            pages_reclaimed,
            pages_read_ahead,
            regenerate_calls,
            regenerate_failures,
            regenerate_time,
            regenerate_latency,
            evictions,
            uffd_kind,
            kernel_faults_handled,
            poison_supported,
            slab_bytes: _,
            mode,
            fallback_reason: _,
            ..
        } = s;
        lf_stats {
            entries,
            bytes,
            resident_bytes,
            resident_pinned_bytes,
            resident_volatile_bytes,
            pinned_entries,
            failed_entries,
            faults_handled,
            pages_regenerated,
            pages_reclaimed,
            pages_read_ahead,
            regenerate_calls,
            regenerate_failures,
            regenerate_time_ns: u64::try_from(regenerate_time.as_nanos()).unwrap_or(u64::MAX),
            regenerate_latency,
            evictions,
            uffd_kind: static_cstr(uffd_kind),
            kernel_faults_handled,
            poison_supported,
            mode: mode_arg(mode),
        }
    }
}

/// A C string for a static Rust one, made once and kept for the process.
fn static_cstr(s: &'static str) -> *const c_char {
    static INTERNED: Mutex<Option<HashMap<&'static str, CString>>> = Mutex::new(None);
    let mut g = INTERNED.lock().unwrap_or_else(|p| p.into_inner());
    g.get_or_insert_with(HashMap::new)
        .entry(s)
        .or_insert_with(|| CString::new(s.replace('\0', " ")).unwrap_or_default())
        .as_ptr()
}

/// The Rust regenerate callback calling `cb`'s C one (it holds a clone of `cb`).
fn rust_callback(
    cb: &Arc<CCallback<EntryFn>>,
) -> impl Fn(usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync + 'static {
    let held = cb.clone();
    move |offset: usize, buf: &mut [u8]| held.call(offset, buf)
}

/// Writes a new handle to `entry` to `*out`, if `out` is not NULL (else the entry stays only in
/// the cache).
///
/// # Safety
/// `out` is NULL or points to writable memory for one pointer.
unsafe fn hand_out(out: *mut *mut lf_entry, entry: Entry) {
    if !out.is_null() {
        let h = handle::into_handle::<lf_entry>(EntryState::new(entry));
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(h) };
    }
}

/// Makes a cache and writes its handle to `*out`. `config` NULL means the defaults.
///
/// Fails with LF_USERFAULTFD_UNAVAILABLE where no userfaultfd can be had in LF_MODE_MONITOR or
/// LF_MODE_SIGBUS (the message says why and what to change; LF_MODE_AUTO falls back to
/// LF_MODE_EXPLICIT instead), LF_INVALID_CONFIG for a bad config (or a bad LAZYFREE_MODE with
/// LF_MODE_AUTO), LF_UNSUPPORTED on a kernel whose page size is not 4 KiB, LF_FORKED_CHILD in a
/// forked child of a process running a cache of the mode (see "fork" at the top).
///
/// # Safety
/// `config` is NULL or points to an initialised lf_config; `out` is NULL (LF_NULL_ARGUMENT) or
/// points to writable memory for one pointer.
#[no_mangle]
pub unsafe extern "C" fn lf_cache_new(
    config: *const lf_config,
    out: *mut *mut lf_cache,
) -> lf_status {
    ffi!({
        required!(out)?;
        let config = if config.is_null() {
            lazyfree::Config::default()
        } else {
            // SAFETY: non-NULL and initialised by the caller's contract; every bit pattern of
            // lf_config's fields is valid on the Rust side.
            unsafe { config.read() }.to_config()?
        };
        let cache = Cache::new(config)?;
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(handle::into_handle::<lf_cache>(CacheState::of(cache))) };
        Ok(())
    })
}

/// Makes a cache with one regenerate function for every key, like lf_cache_new() otherwise:
/// its entries are inserted by key and length with lf_cache_insert_keyed() and
/// lf_cache_get_or_insert_keyed(), and hold no callback of their own (no allocation per entry
/// for one: an entry keeps only its key and a pointer to the function). lf_cache_insert() and
/// lf_cache_get_or_insert() work on it too, for entries that need another callback.
///
/// `ctx` is passed to every `regen` call. On success the cache owns it: `ctx_free(ctx)` (if
/// `ctx_free` is not NULL) is called exactly once, when the cache is freed and the last handle
/// to any of its entries is released, on the thread making that last call, inside it. On
/// failure nothing is kept: ctx_free is not called and the caller still owns ctx.
///
/// Fails as lf_cache_new() does, and with LF_NULL_ARGUMENT (`regen` or `out` NULL).
///
/// # Safety
/// As lf_cache_new(); `regen`, `ctx` and `ctx_free` follow the rules of lf_keyed_regen_fn.
#[no_mangle]
pub unsafe extern "C" fn lf_cache_new_keyed(
    config: *const lf_config,
    regen: lf_keyed_regen_fn,
    ctx: *mut c_void,
    ctx_free: lf_ctx_free_fn,
    out: *mut *mut lf_cache,
) -> lf_status {
    ffi!({
        required!(out)?;
        let regen = required!(regen)?;
        let config = if config.is_null() {
            lazyfree::Config::default()
        } else {
            // SAFETY: non-NULL and initialised by the caller's contract; every bit pattern of
            // lf_config's fields is valid on the Rust side.
            unsafe { config.read() }.to_config()?
        };
        let cb = CCallback::<KeyedFn>::new(regen, ctx, ctx_free);
        let held = cb.clone();
        let made = Cache::with_regen(config, move |&key: &u64, offset, buf: &mut [u8]| {
            held.call(key, offset, buf)
        });
        let cache = match made {
            Ok(c) => c,
            Err(e) => {
                // The function went with the failed call: the caller keeps ctx.
                disarm(cb);
                return Err(e.into());
            }
        };
        drop(cb);
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(handle::into_handle::<lf_cache>(CacheState::of(cache))) };
        Ok(())
    })
}

/// Frees a cache. NULL is a no-op. Entries still held by lf_entry handles stay valid until
/// released; the others are freed now (their ctx_free is called now, on this thread). In a
/// forked child it frees the child's copy of the handle only: entry memory (not mapped there)
/// and contexts are left alone, and no ctx_free is called.
///
/// # Safety
/// `cache` is NULL or a cache from lf_cache_new() not freed before, and no other thread uses it
/// during or after this call. Freeing twice is undefined behaviour (debug builds abort).
#[no_mangle]
pub unsafe extern "C" fn lf_cache_free(cache: *mut lf_cache) {
    ffi!({
        // SAFETY: by the caller's contract.
        unsafe { handle::release(this_fn!(), cache, |_| ()) };
        Ok(())
    })
}

/// Inserts an entry of `len` bytes under `key`, replacing any entry under that key (handles to
/// the old one stay valid). With `initial` NULL the entry is lazy: nothing is computed now, the
/// first touch of each chunk calls `regen`. With `initial` non-NULL its `len` bytes are copied in
/// now (they must be what `regen` produces) and `regen` rebuilds pages the kernel drops later.
///
/// `ctx` is passed to every `regen` call. On success the cache owns it: `ctx_free(ctx)` (if
/// `ctx_free` is not NULL) is called exactly once, when the entry's last reference is gone: the
/// entry has left the cache (lf_cache_remove(), replaced by another insert under `key`, evicted
/// by the budget, or lf_cache_free()) and every handle to it is released. It runs on the thread
/// making that last call, inside it. On failure nothing is kept: ctx_free is not called and the
/// caller still owns ctx.
///
/// If `out` is not NULL a new handle to the entry is written there (release it with
/// lf_entry_release()); with `out` NULL the entry is only in the cache (lf_cache_get() it later).
///
/// Fails with LF_NULL_ARGUMENT (`cache` or `regen` NULL), LF_INVALID_LENGTH (`len` 0 or over
/// 1 TiB), LF_OVER_BUDGET, LF_KERNEL_ERROR, LF_FORKED_CHILD (in a forked child).
///
/// # Safety
/// `cache` is NULL or a live cache; `initial` is NULL or points to `len` readable bytes; `out` is
/// NULL or points to writable memory for one pointer; `regen`, `ctx` and `ctx_free` follow the
/// rules of lf_regen_fn.
#[no_mangle]
pub unsafe extern "C" fn lf_cache_insert(
    cache: *mut lf_cache,
    key: u64,
    len: usize,
    regen: lf_regen_fn,
    ctx: *mut c_void,
    ctx_free: lf_ctx_free_fn,
    initial: *const u8,
    out: *mut *mut lf_entry,
) -> lf_status {
    ffi!({
        let cache = &borrow!(cache)?.cache;
        cache.check_process()?;
        let regen = required!(regen)?;
        if len > isize::MAX as usize {
            // Checked here so that no slice of that length is ever formed from `initial`.
            return Err(lazyfree::Error::InvalidLength {
                len,
                reason: "larger than the 1 TiB limit of one entry",
            }
            .into());
        }
        let cb = CCallback::<EntryFn>::new(regen, ctx, ctx_free);
        let closure = rust_callback(&cb);
        let inserted = if initial.is_null() {
            cache.insert(key, len, closure)
        } else {
            // SAFETY: len <= isize::MAX and `initial` points to len readable bytes by the
            // caller's contract.
            let bytes = unsafe { std::slice::from_raw_parts(initial, len) };
            cache.insert_with(key, bytes, closure)
        };
        let entry: Entry = match inserted {
            Ok(e) => e,
            Err(e) => {
                disarm(cb);
                return Err(e.into());
            }
        };
        drop(cb);
        // SAFETY: `out` is NULL or writable by the caller's contract.
        unsafe { hand_out(out, entry) };
        Ok(())
    })
}

/// The entry under `key`, or a new lazy entry of `len` bytes rebuilt by `regen` if there is none,
/// made once however many threads ask at the same time (single flight): concurrent callers for
/// one key get handles to the same entry. Marks it most recently used.
///
/// On success the cache owns `ctx` whether or not it was used: if an entry was found (or
/// another caller's was made), `ctx_free(ctx)` (if not NULL) is called before this returns; if
/// this call made the entry, as for lf_cache_insert(). On failure nothing is kept: ctx_free is
/// not called and the caller still owns ctx.
///
/// If `out` is not NULL a new handle to the entry is written there (release it with
/// lf_entry_release()).
///
/// Fails with LF_NULL_ARGUMENT (`cache` or `regen` NULL), LF_INVALID_LENGTH (`len` 0 or over
/// 1 TiB), LF_OVER_BUDGET, LF_KERNEL_ERROR, LF_FORKED_CHILD (in a forked child).
///
/// # Safety
/// `cache` is NULL or a live cache; `out` is NULL or points to writable memory for one pointer;
/// `regen`, `ctx` and `ctx_free` follow the rules of lf_regen_fn.
#[no_mangle]
pub unsafe extern "C" fn lf_cache_get_or_insert(
    cache: *mut lf_cache,
    key: u64,
    len: usize,
    regen: lf_regen_fn,
    ctx: *mut c_void,
    ctx_free: lf_ctx_free_fn,
    out: *mut *mut lf_entry,
) -> lf_status {
    ffi!({
        let cache = &borrow!(cache)?.cache;
        cache.check_process()?;
        let regen = required!(regen)?;
        let cb = CCallback::<EntryFn>::new(regen, ctx, ctx_free);
        let closure = rust_callback(&cb);
        let entry: Entry = match cache.get_or_insert_with(key, len, closure) {
            Ok(e) => e,
            Err(e) => {
                disarm(cb);
                return Err(e.into());
            }
        };
        // The cache owns ctx now: kept by the new entry, or freed here with this last
        // reference if an existing entry was returned.
        drop(cb);
        // SAFETY: `out` is NULL or writable by the caller's contract.
        unsafe { hand_out(out, entry) };
        Ok(())
    })
}

/// Inserts an entry of `len` bytes under `key` in a cache made by lf_cache_new_keyed(), rebuilt
/// by the cache's function; otherwise as lf_cache_insert() (replacing, `initial`, `out`).
///
/// Fails with LF_NO_CACHE_REGEN on a cache made by lf_cache_new(), LF_NULL_ARGUMENT (`cache`
/// NULL), LF_INVALID_LENGTH (`len` 0 or over 1 TiB), LF_OVER_BUDGET, LF_KERNEL_ERROR,
/// LF_FORKED_CHILD (in a forked child).
///
/// # Safety
/// `cache` is NULL or a live cache; `initial` is NULL or points to `len` readable bytes; `out` is
/// NULL or points to writable memory for one pointer.
#[no_mangle]
pub unsafe extern "C" fn lf_cache_insert_keyed(
    cache: *mut lf_cache,
    key: u64,
    len: usize,
    initial: *const u8,
    out: *mut *mut lf_entry,
) -> lf_status {
    ffi!({
        let cache = &borrow!(cache)?.cache;
        cache.check_process()?;
        let entry = if initial.is_null() {
            cache.insert_lazy(key, len)?
        } else {
            if len > isize::MAX as usize {
                // Checked here so that no slice of that length is ever formed from `initial`.
                return Err(lazyfree::Error::InvalidLength {
                    len,
                    reason: "larger than the 1 TiB limit of one entry",
                }
                .into());
            }
            // SAFETY: len <= isize::MAX and `initial` points to len readable bytes by the
            // caller's contract.
            let bytes = unsafe { std::slice::from_raw_parts(initial, len) };
            cache.insert_bytes(key, bytes)?
        };
        // SAFETY: `out` is NULL or writable by the caller's contract.
        unsafe { hand_out(out, entry) };
        Ok(())
    })
}

/// The entry under `key`, or a new lazy entry of `len` bytes rebuilt by the cache's function if
/// there is none, made once however many threads ask at the same time; otherwise as
/// lf_cache_get_or_insert().
///
/// Fails with LF_NO_CACHE_REGEN on a cache made by lf_cache_new(), LF_NULL_ARGUMENT (`cache`
/// NULL), LF_INVALID_LENGTH (`len` 0 or over 1 TiB), LF_OVER_BUDGET, LF_KERNEL_ERROR,
/// LF_FORKED_CHILD (in a forked child).
///
/// # Safety
/// `cache` is NULL or a live cache; `out` is NULL or points to writable memory for one pointer.
#[no_mangle]
pub unsafe extern "C" fn lf_cache_get_or_insert_keyed(
    cache: *mut lf_cache,
    key: u64,
    len: usize,
    out: *mut *mut lf_entry,
) -> lf_status {
    ffi!({
        let cache = &borrow!(cache)?.cache;
        cache.check_process()?;
        let entry = cache.get_or_insert_lazy(key, len)?;
        // SAFETY: `out` is NULL or writable by the caller's contract.
        unsafe { hand_out(out, entry) };
        Ok(())
    })
}

/// Writes a new handle to the entry under `key` to `*out` and marks it most recently used.
/// LF_NOT_FOUND if there is none; LF_FORKED_CHILD in a forked child. Release the handle with
/// lf_entry_release().
///
/// # Safety
/// `cache` is NULL or a live cache; `out` is NULL or points to writable memory for one pointer.
#[no_mangle]
pub unsafe extern "C" fn lf_cache_get(
    cache: *mut lf_cache,
    key: u64,
    out: *mut *mut lf_entry,
) -> lf_status {
    ffi!({
        let cache = &borrow!(cache)?.cache;
        cache.check_process()?;
        required!(out)?;
        let entry = cache.get(&key).ok_or_else(|| {
            Fail::new(lf_status::LF_NOT_FOUND, format!("no entry under key {key}"))
        })?;
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(handle::into_handle::<lf_entry>(EntryState::new(entry))) };
        Ok(())
    })
}

/// Removes the entry under `key` from the cache. LF_NOT_FOUND if there is none; LF_FORKED_CHILD
/// in a forked child. Handles to it
/// stay valid (their bytes readable and rebuilt on touch) until released; if there are none,
/// its memory is freed and its ctx_free called now, on this thread.
///
/// # Safety
/// `cache` is NULL or a live cache.
#[no_mangle]
pub unsafe extern "C" fn lf_cache_remove(cache: *mut lf_cache, key: u64) -> lf_status {
    ffi!({
        let cache = &borrow!(cache)?.cache;
        cache.check_process()?;
        match cache.remove(&key) {
            Some(entry) => {
                drop(entry);
                Ok(())
            }
            None => Err(Fail::new(
                lf_status::LF_NOT_FOUND,
                format!("no entry under key {key}"),
            )),
        }
    })
}

/// Writes a snapshot of the cache's entries and counters to `*out`. Costs one mincore(2) per
/// entry. LF_FORKED_CHILD in a forked child.
///
/// # Safety
/// `cache` is NULL or a live cache; `out` is NULL or points to writable memory for one lf_stats.
#[no_mangle]
pub unsafe extern "C" fn lf_cache_stats(cache: *const lf_cache, out: *mut lf_stats) -> lf_status {
    ffi!({
        let cache = &borrow!(cache)?.cache;
        cache.check_process()?;
        required!(out)?;
        let stats = lf_stats::from_stats(cache.stats());
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(stats) };
        Ok(())
    })
}

/// Why an LF_MODE_AUTO cache runs in LF_MODE_EXPLICIT: the userfaultfd error (which ways were
/// tried, their errno, what to change) or "LAZYFREE_MODE=explicit". NULL when the cache is not
/// such a fallback (any other mode, or LF_MODE_AUTO that got a userfaultfd), and NULL with
/// lf_last_error_message() set when `cache` is NULL. The string belongs to the cache: valid
/// until lf_cache_free().
///
/// # Safety
/// `cache` is NULL or a live cache.
#[no_mangle]
pub unsafe extern "C" fn lf_cache_fallback_reason(cache: *const lf_cache) -> *const c_char {
    ffi!({
        let reason = borrow!(cache)?.fallback_reason.as_deref();
        Ok(reason.map_or(std::ptr::null(), CStr::as_ptr))
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Fields of `lazyfree::Stats` that lf_stats does not carry, and why.
    const NOT_IN_LF_STATS: [(&str, &str); 2] = [
        (
            "slab_bytes",
            "not in the C API (a new lf_stats field changes the struct's size and layout)",
        ),
        (
            "fallback_reason",
            "a string the cache owns: lf_cache_fallback_reason()",
        ),
    ];

    /// Fields of `lazyfree::Stats` that lf_stats carries under another name.
    const RENAMED: [(&str, &str); 1] = [("regenerate_time", "regenerate_time_ns")];

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
    fn lf_stats_has_every_stats_field() {
        let stats = lazyfree::Stats::default();
        let want: BTreeSet<String> = debug_fields(&format!("{stats:#?}"))
            .into_iter()
            .filter(|f| NOT_IN_LF_STATS.iter().all(|(left_out, _)| f != left_out))
            .map(|f| match RENAMED.iter().find(|(from, _)| *from == f) {
                Some((_, to)) => to.to_string(),
                None => f,
            })
            .collect();
        let have = debug_fields(&format!("{:#?}", lf_stats::from_stats(stats)));
        assert_eq!(
            have, want,
            "lazyfree::Stats and lf_stats differ: carry the new field in lf_stats (and \
             lf_stats::from_stats), or list it in NOT_IN_LF_STATS with the reason"
        );
    }
}
