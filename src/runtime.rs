//! The process-wide runtime of a mode: its userfaultfd, its arena of slabs and, in monitor mode,
//! the monitor threads. Started lazily by the first cache; every cache and entry holds it, and
//! when the last goes the threads stop, the slabs are unmapped and the fd is closed. The
//! SIGBUS-mode runtime is the exception: once made it stays, like the signal handler that
//! serves it (see `sigbus.rs`).

use std::sync::{Arc, Mutex, Weak};

use crate::arena::Arena;
use crate::config::{FillChunk, Mode};
use crate::error::Error;
use crate::monitor::Monitor;
use crate::sys::mem;
use crate::sys::uffd::{
    Uffd, UffdKind, UFFD_FEATURE_POISON, UFFD_FEATURE_SIGBUS, UFFD_FEATURE_THREAD_ID,
};

pub(crate) struct Runtime {
    monitor: Option<Monitor>,
    arena: Arc<Arena>,
    /// `None` in explicit mode, which has no userfaultfd.
    kind: Option<UffdKind>,
    poison: bool,
}

static MONITOR_RT: Mutex<Weak<Runtime>> = Mutex::new(Weak::new());
static EXPLICIT_RT: Mutex<Weak<Runtime>> = Mutex::new(Weak::new());
/// Never dropped once made: the SIGBUS handler reads its arena at any time.
static SIGBUS_RT: Mutex<Option<Arc<Runtime>>> = Mutex::new(None);

impl Runtime {
    /// The monitor-mode runtime, started if none is running.
    pub(crate) fn monitor() -> Result<Arc<Runtime>, Error> {
        if !mem::check_page_size() {
            return Err(Error::UnsupportedPageSize);
        }
        let mut g = MONITOR_RT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rt) = g.upgrade() {
            return rt.not_forked();
        }
        let uffd = Uffd::open(UFFD_FEATURE_POISON | UFFD_FEATURE_THREAD_ID).map_err(|f| {
            Error::UserfaultfdUnavailable {
                syscall_errno: f.syscall_errno,
                devnode_errno: f.devnode_errno,
                user_mode_only_errno: f.user_mode_only_errno,
            }
        })?;
        let kind = Some(uffd.kind());
        let poison = uffd.has(UFFD_FEATURE_POISON);
        let arena = Arc::new(Arena::new(Arc::new(uffd), usize::MAX));
        let monitor = Monitor::start(arena.clone())
            .map_err(|e| Error::kernel("starting the monitor thread", e))?;
        let rt = Arc::new(Runtime {
            monitor: Some(monitor),
            arena,
            kind,
            poison,
        });
        *g = Arc::downgrade(&rt);
        Ok(rt)
    }

    /// The SIGBUS-mode runtime, made (and the SIGBUS handler installed) if there is none; its
    /// scratch buffers are readied for chunks of `chunk`.
    pub(crate) fn sigbus(chunk: FillChunk) -> Result<Arc<Runtime>, Error> {
        if !mem::check_page_size() {
            return Err(Error::UnsupportedPageSize);
        }
        let mut g = SIGBUS_RT.lock().unwrap_or_else(|p| p.into_inner());
        let rt = match &*g {
            Some(rt) => rt.clone().not_forked()?,
            None => {
                // No UFFD_FEATURE_POISON: the handler raises SIGBUS itself for the poison
                // policy (`fill::Served::Raise`), which works on every kernel.
                let uffd = Uffd::open_user_mode_first(UFFD_FEATURE_SIGBUS).map_err(|f| {
                    Error::UserfaultfdUnavailable {
                        syscall_errno: f.syscall_errno,
                        devnode_errno: f.devnode_errno,
                        user_mode_only_errno: f.user_mode_only_errno,
                    }
                })?;
                if !uffd.has(UFFD_FEATURE_SIGBUS) {
                    return Err(Error::Kernel {
                        op: "userfaultfd with UFFD_FEATURE_SIGBUS (needs Linux 4.14; use \
                             Mode::Monitor)",
                        errno: libc::EINVAL,
                    });
                }
                let arena = Arc::new(Arena::new(Arc::new(uffd), usize::MAX));
                // The arena the handler serves: this one, or one kept by an earlier attempt.
                let arena = crate::sigbus::start(arena)?;
                let kind = Some(arena.uffd().kind());
                let rt = Arc::new(Runtime {
                    monitor: None,
                    arena,
                    kind,
                    poison: true,
                });
                *g = Some(rt.clone());
                rt
            }
        };
        crate::sigbus::prepare(chunk)?;
        Ok(rt)
    }

    pub(crate) fn arena(&self) -> &Arena {
        &self.arena
    }

    /// How its userfaultfd was obtained; `None` in explicit mode.
    pub(crate) fn kind(&self) -> Option<UffdKind> {
        self.kind
    }

    /// The explicit-mode runtime: an arena of unregistered slabs, no fd, no thread. Kept while
    /// caches or entries hold it, like the monitor's.
    pub(crate) fn explicit() -> Result<Arc<Runtime>, Error> {
        if !mem::check_page_size() {
            return Err(Error::UnsupportedPageSize);
        }
        let mut g = EXPLICIT_RT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rt) = g.upgrade() {
            return rt.not_forked();
        }
        let rt = Arc::new(Runtime {
            monitor: None,
            arena: Arc::new(Arena::without_uffd(usize::MAX)),
            kind: None,
            poison: false,
        });
        *g = Arc::downgrade(&rt);
        Ok(rt)
    }

    /// The runtime, unless this process is a fork of the one that made it.
    fn not_forked(self: Arc<Self>) -> Result<Arc<Runtime>, Error> {
        if self.arena.forked() {
            return Err(Error::ForkedChild);
        }
        Ok(self)
    }

    /// The mode this runtime serves.
    pub(crate) fn mode(&self) -> Mode {
        match (self.kind, &self.monitor) {
            (None, _) => Mode::Explicit,
            (Some(_), Some(_)) => Mode::Monitor,
            (Some(_), None) => Mode::Sigbus,
        }
    }

    /// Whether this is the explicit mode's runtime (bytes read through pins only).
    pub(crate) fn is_explicit(&self) -> bool {
        self.kind.is_none()
    }

    pub(crate) fn poison_supported(&self) -> bool {
        self.poison
    }

    /// Monitor worker threads running now (0 without a monitor).
    pub(crate) fn workers(&self) -> usize {
        self.monitor.as_ref().map_or(0, |m| m.workers())
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if self.arena.forked() {
            // A forked child's copy. The monitor threads are the parent's (not in this process:
            // joining them would wait forever) and its eventfd is shared with the parent (a stop
            // signal would stop the parent's monitor); the slabs are not mapped here. Leak all.
            std::mem::forget(self.monitor.take());
            std::mem::forget(self.arena.clone());
            return;
        }
        // Stop the threads before the arena (and with it the slabs and the fd) goes.
        drop(self.monitor.take());
    }
}

/// Whether a monitor runtime is running now (for tests of the shutdown path).
pub fn monitor_running() -> bool {
    MONITOR_RT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .strong_count()
        > 0
}
