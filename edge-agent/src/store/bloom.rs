//! A Bloom filter in front of a `seen` generation: "certainly not stored" answers without a
//! SQLite lookup, which most fresh readings get; "maybe" sends the check on to SQLite. It
//! never forgets a hash, so it never says "not stored" of one that is: a bit too many (a
//! rolled-back transaction's hashes, say) only costs a lookup.

/// Bits of a generation's filter: at least 512 KiB, and for a generation expected to hold
/// more (the one before it held more) about 12 bits per hash, up to 2 MiB. At 500,000
/// hashes in the smallest a fresh identity needs a lookup about 3% of the time; past what a
/// filter was sized for the share grows, and the answers stay right.
pub(super) const MIN_BITS: usize = 1 << 22;
/// The largest filter: 2 MiB, about 1.4 million hashes at 3%.
pub(super) const MAX_BITS: usize = 1 << 24;
const BITS_PER_HASH: u64 = 12;

/// Probes per hash.
const PROBES: u64 = 3;

/// One generation's filter.
#[derive(Clone)]
pub(super) struct Bloom {
    words: Vec<u64>,
    // A probe's position is the top bits of a 64-bit mix: 64 - log2(bits) shifted out.
    shift: u32,
    added: u64,
}

impl std::fmt::Debug for Bloom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bloom")
            .field("bits", &(self.words.len() * 64))
            .field("added", &self.added)
            .finish()
    }
}

impl Default for Bloom {
    fn default() -> Self {
        Self::for_hashes(0)
    }
}

impl Bloom {
    /// An empty filter sized for about `expected` hashes (within its bounds).
    pub(super) fn for_hashes(expected: u64) -> Self {
        let bits = usize::try_from(expected.saturating_mul(BITS_PER_HASH))
            .unwrap_or(MAX_BITS)
            .clamp(MIN_BITS, MAX_BITS)
            .next_power_of_two();
        Self {
            words: vec![0; bits / 64],
            shift: 64 - bits.trailing_zeros(),
            added: 0,
        }
    }

    /// The bit positions of a hash (double hashing over the identity hash's halves).
    fn probes(&self, h: i64) -> impl Iterator<Item = usize> + use<> {
        let h = h as u64;
        let a = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let b = h.rotate_left(32).wrapping_mul(0xc2b2_ae3d_27d4_eb4f) | 1;
        let shift = self.shift;
        (0..PROBES).map(move |i| (a.wrapping_add(i.wrapping_mul(b)) >> shift) as usize)
    }

    /// Records a hash.
    pub(super) fn add(&mut self, h: i64) {
        for p in self.probes(h) {
            self.words[p / 64] |= 1 << (p % 64);
        }
        self.added += 1;
    }

    /// False when `h` was certainly never added.
    pub(super) fn maybe(&self, h: i64) -> bool {
        self.probes(h)
            .all(|p| self.words[p / 64] & (1 << (p % 64)) != 0)
    }

    /// Hashes added (with repeats), to size the filter that follows this one.
    pub(super) fn added(&self) -> u64 {
        self.added
    }

    /// Answers "maybe" to everything (when its generation could not be read).
    pub(super) fn saturate(&mut self) {
        self.words.fill(u64::MAX);
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
        assert_eq!(b.added(), 200_000);
    }

    #[test]
    fn sized_by_what_it_expects_within_bounds() {
        assert_eq!(Bloom::default().words.len() * 64, MIN_BITS);
        assert_eq!(Bloom::for_hashes(500_000).words.len() * 64, 1 << 23);
        assert_eq!(Bloom::for_hashes(1_000_000).words.len() * 64, MAX_BITS);
        assert_eq!(Bloom::for_hashes(u64::MAX).words.len() * 64, MAX_BITS);
        // A large filter keeps every hash and guesses less at the same fill.
        let mut big = Bloom::for_hashes(1_400_000);
        let mut small = Bloom::default();
        let mut x: u64 = 0x9876_5432;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as i64
        };
        let added: Vec<i64> = (0..1_000_000).map(|_| next()).collect();
        for h in &added {
            big.add(*h);
            small.add(*h);
        }
        assert!(added.iter().all(|h| big.maybe(*h) && small.maybe(*h)));
        let probe: Vec<i64> = (0..100_000).map(|_| next()).collect();
        let guesses = |b: &Bloom| probe.iter().filter(|h| b.maybe(**h)).count();
        assert!(guesses(&big) < 3_000, "{}", guesses(&big));
        assert!(guesses(&small) > 3 * guesses(&big));
    }
}
