//! The forward and backward half of a training step: the batch in micro-batches whose gradients
//! accumulate, so a batch that does not fit in memory at once trains exactly as if it did.

use std::time::Instant;

use model::tarflow::align::AlignHead;
use model::tarflow::{self, Cond, Model};
use tch::{Device, Kind, Tensor};

/// Seconds of each phase of a step, measured only on metric steps: the device is synchronised at
/// every boundary, which a normal step never does.
#[derive(Clone, Debug, Default)]
pub struct Phases {
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

/// Waits for the device's queued work, so that a host clock measures it (CUDA; the CPU is synchronous).
pub fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// The step's batch-mean values as detached device scalars, read back only when they are logged.
pub struct Totals {
    /// NLL + λ·alignment, the objective.
    pub loss: Tensor,
    /// ½·mean(z²) − mean(Σ logdet) (nats/dim without ½·ln 2π).
    pub nll: Tensor,
    pub prior: Tensor,
    pub logdet: Tensor,
    pub align: Option<Tensor>,
    /// Mean cosine at each aligned location.
    pub cosines: Vec<Tensor>,
}

/// Forward and backward of the batch (`x`, `y`, `features`) in micro-batches of at most `micro`
/// samples (0 = all at once). Each micro-batch's loss is weighted by its share of the batch, so the
/// gradients that accumulate in the parameters' `.grad` (zeroed by the caller) are the whole batch's:
/// every term of the loss is a mean over samples. With `phases`, forward and backward are timed.
#[allow(clippy::too_many_arguments)]
pub fn accumulate(
    flow: &Model,
    head: Option<&AlignHead>,
    x: &Tensor,
    y: &Tensor,
    features: Option<&Tensor>,
    micro: usize,
    lambda: f64,
    mut phases: Option<&mut Phases>,
) -> anyhow::Result<Totals> {
    let b = x.size()[0];
    let micro = if micro == 0 { b } else { (micro as i64).min(b) };
    let capture = head.map(|h| h.forward_capture()).unwrap_or_default();
    // One compute-precision copy of the weights for the whole step, whatever the number of
    // micro-batches and alignment passes; made here, under grad mode, so it leads back to the weights.
    let _casts = (
        flow.cast_weights(),
        head.map(|h| h.cast_weights(flow.precision)),
    );
    let mut totals: Option<Totals> = None;
    for start in (0..b).step_by(micro as usize) {
        let len = micro.min(b - start);
        let share = len as f64 / b as f64;
        let (xi, yi) = (x.narrow(0, start, len), y.narrow(0, start, len));
        let cond = Cond::Labels(&yi);
        let forward_start = Instant::now();
        let out = flow.forward(&xi, &cond, &capture);
        let nll = tarflow::nll(&out);
        let cosines = match (head, features) {
            (Some(h), Some(f)) => h.cosines(flow, &out, &cond, &f.narrow(0, start, len))?,
            _ => vec![],
        };
        let align = (!cosines.is_empty()).then(|| -Tensor::stack(&cosines, 0).mean(Kind::Float));
        let loss = match &align {
            Some(a) => &nll.loss + a * lambda,
            None => nll.loss.shallow_clone(),
        };
        let backward_start = Instant::now();
        if let Some(p) = phases.as_deref_mut() {
            sync(x.device());
            p.forward_s += (backward_start - forward_start).as_secs_f64();
        }
        let backward_start = Instant::now();
        (&loss * share).backward();
        if let Some(p) = phases.as_deref_mut() {
            sync(x.device());
            p.backward_s += backward_start.elapsed().as_secs_f64();
        }
        let part = |t: &Tensor| t.detach() * share;
        let add = |acc: Option<&Tensor>, t: &Tensor| match acc {
            Some(a) => a + part(t),
            None => part(t),
        };
        let prev = totals.as_ref();
        totals = Some(Totals {
            loss: add(prev.map(|t| &t.loss), &loss),
            nll: add(prev.map(|t| &t.nll), &nll.loss),
            prior: add(prev.map(|t| &t.prior), &nll.prior),
            logdet: add(prev.map(|t| &t.logdet), &nll.logdet),
            align: align
                .as_ref()
                .map(|a| add(prev.and_then(|t| t.align.as_ref()), a)),
            cosines: cosines
                .iter()
                .enumerate()
                .map(|(k, c)| add(prev.and_then(|t| t.cosines.get(k)), c))
                .collect(),
        });
    }
    totals.ok_or_else(|| anyhow::anyhow!("an empty batch"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::tarflow::align::{AlignConfig, AlignMode};
    use model::tarflow::Config;
    use tch::{nn, Device};

    fn grads(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = vs
            .trainable_variables()
            .into_iter()
            .enumerate()
            .map(|(i, t)| (i.to_string(), t.grad().copy()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    struct Fixture {
        vs: nn::VarStore,
        pvs: nn::VarStore,
        flow: Model,
        head: AlignHead,
        x: Tensor,
        y: Tensor,
        f: Tensor,
    }

    /// A two-block flow with non-zero output projections (so every layer gets a gradient) and an
    /// alignment head (R-REPA) at `locations`.
    fn fixture(locations: Vec<[usize; 2]>) -> Fixture {
        let cfg = Config {
            img_size: 8,
            patch_size: 2,
            channels: 32,
            head_dim: 16,
            num_blocks: 2,
            layers_per_block: 2,
            num_classes: 5,
            ..Config::preset("tiny").unwrap()
        };
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let flow = Model::new(vs.root(), &cfg).unwrap();
        tch::no_grad(|| {
            for (name, mut v) in vs.variables() {
                if name.ends_with("proj_out.weight") {
                    v.copy_(&(v.randn_like() * 0.02));
                }
            }
        });
        let pvs = nn::VarStore::new(Device::Cpu);
        let align = AlignConfig {
            locations,
            projector_hidden: 32,
            encoder_dim: 8,
            ..Default::default()
        };
        let head = AlignHead::new(pvs.root(), &align, &flow).unwrap();
        Fixture {
            x: Tensor::randn([12, 3, 8, 8], (Kind::Float, Device::Cpu)),
            y: Tensor::from_slice(&[0i64, 1, 2, 3, 4, -1, 0, 1, 2, 3, 4, -1]),
            f: Tensor::randn([12, 16, 8], (Kind::Float, Device::Cpu)),
            vs,
            pvs,
            flow,
            head,
        }
    }

    /// Gradients of flow and projector (zeroed first) and the totals of one accumulated batch.
    fn run(fx: &Fixture, micro: usize) -> (Totals, Vec<(String, Tensor)>) {
        for store in [&fx.vs, &fx.pvs] {
            for t in store.trainable_variables() {
                let mut g = t.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
        }
        let totals = accumulate(
            &fx.flow,
            Some(&fx.head),
            &fx.x,
            &fx.y,
            Some(&fx.f),
            micro,
            0.5,
            None,
        )
        .unwrap();
        let mut all = grads(&fx.vs);
        all.extend(grads(&fx.pvs));
        (totals, all)
    }

    fn assert_same_grads(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) {
        for ((name, a), (_, b)) in a.iter().zip(b) {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{what}: parameter {name} differs by {diff}");
        }
    }

    /// Batch 12 as one, as 4 × 3 and as 5 + 5 + 2 (an uneven last micro-batch): the same gradients of
    /// flow and projector, with R-REPA on, and the same logged totals.
    #[test]
    fn micro_batches_give_the_whole_batch_gradient() {
        let fx = fixture(vec![[1, 2], [2, 2]]);
        let (whole, g0) = run(&fx, 0);
        for micro in [3, 5] {
            let (parts, g) = run(&fx, micro);
            assert_same_grads(&g0, &g, &format!("micro {micro}"));
            for (a, b) in [
                (&whole.loss, &parts.loss),
                (&whole.nll, &parts.nll),
                (whole.align.as_ref().unwrap(), parts.align.as_ref().unwrap()),
                (&whole.cosines[1], &parts.cosines[1]),
            ] {
                let diff = (a - b).abs().double_value(&[]);
                assert!(diff < 1e-5, "micro {micro}: totals differ by {diff}");
            }
        }
        assert!(g0
            .iter()
            .all(|(_, g)| g.abs().sum(Kind::Float).double_value(&[]) > 0.0));
    }

    /// Checkpointed blocks (activations recomputed in backward) give the plain graph's gradients and
    /// loss, whole and in micro-batches, with R-REPA and with F-REPA (whose captured blocks run plain).
    #[test]
    fn checkpointed_blocks_give_the_same_gradient() {
        // F-REPA at block 2 only: block 1 is checkpointed, block 2 (captured) is not.
        for (mode, locations) in [
            (AlignMode::Reverse, vec![[1, 2], [2, 2]]),
            (AlignMode::Forward, vec![[2, 1]]),
        ] {
            let mut fx = fixture(locations);
            fx.head.cfg.mode = mode;
            let (plain, g0) = run(&fx, 0);
            fx.flow.checkpoint_blocks = true;
            for micro in [0, 5] {
                let (ckpt, g) = run(&fx, micro);
                assert_same_grads(&g0, &g, &format!("{mode:?}, checkpointed, micro {micro}"));
                let diff = (&plain.loss - &ckpt.loss).abs().double_value(&[]);
                assert!(diff < 1e-5, "{mode:?}: loss differs by {diff}");
            }
        }
    }
}
