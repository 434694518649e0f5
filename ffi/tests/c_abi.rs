//! The C side: builds liblazyfree (cargo, through examples/c/Makefile), the C unit tests
//! (ffi/tests/c/lazyfree_test.c, and shared_test.c for the shared cache) and the libpng examples
//! (examples/c/png_cache.c, and png_shared.c: one cache decoded into by several processes) with
//! `-Wall -Wextra -Werror -pedantic`, statically, dynamically and under ASAN+UBSAN, and runs
//! them against the real kernel. LeakSanitizer is on (`detect_leaks=1`): it works with the
//! monitor threads running.
//!
//! What each part needs: the C unit tests and `make install` cc and make only; png_cache and
//! png_shared (and building against the installed .pc files) pkg-config and libpng-dev too. The
//! PNGs decoded are
//! those of the Debian package sway-backgrounds, or where it is not installed, PNGs of several
//! kinds written by the `png` crate into the target directory (then libpng must also decode each
//! to exactly the pixels written). A part whose tools are missing prints `SKIPPED <test>: <what
//! to install>` past the harness's capture and returns; `.ci/run` installs every package and
//! fails when one of these tests was skipped.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where png_cache looks for PNG files by default (the Debian package sway-backgrounds).
const PNG_DIR: &str = "/usr/share/backgrounds/sway";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("ffi/ has a parent")
        .to_path_buf()
}

/// cargo's target directory and this build's profile directory name ("debug" or "release"),
/// from where this test binary lives: <target>/<profile>/deps/c_abi-<hash>.
fn target_and_profile() -> (PathBuf, String) {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in <target>/<profile>/deps");
    let profile = profile_dir
        .file_name()
        .expect("profile directory name")
        .to_string_lossy()
        .into_owned();
    let target = profile_dir
        .parent()
        .expect("target directory")
        .to_path_buf();
    (target, profile)
}

/// Runs `cmd` to completion (killing it after `limit`) and returns its output.
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}: killed (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().expect("stdout reader"),
        stderr: err_t.join().expect("stderr reader"),
    }
}

