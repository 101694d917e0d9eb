//! Batch encoding. See the [module docs](super) for the format.

use std::collections::HashMap;

use plantlink_model::{Reading, Tags};

use super::values::{decimal_exponent, write_decimal, write_xor};
use super::{CODEC_VERSION, DEFAULT_ZSTD_LEVEL};
use crate::varint::{put_i, put_u};

pub(super) const FLAG_TS_SHARED: u8 = 1;
pub(super) const VALUE_DECIMAL: u8 = 0;
pub(super) const VALUE_XOR: u8 = 1;
pub(super) const SEQ_NONE: u8 = 0;
pub(super) const SEQ_ALL: u8 = 1;
pub(super) const SEQ_SOME: u8 = 2;

/// Encodes batches, reusing its zstd context and scratch buffers between calls.
pub struct BatchEncoder {
    zstd: zstd::bulk::Compressor<'static>,
    body: Vec<u8>,
    cols: [Vec<u8>; 4],
}

impl std::fmt::Debug for BatchEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchEncoder").finish_non_exhaustive()
    }
}

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SeriesKey<'a> {
    tenant: &'a str,
    device: &'a str,
    metric: &'a str,
    tags: &'a Tags,
}

impl<'a> SeriesKey<'a> {
    fn of(r: &'a Reading) -> Self {
        Self {
            tenant: &r.tenant,
            device: &r.device,
            metric: &r.metric,
            tags: &r.tags,
        }
    }
}

/// Assigns dictionary indices in order of first use.
#[derive(Default)]
struct Dict<'a> {
    index: HashMap<&'a str, u64>,
    strings: Vec<&'a str>,
}

impl<'a> Dict<'a> {
    fn intern(&mut self, s: &'a str) -> u64 {
        let next = self.strings.len() as u64;
        *self.index.entry(s).or_insert_with(|| {
            self.strings.push(s);
            next
        })
    }
}

impl Default for BatchEncoder {
    fn default() -> Self {
        Self::new(DEFAULT_ZSTD_LEVEL)
    }
}

impl BatchEncoder {
    /// An encoder compressing at the given zstd level (1 to 22; 3 is a good default).
    pub fn new(zstd_level: i32) -> Self {
        Self {
            // Creating a compression context only fails when zstd cannot allocate.
            zstd: zstd::bulk::Compressor::new(zstd_level)
                .unwrap_or_else(|e| panic!("zstd context for level {zstd_level}: {e}")),
            body: Vec::new(),
            cols: Default::default(),
        }
    }

    /// Encodes `readings` into one payload. Any slice is accepted, including an empty one.
    pub fn encode(&mut self, readings: &[Reading]) -> Vec<u8> {
        self.encode_body(readings);
        let mut out = Vec::with_capacity(self.body.len() / 2 + 16);
        out.push(CODEC_VERSION);
        let compressed = self
            .zstd
            .compress(&self.body)
            .unwrap_or_else(|e| panic!("zstd compression of an in-memory buffer failed: {e}"));
        out.extend_from_slice(&compressed);
        out
    }

