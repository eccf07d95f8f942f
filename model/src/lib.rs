//! Networks in tch: TARFlow, the frozen DINOv2 and SD-VAE encoders, and strict weight IO.
//!
//! Invariant: this crate does no file or network I/O apart from reading and writing weights.

pub mod clip;
pub mod device;
pub mod dinov2;
pub mod feature_stats;
pub mod frozen;
pub mod inception;
pub mod manifold;
pub mod pth;
pub mod tarflow;
pub mod vae;
pub mod vision;
pub mod weights;
