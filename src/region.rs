//! A region: one volatile span with its regenerate callback, pin state and failure mark. Cache
//! entries (and later the allocator interfaces) own regions through `RegionHandle`.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::arena::Arena;
use crate::chunk::{Chunks, PinGate};
use crate::config::{FailurePolicy, FillChunk};
use crate::error::Error;
use crate::fill;
use crate::hazard;
use crate::runtime::Runtime;
use crate::stats::Counters;
use crate::sys::mem::{self, pages_for, UncheckedAdvice, PAGE};
use crate::testing::Step;

/// The error a regenerate callback returns.
pub type RegenError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type RegenFn = dyn Fn(usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync;

/// Largest entry: 1 TiB.
pub(crate) const MAX_LEN: usize = 1 << 40;

pub(crate) struct Region {
    pub base: usize,
    pub len: usize,
    pub pages: usize,
    pub chunk_pages: usize,
    pub regen: Box<RegenFn>,
    pub counters: Arc<Counters>,
    pub policy: FailurePolicy,
    /// Each chunk's fill state and failure mark (see `chunk.rs`).
    pub chunks: Chunks,
    /// Closed by a pin: no fill re-advises the region's pages while it is (see `chunk.rs`).
    pub gate: PinGate,
    /// Fault paths and pins using the region now (see [`RegionRef`]): the region is not freed
    /// until it is zero.
    active: AtomicUsize,
    pin_count: Mutex<usize>,
    pub pinned: AtomicUsize,
    pub last_error: Mutex<Option<String>>,
}

impl Region {
    /// The index of the first page of the fill chunk holding `addr` (an address in the span).
    pub(crate) fn chunk_first(&self, addr: usize) -> usize {
        (addr - self.base) / PAGE / self.chunk_pages * self.chunk_pages
    }

    /// The chunk holding page `page` (an index in the region).
    pub(crate) fn chunk_of_page(&self, page: usize) -> usize {
        page / self.chunk_pages
    }

    /// Chunk `c`'s first page (an index in the region) and its number of pages.
    pub(crate) fn chunk_pages_of(&self, c: usize) -> (usize, usize) {
        let first = c * self.chunk_pages;
        (first, self.chunk_pages.min(self.pages - first))
    }

    pub(crate) fn is_pinned(&self) -> bool {
        self.pinned.load(Ordering::Acquire) > 0
    }

    /// Whether any chunk's last fill failed (its pages read as zeros, or are poisoned).
    pub(crate) fn is_failed(&self) -> bool {
        self.chunks.failed_chunks() > 0
    }

    /// The message of the last failure, or a placeholder.
    pub(crate) fn error_text(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "unknown error".into())
    }

    /// Makes every page resident, non-volatile and the entry's (userfaultfd modes): the first
    /// pin closes the gate (no fill re-advises from then on), rebuilds missing and failed chunks
    /// from this thread, and populates every page for writing. A failure leaves the entry
    /// unpinned and returns `RegenerateFailed`; the failed chunk is then treated as any failed
    /// fill (zero-filled, poisoned, or left missing under the SIGBUS mode's poison policy), so
    /// other readers get the failure policy, never silent zeros.
    pub(crate) fn pin(&self, arena: &Arena) -> Result<(), Error> {
        arena.check_owner()?;
        if fill::filling_here(self.base) {
            return Err(Error::RegenerateFailed(
                "the regenerate callback pinned the entry it is rebuilding: it would wait for \
                 itself. A callback must compute the bytes without reading its own entry"
                    .into(),
            ));
        }
        let mut n = self.pin_count.lock().unwrap_or_else(|p| p.into_inner());
        if *n == 0 {
            self.gate.close();
            crate::testing::step(Step::PinStarted, self.base);
            if let Err(e) = fill::make_resident(arena.uffd(), self) {
                self.gate.open();
                // Pages made resident so far must become volatile again; failed chunks keep
                // their zeros or poison (an advice would drop the poison).
                for c in 0..self.chunks.len() {
                    if !self.chunks.is_failed(c) {
                        let (first, pages) = self.chunk_pages_of(c);
                        // SAFETY: unpinned bytes are volatile by contract.
                        let _ = unsafe {
                            mem::advise_unchecked(
                                self.base + first * PAGE,
                                pages * PAGE,
                                UncheckedAdvice::Free,
                            )
                        };
                    }
                }
                return Err(e);
            }
        }
        *n += 1;
        self.pinned.store(*n, Ordering::Release);
        Ok(())
    }

    /// Ends one pin; the last opens the gate and advises MADV_FREE again. Returns false (and
    /// does nothing) if the region is not pinned or this is a forked child.
    pub(crate) fn unpin(&self, arena: &Arena) -> bool {
        if arena.check_owner().is_err() {
            return false;
        }
        let mut n = self.pin_count.lock().unwrap_or_else(|p| p.into_inner());
        if *n == 0 {
            return false;
        }
        *n -= 1;
        if *n == 0 {
            self.gate.open();
            // SAFETY: unpinned bytes are volatile by contract: lost pages are regenerated.
            let _ = unsafe {
                mem::advise_unchecked(self.base, self.pages * PAGE, UncheckedAdvice::Free)
            };
        }
        self.pinned.store(*n, Ordering::Release);
        true
    }

    /// Records a failed fill's message (`may_allocate`: outside the SIGBUS handler).
    pub(crate) fn record_failure(&self, text: String) {
        self.counters.regen_failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut slot) = self.last_error.try_lock() {
            *slot = Some(text);
        }
    }
}

