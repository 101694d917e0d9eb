//! Which readings to evict when the queue is full: a pure function, tested on its own.
//!
//! Every device has the same fair share of the queue, so the device furthest over its
//! share is the one holding the most readings. Evicting from the largest until `need`
//! readings are gone is "water-filling": all devices above some level are cut down to it.

/// How many of the oldest readings to evict from each device (by index into `counts`) so
/// that `need` readings go in all (or all there are), taken from whichever devices hold
/// the most. Devices left at or below the level keep everything.
pub fn plan(counts: &[u64], need: u64) -> Vec<u64> {
    let total: u64 = counts.iter().sum();
    let need = need.min(total);
    let mut out = vec![0; counts.len()];
    if need == 0 {
        return out;
    }
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]));
    // Grow the set of the `i` largest devices until cutting them to the next one's count
    // frees enough.
    let mut sum_top = 0u64;
    for i in 0..order.len() {
        sum_top += counts[order[i]];
        let next = order.get(i + 1).map_or(0, |&d| counts[d]);
        let k = (i + 1) as u64;
        if sum_top - k * next >= need {
            // Level L with k*L <= sum_top - need, as high as possible; then hand back the
            // overshoot one reading at a time.
            let level = (sum_top - need) / k;
            let mut extra = (sum_top - k * level) - need;
            for &d in &order[..=i] {
                let mut e = counts[d] - level;
                if extra > 0 && e > 0 {
                    e -= 1;
                    extra -= 1;
                }
                out[d] = e;
            }
            return out;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn takes_from_the_largest_first() {
        assert_eq!(plan(&[10, 100, 20], 50), vec![0, 50, 0]);
        assert_eq!(plan(&[10, 100, 90], 30), vec![0, 20, 10]);
        assert_eq!(plan(&[5, 5], 3), vec![1, 2]);
        assert_eq!(plan(&[3, 4], 100), vec![3, 4]);
        assert_eq!(plan(&[], 5), Vec::<u64>::new());
    }

    proptest! {
        #[test]
        fn exact_and_fair(counts in prop::collection::vec(0u64..1000, 0..40), need in 0u64..20_000) {
            let p = plan(&counts, need);
            let total: u64 = counts.iter().sum();
            prop_assert_eq!(p.iter().sum::<u64>(), need.min(total));
            let after: Vec<u64> = counts.iter().zip(&p).map(|(c, e)| c - e).collect();
            let top = after.iter().copied().max().unwrap_or(0);
            for (i, &e) in p.iter().enumerate() {
                prop_assert!(e <= counts[i]);
                // A device that lost readings is left within one of the largest.
                if e > 0 {
                    prop_assert!(after[i] + 1 >= top, "{:?} -> {:?}", counts, after);
                }
            }
        }
    }
}
