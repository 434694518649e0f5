//! Bench 3, realistic rebuild: the regenerate callback decompresses LZ4 (`lz4_flex`, one block
//! per 64 KiB fill chunk) or decodes a PNG (`png`, the whole image at once).
//!
//! lazyfree: drop every page of the entry through real reclaim, then read one byte per page.
//! Baseline, same run: decode into a new `Vec` on every use (no cache at all).
//! The side file records the bytes the kernel got back per reclaim, against the compressed
//! bytes the program keeps to rebuild them.

mod common;

use std::hint::black_box;
use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{drop_pages, size_label, touch_pages, Extra, PAGE};
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput};
use lazyfree::{Cache, Config, Entry, FillChunk};

const LZ4_BLOCK: usize = 64 << 10;
const SWAY_PNG: &str = "/usr/share/backgrounds/sway/Sway_Wallpaper_Blue_1920x1080.png";

/// Log-like text: timestamps, levels, paths and numbers (compresses about 3:1 with LZ4).
fn log_text(len: usize) -> Vec<u8> {
    const LEVEL: [&str; 4] = ["INFO ", "DEBUG", "WARN ", "INFO "];
    const PATH: [&str; 6] = [
        "/api/v1/items",
        "/api/v1/users",
        "/static/app.js",
        "/api/v2/search",
        "/health",
        "/api/v1/orders",
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut out = Vec::with_capacity(len + 256);
    let mut t = 1_700_000_000_000u64;
    while out.len() < len {
        t += next() % 50;
        let r = next();
        let line = format!(
            "{}.{:03} {} worker-{:02} req={:016x} path={}/{} status={} bytes={} dur_ms={}\n",
            t / 1000,
            t % 1000,
            LEVEL[(r % 4) as usize],
            (r >> 8) % 16,
            next(),
            PATH[((r >> 16) % 6) as usize],
            (r >> 24) % 100_000,
            [200, 200, 200, 304, 404, 500][((r >> 40) % 6) as usize],
            (r >> 44) % 65_536,
            (r >> 56) % 200,
        );
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(len);
    out
}

/// The PNG to decode: the sway wallpaper if installed, else a generated 1920x1080 RGB image
/// (gradients and noise) encoded here.
fn png_source() -> (Vec<u8>, String) {
    if let Ok(b) = std::fs::read(SWAY_PNG) {
        return (
            b,
            "Sway_Wallpaper_Blue_1920x1080.png (sway-backgrounds)".into(),
        );
    }
    let (w, h) = (1920u32, 1080u32);
    let noise = common::random_bytes((w * h) as usize, 7);
    let mut px = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let n = noise[(y * w + x) as usize] & 0x0f;
            px.extend_from_slice(&[
                (x * 255 / w) as u8 ^ n,
                (y * 255 / h) as u8,
                ((x + y) % 256) as u8,
            ]);
        }
    }
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc.write_header().expect("png header");
    wr.write_image_data(&px).expect("png data");
    wr.finish().expect("png end");
    (
        out,
        "generated 1920x1080 RGB (sway-backgrounds not installed)".into(),
    )
}

fn png_decode_into(png: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut r = png::Decoder::new(Cursor::new(png))
        .read_info()
        .map_err(|e| e.to_string())?;
    r.next_frame(out).map_err(|e| e.to_string())?;
    Ok(())
}

fn png_len(png: &[u8]) -> usize {
    let r = png::Decoder::new(Cursor::new(png))
        .read_info()
        .expect("a valid png");
    r.output_buffer_size().expect("png output size")
}

