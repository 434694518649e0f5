//! Loom models of lazyfree's pure concurrent protocols: every interleaving (within loom's
//! bounds) of the threads below is run, with the real code of `src/chunk.rs` (chunk states and
//! the pin gate), `src/hazard.rs` (hazard pointers), `src/cache/readers.rs` (the map's
//! reader counts), `src/slot.rs` (a region's failure message) and `src/shared/state.rs` (a
//! shared cache's chunk states, pins against punches) compiled against loom's atomics.
//!
//! Run with: `RUSTFLAGS="--cfg loom" cargo test --release --test loom` (`.ci/run` does). Without
//! `--cfg loom` this file is empty.
#![cfg(loom)]

/// What `src/chunk.rs` and `src/hazard.rs` import as `crate::sync`: loom's atomics, and a wait
/// step that lets loom schedule the other threads.
mod sync {
    pub(crate) use loom::sync::atomic;

    pub(crate) fn backoff(_spins: &mut u32) {
        loom::thread::yield_now();
    }

    /// What `src/sync.rs` gives the SeqCst accesses around it natively (one total order),
    /// which loom's model needs as a fence: it treats SeqCst accesses as acquire/release.
    pub(crate) fn sc_fence() {
        loom::sync::atomic::fence(loom::sync::atomic::Ordering::SeqCst);
    }
}

#[path = "../src/chunk.rs"]
#[allow(dead_code)]
mod chunk;

#[path = "../src/hazard.rs"]
#[allow(dead_code)]
mod hazard;

#[path = "../src/cache/readers.rs"]
#[allow(dead_code)]
mod readers;

#[path = "../src/slot.rs"]
#[allow(dead_code)]
mod slot;

use chunk::{Chunks, Claim, Outcome, PinGate};
use loom::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

/// A fill that started before a pin and re-advises (MADV_FREE) after installing, against the
/// pin: once the pin's sweep has written the pages, no advice may reach them while pinned.
/// `volatile` stands for "the page is advised free and not written since".
#[test]
fn no_advice_reaches_a_pinned_page() {
    loom::model(|| {
        let gate = Arc::new(PinGate::new());
        let volatile = Arc::new(AtomicBool::new(true));
        let filler = {
            let (gate, volatile) = (gate.clone(), volatile.clone());
            thread::spawn(move || {
                // ... regenerated and installed; now the re-advice:
                if let Some(_pass) = gate.enter() {
                    volatile.store(true, Ordering::SeqCst);
                }
            })
        };
        // The first pin: close, then the sweep writes every page.
        gate.close();
        volatile.store(false, Ordering::SeqCst);
        filler.join().unwrap();
        // Still pinned: the page must not be volatile.
        assert!(
            !volatile.load(Ordering::SeqCst),
            "a fill advised a pinned page"
        );
        // The last unpin opens the gate; advice is allowed again.
        gate.open();
        assert!(gate.enter().is_some());
    });
}

/// A pin followed by an unpin and a second pin, against a fill's advice: the advice never lands
/// between a pin's sweep and its unpin.
#[test]
fn advice_only_between_pins() {
    loom::model(|| {
        let gate = Arc::new(PinGate::new());
        // 0: not pinned; 1: pinned and swept.
        let pinned = Arc::new(AtomicUsize::new(0));
        let bad = Arc::new(AtomicBool::new(false));
        let filler = {
            let (gate, pinned, bad) = (gate.clone(), pinned.clone(), bad.clone());
            thread::spawn(move || {
                if let Some(_pass) = gate.enter() {
                    if pinned.load(Ordering::SeqCst) == 1 {
                        bad.store(true, Ordering::SeqCst);
                    }
                }
            })
        };
        for _ in 0..2 {
            gate.close();
            pinned.store(1, Ordering::SeqCst);
            pinned.store(0, Ordering::SeqCst);
            gate.open();
        }
        filler.join().unwrap();
        assert!(!bad.load(Ordering::SeqCst), "advice during a pin");
    });
}

