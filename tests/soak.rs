//! Soak: several threads run random inserts, reads, removes, pins, reclaims and regenerate
//! failures against one cache for `LAZYFREE_SOAK_SECS` seconds (default 60, shared by the modes
//! run: monitor, SIGBUS, explicit), each mode in a child process inside a memory cgroup about
//! half the size of the cache's contents. Every byte read is checked against a model of what
//! each key holds. A read of an entry whose callback is failing may see zeros (the zero policy)
//! only if `is_failed()` says so afterwards; a pin of such an entry may return
//! `RegenerateFailed`, with `is_failed()` set. Anything else that differs from the model is a
//! mismatch, and the test asserts there are none.
//!
//! Output: one line per mode and a total,
//! `soak: N operations, B bytes verified, P pages rebuilt, M mismatches`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use common::*;
use lazyfree::{testing, Cache, Config, Entry, Error, FailurePolicy, Mode, RegenError};

/// Keys, and the largest entry: about 256 MiB of entries on average.
const KEYS: u64 = 256;
const MAX_LEN: usize = 2 << 20;
/// The memory cgroup's limit: about half the entries' bytes.
const LIMIT: usize = 128 << 20;
const THREADS: usize = 4;

#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child() {
    child_main(&|case| {
        let mode = match case {
            "monitor" => Mode::Monitor,
            "sigbus" => Mode::Sigbus,
            "explicit" => Mode::Explicit,
            other => panic!("unknown case {other}"),
        };
        let secs: f64 = std::env::var("LAZYFREE_SOAK_CHILD_SECS")
            .expect("secs")
            .parse()
            .expect("secs");
        run_soak(mode, Duration::from_secs_f64(secs));
    });
}

/// What a key holds.
#[derive(Clone)]
struct Model {
    seed: u64,
    len: usize,
    /// Set for entries whose callback can be broken: while true, it fails.
    broken: Option<Arc<AtomicBool>>,
}

#[derive(Default)]
struct Totals {
    ops: AtomicU64,
    verified: AtomicU64,
    mismatches: AtomicU64,
    failed_reads: AtomicU64,
    /// Failed pins whose error did not carry the callback's message.
    texts_lost: AtomicU64,
    reclaimed: AtomicU64,
}

impl Totals {
    fn mismatch(&self, what: String) {
        if self.mismatches.fetch_add(1, Relaxed) < 10 {
            eprintln!("MISMATCH: {what}");
        }
    }
}

/// A callback for `m`: stream `seed`, failing while `broken` is set.
fn callback(
    seed: u64,
    broken: Option<Arc<AtomicBool>>,
) -> impl Fn(usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync + 'static {
    move |off, buf| {
        if broken.as_ref().is_some_and(|b| b.load(Relaxed)) {
            return Err("injected failure (soak)".into());
        }
        fill(seed, off, buf);
        Ok(())
    }
}

/// Compares `got` with stream `seed`: (mismatched bytes, whether every mismatched byte is 0).
fn compare(got: &[u8], seed: u64) -> (usize, bool) {
    const STEP: usize = 64 * 1024;
    let mut want = [0u8; STEP];
    let (mut bad, mut all_zero) = (0, true);
    for (i, piece) in got.chunks(STEP).enumerate() {
        let w = &mut want[..piece.len()];
        fill(seed, i * STEP, w);
        if piece != w {
            for (a, b) in piece.iter().zip(w.iter()) {
                if a != b {
                    bad += 1;
                    all_zero &= *a == 0;
                }
            }
        }
    }
    (bad, all_zero)
}

fn insert(cache: &Cache<u64>, k: u64, rng: &mut Rng, src: &mut Vec<u8>) -> Model {
    let len = 1 + rng.below(MAX_LEN as u64) as usize;
    let seed = rng.next();
    let broken = (rng.below(4) == 0).then(|| Arc::new(AtomicBool::new(false)));
    if rng.below(2) == 0 {
        cache
            .insert(k, len, callback(seed, broken.clone()))
            .expect("insert");
    } else {
        src.resize(len, 0);
        fill(seed, 0, src);
        cache
            .insert_with(k, src, callback(seed, broken.clone()))
            .expect("insert_with");
    }
    Model { seed, len, broken }
}

