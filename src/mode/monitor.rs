//! The monitor: one thread reading faults from a non-blocking userfaultfd, a small worker pool
//! that serves them, and a watcher.
//!
//! The reader polls the uffd and an eventfd (shutdown), reads up to 64 messages at a time,
//! drops duplicates within the batch and queues page addresses, except the first fault of a
//! program's thread, which it serves itself (below). Workers pop addresses and serve them (`fault::serve`). A fault on a chunk another worker is filling costs
//! no worker: `serve` sees the chunk busy and returns at once, and the faulting thread sleeps in
//! the kernel until that fill wakes the chunk (one fill per chunk; see `chunk.rs`). So any
//! number of threads on one slow chunk hold one worker, and other entries are served meanwhile.
//!
//! When every worker is busy a new one is started, up to `MAX_WORKERS` for faults of the
//! program's threads. A fault taken *by a worker* (its callback reads another volatile entry,
//! whose callback may read a third...) is nested: that worker cannot go on without it, so it is
//! queued apart, served first, and gets a new worker whatever the cap, up to `NESTED_MAX`
//! threads in all; past that (or if no thread can be started) lazyfree aborts with a message
//! instead of hanging. Workers beyond `MIN_WORKERS` exit after a few seconds idle.
//!
//! Errors the reader cannot recover from (poll or read failing on the uffd) abort with a
//! message: going on would leave every fault unserved. A thread that keeps faulting on memory
//! no region owns (a C use after release) aborts the process with a message naming the address,
//! instead of being woken into the same fault forever: after 2 s of faults on the page with no
//! pause (stale messages, which a thread interrupted by signals in a fault leaves behind, one a
//! signal, come in a burst and are only woken).
//!
//! A worker that runs out of work while every other worker sleeps spins for up to `SPIN` before
//! it sleeps too, reading the uffd itself (non-blocking) as well as the queue, and yielding the
//! CPU between tries. A fault that follows soon, as when a thread reads lost pages one after
//! another, is then read and served by that worker at once: no wake-up of the reader, none of a
//! worker (waking a sleeping thread on another CPU is the dearest step of a fault on a VM; see
//! docs/BENCHMARKS.md). A push hands its page to the spinning worker; further pages wake or
//! start others as before, so a slow callback still does not hold up other entries.
//!
//! While a worker spins the reader stands down, so that a fault wakes no thread but the one
//! serving it. The reader's two states, by `reader_off_until` (a time, or 0):
//! - *reading*: it polls the uffd and the eventfd (`now >= reader_off_until`);
//! - *standing down*: it polls the eventfd alone, with a timeout that ends at
//!   `reader_off_until`, and is *reading* again then.
//!
//! Transitions, all stores by the spinning worker: a spin starts: `now + SPIN`; the spin found a
//! fault to serve: `now + HANDOFF`; the spin ended with nothing: 0. Each store is at most `SPIN`
//! ahead, so whatever the worker does next (a slow callback, a nested fault, being descheduled),
//! the reader reads the uffd again at most `SPIN` after the worker last spun, and a fault of
//! another thread waits `HANDOFF` at most before the reader hands it to another worker
//! (`tests/wakes.rs` blocks the callback of a fault a spinning worker took).
//! Measured on 4 MiB of random one-page faults (one after another from one thread, best of 15
//! rounds, medians of 6 interleaved runs of each build): 26.5 µs a fault before, 23.6 after;
//! futex calls a fault 1.3 -> 0.25 under strace.
//!
//! The first fault of a program's thread in the reader's batch is served by the reader itself
//! (the rest of the batch is queued for the workers first, so they serve it meanwhile: the
//! reader takes a batch, hands the rest on and serves, as a leader in a leader/follower pool
//! does), so that a lone fault costs two wake-ups (the reader's, by the kernel, and the
//! faulting thread's, by the copy) and not three (a worker's in between). After it the reader
//! reads the uffd without blocking for up to `SPIN` (`spin_serving`), serving the next
//! fault at once, as a spinning worker does. While the reader serves, nobody else reads the
//! uffd; a *watcher* thread guards that: its timer ticks every `WATCH_TICK` while a streak of
//! faults it serves lasts (armed at its start, disarmed at its end: two system calls a streak, none
//! a fault), and a tick that finds the reader serving one fault for longer than
//! `STAND_IN_AFTER` makes the watcher *stand in* (`stand_in`): it reads the uffd, queues what
//! it reads for the workers (nested faults first, new workers started as for the reader; it
//! serves nothing itself, so the uffd is never left unread) and does the reader's rounds
//! (late wakes at each poll; second advices and ends of lingering, which move it across the
//! CPUs, only after a poll that found nothing and at most every `STAND_IN_TOUR_EVERY`), until
//! the reader is back, however long the callback takes. Nested faults are always queued for the workers (urgent). The reader's third
//! state, by `reader_serving` (and `serving_since`):
//! - *serving*: it runs one fault's fill (registered in `serving`, so that a fault its callback
//!   takes is nested for the stand-in, and its own chunk read by its callback aborts as for a
//!   worker).
//!
//! Transitions: *reading* → *serving*: a round (or its spin after a serve) read a batch with a
//! fault of a program's thread; *serving* → *reading*: the serve returned (`Step::ReaderServed`:
//! `tests/wakes.rs` holds the reader there while faults come in). The watcher: *asleep* (its
//! timer disarmed, or ticking) → *standing in*: a tick found `reader_serving` set for
//! `STAND_IN_AFTER` or more; *standing in* → *asleep*: it sees `reader_serving` clear (it looks
//! at least every `STAND_IN_POLL_MAX_US`) or the monitor stopping. So a fault of another thread
//! waits `STAND_IN_AFTER` + `WATCH_TICK` at most for a reader while the reader serves.
//! Measured (one-page chunks, a 1 MiB entry read at random one page at a time, 4 × 256 faults,
//! p50 / p90, three interleaved runs of each build): faults 1 ms apart 53–61 / 87–101 µs before,
//! 38–40 / 47–51 after; faults one after another 29–45 / 35–85 µs before, 16–39 / 18–47 after.
//! Arming a one-shot timer around every serve instead cost about 12 µs a fault (each arm
//! reprograms the CPU's timer, an exit to the hypervisor here), and waking a worker to stand in
//! before every serve made lone faults slower than before (90–104 µs p50: that worker and the
//! woken faulting thread then compete for the two CPUs). Serving the first fault of a batch of
//! several too (not only a lone one) left two LZ4 threads rebuilding their own entries where
//! they were (one ÷ two threads 1.18, 1.16 before, 1.13, 1.20 after, interleaved runs of the
//! `two_threads` bench) with fewer workers started (4–5 → 3–4).
//!
//! The reader stays one thread, not a role passed from worker to worker as in a textbook
//! leader/follower pool: handing the role on means waking a follower at every fault, the very
//! wake-up the reader's own serving saves. It is handed on only when a serve is slow, to the
//! watcher, which is woken by its timer and not by each fault.
//!
//! Stray signals: a `ppoll` a signal interrupts returns as if timed out (each caller loops and
//! rechecks its deadlines: retrying with the whole timeout would never time out under signals
//! more frequent than it), the pool's condition variable and sleeps retry EINTR, and a fault
//! message repeated because its thread left the kernel's wait to run a handler finds its chunk
//! installed and only wakes it. `tests/signals.rs` sends signals without
//! `SA_RESTART` to every thread of the process while faults are served.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::{ArrayQueue, SegQueue};

