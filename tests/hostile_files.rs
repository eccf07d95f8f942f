//! Hostile files outside the data shards, made at test time and small on disk: `fid --ref` archives
//! whose `.npy` headers lie (a deflate bomb behind a (36000, 36000) header, shapes that disagree or that
//! the member cannot hold) or whose numbers cannot be a covariance; `.pth` state_dicts with stride-0
//! views, storages of 2^40 and 2^62 elements and pickles of millions of APPENDs; checkpoint sidecars with
//! absurd widths or NaN σ and safetensors headers that claim more than the file holds; configs with NaN
//! guards. Each runs as a child process of the pipeline binary under a watchdog (killed past 2 GiB of
//! RSS or its time budget) and must end in exit status 1, at a peak RSS under 1 GiB (its VmHWM), with
//! an error naming the file and the key, never a panic or an abort; good inputs run between them and
//! must still work.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::pipeline;
use tch::{Device, Kind, Tensor};

/// Peak resident memory a child refusing a hostile input may reach. The binary itself, with libtorch
/// loaded, peaks at ~0.46 GiB before it reads anything.
const HOSTILE_CAP_KB: u64 = 1 << 20;
/// Peak for the good inputs (`fid` runs the Inception network and two 2048² eigendecompositions).
const GOOD_CAP_KB: u64 = 2 << 20;
/// Where the watchdog kills a child, so that a regression fails the test instead of the machine.
const KILL_KB: u64 = 2 << 20;
/// Wall time a child may take; a hostile input is refused in well under a second.
const TIME_BUDGET: Duration = Duration::from_secs(90);

struct Ran {
    what: String,
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
    peak_kb: u64,
    elapsed: Duration,
    killed: Option<&'static str>,
}

impl Ran {
    fn describe(&self) -> String {
        format!(
            "{}: exit {:?}, signal {:?}, killed for {:?}, {:.2} s, peak RSS {} MiB\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.code,
            self.signal,
            self.killed,
            self.elapsed.as_secs_f64(),
            self.peak_kb >> 10,
            self.stdout,
            self.stderr
        )
    }

    fn within_limits(&self, cap_kb: u64) {
        assert!(self.killed.is_none(), "{}", self.describe());
        assert!(self.peak_kb < cap_kb, "{}", self.describe());
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("memory allocation"),
            "{}",
            self.describe()
        );
    }

    /// Exit status 1 with every one of `needles` in the error.
    fn refused(&self, needles: &[&str]) {
        self.within_limits(HOSTILE_CAP_KB);
        assert_eq!(self.code, Some(1), "{}", self.describe());
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "the error does not name `{n}`: {}",
                self.describe()
            );
        }
        eprintln!(
            "{}: refused in {:.2} s, peak RSS {} MiB",
            self.what,
            self.elapsed.as_secs_f64(),
            self.peak_kb >> 10
        );
    }

    fn succeeded(&self) {
        self.within_limits(GOOD_CAP_KB);
        assert_eq!(self.code, Some(0), "{}", self.describe());
        eprintln!(
            "{}: ok in {:.2} s, peak RSS {} MiB",
            self.what,
            self.elapsed.as_secs_f64(),
            self.peak_kb >> 10
        );
    }
}