/// The outcome each thread applies, per chunk: records the last release so the final state can
/// be checked against it.
const REBUILT: u8 = 1;
const FAILED_: u8 = 2;

struct Region {
    chunks: Chunks,
    /// Owners of each chunk right now (must never exceed 1).
    owners: [AtomicUsize; 2],
    /// The outcome of the last release of each chunk (0: none).
    last: [AtomicU8; 2],
}

impl Region {
    fn new() -> Region {
        Region {
            chunks: Chunks::new(2),
            owners: [AtomicUsize::new(0), AtomicUsize::new(0)],
            last: [AtomicU8::new(0), AtomicU8::new(0)],
        }
    }

    /// One fill of chunk `c` that ends with `outcome`, if the chunk could be claimed.
    fn fill(&self, c: usize, outcome: Outcome) -> Option<bool> {
        let was_failed = match self.chunks.try_claim(c) {
            Claim::Owned { failed } => failed,
            Claim::Busy => return None,
        };
        let n = self.owners[c].fetch_add(1, Ordering::SeqCst);
        assert_eq!(n, 0, "two fills own chunk {c}");
        self.owners[c].fetch_sub(1, Ordering::SeqCst);
        if outcome == Outcome::Failed {
            // As `fill_chunk`: marked before the failure policy changes the pages.
            self.chunks.mark_failed(c);
        }
        self.last[c].store(
            match outcome {
                Outcome::Rebuilt => REBUILT,
                Outcome::Failed => FAILED_,
                Outcome::Unchanged => self.last[c].load(Ordering::SeqCst),
            },
            Ordering::SeqCst,
        );
        let _ = self.chunks.release(c, outcome);
        Some(was_failed)
    }

    /// A pin: claims each chunk in turn (waiting while another fill owns it) and rebuilds it.
    fn pin(&self, fail_chunk: Option<usize>) -> bool {
        for c in 0..2 {
            loop {
                let outcome = if fail_chunk == Some(c) {
                    Outcome::Failed
                } else {
                    Outcome::Rebuilt
                };
                match self.fill(c, outcome) {
                    Some(_) if outcome == Outcome::Failed => return false,
                    Some(_) => break,
                    None => thread::yield_now(),
                }
            }
        }
        true
    }

    fn check_final(&self) {
        let mut failed = 0;
        for c in 0..2 {
            assert!(!self.chunks.is_filling(c));
            let is_failed = self.chunks.is_failed(c);
            assert_eq!(
                is_failed,
                self.last[c].load(Ordering::SeqCst) == FAILED_,
                "chunk {c}: the failure mark does not match its last fill"
            );
            failed += is_failed as usize;
        }
        assert_eq!(self.chunks.failed_chunks(), failed, "failed-chunk count");
    }
}

/// A failure in chunk 0 and a success in chunk 1 race: chunk 0 stays failed (the entry stays
/// failed) until chunk 0 itself is rebuilt; one fill per chunk at a time.
#[test]
fn failure_in_one_chunk_survives_success_in_another() {
    loom::model(|| {
        let r = Arc::new(Region::new());
        let a = {
            let r = r.clone();
            thread::spawn(move || r.fill(0, Outcome::Failed))
        };
        let b = {
            let r = r.clone();
            thread::spawn(move || r.fill(1, Outcome::Rebuilt))
        };
        let a_ran = a.join().unwrap().is_some();
        b.join().unwrap();
        r.check_final();
        assert!(a_ran, "nothing else owns chunk 0");
        assert!(r.chunks.failed_chunks() == 1, "chunk 0's failure was lost");
    });
}

