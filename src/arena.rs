//! Slabs registered once with a userfaultfd, page-aligned spans carved out of them, and the
//! lock-free address → region lookup the fault paths use.
//!
//! A slab is one large anonymous mapping (64 MiB, doubling up to 1 GiB per slab), advised
//! MADV_NOHUGEPAGE and MADV_DONTFORK and registered in MISSING mode when it is made, so a million
//! entries cost a handful of VMAs. Each slab has one `AtomicPtr<Region>` per page: the fault paths
//! read it under a hazard pointer (`hazard.rs`), without locks or allocation.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_queue::ArrayQueue;

use crate::error::Error;
use crate::region::Region;
use crate::sys::mem::{self, Advice, UncheckedAdvice, PAGE};
use crate::sys::uffd::Uffd;

const FIRST_SLAB: usize = 64 << 20;
const MAX_GROWTH: usize = 1 << 30;
const MAX_SLABS: usize = 512;
/// Filled chunks waiting for their second MADV_FREE (see `fill::readvise_later`).
const READVISE_QUEUE: usize = 1024;

pub(crate) struct Slab {
    base: usize,
    pages: usize,
    slots: Box<[AtomicPtr<Region>]>,
}

#[derive(Default)]
struct FreeList {
    /// start → (pages, slab index)
    by_addr: BTreeMap<usize, (usize, usize)>,
    /// (pages, start)
    by_size: BTreeSet<(usize, usize)>,
    next_slab: usize,
}

impl FreeList {
    fn insert(&mut self, start: usize, pages: usize, slab: usize) {
        self.by_addr.insert(start, (pages, slab));
        self.by_size.insert((pages, start));
    }
    fn remove(&mut self, start: usize) -> (usize, usize) {
        let (pages, slab) = self.by_addr.remove(&start).expect("free extent");
        self.by_size.remove(&(pages, start));
        (pages, slab)
    }
}

/// Slabs for one userfaultfd (or, in explicit mode, for none: slabs are then not registered).
pub(crate) struct Arena {
    /// The userfaultfd each new slab is registered with; nothing else here uses it (the fault
    /// paths get theirs from their mode).
    registrar: Option<Arc<Uffd>>,
    slabs: Box<[AtomicPtr<Slab>]>,
    nslabs: AtomicUsize,
    free: Mutex<FreeList>,
    reserved: AtomicUsize,
    /// Cap on the bytes of all slabs together (`usize::MAX`: none).
    limit: usize,
    /// The process that made it: a forked child has none of its slabs mapped (MADV_DONTFORK).
    owner: u32,
    /// Chunks filled recently, with when to advise them MADV_FREE once more (see
    /// `fill::readvise_later`): (chunk start, due time in monotonic ns, CPUs that installed it).
    pub(crate) readvise: ArrayQueue<(usize, u64, [u16; 2])>,
}

impl Arena {
    /// An arena whose slabs are registered with `registrar` (none: the explicit mode, where
    /// nothing serves missing pages).
    pub(crate) fn new(registrar: Option<Arc<Uffd>>, limit: usize) -> Arena {
        // Made here, outside any signal handler, before a fault path can need it.
        crate::region::hazards();
        Arena {
            registrar,
            slabs: (0..MAX_SLABS)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
            nslabs: AtomicUsize::new(0),
            free: Mutex::new(FreeList::default()),
            reserved: AtomicUsize::new(0),
            limit,
            owner: crate::sys::os::pid(),
            readvise: ArrayQueue::new(READVISE_QUEUE),
        }
    }

    /// Whether this process is a fork of the one that made the arena. Its slabs are not mapped
    /// here, so nothing may touch, advise, unmap or hand out their addresses (the child may have
    /// mapped other memory there since), and the fd and threads serving them are the parent's.
    pub(crate) fn forked(&self) -> bool {
        crate::sys::os::pid() != self.owner
    }

