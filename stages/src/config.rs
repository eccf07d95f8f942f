//! The `[data]` section of a run's configuration: where samples come from and how they are read.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Shard spec: brace patterns, globs, `::`-joined lists or `@list.txt`.
    pub shards: String,
    /// Seed of every shuffle; the same seed and shards give the same sample order.
    pub seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig { shards: String::new(), seed: 0 }
    }
}
