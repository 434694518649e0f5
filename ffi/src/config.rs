//! lf_config: how a cache catches missing pages, the regenerate unit, the failure policy and the
//! byte budget.

use std::ffi::c_int;

use lazyfree::{Config, FailurePolicy, FillChunk, Mode};

use crate::status::{ffi, lf_status, required, Fail};

/// How missing pages are caught (lf_config.mode).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum lf_mode {
    /// A process-wide monitor thread reads faults from a userfaultfd; callbacks run on it (a
    /// lone fault) or on its worker threads. The default.
    LF_MODE_MONITOR = 0,
    /// No thread: a missing page raises SIGBUS in the thread that touched it, and lazyfree's
    /// SIGBUS handler calls the callback right there, on that thread, then retries the access.
    /// The handler is installed by the first such cache and stays for the rest of the process;
    /// a SIGBUS that is not about lazyfree's memory goes to the handler that was there before.
    /// Faults taken inside the kernel (a write(2) from an entry) are not served: pin first.
    /// Threads that read entries must not block SIGBUS.
    LF_MODE_SIGBUS = 1,
    /// No userfaultfd at all (for where it is denied: Docker's default seccomp profile, hardened
    /// kernels). Nothing catches the touch of a dropped page, so **the bytes are reachable only
    /// through a pin**: lf_entry_data() returns NULL, and lf_entry_pin() finds the pages the
    /// kernel dropped, one by one, calls the callback (on the pinning thread, inside
    /// lf_entry_pin()) for the chunks holding them and copies in only the lost pages. A failed
    /// callback makes the pin fail with LF_REGENERATE_FAILED; nothing is zero-filled or
    /// poisoned, so lf_config.on_failure does not apply. The first pin of a lazy entry rebuilds
    /// all of it. Costs 8 bytes per page aside (each unpinned page's first word is kept there
    /// while a marker takes its place) and one atomic operation per page per pin and unpin.
    LF_MODE_EXPLICIT = 2,
    /// LF_MODE_MONITOR if a userfaultfd can be had, else LF_MODE_EXPLICIT; lf_stats.mode says
    /// which, lf_cache_fallback_reason() why (the fallback is also logged once to stderr). Code
    /// for LF_MODE_AUTO follows the explicit mode's rule: read through lf_entry_pin() (or use
    /// lf_entry_data() and pin where it returns NULL).
    ///
    /// The environment variable LAZYFREE_MODE decides for LF_MODE_AUTO caches only, at each
    /// lf_cache_new(): `explicit` forces the explicit mode, `monitor` the monitor mode (failing
    /// with LF_USERFAULTFD_UNAVAILABLE where there is none), `auto` or unset probes; any other
    /// value gives LF_INVALID_CONFIG. A mode set in lf_config (anything but LF_MODE_AUTO) always
    /// wins over the variable.
    LF_MODE_AUTO = 3,
}

/// What a read of a page gets when the regenerate callback fails (lf_config.on_failure).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum lf_failure_policy {
    /// The missing pages are poisoned: the access raises SIGBUS, which ends a program that does
    /// not handle it. Loud: nobody computes on bytes that are not the entry's. Kernels before
    /// 6.6 have no poison and zero-fill instead (lf_stats.poison_supported). The default.
    LF_FAILURE_POISON = 0,
    /// The missing pages read as zeros and the entry is marked failed (lf_entry_is_failed(),
    /// lf_stats.failed_entries): the program goes on and must check.
    LF_FAILURE_ZERO = 1,
}

/// lf_config.fill_chunk value: the whole entry is one chunk (one callback call rebuilds it all).
pub const LF_FILL_CHUNK_ENTRY: usize = SIZE_MAX;

/// `SIZE_MAX`, spelled so that cbindgen writes it as C's SIZE_MAX.
const SIZE_MAX: usize = usize::MAX;

/// lf_config.fill_chunk value: one page (4096 bytes), the smallest chunk.
pub const LF_FILL_CHUNK_PAGE: usize = 4096;

/// An lf_mode field as C fills it in (any int); renamed to `lf_mode` in the header.
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct ModeArg(pub c_int);

/// An lf_failure_policy field as C fills it in (any int); renamed in the header.
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct PolicyArg(pub c_int);

