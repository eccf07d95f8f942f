// Compiles csrc/ext.cpp against the headers of the libtorch that torch-sys linked (the venv's torch
// when LIBTORCH_USE_PYTORCH=1), with the same C++ ABI, and bakes that libtorch into the rpath of this
// crate's test binaries.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/ext.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=/usr/include/gloo");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB"),
    );
    let include = lib
        .parent()
        .expect("libtorch lib dir has a parent")
        .join("include");
    // torch ≥ 2.7 wheels (and libtorch builds) use the C++11 ABI; torch-sys assumes the same.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    // Gloo's headers are not in the wheel; Debian's libgloo-dev (scripts/setup-system.sh) has them.
    let gloo = [
        "/usr/include/gloo/allreduce.h",
        "/usr/local/include/gloo/allreduce.h",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists());
    if gloo {
        build.define("USE_C10D_GLOO", None);
    } else {
        println!("cargo:warning=torch-ext: gloo headers not found (install libgloo-dev): multi-process training on CPU will be refused at run time");
    }
    // The NCCL process group: nccl.h and the CUDA headers from the venv's nvidia packages (next to
    // torch/), with nvcc's crt/ and CCCL's nv/ (scripts/requirements-extra.txt); libtorch_cuda, which
    // torch-sys links when it exists, has the code.
    // DEP_TCH_LIBTORCH_LIB is <site-packages>/torch/lib.
    let site = lib.parent().and_then(|torch| torch.parent());
    let cuda = site.map(|s| s.join("nvidia/cu13/include"));
    let nccl = site.map(|s| s.join("nvidia/nccl/include"));
    let has_cuda_lib = lib.join("libtorch_cuda.so").exists();
    // The CUDA headers alone (crt/ and CCCL's nv/ included) are what CUDA graphs need; NCCL adds nccl.h.
    let cuda = cuda.filter(|cuda| {
        has_cuda_lib
            && cuda.join("crt/host_config.h").exists()
            && (cuda.join("nv/target").exists() || cuda.join("cccl/nv/target").exists())
    });
    match &cuda {
        Some(cuda) => {
            build
                .define("EXT_CUDA", None)
                .include(cuda)
                .include(cuda.join("cccl"));
        }
        None => println!(
            "cargo:warning=torch-ext: no CUDA headers in this build (needs libtorch_cuda and the CUDA headers of scripts/requirements-extra.txt): CUDA-graph decoding and multi-GPU training will be refused at run time"
        ),
    }
    match (&cuda, nccl) {
        (Some(_), Some(nccl)) if nccl.join("nccl.h").exists() => {
            build.define("USE_C10D_NCCL", None).include(&nccl);
        }
        _ => println!(
            "cargo:warning=torch-ext: no NCCL process group in this build (needs libtorch_cuda, nccl.h and the CUDA headers of scripts/requirements-extra.txt): multi-GPU training will be refused at run time"
        ),
    }
    build
        .cpp(true)
        .file("csrc/ext.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("torch_ext");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // The test binaries need libtorch_cuda loaded for CUDA to exist at all; see pipeline/build.rs for
    // why the library is named inside the no-as-needed span.
    if has_cuda_lib {
        println!(
            "cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-L{},-ltorch_cuda,--pop-state",
            lib.display()
        );
    }
}
