//! The shared cache's rows of the targets table and its "Sharing across processes" section, from
//! the `shared` bench's criterion results and side file.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::json::Json;
use crate::{fmt_ns, num, ratio, text, Measure, Ratio, Results};

const MIB: f64 = 1024.0 * 1024.0;

fn find<'a>(r: &'a Results, f: &str) -> Option<&'a Measure> {
    r.all
        .iter()
        .find(|m| m.group == "shared" && m.function == f)
}

fn n(ex: &BTreeMap<String, Json>, k: &str) -> Option<f64> {
    num(ex, "shared", k)
}

pub fn ratios(r: &Results, ex: &BTreeMap<String, Json>) -> Vec<Ratio> {
    let set = n(ex, "set_bytes").map_or("the".into(), |b| format!("a {:.0} MiB", b / MIB));
    let own = find(r, "own_copy_read");
    let first_note = match (
        n(ex, "first_read_minor_faults"),
        n(ex, "first_read_touch_ns"),
        n(ex, "first_read_populate_ns"),
        n(ex, "first_read_populate_interleaved_ratio"),
    ) {
        (Some(f), Some(t), Some(p), Some(x)) => format!(
            "{f:.0} minor faults mapping the file's pages (about one per 64 KiB: the kernel's \
             fault-around maps 16 pages a fault). After `open`, touching one byte per page (the \
             faults alone) takes {}, {} a fault; one `MADV_POPULATE_READ` per entry (the same \
             mapping without the faults) {}; populating, then reading: {x:.2}",
            fmt_ns(t),
            fmt_ns(t / f.max(1.0)),
            fmt_ns(p)
        ),
        _ => String::new(),
    };
    let huge_note = match (
        n(ex, "first_read_huge_minor_faults"),
        text(ex, "shared", "huge_not_measured"),
    ) {
        (Some(f), _) => {
            format!("{f:.0} minor faults: one per 2 MiB huge page instead of one per 64 KiB")
        }
        (None, Some(why)) => format!("not measured here: {why}"),
        _ => String::new(),
    };
    let purge_note = match (n(ex, "purge_ns"), n(ex, "shared_fills_per_rebuild")) {
        (Some(p), Some(c)) => {
            let mut s = format!(
                "`purge(0)` itself: {} (not in the ratio); {c:.0} chunks rebuilt per round",
                fmt_ns(p)
            );
            if let Some(x) = n(ex, "purge_rebuild_vs_private_pin_interleaved_ratio") {
                s.push_str(&format!(
                    ". The shared `read` rebuilds in the calling thread; the private cache's \
                     read takes faults served by its monitor threads. Against the private \
                     cache read through `pin` (rebuilt in the calling thread too): {x:.2}"
                ));
            }
            if n(ex, "private_partial_reclaims").is_some_and(|x| x > 0.0) {
                s.push_str("; ⚠ reclaim left pages of the private cache resident in some rounds");
            }
            s
        }
        _ => String::new(),
    };
    vec![
        Ratio {
            name: format!(
                "second process reading {set} image set another process decoded into the \
                 shared cache (steady state) ÷ reading its own resident copy"
            ),
            target: "≤ 1.1".into(),
            check: Some(Box::new(|x| x <= 1.1)),
            value: ratio(find(r, "second_process_read"), own, false),
            paired: n(ex, "steady_interleaved_ratio"),
            note: String::new(),
        },
        Ratio {
            name: "the same, first read after `open` (its page tables empty) ÷ reading its own \
                   resident copy"
                .into(),
            target: "≤ 1.1".into(),
            check: Some(Box::new(|x| x <= 1.1)),
            value: ratio(find(r, "second_process_first_read"), own, false),
            paired: n(ex, "first_read_interleaved_ratio"),
            note: first_note,
        },
        Ratio {
            name: "the same with huge pages (`SharedConfig::huge_pages`: a hugetlbfs file, 2 MiB \
                   chunks), first read after `open` ÷ reading its own resident copy"
                .into(),
            target: "≤ 1.1".into(),
            check: Some(Box::new(|x| x <= 1.1)),
            value: ratio(find(r, "second_process_first_read_huge"), own, false),
            paired: n(ex, "first_read_huge_interleaved_ratio"),
            note: huge_note,
        },
        Ratio {
            name: "second process getting the image set from the shared cache (`open` + first \
                   read) ÷ decoding the PNGs itself into new Vecs"
                .into(),
            target: "–".into(),
            check: None,
            value: ratio(
                find(r, "second_process_open_read"),
                find(r, "decode_pngs"),
                false,
            ),
            paired: n(ex, "open_read_vs_decode_interleaved_ratio"),
            note: String::new(),
        },
        Ratio {
            name: "`purge(0)` then reading the image set (every chunk rebuilt by the regenerate \
                   function), shared cache ÷ a private `Cache` after `testing::reclaim` (same \
                   256 KiB chunks, same function)"
                .into(),
            target: "–".into(),
            check: None,
            value: ratio(
                find(r, "shared_purge_rebuild"),
                find(r, "private_reclaim_rebuild"),
                false,
            ),
            paired: n(ex, "purge_rebuild_interleaved_ratio"),
            note: purge_note,
        },
    ]
}

