use plantlink_model::Timestamp;

use super::*;

pub(crate) fn temp_store(max_bytes: u64) -> (tempdir::Dir, Store) {
    let dir = tempdir::Dir::new();
    let store = Store::open(options(&dir, max_bytes)).unwrap();
    (dir, store)
}

pub(crate) fn options(dir: &tempdir::Dir, max_bytes: u64) -> Options {
    Options {
        path: dir.path().join("queue.db"),
        max_bytes,
        synchronous: Synchronous::Normal,
        dedupe_window_us: 600_000_000,
        dead_letters_keep: 3,
        tenant: "acme".into(),
        max_series_per_device: 1000,
        live_buffer: super::LIVE_BUFFER,
    }
}

/// A private temporary folder, removed on drop.
pub(crate) mod tempdir {
    use std::path::{Path, PathBuf};

    pub(crate) struct Dir(PathBuf);

    impl Dir {
        pub(crate) fn new() -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "plantlink-store-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn r(device: &str, ts: i64, value: f64) -> Reading {
    Reading::new("acme", device, "temperature", Timestamp(ts), value)
}

fn put(s: &mut Store, readings: &[Reading]) -> Vec<Insert> {
    s.begin(1).unwrap();
    let out = readings.iter().map(|x| s.insert(x).unwrap()).collect();
    s.commit().unwrap();
    out
}

#[test]
fn readings_round_trip_bit_exactly_with_tags_and_seq() {
    let (_d, mut s) = temp_store(1 << 20);
    let mut a = r("d1", 10, f64::NAN);
    a.tags.insert("site".into(), "p1".into());
    a.seq = Some(u64::MAX);
    let b = r("d1", 11, -0.0);
    put(&mut s, &[a.clone(), b.clone()]);
    let batch = s.read_next(10).unwrap().unwrap();
    assert_eq!(batch.readings.len(), 2);
    assert_eq!(batch.readings[0].value.to_bits(), a.value.to_bits());
    assert_eq!(batch.readings[0].tags, a.tags);
    assert_eq!(batch.readings[0].seq, a.seq);
    assert_eq!(batch.readings[1].value.to_bits(), b.value.to_bits());
}

#[test]
fn duplicates_are_dropped_across_reopen() {
    let dir = tempdir::Dir::new();
    let mut s = Store::open(options(&dir, 1 << 20)).unwrap();
    assert_eq!(
        put(&mut s, &[r("d", 1, 1.0), r("d", 1, 1.0)]),
        vec![Insert::Stored, Insert::Duplicate]
    );
    drop(s);
    let mut s = Store::open(options(&dir, 1 << 20)).unwrap();
    assert_eq!(
        put(&mut s, &[r("d", 1, 1.0), r("d", 2, 1.0)]),
        vec![Insert::Duplicate, Insert::Stored]
    );
    assert_eq!(s.len(), 2);
}

#[test]
fn a_replay_with_another_seq_is_a_duplicate() {
    let (_d, mut s) = temp_store(1 << 20);
    let mut a = r("d", 1, 1.0);
    a.seq = Some(4);
    let mut b = a.clone();
    b.seq = Some(5);
    let mut c = a.clone();
    c.seq = None;
    assert_eq!(
        put(&mut s, &[a, b, c]),
        vec![Insert::Stored, Insert::Duplicate, Insert::Duplicate]
    );
    assert_eq!(s.len(), 1);
}

#[test]
fn a_conflicting_value_is_stored_not_dropped() {
    let (_d, mut s) = temp_store(1 << 20);
    assert_eq!(
        put(&mut s, &[r("d", 1, 1.0), r("d", 1, 9.0), r("d", 1, 9.0)]),
        vec![Insert::Stored, Insert::Stored, Insert::Duplicate]
    );
    // Values compare as the cloud compares them (`plantlink_model::value_key`): every NaN is
    // one NaN, and -0.0 is 0.0.
    assert_eq!(
        put(
            &mut s,
            &[
                r("d", 2, f64::NAN),
                r("d", 2, f64::from_bits(f64::NAN.to_bits() | 1)),
                r("d", 3, 0.0),
                r("d", 3, -0.0)
            ]
        ),
        vec![
            Insert::Stored,
            Insert::Duplicate,
            Insert::Stored,
            Insert::Duplicate
        ]
    );
    // Both values of the conflict are shipped, the first one first.
    let batch = s.read_next(10).unwrap().unwrap();
    let values: Vec<f64> = batch.readings.iter().take(2).map(|x| x.value).collect();
    assert_eq!(values, vec![1.0, 9.0]);
    assert_eq!(s.len(), 4);
}

#[test]
fn the_same_value_with_other_tags_is_stored() {
    let (_d, mut s) = temp_store(1 << 20);
    let mut l3 = r("d", 1, 1.0);
    l3.tags.insert("line".into(), "l3".into());
    let mut l4 = r("d", 1, 1.0);
    l4.tags.insert("line".into(), "l4".into());
    assert_eq!(
        put(&mut s, &[r("d", 1, 1.0), l3.clone(), l4, l3]),
        vec![
            Insert::Stored,
            Insert::Stored,
            Insert::Stored,
            Insert::Duplicate
        ]
    );
    assert_eq!(s.len(), 3);
}

#[test]
fn the_tenant_is_part_of_identity() {
    let dir = tempdir::Dir::new();
    let mut s = Store::open(options(&dir, 1 << 20)).unwrap();
    assert_eq!(put(&mut s, &[r("d", 1, 1.0)]), vec![Insert::Stored]);
    drop(s);
    // The same file reopened for another tenant: the reading is not one of its own.
    let mut s = Store::open(Options {
        tenant: "globex".into(),
        ..options(&dir, 1 << 20)
    })
    .unwrap();
    assert_eq!(put(&mut s, &[r("d", 1, 1.0)]), vec![Insert::Stored]);
}

#[test]
fn dedupe_generations_forget_after_two_windows() {
    let (_d, mut s) = temp_store(1 << 20);
    let w = 600_000_000;
    s.begin(w).unwrap();
    assert_eq!(s.insert(&r("d", 1, 1.0)).unwrap(), Insert::Stored);
    s.commit().unwrap();
    s.begin(2 * w - 1).unwrap(); // within one window: caught
    assert_eq!(s.insert(&r("d", 1, 1.0)).unwrap(), Insert::Duplicate);
    s.commit().unwrap();
    s.begin(2 * w + 1).unwrap(); // rotated once: still in the previous generation
    assert_eq!(s.insert(&r("d", 1, 1.0)).unwrap(), Insert::Duplicate);
    s.commit().unwrap();
    s.begin(4 * w).unwrap(); // rotated twice: forgotten
    assert_eq!(s.insert(&r("d", 1, 1.0)).unwrap(), Insert::Stored);
    s.commit().unwrap();
}

#[test]
fn an_uncommitted_transaction_leaves_nothing_behind() {
    let dir = tempdir::Dir::new();
    let mut s = Store::open(options(&dir, 1 << 20)).unwrap();
    s.begin(1).unwrap();
    s.insert(&r("d", 1, 1.0)).unwrap();
    drop(s); // crash before commit
    let mut s = Store::open(options(&dir, 1 << 20)).unwrap();
    assert!(s.is_empty());
    // Neither the reading nor its identity survived, so it can be stored now.
    assert_eq!(put(&mut s, &[r("d", 1, 1.0)]), vec![Insert::Stored]);
}

#[test]
fn live_goes_first_and_backlog_follows_oldest_first() {
    let (_d, mut s) = temp_store(1 << 20);
    put(
        &mut s,
        &(0..5).map(|i| r("old", i, 0.0)).collect::<Vec<_>>(),
    );
    s.restart_lanes(); // a connection starts: the five are backlog
    put(&mut s, &[r("new", 100, 0.0), r("new", 101, 0.0)]);
    let live = s.read_next(10).unwrap().unwrap();
    assert_eq!(live.lane, Lane::Live);
    assert_eq!(
        live.readings.iter().map(|x| x.ts.0).collect::<Vec<_>>(),
        vec![100, 101]
    );
    let back = s.read_next(3).unwrap().unwrap();
    assert_eq!(back.lane, Lane::Backlog);
    assert_eq!(
        back.readings.iter().map(|x| x.ts.0).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert!(s.has_backlog());
    assert_eq!(s.ack(back.id).unwrap(), 3);
    assert_eq!(s.ack(live.id).unwrap(), 2);
    assert_eq!(s.ack(live.id).unwrap(), 0, "a second ack deletes nothing");
    let rest = s.read_next(10).unwrap().unwrap();
    assert_eq!(
        rest.readings.iter().map(|x| x.ts.0).collect::<Vec<_>>(),
        vec![3, 4]
    );
    assert!(s.read_next(10).unwrap().is_none());
    // Unacked readings come back after the lanes restart.
    s.restart_lanes();
    assert_eq!(s.read_next(10).unwrap().unwrap().readings.len(), 2);
}

#[test]
fn eviction_takes_the_oldest_of_the_biggest_device_and_counts_it() {
    // Room for 100 readings besides the rows of two devices and their series:
    // (48 + 2 x 5) per device name, (48 + 2 x 11) per `temperature` series.
    let (_d, mut s) = temp_store(100 * ROW_COST + 2 * 58 + 2 * 70);
    put(
        &mut s,
        &(0..20).map(|i| r("quiet", i, 0.0)).collect::<Vec<_>>(),
    );
    s.begin(1).unwrap();
    for i in 0..100 {
        s.insert(&r("flood", i, 0.0)).unwrap();
    }
    let ev = s.commit().unwrap();
    assert_eq!(
        ev,
        vec![Eviction {
            device: "flood".into(),
            readings: 20
        }]
    );
    assert_eq!(s.len(), 100);
    let st = stats(s.connection()).unwrap();
    let flood = st.per_device.iter().find(|d| d.device == "flood").unwrap();
    assert_eq!((flood.readings, flood.evicted), (80, 20));
    let quiet = st.per_device.iter().find(|d| d.device == "quiet").unwrap();
    assert_eq!((quiet.readings, quiet.evicted), (20, 0));
    // The flood's oldest went: its first remaining reading is ts 20.
    let b = s.read_next(1000).unwrap().unwrap();
    let first_flood = b.readings.iter().find(|x| x.device == "flood").unwrap();
    assert_eq!(first_flood.ts.0, 20);
}

#[test]
fn eviction_and_acks_are_exact_to_the_reading_across_and_inside_rows() {
    let dir = tempdir::Dir::new();
    let mut s = Store::open(options(&dir, 1 << 30)).unwrap();
    // One commit: 300 readings of `flood` on two series (rows of 128, 128 and 44) and 10
    // of `quiet`.
    let flood = |i: i64| {
        Reading::new(
            "acme",
            "flood",
            ["m0", "m1"][i as usize % 2],
            Timestamp(i),
            0.0,
        )
    };
    let mut batch: Vec<Reading> = (0..300).map(flood).collect();
    batch.extend((0..10).map(|i| r("quiet", 1000 + i, 0.0)));
    put(&mut s, &batch);
    let rows: i64 = s
        .connection()
        .query_row("SELECT count(*) FROM chunks", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 4);
    // Room for 180: 130 go, all the flood's oldest (the whole first row and two of the next).
    s.max_readings = 180;
    s.begin(2).unwrap();
    let ev = s.commit().unwrap();
    assert_eq!(
        ev,
        vec![Eviction {
            device: "flood".into(),
            readings: 130
        }]
    );
    let per_series = |s: &Store| -> Vec<u64> {
        let mut v: Vec<u64> = s.series.values().map(|x| x.readings).collect();
        v.sort_unstable();
        v
    };
    assert_eq!(per_series(&s), [10, 85, 85]);
    // The counts read back from the file are the ones kept in memory.
    drop(s);
    let mut s = Store::open(options(&dir, 1 << 30)).unwrap();
    assert_eq!(per_series(&s), [10, 85, 85]);
    assert_eq!(s.len(), 180);
    // Batches of 50 cut rows at both ends; acking every second one leaves exactly the others.
    let mut kept = Vec::new();
    let mut n = 0;
    while let Some(b) = s.read_next(50).unwrap() {
        if n % 2 == 0 {
            assert_eq!(s.ack(b.id).unwrap(), b.readings.len() as u64);
        } else {
            kept.extend(b.readings.iter().map(|x| x.ts.0));
        }
        n += 1;
    }
    let left: Vec<i64> = queued_readings(s.connection())
        .unwrap()
        .iter()
        .map(|x| x.ts)
        .collect();
    assert_eq!(left, kept);
    assert_eq!(s.len(), kept.len() as u64);
    let expected: Vec<i64> = (130..300).chain(1000..1010).collect::<Vec<_>>()[50..100]
        .iter()
        .chain(&(130..300).chain(1000..1010).collect::<Vec<_>>()[150..])
        .copied()
        .collect();
    assert_eq!(kept, expected);
}

#[test]
fn dead_letters_are_kept_capped_and_listed() {
    let (_d, mut s) = temp_store(1 << 20);
    s.begin(1).unwrap();
    for i in 0..5 {
        s.dead_letter(
            i,
            "mqtt",
            "plant/x",
            "malformed",
            "not JSON",
            &vec![b'x'; 10_000],
            10_000,
        )
        .unwrap();
    }
    s.commit().unwrap();
    let dl = dead_letters(s.connection(), 10).unwrap();
    assert_eq!(dl.len(), 3, "dead_letters_keep = 3");
    assert_eq!(dl[0].received_us, 4);
    assert_eq!(dl[0].size, 10_000);
    assert_eq!(dl[0].payload.len(), DEAD_LETTER_PAYLOAD_CAP);
}

#[test]
fn mqtt_redeliveries_are_recognised() {
    let (_d, mut s) = temp_store(1 << 20);
    s.begin(1).unwrap();
    s.mqtt_record(7, 42).unwrap();
    s.commit().unwrap();
    assert!(s.mqtt_committed(7, 42).unwrap().is_some());
    assert!(s.mqtt_committed(7, 43).unwrap().is_none());
    assert!(s.mqtt_committed(8, 42).unwrap().is_none());
    // A newer message with the same packet id does not make the older one forgotten:
    // Mosquitto can have both unacknowledged at once.
    s.begin(1).unwrap();
    let newer = s.mqtt_record(7, 43).unwrap();
    s.commit().unwrap();
    assert!(s.mqtt_committed(7, 42).unwrap().is_some());
    // Once the broker confirmed a PUBACK, its record goes.
    s.begin(1).unwrap();
    s.mqtt_forget(&[newer]).unwrap();
    s.commit().unwrap();
    assert!(s.mqtt_committed(7, 43).unwrap().is_none());
    assert!(s.mqtt_committed(7, 42).unwrap().is_some());
}

#[test]
fn a_newer_schema_is_refused_clearly() {
    let dir = tempdir::Dir::new();
    let s = Store::open(options(&dir, 1 << 20)).unwrap();
    s.connection()
        .execute(
            "UPDATE meta SET value = 99 WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
    drop(s);
    let err = Store::open(options(&dir, 1 << 20)).unwrap_err().to_string();
    assert!(
        err.contains("schema version 99") && err.contains("upgrade"),
        "{err}"
    );
}

#[test]
fn a_refused_batch_is_split_until_the_reading_at_fault_is_quarantined() {
    let (_d, mut s) = temp_store(1 << 20);
    let readings: Vec<Reading> = (0..8).map(|i| r("d1", i, i as f64)).collect();
    put(&mut s, &readings);
    let b = s.read_next(8).unwrap().unwrap();
    assert_eq!(b.readings.len(), 8);
    // Reading 5 is the poison: the cloud refuses every batch that holds it.
    let mut batch = b;
    let mut round_trips = 1;
    let mut delivered = Vec::new();
    loop {
        let poisoned = batch.readings.iter().any(|x| x.ts.0 == 5);
        if poisoned {
            match s.refuse(batch.id, "malformed", "tag too long", 42).unwrap() {
                Refused::Quarantined(q) => {
                    assert_eq!(q.ts.0, 5);
                    break;
                }
                Refused::Split { first, second } => assert!(first > 0 && second > 0),
                Refused::Again | Refused::Unknown => panic!("batch in flight, none evicted"),
            }
        } else {
            delivered.extend(batch.readings.iter().map(|x| x.ts.0));
            s.ack(batch.id).unwrap();
        }
        assert!(s.has_backlog(), "the halves wait in the backlog lane");
        batch = s.read_batch(Lane::Backlog, 8).unwrap().unwrap();
        assert_eq!(batch.lane, Lane::Backlog);
        round_trips += 1;
    }
    assert!(round_trips <= 7, "{round_trips} round trips for 8 readings");
    // The rest is delivered, oldest first, and nothing else is left.
    while let Some(b) = s.read_batch(Lane::Backlog, 8).unwrap() {
        delivered.extend(b.readings.iter().map(|x| x.ts.0));
        s.ack(b.id).unwrap();
    }
    delivered.sort();
    assert_eq!(delivered, vec![0, 1, 2, 3, 4, 6, 7]);
    assert!(s.is_empty());
    let held = quarantined(s.connection(), 10).unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!((held[0].ts, held[0].reason.as_str()), (5, "malformed"));
    assert_eq!(held[0].detail, "tag too long");
    assert_eq!(stats(s.connection()).unwrap().quarantined, 1);
    // An unknown batch (forgotten by a reconnect) changes nothing.
    assert_eq!(s.refuse(999, "malformed", "", 0).unwrap(), Refused::Unknown);
}

#[test]
fn device_and_series_rows_count_toward_max_bytes_and_idle_ones_are_pruned() {
    let (_d, mut s) = temp_store(1 << 20);
    let base = s.bytes();
    assert_eq!(base, 0);
    // 1,000 devices with one long-tagged series each: their rows take room from readings.
    let mut readings = Vec::new();
    for i in 0..1000 {
        let mut x = r(&format!("dev-{i:04}"), i, 1.0);
        x.tags.insert("note".into(), "n".repeat(200));
        readings.push(x);
    }
    put(&mut s, &readings);
    let state = s.bytes() - 1000 * ROW_COST;
    assert!(
        state > 1000 * 400,
        "{state} bytes of device and series rows"
    );
    assert_eq!(s.capacity(), ((1 << 20) - state) / ROW_COST);
    assert_eq!(s.devices(), 1000);
    // Acked, they hold no readings; pruned, their rows and room come back.
    let b = s.read_next(1000).unwrap().unwrap();
    s.ack(b.id).unwrap();
    s.begin(2).unwrap();
    assert_eq!(
        s.prune_idle(1).unwrap(),
        (0, 0),
        "stored at 1: not idle before 1"
    );
    assert_eq!(s.prune_idle(3).unwrap(), (1000, 1000));
    s.commit().unwrap();
    assert_eq!((s.devices(), s.bytes()), (0, 0));
    assert!(!s.knows("dev-0001"));
    // A device pruned comes back as new, and the file agrees after a reopen.
    put(&mut s, &[r("dev-0001", 5000, 2.0)]);
    assert!(s.knows("dev-0001"));
    let bytes = s.bytes();
    drop(s);
    let s = Store::open(options(&_d, 1 << 20)).unwrap();
    assert_eq!(s.bytes(), bytes);
    assert_eq!(s.devices(), 1);
    assert_eq!(stats(s.connection()).unwrap().bytes, bytes);
}

#[test]
fn pruning_keeps_the_lifetime_counts_of_pruned_devices() {
    let (_d, mut s) = temp_store(1 << 20);
    // Fill past capacity with one device so it is evicted from, then drain and prune it.
    let cap = s.capacity() as i64;
    let readings: Vec<Reading> = (0..cap + 10).map(|i| r("big", i, 1.0)).collect();
    put(&mut s, &readings);
    let evicted = stats(s.connection()).unwrap().evicted;
    assert!(evicted > 0);
    while let Some(b) = s.read_next(10_000).unwrap() {
        s.ack(b.id).unwrap();
    }
    s.begin(10).unwrap();
    assert_eq!(s.prune_idle(11).unwrap().0, 1);
    s.commit().unwrap();
    assert_eq!(stats(s.connection()).unwrap().evicted, evicted);
}

#[test]
fn a_reading_left_alone_by_eviction_is_sent_again_not_quarantined() {
    let (_d, mut s) = temp_store(1 << 20);
    put(&mut s, &[r("d1", 1, 1.0), r("d1", 2, 2.0)]);
    let b = s.read_next(10).unwrap().unwrap();
    assert_eq!(b.readings.len(), 2);
    // The poison (ts 1) is evicted before the cloud's refusal of the pair is handled.
    assert_eq!(s.delete_range(1, 1).unwrap().len(), 1);
    assert_eq!(s.refuse(b.id, "malformed", "x", 5).unwrap(), Refused::Again);
    assert!(quarantined(s.connection(), 10).unwrap().is_empty());
    // It goes out alone; refused alone, then it is quarantined.
    let again = s.read_batch(Lane::Backlog, 10).unwrap().unwrap();
    assert_eq!(again.readings.len(), 1);
    assert_eq!(again.readings[0].ts.0, 2);
    assert!(matches!(
        s.refuse(again.id, "malformed", "x", 6).unwrap(),
        Refused::Quarantined(_)
    ));
}

#[test]
fn a_device_at_its_series_cap_is_refused_new_series_and_nothing_is_marked_seen() {
    let d = tempdir::Dir::new();
    let mut opts = options(&d, 1 << 20);
    opts.max_series_per_device = 3;
    let mut s = Store::open(opts.clone()).unwrap();
    let metric = |m: &str, ts: i64| Reading::new("acme", "press01", m, Timestamp(ts), 1.0);
    s.begin(1).unwrap();
    for (i, m) in ["a", "b", "c"].iter().enumerate() {
        assert_eq!(s.insert(&metric(m, i as i64)).unwrap(), Insert::Stored);
    }
    // A fourth metric name is refused; the three known ones, and other devices, go on.
    let invented = metric("uuid-1", 10);
    assert_eq!(s.insert(&invented).unwrap(), Insert::SeriesCap);
    assert_eq!(s.insert(&metric("b", 11)).unwrap(), Insert::Stored);
    assert_eq!(
        s.insert(&Reading::new("acme", "press02", "x", Timestamp(12), 1.0))
            .unwrap(),
        Insert::Stored
    );
    s.commit().unwrap();
    assert_eq!(s.len(), 5);
    // The refused reading was not recorded as seen: with room, it is stored, not a replay.
    drop(s);
    opts.max_series_per_device = 10;
    let mut s = Store::open(opts).unwrap();
    s.begin(2).unwrap();
    assert_eq!(s.insert(&invented).unwrap(), Insert::Stored);
    s.commit().unwrap();
}

#[test]
fn live_readings_ship_from_memory_and_fall_back_to_sqlite() {
    let tamper = |s: &Store| {
        let rows: Vec<(i64, i64, Vec<u8>)> = s
            .connection()
            .prepare("SELECT first, last, body FROM chunks")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (first, last, body) in rows {
            let mut e = chunks::decode(&body, (last - first + 1) as usize).unwrap();
            for x in &mut e {
                x.bits = 0;
            }
            s.connection()
                .execute(
                    "UPDATE chunks SET body = ?1 WHERE last = ?2",
                    params![chunks::encode(&e), last],
                )
                .unwrap();
        }
    };
    let values = |b: Option<crate::store::QueuedBatch>| -> Vec<f64> {
        b.unwrap().readings.iter().map(|r| r.value).collect()
    };
    // From memory: the rows changed behind the store's back are not read back.
    let (_d, mut s) = temp_store(1 << 30);
    put(&mut s, &[r("a", 1, 1.0), r("a", 2, 2.0), r("b", 3, 3.0)]);
    tamper(&s);
    assert_eq!(values(s.read_batch(Lane::Live, 2).unwrap()), [1.0, 2.0]);
    assert_eq!(values(s.read_batch(Lane::Live, 9).unwrap()), [3.0]);
    assert!(s.read_batch(Lane::Live, 9).unwrap().is_none());
    // Without memory every live batch is read from SQLite.
    let (d0, mut s0) = temp_store(1 << 30);
    drop(s0);
    s0 = Store::open(Options {
        live_buffer: 0,
        ..options(&d0, 1 << 30)
    })
    .unwrap();
    put(&mut s0, &[r("a", 1, 1.0), r("a", 2, 2.0)]);
    tamper(&s0);
    assert_eq!(values(s0.read_batch(Lane::Live, 9).unwrap()), [0.0, 0.0]);
    // Overflowed: the first two from memory, the rest from SQLite, then memory again once
    // the lane has caught up.
    let (d2, s2) = temp_store(1 << 30);
    drop(s2);
    let mut s2 = Store::open(Options {
        live_buffer: 2,
        ..options(&d2, 1 << 30)
    })
    .unwrap();
    put(&mut s2, &[r("a", 1, 1.0), r("a", 2, 2.0)]);
    put(&mut s2, &[r("a", 3, 3.0)]);
    tamper(&s2);
    assert_eq!(values(s2.read_batch(Lane::Live, 9).unwrap()), [1.0, 2.0]);
    assert_eq!(values(s2.read_batch(Lane::Live, 9).unwrap()), [0.0]);
    put(&mut s2, &[r("a", 4, 4.0)]);
    tamper(&s2);
    assert_eq!(values(s2.read_batch(Lane::Live, 9).unwrap()), [4.0]);
}

#[test]
fn a_commit_that_evicts_leaves_no_evicted_reading_in_the_live_lane() {
    // As above: room for 100 readings; the quiet device's 20 are in the live lane's memory
    // when the flood's commit evicts 20 of its own.
    let (_d, mut s) = temp_store(100 * ROW_COST + 2 * 58 + 2 * 70);
    put(
        &mut s,
        &(0..20).map(|i| r("quiet", i, 0.0)).collect::<Vec<_>>(),
    );
    put(
        &mut s,
        &(0..100).map(|i| r("flood", i, 0.0)).collect::<Vec<_>>(),
    );
    let mut got = Vec::new();
    while let Some(b) = s.read_batch(Lane::Live, 30).unwrap() {
        got.extend(b.readings.iter().map(|r| (r.device.clone(), r.ts.0)));
    }
    assert_eq!(got.len(), 100);
    assert_eq!(got.iter().filter(|g| g.0 == "quiet").count(), 20);
    assert!(got.iter().all(|g| g.0 == "quiet" || g.1 >= 20), "{got:?}");
}

#[test]
fn a_rotation_rolled_back_keeps_its_generation_deduplicating() {
    let w = 600_000_000; // the window of `options`
    let (d, mut s) = temp_store(1 << 30);
    let r1 = r("a", 1, 1.0);
    s.begin(1).unwrap();
    assert_eq!(s.insert(&r1).unwrap(), Insert::Stored);
    s.commit().unwrap();
    s.begin(w + 1).unwrap(); // rotation: r1's generation becomes the previous one
    s.commit().unwrap();
    // This rotation would empty r1's generation, but its transaction rolls back.
    s.begin(2 * w + 2).unwrap();
    s.insert(&r("a", 2, 2.0)).unwrap();
    s.rollback();
    s.begin(w + 2).unwrap(); // within the window: no rotation
    assert_eq!(s.insert(&r1).unwrap(), Insert::Duplicate);
    s.commit().unwrap();
    // Across a reopen too (the filters are built from the file).
    let path = s.path().to_owned();
    drop(s);
    let mut s = Store::open(Options {
        path,
        ..options(&d, 1 << 30)
    })
    .unwrap();
    s.begin(w + 3).unwrap();
    assert_eq!(s.insert(&r1).unwrap(), Insert::Duplicate);
    assert_eq!(s.insert(&r("a", 3, 3.0)).unwrap(), Insert::Stored);
    s.commit().unwrap();
}

#[test]
fn a_late_reading_after_a_reopen_does_not_let_a_newer_replay_through() {
    let dir = tempdir::Dir::new();
    let mut s = Store::open(options(&dir, 1 << 20)).unwrap();
    put(&mut s, &[r("d", 100, 1.0), r("other", 500, 1.0)]);
    drop(s);
    // After the reopen only the generations' newest (500) is known: a late reading of
    // d is new, and the replay of d at 100 that follows it is still a duplicate (the late
    // one must not lower what d's replays are checked against).
    let mut s = Store::open(options(&dir, 1 << 20)).unwrap();
    assert_eq!(
        put(
            &mut s,
            &[r("d", 50, 1.0), r("d", 100, 1.0), r("d", 501, 1.0)]
        ),
        vec![Insert::Stored, Insert::Duplicate, Insert::Stored]
    );
    // Readings newer than everything are new without a lookup; replays of them are not.
    assert_eq!(
        put(
            &mut s,
            &[r("d", 502, 1.0), r("d", 502, 1.0), r("d", 501, 1.0)]
        ),
        vec![Insert::Stored, Insert::Duplicate, Insert::Duplicate]
    );
}

#[test]
fn a_queue_without_the_newest_times_still_deduplicates_and_learns_them() {
    // A queue file from before `seen*_ts_max` were kept: nothing is taken as new without
    // the other checks until its generations have rotated.
    let dir = tempdir::Dir::new();
    let mut s = Store::open(options(&dir, 1 << 20)).unwrap();
    put(&mut s, &[r("d", 100, 1.0)]);
    s.connection()
        .execute("DELETE FROM meta WHERE key LIKE 'seen%_ts_max'", [])
        .unwrap();
    drop(s);
    let mut s = Store::open(options(&dir, 1 << 20)).unwrap();
    assert_eq!(
        put(&mut s, &[r("d", 100, 1.0), r("d", 101, 1.0)]),
        vec![Insert::Duplicate, Insert::Stored]
    );
    let newest: Option<i64> = s
        .connection()
        .query_row(
            "SELECT value FROM meta WHERE key = 'seen0_ts_max'",
            [],
            |r| r.get(0),
        )
        .optional()
        .unwrap();
    // Generation 0 held readings of unknown times: it stays unknown (no value kept) until
    // it is emptied.
    assert_eq!(newest, None);
    drop(s);
    let mut s = Store::open(options(&dir, 1 << 20)).unwrap();
    assert_eq!(put(&mut s, &[r("d", 101, 1.0)]), vec![Insert::Duplicate]);
}

#[test]
fn a_version_1_queue_keeps_its_dedupe_memory_through_the_upgrade() {
    // A version 1 file: the `seen` generations keyed by the hash alone.
    let dir = tempdir::Dir::new();
    let mut s = Store::open(options(&dir, 1 << 20)).unwrap();
    put(&mut s, &[r("d", 100, 1.0), r("d", 101, 2.0)]);
    let h = identity_hash("acme", &r("d", 100, 1.0));
    to_version_2_layout(s.connection());
    s.connection()
        .execute_batch(&format!(
            "DROP TABLE seen0; DROP TABLE seen1;
             CREATE TABLE seen0 (h INTEGER PRIMARY KEY); CREATE TABLE seen1 (h INTEGER PRIMARY KEY);
             INSERT INTO seen0 (h) VALUES ({h});
             UPDATE meta SET value = 1 WHERE key = 'schema_version';"
        ))
        .unwrap();
    drop(s);
    let mut s = Store::open(options(&dir, 1 << 20)).unwrap();
    let version: i64 = s
        .connection()
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let carried: Vec<(i64, i64)> = s
        .connection()
        .prepare("SELECT ts, h FROM seen0")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(carried, vec![(TS_UNKNOWN, h)]);
    // The carried hash still drops its replay; what it did not hold is stored, and the
    // readings queued before the upgrade are all there.
    assert_eq!(
        put(&mut s, &[r("d", 100, 1.0), r("d", 99, 5.0)]),
        vec![Insert::Duplicate, Insert::Stored]
    );
    assert_eq!(s.len(), 3);
    // New identities are kept under their reading time, and found again after a restart.
    drop(s);
    let mut s = Store::open(options(&dir, 1 << 20)).unwrap();
    assert_eq!(put(&mut s, &[r("d", 99, 5.0)]), vec![Insert::Duplicate]);
    let timed: i64 = s
        .connection()
        .query_row("SELECT count(*) FROM seen0 WHERE ts = 99", [], |r| r.get(0))
        .unwrap();
    assert_eq!(timed, 1);
}

/// Puts the queued readings back in the version 2 layout: a `readings` row each, the id
/// sequence kept in `sqlite_sequence`, and no `chunks` table.
fn to_version_2_layout(conn: &Connection) {
    let given: i64 = conn
        .query_row(
            "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'chunks'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let rows: Vec<(i64, i64, i64, Vec<u8>)> = conn
        .prepare("SELECT first, last, device, body FROM chunks ORDER BY last")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    conn.execute_batch(
        "DROP TABLE chunks;
         CREATE TABLE readings (
             id INTEGER PRIMARY KEY AUTOINCREMENT, device INTEGER NOT NULL,
             series INTEGER NOT NULL, ts INTEGER NOT NULL, value INTEGER NOT NULL, seq INTEGER);
         CREATE INDEX readings_by_device ON readings (device, id);
         UPDATE meta SET value = 2 WHERE key = 'schema_version';",
    )
    .unwrap();
    for (first, last, device, body) in rows {
        for (i, e) in chunks::decode(&body, (last - first + 1) as usize)
            .unwrap()
            .into_iter()
            .enumerate()
        {
            conn.execute(
                "INSERT INTO readings (id, device, series, ts, value, seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![first + i as i64, device, e.series, e.ts, e.bits, e.seq],
            )
            .unwrap();
        }
    }
    conn.execute(
        "UPDATE sqlite_sequence SET seq = ?1 WHERE name = 'readings'",
        [given],
    )
    .unwrap();
}

#[test]
fn a_version_2_queue_moves_into_chunks_with_every_reading_and_its_ids() {
    let dir = tempdir::Dir::new();
    let mut s = Store::open(options(&dir, 1 << 20)).unwrap();
    // Three devices, interleaved over two commits, with a gap (acked ids) in between.
    put(&mut s, &[r("a", 1, 1.0), r("b", 2, 2.0), r("a", 3, 3.0)]);
    let b = s.read_next(1).unwrap().unwrap();
    s.ack(b.id).unwrap();
    put(
        &mut s,
        &[
            r("c", 4, 4.0),
            r("a", 5, 5.0),
            r("c", 6, 6.0),
            r("b", 7, 7.0),
            r("d", 8, 8.0),
        ],
    );
    // The newest id given (8, device d's) is gone too, so the highest id stored is not the
    // highest ever given.
    assert_eq!(s.delete_range(8, 8).unwrap().len(), 1);
    let before = queued_readings(s.connection()).unwrap();
    assert_eq!(before.len(), 6);
    drop(s);
    let dir2 = tempdir::Dir::new();
    std::fs::copy(dir.path().join("queue.db"), dir2.path().join("queue.db")).unwrap();
    {
        let conn = Connection::open(dir.path().join("queue.db")).unwrap();
        to_version_2_layout(&conn);
        // One reading a row, as version 2 kept them.
        let n: i64 = conn
            .query_row("SELECT count(*) FROM readings", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 6);
    }
    let mut s = Store::open(options(&dir, 1 << 20)).unwrap();
    assert_eq!(queued_readings(s.connection()).unwrap(), before);
    assert_eq!(s.len(), 6);
    let st = stats(s.connection()).unwrap();
    assert_eq!(st.readings, 6);
    let gone: bool = s
        .connection()
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'readings')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!gone, "the version 2 table is dropped");
    // Ids go on past every id given before the upgrade.
    assert_eq!(s.next_id, 9);
    // What was queued is backlog, shipped in id order after a new live reading.
    put(&mut s, &[r("b", 9, 9.0)]);
    let mut shipped = Vec::new();
    while let Some(b) = s.read_next(4).unwrap() {
        shipped.extend(b.readings.iter().map(|x| x.ts.0));
        s.ack(b.id).unwrap();
    }
    let mut expected = vec![9];
    expected.extend(before.iter().map(|x| x.ts));
    assert_eq!(shipped, expected);
    assert!(s.is_empty());
    // The untouched copy (already version 3) opens as it is.
    let s = Store::open(options(&dir2, 1 << 20)).unwrap();
    assert_eq!(queued_readings(s.connection()).unwrap(), before);
}

#[test]
fn an_ack_that_fails_partway_loses_nothing() {
    let dir = tempdir::Dir::new();
    let mut s = Store::open(options(&dir, 1 << 20)).unwrap();
    // One row of ten; the batch of four ends inside it, so the ack deletes the row and
    // puts the six that stay back.
    put(&mut s, &(0..10).map(|i| r("d", i, 0.0)).collect::<Vec<_>>());
    let b = s.read_next(4).unwrap().unwrap();
    s.connection()
        .execute_batch(
            "CREATE TEMP TRIGGER no_put_back BEFORE INSERT ON chunks
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        )
        .unwrap();
    assert!(s.ack(b.id).is_err());
    s.connection()
        .execute_batch("DROP TRIGGER no_put_back")
        .unwrap();
    drop(s);
    // The failed ack changed nothing in the file: all ten are there, to be sent again.
    let s = Store::open(options(&dir, 1 << 20)).unwrap();
    assert_eq!(s.len(), 10);
    assert_eq!(queued_readings(s.connection()).unwrap().len(), 10);
}
