//! Stress (issue 11, "Never a wrong byte"): threads run pins, unpins, writes through pins, reads,
//! reclaims, removes and re-inserts, and failing callbacks against one cache, while a step hook
//! (`testing::set_step_hook`) injects random delays of 0–2 ms between the steps of fills and
//! pins. Every byte read is checked: it is the callback's byte, or what a current pin holder
//! wrote.
//!
//! - Zero policy, each mode (monitor, SIGBUS, explicit) for `LAZYFREE_STRESS_SECS` seconds
//!   (default 20) in a child process: some entries' callbacks can be broken (while broken they
//!   fail for every even chunk). A reader may see zeros only in a broken entry's even chunks and
//!   only if `is_failed()` is true right after its read; a pin of a broken entry may fail with
//!   `RegenerateFailed`, and `is_failed()` is then true. In explicit mode reads are pins.
//! - Poison policy (monitor, SIGBUS) for half that time: the same operations on entries whose
//!   callbacks never fail, checked strictly. Besides, a pinner thread reclaims and pins one of
//!   four other entries (the one in focus, changed every 200 ms) with its callback made to fail
//!   for even chunks during that pin (bug 3's window: each call sleeps 1 ms), while a reader
//!   thread reads the same entry directly, and the workers pin these entries too. A pin may
//!   fail (`RegenerateFailed`) but never raise SIGBUS; the reader's read of a chunk whose
//!   rebuild failed must end the child with SIGBUS (a SIGBUS handler installed before the cache
//!   exits with code 60 on the reader's thread, 61 on any other); zeros or any other wrong byte
//!   are mismatches. Children are started again until the time is used up.
//!
//! Writes through a pin: the holder bumps the entry's sequence number to odd, writes a marker
//! pattern over the whole entry, checks that `testing::reclaim` during the pin drops nothing and
//! that the marker is intact, writes the callback's bytes back, bumps the sequence to even and
//! unpins. A reader accepts marker words only if the sequence was odd or changed across its read
//! (a seqlock). All accesses to entry bytes are 8-byte atomic loads and stores.
//!
//! Output: `stress (<policy>, <mode>): N operations, B bytes verified, M mismatches, ...` via
//! `common::report`.

mod common;

use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use common::*;
use lazyfree::testing::{self, Step};
use lazyfree::{Cache, Config, Entry, Error, FailurePolicy, FillChunk, Mode, RegenError};

const KEYS: usize = 16;
const CHUNK: usize = 16 * 1024;
const MAX_LEN: usize = 256 * 1024;
const THREADS: usize = 4;
/// Seed offset of the marker a pin holder writes.
const MARK: u64 = 0x6d61_726b_6572_0000;
const SKIP: i32 = 3;
/// Exit codes of the poison child's SIGBUS handler.
const SIGBUS_EXPECTED: i32 = 60;
const SIGBUS_UNEXPECTED: i32 = 61;