/// A `Vm…:` line of /proc/PID/status in KiB (VmRSS now, VmHWM its peak so far).
fn vm_kb(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs `cmd` to its end under the watchdog. RLIMIT_AS would not do: libtorch reserves far more
/// address space than it touches. The child's own high-water mark (VmHWM, which starts afresh at its
/// exec) is polled every few milliseconds, and the child killed past [`KILL_KB`] so that a regression
/// fails the test instead of the machine. wait4's ru_maxrss is not used: Linux carries the spawning
/// test process's peak into it across the exec.
// The child is reaped by waitpid below, which std cannot see.
#[allow(clippy::zombie_processes)]
fn run_capped(what: &str, cmd: &mut Command, logs: &Path) -> Ran {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let (out_path, err_path) = (logs.join(format!("{n}.out")), logs.join(format!("{n}.err")));
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let pid = child.id() as i32;
    let mut killed = None;
    let mut peak_kb = 0;
    let status = loop {
        let mut status = 0;
        let flags = if killed.is_some() { 0 } else { libc::WNOHANG };
        // SAFETY: pid is our own child, not reaped yet (std's Child is never waited on).
        let r = unsafe { libc::waitpid(pid, &mut status, flags) };
        if r == pid {
            break status;
        }
        assert_eq!(r, 0, "waitpid: {}", std::io::Error::last_os_error());
        peak_kb = peak_kb.max(vm_kb(pid, "VmHWM:").unwrap_or(0));
        if vm_kb(pid, "VmRSS:").is_some_and(|kb| kb > KILL_KB) {
            killed = Some("memory");
        } else if start.elapsed() > TIME_BUDGET {
            killed = Some("time");
        }
        if killed.is_some() {
            child.kill().unwrap();
            continue;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    let exited = libc::WIFEXITED(status);
    Ran {
        what: what.to_string(),
        code: exited.then(|| libc::WEXITSTATUS(status)),
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        stdout: std::fs::read_to_string(out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(err_path).unwrap_or_default(),
        peak_kb,
        elapsed,
        killed,
    }
}

// ---- archives, written by hand so that every size field can lie ----

fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
        *t = c;
    }
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

struct Member {
    name: String,
    /// 0 stored, 8 deflated.
    method: u16,
    /// The entry's bytes as stored.
    raw: Vec<u8>,
    crc: u32,
    /// Uncompressed size as the archive records it; above 4 GiB a zip64 field carries it.
    size: u64,
}

impl Member {
    fn stored(name: &str, data: &[u8]) -> Member {
        Member {
            name: name.into(),
            method: 0,
            raw: data.to_vec(),
            crc: crc32(data),
            size: data.len() as u64,
        }
    }

    fn deflated(name: &str, data: &[u8]) -> Member {
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        Member {
            name: name.into(),
            method: 8,
            raw: enc.finish().unwrap(),
            crc: crc32(data),
            size: data.len() as u64,
        }
    }
}

fn zip_of(members: &[Member]) -> Vec<u8> {
    let (mut out, mut central) = (Vec::new(), Vec::new());
    let u16le = |v: &mut Vec<u8>, x: u16| v.extend_from_slice(&x.to_le_bytes());
    let u32le = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
    for m in members {
        let offset = out.len() as u32;
        let big = m.size >= 0xFFFF_FFFF;
        let size32 = if big { 0xFFFF_FFFF } else { m.size as u32 };
        u32le(&mut out, 0x0403_4b50);
        for x in [45, 0, m.method, 0, 0x21] {
            u16le(&mut out, x);
        }
        for x in [m.crc, m.raw.len() as u32, size32] {
            u32le(&mut out, x);
        }
        u16le(&mut out, m.name.len() as u16);
        u16le(&mut out, 0);
        out.extend_from_slice(m.name.as_bytes());
        out.extend_from_slice(&m.raw);
        u32le(&mut central, 0x0201_4b50);
        for x in [45, 45, 0, m.method, 0, 0x21] {
            u16le(&mut central, x);
        }
        for x in [m.crc, m.raw.len() as u32, size32] {
            u32le(&mut central, x);
        }
        for x in [m.name.len() as u16, if big { 12 } else { 0 }, 0, 0, 0] {
            u16le(&mut central, x);
        }
        u32le(&mut central, 0);
        u32le(&mut central, offset);
        central.extend_from_slice(m.name.as_bytes());
        if big {
            u16le(&mut central, 1);
            u16le(&mut central, 8);
            central.extend_from_slice(&m.size.to_le_bytes());
        }
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    u32le(&mut out, 0x0605_4b50);
    for x in [0, 0, members.len() as u16, members.len() as u16] {
        u16le(&mut out, x);
    }
    u32le(&mut out, central.len() as u32);
    u32le(&mut out, cd_offset);
    u16le(&mut out, 0);
    out
}

fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.div_ceil(64) * 64 - unpadded));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

fn npy_f64(shape: &[usize], values: &[f64]) -> Vec<u8> {
    let mut out = npy_header("<f8", shape);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn f64s(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).contiguous().view(-1)).unwrap()
}

/// Raw deflate (fixed Huffman codes) of `prefix` then `zeros` zero bytes, built directly: the zeros
/// are one literal and back-references of 258 bytes at distance 1, 13 bits each, so a gigabyte costs
/// ~6 MB and no time to compress.
fn deflate_prefix_then_zeros(prefix: &[u8], zeros: u64) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }
    impl Bits {
        fn put(&mut self, value: u64, bits: u32) {
            self.acc |= value << self.n;
            self.n += bits;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        /// A Huffman code, sent most significant bit first.
        fn code(&mut self, code: u32, len: u32) {
            self.put((code.reverse_bits() >> (32 - len)) as u64, len);
        }
        fn literal(&mut self, v: u8) {
            if v < 144 {
                self.code(0x30 + v as u32, 8)
            } else {
                self.code(0x190 + (v as u32 - 144), 9)
            }
        }
    }
    let mut b = Bits {
        out: Vec::with_capacity((zeros / 160) as usize + prefix.len() + 64),
        acc: 0,
        n: 0,
    };
    b.put(1, 1); // the final block
    b.put(1, 2); // fixed Huffman codes
    for &v in prefix {
        b.literal(v);
    }
    if zeros > 0 {
        b.literal(0);
        let rest = zeros - 1;
        for _ in 0..rest / 258 {
            b.code(0xC5, 8); // length 258 (symbol 285)
            b.code(0, 5); // distance 1
        }
        for _ in 0..rest % 258 {
            b.literal(0);
        }
    }
    b.code(0, 7); // end of block
    b.put(0, 7);
    b.out
}

