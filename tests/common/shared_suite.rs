use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::{fill, report, skipped};
use lazyfree::{Error, Mode, Pressure, RegenError, SharedCache, SharedConfig};

/// The suite's mode, in a config.
fn config() -> SharedConfig {
    SharedConfig {
        mode: MODE,
        ..SharedConfig::default()
    }
}

/// Markers between processes go to the temporary directory (writable by any user, unlike the
/// build's target directory when the tests run as another user).
///
/// A name no other test or run uses; the cache is removed when the guard drops.
struct Name(String);

impl Name {
    fn new(tag: &str) -> Name {
        let n = format!(
            "test-{}-{tag}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ (std::ptr::addr_of!(tag) as u128)
        );
        Name(n)
    }
}

impl Drop for Name {
    fn drop(&mut self) {
        let _ = SharedCache::remove(&self.0);
    }
}

fn path_of(name: &str) -> PathBuf {
    PathBuf::from(format!("/dev/shm/lazyfree.{name}"))
}

/// The pseudo-random stream of each key (`common::fill`), counting calls.
fn stream(calls: Arc<AtomicU64>) -> impl Fn(u64, usize, &mut [u8]) -> Result<(), RegenError> {
    move |key, off, buf| {
        calls.fetch_add(1, Ordering::Relaxed);
        fill(key, off, buf);
        Ok(())
    }
}

fn expected(key: u64, len: usize) -> Vec<u8> {
    common::expected(key, len)
}

// ---------------------------------------------------------------------------------------------
// Real images

/// The real PNGs of `sway-backgrounds`, or, where that package is missing, PNGs this test
/// writes with the `png` crate (said loudly).
fn images() -> Vec<PathBuf> {
    let dir = std::path::Path::new("/usr/share/backgrounds/sway");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "png"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    if !v.is_empty() {
        return v;
    }
    skipped(format_args!(
        "real PNGs for shared.rs: /usr/share/backgrounds/sway is missing (Debian package \
         sway-backgrounds); decoding PNGs written by the test instead"
    ));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("shared-pngs");
    std::fs::create_dir_all(&out).unwrap();
    for (i, (w, h)) in [(1136u32, 640u32), (1366, 768), (1920, 1080)]
        .iter()
        .enumerate()
    {
        let p = out.join(format!("made-{i}.png"));
        if !p.exists() {
            let f = std::fs::File::create(&p).unwrap();
            let mut enc = png::Encoder::new(std::io::BufWriter::new(f), *w, *h);
            enc.set_color(png::ColorType::Rgb);
            let mut wr = enc.write_header().unwrap();
            let mut px = vec![0u8; (*w * *h * 3) as usize];
            fill(i as u64 + 77, 0, &mut px);
            wr.write_image_data(&px).unwrap();
        }
        v.push(p);
    }
    v
}

fn decode(path: &std::path::Path) -> Vec<u8> {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0u8; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

/// The regenerate function of the image cache: key i is image i, decoded (once per process,
/// kept) and sliced. Counts calls in `calls`.
fn image_regen(
    paths: Vec<PathBuf>,
    calls: Arc<AtomicU64>,
) -> impl Fn(u64, usize, &mut [u8]) -> Result<(), RegenError> {
    let decoded: Mutex<HashMap<u64, Arc<Vec<u8>>>> = Mutex::new(HashMap::new());
    move |key, off, buf| {
        calls.fetch_add(1, Ordering::Relaxed);
        let path = paths.get(key as usize).ok_or("no such image")?;
        let img = {
            let mut d = decoded.lock().unwrap();
            d.entry(key)
                .or_insert_with(|| Arc::new(decode(path)))
                .clone()
        };
        buf.copy_from_slice(&img[off..off + buf.len()]);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Children: this binary again, with LAZYFREE_CHILD naming the case

fn spawn(case: &str, envs: &[(&str, &str)]) -> Child {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("LAZYFREE_CHILD", case)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn child")
}

/// Waits for `child` at most `secs`; its output. Panics (after killing it) if it hangs.
fn finish(mut child: Child, what: &str, secs: u64) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child {what} hung for {secs} s and was killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).ok();
    child.stderr.take().unwrap().read_to_string(&mut out).ok();
    (status, out)
}

fn kill9(child: &mut Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    let _ = child.wait();
}

fn wait_for_file(p: &std::path::Path, secs: u64) {
    common::wait_until(&format!("{} to appear", p.display()), secs, || p.exists());
}

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"))
}

#[test]
#[ignore = "run by the other tests in a child process"]
fn child() {
    common::child_main(&|case| match case {
        "png_reader" => child_png_reader(),
        "stuck_fill" => child_stuck_fill(),
        "pin_hold" => child_pin_hold(),
        "purge_loop" => child_purge_loop(),
        "failing" => child_failing(),
        "cgroup" => child_cgroup(),
        "self_read_raw" => child_self_read(false),
        "self_read_pin" => child_self_read(true),
        "signals" => child_signals(),
        "thrash" => child_thrash(),
        "huge_reader" => child_huge_reader(),
        "by_fd" => child_by_fd(),
        other => panic!("unknown child case {other}"),
    });
}

/// Opens the image cache, inserts every image, reads every byte (in an order of its own) and
/// compares it with its own decode.
fn child_png_reader() {
    let name = env("LAZYFREE_SHARED_NAME");
    let me: usize = env("LAZYFREE_SHARED_INDEX").parse().unwrap();
    let paths = images();
    let calls = Arc::new(AtomicU64::new(0));
    // Half the readers in the other mode: monitor and SIGBUS processes share one cache.
    let mode = match (me % 2, MODE) {
        (0, m) => m,
        (_, Mode::Sigbus) => Mode::Monitor,
        _ => Mode::Sigbus,
    };
    let cache = SharedCache::open_in(&name, mode, image_regen(paths.clone(), calls.clone())).unwrap();
    let mine: Vec<Vec<u8>> = paths.iter().map(|p| decode(p)).collect();
    // Wait for the others, so the reads race.
    let go = PathBuf::from(env("LAZYFREE_SHARED_GO"));
    wait_for_file(&go, 60);
    let n = paths.len();
    let mut bytes = 0;
    for k in 0..n {
        let key = ((k + me * 3) % n) as u64;
        let e = cache.insert(key, mine[key as usize].len()).unwrap();
        let same = e.read(|b| b == &mine[key as usize][..]).unwrap();
        assert!(same, "image {key}: bytes differ in process {me}");
        bytes += e.len();
    }
    println!("VERIFIED {bytes} CALLS {}", calls.load(Ordering::Relaxed));
}

