//! [`RegionHandle`]: a region owned in a runtime's arena. What the public types (`Entry`,
//! `VolatileArena`'s allocations) hold: it keeps the runtime alive (its threads, fd and slabs
//! serve the region), publishes the region in the arena's lookup on creation, routes pins,
//! unpins and initial bytes to the runtime's backend, and on drop unpublishes the region, waits
//! until no fault path uses it and gives its span back.
//!
//! Every operation checks first that this process is the one that made the runtime: in a forked
//! child the memory is not mapped and the userfaultfd acts on the parent (`Error::ForkedChild`).

use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::Error;
use crate::fault::readvise;
use crate::mode::{Backend, Runtime};
use crate::region::{check_len, hazards, RegenFn, Region, RegionSpec};

pub(crate) struct RegionHandle {
    ptr: NonNull<Region>,
    rt: Arc<Runtime>,
}

// SAFETY: Region is Send + Sync (atomics, mutexes and a Send + Sync callback); the handle only
// hands out shared references to it.
unsafe impl Send for RegionHandle {}
// SAFETY: as above.
unsafe impl Sync for RegionHandle {}

impl RegionHandle {
    /// A region of `spec.len` bytes in a fresh span of `rt`'s arena.
    pub(crate) fn new(
        rt: Arc<Runtime>,
        spec: RegionSpec,
        regen: impl RegenFn,
    ) -> Result<Self, Error> {
        let pages = check_len(spec.len)?;
        rt.arena().check_owner()?;
        let base = rt.arena().alloc(pages, spec.align_pages)?;
        // SAFETY: the span was just carved from `rt`'s arena for us and no region covers it;
        // `adopt` cannot fail on the length checked above, so the span is not leaked.
        unsafe { Self::adopt(rt, spec, base, regen) }
    }

    /// Makes a region over a span already carved from `rt`'s arena (the allocator interfaces
    /// allocate first and attach a callback later), publishing it like [`new`](Self::new). On
    /// success the handle owns the span and gives it back on drop; on error the caller still
    /// owns it. `spec.align_pages` is not used.
    ///
    /// # Safety
    /// `[base, base + pages_for(spec.len) * PAGE)` must be a span of `rt.arena()` returned by
    /// `Arena::alloc`, owned by the caller and covered by no other region.
    pub(crate) unsafe fn adopt(
        rt: Arc<Runtime>,
        spec: RegionSpec,
        base: usize,
        regen: impl RegenFn,
    ) -> Result<Self, Error> {
        let pages = check_len(spec.len)?;
        rt.arena().check_owner()?;
        let ptr = Region::boxed(base, spec, regen);
        rt.arena().publish(base, pages, ptr.as_ptr());
        Ok(RegionHandle { ptr, rt })
    }

    pub(crate) fn region(&self) -> &Region {
        // SAFETY: the region lives until this handle drops.
        unsafe { self.ptr.as_ref() }
    }

    /// `Err(ForkedChild)` in a forked child of the process that made the region.
    pub(crate) fn check_owner(&self) -> Result<(), Error> {
        self.rt.arena().check_owner()
    }

    /// Whether the bytes may be read without a pin (the userfaultfd modes).
    pub(crate) fn readable(&self) -> bool {
        self.rt.backend().readable()
    }

    /// Takes a pin: the first makes every page resident and the entry's (see
    /// `Region::pin_with`).
    pub(crate) fn pin(&self) -> Result<(), Error> {
        self.check_owner()?;
        let res = self.rt.backend().pin(self.region());
        self.readvise_due();
        res
    }

    /// Ends a pin; false if the region was not pinned (or this is a forked child).
    pub(crate) fn unpin(&self) -> bool {
        if self.check_owner().is_err() {
            return false;
        }
        let res = self.rt.backend().unpin(self.region(), self.rt.arena());
        self.readvise_due();
        res
    }

