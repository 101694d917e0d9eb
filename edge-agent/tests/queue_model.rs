//! R1: a model-based property test of the queue. Random appends (with replays and
//! conflicts), crashes mid-transaction, batch reads, acks, lane restarts and reopenings run
//! against the SQLite queue and a plain in-memory model. No acked reading may come back, no
//! committed, unacked reading may be lost, a replay (same identity and value) is dropped and
//! a conflict (same identity, another value) is stored. A batch the cloud refuses is split
//! and its readings sent again, except a refused single reading, which goes to quarantine
//! and is never sent again. The live lane ships from memory when it can (the memory is
//! drawn none, tiny or the default, so it overflows and falls back to SQLite too); without a
//! restart everything committed and not in flight is read exactly once.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::collections::HashSet;

use edge_agent::config::Synchronous;
use edge_agent::store::{Insert, Options, Refused, Store};
use plantlink_model::{Reading, Timestamp};
use proptest::prelude::*;

/// (device, ts, value): the first two make the identity, the value tells a replay from a
/// conflict.
type Key = (u8, i64, u8);

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Key>),
    AppendThenCrash(Vec<Key>),
    Read(usize),
    Ack(prop::sample::Index),
    Refuse(prop::sample::Index),
    RestartLanes,
    Reopen,
}

fn key() -> impl Strategy<Value = Key> {
    (0u8..4, 0i64..40, 0u8..2)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(key(), 1..12).prop_map(Op::Append),
        1 => prop::collection::vec(key(), 1..6).prop_map(Op::AppendThenCrash),
        3 => (1usize..10).prop_map(Op::Read),
        3 => any::<prop::sample::Index>().prop_map(Op::Ack),
        2 => any::<prop::sample::Index>().prop_map(Op::Refuse),
        1 => Just(Op::RestartLanes),
        1 => Just(Op::Reopen),
    ]
}

fn reading(k: Key) -> Reading {
    Reading::new(
        "t",
        format!("dev{}", k.0),
        "m",
        Timestamp(k.1),
        f64::from(k.2),
    )
}

fn key_of(r: &Reading) -> Key {
    (r.device[3..].parse().unwrap(), r.ts.0, r.value as u8)
}

fn options(dir: &common::TempDir, live_buffer: usize) -> Options {
    Options {
        path: dir.path().join("q.db"),
        max_bytes: 1 << 30,
        synchronous: Synchronous::Normal,
        dedupe_window_us: i64::MAX / 4,
        dead_letters_keep: 10,
        tenant: "t".into(),
        max_series_per_device: 1000,
        live_buffer,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn queue_matches_model(
        ops in prop::collection::vec(op(), 1..60),
        // The live lane's memory: none, so small it overflows, or the default.
        live_buffer in prop_oneof![Just(0usize), 1usize..8, Just(edge_agent::store::LIVE_BUFFER)],
    ) {
        let dir = common::TempDir::new("model");
        let options = |dir: &common::TempDir| options(dir, live_buffer);
        let mut store = Store::open(options(&dir)).unwrap();
        // Model: committed and unacked keys in append order; every identity ever stored;
        // batches in flight; acked keys.
        let mut stored: Vec<Key> = Vec::new();
        let mut ever: HashSet<Key> = HashSet::new();
        let mut in_flight: Vec<(u64, Vec<Key>)> = Vec::new();
        let mut acked: HashSet<Key> = HashSet::new();
        let mut quarantined: HashSet<Key> = HashSet::new();

        for op in ops {
            match op {
                Op::Append(keys) => {
                    store.begin(1).unwrap();
                    for k in keys {
                        let got = store.insert(&reading(k)).unwrap();
                        let fresh = ever.insert(k);
                        prop_assert_eq!(got, if fresh { Insert::Stored } else { Insert::Duplicate }, "{:?}", k);
                        if fresh {
                            stored.push(k);
                        }
                    }
                    store.commit().unwrap();
                }
                Op::AppendThenCrash(keys) => {
                    store.begin(1).unwrap();
                    for k in keys {
                        store.insert(&reading(k)).unwrap();
                    }
                    drop(store); // killed before commit
                    store = Store::open(options(&dir)).unwrap();
                    in_flight.clear();
                }
                Op::Read(max) => {
                    if let Some(b) = store.read_next(max).unwrap() {
                        prop_assert!(!b.readings.is_empty() && b.readings.len() <= max);
                        let keys: Vec<Key> = b.readings.iter().map(key_of).collect();
                        for k in &keys {
                            prop_assert!(stored.contains(k), "{:?} read but not stored", k);
                            prop_assert!(!acked.contains(k), "{:?} came back after its ack", k);
                            prop_assert!(!quarantined.contains(k), "{:?} came back from quarantine", k);
                            prop_assert!(
                                !in_flight.iter().any(|(_, ks)| ks.contains(k)),
                                "{:?} is in two batches at once", k
                            );
                        }
                        // Oldest first within a batch.
                        let pos: Vec<usize> = keys
                            .iter()
                            .map(|k| stored.iter().position(|s| s == k).unwrap())
                            .collect();
                        prop_assert!(pos.windows(2).all(|w| w[0] < w[1]), "{:?}", pos);
                        in_flight.push((b.id, keys));
                    }
                }
                Op::Ack(i) => {
                    if !in_flight.is_empty() {
                        let (id, keys) = in_flight.remove(i.index(in_flight.len()));
                        prop_assert_eq!(store.ack(id).unwrap(), keys.len() as u64);
                        stored.retain(|k| !keys.contains(k));
                        acked.extend(keys);
                    }
                }
                Op::Refuse(i) => {
                    if !in_flight.is_empty() {
                        let (id, keys) = in_flight.remove(i.index(in_flight.len()));
                        match store.refuse(id, "malformed", "test", 1).unwrap() {
                            Refused::Quarantined(r) => {
                                prop_assert_eq!(keys.len(), 1);
                                prop_assert_eq!(key_of(&r), keys[0]);
                                stored.retain(|k| *k != keys[0]);
                                quarantined.insert(keys[0]);
                            }
                            Refused::Split { first, second } => {
                                prop_assert!(first >= 1 && second >= 1);
                                prop_assert_eq!(first + second, keys.len());
                            }
                            Refused::Again | Refused::Unknown => {
                                prop_assert!(false, "batch {} was in flight, none evicted", id)
                            }
                        }
                    }
                }
                Op::RestartLanes => {
                    store.restart_lanes();
                    in_flight.clear();
                }
                Op::Reopen => {
                    drop(store);
                    store = Store::open(options(&dir)).unwrap();
                    in_flight.clear();
                }
            }
            prop_assert_eq!(store.len(), stored.len() as u64);
        }

        // Without a restart, what is not in flight is read once (the live lane from memory
        // or SQLite, the backlog and the refused halves): nothing committed is left behind.
        let mut seen: Vec<Key> = in_flight.iter().flat_map(|(_, ks)| ks.clone()).collect();
        while let Some(b) = store.read_next(7).unwrap() {
            seen.extend(b.readings.iter().map(key_of));
        }
        let mut want = stored.clone();
        want.sort();
        seen.sort();
        prop_assert_eq!(&seen, &want);

        // Drain from scratch: exactly the committed, unacked readings, each once.
        store.restart_lanes();
        let mut drained = Vec::new();
        while let Some(b) = store.read_next(7).unwrap() {
            drained.extend(b.readings.iter().map(key_of));
        }
        let mut want = stored.clone();
        want.sort();
        drained.sort();
        prop_assert_eq!(drained, want);
    }
}
