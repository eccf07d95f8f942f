//! Which backend runs a float32 CPU product, decided by measuring both on the machine it runs on.
//!
//! oneDNN's kernels beat MKL's sgemm by 2–3× on AMD CPUs, where MKL takes a generic path, and lose on
//! some Intel ones, where MKL is at home and oneDNN's custom autograd node adds copies; no threshold
//! measured on one CPU holds on the other. So the first time a shape class is met, both backends run it
//! a few times (milliseconds, as cuDNN's benchmark mode does) and the faster one is kept for the
//! process; MKL, PyTorch's own path, keeps a class unless oneDNN is faster by more than the noise
//! margin. A class is the product kind (forward only, forward + both gradient products, or a decode
//! step's prepacked weight), the weight's shape and the row count rounded up to a power of two.
//!
//! With a store (`set_store`) the choices persist in a small text file shared by every process that
//! uses the same file: the first process to decide a class writes it under a file lock, and every later
//! one (and a concurrent one that measured too) adopts what the file says, so two processes on one
//! machine never route a class differently and a resumed run computes what the first one did.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

/// What a product is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Product {
    /// No gradient: inference, frozen layers, the sampler's parallel passes.
    Forward,
    /// Forward with the input and weight gradient products (a training step).
    Training,
    /// A KV-cache decode step's product by a weight packed once per reverse pass, against the plain
    /// product.
    Packed,
}

impl Product {
    fn name(self) -> &'static str {
        match self {
            Product::Forward => "forward",
            Product::Training => "training",
            Product::Packed => "packed",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [Product::Forward, Product::Training, Product::Packed]
            .into_iter()
            .find(|p| p.name() == name)
    }
}

/// A shape class: products that share it share the choice. The intra-op thread count is part of it:
/// the faster backend on one core need not be the faster on sixteen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Class {
    pub product: Product,
    /// Rows rounded up to a power of two.
    pub rows: i64,
    pub fan_in: i64,
    pub fan_out: i64,
    pub threads: i64,
}

impl Class {
    pub fn new(product: Product, rows: i64, fan_in: i64, fan_out: i64, threads: i64) -> Self {
        let rows = (rows.max(1) as u64).next_power_of_two() as i64;
        Class {
            product,
            rows,
            fan_in,
            fan_out,
            threads,
        }
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows ≤ {}, {} → {}, {} threads",
            self.product.name(),
            self.rows,
            self.fan_in,
            self.fan_out,
            self.threads
        )
    }
}

/// Where a choice came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Timed in this process.
    Measured,
    /// Read from the store (another process, or an earlier run, timed it).
    Stored,
}

/// The backend a class runs on, with the two timings (seconds per product) behind it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    pub onednn: bool,
    pub mkl_s: f64,
    pub onednn_s: f64,
    pub source: Source,
}

impl Choice {
    pub fn backend(&self) -> &'static str {
        if self.onednn {
            "oneDNN"
        } else {
            "MKL"
        }
    }
}

/// oneDNN must be this much faster to take a class from MKL: below it the two are within the noise of
/// a few timed products on a shared machine.
const MARGIN: f64 = 0.97;

/// Timed products per backend (after one untimed each); the median is compared.
const REPEATS: usize = 3;
/// Short products are timed until their timings add up to this much (2 ms), at most MAX_REPEATS times.
const MIN_TIMED_S: f64 = 2e-3;
const MAX_REPEATS: usize = 101;

/// Measurements stop growing the product beyond this many multiply-adds: the rows measured are cut
/// (to at least 16) so that deciding a large layer's class costs a fraction of a second, not seconds,
/// while keeping enough rows that the kernels run as they do at the real size.
const MAX_MEASURED_MACS: i64 = 1 << 29;

struct Table {
    choices: BTreeMap<Class, Choice>,
    /// The classes this process has routed (the store may hold others).
    used: std::collections::BTreeSet<Class>,
    store: Option<PathBuf>,
}

fn table() -> &'static Mutex<Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE.get_or_init(|| {
        Mutex::new(Table {
            choices: BTreeMap::new(),
            used: Default::default(),
            store: None,
        })
    })
}

