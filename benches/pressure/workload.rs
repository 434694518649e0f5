//! The image viewer: decoded tiles, their compressed form, the decoder, the check of every byte
//! read, and the path of the viewport.
//!
//! The image is a grid of tiles 1024 pixels wide (RGBA: 4096 bytes, one page, per tile row),
//! whose heights depend on the grid row (1 to 8 MiB per tile; 32 MiB per column of tiles). A
//! tile is stored LZ4-compressed in 64 KiB blocks (lazyfree's default fill chunk) and "decoded"
//! by decompressing them with `lz4_flex`: real work in proportion to the bytes made.
//!
//! A viewport of 2048 × 1024 pixels moves one step per frame ([`Path`]): sweeping, it pans over
//! the whole image in horizontal bands (serpentine), 512 pixels per frame, so each row of pixels
//! is shown in four frames in a row; exploring, it wanders (a random walk with momentum). Each
//! frame reads the visible part of every tile it overlaps (only the visible rows, and in them
//! the visible bytes) and checks every byte read.

use std::cell::RefCell;
use std::ops::Range;
use std::time::Instant;

use crate::common::Fresh;

/// Bytes per tile row: 1024 RGBA pixels.
pub const ROW: usize = 4096;
pub const TILE_PX: usize = ROW / 4;
/// LZ4 block: the unit of compression, and lazyfree's default fill chunk.
pub const BLOCK: usize = 64 << 10;
/// Rows per tile, by grid row: 8, 2, 4, 1, 5, 3, 8 and 1 MiB; 32 MiB per column of tiles.
pub const HEIGHTS: [usize; 8] = [2048, 512, 1024, 256, 1280, 768, 2048, 256];
pub const COLUMN_BYTES: usize = 32 << 20;
/// The viewport, in pixels, and how far it moves per frame.
pub const VIEW_W: usize = 2048;
pub const VIEW_H: usize = 1024;
pub const STEP: usize = 512;
/// How far the exploring viewport moves per frame up or down, in rows.
const STEP_Y: usize = 256;
/// Bytes per run of one repeated 8-byte value in a tile's content (about 6:1 with LZ4).
const RUN: usize = 64;

/// One read of a tile in a frame: rows `rows`, bytes `bytes` of each row.
#[derive(Clone, Debug)]
pub struct Use {
    pub tile: usize,
    pub rows: Range<usize>,
    pub bytes: Range<usize>,
}

impl Use {
    /// The tile offsets read, one range per row.
    pub fn spans(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        self.rows
            .clone()
            .map(|r| r * ROW + self.bytes.start..r * ROW + self.bytes.end)
    }
}

pub struct Layout {
    pub cols: usize,
    /// First pixel row of each grid row, and the image's height last.
    tops: [usize; HEIGHTS.len() + 1],
    /// Tiles kept pinned (locked) for the whole run.
    pub pinned: Vec<usize>,
}

impl Layout {
    /// The grid holding `working_set` bytes of decoded tiles (a multiple of 32 MiB, at least 64).
    pub fn new(working_set: usize) -> Layout {
        assert!(
            working_set % COLUMN_BYTES == 0 && working_set >= 2 * COLUMN_BYTES,
            "working set of {working_set} bytes: use a multiple of 32 MiB, at least 64 MiB"
        );
        let cols = working_set / COLUMN_BYTES;
        let mut tops = [0; HEIGHTS.len() + 1];
        for (g, h) in HEIGHTS.iter().enumerate() {
            tops[g + 1] = tops[g] + h;
        }
        // A few tiles the viewer keeps (2, 1 and 3 MiB), spread over the image.
        let pinned = vec![cols + 1, 3 * cols + cols / 2, 5 * cols + cols - 2];
        Layout { cols, tops, pinned }
    }

    pub fn tiles(&self) -> usize {
        self.cols * HEIGHTS.len()
    }

    /// Tile `t` is grid row `t / cols`, column `t % cols`.
    pub fn len(&self, t: usize) -> usize {
        HEIGHTS[t / self.cols] * ROW
    }

    pub fn total(&self) -> usize {
        (0..self.tiles()).map(|t| self.len(t)).sum()
    }

    /// The frames of each of `passes` passes along `path`, each frame the list of tile reads
    /// it makes.
    pub fn passes(&self, path: Path, passes: usize) -> Vec<Vec<Vec<Use>>> {
        let sweep = self.sweep();
        match path {
            Path::Sweep => vec![sweep; passes],
            Path::Explore => {
                let all = self.explore(sweep.len() * passes);
                all.chunks(sweep.len()).map(<[_]>::to_vec).collect()
            }
        }
    }