fn stress_secs() -> f64 {
    std::env::var("LAZYFREE_STRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20.0)
}

fn mode_of(name: &str) -> Mode {
    match name {
        "monitor" => Mode::Monitor,
        "sigbus" => Mode::Sigbus,
        "explicit" => Mode::Explicit,
        other => panic!("unknown mode {other}"),
    }
}

#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child() {
    child_main(&|case| {
        let (policy, mode) = case.split_once('/').expect("case policy/mode");
        let secs: f64 = std::env::var("LAZYFREE_STRESS_CHILD_SECS")
            .expect("secs")
            .parse()
            .expect("secs");
        let dur = Duration::from_secs_f64(secs);
        match policy {
            "zero" => stress_child(mode_of(mode), FailurePolicy::Zero, dur),
            "poison" => stress_child(mode_of(mode), FailurePolicy::Poison, dur),
            other => panic!("unknown policy {other}"),
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The step hook: random delays

static HOOK_RNG: AtomicU64 = AtomicU64::new(0x2545_f491_4f6c_dd1d);
static HOOK_DELAYS: AtomicU64 = AtomicU64::new(0);

/// Sleeps 0–2 ms at one step in three. No allocation, no lock (it may run in a signal handler).
fn delay_hook(_s: Step, addr: usize) {
    let mut x = HOOK_RNG.fetch_add(0x9e37_79b9_7f4a_7c15, Relaxed) ^ addr as u64;
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 29;
    if x % 3 != 0 {
        return;
    }
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: ((x >> 8) % 2_000_001) as libc::c_long,
    };
    // SAFETY: nanosleep with a valid timespec; async-signal-safe.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
    HOOK_DELAYS.fetch_add(1, Relaxed);
}

// ---------------------------------------------------------------------------------------------
// Entries and their model

/// How an entry's callback can fail.
#[derive(Clone)]
enum Failing {
    Never,
    /// While set, every even chunk fails (zero policy).
    WhileBroken(Arc<AtomicBool>),
    /// Poison policy: every call sleeps 1 ms; while set (only around the failing-entry pinner's
    /// pins), every even chunk fails.
    DuringPin(Arc<AtomicBool>),
}

struct Slot {
    entry: Entry,
    seed: u64,
    len: usize,
    failing: Failing,
    /// Seqlock of the pin holder writing the marker: odd while its words may be in the entry.
    seq: AtomicU64,
    /// One writer through a pin at a time.
    writer: Mutex<()>,
}

impl Slot {
    fn broken(&self) -> bool {
        matches!(&self.failing, Failing::WhileBroken(b) if b.load(SeqCst))
    }
}

fn callback(
    seed: u64,
    failing: Failing,
) -> impl Fn(usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync + 'static {
    move |off, buf| {
        match &failing {
            Failing::Never => {}
            Failing::WhileBroken(b) => {
                if b.load(SeqCst) && (off / CHUNK) % 2 == 0 {
                    return Err("broken even chunk (stress)".into());
                }
            }
            Failing::DuringPin(b) => {
                std::thread::sleep(Duration::from_millis(1));
                if b.load(SeqCst) && (off / CHUNK) % 2 == 0 {
                    return Err("failure during a pin (stress)".into());
                }
            }
        }
        fill(seed, off, buf);
        Ok(())
    }
}

fn new_slot(cache: &Cache<u64>, k: u64, rng: &mut Rng, failing: Failing) -> Slot {
    let len = 8 * (1 + rng.below((MAX_LEN / 8) as u64) as usize);
    let seed = rng.next();
    let entry = if rng.below(2) == 0 {
        cache
            .insert(k, len, callback(seed, failing.clone()))
            .expect("insert")
    } else {
        cache
            .insert_with(k, &expected(seed, len), callback(seed, failing.clone()))
            .expect("insert_with")
    };
    Slot {
        entry,
        seed,
        len,
        failing,
        seq: AtomicU64::new(0),
        writer: Mutex::new(()),
    }
}

/// The entry's words `[from, to)` (indices of 8-byte words), loaded atomically from `base`.
fn load_words(base: *const u8, from: usize, to: usize, out: &mut Vec<u64>) {
    out.clear();
    for w in from..to {
        // SAFETY: `base` is a live entry's page-aligned start (mapped while the caller holds the
        // entry) and `w * 8 + 8 <= len`; every access to entry bytes in this file is atomic.
        let a = unsafe { &*(base.add(w * 8) as *const AtomicU64) };
        out.push(a.load(Relaxed));
    }
}

fn store_words(base: *const u8, seed: u64, len: usize) {
    let mut buf = vec![0u8; len];
    fill(seed, 0, &mut buf);
    for (w, b) in buf.chunks_exact(8).enumerate() {
        // SAFETY: as in `load_words`; the caller holds a pin, so the pages are writable and kept.
        let a = unsafe { &*(base.add(w * 8) as *const AtomicU64) };
        a.store(u64::from_le_bytes(b.try_into().unwrap()), Relaxed);
    }
}

fn words_of(seed: u64, from: usize, to: usize) -> Vec<u64> {
    let mut buf = vec![0u8; (to - from) * 8];
    fill(seed, from * 8, &mut buf);
    buf.chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[derive(Default)]
struct Totals {
    ops: AtomicU64,
    verified: AtomicU64,
    mismatches: AtomicU64,
    zero_reads: AtomicU64,
    failed_pins: AtomicU64,
    marker_writes: AtomicU64,
    marker_seen: AtomicU64,
    reclaimed: AtomicU64,
    removes: AtomicU64,
}

impl Totals {
    fn mismatch(&self, what: String) {
        if self.mismatches.fetch_add(1, SeqCst) < 20 {
            eprintln!("MISMATCH: {what}");
        }
    }
}

/// Reads words `[from, to)` of the slot's entry (through a pin in explicit mode, or if `pin`),
/// and checks them. `exclusive`: no writer can be active (the caller holds the write lock).
fn read_check(s: &Slot, from: usize, to: usize, pin: bool, t: &Totals, what: &str) {
    let e = &s.entry;
    let broken = s.broken();
    let mut got = Vec::new();
    let seq0 = s.seq.load(Acquire);
    let guard;
    let base = if pin || e.try_as_slice().is_none() {
        match e.pin() {
            Ok(g) => {
                guard = g;
                guard.as_ptr()
            }
            Err(Error::RegenerateFailed(_)) if !matches!(s.failing, Failing::Never) => {
                // Zero policy: breaks and repairs wait for this read (the slot's lock), so the
                // entry must still be broken and marked failed. Poison: the pinner's flag may
                // have changed since; nothing to check.
                if matches!(s.failing, Failing::WhileBroken(_)) && !(broken && e.is_failed()) {
                    t.mismatch(format!(
                        "{what}: pin failed while broken {broken}, is_failed {}",
                        e.is_failed()
                    ));
                }
                t.failed_pins.fetch_add(1, Relaxed);
                return;
            }
            Err(err) => {
                t.mismatch(format!("{what}: pin failed: {err}"));
                return;
            }
        }
    } else {
        e.as_ptr()
    };
    load_words(base, from, to, &mut got);
    fence(Acquire);
    let seq1 = s.seq.load(Relaxed);
    let writer = seq0 % 2 == 1 || seq0 != seq1;
    let want = words_of(s.seed, from, to);
    let mark = writer.then(|| words_of(s.seed ^ MARK, from, to));
    let (mut bad, mut zeros, mut marked) = (0usize, 0usize, 0usize);
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        if g == w {
            continue;
        }
        if mark.as_ref().is_some_and(|m| m[i] == g) {
            marked += 1;
        } else if g == 0
            && broken
            && matches!(s.failing, Failing::WhileBroken(_))
            && ((from + i) * 8 / CHUNK) % 2 == 0
        {
            zeros += 1;
        } else {
            bad += 1;
        }
    }
    let failed_after = e.is_failed();
    if zeros > 0 {
        if failed_after {
            t.zero_reads.fetch_add(1, Relaxed);
        } else {
            t.mismatch(format!(
                "{what}: {zeros} zero words of {} read without is_failed()",
                got.len()
            ));
        }
    }
    if marked > 0 {
        t.marker_seen.fetch_add(1, Relaxed);
    }
    if bad > 0 {
        t.mismatch(format!(
            "{what}: {bad} of {} words wrong (words {from}..{to} of {}, broken {broken}, \
             is_failed {failed_after}, writer {writer})",
            got.len(),
            s.len / 8
        ));
    }
    t.verified
        .fetch_add(((got.len() - bad - zeros) * 8) as u64, Relaxed);
}

/// Pins the entry, writes the marker over it, checks it survives a reclaim, writes the
/// callback's bytes back and unpins.
fn write_through_pin(s: &Slot, t: &Totals) {
    let Ok(_w) = s.writer.try_lock() else {
        return;
    };
    let e = &s.entry;
    let g = match e.pin() {
        Ok(g) => g,
        Err(Error::RegenerateFailed(_)) if !matches!(s.failing, Failing::Never) => {
            if matches!(s.failing, Failing::WhileBroken(_)) && !(s.broken() && e.is_failed()) {
                t.mismatch(format!(
                    "writer: pin failed while broken {}, is_failed {}",
                    s.broken(),
                    e.is_failed()
                ));
            }
            t.failed_pins.fetch_add(1, Relaxed);
            return;
        }
        Err(err) => {
            t.mismatch(format!("writer: pin failed: {err}"));
            return;
        }
    };
    let base = g.as_ptr();
    let words = s.len / 8;
    s.seq.fetch_add(1, Relaxed); // odd: the marker may be in the entry
    fence(Release);
    store_words(base, s.seed ^ MARK, s.len);
    let dropped = testing::reclaim(e);
    if dropped > 0 {
        t.mismatch(format!(
            "writer: reclaim dropped {dropped} pages of a pinned entry"
        ));
    }
    let mut got = Vec::new();
    load_words(base, 0, words, &mut got);
    let want = words_of(s.seed ^ MARK, 0, words);
    let lost = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    if lost > 0 {
        t.mismatch(format!(
            "writer: {lost} of {words} words written through the pin were lost"
        ));
    }
    store_words(base, s.seed, s.len);
    s.seq.fetch_add(1, Release); // even: the callback's bytes are back
    t.marker_writes.fetch_add(1, Relaxed);
    drop(g);
}

// ---------------------------------------------------------------------------------------------
// The child

/// Thread ids by role, for the poison child's SIGBUS handler: 0 the failing-entry reader, 1 the
/// failing-entry pinner, 2.. the workers.
static ROLE_TIDS: [AtomicUsize; 2 + THREADS] = [const { AtomicUsize::new(0) }; 2 + THREADS];
const ROLES: [&str; 2 + THREADS] = [
    "the failing-entry reader",
    "the failing-entry pinner",
    "worker 0",
    "worker 1",
    "worker 2",
    "worker 3",
];

fn register_role(i: usize) {
    // SAFETY: gettid has no preconditions.
    ROLE_TIDS[i].store(unsafe { libc::syscall(libc::SYS_gettid) } as usize, SeqCst);
}

/// A SIGBUS handler for the poison child, installed before the cache (in SIGBUS mode lazyfree
/// chains to it): says which thread got it and where, and exits with `SIGBUS_EXPECTED` if that
/// is the failing-entry reader, else `SIGBUS_UNEXPECTED`. Only async-signal-safe calls.
extern "C" fn poison_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: gettid has no preconditions; the kernel passes a valid siginfo.
    let (me, addr) = unsafe {
        (
            libc::syscall(libc::SYS_gettid) as usize,
            (*info).si_addr() as usize,
        )
    };
    let role = ROLE_TIDS.iter().position(|t| t.load(SeqCst) == me);
    let name = role.map_or("an unknown thread", |i| ROLES[i]).as_bytes();
    let mut hex = *b" at 0x0000000000000000\n";
    for i in 0..16 {
        let d = ((addr >> (60 - 4 * i)) & 0xf) as u8;
        hex[6 + i] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
    }
    let pre = b"SIGBUS on ";
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffers are live.
    unsafe {
        libc::write(2, pre.as_ptr().cast(), pre.len());
        libc::write(2, name.as_ptr().cast(), name.len());
        libc::write(2, hex.as_ptr().cast(), hex.len());
        libc::_exit(if role == Some(0) {
            SIGBUS_EXPECTED
        } else {
            SIGBUS_UNEXPECTED
        });
    }
}

fn install_poison_handler() {
    // SAFETY: all-zero is a valid sigaction; the fields needed are set.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    let h: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = poison_sigbus;
    sa.sa_sigaction = h as libc::sighandler_t;
    sa.sa_flags = libc::SA_SIGINFO;
    // SIGSEGV too: the poison policy raises it in monitor mode before Linux 6.6
    // (`poison_signal`).
    for sig in [libc::SIGBUS, libc::SIGSEGV] {
        // SAFETY: installs a handler that only calls gettid, write(2) and _exit(2).
        let rc = unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) };
        assert_eq!(rc, 0);
    }
}

