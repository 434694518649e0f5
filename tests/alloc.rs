//! The allocator interfaces against the real kernel: `VolatileArena`'s raw interface, its
//! `GlobalAlloc` and `allocator_api2::Allocator` impls, and `VolatileBox`, with real reclaim
//! (MADV_PAGEOUT through `testing::reclaim_ptr`).

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use lazyfree::allocator_api2::alloc::Allocator;
use lazyfree::allocator_api2::boxed::Box;
use lazyfree::allocator_api2::vec::Vec;
use lazyfree::{
    testing, Config, Error, FailurePolicy, Mode, RegenError, VolatileArena, VolatileBox,
};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;

/// splitmix64: the test's deterministic PRNG and byte pattern.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Sizes 0 .. 8 MiB, log-uniform so that most are small and some are large.
    fn size(&mut self) -> usize {
        let bits = self.below(24);
        self.below(1 << bits)
    }
    /// Alignments 1 .. 2 MiB.
    fn align(&mut self) -> usize {
        1 << self.below(22)
    }
}

/// The byte at `off` of pattern `seed`: 8 bytes of one 64-bit word per 8-byte group.
fn word(seed: u64, off: usize) -> u64 {
    mix(seed ^ ((off as u64 / 8) << 20))
}

fn fill(seed: u64, off: usize, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let o = off + i;
        *b = (word(seed, o) >> ((o % 8) * 8)) as u8;
    }
}

/// First offset in `[from, to)` of the allocation at `p` that differs from the pattern.
fn mismatch(seed: u64, p: *const u8, from: usize, to: usize) -> Option<usize> {
    // SAFETY: the callers pass live allocations of at least `to` bytes.
    let s = unsafe { std::slice::from_raw_parts(p, to) };
    let mut o = from;
    while o < to {
        if o % 8 == 0 && o + 8 <= to {
            let w = u64::from_le_bytes(s[o..o + 8].try_into().unwrap());
            if w != word(seed, o) {
                return Some(o);
            }
            o += 8;
        } else {
            if s[o] != (word(seed, o) >> ((o % 8) * 8)) as u8 {
                return Some(o);
            }
            o += 1;
        }
    }
    None
}

fn write_pattern(seed: u64, p: *mut u8, from: usize, to: usize) {
    // SAFETY: the callers pass live, pinned allocations of at least `to` bytes.
    let s = unsafe { std::slice::from_raw_parts_mut(p, to) };
    fill(seed, from, &mut s[from..]);
}

/// A regenerate callback for pattern `seed` that counts its calls.
fn regen(
    seed: u64,
    calls: &Arc<AtomicUsize>,
) -> impl Fn(usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync + 'static {
    let calls = calls.clone();
    move |off, buf| {
        calls.fetch_add(1, Ordering::Relaxed);
        fill(seed, off, buf);
        Ok(())
    }
}

fn arena(config: Config) -> VolatileArena {
    VolatileArena::new(config).expect("a VolatileArena (needs userfaultfd)")
}

