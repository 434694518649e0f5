//! [`VolatileArena`]: the raw allocator over the runtime's slabs.

use std::alloc::Layout;
use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::Config;
use crate::error::Error;
use crate::handle::{self, RegionHandle};
use crate::mode::{Reads, Runtime};
use crate::region::{Profile, RegenError, RegionSpec};
use crate::stats::Counters;
use crate::sys::mem::{self, pages_for, UncheckedAdvice, PAGE};

/// Largest alignment served (1 GiB, the largest slab a growing arena maps at once).
pub const MAX_ALIGN: usize = 1 << 30;

/// Largest allocation: 64 GiB. An allocation's pages are mapped (to the shared zero page) when it
/// is made, which costs time and page tables in proportion to its size (about 50 ms and 2 MiB of
/// page tables per GiB on a current x86_64 machine), so larger requests are refused rather than
/// stalling for minutes.
pub const MAX_SIZE: usize = 64 << 30;

/// One live allocation. Its span is `base .. base + pages * PAGE`.
struct Block {
    base: usize,
    state: Mutex<BlockState>,
}

struct BlockState {
    pages: usize,
    /// Pins taken by `pin` and not yet ended by `unpin`.
    pins: usize,
    /// Set by `make_volatile`; owns the span from then on.
    region: Option<RegionHandle>,
    /// Deallocated: a thread that found the block before that must not use it.
    freed: bool,
}

