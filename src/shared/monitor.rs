//! The shared cache's fault thread in this process, and its workers.
//!
//! The monitor thread reads the faults of this process's userfaultfd and never runs a callback:
//! - a chunk present (or failed) is served at once (a wake; zeros over missing failed pages);
//! - an absent chunk is claimed and handed to an idle worker, or to a new one if none is idle,
//!   which runs the callback and installs the pages. So a slow or stuck callback holds only its
//!   own chunk, and a callback may read other entries of the cache (its fault reaches the
//!   monitor, which hands it to another worker) at any depth;
//! - a chunk another process (or a worker or pin here) fills or punches stays pending and is
//!   retried every millisecond until it is present; a fault from the very thread whose callback
//!   fills that chunk (a callback reading its own output) would wait forever, so it aborts the
//!   process with a message instead.
//!
//! ## A worker's states
//! idle (counted in `idle`) → busy (the monitor took one idle count when it handed a chunk over,
//! so a handed chunk never waits in the queue behind a busy worker) → idle again when the fill
//! ends. Workers end when the cache closes and their queue is dropped; one stuck in a callback
//! ends when the callback returns.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use super::purge;
use super::serve::{claim, fill, Claim, Core, Ctx};
use super::state::{self, FILLING};
use crate::sys::os;
use crate::sys::uffd::{UffdMsg, UFFD_EVENT_PAGEFAULT};

/// The workers: a queue of claimed chunks and the count of idle workers.
struct Workers {
    core: Arc<Core>,
    tx: Sender<usize>,
    rx: Arc<Mutex<Receiver<usize>>>,
    idle: Arc<AtomicUsize>,
}

impl Workers {
    /// Hands claimed chunk `c` to an idle worker, starting one if none is idle.
    fn hand(&self, c: usize) {
        let took = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if !took {
            let (core, rx, idle) = (self.core.clone(), self.rx.clone(), self.idle.clone());
            let started = std::thread::Builder::new()
                .name("lazyfree-shared-fill".into())
                .spawn(move || work(core, rx, idle));
            if started.is_err() {
                os::fatal(
                    "lazyfree: cannot start a thread to rebuild a shared cache chunk; aborting \
                     (a faulting thread would wait forever)\n",
                );
            }
        }
        // The receiving side lives as long as any worker or this struct: sending cannot fail.
        let _ = self.tx.send(c);
    }
}

fn work(core: Arc<Core>, rx: Arc<Mutex<Receiver<usize>>>, idle: Arc<AtomicUsize>) {
    let mut scratch = vec![0u8; core.file.chunk];
    loop {
        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(c) = next else {
            return;
        };
        fill(&core, c, &mut scratch, Ctx::Thread);
        idle.fetch_add(1, Ordering::AcqRel);
        purge::if_over_budget(&core);
    }
}

const SELF_READ: &str = "lazyfree: a shared cache's regenerate callback read the chunk it is \
rebuilding (its own output), which would wait for itself forever; aborting. A callback must not \
read its own entry's missing bytes\n";

/// Runs until `stop` is readable or the userfaultfd is gone.
pub fn run(core: Arc<Core>, stop: Arc<OwnedFd>) {
    let (tx, rx) = channel();
    let workers = Workers {
        core: core.clone(),
        tx,
        rx: Arc::new(Mutex::new(rx)),
        idle: Arc::new(AtomicUsize::new(0)),
    };
    let mut msgs = [UffdMsg::default(); 32];
    // Pending faults: (chunk, faulting thread).
    let mut pending: Vec<(usize, u32)> = Vec::new();
    let mut scratch = vec![0u8; core.file.chunk];
    loop {
        let timeout_us = if pending.is_empty() { 1_000_000 } else { 1_000 };
        let Ok((ready, stopped)) = os::poll2(core.uffd.raw(), stop.as_raw_fd(), timeout_us) else {
            return;
        };
        if stopped {
            return;
        }
        if ready {
            let n = match core.uffd.read_msgs(&mut msgs) {
                Ok(n) => n,
                Err(_) => return,
            };
            for m in &msgs[..n] {
                if m.event != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                if let Some(c) = core.file.chunk_at(m.pf_address as usize) {
                    // One entry per chunk and thread: the self-read check needs every thread
                    // that waits on a chunk, not the first one only.
                    if !pending.contains(&(c, m.pf_ptid)) {
                        pending.push((c, m.pf_ptid));
                    }
                }
            }
        }
        pending.retain(
            |&(c, tid)| match claim(&core, c, &mut scratch, Ctx::Thread) {
                Claim::Claimed => {
                    workers.hand(c);
                    false
                }
                Claim::Served => false,
                Claim::Busy => {
                    let st = core.file.chunk_word(c).state.load(Ordering::Acquire);
                    if st & FILLING != 0
                        && state::owner(st) == Some(core.mark)
                        && tid != 0
                        && core.fillers.of(c) == Some(tid)
                    {
                        os::fatal(SELF_READ);
                    }
                    true
                }
            },
        );
    }
}
