//! The C ABI of lazyfree: `liblazyfree.so` / `liblazyfree.a` and `include/lazyfree.h`.
//!
//! A thin layer over the Rust API (`lazyfree::Cache<u64>`, `Entry`, `Config`, `Stats`,
//! `testing::reclaim`, `SharedCache`): opaque handles, one panic boundary around every exported body, one
//! `lf_status` enum with stable values, outputs written only on success, NULL arguments giving
//! `LF_NULL_ARGUMENT`. The header is generated from this crate by cbindgen (`cbindgen.toml`);
//! `tests/header.rs` fails when the committed one is stale.
#![cfg(target_os = "linux")]
// The exported names are the C API's: lf_cache, lf_status, LF_OK.
#![allow(non_camel_case_types)]

mod cache;
mod callback;
mod config;
mod entry;
mod handle;
mod shared;
mod status;

use std::ffi::c_char;

pub use cache::{
    lf_cache, lf_cache_fallback_reason, lf_cache_free, lf_cache_get, lf_cache_get_or_insert,
    lf_cache_get_or_insert_keyed, lf_cache_insert, lf_cache_insert_keyed, lf_cache_new,
    lf_cache_new_keyed, lf_cache_remove, lf_cache_stats, lf_ctx_free_fn, lf_keyed_regen_fn,
    lf_regen_fn, lf_stats, LF_LATENCY_BUCKETS,
};
pub use config::{
    lf_config, lf_config_default, lf_failure_policy, lf_mode, ModeArg, PolicyArg,
    LF_FILL_CHUNK_ENTRY, LF_FILL_CHUNK_PAGE,
};
pub use entry::{
    lf_entry, lf_entry_clone, lf_entry_data, lf_entry_is_failed, lf_entry_len, lf_entry_pin,
    lf_entry_reclaim, lf_entry_release, lf_entry_resident_pages, lf_entry_unpin,
};
pub use shared::{
    lf_shared_cache, lf_shared_cache_create, lf_shared_cache_fills, lf_shared_cache_free,
    lf_shared_cache_get, lf_shared_cache_insert, lf_shared_cache_is_failed, lf_shared_cache_open,
    lf_shared_cache_pin, lf_shared_cache_purge, lf_shared_cache_remove, lf_shared_cache_set_budget,
    lf_shared_cache_stats, lf_shared_cache_unpin, lf_shared_config, lf_shared_config_default,
    lf_shared_regen_fn, lf_shared_stats,
};
pub use status::{lf_last_error_message, lf_status, lf_status_str, StatusArg};

/// The library's version, e.g. "0.1.0" (a static string).
#[no_mangle]
pub extern "C" fn lf_version() -> *const c_char {
    status::ffi!({ Ok(concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()) })
}
