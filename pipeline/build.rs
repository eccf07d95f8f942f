// Bakes the libtorch directory into the binary's rpath so `target/release/pipeline` runs in a plain
// shell, and links libtorch_cuda for real. torch-sys publishes the directory it linked against as
// DEP_TCH_LIBTORCH_LIB to crates that depend on it directly.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // Nothing in the binary calls into libtorch_cuda, so under the linker's default --as-needed it
        // would be dropped, and with it CUDA: libtorch registers its CUDA backend only when the library
        // is loaded. rustc puts link args after its own -l flags, where a bare --no-as-needed changes
        // nothing; naming the library inside the no-as-needed span makes it NEEDED whatever the order.
        let dir = std::path::Path::new(&lib);
        if dir.join("libtorch_cuda.so").exists() {
            println!(
                "cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-L{lib},-ltorch_cuda,--pop-state"
            );
        } else {
            println!("cargo:warning=pipeline: {lib} has no libtorch_cuda.so: this build runs on CPUs only");
        }
    }
}
