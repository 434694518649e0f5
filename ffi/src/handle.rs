//! Opaque handles: a Rust value boxed behind a pointer C holds, with a magic word that debug
//! builds check on every use, so that a handle used after its release (a double release, a use
//! after free) stops the program with a message instead of corrupting memory.
//!
//! In debug builds a released handle's box is not freed at once: its value is dropped, its magic
//! word is set to "released", and the husk waits in a bounded quarantine, so a second release of
//! one of the last `QUARANTINE` handles released is still recognised. Release builds free the box
//! at once and check nothing: using a released handle there is undefined behaviour.

use std::collections::VecDeque;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::status::{Fail, FnName};

/// Magic of a released handle: the live magic with these bits flipped.
const RELEASED: u64 = 0xdead_dead_dead_dead;

/// Released husks kept in debug builds.
const QUARANTINE: usize = 1 << 16;

/// What a handle points at: the magic word and the value.
pub(crate) struct Boxed<V> {
    magic: AtomicU64,
    value: ManuallyDrop<V>,
}

/// A type C holds through a handle (`lf_cache`, `lf_entry`): a struct around one `Boxed`.
pub(crate) trait Opaque: Sized + 'static {
    type Value;
    /// The C type's name, for messages.
    const NAME: &'static str;
    /// The magic word of a live handle of this type.
    const MAGIC: u64;
    fn wrap(b: Boxed<Self::Value>) -> Self;
    fn boxed(&self) -> &Boxed<Self::Value>;
    fn boxed_mut(&mut self) -> &mut Boxed<Self::Value>;
}

/// Boxes `value` and gives C its handle.
pub(crate) fn into_handle<T: Opaque>(value: T::Value) -> *mut T {
    Box::into_raw(Box::new(T::wrap(Boxed {
        magic: AtomicU64::new(T::MAGIC),
        value: ManuallyDrop::new(value),
    })))
}

/// Stops the program: `func` was given a handle that is released or not a handle at all.
#[cold]
fn misuse(func: FnName, name: &str, addr: usize, magic: u64, want: u64) -> ! {
    let what = if magic == want ^ RELEASED {
        "was already released (double release, or use after release)"
    } else {
        "is not a live handle of this type (a stray pointer, or memory reused after release)"
    };
    let _ = writeln!(
        std::io::stderr(),
        "lazyfree: {func}: the {name} at {addr:#x} {what}. Aborting (debug build check)."
    );
    std::process::abort()
}

fn check<T: Opaque>(func: FnName, b: &Boxed<T::Value>) {
    if cfg!(debug_assertions) {
        let m = b.magic.load(Ordering::Acquire);
        if m != T::MAGIC {
            misuse(func, T::NAME, b as *const _ as usize, m, T::MAGIC);
        }
    }
}

/// The value behind a handle `func` was given as argument `arg` (the `borrow!` macro calls this).
///
/// # Safety
/// `h` is NULL or a handle from `into_handle::<T>` that is not released (debug builds check the
/// latter as far as the quarantine allows), and it is not released while the reference lives.
pub(crate) unsafe fn borrow<'a, T: Opaque>(
    func: FnName,
    arg: &str,
    h: *const T,
) -> Result<&'a T::Value, Fail> {
    if h.is_null() {
        return Err(Fail::null(arg));
    }
    // SAFETY: non-NULL, and by the caller's contract a live (or quarantined) box.
    let b = unsafe { &*h }.boxed();
    check::<T>(func, b);
    Ok(&b.value)
}

/// Releases a handle: drops its value, then frees the box (debug builds: quarantines it).
/// NULL is a no-op. `before_drop` runs on the value first (e.g. to end the handle's pins).
///
/// # Safety
/// `h` is NULL or a handle from `into_handle::<T>`, not used by any other thread during or after
/// this call. Releasing it twice is undefined behaviour in release builds.
pub(crate) unsafe fn release<T: Opaque>(
    func: FnName,
    h: *mut T,
    before_drop: impl FnOnce(&T::Value),
) {
    if h.is_null() {
        return;
    }
    // SAFETY: non-NULL, and by the caller's contract a live (or quarantined) box used by no one
    // else now.
    let b = unsafe { &mut *h }.boxed_mut();
    if cfg!(debug_assertions) {
        let m = b.magic.swap(T::MAGIC ^ RELEASED, Ordering::AcqRel);
        if m != T::MAGIC {
            misuse(func, T::NAME, h as usize, m, T::MAGIC);
        }
    } else {
        b.magic.store(T::MAGIC ^ RELEASED, Ordering::Release);
    }
    before_drop(&b.value);
    // SAFETY: the value is live (magic checked or contract) and dropped only here, once; the
    // husk never reads it again.
    unsafe { ManuallyDrop::drop(&mut b.value) };
    if cfg!(debug_assertions) {
        quarantine(h as usize, free_husk::<T>);
    } else {
        // SAFETY: made by Box::into_raw in `into_handle`; its value was dropped above and the
        // ManuallyDrop keeps the box's drop from dropping it again.
        drop(unsafe { Box::from_raw(h) });
    }
}

/// Frees a released husk.
///
/// # Safety
/// `addr` is a `T` from `into_handle` whose value was dropped, freed by no one else.
unsafe fn free_husk<T: Opaque>(addr: usize) {
    // SAFETY: by the contract; the ManuallyDrop value is not dropped again.
    drop(unsafe { Box::from_raw(addr as *mut T) });
}

type Husk = (usize, unsafe fn(usize));

static QUARANTINED: Mutex<VecDeque<Husk>> = Mutex::new(VecDeque::new());

fn quarantine(addr: usize, free: unsafe fn(usize)) {
    let oldest = {
        let mut q = QUARANTINED.lock().unwrap_or_else(|p| p.into_inner());
        q.push_back((addr, free));
        if q.len() > QUARANTINE {
            q.pop_front()
        } else {
            None
        }
    };
    if let Some((addr, free)) = oldest {
        // SAFETY: a released husk, queued once, popped once.
        unsafe { free(addr) };
    }
}