/// Writes a line straight to stderr, past the test harness's output capture, so that it shows
/// in every `cargo test` run.
fn loud(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `SKIPPED <test>: <why>`, straight to stderr: a test that could not run here says so in every
/// `cargo test` run (`.ci/run` fails on these).
fn skipped(test: &str, why: &str) {
    loud(&format!("SKIPPED {test}: {why}"));
}

/// Whether `cmd args` runs and succeeds.
fn tool_works(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// FNV-1a over `bytes`, as png_cache checksums an image's RGBA bytes.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The PNG files the png_cache tests decode.
struct Pngs {
    files: Vec<PathBuf>,
    /// Set when sway-backgrounds is not installed: the directory the files were written to
    /// (png_cache reads it through `PNG_CACHE_DIR`) and, per file, the checksum of the RGBA
    /// pixels written, which png_cache's first decode (libpng) must give.
    generated: Option<(PathBuf, Vec<u64>)>,
}

/// The PNGs of sway-backgrounds where that package is installed; otherwise test images written
/// once per test process into the target directory.
fn pngs() -> &'static Pngs {
    static PNGS: OnceLock<Pngs> = OnceLock::new();
    PNGS.get_or_init(|| {
        let mut files: Vec<PathBuf> = std::fs::read_dir(PNG_DIR)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "png"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        if !files.is_empty() {
            return Pngs {
                files,
                generated: None,
            };
        }
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("png-fixtures");
        let (files, sums): (Vec<PathBuf>, Vec<u64>) = write_fixtures(&dir).into_iter().unzip();
        loud(&format!(
            "NOTE png_cache test images: no PNG files in {PNG_DIR} (Debian package \
             sway-backgrounds); decoding {} PNGs written by the png crate into {}",
            files.len(),
            dir.display()
        ));
        Pngs {
            files,
            generated: Some((dir, sums)),
        }
    })
}

/// Writes the test images into `dir` (every other PNG there is removed, so that png_cache's
/// default directory holds exactly these) and returns each file with the checksum of its pixels
/// as png_cache decodes them: 8-bit RGBA, through libpng's expand, strip_16, gray_to_rgb and
/// filler. Deterministic; each file is written whole and renamed into place, so concurrent test
/// processes may do this at once.
fn write_fixtures(dir: &Path) -> Vec<(PathBuf, u64)> {
    use png::{BitDepth as D, ColorType as C, Filter as F};
    // Kind and size; a different row filter each, so that libpng undoes every filter.
    let specs: [(&str, u32, u32, F); 6] = [
        ("rgb8", 1136, 640, F::Adaptive),
        ("indexed-trns", 1024, 768, F::NoFilter),
        ("rgba8", 768, 1024, F::Paeth),
        ("gray8", 1366, 768, F::Sub),
        ("graya8", 640, 480, F::Up),
        ("rgb16", 800, 600, F::Avg),
    ];
    // Numbered so that the first two, which most tests decode, sort first.
    let names: Vec<String> = specs
        .iter()
        .enumerate()
        .map(|(i, (kind, w, h, _))| format!("{}-{kind}-{w}x{h}.png", i + 1))
        .collect();
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    for old in std::fs::read_dir(dir)
        .expect("read the fixture directory")
        .flatten()
    {
        let name = old.file_name().to_string_lossy().into_owned();
        if name.ends_with(".png") && !names.contains(&name) {
            let _ = std::fs::remove_file(old.path());
        }
    }
    // A palette of 256 colours, each with its own alpha (tRNS).
    let palette: Vec<u8> = (0..256u32)
        .flat_map(|i| [i as u8, (i * 7 % 256) as u8, (255 - i) as u8])
        .collect();
    let trns: Vec<u8> = (0..256u32).map(|i| (i * 13 % 256) as u8).collect();
    specs
        .iter()
        .zip(&names)
        .enumerate()
        .map(|(seed, (&(kind, w, h, filter), name))| {
            let (color, depth) = match kind {
                "rgb8" => (C::Rgb, D::Eight),
                "indexed-trns" => (C::Indexed, D::Eight),
                "rgba8" => (C::Rgba, D::Eight),
                "gray8" => (C::Grayscale, D::Eight),
                "graya8" => (C::GrayscaleAlpha, D::Eight),
                "rgb16" => (C::Rgb, D::Sixteen),
                other => unreachable!("no fixture of kind {other}"),
            };
            let mut raw = Vec::new(); // what the encoder is given
            let mut rgba = Vec::with_capacity(w as usize * h as usize * 4); // what libpng gives
            for y in 0..h {
                for x in 0..w {
                    // Smooth gradients with a little deterministic noise: real compression work.
                    let mut n = x.wrapping_mul(0x9e37_79b1)
                        ^ y.wrapping_mul(0x85eb_ca77)
                        ^ (seed as u32 + 1).wrapping_mul(0xc2b2_ae3d);
                    n ^= n >> 15;
                    n = n.wrapping_mul(0x2c1b_3c6d);
                    n ^= n >> 12;
                    let r = (x * 255 / w) as u8 ^ (n & 7) as u8;
                    let g = (y * 255 / h) as u8 ^ (n >> 8 & 7) as u8;
                    let b = ((x + y) % 256) as u8;
                    let a = (((x ^ y) * 3) % 256) as u8;
                    match kind {
                        "rgb8" => {
                            raw.extend_from_slice(&[r, g, b]);
                            rgba.extend_from_slice(&[r, g, b, 0xff]);
                        }
                        "indexed-trns" => {
                            let i = usize::from(r ^ b);
                            raw.push(i as u8);
                            rgba.extend_from_slice(&palette[i * 3..i * 3 + 3]);
                            rgba.push(trns[i]);
                        }
                        "rgba8" => {
                            raw.extend_from_slice(&[r, g, b, a]);
                            rgba.extend_from_slice(&[r, g, b, a]);
                        }
                        "gray8" => {
                            raw.push(g);
                            rgba.extend_from_slice(&[g, g, g, 0xff]);
                        }
                        "graya8" => {
                            raw.extend_from_slice(&[r, a]);
                            rgba.extend_from_slice(&[r, r, r, a]);
                        }
                        _ => {
                            // rgb16: big-endian samples; libpng keeps the high byte (strip_16).
                            let lo = (n >> 16) as u8;
                            raw.extend_from_slice(&[r, lo, g, lo ^ 0x55, b, !lo]);
                            rgba.extend_from_slice(&[r, g, b, 0xff]);
                        }
                    }
                }
            }
            let mut bytes = Vec::new();
            let mut enc = png::Encoder::new(&mut bytes, w, h);
            enc.set_color(color);
            enc.set_depth(depth);
            enc.set_filter(filter);
            if color == C::Indexed {
                enc.set_palette(palette.as_slice());
                enc.set_trns(trns.as_slice());
            }
            let mut wr = enc.write_header().expect("png header");
            wr.write_image_data(&raw).expect("png data");
            wr.finish().expect("png end");
            let path = dir.join(name);
            let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
            std::fs::write(&tmp, &bytes).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
            std::fs::rename(&tmp, &path)
                .unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
            (path, fnv1a(&rgba))
        })
        .collect()
}

struct Built {
    dir: PathBuf,
    profile: String,
    target: PathBuf,
    /// Why png_cache could not be built here (no pkg-config or no libpng), or None.
    no_png: Option<String>,
}

/// Builds once per test process: `make -C examples/c all sanitize`, or, where pkg-config or
/// libpng is missing, `make -C examples/c unit` (the C unit tests and the library). Err says why
/// nothing could be built (no cc or make).
fn built() -> &'static Result<Built, String> {
    static BUILT: OnceLock<Result<Built, String>> = OnceLock::new();
    BUILT.get_or_init(|| {
        for (tool, package) in [("cc", "gcc"), ("make", "make")] {
            if !tool_works(tool, &["--version"]) {
                return Err(format!(
                    "no working `{tool}` here, which builds the C tests: install the Debian \
                     package {package}"
                ));
            }
        }
        let no_png = if !tool_works("pkg-config", &["--version"]) {
            Some(
                "no pkg-config here, through which png_cache is built: install the Debian \
                 packages pkg-config and libpng-dev"
                    .to_string(),
            )
        } else if !tool_works("pkg-config", &["--exists", "libpng"]) {
            Some(
                "pkg-config finds no libpng, with which png_cache decodes: install the Debian \
                 package libpng-dev"
                    .to_string(),
            )
        } else {
            None
        };
        let targets: &[&str] = if no_png.is_none() {
            &["all", "sanitize"]
        } else {
            &["unit"]
        };
        let (target, profile) = target_and_profile();
        // One directory per profile: the pkg-config files there name the profile's library
        // directory, and make does not rewrite them when only PROFILE changes.
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("c-abi-{profile}"));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = run(
            Command::new("make")
                .arg("-C")
                .arg(repo().join("examples/c"))
                .args(targets)
                .arg(format!("BUILD={}", dir.display()))
                .arg(format!("CARGO_TARGET_DIR={}", target.display()))
                .arg(format!("PROFILE={profile}"))
                .arg(format!("CARGO={cargo}")),
            Duration::from_secs(900),
        );
        assert!(
            out.status.success(),
            "make -C examples/c {} failed ({}):\n{}\n{}",
            targets.join(" "),
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        Ok(Built {
            dir,
            profile,
            target,
            no_png,
        })
    })
}

