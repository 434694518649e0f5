//! Scratch memory a chunk is regenerated into before it is installed.

use crate::sys::mem::{self, UncheckedAdvice};

/// Scratch bytes a monitor worker keeps mapped between fills (see `Scratch::forget_contents`).
pub(crate) const KEEP: usize = 64 * 1024;

/// Page-aligned scratch memory for one chunk; grows on demand (outside signal handlers).
pub(crate) struct Scratch {
    ptr: *mut u8,
    cap: usize,
    /// Bytes from `ptr` handed out by `get` since the contents were last forgotten: the part
    /// that may hold a copy of an entry's bytes.
    used: usize,
    /// Memory the caller owns, of a fixed size: never grown or unmapped here (the SIGBUS
    /// handler's pooled buffers and its stack fallback).
    fixed: bool,
}

// SAFETY: Scratch owns its mapping exclusively.
unsafe impl Send for Scratch {}

impl Scratch {
    pub(crate) fn new() -> Scratch {
        Scratch {
            ptr: std::ptr::null_mut(),
            cap: 0,
            used: 0,
            fixed: false,
        }
    }

    /// Scratch over `cap` bytes at `ptr` that the caller owns; `get` never grows it.
    ///
    /// # Safety
    /// `ptr` must be page-aligned and writable for `cap` bytes, and used by nobody else while the
    /// returned value lives.
    pub(crate) unsafe fn fixed(ptr: *mut u8, cap: usize) -> Scratch {
        Scratch {
            ptr,
            cap,
            used: 0,
            fixed: true,
        }
    }

    /// Bytes `get` hands out without growing.
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// Whether `get` may map more (not a fixed buffer).
    pub(crate) fn can_grow(&self) -> bool {
        !self.fixed
    }

    /// A buffer of at least `len` bytes, or `None` if it cannot be mapped.
    /// A fixed scratch gives `None` for more than its capacity.
    pub(crate) fn get(&mut self, len: usize) -> Option<&mut [u8]> {
        if len > self.cap {
            if self.fixed {
                return None;
            }
            let cap = len.next_power_of_two().max(KEEP);
            let p = mem::map_anon(cap).ok()?;
            self.release();
            self.ptr = p;
            self.cap = cap;
            self.used = 0;
        }
        self.used = self.used.max(len);
        // SAFETY: ptr maps cap >= len bytes that only this Scratch uses.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr, len) })
    }

    /// After a fill: a mapping larger than `KEEP` is given back at once; one of up to `KEEP`
    /// bytes is kept for the next fill, its contents forgotten later (`forget_contents`).
    pub(crate) fn after_fill(&mut self) {
        if self.cap > KEEP && !self.fixed {
            self.release();
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
            self.used = 0;
        }
    }

    /// The buffer holds a copy of bytes installed, which must not stay in memory the kernel
    /// cannot take (there is no swap): the part used since the last call is advised MADV_FREE
    /// (the next fill's writes cancel that). A monitor worker calls this when it runs out of
    /// work, not after every fill (each advice of written pages is a system call and a TLB
    /// flush on every CPU running the program): so a busy worker keeps at most `KEEP` bytes
    /// of such a copy, and an idle one none. The SIGBUS handler calls it after every fill.
    pub(crate) fn forget_contents(&mut self) {
        self.after_fill();
        if self.ptr.is_null() || self.used == 0 {
            return;
        }
        // SAFETY: a mapping this Scratch may use, not borrowed now; its bytes mean nothing
        // after a fill.
        let _ =
            unsafe { mem::advise_unchecked(self.ptr as usize, self.used, UncheckedAdvice::Free) };
        self.used = 0;
    }

    fn release(&mut self) {
        if !self.ptr.is_null() && !self.fixed {
            // SAFETY: our own mapping; no slice into it outlives `get`'s borrow.
            unsafe { mem::unmap(self.ptr, self.cap) };
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.release();
    }
}
