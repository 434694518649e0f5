//! [`RegionHandle`]: a region owned in a runtime's arena. What the public types (`Entry`,
//! `VolatileArena`'s allocations) hold: it keeps the runtime alive (its threads, fd and slabs
//! serve the region), publishes the region in the arena's lookup on creation, routes pins,
//! unpins and initial bytes to the runtime's backend, and when its last clone drops unpublishes
//! the region, waits until no fault path uses it and gives its span back.
//!
//! A handle is one pointer: the count of its clones is the region's (`Region::refs`), the owner's
//! recency stamps (where it keeps them) the region allocation's header (`Region::boxed`), so an
//! entry costs one allocation; the runtime is held by the region's profile (as its owner), which
//! every region of a cache or an arena shares ([`profile`]).
//!
//! Every operation checks first that this process is the one that made the runtime: in a forked
//! child the memory is not mapped and the userfaultfd acts on the parent (`Error::ForkedChild`).

use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::Config;
use crate::error::Error;
use crate::fault::readvise;
use crate::mode::{Backend, Runtime};
use crate::region::{check_len, hazards, Profile, RegenFn, Region, RegionSpec};
use crate::stats::Counters;

/// A counted reference to a region and its header; cloned, it counts one more (as `Arc`).
pub(crate) struct RegionHandle {
    ptr: NonNull<Region>,
}

/// The profile of the regions a cache or an arena makes in `rt` under `config`: the handles of
/// those regions reach the runtime through it. `stamped`: the regions carry the owner's recency
/// stamps ([`RegionHandle::stamps`]; a cache with a budget orders its entries by them), 16 bytes
/// each that other owners do not spend. `shared`: the function the regions share, if any
/// (`Profile::shared`).
pub(crate) fn profile(
    rt: Arc<Runtime>,
    config: &Config,
    counters: Arc<Counters>,
    stamped: bool,
    shared: Option<Arc<dyn std::any::Any + Send + Sync>>,
) -> Arc<Profile> {
    Profile::of(config, counters, Arc::new(Owner { rt, stamped }), shared)
}

/// The owner of a handle's region's profile.
struct Owner {
    rt: Arc<Runtime>,
    stamped: bool,
}

/// The header of a stamped region's allocation (see [`profile`]).
#[derive(Default)]
struct Stamps {
    used: AtomicU64,
    recorded: AtomicU64,
}

// SAFETY: Region is Send + Sync (atomics, mutexes and a Send + Sync callback), so is the header;
// the handle only hands out shared references to them.
unsafe impl Send for RegionHandle {}
// SAFETY: as above.
unsafe impl Sync for RegionHandle {}

impl RegionHandle {
    /// A region of `spec.len` bytes in a fresh span of the arena of the runtime of
    /// `spec.profile` (made by [`profile`]).
    pub(crate) fn new(spec: RegionSpec, regen: impl RegenFn) -> Result<Self, Error> {
        let pages = check_len(spec.len)?;
        assert!(
            spec.profile.owner.is::<Owner>(),
            "lazyfree: a region handle's profile must come from handle::profile"
        );
        let rt = &owner_of(&spec.profile).rt;
        rt.arena().check_owner()?;
        let base = rt.arena().alloc(pages, 1)?;
        // SAFETY: the span was just carved from the runtime's arena for us and no region covers
        // it; `adopt` cannot fail on the length checked above, so the span is not leaked.
        unsafe { Self::adopt(spec, base, regen) }
    }

    /// Makes a region over a span already carved from the arena of the runtime of
    /// `spec.profile` (the allocator interfaces allocate first and attach a callback later),
    /// publishing it like [`new`](Self::new). On success the handle owns the span and gives it
    /// back on drop; on error the caller still owns it.
    ///
    /// # Safety
    /// `[base, base + pages_for(spec.len) * PAGE)` must be a span of that arena returned by
    /// `Arena::alloc`, owned by the caller and covered by no other region.
    pub(crate) unsafe fn adopt(
        spec: RegionSpec,
        base: usize,
        regen: impl RegenFn,
    ) -> Result<Self, Error> {
        let pages = check_len(spec.len)?;
        assert!(
            spec.profile.owner.is::<Owner>(),
            "lazyfree: a region handle's profile must come from handle::profile"
        );
        let owner = owner_of(&spec.profile);
        owner.rt.arena().check_owner()?;
        let ptr = if owner.stamped {
            Region::boxed(Stamps::default(), base, spec, regen)
        } else {
            Region::boxed((), base, spec, regen)
        };
        let h = RegionHandle { ptr };
        h.rt().arena().publish(base, pages, h.ptr.as_ptr());
        Ok(h)
    }

    fn rt(&self) -> &Runtime {
        &owner_of(self.region().profile()).rt
    }

    /// The owner's recency stamps: when the region was last used, and as what it was last
    /// recorded.
    ///
    /// # Panics
    /// If the region's profile was not made `stamped` (a bug of the caller's: the region has no
    /// room for them).
    pub(crate) fn stamps(&self) -> (&AtomicU64, &AtomicU64) {
        assert!(
            owner_of(self.region().profile()).stamped,
            "lazyfree: recency stamps of a region made without them"
        );
        // SAFETY: a stamped profile's regions are made by `Region::boxed` with a `Stamps`
        // header in `adopt`; the region (and its header) lives until the last handle drops.
        let h = unsafe { Region::head::<Stamps>(self.ptr).as_ref() };
        (&h.used, &h.recorded)
    }