/// The hazard slots of every fault path. 256 slots: each is held for a few instructions only.
pub(crate) fn hazards() -> &'static hazard::Domain {
    static DOMAIN: OnceLock<hazard::Domain> = OnceLock::new();
    DOMAIN.get_or_init(|| hazard::Domain::new(256))
}

/// A region held by a fault path or a pin: it is not freed until this drops. Taken under a
/// hazard pointer, which is released at once, so hazard slots are held only for a few
/// instructions, never across a callback (a callback may fault on other entries, nested
/// without bound: slots held across them could run out and wait for each other forever).
pub(crate) struct RegionRef {
    ptr: NonNull<Region>,
}

impl RegionRef {
    /// The live region whose slot is `slot`, if any. Lock-free and allocation-free.
    pub(crate) fn from_slot(slot: &AtomicPtr<Region>) -> Option<RegionRef> {
        let guard = hazards().protect(slot)?;
        let r: &Region = guard.get();
        // While the hazard is published the remover waits (see `RegionHandle::drop`), so the
        // count is raised before it can look at it.
        r.active.fetch_add(1, Ordering::SeqCst);
        let ptr = NonNull::from(r);
        drop(guard);
        Some(RegionRef { ptr })
    }
}

impl std::ops::Deref for RegionRef {
    type Target = Region;
    fn deref(&self) -> &Region {
        // SAFETY: `active` counts this reference; the remover waits until it is zero.
        unsafe { self.ptr.as_ref() }
    }
}

impl Drop for RegionRef {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Owns a region: publishing it in the arena's lookup on creation, and on drop unpublishing it,
/// waiting until no fault path reads it, and giving its span back.
pub(crate) struct RegionHandle {
    ptr: NonNull<Region>,
    rt: Arc<Runtime>,
}

// SAFETY: Region is Send + Sync (atomics, mutexes and a Send + Sync callback); the handle only
// hands out shared references to it.
unsafe impl Send for RegionHandle {}
// SAFETY: as above.
unsafe impl Sync for RegionHandle {}

pub(crate) struct RegionSpec {
    pub len: usize,
    pub chunk: FillChunk,
    pub policy: FailurePolicy,
    pub counters: Arc<Counters>,
    pub align_pages: usize,
}

impl RegionHandle {
    pub(crate) fn new(
        rt: Arc<Runtime>,
        spec: RegionSpec,
        regen: Box<RegenFn>,
    ) -> Result<Self, Error> {
        if spec.len == 0 {
            return Err(Error::InvalidLength {
                len: 0,
                reason: "an entry must hold at least one byte",
            });
        }
        if spec.len > MAX_LEN {
            return Err(Error::InvalidLength {
                len: spec.len,
                reason: "larger than the 1 TiB limit of one entry",
            });
        }
        rt.arena().check_owner()?;
        let base = rt.arena().alloc(pages_for(spec.len), spec.align_pages)?;
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
        regen: Box<RegenFn>,
    ) -> Result<Self, Error> {
        rt.arena().check_owner()?;
        if spec.len == 0 || spec.len > MAX_LEN {
            return Err(Error::InvalidLength {
                len: spec.len,
                reason: "a volatile span holds 1 byte .. 1 TiB",
            });
        }
        let pages = pages_for(spec.len);
        let region = Box::new(Region {
            base,
            len: spec.len,
            pages,
            chunk_pages: spec.chunk.pages(pages),
            regen,
            counters: spec.counters,
            policy: spec.policy,
            chunks: Chunks::new(pages.div_ceil(spec.chunk.pages(pages))),
            gate: PinGate::new(),
            active: AtomicUsize::new(0),
            pin_count: Mutex::new(0),
            pinned: AtomicUsize::new(0),
            last_error: Mutex::new(None),
        });
        let ptr = NonNull::from(Box::leak(region));
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

    /// See [`Region::pin`].
    pub(crate) fn pin(&self) -> Result<(), Error> {
        let res = self.region().pin(self.rt.arena());
        // SIGBUS mode has no thread: API calls, like faults, give filled chunks their second
        // advice when it is due (`fill::readvise_due`).
        fill::readvise_due(self.rt.arena(), 4);
        res
    }

    /// See [`Region::unpin`].
    pub(crate) fn unpin(&self) -> bool {
        let res = self.region().unpin(self.rt.arena());
        fill::readvise_due(self.rt.arena(), 4);
        res
    }

    /// Copies `bytes` (the region's length) into the fresh region and makes them volatile.
    pub(crate) fn fill_from(&self, bytes: &[u8]) -> Result<(), Error> {
        self.rt.arena().check_owner()?;
        fill::fill_from(self.rt.arena().uffd(), self.region(), bytes)
    }
}

impl Drop for RegionHandle {
    fn drop(&mut self) {
        if self.rt.arena().forked() {
            // A forked child's copy: the span is not mapped here, and the hazard slots may hold
            // pointers of parent threads that do not exist here. Leave everything as it is.
            return;
        }
        let (base, pages) = {
            let r = self.region();
            (r.base, r.pages)
        };
        self.rt.arena().publish(base, pages, std::ptr::null_mut());
        hazards().wait_unprotected(self.ptr.as_ptr());
        // Fault paths and pins that took the region before it was unpublished finish first
        // (a fill in flight ends when its callback returns).
        let mut spins = 0;
        while self.region().active.load(Ordering::SeqCst) != 0 {
            crate::sync::backoff(&mut spins);
        }
        // SAFETY: no handle is left and no fault path reads the region (slots cleared, hazards
        // gone), so nobody uses the span.
        unsafe { self.rt.arena().free(base, pages) };
        // SAFETY: made by Box::leak in `new`; nothing references it any more.
        drop(unsafe { Box::from_raw(self.ptr.as_ptr()) });
    }
}
