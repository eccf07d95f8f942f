//! The whole stream on real shards: every bad-input kind counted exactly, shuffle determinism whatever
//! the thread count, the rank split, equal samples per rank, compressed shards and the flip view.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;

use stages::bad_input::BadKind;
use stages::config::DataConfig;
use stages::demo::{draw_sample, encode_jpeg, write_demo_dataset, DemoConfig};
use stages::image_stream::{open_image_stream, CroppedSample, StreamSummary};
use stages::order::RankSplit;
use stages::wds_writer::TarShardWriter;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn collect(
    cfg: &DataConfig,
    split: RankSplit,
    epoch: u64,
) -> (
    Vec<CroppedSample>,
    stages::Result<StreamSummary>,
    BTreeMap<&'static str, u64>,
) {
    runtime().block_on(async {
        let stream = open_image_stream(cfg, split, epoch).unwrap();
        let mut out = Vec::new();
        while let Ok(s) = stream.samples.recv().await {
            out.push(s);
        }
        let counters = stream.counters.clone();
        let summary = stream.finish().await;
        let counts = BadKind::ALL
            .iter()
            .map(|k| (k.name(), counters.bad(*k)))
            .filter(|(_, n)| *n > 0)
            .collect();
        (out, summary, counts)
    })
}

fn small_jpeg(index: u64) -> Vec<u8> {
    encode_jpeg(&draw_sample(1, index, 0), 85, false).unwrap()
}