/// Pins key 1, whose callback here signals and then never returns.
fn child_stuck_fill() {
    let name = env("LAZYFREE_SHARED_NAME");
    let marker = PathBuf::from(env("LAZYFREE_SHARED_MARKER"));
    let cache = SharedCache::open_in(&name, MODE, move |key, off, buf| {
        if key == 1 {
            std::fs::write(&marker, b"filling").unwrap();
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        fill(key, off, buf);
        Ok(())
    })
    .unwrap();
    let e = cache.get(1).unwrap().expect("key 1");
    // A plain read: the monitor's worker, or in SIGBUS mode the handler, runs the callback.
    // SAFETY: mapped for the cache's life.
    let _ = unsafe { std::ptr::read_volatile(e.as_ptr()) };
    unreachable!("the callback never returns");
}

/// Pins key 2, signals, holds the pin until killed.
fn child_pin_hold() {
    let name = env("LAZYFREE_SHARED_NAME");
    let marker = PathBuf::from(env("LAZYFREE_SHARED_MARKER"));
    let cache = SharedCache::open_in(&name, MODE, stream(Arc::new(AtomicU64::new(0)))).unwrap();
    let e = cache.get(2).unwrap().expect("key 2");
    let p = e.pin().unwrap();
    assert!(p[..] == expected(2, e.len())[..]);
    std::fs::write(&marker, b"pinned").unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Reads every entry and purges everything, over and over, until killed.
fn child_purge_loop() {
    let name = env("LAZYFREE_SHARED_NAME");
    let marker = PathBuf::from(env("LAZYFREE_SHARED_MARKER"));
    let cache = SharedCache::open_in(&name, MODE, stream(Arc::new(AtomicU64::new(0)))).unwrap();
    let keys: Vec<u64> = (0..8).collect();
    let mut first = true;
    loop {
        for &k in &keys {
            let e = cache.get(k).unwrap().expect("entry");
            let ok = e.read(|b| b == &expected(k, e.len())[..]).unwrap();
            assert!(ok, "key {k} wrong in the purging child");
        }
        cache.purge(0).unwrap();
        if first {
            std::fs::write(&marker, b"purging").unwrap();
            first = false;
        }
    }
}

/// Opens the cache with a callback that fails for key 7 and reads keys 7 and 8.
fn child_failing() {
    let name = env("LAZYFREE_SHARED_NAME");
    let cache = SharedCache::open_in(&name, MODE, |key, off, buf| {
        if key == 7 {
            return Err("image 7 is corrupt here".into());
        }
        fill(key, off, buf);
        Ok(())
    })
    .unwrap();
    let e7 = cache.get(7).unwrap().unwrap();
    match e7.read(|_| ()) {
        Err(Error::RegenerateFailed(m)) => println!("FAILED7 {m}"),
        other => panic!("key 7 read gave {:?}", other.map(|_| ())),
    }
    let e8 = cache.get(8).unwrap().unwrap();
    assert!(e8.read(|b| b == &expected(8, e8.len())[..]).unwrap());
    println!("OK8");
}

// ---------------------------------------------------------------------------------------------
// One process

#[test]
fn one_process_rebuilds_what_a_purge_punched() {
    let name = Name::new("one");
    let calls = Arc::new(AtomicU64::new(0));
    let cfg = SharedConfig {
        capacity: 64 << 20,
        chunk: 64 << 10,
        entries: 64,
        ..config()
    };
    let cache = SharedCache::create(&name.0, &cfg, stream(calls.clone())).unwrap();
    assert_eq!(cache.mode(), MODE);
    let lens = [1usize, 4096, 65536, 65537, 300_000, 1 << 20];
    for (k, &len) in lens.iter().enumerate() {
        let e = cache.insert(k as u64, len).unwrap();
        assert!(e.read(|b| b == &expected(k as u64, len)[..]).unwrap());
    }
    let chunks: u64 = lens.iter().map(|l| l.div_ceil(64 << 10) as u64).sum();
    let s = cache.stats();
    assert_eq!(s.fills, chunks);
    assert_eq!(s.present_bytes, chunks * (64 << 10));
    assert_eq!(calls.load(Ordering::Relaxed), chunks);
    // Purge everything: the memory goes, and every byte comes back right.
    let punched = cache.purge(0).unwrap();
    assert_eq!(punched as u64, chunks);
    assert_eq!(cache.stats().present_bytes, 0);
    for (k, &len) in lens.iter().enumerate() {
        let e = cache.get(k as u64).unwrap().unwrap();
        // A raw read (no pin) is rebuilt by the monitor too.
        // SAFETY: the span is mapped for the cache's life; no chunk failed.
        let raw = unsafe { std::slice::from_raw_parts(e.as_ptr(), len) };
        assert!(raw == &expected(k as u64, len)[..], "key {k} after purge");
    }
    assert_eq!(cache.stats().fills, 2 * chunks);
}

#[test]
fn a_budget_keeps_the_resident_bytes_down_and_every_byte_right() {
    let name = Name::new("budget");
    let chunk = 64 << 10;
    let cfg = SharedConfig {
        capacity: 64 << 20,
        chunk,
        entries: 64,
        budget: Some(1 << 20),
        ..config()
    };
    let cache = SharedCache::create(&name.0, &cfg, stream(Arc::new(AtomicU64::new(0)))).unwrap();
    let len = 256 << 10;
    for k in 0..32u64 {
        cache.insert(k, len).unwrap();
    }
    for round in 0..3 {
        for k in 0..32u64 {
            let e = cache.get(k).unwrap().unwrap();
            assert!(
                e.read(|b| b == &expected(k, len)[..]).unwrap(),
                "key {k} round {round}"
            );
        }
    }
    let s = cache.stats();
    report(format_args!("shared budget: {s:?}"));
    assert!(s.purges > 0 && s.purged_chunks > 0, "{s:?}");
    // An entry's worth of slack: a read pins all of its chunks at once.
    assert!(s.present_bytes <= (1 << 20) + len as u64, "{s:?}");
}

#[test]
fn many_threads_on_one_chunk_rebuild_it_once() {
    let name = Name::new("threads");
    let calls = Arc::new(AtomicU64::new(0));
    let slow = {
        let calls = calls.clone();
        move |key: u64, off: usize, buf: &mut [u8]| -> Result<(), RegenError> {
            calls.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
            fill(key, off, buf);
            Ok(())
        }
    };
    let cfg = SharedConfig {
        capacity: 16 << 20,
        ..config()
    };
    let cache = Arc::new(SharedCache::create(&name.0, &cfg, slow).unwrap());
    let len = 200_000;
    cache.insert(5, len).unwrap();
    for round in 0..3 {
        let threads = 24;
        let barrier = Arc::new(Barrier::new(threads));
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let (cache, barrier) = (cache.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let e = cache.get(5).unwrap().unwrap();
                    barrier.wait();
                    if t % 2 == 0 {
                        e.read(|b| b == &expected(5, len)[..]).unwrap()
                    } else {
                        // SAFETY: mapped for the cache's life; nothing fails here.
                        let raw = unsafe { std::slice::from_raw_parts(e.as_ptr(), len) };
                        raw == &expected(5, len)[..]
                    }
                })
            })
            .collect();
        for h in hs {
            assert!(h.join().unwrap(), "round {round}: wrong bytes");
        }
        let chunks = len.div_ceil(64 << 10) as u64;
        assert_eq!(
            calls.load(Ordering::Relaxed),
            chunks * (round + 1),
            "round {round}"
        );
        assert_eq!(cache.purge(0).unwrap() as u64, chunks);
    }
}

