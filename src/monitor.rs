//! The monitor: one thread reading faults from a non-blocking userfaultfd, and a small worker
//! pool that serves them.
//!
//! The reader never runs callbacks: it polls the uffd and an eventfd (shutdown), reads up to 64
//! messages at a time, drops duplicates within the batch and queues page addresses. Workers pop
//! addresses and serve them (`fill::serve`). When every worker is busy, for instance blocked
//! because its callback reads another volatile entry that is missing too, a new worker is started
//! (up to `MAX_WORKERS`), so such a read never waits on the thread that caused it. Workers beyond
//! `MIN_WORKERS` exit after a few seconds idle.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_queue::SegQueue;

use crate::arena::Arena;
use crate::fill::{self, Scratch};
use crate::sys::mem::PAGE;
use crate::sys::os;
use crate::sys::uffd::{UffdMsg, UFFD_EVENT_PAGEFAULT};

const MIN_WORKERS: usize = 2;
const MAX_WORKERS: usize = 64;
const IDLE_EXIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct PoolState {
    /// Workers waiting for work and not yet claimed by a push.
    idle: usize,
    /// Wake-ups handed out by pushes and not yet taken.
    tokens: usize,
    total: usize,
}

struct Shared {
    arena: Arc<Arena>,
    queue: SegQueue<usize>,
    state: Mutex<PoolState>,
    cv: Condvar,
    stop: AtomicBool,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// (thread id, page) of each worker serving a fault now: a fault taken by a worker inside the
    /// chunk it is rebuilding is a callback reading its own output, which would never end.
    serving: Mutex<Vec<(u32, usize)>>,
}

pub(crate) struct Monitor {
    shared: Arc<Shared>,
    efd: OwnedFd,
    reader: Option<JoinHandle<()>>,
}

impl Monitor {
    pub(crate) fn start(arena: Arc<Arena>) -> std::io::Result<Monitor> {
        let efd = os::eventfd()?;
        let shared = Arc::new(Shared {
            arena,
            queue: SegQueue::new(),
            state: Mutex::new(PoolState::default()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            workers: Mutex::new(Vec::new()),
            serving: Mutex::new(Vec::new()),
        });
        {
            let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            for _ in 0..MIN_WORKERS {
                spawn_worker(&shared, &mut st)?;
            }
        }
        let efd_raw = std::os::fd::AsRawFd::as_raw_fd(&efd);
        let s = shared.clone();
        let reader = std::thread::Builder::new()
            .name("lazyfree-monitor".into())
            .spawn(move || read_loop(&s, efd_raw))?;
        Ok(Monitor {
            shared,
            efd,
            reader: Some(reader),
        })
    }

    /// Threads now serving faults (the reader not counted).
    pub(crate) fn workers(&self) -> usize {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .total
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        os::eventfd_signal(&self.efd);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.shared.cv.notify_all();
        let handles = std::mem::take(
            &mut *self
                .shared
                .workers
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for h in handles {
            let _ = h.join();
        }
    }
}

fn spawn_worker(shared: &Arc<Shared>, st: &mut PoolState) -> std::io::Result<()> {
    let s = shared.clone();
    let h = std::thread::Builder::new()
        .name("lazyfree-worker".into())
        .spawn(move || worker_loop(&s))?;
    st.total += 1;
    shared
        .workers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(h);
    Ok(())
}

fn push(shared: &Arc<Shared>, addr: usize) {
    shared.queue.push(addr);
    let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    if st.idle > 0 {
        st.idle -= 1;
        st.tokens += 1;
        shared.cv.notify_one();
    } else if st.total < MAX_WORKERS {
        // Every worker is busy (perhaps blocked in a nested fault): add one.
        let _ = spawn_worker(shared, &mut st);
    }
}

fn read_loop(shared: &Arc<Shared>, efd: i32) {
    let uffd = shared.arena.uffd();
    let mut msgs = [UffdMsg::default(); 64];
    let mut batch = [0usize; 64];
    loop {
        // Bounded wait: the eventfd stops the loop, the timeout is only a safety net.
        let (fault, stop) = os::poll2(uffd.raw(), efd, 1000).unwrap_or((false, true));
        if stop || shared.stop.load(Ordering::SeqCst) {
            break;
        }
        if !fault {
            continue;
        }
        let n = match uffd.read_msgs(&mut msgs) {
            Ok(n) => n,
            Err(_) => break, // the fd is gone
        };
        let mut len = 0;
        for m in &msgs[..n] {
            if m.event != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let page = m.pf_address as usize & !(PAGE - 1);
            check_self_read(shared, m.pf_ptid, page);
            if !batch[..len].contains(&page) {
                batch[len] = page;
                len += 1;
            }
        }
        for &page in &batch[..len] {
            push(shared, page);
        }
    }
}

/// Aborts with a message if `tid` is a worker faulting inside the chunk it is rebuilding: its
/// callback reads the bytes it is asked to produce, and every worker would end up waiting.
fn check_self_read(shared: &Shared, tid: u32, page: usize) {
    if tid == 0 {
        return; // the kernel did not report the thread (no UFFD_FEATURE_THREAD_ID)
    }
    let serving = shared.serving.lock().unwrap_or_else(|p| p.into_inner());
    let Some(&(_, busy)) = serving.iter().find(|(t, _)| *t == tid) else {
        return;
    };
    drop(serving);
    if fill::same_chunk(&shared.arena, busy, page) {
        eprintln!(
            "lazyfree: a regenerate callback read the chunk it is rebuilding (page {page:#x}): it \
             would wait for itself forever. A callback must not read its own entry's chunk. \
             Aborting."
        );
        std::process::abort();
    }
}

fn worker_loop(shared: &Arc<Shared>) {
    let mut scratch = Scratch::new();
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u32;
    loop {
        while let Some(addr) = shared.queue.pop() {
            let lock = || shared.serving.lock().unwrap_or_else(|p| p.into_inner());
            lock().push((tid, addr));
            fill::serve(&shared.arena, addr, &mut scratch, true);
            lock().retain(|&(t, _)| t != tid);
        }
        let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if !shared.queue.is_empty() {
            continue;
        }
        if shared.stop.load(Ordering::SeqCst) {
            st.total -= 1;
            return;
        }
        st.idle += 1;
        loop {
            let (g, to) = shared
                .cv
                .wait_timeout(st, IDLE_EXIT)
                .unwrap_or_else(|p| p.into_inner());
            st = g;
            if st.tokens > 0 {
                st.tokens -= 1;
                break;
            }
            if shared.stop.load(Ordering::SeqCst) || (to.timed_out() && st.total > MIN_WORKERS) {
                st.idle -= 1;
                st.total -= 1;
                return;
            }
        }
    }
}