use crate::arena::Arena;
use crate::fault::{self, readvise, Path, Scratch, Served};
use crate::hook::{self, Step};
use crate::region::{Failure, Linger, Region, RegionRef};
use crate::sys::mem::PAGE;
use crate::sys::os;
use crate::sys::uffd::{Uffd, UffdMsg, UFFD_EVENT_PAGEFAULT};

const MIN_WORKERS: usize = 2;
/// Workers serving faults of the program's own threads. Faults taken by workers (a callback
/// reading another entry: nested) always get a worker, beyond this cap, up to `NESTED_MAX`.
const MAX_WORKERS: usize = 64;
/// Workers in all, nested ones included: past it lazyfree aborts with a message rather than
/// leave a nested fault unserved (every worker blocked waiting for one more).
const NESTED_MAX: usize = 4096;
const IDLE_EXIT: Duration = Duration::from_secs(5);
/// How long a worker that ran out of work polls the uffd and the queue before it sleeps: a fault
/// that follows within it is served without a wake-up (on a VM, waking a sleeping thread on
/// another CPU costs tens of microseconds). Bounds the CPU time spent waiting after each fault.
const SPIN: Duration = Duration::from_micros(200);
/// How long the reader leaves the uffd to a worker that stopped spinning to serve a fault it
/// found: faults of other threads meanwhile wait this long at most before the reader reads them
/// and hands them to other workers (a serving thread still busy after it is replaced).
const HANDOFF: Duration = Duration::from_micros(100);

/// At most one worker spins at a time.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Spinner {
    #[default]
    None,
    /// Spinning, and no push has counted on it yet.
    Waiting,
    /// A push counted on it instead of a wake-up: it must look at the queue again.
    Claimed,
}

#[derive(Default)]
struct PoolState {
    /// Workers waiting for work and not yet claimed by a push.
    idle: usize,
    /// Wake-ups handed out by pushes and not yet taken.
    tokens: usize,
    /// The worker polling the uffd and the queue before it sleeps (see `SPIN`), if any.
    spinner: Spinner,
    total: usize,
}

/// A fault to serve: the page, and the thread that took it (0 if the kernel did not say).
type Fault = (usize, u32);

