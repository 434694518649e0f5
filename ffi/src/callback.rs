//! A C regenerate function and its context, as the Rust callbacks that call it hold them: an
//! entry's `lf_regen_fn`, or the one function of a keyed cache (`lf_keyed_regen_fn`) or of a
//! shared cache (`lf_shared_regen_fn`).

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use lazyfree::RegenError;

use crate::cache::lf_ctx_free_fn;

/// An entry's C function (`lf_regen_fn` without its Option).
pub(crate) type EntryFn = unsafe extern "C" fn(*mut c_void, usize, *mut u8, usize) -> c_int;
/// A keyed or shared cache's C function (`lf_keyed_regen_fn`, `lf_shared_regen_fn`).
pub(crate) type KeyedFn = unsafe extern "C" fn(*mut c_void, u64, usize, *mut u8, usize) -> c_int;

/// A C regenerate function and its context: whatever calls it (an entry's region, a keyed cache
/// and its entries, a shared cache) holds a clone; the drop of the last clone calls `ctx_free`.
pub(crate) struct CCallback<R> {
    regen: R,
    ctx: *mut c_void,
    ctx_free: lf_ctx_free_fn,
}

// SAFETY: the header requires `ctx` to be usable from any thread (callbacks run on the monitor's
// workers, ctx_free on whichever thread drops the last reference); `R` (a function pointer) is
// Send itself.
unsafe impl<R: Send> Send for CCallback<R> {}
// SAFETY: as above; callbacks of one entry, or of several keys, may run concurrently, which the
// header documents.
unsafe impl<R: Sync> Sync for CCallback<R> {}

impl<R> CCallback<R> {
    pub(crate) fn new(regen: R, ctx: *mut c_void, ctx_free: lf_ctx_free_fn) -> Arc<CCallback<R>> {
        Arc::new(CCallback {
            regen,
            ctx,
            ctx_free,
        })
    }
}

impl CCallback<EntryFn> {
    /// Calls the C function for the bytes at `offset`.
    pub(crate) fn call(&self, offset: usize, buf: &mut [u8]) -> Result<(), RegenError> {
        // SAFETY: buf is valid for writes of buf.len() bytes during the call; the C side keeps
        // the rules of lf_regen_fn.
        let rc = unsafe { (self.regen)(self.ctx, offset, buf.as_mut_ptr(), buf.len()) };
        outcome(rc, offset)
    }
}

impl CCallback<KeyedFn> {
    /// Calls the C function for the bytes at `offset` of the entry under `key`.
    pub(crate) fn call(&self, key: u64, offset: usize, buf: &mut [u8]) -> Result<(), RegenError> {
        // SAFETY: buf is valid for writes of buf.len() bytes during the call; the C side keeps
        // the rules of lf_keyed_regen_fn (lf_shared_regen_fn for a shared cache).
        let rc = unsafe { (self.regen)(self.ctx, key, offset, buf.as_mut_ptr(), buf.len()) };
        outcome(rc, offset)
    }
}

impl<R> Drop for CCallback<R> {
    fn drop(&mut self) {
        if let Some(free) = self.ctx_free {
            // SAFETY: the C caller handed us ctx with this function to free it, once.
            unsafe { free(self.ctx) };
        }
    }
}

/// After a call that made nothing: the callback given to it is gone with it and the caller keeps
/// ctx, so ctx_free must not run.
pub(crate) fn disarm<R>(cb: Arc<CCallback<R>>) {
    if let Some(cb) = Arc::into_inner(cb) {
        std::mem::forget(cb);
    }
}

fn outcome(rc: c_int, offset: usize) -> Result<(), RegenError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Box::new(CallbackFailed { rc, offset }))
    }
}

/// A non-zero return of a C callback.
#[derive(Debug)]
struct CallbackFailed {
    rc: c_int,
    offset: usize,
}

impl std::fmt::Display for CallbackFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the C regenerate callback returned {} for offset {}",
            self.rc, self.offset
        )
    }
}

impl std::error::Error for CallbackFailed {}
