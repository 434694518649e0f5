//! The handler's frames: how deep this thread's handler frames are nested (a thread-local
//! count). A nested fault runs the handler again on the same stack; nesting deeper than
//! `MAX_NESTING` aborts with a message. (A fault on the chunk this thread's own callback is
//! rebuilding is caught before a frame is entered, by the thread's callbacks in flight:
//! `region::filling_chunk_here`. A frame is not that: an outer frame may only be waiting for
//! another thread's fill of the chunk, and a signal handler run meanwhile may read that chunk
//! too, and wait as well.)

use std::cell::Cell;

use crate::sys::os;

/// Handler frames one thread may stack up (callbacks reading entries whose callbacks read...).
const MAX_NESTING: usize = 16;

thread_local! {
    /// This thread's handler frames now. A const-initialized plain cell: safe in the handler
    /// (no allocation, no destructor); a signal arriving between its read and its write runs
    /// its own frames to the end first, leaving it as it found it.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

pub(super) struct Frame {
    /// Frames of this thread below this one.
    pub(super) outer: usize,
}

impl Frame {
    /// Records a handler frame of this thread; aborts on nesting too deep.
    pub(super) fn enter() -> Frame {
        let outer = DEPTH.get();
        if outer >= MAX_NESTING {
            fatal(TOO_DEEP);
        }
        DEPTH.set(outer + 1);
        Frame { outer }
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        DEPTH.set(self.outer);
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