/// The C build for `test`, or None after saying `SKIPPED <test>: why`.
fn c_build(test: &str) -> Option<&'static Built> {
    match built() {
        Ok(b) => Some(b),
        Err(why) => {
            skipped(test, why);
            None
        }
    }
}

/// The C build with png_cache and the PNG files for `test`, or None after saying
/// `SKIPPED <test>: why`.
fn png_build(test: &str) -> Option<(&'static Built, &'static Pngs)> {
    let b = c_build(test)?;
    if let Some(why) = &b.no_png {
        skipped(test, why);
        return None;
    }
    Some((b, pngs()))
}

fn sanitizer_env(cmd: &mut Command) -> &mut Command {
    cmd.env("ASAN_OPTIONS", "detect_leaks=1")
        .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
}

/// The number after `key` in `s` (e.g. "pages_regenerated 123").
fn number_after(s: &str, key: &str) -> u64 {
    let at = s
        .find(key)
        .unwrap_or_else(|| panic!("no `{key}` in the output:\n{s}"));
    s[at + key.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after `{key}` in the output:\n{s}"))
}

/// Checks a png_cache run in `mode` over `files`: every image intact, pages really dropped and
/// rebuilt; for PNGs this test wrote, libpng's decode is the pixels written.
fn check_png_cache(out: &Output, files: &[PathBuf], mode: &str) {
    let images = files.len();
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "png_cache failed ({}):\n{stdout}\n{}",
        out.status,
        text(&out.stderr)
    );
    assert!(stdout.contains(&format!("stats: mode {mode},")), "{stdout}");
    let intact = format!("png_cache: {images} of {images} images intact after reclaim");
    assert!(stdout.contains(&intact), "want `{intact}`:\n{stdout}");
    assert_eq!(
        stdout.matches(" ok (").count(),
        images,
        "one `ok` per image:\n{stdout}"
    );
    assert!(!stdout.contains("MISMATCH"), "{stdout}");
    let dropped = number_after(&stdout, "reclaim:");
    assert!(dropped > 0, "the kernel dropped no page:\n{stdout}");
    assert!(
        number_after(&stdout, "pages_regenerated") >= dropped,
        "{stdout}"
    );
    assert_eq!(number_after(&stdout, "regenerate_failures"), 0, "{stdout}");
    assert_eq!(number_after(&stdout, "failed_entries"), 0, "{stdout}");
    if let Some((_, sums)) = &pngs().generated {
        for (file, want) in pngs().files.iter().zip(sums) {
            if !files.contains(file) {
                continue;
            }
            // The first decode's line: "<path>  <w> x <h>  <n> bytes  checksum <16 hex digits>".
            let path = file.display().to_string();
            let got = stdout
                .lines()
                .find(|l| l.starts_with(&path))
                .and_then(|l| l.split("checksum ").nth(1))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
                .unwrap_or_else(|| panic!("no checksum line for {path}:\n{stdout}"));
            assert_eq!(
                got, *want,
                "libpng decoded {path} to other pixels than the png crate wrote:\n{stdout}"
            );
        }
    }
}

