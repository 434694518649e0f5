//! A region: one volatile span with its regenerate callback, its chunks' states, its pin count and
//! its failure record. A leaf: it knows nothing of slabs, modes or fault paths. Those call in:
//! the fault paths through [`Region::regenerate`] (the one callback wrapper) and the chunk
//! states, the modes through [`Region::pin_with`] / [`Region::unpin_with`] (the pin protocol,
//! with the mode's own way to make pages resident and volatile again).
//!
//! ## Pins
//! The first pin closes the region's pin gate (`chunk.rs`: no fill re-advises its pages from
//! then on) and makes every page resident the mode's way; the last unpin opens the gate and makes
//! the pages volatile again. Pins nest and are counted under one lock, which also serializes a
//! first pin against a last unpin. A callback that pins the entry it is rebuilding would wait
//! for itself: that pin returns an error instead (the thread's fills are tracked in
//! `FILLING_HERE`).
//!
//! States of a region's pins (under the pin lock), and the gate in each:
//! - **volatile**: no pin; gate open; pages advised MADV_FREE (the kernel may drop them);
//! - **pinned**: count > 0; gate closed; every page resident, written, the entry's;
//! - **lingering** (modes that can end it later: monitor): count 0 after an unpin within the
//!   region's unpin delay; gate still closed, pages still as the pin left them.
//!
//! The pin state (count, lingering, the explicit mode's marks) and the last failure's message
//! are a side block ([`Side`]) made by the first pin or the first failure (in explicit mode
//! also by an entry's initial bytes, which need marks; in the SIGBUS handler, which must not
//! allocate, taken from blocks made in advance) and kept until the region drops: most entries
//! are never pinned and never fail, and until then the region holds a null pointer in its place
//! (the region is most of an entry's metadata, 80 bytes: the block inline would add 56).
//!
//! ## One allocation
//! A region, its owner's header (a handle's recency stamps, where its owner keeps them) and its
//! callback are one allocation (`Region::boxed`); what all regions of an owner share (counters,
//! failure policy, fill chunk, unpin delay, read-ahead, the owner's runtime) is one `Profile`
//! they point to (the pages of a chunk are computed from it, not kept); the owner's count of
//! its handles is a word of the region's (`Region::refs`); the states of up to 7 chunks and
//! where a sequential reader is take one word (`chunk.rs`), the side block another.
//!
//! Transitions: volatile → pinned (first pin: close the gate, make resident; on failure back to
//! volatile); pinned → pinned (nested pin/unpin); pinned → volatile (last unpin without delay:
//! open the gate, advise); pinned → lingering (last unpin with a delay, queued to end); lingering
//! → pinned (first pin: nothing to do); lingering → volatile (`end_linger` once the delay is
//! over: open the gate, then advise). Every transition is under the pin lock, so an ending
//! linger and a first pin are ordered: the pin either finds the region lingering (and takes it
//! as it is) or volatile (and does the full work). The end of a linger advises after the pin
//! lock (from every CPU: `fault::readvise::lingers_ended`): the gate orders that advice against
//! a pin that comes first (the pin closes it and waits for advices inside; one that comes after
//! finds it closed and advises nothing).
//!
//! ## Lifetime
//! Fault paths find a region through the arena's slots under a hazard pointer (`hazard.rs`) and
//! turn it at once into a count on the region ([`RegionRef`]): the owner frees the region only
//! after unpublishing it, waiting for the hazards and then for the count to drop to zero.

use std::any::Any;
use std::cell::Cell;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::chunk::{Chunks, PinGate};
use crate::config::{FailurePolicy, FillChunk};
use crate::error::Error;
use crate::hazard;
use crate::hook::{self, Step};
use crate::slot::Slot;
use crate::stats::Counters;
use crate::sys::mem::{pages_for, PAGE};
use crate::sys::os;

/// A failure's message, boxed: a region without one holds one null word (a `String` is three).
/// The SIGBUS handler fills reserved ones without allocating.
#[allow(clippy::box_collection)]
pub(crate) type ErrorText = Box<String>;

/// Where a region keeps its last failure's message (one word: see `slot.rs`).
pub(crate) type ErrorSlot = Slot<String>;

/// The error a regenerate callback returns.
pub type RegenError = Box<dyn std::error::Error + Send + Sync>;

/// What rebuilds a region's bytes: `regen(offset, buf)`, a closure of the entry's own, or a
/// value that calls a function all regions of its owner share (kept in their [`Profile`], so
/// that each region need not hold a pointer to it: a keyed cache's entries hold only their key,
/// see `cache/mod.rs`).
pub(crate) trait RegenFn: Send + Sync + 'static {
    /// Fills `buf` with the bytes at `off` of a region whose profile is `profile`.
    fn regen(&self, profile: &Profile, off: usize, buf: &mut [u8]) -> Result<(), RegenError>;
}

