//! Status codes, the thread-local error message, and the panic boundary every exported function
//! runs in.
//!
//! Every exported function has the same shape, so that its body reads as its logic only:
//! ```text
//! /// Doc comment (it goes into the header), with a `# Safety` section for an unsafe fn.
//! #[no_mangle]
//! pub unsafe extern "C" fn lf_cache_get(cache: *mut lf_cache, key: u64, out: *mut *mut lf_entry)
//!     -> lf_status {
//!     ffi!({                                    // panic boundary; Err(Fail) -> status + message
//!         let cache = &borrow!(cache)?.cache;   // NULL -> LF_NULL_ARGUMENT naming `cache`
//!         required!(out)?;                      // NULL -> LF_NULL_ARGUMENT naming `out`
//!         ...
//!         Ok(())
//!     })
//! }
//! ```
//! The function stays a plain item because cbindgen reads the source without expanding macros.
//! Its name is written once, in the signature: messages take it from the compiler (`this_fn!`).

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt;

/// What a call did. Values are stable and never reused; new ones may be added, so treat an
/// unknown value as a failure and print it with lf_status_str().
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum lf_status {
    /// Success.
    LF_OK = 0,
    /// A required pointer argument was NULL. Nothing was done.
    LF_NULL_ARGUMENT = 1,
    /// A length of zero, or too large (one entry holds at most 1 TiB; an entry of a shared cache
    /// at most the cache's capacity).
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
    /// lf_cache_insert_keyed() or lf_cache_get_or_insert_keyed() on a cache made by
    /// lf_cache_new(), which has no regenerate function of its own: make it with
    /// lf_cache_new_keyed(), or pass a callback to lf_cache_insert().
    LF_NO_CACHE_REGEN = 14,
    /// lf_shared_cache_create(): a shared cache of that name exists already. Open it with
    /// lf_shared_cache_open(), or remove a left-over one with lf_shared_cache_remove().
    LF_SHARED_EXISTS = 15,
    /// lf_shared_cache_open() or lf_shared_cache_remove(): no shared cache of that name. Make it
    /// with lf_shared_cache_create() first.
    LF_SHARED_NOT_FOUND = 16,
    /// lf_shared_cache_open(): the file of that name is no shared cache this library can open
    /// (another version, truncated, not a cache); the message says which. Remove it with
    /// lf_shared_cache_remove() and make it again.
    LF_BAD_SHARED_FILE = 17,
    /// lf_shared_cache_create() or lf_shared_cache_open(): every process slot of the shared
    /// cache (63) is held by a live process. Close it in a process that does not need it.
    LF_SHARED_TOO_MANY_PROCESSES = 18,
    /// lf_shared_cache_insert() of a key that is in the shared cache with another length: every
    /// process must insert a key with the same length.
    LF_SHARED_LENGTH_MISMATCH = 19,
    /// lf_shared_cache_insert(): the shared cache's entry records or its capacity are used up
    /// (entries are never removed). Make a larger cache.
    LF_SHARED_FULL = 20,
}

use lf_status::*;

