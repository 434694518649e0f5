//! [`Entry`], the handle to one entry's volatile bytes, and [`Pinned`], its pin guard.

use std::ops::Deref;
use std::sync::atomic::AtomicU64;

use crate::error::Error;
use crate::handle::RegionHandle;
use crate::region::Region;
use crate::sys::mem;

use super::shards::Recency;

/// A handle to volatile bytes. Cheap to clone; the bytes stay valid until the last clone drops,
/// even after the entry is removed from its cache.
///
/// Reading (`Deref<Target = [u8]>`, `as_slice`) is transparent: a page the kernel dropped is
/// rebuilt by the regenerate callback before the read completes. The bytes are read-only; to
/// write, or to hand them to a syscall, [`pin`](Entry::pin) them.
///
/// In [`Mode::Explicit`](crate::Mode::Explicit) (and `Mode::Auto` where it falls back to it)
/// nothing rebuilds a page on touch: read through [`pin`](Entry::pin) only. `as_slice`,
/// `Deref` and `AsRef` then panic with a message saying so, and
/// [`try_as_slice`](Entry::try_as_slice) gives `None`.
///
/// An `Entry` is one pointer (to its region's allocation, which holds the count of its clones).
#[derive(Clone)]
pub struct Entry {
    handle: RegionHandle,
}

impl Entry {
    pub(crate) fn new(handle: RegionHandle) -> Entry {
        Entry { handle }
    }

    pub(crate) fn handle(&self) -> &RegionHandle {
        &self.handle
    }

    /// The region's handle, if this is the last reference to the entry.
    pub(crate) fn into_handle(self) -> Option<RegionHandle> {
        self.handle.is_unique().then_some(self.handle)
    }

    pub(crate) fn region(&self) -> &Region {
        self.handle.region()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.region().len()
    }

    /// Always false: entries hold at least one byte.
    pub fn is_empty(&self) -> bool {
        self.region().len() == 0
    }

    /// The bytes; lost pages are rebuilt on touch.
    ///
    /// # Panics
    /// In explicit mode, where unpinned bytes are not the entry's: use [`pin`](Entry::pin).
    pub fn as_slice(&self) -> &[u8] {
        if !self.handle.readable() {
            panic!(
                "lazyfree: this entry is in explicit mode (no userfaultfd): read its bytes \
                 through Entry::pin(), not Deref/as_slice (Entry::try_as_slice() returns None \
                 here instead of panicking)"
            );
        }
        self.bytes()
    }

    /// Calls `f` with the entry's bytes, in every mode: directly where reads are transparent
    /// (monitor and SIGBUS modes), through a pin held for the call in explicit mode. The one
    /// way to read that code for [`Mode::Auto`](crate::Mode::Auto) should use: it never
    /// branches on the mode. Fails only where a pin would ([`Error::RegenerateFailed`] in
    /// explicit mode; [`Error::ForkedChild`]).
    ///
    /// Use [`pin`](Entry::pin) instead to hand the bytes to a system call or to write them, and
    /// `Deref` where the mode is known to be monitor or SIGBUS.
    ///
    /// ```
    /// use lazyfree::{Cache, Config, Mode};
    ///
    /// for mode in [Mode::Monitor, Mode::Sigbus, Mode::Explicit] {
    ///     let cache: Cache<u8> = Cache::new(Config::default().mode(mode))?;
    ///     let e = cache.insert(0, 10_000, |off, buf: &mut [u8]| {
    ///         buf.iter_mut().enumerate().for_each(|(i, b)| *b = ((off + i) % 7) as u8);
    ///         Ok::<(), lazyfree::RegenError>(())
    ///     })?;
    ///     let sum: u64 = e.read(|bytes| bytes.iter().map(|&b| b as u64).sum())?;
    ///     assert_eq!(sum, (0..10_000u64).map(|i| i % 7).sum::<u64>());
    /// }
    /// # Ok::<(), lazyfree::Error>(())
    /// ```
    pub fn read<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Result<R, Error> {
        self.handle.check_owner()?;
        match self.try_as_slice() {
            Some(bytes) => Ok(f(bytes)),
            None => {
                let pinned = self.pin()?;
                Ok(f(&pinned))
            }
        }
    }

    /// The bytes, where reading them needs no pin (the userfaultfd modes); `None` in explicit
    /// mode, where only [`pin`](Entry::pin) reads them.
    pub fn try_as_slice(&self) -> Option<&[u8]> {
        if !self.handle.readable() {
            return None;
        }
        Some(self.bytes())
    }

    /// The span as a slice, unchecked: callers make sure the bytes are the entry's (a pin, or
    /// a userfaultfd mode).
    fn bytes(&self) -> &[u8] {
        let r = self.region();
        // SAFETY: base..base+len is mapped for the region's lifetime (tied to &self), and its
        // bytes only change when a pin's holder writes (see `Pinned::as_mut_slice`).
        unsafe { std::slice::from_raw_parts(r.base() as *const u8, r.len()) }
    }

    /// Start of the bytes (page-aligned). In explicit mode the bytes behind it are the entry's
    /// only while it is pinned.
    pub fn as_ptr(&self) -> *const u8 {
        self.region().base() as *const u8
    }