impl<F> RegenFn for F
where
    F: Fn(usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync + 'static,
{
    #[inline]
    fn regen(&self, _: &Profile, off: usize, buf: &mut [u8]) -> Result<(), RegenError> {
        self(off, buf)
    }
}

/// A region, its owner's header `H` and its callback in one allocation (the callback and the
/// owner's fields need no allocation of their own): what [`Region::boxed`] makes and
/// [`Region::free`] frees. `repr(C)`: the region's offset depends on `H` only, so an owner finds
/// its header from the region's pointer ([`Region::head`]) without knowing the callback's type.
#[repr(C)]
struct Owned<H, F> {
    head: H,
    region: Region,
    regen: F,
}

/// Calls the callback at `data` (of the type the function was made for) with an offset and a
/// buffer.
type CallRegen = unsafe fn(NonNull<()>, &Profile, usize, &mut [u8]) -> Result<(), RegenError>;

/// How to call and free a region's callback (and its owner's header), whatever their types: one
/// per pair of types.
struct RegenVt {
    call: CallRegen,
    free: unsafe fn(NonNull<Region>),
}

trait HasVt<H> {
    const VT: RegenVt;
}

impl<H: Send + Sync + 'static, F: RegenFn> HasVt<H> for F {
    const VT: RegenVt = RegenVt {
        call: call_regen::<F>,
        free: free_owned::<H, F>,
    };
}

/// # Safety
/// `data` points to the `regen` of a live `Owned<_, F>`.
unsafe fn call_regen<F: RegenFn>(
    data: NonNull<()>,
    profile: &Profile,
    off: usize,
    buf: &mut [u8],
) -> Result<(), RegenError> {
    // SAFETY: as the caller promises; the callback is only ever shared.
    let f = unsafe { data.cast::<F>().as_ref() };
    f.regen(profile, off, buf)
}

/// Where the `Owned<H, _>` holding the region at `p` starts.
///
/// # Safety
/// `p` was made by `Region::boxed::<H, _>` (it carries the whole allocation's provenance).
unsafe fn owned_of<H, F>(p: NonNull<Region>) -> *mut Owned<H, F> {
    // The region's offset in `Owned<H, F>` is the same for every `F` (`repr(C)`: the callback
    // comes after it).
    let off = std::mem::offset_of!(Owned<H, F>, region);
    // SAFETY: as the caller promises, `p` lies `off` bytes into an `Owned<H, F>`.
    unsafe { p.as_ptr().cast::<u8>().sub(off).cast::<Owned<H, F>>() }
}

/// # Safety
/// `p` was made by `Region::boxed::<H, F>` and nothing uses it any more.
unsafe fn free_owned<H, F: RegenFn>(p: NonNull<Region>) {
    // SAFETY: as the caller promises; the allocation was made by `Box::new` of this type.
    drop(unsafe { Box::from_raw(owned_of::<H, F>(p)) });
}

/// A region's callback: its type's functions and where it lies (next to the region).
struct RegenRef {
    vt: &'static RegenVt,
    data: NonNull<()>,
}

// SAFETY: `data` points to an `F: RegenFn`, which is `Send + Sync`, and is only shared.
unsafe impl Send for RegenRef {}
// SAFETY: as above.
unsafe impl Sync for RegenRef {}

/// Largest entry: 1 TiB.
pub(crate) const MAX_LEN: usize = 1 << 40;

/// The one length check of an entry or a volatile allocation: 1 byte to 1 TiB. Returns its
/// pages.
pub(crate) fn check_len(len: usize) -> Result<usize, Error> {
    if len == 0 {
        return Err(Error::InvalidLength {
            len,
            reason: "an entry must hold at least one byte",
        });
    }
    if len > MAX_LEN {
        return Err(Error::InvalidLength {
            len,
            reason: "larger than the 1 TiB limit of one entry",
        });
    }
    Ok(pages_for(len))
}

/// What every region of one owner (a cache, an allocator's arena) shares, made once per owner:
/// a region holds one pointer to it instead of a copy of each field.
pub(crate) struct Profile {
    pub counters: Arc<Counters>,
    pub chunk: FillChunk,
    pub policy: FailurePolicy,
    /// How long the last unpin leaves the pages resident (see `Region::unpin_with`).
    pub unpin_delay: std::time::Duration,
    /// Most bytes a fault path may fill ahead of a sequential fault (see `Region::ahead_of`).
    pub read_ahead: usize,
    /// What the regions keep alive for their owner (the handle layer's runtime: `handle.rs`).
    pub owner: Arc<dyn Any + Send + Sync>,
    /// A function every region of the owner calls to rebuild its bytes, if the owner has one
    /// (a keyed cache's: see [`RegenFn`]).
    pub shared: Option<Arc<dyn Any + Send + Sync>>,
}

