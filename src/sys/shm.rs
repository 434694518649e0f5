//! Shared memory files and the calls around them: naming under `/dev/shm`, mapping with
//! `MAP_SHARED`, punching holes, futexes on shared words, and whether another process is alive.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU32;

/// Where named shared files live.
pub const SHM_DIR: &str = "/dev/shm";

fn cpath(path: &str) -> io::Result<CString> {
    CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn fd_or_err(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens an existing file read-write.
pub fn open(path: &str) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    // SAFETY: p is a valid NUL-terminated path.
    fd_or_err(unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })
}

/// Creates a file that must not exist yet (mode 0600).
pub fn create_new(path: &str) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
    // SAFETY: p is a valid NUL-terminated path; the mode is passed as the variadic argument.
    fd_or_err(unsafe { libc::open(p.as_ptr(), flags, 0o600 as libc::c_uint) })
}

/// An anonymous shared memory file (memfd), handed to other processes by fd.
pub fn memfd(name: &str) -> io::Result<OwnedFd> {
    let n = cpath(name)?;
    // SAFETY: n is a valid NUL-terminated name.
    fd_or_err(unsafe { libc::memfd_create(n.as_ptr(), libc::MFD_CLOEXEC) })
}

/// A new fd for the same open file (close-on-exec).
pub fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an fd the caller holds returns a new fd or -1.
    fd_or_err(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })
}

