//! lf_entry: one handle to a volatile entry.

use std::sync::atomic::{AtomicUsize, Ordering};

use lazyfree::Entry;

use crate::handle::{self, Boxed, Opaque};
use crate::status::{borrow, ffi, lf_status, required, this_fn, Fail};

/// A handle to one entry's bytes. Each handle from lf_cache_insert() or lf_cache_get() (or
/// lf_entry_clone()) is released exactly once with lf_entry_release(); the bytes stay valid
/// until then, even after the entry leaves its cache or the cache is freed.
///
/// A handle may be used from several threads at once (reads, pins) but must not be used by any
/// thread during or after its release. Releasing a handle twice, or using it after release, is
/// undefined behaviour; debug builds of the library detect it and abort with a message.
pub struct lf_entry {
    boxed: Boxed<EntryState>,
}

/// The Rust entry and the pins taken through this handle.
pub(crate) struct EntryState {
    entry: Entry,
    pins: AtomicUsize,
}

impl EntryState {
    pub(crate) fn new(entry: Entry) -> EntryState {
        EntryState {
            entry,
            pins: AtomicUsize::new(0),
        }
    }

    /// Ends the pins still held through this handle. In a forked child the pins are the
    /// parent's business and the memory is not mapped: nothing is unpinned there.
    fn unpin_all(&self) {
        let pins = self.pins.swap(0, Ordering::AcqRel);
        if self.entry.check_process().is_err() {
            return;
        }
        for _ in 0..pins {
            let _ = self.entry.unpin_unguarded();
        }
    }
}

impl Opaque for lf_entry {
    type Value = EntryState;
    const NAME: &'static str = "lf_entry";
    const MAGIC: u64 = 0x6c66_656e_7472_7921; // "lfentry!"
    fn wrap(boxed: Boxed<EntryState>) -> Self {
        lf_entry { boxed }
    }
    fn boxed(&self) -> &Boxed<EntryState> {
        &self.boxed
    }
    fn boxed_mut(&mut self) -> &mut Boxed<EntryState> {
        &mut self.boxed
    }
}

/// The entry's bytes (page-aligned, lf_entry_len() of them), read-only. Reading is transparent:
/// a page the kernel dropped is rebuilt by the callback before the read completes. Valid until
/// the handle is released. NULL if `entry` is NULL.
///
/// NULL for an entry of an LF_MODE_EXPLICIT cache (and of an LF_MODE_AUTO cache that fell back
/// to it), pinned or not, with lf_last_error_message() saying so: there nothing rebuilds a
/// dropped page on touch, so the bytes are reachable only through lf_entry_pin(). Code for
/// LF_MODE_AUTO pins where this returns NULL.
///
/// Do not write through it (pin first), and do not hand it to a syscall that writes into or
/// reads from it without pinning first (a dropped page then gives EFAULT where the monitor cannot
/// serve kernel faults; see lf_stats.kernel_faults_handled).
///
/// In a forked child it returns the same address, which is not mapped there: touching it ends
/// the child with SIGSEGV (see "fork" at the top).
///
/// # Safety
/// `entry` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn lf_entry_data(entry: *const lf_entry) -> *const u8 {
    ffi!({
        let e = borrow!(entry)?;
        e.entry.try_as_slice().map(<[u8]>::as_ptr).ok_or_else(|| {
            Fail::new(
                lf_status::LF_UNSUPPORTED,
                "the entry is in explicit mode (no userfaultfd): its bytes are reachable only \
                 through a pin; read them through the pointer lf_entry_pin() gives, then \
                 lf_entry_unpin()",
            )
        })
    })
}

/// The entry's length in bytes; 0 if `entry` is NULL.
///
/// # Safety
/// `entry` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn lf_entry_len(entry: *const lf_entry) -> usize {
    ffi!({ Ok(borrow!(entry)?.entry.len()) })
}

/// Makes every page resident and non-volatile until the matching lf_entry_unpin(), rebuilding
/// dropped pages first, and writes the bytes' address to `*data_out` (writable while pinned).
/// Pins nest and belong to the handle they were taken through; lf_entry_release() ends the
/// handle's remaining pins.
///
/// Fails with LF_REGENERATE_FAILED if the callback fails (whatever the failure policy: a pin
/// never poisons); nothing is pinned then and a later pin retries. LF_FORKED_CHILD in a forked
/// child.
///
/// In LF_MODE_EXPLICIT this is the only way to the bytes: the first pin (of any handle of the
/// entry) finds the pages the kernel dropped and calls the callback, on this thread, for the
/// chunks holding them; pins of one entry wait for each other while it is rebuilt.
///
/// Bytes written while pinned are kept only while pinned: once unpinned, a page the kernel drops
/// is rebuilt by the callback. No other thread may read the bytes while you write them.
///
/// # Safety
/// `entry` is NULL or a live handle; `data_out` is NULL or points to writable memory for one
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn lf_entry_pin(entry: *mut lf_entry, data_out: *mut *mut u8) -> lf_status {
    ffi!({
        let e = borrow!(entry)?;
        required!(data_out)?;
        e.entry.check_process()?;
        e.entry.pin_unguarded()?;
        e.pins.fetch_add(1, Ordering::AcqRel);
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { data_out.write(e.entry.as_ptr().cast_mut()) };
        Ok(())
    })
}

