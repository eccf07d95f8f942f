//! Networks in tch: TARFlow, the frozen vision encoders (DINOv2, CLIP, SigLIP, MAE, I-JEPA, DINOv3) and SD-VAE, and strict weight IO.
//!
//! Invariant: this crate does no file or network I/O apart from reading and writing weights.

pub mod clip;
pub mod device;
pub mod dinov2;
pub mod dinov3;
pub mod feature_stats;
pub mod frozen;
pub mod ijepa;
pub mod inception;
pub mod mae;
pub mod manifold;
pub mod pth;
pub mod siglip;
pub mod tarflow;
pub mod vae;
pub mod vision;
pub mod vit;
pub mod weights;
