//! Pages lazyfree installs become volatile again at once (re-advised MADV_FREE), in every mode:
//! after `insert_with` and after each rebuild, reclaim drops (nearly) every page.
//!
//! In a binary of its own, the modes one after the other: other tests reclaim too, and
//! `testing::reclaim` compacts memory, which takes pages off the LRU lists for a moment; an
//! advice given then misses them until lazyfree advises them again (50 ms later; in SIGBUS mode
//! at the next fault, pin or unpin), and this test checks the advice right after the rebuild.

mod common;

use common::readvise;
use lazyfree::{Config, Mode};

#[test]
fn readvise_every_mode() {
    for mode in [Mode::Monitor, Mode::Sigbus, Mode::Explicit] {
        readvise(Config::default().mode(mode));
    }
}