/// Persist the choices in `path` (created with its directory when missing), shared with every process
/// that names the same file; `None` keeps them in this process only.
pub fn set_store(path: Option<PathBuf>) {
    table().lock().unwrap_or_else(|e| e.into_inner()).store = path;
}

/// The choice of every class this process has routed, measured here or read from the store.
pub fn choices() -> Vec<(Class, Choice)> {
    let t = table().lock().unwrap_or_else(|e| e.into_inner());
    t.used.iter().map(|c| (*c, t.choices[c])).collect()
}

thread_local! {
    static FORCED: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every class on this thread routed to oneDNN (`true`) or MKL (`false`) regardless of
/// measurements: for comparisons that need one backend (a test of the packed path must pack).
pub fn forced<T>(onednn: bool, f: impl FnOnce() -> T) -> T {
    let before = FORCED.with(|c| c.replace(Some(onednn)));
    let out = f();
    FORCED.with(|c| c.set(before));
    out
}

/// Whether oneDNN runs a product of `rows` rows by a (fan_out, fan_in) weight: the class's choice,
/// measured on first use. Callers check [`crate::onednn::enabled`] (or, for packing, their own switch) first.
pub fn uses_onednn(product: Product, rows: i64, fan_in: i64, fan_out: i64) -> bool {
    if rows <= 0 || fan_in <= 0 || fan_out <= 0 || !crate::onednn::available() {
        return false;
    }
    if let Some(forced) = FORCED.with(std::cell::Cell::get) {
        return forced;
    }
    let class = Class::new(
        product,
        rows,
        fan_in,
        fan_out,
        tch::get_num_threads() as i64,
    );
    let mut t = table().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = t.choices.get(&class).copied() {
        t.used.insert(class);
        return c.onednn;
    }
    if let Some(stored) = t.store.as_ref().and_then(|p| read_store(p).ok()) {
        // What this process measured stays: it has already computed with it.
        for (c, choice) in stored {
            t.choices.entry(c).or_insert(choice);
        }
        if let Some(c) = t.choices.get(&class).copied() {
            t.used.insert(class);
            return c.onednn;
        }
    }
    // The lock is held while timing: a second thread meeting the same class waits for the answer
    // instead of timing it under the first one's load.
    let mut choice = measure(class);
    if let Some(path) = t.store.clone() {
        match persist(&path, class, choice) {
            Ok(Some(adopted)) => choice = adopted,
            Ok(None) => {}
            Err(e) => tracing::warn!(
                "onednn routing: cannot record the choice in {}: {e} (kept for this process only)",
                path.display()
            ),
        }
    }
    tracing::info!(
        "onednn routing: {class}: MKL {:.3} ms, oneDNN {:.3} ms → {}{}",
        choice.mkl_s * 1e3,
        choice.onednn_s * 1e3,
        choice.backend(),
        if choice.source == Source::Stored {
            " (as the store already says)"
        } else {
            ""
        }
    );
    t.choices.insert(class, choice);
    t.used.insert(class);
    choice.onednn
}

/// Deterministic, well-scaled values: the routing must not draw from the global RNG, whose stream a
/// seeded run depends on.
fn filler(shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.37)
        .sin()
        .view(shape)
}