    /// Makes every page resident and non-volatile until the guard drops; rebuilds lost pages
    /// first, from the calling thread. Pins nest. Fails with [`Error::RegenerateFailed`] if a
    /// rebuild fails (nothing is pinned then, and a later touch or pin retries); never raises
    /// SIGBUS.
    ///
    /// Pin before handing the bytes to a system call, or to write them:
    ///
    /// ```
    /// use lazyfree::{testing, Cache, Config};
    ///
    /// let cache: Cache<u32> = Cache::new(Config::default())?;
    /// let e = cache.insert(1, 8192, |off, buf: &mut [u8]| {
    ///     for (i, b) in buf.iter_mut().enumerate() {
    ///         *b = ((off + i) / 4096) as u8; // the page's number
    ///     }
    ///     Ok::<(), lazyfree::RegenError>(())
    /// })?;
    /// testing::reclaim(&e);
    /// let mut pinned = e.pin()?; // every page rebuilt and resident until `pinned` drops
    /// assert!(pinned[4096..].iter().all(|&b| b == 1));
    /// assert_eq!(testing::reclaim(&e), 0); // the kernel cannot take pinned pages
    /// // SAFETY: no other reference to the entry's bytes is in use.
    /// unsafe { pinned.as_mut_slice()[0] = 7 }; // kept while pinned
    /// assert_eq!(pinned[0], 7);
    /// # Ok::<(), lazyfree::Error>(())
    /// ```
    pub fn pin(&self) -> Result<Pinned<'_>, Error> {
        self.pin_unguarded()?;
        Ok(Pinned { entry: self })
    }

    /// Pins without a guard, for callers that cannot hold a [`Pinned`] borrow (the C ABI): like
    /// [`pin`](Entry::pin), but the pin lasts until a matching
    /// [`unpin_unguarded`](Entry::unpin_unguarded). Pins are counted per entry (shared by its
    /// clones) and nest with guarded pins.
    pub fn pin_unguarded(&self) -> Result<(), Error> {
        self.handle.pin()
    }

    /// Ends one pin; false if the entry was not pinned.
    fn unpin(&self) -> bool {
        self.handle.unpin()
    }

    /// Ends one pin taken with [`pin_unguarded`](Entry::pin_unguarded); the last pin to end
    /// makes the bytes volatile again. Returns [`Error::NotPinned`] if the entry is not pinned.
    ///
    /// Pair each call with a `pin_unguarded` you made: ending a pin that a [`Pinned`] guard holds
    /// makes the bytes volatile while the guard is alive. Not undefined behaviour, but a bug.
    pub fn unpin_unguarded(&self) -> Result<(), Error> {
        self.handle.check_owner()?;
        if self.unpin() {
            Ok(())
        } else {
            Err(Error::NotPinned)
        }
    }

    /// Whether the last regeneration of this entry failed (its missing pages then read as zeros
    /// under `FailurePolicy::Zero`). A later successful regeneration clears it; `pin` retries.
    pub fn is_failed(&self) -> bool {
        self.region().is_failed()
    }

    /// The message of the last failed regeneration, if any.
    pub fn last_error(&self) -> Option<String> {
        self.region().last_error()
    }

    /// `Err(Error::ForkedChild)` if this process is a fork of the one whose cache made the
    /// entry: nothing of it is mapped here and its userfaultfd acts on the parent, so every
    /// operation that would touch, advise or fill its memory gives that error.
    pub fn check_process(&self) -> Result<(), Error> {
        self.handle.check_owner()
    }

    /// Whether it is pinned now, or a first pin of it is under way (making its pages resident:
    /// eviction passes it by from then on).
    pub fn is_pinned(&self) -> bool {
        self.region().is_pinned()
    }

    /// Pages of it present in memory now.
    pub fn resident_pages(&self) -> usize {
        let r = self.region();
        mem::resident_pages(r.base(), r.pages())
    }
}

impl Deref for Entry {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for Entry {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("addr", &self.as_ptr())
            .field("len", &self.len())
            .field("pinned", &self.is_pinned())
            .field("failed", &self.is_failed())
            .finish()
    }
}

/// A pin: the entry's pages are resident and will not be dropped until this guard drops, when
/// they become volatile again (MADV_FREE).
pub struct Pinned<'a> {
    entry: &'a Entry,
}

impl Pinned<'_> {
    /// The bytes, mutable.
    ///
    /// Bytes written here are kept only while pinned: once unpinned, a page the kernel drops is
    /// rebuilt by the regenerate callback, so write only what the callback reproduces, or keep it
    /// pinned.
    ///
    /// # Safety
    /// No other reference to this entry's bytes (from any clone of the entry, on any thread) may
    /// be used while the returned slice is alive: Rust's aliasing rules apply to the entry's bytes
    /// like to any memory.
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        let r = self.entry.region();
        // SAFETY: mapped and resident while pinned; exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(r.base() as *mut u8, r.len()) }
    }
}

impl Deref for Pinned<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // Pinned: the bytes are the entry's in every mode.
        self.entry.bytes()
    }
}

impl std::fmt::Debug for Pinned<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinned").field("entry", self.entry).finish()
    }
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        let was_pinned = self.entry.unpin();
        // (In a forked child nothing is unpinned: the memory is the parent's.)
        debug_assert!(
            was_pinned || self.entry.handle.check_owner().is_err(),
            "a guard's pin was ended by unpin_unguarded"
        );
    }
}

impl Recency for Entry {
    fn used(&self) -> &AtomicU64 {
        self.handle.stamps().0
    }
    fn recorded(&self) -> &AtomicU64 {
        self.handle.stamps().1
    }
    fn id(&self) -> usize {
        self.handle.id()
    }
    fn hook_addr(&self) -> usize {
        self.region().base()
    }
}
