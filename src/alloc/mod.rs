//! Allocator interfaces over the same slabs as the cache: [`VolatileArena`], a `GlobalAlloc`-style
//! raw interface and an [`allocator_api2`] `Allocator` for `&VolatileArena`, and
//! [`VolatileBox`], the safe way to turn a filled `Box`/`Vec` from the arena into volatile bytes.
//!
//! Memory from the arena starts pinned (ordinary, never dropped) until made volatile; see
//! [`VolatileArena`].

mod arena;
mod boxed;
mod traits;

pub use arena::{VolatileArena, MAX_ALIGN, MAX_SIZE};
pub use boxed::{PinnedMut, PinnedRef, Plain, VolatileBox};
