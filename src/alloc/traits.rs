//! `GlobalAlloc` for `VolatileArena` and `allocator_api2::alloc::Allocator` for `&VolatileArena`,
//! over the raw interface.

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator};

use super::arena::VolatileArena;
use crate::sys::mem::{pages_for, PAGE};

// SAFETY: `alloc` returns null or a fresh span of whole pages aligned to `layout.align()` that
// nothing else uses until `dealloc`; `realloc` keeps `GlobalAlloc`'s copy-or-untouched contract.
unsafe impl GlobalAlloc for VolatileArena {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        VolatileArena::alloc(self, layout)
    }

    /// Memory from the arena starts zero-filled: no extra work.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        VolatileArena::alloc(self, layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller.
        unsafe { VolatileArena::dealloc(self, ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        unsafe { VolatileArena::realloc(self, ptr, layout, new_size) }
    }
}

fn dangling(align: usize) -> NonNull<[u8]> {
    // A non-null address aligned to `align`, like `Layout::dangling`; zero-size blocks never
    // reach the arena, and `deallocate` ignores them.
    let p = NonNull::new(align as *mut u8).unwrap_or(NonNull::dangling());
    NonNull::slice_from_raw_parts(p, 0)
}

fn whole(ptr: NonNull<u8>, layout: Layout) -> NonNull<[u8]> {
    // The span is whole pages: the caller may use all of them.
    NonNull::slice_from_raw_parts(ptr, pages_for(layout.size()) * PAGE)
}

// SAFETY: blocks are distinct spans valid until deallocated; zero-size layouts get a dangling,
// aligned pointer that is never freed; `grow`/`shrink` keep the bytes they must and, when they
// fail, leave the old block as it was. `&VolatileArena` copies refer to one arena.
unsafe impl Allocator for &VolatileArena {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout.align()));
        }
        NonNull::new(VolatileArena::alloc(self, layout))
            .map(|p| whole(p, layout))
            .ok_or(AllocError)
    }

    /// Memory from the arena starts zero-filled: no extra work.
    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        self.allocate(layout)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() != 0 {
            // SAFETY: forwarded from the caller.
            unsafe { VolatileArena::dealloc(self, ptr.as_ptr(), layout) }
        }
    }

    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if old.size() == 0 {
            return self.allocate(new);
        }
        // SAFETY: forwarded from the caller. Bytes past `old.size()` of a moved block are
        // zero (fresh memory), so this serves `grow_zeroed` too.
        unsafe { self.resize(ptr.as_ptr(), old.size(), new) }
            .map(|p| whole(p, new))
            .ok_or(AllocError)
    }

    unsafe fn grow_zeroed(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // In place only when the page count is unchanged: then nothing past the old block size
        // is handed out. Moved: the bytes past the copy are fresh zeros.
        // SAFETY: forwarded from the caller.
        unsafe { self.grow(ptr, old, new) }
    }

    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if new.size() == 0 {
            // SAFETY: forwarded from the caller.
            unsafe { self.deallocate(ptr, old) };
            return Ok(dangling(new.align()));
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.resize(ptr.as_ptr(), old.size(), new) }
            .map(|p| whole(p, new))
            .ok_or(AllocError)
    }
}