#[test]
fn a_failure_in_one_chunk_and_a_success_in_another() {
    let name = Name::new("fail");
    let fail7 = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let regen = {
        let fail7 = fail7.clone();
        move |key: u64, off: usize, buf: &mut [u8]| -> Result<(), RegenError> {
            if key == 7 && fail7.load(Ordering::Relaxed) {
                if off == 0 {
                    panic!("a panicking decoder");
                }
                return Err("corrupt input".into());
            }
            fill(key, off, buf);
            Ok(())
        }
    };
    let cfg = SharedConfig {
        capacity: 16 << 20,
        ..config()
    };
    let cache = SharedCache::create(&name.0, &cfg, regen).unwrap();
    let (e7, e8) = (
        cache.insert(7, 200_000).unwrap(),
        cache.insert(8, 200_000).unwrap(),
    );
    // Both at once, from two threads.
    std::thread::scope(|s| {
        let a = s.spawn(|| e7.read(|_| ()));
        let b = s.spawn(|| e8.read(|b| b == &expected(8, 200_000)[..]));
        match a.join().unwrap() {
            Err(Error::RegenerateFailed(m)) => assert!(m.contains("key 7"), "{m}"),
            other => panic!("key 7: {:?}", other.map(|_| ())),
        }
        assert!(b.join().unwrap().unwrap());
    });
    assert!(e7.is_failed() && !e8.is_failed());
    assert!(cache.stats().failures >= 1);
    // A raw read of a failed chunk reads zeros, and the entry says it failed.
    // SAFETY: mapped for the cache's life.
    let first = unsafe { *e7.as_ptr() };
    assert_eq!(first, 0);
    assert!(e7.is_failed());
    // Another process fails on 7 too (its own callback) and still reads 8.
    let (st, out) = finish(
        spawn("failing", &[("LAZYFREE_SHARED_NAME", &name.0)]),
        "failing",
        60,
    );
    assert!(
        st.success() && out.contains("FAILED7") && out.contains("OK8"),
        "{st:?}\n{out}"
    );
    // Fixed: a pin retries the failed chunks and the bytes are right.
    fail7.store(false, Ordering::Relaxed);
    assert!(e7.read(|b| b == &expected(7, 200_000)[..]).unwrap());
    assert!(!e7.is_failed());
}

#[test]
fn a_forked_child_gets_an_error_not_a_crash() {
    let name = Name::new("fork");
    let cfg = SharedConfig {
        capacity: 16 << 20,
        ..config()
    };
    let cache = SharedCache::create(&name.0, &cfg, stream(Arc::new(AtomicU64::new(0)))).unwrap();
    let e = cache.insert(1, 100_000).unwrap();
    // SAFETY: the child only calls the API, which checks its pid, then _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = match (cache.insert(2, 10), e.pin().map(|_| ()), cache.get(1)) {
            (Err(Error::ForkedChild), Err(Error::ForkedChild), Err(Error::ForkedChild)) => 0,
            _ => 1,
        };
        // SAFETY: ends the forked child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let st = common::wait_forked(pid, 30);
    assert_eq!(st, Some(0), "{}", common::describe_status(st));
    assert!(e.read(|b| b == &expected(1, 100_000)[..]).unwrap());
}

// ---------------------------------------------------------------------------------------------
// Several processes

#[test]
fn four_processes_decode_each_chunk_of_real_images_once() {
    let name = Name::new("png");
    let paths = images();
    let chunk = 256 << 10;
    let cfg = SharedConfig {
        capacity: 256 << 20,
        chunk,
        entries: 64,
        ..config()
    };
    let calls = Arc::new(AtomicU64::new(0));
    let cache =
        SharedCache::create(&name.0, &cfg, image_regen(paths.clone(), calls.clone())).unwrap();
    let go = std::env::temp_dir().join(format!("{}.go", name.0));
    let _ = std::fs::remove_file(&go);
    let kids: Vec<Child> = (0..4)
        .map(|i| {
            spawn(
                "png_reader",
                &[
                    ("LAZYFREE_SHARED_NAME", &name.0),
                    ("LAZYFREE_SHARED_INDEX", &i.to_string()),
                    ("LAZYFREE_SHARED_GO", go.to_str().unwrap()),
                ],
            )
        })
        .collect();
    // Let them all open the cache and decode their own copies, then start them together.
    common::wait_until("four processes attached", 120, || {
        cache.stats().processes == 5
    });
    std::fs::write(&go, b"go").unwrap();
    let mut child_calls = 0;
    for (i, k) in kids.into_iter().enumerate() {
        let (st, out) = finish(k, "png_reader", 300);
        assert!(st.success(), "reader {i}: {st:?}\n{out}");
        let calls = out.split("CALLS ").nth(1).expect(&out);
        child_calls += calls
            .split_whitespace()
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap();
    }
    let _ = std::fs::remove_file(&go);
    let s = cache.stats();
    let mut chunks = 0;
    for (k, p) in paths.iter().enumerate() {
        let e = cache.get(k as u64).unwrap().expect("every image inserted");
        let n = e.len().div_ceil(chunk) as u64;
        assert_eq!(e.fills(), n, "image {} ({})", k, p.display());
        chunks += n;
        // The parent reads them too, without rebuilding anything.
        let mine = decode(p);
        assert!(e.read(|b| b == &mine[..]).unwrap());
    }
    report(format_args!(
        "shared png: {} images, {chunks} chunks, rebuilt {} times across 4 processes \
         (callbacks run: {child_calls} in the children, {} here)",
        paths.len(),
        s.fills,
        calls.load(Ordering::Relaxed)
    ));
    assert_eq!(
        s.fills, chunks,
        "each chunk decoded once across all processes"
    );
    assert_eq!(child_calls + calls.load(Ordering::Relaxed), chunks);
    assert_eq!(
        cache.stats().fills,
        chunks,
        "the parent's reads rebuilt nothing"
    );
}

fn stream_cache(name: &str, entries: u64, len: usize) -> SharedCache {
    let cfg = SharedConfig {
        capacity: 64 << 20,
        entries: 64,
        ..config()
    };
    let cache = SharedCache::create(name, &cfg, stream(Arc::new(AtomicU64::new(0)))).unwrap();
    for k in 0..entries {
        cache.insert(k, len).unwrap();
    }
    cache
}

#[test]
fn a_process_killed_while_filling_leaves_nothing_wedged() {
    let name = Name::new("stuck");
    let cache = stream_cache(&name.0, 4, 300_000);
    let marker = std::env::temp_dir().join(format!("{}.m", name.0));
    let _ = std::fs::remove_file(&marker);
    let mut kid = spawn(
        "stuck_fill",
        &[
            ("LAZYFREE_SHARED_NAME", &name.0),
            ("LAZYFREE_SHARED_MARKER", marker.to_str().unwrap()),
        ],
    );
    wait_for_file(&marker, 60);
    // While it is stuck, a reader here waits for it (the chunk is claimed): start one.
    let e = cache.get(1).unwrap().unwrap();
    let reader = std::thread::scope(|s| {
        let h = s.spawn(|| e.read(|b| b == &expected(1, 300_000)[..]));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !h.is_finished(),
            "the reader did not wait for the claimed chunk"
        );
        kill9(&mut kid);
        h.join().unwrap()
    });
    assert!(reader.unwrap(), "bytes after the filler died");
    let _ = std::fs::remove_file(&marker);
    assert_eq!(e.fills(), 300_000usize.div_ceil(64 << 10) as u64);
    assert_eq!(cache.stats().processes, 1);
}

