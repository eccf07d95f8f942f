//! The project's seeded randomness: the demo dataset, the hashing of order keys into ChaCha seeds,
//! and test and benchmark data all draw from here.
//!
//! Hand-written on purpose, not taken from a crate: a seed's demo data and shard orders are part of
//! what a run means (a rerun, a held-out split, a resumed epoch must see the same bytes and the same
//! order), so they must never change because a dependency changed its algorithm or its sampling
//! of ranges. SplitMix64 is small enough to own and is pinned by `tests/golden.rs`, as are the orders
//! and the demo data built on it.

use rand_chacha::ChaCha8Rng;

/// The SplitMix64 generator (Steele, Lea & Flood 2014; Java's `SplittableRandom`): a 64-bit counter
/// stepped by the golden ratio and passed through a mixing function. Not for anything secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64(u64);

/// The counter's step: 2^64 / φ, rounded to odd.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's mixing function (Stafford's variant 13 of the MurmurHash3 finaliser).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The first output of a SplitMix64 seeded with `x`: a well-mixed hash of a key, used to turn
/// consecutive keys such as (seed, index) into unrelated seeds.
pub fn splitmix64(x: u64) -> u64 {
    mix(x.wrapping_add(GAMMA))
}

impl SplitMix64 {
    pub const fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }

    /// Uniform in [0, n) by rejection, without modulo bias. Panics if n is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        below(self, n)
    }

    /// Uniform in [0, 1) with 53 random bits (every value a multiple of 2^-53).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Roughly standard normal: the sum of four uniforms, centred and scaled to a variance of about 1
    /// (it stays within ±3.5). Cheap filler for data whose exact distribution does not matter.
    pub fn approx_normal(&mut self) -> f64 {
        (self.next_f64() + self.next_f64() + self.next_f64() + self.next_f64() - 2.0) * 1.732
    }

    /// Shuffles `items` in place (see [`shuffle`]).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        shuffle(self, items)
    }
}

/// A source of uniform 64-bit words: [`SplitMix64`], and the ChaCha8 streams of [`crate::order`], so
/// that ranges and shuffles are drawn the same way from either.
pub trait NextU64 {
    fn next_u64(&mut self) -> u64;
}

impl NextU64 for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        SplitMix64::next_u64(self)
    }
}

impl NextU64 for ChaCha8Rng {
    fn next_u64(&mut self) -> u64 {
        rand_core::Rng::next_u64(self)
    }
}

/// Uniform in [0, n) by rejection, without modulo bias: words at or above the largest multiple of n
/// are drawn again. Panics if n is 0.
pub fn below(rng: &mut impl NextU64, n: u64) -> u64 {
    let zone = u64::MAX - (u64::MAX % n);
    loop {
        let x = rng.next_u64();
        if x < zone {
            return x % n;
        }
    }
}

/// Fisher–Yates from the last position down: position i swaps with one drawn [`below`] i + 1.
pub fn shuffle<T>(rng: &mut impl NextU64, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_is_the_first_output_of_a_generator_with_that_seed() {
        for x in [0, 1, 42, u64::MAX] {
            assert_eq!(splitmix64(x), SplitMix64::new(x).next_u64());
        }
    }

    #[test]
    fn ranges_stay_in_range_and_reach_every_value() {
        let mut rng = SplitMix64::new(5);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            seen[rng.below(7) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(rng.below(1), 0);
        assert!((0..1000).all(|_| (0.0..1.0).contains(&rng.next_f64())));
        assert!((0..1000).all(|_| rng.approx_normal().abs() < 3.5));
    }

    #[test]
    fn shuffles_permute() {
        let mut items: Vec<u32> = (0..50).collect();
        SplitMix64::new(9).shuffle(&mut items);
        assert_ne!(items, (0..50).collect::<Vec<_>>());
        items.sort();
        assert_eq!(items, (0..50).collect::<Vec<_>>());
        let mut empty: [u8; 0] = [];
        SplitMix64::new(9).shuffle(&mut empty);
    }
}
