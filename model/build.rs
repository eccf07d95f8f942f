// Bakes the libtorch directory into the rpath of this crate's test binaries, so `cargo test` needs no
// LD_LIBRARY_PATH. torch-sys publishes the directory it linked against as DEP_TCH_LIBTORCH_LIB to crates
// that depend on it directly.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // libtorch_cuda and friends are loaded by libtorch itself; keep them needed so CUDA is found.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    }
}