fn summary(t: &Totals, tag: &str) -> String {
    format!(
        "{tag} ops={} verified={} mismatches={} zero_reads={} failed_pins={} marker_writes={} \
         marker_seen={} reclaimed={} removes={} hook_delays={}",
        t.ops.load(SeqCst),
        t.verified.load(SeqCst),
        t.mismatches.load(SeqCst),
        t.zero_reads.load(SeqCst),
        t.failed_pins.load(SeqCst),
        t.marker_writes.load(SeqCst),
        t.marker_seen.load(SeqCst),
        t.reclaimed.load(SeqCst),
        t.removes.load(SeqCst),
        HOOK_DELAYS.load(SeqCst),
    )
}

fn stress_child(mode: Mode, policy: FailurePolicy, dur: Duration) {
    let _w = Watchdog::new("stress", dur.as_secs() + 120);
    let poison = policy == FailurePolicy::Poison;
    if poison {
        install_poison_handler();
    }
    let cache: Cache<u64> = Cache::new(
        Config::default()
            .mode(mode)
            .on_failure(policy)
            .fill_chunk(FillChunk::Bytes(CHUNK)),
    )
    .expect("cache");
    if poison && mode == Mode::Monitor && !cache.stats().poison_supported {
        println!("SKIP: the kernel has no UFFDIO_POISON");
        std::process::exit(SKIP);
    }
    let seed = std::env::var("LAZYFREE_STRESS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64 * 0x9e37_79b9 + 1);
    println!("stress seed {seed}");
    let mut rng = Rng(seed);
    // Zero policy: every fourth key can be broken. Poison: keys KEYS.. fail during the
    // failing-entry pinner's pins; the workers only pin them, the failing-entry reader reads
    // them directly.
    let failing_keys = if poison { 4 } else { 0 };
    let slots: Vec<RwLock<Arc<Slot>>> = (0..KEYS + failing_keys)
        .map(|k| {
            let failing = if k >= KEYS {
                Failing::DuringPin(Arc::new(AtomicBool::new(false)))
            } else if !poison && k % 4 == 0 {
                Failing::WhileBroken(Arc::new(AtomicBool::new(false)))
            } else {
                Failing::Never
            };
            RwLock::new(Arc::new(new_slot(&cache, k as u64, &mut rng, failing)))
        })
        .collect();
    testing::set_step_hook(Some(delay_hook));
    let t = Totals::default();
    let until = Instant::now() + dur;
    let stop = AtomicBool::new(false);
    let target = AtomicUsize::new(KEYS);
    std::thread::scope(|sc| {
        for i in 0..THREADS {
            let (cache, slots, t) = (&cache, &slots, &t);
            let seed = seed.wrapping_add(0x9e37_79b9 * (i as u64 + 1));
            sc.spawn(move || {
                register_role(2 + i);
                worker(cache, slots, failing_keys, t, seed, until)
            });
        }
        if poison {
            let (slots, t, stop) = (&slots, &t, &stop);
            let target = &target;
            sc.spawn(move || failing_reader(slots, t, stop, target, seed ^ 0xfa11));
            sc.spawn(move || failing_pinner(slots, t, stop, target, seed ^ 0x919));
            // Progress for the parent every 25 ms, in case a failed rebuild ends this child with
            // SIGBUS (under qemu's TCG children often end within 200 ms: a line only that often
            // left whole runs of children with nothing verified); the failing entry in focus
            // changes every 200 ms.
            let mut i = 0;
            while Instant::now() < until {
                std::thread::sleep(Duration::from_millis(25));
                i += 1;
                if i % 8 == 0 {
                    target.store(KEYS + (i / 8) % failing_keys, SeqCst);
                }
                println!("{}", summary(t, "PROGRESS"));
            }
        }
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, SeqCst);
    });
    testing::set_step_hook(None);
    println!("{}", cache.stats());
    println!("{}", summary(&t, "STRESS"));
}

