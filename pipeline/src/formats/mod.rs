//! What jobs read and write besides caches and checkpoints: `.npz` archives, image sets, sample grids,
//! curves, TensorBoard events, a checkpoint's `[space]` sidecar, training crops read from shards, and
//! output directories that never replace an input.

pub mod crops;
pub mod curves;
pub mod grid;
pub mod image_set;
pub mod npz;
pub mod npz_read;
pub mod outputs;
pub mod space;
pub mod tensorboard;
