//! Bench `shared`: a [`SharedCache`] used by two real processes, on a 64 MiB set of decoded
//! real PNGs (sway-backgrounds; PNGs made here where that package is missing) in 256 KiB chunks.
//!
//! A helper process (this binary again, with `LAZYFREE_BENCH_SHARED_ROLE=helper`) makes the
//! cache under a unique name, reads every byte (so every chunk is decoded into the file), says
//! so on its stdout and stays until its stdin closes. This process then opens the cache by name
//! and measures, each against a baseline of the same run:
//!
//! 1. reading the whole set through `SharedEntry::read` ÷ reading its own resident copy (one
//!    `Vec` per entry): steady state (its page tables filled), and the first read after `open`
//!    (empty page tables: each touch maps pages of the file with a minor fault; open not timed),
//!    whose cost is split in the side file: the faults alone (one byte touched per page), and
//!    the same mapping made by `MADV_POPULATE_READ` without faults;
//! 2. `open` and that first read ÷ decoding the PNGs itself into new `Vec`s;
//! 3. `purge(0)` (not timed) then reading everything, each chunk rebuilt by the regenerate
//!    function in this process ÷ a private [`Cache`] with the same chunk and function after
//!    `testing::reclaim` of every entry (not timed), then reading everything.
//!
//! The regenerate functions slice a copy of the set decoded once per process, so rows 1 and 3
//! measure lazyfree, not the PNG decoder; row 2 measures decoding on purpose.

mod common;

