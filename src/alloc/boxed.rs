//! [`VolatileBox`]: a `Box<[T]>` or `Vec<T>` from a [`VolatileArena`] turned into volatile,
//! rebuildable values, safely.

use std::alloc::Layout;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use allocator_api2::boxed::Box;
use allocator_api2::vec::Vec;

use super::arena::VolatileArena;
use crate::error::Error;
use crate::region::RegenError;

/// Element types of a [`VolatileBox`]: plain data whose every bit pattern, all zeros included,
/// is a valid value. The kernel may drop a volatile box's pages at any time; the bytes read back
/// are whatever the regenerate callback wrote (or zeros after a failed regeneration under
/// `FailurePolicy::Zero`), so they must always make a valid value.
///
/// # Safety
/// Implement only for `Copy` types with no padding bytes, no invalid bit patterns (not `bool`,
/// `char`, enums, references or pointers with validity rules), and no interior mutability. A
/// `#[repr(C)]` struct of `Plain` fields without padding qualifies.
pub unsafe trait Plain: Copy + Send + Sync + 'static {}

macro_rules! plain {
    ($($t:ty),*) => {$(
        // SAFETY: a primitive number: no padding, every bit pattern is a value.
        unsafe impl Plain for $t {}
    )*};
}
plain!(u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, f32, f64);

// SAFETY: an array of plain values has no padding between elements and no invalid patterns.
unsafe impl<T: Plain, const N: usize> Plain for [T; N] {}

/// A slice of `T` in a [`VolatileArena`] whose bytes the kernel may drop under memory pressure
/// and a regenerate callback rebuilds on touch.
///
/// Made from a filled `allocator_api2` `Box<[T], &VolatileArena>` or `Vec<T, &VolatileArena>`
/// ([`from_boxed_slice`](Self::from_boxed_slice), [`from_vec`](Self::from_vec)). Reading
/// (`Deref<Target = [T]>`) is transparent: a dropped page is rebuilt before the read completes.
/// Mutation goes through a pin ([`pin_mut`](Self::pin_mut)); writes are kept only while pinned
/// unless the callback reproduces them. Dropping it frees the span.
///
/// The callback works on bytes: `regen(offset, buf)` fills `buf` with the bytes of the slice
/// from byte `offset` on, one chunk (`Config::fill_chunk`, page-aligned) at a time, so a chunk
/// may start or end inside an element.
pub struct VolatileBox<'a, T: Plain> {
    arena: &'a VolatileArena,
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: the box owns its span; `T: Plain` is `Send + Sync`, and the arena is `Sync`.
unsafe impl<T: Plain> Send for VolatileBox<'_, T> {}
// SAFETY: shared access only reads the bytes (pins go through the arena's locks).
unsafe impl<T: Plain> Sync for VolatileBox<'_, T> {}

