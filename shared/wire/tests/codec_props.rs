//! Property tests: every batch round-trips bit-exactly, and no input makes a decoder panic.
#![allow(clippy::unwrap_used)] // tests may panic

use std::collections::BTreeMap;

use plantlink_model::{Reading, Tags, Timestamp};
use plantlink_wire::batch::{BatchDecoder, BatchEncoder, Limits};
use plantlink_wire::frame::{self, Batch, Frame, Lane};
use proptest::prelude::*;

fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        // Plant-like decimals.
        (-100_000i64..100_000, 0u32..4).prop_map(|(x, e)| x as f64 / 10f64.powi(e as i32)),
        // Any bit pattern: NaNs with payloads, infinities, subnormals, -0.0.
        any::<u64>().prop_map(f64::from_bits),
        Just(f64::NAN),
        Just(-0.0),
        Just(f64::INFINITY),
    ]
}

fn timestamp() -> impl Strategy<Value = i64> {
    prop_oneof![
        1_700_000_000_000_000i64..1_700_000_100_000_000,
        any::<i64>(),
        Just(i64::MIN),
        Just(i64::MAX),
    ]
}

fn reading() -> impl Strategy<Value = Reading> {
    (
        prop::sample::select(vec!["acme", "globex"]),
        prop::sample::select(vec!["press01", "dev-0001", "dev-0002", "ünïcode"]),
        prop::sample::select(vec!["temperature", "humidity", "t"]),
        timestamp(),
        value(),
        prop::collection::btree_map("[a-z]{1,3}", "[a-z0-9]{0,3}", 0..3),
        prop::option::of(any::<u64>()),
    )
        .prop_map(|(tenant, device, metric, ts, value, tags, seq)| Reading {
            tenant: tenant.into(),
            device: device.into(),
            metric: metric.into(),
            ts: Timestamp(ts),
            value,
            tags,
            seq,
        })
}

type Key = (String, String, String, Tags);
type Point = (i64, u64, Option<u64>);

/// Readings per series in their original order; values compared by bits.
fn by_series(readings: &[Reading]) -> BTreeMap<Key, Vec<Point>> {
    let mut m: BTreeMap<Key, Vec<Point>> = BTreeMap::new();
    for r in readings {
        let key = (
            r.tenant.clone(),
            r.device.clone(),
            r.metric.clone(),
            r.tags.clone(),
        );
        m.entry(key)
            .or_default()
            .push((r.ts.0, r.value.to_bits(), r.seq));
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn batches_round_trip_bit_exactly(readings in prop::collection::vec(reading(), 0..300)) {
        let payload = BatchEncoder::default().encode(&readings);
        let decoded = BatchDecoder::default().decode(&payload).expect("own payload decodes");
        prop_assert_eq!(decoded.len(), readings.len());
        prop_assert_eq!(by_series(&decoded), by_series(&readings));
    }

    #[test]
    fn regular_series_round_trip(
        start in timestamp(),
        period in 1i64..10_000_000,
        jitter in prop::collection::vec(-50_000i64..50_000, 1..200),
        base in -1000i64..1000,
    ) {
        // Several metrics sharing timestamps, as a multi-metric message produces.
        let mut readings = Vec::new();
        for (i, j) in jitter.iter().enumerate() {
            let ts = start.wrapping_add(period.wrapping_mul(i as i64)).wrapping_add(*j);
            for (m, scale) in [("temperature", 100.0), ("pressure", 10.0)] {
                let mut r = Reading::new("t", "d", m, Timestamp(ts), (base + i as i64) as f64 / scale);
                r.seq = Some(i as u64);
                readings.push(r);
            }
        }
        let payload = BatchEncoder::default().encode(&readings);
        let decoded = BatchDecoder::default().decode(&payload).expect("decodes");
        prop_assert_eq!(by_series(&decoded), by_series(&readings));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut dec = BatchDecoder::default();
        let _ = dec.decode(&bytes);
        let mut with_version = vec![1u8];
        with_version.extend_from_slice(&bytes);
        let _ = dec.decode(&with_version);
        let _ = frame::decode_frame(&bytes, frame::DEFAULT_MAX_FRAME);
    }

    #[test]
    fn mutated_payloads_never_panic(
        readings in prop::collection::vec(reading(), 1..50),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        // Corrupt the decompressed body too, by recompressing a mutated body: zstd's
        // checksum-free frames pass the mutation straight to the parser.
        let payload = BatchEncoder::default().encode(&readings);
        let mut body = zstd::bulk::decompress(&payload[1..], 1 << 20).expect("own body");
        for (at, b) in &flips {
            let i = at.index(body.len());
            body[i] ^= b;
        }
        let mut mutated = vec![1u8];
        mutated.extend(zstd::bulk::compress(&body, 1).expect("compress"));
        let _ = BatchDecoder::default().decode(&mutated);
        let mut raw = payload.clone();
        for (at, b) in &flips {
            let i = at.index(raw.len());
            raw[i] ^= b;
        }
        let _ = BatchDecoder::default().decode(&raw);
    }

    #[test]
    fn batch_frames_round_trip(seq in any::<u64>(), payload in prop::collection::vec(any::<u8>(), 0..2000), backlog in any::<bool>()) {
        let f = Frame::Batch(Batch {
            seq,
            lane: if backlog { Lane::Backlog } else { Lane::Live },
            readings: payload.len() as u32,
            payload,
        });
        let mut buf = Vec::new();
        frame::encode_frame(&f, &mut buf);
        let (got, used) = frame::decode_frame(&buf, frame::DEFAULT_MAX_FRAME).expect("decodes");
        prop_assert_eq!(used, buf.len());
        prop_assert_eq!(got, f);
    }
}

#[test]
fn limits_are_enforced() {
    let readings: Vec<Reading> = (0..100)
        .map(|i| Reading::new("t", format!("d{i}"), "m", Timestamp(i), 1.0))
        .collect();
    let payload = BatchEncoder::default().encode(&readings);
    let tight = Limits {
        max_readings: 99,
        ..Limits::default()
    };
    let err = BatchDecoder::new(tight).decode(&payload).unwrap_err();
    assert!(
        err.to_string().contains("readings in batch is 100"),
        "{err}"
    );

    let tiny_body = Limits {
        max_body_bytes: 10,
        ..Limits::default()
    };
    let err = BatchDecoder::new(tiny_body).decode(&payload).unwrap_err();
    assert!(err.to_string().contains("decompressed body bytes"), "{err}");

    let mut future = payload.clone();
    future[0] = 2;
    assert!(
        BatchDecoder::default()
            .decode(&future)
            .unwrap_err()
            .to_string()
            .contains("version 2 is not supported")
    );
}

#[test]
fn long_names_cannot_expand_without_bound() {
    // One long device name repeated in many readings: small payload, large output.
    let name = "x".repeat(1000);
    let readings: Vec<Reading> = (0..10_000)
        .map(|i| Reading::new("t", name.clone(), "m", Timestamp(i), 0.0))
        .collect();
    let payload = BatchEncoder::default().encode(&readings);
    assert!(payload.len() < 4096, "payload is {} bytes", payload.len());
    let limits = Limits {
        max_decoded_string_bytes: 1 << 20,
        ..Limits::default()
    };
    let err = BatchDecoder::new(limits).decode(&payload).unwrap_err();
    assert!(err.to_string().contains("decoded string bytes"), "{err}");
}
