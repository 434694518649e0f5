//! [`SharedCache`]: one volatile cache shared by many processes, backed by a file in shared
//! memory (`/dev/shm`). Each process maps the file, registers its mapping with its own
//! userfaultfd (monitor mode) and supplies the cache's one regenerate function,
//! `Fn(key, offset, buf)`. A chunk rebuilt in one process is installed into the file, so every
//! process sees it at once; a chunk is rebuilt once however many processes touch it; the cache
//! punches holes in its least recently used unpinned chunks when its resident bytes pass a
//! budget; and a process that dies at any point leaves nothing wedged (its slot is reaped).
//!
//! The parts, bottom to top: `file.rs` (layout, making and checking the file), `state.rs` (a
//! chunk's states), `procs.rs` (process slots and liveness), `index.rs` (key → record),
//! `serve.rs` (serving a fault), `purge.rs` (punching), `monitor.rs` (the fault thread).

mod file;
mod handler;
mod index;
mod monitor;
mod pressure;
mod procs;
mod purge;
mod serve;
mod state;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::config::Mode;
use crate::error::Error;
use crate::region::RegenError;
use crate::sys::{mem, os, shm, uffd};
use serve::{serve, Core, Outcome};

/// Sizes of a new shared cache ([`SharedCache::create`]).
#[derive(Debug, Clone)]
pub struct SharedConfig {
    /// Bytes of entry data the cache can hold, a multiple of `chunk`, at most 1 TiB and 2^22
    /// chunks: address space in each process and a sparse file, not memory. Spans are never reused (entries are never
    /// removed): size it for every entry the cache will ever hold. Default 1 GiB.
    pub capacity: usize,
    /// The unit of rebuilding and purging, a power of two from 4 KiB to 64 MiB. Each entry
    /// starts at a chunk boundary. Default 64 KiB.
    pub chunk: usize,
    /// Entries the cache can hold (rounded up to a power of two, at most 2^20). Default 4096.
    pub entries: usize,
    /// Resident bytes above which the cache purges itself down to 7/8 of it. Default: the
    /// capacity (no purging).
    pub budget: Option<usize>,
    /// Put the file in a hugetlbfs mount (the first in `/proc/mounts`) instead of `/dev/shm`:
    /// huge pages, no page-table or TLB cost per 4 KiB. The chunk is raised to the huge page
    /// size if smaller. Monitor mode only. Default: false.
    pub huge_pages: bool,
    /// Purge on memory pressure too: every process that opens the cache watches a PSI trigger
    /// (its cgroup's `memory.pressure`, or `/proc/pressure/memory`) and, when tasks stalled on
    /// memory longer than `stall` within `window`, purges down to half of the resident bytes.
    /// Default: none.
    pub pressure: Option<Pressure>,
    /// How the creating process serves its faults: [`Mode::Monitor`] (default) or
    /// [`Mode::Sigbus`]. Each process chooses for itself ([`SharedCache::open_in`]).
    pub mode: Mode,
}

impl Default for SharedConfig {
    fn default() -> Self {
        SharedConfig {
            capacity: 1 << 30,
            chunk: 64 << 10,
            entries: 4096,
            budget: None,
            huge_pages: false,
            pressure: None,
            mode: Mode::Monitor,
        }
    }
}

/// A memory pressure threshold ([`SharedConfig::pressure`]): the kernel's PSI "some" stall
/// time within a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pressure {
    /// Stall time within the window that counts as pressure (less than the window).
    pub stall: std::time::Duration,
    /// The window: 500 ms to 10 s (for a process without `CAP_SYS_RESOURCE`, as here for root
    /// in a container, a multiple of 2 s: 2 s is the safe choice).
    pub window: std::time::Duration,
}

