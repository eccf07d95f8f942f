//! The data side of the project: webdataset shards in, cropped images and caches out.
//!
//! Invariant: this crate never links libtorch, so it builds and tests in seconds.

pub mod atomic;
pub mod cache;
pub mod config;
pub mod demo;
pub mod error;
pub mod wds_writer;

pub use error::{Error, Result};