#[test]
fn a_dead_processes_pins_are_released() {
    let name = Name::new("pins");
    let len = 300_000;
    let cache = stream_cache(&name.0, 4, len);
    let marker = std::env::temp_dir().join(format!("{}.m", name.0));
    let _ = std::fs::remove_file(&marker);
    let mut kid = spawn(
        "pin_hold",
        &[
            ("LAZYFREE_SHARED_NAME", &name.0),
            ("LAZYFREE_SHARED_MARKER", marker.to_str().unwrap()),
        ],
    );
    wait_for_file(&marker, 60);
    let _ = std::fs::remove_file(&marker);
    let e = cache.get(2).unwrap().unwrap();
    let chunks = len.div_ceil(64 << 10) as u64;
    // Pinned by the child: a purge leaves it.
    cache.purge(0).unwrap();
    assert_eq!(cache.stats().present_bytes, chunks * (64 << 10));
    assert!(e.read(|b| b == &expected(2, len)[..]).unwrap());
    assert_eq!(e.fills(), chunks, "the pinned entry was punched");
    kill9(&mut kid);
    // Dead: its pin no longer holds.
    assert_eq!(cache.purge(0).unwrap() as u64, chunks);
    assert_eq!(cache.stats().present_bytes, 0);
    assert!(e.read(|b| b == &expected(2, len)[..]).unwrap());
    assert_eq!(e.fills(), 2 * chunks);
}

#[test]
fn processes_killed_while_purging_leave_every_byte_right() {
    let name = Name::new("purgekill");
    let len = 500_000;
    let cache = stream_cache(&name.0, 8, len);
    let mut rng = common::Rng(std::process::id() as u64 | 1);
    for round in 0..6 {
        let marker = std::env::temp_dir().join(format!("{}.{round}", name.0));
        let _ = std::fs::remove_file(&marker);
        let mut kid = spawn(
            "purge_loop",
            &[
                ("LAZYFREE_SHARED_NAME", &name.0),
                ("LAZYFREE_SHARED_MARKER", marker.to_str().unwrap()),
            ],
        );
        wait_for_file(&marker, 60);
        let _ = std::fs::remove_file(&marker);
        // Read here meanwhile, then kill it at a random moment of its loop.
        let until = Instant::now() + Duration::from_millis(20 + rng.below(200));
        while Instant::now() < until {
            let k = rng.below(8);
            let e = cache.get(k).unwrap().unwrap();
            assert!(
                e.read(|b| b == &expected(k, len)[..]).unwrap(),
                "round {round} key {k}"
            );
        }
        kill9(&mut kid);
    }
    // Nothing is wedged: every entry reads right, and this process can purge.
    for k in 0..8 {
        let e = cache.get(k).unwrap().unwrap();
        assert!(e.read(|b| b == &expected(k, len)[..]).unwrap());
    }
    assert!(
        cache.purge(0).unwrap() > 0,
        "the purge lock stayed with a dead process"
    );
    assert_eq!(cache.stats().present_bytes, 0);
    report(format_args!("shared purge kills: {:?}", cache.stats()));
}

// ---------------------------------------------------------------------------------------------
// Memory pressure

fn child_cgroup() {
    let procs = env("LAZYFREE_CGROUP_PROCS");
    std::fs::write(&procs, std::process::id().to_string()).expect("join cgroup");
    let name = env("LAZYFREE_SHARED_NAME");
    let limit: usize = env("LAZYFREE_SHARED_LIMIT").parse().unwrap();
    let cache = SharedCache::open_in(&name, MODE, stream(Arc::new(AtomicU64::new(0)))).unwrap();
    let len = 4 << 20;
    let n = (2 * limit / len) as u64;
    for round in 0..2 {
        for k in 0..n {
            let e = cache.insert(k, len).unwrap();
            assert!(
                e.read(|b| b == &expected(k, len)[..]).unwrap(),
                "key {k} round {round}"
            );
        }
    }
    println!("VERIFIED {:?}", cache.stats());
}