/// Gives `from` the name `to`, failing with EEXIST if `to` exists (link(2) never replaces).
pub fn link(from: &str, to: &str) -> io::Result<()> {
    let (f, t) = (cpath(from)?, cpath(to)?);
    // SAFETY: both are valid NUL-terminated paths.
    if unsafe { libc::link(f.as_ptr(), t.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn unlink(path: &str) -> io::Result<()> {
    let p = cpath(path)?;
    // SAFETY: p is a valid NUL-terminated path.
    if unsafe { libc::unlink(p.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `offset` (all of them, or an error).
pub fn read_at(fd: RawFd, offset: usize, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: reads into the valid remainder of buf.
        let n = unsafe {
            libc::pread(
                fd,
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (offset + done) as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        done += n as usize;
    }
    Ok(())
}

pub fn set_len(fd: RawFd, len: usize) -> io::Result<()> {
    // SAFETY: ftruncate on an fd we hold.
    if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn len(fd: RawFd) -> io::Result<usize> {
    // SAFETY: an all-zero stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out-pointer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_size as usize)
}

/// Maps `len` bytes of the file at `offset` shared, read-write, without reserving memory for
/// it (`MAP_NORESERVE`: a hugetlbfs file would otherwise reserve a huge page for every page of
/// the mapping at once).
pub fn map_shared(fd: RawFd, offset: usize, len: usize) -> io::Result<*mut u8> {
    // SAFETY: a fresh mapping at an address of the kernel's choice touches no existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd,
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// Frees the file's pages in `[offset, offset + len)`: every process mapping them loses them,
/// and the next touch is a missing-page fault.
pub fn punch(fd: &OwnedFd, offset: usize, len: usize) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on an fd we hold; it only changes the file.
    if unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits while `*word == expected`, at most `timeout_ms`, woken by [`futex_wake`] from any
/// process mapping the word (a shared futex: no `FUTEX_PRIVATE_FLAG`). Async-signal-safe.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout_ms: u64) {
    let ts = libc::timespec {
        tv_sec: (timeout_ms / 1000) as libc::time_t,
        tv_nsec: ((timeout_ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: the word is a valid aligned u32 for the call; ts is a valid relative timeout.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

/// Wakes every waiter on `word` in every process.
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: the word is a valid aligned u32; FUTEX_WAKE only wakes waiters.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

/// What `/proc/<pid>/stat` said.
enum Stat {
    /// The state letter (field 3) and start time (field 22, clock ticks since boot). The start
    /// time tells a live process from a later one given the same pid.
    Found(u8, u64),
    /// No such process.
    Gone,
    /// It could not be read (out of file descriptors or memory...): nothing is known.
    Unknown,
}

/// Reads `/proc/<pid>/stat`. Allocation-free: the path and the text live on the stack.
fn stat(pid: u32) -> Stat {
    let mut path = [0u8; 32];
    path[..6].copy_from_slice(b"/proc/");
    let mut n = 6;
    let mut digits = [0u8; 10];
    let (mut d, mut p) = (0, pid);
    loop {
        digits[d] = b'0' + (p % 10) as u8;
        d += 1;
        p /= 10;
        if p == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        path[n] = digits[d];
        n += 1;
    }
    path[n..n + 6].copy_from_slice(b"/stat\0");
    // SAFETY: path is NUL-terminated.
    let fd = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return match super::os::errno() {
            libc::ENOENT | libc::ESRCH => Stat::Gone,
            _ => Stat::Unknown,
        };
    }
    let mut buf = [0u8; 1024];
    // SAFETY: reads into a valid stack buffer.
    let len = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    let err = super::os::errno();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if len == 0 || (len < 0 && err == libc::ESRCH) {
        return Stat::Gone; // it exited between the open and the read
    }
    if len < 0 {
        return Stat::Unknown;
    }
    match parse_stat(&buf[..len as usize]) {
        Some((state, start)) => Stat::Found(state, start),
        None => Stat::Unknown,
    }
}

/// The state letter and the start time from a stat line.
fn parse_stat(text: &[u8]) -> Option<(u8, u64)> {
    // The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    let close = text.iter().rposition(|&b| b == b')')?;
    let mut fields = text[close + 1..]
        .split(|&b| b == b' ')
        .filter(|f| !f.is_empty());
    let state = *fields.next()?.first()?;
    let start = fields.nth(18)?; // field 22 is the 19th after field 3
    let mut v = 0u64;
    for &b in start {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        v = v * 10 + digit as u64;
    }
    Some((state, v))
}

/// The start time of process `pid` (see `stat`), `None` if it cannot be read.
pub fn start_time(pid: u32) -> Option<u64> {
    match stat(pid) {
        Stat::Found(_, s) => Some(s),
        _ => None,
    }
}

/// Whether process `pid`, started at `start` (0: not known yet), may be alive. Dead means
/// known dead: no such process, a zombie, or another process with that pid (another start
/// time). Where `/proc` cannot be read (out of file descriptors...), it counts as alive: taking
/// a live process for dead would let two processes fill one chunk, or punch a pinned one.
/// Allocation-free.
pub fn alive(pid: u32, start: u64) -> bool {
    if pid == 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid as libc::pid_t, 0) } != 0 && super::os::errno() == libc::ESRCH {
        return false;
    }
    match stat(pid) {
        Stat::Gone => false,
        Stat::Unknown => true,
        Stat::Found(state, s) => (start == 0 || s == start) && state != b'Z' && state != b'X',
    }
}

/// The inode of this process's pid namespace (`/proc/self/ns/pid`), 0 if unknown. Processes
/// sharing a cache must see each other's pids.
pub fn pid_namespace() -> u64 {
    std::fs::metadata("/proc/self/ns/pid").map_or(0, |m| {
        use std::os::unix::fs::MetadataExt;
        m.ino()
    })
}

/// The hugetlbfs mounts, with their page sizes: the default huge page size
/// (`Hugepagesize` in `/proc/meminfo`) where the mount options name none.
pub fn hugetlbfs_mounts() -> Vec<(String, usize)> {
    let default = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Hugepagesize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .map_or(2 << 20, |kb| kb << 10);
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return Vec::new();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 4 || f[2] != "hugetlbfs" {
                return None;
            }
            let size = f[3]
                .split(',')
                .find_map(|o| o.strip_prefix("pagesize="))
                .and_then(|v| {
                    let (n, unit) = v.split_at(v.len() - 1);
                    let n = n.parse::<usize>().ok()?;
                    match unit {
                        "K" | "k" => Some(n << 10),
                        "M" | "m" => Some(n << 20),
                        "G" | "g" => Some(n << 30),
                        _ => v.parse().ok(),
                    }
                })
                .unwrap_or(default);
            Some((f[1].replace("\\040", " "), size))
        })
        .collect()
}

/// The memory pressure file of this process's cgroup (v2 `memory.pressure`), or the machine's
/// (`/proc/pressure/memory`) where the cgroup has none (v1, or the root cgroup).
pub fn pressure_file() -> String {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("0::").map(|p| p.trim().to_string()))
        })
        .map(|p| format!("/sys/fs/cgroup{}/memory.pressure", p.trim_end_matches('/')));
    match own {
        Some(f) if std::path::Path::new(&f).exists() => f,
        _ => "/proc/pressure/memory".to_string(),
    }
}

/// A PSI trigger on `file`: readable with POLLPRI when tasks stalled on memory ("some") for
/// `stall_us` within a `window_us` window (at most one event a window).
pub fn pressure_trigger(file: &str, stall_us: u64, window_us: u64) -> io::Result<OwnedFd> {
    let p = cpath(file)?;
    let flags = libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC;
    // SAFETY: p is a valid NUL-terminated path.
    let fd = fd_or_err(unsafe { libc::open(p.as_ptr(), flags) })?;
    let spec = format!("some {stall_us} {window_us}\0");
    // SAFETY: writes the NUL-terminated trigger spec from a valid buffer.
    let n = unsafe { libc::write(fd.as_raw_fd(), spec.as_ptr().cast(), spec.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Waits up to `timeout_us` for a PSI event on `trigger` or input on `stop`; returns (event,
/// stopped). A signal ends the wait like a timeout.
pub fn wait_pressure(trigger: RawFd, stop: RawFd, timeout_us: u64) -> io::Result<(bool, bool)> {
    let ts = libc::timespec {
        tv_sec: (timeout_us / 1_000_000) as libc::time_t,
        tv_nsec: ((timeout_us % 1_000_000) * 1000) as libc::c_long,
    };
    let mut fds = [
        libc::pollfd {
            fd: trigger,
            events: libc::POLLPRI,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: fds is a valid array of two pollfd, ts a valid timespec; no signal mask.
    let r = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok((false, false));
        }
        return Err(e);
    }
    if fds[0].revents & libc::POLLERR != 0 {
        return Err(io::Error::from_raw_os_error(libc::ENODEV));
    }
    Ok((
        fds[0].revents & libc::POLLPRI != 0,
        fds[1].revents & libc::POLLIN != 0,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_process_whose_stat_cannot_be_read_counts_as_alive() {
        let me = std::process::id();
        let start = super::start_time(me).unwrap();
        // SAFETY: the child only makes system calls (alive() allocates nothing), then _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: lowers this child's own limit: no file can be opened from here on.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &none) };
            let code = if super::alive(me, start) { 0 } else { 1 };
            // SAFETY: ends the forked child at once.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "a live process taken for dead when /proc could not be read ({status:#x})"
        );
    }

    #[test]
    fn own_start_time_is_read_and_alive() {
        let me = std::process::id();
        let s = super::start_time(me).expect("own stat");
        assert!(s > 0);
        assert!(super::alive(me, s));
        assert!(
            !super::alive(me, s + 1),
            "a different start time is another process"
        );
        assert!(!super::alive(0, 0));
    }
}
