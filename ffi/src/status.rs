//! Status codes, the thread-local error message, and the panic boundary every exported function
//! runs in.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};

/// What a call did. Values are stable and never reused; new ones may be added, so treat an
/// unknown value as a failure and print it with lf_status_str().
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum lf_status {
    /// Success.
    LF_OK = 0,
    /// A required pointer argument was NULL. Nothing was done.
    LF_NULL_ARGUMENT = 1,
    /// A length of zero, or too large (one entry holds at most 1 TiB).
    LF_INVALID_LENGTH = 2,
    /// A field of lf_config is out of range (lf_last_error_message() names it).
    LF_INVALID_CONFIG = 3,
    /// No entry under that key.
    LF_NOT_FOUND = 4,
    /// lf_entry_unpin() without a matching lf_entry_pin() through the same handle.
    LF_NOT_PINNED = 5,
    /// The entry does not fit the cache's byte budget even after evicting every unpinned entry.
    LF_OVER_BUDGET = 6,
    /// The regenerate callback failed (returned non-zero) while pinning; nothing is pinned.
    LF_REGENERATE_FAILED = 7,
    /// No userfaultfd could be had (seccomp filter, sysctl, old kernel): the message says which
    /// ways were tried, their errno, and what to change.
    LF_USERFAULTFD_UNAVAILABLE = 8,
    /// The kernel refused an operation; the message names it and its errno.
    LF_KERNEL_ERROR = 9,
    /// Not available on this kernel: a page size other than 4 KiB.
    LF_UNSUPPORTED = 10,
    /// A bug inside lazyfree: a Rust panic was caught at the C boundary. Please report it with
    /// the message.
    LF_PANIC = 11,
    /// An error of a kind newer than this list; the message describes it.
    LF_ERROR = 12,
    /// Called in a process forked from the one that made the cache (or lazyfree's runtime for
    /// the mode): cache memory is not mapped there and the threads and userfaultfd serving it
    /// belong to the parent. Use the cache in the parent, or exec a fresh program in the child.
    LF_FORKED_CHILD = 13,
}

use lf_status::*;

impl lf_status {
    const ALL: [lf_status; 14] = [
        LF_OK,
        LF_NULL_ARGUMENT,
        LF_INVALID_LENGTH,
        LF_INVALID_CONFIG,
        LF_NOT_FOUND,
        LF_NOT_PINNED,
        LF_OVER_BUDGET,
        LF_REGENERATE_FAILED,
        LF_USERFAULTFD_UNAVAILABLE,
        LF_KERNEL_ERROR,
        LF_UNSUPPORTED,
        LF_PANIC,
        LF_ERROR,
        LF_FORKED_CHILD,
    ];

    fn describe(self) -> &'static CStr {
        match self {
            LF_OK => c"success",
            LF_NULL_ARGUMENT => c"a required pointer argument was NULL",
            LF_INVALID_LENGTH => c"invalid length: zero, or larger than one entry may be",
            LF_INVALID_CONFIG => c"invalid configuration value",
            LF_NOT_FOUND => c"no entry under that key",
            LF_NOT_PINNED => c"unpin without a matching pin through this handle",
            LF_OVER_BUDGET => c"the entry does not fit the cache budget",
            LF_REGENERATE_FAILED => c"the regenerate callback failed",
            LF_USERFAULTFD_UNAVAILABLE => c"userfaultfd is unavailable",
            LF_KERNEL_ERROR => c"the kernel refused an operation",
            LF_UNSUPPORTED => c"not supported by this build or kernel",
            LF_PANIC => c"internal error: a panic was caught at the C boundary",
            LF_ERROR => c"error",
            LF_FORKED_CHILD => {
                c"lazyfree cannot be used in a forked child of the process that made it"
            }
        }
    }
}

/// An lf_status as C passes it in: any int, including values that are no lf_status. Read as a
/// plain int so that an out-of-range value is not undefined behaviour on the Rust side;
/// cbindgen.toml renames it to `lf_status` in the header.
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct StatusArg(pub c_int);

