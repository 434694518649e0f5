#![doc = include_str!("../README.md")]
#![cfg(target_os = "linux")]

mod arena;
mod cache;
mod config;
mod error;
mod fill;
mod hazard;
mod monitor;
mod region;
mod runtime;
mod stats;
mod sys;
pub mod testing;

pub use cache::{Cache, Entry, Pinned};
pub use config::{Config, FailurePolicy, FillChunk, Mode};
pub use error::Error;
pub use region::RegenError;
pub use runtime::monitor_running;
pub use stats::{Stats, LATENCY_BUCKETS_US};
