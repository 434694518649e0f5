//! The child side: one way of holding the decoded tiles, inside the memory cgroup, running the
//! viewer's passes. It prints one line per result for the parent (`say`); a wrong byte ends it
//! with exit code 3 and a `WRONG` line.
//!
//! - `vec`: plain `Vec<u8>` tiles.
//! - `discardable`: Chromium-style discardable buffers: one anonymous mapping per tile, locked
//!   around each use. Unlock saves each page's first word, writes a cookie there and advises
//!   the buffer `MADV_FREE`. Lock asks `mincore` which pages are gone; if none, it
//!   compare-and-swaps each cookie back to the saved word (the write cancels the pending free; a
//!   page dropped since `mincore` reads as zero, not the cookie). Any page gone: the whole buffer
//!   is lost and decoded again.
//! - `lazyfree`: a `Cache` with the default configuration in `Mode::Auto` (monitor mode where a
//!   userfaultfd can be had), one lazy entry per tile whose callback decodes the chunk asked for;
//!   reads through `Entry::read`.
//!
//! A few tiles stay pinned for the whole run: locked (discardable), `pin_unguarded` (lazyfree).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use lazyfree::{Cache, Config, Entry, Mode};

use crate::cgroup;
use crate::common::{Fresh, PAGE};
use crate::workload::{check, Layout, Path, Store, Use};

/// What the parent asks of a child (passed in one environment variable).
pub struct Spec {
    pub model: String,
    pub path: Path,
    pub working_set: usize,
    pub passes: usize,
    pub cgroup_kind: String,
    pub cgroup_dir: PathBuf,
}

impl Spec {
    pub fn encode(&self) -> String {
        format!(
            "{}:{}:{}:{}:{}:{}",
            self.model,
            self.path.name(),
            self.working_set,
            self.passes,
            self.cgroup_kind,
            self.cgroup_dir.display()
        )
    }

    pub fn decode(s: &str) -> Spec {
        let f: Vec<&str> = s.splitn(6, ':').collect();
        assert_eq!(f.len(), 6, "child spec {s:?}");
        Spec {
            model: f[0].to_string(),
            path: Path::from_name(f[1]).expect("path"),
            working_set: f[2].parse().expect("working set"),
            passes: f[3].parse().expect("passes"),
            cgroup_kind: f[4].to_string(),
            cgroup_dir: PathBuf::from(f[5]),
        }
    }
}

/// A way of holding the tiles.
trait Model {
    /// First decode of tile `t`, and a read of all of it.
    fn load(&mut self, t: usize) -> Result<(), String>;
    /// One read in a frame; `Err` names a wrong byte.
    fn show(&mut self, u: &Use) -> Result<(), String>;
    /// Bytes decoded again, bytes the kernel dropped, bytes filled ahead, buffers lost: running
    /// totals.
    fn counters(&self) -> [u64; 4];
    fn summary(&self) -> String;
}

fn say(line: std::fmt::Arguments) {
    // Line-buffered stdout: each line reaches the parent before an OOM kill could.
    println!("{line}");
}

fn check_spans(t: usize, u: &Use, bytes: &[u8]) -> Result<(), String> {
    for span in u.spans() {
        if let Some((o, got, want)) = check(t, span.start, &bytes[span.clone()]) {
            return Err(format!(
                "tile {t} byte {o}: read {got:#04x}, expected {want:#04x}"
            ));
        }
    }
    Ok(())
}

fn check_all(t: usize, bytes: &[u8]) -> Result<(), String> {
    match check(t, 0, bytes) {
        Some((o, got, want)) => Err(format!(
            "tile {t} byte {o} (first read): read {got:#04x}, expected {want:#04x}"
        )),
        None => Ok(()),
    }
}

struct Plain {
    store: Arc<Store>,
    layout: Arc<Layout>,
    tiles: Vec<Vec<u8>>,
}

impl Model for Plain {
    fn load(&mut self, t: usize) -> Result<(), String> {
        let mut v = vec![0u8; self.layout.len(t)];
        self.store.decode(t, 0, &mut v).expect("decode");
        check_all(t, &v)?;
        self.tiles.push(v);
        Ok(())
    }

    fn show(&mut self, u: &Use) -> Result<(), String> {
        check_spans(u.tile, u, &self.tiles[u.tile])
    }