use std::hint::black_box;
use std::io::{BufRead, BufReader, Cursor, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{size_label, sum_words, Extra, PAGE};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use lazyfree::{testing, Cache, Config, Entry, FillChunk, RegenError, SharedCache, SharedConfig};

const SET_BYTES: usize = 64 << 20;
const CHUNK: usize = 256 << 10;
const SWAY: &str = "/usr/share/backgrounds/sway";
/// The huge page size the huge-pages row reserves and mounts.
const HUGE_PAGE: usize = 2 << 20;
/// Set in the helper's environment: make the cache with huge pages.
const HUGE: &str = "LAZYFREE_BENCH_SHARED_HUGE";
const ROLE: &str = "LAZYFREE_BENCH_SHARED_ROLE";
const NAME: &str = "LAZYFREE_BENCH_SHARED_NAME";

/// The image set: entry `k` (key `k`) is the first `len` bytes of decoded image `img`, the
/// images taken in turn until the set holds `SET_BYTES` (the last entry is cut to fit).
struct Set {
    /// The PNG files' bytes.
    pngs: Vec<Vec<u8>>,
    /// Each image decoded, once per process.
    decoded: Arc<Vec<Vec<u8>>>,
    /// (image, length) of each entry.
    entries: Arc<Vec<(usize, usize)>>,
    source: String,
}

type Regen = Box<dyn Fn(u64, usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync>;

impl Set {
    fn load() -> Set {
        let (pngs, source) = pngs();
        let decoded: Vec<Vec<u8>> = pngs
            .iter()
            .map(|p| decode_prefix(p, usize::MAX).expect("decode a PNG"))
            .collect();
        let mut entries = Vec::new();
        let mut total = 0;
        for img in (0..decoded.len()).cycle() {
            let len = decoded[img].len().min(SET_BYTES - total);
            entries.push((img, len));
            total += len;
            if total == SET_BYTES {
                break;
            }
        }
        Set {
            pngs,
            decoded: Arc::new(decoded),
            entries: Arc::new(entries),
            source,
        }
    }

    /// The cache's regenerate function: slices this process's decoded copy.
    fn regen(&self) -> Regen {
        let (decoded, entries) = (self.decoded.clone(), self.entries.clone());
        Box::new(move |key, off, buf: &mut [u8]| {
            let &(img, len) = entries.get(key as usize).ok_or("no such entry")?;
            if off + buf.len() > len {
                return Err(format!("entry {key}: {off}+{} past {len}", buf.len()).into());
            }
            buf.copy_from_slice(&decoded[img][off..off + buf.len()]);
            Ok(())
        })
    }

    /// The cache's configuration: 256 KiB chunks in /dev/shm, or with `huge` a hugetlbfs file
    /// with chunks of a huge page.
    fn config(&self, huge: bool) -> SharedConfig {
        let chunk = if huge { HUGE_PAGE } else { CHUNK };
        let chunks: usize = self.entries.iter().map(|e| e.1.div_ceil(chunk)).sum();
        SharedConfig {
            capacity: chunks * chunk,
            chunk,
            entries: self.entries.len(),
            budget: None,
            huge_pages: huge,
            ..SharedConfig::default()
        }
    }

    fn chunks(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| e.1.div_ceil(CHUNK) as u64)
            .sum()
    }

    /// What a process without the shared cache does: decode every entry's image into a new Vec.
    fn decode_all(&self) -> Vec<Vec<u8>> {
        self.entries
            .iter()
            .map(|&(img, len)| decode_prefix(&self.pngs[img], len).expect("decode a PNG"))
            .collect()
    }

    /// Its own resident copy: one Vec per entry.
    fn own_copy(&self) -> Vec<Vec<u8>> {
        self.entries
            .iter()
            .map(|&(img, len)| self.decoded[img][..len].to_vec())
            .collect()
    }
}

/// The PNGs of sway-backgrounds (sorted by name), or, where the package is missing, three
/// generated ones (gradients and noise), said loudly.
fn pngs() -> (Vec<Vec<u8>>, String) {
    let mut paths: Vec<_> = std::fs::read_dir(SWAY)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "png"))
                .collect()
        })
        .unwrap_or_default();
    paths.sort();
    let files: Vec<Vec<u8>> = paths.iter().filter_map(|p| std::fs::read(p).ok()).collect();
    if !files.is_empty() && files.len() == paths.len() {
        let n = files.len();
        return (files, format!("{n} PNGs of {SWAY} (sway-backgrounds)"));
    }
    eprintln!(
        "shared bench: {SWAY} is missing (Debian package sway-backgrounds): decoding PNGs made \
         here instead"
    );
    let made = [(1136u32, 640u32), (1366, 768), (1920, 1080)]
        .iter()
        .enumerate()
        .map(|(i, &(w, h))| {
            let noise = common::random_bytes((w * h) as usize, i as u64 + 7);
            let mut px = Vec::with_capacity((w * h * 3) as usize);
            for y in 0..h {
                for x in 0..w {
                    let n = noise[(y * w + x) as usize] & 0x0f;
                    px.extend_from_slice(&[(x * 255 / w) as u8 ^ n, (y * 255 / h) as u8, n]);
                }
            }
            let mut out = Vec::new();
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut wr = enc.write_header().expect("png header");
            wr.write_image_data(&px).expect("png data");
            wr.finish().expect("png end");
            out
        })
        .collect();
    (
        made,
        "3 generated RGB PNGs (sway-backgrounds not installed)".into(),
    )
}

/// Decodes the first `len` bytes of a PNG (all of it for `usize::MAX`) into a new Vec: the whole
/// frame at once, or rows until `len` bytes for a cut entry.
fn decode_prefix(png: &[u8], len: usize) -> Result<Vec<u8>, String> {
    let mut r = png::Decoder::new(Cursor::new(png))
        .read_info()
        .map_err(|e| e.to_string())?;
    let full = r.output_buffer_size().ok_or("PNG too large")?;
    if len >= full {
        let mut v = vec![0u8; full];
        let info = r.next_frame(&mut v).map_err(|e| e.to_string())?;
        v.truncate(info.buffer_size());
        return Ok(v);
    }
    if r.info().interlaced {
        return Err("cutting an interlaced PNG by rows".into());
    }
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let row = r.next_row().map_err(|e| e.to_string())?;
        let row = row.ok_or("the PNG ended early")?;
        let take = row.data().len().min(len - v.len());
        v.extend_from_slice(&row.data()[..take]);
    }
    Ok(v)
}