/// Counts kept in the file, over all processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedStats {
    /// Entries made.
    pub entries: u64,
    /// Chunks resident now (rebuilt and not purged since), in bytes.
    pub present_bytes: u64,
    /// Chunks rebuilt by a regenerate callback.
    pub fills: u64,
    /// Chunks whose callback failed.
    pub failures: u64,
    /// Chunks purged.
    pub purged_chunks: u64,
    /// Purges run.
    pub purges: u64,
    /// Pressure events (PSI triggers) that led to a purge.
    pub pressure_purges: u64,
    /// The byte budget.
    pub budget: u64,
    /// Processes with the cache open now.
    pub processes: u32,
}

/// What serves this process's faults.
enum Runs {
    /// The fault thread (stopped through the eventfd).
    Monitor(Arc<OwnedFd>, Option<JoinHandle<()>>),
    /// The SIGBUS handler, through this slot of `mode::foreign`.
    Handler(usize),
}

/// A volatile cache shared by many processes. See the crate docs' "Sharing across processes".
///
/// Dropping it stops this process's fault thread (or retires its range from the SIGBUS
/// handler) and returns at once; a callback still running on a worker then keeps the
/// regenerate function, the mapping and this process's slot in the file until it returns.
pub struct SharedCache {
    core: Arc<Core>,
    runs: Runs,
    /// The pressure watcher, if the cache has a trigger.
    watch: Option<(Arc<OwnedFd>, JoinHandle<()>)>,
    /// This process's pins, by record: the file keeps one bit per process.
    pins: Mutex<HashMap<usize, u32>>,
    pid: u32,
}