    fn counters(&self) -> [u64; 4] {
        [0; 4]
    }

    fn summary(&self) -> String {
        String::new()
    }
}

const COOKIE: u64 = 0x6c61_7a79_6672_6565;

/// One discardable buffer.
struct Buffer {
    mem: Fresh,
    pages: usize,
    /// The first word of each page while unlocked (the cookie is there instead).
    saved: Vec<u64>,
}

impl Buffer {
    fn word(&self, page: usize) -> &AtomicU64 {
        // SAFETY: the page lies in our mapping, which lives as long as self; page starts are
        // 8-byte aligned, and while unlocked the word is only accessed atomically.
        unsafe { &*(self.mem.as_ptr().add(page * PAGE) as *const AtomicU64) }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping holds pages * PAGE bytes for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.mem.as_ptr(), self.pages * PAGE) }
    }

    /// Pages not resident now (`mincore`).
    fn missing(&self, vec: &mut Vec<u8>) -> usize {
        vec.resize(self.pages, 0);
        // SAFETY: the range is our mapping; vec has one byte per page.
        let r = unsafe {
            libc::mincore(
                self.mem.as_ptr().cast(),
                self.pages * PAGE,
                vec.as_mut_ptr().cast(),
            )
        };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&v| v & 1 == 0).count()
    }

    /// Makes the buffer non-discardable; the pages found dropped (0: the contents are intact).
    fn lock(&mut self, vec: &mut Vec<u8>) -> usize {
        let missing = self.missing(vec);
        if missing > 0 {
            return missing;
        }
        (0..self.pages)
            .filter(|&p| {
                self.word(p)
                    .compare_exchange(COOKIE, self.saved[p], Relaxed, Relaxed)
                    .is_err()
            })
            .count()
    }

    fn unlock(&mut self) {
        for p in 0..self.pages {
            self.saved[p] = self.word(p).load(Relaxed);
            self.word(p).store(COOKIE, Relaxed);
        }
        // SAFETY: the buffer is unlocked: the kernel may drop its pages, which `lock` detects.
        unsafe { libc::madvise(self.mem.as_ptr().cast(), self.pages * PAGE, libc::MADV_FREE) };
    }
}

struct Discardable {
    store: Arc<Store>,
    layout: Arc<Layout>,
    bufs: Vec<Buffer>,
    mincore: Vec<u8>,
    /// Bytes decoded again, bytes found dropped, buffers lost.
    regenerated: u64,
    dropped: u64,
    lost: u64,
}

impl Model for Discardable {
    fn load(&mut self, t: usize) -> Result<(), String> {
        let len = self.layout.len(t);
        let mut mem = Fresh::map(len);
        self.store.decode(t, 0, mem.as_mut_slice()).expect("decode");
        let mut b = Buffer {
            mem,
            pages: len / PAGE,
            saved: vec![0; len / PAGE],
        };
        check_all(t, b.bytes())?;
        if !self.layout.pinned.contains(&t) {
            b.unlock();
        }
        self.bufs.push(b);
        Ok(())
    }

    fn show(&mut self, u: &Use) -> Result<(), String> {
        let pinned = self.layout.pinned.contains(&u.tile);
        let b = &mut self.bufs[u.tile];
        if !pinned {
            let gone = b.lock(&mut self.mincore);
            if gone > 0 {
                self.dropped += (gone * PAGE) as u64;
                self.regenerated += (b.pages * PAGE) as u64;
                self.lost += 1;
                self.store
                    .decode(u.tile, 0, b.mem.as_mut_slice())
                    .expect("decode");
            }
        }
        let r = check_spans(u.tile, u, b.bytes());
        if !pinned {
            b.unlock();
        }
        r
    }

    fn counters(&self) -> [u64; 4] {
        [self.regenerated, self.dropped, 0, self.lost]
    }

    fn summary(&self) -> String {
        format!(
            "{} buffers lost and decoded again, {} MiB",
            self.lost,
            self.regenerated >> 20
        )
    }
}

struct Lazy {
    store: Arc<Store>,
    layout: Arc<Layout>,
    cache: Cache<usize>,
    entries: Vec<Entry>,
    /// Bytes the callbacks produced (after the load: bytes decoded again).
    decoded: Arc<AtomicU64>,
}