    fn size(&self) -> (usize, usize) {
        (self.cols * TILE_PX, self.tops[HEIGHTS.len()])
    }

    /// Over the whole image in horizontal bands, serpentine.
    fn sweep(&self) -> Vec<Vec<Use>> {
        let (width, height) = self.size();
        let steps = (width - VIEW_W) / STEP + 1;
        let mut frames = Vec::new();
        for band in 0..height.div_ceil(VIEW_H) {
            for s in 0..steps {
                let s = if band % 2 == 0 { s } else { steps - 1 - s };
                frames.push(self.frame(s * STEP, band * VIEW_H));
            }
        }
        frames
    }

    /// A walk of `n` frames from the centre: one step (512 pixels across or 256 rows down or
    /// up) per frame, keeping its direction three times in four, turning back at the edges.
    fn explore(&self, n: usize) -> Vec<Vec<Use>> {
        const DIRS: [(isize, isize); 4] = [(1, 0), (-1, 0), (0, 1), (0, -1)];
        let (width, height) = self.size();
        let (xs, ys) = (
            ((width - VIEW_W) / STEP) as isize,
            ((height - VIEW_H) / STEP_Y) as isize,
        );
        let (mut x, mut y, mut d) = (xs / 2, ys / 2, 0);
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut frames = Vec::with_capacity(n);
        for _ in 0..n {
            frames.push(self.frame(x as usize * STEP, y as usize * STEP_Y));
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if rng % 4 == 0 {
                d = (rng >> 8) as usize % 4;
            }
            let (mut nx, mut ny) = (x + DIRS[d].0, y + DIRS[d].1);
            if !(0..=xs).contains(&nx) || !(0..=ys).contains(&ny) {
                d ^= 1; // the opposite direction
                (nx, ny) = (x + DIRS[d].0, y + DIRS[d].1);
            }
            (x, y) = (nx.clamp(0, xs), ny.clamp(0, ys));
        }
        frames
    }

    /// The reads of the frame whose viewport's top left corner is at pixel `x0`, row `y0`.
    fn frame(&self, x0: usize, y0: usize) -> Vec<Use> {
        let (width, height) = self.size();
        let (x1, y1) = ((x0 + VIEW_W).min(width), (y0 + VIEW_H).min(height));
        let mut frame = Vec::new();
        for g in 0..HEIGHTS.len() {
            let (top, bottom) = (self.tops[g], self.tops[g + 1]);
            if bottom <= y0 || top >= y1 {
                continue;
            }
            for c in 0..self.cols {
                let (left, right) = (c * TILE_PX, (c + 1) * TILE_PX);
                if right <= x0 || left >= x1 {
                    continue;
                }
                frame.push(Use {
                    tile: g * self.cols + c,
                    rows: y0.max(top) - top..y1.min(bottom) - top,
                    bytes: (x0.max(left) - left) * 4..(x1.min(right) - left) * 4,
                });
            }
        }
        frame
    }
}

/// How the viewport moves in a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Pans over the whole image in horizontal bands: every row of every tile is shown in
    /// each pass, four times in a row.
    Sweep,
    /// Wanders: a random walk with momentum, as many frames per pass as a sweep, each pass
    /// going on from where the last one ended.
    Explore,
}

impl Path {
    pub const ALL: [Path; 2] = [Path::Sweep, Path::Explore];