    /// Builds the uncompressed body in `self.body`.
    fn encode_body(&mut self, readings: &[Reading]) {
        // Group readings into series, keeping each series' order.
        let mut ids: HashMap<SeriesKey<'_>, u32> = HashMap::with_capacity(readings.len() / 4);
        let mut keys: Vec<SeriesKey<'_>> = Vec::new();
        let mut series_of = Vec::with_capacity(readings.len());
        for r in readings {
            let next = keys.len() as u32;
            let id = *ids.entry(SeriesKey::of(r)).or_insert_with(|| {
                keys.push(SeriesKey::of(r));
                next
            });
            series_of.push(id);
        }
        // Counting sort: `members[start[s]..start[s + 1]]` are the readings of series s.
        let mut start = vec![0usize; keys.len() + 1];
        for &s in &series_of {
            start[s as usize + 1] += 1;
        }
        for i in 1..start.len() {
            start[i] += start[i - 1];
        }
        let mut fill = start.clone();
        let mut members = vec![0u32; readings.len()];
        for (i, &s) in series_of.iter().enumerate() {
            members[fill[s as usize]] = i as u32;
            fill[s as usize] += 1;
        }
        let mut order: Vec<u32> = (0..keys.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| keys[a as usize].cmp(&keys[b as usize]));

        let base_ts = readings.iter().map(|r| r.ts.0).min().unwrap_or(0);
        let mut dict = Dict::default();
        let [series_col, ts_col, value_col, seq_col] = &mut self.cols;
        for c in [
            &mut *series_col,
            &mut *ts_col,
            &mut *value_col,
            &mut *seq_col,
        ] {
            c.clear();
        }
        let mut prev_idx = [0i64; 3];
        let mut prev_members: &[u32] = &[];
        for &s in &order {
            let key = &keys[s as usize];
            let m = &members[start[s as usize]..start[s as usize + 1]];
            let rs = || m.iter().map(|&i| &readings[i as usize]);

            for (slot, name) in [key.tenant, key.device, key.metric].into_iter().enumerate() {
                let idx = dict.intern(name) as i64;
                put_i(series_col, idx - prev_idx[slot]);
                prev_idx[slot] = idx;
            }
            put_u(series_col, key.tags.len() as u64);
            for (k, v) in key.tags {
                put_u(series_col, dict.intern(k));
                put_u(series_col, dict.intern(v));
            }
            put_u(series_col, m.len() as u64);

            let mut flags = 0u8;
            let shared = prev_members.len() == m.len()
                && prev_members
                    .iter()
                    .zip(m)
                    .all(|(&a, &b)| readings[a as usize].ts == readings[b as usize].ts);
            if shared {
                flags |= FLAG_TS_SHARED;
            } else {
                write_timestamps(ts_col, base_ts, rs().map(|r| r.ts.0));
            }
            prev_members = m;

            let exponent = decimal_exponent(rs().map(|r| r.value))
                .filter(|&e| write_decimal(value_col, e, rs().map(|r| r.value)).is_some());
            match exponent {
                Some(_) => flags |= VALUE_DECIMAL << 1,
                None => {
                    flags |= VALUE_XOR << 1;
                    write_xor(value_col, rs().map(|r| r.value));
                }
            }

            let with_seq = rs().filter(|r| r.seq.is_some()).count();
            let seq_mode = match with_seq {
                0 => SEQ_NONE,
                n if n == m.len() => SEQ_ALL,
                _ => SEQ_SOME,
            };
            flags |= seq_mode << 3;
            match seq_mode {
                SEQ_ALL => {
                    let mut prev = 0u64;
                    for r in rs() {
                        let seq = r.seq.unwrap_or_default();
                        put_i(seq_col, seq.wrapping_sub(prev) as i64);
                        prev = seq;
                    }
                }
                SEQ_SOME => {
                    for r in rs() {
                        match r.seq {
                            Some(seq) => {
                                seq_col.push(1);
                                put_u(seq_col, seq);
                            }
                            None => seq_col.push(0),
                        }
                    }
                }
                _ => {}
            }

            series_col.push(flags);
            if let Some(e) = exponent {
                series_col.push(e);
            }
        }

        let body = &mut self.body;
        body.clear();
        put_u(body, readings.len() as u64);
        put_u(body, keys.len() as u64);
        put_i(body, base_ts);
        put_u(body, dict.strings.len() as u64);
        for s in &dict.strings {
            put_u(body, s.len() as u64);
            body.extend_from_slice(s.as_bytes());
        }
        for c in &self.cols {
            put_u(body, c.len() as u64);
            body.extend_from_slice(c);
        }
    }
}

/// First timestamp against the batch base, then the first delta, then deltas of deltas.
/// Wrapping arithmetic keeps every `i64` lossless.
fn write_timestamps(out: &mut Vec<u8>, base: i64, ts: impl Iterator<Item = i64>) {
    let (mut prev, mut prev_delta) = (base, 0i64);
    for (i, t) in ts.enumerate() {
        let delta = t.wrapping_sub(prev);
        match i {
            0 | 1 => put_i(out, delta),
            _ => put_i(out, delta.wrapping_sub(prev_delta)),
        }
        if i > 0 {
            prev_delta = delta;
        }
        prev = t;
    }
}

/// Encodes one batch with a fresh encoder at the default level. Prefer a long-lived
/// [`BatchEncoder`] on hot paths.
pub fn encode_batch(readings: &[Reading]) -> Vec<u8> {
    BatchEncoder::default().encode(readings)
}
