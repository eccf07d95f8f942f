//! Training crops read straight from shards, for the commands that need pixels but no cache
//! (`fid-stats`, `encoders init --fit-on`): the data stages' decode and ADM centre crop, in stream order.

use anyhow::Context;
use stages::config::DataConfig;

/// What a finished stream reports.
pub struct CropsRead {
    pub images: usize,
    /// Samples the stages skipped as bad input (each already logged with its shard and key).
    pub bad: u64,
}

/// Calls `on_crop(id, pixels)` for each of the first `limit` crops of `cfg.shards` (uint8 HWC, side
/// `cfg.image_size`; id = `shard/key`), on a small runtime of its own.
pub fn for_each_crop(
    cfg: &DataConfig,
    limit: usize,
    mut on_crop: impl FnMut(&str, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<CropsRead> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let stream = stages::image_stream::open_image_stream(cfg, Default::default(), 0)
            .with_context(|| format!("reading {}", cfg.shards))?;
        let mut images = 0usize;
        while images < limit {
            let Ok(sample) = stream.samples.recv().await else {
                break;
            };
            on_crop(
                &format!("{}/{}", sample.shard, sample.key),
                &sample.image.pixels,
            )?;
            images += 1;
        }
        let summary = stream
            .finish()
            .await
            .with_context(|| format!("reading {}", cfg.shards))?;
        Ok(CropsRead {
            images,
            bad: summary.bad,
        })
    })
}