impl lf_status {
    const ALL: [lf_status; 21] = [
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
        LF_NO_CACHE_REGEN,
        LF_SHARED_EXISTS,
        LF_SHARED_NOT_FOUND,
        LF_BAD_SHARED_FILE,
        LF_SHARED_TOO_MANY_PROCESSES,
        LF_SHARED_LENGTH_MISMATCH,
        LF_SHARED_FULL,
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
            LF_NO_CACHE_REGEN => c"the cache has no regenerate function of its own",
            LF_SHARED_EXISTS => c"a shared cache of that name exists already",
            LF_SHARED_NOT_FOUND => c"no shared cache of that name",
            LF_BAD_SHARED_FILE => c"the file is not a shared cache this library can open",
            LF_SHARED_TOO_MANY_PROCESSES => {
                c"every process slot of the shared cache is held by a live process"
            }
            LF_SHARED_LENGTH_MISMATCH => c"the key is in the shared cache with another length",
            LF_SHARED_FULL => c"the shared cache's entry records or capacity are used up",
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
            E::NoCacheRegen => LF_NO_CACHE_REGEN,
            E::SharedExists(_) => LF_SHARED_EXISTS,
            E::SharedNotFound(_) => LF_SHARED_NOT_FOUND,
            E::BadSharedFile { .. } => LF_BAD_SHARED_FILE,
            E::SharedTooManyProcesses(_) => LF_SHARED_TOO_MANY_PROCESSES,
            E::SharedLengthMismatch { .. } => LF_SHARED_LENGTH_MISMATCH,
            E::SharedFull { .. } => LF_SHARED_FULL,
            // BadPointer comes from VolatileArena only, which the C ABI does not expose.
            _ => LF_ERROR,
        };
        // Where the Rust text names Rust functions, the C one names C functions.
        let msg = match e {
            E::NoCacheRegen => "this cache has no regenerate function of its own: make it with \
                                lf_cache_new_keyed() to insert entries by key and length, or \
                                pass a callback to lf_cache_insert()"
                .to_string(),
            E::SharedExists(path) => format!(
                "a shared cache exists at {path}: open it with lf_shared_cache_open(), or \
                 remove it first (lf_shared_cache_remove()) if it is left over"
            ),
            E::SharedNotFound(path) => {
                format!("no shared cache at {path}: make it with lf_shared_cache_create() first")
            }
            E::BadSharedFile { path, why } => format!(
                "{path} cannot be opened as a shared cache: {why}. Remove it \
                 (lf_shared_cache_remove()) and make it again"
            ),
            e => e.to_string(),
        };
        Fail::new(status, msg)
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

/// The name of the exported function a macro was expanded in, for messages.
///
/// Read from the path the compiler gives an item declared inside the function
/// (`lazyfree::cache::lf_cache_get::{{closure}}::here`), so that each function's name is written
/// once, in its signature. Cheap to make: it is parsed only when a message is written.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FnName(pub(crate) &'static str);

impl fmt::Display for FnName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self
            .0
            .rsplit("::")
            .skip(1) // the local item
            .find(|s| !s.starts_with("{{")) // closures the item sits in
            .unwrap_or(self.0);
        f.write_str(name)
    }
}

/// `this_fn!()`: the [`FnName`] of the function it is written in.
macro_rules! this_fn {
    () => {{
        fn here() {}
        $crate::status::FnName(::std::any::type_name_of_val(&here))
    }};
}

/// What an exported function returns: the value its body gives on success; on a failure (or a
/// caught panic), the failure's status for an lf_status function, else NULL, 0, false or nothing.
pub(crate) trait Returns: Sized {
    /// What the body gives on success.
    type Ok;
    fn success(v: Self::Ok) -> Self;
    fn failure(status: lf_status) -> Self;
}

impl Returns for lf_status {
    type Ok = ();
    fn success((): ()) -> Self {
        LF_OK
    }
    fn failure(status: lf_status) -> Self {
        status
    }
}
impl Returns for () {
    type Ok = ();
    fn success((): ()) -> Self {}
    fn failure(_: lf_status) -> Self {}
}
impl Returns for usize {
    type Ok = usize;
    fn success(v: usize) -> Self {
        v
    }
    fn failure(_: lf_status) -> Self {
        0
    }
}
impl Returns for bool {
    type Ok = bool;
    fn success(v: bool) -> Self {
        v
    }
    fn failure(_: lf_status) -> Self {
        false
    }
}
impl<T> Returns for *const T {
    type Ok = *const T;
    fn success(v: *const T) -> Self {
        v
    }
    fn failure(_: lf_status) -> Self {
        std::ptr::null()
    }
}

/// Turns the result of an exported function's body into what the function returns, recording
/// the message of a failure, prefixed with the function's name.
pub(crate) fn finish<R: Returns>(func: impl fmt::Display, r: Result<R::Ok, Fail>) -> R {
    match r {
        Ok(v) => R::success(v),
        Err(f) => {
            set_last_error(format!("{func}: {}", f.msg));
            R::failure(f.status)
        }
    }
}