impl Block {
    fn lock(&self) -> MutexGuard<'_, BlockState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An allocator of volatile-capable memory, over the slabs of the process-wide runtime of its
/// [`Mode`](crate::Mode).
///
/// * Raw interface with the contracts of [`GlobalAlloc`](std::alloc::GlobalAlloc):
///   [`alloc`](Self::alloc), [`dealloc`](Self::dealloc), [`realloc`](Self::realloc) (null on
///   failure), plus
///   [`make_volatile`](Self::make_volatile), [`pin`](Self::pin) and [`unpin`](Self::unpin) by
///   pointer. `GlobalAlloc` itself is implemented too, so the arena plugs in where that trait is
///   expected (not as the process's `#[global_allocator]`: it uses the system allocator itself).
/// * `allocator_api2::alloc::Allocator` for `&VolatileArena` (re-exported as
///   [`lazyfree::allocator_api2`](crate::allocator_api2)), so `allocator_api2::vec::Vec<T,
///   &VolatileArena>` and `allocator_api2::boxed::Box<[T], &VolatileArena>` work;
///   [`VolatileBox`](crate::VolatileBox) turns them into volatile values.
///
/// Memory from the arena starts *pinned*: ordinary, writable, zero-filled, never dropped (its
/// pages are mapped to the shared zero page up front, so reads and writes are ordinary faults the
/// kernel serves, never userfaultfd ones). Once filled, [`make_volatile`](Self::make_volatile)
/// (or [`VolatileBox::from_vec`](crate::VolatileBox::from_vec)) attaches a regenerate callback and advises the span
/// MADV_FREE: from then on the kernel may drop its pages under memory pressure, and a touch of a
/// dropped page rebuilds it through the callback, exactly as for cache entries.
///
/// # Every allocation is page-granular
///
/// Each allocation gets whole 4 KiB pages of its own (a 1-byte layout takes a page). The kernel
/// drops volatile memory page by page and the fault paths find a page's callback by its address,
/// one callback per page. If two allocations shared a page, a lost page would have to be rebuilt
/// by both callbacks, and a pinned allocation sharing a page with a volatile one would lose its
/// bytes when that page is dropped. Use the arena for buffers of kilobytes and more; keep small
/// objects inside one larger allocation.
///
/// # Limits and failures
///
/// Alignments up to [`MAX_ALIGN`] (1 GiB) and sizes up to [`MAX_SIZE`] (64 GiB) are served.
/// Zero sizes, larger sizes or alignments, sizes past the byte limit (`Config::budget`) and
/// kernel refusals fail cleanly: null from the raw interface, `AllocError` from `Allocator`
/// (which, as its contract asks, serves zero-size layouts with a dangling pointer instead).
/// Bad pointers (not from this arena, freed already) are ignored by `dealloc` and give
/// [`Error::BadPointer`] elsewhere.
///
/// Making an allocation costs time in proportion to its size (mapping the zero page: about 50 ms
/// per GiB), unlike `malloc`, which maps nothing until touched.
///
/// The arena is `Send + Sync`. Dropping it frees every allocation still live.
///
/// # Example
///
/// The smallest useful program: fill a vector in place, make it volatile, let the kernel take
/// it back, and read it again.
///
/// ```
/// use lazyfree::allocator_api2::vec::Vec;
/// use lazyfree::{Config, VolatileArena, VolatileBox};
///
/// fn square(off: usize, buf: &mut [u8]) -> Result<(), lazyfree::RegenError> {
///     for (i, b) in buf.iter_mut().enumerate() {
///         *b = ((off + i) * (off + i)) as u8;
///     }
///     Ok(())
/// }
///
/// let arena = VolatileArena::new(Config::default())?;
/// let mut v = Vec::with_capacity_in(1 << 20, &arena);
/// v.resize(1 << 20, 0u8);
/// square(0, &mut v);
/// let squares = VolatileBox::from_vec(v, square)?;
///
/// lazyfree::testing::reclaim_ptr(squares.as_ptr(), squares.len()); // what memory pressure does
/// assert_eq!(squares[12345], (12345usize * 12345) as u8); // rebuilt on touch
/// # Ok::<(), lazyfree::Error>(())
/// ```
pub struct VolatileArena {
    rt: Arc<Runtime>,
    config: Config,
    /// What the allocations' regions share (see `region::Profile`).
    profile: Arc<Profile>,
    limit: usize,
    used: AtomicUsize,
    blocks: Mutex<HashMap<usize, Arc<Block>>>,
}

impl VolatileArena {
    /// Makes an arena, starting the process-wide runtime for `config.mode` if needed.
    ///
    /// `config.fill_chunk` and `config.on_failure` apply to allocations made volatile.
    /// `config.budget`, if set, is a hard limit on the page-rounded bytes of the live
    /// allocations: an allocation past it fails (null or `AllocError`). Nothing is evicted: an
    /// allocator cannot take memory back from its owner.
    pub fn new(config: Config) -> Result<VolatileArena, Error> {
        // Allocations are read through plain pointers: a userfaultfd mode (Auto: monitor).
        let (rt, _) = Runtime::for_config(&config, Reads::Direct)?;
        Ok(VolatileArena {
            profile: handle::profile(
                rt.clone(),
                &config,
                Arc::new(Counters::default()),
                false,
                None,
            ),
            rt,
            limit: config.budget.unwrap_or(usize::MAX),
            config,
            used: AtomicUsize::new(0),
            blocks: Mutex::new(HashMap::new()),
        })
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The byte limit (`usize::MAX` if none).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Page-rounded bytes of the live allocations.
    pub fn allocated_bytes(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Number of live allocations.
    pub fn allocations(&self) -> usize {
        self.map().len()
    }

    fn map(&self) -> MutexGuard<'_, HashMap<usize, Arc<Block>>> {
        self.blocks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live block at `ptr`; `Err(ForkedChild)` in a forked child, where nothing of the
    /// arena's memory is mapped and its userfaultfd acts on the parent.
    fn block(&self, ptr: *const u8) -> Result<Arc<Block>, Error> {
        self.rt.arena().check_owner()?;
        self.map()
            .get(&(ptr as usize))
            .cloned()
            .ok_or(Error::BadPointer {
                addr: ptr as usize,
                reason: NOT_LIVE,
            })
    }

    /// Takes `pages` pages from the limit; false if they do not fit.
    fn charge(&self, pages: usize) -> bool {
        let bytes = pages * PAGE;
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(bytes).filter(|&n| n <= self.limit)
            })
            .is_ok()
    }