struct Shared {
    arena: Arc<Arena>,
    uffd: Arc<Uffd>,
    /// Faults of the program's threads.
    queue: SegQueue<Fault>,
    /// Faults of workers (callbacks reading other entries): served first, never left waiting
    /// for a worker, since the worker that took one cannot go on without it.
    urgent: SegQueue<Fault>,
    /// Faults recently found on memory no region owns: (thread, page).
    unowned: Mutex<Vec<Unowned>>,
    state: Mutex<PoolState>,
    cv: Condvar,
    stop: AtomicBool,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// (thread id, page) of each worker serving a fault now (the page of the fault, then of each
    /// chunk it fills ahead: `Path::filling_ahead`): a fault taken by a worker inside the chunk
    /// it is rebuilding is a callback reading its own output, which would never end.
    serving: Mutex<Vec<(u32, usize)>>,
    /// Regions newly lingering after their last unpin (their bases), for the reader, which
    /// moves them to `lingering`; an unpin that finds it full makes its pages volatile at once.
    linger_inbox: ArrayQueue<usize>,
    /// The lingering regions the reader ends once their delay is over (`end_lingering`).
    lingering: Mutex<Vec<usize>>,
    /// Faults whose threads a worker filling ahead has not woken yet: (ticket, start, bytes,
    /// when the reader wakes them itself). See `Path::wake_later`.
    wake_later: Mutex<Vec<(u64, usize, usize, u64)>>,
    tickets: AtomicU64,
    /// The monitor's eventfd (owned by `Monitor`, which outlives every thread using this).
    nudge_fd: i32,
    /// Until when (`os::now_ns`) the reader leaves the uffd to a spinning worker; 0: it reads.
    reader_off_until: AtomicU64,
    /// The reader is serving a fault itself (`serve_inline`); the watcher stands in for
    /// it on the uffd if that takes longer than `STAND_IN_AFTER` (`stand_in`).
    reader_serving: AtomicBool,
    /// When (`os::now_ns`) the reader started serving its last fault.
    serving_since: AtomicU64,
    /// The watcher's timer (owned by `Monitor`), ticking while the reader serves faults.
    timer_fd: i32,
}

pub(crate) struct Monitor {
    shared: Arc<Shared>,
    efd: OwnedFd,
    timer: OwnedFd,
    reader: Option<JoinHandle<()>>,
    watcher: Option<JoinHandle<()>>,
}

