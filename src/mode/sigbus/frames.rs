//! The handler's frame table: how deep each thread's handler frames are nested. A nested fault
//! runs the handler again on the same stack; nesting deeper than `MAX_NESTING` aborts with a
//! message. (A fault on the chunk this thread's own callback is rebuilding is caught before a
//! frame is entered, by the thread's callbacks in flight: `region::filling_chunk_here`. A frame
//! is not that: an outer frame may only be waiting for another thread's fill of the chunk, and
//! a signal handler run meanwhile may read that chunk too, and wait as well.)

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::sys::os;

/// Handler frames one thread may stack up (callbacks reading entries whose callbacks read...).
const MAX_NESTING: usize = 16;
/// Handler frames recorded at once, over all threads.
const FRAMES: usize = 256;

#[allow(clippy::declare_interior_mutable_const)] // the const only seeds the static arrays
const ZERO: AtomicUsize = AtomicUsize::new(0);
/// Thread id of the frame in each slot (0: free).
static FRAME_TID: [AtomicUsize; FRAMES] = [ZERO; FRAMES];

pub(super) struct Frame {
    slot: Option<usize>,
    /// Frames of this thread below this one.
    pub(super) outer: usize,
}

impl Frame {
    /// Records a handler frame of thread `tid`; aborts on nesting too deep.
    pub(super) fn enter(tid: usize) -> Frame {
        loop {
            // Only this thread writes slots holding its id, so this count is exact.
            let outer = FRAME_TID
                .iter()
                .filter(|t| t.load(Ordering::Acquire) == tid)
                .count();
            if outer >= MAX_NESTING {
                fatal(TOO_DEEP);
            }
            for (i, t) in FRAME_TID.iter().enumerate() {
                if t.load(Ordering::Relaxed) == 0
                    && t.compare_exchange(0, tid, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                {
                    return Frame {
                        slot: Some(i),
                        outer,
                    };
                }
            }
            if outer > 0 {
                // Table full: a nested frame must not wait; it goes on unrecorded.
                return Frame { slot: None, outer };
            }
            os::yield_now();
        }
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            FRAME_TID[i].store(0, Ordering::Release);
        }
    }
}

const SELF_READ: &str = "lazyfree: a regenerate callback of a SIGBUS-mode entry read the chunk it \
is rebuilding (it would call itself forever); aborting\n";
const TOO_DEEP: &str = "lazyfree: SIGBUS-mode regenerate callbacks nested more than 16 deep \
(callbacks reading entries whose callbacks read entries...); aborting\n";

/// Aborts with the self-read message: a callback read the chunk it is rebuilding.
pub(super) fn self_read() -> ! {
    fatal(SELF_READ)
}

fn fatal(msg: &str) -> ! {
    os::fatal(msg)
}