pub fn section(s: &mut String, r: &Results, ex: &BTreeMap<String, Json>) {
    let _ = writeln!(s, "## Sharing across processes\n");
    if !ex.contains_key("shared") {
        let _ = writeln!(
            s,
            "Not measured: no side file of the `shared` bench (`cargo bench --bench shared`).\n"
        );
        return;
    }
    let v = |k: &str| n(ex, k).unwrap_or(f64::NAN);
    let _ = writeln!(
        s,
        "Bench `shared`: {}, {:.1} MiB compressed, decoded and taken in turn under distinct keys \
         until the set holds {:.0} MiB ({:.0} entries, the last cut to fit; {:.0} chunks of \
         {:.0} KiB). A helper process (the bench binary run again) makes the `SharedCache`, \
         reads every byte (it rebuilt {:.0} chunks) and stays alive; the bench process opens \
         the cache by name ({:.0} processes had it open) and rebuilt {:.0} chunks itself while \
         it read the set for the first two rows. The regenerate functions copy from the set \
         decoded once per process, so only the decoding row decodes PNGs. A first read opens \
         the cache anew each time (not timed) and reads every entry through \
         `SharedEntry::read`; the rebuild rows purge or reclaim first (not timed).\n",
        text(ex, "shared", "image_source").unwrap_or("?"),
        v("png_bytes") / MIB,
        v("set_bytes") / MIB,
        v("entries"),
        v("chunks"),
        v("chunk_bytes") / 1024.0,
        v("helper_fills"),
        v("processes"),
        v("second_process_fills"),
    );
    let _ = writeln!(s, "| what | time | throughput |\n|---|---|---|");
    for (f, what) in [
        (
            "own_copy_read",
            "read its own resident copy (one Vec per entry)",
        ),
        ("second_process_read", "read the shared cache, steady state"),
        (
            "second_process_first_read",
            "read the shared cache, first read after `open`",
        ),
        (
            "second_process_open_read",
            "`open` + first read of the shared cache",
        ),
        ("decode_pngs", "decode the PNGs into new Vecs"),
        (
            "shared_purge_rebuild",
            "shared cache: read after `purge(0)` (every chunk rebuilt)",
        ),
        (
            "private_reclaim_rebuild",
            "private `Cache`: read after `testing::reclaim` (every chunk rebuilt)",
        ),
    ] {
        let cell = find(r, f).map_or(("not measured".into(), "–".into()), |m| {
            (
                fmt_ns(m.ns),
                format!("{:.2} GiB/s", v("set_bytes") / m.ns * 1e9 / (1024.0 * MIB)),
            )
        });
        let _ = writeln!(s, "| {what} | {} | {} |", cell.0, cell.1);
    }
    let _ = writeln!(
        s,
        "| `purge(0)` of the whole set (median of the rounds) | {} | – |\n",
        fmt_ns(v("purge_ns"))
    );
}
