//! The process-wide runtime of each mode, and the [`Backend`] that does what differs between
//! modes (how a pin makes pages resident, how an unpin makes them volatile, how initial bytes
//! go in, whether bytes are readable without a pin). Shared code holds a `Runtime` and asks its
//! backend; no flag or `Option` stands for a mode anywhere else.
//!
//! A runtime is started lazily by the first cache or arena of its mode ([`Runtime::for_config`]
//! is the one place that picks it); every cache, arena and entry holds it, and when the last
//! goes the threads stop, the slabs are unmapped and the fd is closed. The SIGBUS-mode runtime
//! is the exception: once made it stays, like the signal handler that serves it (`sigbus/`).

mod explicit;
mod monitor;
mod sigbus;
pub(crate) use sigbus::foreign;
pub(crate) use sigbus::start_foreign as start_sigbus_foreign;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::arena::Arena;
use crate::config::{Config, FillChunk, Mode};
use crate::error::Error;
use crate::fault::{self, readvise};
use crate::region::Region;
use crate::sys::mem::{self, PAGE};
use crate::sys::uffd::{
    FillOp, Uffd, UffdKind, UFFD_FEATURE_POISON, UFFD_FEATURE_SIGBUS, UFFD_FEATURE_THREAD_ID,
};
use monitor::Monitor;

/// What differs between the modes.
pub(crate) enum Backend {
    /// A monitor thread and worker pool serve the userfaultfd's faults.
    Monitor { uffd: Arc<Uffd>, monitor: Monitor },
    /// A missing page raises SIGBUS in the faulting thread; the handler serves it there.
    Sigbus { uffd: Arc<Uffd> },
    /// No userfaultfd: bytes are read through pins, which find lost pages themselves.
    Explicit,
}

impl Backend {
    fn uffd(&self) -> Option<&Uffd> {
        match self {
            Backend::Monitor { uffd, .. } | Backend::Sigbus { uffd } => Some(uffd),
            Backend::Explicit => None,
        }
    }

    /// Takes a pin on `r` (see `Region::pin_with`).
    pub(crate) fn pin(&self, r: &Region) -> Result<(), Error> {
        match self.uffd() {
            Some(uffd) => r.pin_with(|r, _| fault::make_resident(uffd, r)),
            None => r.pin_with(explicit::sweep),
        }
    }

    /// Ends a pin on `r`; false if it was not pinned. In monitor mode the last unpin leaves
    /// the region lingering for its unpin delay, which the reader ends (`Monitor::linger`); the
    /// other modes have no thread to end it and make the pages volatile at once.
    pub(crate) fn unpin(&self, r: &Region, arena: &Arena) -> bool {
        let volatile = |r: &Region, _: &mut Vec<u64>| readvise::unpinned(arena, r);
        match self {
            Backend::Monitor { monitor, .. } => {
                r.unpin_with(volatile, |r| monitor.linger(r.base()))
            }
            Backend::Sigbus { .. } => r.unpin_with(volatile, |_| false),
            Backend::Explicit => r.unpin_with(explicit::release, |_| false),
        }
    }

    /// Copies `bytes` (the region's length) into the fresh region and makes them volatile.
    pub(crate) fn fill_from(&self, r: &Region, bytes: &[u8]) -> Result<(), Error> {
        match self.uffd() {
            Some(uffd) => fault::fill_from(uffd, r, bytes),
            None => {
                explicit::fill_from(r, bytes);
                Ok(())
            }
        }
    }

    /// Whether an entry's bytes may be read without a pin (a fault rebuilds a lost page).
    pub(crate) fn readable(&self) -> bool {
        self.uffd().is_some()
    }

    /// Makes a fresh span present as the shared zero page (UFFDIO_ZEROPAGE), so that reads and
    /// writes of it are ordinary faults the kernel serves itself. False in explicit mode.
    pub(crate) fn zero_fill(&self, base: usize, pages: usize) -> bool {
        // SAFETY: the span lies in this backend's registered slabs; a zero fill reads no source.
        self.uffd()
            .is_some_and(|u| unsafe { u.fill_all(FillOp::Zero, base, pages * PAGE) }.is_ok())
    }
}

/// Ends every lingering unpin of the monitor-mode runtime now (for `testing::reclaim`, which
/// stands for the kernel taking pages back later, after any unpin delay).
pub(crate) fn end_lingering_now() {
    let rt = MONITOR_RT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .upgrade();
    if let Some(Backend::Monitor { monitor, .. }) = rt.as_deref().map(|rt| &rt.backend) {
        monitor.end_lingering_now();
    }
}

