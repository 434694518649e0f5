//! The one error type.

use std::fmt;

/// Everything that can go wrong, with what to do about it.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// No userfaultfd could be had. Carries the errno of each way tried.
    UserfaultfdUnavailable {
        /// errno of `userfaultfd(2)`.
        syscall_errno: i32,
        /// errno of opening `/dev/userfaultfd`.
        devnode_errno: i32,
        /// errno of `userfaultfd(UFFD_USER_MODE_ONLY)`.
        user_mode_only_errno: i32,
    },
    /// A length of zero, or too large to map.
    InvalidLength {
        /// The length asked for.
        len: usize,
        /// Why it cannot be served.
        reason: &'static str,
    },
    /// A configuration value out of range.
    InvalidConfig(String),
    /// The entry does not fit the cache's byte budget, even after evicting every unpinned entry.
    OverBudget {
        /// Bytes the entry needs (whole pages).
        needed: usize,
        /// The cache's budget.
        budget: usize,
    },
    /// The kernel refused an operation (`op` names it) with `errno`.
    Kernel {
        /// The operation refused.
        op: &'static str,
        /// The kernel's errno.
        errno: i32,
    },
    /// The regenerate callback failed (returned an error or panicked) while pinning.
    RegenerateFailed(String),
    /// The kernel's page size is not 4 KiB.
    UnsupportedPageSize,
    /// An unpin without a matching pin (`Entry::unpin_unguarded` on an entry that is not pinned).
    NotPinned,
    /// A pointer given to a `VolatileArena` method is not the start of one of its live
    /// allocations, or the allocation is in the wrong state for the call (`reason` says which).
    BadPointer {
        /// The pointer given.
        addr: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Called in a process forked from the one that made lazyfree's runtime: its memory is not
    /// mapped there (MADV_DONTFORK), and its threads and userfaultfd belong to the parent.
    ForkedChild,
    /// A call that uses the cache's one regenerate function (`Cache::insert_lazy` and the like)
    /// on a cache made without one (`Cache::new`).
    NoCacheRegen,
    /// [`SharedCache::create`](crate::SharedCache::create): a shared cache of that name
    /// exists already (the path is given).
    SharedExists(String),
    /// [`SharedCache::open`](crate::SharedCache::open): no shared cache of that name (the path
    /// is given).
    SharedNotFound(String),
    /// The file is not a shared cache this build can open.
    BadSharedFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// Every process slot of the shared cache is held by a live process.
    SharedTooManyProcesses(usize),
    /// [`SharedCache::insert`](crate::SharedCache::insert) of a key that exists with another
    /// length.
    SharedLengthMismatch {
        /// The key.
        key: u64,
        /// Its length in the cache.
        have: usize,
        /// The length asked for.
        asked: usize,
    },
    /// The shared cache's entry records or capacity are used up.
    SharedFull {
        /// Which.
        what: &'static str,
        /// How many it has.
        have: usize,
    },
}

impl From<crate::sys::uffd::OpenFailure> for Error {
    /// The one mapping of a failed userfaultfd open.
    fn from(f: crate::sys::uffd::OpenFailure) -> Error {
        Error::UserfaultfdUnavailable {
            syscall_errno: f.syscall_errno,
            devnode_errno: f.devnode_errno,
            user_mode_only_errno: f.user_mode_only_errno,
        }
    }
}

impl Error {
    pub(crate) fn kernel(op: &'static str, e: std::io::Error) -> Error {
        Error::Kernel {
            op,
            errno: e.raw_os_error().unwrap_or(0),
        }
    }