#[allow(clippy::readonly_write_lock)] // the write lock keeps readers and writers out meanwhile
fn worker(
    cache: &Cache<u64>,
    slots: &[RwLock<Arc<Slot>>],
    failing_keys: usize,
    t: &Totals,
    seed: u64,
    until: Instant,
) {
    let mut rng = Rng(seed);
    while Instant::now() < until {
        t.ops.fetch_add(1, Relaxed);
        // Poison: the failing entries are only pinned here (never read directly).
        let k = rng.below((KEYS + failing_keys) as u64) as usize;
        let op = rng.below(100);
        if k >= KEYS {
            let s = slots[k].read().unwrap().clone();
            if op < 50 {
                read_check(&s, 0, s.len / 8, true, t, "pin of a failing entry");
            } else {
                t.reclaimed
                    .fetch_add(testing::reclaim(&s.entry) as u64, Relaxed);
            }
            continue;
        }
        let slot = &slots[k];
        match op {
            // Read all of it (a pin in explicit mode).
            0..=29 => {
                let s = slot.read().unwrap();
                read_check(&s, 0, s.len / 8, false, t, "read");
            }
            // Read a random part.
            30..=39 => {
                let s = slot.read().unwrap();
                let words = s.len / 8;
                let from = rng.below(words as u64) as usize;
                let to = from + 1 + rng.below((words - from) as u64) as usize;
                read_check(&s, from, to, false, t, "partial read");
            }
            // Pin, read through the guard, unpin.
            40..=49 => {
                let s = slot.read().unwrap();
                read_check(&s, 0, s.len / 8, true, t, "pin");
            }
            // Write through a pin.
            50..=61 => {
                let s = slot.read().unwrap();
                write_through_pin(&s, t);
            }
            // Reclaim a few entries.
            62..=74 => {
                let entries: Vec<Entry> = (0..1 + rng.below(4))
                    .map(|_| {
                        slots[rng.below(KEYS as u64) as usize]
                            .read()
                            .unwrap()
                            .entry
                            .clone()
                    })
                    .collect();
                t.reclaimed
                    .fetch_add(testing::reclaim_all(&entries) as u64, Relaxed);
            }
            // Replace with a new entry.
            75..=79 => {
                let mut s = slot.write().unwrap();
                let failing = s.failing.clone();
                if let Failing::WhileBroken(b) = &failing {
                    b.store(false, SeqCst);
                }
                *s = Arc::new(new_slot(cache, k as u64, &mut rng, failing));
            }
            // Remove; the removed handle stays readable; insert again.
            80..=84 => {
                let mut s = slot.write().unwrap();
                match cache.remove(&(k as u64)) {
                    Some(e) if e.as_ptr() == s.entry.as_ptr() => {}
                    other => t.mismatch(format!("remove {k}: got {other:?}")),
                }
                testing::reclaim(&s.entry);
                read_check(&s, 0, s.len / 8, false, t, "removed entry");
                t.removes.fetch_add(1, Relaxed);
                let failing = s.failing.clone();
                if let Failing::WhileBroken(b) = &failing {
                    b.store(false, SeqCst);
                }
                *s = Arc::new(new_slot(cache, k as u64, &mut rng, failing));
            }
            // Break or repair a breakable entry; a repair is followed by a pin that must
            // rebuild whatever failed and clear the mark.
            _ => {
                let s = slot.write().unwrap();
                if let Failing::WhileBroken(b) = &s.failing {
                    let now = !b.load(SeqCst);
                    b.store(now, SeqCst);
                    if !now {
                        read_check(&s, 0, s.len / 8, true, t, "pin after a repair");
                        if s.entry.is_failed() {
                            t.mismatch(format!("key {k}: still failed after a repair and a pin"));
                        }
                    }
                }
            }
        }
    }
}

