//! A Bloom filter in front of a `seen` generation: "certainly not stored" answers without a
//! SQLite lookup, which most fresh readings get; "maybe" sends the check on to SQLite. It
//! never forgets a hash, so it never says "not stored" of one that is: a bit too many (a
//! rolled-back transaction's hashes, say) only costs a lookup.

/// Bits per generation: 512 KiB. At 500,000 hashes a fresh one needs a lookup about 3% of
/// the time; past that the share grows, and the answers stay right.
pub(super) const BITS: usize = 1 << 22;

/// Probes per hash.
const PROBES: u64 = 3;

/// One generation's filter.
#[derive(Clone)]
pub(super) struct Bloom {
    words: Vec<u64>,
}

impl std::fmt::Debug for Bloom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bloom").field("bits", &BITS).finish()
    }
}

impl Default for Bloom {
    fn default() -> Self {
        Self {
            words: vec![0; BITS / 64],
        }
    }
}

impl Bloom {
    /// The bit positions of a hash (double hashing over the identity hash's halves).
    fn probes(h: i64) -> impl Iterator<Item = usize> {
        let h = h as u64;
        let a = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let b = h.rotate_left(32).wrapping_mul(0xc2b2_ae3d_27d4_eb4f) | 1;
        (0..PROBES).map(move |i| (a.wrapping_add(i.wrapping_mul(b)) >> 42) as usize % BITS)
    }

    /// Records a hash.
    pub(super) fn add(&mut self, h: i64) {
        for p in Self::probes(h) {
            self.words[p / 64] |= 1 << (p % 64);
        }
    }

    /// False when `h` was certainly never added.
    pub(super) fn maybe(&self, h: i64) -> bool {
        Self::probes(h).all(|p| self.words[p / 64] & (1 << (p % 64)) != 0)
    }

    /// Answers "maybe" to everything (when its generation could not be read).
    pub(super) fn saturate(&mut self) {
        self.words.fill(u64::MAX);
    }

    /// Forgets everything (its generation was emptied).
    pub(super) fn clear(&mut self) {
        self.words.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_forgets_and_rarely_guesses() {
        let mut b = Bloom::default();
        let mut x: u64 = 0x1234_5678;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as i64
        };
        let added: Vec<i64> = (0..200_000).map(|_| next()).collect();
        for h in &added {
            b.add(*h);
        }
        assert!(added.iter().all(|h| b.maybe(*h)));
        let fresh = (0..100_000).filter(|_| b.maybe(next())).count();
        // About 0.3% at this fill; well under 1%.
        assert!(fresh < 1_000, "{fresh} false positives of 100,000");
        b.clear();
        assert!(!b.maybe(added[0]));
    }
}
