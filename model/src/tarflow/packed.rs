//! A reverse pass's prepacked weights: every linear layer of a block packed once into oneDNN's layout
//! (torch_ext::onednn), then reused by each of the block's N decode steps. On the CPU a decode
//! step multiplies 2B rows by each weight, where a plain product spends as long repacking the weight as
//! multiplying; packing for the pass removes that (BENCHMARKS.md, "oneDNN linear layers and packed sampling weights").
//! Valid for one pass only: the pack is a copy, and training moves the weights between passes.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};
use torch_ext::onednn::{self, Activation, PackedLinear};

use super::linear::{Linear, Precision};

/// The packed layers of one block, found by their weight's storage.
#[derive(Debug, Default)]
pub struct Packs(HashMap<usize, PackedLinear>);

impl Packs {
    /// Packs those of `linears` whose products with `rows` rows gain from it (measured on this
    /// machine, [`torch_ext::routing`]), where packing is possible: float32 CPU weights, fp32 compute and a
    /// libtorch with oneDNN's linear ops. `None` when it is not; unpacked layers run the plain product.
    pub fn new<'a>(
        linears: impl IntoIterator<Item = &'a Linear>,
        rows: i64,
        prec: Precision,
    ) -> Option<Self> {
        if prec != Precision::Fp32 || !onednn::available() {
            return None;
        }
        let mut packs = HashMap::new();
        for l in linears {
            if l.weight.device() != Device::Cpu || l.weight.kind() != Kind::Float {
                return None;
            }
            let (fan_out, fan_in) = (l.weight.size()[0], l.weight.size()[1]);
            if !torch_ext::routing::uses_onednn(
                torch_ext::routing::Product::Packed,
                rows,
                fan_in,
                fan_out,
            ) {
                continue;
            }
            let packed = PackedLinear::new(&l.weight, Some(&l.bias)).ok()?;
            packs.insert(key(l), packed);
        }
        Some(Self(packs))
    }

    /// How many layers are packed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn get(&self, l: &Linear) -> Option<&PackedLinear> {
        self.0.get(&key(l))
    }
}

fn key(l: &Linear) -> usize {
    l.weight.data_ptr() as usize
}

impl Linear {
    /// `act(x·wᵀ + b)`: through the packed weight when `packs` holds this layer (the activation fused
    /// into the product), the plain product otherwise.
    pub fn forward_packed(
        &self,
        x: &Tensor,
        prec: Precision,
        packs: Option<&Packs>,
        act: Activation,
    ) -> Tensor {
        if let Some(p) = packs.and_then(|p| p.get(self)) {
            // A failure here is a shape error the plain product would raise too: tch panics on those.
            return p
                .forward(&x.to_kind(Kind::Float), act)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let y = self.forward(x, prec);
        match act {
            Activation::None => y,
            Activation::Gelu => y.gelu("none"),
            Activation::GeluTanh => y.gelu("tanh"),
        }
    }
}
