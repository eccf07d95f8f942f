//! `pipeline precompute`: source shards → crops and flips → frozen DINOv2 tokens and VAE posterior
//! moments → one zstd cache shard per source shard, reused by every later run (docs/cache-format.md).

pub mod settings;

pub use settings::{cache_dir, cache_settings, PrecomputeConfig};