/// Poison policy: reads the failing entry in focus (`target`) directly, again and again, until
/// `stop`. A rebuild failed during the pinner's pin must end the process with SIGBUS on this
/// thread (never zeros); otherwise the bytes must be right.
fn failing_reader(
    slots: &[RwLock<Arc<Slot>>],
    t: &Totals,
    stop: &AtomicBool,
    target: &AtomicUsize,
    seed: u64,
) {
    register_role(0);
    let mut rng = Rng(seed | 1);
    while !stop.load(SeqCst) {
        let s = slots[target.load(SeqCst)].read().unwrap().clone();
        if rng.below(4) == 0 {
            t.reclaimed
                .fetch_add(testing::reclaim(&s.entry) as u64, Relaxed);
        }
        read_check(&s, 0, s.len / 8, false, t, "direct read of a failing entry");
        std::thread::sleep(Duration::from_micros(rng.below(2000)));
    }
}

/// Poison policy: reclaims the failing entry in focus and pins it with its callback failing
/// (even chunks), so that its rebuilds fail while the reader reads it; the pin gets
/// `RegenerateFailed` or, where nothing was missing, the right bytes.
fn failing_pinner(
    slots: &[RwLock<Arc<Slot>>],
    t: &Totals,
    stop: &AtomicBool,
    target: &AtomicUsize,
    seed: u64,
) {
    register_role(1);
    let mut rng = Rng(seed | 1);
    while !stop.load(SeqCst) {
        let s = slots[target.load(SeqCst)].read().unwrap().clone();
        let Failing::DuringPin(flag) = &s.failing else {
            unreachable!()
        };
        t.reclaimed
            .fetch_add(testing::reclaim(&s.entry) as u64, Relaxed);
        // Half the pins with the callback failing, half without (they must succeed then).
        let fail = rng.below(2) == 0;
        flag.store(fail, SeqCst);
        read_check(&s, 0, s.len / 8, true, t, "failing pin");
        flag.store(false, SeqCst);
        std::thread::sleep(Duration::from_millis(rng.below(30)));
    }
}

