//! Using a trained flow: the checkpoint and its space (`trained`), labelled data (`labelled`), and the
//! commands `sample`, `classify`, `bpd`, `fid` and `fid-stats`, whose work splits over ranks
//! (`rank_parts`).

pub mod bpd;
pub mod classify;
pub mod fid;
pub mod fid_reference;
pub mod fid_stats;
pub mod labelled;
pub mod rank_parts;
pub mod sample;
pub mod trained;