// ---- .pth state_dicts: a pickle written op by op, storages as zip entries ----

#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn text(&mut self, s: &str) -> &mut Self {
        self.op(b"X")
            .op(&(s.len() as u32).to_le_bytes())
            .op(s.as_bytes())
    }
    fn int(&mut self, v: i64) -> &mut Self {
        self.op(&[0x8a, 8]).op(&v.to_le_bytes())
    }
    fn ints(&mut self, vs: &[i64]) -> &mut Self {
        self.op(b"(");
        for &v in vs {
            self.int(v);
        }
        self.op(b"t")
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(b"c")
            .op(module.as_bytes())
            .op(b"\n")
            .op(name.as_bytes())
            .op(b"\n")
    }
}

/// One tensor of a state_dict: a view (offset, size, stride) of float storage `key` of `numel`.
struct View<'a> {
    name: &'a str,
    key: &'a str,
    numel: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

/// What torch.save writes for an OrderedDict of these tensors (protocol 2).
fn state_dict_pickle(views: &[View]) -> Vec<u8> {
    let mut p = Pickle::default();
    p.op(&[0x80, 2]).op(b"}(");
    for v in views {
        p.text(v.name)
            .global("torch._utils", "_rebuild_tensor_v2")
            .op(b"((")
            .text("storage")
            .global("torch", "FloatStorage")
            .text(v.key)
            .text("cpu")
            .int(v.numel)
            .op(b"tQ")
            .int(0)
            .ints(&v.size)
            .ints(&v.stride)
            .op(&[0x89])
            .global("collections", "OrderedDict")
            .op(b")Rt")
            .op(b"R");
    }
    p.op(b"u.");
    p.0
}