    fn uncharge(&self, pages: usize) {
        self.used.fetch_sub(pages * PAGE, Ordering::Relaxed);
    }

    /// Allocates a span for `layout`: pinned, zero-filled. Null on failure (zero size, size
    /// above [`MAX_SIZE`], alignment above [`MAX_ALIGN`], the byte limit, or the kernel).
    ///
    /// Unlike [`GlobalAlloc::alloc`](std::alloc::GlobalAlloc::alloc) this is safe: a zero-size
    /// layout gives null.
    pub fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some((pages, align_pages)) = span_of(layout) else {
            return std::ptr::null_mut();
        };
        if !self.charge(pages) {
            return std::ptr::null_mut();
        }
        let arena = self.rt.arena();
        let Ok(base) = arena.alloc(pages, align_pages) else {
            self.uncharge(pages);
            return std::ptr::null_mut();
        };
        if !self.zero_fill(base, pages) {
            // SAFETY: the span was carved just now; nobody else knows it, and no region was
            // published over it.
            unsafe { arena.free(base, pages) };
            self.uncharge(pages);
            return std::ptr::null_mut();
        }
        let block = Arc::new(Block {
            base,
            state: Mutex::new(BlockState {
                pages,
                pins: 0,
                region: None,
                freed: false,
            }),
        });
        self.map().insert(base, block);
        base as *mut u8
    }

    /// Makes a fresh span present as the shared zero page (UFFDIO_ZEROPAGE), so that the owner's
    /// reads and writes are ordinary faults the kernel serves itself (a write copies the zero
    /// page), never userfaultfd faults: the memory is pinned until it is made volatile.
    fn zero_fill(&self, base: usize, pages: usize) -> bool {
        self.rt.backend().zero_fill(base, pages)
    }