/// A failure on its way to C: a status and the message for lf_last_error_message().
#[derive(Debug)]
pub(crate) struct Fail {
    pub status: lf_status,
    pub msg: String,
}

impl Fail {
    pub(crate) fn new(status: lf_status, msg: impl Into<String>) -> Fail {
        Fail {
            status,
            msg: msg.into(),
        }
    }

    pub(crate) fn null(arg: &str) -> Fail {
        Fail::new(LF_NULL_ARGUMENT, format!("argument `{arg}` is NULL"))
    }
}

impl From<lazyfree::Error> for Fail {
    fn from(e: lazyfree::Error) -> Fail {
        use lazyfree::Error as E;
        let status = match &e {
            E::UserfaultfdUnavailable { .. } => LF_USERFAULTFD_UNAVAILABLE,
            E::InvalidLength { .. } => LF_INVALID_LENGTH,
            E::InvalidConfig(_) => LF_INVALID_CONFIG,
            E::OverBudget { .. } => LF_OVER_BUDGET,
            E::Kernel { .. } => LF_KERNEL_ERROR,
            E::RegenerateFailed(_) => LF_REGENERATE_FAILED,
            E::UnsupportedPageSize => LF_UNSUPPORTED,
            E::NotPinned => LF_NOT_PINNED,
            E::ForkedChild => LF_FORKED_CHILD,
            // BadPointer comes from VolatileArena only, which the C ABI does not expose.
            _ => LF_ERROR,
        };
        Fail::new(status, e.to_string())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `msg` as this thread's last error (interior NULs become spaces).
pub(crate) fn set_last_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // A thread being torn down has no slot any more: the message is dropped then.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = c);
}

/// Turns the result of an exported function's body into its status, recording the message of a
/// failure, prefixed with the function's name.
pub(crate) fn finish(func: &str, r: Result<(), Fail>) -> lf_status {
    match r {
        Ok(()) => LF_OK,
        Err(f) => {
            set_last_error(format!("{func}: {}", f.msg));
            f.status
        }
    }
}

/// The value an exported function returns when its body panicked.
pub(crate) trait OnPanic {
    fn on_panic() -> Self;
}

impl OnPanic for lf_status {
    fn on_panic() -> Self {
        LF_PANIC
    }
}
impl OnPanic for () {
    fn on_panic() -> Self {}
}
impl OnPanic for usize {
    fn on_panic() -> Self {
        0
    }
}
impl OnPanic for bool {
    fn on_panic() -> Self {
        false
    }
}
impl<T> OnPanic for *const T {
    fn on_panic() -> Self {
        std::ptr::null()
    }
}

/// Records a caught panic as the last error and gives the function's panic value.
pub(crate) fn panicked<T: OnPanic>(func: &str, payload: Box<dyn Any + Send>) -> T {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    set_last_error(format!(
        "{func}: internal error (a Rust panic was caught at the C boundary): {what}"
    ));
    T::on_panic()
}

/// The panic boundary: runs the body of an exported function and turns a panic into the
/// function's panic value (`LF_PANIC`, NULL, 0, false) with the message recorded.
/// `ffi_fn!(name, { body })` for functions returning values; `ffi_status!(name, { body })` for a
/// body giving `Result<(), Fail>`, which becomes an lf_status.
macro_rules! ffi_fn {
    ($func:literal, $body:block) => {
        match ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| $body)) {
            Ok(v) => v,
            Err(payload) => $crate::status::panicked($func, payload),
        }
    };
}

macro_rules! ffi_status {
    ($func:literal, $body:block) => {
        $crate::status::ffi_fn!($func, {
            // The closure gives the body's `?` and `return` their own scope.
            #[allow(clippy::redundant_closure_call)]
            let r: ::std::result::Result<(), $crate::status::Fail> = (|| $body)();
            $crate::status::finish($func, r)
        })
    };
}

pub(crate) use {ffi_fn, ffi_status};