impl SharedCache {
    /// Makes a new shared cache named `name` (1 to 200 of `A-Z a-z 0-9 . _ -`, under
    /// `/dev/shm/lazyfree.<name>`) and opens it. `regen(key, offset, buf)` writes the bytes at
    /// `offset` of entry `key` into `buf` (one chunk or the entry's tail); every process that
    /// opens the cache must give one producing the same bytes. Fails with
    /// [`Error::SharedExists`] if the name is taken.
    pub fn create(
        name: &str,
        config: &SharedConfig,
        regen: impl Fn(u64, usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync + 'static,
    ) -> Result<SharedCache, Error> {
        let (dir, g, budget, psi) = Self::checked(config)?;
        let f = file::create(&dir, name, g, budget, psi)?;
        let path = f.path.clone();
        Self::start(f, config.mode, Box::new(regen)).inspect_err(|_| {
            // Nobody could use it: a made file that is not there for its maker is left over.
            let _ = shm::unlink(&path);
        })
    }

    /// Checks a configuration: where the file goes, its geometry, the budget and the PSI
    /// trigger.
    fn checked(
        config: &SharedConfig,
    ) -> Result<(String, file::Geometry, usize, (u64, u64)), Error> {
        if !mem::check_page_size() {
            return Err(Error::UnsupportedPageSize);
        }
        let (dir, page) = if config.huge_pages {
            if config.mode == Mode::Sigbus {
                return Err(Error::InvalidConfig(
                    "huge pages run in monitor mode: the SIGBUS handler's buffers are smaller \
                     than a huge page"
                        .into(),
                ));
            }
            file::huge_dir()?
        } else {
            (shm::SHM_DIR.to_string(), mem::PAGE)
        };
        let g = file::Geometry {
            page,
            // Raised to a huge page; a 4 KiB page cache keeps the chunk asked for (checked).
            chunk: if config.huge_pages {
                config.chunk.max(page)
            } else {
                config.chunk
            },
            capacity: config.capacity,
            slots: config
                .entries
                .max(1)
                .checked_next_power_of_two()
                .ok_or_else(|| {
                    Error::InvalidConfig(format!(
                        "entries {} is too large: a shared cache holds at most 2^20",
                        config.entries
                    ))
                })?,
        };
        let budget = config.budget.unwrap_or(config.capacity);
        let psi = match config.pressure {
            None => (0, 0),
            Some(p) => {
                let (s, w) = (p.stall.as_micros() as u64, p.window.as_micros() as u64);
                if !(500_000..=10_000_000).contains(&w) || s == 0 || s >= w {
                    return Err(Error::InvalidConfig(format!(
                        "pressure: a window of 500 ms to 10 s and a stall above 0 and below \
                         it, not {p:?}"
                    )));
                }
                (s, w)
            }
        };
        if !matches!(config.mode, Mode::Monitor | Mode::Sigbus) {
            return Err(Error::InvalidConfig(format!(
                "a shared cache runs in Mode::Monitor or Mode::Sigbus, not {:?}",
                config.mode
            )));
        }
        Ok((dir, g, budget, psi))
    }

    /// Makes a new shared cache without a name (a memfd) and opens it: other processes get it
    /// by fd ([`SharedCache::fd`], then [`SharedCache::open_fd`] there: an fd inherited over
    /// `exec` or passed over a Unix socket). Its memory goes with the last process that has it
    /// open. Huge pages need a named cache.
    pub fn create_anonymous(
        config: &SharedConfig,
        regen: impl Fn(u64, usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync + 'static,
    ) -> Result<SharedCache, Error> {
        if config.huge_pages {
            return Err(Error::InvalidConfig(
                "huge pages need a named cache (a file in a hugetlbfs mount): use \
                 SharedCache::create"
                    .into(),
            ));
        }
        let (_, g, budget, psi) = Self::checked(config)?;
        let f = file::create_anonymous(g, budget, psi)?;
        Self::start(f, config.mode, Box::new(regen))
    }

    /// The cache's file, to hand to another process (which opens it with
    /// [`SharedCache::open_fd`]). It is close-on-exec: give the child a copy without the flag.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.core.file.fd.as_fd()
    }

    /// Opens the shared cache whose file is `fd` (from [`SharedCache::fd`] in another process;
    /// this call keeps its own copy, so the caller may close `fd`), serving its faults in
    /// `mode`. The same checks as [`SharedCache::open`] ([`Error::BadSharedFile`]).
    pub fn open_fd(
        fd: std::os::fd::BorrowedFd<'_>,
        mode: Mode,
        regen: impl Fn(u64, usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync + 'static,
    ) -> Result<SharedCache, Error> {
        use std::os::fd::AsRawFd;
        if !mem::check_page_size() {
            return Err(Error::UnsupportedPageSize);
        }
        let own = shm::dup(fd.as_raw_fd()).map_err(|e| Error::kernel("fcntl(F_DUPFD)", e))?;
        let f = file::open_fd(own, &format!("(fd {})", fd.as_raw_fd()))?;
        Self::start(f, mode, Box::new(regen))
    }

    /// Opens the shared cache named `name`, made by [`SharedCache::create`] in this or another
    /// process. Fails with [`Error::SharedNotFound`], or [`Error::BadSharedFile`] for a file of
    /// the wrong size, version or kind.
    pub fn open(
        name: &str,
        regen: impl Fn(u64, usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync + 'static,
    ) -> Result<SharedCache, Error> {
        Self::open_in(name, Mode::Monitor, regen)
    }

    /// [`SharedCache::open`] with this process serving its faults in `mode`
    /// ([`Mode::Monitor`] or [`Mode::Sigbus`]; each process chooses its own).
    pub fn open_in(
        name: &str,
        mode: Mode,
        regen: impl Fn(u64, usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync + 'static,
    ) -> Result<SharedCache, Error> {
        if !mem::check_page_size() {
            return Err(Error::UnsupportedPageSize);
        }
        let f = file::open(name)?;
        Self::start(f, mode, Box::new(regen))
    }

    /// Removes the name: processes that have the cache open keep using it, and its memory is
    /// freed when the last one closes it.
    pub fn remove(name: &str) -> Result<(), Error> {
        for path in file::paths_of(name)? {
            match shm::unlink(&path) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(Error::kernel("removing the shared cache's name", e)),
            }
        }
        Err(Error::SharedNotFound(file::path_of(name)?))
    }

    fn start(f: file::File, mode: Mode, regen: Box<serve::Regen>) -> Result<SharedCache, Error> {
        let sigbus = match mode {
            Mode::Monitor => false,
            Mode::Sigbus => true,
            other => {
                return Err(Error::InvalidConfig(format!(
                    "a shared cache runs in Mode::Monitor or Mode::Sigbus, not {other:?}"
                )))
            }
        };
        if sigbus && f.page > mem::PAGE {
            return Err(Error::InvalidConfig(
                "this shared cache uses huge pages, which run in monitor mode only".into(),
            ));
        }
        let (me, mark) = procs::claim(&f)?;
        let set_up = || -> Result<uffd::Uffd, Error> {
            let shmem = if f.page > mem::PAGE {
                uffd::UFFD_FEATURE_MISSING_HUGETLBFS
            } else {
                uffd::UFFD_FEATURE_MISSING_SHMEM
            };
            let u = if sigbus {
                uffd::Uffd::open_user_mode_first(shmem | uffd::UFFD_FEATURE_SIGBUS)?
            } else {
                uffd::Uffd::open(shmem | uffd::UFFD_FEATURE_THREAD_ID)?
            };
            if !u.has(shmem) || (sigbus && !u.has(uffd::UFFD_FEATURE_SIGBUS)) {
                return Err(Error::Kernel {
                    op: "userfaultfd on shared memory (UFFD_FEATURE_MISSING_SHMEM, or \
                         _HUGETLBFS for huge pages, Linux 4.11; SIGBUS mode also \
                         UFFD_FEATURE_SIGBUS, Linux 4.14)",
                    errno: libc::EINVAL,
                });
            }
            let (d, len) = (f.data as usize, f.capacity);
            mem::advise(d, len, mem::Advice::DontFork).map_err(|e| Error::kernel("madvise", e))?;
            u.register(d, len)
                .map_err(|e| Error::kernel("UFFDIO_REGISTER", e))?;
            Ok(u)
        };
        let u = match set_up() {
            Ok(u) => u,
            Err(e) => {
                procs::release(&f, me);
                return Err(e);
            }
        };
        let core = Arc::new(Core {
            file: f,
            me,
            mark,
            uffd: u,
            regen,
            errors: Mutex::new(HashMap::new()),
            fillers: serve::Fillers::new(),
            pid: os::pid(),
            make_room: purge::make_room,
        });
        // From here the Core releases the slot when its last holder drops it. What can fail
        // comes before anything runs; once the runtime runs, the SharedCache value owns it, and
        // its drop stops it on a later error.
        let fail = |e: Error| Err(e);
        let trigger = match pressure::trigger(&core) {
            Ok(t) => t,
            Err(e) => return fail(e),
        };
        let watch_stop = match trigger.as_ref().map(|_| os::eventfd()).transpose() {
            Ok(fd) => fd.map(Arc::new),
            Err(e) => return fail(Error::kernel("eventfd", e)),
        };
        let runs = if sigbus {
            if let Err(e) = crate::mode::start_sigbus_foreign(core.file.chunk) {
                return fail(e);
            }
            let (d, len) = (core.file.data as usize, core.file.capacity);
            let ctx = Arc::as_ptr(&core) as usize;
            match crate::mode::foreign::add(d, len, core.file.chunk, handler::serve_fault, ctx) {
                Ok(slot) => Runs::Handler(slot),
                Err(e) => return fail(e),
            }
        } else {
            let stop = match os::eventfd() {
                Ok(fd) => Arc::new(fd),
                Err(e) => return fail(Error::kernel("eventfd", e)),
            };
            let (c2, s2) = (core.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name("lazyfree-shared".into())
                .spawn(move || monitor::run(c2, s2));
            match thread {
                Ok(t) => Runs::Monitor(stop, Some(t)),
                Err(e) => return fail(Error::kernel("spawning the monitor thread", e)),
            }
        };
        let mut cache = SharedCache {
            core,
            runs,
            watch: None,
            pins: Mutex::new(HashMap::new()),
            pid: os::pid(),
        };
        if let (Some(trigger), Some(stop)) = (trigger, watch_stop) {
            let (c2, s2) = (cache.core.clone(), stop.clone());
            let t = std::thread::Builder::new()
                .name("lazyfree-pressure".into())
                .spawn(move || pressure::run(c2, trigger, s2))
                .map_err(|e| Error::kernel("spawning the pressure thread", e))?;
            cache.watch = Some((stop, t));
        }
        Ok(cache)
    }

    /// The mode this process serves the cache's faults in.
    pub fn mode(&self) -> Mode {
        match self.runs {
            Runs::Monitor(..) => Mode::Monitor,
            Runs::Handler(_) => Mode::Sigbus,
        }
    }

    /// In SIGBUS mode the handler never purges (it may not allocate): the next call here does,
    /// if the cache is over its budget (one atomic load when it is not).
    fn handler_purge(&self) {
        if matches!(self.runs, Runs::Handler(_)) {
            purge::if_over_budget(&self.core);
        }
    }

    fn check_fork(&self) -> Result<(), Error> {
        if os::pid() != self.pid {
            return Err(Error::ForkedChild);
        }
        Ok(())
    }

    /// The entry of `key`, made with `len` bytes if there is none (nothing is rebuilt yet: the
    /// first touch does that). Fails with [`Error::SharedLengthMismatch`] if it exists with
    /// another length, [`Error::SharedFull`] if the records or the capacity are used up.
    pub fn insert(&self, key: u64, len: usize) -> Result<SharedEntry<'_>, Error> {
        self.check_fork()?;
        self.handler_purge();
        let (i, _) = index::insert(&self.core.file, self.core.mark, key, len)?;
        let e = SharedEntry { cache: self, i };
        e.touch();
        Ok(e)
    }

    /// The entry of `key`, if any process made it.
    pub fn get(&self, key: u64) -> Result<Option<SharedEntry<'_>>, Error> {
        self.check_fork()?;
        self.handler_purge();
        let e = index::find(&self.core.file, key).map(|i| SharedEntry { cache: self, i });
        if let Some(e) = &e {
            e.touch();
        }
        Ok(e)
    }

    /// Purges unpinned chunks, least recently used entries first, until at most `keep` bytes
    /// are resident. Returns the chunks punched (0 if another process is purging now).
    pub fn purge(&self, keep: usize) -> Result<usize, Error> {
        self.check_fork()?;
        Ok(purge::purge_to(&self.core, keep))
    }

    /// Sets the byte budget for every process; purges now if it is exceeded.
    pub fn set_budget(&self, bytes: usize) -> Result<(), Error> {
        self.check_fork()?;
        self.core
            .file
            .header()
            .budget
            .store(bytes as u64, Ordering::Relaxed);
        purge::if_over_budget(&self.core);
        Ok(())
    }

    /// The counts kept in the file.
    pub fn stats(&self) -> SharedStats {
        let f = &self.core.file;
        let h = f.header();
        SharedStats {
            entries: h.entries.load(Ordering::Relaxed),
            present_bytes: h.present.load(Ordering::Relaxed) * f.chunk as u64,
            fills: h.fills.load(Ordering::Relaxed),
            failures: h.failures.load(Ordering::Relaxed),
            purged_chunks: h.purged.load(Ordering::Relaxed),
            purges: h.purges.load(Ordering::Relaxed),
            pressure_purges: h.pressure_events.load(Ordering::Relaxed),
            budget: h.budget.load(Ordering::Relaxed),
            processes: (0..file::MAX_PROCS).filter(|&s| procs::alive(f, s)).count() as u32,
        }
    }

    /// The capacity in bytes (`SharedConfig::capacity` of the process that made it).
    pub fn capacity(&self) -> usize {
        self.core.file.capacity
    }

    /// The chunk size.
    pub fn chunk(&self) -> usize {
        self.core.file.chunk
    }

    /// Drops one of this process's pins of record `i`; false if it holds none.
    fn unpin(&self, i: usize) -> bool {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        let Some(n) = pins.get_mut(&i) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            pins.remove(&i);
            state::clear_pin(&self.core.file.record(i).pins, self.core.me);
        }
        true
    }
}

impl Drop for SharedCache {
    fn drop(&mut self) {
        if os::pid() != self.pid {
            // A forked child: the thread, the handler's range and the slot are the parent's.
            if let Runs::Monitor(_, t) = &mut self.runs {
                std::mem::forget(t.take());
            }
            std::mem::forget(self.watch.take());
            return;
        }
        if let Some((stop, t)) = self.watch.take() {
            os::eventfd_signal(&stop);
            let _ = t.join();
        }
        match &mut self.runs {
            Runs::Monitor(stop, t) => {
                os::eventfd_signal(stop);
                if let Some(t) = t.take() {
                    let _ = t.join();
                }
            }
            // After this no handler uses the Core: it may go with the last Arc.
            Runs::Handler(slot) => crate::mode::foreign::remove(*slot),
        }
        // The slot is released when the Core goes: now, or when the last worker still running
        // a callback returns (until then this process still fills that chunk, in every
        // process's eyes).
    }
}

/// An entry of a [`SharedCache`]: a key and a span of the file.
#[derive(Clone, Copy)]
pub struct SharedEntry<'a> {
    cache: &'a SharedCache,
    i: usize,
}