    /// Whether this is the only handle to the region (no clone of it exists anywhere).
    pub(crate) fn is_unique(&self) -> bool {
        self.region().refs().load(Ordering::Acquire) == 1
    }

    /// The region's address, which identifies it while a handle lives.
    pub(crate) fn id(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    pub(crate) fn region(&self) -> &Region {
        // SAFETY: the region lives until this handle drops.
        unsafe { self.ptr.as_ref() }
    }

    /// `Err(ForkedChild)` in a forked child of the process that made the region.
    pub(crate) fn check_owner(&self) -> Result<(), Error> {
        self.rt().arena().check_owner()
    }

    /// Whether the bytes may be read without a pin (the userfaultfd modes).
    pub(crate) fn readable(&self) -> bool {
        self.rt().backend().readable()
    }

    /// Takes a pin: the first makes every page resident and the entry's (see
    /// `Region::pin_with`).
    pub(crate) fn pin(&self) -> Result<(), Error> {
        self.check_owner()?;
        let res = self.rt().backend().pin(self.region());
        self.readvise_due();
        res
    }

    /// Ends a pin; false if the region was not pinned (or this is a forked child).
    pub(crate) fn unpin(&self) -> bool {
        if self.check_owner().is_err() {
            return false;
        }
        let res = self.rt().backend().unpin(self.region(), self.rt().arena());
        self.readvise_due();
        res
    }

    /// SIGBUS mode has no thread: API calls, like faults, give filled chunks and unpinned
    /// regions their later advices when they are due (`fault::readvise`). In monitor mode the
    /// reader gives them (from every CPU, which a program's thread is not moved across).
    fn readvise_due(&self) {
        if let Backend::Sigbus { .. } = self.rt().backend() {
            readvise::due(self.rt().arena(), 4, readvise::Runner::Program);
        }
    }

    /// Copies `bytes` (the region's length) into the fresh region and makes them volatile.
    pub(crate) fn fill_from(&self, bytes: &[u8]) -> Result<(), Error> {
        self.check_owner()?;
        self.rt().backend().fill_from(self.region(), bytes)
    }
}

impl RegionHandle {
    /// Drops many handles of one runtime at once, as each `drop` would: one pass over the hazard
    /// slots for all of them and one `madvise` per run of neighbouring spans
    /// ([`Arena::free_many`](crate::arena::Arena::free_many)). Handles of other runtimes, handles
    /// with clones elsewhere, and any in a forked child, are dropped one by one.
    pub(crate) fn drop_all(handles: Vec<RegionHandle>) {
        let Some(first) = handles.first() else {
            return;
        };
        // Keeps the runtime alive until the spans went back (the regions' references go
        // with them).
        let profile = first.region().profile().clone();
        let rt = &*owner_of(&profile).rt;
        if rt.arena().forked()
            || handles
                .iter()
                .any(|h| !std::ptr::eq(h.rt(), rt) || !h.is_unique())
        {
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
            // SAFETY: made by `Region::boxed` in `adopt`; the only handle (checked above: no
            // clone can appear, as only a handle's holder clones it); unpublished, no hazard and
            // no count on it (`release`), and `h` is never used again (ManuallyDrop: no second
            // drop). Its profile reference goes with it (`profile` above keeps the runtime).
            unsafe { Region::free(h.ptr) };
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

impl Clone for RegionHandle {
    #[inline]
    fn clone(&self) -> Self {
        let old = self.region().refs().fetch_add(1, Ordering::Relaxed);
        // As `Arc`: a count this high means clones are leaked in a loop; wrapping would free
        // the region under live handles.
        if old > u32::MAX / 2 {
            std::process::abort();
        }
        RegionHandle { ptr: self.ptr }
    }
}

impl Drop for RegionHandle {
    #[inline]
    fn drop(&mut self) {
        // As `Arc`: the last handle's drop sees every other's uses of the region.
        if self.region().refs().fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        fence(Ordering::Acquire);
        self.teardown();
    }
}

impl RegionHandle {
    /// The last handle's drop: gives the region and its span back.
    #[cold]
    #[inline(never)]
    fn teardown(&mut self) {
        if self.rt().arena().forked() {
            // A forked child's copy: the span is not mapped here, and the hazard slots may hold
            // pointers of parent threads that do not exist here. Leave everything as it is but
            // the region's reference to its profile (which holds the runtime).
            // SAFETY: made by `Region::boxed` in `adopt`; the last handle, never used again.
            unsafe { Region::forget(self.ptr) };
            return;
        }
        let (base, pages) = (self.region().base(), self.region().pages());
        self.rt().arena().publish(base, pages, std::ptr::null_mut());
        hazards().wait_unprotected(self.ptr.as_ptr());
        // Fault paths that took the region before it was unpublished finish first.
        self.release();
        // SAFETY: no handle is left and no fault path reads the region (slots cleared, hazards
        // gone, count zero), so nobody uses the span.
        unsafe { self.rt().arena().free(base, pages) };
        // SAFETY: made by `Region::boxed` in `adopt`; nothing references it any more. Its
        // profile (and the runtime) reference is dropped with it, after the span went back.
        unsafe { Region::free(self.ptr) };
    }
}

/// The owner of the regions of `profile`: checked once per region, where it is made
/// ([`RegionHandle::new`], [`RegionHandle::adopt`]).
fn owner_of(profile: &Profile) -> &Owner {
    // SAFETY: every profile reaching here was checked to have an `Owner` (a profile made by
    // [`profile`]): by `new` and `adopt` before their calls, and a region's by its `adopt`.
    unsafe { profile.owner::<Owner>() }
}