/// Reads the whole entry as the mode allows and checks it against the model. `exclusive`: no
/// other thread uses this key now (the caller holds its write lock).
fn read_and_check(e: &Entry, m: &Model, exclusive: bool, t: &Totals, what: &str) {
    let broken = m.broken.as_ref().is_some_and(|b| b.load(Relaxed));
    if e.len() != m.len {
        t.mismatch(format!("{what}: length {} instead of {}", e.len(), m.len));
        return;
    }
    let pinned;
    let got: &[u8] = match e.try_as_slice() {
        Some(b) if !exclusive => b,
        _ => match e.pin() {
            Ok(p) => {
                pinned = p;
                &pinned
            }
            // A failed pin keeps the entry marked failed in every mode.
            Err(Error::RegenerateFailed(msg)) if broken && e.is_failed() => {
                // SIGBUS mode keeps failure texts in buffers made in advance, which can run out.
                if !msg.contains("injected failure") {
                    t.texts_lost.fetch_add(1, Relaxed);
                }
                t.failed_reads.fetch_add(1, Relaxed);
                return;
            }
            Err(err) => {
                t.mismatch(format!(
                    "{what}: pin failed ({err}), broken {broken}, failed {}",
                    e.is_failed()
                ));
                return;
            }
        },
    };
    let (bad, zeros) = compare(got, m.seed);
    if bad == 0 {
        t.verified.fetch_add(got.len() as u64, Relaxed);
    } else if broken && zeros && e.is_failed() {
        // The zero policy: pages whose rebuild failed read as zeros, and the entry says so.
        t.failed_reads.fetch_add(1, Relaxed);
        t.verified.fetch_add((got.len() - bad) as u64, Relaxed);
    } else {
        t.mismatch(format!(
            "{what}: {bad} of {} bytes differ (all zero: {zeros}), broken {broken}, failed {}",
            got.len(),
            e.is_failed()
        ));
    }
}

// A key's write lock also serves as exclusive access to its entry, for operations that only read
// the model but must not overlap readers (a failing pin, a break or repair).
#[allow(clippy::readonly_write_lock)]
fn worker(
    cache: &Cache<u64>,
    slots: &[RwLock<Option<Model>>],
    t: &Totals,
    seed: u64,
    until: Instant,
) {
    let mut rng = Rng(seed);
    let mut src = Vec::new();
    while Instant::now() < until {
        let k = rng.below(KEYS);
        let slot = &slots[k as usize];
        let op = rng.below(100);
        t.ops.fetch_add(1, Relaxed);
        match op {
            // Read (a pin in explicit mode).
            0..=34 => {
                let m = slot.read().unwrap();
                match (&*m, cache.get(&k)) {
                    (Some(m), Some(e)) => read_and_check(&e, m, false, t, "read"),
                    (None, None) => {}
                    (m, e) => t.mismatch(format!(
                        "key {k}: model {} cache {}",
                        m.is_some(),
                        e.is_some()
                    )),
                }
            }
            // Pin and read through the guard: exclusive for entries that can fail (a failing
            // pin drops the entry's pages, which concurrent readers must not observe half-way).
            35..=49 => {
                let flaky = slot
                    .read()
                    .unwrap()
                    .as_ref()
                    .is_some_and(|m| m.broken.is_some());
                if flaky {
                    let m = slot.write().unwrap();
                    if let (Some(m), Some(e)) = (&*m, cache.get(&k)) {
                        read_and_check(&e, m, true, t, "exclusive pin");
                    }
                } else {
                    let m = slot.read().unwrap();
                    if let (Some(m), Some(e)) = (&*m, cache.get(&k)) {
                        if m.broken.is_none() {
                            read_and_check(&e, m, true, t, "pin");
                        }
                    }
                }
            }
            // Reclaim a few entries through the kernel's reclaim path.
            50..=59 => {
                let keys: Vec<u64> = (0..4).map(|_| rng.below(KEYS)).collect();
                let entries: Vec<Entry> = keys.iter().filter_map(|k| cache.get(k)).collect();
                t.reclaimed
                    .fetch_add(testing::reclaim_all(&entries) as u64, Relaxed);
            }
            // Insert (replacing), lazily or with bytes.
            60..=79 => {
                let mut m = slot.write().unwrap();
                *m = Some(insert(cache, k, &mut rng, &mut src));
            }
            // Remove, holding a handle that must stay readable.
            80..=87 => {
                let mut m = slot.write().unwrap();
                let removed = cache.remove(&k);
                match (m.take(), removed) {
                    (Some(model), Some(e)) => {
                        testing::reclaim(&e);
                        read_and_check(&e, &model, true, t, "removed entry");
                    }
                    (None, None) => {}
                    (m, e) => t.mismatch(format!(
                        "remove {k}: model {} cache {}",
                        m.is_some(),
                        e.is_some()
                    )),
                }
            }
            // Break or repair a failing entry's callback.
            _ => {
                let m = slot.write().unwrap();
                if let (Some(m), Some(e)) = (&*m, cache.get(&k)) {
                    if let Some(b) = &m.broken {
                        let now = !b.load(Relaxed);
                        b.store(now, Relaxed);
                        if !now {
                            // Repaired: a pin rebuilds whatever failed, and clears the mark.
                            read_and_check(&e, m, true, t, "repair");
                            if e.is_failed() {
                                t.mismatch(format!("key {k}: still failed after a repair"));
                            }
                        }
                    }
                }
            }
        }
    }
}

