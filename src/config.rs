//! What a cache is made with.

use crate::error::Error;
use crate::sys::mem::{pages_for, PAGE};

/// How missing pages are caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Mode {
    /// A process-wide background thread reads faults from a userfaultfd and rebuilds pages on a
    /// small worker pool. Handles faults taken inside the kernel too (a `write(2)` from an entry)
    /// when the fd is not user-mode-only.
    #[default]
    Monitor,
}

/// The unit handed to the regenerate callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillChunk {
    /// One page (4 KiB) at a time: the least work per fault, the most faults.
    Page,
    /// This many bytes, rounded up to whole pages (the default is 64 KiB).
    Bytes(usize),
    /// The whole entry at once.
    Entry,
}

impl Default for FillChunk {
    fn default() -> Self {
        FillChunk::Bytes(64 * 1024)
    }
}

impl FillChunk {
    /// Pages per chunk for an entry of `entry_pages` pages.
    pub(crate) fn pages(self, entry_pages: usize) -> usize {
        match self {
            FillChunk::Page => 1,
            FillChunk::Bytes(n) => pages_for(n).max(1),
            FillChunk::Entry => entry_pages.max(1),
        }
        .min(entry_pages.max(1))
    }
}

/// What a fault gets when the regenerate callback fails (returns `Err` or panics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// The missing pages are poisoned (`UFFDIO_POISON`): the access raises SIGBUS, which ends a
    /// program that does not handle it. Loud, and nobody computes on bytes that are not the
    /// entry's. Falls back to [`FailurePolicy::Zero`] where the kernel has no poison support
    /// (before 6.6); `Stats::poison_supported` tells. The default.
    #[default]
    Poison,
    /// The missing pages read as zeros and the entry is marked failed (`Entry::is_failed`,
    /// `Stats::failed_entries`). The program goes on and must check.
    Zero,
}

/// Configuration of a [`crate::Cache`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    pub mode: Mode,
    pub fill_chunk: FillChunk,
    pub on_failure: FailurePolicy,
    /// Byte budget: inserting past it evicts the least recently used unpinned entries.
    /// Entries are counted by their page-rounded size. `None`: no budget.
    pub budget: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Monitor,
            fill_chunk: FillChunk::default(),
            on_failure: FailurePolicy::default(),
            budget: None,
        }
    }
}

impl Config {
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
    pub fn fill_chunk(mut self, chunk: FillChunk) -> Self {
        self.fill_chunk = chunk;
        self
    }
    pub fn on_failure(mut self, policy: FailurePolicy) -> Self {
        self.on_failure = policy;
        self
    }
    pub fn budget(mut self, bytes: Option<usize>) -> Self {
        self.budget = bytes;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if let FillChunk::Bytes(n) = self.fill_chunk {
            if n == 0 || n > MAX_CHUNK {
                return Err(Error::InvalidConfig(format!(
                    "fill_chunk Bytes({n}): use 1 byte .. {} MiB (it is rounded up to 4 KiB pages)",
                    MAX_CHUNK >> 20
                )));
            }
        }
        if let Some(b) = self.budget {
            if b < PAGE {
                return Err(Error::InvalidConfig(format!(
                    "budget of {b} bytes is smaller than one page (4096 bytes)"
                )));
            }
        }
        Ok(())
    }
}

/// Largest explicit fill chunk.
pub(crate) const MAX_CHUNK: usize = 256 << 20;