    /// Frees an allocation. A null pointer, or one that is not a live allocation of this arena
    /// (never allocated here, or already freed), is ignored.
    ///
    /// # Safety
    /// Nobody may use the allocation's bytes after this call (the contract of
    /// [`GlobalAlloc::dealloc`](std::alloc::GlobalAlloc::dealloc); `layout` itself is not relied
    /// on).
    pub unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = layout;
        let Some(block) = self.map().remove(&(ptr as usize)) else {
            return;
        };
        self.release(&block);
    }

    fn release(&self, block: &Block) {
        let mut st = block.lock();
        if st.freed {
            return;
        }
        st.freed = true;
        let pages = st.pages;
        match st.region.take() {
            // The handle unpublishes the region, waits for the fault paths and frees the span.
            Some(handle) => drop(handle),
            // SAFETY: the block is out of the map and marked freed, so no method uses the span
            // again; the owner gave it up by contract; no region covers it.
            None => unsafe { self.rt.arena().free(block.base, pages) },
        }
        drop(st);
        self.uncharge(pages);
    }

    /// Resizes an allocation to `new_size` bytes, keeping `layout.align()`, with the contract of
    /// [`GlobalAlloc::realloc`](std::alloc::GlobalAlloc::realloc): the first
    /// `min(layout.size(), new_size)` bytes are kept; null on failure, the old allocation then
    /// untouched.
    ///
    /// Shrinking a pinned allocation gives its tail pages back in place. Otherwise the bytes move
    /// to a new, pinned allocation; a volatile allocation is rebuilt first where pages were
    /// dropped (null if its callback fails) and the result is pinned, not volatile (a callback
    /// for the old size cannot rebuild the new one). Pins taken with [`pin`](Self::pin) end.
    ///
    /// # Safety
    /// `ptr` must be a live allocation of this arena allocated with `layout`; on success it must
    /// not be used any more.
    pub unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match Layout::from_size_align(new_size, layout.align()) {
            // SAFETY: forwarded from the caller.
            Ok(new) => unsafe { self.resize(ptr, layout.size(), new) }
                .map_or(std::ptr::null_mut(), |p| p.as_ptr()),
            Err(_) => std::ptr::null_mut(),
        }
    }

    /// `realloc` with a new alignment too.
    ///
    /// # Safety
    /// As for `realloc`; `old_size` is the size the caller allocated or last resized to.
    pub(super) unsafe fn resize(
        &self,
        ptr: *mut u8,
        old_size: usize,
        new: Layout,
    ) -> Option<NonNull<u8>> {
        let (new_pages, _) = span_of(new)?;
        let block = self.block(ptr).ok()?;
        let mut st = block.lock();
        if st.freed {
            return None;
        }
        if st.region.is_none() && new_pages <= st.pages && block.base % new.align() == 0 {
            let tail = st.pages - new_pages;
            if tail > 0 {
                // SAFETY: the tail lies past the new size, so the owner gave it up; it is part
                // of our span and no region covers it.
                unsafe { self.rt.arena().free(block.base + new_pages * PAGE, tail) };
                st.pages = new_pages;
                self.uncharge(tail);
            }
            st.pins = 0;
            return NonNull::new(ptr);
        }
        if let Some(h) = &st.region {
            // Rebuild what was dropped and keep it until the copy is done.
            h.pin().ok()?;
        }
        let new_ptr = self.alloc(new);
        if !new_ptr.is_null() {
            let n = old_size.min(new.size()).min(st.pages * PAGE);
            // SAFETY: both spans are live and at least `n` bytes long; they are distinct
            // allocations, so they do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(ptr, new_ptr, n) };
        }
        if let Some(h) = &st.region {
            h.unpin();
        }
        drop(st);
        if new_ptr.is_null() {
            return None;
        }
        let old = self.map().remove(&(ptr as usize));
        if let Some(block) = old {
            self.release(&block);
        }
        NonNull::new(new_ptr)
    }

    /// Attaches `regen` to a live allocation and advises its pages MADV_FREE: from now on the
    /// kernel may drop them, and a touch of a dropped page calls `regen(offset, buf)` to fill
    /// `buf` with the bytes at `offset` (in chunks of `config.fill_chunk`), as for cache entries.
    /// Pages never written since the allocation stay the zero page: they read as zeros and are
    /// never dropped.
    ///
    /// The bytes are read-only from now on except while pinned ([`pin`](Self::pin)); writes made
    /// while pinned are kept only until the last unpin, unless `regen` reproduces them.
    ///
    /// `regen` must not call this arena's methods for the allocation it rebuilds (`pin`,
    /// `realloc`, `dealloc` of it wait for the rebuild that is calling them).
    ///
    /// Fails with [`Error::BadPointer`] if `ptr` is not a live allocation of this arena, is
    /// volatile already, or is pinned, and with [`Error::InvalidLength`] if `layout` does not
    /// match its page count; the allocation is then unchanged.
    ///
    /// # Safety
    /// `layout.size()` bytes from `ptr` must be what `regen` produces (else reads return a mix),
    /// and from this call on nobody may write them except through a pin.
    pub unsafe fn make_volatile<F, E>(
        &self,
        ptr: *mut u8,
        layout: Layout,
        regen: F,
    ) -> Result<(), Error>
    where
        F: Fn(usize, &mut [u8]) -> Result<(), E> + Send + Sync + 'static,
        E: Into<RegenError>,
    {
        let block = self.block(ptr)?;
        let mut st = block.lock();
        let bad = |reason| Error::BadPointer {
            addr: ptr as usize,
            reason,
        };
        if st.freed {
            return Err(bad(NOT_LIVE));
        }
        if st.region.is_some() {
            return Err(bad(
                "the allocation is volatile already: make_volatile once per allocation",
            ));
        }
        if st.pins > 0 {
            return Err(bad(
                "the allocation is pinned: unpin it before making it volatile",
            ));
        }
        if layout.size() == 0 || pages_for(layout.size()) != st.pages {
            return Err(Error::InvalidLength {
                len: layout.size(),
                reason: "the layout does not match the allocation: pass the size it was \
                         allocated or last reallocated with",
            });
        }
        let spec = RegionSpec {
            len: layout.size(),
            profile: self.profile.clone(),
        };
        let regen = move |off: usize, buf: &mut [u8]| regen(off, buf).map_err(Into::into);
        // SAFETY: the span came from this runtime's arena in `alloc`, the block owns it and no
        // region covers it; from here the handle owns it (kept in the block, freed on dealloc).
        let handle = unsafe { RegionHandle::adopt(spec, block.base, regen) }?;
        // Every page is present (zero page or written), so no fault can reach the region before
        // this advice; after it, dropped pages are rebuilt through the region just published.
        // SAFETY: the caller promises the bytes are `regen`'s and unwritten from now on.
        let _ =
            unsafe { mem::advise_unchecked(block.base, st.pages * PAGE, UncheckedAdvice::Free) };
        st.region = Some(handle);
        Ok(())
    }

    /// Pins a live allocation: its pages are rebuilt where dropped, made resident and kept until
    /// a matching [`unpin`](Self::unpin), like `Entry::pin`. Pins nest. Pinning an allocation
    /// that is not volatile only counts the pin (its memory is never dropped anyway).
    ///
    /// Fails with [`Error::BadPointer`] if `ptr` is not a live allocation of this arena, and with
    /// [`Error::RegenerateFailed`] if rebuilding fails (the pin is then not taken).
    pub fn pin(&self, ptr: *const u8) -> Result<(), Error> {
        let block = self.block(ptr)?;
        let mut st = block.lock();
        if st.freed {
            return Err(Error::BadPointer {
                addr: ptr as usize,
                reason: NOT_LIVE,
            });
        }
        if let Some(h) = &st.region {
            h.pin()?;
        }
        st.pins += 1;
        Ok(())
    }

    /// Ends one pin; the last makes a volatile allocation's bytes volatile again (MADV_FREE).
    /// Fails with [`Error::BadPointer`] if `ptr` is not a live allocation or is not pinned.
    pub fn unpin(&self, ptr: *const u8) -> Result<(), Error> {
        let block = self.block(ptr)?;
        let mut st = block.lock();
        if st.freed || st.pins == 0 {
            return Err(Error::BadPointer {
                addr: ptr as usize,
                reason: if st.freed {
                    NOT_LIVE
                } else {
                    "the allocation is not pinned: unpin once per successful pin"
                },
            });
        }
        st.pins -= 1;
        if let Some(h) = &st.region {
            h.unpin();
        }
        Ok(())
    }

    /// Whether `ptr` is a live allocation of this arena made volatile.
    pub fn is_volatile(&self, ptr: *const u8) -> bool {
        self.block(ptr)
            .map(|b| b.lock().region.is_some())
            .unwrap_or(false)
    }

    /// Whether the last regeneration of the volatile allocation at `ptr` failed (its dropped
    /// pages then read as zeros under `FailurePolicy::Zero`; `pin` retries).
    pub fn is_failed(&self, ptr: *const u8) -> bool {
        self.block(ptr)
            .ok()
            .and_then(|b| b.lock().region.as_ref().map(|h| h.region().is_failed()))
            .unwrap_or(false)
    }
}

const NOT_LIVE: &str = "not a live allocation of this arena (never allocated here, or freed \
                        already): pass the pointer alloc or realloc returned";

/// Pages and alignment in pages for a layout, or `None` if it cannot be served.
fn span_of(layout: Layout) -> Option<(usize, usize)> {
    if layout.size() == 0 || layout.size() > MAX_SIZE || layout.align() > MAX_ALIGN {
        return None;
    }
    Some((pages_for(layout.size()), (layout.align() / PAGE).max(1)))
}

impl Drop for VolatileArena {
    fn drop(&mut self) {
        let blocks: Vec<Arc<Block>> = self.map().drain().map(|(_, b)| b).collect();
        for b in blocks {
            self.release(&b);
        }
    }
}

impl std::fmt::Debug for VolatileArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolatileArena")
            .field("config", &self.config)
            .field("allocations", &self.allocations())
            .field("allocated_bytes", &self.allocated_bytes())
            .finish()
    }
}