impl<'a> SharedEntry<'a> {
    fn record(&self) -> &'a file::Record {
        self.cache.core.file.record(self.i)
    }

    /// Marks the entry used now, for the purges' recency order (gets, inserts and pins do;
    /// plain reads through the pointer cannot be seen).
    fn touch(&self) {
        let tick = self
            .cache
            .core
            .file
            .header()
            .tick
            .fetch_add(1, Ordering::Relaxed);
        self.record().used.store(tick, Ordering::Relaxed);
    }

    /// The key.
    pub fn key(&self) -> u64 {
        self.record().key.load(Ordering::Relaxed)
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.record().len.load(Ordering::Relaxed) as usize
    }

    /// Never true: entries hold at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Chunks of this entry rebuilt so far, by all processes.
    pub fn fills(&self) -> u64 {
        self.record().fills.load(Ordering::Relaxed)
    }

    /// The entry's first byte in this process. Reading through it rebuilds missing pages, but
    /// a chunk whose callback failed reads as zeros: use [`SharedEntry::read`] or
    /// [`SharedEntry::pin`], which report it.
    pub fn as_ptr(&self) -> *const u8 {
        let f = &self.cache.core.file;
        // SAFETY: the span lies inside the data mapping.
        unsafe {
            f.data
                .add(self.record().offset.load(Ordering::Relaxed) as usize)
        }
    }

    fn chunks(&self) -> std::ops::Range<usize> {
        let f = &self.cache.core.file;
        let first = self.record().offset.load(Ordering::Relaxed) as usize / f.chunk;
        first..first + self.len().div_ceil(f.chunk)
    }

    /// Whether a chunk of the entry failed to rebuild (and reads as zeros until it is retried).
    pub fn is_failed(&self) -> bool {
        let f = &self.cache.core.file;
        self.chunks()
            .any(|c| state::failed(f.chunk_word(c).state.load(Ordering::Acquire)))
    }

    /// Runs `f` on the entry's bytes, pinned meanwhile.
    pub fn read<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Result<R, Error> {
        let p = self.pin()?;
        Ok(f(&p))
    }

    /// Makes every page resident (rebuilding missing chunks in this thread, or waiting for the
    /// process rebuilding them) and keeps them so until the guard drops: no process purges a
    /// pinned entry. A chunk that failed before is retried. Fails with
    /// [`Error::RegenerateFailed`] if a chunk's callback fails.
    pub fn pin(&self) -> Result<SharedPin<'a>, Error> {
        let cache = self.cache;
        cache.check_fork()?;
        let core = &cache.core;
        let f = &core.file;
        {
            let mut pins = cache.pins.lock().unwrap_or_else(|p| p.into_inner());
            let n = pins.entry(self.i).or_insert(0);
            if *n == 0 {
                state::mark_pin(&self.record().pins, core.me);
            }
            *n += 1;
        }
        let guard = SharedPin {
            cache,
            i: self.i,
            ptr: self.as_ptr(),
            len: self.len(),
        };
        crate::hook::step(crate::hook::Step::SharedPinMarked, guard.ptr as usize);
        self.touch();
        let mut scratch: Vec<u8> = Vec::new();
        let mut rebuilt = false;
        for c in self.chunks() {
            let w = &f.chunk_word(c).state;
            let mut retried = false;
            let mut attempts = 0;
            loop {
                let st = w.load(Ordering::SeqCst);
                if st == state::PRESENT {
                    break;
                }
                if st == state::FAILED {
                    if retried {
                        let msg = core
                            .errors
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(&self.key())
                            .cloned()
                            .unwrap_or_else(|| {
                                "a chunk's callback failed in another process".to_string()
                            });
                        return Err(Error::RegenerateFailed(msg));
                    }
                    // Retry a failed chunk once: punch its zeros, then rebuild. A punch that
                    // found the chunk taken (zeros being installed for a fault) is no retry:
                    // look again once that is over.
                    retried = purge::punch_chunk(core, self.i, c, true);
                    if !retried {
                        attempts += 1;
                        if attempts > 1000 {
                            return Err(Error::Kernel {
                                op: "punching a failed chunk to retry it (fallocate)",
                                errno: libc::EIO,
                            });
                        }
                        let now = w.load(Ordering::Acquire);
                        if now != state::FAILED {
                            shm::futex_wait(w, now, 10);
                        } else {
                            os::sleep_ms(1);
                        }
                    }
                    continue;
                }
                if scratch.is_empty() {
                    scratch = vec![0u8; f.chunk];
                }
                match serve(core, c, &mut scratch, serve::Ctx::Thread) {
                    Outcome::Busy => shm::futex_wait(w, st, 10),
                    Outcome::Served { filled } => rebuilt |= filled,
                }
            }
        }
        if rebuilt {
            // This entry is pinned: the purge takes others.
            purge::if_over_budget(core);
        }
        Ok(guard)
    }
}