impl<'a, T: Plain> VolatileBox<'a, T> {
    /// Makes the box's bytes volatile, rebuilt by `regen` once the kernel drops them. The box
    /// must hold exactly the bytes `regen` produces. An empty box makes an empty value.
    ///
    /// On error (see [`VolatileArena::make_volatile`]) the box's memory is freed.
    pub fn from_boxed_slice<F, E>(b: Box<[T], &'a VolatileArena>, regen: F) -> Result<Self, Error>
    where
        F: Fn(usize, &mut [u8]) -> Result<(), E> + Send + Sync + 'static,
        E: Into<RegenError>,
    {
        let arena = *Box::allocator(&b);
        let slice: &mut [T] = Box::leak(b);
        let len = slice.len();
        let ptr = NonNull::from(slice).cast::<T>();
        let this = VolatileBox { arena, ptr, len };
        if this.bytes() > 0 {
            // SAFETY: `ptr` is the start of the box's allocation in `arena` with this layout; we
            // own it and hand out only shared slices (writes need `pin_mut`, hence `&mut self`);
            // `T: Plain` accepts any bytes the callback or a failure leaves. On error `this`
            // drops and frees the allocation.
            unsafe { arena.make_volatile(ptr.as_ptr().cast(), this.layout(), regen) }?;
        }
        Ok(this)
    }

    /// [`from_boxed_slice`](Self::from_boxed_slice) of `v.into_boxed_slice()` (which gives the
    /// pages past `v.len()` back in place).
    pub fn from_vec<F, E>(v: Vec<T, &'a VolatileArena>, regen: F) -> Result<Self, Error>
    where
        F: Fn(usize, &mut [u8]) -> Result<(), E> + Send + Sync + 'static,
        E: Into<RegenError>,
    {
        Self::from_boxed_slice(v.into_boxed_slice(), regen)
    }

    fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    fn layout(&self) -> Layout {
        // The box existed with this many elements, so the layout is valid.
        Layout::array::<T>(self.len).unwrap_or(Layout::new::<()>())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start of the elements (page-aligned unless empty).
    pub fn as_ptr(&self) -> *const T {
        self.ptr.as_ptr()
    }

    /// The elements; dropped pages are rebuilt on touch.
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `len` elements from `ptr` are the box's live allocation (or an empty slice at
        // an aligned dangling pointer); they change only through `pin_mut`, which borrows `self`
        // mutably, or by regeneration, which writes bytes that are valid `T`s (`T: Plain`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The arena it lives in.
    pub fn arena(&self) -> &'a VolatileArena {
        self.arena
    }

    /// Whether the last regeneration failed (see `Entry::is_failed`).
    pub fn is_failed(&self) -> bool {
        self.bytes() > 0 && self.arena.is_failed(self.ptr.as_ptr().cast())
    }

    /// Rebuilds dropped pages and keeps every page resident and non-volatile until the guard
    /// drops, like `Entry::pin`: use it before handing the bytes to a syscall. Pins nest.
    pub fn pin(&self) -> Result<PinnedRef<'_, T>, Error> {
        if self.bytes() > 0 {
            self.arena.pin(self.ptr.as_ptr().cast())?;
        }
        Ok(PinnedRef {
            arena: self.arena,
            slice: self.as_slice(),
        })
    }

    /// Like [`pin`](Self::pin), with mutable access. Writes are kept while the guard lives; once
    /// it drops, a page the kernel drops is rebuilt by the callback, so write only what the
    /// callback reproduces, or keep the bytes pinned.
    pub fn pin_mut(&mut self) -> Result<PinnedMut<'_, T>, Error> {
        if self.bytes() > 0 {
            self.arena.pin(self.ptr.as_ptr().cast())?;
        }
        // SAFETY: as in `as_slice`; `&mut self` makes this the only reference to the elements
        // for the guard's lifetime, and the pin keeps regeneration from replacing them.
        let slice = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) };
        Ok(PinnedMut {
            arena: self.arena,
            slice,
        })
    }
}

impl<T: Plain> Deref for VolatileBox<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Plain> AsRef<[T]> for VolatileBox<'_, T> {
    fn as_ref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Plain> Drop for VolatileBox<'_, T> {
    fn drop(&mut self) {
        if self.bytes() > 0 {
            // SAFETY: the allocation is ours and nothing borrows it any more (guards borrow
            // `self`).
            unsafe { self.arena.dealloc(self.ptr.as_ptr().cast(), self.layout()) };
        }
    }
}

impl<T: Plain> std::fmt::Debug for VolatileBox<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolatileBox")
            .field("addr", &self.ptr)
            .field("len", &self.len)
            .field("failed", &self.is_failed())
            .finish()
    }
}

/// A shared pin of a [`VolatileBox`]: its pages are resident and kept until this drops.
pub struct PinnedRef<'b, T: Plain> {
    arena: &'b VolatileArena,
    slice: &'b [T],
}

impl<T: Plain> Deref for PinnedRef<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.slice
    }
}

impl<T: Plain> Drop for PinnedRef<'_, T> {
    fn drop(&mut self) {
        if std::mem::size_of_val(self.slice) > 0 {
            // Cannot fail: the box is alive (borrowed) and pinned by this guard.
            let _ = self.arena.unpin(self.slice.as_ptr().cast());
        }
    }
}

/// A mutable pin of a [`VolatileBox`]: its pages are resident and kept until this drops.
pub struct PinnedMut<'b, T: Plain> {
    arena: &'b VolatileArena,
    slice: &'b mut [T],
}

impl<T: Plain> Deref for PinnedMut<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.slice
    }
}

impl<T: Plain> DerefMut for PinnedMut<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.slice
    }
}

impl<T: Plain> Drop for PinnedMut<'_, T> {
    fn drop(&mut self) {
        if std::mem::size_of_val(self.slice) > 0 {
            // Cannot fail: the box is alive (borrowed) and pinned by this guard.
            let _ = self.arena.unpin(self.slice.as_ptr().cast());
        }
    }
}
