#![doc = include_str!("../README.md")]
#![cfg(target_os = "linux")]
#![warn(missing_docs)]

// Modules in layer order: each imports only modules listed above it (tests/layers.rs checks).
mod alloc;
mod arena;
mod cache;
mod chunk;
mod config;
mod error;
mod fault;
mod handle;
mod hazard;
mod hook;
mod mode;
mod region;
mod shared;
mod slot;
mod stats;
mod sync;
mod sys;
pub mod testing;

pub use alloc::{PinnedMut, PinnedRef, Plain, VolatileArena, VolatileBox, MAX_ALIGN, MAX_SIZE};
/// The `allocator-api2` crate whose `Allocator` trait `&VolatileArena` implements.
pub use allocator_api2;
pub use cache::{Cache, Entry, Pinned};
pub use config::{Config, FailurePolicy, FillChunk, Mode};
pub use error::Error;
pub use region::RegenError;
pub use shared::{Pressure, SharedCache, SharedConfig, SharedEntry, SharedPin, SharedStats};
pub use stats::{Stats, LATENCY_BUCKETS_US};