impl Profile {
    /// The profile of the regions made under `config`.
    pub(crate) fn of(
        config: &crate::config::Config,
        counters: Arc<Counters>,
        owner: Arc<dyn Any + Send + Sync>,
        shared: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Arc<Profile> {
        Arc::new(Profile {
            counters,
            chunk: config.fill_chunk,
            policy: config.on_failure,
            unpin_delay: config.unpin_delay,
            read_ahead: config.read_ahead,
            owner,
            shared,
        })
    }

    /// The owner, as the type it was made from, without a check (a read of the hot paths).
    ///
    /// # Safety
    /// `owner` was made from an `Arc<O>`.
    pub(crate) unsafe fn owner<O: Any>(&self) -> &O {
        debug_assert!(self.owner.is::<O>());
        // SAFETY: as the caller promises, the data behind the `dyn` is an `O` (alive as long as
        // `self`).
        unsafe { &*Arc::as_ptr(&self.owner).cast::<O>() }
    }
}

/// What a region is made with.
pub(crate) struct RegionSpec {
    pub len: usize,
    pub profile: Arc<Profile>,
}

/// Why a chunk could not be regenerated. The SIGBUS handler must neither format nor drop it (the
/// boxes free memory), so it is handed on whole.
pub(crate) enum Failure {
    /// No scratch memory could be had for the chunk.
    NoScratch,
    /// The callback returned an error.
    Error(RegenError),
    /// The callback panicked; the panic payload (dropped outside the SIGBUS handler).
    Panic(Box<dyn Any + Send>),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NoScratch => f.write_str("no scratch memory for the chunk"),
            Failure::Error(e) => write!(f, "{e}"),
            Failure::Panic(p) => {
                f.write_str("the callback panicked")?;
                // The message of `panic!("...")` or `panic!("{x}")`, where there is one.
                match (p.downcast_ref::<&str>(), p.downcast_ref::<String>()) {
                    (Some(m), _) => write!(f, ": {m}"),
                    (_, Some(m)) => write!(f, ": {m}"),
                    _ => Ok(()),
                }
            }
        }
    }
}

thread_local! {
    /// Bases of the regions whose callbacks this thread is running now, innermost last.
    /// Const-initialized plain cells: safe to touch in the SIGBUS handler (no allocation, no
    /// destructor).
    static FILLING_HERE: Cell<[usize; 16]> = const { Cell::new([0; 16]) };
    /// The chunks (start, length) those callbacks rebuild, in the same order.
    static FILLING_CHUNK: Cell<[(usize, usize); 16]> = const { Cell::new([(0, 0); 16]) };
    static FILLING_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Marks, for its lifetime, that this thread runs a callback of the region at `base`, for the
/// chunk `chunk` (start, length).
struct FillingHere;

impl FillingHere {
    fn enter(base: usize, chunk: (usize, usize)) -> FillingHere {
        let d = FILLING_DEPTH.get();
        if d < 16 {
            let mut here = FILLING_HERE.get();
            here[d] = base;
            FILLING_HERE.set(here);
            let mut chunks = FILLING_CHUNK.get();
            chunks[d] = chunk;
            FILLING_CHUNK.set(chunks);
        }
        FILLING_DEPTH.set(d + 1);
        FillingHere
    }
}

impl Drop for FillingHere {
    fn drop(&mut self) {
        FILLING_DEPTH.set(FILLING_DEPTH.get() - 1);
    }
}

/// Whether this thread is inside a callback of the region at `base`.
fn filling_here(base: usize) -> bool {
    let d = FILLING_DEPTH.get().min(16);
    FILLING_HERE.get()[..d].contains(&base)
}

/// Whether this thread is inside a callback rebuilding the chunk that holds `addr`: a fault of
/// this thread there is the callback reading the bytes it is asked for, which would wait for
/// itself. Safe in the SIGBUS handler (plain thread-local cells).
pub(crate) fn filling_chunk_here(addr: usize) -> bool {
    let d = FILLING_DEPTH.get().min(16);
    FILLING_CHUNK.get()[..d]
        .iter()
        .any(|&(start, len)| addr >= start && addr - start < len)
}

/// What [`Region::check_linger`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Linger {
    /// A pin or unpin holds the lock: ask again later.
    Busy,
    /// Still lingering, its delay not over: ask again later.
    NotYet,
    /// No longer lingering (ended now, or pinned again): the region is out of the queue.
    Done,
}