#[test]
fn a_budget_under_a_memory_cgroup_at_twice_overcommit_prevents_the_oom_kill() {
    let limit = 64 << 20;
    let Some(cg) =
        common::MemCgroup::create(&format!("lazyfree-shared-{}", std::process::id()), limit)
    else {
        return;
    };
    let name = Name::new("cgroup");
    let cfg = SharedConfig {
        capacity: 512 << 20,
        entries: 256,
        budget: Some(limit / 2),
        // PSI armed too, where the kernel has it (the budget alone keeps the OOM killer away;
        // the report says whether pressure purged as well).
        pressure: std::path::Path::new("/proc/pressure/memory").exists().then_some(Pressure {
            stall: Duration::from_millis(5),
            window: Duration::from_secs(2),
        }),
        ..config()
    };
    let cache = SharedCache::create(&name.0, &cfg, stream(Arc::new(AtomicU64::new(0)))).unwrap();
    let (st, out) = finish(
        spawn(
            "cgroup",
            &[
                ("LAZYFREE_CGROUP_PROCS", &cg.procs_file()),
                ("LAZYFREE_SHARED_NAME", &name.0),
                ("LAZYFREE_SHARED_LIMIT", &limit.to_string()),
            ],
        ),
        "cgroup",
        240,
    );
    assert!(
        st.success(),
        "the child under the cgroup ended {st:?} (an OOM kill is SIGKILL)\n{out}"
    );
    assert!(out.contains("VERIFIED"), "{out}");
    let s = cache.stats();
    report(format_args!(
        "shared cgroup: limit 64 MiB, 2x overcommit, budget 32 MiB, PSI trigger {}: {s:?}",
        if cfg.pressure.is_some() { "armed" } else { "not available" }
    ));
    assert!(s.purged_chunks > 0, "{s:?}");
    assert_eq!(
        s.fills,
        2 * (2 * limit as u64 / (64 << 10)),
        "every chunk rebuilt twice"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad input

#[test]
fn bad_names_files_and_arguments_get_typed_errors() {
    let ok = || stream(Arc::new(AtomicU64::new(0)));
    let cfg = SharedConfig {
        capacity: 16 << 20,
        entries: 2,
        ..config()
    };
    for mode in [Mode::Explicit, Mode::Auto] {
        let c = SharedConfig { mode, ..cfg.clone() };
        let n = format!("test-{}-mode", std::process::id());
        assert!(matches!(
            SharedCache::create(&n, &c, ok()),
            Err(Error::InvalidConfig(_))
        ));
        assert!(!path_of(&n).exists(), "a refused mode left a file");
    }
    for bad in ["", ".hidden", "a/b", "../x", "sp ace", &"x".repeat(201)] {
        assert!(
            matches!(
                SharedCache::create(bad, &cfg, ok()),
                Err(Error::InvalidConfig(_))
            ),
            "name {bad:?}"
        );
    }
    let name = Name::new("bad");
    for bad in [
        SharedConfig {
            chunk: 1000,
            ..cfg.clone()
        },
        SharedConfig {
            chunk: 128 << 20,
            ..cfg.clone()
        },
        SharedConfig {
            capacity: 0,
            ..cfg.clone()
        },
        SharedConfig {
            capacity: (16 << 20) + 4096,
            ..cfg.clone()
        },
        SharedConfig {
            capacity: 1 << 41,
            ..cfg.clone()
        },
        SharedConfig {
            capacity: 1 << 40,
            chunk: 4096,
            ..cfg.clone()
        },
        SharedConfig {
            entries: (1 << 20) + 1,
            ..cfg.clone()
        },
        SharedConfig {
            pressure: Some(Pressure {
                stall: Duration::from_millis(10),
                window: Duration::from_millis(100),
            }),
            ..cfg.clone()
        },
        SharedConfig {
            pressure: Some(Pressure {
                stall: Duration::from_secs(3),
                window: Duration::from_secs(2),
            }),
            ..cfg.clone()
        },
    ] {
        assert!(
            matches!(
                SharedCache::create(&name.0, &bad, ok()),
                Err(Error::InvalidConfig(_))
            ),
            "{bad:?}"
        );
        assert!(!path_of(&name.0).exists(), "a refused config left a file");
    }
    assert!(matches!(
        SharedCache::open(&name.0, ok()),
        Err(Error::SharedNotFound(_))
    ));
    let cache = SharedCache::create(&name.0, &cfg, ok()).unwrap();
    let e = SharedCache::create(&name.0, &cfg, ok())
        .err()
        .expect("a second create");
    assert!(matches!(e, Error::SharedExists(_)), "{e}");
    assert!(e.to_string().contains("SharedCache::open"), "{e}");
    // Entries: zero, too large, another length, records used up, capacity used up.
    assert!(matches!(
        cache.insert(1, 0),
        Err(Error::InvalidLength { .. })
    ));
    assert!(matches!(
        cache.insert(1, (16 << 20) + 1),
        Err(Error::InvalidLength { .. })
    ));
    let e1 = cache.insert(1, 10).unwrap();
    // Unguarded pins: one unpin each, then NotPinned (a double unpin), never a wrong count.
    assert!(matches!(e1.unpin_unguarded(), Err(Error::NotPinned)));
    e1.pin_unguarded().unwrap();
    e1.pin_unguarded().unwrap();
    e1.unpin_unguarded().unwrap();
    assert_eq!(cache.purge(0).unwrap(), 0, "still pinned once");
    e1.unpin_unguarded().unwrap();
    assert!(matches!(e1.unpin_unguarded(), Err(Error::NotPinned)));
    assert_eq!(cache.purge(0).unwrap(), 1);
    assert!(matches!(
        cache.insert(1, 11),
        Err(Error::SharedLengthMismatch {
            key: 1,
            have: 10,
            asked: 11
        })
    ));
    cache.insert(2, 15 << 20).unwrap();
    assert!(matches!(cache.insert(3, 10), Err(Error::SharedFull { .. })));
    assert!(cache.get(3).unwrap().is_none());
    drop(cache);
    // Files: another version, truncated, empty, not ours.
    let path = path_of(&name.0);
    let good = std::fs::read(&path).unwrap();
    let mut v = good.clone();
    v[8] = 99;
    std::fs::write(&path, &v).unwrap();
    let e = SharedCache::open(&name.0, ok()).err().unwrap();
    assert!(
        matches!(&e, Error::BadSharedFile { why, .. } if why.contains("version")),
        "{e}"
    );
    // Made in another pid namespace (its pid_ns word patched): liveness by pid would be wrong.
    let ns = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self/ns/pid").unwrap().ino()
    };
    let at = good[..4096]
        .chunks(8)
        .position(|w| w == ns.to_ne_bytes())
        .expect("the header holds the pid namespace");
    let mut v = good.clone();
    v[at * 8..at * 8 + 8].copy_from_slice(&(ns + 1).to_ne_bytes());
    std::fs::write(&path, &v).unwrap();
    let e = SharedCache::open(&name.0, ok()).err().unwrap();
    assert!(
        matches!(&e, Error::BadSharedFile { why, .. } if why.contains("pid namespace")),
        "{e}"
    );
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    let e = SharedCache::open(&name.0, ok()).err().unwrap();
    assert!(
        matches!(&e, Error::BadSharedFile { why, .. } if why.contains("truncated")),
        "{e}"
    );
    std::fs::write(&path, b"").unwrap();
    assert!(matches!(
        SharedCache::open(&name.0, ok()),
        Err(Error::BadSharedFile { .. })
    ));
    std::fs::write(&path, vec![0xAB; 8192]).unwrap();
    let e = SharedCache::open(&name.0, ok()).err().unwrap();
    assert!(
        matches!(&e, Error::BadSharedFile { why, .. } if why.contains("magic")),
        "{e}"
    );
    SharedCache::remove(&name.0).unwrap();
    assert!(matches!(
        SharedCache::remove(&name.0),
        Err(Error::SharedNotFound(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Callbacks: slow, stuck, nested, reading their own output; stray signals

#[test]
fn a_stuck_callback_holds_only_its_own_chunk() {
    let name = Name::new("stuckhere");
    let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let regen = {
        let release = release.clone();
        move |key: u64, off: usize, buf: &mut [u8]| -> Result<(), RegenError> {
            if key == 9 {
                while !release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            fill(key, off, buf);
            Ok(())
        }
    };
    let cfg = SharedConfig {
        capacity: 16 << 20,
        ..config()
    };
    let cache = SharedCache::create(&name.0, &cfg, regen).unwrap();
    let stuck = cache.insert(9, 100_000).unwrap();
    for k in 0..4 {
        cache.insert(k, 100_000).unwrap();
    }
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            // SAFETY: mapped for the cache's life; nothing fails here.
            let b = unsafe { std::slice::from_raw_parts(stuck.as_ptr(), 100_000) };
            b == &expected(9, 100_000)[..]
        });
        std::thread::sleep(Duration::from_millis(100));
        // Raw reads (served by the monitor) and pins of other entries go on meanwhile.
        for k in 0..4 {
            let e = cache.get(k).unwrap().unwrap();
            // SAFETY: as above.
            let b = unsafe { std::slice::from_raw_parts(e.as_ptr(), 100_000) };
            assert!(b == &expected(k, 100_000)[..], "key {k}");
        }
        cache.purge(0).unwrap();
        for k in 0..4 {
            let e = cache.get(k).unwrap().unwrap();
            assert!(e.read(|b| b == &expected(k, 100_000)[..]).unwrap());
        }
        assert!(!h.is_finished(), "the stuck callback's reader went on");
        release.store(true, Ordering::SeqCst);
        assert!(h.join().unwrap());
    });
}

#[test]
fn callbacks_reading_other_entries_nest_at_any_depth() {
    let name = Name::new("nest");
    // Entry k's bytes are entry k-1's bytes, read through the cache (raw), plus k; entry 0 is
    // the stream. So rebuilding entry 30 nests 30 callbacks deep, each in its own worker.
    static BASE: AtomicU64 = AtomicU64::new(0);
    const LEN: usize = 40_000;
    let regen = |key: u64, off: usize, buf: &mut [u8]| -> Result<(), RegenError> {
        if key == 0 {
            fill(0, off, buf);
            return Ok(());
        }
        let prev =
            (BASE.load(Ordering::SeqCst) as usize + (key as usize - 1) * (64 << 10)) as *const u8;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: entry key-1 is mapped for the cache's life.
            *b = unsafe { *prev.add(off + i) }.wrapping_add(1);
        }
        Ok(())
    };
    let cfg = SharedConfig {
        capacity: 16 << 20,
        ..config()
    };
    let cache = SharedCache::create(&name.0, &cfg, regen).unwrap();
    // SIGBUS mode nests handler frames on the faulting thread's stack, at most 16 deep.
    let depth = if matches!(MODE, Mode::Sigbus) { 12u64 } else { 30 };
    let entries: Vec<_> = (0..=depth).map(|k| cache.insert(k, LEN).unwrap()).collect();
    BASE.store(entries[0].as_ptr() as u64, Ordering::SeqCst);
    for (k, e) in entries.iter().enumerate() {
        assert_eq!(
            e.as_ptr() as usize,
            BASE.load(Ordering::SeqCst) as usize + k * (64 << 10)
        );
    }
    let want = |k: u64| -> Vec<u8> {
        expected(0, LEN)
            .iter()
            .map(|b| b.wrapping_add(k as u8))
            .collect()
    };
    for round in 0..2 {
        // Four chains at once, from the top and from the middle, raw and pinned.
        std::thread::scope(|s| {
            let hs: Vec<_> = [depth, depth - 1, depth / 2, depth / 2 + 1]
                .into_iter()
                .enumerate()
                .map(|(i, k)| {
                    let e = entries[k as usize];
                    let want = want(k);
                    s.spawn(move || {
                        if i % 2 == 0 {
                            // SAFETY: mapped for the cache's life.
                            let b = unsafe { std::slice::from_raw_parts(e.as_ptr(), LEN) };
                            b == &want[..]
                        } else {
                            e.read(|b| b == &want[..]).unwrap()
                        }
                    })
                })
                .collect();
            for h in hs {
                assert!(h.join().unwrap(), "round {round}");
            }
        });
        cache.purge(0).unwrap();
    }
}

/// Key 1's callback reads key 1's own bytes.
fn child_self_read(pin: bool) {
    static OWN: AtomicU64 = AtomicU64::new(0);
    let name = env("LAZYFREE_SHARED_NAME");
    let cache = SharedCache::open_in(&name, MODE, |key, off, buf| {
        if key == 1 {
            // SAFETY: the entry is mapped for the cache's life.
            let b = unsafe { *(OWN.load(Ordering::SeqCst) as *const u8).add(off) };
            buf.fill(b);
            return Ok(());
        }
        fill(key, off, buf);
        Ok(())
    })
    .unwrap();
    let e = cache.get(1).unwrap().unwrap();
    OWN.store(e.as_ptr() as u64, Ordering::SeqCst);
    if pin {
        let _ = e.pin();
    } else {
        // SAFETY: mapped for the cache's life.
        let _ = unsafe { std::ptr::read_volatile(e.as_ptr()) };
    }
    println!("RETURNED");
}

#[test]
fn a_callback_reading_its_own_chunk_aborts_with_a_message() {
    let name = Name::new("selfread");
    let _cache = stream_cache(&name.0, 4, 100_000);
    for case in ["self_read_raw", "self_read_pin"] {
        let (st, out) = finish(spawn(case, &[("LAZYFREE_SHARED_NAME", &name.0)]), case, 60);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGABRT), "{case}: {st:?}\n{out}");
        assert!(
            out.contains("read the chunk it is rebuilding"),
            "{case}: {out}"
        );
        assert!(!out.contains("RETURNED"));
    }
}

