//! The lazyfree demo: a cache of "decoded tiles" that the kernel takes back and lazyfree rebuilds
//! on touch. No arguments needed: `cargo run --release --example demo`.
//!
//! Each tile is a 1 MiB buffer computed from its number (a stand-in for decompressing an image).
//! The demo inserts 64 tiles, pushes them through the kernel's real reclaim, reads them all again
//! and checks every byte, printing what happened at each step.

use std::time::Instant;

use lazyfree::{testing, Cache, Config, Mode, RegenError};

const TILE: usize = 1 << 20;
const TILES: u64 = 64;

/// "Decodes" the bytes at `offset` of tile `n` into `buf`.
fn decode(n: u64, offset: usize, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let p = (offset + i) as u64;
        *b = (p.wrapping_mul(31) ^ n.wrapping_mul(0x9E37_79B9) ^ (p >> 12)) as u8;
    }
}

fn check(cache: &Cache<u64>) -> usize {
    let mut want = vec![0u8; TILE];
    let mut bad = 0;
    for n in 0..TILES {
        let tile = cache.get(&n).expect("tile present");
        decode(n, 0, &mut want);
        // `read` works in every mode (a pin for the call where reads need one): no branching
        // on the mode Mode::Auto chose.
        bad += tile
            .read(|bytes| bytes.iter().zip(&want).filter(|(a, b)| a != b).count())
            .expect("read a tile");
    }
    bad
}

fn main() -> Result<(), lazyfree::Error> {
    let cache: Cache<u64> = Cache::new(Config::default().mode(Mode::Auto))?;
    println!(
        "lazyfree demo: {TILES} tiles of {} KiB, {:?} mode",
        TILE / 1024,
        cache.stats().mode
    );

    let t = Instant::now();
    for n in 0..TILES {
        cache.insert(n, TILE, move |offset, buf: &mut [u8]| {
            decode(n, offset, buf);
            Ok::<(), RegenError>(())
        })?;
    }
    println!("inserted lazily in {:?}: {}", t.elapsed(), cache.stats());

    let t = Instant::now();
    let bad = check(&cache);
    println!(
        "first read (decoded on touch) in {:?}, {bad} wrong bytes",
        t.elapsed()
    );
    println!("  {}", cache.stats());

    let entries: Vec<_> = (0..TILES).filter_map(|n| cache.get(&n)).collect();
    let dropped = testing::reclaim_all(&entries);
    drop(entries);
    println!(
        "kernel reclaim (MADV_PAGEOUT) dropped {dropped} pages ({} MiB)",
        (dropped * 4096) >> 20
    );
    println!("  {}", cache.stats());

    let before = cache.stats();
    let t = Instant::now();
    let bad2 = check(&cache);
    let after = cache.stats();
    println!(
        "read again in {:?}: {} pages rebuilt by {} regenerate calls, {bad2} wrong bytes",
        t.elapsed(),
        after.pages_regenerated - before.pages_regenerated,
        after.regenerate_calls - before.regenerate_calls
    );
    println!("  {after}");
    println!(
        "  footprint: {} KiB resident ({} KiB pinned, {} KiB volatile: the kernel may take them \
         at once), {} pages taken back by the kernel and rebuilt so far",
        after.resident_bytes >> 10,
        after.resident_pinned_bytes >> 10,
        after.resident_volatile_bytes >> 10,
        after.pages_reclaimed
    );

    {
        let tile = cache.get(&0).expect("tile 0");
        let pinned = tile.pin()?;
        println!(
            "pinned tile 0: {} bytes resident, first byte {}",
            pinned.len(),
            pinned[0]
        );
    }

    if bad + bad2 != 0 {
        eprintln!("FAILED: {} wrong bytes", bad + bad2);
        std::process::exit(1);
    }
    println!("ok: every byte of every tile verified after reclaim");
    Ok(())
}