impl SharedEntry<'_> {
    /// [`SharedEntry::pin`] without a guard, for callers that cannot hold one (the C ABI): each
    /// must be matched by one [`SharedEntry::unpin_unguarded`] in this process.
    pub fn pin_unguarded(&self) -> Result<(), Error> {
        std::mem::forget(self.pin()?);
        Ok(())
    }

    /// Drops one pin taken by [`SharedEntry::pin_unguarded`]. [`Error::NotPinned`] if this
    /// process holds none of this entry.
    pub fn unpin_unguarded(&self) -> Result<(), Error> {
        self.cache.check_fork()?;
        if self.cache.unpin(self.i) {
            Ok(())
        } else {
            Err(Error::NotPinned)
        }
    }
}

/// A pinned entry: its bytes, resident until the guard drops.
pub struct SharedPin<'a> {
    cache: &'a SharedCache,
    i: usize,
    ptr: *const u8,
    len: usize,
}

// SAFETY: a pin is a read-only view of bytes no one writes while it holds (like `&[u8]`), and
// its drop only takes the cache's pin lock and clears a bit with an atomic.
unsafe impl Send for SharedPin<'_> {}
// SAFETY: as above: shared access is reads only.
unsafe impl Sync for SharedPin<'_> {}

impl std::ops::Deref for SharedPin<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the span is mapped for the cache's life, which outlives the guard; pinned, no
        // process punches it, and nothing writes bytes into a present chunk.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for SharedPin<'_> {
    fn drop(&mut self) {
        self.cache.unpin(self.i);
    }
}
