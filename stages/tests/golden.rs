//! Pinned outputs of everything seeded: the SplitMix64 generator, the shard and sample orders the
//! reader draws per (seed, epoch, rank), and the bytes of the demo dataset. Each value was computed
//! once, from the code as it was before `stages::rng` replaced the copies of the generator, so these
//! tests hold every later change (a refactor, a dependency bump) to the same orders and data. A
//! failure here means runs are no longer reproducible across versions: fix the change, do not update
//! the literals, unless a new order or dataset is meant, and then say so where it is released.

use stages::demo::{write_demo_dataset, DemoConfig};
use stages::order::{epoch_shards, keyed_rng, RankSplit, ShuffleBuffer, PURPOSE_SAMPLES};
use stages::rng::{splitmix64, SplitMix64};

#[test]
fn splitmix64_outputs_are_pinned() {
    let first = |seed| {
        let mut rng = SplitMix64::new(seed);
        std::array::from_fn::<u64, 6, _>(|_| rng.next_u64())
    };
    // Seed 0 is also the reference implementation's (Vigna's splitmix64.c) first outputs.
    assert_eq!(
        first(0),
        [
            0xE220_A839_7B1D_CDAF,
            0x6E78_9E6A_A1B9_65F4,
            0x06C4_5D18_8009_454F,
            0xF88B_B8A8_724C_81EC,
            0x1B39_896A_51A8_749B,
            0x53CB_9F0C_747E_A2EA,
        ]
    );
    assert_eq!(
        first(0x5EED),
        [
            0x09F1_FD9D_03F0_A9B4,
            0x5532_7416_1BBF_8475,
            0x5D5B_CA46_96B3_43B3,
            0x70D2_9B6C_7D22_528D,
            0x0BF2_B716_F991_5475,
            0x5EB7_F92B_9538_7CCA,
        ]
    );
    assert_eq!(splitmix64(0x5EED), 0x09F1_FD9D_03F0_A9B4);

    // What the demo data and the benchmarks draw from it: ranges, shuffles, uniforms, normals.
    let mut rng = SplitMix64::new(0);
    let below: Vec<u64> = (0..8).map(|_| rng.below(1000)).collect();
    assert_eq!(below, [535, 700, 679, 444, 747, 90, 913, 940]);
    let mut order: Vec<usize> = (0..10).collect();
    SplitMix64::new(0x5EED).shuffle(&mut order);
    assert_eq!(order, [9, 1, 8, 6, 0, 7, 4, 3, 5, 2]);
    let mut rng = SplitMix64::new(0);
    let unit: Vec<f64> = (0..3).map(|_| rng.next_f64()).collect();
    assert_eq!(
        unit,
        [
            0.8833108082136426,
            0.43152799704850997,
            0.026433771592597743
        ]
    );
    let mut rng = SplitMix64::new(7);
    let normal: Vec<f32> = (0..3).map(|_| rng.approx_normal() as f32).collect();
    assert_eq!(normal, [-0.18998478, -0.8696317, -0.674036]);
}

#[test]
fn shard_and_sample_orders_are_pinned() {
    let shards: Vec<String> = (0..10).map(|i| format!("shard-{i:06}.tar")).collect();
    let order = |rank, world| -> Vec<usize> {
        epoch_shards(&shards, 42, 3, true, RankSplit { rank, world })
            .iter()
            .map(|name| shards.iter().position(|s| s == name).unwrap())
            .collect()
    };
    assert_eq!(order(0, 1), [7, 3, 0, 9, 8, 2, 6, 1, 4, 5]);
    assert_eq!(order(0, 3), [7, 9, 6, 5]);
    assert_eq!(order(1, 3), [3, 8, 1]);
    assert_eq!(order(2, 3), [0, 2, 4]);

    let samples =
        ShuffleBuffer::new(8, 4, keyed_rng(42, 3, 1, PURPOSE_SAMPLES)).shuffle_iter(0..20u32);
    assert_eq!(
        samples,
        [2, 4, 3, 0, 7, 10, 11, 12, 8, 16, 6, 5, 15, 19, 1, 14, 9, 13, 18, 17]
    );
}

#[test]
fn demo_dataset_bytes_are_pinned() {
    let dir = tempfile::tempdir().unwrap();
    // Small, but every kind of member: regular samples over two classes and each odd kind. The bytes
    // are also libjpeg-turbo's and the png encoder's: a bump of either that changes them fails here
    // too, on purpose.
    let config = DemoConfig {
        classes: 2,
        per_class: 2,
        shards: 2,
        seed: 11,
        odd: true,
        prefix: "g".into(),
    };
    write_demo_dataset(dir.path(), &config, &|_| {}).unwrap();
    let mut files: Vec<(String, usize, String)> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, bytes.len(), blake3::hash(&bytes).to_hex().to_string())
        })
        .collect();
    files.sort();
    let expected = [
        (
            "g-000000.tar",
            391680,
            "8ecb4cf2ff2e8038ef9de3048314c65be47e4e372d5df51d7371adedfb51e051",
        ),
        (
            "g-000001.tar",
            794112,
            "29a286f88270d3c9a6997c8a3009ac2b320379042faba9010a35a4b7fd5981dd",
        ),
        (
            "g-index.json",
            1724,
            "f41d7080c99ff4db35b993e2f43da0d137e97390aa88fecee12598f18e67b308",
        ),
    ]
    .map(|(name, len, hash)| (name.to_string(), len, hash.to_string()));
    assert_eq!(files, expected);
}