    /// `Err(ForkedChild)` in a forked child (see [`forked`](Self::forked)): every operation that
    /// would touch the slabs, advise them or issue a userfaultfd ioctl checks this first (the fd
    /// is the parent's: its ioctls act on the parent's memory).
    pub(crate) fn check_owner(&self) -> Result<(), Error> {
        if self.forked() {
            return Err(Error::ForkedChild);
        }
        Ok(())
    }

    /// Bytes of address space reserved in slabs.
    pub(crate) fn reserved_bytes(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }

    /// The slot of the page holding `addr`, if `addr` is in one of our slabs. Lock-free.
    pub(crate) fn slot(&self, addr: usize) -> Option<&AtomicPtr<Region>> {
        let n = self.nslabs.load(Ordering::Acquire);
        for s in &self.slabs[..n] {
            // SAFETY: slab pointers below nslabs are set once, before nslabs is raised, and freed
            // only when the arena drops.
            let slab = unsafe { &*s.load(Ordering::Acquire) };
            if addr >= slab.base && addr < slab.base + slab.pages * PAGE {
                return Some(&slab.slots[(addr - slab.base) / PAGE]);
            }
        }
        None
    }

    fn grow(&self, fl: &mut FreeList, min_bytes: usize) -> Result<(), Error> {
        let idx = self.nslabs.load(Ordering::Relaxed);
        if idx == MAX_SLABS {
            return Err(Error::Kernel {
                op: "slab reservation (slab table full)",
                errno: libc::ENOMEM,
            });
        }
        let want = if fl.next_slab == 0 {
            FIRST_SLAB
        } else {
            fl.next_slab
        };
        let len = want.max(min_bytes.next_multiple_of(FIRST_SLAB));
        let reserved = self.reserved.load(Ordering::Relaxed);
        if reserved.saturating_add(len) > self.limit {
            return Err(Error::Kernel {
                op: "slab reservation (arena limit reached)",
                errno: libc::ENOMEM,
            });
        }
        let base = mem::map_anon(len).map_err(|e| Error::kernel("mmap of a slab", e))? as usize;
        let setup = mem::advise(base, len, Advice::NoHugePage)
            .and_then(|_| mem::advise(base, len, Advice::DontFork))
            .map_err(|e| Error::kernel("madvise of a slab", e))
            .and_then(|_| match &self.registrar {
                Some(uffd) => uffd
                    .register(base, len)
                    .map_err(|e| Error::kernel("UFFDIO_REGISTER of a slab", e)),
                None => Ok(()),
            });
        if let Err(e) = setup {
            // SAFETY: the mapping was made just now and nothing else knows it.
            unsafe { mem::unmap(base as *mut u8, len) };
            return Err(e);
        }
        let pages = len / PAGE;
        let slab = Box::new(Slab {
            base,
            pages,
            slots: (0..pages)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
        });
        self.slabs[idx].store(Box::into_raw(slab), Ordering::Release);
        self.nslabs.store(idx + 1, Ordering::Release);
        self.reserved.fetch_add(len, Ordering::Relaxed);
        fl.next_slab = (want * 2).min(MAX_GROWTH);
        fl.insert(base, pages, idx);
        Ok(())
    }