extern "C" fn on_usr1(_: libc::c_int) {}

/// Reads, pins and purges for two seconds while every thread gets SIGUSR1 (a handler without
/// SA_RESTART, so every wait is interrupted) every 200 microseconds.
fn child_signals() {
    // SAFETY: installs a handler that does nothing; no SA_RESTART on purpose.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as extern "C" fn(libc::c_int) as usize;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    let name = env("LAZYFREE_SHARED_NAME");
    let cache = SharedCache::open_in(&name, MODE, |key, off, buf| {
        std::thread::sleep(Duration::from_micros(300));
        fill(key, off, buf);
        Ok(())
    })
    .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let rounds = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
                    let tid: i32 = t.file_name().to_str().unwrap().parse().unwrap();
                    // SAFETY: tgkill to a thread of this process; SIGUSR1 has a handler.
                    unsafe {
                        libc::syscall(libc::SYS_tgkill, std::process::id(), tid, libc::SIGUSR1)
                    };
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        for t in 0..2u64 {
            let (cache, stop, rounds) = (&cache, &stop, &rounds);
            s.spawn(move || {
                let mut k = t;
                while !stop.load(Ordering::Relaxed) {
                    k = (k + 1) % 4;
                    let e = cache.get(k).unwrap().unwrap();
                    let ok = if k % 2 == 0 {
                        e.read(|b| b == &expected(k, e.len())[..]).unwrap()
                    } else {
                        // SAFETY: mapped for the cache's life.
                        let b = unsafe { std::slice::from_raw_parts(e.as_ptr(), e.len()) };
                        b == &expected(k, e.len())[..]
                    };
                    assert!(ok, "key {k} under signals");
                    cache.purge(0).unwrap();
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
    });
    println!("VERIFIED {} rounds", rounds.load(Ordering::Relaxed));
}

#[test]
fn stray_signals_interrupt_nothing() {
    let name = Name::new("signals");
    let _cache = stream_cache(&name.0, 4, 300_000);
    let (st, out) = finish(
        spawn("signals", &[("LAZYFREE_SHARED_NAME", &name.0)]),
        "signals",
        120,
    );
    assert!(st.success() && out.contains("VERIFIED"), "{st:?}\n{out}");
    report(format_args!(
        "shared signals: {}",
        out.lines().find(|l| l.contains("VERIFIED")).unwrap()
    ));
}

/// Joins the cgroup, writes a file larger than the cgroup's limit and reads it over and over
/// (reclaim and refaults: tasks stall on memory) until killed.
fn child_thrash() {
    let procs = env("LAZYFREE_CGROUP_PROCS");
    std::fs::write(&procs, std::process::id().to_string()).expect("join cgroup");
    let path = PathBuf::from(env("LAZYFREE_THRASH_FILE"));
    let block = vec![0x5Au8; 1 << 20];
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).unwrap();
        for _ in 0..96 {
            f.write_all(&block).unwrap();
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        use std::io::Read;
        let mut f = std::fs::File::open(&path).unwrap();
        while f.read(&mut buf).unwrap() > 0 {}
    }
}

#[test]
fn memory_pressure_purges_without_a_budget() {
    if !std::path::Path::new("/proc/pressure/memory").exists() {
        skipped(format_args!(
            "memory_pressure_purges_without_a_budget: no /proc/pressure/memory (a kernel without \
             CONFIG_PSI, or booted with psi=0)"
        ));
        return;
    }
    let Some(cg) = common::MemCgroup::create(
        &format!("lazyfree-shared-psi-{}-{:?}", std::process::id(), MODE),
        64 << 20,
    ) else {
        return;
    };
    let name = Name::new("psi");
    let cfg = SharedConfig {
        capacity: 128 << 20,
        entries: 64,
        pressure: Some(Pressure {
            stall: Duration::from_millis(5),
            window: Duration::from_secs(2),
        }),
        ..config()
    };
    let cache = SharedCache::create(&name.0, &cfg, stream(Arc::new(AtomicU64::new(0)))).unwrap();
    let len = 4 << 20;
    for k in 0..16u64 {
        let e = cache.insert(k, len).unwrap();
        assert!(e.read(|b| b == &expected(k, len)[..]).unwrap());
    }
    assert_eq!(cache.stats().present_bytes, 64 << 20);
    let file = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}.thrash", name.0));
    let mut kid = spawn(
        "thrash",
        &[
            ("LAZYFREE_CGROUP_PROCS", &cg.procs_file()),
            ("LAZYFREE_THRASH_FILE", file.to_str().unwrap()),
        ],
    );
    let t = Instant::now();
    while cache.stats().pressure_purges == 0 && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    kill9(&mut kid);
    let _ = std::fs::remove_file(&file);
    let s = cache.stats();
    report(format_args!(
        "shared pressure: {s:?} after {:?} of a thrashing process",
        t.elapsed()
    ));
    assert!(s.pressure_purges > 0, "no PSI event purged in 60 s: {s:?}");
    assert!(s.present_bytes <= 32 << 20, "{s:?}");
    for k in 0..16u64 {
        let e = cache.get(k).unwrap().unwrap();
        assert!(e.read(|b| b == &expected(k, len)[..]).unwrap(), "key {k}");
    }
}