/// A sample to write: its key and its (extension, bytes) members.
type Sample<'a> = (&'a str, Vec<(&'a str, Vec<u8>)>);

fn tar_bytes(samples: &[Sample]) -> Vec<u8> {
    let mut w = TarShardWriter::new(Vec::new());
    for (key, members) in samples {
        let m: Vec<(&str, &[u8])> = members.iter().map(|(e, d)| (*e, d.as_slice())).collect();
        w.write_sample(key, &m).unwrap();
    }
    w.finish().unwrap()
}

/// A JPEG whose SOF header claims 30000×30000 pixels: a decompression bomb by its header alone.
fn bomb_jpeg() -> Vec<u8> {
    let mut jpeg = small_jpeg(99);
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline SOF0");
    jpeg[sof + 5..sof + 7].copy_from_slice(&30000u16.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&30000u16.to_be_bytes());
    jpeg
}

/// Writes the bad-input shard set and returns its spec and the number of good samples in it.
fn write_shard_set(dir: &Path) -> (String, usize) {
    let demo = DemoConfig {
        classes: 3,
        per_class: 4,
        shards: 2,
        seed: 0,
        odd: true,
        prefix: "demo".into(),
    };
    write_demo_dataset(dir, &demo, &|_| {}).unwrap();
    let cls = |c: &str| c.as_bytes().to_vec();
    // One shard with one sample of each remaining kind, and one good sample.
    let bad = tar_bytes(&[
        ("empty", vec![("jpg", Vec::new()), ("cls", cls("1"))]),
        (
            "textonly",
            vec![("txt", b"a caption".to_vec()), ("cls", cls("1"))],
        ),
        ("bomb", vec![("jpg", bomb_jpeg()), ("cls", cls("1"))]),
        (
            "dup",
            vec![
                ("jpg", small_jpeg(1)),
                ("jpg", small_jpeg(2)),
                ("cls", cls("1")),
            ],
        ),
        // s1 is split: its first fragment lacks the label, its second is a split key.
        ("s1", vec![("jpg", small_jpeg(3))]),
        ("s2", vec![("jpg", small_jpeg(4)), ("cls", cls("2"))]),
        ("s1", vec![("cls", cls("1"))]),
    ]);
    std::fs::write(dir.join("bad-000000.tar"), bad).unwrap();
    // A shard cut inside the third sample's image: the first two samples are kept.
    let full = tar_bytes(&[
        ("t0", vec![("jpg", small_jpeg(5)), ("cls", cls("0"))]),
        ("t1", vec![("jpg", small_jpeg(6)), ("cls", cls("0"))]),
        ("t2", vec![("jpg", small_jpeg(7)), ("cls", cls("0"))]),
    ]);
    let third_image = full
        .windows(4)
        .rposition(|w| w == [0xFF, 0xD8, 0xFF, 0xE0])
        .unwrap();
    std::fs::write(dir.join("cut-000000.tar"), &full[..third_image + 300]).unwrap();
    // Not a tar at all.
    std::fs::write(
        dir.join("noise-000000.tar"),
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    // Compressed shards, two good samples each.
    let two = tar_bytes(&[
        ("gz0", vec![("jpg", small_jpeg(8)), ("cls", cls("1"))]),
        ("gz1", vec![("jpg", small_jpeg(9)), ("cls", cls("2"))]),
    ]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&two).unwrap();
    std::fs::write(dir.join("packed-000000.tar.gz"), gz.finish().unwrap()).unwrap();
    let two_zst = tar_bytes(&[
        ("zs0", vec![("jpg", small_jpeg(10)), ("cls", cls("1"))]),
        ("zs1", vec![("jpg", small_jpeg(11)), ("cls", cls("2"))]),
    ]);
    std::fs::write(
        dir.join("packed-000001.tar.zst"),
        zstd::encode_all(&two_zst[..], 3).unwrap(),
    )
    .unwrap();

    let d = dir.display();
    let spec = format!(
        "{d}/demo-{{000000..000001}}.tar::{d}/bad-000000.tar::{d}/cut-000000.tar::{d}/noise-000000.tar::{d}/packed-*.tar.*::{d}/missing-000000.tar"
    );
    // demo: 12 regular + 4 valid odd (cmyk, gray, progressive, png) × 2 = 20; bad shard: s2; cut: t0, t1;
    // packed: 4.
    (spec, 20 + 1 + 2 + 4)
}

fn test_config(spec: &str) -> DataConfig {
    DataConfig {
        shards: spec.to_string(),
        image_size: 32,
        shuffle_buffer: 8,
        shuffle_initial: 4,
        max_bad_fraction: 1.0,
        threads: 2,
        queue_depth: 4,
        ..Default::default()
    }
}

#[test]
fn every_bad_input_kind_is_counted_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (spec, n_good) = write_shard_set(tmp.path());
    let (samples, summary, counts) = collect(&test_config(&spec), RankSplit::default(), 0);
    let summary = summary.unwrap();
    let expected: BTreeMap<&str, u64> = [
        ("truncated_image", 2),
        ("garbage_image", 2),
        ("missing_label", 2 + 1),
        ("bad_label", 2),
        ("empty_image", 1),
        ("no_image", 1),
        ("decompression_bomb", 1),
        ("duplicate_member", 1),
        ("split_key", 1),
        ("shard_corrupt", 2),
        ("shard_unreadable", 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(counts, expected);
    assert_eq!(samples.len(), n_good);
    assert_eq!(summary.good as usize, n_good);
    let keys: HashSet<&str> = samples.iter().map(|s| s.key.as_str()).collect();
    for key in [
        "s2",
        "t0",
        "t1",
        "gz0",
        "gz1",
        "zs0",
        "zs1",
        "odd-cmyk-0",
        "odd-png-1",
        "odd-gray-0",
        "odd-progressive-1",
    ] {
        assert!(keys.contains(key), "{key} missing");
    }
    assert!(samples.iter().all(|s| s.image.width == 32
        && s.image.height == 32
        && s.image.pixels.len() == 32 * 32 * 3
        && s.label.is_some()));
    assert!(summary.table.contains("decode") && summary.table.contains("read"));

    // The default limit of 1 % turns the same run into an error that names the counts.
    let strict = DataConfig {
        max_bad_fraction: 0.01,
        ..test_config(&spec)
    };
    let (_, summary, _) = collect(&strict, RankSplit::default(), 0);
    let err = summary.unwrap_err().to_string();
    assert!(
        err.contains("exceeds the limit") && err.contains("decompression_bomb 1"),
        "{err}"
    );
}

#[test]
fn order_is_deterministic_whatever_the_thread_count_and_ranks_partition() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = DemoConfig {
        classes: 4,
        per_class: 6,
        shards: 4,
        seed: 1,
        odd: false,
        prefix: "demo".into(),
    };
    write_demo_dataset(tmp.path(), &demo, &|_| {}).unwrap();
    let spec = format!("{}/demo-{{000000..000003}}.tar", tmp.path().display());
    let keys = |cfg: &DataConfig, split, epoch| {
        collect(cfg, split, epoch)
            .0
            .into_iter()
            .map(|s| s.key)
            .collect::<Vec<_>>()
    };
    let one = keys(
        &DataConfig {
            threads: 1,
            ..test_config(&spec)
        },
        RankSplit::default(),
        0,
    );
    let two = keys(
        &DataConfig {
            threads: 2,
            ..test_config(&spec)
        },
        RankSplit::default(),
        0,
    );
    assert_eq!(one.len(), 24);
    assert_eq!(one, two, "thread count changed the order");
    let mut sorted = one.clone();
    sorted.sort();
    assert_ne!(one, sorted, "no shuffle happened");
    assert_ne!(
        one,
        keys(
            &DataConfig {
                seed: 5,
                ..test_config(&spec)
            },
            RankSplit::default(),
            0
        )
    );
    assert_ne!(
        one,
        keys(&test_config(&spec), RankSplit::default(), 1),
        "epochs must differ"
    );

    let r0 = keys(&test_config(&spec), RankSplit { rank: 0, world: 2 }, 0);
    let r1 = keys(&test_config(&spec), RankSplit { rank: 1, world: 2 }, 0);
    let mut union: Vec<String> = r0.iter().chain(&r1).cloned().collect();
    union.sort();
    assert_eq!(union, sorted, "ranks must partition the samples");

    // Equal samples per rank: exactly N each, starting over on the shards when needed.
    for n in [5u64, 20] {
        let cfg = DataConfig {
            samples_per_rank: n,
            ..test_config(&spec)
        };
        for rank in 0..2 {
            let got = keys(&cfg, RankSplit { rank, world: 2 }, 0);
            assert_eq!(got.len() as u64, n, "rank {rank}");
        }
    }
}

#[test]
fn flip_view_mirrors_the_crop() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = DemoConfig {
        classes: 2,
        per_class: 2,
        shards: 1,
        seed: 2,
        odd: false,
        prefix: "demo".into(),
    };
    write_demo_dataset(tmp.path(), &demo, &|_| {}).unwrap();
    let spec = format!("{}/demo-000000.tar", tmp.path().display());
    let (samples, summary, _) = collect(
        &DataConfig {
            flip: true,
            ..test_config(&spec)
        },
        RankSplit::default(),
        0,
    );
    summary.unwrap();
    assert_eq!(samples.len(), 4);
    for s in samples {
        let f = s.flipped.unwrap();
        assert_eq!(&f.pixels[..3], &s.image.pixels[31 * 3..32 * 3]);
    }
}

#[test]
fn a_consumer_that_stops_early_still_finishes_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = DemoConfig {
        classes: 3,
        per_class: 10,
        shards: 3,
        seed: 4,
        odd: false,
        prefix: "demo".into(),
    };
    write_demo_dataset(tmp.path(), &demo, &|_| {}).unwrap();
    let spec = format!("{}/demo-{{000000..000002}}.tar", tmp.path().display());
    let cfg = DataConfig {
        queue_depth: 1,
        ..test_config(&spec)
    };
    runtime().block_on(async {
        let stream = open_image_stream(&cfg, RankSplit::default(), 0).unwrap();
        for _ in 0..3 {
            stream.samples.recv().await.unwrap();
        }
        let summary = tokio::time::timeout(std::time::Duration::from_secs(20), stream.finish())
            .await
            .expect("finish must not hang");
        assert!(summary.unwrap().good >= 3);
    });
}

#[test]
fn a_header_without_a_scan_does_not_touch_the_next_image_on_the_thread() {
    let tmp = tempfile::tempdir().unwrap();
    let both = tmp.path().join("both-000000.tar");
    std::fs::write(&both, stages::demo::no_scan_then_good_shard()).unwrap();
    let good_only = tmp.path().join("good-000000.tar");
    let good = encode_jpeg(&draw_sample(0, 1, 0), 90, false).unwrap();
    std::fs::write(
        &good_only,
        tar_bytes(&[("good", vec![("jpg", good), ("cls", b"1".to_vec())])]),
    )
    .unwrap();
    // One decode thread, so the good image follows the broken header on the same thread.
    let cfg = |path: &Path| DataConfig {
        threads: 1,
        ..test_config(&path.display().to_string())
    };
    let (expected, _, _) = collect(&cfg(&good_only), RankSplit::default(), 0);
    for epoch in 0..3 {
        let (samples, summary, counts) = collect(&cfg(&both), RankSplit::default(), epoch);
        assert_eq!(summary.unwrap().good, 1);
        assert_eq!(counts, BTreeMap::from([("undecodable_image", 1)]));
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].key, "good");
        assert_eq!(samples[0].image, expected[0].image);
    }
}