/// The pin count, and the explicit mode's marks.
pub(crate) struct PinState {
    count: usize,
    /// Unpinned, but the last pin's work not undone yet (see `Region::unpin_with`).
    lingering: bool,
    /// When the lingering may end (monotonic ns): the last unpin's time plus the delay.
    linger_until: u64,
    /// Whether the region is in the queue of whoever ends lingering (so an unpin queues it once).
    linger_queued: bool,
    /// Explicit mode: each page's real first word while the page holds the marker.
    pub marks: Vec<u64>,
}

/// What a region needs only once it is pinned or a fill of it failed: made then (most entries
/// are never pinned and never fail), freed with the region.
pub(crate) struct Side {
    /// The pin count and the explicit mode's marks.
    pins: Mutex<PinState>,
    /// The last failure's message (a box: one word while there is none).
    last_error: ErrorSlot,
}

impl Side {
    /// A side block for a region that has none yet. The SIGBUS handler takes ones made in
    /// advance (`mode::sigbus::reserves`): it must not allocate.
    pub(crate) fn spare() -> Box<Side> {
        Box::new(Side {
            pins: Mutex::new(PinState {
                count: 0,
                lingering: false,
                linger_until: 0,
                linger_queued: false,
                marks: Vec::new(),
            }),
            last_error: Slot::new(),
        })
    }
}

pub(crate) struct Region {
    base: usize,
    len: usize,
    /// The callback, in the same allocation (see [`Region::boxed`]).
    regen: RegenRef,
    /// What the owner's regions share (counters, settings, the owner's runtime).
    profile: Arc<Profile>,
    /// Each chunk's fill state and failure mark (see `chunk.rs`).
    chunks: Chunks,
    /// Closed by a pin: no fill re-advises the region's pages while it is (see `chunk.rs`).
    gate: PinGate,
    /// Fault paths and pins using the region now (see [`RegionRef`]).
    active: AtomicU32,
    /// The owner's references to the region (its handles: `handle.rs`), one word with the
    /// others rather than one of its own in the owner's header.
    refs: AtomicU32,
    /// Chunks made inaccessible by the poison policy's emulation (monitor mode without
    /// UFFDIO_POISON; see `fault::fill::apply_failure`): their span must be opened again before
    /// it is rebuilt or reused.
    protected: AtomicBool,
    /// Whether the pin count is above zero or a first pin is under way (set before it makes
    /// the pages resident, cleared if it fails), readable without the lock.
    pinned: AtomicBool,
    /// The pin state and the last failure's message, made by the first pin or failure; null
    /// until then. Published once, never replaced, freed with the region.
    side: AtomicPtr<Side>,
}