pub(crate) struct Runtime {
    /// Declared first, so dropped first: the monitor stops before its arena and fd go.
    backend: Backend,
    arena: Arc<Arena>,
}

static MONITOR_RT: Mutex<Weak<Runtime>> = Mutex::new(Weak::new());
static EXPLICIT_RT: Mutex<Weak<Runtime>> = Mutex::new(Weak::new());
/// Never dropped once made: the SIGBUS handler reads its arena at any time.
static SIGBUS_RT: Mutex<Option<Arc<Runtime>>> = Mutex::new(None);

/// How the caller reads the memory it gets.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reads {
    /// Through plain pointers (the allocator interfaces): a userfaultfd mode is required.
    Direct,
    /// Through `Entry`, which pins in explicit mode (the cache): any mode.
    Entry,
}

impl Runtime {
    /// The one place a mode becomes a runtime: the runtime for `config.mode`, started if
    /// needed, and why a `Mode::Auto` one is explicit if it is.
    pub(crate) fn for_config(
        config: &Config,
        reads: Reads,
    ) -> Result<(Arc<Runtime>, Option<String>), Error> {
        config.validate()?;
        fault::readvise::prepare_drain();
        match (config.mode, reads) {
            (Mode::Monitor, _) | (Mode::Auto, Reads::Direct) => Ok((Self::monitor()?, None)),
            (Mode::Sigbus, _) => Ok((Self::sigbus(config.fill_chunk)?, None)),
            (Mode::Explicit, Reads::Entry) => Ok((Self::explicit()?, None)),
            (Mode::Explicit, Reads::Direct) => Err(Error::InvalidConfig(
                "VolatileArena needs a userfaultfd (Mode::Monitor or Mode::Sigbus); \
                 Mode::Explicit is for Cache only"
                    .into(),
            )),
            (Mode::Auto, Reads::Entry) => Self::auto(),
        }
    }

