//! Small process-level calls: eventfd, poll, sleeping, thread ids, CPUs, the process id, and a
//! fatal message. Nothing here allocates (the SIGBUS handler uses most of it).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A non-blocking eventfd used to stop a poll loop.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory arguments.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A monotonic timer whose fd polls readable when it fires (non-blocking,
/// close-on-exec).
pub fn timerfd() -> io::Result<OwnedFd> {
    // SAFETY: timerfd_create has no memory arguments.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Arms the timer `fd` to fire `first_ns` nanoseconds from now and then every `every_ns` (0:
/// once), or disarms it with `first_ns` 0. Clears firings not yet read.
pub fn timerfd_arm(fd: RawFd, first_ns: u64, every_ns: u64) {
    let ts = |ns: u64| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    let spec = libc::itimerspec {
        it_interval: ts(every_ns),
        it_value: ts(first_ns),
    };
    // SAFETY: `spec` is a valid itimerspec; no old value is asked for.
    unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) };
}

/// Reads (clears) the firings of the timer `fd`, if any.
pub fn timerfd_clear(fd: RawFd) {
    let mut n: u64 = 0;
    // SAFETY: reads 8 bytes into a valid u64; the fd is non-blocking.
    unsafe { libc::read(fd, (&mut n as *mut u64).cast(), 8) };
}

pub fn eventfd_signal(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Like [`eventfd_signal`], by raw fd (kept valid by its owner).
pub fn eventfd_signal_raw(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Empties an eventfd's counter (nonblocking: nothing if it is zero).
pub fn eventfd_drain(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a valid u64.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

/// Polls two fds for input for up to `timeout_us` microseconds; returns (first readable, second
/// readable). A negative fd is not polled (never readable). A signal that interrupts the wait
/// ends it as a timeout would (neither readable): retrying with the whole timeout again would,
/// under signals more frequent than the timeout, never time out (every caller loops, and
/// rechecks its deadlines).
pub fn poll2(a: RawFd, b: RawFd, timeout_us: u64) -> io::Result<(bool, bool)> {
    let ts = libc::timespec {
        tv_sec: (timeout_us / 1_000_000) as libc::time_t,
        tv_nsec: ((timeout_us % 1_000_000) * 1000) as libc::c_long,
    };
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: fds is a valid array of two pollfd, ts a valid timespec; no signal mask.
    let r = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
    if r >= 0 {
        let ready =
            |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
        return Ok((ready(&fds[0]), ready(&fds[1])));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINTR) {
        return Ok((false, false));
    }
    Err(e)
}

/// Sleeps about `ms` milliseconds with nanosleep (async-signal-safe).
pub fn sleep_ms(ms: u64) {
    let ts = libc::timespec {
        tv_sec: (ms / 1000) as libc::time_t,
        tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: ts is a valid timespec; the remainder pointer may be null.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

/// Monotonic nanoseconds (clock_gettime is async-signal-safe, unlike some Instant paths).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Gives the CPU to another runnable thread (sched_yield; async-signal-safe).
/// 64 random bits from the kernel's random source (getrandom(2)); where that fails (a kernel
/// before 3.17, a seccomp filter), the monotonic clock mixed with an address.
pub fn random_u64() -> u64 {
    let mut v = 0u64;
    // SAFETY: writes at most 8 bytes into `v`.
    let n = unsafe { libc::getrandom((&mut v as *mut u64).cast(), 8, libc::GRND_NONBLOCK) };
    if n == 8 {
        return v;
    }
    let here = &v as *const u64 as u64;
    (now_ns() ^ here.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

pub fn yield_now() {
    // SAFETY: sched_yield has no preconditions.
    unsafe { libc::sched_yield() };
}

/// The calling thread's kernel id (async-signal-safe: one system call).
pub fn gettid() -> u32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

/// The CPU the calling thread runs on now (vDSO getcpu), or `None` if unknown.
pub fn cpu() -> Option<usize> {
    // SAFETY: sched_getcpu has no preconditions.
    let c = unsafe { libc::sched_getcpu() };
    (c >= 0).then_some(c as usize)
}

/// Runs `f` on CPU `cpu`: the calling thread is moved there for the call and its affinity is
/// restored after. Returns false (without calling `f`) if the move is refused. No allocation.
pub fn on_cpu(cpu: usize, f: impl FnOnce()) -> bool {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `old` is a valid out-pointer of `size` bytes; 0 means the calling thread.
    if unsafe { libc::sched_getaffinity(0, size, &mut old) } != 0 {
        return false;
    }
    // SAFETY: as above.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * size {
        return false;
    }
    // SAFETY: `cpu` is below the set's capacity (checked above).
    unsafe { libc::CPU_SET(cpu, &mut one) };
    // SAFETY: `one` is a valid set of `size` bytes. The kernel moves the thread before returning.
    if unsafe { libc::sched_setaffinity(0, size, &one) } != 0 {
        return false;
    }
    f();
    // SAFETY: restores the set read above.
    unsafe { libc::sched_setaffinity(0, size, &old) };
    true
}

static PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

extern "C" fn forget_pid() {
    PID.store(0, std::sync::atomic::Ordering::SeqCst);
}

/// This process's id, cached: one atomic load after the first call. A `fork` clears the cache
/// in the child (pthread_atfork), so a forked child sees its own id.
pub fn pid() -> u32 {
    let p = PID.load(std::sync::atomic::Ordering::Acquire);
    if p != 0 {
        return p;
    }
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        // SAFETY: registers a child handler that only stores to an atomic (async-signal-safe).
        unsafe { libc::pthread_atfork(None, None, Some(forget_pid)) };
    });
    let p = std::process::id();
    PID.store(p, std::sync::atomic::Ordering::Release);
    p
}

/// Writes `msg` to stderr with write(2) and aborts: for states where going on would hang or
/// serve wrong bytes. Async-signal-safe.
pub fn fatal(msg: &str) -> ! {
    let mut rest = msg.as_bytes();
    while !rest.is_empty() {
        // SAFETY: writes from a valid buffer to fd 2.
        let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            break;
        }
        rest = &rest[n as usize..];
    }
    std::process::abort()
}

/// This thread's errno.
pub fn errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot, valid for the thread's life.
    unsafe { *libc::__errno_location() }
}

/// Sets this thread's errno.
pub fn set_errno(e: i32) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = e };
}
