//! The evaluation table beyond FID against references outside this crate: the sFID features against
//! pytorch-fid's network (a forward hook on `Mixed_6d.branch1x1`, random weights made here), and
//! improved precision/recall and KID against numpy transcriptions of their definitions
//! (tests/python/fid_metrics_reference.py) on the same feature sets.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use model::feature_stats::FeatureStats;
use model::inception::{self, Inception};
use model::manifold::{self, NHOOD};
use tch::{nn, Device, Kind, Tensor};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn python() -> Command {
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make test`, which creates the reference environment",
        python.display()
    );
    Command::new(python)
}

/// Starts the reference script with `args`.
fn spawn_reference(args: &[&Path]) -> Child {
    let script = repo_root().join("tests/python/fid_metrics_reference.py");
    python()
        .arg(script)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for the script and reads what it wrote to `out`.
fn finish_reference(child: Child, out: &Path) -> HashMap<String, Tensor> {
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "reference failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    model::weights::read_safetensors(out).unwrap()
}

fn save(path: &Path, tensors: &[(&str, &Tensor)]) {
    let named: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.to_string(), t.shallow_clone()))
        .collect();
    model::weights::save_atomic(&named, path).unwrap();
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Random weights with batch norms that are not the identity (so that folding them matters), at a
/// scale that keeps activations O(1) through the 40-odd layers before Mixed_6d.
fn random_inception(path: &Path) {
    tch::manual_seed(11);
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = Inception::new(vs.root());
    inception::randomise(&vs);
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let fill = if name.ends_with("bn.weight") {
                Tensor::rand_like(&var) + 0.5
            } else if name.ends_with("bn.bias") {
                Tensor::randn_like(&var) * 0.2
            } else if name.ends_with("running_mean") {
                Tensor::randn_like(&var) * 0.1
            } else if name.ends_with("running_var") {
                Tensor::rand_like(&var) + 0.5
            } else {
                continue;
            };
            var.copy_(&fill);
        }
    });
    let named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    model::weights::save_atomic(&named, path).unwrap();
}

#[test]
fn spatial_features_are_pytorch_fids_mixed_6d_branch1x1_in_tf_order() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("inception.safetensors");
    let images = {
        let _rng = RNG.lock().unwrap();
        random_inception(&weights);
        Tensor::randint(256, [2, 64, 64, 3], (Kind::Uint8, Device::Cpu))
    };
    let inputs = dir.path().join("in.safetensors");
    save(&inputs, &[("images", &images)]);
    let out = dir.path().join("out.safetensors");
    // Python imports torch for seconds: let it start while this side computes.
    let pending = spawn_reference(&[Path::new("spatial"), &weights, &inputs, &out]);

    let net = Inception::from_file(&weights, Device::Cpu).unwrap().model;
    let mut loaded_f64 = Inception::from_file(&weights, Device::Cpu).unwrap();
    loaded_f64.vs.double();
    let net_f64 = loaded_f64.model;
    let features = net.features(&images).unwrap();
    let ours = features.spatial.shallow_clone();
    let ours_f64 = net_f64.features(&images).unwrap().spatial;
    let mut stats = FeatureStats::new(Device::Cpu);
    stats.add(&features).unwrap();
    let refs = finish_reference(pending, &out);
    assert_eq!(ours.size(), [2, inception::SPATIAL_FEATURES]);
    assert_eq!(ours.kind(), Kind::Float);

    // TF's NHWC flattening of the first 7 channels, spelled out index by index.
    let raw = &refs["mixed_6d_branch1x1"];
    let raw_f64 = &refs["mixed_6d_branch1x1_f64"];
    assert_eq!(raw.size(), [2, 192, 17, 17]);
    let tf_order = |t: &Tensor| {
        let mut flat = Vec::new();
        for b in 0..2 {
            for h in 0..17 {
                for w in 0..17 {
                    for c in 0..7 {
                        flat.push(t.double_value(&[b, c, h, w]));
                    }
                }
            }
        }
        Tensor::from_slice(&flat).view([2, -1])
    };
    let expected = tf_order(raw);
    let expected_f64 = tf_order(raw_f64);
    let scale = expected_f64.abs().max().double_value(&[]);
    let spread = expected_f64.std(true).double_value(&[]);
    // Features that are all zero, or all equal, would match any port.
    assert!(spread > 0.05 * scale && scale > 0.1, "{spread} {scale}");

    let port = max_abs_diff(&ours_f64, &expected_f64);
    assert!(port <= 1e-9 * scale, "float64: max|Δ| = {port:e}");
    // Float32: as the pool3 parity test, within 1e-4 (relative here) unless pytorch-fid's own
    // float32 drift is larger, then within twice that.
    let own_drift = max_abs_diff(&expected, &expected_f64);
    let bound = (1e-4 * scale).max(2.0 * own_drift);
    let f32_diff = max_abs_diff(&ours, &expected);
    assert!(
        f32_diff <= bound,
        "float32: max|Δ| = {f32_diff:e}, bound {bound:e}"
    );

    // The accumulator keeps these, not pool3, as the sFID statistics: np.mean / np.cov of them.
    let st = stats.spatial_statistics().unwrap();
    let x = ours.to_kind(Kind::Double);
    let mean = x.mean_dim(0, false, Kind::Double);
    let centred = &x - mean.unsqueeze(0);
    let cov = centred.tr().matmul(&centred);
    assert!(max_abs_diff(&st.mu, &mean) <= 1e-12 * scale);
    assert!(max_abs_diff(&st.sigma, &cov) <= 1e-9 * scale * scale);
}

/// tch's generator is global and tests run on parallel threads: whoever seeds it holds this.
static RNG: Mutex<()> = Mutex::new(());

/// (reference, samples): 300 and 250 points in 64 dimensions, the samples shifted and wider.
fn feature_sets(quantised: bool) -> (Tensor, Tensor) {
    let _rng = RNG.lock().unwrap();
    tch::manual_seed(7);
    let opts = (Kind::Float, Device::Cpu);
    let a = Tensor::randn([300, 64], opts);
    let b = Tensor::randn([250, 64], opts) * 1.05 + 0.1;
    if quantised {
        // Multiples of 1/2 below 8 in size: every squared distance and dot product is exact in float32
        // whatever the summation order, so ties (distance = radius) exist and must resolve as ≤.
        let q = |t: Tensor| (t * 2.0).round().clamp(-15.0, 15.0) / 2.0;
        (q(a), q(b))
    } else {
        (a, b)
    }
}

/// KID subsets of the continuous case: 3 of 100 rows, drawn here.
const KID_SEED: u64 = 9;

fn kid_subsets() -> Vec<[Vec<i64>; 2]> {
    manifold::kid_subset_indices(300, 250, 3, 100, KID_SEED).unwrap()
}

/// The numpy references of both feature-set cases (prefix "" and "quantised_"), from one python run
/// shared by the tests (python starts in seconds).
fn metric_references() -> &'static HashMap<String, f64> {
    static REFS: OnceLock<HashMap<String, f64>> = OnceLock::new();
    REFS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (case, quantised) in [("", false), ("quantised_", true)] {
            let (a, b) = feature_sets(quantised);
            tensors.push((format!("{case}reference"), a));
            tensors.push((format!("{case}samples"), b));
        }
        for (i, [ia, ib]) in kid_subsets().iter().enumerate() {
            tensors.push((format!("subset_{i}_a"), Tensor::from_slice(ia)));
            tensors.push((format!("subset_{i}_b"), Tensor::from_slice(ib)));
        }
        let inputs = dir.path().join("in.safetensors");
        model::weights::save_atomic(&tensors, &inputs).unwrap();
        let out = dir.path().join("out.safetensors");
        finish_reference(
            spawn_reference(&[Path::new("metrics"), &inputs, &out]),
            &out,
        )
        .into_iter()
        .map(|(k, t)| (k, t.double_value(&[])))
        .collect()
    })
}

fn f32_squared_distances(u: &Tensor, v: &Tensor) -> Tensor {
    let (nu, nv) = (
        u.square().sum_dim_intlist(1, true, Kind::Float),
        v.square().sum_dim_intlist(1, true, Kind::Float),
    );
    (nu - u.matmul(&v.tr()) * 2.0 + nv.tr()).clamp_min(0.0)
}

fn exact_squared_distances(u: &Tensor, v: &Tensor) -> Tensor {
    let (u, v) = (u.to_kind(Kind::Double), v.to_kind(Kind::Double));
    (u.unsqueeze(1) - v.unsqueeze(0))
        .square()
        .sum_dim_intlist(2, false, Kind::Double)
}

#[test]
fn precision_recall_match_the_definition_blocked_or_not() {
    let refs = metric_references();
    for (case, quantised) in [("", false), ("quantised_", true)] {
        let (a, b) = feature_sets(quantised);
        let expected = (
            refs[&format!("{case}precision")],
            refs[&format!("{case}recall")],
        );
        let margin = refs[&format!("{case}margin")];
        if quantised {
            assert_eq!(margin, 0.0, "the quantised sets have ties");
        } else {
            // Exact equality with a float64 reference holds when no comparison is closer to a tie
            // than float32 rounding of the distances (‖u‖² − 2u·v + ‖v‖², as the evaluator computes
            // them) can reach, twice (distance and radius); measured here on these very sets.
            let rounding = [(&b, &a), (&a, &a), (&b, &b)]
                .iter()
                .map(|(u, v)| {
                    max_abs_diff(&f32_squared_distances(u, v), &exact_squared_distances(u, v))
                })
                .fold(0.0, f64::max);
            assert!(
                margin > 4.0 * rounding,
                "margin {margin:e}, rounding {rounding:e}"
            );
        }
        // Neither trivial nor complete, so that a wrong radius moves them.
        assert!(expected.0 > 0.05 && expected.0 < 0.95, "{expected:?}");
        assert!(expected.1 > 0.05 && expected.1 < 0.95, "{expected:?}");
        // Whole sets in one block, blocks that do not divide either set, and single rows.
        for batch in [1000, 64, 7, 1] {
            let got = manifold::precision_recall(&a, &b, NHOOD, batch).unwrap();
            assert_eq!(got, expected, "{case}batch {batch}");
        }
    }
}

#[test]
fn kid_matches_the_definition() {
    let refs = metric_references();
    let (a, b) = feature_sets(false);
    let close = |ours: f64, theirs: f64, what: &str| {
        assert!(
            (ours - theirs).abs() <= 1e-4 * theirs.abs(),
            "{what}: {ours} vs {theirs}"
        );
    };

    // One subset larger than both sets takes each whole: no draw involved.
    let expected_full = refs["kid_full_mean"];
    assert!(expected_full > 1e-3, "{expected_full}");
    let (mean, std) = manifold::kid(&a, &b, 1, 10_000, KID_SEED).unwrap();
    close(mean, expected_full, "KID of the whole sets");
    assert_eq!(std, 0.0);

    // Subsets of 100 drawn here, the same indices evaluated there.
    let (mean, std) = manifold::kid(&a, &b, 3, 100, KID_SEED).unwrap();
    close(mean, refs["kid_mean"], "KID mean over subsets");
    close(std, refs["kid_std"], "KID std over subsets");
    assert!(std > 0.0);
    assert_eq!(
        manifold::kid_of_subsets(&a, &b, &kid_subsets()).unwrap(),
        (mean, std)
    );
}