/// Benches rebuild-on-touch of `entry` against `decode` into a new Vec; returns the bytes the
/// kernel got back per reclaim (mean) and the interleaved ratio of the two.
fn compare(
    g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    label: &str,
    entry: &Entry,
    decode: impl Fn() -> Vec<u8>,
) -> (f64, f64) {
    g.throughput(Throughput::Bytes(entry.len() as u64));
    g.bench_function(BenchmarkId::new("decode_to_vec", label), |b| {
        b.iter(|| black_box(decode()))
    });
    let mut dropped = 0u64;
    let mut n = 0u64;
    g.bench_function(BenchmarkId::new("lazyfree", label), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                dropped += drop_pages(entry) as u64;
                n += 1;
                let t = Instant::now();
                black_box(touch_pages(entry));
                total += t.elapsed();
            }
            total
        })
    });
    let rounds = if common::quick() { 5 } else { 31 };
    let paired = common::paired_ratio(
        rounds,
        || common::timed_rebuild(entry),
        || {
            let t = Instant::now();
            black_box(decode());
            t.elapsed()
        },
    );
    ((dropped * PAGE as u64) as f64 / n.max(1) as f64, paired)
}

fn bench(c: &mut Criterion, extra: &mut Extra) {
    let len = if common::quick() { 1 << 20 } else { 8 << 20 };
    let text = log_text(len);
    let blocks: Arc<Vec<Vec<u8>>> = Arc::new(
        text.chunks(LZ4_BLOCK)
            .map(lz4_flex::block::compress)
            .collect(),
    );
    let packed: usize = blocks.iter().map(Vec::len).sum();

    let cache: Cache<u32> = Cache::new(Config::default().fill_chunk(FillChunk::Bytes(LZ4_BLOCK)))
        .expect("a monitor-mode cache (needs userfaultfd)");
    let bl = blocks.clone();
    let lz4 = cache
        .insert(0, len, move |off, buf: &mut [u8]| {
            let n = lz4_flex::block::decompress_into(&bl[off / LZ4_BLOCK], buf)
                .map_err(|e| e.to_string())?;
            if n != buf.len() {
                return Err(format!("block at {off}: {n} bytes, wanted {}", buf.len()));
            }
            Ok(())
        })
        .expect("insert");
    touch_pages(&lz4);
    assert!(lz4[..] == text[..], "LZ4 rebuild differs from the text");

    let mut g = c.benchmark_group("realistic");
    g.sampling_mode(SamplingMode::Flat);
    let bl = blocks.clone();
    let (back, paired) = compare(&mut g, &format!("lz4_{}", size_label(len)), &lz4, || {
        let mut v = vec![0u8; len];
        for (i, b) in bl.iter().enumerate() {
            lz4_flex::block::decompress_into(b, &mut v[i * LZ4_BLOCK..]).expect("lz4");
        }
        v
    });
    assert!(lz4[..] == text[..], "LZ4 rebuild differs from the text");
    extra
        .num("lz4_entry_bytes", len as f64)
        .num("lz4_compressed_bytes", packed as f64)
        .num("lz4_bytes_returned_per_reclaim", back)
        .num("lz4_interleaved_ratio", paired);

    let (png, what) = png_source();
    let png = Arc::new(png);
    let plen = png_len(&png);
    // PNG decoding is all or nothing: the whole image is one fill chunk.
    let cache_png: Cache<u32> = Cache::new(Config::default().fill_chunk(FillChunk::Entry))
        .expect("a monitor-mode cache (needs userfaultfd)");
    let p = png.clone();
    let img = cache_png
        .insert(1, plen, move |_off, buf: &mut [u8]| {
            png_decode_into(&p, buf)
        })
        .expect("insert");
    let mut want = vec![0u8; plen];
    png_decode_into(&png, &mut want).expect("png decode");
    touch_pages(&img);
    assert!(
        img[..] == want[..],
        "PNG rebuild differs from the decoded image"
    );
    let p = png.clone();
    let (back, paired) = compare(&mut g, "png_1920x1080", &img, || {
        let mut v = vec![0u8; plen];
        png_decode_into(&p, &mut v).expect("png");
        v
    });
    assert!(
        img[..] == want[..],
        "PNG rebuild differs from the decoded image"
    );
    g.finish();
    extra
        .num("png_entry_bytes", plen as f64)
        .num("png_compressed_bytes", png.len() as f64)
        .num("png_bytes_returned_per_reclaim", back)
        .num("png_interleaved_ratio", paired)
        .text("png_source", &what);
}

fn main() {
    let mut c = common::criterion();
    let mut extra = Extra::default();
    bench(&mut c, &mut extra);
    extra.write("realistic");
    c.final_summary();
}
