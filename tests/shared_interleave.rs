//! `SharedCache` interleavings made deterministic with the step hook: a delay injected between
//! two steps of one operation while another runs. The hook is process-wide, so the tests here
//! take turns (one lock) and act only on the address they arm.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::fill;
use lazyfree::testing::{set_step_hook, Step};
use lazyfree::{RegenError, SharedCache, SharedConfig};

static TURN: Mutex<()> = Mutex::new(());
static ARMED_STEP: AtomicUsize = AtomicUsize::new(usize::MAX);
static ARMED_ADDR: AtomicUsize = AtomicUsize::new(0);
static REACHED: AtomicBool = AtomicBool::new(false);
/// Set when the held step goes on.
static RESUMED: AtomicBool = AtomicBool::new(false);

/// Sleeps 400 ms once, the first time the armed step is reached at the armed address.
fn hook(s: Step, addr: usize) {
    let want = ARMED_STEP.load(Ordering::SeqCst);
    if want == step_id(s)
        && addr == ARMED_ADDR.load(Ordering::SeqCst)
        && !REACHED.swap(true, Ordering::SeqCst)
    {
        std::thread::sleep(Duration::from_millis(400));
        RESUMED.store(true, Ordering::SeqCst);
    }
}

fn step_id(s: Step) -> usize {
    match s {
        Step::SharedFillClaimed => 1,
        Step::SharedPunchClaimed => 2,
        Step::SharedPinMarked => 3,
        _ => 0,
    }
}

fn arm(s: Step, addr: usize) {
    REACHED.store(false, Ordering::SeqCst);
    RESUMED.store(false, Ordering::SeqCst);
    ARMED_ADDR.store(addr, Ordering::SeqCst);
    ARMED_STEP.store(step_id(s), Ordering::SeqCst);
    set_step_hook(Some(hook));
}

fn disarm() {
    ARMED_STEP.store(usize::MAX, Ordering::SeqCst);
    set_step_hook(None);
}

fn wait_reached() {
    common::wait_until("the armed step", 30, || REACHED.load(Ordering::SeqCst));
}

struct Named(String);
impl Drop for Named {
    fn drop(&mut self) {
        let _ = SharedCache::remove(&self.0);
    }
}

const LEN: usize = 300_000;
const CHUNK: usize = 64 << 10;

fn cache(tag: &str) -> (Named, SharedCache, Arc<AtomicU64>) {
    let name = Named(format!("test-{}-il-{tag}", std::process::id()));
    let calls = Arc::new(AtomicU64::new(0));
    let c2 = calls.clone();
    let cfg = SharedConfig {
        capacity: 16 << 20,
        chunk: CHUNK,
        entries: 16,
        ..SharedConfig::default()
    };
    let regen = move |key: u64, off: usize, buf: &mut [u8]| -> Result<(), RegenError> {
        c2.fetch_add(1, Ordering::Relaxed);
        fill(key, off, buf);
        Ok(())
    };
    let c = SharedCache::create(&name.0, &cfg, regen).unwrap();
    (name, c, calls)
}

fn resident(ptr: *const u8, len: usize) -> usize {
    let pages = len.div_ceil(4096);
    let mut v = vec![0u8; pages];
    // SAFETY: the range is a mapping of the cache; v has one byte per page.
    let r = unsafe { libc::mincore(ptr as *mut libc::c_void, pages * 4096, v.as_mut_ptr()) };
    assert_eq!(r, 0);
    v.iter().filter(|&&b| b & 1 != 0).count()
}

#[test]
fn a_pin_during_a_punch_waits_and_the_punch_backs_off() {
    let _t = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let (_n, cache, calls) = cache("punch");
    let e = cache.insert(1, LEN).unwrap();
    assert!(e.read(|b| b == &common::expected(1, LEN)[..]).unwrap());
    let chunks = LEN.div_ceil(CHUNK) as u64;
    assert_eq!(calls.load(Ordering::Relaxed), chunks);
    arm(Step::SharedPunchClaimed, e.as_ptr() as usize);
    std::thread::scope(|s| {
        let purge = s.spawn(|| cache.purge(0).unwrap());
        wait_reached();
        // The purger holds chunk 0 as punching and has not looked at the pins yet.
        let p = e.pin().unwrap();
        // The pin could only end after the punch ended (backed off, or punched and rebuilt).
        let waited = RESUMED.load(Ordering::SeqCst);
        assert!(p[..] == common::expected(1, LEN)[..]);
        assert_eq!(
            resident(p.as_ptr(), LEN),
            LEN.div_ceil(4096),
            "a pinned page is missing"
        );
        let punched = purge.join().unwrap();
        assert_eq!(punched, 0, "the purge punched a pinned entry");
        assert!(waited, "the pin did not wait for the punch");
        drop(p);
    });
    disarm();
    assert_eq!(
        calls.load(Ordering::Relaxed),
        chunks,
        "a chunk of the pinned entry was punched and rebuilt"
    );
    assert_eq!(
        cache.purge(0).unwrap() as u64,
        chunks,
        "unpinned, it purges"
    );
}

#[test]
fn a_purge_during_a_pin_leaves_the_pinned_entry() {
    let _t = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let (_n, cache, calls) = cache("pin");
    let e = cache.insert(2, LEN).unwrap();
    assert!(e.read(|b| b == &common::expected(2, LEN)[..]).unwrap());
    let chunks = LEN.div_ceil(CHUNK) as u64;
    arm(Step::SharedPinMarked, e.as_ptr() as usize);
    std::thread::scope(|s| {
        let pin = s.spawn(|| {
            let p = e.pin().unwrap();
            let ok = p[..] == common::expected(2, LEN)[..];
            (ok, resident(p.as_ptr(), LEN))
        });
        wait_reached();
        // The pin's bit is set; it has not read the chunk states yet.
        assert_eq!(
            cache.purge(0).unwrap(),
            0,
            "the purge punched an entry being pinned"
        );
        let (ok, res) = pin.join().unwrap();
        assert!(ok);
        assert_eq!(res, LEN.div_ceil(4096));
    });
    disarm();
    assert_eq!(calls.load(Ordering::Relaxed), chunks);
}

#[test]
fn a_pin_racing_a_fill_that_started_earlier_waits_for_it() {
    let _t = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let (_n, cache, calls) = cache("fill");
    let e = cache.insert(3, LEN).unwrap();
    let chunks = LEN.div_ceil(CHUNK) as u64;
    arm(Step::SharedFillClaimed, e.as_ptr() as usize);
    std::thread::scope(|s| {
        // A raw read: the monitor claims chunk 0 and stops before the callback.
        let reader = s.spawn(|| {
            // SAFETY: mapped for the cache's life; nothing fails here.
            let b = unsafe { std::slice::from_raw_parts(e.as_ptr(), LEN) };
            b == &common::expected(3, LEN)[..]
        });
        wait_reached();
        let p = e.pin().unwrap();
        assert!(p[..] == common::expected(3, LEN)[..]);
        assert!(reader.join().unwrap());
    });
    disarm();
    assert_eq!(
        calls.load(Ordering::Relaxed),
        chunks,
        "a chunk was rebuilt twice"
    );
    assert_eq!(e.fills(), chunks);
}