// ---------------------------------------------------------------------------------------------
// The tests

fn parse_summary(line: &str) -> Vec<(String, u64)> {
    line.split(' ')
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(0)))
        .collect()
}

fn get(s: &[(String, u64)], k: &str) -> u64 {
    s.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v)
}

fn stress_zero(mode: &str) {
    let secs = stress_secs();
    let case = format!("zero/{mode}");
    let (status, out) = run_child(
        &case,
        &[("LAZYFREE_STRESS_CHILD_SECS", &secs.to_string())],
        Duration::from_secs_f64(secs + 180.0),
    );
    let line = out.lines().find(|l| l.starts_with("STRESS ")).unwrap_or("");
    let s = parse_summary(line);
    report(format_args!(
        "stress (zero policy, {mode}): {} operations, {} bytes verified, {} mismatches \
         ({} reads saw zeros of a failed chunk with is_failed, {} failed pins, {} writes \
         through a pin, {} reads saw a pin holder's marker, {} pages reclaimed, {} removes, \
         {} step-hook delays)",
        get(&s, "ops"),
        get(&s, "verified"),
        get(&s, "mismatches"),
        get(&s, "zero_reads"),
        get(&s, "failed_pins"),
        get(&s, "marker_writes"),
        get(&s, "marker_seen"),
        get(&s, "reclaimed"),
        get(&s, "removes"),
        get(&s, "hook_delays"),
    ));
    assert!(
        status.success() && !line.is_empty(),
        "stress child {case} ended {status:?}\n{out}"
    );
    assert_eq!(get(&s, "mismatches"), 0, "{out}");
    assert!(
        get(&s, "verified") > 0 && get(&s, "marker_writes") > 0,
        "{out}"
    );
}