fn pth_of(pickle: Member, storages: Vec<Member>) -> Vec<u8> {
    let mut members = vec![pickle, Member::stored("archive/byteorder", b"little")];
    members.extend(storages);
    members.push(Member::stored("archive/version", b"3\n"));
    zip_of(&members)
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

// ---- the tests ----

/// `fid --ref`: lying headers are refused before a byte of the array is inflated, and statistics that
/// are not a mean and a covariance are refused instead of scored. The good reference is scored before
/// and after them all (each good `fid` run takes ~20 s of Inception and eigendecompositions on a CPU;
/// the refused runs write nothing another could trip on).
#[test]
fn fid_references_that_lie_or_cannot_be_covariances_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    common::run_ok(
        pipeline()
            .args(["encoders", "init", "--preset", "inception", "--out"])
            .arg(root),
    );
    let weights = root.join("inception.safetensors");
    // Four 32-pixel images as `pipeline sample` writes them.
    let pixels: Vec<u8> = (0..4 * 32 * 32 * 3).map(|i| (i * 37 % 251) as u8).collect();
    let mut arr = npy_header("|u1", &[4, 32, 32, 3]);
    arr.extend_from_slice(&pixels);
    let samples = write(
        &root.join("samples.npz"),
        &zip_of(&[Member::deflated("arr_0.npy", &arr)]),
    );
    let fid = |what: &str, reference: &Path| {
        run_capped(
            what,
            pipeline()
                .args(["fid", "--device", "cpu", "--batch", "4", "--samples"])
                .arg(&samples)
                .arg("--ref")
                .arg(reference)
                .arg("--weights")
                .arg(&weights),
            &logs,
        )
    };
    let d = 2048usize;
    tch::manual_seed(5);
    let a = Tensor::randn([d as i64, 16], (Kind::Double, Device::Cpu)) * 0.1;
    let sigma = a.mm(&a.tr());
    let mu = Tensor::randn([d as i64], (Kind::Double, Device::Cpu)) * 0.1;
    let reference = |name: &str, mu: &[u8], sigma: &[u8]| {
        write(
            &root.join(name),
            &zip_of(&[
                Member::deflated("mu.npy", mu),
                Member::deflated("sigma.npy", sigma),
            ]),
        )
    };
    let good_mu = npy_f64(&[d], &f64s(&mu));
    let good = reference("good.npz", &good_mu, &npy_f64(&[d, d], &f64s(&sigma)));
    let good_run = || {
        let r = fid("good reference", &good);
        r.succeeded();
        let fid: f64 = r
            .stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("FID:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no FID in {}", r.describe()));
        assert!(fid.is_finite() && fid >= 0.0, "{}", r.describe());
    };
    good_run();

    // A (36000, 36000) float64 `sigma` (10.4 GB as the archive records it, 9 MB deflated; its
    // stream inflates 1.5 GB before it ends): with `mu` of 2048 the shapes disagree, with `mu` of 36000
    // they agree and the width is not the Inception features'.
    let bomb_header = npy_header("<f8", &[36000, 36000]);
    let bomb = || Member {
        name: "sigma.npy".into(),
        method: 8,
        raw: deflate_prefix_then_zeros(&bomb_header, 1_500_000_000),
        crc: 0,
        size: bomb_header.len() as u64 + 36000 * 36000 * 8,
    };
    let big_mu = npy_f64(&[36000], &vec![0.0; 36000]);
    for (name, mu) in [("bomb.npz", &good_mu), ("bomb-agreeing.npz", &big_mu)] {
        let path = write(
            &root.join(name),
            &zip_of(&[Member::deflated("mu.npy", mu), bomb()]),
        );
        assert!(std::fs::metadata(&path).unwrap().len() < 16 << 20);
        fid(name, &path).refused(&[name, "[36000, 36000]", "(2048, 2048)"]);
    }

    // A header that claims more than its member holds, and one that leaves bytes after its data.
    let short = npy_header("<f8", &[d, d]);
    let path = reference("short.npz", &good_mu, &short);
    fid("short.npz", &path).refused(&["short.npz", "sigma", "claims shape [2048, 2048]"]);
    let mut long_mu = good_mu.clone();
    long_mu.extend_from_slice(&[0; 64]);
    let path = reference("trailing.npz", &long_mu, &npy_f64(&[d, d], &f64s(&sigma)));
    fid("trailing.npz", &path).refused(&["trailing.npz", "`mu`", "ends after"]);

    // Numbers no feature set has: an eigenvalue of −1 (pytorch-fid's formula gave "FID: −1384" for
    // such a file), an asymmetric matrix, NaN and infinity.
    let mut cases: Vec<(&str, Vec<u8>, Vec<u8>, &str)> = vec![];
    let bent = &sigma - Tensor::eye(d as i64, (Kind::Double, Device::Cpu)) * 0.5;
    cases.push((
        "not-psd.npz",
        good_mu.clone(),
        npy_f64(&[d, d], &f64s(&bent)),
        "not positive semi-definite",
    ));
    let mut skew = f64s(&sigma);
    skew[1] += 1.0;
    cases.push((
        "asymmetric.npz",
        good_mu.clone(),
        npy_f64(&[d, d], &skew),
        "not symmetric",
    ));
    let mut nan_mu = f64s(&mu);
    nan_mu[7] = f64::NAN;
    cases.push((
        "nan-mu.npz",
        npy_f64(&[d], &nan_mu),
        npy_f64(&[d, d], &f64s(&sigma)),
        "mu has NaN",
    ));
    let mut inf_sigma = f64s(&sigma);
    inf_sigma[0] = f64::INFINITY;
    cases.push((
        "inf-sigma.npz",
        good_mu.clone(),
        npy_f64(&[d, d], &inf_sigma),
        "sigma has NaN or infinite",
    ));
    for (name, mu, sigma, why) in cases {
        let path = reference(name, &mu, &sigma);
        fid(name, &path).refused(&[name, why]);
    }
    good_run();
}