/// Describes a status in English. Never NULL: an unknown value gives "unknown lf_status value".
/// The string is static.
#[no_mangle]
pub extern "C" fn lf_status_str(status: StatusArg) -> *const c_char {
    ffi_fn!("lf_status_str", {
        lf_status::ALL
            .iter()
            .find(|s| **s as c_int == status.0)
            .map_or(c"unknown lf_status value", |s| s.describe())
            .as_ptr()
    })
}

/// Detail of the last failed lazyfree call on the calling thread: which function, what went
/// wrong and what to do. Never NULL; "" before any failure. Successful calls leave it unchanged.
/// The string stays valid until the next failing lazyfree call on this thread.
#[no_mangle]
pub extern "C" fn lf_last_error_message() -> *const c_char {
    ffi_fn!("lf_last_error_message", {
        LAST_ERROR
            .try_with(|slot| slot.borrow().as_ptr())
            .unwrap_or(c"".as_ptr())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: lf_last_error_message returns a NUL-terminated string that stays valid until
        // the next failing call on this thread; it is copied at once.
        unsafe { CStr::from_ptr(lf_last_error_message()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_lf_panic_with_a_message() {
        let s: lf_status = ffi_status!("lf_test_fn", {
            if std::hint::black_box(true) {
                panic!("boom {}", 42);
            }
            Ok(())
        });
        assert_eq!(s, LF_PANIC);
        let msg = last_error();
        assert!(msg.starts_with("lf_test_fn: internal error"), "{msg}");
        assert!(msg.contains("boom 42"), "{msg}");

        let p: *const u8 = ffi_fn!("lf_test_ptr", {
            if std::hint::black_box(true) {
                panic!("static message");
            }
            c"x".as_ptr().cast()
        });
        assert!(p.is_null());
        assert!(last_error().contains("static message"));
    }

    #[test]
    fn failures_set_the_message_and_successes_keep_it() {
        let s = finish("lf_a", Err(Fail::null("out")));
        assert_eq!(s, LF_NULL_ARGUMENT);
        assert_eq!(last_error(), "lf_a: argument `out` is NULL");
        assert_eq!(finish("lf_b", Ok(())), LF_OK);
        assert_eq!(last_error(), "lf_a: argument `out` is NULL");
        set_last_error("with\0nul".into());
        assert_eq!(last_error(), "with nul");
    }

    #[test]
    fn every_status_has_its_own_description() {
        let unknown = lf_status_str(StatusArg(999));
        // SAFETY: static NUL-terminated strings.
        let text = |p| unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_owned();
        assert_eq!(text(unknown), "unknown lf_status value");
        assert_eq!(
            text(lf_status_str(StatusArg(-1))),
            "unknown lf_status value"
        );
        let mut seen = std::collections::HashSet::new();
        for (i, s) in lf_status::ALL.iter().enumerate() {
            assert_eq!(*s as c_int, i as c_int, "values are dense and stable");
            let d = text(lf_status_str(StatusArg(i as c_int)));
            assert!(
                d != "unknown lf_status value" && seen.insert(d.clone()),
                "{d}"
            );
        }
    }

    #[test]
    fn lazyfree_errors_map_to_their_status() {
        let f: Fail = lazyfree::Error::InvalidLength {
            len: 0,
            reason: "zero",
        }
        .into();
        assert_eq!(f.status, LF_INVALID_LENGTH);
        let f: Fail = lazyfree::Error::NotPinned.into();
        assert_eq!(f.status, LF_NOT_PINNED);
        let f: Fail = lazyfree::Error::ForkedChild.into();
        assert_eq!(f.status, LF_FORKED_CHILD);
        assert!(f.msg.contains("forked child"), "{}", f.msg);
        let f: Fail = lazyfree::Error::UnsupportedPageSize.into();
        assert_eq!(f.status, LF_UNSUPPORTED);
        let f: Fail = lazyfree::Error::Kernel {
            op: "madvise",
            errno: 22, // EINVAL
        }
        .into();
        assert_eq!(f.status, LF_KERNEL_ERROR);
        assert!(f.msg.contains("madvise"), "{}", f.msg);
    }
}