    pub fn name(self) -> &'static str {
        match self {
            Path::Sweep => "sweep",
            Path::Explore => "explore",
        }
    }

    pub fn from_name(s: &str) -> Option<Path> {
        Path::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// The value repeated through run `run` of tile `tile` (splitmix64's finaliser).
#[inline]
fn word(tile: usize, run: usize) -> u64 {
    let mut z = ((tile as u64) << 40 ^ run as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The decoded bytes of tile `tile` at `off` (what decoding must produce).
fn expected(tile: usize, off: usize, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let run = (off + i) / RUN;
        let w = word(tile, run).to_le_bytes();
        let end = ((run + 1) * RUN - off).min(buf.len());
        for (j, b) in buf[i..end].iter_mut().enumerate() {
            *b = w[(off + i + j) % 8];
        }
        i = end;
    }
}

/// Checks bytes read from tile `tile` at `off`: the first wrong byte (its offset in the tile,
/// the byte read, the byte expected), if any.
pub fn check(tile: usize, off: usize, got: &[u8]) -> Option<(usize, u8, u8)> {
    let mut i = 0;
    while i < got.len() {
        let p = off + i;
        let run = p / RUN;
        let w = word(tile, run);
        let end = ((run + 1) * RUN - off).min(got.len());
        let whole = p % RUN == 0 && end - i == RUN;
        if !whole
            || !got[i..end]
                .chunks_exact(8)
                .all(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) == w)
        {
            let wb = w.to_le_bytes();
            for (j, &b) in got[i..end].iter().enumerate() {
                let want = wb[(p + j) % 8];
                if b != want {
                    return Some((p + j, b, want));
                }
            }
        }
        i = end;
    }
    None
}

thread_local! {
    /// Where a block only partly asked for is decompressed first.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; BLOCK]);
}

/// The compressed tiles: LZ4 blocks of 64 KiB of decoded bytes each.
pub struct Store {
    blocks: Vec<Vec<Vec<u8>>>,
    lens: Vec<usize>,
}

impl Store {
    pub fn build(layout: &Layout) -> Store {
        let mut blocks = Vec::with_capacity(layout.tiles());
        let mut lens = Vec::with_capacity(layout.tiles());
        // Scratch memory of its own (not the heap's): freeing an 8 MiB heap block would raise
        // glibc's mmap threshold, and the Vec model's tiles would then reuse heap pages charged
        // before the child joined the cgroup.
        let mut plain = Fresh::map(8 << 20);
        for t in 0..layout.tiles() {
            let len = layout.len(t);
            let plain = &mut plain.as_mut_slice()[..len];
            expected(t, 0, plain);
            let tile = plain
                .chunks(BLOCK)
                .map(|b| {
                    let mut c = lz4_flex::block::compress(b);
                    c.shrink_to_fit();
                    c
                })
                .collect();
            blocks.push(tile);
            lens.push(len);
        }
        Store { blocks, lens }
    }

    pub fn compressed_bytes(&self) -> usize {
        self.blocks.iter().flatten().map(Vec::len).sum()
    }

    /// Decodes the bytes of tile `t` at `off` into `buf` (any range inside the tile).
    pub fn decode(&self, t: usize, off: usize, buf: &mut [u8]) -> Result<(), String> {
        let len = self.lens[t];
        let end = off + buf.len();
        if end > len {
            return Err(format!("tile {t}: bytes {off}..{end} asked of {len}"));
        }
        let mut pos = off;
        while pos < end {
            let b = pos / BLOCK;
            let (start, blen) = (b * BLOCK, BLOCK.min(len - b * BLOCK));
            let stop = end.min(start + blen);
            let dst = &mut buf[pos - off..stop - off];
            let n = if pos == start && stop == start + blen {
                lz4_flex::block::decompress_into(&self.blocks[t][b], dst)
            } else {
                SCRATCH.with(|s| {
                    let mut s = s.borrow_mut();
                    let n = lz4_flex::block::decompress_into(&self.blocks[t][b], &mut s[..blen]);
                    dst.copy_from_slice(&s[pos - start..stop - start]);
                    n
                })
            }
            .map_err(|e| format!("tile {t} block {b}: {e}"))?;
            if n != blen {
                return Err(format!("tile {t} block {b}: {n} bytes, wanted {blen}"));
            }
            pos = stop;
        }
        Ok(())
    }

    /// Decoding speed in MB/s, timed over the first column of tiles into memory already
    /// touched (no page faults); then checks what was decoded.
    pub fn decode_mb_per_s(&self, layout: &Layout) -> Result<f64, String> {
        let mut buf = Fresh::map(8 << 20);
        let buf = buf.as_mut_slice();
        buf.fill(1);
        let (mut bytes, mut secs) = (0usize, 0.0);
        for t in (0..layout.tiles()).step_by(layout.cols) {
            let len = layout.len(t);
            let t0 = Instant::now();
            self.decode(t, 0, &mut buf[..len])?;
            secs += t0.elapsed().as_secs_f64();
            bytes += len;
            if let Some((o, got, want)) = check(t, 0, &buf[..len]) {
                return Err(format!(
                    "tile {t} as decoded: byte {o} is {got:#04x}, not {want:#04x}"
                ));
            }
        }
        Ok(bytes as f64 / secs / 1e6)
    }
}