/// A fill whose callback failed installs zero pages (the zero policy) before it releases the
/// chunk; a reader that touches those pages meanwhile reads them without a fault. Whatever the
/// interleaving, a reader that reads the zeros finds the chunk (and so the entry) failed:
/// `mark_failed` comes before the install. (Marked at the release instead, as before, a reader
/// could read zeros with the entry not failed.)
#[test]
fn zeros_are_read_only_as_failed() {
    const MISSING: u8 = 0;
    const ZEROS: u8 = 1;
    loom::model(|| {
        let chunks = Arc::new(Chunks::new(1));
        // What the chunk's page holds, as a reader without a fault would read it.
        let page = Arc::new(AtomicU8::new(MISSING));
        let filler = {
            let (chunks, page) = (chunks.clone(), page.clone());
            thread::spawn(move || {
                assert_eq!(chunks.try_claim(0), Claim::Owned { failed: false });
                chunks.mark_failed(0);
                // The failure policy's UFFDIO_ZEROPAGE: the page is readable from here.
                page.store(ZEROS, Ordering::Release);
                let _ = chunks.release(0, Outcome::Failed);
            })
        };
        if page.load(Ordering::Acquire) == ZEROS {
            assert!(
                chunks.is_failed(0),
                "zeros read while the chunk is not failed"
            );
            assert_eq!(
                chunks.failed_chunks(),
                1,
                "zeros read while the entry is not failed"
            );
        }
        filler.join().unwrap();
        assert_eq!(chunks.failed_chunks(), 1, "one failed chunk, counted once");
        assert!(chunks.is_failed(0) && !chunks.is_filling(0));
    });
}

/// Two faults and a pin on a two-chunk region: a fault that fails chunk 0, a fault that rebuilds
/// it, and a pin that rebuilds both chunks (or fails on chunk 1). Every interleaving keeps one
/// owner per chunk and a failure mark that matches the last fill of its chunk.
#[test]
fn faults_and_a_pin_on_two_chunks() {
    for pin_fails in [false, true] {
        // The pin waits for busy chunks in a loop: bound the preemptions to keep the search
        // finite (every schedule with up to 3 preemptions is run).
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(3);
        b.check(move || {
            let r = Arc::new(Region::new());
            let f1 = {
                let r = r.clone();
                thread::spawn(move || {
                    r.fill(0, Outcome::Failed);
                })
            };
            let f2 = {
                let r = r.clone();
                thread::spawn(move || {
                    r.fill(0, Outcome::Rebuilt);
                })
            };
            let pinned = r.pin(pin_fails.then_some(1));
            f1.join().unwrap();
            f2.join().unwrap();
            r.check_final();
            if pinned {
                // The pin rebuilt chunk 1 last (nothing else fills it).
                assert!(!r.chunks.is_failed(1));
            } else {
                assert!(
                    r.chunks.is_failed(1),
                    "a failed pin leaves its chunk marked"
                );
            }
        });
    }
}

/// Monitor mode: a worker that finds a chunk busy drops its fault message and relies on the
/// owner's wake. The kernel's wait queue (a lock: a faulting thread queues itself under it, a
/// read of its message and a wake take it too) is a mutex here. The owner releases the chunk
/// before it wakes, so a thread whose message the worker read is always woken.
#[test]
fn busy_fault_is_always_woken() {
    loom::model(|| {
        let chunks = Arc::new(Chunks::new(1));
        let queue = Arc::new(loom::sync::Mutex::new(false));
        let woken = Arc::new(AtomicBool::new(false));
        assert_eq!(chunks.try_claim(0), Claim::Owned { failed: false });
        let owner = {
            let (chunks, queue, woken) = (chunks.clone(), queue.clone(), woken.clone());
            thread::spawn(move || {
                let _ = chunks.release(0, Outcome::Rebuilt);
                // UFFDIO_WAKE: wakes the threads queued on the range now.
                if *queue.lock().unwrap() {
                    woken.store(true, Ordering::SeqCst);
                }
            })
        };
        // The faulting thread queues itself in the kernel; a worker reads its message (under
        // the same lock), then looks at the chunk.
        *queue.lock().unwrap() = true;
        assert!(*queue.lock().unwrap(), "the worker read the message");
        let busy = match chunks.try_claim(0) {
            Claim::Busy => true,
            Claim::Owned { .. } => {
                // This worker fills and wakes it itself.
                let _ = chunks.release(0, Outcome::Rebuilt);
                woken.store(true, Ordering::SeqCst);
                false
            }
        };
        owner.join().unwrap();
        assert!(
            woken.load(Ordering::SeqCst),
            "a fault dropped as busy (busy: {busy}) was never woken"
        );
    });
}