/// `flow import` of `.pth` files whose views, storages or pickles claim what the file does not hold.
#[test]
fn pth_files_that_claim_more_than_they_hold_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    // A good state_dict: the tiny flow's tensors in torch.save's layout.
    let init = root.join("init.safetensors");
    common::run_ok(
        pipeline()
            .args([
                "flow", "init", "--preset", "tiny", "--seed", "1", "--output",
            ])
            .arg(&init),
    );
    let tensors = Tensor::read_safetensors(&init).unwrap();
    let keys: Vec<String> = (0..tensors.len()).map(|i| i.to_string()).collect();
    let views: Vec<View> = tensors
        .iter()
        .zip(&keys)
        .map(|((name, t), key)| View {
            name,
            key,
            numel: t.numel() as i64,
            size: t.size(),
            stride: t.stride(),
        })
        .collect();
    let storages = || -> Vec<Member> {
        tensors
            .iter()
            .zip(&keys)
            .map(|((_, t), key)| {
                let values =
                    Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view(-1)).unwrap();
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                Member::stored(&format!("archive/data/{key}"), &bytes)
            })
            .collect()
    };
    let good = write(
        &root.join("good.pth"),
        &pth_of(
            Member::stored("archive/data.pkl", &state_dict_pickle(&views)),
            storages(),
        ),
    );
    let import = |what: &str, pth: &Path| {
        let out = root.join(format!("out-{what}"));
        run_capped(
            what,
            pipeline()
                .args(["flow", "import", "--from", "ml-tarflow"])
                .arg(pth)
                .args(["--image-size", "16", "--patch-size", "4"])
                .args(["--noise-std", "0.05", "--out"])
                .arg(out),
            &logs,
        )
    };
    import("good.pth", &good).succeeded();

    let one = |name: &'static str, numel: i64, size: Vec<i64>, stride: Vec<i64>| {
        state_dict_pickle(&[View {
            name,
            key: "0",
            numel,
            size,
            stride,
        }])
    };
    let four_bytes = || Member::stored("archive/data/0", &1f32.to_le_bytes());
    let mut cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![];
    // One float viewed as [32768, 32768] through zero strides: 4 GiB once made contiguous.
    cases.push((
        "stride0.pth",
        pth_of(
            Member::stored(
                "archive/data.pkl",
                &one("w", 1, vec![32768, 32768], vec![0, 0]),
            ),
            vec![four_bytes()],
        ),
        vec![
            "stride0.pth",
            "`w`",
            "[32768, 32768]",
            "beyond what a file of",
        ],
    ));
    // A storage of 2^40 floats whose zip entry claims the 4 TiB too (it holds 4 bytes).
    let mut lying = four_bytes();
    lying.size = 4 << 40;
    cases.push((
        "huge-storage.pth",
        pth_of(
            Member::stored("archive/data.pkl", &one("w", 1 << 40, vec![1], vec![1])),
            vec![lying],
        ),
        vec!["huge-storage.pth", "storage 0", "4398046511104 bytes"],
    ));
    // The same storage with an honest entry: it holds 4 of the 4 TiB.
    cases.push((
        "short-storage.pth",
        pth_of(
            Member::stored("archive/data.pkl", &one("w", 1 << 40, vec![1], vec![1])),
            vec![four_bytes()],
        ),
        vec!["short-storage.pth", "storage 0", "has 4 bytes"],
    ));
    // 2^62 elements: the byte count overflows.
    cases.push((
        "numel-2-62.pth",
        pth_of(
            Member::stored("archive/data.pkl", &one("w", 1 << 62, vec![1], vec![1])),
            vec![four_bytes()],
        ),
        vec!["numel-2-62.pth", "overflow"],
    ));
    // A view whose size product overflows.
    cases.push((
        "size-overflow.pth",
        pth_of(
            Member::stored(
                "archive/data.pkl",
                &one("w", 1, vec![1 << 32, 1 << 32, 4], vec![0, 0, 0]),
            ),
            vec![four_bytes()],
        ),
        vec!["size-overflow.pth", "overflows"],
    ));
    // Pickles of 30 M and 60 M APPENDs to one list (60 and 120 MB, deflated to ~0.1 MB each).
    for (name, appends) in [
        ("appends-30m.pth", 30_000_000usize),
        ("appends-60m.pth", 60_000_000),
    ] {
        let mut p = Pickle::default();
        p.op(&[0x80, 2]).op(b"}(").text("junk").op(b"]");
        p.0.extend(std::iter::repeat_n(*b"Na", appends).flatten());
        p.op(b"u.");
        cases.push((
            name,
            pth_of(Member::deflated("archive/data.pkl", &p.0), vec![]),
            vec![name, "data.pkl"],
        ));
    }
    for (name, bytes, needles) in cases {
        assert!(bytes.len() < 1 << 20, "{name} is {} bytes", bytes.len());
        let path = write(&root.join(name), &bytes);
        import(name, &path).refused(&needles);
        import("good.pth", &good).succeeded();
    }
}

