//! "Newer than anything remembered": the dedupe check's first answer, exact and without a
//! lookup. A reading's identity hash covers its device, metric and time, so a reading newer
//! than every remembered reading of its (device, metric) cannot be a replay. Live devices
//! send in time order, so nearly every fresh reading is answered here, however full the
//! Bloom filters behind it are (at tens of thousands of readings a second a window holds
//! millions of hashes, more than a filter of bounded size tells apart).
//!
//! Each `seen` generation's newest reading time is kept in `meta` (`seen0_ts_max`,
//! `seen1_ts_max`), written with the commit that raises it and reset when its generation is
//! emptied, so after a restart every key starts from the newer of the two. In memory, each
//! (device, metric) key seen by this process has its own bound: at least the generations'
//! newest when it was first seen, and its newest since. Bounds only ever rise, so a bound
//! left high by a rolled-back transaction only sends readings on to the slower checks.

use std::collections::HashMap;

/// Keys with a bound of their own, at most; past it the bounds are dropped and every key
/// starts again from the generations' newest (still exact, only slower for a while).
const MAX_KEYS: usize = 200_000;

/// A generation whose newest reading is unknown (a queue written before this was kept, and
/// not empty): nothing is newer, so every reading takes the slower checks until it rotates.
pub(super) const UNKNOWN: i64 = i64::MAX;

/// A generation that holds nothing.
pub(super) const EMPTY: i64 = i64::MIN;

/// The bounds. Pure: the store loads and persists the generations' newest.
#[derive(Debug, Clone)]
pub(super) struct Fresh {
    /// The newest reading time recorded in each generation, with the open transaction's.
    newest: [i64; 2],
    /// The same as committed (what `meta` holds).
    committed: [i64; 2],
    keys: HashMap<u64, i64>,
}

impl Fresh {
    /// Bounds starting from the generations' newest times as stored.
    pub(super) fn new(newest: [i64; 2]) -> Self {
        Self {
            newest,
            committed: newest,
            keys: HashMap::new(),
        }
    }

    fn floor(&self) -> i64 {
        self.newest[0].max(self.newest[1])
    }

    /// Whether a reading of `key` at `ts` is certainly not remembered: newer than every
    /// remembered reading of its key.
    pub(super) fn certainly_new(&self, key: u64, ts: i64) -> bool {
        ts > self.keys.get(&key).copied().unwrap_or_else(|| self.floor())
    }

    /// Records that a reading of `key` at `ts` is remembered from now on, in generation `g`.
    pub(super) fn remember(&mut self, g: u8, key: u64, ts: i64) {
        if !self.keys.contains_key(&key) && self.keys.len() >= MAX_KEYS {
            self.keys.clear();
        }
        let floor = self.floor();
        let bound = self.keys.entry(key).or_insert(floor);
        *bound = (*bound).max(ts);
        let n = &mut self.newest[usize::from(g & 1)];
        *n = (*n).max(ts);
    }

    /// Generation `g` was emptied (a rotation, in the open transaction).
    pub(super) fn emptied(&mut self, g: u8) {
        self.newest[usize::from(g & 1)] = EMPTY;
    }

    /// The generation's newest to write with the open transaction, if it changed.
    pub(super) fn to_write(&self, g: u8) -> Option<i64> {
        let g = usize::from(g & 1);
        (self.newest[g] != self.committed[g]).then_some(self.newest[g])
    }

    /// The open transaction committed.
    pub(super) fn committed(&mut self) {
        self.committed = self.newest;
    }

    /// The open transaction rolled back: the generations are as stored again (`newest` as
    /// loaded). The keys' bounds stay: higher than needed is only slower.
    pub(super) fn rolled_back(&mut self, newest: [i64; 2]) {
        self.newest = newest;
        self.committed = newest;
    }
}

