//! `SharedCache`: one cache in shared memory used by several real processes (this test binary
//! re-executed), on the real kernel: decode once across processes, purges, pins, failures,
//! processes killed at any point, bad files and bad input. Monitor mode here; the same suite
//! runs in SIGBUS mode in `shared_sigbus.rs` (`tests/common/shared_suite.rs`).

mod common;

const MODE: lazyfree::Mode = lazyfree::Mode::Monitor;

include!("common/shared_suite.rs");
