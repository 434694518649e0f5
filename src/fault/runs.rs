//! Finding the missing pages of a chunk (mincore), as runs.

use crate::sys::mem::{self, PAGE};

/// Calls `f(first_page, pages)` for each run of missing pages in `[addr, addr + pages*PAGE)`.
/// No allocation.
pub(crate) fn missing_runs(addr: usize, pages: usize, mut f: impl FnMut(usize, usize)) {
    let mut vec = [0u8; 512];
    let mut run: Option<(usize, usize)> = None;
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(vec.len());
        if mem::mincore(addr + done * PAGE, n, &mut vec).is_err() {
            vec[..n].fill(0); // unknown: treat as missing, the fill skips present pages anyway
        }
        for (i, b) in vec[..n].iter().enumerate() {
            let p = done + i;
            if b & 1 == 0 {
                run = match run {
                    Some((s, l)) if s + l == p => Some((s, l + 1)),
                    Some((s, l)) => {
                        f(s, l);
                        Some((p, 1))
                    }
                    None => Some((p, 1)),
                };
            }
        }
        done += n;
    }
    if let Some((s, l)) = run {
        f(s, l);
    }
}

/// Runs of missing pages of one chunk, relative to its first page. More runs than fit are
/// folded into one run over the whole chunk (the copy skips present pages).
pub(crate) struct Runs {
    list: [(usize, usize); 64],
    len: usize,
}

impl Runs {
    pub(crate) fn of(start: usize, pages: usize) -> Runs {
        let mut runs = Runs {
            list: [(0, 0); 64],
            len: 0,
        };
        let mut overflow = false;
        missing_runs(start, pages, |s, l| {
            if runs.len < runs.list.len() {
                runs.list[runs.len] = (s, l);
                runs.len += 1;
            } else {
                overflow = true;
            }
        });
        if overflow {
            runs.list[0] = (0, pages);
            runs.len = 1;
        }
        runs
    }

    /// One run over all `pages` pages of a chunk, looked up nowhere.
    pub(crate) fn whole(pages: usize) -> Runs {
        let mut runs = Runs {
            list: [(0, 0); 64],
            len: 1,
        };
        runs.list[0] = (0, pages);
        runs
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn all(&self) -> &[(usize, usize)] {
        &self.list[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mapping of `pages` pages with the pages in `present` touched.
    fn mapping(pages: usize, present: &[usize]) -> usize {
        let base = mem::map_anon(pages * PAGE).expect("mmap") as usize;
        for &p in present {
            // SAFETY: inside the fresh mapping.
            unsafe { *((base + p * PAGE) as *mut u8) = 1 };
        }
        base
    }

    #[test]
    fn runs_of_missing_pages() {
        let base = mapping(10, &[0, 3, 4, 9]);
        let mut runs = Vec::new();
        missing_runs(base, 10, |s, l| runs.push((s, l)));
        assert_eq!(runs, [(1, 2), (5, 4)]);
        assert_eq!(Runs::of(base, 10).all(), [(1, 2), (5, 4)]);
        // SAFETY: our mapping, no reference into it.
        unsafe { mem::unmap(base as *mut u8, 10 * PAGE) };
    }

    #[test]
    fn all_present_and_all_missing() {
        let base = mapping(4, &[0, 1, 2, 3]);
        assert!(Runs::of(base, 4).is_empty());
        // SAFETY: our mapping.
        unsafe { mem::unmap(base as *mut u8, 4 * PAGE) };
        let base = mapping(600, &[]);
        // More pages than one mincore batch of 512: still one run.
        assert_eq!(Runs::of(base, 600).all(), [(0, 600)]);
        // SAFETY: our mapping.
        unsafe { mem::unmap(base as *mut u8, 600 * PAGE) };
    }

    #[test]
    fn too_many_runs_fold_into_the_whole_chunk() {
        let present: Vec<usize> = (0..200).step_by(2).collect();
        let base = mapping(200, &present);
        assert_eq!(Runs::of(base, 200).all(), [(0, 200)]);
        // SAFETY: our mapping.
        unsafe { mem::unmap(base as *mut u8, 200 * PAGE) };
    }
}