// ---------------------------------------------------------------------------------------------
// Huge pages

/// A hugetlbfs mount with `pages` more huge pages reserved, for one test; undone on drop.
struct HugeMount {
    dir: PathBuf,
    old_nr: String,
}

fn free_huge_pages() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

impl HugeMount {
    fn new(pages: usize) -> Option<HugeMount> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            skipped(format_args!("huge pages test: not root (it reserves huge pages and mounts hugetlbfs)"));
            return None;
        }
        let nr = "/proc/sys/vm/nr_hugepages";
        let Ok(old_nr) = std::fs::read_to_string(nr) else {
            skipped(format_args!("huge pages test: no {nr} (a kernel without hugetlbfs)"));
            return None;
        };
        let old: usize = old_nr.trim().parse().unwrap();
        let _ = std::fs::write(nr, (old + pages).to_string());
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("hugetlbfs-{}", std::process::id()));
        let m = HugeMount { dir, old_nr };
        if free_huge_pages() < pages {
            skipped(format_args!(
                "huge pages test: the kernel gave {} free huge pages of {pages} asked",
                free_huge_pages()
            ));
            return None;
        }
        std::fs::create_dir_all(&m.dir).unwrap();
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let (src, target, fs) = (c("none"), c(m.dir.to_str().unwrap()), c("hugetlbfs"));
        // SAFETY: valid NUL-terminated strings; no data argument.
        let r = unsafe {
            libc::mount(src.as_ptr(), target.as_ptr(), fs.as_ptr(), 0, std::ptr::null())
        };
        if r != 0 {
            skipped(format_args!(
                "huge pages test: mounting hugetlbfs failed: {}",
                std::io::Error::last_os_error()
            ));
            return None;
        }
        Some(m)
    }
}

impl Drop for HugeMount {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.dir.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path we mounted.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.old_nr.trim());
    }
}

const HUGE_LEN: usize = 3 << 20;

fn child_huge_reader() {
    let name = env("LAZYFREE_SHARED_NAME");
    let cache = SharedCache::open(&name, stream(Arc::new(AtomicU64::new(0)))).unwrap();
    for k in 0..4u64 {
        let e = cache.get(k).unwrap().unwrap();
        // SAFETY: mapped for the cache's life.
        let b = unsafe { std::slice::from_raw_parts(e.as_ptr(), HUGE_LEN) };
        assert!(b == &expected(k, HUGE_LEN)[..], "key {k}");
    }
    println!("VERIFIED huge");
}

#[test]
fn huge_pages_where_the_machine_has_them() {
    if matches!(MODE, Mode::Sigbus) {
        let cfg = SharedConfig {
            huge_pages: true,
            ..config()
        };
        let name = Name::new("hugesig");
        assert!(matches!(
            SharedCache::create(&name.0, &cfg, stream(Arc::new(AtomicU64::new(0)))),
            Err(Error::InvalidConfig(_))
        ));
        return;
    }
    let Some(_m) = HugeMount::new(16) else {
        return;
    };
    let name = Name::new("huge");
    let cfg = SharedConfig {
        capacity: 64 << 20,
        entries: 64,
        huge_pages: true,
        ..config()
    };
    let calls = Arc::new(AtomicU64::new(0));
    let cache = SharedCache::create(&name.0, &cfg, stream(calls.clone())).unwrap();
    assert_eq!(cache.chunk(), 2 << 20, "the chunk is raised to the huge page size");
    assert!(!path_of(&name.0).exists(), "the file is not in /dev/shm");
    for k in 0..4u64 {
        cache.insert(k, HUGE_LEN).unwrap();
    }
    // The header, the records and the chunk words took their huge pages by now.
    let free0 = free_huge_pages();
    for k in 0..4u64 {
        let e = cache.get(k).unwrap().unwrap();
        // SAFETY: mapped for the cache's life.
        let b = unsafe { std::slice::from_raw_parts(e.as_ptr(), HUGE_LEN) };
        assert!(b == &expected(k, HUGE_LEN)[..], "key {k}");
        assert!(e.read(|b| b == &expected(k, HUGE_LEN)[..]).unwrap());
    }
    assert_eq!(calls.load(Ordering::Relaxed), 8);
    assert_eq!(free0 - free_huge_pages(), 8, "each chunk is one huge page");
    // Another process reads them from the file: nothing rebuilt.
    let (st, out) = finish(
        spawn("huge_reader", &[("LAZYFREE_SHARED_NAME", &name.0)]),
        "huge_reader",
        60,
    );
    assert!(st.success() && out.contains("VERIFIED huge"), "{st:?}\n{out}");
    assert_eq!(cache.stats().fills, 8);
    // A purge gives the huge pages back to the pool; a touch rebuilds them.
    assert_eq!(cache.purge(0).unwrap(), 8);
    assert_eq!(free_huge_pages(), free0, "the punched huge pages went back");
    for k in 0..4u64 {
        let e = cache.get(k).unwrap().unwrap();
        assert!(e.read(|b| b == &expected(k, HUGE_LEN)[..]).unwrap());
    }
    assert_eq!(cache.stats().fills, 16);
    assert!(matches!(
        SharedCache::open_in(&name.0, Mode::Sigbus, stream(Arc::new(AtomicU64::new(0)))),
        Err(Error::InvalidConfig(_))
    ));
    // More chunks than the pool has huge pages, no budget: a fill that finds the pool used up
    // purges the least recently used chunk and tries again.
    for k in 4..14u64 {
        cache.insert(k, HUGE_LEN).unwrap();
    }
    for round in 0..2 {
        for k in 0..14u64 {
            let e = cache.get(k).unwrap().unwrap();
            let ok = if k % 2 == 0 {
                e.read(|b| b == &expected(k, HUGE_LEN)[..]).unwrap()
            } else {
                // SAFETY: mapped for the cache's life.
                let b = unsafe { std::slice::from_raw_parts(e.as_ptr(), HUGE_LEN) };
                b == &expected(k, HUGE_LEN)[..]
            };
            assert!(ok, "key {k} round {round}");
        }
    }
    let s = cache.stats();
    report(format_args!("shared huge pages, pool used up: {s:?}"));
    assert!(s.purged_chunks > 8 && s.failures == 0, "{s:?}");
}