/// Reads every entry of the set through `SharedEntry::read` (looked up by key); the sum of
/// the words read.
fn read_shared(cache: &SharedCache, n: usize) -> u64 {
    (0..n as u64).fold(0u64, |s, k| {
        let e = cache.get(k).expect("get").expect("the entry exists");
        s.wrapping_add(e.read(sum_words).expect("read"))
    })
}

fn read_own(own: &[Vec<u8>]) -> u64 {
    own.iter()
        .fold(0u64, |s, v| s.wrapping_add(sum_words(black_box(v))))
}

fn read_private(entries: &[Entry]) -> u64 {
    entries.iter().fold(0u64, |s, e| {
        s.wrapping_add(e.read(sum_words).expect("read"))
    })
}

/// Maps every entry's pages into this process with one `MADV_POPULATE_READ` each (what a
/// first `read` could do instead of taking a fault per 64 KiB), without reading them.
fn populate_shared(cache: &SharedCache, n: usize) {
    for k in 0..n as u64 {
        let e = cache.get(k).expect("get").expect("the entry exists");
        // SAFETY: MADV_POPULATE_READ only maps pages (as reading them would: a missing one is
        // rebuilt through the userfaultfd), never changes the bytes; the span is the entry's
        // own, mapped while the cache is open.
        let r = unsafe {
            libc::madvise(
                e.as_ptr() as *mut libc::c_void,
                e.len().div_ceil(PAGE) * PAGE,
                libc::MADV_POPULATE_READ,
            )
        };
        let err = std::io::Error::last_os_error();
        assert_eq!(r, 0, "MADV_POPULATE_READ: {err}");
    }
}

/// Reads one byte of every page of every entry: the page faults of a first read alone.
fn touch_shared(cache: &SharedCache, n: usize) -> u64 {
    (0..n as u64).fold(0u64, |s, k| {
        let e = cache.get(k).expect("get").expect("the entry exists");
        s.wrapping_add(e.read(common::touch_pages).expect("read"))
    })
}

/// Where a first read's time goes, in `rounds` rounds of: a first read after `open`; a touch of
/// one byte per page after `open` (the faults alone); `MADV_POPULATE_READ` after `open` (the
/// mapping alone, no faults) then the read; a read of the own copy. Each on a cache opened
/// anew (open not timed).
struct FirstRead {
    /// Medians of the per-round ratios to the own copy's read.
    ratio: f64,
    populated_ratio: f64,
    /// Medians, ns.
    touch_ns: f64,
    populate_ns: f64,
    /// Minor faults of a first read (median).
    faults: f64,
}

fn first_read(name: &str, set: &Set, own: &[Vec<u8>], rounds: usize) -> FirstRead {
    let (n, want) = (set.entries.len(), read_own(own));
    let open = || SharedCache::open(name, set.regen()).expect("open");
    let ns = |t: Duration| t.as_nanos() as f64;
    let mut v: [Vec<f64>; 5] = Default::default();
    for _ in 0..rounds {
        let c = open();
        let f0 = minor_faults();
        let (first, s) = timed(|| read_shared(&c, n));
        let faults = (minor_faults() - f0) as f64;
        assert_eq!(s, want, "the first read in this process read other bytes");
        drop(c);
        let c = open();
        let (touch, _) = timed(|| black_box(touch_shared(&c, n)));
        drop(c);
        let c = open();
        let (pop, ()) = timed(|| populate_shared(&c, n));
        let (pop_read, s) = timed(|| read_shared(&c, n));
        assert_eq!(
            s, want,
            "the populated read in this process read other bytes"
        );
        drop(c);
        let (own_t, _) = timed(|| black_box(read_own(own)));
        v[0].push(ns(first) / ns(own_t));
        v[1].push(ns(pop + pop_read) / ns(own_t));
        v[2].push(ns(touch));
        v[3].push(ns(pop));
        v[4].push(faults);
    }
    let [r, p, t, pop, f] = v;
    FirstRead {
        ratio: median(r),
        populated_ratio: median(p),
        touch_ns: median(t),
        populate_ns: median(pop),
        faults: median(f),
    }
}