/// The lf_mode value of a Rust mode, as C reads it: -1 for a mode newer than lf_mode (a Rust
/// mode this layer does not know yet).
pub(crate) fn mode_arg(mode: Mode) -> ModeArg {
    ModeArg(match mode {
        Mode::Monitor => lf_mode::LF_MODE_MONITOR as c_int,
        Mode::Sigbus => lf_mode::LF_MODE_SIGBUS as c_int,
        Mode::Explicit => lf_mode::LF_MODE_EXPLICIT as c_int,
        Mode::Auto => lf_mode::LF_MODE_AUTO as c_int,
        _ => -1,
    })
}

/// The Rust mode of an lf_mode value C gave.
pub(crate) fn mode_of(arg: ModeArg) -> Result<Mode, Fail> {
    Ok(match arg.0 {
        0 => Mode::Monitor,
        1 => Mode::Sigbus,
        2 => Mode::Explicit,
        3 => Mode::Auto,
        m => {
            return Err(Fail::new(
                lf_status::LF_INVALID_CONFIG,
                format!(
                    "mode {m} is no lf_mode value (LF_MODE_MONITOR 0, LF_MODE_SIGBUS 1, \
                     LF_MODE_EXPLICIT 2, LF_MODE_AUTO 3)"
                ),
            ))
        }
    })
}

/// Configuration of a cache. Get the defaults with lf_config_default(), then change fields:
/// fields may be added at the end in later versions.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct lf_config {
    /// How missing pages are caught. Default LF_MODE_MONITOR.
    pub mode: ModeArg,
    /// What a read gets when the callback fails. Default LF_FAILURE_POISON. Not used in
    /// LF_MODE_EXPLICIT, where only pins read and a failure makes the pin fail.
    pub on_failure: PolicyArg,
    /// Bytes handed to one regenerate call, rounded up to whole pages: 1 .. 256 MiB,
    /// LF_FILL_CHUNK_PAGE, or LF_FILL_CHUNK_ENTRY (the whole entry). Default 65536.
    pub fill_chunk: usize,
    /// Byte budget: inserting past it evicts least recently used unpinned entries (entries count
    /// by their page-rounded size). 0: no budget (the default); otherwise at least 4096.
    pub budget: usize,
}

impl lf_config {
    fn from_config(c: &Config) -> lf_config {
        lf_config {
            mode: mode_arg(c.mode),
            on_failure: PolicyArg(match c.on_failure {
                FailurePolicy::Zero => lf_failure_policy::LF_FAILURE_ZERO,
                FailurePolicy::Poison => lf_failure_policy::LF_FAILURE_POISON,
            } as c_int),
            fill_chunk: match c.fill_chunk {
                FillChunk::Page => LF_FILL_CHUNK_PAGE,
                FillChunk::Bytes(n) => n,
                FillChunk::Entry => LF_FILL_CHUNK_ENTRY,
            },
            budget: c.budget.unwrap_or(0),
        }
    }

    /// The Rust configuration; range checks beyond the enums are the cache's (`Cache::new`).
    pub(crate) fn to_config(self) -> Result<Config, Fail> {
        let mode = mode_of(self.mode)?;
        let policy = match self.on_failure.0 {
            0 => FailurePolicy::Poison,
            1 => FailurePolicy::Zero,
            p => {
                return Err(Fail::new(
                    lf_status::LF_INVALID_CONFIG,
                    format!(
                        "on_failure {p} is no lf_failure_policy value (LF_FAILURE_POISON 0, \
                         LF_FAILURE_ZERO 1)"
                    ),
                ))
            }
        };
        let chunk = match self.fill_chunk {
            LF_FILL_CHUNK_ENTRY => FillChunk::Entry,
            LF_FILL_CHUNK_PAGE => FillChunk::Page,
            n => FillChunk::Bytes(n),
        };
        let budget = (self.budget != 0).then_some(self.budget);
        Ok(Config::default()
            .mode(mode)
            .on_failure(policy)
            .fill_chunk(chunk)
            .budget(budget))
    }
}

/// Writes the default configuration to `*out`.
///
/// # Safety
/// `out` is NULL (LF_NULL_ARGUMENT) or points to writable memory for one lf_config.
#[no_mangle]
pub unsafe extern "C" fn lf_config_default(out: *mut lf_config) -> lf_status {
    ffi!({
        required!(out)?;
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(lf_config::from_config(&Config::default())) };
        Ok(())
    })
}