#[test]
fn dropping_while_a_callback_runs_returns_at_once() {
    if matches!(MODE, Mode::Sigbus) {
        // There a callback runs on the thread that touched the entry, which borrows the cache.
        return;
    }
    let name = Name::new("dropstuck");
    let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let entered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let regen = {
        let (release, entered) = (release.clone(), entered.clone());
        move |key: u64, off: usize, buf: &mut [u8]| -> Result<(), RegenError> {
            if key == 3 {
                entered.store(true, Ordering::SeqCst);
                while !release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            fill(key, off, buf);
            Ok(())
        }
    };
    let cfg = SharedConfig {
        capacity: 16 << 20,
        ..config()
    };
    let cache = SharedCache::create(&name.0, &cfg, regen).unwrap();
    let other = SharedCache::open(&name.0, stream(Arc::new(AtomicU64::new(0)))).unwrap();
    assert_eq!(other.stats().processes, 2, "two handles, two slots");
    let e = cache.insert(3, 100_000).unwrap();
    let ptr = e.as_ptr() as usize;
    // A system call reads key 3 through the first handle (a kernel-mode fault, so the thread
    // touches no memory itself once the handle is gone): its worker's callback sticks.
    let mut fds = [0; 2];
    // SAFETY: a pipe for this test.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let writer = std::thread::spawn(move || {
        // SAFETY: the kernel reads one byte at ptr; if the mapping is gone by then it fails
        // with EFAULT, which is what a use after close gets.
        unsafe { libc::write(fds[1], ptr as *const libc::c_void, 1) }
    });
    let t = Instant::now();
    while !entered.load(Ordering::SeqCst) {
        if writer.is_finished() {
            skipped(format_args!(
                "dropping_while_a_callback_runs_returns_at_once: this userfaultfd does not serve \
                 faults taken inside the kernel (user-mode-only), so no callback runs"
            ));
            release.store(true, Ordering::SeqCst);
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the callback never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The callback returns only once `release` is set, below: a drop that waited for it would
    // never return (the watchdog turns that into a failure).
    let dropper = std::thread::spawn(move || drop(cache));
    common::wait_until("the drop to return", 30, || dropper.is_finished());
    dropper.join().unwrap();
    assert!(!release.load(Ordering::SeqCst));
    assert_eq!(other.stats().processes, 2, "the slot stays while its callback runs");
    release.store(true, Ordering::SeqCst);
    let _ = writer.join().unwrap();
    // SAFETY: closes our pipe.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    common::wait_until("the slot to be released", 30, || other.stats().processes == 1);
    // The other handle reads the entry without rebuilding it.
    let e = other.get(3).unwrap().unwrap();
    assert!(e.read(|b| b == &expected(3, 100_000)[..]).unwrap());
    assert_eq!(e.fills(), 2);
}

// ---------------------------------------------------------------------------------------------
// A cache without a name, handed over by fd

/// Opens the cache at fd 3 (inherited) and reads keys 0..3.
fn child_by_fd() {
    // SAFETY: the parent put the cache's file at fd 3 for this process, open for its life.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(3) };
    let cache = SharedCache::open_fd(fd, MODE, stream(Arc::new(AtomicU64::new(0)))).unwrap();
    for k in 0..3u64 {
        let e = cache.get(k).unwrap().expect("the parent's entry");
        assert!(e.read(|b| b == &expected(k, e.len())[..]).unwrap(), "key {k}");
    }
    // And one of its own, for the parent to read.
    let e = cache.insert(9, 70_000).unwrap();
    assert!(e.read(|b| b == &expected(9, 70_000)[..]).unwrap());
    println!("VERIFIED by fd");
}

#[test]
fn an_anonymous_cache_is_shared_by_fd() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let cfg = SharedConfig {
        capacity: 16 << 20,
        ..config()
    };
    let cache = SharedCache::create_anonymous(&cfg, stream(Arc::new(AtomicU64::new(0)))).unwrap();
    for k in 0..3u64 {
        let e = cache.insert(k, 100_000 + k as usize).unwrap();
        assert!(e.read(|b| b == &expected(k, e.len())[..]).unwrap());
    }
    let fills = cache.stats().fills;
    let fd = cache.fd().as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("LAZYFREE_CHILD", "by_fd")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec the child only calls dup2 and fcntl, which are
    // async-signal-safe; fd 3 then has no close-on-exec flag (dup2 onto itself keeps the flag).
    unsafe {
        cmd.pre_exec(move || {
            if (fd != 3 && libc::dup2(fd, 3) < 0) || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (st, out) = finish(cmd.spawn().unwrap(), "by_fd", 60);
    assert!(st.success() && out.contains("VERIFIED by fd"), "{st:?}\n{out}");
    let s = cache.stats();
    assert_eq!(s.fills, fills + 70_000usize.div_ceil(64 << 10) as u64, "{s:?}");
    let e = cache.get(9).unwrap().expect("the child's entry");
    assert!(e.read(|b| b == &expected(9, 70_000)[..]).unwrap());
    assert_eq!(cache.stats().fills, s.fills, "the child's entry was there already");
    // Not a cache: a typed error.
    let devnull = std::fs::File::open("/dev/null").unwrap();
    use std::os::fd::AsFd;
    assert!(matches!(
        SharedCache::open_fd(devnull.as_fd(), MODE, stream(Arc::new(AtomicU64::new(0)))),
        Err(Error::BadSharedFile { .. })
    ));
    let huge = SharedConfig {
        huge_pages: true,
        ..cfg
    };
    assert!(matches!(
        SharedCache::create_anonymous(&huge, stream(Arc::new(AtomicU64::new(0)))),
        Err(Error::InvalidConfig(_))
    ));
}
