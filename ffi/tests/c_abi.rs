//! The C side: builds liblazyfree (cargo, through examples/c/Makefile), the C unit tests
//! (ffi/tests/c/lazyfree_test.c) and the libpng example (examples/c/png_cache.c) with
//! `-Wall -Wextra -Werror -pedantic`, statically, dynamically and under ASAN+UBSAN, and runs
//! them against the real kernel. LeakSanitizer is on (`detect_leaks=1`): it works with the
//! monitor threads running.
//!
//! Needs cc, make, pkg-config, libpng-dev and the PNGs of the Debian package sway-backgrounds;
//! a missing one fails the test with what to install.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const PNG_DIR: &str = "/usr/share/backgrounds/sway";
const INSTALL_HINT: &str =
    "install the Debian packages gcc make pkg-config libpng-dev sway-backgrounds";

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

fn require_tool(cmd: &str, args: &[&str]) {
    let ok = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "MISSING TOOL: `{cmd} {}` failed or is not installed; {INSTALL_HINT}",
        args.join(" ")
    );
}

fn pngs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(PNG_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "png"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    assert!(
        !v.is_empty(),
        "MISSING TEST DATA: no PNG files in {PNG_DIR}; {INSTALL_HINT}"
    );
    v
}

struct Built {
    dir: PathBuf,
    profile: String,
    target: PathBuf,
}

/// Builds everything once per test run: `make -C examples/c all sanitize`.
fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        require_tool("cc", &["--version"]);
        require_tool("make", &["--version"]);
        require_tool("pkg-config", &["--version"]);
        require_tool("pkg-config", &["--exists", "libpng"]);
        let (target, profile) = target_and_profile();
        // One directory per profile: the pkg-config files there name the profile's library
        // directory, and make does not rewrite them when only PROFILE changes.
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("c-abi-{profile}"));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = run(
            Command::new("make")
                .arg("-C")
                .arg(repo().join("examples/c"))
                .args(["all", "sanitize"])
                .arg(format!("BUILD={}", dir.display()))
                .arg(format!("CARGO_TARGET_DIR={}", target.display()))
                .arg(format!("PROFILE={profile}"))
                .arg(format!("CARGO={cargo}")),
            Duration::from_secs(900),
        );
        assert!(
            out.status.success(),
            "make -C examples/c all sanitize failed ({}):\n{}\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        Built {
            dir,
            profile,
            target,
        }
    })
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

/// Checks a png_cache run in `mode`: every image intact, pages really dropped and rebuilt.
fn check_png_cache(out: &Output, images: usize, mode: &str) {
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
}

#[test]
fn c_unit_tests_under_asan_and_ubsan() {
    let b = built();
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
        loud(&format!(
            "SKIPPED c_unit_tests_under_asan_and_ubsan: {stdout}"
        ));
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
fn png_cache_static_and_shared() {
    let b = built();
    let files = pngs();
    let two = &files[..2.min(files.len())];
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
            check_png_cache(&out, two.len(), ran);
        }
        // Auto where the environment asks for the explicit mode: it says so and why.
        let out = run(
            Command::new(b.dir.join(variant))
                .env("LAZYFREE_MODE", "explicit")
                .arg("--mode=auto")
                .args(two),
            Duration::from_secs(120),
        );
        check_png_cache(&out, two.len(), "explicit");
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
    let b = built();
    let files = pngs();
    let out = run(
        sanitizer_env(&mut Command::new(b.dir.join("png_cache-asan"))),
        Duration::from_secs(300),
    );
    print!("{}", text(&out.stdout));
    check_png_cache(&out, files.len(), "monitor");
    let two = &files[..2.min(files.len())];
    for mode in ["sigbus", "explicit"] {
        let out = run(
            sanitizer_env(&mut Command::new(b.dir.join("png_cache-asan")))
                .arg(format!("--mode={mode}"))
                .args(two),
            Duration::from_secs(300),
        );
        check_png_cache(&out, two.len(), mode);
    }
}

#[test]
fn installed_pkg_config_files_build_and_link() {
    let b = built();
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
    let file = &pngs()[0];
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
        let out = run(Command::new(&exe).arg(file), Duration::from_secs(120));
        check_png_cache(&out, 1, "monitor");
    }
}