/// At least REPEATS timings of `f`, and for products of a few microseconds as many as fill MIN_TIMED_S
/// (up to MAX_REPEATS), so a decode-step class is not decided by three noisy samples. `None` when a
/// run fails.
fn timings(f: &dyn Fn() -> Option<()>) -> Option<Vec<f64>> {
    let mut times = Vec::with_capacity(REPEATS);
    let mut total = 0.0;
    while times.len() < REPEATS || (total < MIN_TIMED_S && times.len() < MAX_REPEATS) {
        let start = Instant::now();
        f()?;
        let t = start.elapsed().as_secs_f64();
        total += t;
        times.push(t);
    }
    Some(times)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times both backends on the class's shapes. A backend that fails (it should not) loses.
fn measure(class: Class) -> Choice {
    let per_row = class.fan_in.saturating_mul(class.fan_out).max(1);
    let rows = class.rows.min((MAX_MEASURED_MACS / per_row).max(16));
    let x = filler(&[rows, class.fan_in]);
    let w = filler(&[class.fan_out, class.fan_in]) * (1.0 / (class.fan_in as f64).sqrt());
    let b = filler(&[class.fan_out]);
    let time = |f: &dyn Fn() -> Option<()>| -> f64 {
        if f().is_none() {
            return f64::INFINITY;
        }
        timings(f).map_or(f64::INFINITY, median)
    };
    let (mkl_s, onednn_s) = match class.product {
        Product::Forward => tch::no_grad(|| {
            (
                time(&|| {
                    let _ = x.linear(&w, Some(&b));
                    Some(())
                }),
                time(&|| crate::onednn::linear(&x, &w, Some(&b)).ok().map(drop)),
            )
        }),
        Product::Training => {
            // Inside a network the input is an activation and needs its gradient too.
            let x = x.set_requires_grad(true);
            let w = w.set_requires_grad(true);
            let b = b.set_requires_grad(true);
            let step = |onednn: bool| -> Option<()> {
                let y = if onednn {
                    crate::onednn::linear(&x, &w, Some(&b)).ok()?
                } else {
                    x.linear(&w, Some(&b))
                };
                let grads =
                    Tensor::run_backward(&[y.sum(Kind::Float)], &[&x, &w, &b], false, false);
                drop(grads);
                Some(())
            };
            (time(&|| step(false)), time(&|| step(true)))
        }
        Product::Packed => tch::no_grad(|| match crate::onednn::PackedLinear::new(&w, Some(&b)) {
            Ok(packed) => (
                time(&|| {
                    let _ = x.linear(&w, Some(&b));
                    Some(())
                }),
                time(&|| {
                    packed
                        .forward(&x, crate::onednn::Activation::None)
                        .ok()
                        .map(drop)
                }),
            ),
            Err(_) => (0.0, f64::INFINITY),
        }),
    };
    Choice {
        onednn: onednn_s < MARGIN * mkl_s,
        mkl_s,
        onednn_s,
        source: Source::Measured,
    }
}

/// One line per class: `product rows fan_in fan_out threads backend mkl_s onednn_s`. Lines that do not parse
/// are skipped: the file is a cache, and a torn or foreign line only costs a measurement.
fn parse(text: &str) -> BTreeMap<Class, Choice> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [product, rows, fan_in, fan_out, threads, backend, mkl, onednn] = f[..] else {
                return None;
            };
            let class = Class::new(
                Product::parse(product)?,
                rows.parse().ok()?,
                fan_in.parse().ok()?,
                fan_out.parse().ok()?,
                threads.parse().ok()?,
            );
            let onednn_chosen = match backend {
                "onednn" => true,
                "mkl" => false,
                _ => return None,
            };
            Some((
                class,
                Choice {
                    onednn: onednn_chosen,
                    mkl_s: mkl.parse().ok()?,
                    onednn_s: onednn.parse().ok()?,
                    source: Source::Stored,
                },
            ))
        })
        .collect()
}

fn line(class: Class, c: Choice) -> String {
    format!(
        "{} {} {} {} {} {} {:e} {:e}\n",
        class.product.name(),
        class.rows,
        class.fan_in,
        class.fan_out,
        class.threads,
        if c.onednn { "onednn" } else { "mkl" },
        c.mkl_s,
        c.onednn_s
    )
}

/// At most this much of a store is read: it holds a line per class, a few dozen at most.
const MAX_STORE_BYTES: u64 = 1 << 20;

fn read_locked(file: &mut File) -> std::io::Result<BTreeMap<Class, Choice>> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0))?;
    file.take(MAX_STORE_BYTES).read_to_string(&mut text)?;
    Ok(parse(&text))
}

fn read_store(path: &std::path::Path) -> std::io::Result<BTreeMap<Class, Choice>> {
    let mut file = File::open(path)?;
    file.lock_shared()?;
    read_locked(&mut file)
}

