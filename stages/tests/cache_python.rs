//! A cache shard written by the Rust writer reads back identically with the Python reader that ships in
//! tools/flowback_cache.py (numpy + zstandard only), for every dtype.

use std::path::Path;
use std::process::Command;

use stages::cache::{DType, FieldSpec, ShardWriter};

#[test]
fn python_reader_sees_every_array_the_rust_writer_wrote() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run `make test`",
        python.display()
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.fbc");
    let fields = vec![
        FieldSpec::new("label", DType::I64, &[]),
        FieldSpec::new("image", DType::U8, &[2, 2, 3]),
        FieldSpec::new("features", DType::I8, &[3]),
        FieldSpec::new("scale", DType::F32, &[3]),
        FieldSpec::new("mean", DType::F16, &[2]),
        FieldSpec::new("tokens", DType::Bf16, &[2]),
    ];
    let mut expected: Vec<Vec<f64>> = vec![Vec::new(); fields.len()];
    let mut writer = ShardWriter::create(&path, fields.clone(), 3, 1).unwrap();
    for i in 0..7usize {
        let label = [i as i64 * 1000 - 3];
        let image: Vec<u8> = (0..12).map(|j| (i * 12 + j) as u8).collect();
        let features: Vec<i8> = (0..3).map(|j| (i as i8 - 3) * 10 + j).collect();
        let scale: Vec<f32> = (0..3).map(|j| 0.5 + i as f32 * 0.25 + j as f32).collect();
        let mean: Vec<half::f16> = (0..2)
            .map(|j| half::f16::from_f32(-1.5 + i as f32 + j as f32 * 0.125))
            .collect();
        let tokens: Vec<half::bf16> = (0..2)
            .map(|j| half::bf16::from_f32(3.0 * i as f32 - j as f32 * 0.5))
            .collect();
        let values: Vec<Vec<u8>> = vec![
            label.iter().flat_map(|v| v.to_le_bytes()).collect(),
            image.clone(),
            features.iter().map(|v| *v as u8).collect(),
            scale.iter().flat_map(|v| v.to_le_bytes()).collect(),
            mean.iter().flat_map(|v| v.to_le_bytes()).collect(),
            tokens.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ];
        expected[0].extend(label.iter().map(|v| *v as f64));
        expected[1].extend(image.iter().map(|v| *v as f64));
        expected[2].extend(features.iter().map(|v| *v as f64));
        expected[3].extend(scale.iter().map(|v| *v as f64));
        expected[4].extend(mean.iter().map(|v| v.to_f64()));
        expected[5].extend(tokens.iter().map(|v| v.to_f64()));
        let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        writer.push(&format!("key{i}"), &refs).unwrap();
    }
    writer
        .finish(serde_json::json!({"source": "imagenet-train-000000.tar"}))
        .unwrap();

    let out = Command::new(&python)
        .arg(root.join("tools/flowback_cache.py"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["keys"].as_array().unwrap().len(), 7);
    assert_eq!(json["keys"][6], "key6");
    assert_eq!(json["meta"]["source"], "imagenet-train-000000.tar");
    for (spec, want) in fields.iter().zip(&expected) {
        let got: Vec<f64> = json["fields"][&spec.name]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(&got, want, "field {}", spec.name);
        let shape: Vec<usize> = json["fields"][&spec.name]["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape[0], 7);
        assert_eq!(&shape[1..], spec.shape.as_slice(), "field {}", spec.name);
    }
}