/// Like [`read_private`] through `Entry::pin`, which rebuilds missing chunks in the calling
/// thread (as `SharedEntry::read` does) instead of through faults served by the monitor.
fn read_private_pinned(entries: &[Entry]) -> u64 {
    entries.iter().fold(0u64, |s, e| {
        s.wrapping_add(sum_words(&e.pin().expect("pin")))
    })
}

/// Minor page faults taken by this thread so far.
fn minor_faults() -> u64 {
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the call.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    ru.ru_minflt as u64
}

// ---------------------------------------------------------------------------------------------
// The helper process: the "first process", which decodes the set into the shared cache

/// Runs in the helper process: makes the cache, reads every byte, prints `ready <fills> <sum>`
/// and waits for its stdin to close.
fn helper(name: &str) -> Result<(), String> {
    let set = Set::load();
    let huge = std::env::var(HUGE).is_ok();
    let cache = SharedCache::create(name, &set.config(huge), set.regen())
        .map_err(|e| format!("creating shared cache {name}: {e}"))?;
    let mut sum = 0u64;
    for (k, &(_, len)) in set.entries.iter().enumerate() {
        let e = cache.insert(k as u64, len).map_err(|e| e.to_string())?;
        sum = sum.wrapping_add(e.read(sum_words).map_err(|e| e.to_string())?);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {} {sum}", cache.stats().fills).map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    drop(out);
    // Until the bench closes our stdin, or dies (which closes it too).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(cache);
    let _ = SharedCache::remove(name);
    Ok(())
}

/// The helper, seen from the bench: stopped, and the cache's name removed, when dropped (on a
/// panic too).
struct Helper {
    child: Child,
    stdin: Option<ChildStdin>,
    name: String,
}

impl Helper {
    /// Starts the helper and waits until it has read every byte: (its fills, its sum).
    fn start(name: &str) -> (Helper, u64, u64) {
        Self::start_with(name, false)
    }

    /// [`Helper::start`], the cache made with huge pages if `huge`.
    fn start_with(name: &str, huge: bool) -> (Helper, u64, u64) {
        let exe = std::env::current_exe().expect("the bench binary's path");
        let mut cmd = Command::new(exe);
        if huge {
            cmd.env(HUGE, "1");
        }
        let mut child = cmd
            .env(ROLE, "helper")
            .env(NAME, name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the helper process");
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let h = Helper {
            child,
            stdin,
            name: name.to_string(),
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the helper process said nothing for 120 s");
        let mut w = line.split_whitespace();
        let (Some("ready"), Some(fills), Some(sum)) = (w.next(), w.next(), w.next()) else {
            panic!("the helper process failed (it said {line:?}; its stderr is above)");
        };
        (h, fills.parse().expect("fills"), sum.parse().expect("sum"))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let t = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) if !s.success() => {
                    eprintln!("shared bench: the helper process ended with {s}")
                }
                Ok(Some(_)) => {}
                Ok(None) if t.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                _ => {
                    eprintln!("shared bench: the helper process did not exit: killed");
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                }
            }
            break;
        }
        let _ = SharedCache::remove(&self.name);
    }
}

// ---------------------------------------------------------------------------------------------
// Huge pages for the huge-pages row

/// `pages` huge pages reserved and a hugetlbfs mounted for the row; both undone on drop.
struct HugePool {
    dir: std::path::PathBuf,
    old_nr: String,
}