/// Monitor mode, a fill ahead: its owner wakes the chunk after its release only if a fault path
/// noted itself waiting (`Chunks::note_waiter`, returned by `release`). A thread faults on the
/// chunk meanwhile and a worker reads its message: only that noted wake, or the worker's own
/// fill after the release, can wake it, and one of them always does.
#[test]
fn busy_fault_is_woken_by_a_noted_wake() {
    loom::model(|| {
        let chunks = Arc::new(Chunks::new(1));
        let queue = Arc::new(loom::sync::Mutex::new(false));
        let woken = Arc::new(AtomicBool::new(false));
        assert_eq!(chunks.try_claim(0), Claim::Owned { failed: false });
        let owner = {
            let (chunks, queue, woken) = (chunks.clone(), queue.clone(), woken.clone());
            thread::spawn(move || {
                if chunks.release(0, Outcome::Rebuilt) && *queue.lock().unwrap() {
                    woken.store(true, Ordering::SeqCst);
                }
            })
        };
        // The faulting thread queues itself; a worker reads its message, then claims the chunk
        // or notes itself waiting (claiming again if the owner released meanwhile).
        *queue.lock().unwrap() = true;
        assert!(*queue.lock().unwrap(), "the worker read the message");
        let dropped = loop {
            match chunks.try_claim(0) {
                Claim::Owned { .. } => {
                    let _ = chunks.release(0, Outcome::Rebuilt);
                    woken.store(true, Ordering::SeqCst);
                    break false;
                }
                Claim::Busy if !chunks.note_waiter(0) => thread::yield_now(),
                Claim::Busy => break true,
            }
        };
        owner.join().unwrap();
        assert!(
            woken.load(Ordering::SeqCst),
            "a fault dropped as busy (dropped: {dropped}) was never woken"
        );
        assert!(!chunks.is_filling(0));
    });
}

/// Hazard pointers and the region count taken under them (`RegionRef`): a reader never uses a
/// region its remover freed.
#[test]
fn hazard_reader_never_sees_a_freed_region() {
    struct Obj {
        alive: AtomicBool,
        active: AtomicUsize,
    }
    // The remover waits in loops: bound the preemptions to keep the search finite.
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(|| {
        let domain = Arc::new(hazard::Domain::new(2));
        let obj: &'static Obj = Box::leak(Box::new(Obj {
            alive: AtomicBool::new(true),
            active: AtomicUsize::new(0),
        }));
        let src = Arc::new(AtomicPtr::new(obj as *const Obj as *mut Obj));
        let reader = {
            let (domain, src) = (domain.clone(), src.clone());
            thread::spawn(move || {
                let Some(g) = domain.protect(&src) else {
                    return;
                };
                g.get().active.fetch_add(1, Ordering::SeqCst);
                drop(g);
                // (`obj` is leaked, so reading it is defined; `alive` says whether the remover
                // considers it freed.)
                let o = obj;
                // The callback runs here, hazard released, count held.
                assert!(o.alive.load(Ordering::SeqCst), "read a freed region");
                o.active.fetch_sub(1, Ordering::SeqCst);
            })
        };
        // The remover: unpublish, wait for hazards, wait for counts, free.
        src.store(std::ptr::null_mut(), Ordering::SeqCst);
        domain.wait_unprotected(obj as *const Obj);
        while obj.active.load(Ordering::SeqCst) != 0 {
            thread::yield_now();
        }
        obj.alive.store(false, Ordering::SeqCst);
        reader.join().unwrap();
    });
}

