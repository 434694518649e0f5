//! The process-wide runtime of a mode: its userfaultfd, its arena of slabs and, in monitor mode,
//! the monitor threads. Started lazily by the first cache; every cache and entry holds it, and
//! when the last goes the threads stop, the slabs are unmapped and the fd is closed.

use std::sync::{Arc, Mutex, Weak};

use crate::arena::Arena;
use crate::error::Error;
use crate::monitor::Monitor;
use crate::sys::mem;
use crate::sys::uffd::{Uffd, UffdKind, UFFD_FEATURE_POISON};

pub(crate) struct Runtime {
    monitor: Option<Monitor>,
    arena: Arc<Arena>,
    kind: UffdKind,
    poison: bool,
}

static MONITOR_RT: Mutex<Weak<Runtime>> = Mutex::new(Weak::new());

impl Runtime {
    /// The monitor-mode runtime, started if none is running.
    pub(crate) fn monitor() -> Result<Arc<Runtime>, Error> {
        if !mem::check_page_size() {
            return Err(Error::UnsupportedPageSize);
        }
        let mut g = MONITOR_RT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rt) = g.upgrade() {
            return Ok(rt);
        }
        let uffd = Uffd::open(UFFD_FEATURE_POISON).map_err(|f| Error::UserfaultfdUnavailable {
            syscall_errno: f.syscall_errno,
            devnode_errno: f.devnode_errno,
            user_mode_only_errno: f.user_mode_only_errno,
        })?;
        let kind = uffd.kind();
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

    pub(crate) fn arena(&self) -> &Arena {
        &self.arena
    }

    pub(crate) fn kind(&self) -> UffdKind {
        self.kind
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