impl HugePool {
    /// Or why not: it needs root, hugetlbfs and the pages.
    fn new(pages: usize) -> Result<HugePool, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root (the row reserves huge pages and mounts hugetlbfs)".into());
        }
        let nr = "/proc/sys/vm/nr_hugepages";
        let old_nr = std::fs::read_to_string(nr).map_err(|e| format!("{nr}: {e}"))?;
        let old: usize = old_nr
            .trim()
            .parse()
            .map_err(|_| format!("{nr}: {old_nr:?}"))?;
        let dir = std::env::temp_dir().join(format!("lazyfree-bench-huge-{}", std::process::id()));
        let pool = HugePool { dir, old_nr };
        std::fs::write(nr, (old + pages).to_string()).map_err(|e| format!("{nr}: {e}"))?;
        let free = free_huge_pages();
        if free < pages {
            return Err(format!("the kernel gave {free} free huge pages of {pages}"));
        }
        std::fs::create_dir_all(&pool.dir).map_err(|e| e.to_string())?;
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
        let (src, target, fs) = (c("none"), c(&pool.dir.to_string_lossy()), c("hugetlbfs"));
        // SAFETY: valid NUL-terminated strings; no data argument.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fs.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(format!(
                "mount hugetlbfs: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(pool)
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.dir.to_string_lossy().as_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path; unmounting what we mounted (or nothing).
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.old_nr.trim());
    }
}