/// The batch remover (`wait_unprotected_all`, used when a cache drops all its entries at once):
/// it unpublishes two regions, then waits once for the hazards of both; a reader of either
/// never uses a region the remover freed.
#[test]
fn hazard_batch_remover_never_frees_a_protected_region() {
    struct Obj {
        alive: AtomicBool,
        active: AtomicUsize,
    }
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(|| {
        let domain = Arc::new(hazard::Domain::new(2));
        let objs: &'static [Obj; 2] = Box::leak(Box::new([0, 1].map(|_| Obj {
            alive: AtomicBool::new(true),
            active: AtomicUsize::new(0),
        })));
        let srcs: Arc<[AtomicPtr<Obj>; 2]> =
            Arc::new([0, 1].map(|i| AtomicPtr::new(&objs[i] as *const Obj as *mut Obj)));
        let reader = {
            let (domain, srcs) = (domain.clone(), srcs.clone());
            thread::spawn(move || {
                let Some(g) = domain.protect(&srcs[1]) else {
                    return;
                };
                g.get().active.fetch_add(1, Ordering::SeqCst);
                drop(g);
                let o = &objs[1];
                assert!(o.alive.load(Ordering::SeqCst), "read a freed region");
                o.active.fetch_sub(1, Ordering::SeqCst);
            })
        };
        for s in srcs.iter() {
            s.store(std::ptr::null_mut(), Ordering::SeqCst);
        }
        let mut ptrs: Vec<*const Obj> = objs.iter().map(|o| o as *const Obj).collect();
        ptrs.sort_unstable();
        domain.wait_unprotected_all(&ptrs);
        for o in objs.iter() {
            while o.active.load(Ordering::SeqCst) != 0 {
                thread::yield_now();
            }
            o.alive.store(false, Ordering::SeqCst);
        }
        reader.join().unwrap();
    });
}

/// More readers than hazard slots: each waits for a slot and gets one (slots are held briefly).
#[test]
fn more_readers_than_hazard_slots() {
    loom::model(|| {
        let domain = Arc::new(hazard::Domain::new(1));
        let target = Box::leak(Box::new(7u32));
        let src = Arc::new(AtomicPtr::new(target as *mut u32));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (domain, src) = (domain.clone(), src.clone());
                thread::spawn(move || {
                    let g = domain.protect(&src).expect("published");
                    assert_eq!(*g.get(), 7);
                })
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
    });
}

/// The map's readers' protocol (`src/cache/readers.rs`): two readers of two slots and a writer
/// on one shard. A reader reads counted in (writer flag down) or under the shard's lock for
/// reading (flag up: the slow path); the writer holds the lock for writing, drains the readers
/// and writes two words. loom's cell reports any read concurrent with the write; the readers
/// check they never see half of it.
#[test]
fn no_reader_reads_while_a_writer_writes() {
    // One slot (both readers share a count: its release sequence) and two.
    for slots in [1, 2] {
        readers_and_a_writer(slots);
    }
}

fn readers_and_a_writer(slots: usize) {
    // Readers that found the flag up and took the slow path, over every execution (std's
    // atomic: outside the model).
    static SLOW: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    SLOW.store(0, std::sync::atomic::Ordering::SeqCst);
    // The writer waits for the readers in a loop: bound the preemptions (as above).
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(move || {
        struct Shard {
            readers: readers::Readers,
            writing: AtomicBool,
            lock: loom::sync::RwLock<()>,
            data: loom::cell::UnsafeCell<(u32, u32)>,
        }
        // SAFETY: `data` is accessed under the protocol under test (loom checks it).
        unsafe impl Sync for Shard {}
        let sh = Arc::new(Shard {
            readers: readers::Readers::new(1, slots),
            writing: AtomicBool::new(false),
            lock: loom::sync::RwLock::new(()),
            data: loom::cell::UnsafeCell::new((0, 0)),
        });
        let read = |sh: &Shard| {
            // SAFETY: under the protocol (counted in, or the lock for reading).
            sh.data.with(|p| unsafe {
                let (a, b) = *p;
                assert_eq!(a, b, "a reader saw half a write");
            })
        };
        let threads: Vec<_> = (0..2)
            .map(|slot| {
                let sh = sh.clone();
                thread::spawn(move || match sh.readers.enter(0, slot, &sh.writing) {
                    Some(_reading) => read(&sh),
                    None => {
                        SLOW.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let _l = sh.lock.read().unwrap();
                        read(&sh)
                    }
                })
            })
            .collect();
        {
            let _l = sh.lock.write().unwrap();
            sh.readers.close(0, &sh.writing, || {});
            // SAFETY: the lock for writing and every reader drained.
            sh.data.with_mut(|p| unsafe {
                (*p).0 = 1;
                (*p).1 = 1;
            });
            readers::Readers::lower(&sh.writing);
        }
        for t in threads {
            t.join().unwrap();
        }
    });
    assert!(
        SLOW.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "no execution took the readers' slow path"
    );
}

