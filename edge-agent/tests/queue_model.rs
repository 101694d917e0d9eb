//! R1: a model-based property test of the queue. Random appends (with replays and
//! conflicts), crashes mid-transaction, batch reads, acks, lane restarts and reopenings run
//! against the SQLite queue and a plain in-memory model. No acked reading may come back, no
//! committed, unacked reading may be lost, a replay (same identity and value) is dropped and
//! a conflict (same identity, another value) is stored. A batch the cloud refuses is split
//! and its readings sent again, except a refused single reading, which goes to quarantine
//! and is never sent again. The live lane ships from memory when it can (the memory is
//! drawn none, tiny or the default, so it overflows and falls back to SQLite too); without a
//! restart everything committed and not in flight is read exactly once. Transactions of a
//! few hundred readings use the write front's multi-row statements, and transactions that
//! fail (partway through their readings, at their dedupe entries, or at COMMIT) are rolled
//! back in place, as the writer does, leaving the model unchanged.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::collections::HashSet;

use edge_agent::config::Synchronous;
use edge_agent::store::{Insert, Options, READINGS_PER_ROW, Refused, Store};
use plantlink_model::{Reading, Timestamp};
use proptest::prelude::*;

/// (device, ts, value): the first two make the identity, the value tells a replay from a
/// conflict.
type Key = (u8, i64, u8);

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Key>),
    AppendThenCrash(Vec<Key>),
    AppendThenFail(Vec<Key>, Failure),
    Read(usize),
    Ack(prop::sample::Index),
    Refuse(prop::sample::Index),
    RestartLanes,
    Reopen,
}

/// Where a failed transaction fails: writing its readings partway, writing its dedupe
/// entries, or at COMMIT itself (a deferred constraint), after everything was written.
#[derive(Debug, Clone, Copy)]
enum Failure {
    Readings,
    Seen,
    Commit,
}

impl Failure {
    /// Temporary triggers (and tables) that make the next commit, which writes `rows` chunk
    /// rows, fail here (installed outside the transaction, which would roll them back).
    fn install(self, rows: usize) -> String {
        match self {
            Failure::Readings => format!(
                "CREATE TEMP TABLE fail_count (n INTEGER);
                 CREATE TEMP TRIGGER fail_here BEFORE INSERT ON chunks
                 WHEN (SELECT count(*) FROM fail_count) >= {}
                 BEGIN SELECT RAISE(ABORT, 'injected failure'); END;
                 CREATE TEMP TRIGGER fail_count_up AFTER INSERT ON chunks
                 BEGIN INSERT INTO fail_count VALUES (1); END",
                rows / 2
            ),
            Failure::Seen => "CREATE TEMP TRIGGER fail_here BEFORE INSERT ON seen0
                 BEGIN SELECT RAISE(ABORT, 'injected failure'); END;
                 CREATE TEMP TRIGGER fail_here1 BEFORE INSERT ON seen1
                 BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
                .into(),
            Failure::Commit => "PRAGMA foreign_keys = ON;
                 CREATE TEMP TABLE fail_parent (id INTEGER PRIMARY KEY);
                 CREATE TEMP TABLE fail_child (
                     p INTEGER REFERENCES fail_parent (id) DEFERRABLE INITIALLY DEFERRED);
                 CREATE TEMP TRIGGER fail_here AFTER INSERT ON chunks
                 BEGIN INSERT INTO fail_child VALUES (-1); END"
                .into(),
        }
    }

    fn remove(self) -> &'static str {
        match self {
            Failure::Readings => {
                "DROP TRIGGER fail_here; DROP TRIGGER fail_count_up; DROP TABLE fail_count"
            }
            Failure::Seen => "DROP TRIGGER fail_here; DROP TRIGGER fail_here1",
            Failure::Commit => {
                "DROP TRIGGER fail_here; DROP TABLE fail_child; DROP TABLE fail_parent;
                 PRAGMA foreign_keys = OFF"
            }
        }
    }
}

fn key() -> impl Strategy<Value = Key> {
    (0u8..4, 0i64..40, 0u8..2)
}

/// Keys from a wider range, for transactions of a few hundred readings (the write front's
/// multi-row statements).
fn wide_key() -> impl Strategy<Value = Key> {
    (0u8..4, 0i64..400, 0u8..2)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(key(), 1..12).prop_map(Op::Append),
        1 => prop::collection::vec(wide_key(), 100..300).prop_map(Op::Append),
        1 => prop::collection::vec(key(), 1..6).prop_map(Op::AppendThenCrash),
        1 => (
            prop::collection::vec(wide_key(), 1..200),
            prop_oneof![Just(Failure::Readings), Just(Failure::Seen), Just(Failure::Commit)],
        )
            .prop_map(|(keys, f)| Op::AppendThenFail(keys, f)),
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
        // Model: committed and unacked keys in id order (a commit's readings device by
        // device, devices in the order the file first stored them); every identity ever
        // stored; batches in flight; acked keys.
        let mut stored: Vec<Key> = Vec::new();
        let mut devices: Vec<u8> = Vec::new();
        let mut ever: HashSet<Key> = HashSet::new();
        let mut in_flight: Vec<(u64, Vec<Key>)> = Vec::new();
        let mut acked: HashSet<Key> = HashSet::new();
        let mut quarantined: HashSet<Key> = HashSet::new();

        for op in ops {
            match op {
                Op::Append(keys) => {
                    store.begin(1).unwrap();
                    let mut commit = Vec::new();
                    for k in keys {
                        let got = store.insert(&reading(k)).unwrap();
                        let fresh = ever.insert(k);
                        prop_assert_eq!(got, if fresh { Insert::Stored } else { Insert::Duplicate }, "{:?}", k);
                        if fresh {
                            commit.push(k);
                            if !devices.contains(&k.0) {
                                devices.push(k.0);
                            }
                        }
                    }
                    store.commit().unwrap();
                    commit.sort_by_key(|k| devices.iter().position(|d| *d == k.0));
                    stored.extend(commit);
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
                Op::AppendThenFail(keys, failure) => {
                    // The transaction fails and is rolled back in place, as the writer does
                    // (no reopen): memory must match the file again, and its readings are
                    // new the next time they come.
                    let mut seen_here = ever.clone();
                    let fresh: Vec<Key> = keys.iter().copied().filter(|k| seen_here.insert(*k)).collect();
                    // A chunk row per device, and one more per READINGS_PER_ROW.
                    let rows: usize = (0u8..4)
                        .map(|d| fresh.iter().filter(|k| k.0 == d).count().div_ceil(READINGS_PER_ROW))
                        .sum();
                    let fresh = fresh.len();
                    store.connection().execute_batch(&failure.install(rows)).unwrap();
                    store.begin(1).unwrap();
                    let mut seen_here = ever.clone();
                    for k in keys {
                        let got = store.insert(&reading(k)).unwrap();
                        let new = seen_here.insert(k);
                        prop_assert_eq!(got, if new { Insert::Stored } else { Insert::Duplicate }, "{:?}", k);
                    }
                    let failed = store.commit();
                    prop_assert!(failed.is_err() || fresh == 0, "{:?}: the commit went through", failure);
                    store.rollback();
                    store.connection().execute_batch(failure.remove()).unwrap();
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
