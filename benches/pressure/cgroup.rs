//! The memory cgroup each run of the pressure bench happens in (v1 `memory.limit_in_bytes`, or
//! v2 `memory.max`), made the way `tests/common`'s `MemCgroup` makes it: a new cgroup per child,
//! so that its counters (limit hits, OOM kills) belong to that child alone. Removed on drop.

use std::path::{Path, PathBuf};
use std::time::Duration;

const V1: &str = "/sys/fs/cgroup/memory";
const V2: &str = "/sys/fs/cgroup";

pub struct MemCgroup {
    dir: PathBuf,
    pub kind: &'static str,
}

impl MemCgroup {
    /// Which controller is mounted, or why none can be used (for the SKIPPED line).
    pub fn available() -> Result<&'static str, String> {
        if Path::new(V1).join("memory.limit_in_bytes").exists() {
            Ok("v1")
        } else if Path::new(V2).join("cgroup.controllers").exists() {
            Ok("v2")
        } else {
            Err("no memory cgroup controller mounted (v1 or v2)".into())
        }
    }

    /// A new cgroup named `name` with a memory limit of `limit` bytes.
    pub fn create(name: &str, limit: usize) -> Result<MemCgroup, String> {
        let kind = Self::available()?;
        let (dir, file) = if kind == "v1" {
            (Path::new(V1).join(name), "memory.limit_in_bytes")
        } else {
            (Path::new(V2).join(name), "memory.max")
        };
        std::fs::create_dir(&dir)
            .map_err(|e| format!("cannot create memory cgroup {}: {e}", dir.display()))?;
        let cg = MemCgroup { dir, kind };
        std::fs::write(cg.dir.join(file), limit.to_string())
            .map_err(|e| format!("cannot set {file}: {e}"))?;
        Ok(cg)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// OOM kills in the cgroup (v1 `memory.oom_control`, v2 `memory.events`: `oom_kill`).
    pub fn oom_kills(&self) -> u64 {
        let file = if self.kind == "v1" {
            "memory.oom_control"
        } else {
            "memory.events"
        };
        field(&self.dir.join(file), "oom_kill")
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove the memory cgroup {}", self.dir.display());
    }
}

/// The value on the line `key N` of a cgroup file; 0 if absent.
fn field(path: &Path, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

/// How often the limit of the cgroup at `dir` was hit (v1 `memory.failcnt`, v2 `max` events).
pub fn limit_hits(kind: &str, dir: &Path) -> u64 {
    if kind == "v1" {
        std::fs::read_to_string(dir.join("memory.failcnt"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    } else {
        field(&dir.join("memory.events"), "max")
    }
}

/// Moves the calling process (all its threads) into the cgroup at `dir`. Memory it touched
/// before stays charged where it was (neither v1 by default nor v2 moves charges).
pub fn join(dir: &Path) -> Result<(), String> {
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| format!("cannot join the cgroup {}: {e}", dir.display()))
}