/// A region's failure-message slot (`src/slot.rs`): a writer swaps a new value in while a reader
/// reads the old one under the slot's lock, and frees the value it replaced (modelled as a write
/// to it: loom reports a write concurrent with the read). The reader reads a whole value, never
/// one being freed; a second reader waits for the first. Fails when `try_put` ignores the lock.
#[test]
fn a_reader_never_reads_a_value_a_writer_frees() {
    use loom::cell::UnsafeCell;
    loom::model(|| {
        let s = Arc::new(slot::Slot::<UnsafeCell<u64>>::new());
        assert!(s.try_put(Box::new(UnsafeCell::new(1))).unwrap().is_none());
        let writer = {
            let s = s.clone();
            loom::thread::spawn(move || {
                let gone = match s.try_put(Box::new(UnsafeCell::new(2))) {
                    Ok(old) => old.expect("the slot held a value"),
                    Err(refused) => refused,
                };
                // SAFETY: the writer owns the box it got back (what freeing it would touch).
                gone.with_mut(|p| unsafe { *p = 0 });
            })
        };
        let reader = {
            let s = s.clone();
            // SAFETY: read under the slot's lock.
            loom::thread::spawn(move || s.read(|c| c.with(|p| unsafe { *p })))
        };
        // SAFETY: as above.
        let mine = s.read(|c| c.with(|p| unsafe { *p })).expect("a value");
        let theirs = reader.join().unwrap().expect("a value");
        writer.join().unwrap();
        for got in [mine, theirs] {
            assert!(got == 1 || got == 2, "read {got}: a value being freed");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The shared cache's chunk states (`src/shared/state.rs`), slots 0 and 1 standing for two
// processes.

#[path = "../src/shared/state.rs"]
#[allow(dead_code)]
mod shared_state;

/// A purge's punch against a pin in another process: once the pin has seen every chunk present,
/// no punch removes the page while it holds (`present` stands for the page being in the file).
#[test]
fn shared_no_punch_reaches_a_pinned_chunk() {
    use loom::sync::atomic::{AtomicU32, AtomicU64};
    loom::model(|| {
        let w = Arc::new(AtomicU32::new(shared_state::PRESENT));
        let pins = Arc::new(AtomicU64::new(0));
        let present = Arc::new(AtomicBool::new(true));
        let purger = {
            let (w, pins, present) = (w.clone(), pins.clone(), present.clone());
            thread::spawn(move || {
                let pinned = || shared_state::pins_held(&pins, 2, |_| true);
                if let Some(prior) = shared_state::begin_punch(&w, 0, false, pinned) {
                    present.store(false, Ordering::SeqCst);
                    shared_state::end_punch(&w, 0, prior, true);
                }
            })
        };
        // The pin, in slot 1.
        shared_state::mark_pin(&pins, 1);
        loop {
            let st = w.load(Ordering::SeqCst);
            if st == shared_state::PRESENT {
                break;
            }
            if st == shared_state::ABSENT && shared_state::claim(&w, 1) {
                present.store(true, Ordering::SeqCst);
                assert!(shared_state::end_fill(&w, 1, true));
                break;
            }
            thread::yield_now();
        }
        assert!(present.load(Ordering::SeqCst), "pinned, yet missing");
        purger.join().unwrap();
        assert!(present.load(Ordering::SeqCst), "punched while pinned");
        assert_eq!(w.load(Ordering::SeqCst), shared_state::PRESENT);
    });
}

/// A failing fill against a reader in another process: a reader that sees the zeros sees the
/// chunk marked failed; and a process that takes the claim of a filler it took for dead ends
/// the chunk itself, the old filler's end then changes nothing.
#[test]
fn shared_zeros_are_read_only_as_failed_and_a_taken_claim_stays_taken() {
    use loom::sync::atomic::AtomicU32;
    loom::model(|| {
        let w = Arc::new(AtomicU32::new(shared_state::ABSENT));
        let zeros = Arc::new(AtomicBool::new(false));
        assert!(shared_state::claim(&w, 0));
        let filler = {
            let (w, zeros) = (w.clone(), zeros.clone());
            thread::spawn(move || {
                if shared_state::mark_failing(&w, 0) {
                    zeros.store(true, Ordering::Release);
                    shared_state::end_fill(&w, 0, false);
                }
            })
        };
        let reader = {
            let (w, zeros) = (w.clone(), zeros.clone());
            thread::spawn(move || {
                if zeros.load(Ordering::Acquire) {
                    assert!(
                        shared_state::failed(w.load(Ordering::Acquire)),
                        "zeros read unmarked"
                    );
                }
            })
        };
        // A third process takes the claim as if slot 0 were dead, and fills it right.
        let taker = {
            let w = w.clone();
            thread::spawn(move || {
                if shared_state::abandon(&w, 0).is_some() && shared_state::claim(&w, 1) {
                    assert!(shared_state::end_fill(&w, 1, true));
                }
            })
        };
        filler.join().unwrap();
        reader.join().unwrap();
        taker.join().unwrap();
        let st = w.load(Ordering::SeqCst);
        assert!(
            st == shared_state::PRESENT || st == shared_state::FAILED || st == shared_state::ABSENT,
            "left in flight: {st:#x}"
        );
        assert!(shared_state::owner(st).is_none());
    });
}

/// A late zero installer (a fault on a failed chunk) against a pin retrying that chunk in another
/// process: no zero is written while the retry's fill runs, so none lands among its bytes.
#[test]
fn shared_late_zeros_never_meet_a_retried_fill() {
    use loom::sync::atomic::AtomicU32;
    loom::model(|| {
        let w = Arc::new(AtomicU32::new(shared_state::FAILED));
        let zeroing = Arc::new(AtomicBool::new(false));
        let filling = Arc::new(AtomicBool::new(false));
        let zeros = {
            let (w, zeroing, filling) = (w.clone(), zeroing.clone(), filling.clone());
            thread::spawn(move || {
                if shared_state::claim_failed(&w, 0) {
                    zeroing.store(true, Ordering::SeqCst);
                    assert!(
                        !filling.load(Ordering::SeqCst),
                        "zeros during a retried fill"
                    );
                    zeroing.store(false, Ordering::SeqCst);
                    assert!(shared_state::end_fill(&w, 0, false));
                }
            })
        };
        // The retry, in slot 1: punch the failed chunk (forced), then fill it.
        loop {
            if let Some(prior) = shared_state::begin_punch(&w, 1, true, || false) {
                assert_eq!(prior, shared_state::FAILED);
                shared_state::end_punch(&w, 1, prior, true);
                break;
            }
            thread::yield_now();
        }
        if shared_state::claim(&w, 1) {
            filling.store(true, Ordering::SeqCst);
            assert!(
                !zeroing.load(Ordering::SeqCst),
                "a retried fill during zeros"
            );
            filling.store(false, Ordering::SeqCst);
            assert!(shared_state::end_fill(&w, 1, true));
        }
        zeros.join().unwrap();
        assert_eq!(w.load(Ordering::SeqCst), shared_state::PRESENT);
    });
}
