//! The architecture, checked: data flows one way, kernel interface → memory → fault paths →
//! modes → public API. Every module of `src/` has a place in `LAYERS`, and a module may refer
//! only to modules placed before it (or to itself). So no two modules import each other, and
//! the import graph has no cycle. Every `crate::…` and `super::…` path in a module's code counts,
//! `use` lines and paths written inline alike, and so do a `mod.rs`'s uses of its own children.
//!
//! A new module must be added here, at the place its imports allow: the test fails until it is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The modules, bottom to top.
const LAYERS: &[&str] = &[
    // Kernel interface.
    "sys::os",
    "sys::mem",
    "sys::uffd",
    "sys::signal",
    "sys::shm",
    "sys",
    // Plain data.
    "error",
    "config",
    "stats",
    // Pure protocols (loom-checked) and the test hook.
    "sync",
    "chunk",
    "hazard",
    "slot",
    "hook",
    // Memory: one volatile span, then the slabs holding spans.
    "region",
    "arena",
    // Fault paths.
    "fault::scratch",
    "fault::runs",
    "fault::readvise",
    "fault::fill",
    "fault::pin",
    "fault",
    // Modes.
    "mode::explicit",
    "mode::monitor",
    "mode::sigbus::foreign",
    "mode::sigbus::frames",
    "mode::sigbus::reserves",
    "mode::sigbus::scratch",
    "mode::sigbus",
    "mode",
    "handle",
    // Public API.
    "cache::readers",
    "cache::shards",
    "cache::entry",
    "cache",
    "alloc::arena",
    "alloc::boxed",
    "alloc::traits",
    "alloc",
    // Sharing across processes: a file in shared memory, its own fault thread.
    "shared::file",
    "shared::state",
    "shared::procs",
    "shared::index",
    "shared::serve",
    "shared::purge",
    "shared::handler",
    "shared::pressure",
    "shared::monitor",
    "shared",
    "testing",
];

/// Module path of a source file under `src/` ("fault/pin.rs" → "fault::pin", "mode/mod.rs" →
/// "mode"); `None` for lib.rs.
fn module_of(rel: &Path) -> Option<String> {
    let s = rel.to_str()?.strip_suffix(".rs")?;
    if s == "lib" {
        return None;
    }
    Some(s.strip_suffix("/mod").unwrap_or(s).replace('/', "::"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments (so prose naming modules does not count) and without
/// its unit tests (a `#[cfg(test)]` module at the end, where `super` means the file itself).
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or(text);
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module paths a path expression starting at `rest` (after `crate::` or `super::`) names:
/// one per leaf of a `{...}` group.
fn paths(prefix: &str, rest: &str, out: &mut Vec<String>) {
    let ident_end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(rest.len());
    let head = rest[..ident_end].trim_end_matches(':');
    let full = if head.is_empty() {
        prefix.to_string()
    } else if prefix.is_empty() {
        head.to_string()
    } else {
        format!("{prefix}::{head}")
    };
    let after = &rest[ident_end..];
    if rest[..ident_end].ends_with("::") && after.starts_with('{') {
        // A group: split its top-level items.
        let mut depth = 0;
        let mut start = 1;
        for (i, c) in after.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        item(&full, &after[start..i], out);
                        return;
                    }
                }
                ',' if depth == 1 => {
                    item(&full, &after[start..i], out);
                    start = i + 1;
                }
                _ => {}
            }
        }
    } else {
        out.push(full);
    }
}

fn item(prefix: &str, it: &str, out: &mut Vec<String>) {
    let it = it.trim();
    if it.is_empty() || it == "self" || it.starts_with("self ") {
        out.push(prefix.to_string());
    } else {
        paths(prefix, it, out);
    }
}

/// The longest known module that `path` starts with.
fn resolve(path: &str, known: &BTreeSet<&str>) -> Option<String> {
    let segs: Vec<&str> = path.split("::").collect();
    (1..=segs.len())
        .rev()
        .map(|n| segs[..n].join("::"))
        .find(|p| known.contains(p.as_str()))
}

#[test]
fn modules_import_only_modules_below_them() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let known: BTreeSet<&str> = LAYERS.iter().copied().collect();
    let rank: BTreeMap<&str, usize> = LAYERS.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(&root).unwrap();
        let Some(module) = module_of(rel) else {
            continue;
        };
        let Some(&mine) = rank.get(module.as_str()) else {
            problems.push(format!(
                "{module} ({}) has no place in LAYERS",
                rel.display()
            ));
            continue;
        };
        seen.insert(module.clone());
        let text = code(&std::fs::read_to_string(f).unwrap());
        // The parent of `super::` (a mod.rs is its own module's file).
        let is_mod_rs = rel.file_name().is_some_and(|n| n == "mod.rs");
        let parent = match module.rsplit_once("::") {
            Some((p, _)) => p.to_string(),
            None => String::new(),
        };
        let mut named = Vec::new();
        for (marker, base) in [("crate::", String::new()), ("super::", parent.clone())] {
            let mut from = 0;
            while let Some(i) = text[from..].find(marker) {
                let at = from + i;
                from = at + marker.len();
                // Not part of a longer path such as `lazyfree::crate::` or `a_super::`.
                let before = text[..at].chars().next_back();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                    continue;
                }
                paths(&base, &text[from..], &mut named);
            }
        }
        // A mod.rs using its children by relative path (`use child::X;`, `pub use child::X;`).
        if is_mod_rs || module == "lib" {
            for line in text.lines() {
                let l = line.trim_start();
                let l = l.strip_prefix("pub(crate) ").unwrap_or(l);
                let l = l.strip_prefix("pub ").unwrap_or(l);
                if let Some(rest) = l.strip_prefix("use ") {
                    if !rest.starts_with("crate::")
                        && !rest.starts_with("super::")
                        && !rest.starts_with("std::")
                    {
                        paths(&module, rest, &mut named);
                    }
                }
            }
        }
        for p in named {
            let Some(target) = resolve(&p, &known) else {
                continue; // an item of the crate root, or outside the crate
            };
            if target == module {
                continue;
            }
            let theirs = rank[target.as_str()];
            if theirs > mine {
                problems.push(format!(
                    "{module} uses {p} (module {target}), which is placed after it in LAYERS"
                ));
            }
        }
    }
    for m in LAYERS {
        if !seen.contains(*m) {
            problems.push(format!("LAYERS names {m}, which has no file"));
        }
    }
    assert!(
        problems.is_empty(),
        "the module layering is broken:\n{}",
        problems.join("\n")
    );
}
