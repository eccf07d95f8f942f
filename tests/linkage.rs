//! The release and test binaries find CUDA because libtorch_cuda is a NEEDED library of the binary, not
//! by accident of what else the binary references: libtorch registers its CUDA backend only when that
//! library is loaded, and without it `auto` would quietly train on the CPU.

use std::path::PathBuf;
use std::process::Command;

/// The `NEEDED` and `RUNPATH`/`RPATH` entries of an ELF file's dynamic section, as readelf prints them.
fn dynamic_section(path: &std::path::Path) -> (Vec<String>, Vec<PathBuf>) {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(path)
        .output()
        .expect("readelf (binutils) runs");
    assert!(out.status.success(), "readelf -d {}", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let bracketed = |line: &str| {
        line.split_once('[')
            .and_then(|(_, rest)| rest.split_once(']'))
            .map(|(v, _)| v.to_string())
    };
    let mut needed = vec![];
    let mut paths = vec![];
    for line in text.lines() {
        if line.contains("(NEEDED)") {
            needed.extend(bracketed(line));
        } else if line.contains("(RUNPATH)") || line.contains("(RPATH)") {
            if let Some(v) = bracketed(line) {
                paths.extend(v.split(':').map(PathBuf::from));
            }
        }
    }
    (needed, paths)
}

#[test]
fn the_binary_needs_libtorch_cuda_when_libtorch_has_it() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_pipeline"));
    let (needed, rpath) = dynamic_section(&exe);
    let libtorch = rpath
        .iter()
        .find(|d| d.join("libtorch_cpu.so").exists())
        .unwrap_or_else(|| {
            panic!(
                "no rpath entry of {} holds libtorch: {rpath:?}",
                exe.display()
            )
        });
    assert!(needed.iter().any(|n| n == "libtorch_cpu.so"), "{needed:?}");
    if libtorch.join("libtorch_cuda.so").exists() {
        assert!(
            needed.iter().any(|n| n == "libtorch_cuda.so"),
            "{} links a CUDA libtorch ({}) but does not list libtorch_cuda.so as NEEDED: {needed:?}",
            exe.display(),
            libtorch.display()
        );
    } else {
        torch_ext::skip::gpu_branch(
            "linkage::the_binary_needs_libtorch_cuda_when_libtorch_has_it",
            "the venv's libtorch is a CPU-only build",
        );
    }
}