impl Model for Lazy {
    fn load(&mut self, t: usize) -> Result<(), String> {
        let (store, decoded) = (self.store.clone(), self.decoded.clone());
        let e = self
            .cache
            .insert(t, self.layout.len(t), move |off, buf: &mut [u8]| {
                decoded.fetch_add(buf.len() as u64, Relaxed);
                store.decode(t, off, buf)
            })
            .expect("insert");
        if self.layout.pinned.contains(&t) {
            e.pin_unguarded().expect("pin");
        }
        e.read(|b| check_all(t, b)).expect("read")?;
        self.entries.push(e);
        Ok(())
    }

    fn show(&mut self, u: &Use) -> Result<(), String> {
        self.entries[u.tile]
            .read(|b| check_spans(u.tile, u, b))
            .expect("read")
    }

    fn counters(&self) -> [u64; 4] {
        let s = self.cache.stats();
        [
            self.decoded.load(Relaxed),
            s.pages_reclaimed * PAGE as u64,
            s.pages_read_ahead * PAGE as u64,
            0,
        ]
    }

    fn summary(&self) -> String {
        self.cache.stats().to_string()
    }
}

/// Runs the child described by `spec` (from the environment) and exits.
pub fn run(spec: &Spec) -> ! {
    let layout = Arc::new(Layout::new(spec.working_set));
    // Made before joining the cgroup: the compressed tiles are charged outside it, as image
    // files in the page cache would be to whoever read them first. The limit is for decoded
    // memory.
    let store = Arc::new(Store::build(&layout));
    let mbs = store.decode_mb_per_s(&layout).unwrap_or_else(|e| {
        say(format_args!("WRONG {e}"));
        std::process::exit(3)
    });
    say(format_args!("STORE {} {mbs:.0}", store.compressed_bytes()));
    let tour = layout.passes(spec.path, spec.passes);
    if let Err(e) = cgroup::join(&spec.cgroup_dir) {
        say(format_args!("ERROR {e}"));
        std::process::exit(4);
    }
    let mut model: Box<dyn Model> = match spec.model.as_str() {
        "vec" => Box::new(Plain {
            store,
            layout: layout.clone(),
            tiles: Vec::new(),
        }),
        "discardable" => Box::new(Discardable {
            store,
            layout: layout.clone(),
            bufs: Vec::new(),
            mincore: Vec::new(),
            regenerated: 0,
            dropped: 0,
            lost: 0,
        }),
        "lazyfree" => {
            let cache = Cache::new(Config::default().mode(Mode::Auto)).expect("Cache::new");
            let s = cache.stats();
            say(format_args!(
                "MODE {:?} ({}{})",
                s.mode,
                s.uffd_kind,
                s.fallback_reason
                    .map_or(String::new(), |r| format!(", fell back: {r}"))
            ));
            Box::new(Lazy {
                store,
                layout: layout.clone(),
                cache,
                entries: Vec::new(),
                decoded: Arc::new(AtomicU64::new(0)),
            })
        }
        other => panic!("unknown model {other}"),
    };
    let hits = || cgroup::limit_hits(&spec.cgroup_kind, &spec.cgroup_dir);
    let wrong = |e: String| -> ! {
        say(format_args!("WRONG {} {e}", spec.model));
        std::process::exit(3)
    };
    let (h0, t0) = (hits(), Instant::now());
    let mut loaded = 0;
    for t in 0..layout.tiles() {
        model.load(t).unwrap_or_else(|e| wrong(e));
        loaded += layout.len(t);
        say(format_args!("LOADED {loaded}"));
    }
    say(format_args!(
        "LOAD {:.6} {}",
        t0.elapsed().as_secs_f64(),
        hits() - h0
    ));
    for (p, frames) in (1..).zip(&tour) {
        say(format_args!("START {p}"));
        let (c0, h0, t0) = (model.counters(), hits(), Instant::now());
        for frame in frames {
            for u in frame {
                model.show(u).unwrap_or_else(|e| wrong(e));
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let c = model.counters();
        say(format_args!(
            "PASS {p} {secs:.6} {} {} {} {} {}",
            c[0] - c0[0],
            c[1] - c0[1],
            hits() - h0,
            c[2] - c0[2],
            c[3] - c0[3],
        ));
    }
    say(format_args!("SUMMARY {}", model.summary()));
    say(format_args!("DONE"));
    std::process::exit(0)
}
