//! SIGBUS mode for a shared cache: no fault thread in this process; a missing page raises SIGBUS
//! in the thread that touched it (`UFFD_FEATURE_SIGBUS`), and lazyfree's SIGBUS handler calls
//! [`serve_fault`] for addresses in this cache's mapping (`mode::foreign`). It serves the chunk
//! right there (`serve.rs` with `Ctx::Handler`), or, if another process or thread fills or
//! punches it, waits on the chunk's word (a futex shared by every process) and serves it then.
//! What a callback may do there is what [`Mode::Sigbus`](crate::Mode::Sigbus) says.

use std::sync::atomic::Ordering;

use super::serve::{claim, fill, Claim, Core, Ctx};
use super::state::{self, FILLING};
use crate::sys::{os, shm};

const SELF_READ: &str = "lazyfree: a shared cache's regenerate callback read the chunk it is \
rebuilding (its own output), which would wait for itself forever; aborting. A callback must not \
read its own entry's missing bytes\n";

/// The serving function registered with the handler; `ctx` is the cache's `Core`.
pub fn serve_fault(ctx: usize, addr: usize, scratch: &mut [u8]) -> bool {
    // SAFETY: `ctx` is the address of the Core the cache registered, alive while it is
    // registered (the cache retires the range and waits for handlers before freeing it).
    let core = unsafe { &*(ctx as *const Core) };
    if os::pid() != core.pid {
        // A forked child: the mapping is not inherited (MADV_DONTFORK) and the fd is the
        // parent's. Not ours.
        return false;
    }
    let Some(c) = core.file.chunk_at(addr) else {
        return false;
    };
    loop {
        match claim(core, c, scratch, Ctx::Handler) {
            Claim::Claimed => {
                fill(core, c, scratch, Ctx::Handler);
                return true;
            }
            Claim::Served => return true,
            Claim::Busy => {
                let w = &core.file.chunk_word(c).state;
                let st = w.load(Ordering::Acquire);
                if st == state::FAILED {
                    // Its zeros could not be installed (no memory): let the access retry a
                    // little later rather than spin.
                    os::sleep_ms(10);
                    return true;
                }
                if st & FILLING != 0
                    && state::owner(st) == Some(core.mark)
                    && core.fillers.of(c) == Some(os::gettid())
                {
                    os::fatal(SELF_READ);
                }
                shm::futex_wait(w, st, 10);
            }
        }
    }
}