/// What a caught panic says.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The panic boundary (see [`ffi!`]): runs `body` and [`finish`]es its result; a panic becomes
/// an `LF_PANIC` failure.
#[inline]
pub(crate) fn boundary<R: Returns>(func: FnName, body: impl FnOnce() -> Result<R::Ok, Fail>) -> R {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or_else(|p| {
        Err(Fail::new(
            LF_PANIC,
            format!(
                "internal error (a Rust panic was caught at the C boundary): {}",
                panic_message(&*p)
            ),
        ))
    });
    finish(func, r)
}

/// The body of every exported function: `ffi!({ ... })`. The block gives `Result<T, Fail>`
/// (`?` and `return Err(..)` work in it); the function returns `T` on success (`LF_OK` for an
/// lf_status function). A failure, or a panic caught here, records its message prefixed with the
/// function's name and returns the failure's status, or NULL, 0, false (see [`Returns`]).
macro_rules! ffi {
    ($body:block) => {
        $crate::status::boundary($crate::status::this_fn!(), || $body)
    };
}

/// `borrow!(h)?`: the value behind the handle argument `h`, or `LF_NULL_ARGUMENT` naming `h`
/// if it is NULL. Debug builds abort with the function's name if `h` is released.
///
/// Only for the body of an exported `unsafe fn` whose `# Safety` section says that `h` is NULL or
/// a live handle (not released during the call).
macro_rules! borrow {
    ($h:ident) => {
        // SAFETY: `h` is NULL or a live handle not released during the call, by the contract of
        // the exported function this is used in (see above).
        unsafe { $crate::handle::borrow($crate::status::this_fn!(), ::std::stringify!($h), $h) }
    };
}

/// `required!(arg)?`: a pointer or function pointer argument that must not be NULL, or
/// `LF_NULL_ARGUMENT` naming `arg`. Gives the pointer (the function for an `Option<fn>`).
macro_rules! required {
    ($arg:ident) => {
        $crate::status::Required::required($arg)
            .ok_or_else(|| $crate::status::Fail::null(::std::stringify!($arg)))
    };
}

/// An argument `required!` checks for NULL.
pub(crate) trait Required {
    type Value;
    fn required(self) -> Option<Self::Value>;
}

impl<T> Required for *mut T {
    type Value = *mut T;
    fn required(self) -> Option<*mut T> {
        (!self.is_null()).then_some(self)
    }
}
impl<T> Required for *const T {
    type Value = *const T;
    fn required(self) -> Option<*const T> {
        (!self.is_null()).then_some(self)
    }
}
impl<F> Required for Option<F> {
    type Value = F;
    fn required(self) -> Option<F> {
        self
    }
}

pub(crate) use {borrow, ffi, required, this_fn};

/// Describes a status in English. Never NULL: an unknown value gives "unknown lf_status value".
/// The string is static.
#[no_mangle]
pub extern "C" fn lf_status_str(status: StatusArg) -> *const c_char {
    ffi!({
        Ok(lf_status::ALL
            .iter()
            .find(|s| **s as c_int == status.0)
            .map_or(c"unknown lf_status value", |s| s.describe())
            .as_ptr())
    })
}