fn run_soak(mode: Mode, dur: Duration) {
    let procs = std::env::var("LAZYFREE_CGROUP_PROCS").expect("cgroup procs file");
    std::fs::write(&procs, std::process::id().to_string()).expect("join cgroup");
    let _w = Watchdog::new("soak", dur.as_secs() + 120);
    let cache: Cache<u64> =
        Cache::new(Config::default().mode(mode).on_failure(FailurePolicy::Zero)).expect("cache");
    let slots: Vec<RwLock<Option<Model>>> = (0..KEYS).map(|_| RwLock::new(None)).collect();
    let mut rng = Rng(0x50a4_0000 + mode as u64);
    let mut src = Vec::new();
    let mut total = 0;
    for (k, slot) in slots.iter().enumerate() {
        let m = insert(&cache, k as u64, &mut rng, &mut src);
        total += m.len;
        *slot.write().unwrap() = Some(m);
    }
    drop(src);
    println!(
        "{mode:?}: {KEYS} entries, {} MiB, in a cgroup of {} MiB",
        total >> 20,
        LIMIT >> 20
    );
    let t = Totals::default();
    let until = Instant::now() + dur;
    std::thread::scope(|s| {
        for i in 0..THREADS {
            let (cache, slots, t) = (&cache, &slots, &t);
            s.spawn(move || worker(cache, slots, t, 0x9e37_79b9 * (i as u64 + 1), until));
        }
    });
    let st = cache.stats();
    println!("{st}");
    println!(
        "failed pins without the callback's message: {}",
        t.texts_lost.load(Relaxed)
    );
    println!(
        "SOAK {} {} {} {} {} {}",
        t.ops.load(Relaxed),
        t.verified.load(Relaxed),
        st.pages_regenerated,
        t.mismatches.load(Relaxed),
        t.failed_reads.load(Relaxed),
        t.reclaimed.load(Relaxed),
    );
}

#[test]
fn soak() {
    let secs: f64 = std::env::var("LAZYFREE_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60.0);
    let modes = ["monitor", "sigbus", "explicit"];
    let per_mode = (secs / modes.len() as f64).max(1.0);
    let (mut ops, mut verified, mut rebuilt, mut mismatches) = (0u64, 0u64, 0u64, 0u64);
    for mode in modes {
        let name = format!("lazyfree-soak-{}-{mode}", std::process::id());
        let Some(cg) = MemCgroup::create(&name, LIMIT) else {
            common::skipped(format_args!("soak ({mode}): no memory cgroup (see above)"));
            return;
        };
        let (status, out) = run_child(
            mode,
            &[
                ("LAZYFREE_SOAK_CHILD_SECS", &per_mode.to_string()),
                ("LAZYFREE_CGROUP_PROCS", &cg.procs_file()),
            ],
            Duration::from_secs_f64(per_mode + 240.0),
        );
        let pressure = cg.pressure_events();
        let summary: Vec<u64> = out
            .lines()
            .find_map(|l| l.strip_prefix("SOAK "))
            .map(|l| l.split(' ').map(|v| v.parse().unwrap()).collect())
            .unwrap_or_default();
        if !status.success() || summary.len() != 6 {
            panic!("soak child ({mode}) ended {status:?} (OOM kill is SIGKILL)\n{out}");
        }
        let [n, b, p, m, f, r] = summary[..] else {
            unreachable!()
        };
        common::report(format_args!(
            "soak ({mode}): {n} operations, {b} bytes verified, {p} pages rebuilt, {m} mismatches \
             ({f} reads of failing entries, {r} pages reclaimed by the test, cgroup limit hit \
             {pressure} times)"
        ));
        if m > 0 {
            println!("{out}");
        }
        assert!(pressure > 0, "{mode}: the cgroup limit was never hit");
        assert!(p > 0 && b > 0, "{mode}: nothing rebuilt or verified");
        ops += n;
        verified += b;
        rebuilt += p;
        mismatches += m;
    }
    common::report(format_args!(
        "soak: {ops} operations, {verified} bytes verified, {rebuilt} pages rebuilt, \
         {mismatches} mismatches"
    ));
    assert_eq!(mismatches, 0);
}
