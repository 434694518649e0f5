//! include/lazyfree.h is generated from this crate by cbindgen (ffi/cbindgen.toml) and committed.
//! This test regenerates it and fails when the committed file differs. To update the file:
//! `LAZYFREE_UPDATE_HEADER=1 cargo test -p lazyfree-ffi --test header`.

use std::path::Path;

#[test]
fn committed_header_is_current() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = crate_dir.join("../include/lazyfree.h");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("ffi/cbindgen.toml must parse");
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen must generate the header from ffi/");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let fresh = String::from_utf8(fresh).expect("the generated header is UTF-8");

    if std::env::var_os("LAZYFREE_UPDATE_HEADER").is_some() {
        std::fs::write(&header, &fresh).expect("write include/lazyfree.h");
        eprintln!("updated {}", header.display());
        return;
    }
    let committed = std::fs::read_to_string(&header).unwrap_or_default();
    if committed != fresh {
        let line = committed
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || committed.lines().count().min(fresh.lines().count()) + 1,
                |i| i + 1,
            );
        panic!(
            "include/lazyfree.h is stale: it differs from what cbindgen generates from ffi/ \
             (first difference at line {line}). Regenerate it with \
             `LAZYFREE_UPDATE_HEADER=1 cargo test -p lazyfree-ffi --test header` and commit it."
        );
    }
}