    /// The errno the kernel gave, where there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::UserfaultfdUnavailable { syscall_errno, .. } => Some(*syscall_errno),
            Error::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOSYS => "ENOSYS",
        libc::ENOENT => "ENOENT",
        libc::EINVAL => "EINVAL",
        libc::ENOMEM => "ENOMEM",
        libc::EFAULT => "EFAULT",
        _ => return format!("errno {e}"),
    };
    format!("{name} ({e})")
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UserfaultfdUnavailable {
                syscall_errno,
                devnode_errno,
                user_mode_only_errno,
            } => {
                write!(
                    f,
                    "userfaultfd unavailable: userfaultfd(2) gave {}, /dev/userfaultfd gave {}, \
                     userfaultfd(UFFD_USER_MODE_ONLY) gave {}. ",
                    errno_name(*syscall_errno),
                    errno_name(*devnode_errno),
                    errno_name(*user_mode_only_errno)
                )?;
                if *user_mode_only_errno == libc::ENOSYS || *syscall_errno == libc::ENOSYS {
                    write!(f, "The kernel was built without CONFIG_USERFAULTFD.")
                } else if *user_mode_only_errno == libc::EPERM {
                    write!(
                        f,
                        "The call is blocked, typically by a seccomp filter (Docker's default \
                         profile denies userfaultfd): run the container with a profile that \
                         allows userfaultfd, or as root set `sysctl vm.unprivileged_userfaultfd=1`, \
                         or grant access to /dev/userfaultfd."
                    )
                } else {
                    write!(
                        f,
                        "A kernel of 5.11 or later is needed for unprivileged use \
                         (UFFD_USER_MODE_ONLY); or set `sysctl vm.unprivileged_userfaultfd=1`."
                    )
                }
            }
            Error::InvalidLength { len, reason } => write!(f, "invalid length {len}: {reason}"),
            Error::InvalidConfig(s) => write!(f, "invalid configuration: {s}"),
            Error::OverBudget { needed, budget } => write!(
                f,
                "entry of {needed} bytes does not fit the cache budget of {budget} bytes even \
                 after evicting every unpinned entry: raise the budget, unpin entries, or store less"
            ),
            Error::Kernel { op, errno } => {
                write!(f, "{op} failed: {}", errno_name(*errno))?;
                if *errno == libc::ENOMEM {
                    write!(f, " (address space or vm.max_map_count exhausted)")?;
                }
                Ok(())
            }
            Error::RegenerateFailed(msg) => write!(
                f,
                "the regenerate callback failed: {msg}. The entry is marked failed; pin again \
                 to retry"
            ),
            Error::UnsupportedPageSize => write!(
                f,
                "lazyfree supports 4 KiB pages only; this kernel uses another page size"
            ),
            Error::NotPinned => write!(
                f,
                "the entry is not pinned: unpin only after a successful pin, once per pin"
            ),
            Error::BadPointer { addr, reason } => write!(f, "pointer {addr:#x}: {reason}"),
            Error::ForkedChild => write!(
                f,
                "lazyfree cannot be used in a forked child of the process that started it: cache \
                 memory is not mapped in the child and the runtime's threads and userfaultfd \
                 belong to the parent. Use the cache in the parent, or exec a fresh program in \
                 the child"
            ),
            Error::SharedExists(path) => write!(
                f,
                "a shared cache exists at {path}: open it with SharedCache::open, or remove it \
                 first (SharedCache::remove) if it is left over"
            ),
            Error::SharedNotFound(path) => write!(
                f,
                "no shared cache at {path}: make it with SharedCache::create first"
            ),
            Error::BadSharedFile { path, why } => write!(
                f,
                "{path} cannot be opened as a shared cache: {why}. Remove it \
                 (SharedCache::remove) and make it again"
            ),
            Error::SharedTooManyProcesses(n) => write!(
                f,
                "all {n} process slots of the shared cache are held by live processes: close \
                 it in a process that does not need it"
            ),
            Error::SharedLengthMismatch { key, have, asked } => write!(
                f,
                "key {key} is in the shared cache with {have} bytes, not {asked}: every process \
                 must insert a key with the same length"
            ),
            Error::SharedFull { what, have } => write!(
                f,
                "the shared cache's {have} {what} are used up (entries are never removed): \
                 make a larger cache"
            ),
            Error::NoCacheRegen => write!(
                f,
                "this cache has no regenerate function of its own: make it with \
                 Cache::with_regen to insert entries by key and length, or pass a callback to \
                 Cache::insert"
            ),
        }
    }
}

impl std::error::Error for Error {}