#[test]
fn c_unit_tests_under_asan_and_ubsan() {
    let Some(b) = c_build("c_unit_tests_under_asan_and_ubsan") else {
        return;
    };
    let out = run(
        sanitizer_env(&mut Command::new(b.dir.join("lazyfree_test-asan"))),
        Duration::from_secs(300),
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    print!("{stdout}");
    // Cases the C program could not run here: said past the harness's capture, never silent.
    for line in stdout.lines().filter(|l| l.starts_with("SKIPPED")) {
        loud(&format!("{line} (C unit tests)"));
    }
    if out.status.code() == Some(77) {
        skipped("c_unit_tests_under_asan_and_ubsan", stdout.trim());
        return;
    }
    assert!(
        out.status.success(),
        "C unit tests failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or_default();
    let passed = number_after(last, "");
    assert_eq!(
        last,
        format!("{passed} passed, 0 failed"),
        "{stdout}\n{stderr}"
    );
    assert!(passed > 200, "too few checks ran: {last}");
    assert!(!stderr.contains("runtime error"), "UBSAN:\n{stderr}");
    if b.profile == "debug" {
        // The misuse cases (double release...) run in a debug library only, and must have.
        assert!(!stdout.contains("SKIPPED double-release"), "{stdout}");
    }
}

#[test]
fn c_shared_cache_tests_under_asan_and_ubsan() {
    let Some(b) = c_build("c_shared_cache_tests_under_asan_and_ubsan") else {
        return;
    };
    let out = run(
        sanitizer_env(&mut Command::new(b.dir.join("shared_test-asan"))),
        Duration::from_secs(300),
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    print!("{stdout}");
    if out.status.code() == Some(77) {
        skipped("c_shared_cache_tests_under_asan_and_ubsan", stdout.trim());
        return;
    }
    assert!(
        out.status.success(),
        "C shared cache tests failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or_default();
    let passed = number_after(last, "");
    assert_eq!(
        last,
        format!("{passed} passed, 0 failed"),
        "{stdout}\n{stderr}"
    );
    assert!(passed > 300, "too few checks ran: {last}");
    // The fork case ran: both processes read, the file counted each chunk once.
    let fork = stdout
        .lines()
        .find(|l| l.starts_with("two processes:"))
        .unwrap_or_else(|| panic!("no two-process line:\n{stdout}"));
    assert_eq!(
        number_after(fork, "two processes:"),
        number_after(fork, "rebuilt"),
        "{fork}"
    );
    assert!(!stderr.contains("runtime error"), "UBSAN:\n{stderr}");
}

/// Checks a png_shared run with `children` children over `files`: every child found every image
/// intact, the file counted each chunk once and the children's callbacks ran once per chunk;
/// for PNGs this test wrote, the bytes are the pixels written.
fn check_png_shared(out: &Output, files: &[PathBuf], children: usize) {
    let images = files.len();
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "png_shared failed ({}):\n{stdout}\n{}",
        out.status,
        text(&out.stderr)
    );
    assert!(!stdout.contains("MISMATCH"), "{stdout}");
    let intact = format!(": {images} of {images} images intact");
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("child ") && l.contains(&intact))
            .count(),
        children,
        "want `{intact}` from each of {children} children:\n{stdout}"
    );
    let fills = number_after(&stdout, "fills counted in the file:");
    let chunks = number_after(&stdout, &format!("fills counted in the file: {fills} for"));
    assert!(chunks >= images as u64, "{stdout}");
    assert_eq!(fills, chunks, "each chunk decoded once:\n{stdout}");
    assert_eq!(
        number_after(&stdout, "decoded by the children:"),
        chunks,
        "{stdout}"
    );
    assert_eq!(number_after(&stdout, "by the parent:"), 0, "{stdout}");
    let once = format!(
        "each chunk decoded once across all {} processes",
        children + 1
    );
    assert!(stdout.contains(&once), "want `{once}`:\n{stdout}");
    if let Some((_, sums)) = &pngs().generated {
        for (file, want) in pngs().files.iter().zip(sums) {
            if !files.contains(file) {
                continue;
            }
            // The parent's line: "<path>  <w> x <h>  <n> chunks, decoded <n> times  checksum <hex>".
            let path = file.display().to_string();
            let got = stdout
                .lines()
                .find(|l| l.starts_with(&path))
                .and_then(|l| l.split("checksum ").nth(1))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
                .unwrap_or_else(|| panic!("no checksum line for {path}:\n{stdout}"));
            assert_eq!(
                got, *want,
                "the shared cache holds other pixels of {path} than the png crate wrote:\n{stdout}"
            );
        }
    }
}

#[test]
fn png_shared_decodes_each_chunk_once_across_processes() {
    let Some((b, pngs)) = png_build("png_shared_decodes_each_chunk_once_across_processes") else {
        return;
    };
    // Four children under the sanitizers, on every PNG of the default directory.
    let mut cmd = Command::new(b.dir.join("png_shared-asan"));
    match &pngs.generated {
        Some((dir, _)) => cmd.env("PNG_CACHE_DIR", dir),
        None => cmd.env_remove("PNG_CACHE_DIR"),
    };
    let out = run(sanitizer_env(&mut cmd), Duration::from_secs(300));
    print!("{}", text(&out.stdout));
    check_png_shared(&out, &pngs.files, 4);
    // The static and the shared program, two children on two files.
    let two = &pngs.files[..2.min(pngs.files.len())];
    for variant in ["png_shared-static", "png_shared-shared"] {
        let out = run(
            Command::new(b.dir.join(variant))
                .arg("--children=2")
                .args(two),
            Duration::from_secs(120),
        );
        check_png_shared(&out, two, 2);
    }
}

#[test]
fn png_cache_static_and_shared() {
    let Some((b, pngs)) = png_build("png_cache_static_and_shared") else {
        return;
    };
    let two = &pngs.files[..2.min(pngs.files.len())];
    for variant in ["png_cache-static", "png_cache-shared"] {
        for mode in ["monitor", "sigbus", "explicit", "auto"] {
            let out = run(
                Command::new(b.dir.join(variant))
                    .env_remove("LAZYFREE_MODE")
                    .arg(format!("--mode={mode}"))
                    .args(two),
                Duration::from_secs(120),
            );
            // Auto gets a userfaultfd here, so it runs in the monitor mode.
            let ran = if mode == "auto" { "monitor" } else { mode };
            check_png_cache(&out, two, ran);
        }
        // Auto where the environment asks for the explicit mode: it says so and why.
        let out = run(
            Command::new(b.dir.join(variant))
                .env("LAZYFREE_MODE", "explicit")
                .arg("--mode=auto")
                .args(two),
            Duration::from_secs(120),
        );
        check_png_cache(&out, two, "explicit");
        let stdout = text(&out.stdout);
        assert!(
            stdout.contains("stats: explicit mode because: LAZYFREE_MODE=explicit"),
            "{stdout}"
        );
    }
    // The static program does not need the shared library; the shared one does.
    let ldd = |p: &str| {
        text(
            &run(
                Command::new("ldd").arg(b.dir.join(p)),
                Duration::from_secs(30),
            )
            .stdout,
        )
    };
    assert!(!ldd("png_cache-static").contains("liblazyfree"));
    let lib = b.target.join(&b.profile).join("liblazyfree.so");
    assert!(
        ldd("png_cache-shared").contains(&lib.display().to_string()),
        "png_cache-shared is not linked to {}",
        lib.display()
    );
}

#[test]
fn png_cache_default_directory_under_asan_and_ubsan() {
    let Some((b, pngs)) = png_build("png_cache_default_directory_under_asan_and_ubsan") else {
        return;
    };
    let mut cmd = Command::new(b.dir.join("png_cache-asan"));
    match &pngs.generated {
        // No sway-backgrounds: the directory of the PNGs written here stands in for it.
        Some((dir, _)) => cmd.env("PNG_CACHE_DIR", dir),
        None => cmd.env_remove("PNG_CACHE_DIR"),
    };
    let out = run(sanitizer_env(&mut cmd), Duration::from_secs(300));
    print!("{}", text(&out.stdout));
    check_png_cache(&out, &pngs.files, "monitor");
    let two = &pngs.files[..2.min(pngs.files.len())];
    for mode in ["sigbus", "explicit"] {
        let out = run(
            sanitizer_env(&mut Command::new(b.dir.join("png_cache-asan")))
                .arg(format!("--mode={mode}"))
                .args(two),
            Duration::from_secs(300),
        );
        check_png_cache(&out, two, mode);
    }
}

#[test]
fn installed_pkg_config_files_build_and_link() {
    let Some(b) = c_build("installed_pkg_config_files_build_and_link") else {
        return;
    };
    let prefix = b.dir.join("prefix");
    let _ = std::fs::remove_dir_all(&prefix);
    let out = run(
        Command::new("make")
            .arg("-C")
            .arg(repo().join("examples/c"))
            .arg("install")
            .arg(format!("PREFIX={}", prefix.display()))
            .arg(format!("CARGO_TARGET_DIR={}", b.target.display()))
            .arg(format!("PROFILE={}", b.profile))
            .arg("NO_CARGO=1"),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "make install failed:\n{}",
        text(&out.stderr)
    );
    for f in [
        "include/lazyfree.h",
        "lib/liblazyfree.a",
        "lib/liblazyfree.so",
        "lib/pkgconfig/lazyfree.pc",
        "lib/pkgconfig/lazyfree-static.pc",
    ] {
        assert!(prefix.join(f).is_file(), "make install did not install {f}");
    }
    if let Some(why) = &b.no_png {
        skipped(
            "installed_pkg_config_files_build_and_link",
            &format!("the files are installed, but png_cache is not built against them: {why}"),
        );
        return;
    }
    let pkgconfig = prefix.join("lib/pkgconfig");
    let flags = |args: &[&str]| {
        let out = run(
            Command::new("pkg-config")
                .env("PKG_CONFIG_PATH", &pkgconfig)
                .args(args),
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "pkg-config {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let png = repo().join("examples/c/png_cache.c");
    let file = &pngs().files[..1];
    for (pc, extra) in [
        ("lazyfree-static", vec![]),
        (
            "lazyfree",
            vec![format!("-Wl,-rpath,{}", prefix.join("lib").display())],
        ),
    ] {
        let exe = b.dir.join(format!("installed-{pc}"));
        let out = run(
            Command::new("cc")
                .args([
                    "-std=c11",
                    "-Wall",
                    "-Wextra",
                    "-Werror",
                    "-pedantic",
                    "-O2",
                    "-o",
                ])
                .arg(&exe)
                .arg(&png)
                .args(flags(&["--cflags", "--libs", pc, "libpng"]))
                .args(extra),
            Duration::from_secs(120),
        );
        assert!(
            out.status.success(),
            "cc with pkg-config {pc} failed:\n{}",
            text(&out.stderr)
        );
        let out = run(Command::new(&exe).args(file), Duration::from_secs(120));
        check_png_cache(&out, file, "monitor");
    }
}