fn stress_poison(mode: &str) {
    let secs = stress_secs() / 2.0;
    let case = format!("poison/{mode}");
    let t0 = Instant::now();
    let (mut children, mut sigbus_ends) = (0, 0);
    let (mut verified, mut mismatches, mut failed_pins) = (0, 0, 0);
    loop {
        let left = secs - t0.elapsed().as_secs_f64();
        if left < 1.0 && children > 0 {
            break;
        }
        let left = left.max(1.0);
        let (status, out) = run_child(
            &case,
            &[("LAZYFREE_STRESS_CHILD_SECS", &left.to_string())],
            Duration::from_secs_f64(left + 180.0),
        );
        children += 1;
        if status.code() == Some(SKIP) {
            skipped(format_args!(
                "stress_poison_{mode}: the kernel has no UFFDIO_POISON"
            ));
            return;
        }
        let last = out
            .lines()
            .rfind(|l| l.starts_with("STRESS ") || l.starts_with("PROGRESS "))
            .unwrap_or("");
        let s = parse_summary(last);
        verified += get(&s, "verified");
        failed_pins += get(&s, "failed_pins");
        let printed = out.lines().filter(|l| l.starts_with("MISMATCH")).count() as u64;
        mismatches += get(&s, "mismatches").max(printed);
        let ok_end = status.success() || status.code() == Some(SIGBUS_EXPECTED);
        sigbus_ends += (status.code() == Some(SIGBUS_EXPECTED)) as u32;
        if !ok_end || printed > 0 {
            report(format_args!(
                "stress (poison policy, {mode}): child {children} ended {status:?}"
            ));
            panic!(
                "stress child {case} ended {status:?} after {printed} MISMATCH lines (exit 60: \
                 SIGBUS on the failing-entry reader, as expected; 61: SIGBUS on another thread)\n{out}"
            );
        }
    }
    report(format_args!(
        "stress (poison policy, {mode}): {children} children ({sigbus_ends} ended by SIGBUS on a \
         failed rebuild), {verified} bytes verified, {mismatches} mismatches, {failed_pins} \
         failed pins"
    ));
    assert_eq!(mismatches, 0);
    assert!(verified > 0);
}

/// Zero policy, monitor mode: see the module docs.
#[test]
fn stress_zero_policy_monitor() {
    stress_zero("monitor");
}

/// Zero policy, SIGBUS mode: see the module docs.
#[test]
fn stress_zero_policy_sigbus() {
    stress_zero("sigbus");
}

/// Explicit mode (reads are pins; a failed rebuild fails the pin): see the module docs.
#[test]
fn stress_explicit() {
    stress_zero("explicit");
}

/// Poison policy, monitor mode: see the module docs.
#[test]
fn stress_poison_policy_monitor() {
    stress_poison("monitor");
}

/// Poison policy, SIGBUS mode: see the module docs.
#[test]
fn stress_poison_policy_sigbus() {
    stress_poison("sigbus");
}
