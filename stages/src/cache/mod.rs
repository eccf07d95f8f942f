//! The precompute cache: one directory per fingerprint of everything that changes the cached numbers,
//! holding one cache shard per source shard and a manifest. See docs/cache-format.md.

pub mod lock;
pub mod maintenance;
pub mod manifest;
pub mod shard;

pub use lock::CacheLock;
pub use manifest::{fingerprint, Manifest, ManifestShard, RemoteSource, SourceShard};
pub use shard::{DType, FieldSpec, ShardReader, ShardSummary, ShardWriter};
