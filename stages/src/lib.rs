//! The data side of the project: webdataset shards in, cropped images and caches out.
//!
//! Invariant: this crate never links libtorch, so it builds and tests in seconds.
//!
//! Entry point for consumers: [`image_stream::open_image_stream`] turns `[data]` config (shard spec
//! included) into a bounded queue of cropped images with label, shard and key, plus run counters.

pub mod atomic;
pub mod bad_input;
pub mod cache;
pub mod config;
pub mod crop;
pub mod decode;
pub mod demo;
pub mod error;
pub mod image_stream;
pub mod jpeg;
pub mod label;
pub mod limits;
pub mod metrics;
pub mod order;
pub mod remote;
pub mod resample;
pub mod rng;
pub mod shardspec;
pub mod wds_reader;
pub mod wds_writer;

pub use error::{Error, Result};