    /// The monitor-mode runtime, started if none is running.
    fn monitor() -> Result<Arc<Runtime>, Error> {
        if !mem::check_page_size() {
            return Err(Error::UnsupportedPageSize);
        }
        let mut g = MONITOR_RT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rt) = g.upgrade() {
            return rt.not_forked();
        }
        // LAZYFREE_TEST_NO_UFFDIO_POISON=1 (for tests) runs as on a kernel without
        // UFFDIO_POISON (before 6.6): the poison policy is then emulated.
        let poison = match std::env::var_os("LAZYFREE_TEST_NO_UFFDIO_POISON") {
            Some(v) if v == "1" => 0,
            _ => UFFD_FEATURE_POISON,
        };
        let uffd = Arc::new(Uffd::open(poison | UFFD_FEATURE_THREAD_ID)?);
        let arena = Arc::new(Arena::new(Some(uffd.clone()), usize::MAX));
        let monitor = Monitor::start(arena.clone(), uffd.clone())
            .map_err(|e| Error::kernel("starting the monitor thread", e))?;
        let rt = Arc::new(Runtime {
            backend: Backend::Monitor { uffd, monitor },
            arena,
        });
        *g = Arc::downgrade(&rt);
        Ok(rt)
    }

    /// The SIGBUS-mode runtime, made (and the SIGBUS handler installed) if there is none; its
    /// scratch buffers are readied for chunks of `chunk`.
    fn sigbus(chunk: FillChunk) -> Result<Arc<Runtime>, Error> {
        if !mem::check_page_size() {
            return Err(Error::UnsupportedPageSize);
        }
        let mut g = SIGBUS_RT.lock().unwrap_or_else(|p| p.into_inner());
        let rt = match &*g {
            Some(rt) => rt.clone().not_forked()?,
            None => {
                // No UFFD_FEATURE_POISON: the handler raises SIGBUS itself for the poison
                // policy (`fault::Served::Raise`), which works on every kernel.
                let uffd = Uffd::open_user_mode_first(UFFD_FEATURE_SIGBUS)?;
                if !uffd.has(UFFD_FEATURE_SIGBUS) {
                    return Err(Error::Kernel {
                        op: "userfaultfd with UFFD_FEATURE_SIGBUS (needs Linux 4.14; use \
                             Mode::Monitor)",
                        errno: libc::EINVAL,
                    });
                }
                let uffd = Arc::new(uffd);
                let arena = Arc::new(Arena::new(Some(uffd.clone()), usize::MAX));
                // What the handler serves: these, or the ones kept by an earlier attempt.
                let (arena, uffd) = sigbus::start(arena, uffd)?;
                let rt = Arc::new(Runtime {
                    backend: Backend::Sigbus { uffd },
                    arena,
                });
                *g = Some(rt.clone());
                rt
            }
        };
        sigbus::prepare(chunk)?;
        Ok(rt)
    }

    /// The explicit-mode runtime: an arena of unregistered slabs, no fd, no thread. Kept while
    /// caches or entries hold it, like the monitor's.
    fn explicit() -> Result<Arc<Runtime>, Error> {
        if !mem::check_page_size() {
            return Err(Error::UnsupportedPageSize);
        }
        let mut g = EXPLICIT_RT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rt) = g.upgrade() {
            return rt.not_forked();
        }
        let rt = Arc::new(Runtime {
            backend: Backend::Explicit,
            arena: Arc::new(Arena::new(None, usize::MAX)),
        });
        *g = Arc::downgrade(&rt);
        Ok(rt)
    }

    /// `Mode::Auto` for a cache: `LAZYFREE_MODE` first, then the monitor mode if a userfaultfd
    /// can be had, else the explicit mode, with the reason (logged once).
    fn auto() -> Result<(Arc<Runtime>, Option<String>), Error> {
        let bad = |v: &dyn std::fmt::Debug| {
            Error::InvalidConfig(format!(
                "LAZYFREE_MODE={v:?}: use explicit, monitor or auto (or unset it)"
            ))
        };
        match std::env::var("LAZYFREE_MODE") {
            Ok(v) => match v.trim() {
                "explicit" => {
                    let why = "LAZYFREE_MODE=explicit".to_string();
                    log_fallback(&why);
                    return Ok((Self::explicit()?, Some(why)));
                }
                "monitor" => return Ok((Self::monitor()?, None)),
                "auto" | "" => {}
                other => return Err(bad(&other)),
            },
            Err(std::env::VarError::NotPresent) => {}
            Err(std::env::VarError::NotUnicode(v)) => return Err(bad(&v)),
        }
        match Self::monitor() {
            Ok(rt) => Ok((rt, None)),
            Err(e @ Error::UserfaultfdUnavailable { .. }) => {
                let why = e.to_string();
                log_fallback(&why);
                Ok((Self::explicit()?, Some(why)))
            }
            Err(e) => Err(e),
        }
    }

    /// The runtime, unless this process is a fork of the one that made it.
    fn not_forked(self: Arc<Self>) -> Result<Arc<Runtime>, Error> {
        self.arena.check_owner()?;
        Ok(self)
    }

    pub(crate) fn arena(&self) -> &Arena {
        &self.arena
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The mode this runtime serves.
    pub(crate) fn mode(&self) -> Mode {
        match self.backend {
            Backend::Monitor { .. } => Mode::Monitor,
            Backend::Sigbus { .. } => Mode::Sigbus,
            Backend::Explicit => Mode::Explicit,
        }
    }

    /// How its userfaultfd was obtained; `None` in explicit mode.
    pub(crate) fn kind(&self) -> Option<UffdKind> {
        self.backend.uffd().map(|u| u.kind())
    }

    /// Whether the poison policy makes an access to a failed page fault loudly: always, except
    /// in explicit mode (no faults there: a pin returns the error).
    pub(crate) fn poison_supported(&self) -> bool {
        match &self.backend {
            // Without UFFDIO_POISON the monitor emulates it (`fault::fill::apply_failure`).
            Backend::Monitor { .. } => true,
            Backend::Sigbus { .. } => true,
            Backend::Explicit => false,
        }
    }

    /// Monitor worker threads running now (0 without a monitor).
    pub(crate) fn workers(&self) -> usize {
        match &self.backend {
            Backend::Monitor { monitor, .. } => monitor.workers(),
            _ => 0,
        }
    }
}

/// One line on stderr, the first time a `Mode::Auto` cache ends up explicit.
fn log_fallback(why: &str) {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    if !LOGGED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "lazyfree: Mode::Auto uses the explicit mode (entries are read through pin()): {why}"
        );
    }
}

/// Whether a monitor runtime is running now.
pub(crate) fn monitor_running() -> bool {
    MONITOR_RT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .strong_count()
        > 0
}

/// Times the monitor's watcher stood in for its reader, since the process started.
pub(crate) fn monitor_stand_ins() -> u64 {
    monitor::STAND_INS.load(std::sync::atomic::Ordering::Relaxed)
}
