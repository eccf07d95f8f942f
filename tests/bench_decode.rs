//! `pipeline bench decode` runs end to end on demo shards, Pillow reference included, and prints every
//! row and ratio the speed goals are stated in.

mod common;
use common::*;

#[test]
fn bench_decode_reports_rust_and_pillow_rates() {
    let tmp = tempfile::tempdir().unwrap();
    demo_data(tmp.path(), 2, 6, 2, 0, &["--odd"]);
    let spec = format!("{}/demo-{{000000..000001}}.tar", tmp.path().display());
    let out = run_ok(pipeline().current_dir(repo_root()).args([
        "bench",
        "decode",
        "--shards",
        &spec,
        "--size",
        "64",
        "--threads",
        "2",
        "--limit",
        "16",
        "--repeats",
        "1",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "decode (libjpeg-turbo, exact)",
        "decode at DCT scale",
        "end to end, exact",
        "end to end, exact, whole decode",
        "end to end, dct + exact",
        "end to end, dct + fast",
        "dct + exact vs exact: max |Δ|",
        "dct + fast vs exact: max |Δ|",
        "DCT-scale decode alone",
        "stream (read",
        "Pillow (1 thread, 16 images)",
        "exact e2e / Pillow e2e",
        "scaling 2 threads / 1",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    // 16 decodable images: the garbage and truncated odd members are left out.
    assert!(text.contains("bench decode: 16 images"), "{text}");
}

#[test]
fn bench_decode_counts_a_header_without_a_scan_and_decodes_the_image_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let shard = tmp.path().join("two-000000.tar");
    std::fs::write(&shard, stages::demo::no_scan_then_good_shard()).unwrap();
    let out = run_ok(pipeline().current_dir(repo_root()).args([
        "bench",
        "decode",
        "--shards",
        shard.to_str().unwrap(),
        "--size",
        "64",
        "--threads",
        "1",
        "--repeats",
        "1",
        "--python",
        "none",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("bench decode: read good 1, bad 1 (undecodable_image 1)")
            && text.contains("bench decode: 1 images"),
        "{text}"
    );
}