/// Records `choice` for `class` unless the store already has one, which is returned to be adopted.
fn persist(
    path: &std::path::Path,
    class: Class,
    choice: Choice,
) -> std::io::Result<Option<Choice>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    file.lock()?;
    if let Some(existing) = read_locked(&mut file)?.get(&class) {
        return Ok(Some(*existing));
    }
    // One short append under the lock: a reader sees the line whole or not at all.
    file.write_all(line(class, choice).as_bytes())?;
    file.sync_all()?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_rows_up_and_lines_round_trip() {
        let c = Class::new(Product::Training, 100, 64, 256, 2);
        assert_eq!(c.rows, 128);
        assert_eq!(Class::new(Product::Forward, 128, 1, 1, 1).rows, 128);
        let choice = Choice {
            onednn: true,
            mkl_s: 1.5e-3,
            onednn_s: 1e-3,
            source: Source::Measured,
        };
        let text = format!("{}garbage line\nforward x 1 1 2 mkl 0 0\n", line(c, choice));
        let parsed = parse(&text);
        assert_eq!(parsed.len(), 1);
        let got = parsed[&c];
        assert!(got.onednn && got.source == Source::Stored && got.mkl_s == 1.5e-3);
    }

    /// The first decision of a class is written; a later one (another process that measured the same
    /// class differently) adopts the stored one instead of writing its own.
    #[test]
    fn the_store_keeps_the_first_decision_of_a_class() {
        let dir = std::env::temp_dir().join(format!("onednn-routing-{}", std::process::id()));
        let path = dir.join("nested").join("routing.txt");
        let class = Class::new(Product::Forward, 64, 32, 32, 1);
        let first = Choice {
            onednn: false,
            mkl_s: 1.0,
            onednn_s: 2.0,
            source: Source::Measured,
        };
        assert_eq!(persist(&path, class, first).unwrap(), None);
        let second = Choice {
            onednn: true,
            ..first
        };
        let adopted = persist(&path, class, second).unwrap().unwrap();
        assert!(!adopted.onednn && adopted.source == Source::Stored);
        let other = Class::new(Product::Packed, 4, 32, 32, 1);
        assert_eq!(persist(&path, other, second).unwrap(), None);
        let stored = read_store(&path).unwrap();
        assert_eq!(stored.len(), 2);
        assert!(stored[&other].onednn);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Microsecond products are timed until the timings fill MIN_TIMED_S (capped), millisecond ones
    /// REPEATS times; a failing run ends the timing.
    #[test]
    fn short_products_are_timed_more_often() {
        let quick = super::timings(&|| Some(())).unwrap();
        assert_eq!(quick.len(), super::MAX_REPEATS);
        let slow = super::timings(&|| {
            std::thread::sleep(std::time::Duration::from_millis(1));
            Some(())
        })
        .unwrap();
        assert_eq!(slow.len(), super::REPEATS);
        assert!(super::timings(&|| None).is_none());
    }

    /// Deciding a class draws nothing from the global RNG and gives a consistent, cached answer.
    #[test]
    fn measuring_leaves_the_rng_alone_and_caches_the_choice() {
        if !crate::onednn::available_for_test("routing::measuring_leaves_the_rng_alone") {
            return;
        }
        // The global RNG is shared with the tests running beside this one, so its stream cannot be
        // compared here; the inputs being a fixed pattern is what keeps it untouched (random inputs
        // would differ between two calls).
        assert!(filler(&[3, 5]).equal(&filler(&[3, 5])));
        let first = uses_onednn(Product::Training, 96, 48, 40);
        assert_eq!(uses_onednn(Product::Training, 120, 48, 40), first);
        let seen = choices();
        let (class, choice) = seen
            .iter()
            .find(|(c, _)| {
                *c == Class::new(Product::Training, 96, 48, 40, tch::get_num_threads() as i64)
            })
            .unwrap();
        assert_eq!(class.rows, 128);
        assert!(choice.mkl_s.is_finite() && choice.onednn_s.is_finite());
        assert_eq!(choice.onednn, choice.onednn_s < MARGIN * choice.mkl_s);
    }
}
