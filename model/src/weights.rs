//! Strict weight loading and atomic saving. tch's `VarStore::load` ignores extra tensors; loading a
//! converted checkpoint must instead fail on any missing, unused or mis-shaped tensor and name it, or
//! a renamed layer silently stays at its random init.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use tch::{nn::VarStore, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
    #[error("{path}: tensor `{name}` has shape {found:?}, the model expects {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("{path}: missing tensors [{}]; unused tensors [{}]", missing.join(", "), unused.join(", "))]
    Keys {
        path: PathBuf,
        missing: Vec<String>,
        unused: Vec<String>,
    },
    #[error("{path}: {message}")]
    Write { path: PathBuf, message: String },
}

/// Reads every tensor of a safetensors file by name.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>, WeightsError> {
    Tensor::read_safetensors(path)
        .map(|v| v.into_iter().collect())
        .map_err(|source| WeightsError::Read {
            path: path.to_path_buf(),
            source,
        })
}

/// Copies `tensors` into the variables of `vs`. Every variable must be present with its exact shape;
/// a tensor with no variable is an error unless `ignore_unused` accepts its name (e.g. buffers such as
/// attention masks that the reference saves but this model recomputes).
pub fn load_into(
    vs: &mut VarStore,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    ignore_unused: &dyn Fn(&str) -> bool,
) -> Result<(), WeightsError> {
    let variables = vs.variables();
    let missing: BTreeSet<String> = variables
        .keys()
        .filter(|k| !tensors.contains_key(*k))
        .cloned()
        .collect();
    let unused: BTreeSet<String> = tensors
        .keys()
        .filter(|k| !variables.contains_key(*k) && !ignore_unused(k))
        .cloned()
        .collect();
    if !missing.is_empty() || !unused.is_empty() {
        return Err(WeightsError::Keys {
            path: path.to_path_buf(),
            missing: missing.into_iter().collect(),
            unused: unused.into_iter().collect(),
        });
    }
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    for name in names {
        let (var, src) = (&variables[name], &tensors[name]);
        if var.size() != src.size() {
            return Err(WeightsError::Shape {
                path: path.to_path_buf(),
                name: name.clone(),
                expected: var.size(),
                found: src.size(),
            });
        }
    }
    tch::no_grad(|| {
        for (name, var) in variables {
            let mut var = var;
            var.copy_(&tensors[&name].to_kind(var.kind()).to_device(var.device()));
        }
    });
    Ok(())
}

/// Loads a safetensors file into `vs` strictly (see [`load_into`]).
pub fn load_strict(
    vs: &mut VarStore,
    path: &Path,
    ignore_unused: &dyn Fn(&str) -> bool,
) -> Result<(), WeightsError> {
    let tensors = read_safetensors(path)?;
    load_into(vs, &tensors, path, ignore_unused)
}

/// Saves named tensors as safetensors atomically: temp file in the same directory, fsync, rename.
pub fn save_atomic(tensors: &[(String, Tensor)], path: &Path) -> Result<(), WeightsError> {
    let err = |message: String| WeightsError::Write {
        path: path.to_path_buf(),
        message,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.to_device(tch::Device::Cpu).contiguous()))
        .collect();
    let result = Tensor::write_safetensors(&cpu, &tmp)
        .map_err(|e| err(e.to_string()))
        .and_then(|_| {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| err(e.to_string()))
        })
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| err(e.to_string())));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Saves every variable of `vs` under its own name.
pub fn save_var_store(vs: &VarStore, path: &Path) -> Result<(), WeightsError> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    save_atomic(&named, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device, Kind};

    fn tiny(vs: &VarStore) {
        let root = vs.root();
        let _ = nn::linear(&root / "proj", 3, 2, Default::default());
    }

    #[test]
    fn round_trip_and_strict_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let vs = VarStore::new(Device::Cpu);
        tiny(&vs);
        save_var_store(&vs, &path).unwrap();

        let mut other = VarStore::new(Device::Cpu);
        tiny(&other);
        load_strict(&mut other, &path, &|_| false).unwrap();
        let (a, b) = (
            &vs.variables()["proj.weight"],
            &other.variables()["proj.weight"],
        );
        assert!(a.equal(b));

        // Extra tensor: unused unless ignored.
        let mut tensors = read_safetensors(&path).unwrap();
        tensors.insert(
            "blocks.0.attn_mask".into(),
            Tensor::ones([2, 2], (Kind::Float, Device::Cpu)),
        );
        let msg = load_into(&mut other, &tensors, &path, &|_| false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("unused tensors [blocks.0.attn_mask]"), "{msg}");
        load_into(&mut other, &tensors, &path, &|n| n.ends_with("attn_mask")).unwrap();

        // Wrong shape: named with both shapes.
        tensors.insert(
            "proj.weight".into(),
            Tensor::zeros([2, 4], (Kind::Float, Device::Cpu)),
        );
        let msg = load_into(&mut other, &tensors, &path, &|n| n.ends_with("attn_mask"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("proj.weight") && msg.contains("[2, 3]") && msg.contains("[2, 4]"),
            "{msg}"
        );

        // Missing tensor.
        tensors.remove("proj.bias");
        let msg = load_into(&mut other, &tensors, &path, &|_| true)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("missing tensors [proj.bias]"), "{msg}");
    }
}
