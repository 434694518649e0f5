//! Purging on memory pressure: where the cache was made with a PSI trigger
//! ([`SharedConfig::pressure`](crate::SharedConfig::pressure)), each process that opens it runs a
//! thread watching the trigger on its cgroup's `memory.pressure` (cgroup v2) or the machine's
//! `/proc/pressure/memory`. When the kernel reports tasks stalled on memory for longer than the
//! threshold within the window, the thread purges the cache down to half of its resident bytes
//! (one process purges at a time: the others find the purge lock taken) and counts the event.
//! The byte budget still holds on its own.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::purge;
use super::serve::Core;
use crate::error::Error;
use crate::sys::shm;

/// Opens this process's trigger, if the cache has one.
pub fn trigger(core: &Core) -> Result<Option<OwnedFd>, Error> {
    let h = core.file.header();
    if h.psi_window_us == 0 {
        return Ok(None);
    }
    let file = shm::pressure_file();
    shm::pressure_trigger(&file, h.psi_stall_us, h.psi_window_us)
        .map(Some)
        .map_err(|e| {
            Error::kernel(
                "a PSI trigger on memory pressure (needs CONFIG_PSI, not disabled with psi=0, \
                 and, for a process without CAP_SYS_RESOURCE, a window that is a multiple of 2 s)",
                e,
            )
        })
}

/// Runs until `stop` is readable.
pub fn run(core: Arc<Core>, trigger: OwnedFd, stop: Arc<OwnedFd>) {
    loop {
        match shm::wait_pressure(trigger.as_raw_fd(), stop.as_raw_fd(), 1_000_000) {
            Ok((_, true)) | Err(_) => return,
            Ok((true, false)) => {
                let present = core.file.header().present.load(Ordering::Acquire) as usize;
                if purge::purge_to(&core, present * core.file.chunk / 2) > 0 {
                    core.file
                        .header()
                        .pressure_events
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok((false, false)) => {}
        }
    }
}
