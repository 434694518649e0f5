//! A region: one volatile span with its regenerate callback, pin state and failure mark. Cache
//! entries (and later the allocator interfaces) own regions through `RegionHandle`.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::{FailurePolicy, FillChunk};
use crate::error::Error;
use crate::hazard;
use crate::runtime::Runtime;
use crate::stats::Counters;
use crate::sys::mem::{self, pages_for, UncheckedAdvice, PAGE};

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
    /// The last regeneration failed and its pages hold zeros or poison.
    pub failed: AtomicBool,
    /// Failures so far (a pin compares it before and after its sweep).
    pub fail_seq: AtomicU64,
    /// A pin's sweep is running: failures zero-fill (never poison) and are reported by `pin`.
    pub pinning: AtomicBool,
    pin_count: Mutex<usize>,
    pub pinned: AtomicUsize,
    pub last_error: Mutex<Option<String>>,
}

impl Region {
    /// The index of the first page of the fill chunk holding `addr` (an address in the span).
    pub(crate) fn chunk_first(&self, addr: usize) -> usize {
        (addr - self.base) / PAGE / self.chunk_pages * self.chunk_pages
    }

    pub(crate) fn is_pinned(&self) -> bool {
        self.pinned.load(Ordering::Acquire) > 0
    }

    /// Makes every page resident and non-volatile: one atomic read-modify-write per page (a
    /// write cancels MADV_FREE; a missing page faults and is rebuilt first).
    pub(crate) fn pin(&self) -> Result<(), Error> {
        let mut n = self.pin_count.lock().unwrap_or_else(|p| p.into_inner());
        if *n == 0 {
            self.pinning.store(true, Ordering::SeqCst);
            if self.failed.load(Ordering::SeqCst) {
                // Drop zero-filled or poisoned pages so the sweep regenerates them; the mark
                // stays until a regeneration succeeds (`fill` clears it).
                // SAFETY: their bytes are not the entry's; regeneration rebuilds them.
                let _ = unsafe {
                    mem::advise_unchecked(self.base, self.pages * PAGE, UncheckedAdvice::DontNeed)
                };
            }
            let before = self.fail_seq.load(Ordering::SeqCst);
            for p in 0..self.pages {
                // SAFETY: the page lies in our span, mapped writable for the region's lifetime,
                // and page-aligned; the write leaves the bytes as they are.
                unsafe { mem::touch_write(self.base + p * PAGE) };
            }
            if self.fail_seq.load(Ordering::SeqCst) != before {
                // Drop what the failure zero-filled, so a later touch or pin retries; the entry
                // stays marked failed until a regeneration succeeds.
                // SAFETY: the pages a failure zero-filled are not the entry's bytes.
                let _ = unsafe {
                    mem::advise_unchecked(self.base, self.pages * PAGE, UncheckedAdvice::DontNeed)
                };
                self.failed.store(true, Ordering::SeqCst);
                self.pinning.store(false, Ordering::SeqCst);
                let msg = self
                    .last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_else(|| "unknown error".into());
                return Err(Error::RegenerateFailed(msg));
            }
            self.pinning.store(false, Ordering::SeqCst);
        }
        *n += 1;
        self.pinned.store(*n, Ordering::Release);
        Ok(())
    }

    /// Ends one pin; the last advises MADV_FREE again. Returns false (and does nothing) if the
    /// region is not pinned.
    pub(crate) fn unpin(&self) -> bool {
        let mut n = self.pin_count.lock().unwrap_or_else(|p| p.into_inner());
        if *n == 0 {
            return false;
        }
        *n -= 1;
        if *n == 0 {
            // SAFETY: unpinned bytes are volatile by contract: lost pages are regenerated.
            let _ = unsafe {
                mem::advise_unchecked(self.base, self.pages * PAGE, UncheckedAdvice::Free)
            };
        }
        self.pinned.store(*n, Ordering::Release);
        true
    }

    /// Copies `bytes` in with batched UFFDIO_COPY, then advises MADV_FREE from this thread.
    pub(crate) fn fill_from(&self, rt: &Runtime, bytes: &[u8]) -> Result<(), Error> {
        debug_assert_eq!(bytes.len(), self.len);
        let full = self.len / PAGE * PAGE;
        let uffd = rt.arena().uffd();
        let mut tries = 0;
        // Whole pages straight from the caller's buffer.
        let mut done = 0;
        while done < full {
            // SAFETY: bytes is readable for `full` bytes; the span is ours and registered.
            match unsafe { uffd.copy(self.base + done, bytes.as_ptr().add(done), full - done) } {
                crate::sys::uffd::Fill::Done { .. } => done = full,
                crate::sys::uffd::Fill::Retry { installed } => {
                    done += installed;
                    tries += 1;
                    if tries > 1000 {
                        return Err(Error::Kernel {
                            op: "UFFDIO_COPY (address space kept changing)",
                            errno: libc::EAGAIN,
                        });
                    }
                    crate::sys::os::sleep_ms(1);
                }
                crate::sys::uffd::Fill::Failed { errno, .. } => {
                    return Err(Error::Kernel {
                        op: "UFFDIO_COPY",
                        errno,
                    })
                }
            }
        }
        if full < self.len {
            let mut last = [0u8; PAGE];
            last[..self.len - full].copy_from_slice(&bytes[full..]);
            // SAFETY: `last` is one readable page; the destination page is in our span.
            let res = unsafe { uffd.copy(self.base + full, last.as_ptr(), PAGE) };
            if let crate::sys::uffd::Fill::Failed { errno, .. } = res {
                return Err(Error::Kernel {
                    op: "UFFDIO_COPY",
                    errno,
                });
            }
        }
        // SAFETY: the region is not pinned yet; its bytes are rebuildable.
        let _ =
            unsafe { mem::advise_unchecked(self.base, self.pages * PAGE, UncheckedAdvice::Free) };
        Ok(())
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
            failed: AtomicBool::new(false),
            fail_seq: AtomicU64::new(0),
            pinning: AtomicBool::new(false),
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
        hazard::wait_unprotected(self.ptr.as_ptr());
        // SAFETY: no handle is left and no fault path reads the region (slots cleared, hazards
        // gone), so nobody uses the span.
        unsafe { self.rt.arena().free(base, pages) };
        // SAFETY: made by Box::leak in `new`; nothing references it any more.
        drop(unsafe { Box::from_raw(self.ptr.as_ptr()) });
    }
}