/// Ends one pin taken through this handle; the last pin of the entry makes its bytes volatile
/// again: in the monitor mode 10 ms later (the unpin delay; a pin before then finds the pages as
/// the last pin left them, at almost no cost), in the other modes at once. LF_NOT_PINNED if this
/// handle holds no pin; LF_FORKED_CHILD in a forked child.
///
/// # Safety
/// `entry` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn lf_entry_unpin(entry: *mut lf_entry) -> lf_status {
    ffi!({
        let e = borrow!(entry)?;
        e.entry.check_process()?;
        e.pins
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .map_err(|_| {
                Fail::new(
                    lf_status::LF_NOT_PINNED,
                    "this handle holds no pin: unpin once per successful lf_entry_pin(), \
                     through the same handle",
                )
            })?;
        e.entry.unpin_unguarded()?;
        Ok(())
    })
}

/// Releases a handle: ends its pins and drops its reference. NULL is a no-op. When the entry has
/// left its cache and this was its last handle, its memory is freed and its ctx_free called now,
/// on this thread. In a forked child it frees the child's copy of the handle only: no entry
/// memory is touched and no ctx_free is called.
///
/// # Safety
/// `entry` is NULL or a live handle, not used by any thread during or after this call.
/// Releasing twice is undefined behaviour (debug builds abort with a message).
#[no_mangle]
pub unsafe extern "C" fn lf_entry_release(entry: *mut lf_entry) {
    ffi!({
        // SAFETY: by the caller's contract.
        unsafe { handle::release(this_fn!(), entry, EntryState::unpin_all) };
        Ok(())
    })
}

/// Writes a new handle to the same entry to `*out` (to hand to another thread or keep
/// separately); release each handle once.
///
/// # Safety
/// `entry` is NULL or a live handle; `out` is NULL or points to writable memory for one pointer.
#[no_mangle]
pub unsafe extern "C" fn lf_entry_clone(
    entry: *const lf_entry,
    out: *mut *mut lf_entry,
) -> lf_status {
    ffi!({
        let e = borrow!(entry)?;
        required!(out)?;
        let h = handle::into_handle::<lf_entry>(EntryState {
            entry: e.entry.clone(),
            pins: AtomicUsize::new(0),
        });
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(h) };
        Ok(())
    })
}

/// Whether the entry's last regeneration failed (under LF_FAILURE_ZERO its dropped pages then
/// read as zeros). A later successful regeneration, e.g. by lf_entry_pin(), clears it. False if
/// `entry` is NULL.
///
/// # Safety
/// `entry` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn lf_entry_is_failed(entry: *const lf_entry) -> bool {
    ffi!({ Ok(borrow!(entry)?.entry.is_failed()) })
}

/// Pages of the entry present in memory now (mincore(2)); 0 if `entry` is NULL.
///
/// # Safety
/// `entry` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn lf_entry_resident_pages(entry: *const lf_entry) -> usize {
    ffi!({ Ok(borrow!(entry)?.entry.resident_pages()) })
}

/// Testing helper: pushes the entry's unpinned pages through the kernel's real reclaim path
/// (MADV_PAGEOUT, after draining per-CPU page batches, which needs root) as memory pressure
/// would, and writes the number of pages dropped to `*pages_dropped` (which may be NULL). The
/// next touch of a dropped page calls the callback (LF_MODE_EXPLICIT: the next pin), as it
/// would after memory pressure: use it to test callbacks. LF_FORKED_CHILD in a forked child.
///
/// # Safety
/// `entry` is NULL or a live handle; `pages_dropped` is NULL or points to writable memory for one
/// size_t.
#[no_mangle]
pub unsafe extern "C" fn lf_entry_reclaim(
    entry: *mut lf_entry,
    pages_dropped: *mut usize,
) -> lf_status {
    ffi!({
        let e = borrow!(entry)?;
        e.entry.check_process()?;
        let n = lazyfree::testing::reclaim(&e.entry);
        if !pages_dropped.is_null() {
            // SAFETY: non-NULL and writable by the caller's contract.
            unsafe { pages_dropped.write(n) };
        }
        Ok(())
    })
}