    /// SIGBUS mode has no thread: API calls, like faults, give filled chunks and unpinned
    /// regions their later advices when they are due (`fault::readvise`). In monitor mode the
    /// reader gives them (from every CPU, which a program's thread is not moved across).
    fn readvise_due(&self) {
        if let Backend::Sigbus { .. } = self.rt.backend() {
            readvise::due(self.rt.arena(), 4, readvise::Runner::Program);
        }
    }

    /// Copies `bytes` (the region's length) into the fresh region and makes them volatile.
    pub(crate) fn fill_from(&self, bytes: &[u8]) -> Result<(), Error> {
        self.check_owner()?;
        self.rt.backend().fill_from(self.region(), bytes)
    }
}

impl RegionHandle {
    /// Drops many handles of one runtime at once, as each `drop` would: one pass over the hazard
    /// slots for all of them and one `madvise` per run of neighbouring spans
    /// ([`Arena::free_many`](crate::arena::Arena::free_many)). Handles of other runtimes, or in a
    /// forked child, are dropped one by one.
    pub(crate) fn drop_all(handles: Vec<RegionHandle>) {
        let Some(first) = handles.first() else {
            return;
        };
        let rt = first.rt.clone();
        if rt.arena().forked() || handles.iter().any(|h| !Arc::ptr_eq(&h.rt, &rt)) {
            drop(handles);
            return;
        }
        for h in &handles {
            rt.arena()
                .publish(h.region().base(), h.region().pages(), std::ptr::null_mut());
        }
        let mut ptrs: Vec<*const Region> = handles
            .iter()
            .map(|h| h.ptr.as_ptr().cast_const())
            .collect();
        ptrs.sort_unstable();
        hazards().wait_unprotected_all(&ptrs);
        let mut spans = Vec::with_capacity(handles.len());
        let mut handles = handles;
        // Regions freed in address order (the order they were made, mostly): see `Cache::drop`.
        handles.sort_unstable_by_key(|h| h.ptr);
        for h in handles {
            let h = std::mem::ManuallyDrop::new(h);
            h.release();
            spans.push((h.region().base(), h.region().pages()));
            // SAFETY: made by `Region::boxed` in `adopt`; unpublished, no hazard and no count on
            // it (`release`), and `h` is never used again (ManuallyDrop: no second drop).
            unsafe { Region::free(h.ptr) };
            // SAFETY: `h` is not dropped (ManuallyDrop), so its runtime reference is read once.
            drop(unsafe { std::ptr::read(&h.rt) });
        }
        // SAFETY: every span's region is gone: unpublished, no fault path or hazard left.
        unsafe { rt.arena().free_many(&mut spans) };
    }

    /// After the region was unpublished and its hazards are gone: waits for the fault paths that
    /// took it before, and opens pages the emulated poison policy closed.
    fn release(&self) {
        self.region().wait_unused();
        if self.region().has_protected() {
            let (base, pages) = (self.region().base(), self.region().pages());
            // Pages the emulated poison policy made inaccessible: open them for the next user.
            // SAFETY: nobody uses the span any more; it is about to be dropped and reused.
            let _ = unsafe { crate::sys::mem::protect(base, pages * crate::sys::mem::PAGE, true) };
        }
    }
}

impl Drop for RegionHandle {
    fn drop(&mut self) {
        if self.rt.arena().forked() {
            // A forked child's copy: the span is not mapped here, and the hazard slots may hold
            // pointers of parent threads that do not exist here. Leave everything as it is.
            return;
        }
        let (base, pages) = (self.region().base(), self.region().pages());
        self.rt.arena().publish(base, pages, std::ptr::null_mut());
        hazards().wait_unprotected(self.ptr.as_ptr());
        // Fault paths that took the region before it was unpublished finish first.
        self.release();
        // SAFETY: no handle is left and no fault path reads the region (slots cleared, hazards
        // gone, count zero), so nobody uses the span.
        unsafe { self.rt.arena().free(base, pages) };
        // SAFETY: made by `Region::boxed` in `adopt`; nothing references it any more.
        unsafe { Region::free(self.ptr) };
    }
}
