//! `pipeline cache ls|verify|gc` on a cache the test builds with the library writer.

mod common;
use common::*;

use std::path::Path;

use stages::cache::{DType, FieldSpec, Manifest, ManifestShard, ShardWriter, SourceShard};

fn make_cache(root: &Path) -> std::path::PathBuf {
    let settings = serde_json::json!({"crop": {"size": 64}, "views": ["crop", "flip"]});
    let dir = root.join(stages::cache::fingerprint(&settings));
    std::fs::create_dir_all(&dir).unwrap();
    let mut entries = Vec::new();
    for shard in 0..3 {
        let file = format!("demo-{shard:06}.fbc");
        let mut w = ShardWriter::create(
            &dir.join(&file),
            vec![FieldSpec::new("label", DType::I64, &[])],
            4,
            3,
        )
        .unwrap();
        for i in 0..5i64 {
            w.push(&format!("{shard}-{i}"), &[&i.to_le_bytes()])
                .unwrap();
        }
        let summary = w.finish(serde_json::json!({})).unwrap();
        let source = SourceShard {
            name: format!("demo-{shard:06}.tar"),
            size: 1,
            content_hash: "h".into(),
            remote: None,
        };
        entries.push(ManifestShard {
            file,
            source,
            summary,
        });
    }
    Manifest::record(&dir, &settings, entries).unwrap();
    dir
}

#[test]
fn ls_verify_and_gc() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make_cache(tmp.path());
    let fp = dir.file_name().unwrap().to_string_lossy().into_owned();

    let out = run_ok(pipeline().args(["cache", "ls", "--cache"]).arg(tmp.path()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&fp) && text.contains("samples 15") && text.contains("complete"),
        "{text}"
    );

    run_ok(
        pipeline()
            .args(["cache", "verify", "--cache"])
            .arg(tmp.path()),
    );
    let victim = dir.join("demo-000001.fbc");
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let out = pipeline()
        .args(["cache", "verify", "--cache"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("BAD")).count(),
        1,
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("BAD") && l.contains("demo-000001.fbc")),
        "{stdout}"
    );

    // A temporary left for two hours is abandoned; one being written (fresh) is not, whatever its pid.
    let stale = dir.join(".demo-000009.fbc.tmp-4000000000");
    let fresh = dir.join(".demo-000010.fbc.tmp-4000000001");
    std::fs::write(&stale, b"partial").unwrap();
    std::fs::write(&fresh, b"partial").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
        .unwrap();
    let gc = |extra: &[&str]| {
        pipeline()
            .args(["cache", "gc", "--cache"])
            .arg(tmp.path())
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let out = gc(&["--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("would remove") && text.contains("tmp-4000000000"),
        "{text}"
    );
    assert!(stale.exists());
    let out = gc(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("removed") && text.contains("tmp-4000000000"),
        "{text}"
    );
    assert!(!stale.exists() && fresh.exists());
    // A --keep or --drop naming no fingerprint is refused, with the ones there are.
    let out = gc(&["--keep", "0123456789abcdef"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("no fingerprint 0123456789abcdef")
            && err.contains(&fp),
        "{err}"
    );
    assert!(dir.exists());
    assert!(gc(&["--drop", &fp]).status.success());
    assert!(!dir.exists());
}