impl Monitor {
    pub(crate) fn start(arena: Arc<Arena>, uffd: Arc<Uffd>) -> std::io::Result<Monitor> {
        let efd = os::eventfd()?;
        let timer = os::timerfd()?;
        let shared = Arc::new(Shared {
            arena,
            uffd,
            queue: SegQueue::new(),
            urgent: SegQueue::new(),
            unowned: Mutex::new(Vec::new()),
            state: Mutex::new(PoolState::default()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            workers: Mutex::new(Vec::new()),
            serving: Mutex::new(Vec::new()),
            linger_inbox: ArrayQueue::new(LINGER_INBOX),
            lingering: Mutex::new(Vec::new()),
            wake_later: Mutex::new(Vec::new()),
            tickets: AtomicU64::new(1),
            nudge_fd: std::os::fd::AsRawFd::as_raw_fd(&efd),
            reader_off_until: AtomicU64::new(0),
            reader_serving: AtomicBool::new(false),
            serving_since: AtomicU64::new(0),
            timer_fd: std::os::fd::AsRawFd::as_raw_fd(&timer),
        });
        {
            let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            for _ in 0..MIN_WORKERS {
                spawn_worker(&shared, &mut st)?;
            }
        }
        let efd_raw = std::os::fd::AsRawFd::as_raw_fd(&efd);
        let s = shared.clone();
        let watcher = std::thread::Builder::new()
            .name("lazyfree-watch".into())
            .spawn(move || watch_loop(&s))?;
        let s = shared.clone();
        let reader = match std::thread::Builder::new()
            .name("lazyfree-monitor".into())
            .spawn(move || read_loop(&s, efd_raw))
        {
            Ok(r) => r,
            Err(e) => {
                shared.stop.store(true, Ordering::SeqCst);
                os::timerfd_arm(shared.timer_fd, 1, 0);
                let _ = watcher.join();
                return Err(e);
            }
        };
        Ok(Monitor {
            shared,
            efd,
            timer,
            reader: Some(reader),
            watcher: Some(watcher),
        })
    }

    /// Queues the region at `base`, lingering after its last unpin, for the reader to end once
    /// its delay is over (see `Region::unpin_with`); false if the inbox is full (the unpin then
    /// makes the pages volatile at once). Wakes the reader if the inbox was empty, so that its
    /// poll timeout shrinks to `LINGER_POLL_MS`.
    pub(crate) fn linger(&self, base: usize) -> bool {
        let was_empty = self.shared.linger_inbox.is_empty();
        if self.shared.linger_inbox.push(base).is_err() {
            return false;
        }
        if was_empty {
            os::eventfd_signal(&self.efd);
        }
        true
    }

    /// Ends every lingering unpin now, due or not (waiting for pins and unpins in progress),
    /// advising each region from every CPU (`testing::reclaim`: as if its delay and its later
    /// advices were over).
    pub(crate) fn end_lingering_now(&self) {
        let mut bases = std::mem::take(&mut *lock(&self.shared.lingering));
        while let Some(b) = self.shared.linger_inbox.pop() {
            bases.push(b);
        }
        // (Not under the list's lock: the reader takes it, and a pin waited for here may need
        // the reader to serve its faults.)
        let mut ended = Vec::new();
        for base in bases {
            if let Some(r) = self.shared.arena.slot(base).and_then(RegionRef::from_slot) {
                if r.base() == base {
                    r.check_linger(0, true, |r| ended.push(r.base()));
                }
            }
        }
        readvise::lingers_ended(&self.shared.arena, &ended);
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
        if self.shared.arena.forked() {
            // A forked child's copy: the threads are the parent's (not in this process: joining
            // them would wait forever) and the eventfd is shared with the parent (a stop signal
            // would stop the parent's monitor). Closing this process's copies is all there is.
            return;
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        os::eventfd_signal(&self.efd);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        // The watcher sleeps on its timer: fired now, it sees `stop`.
        os::timerfd_arm(std::os::fd::AsRawFd::as_raw_fd(&self.timer), 1, 0);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        // A push that starts a worker (a spinning worker may push until it sees `stop`) does so
        // under the state lock and only while `stop` is unset: after this lock is taken once,
        // every worker there will be has its handle in `workers`.
        drop(self.shared.state.lock().unwrap_or_else(|p| p.into_inner()));
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

fn push(shared: &Arc<Shared>, fault: Fault, nested: bool) {
    if nested {
        shared.urgent.push(fault);
    } else {
        shared.queue.push(fault);
    }
    let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    if st.spinner == Spinner::Waiting {
        // The spinning worker takes the page without a wake-up; only one page, so that the
        // next goes to another worker as before.
        st.spinner = Spinner::Claimed;
    } else if st.idle > 0 {
        st.idle -= 1;
        st.tokens += 1;
        shared.cv.notify_one();
    } else if shared.stop.load(Ordering::SeqCst) {
        // Shutting down: no new workers.
    } else if st.total < MAX_WORKERS {
        // Every worker is busy (perhaps blocked in a nested fault): add one.
        let _ = spawn_worker(shared, &mut st);
    } else if nested {
        // A worker's callback waits for this fault: without a new worker it may wait forever
        // (every worker blocked the same way), so the cap does not apply.
        let res = if st.total < NESTED_MAX {
            spawn_worker(shared, &mut st).map_err(|e| e.to_string())
        } else {
            Err(format!("{NESTED_MAX} workers are running"))
        };
        if let Err(why) = res {
            fatal(&format!(
                "lazyfree: cannot start a worker for a nested fault (a regenerate callback \
                 reading another volatile entry): {why}. Serving it is impossible and waiting \
                 would hang every worker; aborting."
            ));
        }
    }
}

/// Writes a message to stderr and aborts: for states where going on would hang or serve wrong
/// bytes.
fn fatal(msg: &str) -> ! {
    os::fatal(&format!("{msg}\n"))
}

/// How a monitor worker serves faults: it may allocate (a failure's message is formatted into
/// `Entry::last_error`), and a fault on a chunk another worker fills costs nothing (the faulting
/// thread sleeps in the kernel until that fill wakes the chunk). The second field is the
/// serving thread's id (its entry in `Shared::serving`).
struct Worker<'a>(&'a Shared, u32);

impl Path for Worker<'_> {
    fn keep_failure(&self, r: &Region, f: Failure) {
        r.record_failure(f.to_string());
    }

    /// The thread's entry in `serving` names the chunk filled ahead from now on: the chunk of
    /// the fault it served is released and filled, and its callback now rebuilds this one.
    fn filling_ahead(&self, start: usize) {
        let mut serving = lock(&self.0.serving);
        if let Some(s) = serving.iter_mut().find(|(t, _)| *t == self.1) {
            s.1 = start;
        }
    }

    fn busy(&self, _r: &Region, _c: usize) {}

    /// Only while fewer than half of `MAX_WORKERS` are busy: a callback ahead may block for
    /// good, and the workers it holds must leave room for the faults of the program's threads
    /// (with every worker stuck in a fill ahead, their own faults would wait with no worker).
    fn fills_ahead(&self) -> bool {
        let st = lock(&self.0.state);
        st.total - st.idle < MAX_WORKERS / 2
    }

    fn wake_later(&self, start: usize, bytes: usize) -> u64 {
        let ticket = self.0.tickets.fetch_add(1, Ordering::Relaxed);
        let mut l = lock(&self.0.wake_later);
        let was_empty = l.is_empty();
        l.push((ticket, start, bytes, os::now_ns() + AHEAD_WAKE_NS));
        drop(l);
        if was_empty {
            // The reader may be in a long poll: shorten it (`wake_due`).
            os::eventfd_signal_raw(self.0.nudge_fd);
        }
        ticket
    }

    fn woken(&self, ticket: u64) {
        lock(&self.0.wake_later).retain(|w| w.0 != ticket);
    }
}

fn read_loop(shared: &Arc<Shared>, efd: i32) {
    let uffd = &shared.uffd;
    let mut msgs = [UffdMsg::default(); 64];
    let mut batch = [((0usize, 0u32), false); 64];
    let mut scratch = Scratch::new();
    let tid = os::gettid();
    loop {
        // Bounded wait: the eventfd stops the loop, the timeout is only a safety net. poll2
        // retries EINTR; any other error would leave every fault unserved from now on.
        // Chunks waiting for their second advice (`fault::readvise::due`) shorten the wait.
        let pending = readvise::due(&shared.arena, 64, readvise::Runner::Ours);
        let lingering = end_lingering(shared);
        let waking = wake_due(shared);
        let mut timeout_us = if waking {
            AHEAD_WAKE_NS / 1000
        } else if lingering {
            LINGER_POLL_MS * 1000
        } else if pending {
            20_000
        } else {
            1_000_000
        };
        // While a worker spins on the uffd (see `spin`) it reads the faults: this thread is not
        // woken by each of them, only when the spin is over (or a fault keeps it too long).
        let now = os::now_ns();
        let off = shared.reader_off_until.load(Ordering::Acquire);
        let mut fd = uffd.raw();
        if off > now {
            fd = -1;
            timeout_us = timeout_us.min((off - now).div_ceil(1000));
        }
        let (fault, stop) = match os::poll2(fd, efd, timeout_us) {
            Ok(r) => r,
            Err(e) => fatal(&format!(
                "lazyfree: the monitor cannot poll its userfaultfd ({e}); faults would go \
                 unserved. Aborting."
            )),
        };
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        if stop {
            // Not a stop: an unpin woke the reader to shorten its wait (`Monitor::linger`).
            os::eventfd_drain(efd);
        }
        if !fault {
            continue;
        }
        let n = match read_batch(shared, &mut msgs, &mut batch) {
            Ok(n) => n,
            // The fd lives as long as the arena, which outlives this thread: not a shutdown.
            Err(e) => fatal(&format!(
                "lazyfree: the monitor cannot read its userfaultfd ({e}); faults would go \
                 unserved. Aborting."
            )),
        };
        if ours(shared, &batch[..n]).is_some() {
            // A streak of faults served here starts: the watcher's timer ticks until it
            // ends (two system calls a streak, none a fault).
            let tick = WATCH_TICK.as_nanos() as u64;
            os::timerfd_arm(shared.timer_fd, STAND_IN_AFTER.as_nanos() as u64, tick);
            dispatch(shared, &batch[..n], tid, &mut scratch);
            spin_serving(shared, &mut msgs, &mut batch, tid, &mut scratch);
            os::timerfd_arm(shared.timer_fd, 0, 0);
        } else {
            dispatch(shared, &batch[..n], tid, &mut scratch);
        }
    }
}

/// The reader's share of a batch it read: the first fault of a program's thread in it is served
/// here (true), one wake-up fewer than handing it to a worker; the watcher stands in if it takes
/// long. The rest is queued for the workers first, so that they serve it meanwhile.
fn dispatch(
    shared: &Arc<Shared>,
    batch: &[(Fault, bool)],
    tid: u32,
    scratch: &mut Scratch,
) -> bool {
    let own = ours(shared, batch);
    for (i, &(fault, nested)) in batch.iter().enumerate() {
        if Some(i) != own {
            push(shared, fault, nested);
        }
    }
    match own {
        Some(i) => {
            serve_inline(shared, batch[i].0, tid, scratch);
            true
        }
        None => false,
    }
}

/// Which fault of the batch the reader serves itself: the first of a program's thread (not
/// nested: a worker waits for that one, and it goes to the urgent queue), unless the monitor
/// is stopping.
fn ours(shared: &Shared, batch: &[(Fault, bool)]) -> Option<usize> {
    if shared.stop.load(Ordering::SeqCst) {
        return None;
    }
    batch.iter().position(|&(_, nested)| !nested)
}

/// After the reader served a fault: it reads the uffd without blocking (yielding the CPU
/// between tries) for up to `SPIN` after the last fault it served, as a worker that ran out of
/// work does, so that the next fault of a thread reading lost pages one after another is read
/// at once, without a wake-up of the reader. Its rounds run meanwhile at most `ROUND_EVERY`
/// apart.
fn spin_serving(
    shared: &Arc<Shared>,
    msgs: &mut [UffdMsg; 64],
    batch: &mut [(Fault, bool); 64],
    tid: u32,
    scratch: &mut Scratch,
) {
    const ROUND_EVERY: Duration = Duration::from_millis(1);
    let mut last = std::time::Instant::now();
    let mut round = last;
    while last.elapsed() < SPIN && !shared.stop.load(Ordering::Relaxed) {
        match read_batch(shared, msgs, batch) {
            Ok(0) => os::yield_now(),
            Ok(n) => {
                if dispatch(shared, &batch[..n], tid, scratch) {
                    last = std::time::Instant::now();
                }
            }
            Err(e) => fatal(&format!(
                "lazyfree: the monitor cannot read its userfaultfd ({e}); faults would go \
                 unserved. Aborting."
            )),
        }
        if round.elapsed() >= ROUND_EVERY {
            readvise::due(&shared.arena, 64, readvise::Runner::Ours);
            end_lingering(shared);
            wake_due(shared);
            round = std::time::Instant::now();
        }
    }
}

/// How long the reader may serve a fault before the watcher stands in for it on the uffd
/// (seen at the watcher's next tick: `STAND_IN_AFTER` + `WATCH_TICK` at most).
const STAND_IN_AFTER: Duration = HANDOFF;
/// How often the watcher looks at the reader while a streak of faults the reader serves lasts.
const WATCH_TICK: Duration = Duration::from_millis(1);

/// The reader serves `fault` as a worker would (registered in `serving`, so that a fault its
/// callback takes is nested for the stand-in), with the watcher's timer armed meanwhile.
fn serve_inline(shared: &Shared, fault: Fault, tid: u32, scratch: &mut Scratch) {
    lock(&shared.serving).push((tid, fault.0));
    shared.serving_since.store(os::now_ns(), Ordering::SeqCst);
    shared.reader_serving.store(true, Ordering::SeqCst);
    let served = fault::serve(
        &shared.arena,
        &shared.uffd,
        fault.0,
        scratch,
        &Worker(shared, tid),
    );
    shared.reader_serving.store(false, Ordering::SeqCst);
    hook::step(Step::ReaderServed, fault.0);
    lock(&shared.serving).retain(|&(t, _)| t != tid);
    scratch.after_fill();
    if served == Served::Unowned {
        unowned(shared, fault);
    }
}

/// The watcher: sleeps on its timer, which ticks while the reader serves faults; at a tick
/// that finds the reader serving one fault for longer than `STAND_IN_AFTER`, stands in for it
/// (`stand_in`).
fn watch_loop(shared: &Arc<Shared>) {
    loop {
        let fired = match os::poll2(shared.timer_fd, -1, 1_000_000) {
            Ok((fired, _)) => fired,
            Err(e) => fatal(&format!(
                "lazyfree: the monitor's watcher cannot poll its timer ({e}); a slow callback \
                 could leave faults unserved. Aborting."
            )),
        };
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        if fired {
            os::timerfd_clear(shared.timer_fd);
            let since = shared.serving_since.load(Ordering::SeqCst);
            if shared.reader_serving.load(Ordering::SeqCst)
                && os::now_ns().saturating_sub(since) >= STAND_IN_AFTER.as_nanos() as u64
            {
                stand_in(shared);
            }
        }
    }
}

/// The longest the standing-in watcher polls the uffd before it looks whether the reader is back
/// (and does the reader's rounds: second advices, ends of lingering, late wakes): it starts at
/// `STAND_IN_POLL_MIN_US` and doubles.
const STAND_IN_POLL_MAX_US: u64 = AHEAD_WAKE_NS / 1000;
const STAND_IN_POLL_MIN_US: u64 = 100;
/// How often the standing-in watcher does the reader's rounds that move it across the CPUs.
const STAND_IN_TOUR_EVERY: Duration = Duration::from_millis(LINGER_POLL_MS);

/// Times the watcher stood in for the reader (`testing::monitor_stand_ins`).
pub(crate) static STAND_INS: AtomicU64 = AtomicU64::new(0);

/// The watcher reads the uffd for the reader while the reader serves a fault, however long
/// that takes (a slow callback, one that never returns, a nested fault), and does the reader's
/// rounds meanwhile. The faults it reads are queued for the workers (started if none is idle),
/// nested ones first, exactly as the reader queues them: it serves none itself, so that the uffd
/// is never left unread.
fn stand_in(shared: &Arc<Shared>) {
    STAND_INS.fetch_add(1, Ordering::Relaxed);
    let mut msgs = [UffdMsg::default(); 64];
    let mut batch = [((0usize, 0u32), false); 64];
    let mut timeout_us = STAND_IN_POLL_MIN_US;
    let mut toured: Option<std::time::Instant> = None;
    while shared.reader_serving.load(Ordering::SeqCst) && !shared.stop.load(Ordering::SeqCst) {
        wake_due(shared);
        match os::poll2(shared.uffd.raw(), -1, timeout_us) {
            Ok((true, _)) => {
                if let Err(e) = read_and_queue(shared, &mut msgs, &mut batch) {
                    fatal(&format!(
                        "lazyfree: the monitor cannot read its userfaultfd ({e}); faults would \
                         go unserved. Aborting."
                    ));
                }
            }
            Ok(_) => {
                timeout_us = (timeout_us * 2).min(STAND_IN_POLL_MAX_US);
                // The rounds that move this thread across the CPUs (later advices, ends of
                // lingering), while it alone reads the uffd: only when nothing was waiting,
                // and at most every `STAND_IN_TOUR_EVERY`.
                if toured.map_or(true, |t| t.elapsed() >= STAND_IN_TOUR_EVERY) {
                    readvise::due(&shared.arena, 64, readvise::Runner::Ours);
                    end_lingering(shared);
                    toured = Some(std::time::Instant::now());
                }
            }
            Err(e) => fatal(&format!(
                "lazyfree: the monitor cannot poll its userfaultfd ({e}); faults would go \
                 unserved. Aborting."
            )),
        }
    }
}

/// How long a worker filling ahead may hold the thread of the fault it served before the reader
/// wakes it (`Path::wake_later`).
const AHEAD_WAKE_NS: u64 = 2_000_000;

/// Wakes the faults whose fills ahead took longer than `AHEAD_WAKE_NS`. Returns whether some
/// are still waiting.
fn wake_due(shared: &Shared) -> bool {
    let now = os::now_ns();
    let mut l = lock(&shared.wake_later);
    l.retain(|&(_, start, bytes, due)| {
        if due > now {
            return true;
        }
        // Harmless if the worker wakes it too: the chunk is installed.
        shared.uffd.wake(start, bytes);
        false
    });
    !l.is_empty()
}

/// Regions that may start lingering between two rounds of the reader (`Monitor::linger`).
const LINGER_INBOX: usize = 4096;
/// The reader's poll timeout while regions linger: an unpin's delay ends at most this late.
const LINGER_POLL_MS: u64 = 10;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The reader's round over the lingering regions: ends those whose delay is over. Returns
/// whether regions still linger. Never waits for a region (see `Region::check_linger`).
fn end_lingering(shared: &Shared) -> bool {
    hook::step(Step::LingerRound, 0);
    let now = os::now_ns();
    let mut ended = Vec::new();
    let mut list = lock(&shared.lingering);
    while let Some(b) = shared.linger_inbox.pop() {
        list.push(b);
    }
    list.retain(|&base| {
        match shared.arena.slot(base).and_then(RegionRef::from_slot) {
            // A new region may hold `base` since: it keeps its own place in the list.
            Some(r) if r.base() == base => {
                r.check_linger(now, false, |r| ended.push(r.base())) != Linger::Done
            }
            // Gone (or being dropped): nothing to end.
            _ => false,
        }
    });
    // Advised after the pin locks (a pin that came first closed the gate: its pages are
    // skipped) but under the list's: `end_lingering_now` waits for it, so a region it no
    // longer finds lingering has been advised.
    readvise::lingers_ended(&shared.arena, &ended);
    !list.is_empty()
}

/// Reads the fault messages waiting on the uffd (without blocking) and queues their pages,
/// duplicates within the batch dropped. Returns how many pages were queued.
fn read_and_queue(
    shared: &Arc<Shared>,
    msgs: &mut [UffdMsg; 64],
    batch: &mut [(Fault, bool); 64],
) -> std::io::Result<usize> {
    let len = read_batch(shared, msgs, batch)?;
    for &(fault, nested) in &batch[..len] {
        push(shared, fault, nested);
    }
    Ok(len)
}

/// Reads the fault messages waiting on the uffd (without blocking) into `batch`: their pages,
/// duplicates dropped, each with whether it is nested (taken by a thread serving a fault).
/// Returns how many.
fn read_batch(
    shared: &Shared,
    msgs: &mut [UffdMsg; 64],
    batch: &mut [(Fault, bool); 64],
) -> std::io::Result<usize> {
    let n = shared.uffd.read_msgs(msgs)?;
    let mut len = 0;
    for m in &msgs[..n] {
        if m.event != UFFD_EVENT_PAGEFAULT {
            continue;
        }
        let page = m.pf_address as usize & !(PAGE - 1);
        let nested = check_self_read(shared, m.pf_ptid, page);
        // Several threads on one page: one message serves them all (a fill wakes the chunk).
        if !batch[..len].iter().any(|((p, _), _)| *p == page) {
            batch[len] = ((page, m.pf_ptid), nested);
            len += 1;
        } else if nested {
            if let Some(b) = batch[..len].iter_mut().find(|((p, _), _)| *p == page) {
                b.1 = true;
            }
        }
    }
    Ok(len)
}

/// Whether `tid` is a worker serving a fault (its callback reads another entry: a nested fault).
/// Aborts with a message if that worker faults inside the chunk it is rebuilding: its callback
/// reads the bytes it is asked to produce, which would wait for itself forever.
fn check_self_read(shared: &Shared, tid: u32, page: usize) -> bool {
    if tid == 0 {
        return false; // the kernel did not report the thread (no UFFD_FEATURE_THREAD_ID)
    }
    // A pinning thread's own rebuild (its callback runs in that thread, outside the workers).
    if fault::pin_filling(tid, || Some(fault::chunk_of(&shared.arena, page)?.0)) {
        fatal(&format!(
            "lazyfree: a regenerate callback read the chunk it is rebuilding for a pin (page \
             {page:#x}): it would wait for itself forever. A callback must not read its own \
             entry's chunk. Aborting."
        ));
    }
    let serving = shared.serving.lock().unwrap_or_else(|p| p.into_inner());
    let Some(&(_, busy)) = serving.iter().find(|(t, _)| *t == tid) else {
        return false;
    };
    drop(serving);
    let chunk = |a| fault::chunk_of(&shared.arena, a).map(|(start, _)| start);
    if chunk(busy).is_some() && chunk(busy) == chunk(page) {
        fatal(&format!(
            "lazyfree: a regenerate callback read the chunk it is rebuilding (page {page:#x}): it \
             would wait for itself forever. A callback must not read its own entry's chunk. \
             Aborting."
        ));
    }
    true
}

/// A streak of faults of one thread on one page no live region owns (see [`unowned`]).
struct Unowned {
    tid: u32,
    page: usize,
    first: Instant,
    last: Instant,
    faults: u32,
}

/// A pause this long between two faults of a streak ends it.
const STREAK_GAP: Duration = Duration::from_millis(500);
/// A streak this long, of at least `STREAK_FAULTS` faults, is a thread stuck on the page.
const STREAK_TIME: Duration = Duration::from_secs(2);
const STREAK_FAULTS: u32 = 32;

/// A fault on memory no live region owns, its thread woken. Stale messages come in a burst: a
/// thread whose fault was interrupted by signals faulted again after each (one message each),
/// and its region may be gone before the last of them is served. A thread that touches memory
/// no entry owns (a use after release, in C) faults again at once after every wake, forever:
/// a streak of faults on the page with no pause of `STREAK_GAP`, lasting `STREAK_TIME`, means
/// that. Waking it again would only make it fault again, so abort with a message saying where.
fn unowned(shared: &Shared, (page, tid): Fault) {
    let mut seen = shared.unowned.lock().unwrap_or_else(|p| p.into_inner());
    if stuck(&mut seen, tid, page, Instant::now()) {
        drop(seen);
        fatal(&format!(
            "lazyfree: thread {tid} keeps touching address {page:#x}, inside lazyfree's memory \
             but owned by no live entry (a use after release or remove: in C, an lf_entry_data \
             pointer used after its lf_entry_release). Aborting."
        ));
    }
}

/// Records a fault of `tid` on `page`, which no live region owns, at `now`: whether it ends a
/// streak that means the thread is stuck there (see [`unowned`]).
fn stuck(seen: &mut Vec<Unowned>, tid: u32, page: usize, now: Instant) -> bool {
    seen.retain(|u| now.duration_since(u.last) < STREAK_GAP);
    if let Some(u) = seen.iter_mut().find(|u| u.tid == tid && u.page == page) {
        u.last = now;
        u.faults = u.faults.saturating_add(1);
        return u.faults >= STREAK_FAULTS && now.duration_since(u.first) >= STREAK_TIME;
    }
    if seen.len() >= 64 {
        seen.remove(0);
    }
    seen.push(Unowned {
        tid,
        page,
        first: now,
        last: now,
        faults: 1,
    });
    false
}

fn worker_loop(shared: &Arc<Shared>) {
    let mut scratch = Scratch::new();
    let tid = os::gettid();
    loop {
        while let Some(fault) = shared.urgent.pop().or_else(|| shared.queue.pop()) {
            let lock = || shared.serving.lock().unwrap_or_else(|p| p.into_inner());
            lock().push((tid, fault.0));
            let served = fault::serve(
                &shared.arena,
                &shared.uffd,
                fault.0,
                &mut scratch,
                &Worker(shared, tid),
            );
            lock().retain(|&(t, _)| t != tid);
            scratch.after_fill();
            if served == Served::Unowned {
                unowned(shared, fault);
            }
        }
        if spin(shared) {
            continue;
        }
        // Out of work: the copy in scratch goes where the kernel may take it.
        scratch.forget_contents();
        let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if !shared.queue.is_empty() || !shared.urgent.is_empty() {
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

/// Polls the queue, and the uffd itself (so that a fault needs neither the reader's nor this
/// worker's wake-up), for up to `SPIN`; true if work came.
fn spin(shared: &Arc<Shared>) -> bool {
    let state = || shared.state.lock().unwrap_or_else(|p| p.into_inner());
    {
        let mut st = state();
        // Only a lone worker spins: while another serves a fault, the CPUs are better left to
        // it and to the program's threads (two threads rebuilding at once on two CPUs ran
        // slower with every idle worker spinning).
        if st.spinner != Spinner::None || st.idle + 1 != st.total {
            return false;
        }
        st.spinner = Spinner::Waiting;
    }
    let t0 = std::time::Instant::now();
    // The reader stands down for the spin (it would be woken by every fault for nothing).
    let off = |d: Duration| {
        let until = os::now_ns() + d.as_nanos() as u64;
        shared.reader_off_until.store(until, Ordering::Release);
    };
    off(SPIN);
    let mut msgs = [UffdMsg::default(); 64];
    let mut batch = [((0usize, 0u32), false); 64];
    let found = loop {
        if !shared.queue.is_empty() || !shared.urgent.is_empty() {
            break true;
        }
        // Errors (the fd gone at shutdown) are the reader's to see; the stop flag ends this.
        if matches!(read_and_queue(shared, &mut msgs, &mut batch), Ok(n) if n > 0) {
            break true;
        }
        if t0.elapsed() >= SPIN || shared.stop.load(Ordering::Relaxed) {
            break false;
        }
        // Give way to any thread runnable on this CPU (the program's, another worker).
        os::yield_now();
    };
    // Serving what it found, this worker comes back to spin within `HANDOFF` if the fault is
    // quick; if not (a slow callback, a nested fault), the reader reads again by then.
    if found {
        off(HANDOFF);
    } else {
        shared.reader_off_until.store(0, Ordering::Release);
    }
    // Stop spinning; a push that counted on this worker means work. Either way the caller
    // checks the queue (under the lock) before it sleeps, so no page is left behind.
    let mut st = state();
    let claimed = st.spinner == Spinner::Claimed;
    st.spinner = Spinner::None;
    found || claimed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stale fault messages (a burst, however many) are not a stuck thread; a thread faulting on
    /// the page with no pause for `STREAK_TIME` is; a pause ends a streak.
    #[test]
    fn only_a_streak_without_pause_is_a_stuck_thread() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // A burst of 500 stale messages within 300 ms: never stuck.
        let mut seen = Vec::new();
        assert!((0..500).all(|i| !stuck(&mut seen, 7, 0x1000, ms(i * 300 / 500))));
        // Bursts 650 ms apart for 10 s: each pause ends the streak.
        let mut seen = Vec::new();
        for b in 0..16 {
            assert!((0..50).all(|i| !stuck(&mut seen, 7, 0x1000, ms(b * 650 + i))));
        }
        // Faults every millisecond: stuck once 2 s have passed, not before; another thread, and
        // another page, faulting alongside from later on have streaks of their own.
        let mut seen = Vec::new();
        for i in 0..2000 {
            assert!(!stuck(&mut seen, 7, 0x1000, ms(i)));
            if i >= 1000 {
                assert!(!stuck(&mut seen, 8, 0x1000, ms(i)));
                assert!(!stuck(&mut seen, 7, 0x2000, ms(i)));
            }
        }
        assert!(stuck(&mut seen, 7, 0x1000, ms(2000)));
        assert!(!stuck(&mut seen, 8, 0x1000, ms(2000)));
    }
}