impl Drop for Region {
    fn drop(&mut self) {
        let p = *self.side.get_mut();
        if !p.is_null() {
            // SAFETY: made by `Box::into_raw` (`Side::spare`) and published once (`install_side`);
            // `&mut self` means no reference to it is left.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

impl Region {
    /// A region over `[base, base + pages_for(spec.len) * PAGE)` (`spec.len` passed
    /// `check_len`), with its owner's header `head` and `regen` in the same allocation: an
    /// entry's callback and its handle's fields cost no allocation of their own (a keyed
    /// cache's callback holds the entry's key and the cache's one function). Freed only by
    /// [`free`](Self::free); the header is reached with [`head`](Self::head).
    pub(crate) fn boxed<H: Send + Sync + 'static, F: RegenFn>(
        head: H,
        base: usize,
        spec: RegionSpec,
        regen: F,
    ) -> NonNull<Region> {
        let placeholder = RegenRef {
            vt: &<F as HasVt<H>>::VT,
            data: NonNull::dangling(),
        };
        let raw = Box::into_raw(Box::new(Owned {
            head,
            region: Region::new(base, spec, placeholder),
            regen,
        }));
        // SAFETY: `raw` is a fresh, valid allocation that nothing else sees yet; the addresses
        // are taken from it, so they keep the whole allocation's provenance.
        unsafe {
            (*raw).region.regen.data =
                NonNull::new_unchecked(std::ptr::addr_of_mut!((*raw).regen)).cast();
            NonNull::new_unchecked(std::ptr::addr_of_mut!((*raw).region))
        }
    }

    /// The header of the region at `p`.
    ///
    /// # Safety
    /// `p` is a pointer [`boxed`](Self::boxed) returned for a header of type `H` (the whole
    /// allocation's provenance), and the region is not freed while the result is used.
    pub(crate) unsafe fn head<H>(p: NonNull<Region>) -> NonNull<H> {
        // SAFETY: as the caller promises; `head` is the first field of `repr(C)` `Owned`.
        unsafe { NonNull::new_unchecked(owned_of::<H, ()>(p).cast::<H>()) }
    }

    /// Gives a region up in a forked child of the process that made it, where its memory and
    /// state are the parent's: drops only its reference to its profile (the counts on the
    /// profile and its owner stay right in the child) and leaks the rest.
    ///
    /// # Safety
    /// As for [`free`](Self::free); the region is never used again.
    pub(crate) unsafe fn forget(p: NonNull<Region>) {
        // SAFETY: as the caller promises, nothing uses the region; its profile field is dropped
        // once and never read again (the allocation is leaked, never freed).
        unsafe { std::ptr::drop_in_place(std::ptr::addr_of_mut!((*p.as_ptr()).profile)) }
    }

    /// Frees a region made by [`boxed`](Self::boxed), with its header and its callback.
    ///
    /// # Safety
    /// `p` is the very pointer `boxed` returned (it carries the whole allocation's provenance; a
    /// pointer made from a `&Region`, as `RegionRef` holds, has the address but covers the
    /// region only), and nothing uses the region or its header any more (and nothing will).
    pub(crate) unsafe fn free(p: NonNull<Region>) {
        // SAFETY: the region is alive until the call below frees it.
        let free = unsafe { p.as_ref() }.regen.vt.free;
        // SAFETY: as the caller promises; `free` is the one of the types `boxed` was given.
        unsafe { free(p) }
    }

    fn new(base: usize, spec: RegionSpec, regen: RegenRef) -> Region {
        let pages = pages_for(spec.len);
        let chunk_pages = spec.profile.chunk.pages(pages);
        Region {
            base,
            len: spec.len,
            regen,
            profile: spec.profile,
            chunks: Chunks::new(pages.div_ceil(chunk_pages)),
            gate: PinGate::new(),
            active: AtomicU32::new(0),
            refs: AtomicU32::new(1),
            protected: AtomicBool::new(false),
            pinned: AtomicBool::new(false),
            side: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    pub(crate) fn base(&self) -> usize {
        self.base
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn pages(&self) -> usize {
        pages_for(self.len)
    }

    pub(crate) fn policy(&self) -> FailurePolicy {
        self.profile.policy
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.profile.counters
    }

    pub(crate) fn profile(&self) -> &Arc<Profile> {
        &self.profile
    }

    /// The owner's count of its references to the region (1 when made): see `handle.rs`.
    pub(crate) fn refs(&self) -> &AtomicU32 {
        &self.refs
    }

    pub(crate) fn chunks(&self) -> &Chunks {
        &self.chunks
    }

    pub(crate) fn gate(&self) -> &PinGate {
        &self.gate
    }

    /// Pages per fill chunk (the last chunk may have fewer): the profile's for this length,
    /// computed rather than kept (the region's bytes are most of an entry's metadata).
    fn chunk_pages(&self) -> usize {
        self.profile.chunk.pages(self.pages())
    }

    /// The chunk holding page `page` (an index in the region).
    pub(crate) fn chunk_of_page(&self, page: usize) -> usize {
        page / self.chunk_pages()
    }

    /// The chunk holding `addr` (an address in the span).
    pub(crate) fn chunk_of_addr(&self, addr: usize) -> usize {
        self.chunk_of_page((addr - self.base) / PAGE)
    }

    /// Chunk `c`'s first page (an index in the region) and its number of pages.
    pub(crate) fn chunk_pages_of(&self, c: usize) -> (usize, usize) {
        let per = self.chunk_pages();
        let first = c * per;
        (first, per.min(self.pages() - first))
    }

    /// Chunk `c`'s start address and length in bytes.
    pub(crate) fn chunk_span(&self, c: usize) -> (usize, usize) {
        let (first, n) = self.chunk_pages_of(c);
        (self.base + first * PAGE, n * PAGE)
    }

    /// A fault on chunk `c` was served by filling it: returns how many chunks after it to fill
    /// ahead (0 for a fault that does not follow the last one). Sequential faults double the
    /// window (1, 2, 4, ... up to `Profile::read_ahead`); any other fault resets it. Racing
    /// faults of several threads may each see the other's state: the window is a hint.
    pub(crate) fn ahead_of(&self, c: usize) -> usize {
        let ahead_max = self.profile.read_ahead / (self.chunk_pages() * PAGE);
        if ahead_max == 0 {
            return 0;
        }
        let (next, window) = self.chunks.ahead();
        let window = if next == c + 1 {
            (window * 2).clamp(1, ahead_max)
        } else {
            0
        };
        let window = window.min(self.chunks.len() - 1 - c);
        // The next fault of a sequential reader comes after the chunks filled ahead.
        self.chunks.set_ahead(c + 1 + window + 1, window);
        window
    }

    /// Records that some of its pages were made inaccessible (see `protected`).
    pub(crate) fn mark_protected(&self) {
        self.protected.store(true, Ordering::SeqCst);
    }

    /// Whether some of its pages may be inaccessible.
    pub(crate) fn has_protected(&self) -> bool {
        self.protected.load(Ordering::SeqCst)
    }

    pub(crate) fn is_pinned(&self) -> bool {
        self.pinned.load(Ordering::Acquire)
    }

    /// Whether any chunk's last fill failed (its pages read as zeros, or are poisoned).
    pub(crate) fn is_failed(&self) -> bool {
        self.chunks.failed_chunks() > 0
    }

    /// The message of the last failure, if any.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.side_if_made()?.last_error.read(String::clone)
    }

    /// Where a failure's message is kept, if the side block is made (the SIGBUS handler fills
    /// it without allocating, after [`install_side`](Self::install_side) where it is not).
    pub(crate) fn last_error_slot(&self) -> Option<&ErrorSlot> {
        Some(&self.side_if_made()?.last_error)
    }

    /// The message of the last failure, or a placeholder.
    pub(crate) fn error_text(&self) -> String {
        self.last_error().unwrap_or_else(|| "unknown error".into())
    }

    /// Records a failed fill with its message (outside the SIGBUS handler).
    pub(crate) fn record_failure(&self, text: String) {
        self.counters()
            .regen_failures
            .fetch_add(1, Ordering::Relaxed);
        // (A reader cloning the last message now: this one is dropped, as the next failure's
        // would replace it.)
        let _ = self.side().last_error.try_put(Box::new(text));
    }

    /// The one callback wrapper: fills `buf` with the region's bytes at `off` (`buf`'s tail past
    /// the region's length zeroed), catching panics, timing the call and counting it.
    pub(crate) fn regenerate(&self, off: usize, buf: &mut [u8]) -> Result<(), Failure> {
        let data_len = buf.len().min(self.len - off);
        buf[data_len..].fill(0);
        let _here = FillingHere::enter(self.base, self.chunk_span(self.chunk_of_page(off / PAGE)));
        let t0 = os::now_ns();
        let res = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: `data` is this region's callback, of the type `vt` was made for; it
            // lives as long as the region.
            unsafe {
                (self.regen.vt.call)(self.regen.data, &self.profile, off, &mut buf[..data_len])
            }
        }));
        self.counters()
            .record_regen(os::now_ns().saturating_sub(t0));
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Failure::Error(e)),
            Err(p) => Err(Failure::Panic(p)),
        }
    }

    /// The pin state, made now if no pin made it yet. Not in the SIGBUS handler (it may
    /// allocate): pins, unpins and the explicit mode's marks only.
    fn pins(&self) -> &Mutex<PinState> {
        &self.side().pins
    }

    /// The pin state if a pin (or a failure) made it.
    fn pins_if_made(&self) -> Option<&Mutex<PinState>> {
        Some(&self.side_if_made()?.pins)
    }

    /// The side block, made now if none is yet. Not in the SIGBUS handler (it allocates).
    fn side(&self) -> &Side {
        if let Some(side) = self.side_if_made() {
            return side;
        }
        let spare = Side::spare();
        hook::step(Step::PinStateMade, self.base);
        // (Lost to another thread's: dropped, never published.)
        let _ = self.install_side(spare);
        self.side_if_made()
            .expect("a side block was just installed")
    }

    /// The side block, if a pin or a failure made it.
    fn side_if_made(&self) -> Option<&Side> {
        let p = self.side.load(Ordering::Acquire);
        // SAFETY: published once by `install_side`, never replaced, freed only when the region
        // drops (which needs `&mut self`, so not while this borrow lives).
        (!p.is_null()).then(|| unsafe { &*p })
    }

    /// Publishes `spare` as the region's side block, or gives it back if the region has one
    /// already (the caller frees or keeps it; the SIGBUS handler keeps it).
    pub(crate) fn install_side(&self, spare: Box<Side>) -> Result<(), Box<Side>> {
        let new = Box::into_raw(spare);
        match self.side.compare_exchange(
            std::ptr::null_mut(),
            new,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Ok(()),
            // SAFETY: `new` was never published: the box is still the caller's.
            Err(_) => Err(unsafe { Box::from_raw(new) }),
        }
    }

    fn lock_pins(&self) -> MutexGuard<'_, PinState> {
        self.pins().lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a pin. The first closes the gate and calls `resident` (the mode's way to make every
    /// page resident, non-volatile and the entry's); if that fails the gate opens again, nothing
    /// is pinned and the error is returned. A first pin while the region lingers (see
    /// [`unpin_with`](Self::unpin_with)) has nothing to do: the gate is closed and the pages are
    /// as the last pin left them.
    pub(crate) fn pin_with(
        &self,
        resident: impl FnOnce(&Region, &mut Vec<u64>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        if filling_here(self.base) {
            return Err(Error::RegenerateFailed(
                "the regenerate callback pinned the entry it is rebuilding: it would wait for \
                 itself. A callback must compute the bytes without reading its own entry"
                    .into(),
            ));
        }
        let mut st = self.lock_pins();
        if st.count == 0 && st.lingering {
            st.lingering = false;
            hook::step(Step::PinStarted, self.base);
        } else if st.count == 0 {
            // Pinned from the start of the first pin, not from its end: while it makes the pages
            // resident (waiting for fills in flight, maybe a slow callback), eviction passes the
            // entry by and `stats` counts its pages as pinned without waiting for this lock.
            self.pinned.store(true, Ordering::Release);
            self.gate.close();
            hook::step(Step::PinStarted, self.base);
            if let Err(e) = resident(self, &mut st.marks) {
                self.gate.open();
                self.pinned.store(false, Ordering::Release);
                return Err(e);
            }
        }
        st.count += 1;
        self.pinned.store(true, Ordering::Release);
        Ok(())
    }

    /// Ends one pin; the last opens the gate and calls `volatile` (the mode's way to make the
    /// pages volatile again), unless the region has an unpin delay and a way to end lingering
    /// (`queue`, which queues the region for [`check_linger`](Self::check_linger), called only
    /// if the region is not queued yet; false if it cannot be): the region then lingers, gate
    /// closed and pages untouched, so that a pin before the delay is over has nothing to do.
    /// `queue` runs under the pin lock: it must not take another region's. False (and nothing
    /// done) if the region is not pinned.
    pub(crate) fn unpin_with(
        &self,
        volatile: impl FnOnce(&Region, &mut Vec<u64>),
        queue: impl FnOnce(&Region) -> bool,
    ) -> bool {
        // Never pinned: nothing to end (and no pin state to make).
        let Some(pins) = self.pins_if_made() else {
            return false;
        };
        let mut st = pins.lock().unwrap_or_else(|p| p.into_inner());
        if st.count == 0 {
            return false;
        }
        st.count -= 1;
        if st.count == 0 {
            let delay_ns = self.profile.unpin_delay.as_nanos().min(u64::MAX as u128) as u64;
            let queued = delay_ns > 0 && (st.linger_queued || queue(self));
            if queued {
                st.lingering = true;
                st.linger_queued = true;
                st.linger_until = os::now_ns() + delay_ns;
            } else {
                self.gate.open();
                volatile(self, &mut st.marks);
            }
        }
        self.pinned.store(st.count > 0, Ordering::Release);
        true
    }

    /// For whoever ends lingering, on a region it queued: ends the lingering if its delay is over
    /// by `now` (or `force`): the gate opens and `volatile` is told (it makes the pages volatile,
    /// under the lock or after it: the gate keeps its advice off a pin that comes first). Without
    /// `force` it never waits for the pin lock (the monitor's reader calls it, and a first pin's
    /// populate may fault and need the reader).
    pub(crate) fn check_linger(
        &self,
        now: u64,
        force: bool,
        volatile: impl FnOnce(&Region),
    ) -> Linger {
        // Only a region some unpin queued is checked, and a pin made its state first.
        let Some(pins) = self.pins_if_made() else {
            return Linger::Done;
        };
        let mut st = if force {
            pins.lock().unwrap_or_else(|p| p.into_inner())
        } else {
            match pins.try_lock() {
                Ok(st) => st,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return Linger::Busy,
            }
        };
        if st.lingering && !force && st.linger_until > now {
            return Linger::NotYet;
        }
        st.linger_queued = false;
        if st.lingering {
            debug_assert_eq!(st.count, 0);
            st.lingering = false;
            self.gate.open();
            volatile(self);
        }
        Linger::Done
    }

    /// Whether it lingers after its last unpin (resident, not volatile yet). Never waits: while
    /// a pin, an unpin or the end of lingering holds the pin lock, the pages are being made
    /// resident or volatile, and the answer is true (the conservative side for `stats`).
    pub(crate) fn is_lingering(&self) -> bool {
        self.pins_if_made().is_some_and(|m| match m.try_lock() {
            Ok(st) => st.lingering,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().lingering,
            Err(std::sync::TryLockError::WouldBlock) => true,
        })
    }

    /// Runs `f` with the explicit mode's marks while the region is not pinned (its initial
    /// bytes are copied in before anyone can pin it).
    pub(crate) fn with_marks(&self, f: impl FnOnce(&mut Vec<u64>)) {
        let mut st = self.lock_pins();
        debug_assert_eq!(st.count, 0);
        f(&mut st.marks);
    }

    /// Waits until no fault path or pin uses the region (after it was unpublished and its
    /// hazards are gone): a fill in flight ends when its callback returns.
    pub(crate) fn wait_unused(&self) {
        let mut spins = 0;
        while self.active.load(Ordering::SeqCst) != 0 {
            crate::sync::backoff(&mut spins);
        }
    }
}

/// The hazard slots of every fault path. 256 slots: each is held for a few instructions only.
pub(crate) fn hazards() -> &'static hazard::Domain {
    static DOMAIN: OnceLock<hazard::Domain> = OnceLock::new();
    DOMAIN.get_or_init(|| hazard::Domain::new(256))
}