/// Detail of the last failed lazyfree call on the calling thread: which function, what went
/// wrong and what to do. Never NULL; "" before any failure. Successful calls leave it unchanged.
/// The string stays valid until the next failing lazyfree call on this thread.
#[no_mangle]
pub extern "C" fn lf_last_error_message() -> *const c_char {
    ffi!({
        Ok(LAST_ERROR
            .try_with(|slot| slot.borrow().as_ptr())
            .unwrap_or(c"".as_ptr()))
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
        fn lf_test_fn() -> lf_status {
            ffi!({
                if std::hint::black_box(true) {
                    panic!("boom {}", 42);
                }
                Ok(())
            })
        }
        fn lf_test_ptr() -> *const u8 {
            ffi!({
                if std::hint::black_box(true) {
                    panic!("static message");
                }
                Ok(c"x".as_ptr().cast())
            })
        }
        let s: lf_status = lf_test_fn();
        assert_eq!(s, LF_PANIC);
        let msg = last_error();
        assert!(msg.starts_with("lf_test_fn: internal error"), "{msg}");
        assert!(msg.contains("boom 42"), "{msg}");

        let p: *const u8 = lf_test_ptr();
        assert!(p.is_null());
        assert!(last_error().contains("static message"));
    }

    #[test]
    fn failures_set_the_message_and_successes_keep_it() {
        let s: lf_status = finish("lf_a", Err(Fail::null("out")));
        assert_eq!(s, LF_NULL_ARGUMENT);
        assert_eq!(last_error(), "lf_a: argument `out` is NULL");
        assert_eq!(finish::<lf_status>("lf_b", Ok(())), LF_OK);
        assert_eq!(last_error(), "lf_a: argument `out` is NULL");
        set_last_error("with\0nul".into());
        assert_eq!(last_error(), "with nul");
    }

    #[test]
    fn messages_name_the_function_and_the_argument() {
        /// # Safety
        /// `entry` is NULL or a live handle.
        unsafe fn lf_test_borrow(entry: *const crate::entry::lf_entry) -> usize {
            ffi!({
                let closures_do_not_hide_the_name = || borrow!(entry);
                closures_do_not_hide_the_name()?;
                Ok(1)
            })
        }
        fn lf_test_required(out: *mut u8, regen: Option<fn()>) -> lf_status {
            ffi!({
                required!(out)?;
                required!(regen)?;
                Ok(())
            })
        }
        // SAFETY: NULL is allowed.
        assert_eq!(unsafe { lf_test_borrow(std::ptr::null()) }, 0);
        assert_eq!(last_error(), "lf_test_borrow: argument `entry` is NULL");
        assert_eq!(
            lf_test_required(std::ptr::null_mut(), None),
            LF_NULL_ARGUMENT
        );
        assert_eq!(last_error(), "lf_test_required: argument `out` is NULL");
        let mut b = 0u8;
        assert_eq!(lf_test_required(&mut b, None), LF_NULL_ARGUMENT);
        assert_eq!(last_error(), "lf_test_required: argument `regen` is NULL");
        assert_eq!(lf_test_required(&mut b, Some(|| ())), LF_OK);
        assert_eq!(
            FnName("lazyfree::cache::lf_cache_get::{{closure}}::{{closure}}::here").to_string(),
            "lf_cache_get"
        );
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

    #[test]
    fn shared_cache_errors_map_to_their_status_and_name_c_functions() {
        use lazyfree::Error as E;
        let path = || "/dev/shm/lazyfree.x".to_string();
        let cases: [(E, lf_status, &str); 6] = [
            (
                E::SharedExists(path()),
                LF_SHARED_EXISTS,
                "lf_shared_cache_open()",
            ),
            (
                E::SharedNotFound(path()),
                LF_SHARED_NOT_FOUND,
                "lf_shared_cache_create()",
            ),
            (
                E::BadSharedFile {
                    path: path(),
                    why: "version 99".into(),
                },
                LF_BAD_SHARED_FILE,
                "lf_shared_cache_remove()",
            ),
            (
                E::SharedTooManyProcesses(63),
                LF_SHARED_TOO_MANY_PROCESSES,
                "63",
            ),
            (
                E::SharedLengthMismatch {
                    key: 5,
                    have: 10,
                    asked: 11,
                },
                LF_SHARED_LENGTH_MISMATCH,
                "key 5",
            ),
            (
                E::SharedFull {
                    what: "entry records",
                    have: 4,
                },
                LF_SHARED_FULL,
                "entry records",
            ),
        ];
        for (e, status, says) in cases {
            let f: Fail = e.into();
            assert_eq!(f.status, status, "{}", f.msg);
            assert!(f.msg.contains(says), "{}", f.msg);
            assert!(
                !f.msg.contains("SharedCache::"),
                "names a Rust function: {}",
                f.msg
            );
        }
    }
}