/// The key of a reading's (device, metric).
pub(super) fn key(device: &str, metric: &str) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(device.as_bytes());
    h.update(&[0xff]);
    h.update(metric.as_bytes());
    h.digest()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_fresh_queue_takes_every_first_reading_as_new() {
        let f = Fresh::new([EMPTY, EMPTY]);
        assert!(f.certainly_new(key("d", "t"), i64::MIN + 1));
    }

    #[test]
    fn an_unknown_generation_answers_nothing() {
        let mut f = Fresh::new([UNKNOWN, EMPTY]);
        assert!(!f.certainly_new(key("d", "t"), 1_000));
        f.remember(1, key("d", "t"), 5);
        assert!(!f.certainly_new(key("d", "t"), 1_000));
        // Until the unknown generation is emptied; the key's own bound stays.
        f.emptied(0);
        assert!(!f.certainly_new(key("d", "t"), 1_000));
        assert!(f.certainly_new(key("d", "u"), 6));
    }

    #[test]
    fn a_key_first_seen_late_starts_from_the_newest_remembered() {
        // Before a restart, (d, t) at 100 was remembered; the restart knows only that the
        // newest of the generations is 100.
        let mut f = Fresh::new([100, EMPTY]);
        assert!(!f.certainly_new(key("d", "t"), 50));
        f.remember(0, key("d", "t"), 50);
        // A replay of the reading at 100 is not taken for new.
        assert!(!f.certainly_new(key("d", "t"), 100));
        assert!(f.certainly_new(key("d", "t"), 101));
    }

    #[test]
    fn writes_follow_changes_and_a_rollback_restores_the_stored() {
        let mut f = Fresh::new([EMPTY, 10]);
        assert_eq!(f.to_write(1), None);
        f.remember(1, key("d", "t"), 20);
        assert_eq!(f.to_write(1), Some(20));
        f.rolled_back([EMPTY, 10]);
        assert_eq!(f.to_write(1), None);
        // The key's bound stayed at 20: slower, never wrong.
        assert!(!f.certainly_new(key("d", "t"), 15));
        f.remember(1, key("d", "t"), 30);
        f.emptied(0);
        f.committed();
        assert_eq!((f.to_write(0), f.to_write(1)), (None, None));
    }

    #[test]
    fn too_many_keys_start_again_from_the_newest() {
        let mut f = Fresh::new([EMPTY, EMPTY]);
        for i in 0..MAX_KEYS as i64 {
            f.remember(0, key("d", &i.to_string()), i);
        }
        f.remember(0, key("late", "t"), -5);
        assert!(f.keys.len() <= MAX_KEYS);
        // Every key is now bounded by the newest remembered, MAX_KEYS - 1.
        assert!(!f.certainly_new(key("d", "3"), MAX_KEYS as i64 - 1));
        assert!(!f.certainly_new(key("late", "t"), -5));
    }

    proptest! {
        /// Against the plain definition (a key's newest remembered time, over what is
        /// stored; restarts keep only the generations' newest), with rotations and
        /// rollbacks: "certainly new" is never said of a remembered (key, ts).
        #[test]
        fn never_new_when_remembered(
            ops in prop::collection::vec((0u8..6, -20i64..20, 0u8..10), 1..200)
        ) {
            // The stored generations: (key, ts) remembered, committed.
            let mut stored: [Vec<(u8, i64)>; 2] = [Vec::new(), Vec::new()];
            let mut open: Vec<(u8, i64)> = Vec::new();
            let mut current = 0u8;
            let newest = |gens: &[Vec<(u8, i64)>; 2]| {
                [0, 1].map(|g: usize| gens[g].iter().map(|k| k.1).max().unwrap_or(EMPTY))
            };
            let mut f = Fresh::new([EMPTY, EMPTY]);
            for (k, ts, action) in ops {
                let name = format!("m{k}");
                let remembered = stored.iter().flatten().chain(&open).any(|&(kk, tt)| kk == k && tt == ts);
                if f.certainly_new(key("d", &name), ts) {
                    prop_assert!(!remembered, "({k}, {ts}) said new but remembered");
                }
                match action {
                    0..=5 if !remembered => {
                        f.remember(current, key("d", &name), ts);
                        open.push((k, ts));
                    }
                    6 => {
                        stored[current as usize].append(&mut open);
                        f.committed();
                    }
                    7 => {
                        open.clear();
                        f.rolled_back(newest(&stored));
                    }
                    8 => {
                        // A rotation, committed with whatever the transaction holds.
                        stored[current as usize].append(&mut open);
                        current = 1 - current;
                        stored[current as usize].clear();
                        f.emptied(current);
                        f.committed();
                    }
                    9 => {
                        // A restart: the open transaction is lost.
                        open.clear();
                        f = Fresh::new(newest(&stored));
                    }
                    _ => {}
                }
            }
        }
    }
}