/// A region held by a fault path: it is not freed until this drops. Taken under a hazard
/// pointer, which is released at once, so hazard slots are held only for a few instructions,
/// never across a callback (a callback may fault on other entries, nested without bound: slots
/// held across them could run out and wait for each other forever).
pub(crate) struct RegionRef {
    ptr: NonNull<Region>,
}

impl RegionRef {
    /// The live region whose slot is `slot`, if any. Lock-free and allocation-free.
    pub(crate) fn from_slot(slot: &AtomicPtr<Region>) -> Option<RegionRef> {
        let guard = hazards().protect(slot)?;
        let r: &Region = guard.get();
        // While the hazard is published the remover waits (`Domain::wait_unprotected`), so the
        // count is raised before it can look at it (`Region::wait_unused`).
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A region of `len` bytes filled page by page, without delays or read-ahead.
    fn spec_of(len: usize) -> RegionSpec {
        let config = crate::config::Config::default()
            .fill_chunk(FillChunk::Page)
            .on_failure(FailurePolicy::Zero)
            .unpin_delay(std::time::Duration::ZERO)
            .read_ahead(0);
        RegionSpec {
            len,
            profile: Profile::of(&config, Arc::new(Counters::default()), Arc::new(()), None),
        }
    }

    /// Every entry has one region on the heap: its size is most of an entry's metadata (see the
    /// bookkeeping bench). It may grow only with a reason.
    #[test]
    fn a_region_stays_small() {
        let size = std::mem::size_of::<Region>();
        println!(
            "Region: {size} bytes; its side block, made by the first pin or failure: {}",
            std::mem::size_of::<Side>()
        );
        assert!(size <= 80, "Region grew to {size} bytes");
    }

    /// The pin state is made by the first pin only, once, and an unpin of a region never
    /// pinned makes none.
    #[test]
    fn the_pin_state_is_made_by_the_first_pin() {
        let spec = spec_of(PAGE);
        let p = Region::boxed((), 0x1000_0000, spec, |_, _: &mut [u8]| Ok(()));
        // SAFETY: freed at the end of the test only.
        let r = unsafe { p.as_ref() };
        assert!(r.pins_if_made().is_none());
        assert!(
            !r.unpin_with(|_, _| {}, |_| false),
            "unpinned a region never pinned"
        );
        assert!(r.pins_if_made().is_none(), "an unpin made the pin state");
        assert!(!r.is_lingering());
        r.pin_with(|_, _| Ok(())).unwrap();
        let made = r.pins_if_made().map(|m| m as *const _);
        assert!(made.is_some() && r.is_pinned());
        r.pin_with(|_, _| Ok(())).unwrap();
        assert!(r.unpin_with(|_, _| {}, |_| false));
        assert!(r.is_pinned(), "one of two pins ended: still pinned");
        assert!(r.unpin_with(|_, _| {}, |_| false));
        assert!(!r.is_pinned());
        assert_eq!(r.pins_if_made().map(|m| m as *const _), made, "made twice");
        // SAFETY: `r` is not used after this.
        unsafe { Region::free(p) };
    }

    /// The callback lives in the region's own allocation and is called and dropped with it.
    #[test]
    fn a_region_calls_and_drops_the_callback_it_holds() {
        let spec = spec_of(3 * PAGE);
        let token = Arc::new(41u8);
        let held = token.clone();
        let p = Region::boxed((), 0x2000_0000, spec, move |off, buf: &mut [u8]| {
            buf.fill(*held + (off / PAGE) as u8);
            Ok(())
        });
        assert_eq!(Arc::strong_count(&token), 2);
        let mut buf = vec![0u8; PAGE];
        // SAFETY: freed below, after the last use.
        let r = unsafe { p.as_ref() };
        assert!(r.regenerate(2 * PAGE, &mut buf).is_ok());
        assert!(buf.iter().all(|&b| b == 43));
        // SAFETY: `r` is not used after this.
        unsafe { Region::free(p) };
        assert_eq!(Arc::strong_count(&token), 1, "the callback was not dropped");
    }
}
