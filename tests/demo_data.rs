//! `pipeline demo-data`: deterministic, and read correctly by the Python `webdataset` package.

mod common;
use common::*;

use std::path::Path;

fn write_demo(dir: &Path, seed: u64, extra: &[&str]) {
    demo_data(dir, 3, 6, 2, seed, extra);
}

fn shard_bytes(dir: &Path) -> Vec<Vec<u8>> {
    (0..2)
        .map(|i| std::fs::read(dir.join(format!("demo-{i:06}.tar"))).unwrap())
        .collect()
}

#[test]
fn same_seed_gives_byte_identical_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    write_demo(&a, 5, &[]);
    write_demo(&b, 5, &[]);
    write_demo(&c, 6, &[]);
    assert_eq!(shard_bytes(&a), shard_bytes(&b));
    assert_ne!(shard_bytes(&a), shard_bytes(&c));
}

#[test]
fn python_webdataset_reads_the_shards() {
    let tmp = tempfile::tempdir().unwrap();
    write_demo(tmp.path(), 0, &["--odd"]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("demo-index.json")).unwrap())
            .unwrap();
    let odd: std::collections::HashMap<String, String> = index["odd"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["key"].as_str().unwrap().to_string(),
                m["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();

    let out = run_ok(
        python()
            .arg(repo_root().join("tests/python/read_webdataset.py"))
            .arg(tmp.path().join("demo-{000000..000001}.tar")),
    );
    let samples: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 3 * 6 + odd.len());

    let mut per_class = [0usize; 3];
    for s in &samples {
        let key = s["key"].as_str().unwrap();
        match odd.get(key).map(String::as_str) {
            None => {
                // A regular sample: integer label, an RGB JPEG at a non-square size, short side 96..=512.
                let cls = s["cls"].as_str().unwrap().parse::<usize>().unwrap();
                per_class[cls] += 1;
                assert_eq!(s["format"], "JPEG", "{s}");
                let (w, h) = (s["width"].as_u64().unwrap(), s["height"].as_u64().unwrap());
                assert!(w != h && (96..=512).contains(&w.min(h)), "{s}");
            }
            Some("cmyk") => assert_eq!(s["mode"], "CMYK", "{s}"),
            Some("grayscale") => assert_eq!(s["mode"], "L", "{s}"),
            Some("progressive") => assert_eq!(s["progressive"], true, "{s}"),
            Some("png_named_jpg") => assert_eq!(s["format"], "PNG", "{s}"),
            Some("truncated" | "garbage") => assert!(s["error"].is_string(), "{s}"),
            Some("missing_label") => assert!(s["cls"].is_null(), "{s}"),
            Some("bad_label") => assert_eq!(s["cls"], "not-a-number", "{s}"),
            Some(other) => panic!("unexpected odd kind {other}"),
        }
    }
    assert_eq!(per_class, [6, 6, 6]);
}