struct Live {
    ptr: *mut u8,
    layout: Layout,
    seed: u64,
    volatile: bool,
    pins: usize,
    calls: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Tally {
    dropped: usize,
    regenerated: usize,
    volatile_made: usize,
    reallocs_moved: usize,
}

/// One random sequence of alloc, realloc, dealloc, make_volatile, pin, unpin and reclaim,
/// checking every live allocation's bytes after every step.
fn random_sequence(a: &VolatileArena, seed: u64, steps: usize, tally: &mut Tally) {
    let mut rng = Rng(seed);
    let mut live: std::vec::Vec<Live> = std::vec::Vec::new();
    let mut next_seed = seed << 32;
    for step in 0..steps {
        let op = if live.is_empty() {
            0
        } else if live.len() > 12 {
            2
        } else {
            rng.below(8)
        };
        match op {
            // alloc
            0 => {
                let layout = Layout::from_size_align(rng.size(), rng.align()).unwrap();
                let p = a.alloc(layout);
                if layout.size() == 0 {
                    assert!(p.is_null(), "zero-size alloc must fail");
                    continue;
                }
                assert!(!p.is_null(), "alloc {layout:?} failed");
                assert_eq!(p as usize % layout.align(), 0, "{layout:?} misaligned");
                // SAFETY: fresh allocation of layout.size() bytes.
                let s = unsafe { std::slice::from_raw_parts(p, layout.size()) };
                assert!(s.iter().all(|&b| b == 0), "fresh memory is not zero");
                next_seed += 1;
                write_pattern(next_seed, p, 0, layout.size());
                live.push(Live {
                    ptr: p,
                    layout,
                    seed: next_seed,
                    volatile: false,
                    pins: 0,
                    calls: Arc::new(AtomicUsize::new(0)),
                });
            }
            // realloc
            1 => {
                let i = rng.below(live.len());
                let l = &mut live[i];
                let new_size = rng.size();
                // SAFETY: l.ptr is live with l.layout.
                let q = unsafe { a.realloc(l.ptr, l.layout, new_size) };
                if new_size == 0 {
                    assert!(q.is_null(), "realloc to 0 must fail");
                } else {
                    assert!(!q.is_null(), "realloc to {new_size} failed");
                    assert_eq!(q as usize % l.layout.align(), 0);
                    let keep = l.layout.size().min(new_size);
                    assert_eq!(mismatch(l.seed, q, 0, keep), None, "realloc lost bytes");
                    tally.reallocs_moved += (q != l.ptr) as usize;
                    l.layout = Layout::from_size_align(new_size, l.layout.align()).unwrap();
                    l.ptr = q;
                    l.volatile = false;
                    l.pins = 0;
                    write_pattern(l.seed, q, keep, new_size);
                }
            }
            // dealloc
            2 => {
                let l = live.swap_remove(rng.below(live.len()));
                // SAFETY: live with this layout, not used again.
                unsafe { a.dealloc(l.ptr, l.layout) };
            }
            // make_volatile
            3 | 4 => {
                let i = rng.below(live.len());
                let l = &mut live[i];
                // SAFETY: the bytes are pattern l.seed, which the callback produces; the test
                // writes them only after a realloc (which ends volatility).
                let r = unsafe { a.make_volatile(l.ptr, l.layout, regen(l.seed, &l.calls)) };
                if l.volatile || l.pins > 0 {
                    assert!(matches!(r, Err(Error::BadPointer { .. })), "{r:?}");
                } else {
                    r.unwrap();
                    l.volatile = true;
                    tally.volatile_made += 1;
                }
                assert_eq!(a.is_volatile(l.ptr), l.volatile);
            }
            // reclaim (of a volatile one, if any), checking that pinned pages are kept
            5 | 6 => {
                let Some(l) = live.iter().find(|l| l.volatile) else {
                    continue;
                };
                let before = l.calls.load(Ordering::Relaxed);
                tally.dropped += testing::reclaim_ptr(l.ptr, l.layout.size());
                if l.pins > 0 {
                    assert_eq!(mismatch(l.seed, l.ptr, 0, l.layout.size()), None);
                    assert_eq!(
                        l.calls.load(Ordering::Relaxed),
                        before,
                        "a pinned allocation was rebuilt"
                    );
                }
                // Move it to the back so that the next reclaim picks another.
                let i = live.iter().position(|x| x.ptr == l.ptr).unwrap();
                let l = live.remove(i);
                live.push(l);
            }
            // pin or unpin
            _ => {
                let i = rng.below(live.len());
                let l = &mut live[i];
                if l.pins > 0 && rng.below(2) == 0 {
                    a.unpin(l.ptr).unwrap();
                    l.pins -= 1;
                } else if l.pins > 0 || rng.below(2) == 0 {
                    a.pin(l.ptr).unwrap();
                    l.pins += 1;
                } else {
                    assert!(matches!(a.unpin(l.ptr), Err(Error::BadPointer { .. })));
                }
            }
        }
        for l in &live {
            if let Some(o) = mismatch(l.seed, l.ptr, 0, l.layout.size()) {
                panic!(
                    "seed {seed} step {step}: allocation {:?} {:?} (volatile {}) differs at {o}",
                    l.ptr, l.layout, l.volatile
                );
            }
        }
    }
    for l in live {
        tally.regenerated += l.calls.load(Ordering::Relaxed);
        // SAFETY: live with this layout.
        unsafe { a.dealloc(l.ptr, l.layout) };
    }
}

#[test]
fn random_sequences_keep_every_live_allocation_intact() {
    random_sequences(Config::default());
}

fn random_sequences(cfg: Config) {
    let a = arena(cfg);
    let mut tally = Tally::default();
    for seed in 1..=4 {
        random_sequence(&a, seed, 150, &mut tally);
    }
    println!(
        "made volatile {}, reclaim dropped {} pages, regenerate calls {}, reallocs moved {}",
        tally.volatile_made, tally.dropped, tally.regenerated, tally.reallocs_moved
    );
    assert_eq!(a.allocations(), 0);
    assert_eq!(a.allocated_bytes(), 0);
    // The sequences must really have exercised the volatile path.
    assert!(tally.volatile_made > 10);
    assert!(tally.dropped > 0, "reclaim never dropped a page");
    assert!(tally.regenerated > 0, "no page was ever rebuilt");
}

#[test]
fn threads_share_one_arena() {
    threads(Config::default());
}

fn threads(cfg: Config) {
    let a = arena(cfg);
    let tallies: std::vec::Vec<Tally> = std::thread::scope(|s| {
        let hs: std::vec::Vec<_> = (0..2)
            .map(|t| {
                let a = &a;
                s.spawn(move || {
                    let mut tally = Tally::default();
                    random_sequence(a, 100 + t, 80, &mut tally);
                    tally
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(tallies.iter().all(|t| t.volatile_made > 0));
    assert_eq!(a.allocations(), 0);
}

#[test]
fn arena_limit_exhaustion_fails_cleanly() {
    let a = arena(Config::default().budget(Some(8 * MIB)));
    assert_eq!(a.limit(), 8 * MIB);
    let l = Layout::from_size_align(MIB, PAGE).unwrap();
    let mut ptrs = std::vec::Vec::new();
    loop {
        let p = a.alloc(l);
        if p.is_null() {
            break;
        }
        ptrs.push(p);
        assert!(ptrs.len() <= 8, "allocated past the limit");
    }
    assert_eq!(ptrs.len(), 8);
    assert_eq!(a.allocated_bytes(), 8 * MIB);

    // Every interface reports the exhaustion as an error.
    assert!((&a).allocate(Layout::new::<u8>()).is_err());
    // SAFETY: nothing is allocated with the GlobalAlloc interface here; null is expected.
    assert!(unsafe { GlobalAlloc::alloc(&a, l) }.is_null());
    let mut v: Vec<u8, &VolatileArena> = Vec::new_in(&a);
    assert!(v.try_reserve(1).is_err());
    assert!(Box::<[u64], _>::try_new_uninit_slice_in(10, &a).is_err());

    // A grow that does not fit fails and leaves the old block untouched.
    write_pattern(7, ptrs[0], 0, MIB);
    // SAFETY: ptrs[0] is live with layout l.
    assert!(unsafe { a.realloc(ptrs[0], l, 2 * MIB) }.is_null());
    assert_eq!(mismatch(7, ptrs[0], 0, MIB), None);

    // Shrinking in place gives pages back to the limit.
    // SAFETY: as above.
    let p = unsafe { a.realloc(ptrs[0], l, PAGE) };
    assert_eq!(p, ptrs[0], "a shrink of a pinned block stays in place");
    assert_eq!(mismatch(7, p, 0, PAGE), None);
    assert_eq!(a.allocated_bytes(), 7 * MIB + PAGE);
    let small = Layout::from_size_align(PAGE, PAGE).unwrap();
    // SAFETY: p is live with layout `small` now.
    unsafe { a.dealloc(p, small) };
    assert_eq!(a.allocated_bytes(), 7 * MIB);

    // Freed room can be used again, also by a Vec.
    v.try_reserve(MIB).expect("room after a free");
    v.extend_from_slice(&[5u8; 1000]);
    assert!(v.try_reserve(MIB).is_err(), "a second MiB does not fit");
    drop(v);
    for p in ptrs.drain(1..) {
        // SAFETY: live with layout l.
        unsafe { a.dealloc(p, l) };
    }
    assert_eq!(a.allocated_bytes(), 0);
}

#[test]
fn zero_huge_and_overaligned_layouts_fail_cleanly() {
    let a = arena(Config::default());
    let bad = [
        Layout::from_size_align(0, 1).unwrap(),
        Layout::from_size_align(0, 4 * MIB).unwrap(),
        Layout::from_size_align(lazyfree::MAX_SIZE + 1, 8).unwrap(),
        Layout::from_size_align(isize::MAX as usize - PAGE, PAGE).unwrap(),
        Layout::from_size_align(PAGE, lazyfree::MAX_ALIGN * 2).unwrap(),
        Layout::from_size_align(1, 1 << 62).unwrap(),
    ];
    for l in bad {
        assert!(a.alloc(l).is_null(), "{l:?}");
        if l.size() > 0 {
            assert!((&a).allocate(l).is_err(), "{l:?}");
        }
    }
    // Zero sizes through `Allocator` are served with a dangling, aligned pointer, as its
    // contract asks, and never reach the arena.
    let z = Layout::from_size_align(0, 64).unwrap();
    let d = (&a).allocate(z).unwrap();
    assert_eq!(d.len(), 0);
    assert_eq!(d.cast::<u8>().as_ptr() as usize % 64, 0);
    // SAFETY: allocated just now with z.
    unsafe { (&a).deallocate(d.cast(), z) };
    // SAFETY: an empty slice has no bytes to initialize.
    let empty: Box<[u64], &VolatileArena> =
        unsafe { Box::<[u64], _>::new_zeroed_slice_in(0, &a).assume_init() };
    assert!(empty.is_empty());
    drop(empty);
    let mut zst: Vec<(), &VolatileArena> = Vec::new_in(&a);
    zst.extend([(), (), ()]);
    assert_eq!(zst.len(), 3);
    assert_eq!(a.allocations(), 0);

    // realloc to an impossible size fails and keeps the block.
    let l = Layout::from_size_align(3 * PAGE, PAGE).unwrap();
    let p = a.alloc(l);
    write_pattern(9, p, 0, l.size());
    for n in [0, lazyfree::MAX_SIZE + 1, isize::MAX as usize, usize::MAX] {
        // SAFETY: p is live with l.
        assert!(unsafe { a.realloc(p, l, n) }.is_null(), "realloc to {n}");
        assert_eq!(mismatch(9, p, 0, l.size()), None);
    }

    // Alignment above the page size, up to the maximum.
    for align in [2 * MIB, 64 * MIB, lazyfree::MAX_ALIGN] {
        let big = Layout::from_size_align(5 * PAGE + 3, align).unwrap();
        let q = a.alloc(big);
        assert!(!q.is_null(), "align {align}");
        assert_eq!(q as usize % align, 0);
        write_pattern(align as u64, q, 0, big.size());
        // A realloc keeps the alignment, moved or not.
        // SAFETY: q is live with big.
        let r = unsafe { a.realloc(q, big, 40 * PAGE) };
        assert!(!r.is_null());
        assert_eq!(r as usize % align, 0);
        assert_eq!(mismatch(align as u64, r, 0, big.size()), None);
        // SAFETY: r is live with this layout.
        unsafe { a.dealloc(r, Layout::from_size_align(40 * PAGE, align).unwrap()) };
    }
    // SAFETY: p is live with l.
    unsafe { a.dealloc(p, l) };

    // `Allocator::grow` to a larger alignment moves if it must; `shrink` to zero frees.
    let small = Layout::from_size_align(100, 8).unwrap();
    let big = Layout::from_size_align(3 * PAGE, 2 * MIB).unwrap();
    let alloc = &a;
    let b = alloc.allocate(small).unwrap();
    write_pattern(11, b.cast::<u8>().as_ptr(), 0, 100);
    // SAFETY: b is live with `small`; `big` is larger.
    let g = unsafe { alloc.grow(b.cast(), small, big) }.unwrap();
    assert_eq!(g.cast::<u8>().as_ptr() as usize % (2 * MIB), 0);
    assert!(g.len() >= big.size());
    assert_eq!(mismatch(11, g.cast::<u8>().as_ptr(), 0, 100), None);
    // SAFETY: g is live with `big`.
    let z = unsafe { alloc.shrink(g.cast(), big, Layout::from_size_align(0, 8).unwrap()) };
    assert_eq!(z.unwrap().len(), 0);
    assert_eq!(a.allocations(), 0);
    let mut v: Vec<u8, &VolatileArena> = Vec::with_capacity_in(10 * PAGE, &a);
    assert_eq!(a.allocations(), 1);
    v.shrink_to_fit();
    assert_eq!(a.allocations(), 0, "an empty vector's shrink_to_fit frees");
    drop(v);
    assert_eq!(a.allocated_bytes(), 0);
}

#[test]
fn dropping_the_arena_frees_what_is_live() {
    let a = arena(Config::default());
    let l = Layout::from_size_align(4 * PAGE, PAGE).unwrap();
    let p = a.alloc(l);
    let q = a.alloc(l);
    write_pattern(1, p, 0, l.size());
    write_pattern(2, q, 0, l.size());
    let calls = Arc::new(AtomicUsize::new(0));
    // SAFETY: q holds pattern 2, which the callback makes; nobody writes it any more.
    unsafe { a.make_volatile(q, l, regen(2, &calls)) }.unwrap();
    a.pin(q).unwrap();
    assert_eq!(a.allocations(), 2);
    drop(a);
    // The process-wide runtime goes on serving other arenas.
    let b = arena(Config::default());
    let r = b.alloc(l);
    assert!(!r.is_null());
    // SAFETY: r is live with l.
    unsafe { b.dealloc(r, l) };
}

#[test]
fn bad_pointers_give_errors() {
    let a = arena(Config::default());
    let l = Layout::from_size_align(2 * PAGE, 8).unwrap();
    let mut local = [0u8; 64];
    let stray = local.as_mut_ptr();
    let ok = |_: usize, _: &mut [u8]| Ok::<(), RegenError>(());

    // SAFETY: not ours: refused before anything is touched.
    let r = unsafe { a.make_volatile(stray, l, ok) };
    assert!(matches!(r, Err(Error::BadPointer { .. })), "{r:?}");
    assert!(matches!(a.pin(stray), Err(Error::BadPointer { .. })));
    assert!(matches!(a.unpin(stray), Err(Error::BadPointer { .. })));
    // SAFETY: not ours: ignored.
    unsafe { a.dealloc(stray, l) };
    // SAFETY: null: ignored.
    unsafe { a.dealloc(std::ptr::null_mut(), l) };
    assert_eq!(local[0], 0);

    let p = a.alloc(l);
    let inner = p.wrapping_add(PAGE);
    assert!(matches!(a.pin(inner), Err(Error::BadPointer { .. })));
    let wrong = Layout::from_size_align(5 * PAGE, 8).unwrap();
    // SAFETY: the bytes are zeros, which `ok` leaves (and this call is refused).
    let r = unsafe { a.make_volatile(p, wrong, ok) };
    assert!(matches!(r, Err(Error::InvalidLength { .. })), "{r:?}");
    a.pin(p).unwrap();
    // SAFETY: as above.
    let r = unsafe { a.make_volatile(p, l, ok) };
    assert!(matches!(r, Err(Error::BadPointer { .. })), "pinned: {r:?}");
    a.unpin(p).unwrap();
    assert!(matches!(a.unpin(p), Err(Error::BadPointer { .. })));
    // SAFETY: as above.
    unsafe { a.make_volatile(p, l, ok) }.unwrap();
    // SAFETY: as above.
    let r = unsafe { a.make_volatile(p, l, ok) };
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("volatile already"), "{msg}");
    // SAFETY: p is live with l.
    unsafe { a.dealloc(p, l) };
    // SAFETY: a double free, which the arena ignores.
    unsafe { a.dealloc(p, l) };
    assert!(matches!(a.pin(p), Err(Error::BadPointer { .. })));
    assert_eq!(a.allocations(), 0);
}

#[test]
fn vec_grows_across_slabs_becomes_volatile_and_reads_back() {
    vec_across_slabs(Config::default());
}

fn vec_across_slabs(cfg: Config) {
    const SEED: u64 = 0xfeed;
    let a = arena(cfg);
    let mut v: Vec<u8, &VolatileArena> = Vec::new_in(&a);
    let mut chunk = vec![0u8; MIB];
    let mut moves = 0;
    let mut last = v.as_ptr();
    // The first slab is 64 MiB: a vector past it lives in a later slab, and on the way it is
    // moved from slab to slab.
    while v.len() < 80 * MIB {
        fill(SEED, v.len(), &mut chunk);
        v.extend_from_slice(&chunk);
        if v.as_ptr() != last {
            moves += 1;
            last = v.as_ptr();
        }
    }
    assert!(moves >= 5, "the vector moved only {moves} times");
    assert_eq!(mismatch(SEED, v.as_ptr(), 0, v.len()), None);
    let len = v.len();

    let calls = Arc::new(AtomicUsize::new(0));
    let b = VolatileBox::from_vec(v, regen(SEED, &calls)).unwrap();
    assert_eq!(b.len(), len);
    assert!(a.is_volatile(b.as_ptr()));
    assert_eq!(a.allocated_bytes(), len.div_ceil(PAGE) * PAGE);

    let pages = len / PAGE;
    let dropped = testing::reclaim_ptr(b.as_ptr(), len);
    println!("reclaim dropped {dropped} of {pages} pages");
    assert!(
        dropped > pages / 2,
        "reclaim dropped only {dropped} of {pages} pages"
    );
    assert_eq!(mismatch(SEED, b.as_ptr(), 0, len), None);
    assert!(calls.load(Ordering::Relaxed) > 0, "nothing was rebuilt");

    // Reclaimed again after the rebuild (the fault path re-advises the pages).
    assert!(testing::reclaim_ptr(b.as_ptr(), len) > 0);
    assert_eq!(b[len - 1], chunk[MIB - 1]);
    assert_eq!(mismatch(SEED, b.as_ptr(), 0, len), None);
    drop(b);
    assert_eq!(a.allocations(), 0);
    assert_eq!(a.allocated_bytes(), 0);
}

#[test]
fn boxed_slices_pin_and_mutate() {
    boxed_slices(Config::default());
}

fn boxed_slices(cfg: Config) {
    const SEED: u64 = 42;
    let a = arena(cfg);
    let n = 300_000; // 1.2 MB of u32, not a whole number of pages
                     // SAFETY: zeros are valid u32s.
    let mut bx = unsafe { Box::<[u32], _>::new_zeroed_slice_in(n, &a).assume_init() };
    // SAFETY: a [u32] is n * 4 initialized bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(bx.as_mut_ptr().cast::<u8>(), n * 4) };
    fill(SEED, 0, bytes);
    let want: std::vec::Vec<u32> = bx.to_vec();

    let calls = Arc::new(AtomicUsize::new(0));
    let mut vb = VolatileBox::from_boxed_slice(bx, regen(SEED, &calls)).unwrap();
    assert_eq!(&vb[..], &want[..]);
    assert!(testing::reclaim_ptr(vb.as_ptr(), n * 4) > 0);
    assert_eq!(&vb[..], &want[..]);
    assert!(calls.load(Ordering::Relaxed) > 0);

    {
        // Pinned: kept through reclaim, writable, not rebuilt.
        let mut pin = vb.pin_mut().unwrap();
        pin[0] = 0xdead_beef;
        let before = calls.load(Ordering::Relaxed);
        testing::reclaim_ptr(pin.as_ptr(), n * 4);
        assert_eq!(pin[0], 0xdead_beef);
        assert_eq!(&pin[1..], &want[1..]);
        assert_eq!(calls.load(Ordering::Relaxed), before);
    }
    {
        let p1 = vb.pin().unwrap();
        let p2 = vb.pin().unwrap();
        assert_eq!(p1[5], want[5]);
        drop(p1);
        assert_eq!(p2[n - 1], want[n - 1]);
    }
    // Unpinned again: the write is not what the callback makes, and goes with a reclaim.
    let mut lost = false;
    for _ in 0..5 {
        testing::reclaim_ptr(vb.as_ptr(), 4);
        if vb[0] == want[0] {
            lost = true;
            break;
        }
    }
    assert!(
        lost,
        "the first page never became volatile again after the pin"
    );

    // Empty boxes and vectors make empty values.
    let e = VolatileBox::from_vec(Vec::<u64, _>::new_in(&a), |_, _: &mut [u8]| {
        Ok::<(), RegenError>(())
    })
    .unwrap();
    assert!(e.is_empty());
    assert!(e.pin().unwrap().is_empty());
    drop(e);
    drop(vb);
    assert_eq!(a.allocations(), 0);
}

/// The arena plugs in where `GlobalAlloc` is expected.
fn round_trip(g: &dyn GlobalAlloc) {
    let l = Layout::from_size_align(10_000, 16).unwrap();
    // SAFETY: a non-zero layout; everything returned is freed with the layout it has.
    unsafe {
        let z = g.alloc_zeroed(l);
        assert!(!z.is_null());
        assert!(std::slice::from_raw_parts(z, l.size())
            .iter()
            .all(|&b| b == 0));
        write_pattern(3, z, 0, l.size());
        let g2 = g.realloc(z, l, 100_000);
        assert!(!g2.is_null());
        assert_eq!(mismatch(3, g2, 0, l.size()), None);
        g.dealloc(g2, Layout::from_size_align(100_000, 16).unwrap());
    }
}

#[test]
fn global_alloc_trait() {
    let a = arena(Config::default());
    round_trip(&a);
    assert_eq!(a.allocations(), 0);
}

#[test]
fn failed_regeneration_is_reported_not_hidden() {
    failed_regeneration(Config::default());
}

fn failed_regeneration(cfg: Config) {
    const SEED: u64 = 5;
    let a = arena(cfg.on_failure(FailurePolicy::Zero));
    let l = Layout::from_size_align(64 * PAGE, PAGE).unwrap();
    let p = a.alloc(l);
    write_pattern(SEED, p, 0, l.size());
    let fail = |_: usize, _: &mut [u8]| Err::<(), RegenError>("source is gone".into());
    // SAFETY: from now on the test reads the bytes only and accepts zeros (policy Zero).
    unsafe { a.make_volatile(p, l, fail) }.unwrap();
    let dropped = testing::reclaim_ptr(p, l.size());
    assert!(dropped > 0, "reclaim dropped nothing");

    // A pin rebuilds first: the failure is an error, and no pin is taken.
    let e = a.pin(p).unwrap_err();
    assert!(matches!(e, Error::RegenerateFailed(_)), "{e}");
    assert!(e.to_string().contains("source is gone"), "{e}");
    assert!(matches!(a.unpin(p), Err(Error::BadPointer { .. })));
    // So is a realloc, which must rebuild to copy: null, the block still live and volatile.
    // SAFETY: p is live with l.
    assert!(unsafe { a.realloc(p, l, 2 * l.size()) }.is_null());
    assert!(a.is_volatile(p));

    // A plain read of a dropped page sees zeros and marks the allocation failed.
    let mut vec = [0u8; 64];
    // SAFETY: p..p+64 pages is mapped; vec has one byte per page.
    let rc = unsafe { libc::mincore(p.cast(), l.size(), vec.as_mut_ptr()) };
    assert_eq!(rc, 0);
    let gone = vec
        .iter()
        .position(|&b| b & 1 == 0)
        .expect("a dropped page");
    // SAFETY: inside the allocation.
    let byte = unsafe { p.add(gone * PAGE).read_volatile() };
    assert_eq!(byte, 0);
    assert!(a.is_failed(p));
    // SAFETY: p is live with l.
    unsafe { a.dealloc(p, l) };
}

const CHILD_ENV: &str = "LAZYFREE_ALLOC_CHILD";

/// SIGBUS mode installs a process-wide signal handler, so its run of the suite above happens in
/// a child process: this binary's `child` test, with `LAZYFREE_ALLOC_CHILD` naming the case.
#[test]
#[ignore = "child-process entry point, run by sigbus_mode_runs_the_suite"]
fn child() {
    let Ok(case) = std::env::var(CHILD_ENV) else {
        panic!("`child` is run by sigbus_mode_runs_the_suite in a child process, not directly");
    };
    let cfg = Config::default().mode(Mode::Sigbus);
    match case.as_str() {
        "sigbus" => {
            random_sequences(cfg.clone());
            threads(cfg.clone());
            vec_across_slabs(cfg.clone());
            boxed_slices(cfg.clone());
            failed_regeneration(cfg);
            println!("SIGBUS SUITE DONE");
        }
        other => panic!("unknown child case {other}"),
    }
}

#[test]
fn sigbus_mode_runs_the_suite() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "sigbus")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the SIGBUS-mode child hung for 120 s and was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "child ended with {status:?}:\n{out}");
    assert!(out.contains("SIGBUS SUITE DONE"), "{out}");
    print!("{out}");
}