/// `sample` on a checkpoint whose sidecar asks for an absurd or meaningless model, or whose
/// safetensors header claims more than the file holds.
#[test]
fn checkpoint_sidecars_and_headers_that_cannot_be_right_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let ckpt = root.join("flow.safetensors");
    common::run_ok(
        pipeline()
            .args([
                "flow", "init", "--preset", "tiny", "--seed", "1", "--output",
            ])
            .arg(&ckpt),
    );
    let side = ckpt.with_extension("model.toml");
    let good_side = std::fs::read_to_string(&side).unwrap();
    let good_weights = std::fs::read(&ckpt).unwrap();
    let runs = AtomicUsize::new(0);
    let sample = |what: &str| {
        let out = root.join(format!("out{}", runs.fetch_add(1, Ordering::Relaxed)));
        run_capped(
            what,
            pipeline()
                .args(["sample", "--device", "cpu", "--num", "2", "--checkpoint"])
                .arg(&ckpt)
                .arg("--out")
                .arg(out),
            &logs,
        )
    };
    let good_run = || {
        std::fs::write(&side, &good_side).unwrap();
        std::fs::write(&ckpt, &good_weights).unwrap();
        sample("good checkpoint").succeeded();
    };
    good_run();
    let set = |key: &str, value: &str| -> String {
        let line = good_side
            .lines()
            .find(|l| l.starts_with(&format!("{key} =")))
            .unwrap_or_else(|| panic!("no `{key}` in {good_side}"));
        good_side.replace(line, &format!("{key} = {value}"))
    };
    let cases = [
        ("channels", "1000000000", "model.channels = 1000000000"),
        ("num_blocks", "1000000", "model.num_blocks = 1000000"),
        (
            "layers_per_block",
            "1000000000",
            "model.layers_per_block = 1000000000",
        ),
        ("channels", "0", "model.channels = 0"),
        ("mlp_ratio", "nan", "model.mlp_ratio = NaN"),
        ("noise_std", "nan", "model.noise_std = NaN"),
        ("noise_std", "-1.0", "model.noise_std = -1"),
        ("channels", "65536", "more than 20000000000"),
    ];
    for (key, value, needle) in cases {
        std::fs::write(&side, set(key, value)).unwrap();
        sample(&format!("{key} = {value}")).refused(&["flow.model.toml", needle]);
        good_run();
    }
    // safetensors headers: a shape of 2^62 elements over 8 bytes, and a header length of 2^60.
    let header = br#"{"w":{"dtype":"F32","shape":[2147483648,2147483648],"data_offsets":[0,8]}}"#;
    let mut lying = (header.len() as u64).to_le_bytes().to_vec();
    lying.extend_from_slice(header);
    lying.extend_from_slice(&[0; 8]);
    let mut long_header = (1u64 << 60).to_le_bytes().to_vec();
    long_header.extend_from_slice(b"{}");
    for (name, bytes) in [
        ("lying shape", lying),
        ("header of 2^60 bytes", long_header),
    ] {
        std::fs::write(&side, &good_side).unwrap();
        std::fs::write(&ckpt, &bytes).unwrap();
        sample(name).refused(&["flow.safetensors"]);
        good_run();
    }
}

/// `config --check` refuses what the jobs refuse, naming the key.
#[test]
fn config_check_refuses_nan_guards_and_zero_widths() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path();
    let check = |what: &str, set: &[&str]| {
        let mut cmd = pipeline();
        cmd.args(["config", "--check"]);
        for s in set {
            cmd.args(["--set", s]);
        }
        run_capped(what, &mut cmd, logs)
    };
    check("demo preset", &[]).succeeded();
    for (set, needle) in [
        ("model.channels=0", "model.channels = 0"),
        ("model.mlp_ratio=nan", "model.mlp_ratio = NaN"),
        ("model.noise_std=nan", "model.noise_std = NaN"),
        ("model.num_blocks=1000000", "model.num_blocks = 1000000"),
        ("data.max_bad_fraction=nan", "data.max_bad_fraction NaN"),
        ("data.max_bad_fraction=-0.5", "data.max_bad_fraction -0.5"),
    ] {
        check(set, &[set]).refused(&[needle]);
        check("demo preset", &[]).succeeded();
    }
}