fn free_huge_pages() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn timed<R>(f: impl FnOnce() -> R) -> (Duration, R) {
    let t = Instant::now();
    let r = f();
    (t.elapsed(), r)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn bench(c: &mut Criterion, extra: &mut Extra) {
    let quick = common::quick();
    let rounds = if quick { 5 } else { 31 };
    let set = Set::load();
    let n = set.entries.len();
    let own = set.own_copy();
    let own_sum = read_own(&own);
    let name = format!(
        "bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let (helper, helper_fills, helper_sum) = Helper::start(&name);
    assert_eq!(
        helper_fills,
        set.chunks(),
        "the helper rebuilt every chunk once"
    );
    assert_eq!(helper_sum, own_sum, "the helper read the same bytes");

    let cache = SharedCache::open(&name, set.regen()).expect("open the helper's cache");
    let st = cache.stats();
    assert_eq!(st.processes, 2, "the helper and this process have it open");
    for (k, v) in own.iter().enumerate() {
        let e = cache.get(k as u64).expect("get").expect("entry");
        assert!(e.read(|b| b == &v[..]).expect("read"), "entry {k} differs");
    }
    let fills_before = st.fills;
    let label = size_label(SET_BYTES);

    let mut g = c.benchmark_group("shared");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Bytes(SET_BYTES as u64));

    // Row 1: reading what the helper decoded ÷ reading the own copy.
    g.bench_function(BenchmarkId::new("own_copy_read", &label), |b| {
        b.iter(|| black_box(read_own(&own)))
    });
    g.bench_function(BenchmarkId::new("second_process_read", &label), |b| {
        b.iter(|| black_box(read_shared(&cache, n)))
    });
    let regen = || set.regen();
    g.bench_function(BenchmarkId::new("second_process_first_read", &label), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let fresh = SharedCache::open(&name, regen()).expect("open");
                    let (t, s) = timed(|| read_shared(&fresh, n));
                    black_box(s);
                    t
                })
                .sum()
        })
    });
    let steady = common::interleaved_ratio(
        rounds,
        || {
            black_box(read_shared(&cache, n));
        },
        || {
            black_box(read_own(&own));
        },
    );
    let first = first_read(&name, &set, &own, rounds);

    // Row 1 with huge pages: the same set in a hugetlbfs file (2 MiB chunks), where this
    // machine can (root: the row reserves the pages and mounts hugetlbfs itself).
    let huge_pages = set
        .entries
        .iter()
        .map(|e| e.1.div_ceil(HUGE_PAGE))
        .sum::<usize>()
        + 8;
    let huge = match HugePool::new(huge_pages) {
        Ok(pool) => {
            let hname = format!("{name}-huge");
            let (hhelper, _, hsum) = Helper::start_with(&hname, true);
            assert_eq!(hsum, own_sum, "the huge-pages helper read the same bytes");
            g.bench_function(
                BenchmarkId::new("second_process_first_read_huge", &label),
                |b| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| {
                                let fresh = SharedCache::open(&hname, regen()).expect("open");
                                let (t, s) = timed(|| read_shared(&fresh, n));
                                black_box(s);
                                t
                            })
                            .sum()
                    })
                },
            );
            let r = first_read(&hname, &set, &own, rounds);
            drop(hhelper);
            drop(pool);
            Ok(r)
        }
        Err(why) => {
            eprintln!("shared bench: the huge-pages row is not measured here: {why}");
            Err(why)
        }
    };

    // Row 2: open + first read ÷ decoding the PNGs into new Vecs.
    g.bench_function(BenchmarkId::new("second_process_open_read", &label), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let (t, fresh) = timed(|| {
                        let fresh = SharedCache::open(&name, regen()).expect("open");
                        black_box(read_shared(&fresh, n));
                        fresh
                    });
                    drop(fresh);
                    t
                })
                .sum()
        })
    });
    g.bench_function(BenchmarkId::new("decode_pngs", &label), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let (t, v) = timed(|| set.decode_all());
                    drop(black_box(v));
                    t
                })
                .sum()
        })
    });
    let decode_rounds = if quick { 3 } else { 11 };
    let open_vs_decode = common::paired_ratio(
        decode_rounds,
        || {
            let (t, fresh) = timed(|| {
                let fresh = SharedCache::open(&name, regen()).expect("open");
                black_box(read_shared(&fresh, n));
                fresh
            });
            drop(fresh);
            t
        },
        || {
            let (t, v) = timed(|| set.decode_all());
            assert_eq!(read_own(&v), own_sum, "decoding gave other bytes");
            t
        },
    );
    let fills_second = cache.stats().fills - fills_before;

    // Row 3: purge(0) and rebuild ÷ the private cache's reclaim and rebuild.
    let f = set.regen();
    let private: Cache<u64> = Cache::with_regen(
        Config::default().fill_chunk(FillChunk::Bytes(CHUNK)),
        move |&k: &u64, off, buf: &mut [u8]| f(k, off, buf),
    )
    .expect("a monitor-mode cache (needs userfaultfd)");
    let entries: Vec<Entry> = set
        .entries
        .iter()
        .enumerate()
        .map(|(k, &(_, len))| private.insert_lazy(k as u64, len).expect("insert"))
        .collect();
    assert_eq!(read_private(&entries), own_sum, "the private cache's bytes");
    let pages: usize = entries.iter().map(|e| e.len().div_ceil(PAGE)).sum();
    let mut purge_ns = Vec::new();
    let mut purged_chunks = Vec::new();
    let mut purge = || {
        let (t, chunks) = timed(|| cache.purge(0).expect("purge"));
        assert_eq!(cache.stats().present_bytes, 0, "purge(0) left chunks");
        purge_ns.push(t.as_nanos() as f64);
        purged_chunks.push(chunks as f64);
    };
    let (mut dropped, mut partial, mut reclaims) = (0usize, 0u64, 0u64);
    let mut reclaim = || {
        let mut got = testing::reclaim_all(&entries);
        for e in &entries {
            for _ in 0..3 {
                if e.resident_pages() == 0 {
                    break;
                }
                got += testing::reclaim(e);
            }
        }
        let left: usize = entries.iter().map(Entry::resident_pages).sum();
        dropped += got.min(pages);
        reclaims += 1;
        partial += (left > 0) as u64;
    };
    g.bench_function(BenchmarkId::new("shared_purge_rebuild", &label), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    purge();
                    timed(|| black_box(read_shared(&cache, n))).0
                })
                .sum()
        })
    });
    g.bench_function(BenchmarkId::new("private_reclaim_rebuild", &label), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    reclaim();
                    timed(|| black_box(read_private(&entries))).0
                })
                .sum()
        })
    });
    let fills0 = cache.stats().fills;
    let regen0 = private.stats().regenerate_calls;
    // Interleaved: the shared rebuild, the private one through reads (faults served by the
    // monitor's threads), and the private one through `pin` (rebuilt in the calling thread, as
    // the shared `read` does).
    let (mut vs_read, mut vs_pin) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        purge();
        let (shared_t, s) = timed(|| read_shared(&cache, n));
        assert_eq!(s, own_sum, "the shared rebuild gave other bytes");
        reclaim();
        let (read_t, s) = timed(|| read_private(&entries));
        assert_eq!(s, own_sum, "the private rebuild gave other bytes");
        reclaim();
        let (pin_t, s) = timed(|| read_private_pinned(&entries));
        assert_eq!(s, own_sum, "the private rebuild gave other bytes");
        let ns = |t: Duration| t.as_nanos() as f64;
        vs_read.push(ns(shared_t) / ns(read_t));
        vs_pin.push(ns(shared_t) / ns(pin_t));
    }
    g.finish();
    let shared_fills = (cache.stats().fills - fills0) as f64 / rounds as f64;
    let private_calls = (private.stats().regenerate_calls - regen0) as f64 / (2 * rounds) as f64;
    let processes = cache.stats().processes;
    let helper_pid = helper.pid();
    drop(cache);
    drop(helper);

    match &huge {
        Ok(r) => {
            extra
                .num("first_read_huge_interleaved_ratio", r.ratio)
                .num("first_read_huge_minor_faults", r.faults);
        }
        Err(why) => {
            extra.text("huge_not_measured", why);
        }
    }
    extra
        .text("image_source", &set.source)
        .num("set_bytes", SET_BYTES as f64)
        .num("entries", n as f64)
        .num("images", set.pngs.len() as f64)
        .num(
            "png_bytes",
            set.pngs.iter().map(Vec::len).sum::<usize>() as f64,
        )
        .num("chunk_bytes", CHUNK as f64)
        .num("chunks", set.chunks() as f64)
        .num("helper_pid", helper_pid as f64)
        .num("processes", processes as f64)
        .num("helper_fills", helper_fills as f64)
        .num("second_process_fills", fills_second as f64)
        .num("steady_interleaved_ratio", steady)
        .num("first_read_interleaved_ratio", first.ratio)
        .num("first_read_minor_faults", first.faults)
        .num("first_read_touch_ns", first.touch_ns)
        .num("first_read_populate_ns", first.populate_ns)
        .num(
            "first_read_populate_interleaved_ratio",
            first.populated_ratio,
        )
        .num("open_read_vs_decode_interleaved_ratio", open_vs_decode)
        .num("purge_rebuild_interleaved_ratio", median(vs_read))
        .num(
            "purge_rebuild_vs_private_pin_interleaved_ratio",
            median(vs_pin),
        )
        .num("purge_ns", median(purge_ns))
        .num("purged_chunks", median(purged_chunks))
        .num("shared_fills_per_rebuild", shared_fills)
        .num("private_regenerate_calls_per_rebuild", private_calls)
        .num(
            "private_pages_dropped_per_reclaim",
            dropped as f64 / reclaims.max(1) as f64,
        )
        .num("private_pages", pages as f64)
        .num("private_partial_reclaims", partial as f64);
}

fn main() {
    if std::env::var(ROLE).is_ok_and(|r| r == "helper") {
        let name = std::env::var(NAME).expect("LAZYFREE_BENCH_SHARED_NAME");
        if let Err(e) = helper(&name) {
            eprintln!("shared bench helper: {e}");
            let _ = SharedCache::remove(&name);
            std::process::exit(1);
        }
        return;
    }
    let mut c = common::criterion();
    let mut extra = Extra::default();
    bench(&mut c, &mut extra);
    extra.write("shared");
    c.final_summary();
}