    /// Carves a span of `pages` pages whose start is a multiple of `align_pages` pages. The span's
    /// pages are missing (never touched, or dropped when last freed).
    pub(crate) fn alloc(&self, pages: usize, align_pages: usize) -> Result<usize, Error> {
        self.check_owner()?;
        debug_assert!(pages > 0 && align_pages.is_power_of_two());
        let align = align_pages * PAGE;
        let mut fl = self.free.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let found = fl
                .by_size
                .range((pages, 0)..)
                .find(|&&(p, a)| {
                    let waste = (a.next_multiple_of(align) - a) / PAGE;
                    waste + pages <= p
                })
                .copied();
            if let Some((p, a)) = found {
                let (_, slab) = fl.remove(a);
                let start = a.next_multiple_of(align);
                let head = (start - a) / PAGE;
                if head > 0 {
                    fl.insert(a, head, slab);
                }
                let tail = p - head - pages;
                if tail > 0 {
                    fl.insert(start + pages * PAGE, tail, slab);
                }
                return Ok(start);
            }
            let bytes = pages
                .checked_add(align_pages)
                .and_then(|n| n.checked_mul(PAGE))
                .ok_or(Error::InvalidLength {
                    len: usize::MAX,
                    reason: "larger than the address space",
                })?;
            self.grow(&mut fl, bytes)?;
        }
    }

    /// Points every page slot of the span at `region` (null to clear).
    pub(crate) fn publish(&self, start: usize, pages: usize, region: *mut Region) {
        for i in 0..pages {
            if let Some(s) = self.slot(start + i * PAGE) {
                s.store(region, Ordering::SeqCst);
            }
        }
    }

    /// Returns a span: its contents are dropped and it is reused.
    ///
    /// # Safety
    /// Nobody may use the span's bytes any more, and its slots must already be cleared.
    pub(crate) unsafe fn free(&self, start: usize, pages: usize) {
        if self.forked() {
            return; // not ours to drop or reuse (see `forked`)
        }
        // SAFETY: by the caller's contract nobody uses these bytes.
        let _ = unsafe { mem::advise_unchecked(start, pages * PAGE, UncheckedAdvice::DontNeed) };
        let slab = self.slab_index(start);
        let mut fl = self.free.lock().unwrap_or_else(|p| p.into_inner());
        Self::give_back(&mut fl, start, pages, slab);
    }

    /// Returns many spans at once, as [`free`](Self::free) does each: neighbours in one slab are
    /// merged first, so a run of spans costs one `madvise` (dropping a cache of a million small
    /// entries costs a few calls, not a million).
    ///
    /// # Safety
    /// As for [`free`](Self::free), for every span.
    pub(crate) unsafe fn free_many(&self, spans: &mut [(usize, usize)]) {
        if self.forked() || spans.is_empty() {
            return;
        }
        spans.sort_unstable();
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for &(start, pages) in spans.iter() {
            let slab = self.slab_index(start);
            match runs.last_mut() {
                Some((s, p, sl)) if *sl == slab && *s + *p * PAGE == start => *p += pages,
                _ => runs.push((start, pages, slab)),
            }
        }
        for &(start, pages, _) in &runs {
            // SAFETY: by the caller's contract nobody uses these bytes.
            let _ =
                unsafe { mem::advise_unchecked(start, pages * PAGE, UncheckedAdvice::DontNeed) };
        }
        let mut fl = self.free.lock().unwrap_or_else(|p| p.into_inner());
        for (start, pages, slab) in runs {
            Self::give_back(&mut fl, start, pages, slab);
        }
    }

    /// Puts a dropped span in the free list, merged with its free neighbours in the same slab.
    fn give_back(fl: &mut FreeList, start: usize, pages: usize, slab: usize) {
        let (mut s, mut p) = (start, pages);
        if let Some((&prev, &(pp, ps))) = fl.by_addr.range(..start).next_back() {
            if ps == slab && prev + pp * PAGE == start {
                fl.remove(prev);
                s = prev;
                p += pp;
            }
        }
        let end = start + pages * PAGE;
        if let Some(&(np, ns)) = fl.by_addr.get(&end) {
            if ns == slab {
                fl.remove(end);
                p += np;
            }
        }
        fl.insert(s, p, slab);
    }

    fn slab_index(&self, addr: usize) -> usize {
        let n = self.nslabs.load(Ordering::Acquire);
        (0..n)
            .find(|&i| {
                // SAFETY: as in `slot`.
                let slab = unsafe { &*self.slabs[i].load(Ordering::Acquire) };
                addr >= slab.base && addr < slab.base + slab.pages * PAGE
            })
            .expect("address in a slab")
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if self.forked() {
            return; // the slabs are not ours to unmap (see `forked`)
        }
        let n = *self.nslabs.get_mut();
        for s in &self.slabs[..n] {
            // SAFETY: the slab was made by Box::into_raw in `grow`; the arena is going away and
            // every region in it is gone (regions keep the runtime that owns the arena alive).
            let slab = unsafe { Box::from_raw(s.load(Ordering::Acquire)) };
            // SAFETY: as above: no region, no fault path uses the slab any more.
            unsafe { mem::unmap(slab.base as *mut u8, slab.pages * PAGE) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An arena of unregistered slabs (as the explicit mode's), 64 MiB at most.
    fn arena() -> Arena {
        Arena::new(None, 64 << 20)
    }

    #[test]
    fn spans_are_aligned_and_disjoint() {
        let a = arena();
        let x = a.alloc(3, 1).unwrap();
        let y = a.alloc(5, 4).unwrap();
        assert_eq!(y % (4 * PAGE), 0, "alignment");
        assert!(x + 3 * PAGE <= y || y + 5 * PAGE <= x, "overlap");
        assert_eq!(a.reserved_bytes(), 64 << 20);
    }

    #[test]
    fn freed_spans_coalesce_and_are_reused() {
        let a = arena();
        let x = a.alloc(2, 1).unwrap();
        let y = a.alloc(2, 1).unwrap();
        let z = a.alloc(2, 1).unwrap();
        assert_eq!((y - x, z - y), (2 * PAGE, 2 * PAGE));
        // SAFETY: spans of this arena, unused, no region published over them.
        unsafe {
            a.free(x, 2);
            a.free(y, 2);
        }
        // The two freed neighbours merged: a 4-page span fits where they were.
        assert_eq!(a.alloc(4, 1).unwrap(), x);
        // The limit: no second slab.
        assert!(a.alloc(16 << 10, 1).is_err());
    }

    #[test]
    fn spans_freed_together_merge_into_runs() {
        let a = arena();
        let spans: Vec<usize> = (0..6).map(|_| a.alloc(1, 1).unwrap()).collect();
        let tail = a.alloc(1, 1).unwrap();
        for &x in &spans {
            // SAFETY: a span of this arena (unregistered: writing makes the page present).
            unsafe { (x as *mut u8).write(0xab) };
        }
        // Every span but the 4th, out of order: two runs (0-2, 4-5), each one free extent.
        let mut freed: Vec<(usize, usize)> =
            [5, 0, 2, 1, 4].iter().map(|&i| (spans[i], 1)).collect();
        // SAFETY: spans of this arena, unused, no region published over them.
        unsafe { a.free_many(&mut freed) };
        assert_eq!(a.alloc(3, 1).unwrap(), spans[0]);
        assert_eq!(a.alloc(2, 1).unwrap(), spans[4]);
        for i in [0, 1, 2, 4, 5] {
            // SAFETY: as above; the span was dropped (MADV_DONTNEED), so it reads zero.
            let byte = unsafe { (spans[i] as *const u8).read() };
            assert_eq!(byte, 0, "span {i} kept its bytes");
        }
        // SAFETY: as above: the span still in use kept its byte.
        assert_eq!(unsafe { (spans[3] as *const u8).read() }, 0xab);
        assert_ne!(
            a.alloc(1, 1).unwrap(),
            spans[3],
            "a span still in use was handed out"
        );
        let _ = tail;
    }

    #[test]
    fn lookup_finds_the_published_region() {
        let a = arena();
        let x = a.alloc(4, 1).unwrap();
        let fake = 0x1000 as *mut Region; // compared, never dereferenced
        a.publish(x, 4, fake);
        for p in 0..4 {
            assert_eq!(
                a.slot(x + p * PAGE + 17).unwrap().load(Ordering::SeqCst),
                fake
            );
        }
        assert!(a
            .slot(x + 4 * PAGE)
            .unwrap()
            .load(Ordering::SeqCst)
            .is_null());
        assert!(a.slot(8).is_none(), "an address in no slab");
        a.publish(x, 4, std::ptr::null_mut());
        assert!(a.slot(x).unwrap().load(Ordering::SeqCst).is_null());
    }
}
