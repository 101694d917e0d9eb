//! Batch decoding: check, then parse. See the [module docs](super) for the format.

use plantlink_model::{Reading, Tags, Timestamp};

use super::encode::{FLAG_TS_SHARED, SEQ_ALL, SEQ_NONE, SEQ_SOME, VALUE_DECIMAL, VALUE_XOR};
use super::values::{read_decimal, read_xor};
use super::{CODEC_VERSION, DecodeError, Limits};
use crate::varint::Reader;

/// Decodes batches, reusing its zstd context between calls.
pub struct BatchDecoder {
    zstd: zstd::bulk::Decompressor<'static>,
    limits: Limits,
}

impl std::fmt::Debug for BatchDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchDecoder")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl BatchDecoder {
    /// A decoder that enforces `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            zstd: zstd::bulk::Decompressor::new()
                .unwrap_or_else(|e| panic!("zstd decompression context: {e}")),
            limits,
        }
    }

    /// The limits this decoder enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The limits, to tighten for one batch (e.g. `max_readings` to what its frame says).
    pub fn limits_mut(&mut self) -> &mut Limits {
        &mut self.limits
    }

    /// Decodes one payload into its readings, grouped by series.
    pub fn decode(&mut self, payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        let lim = self.limits;
        let (&version, compressed) = payload.split_first().ok_or(DecodeError::Empty)?;
        if version != CODEC_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                found: version,
                supported: CODEC_VERSION,
            });
        }
        check_size(
            "compressed payload bytes",
            payload.len(),
            lim.max_payload_bytes,
        )?;
        let declared = match zstd::zstd_safe::get_frame_content_size(compressed) {
            Ok(Some(n)) => {
                check_size("decompressed body bytes", n as usize, lim.max_body_bytes)?;
                n as usize
            }
            Ok(None) => {
                return Err(DecodeError::Corrupt(
                    "zstd frame has no content size".into(),
                ));
            }
            Err(e) => return Err(DecodeError::Decompress(e.to_string())),
        };
        // The buffer is as large as the frame says (checked above), not the limit: a small
        // batch must not cost the largest allowed body.
        let body = self
            .zstd
            .decompress(compressed, declared)
            .map_err(|e| DecodeError::Decompress(e.to_string()))?;
        parse_body(&body, &lim)
    }
}

impl Default for BatchDecoder {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

/// The decompressed body size a payload declares (its zstd frame header), without
/// decompressing it; `None` if the payload is too short or the header does not say.
pub fn declared_body_len(payload: &[u8]) -> Option<usize> {
    let compressed = payload.get(1..)?;
    match zstd::zstd_safe::get_frame_content_size(compressed) {
        Ok(Some(n)) => usize::try_from(n).ok(),
        _ => None,
    }
}

/// Decodes one payload with a fresh decoder and the default limits.
pub fn decode_batch(payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
    BatchDecoder::default().decode(payload)
}

fn check_size(what: &'static str, found: usize, limit: usize) -> Result<(), DecodeError> {
    if found > limit {
        return Err(DecodeError::TooLarge {
            what,
            found: found as u64,
            limit: limit as u64,
        });
    }
    Ok(())
}

fn corrupt(msg: impl Into<String>) -> DecodeError {
    DecodeError::Corrupt(msg.into())
}

fn parse_body(body: &[u8], lim: &Limits) -> Result<Vec<Reading>, DecodeError> {
    let mut head = Reader::new(body, "batch header");
    let reading_count = head.len("readings in batch", lim.max_readings)?;
    let series_count = head.len("series in batch", reading_count)?;
    let base_ts = head.i()?;
    let string_count = head.len("dictionary strings", lim.max_strings)?;
    // Each string costs at least its length byte, so the count is bounded by the input.
    let mut dict: Vec<&str> = Vec::with_capacity(string_count.min(head.remaining()));
    for _ in 0..string_count {
        let len = head.len("string length", lim.max_string_len)?;
        let s = std::str::from_utf8(head.bytes(len)?)
            .map_err(|_| corrupt(format!("dictionary string {} is not UTF-8", dict.len())))?;
        dict.push(s);
    }
    let mut column = |what: &'static str| -> Result<Reader<'_>, DecodeError> {
        let len = head.len("column length", body.len())?;
        Ok(Reader::new(head.bytes(len)?, what))
    };
    let mut series = column("series column")?;
    let mut ts_col = column("timestamp column")?;
    let mut values = column("value column")?;
    let mut seqs = column("sequence column")?;
    head.finish()?;

    let lookup = |idx: i64| -> Result<&str, DecodeError> {
        usize::try_from(idx)
            .ok()
            .and_then(|i| dict.get(i).copied())
            .ok_or_else(|| corrupt(format!("dictionary index {idx} out of {}", dict.len())))
    };

    // Every reading costs at least one value byte, so the input bounds the allocation.
    let mut out: Vec<Reading> = Vec::with_capacity(reading_count.min(values.remaining()));
    let mut idx = [0i64; 3];
    let mut ts: Vec<i64> = Vec::new();
    let mut string_bytes = 0usize;
    let mut tag_instances = 0usize;
    for _ in 0..series_count {
        let mut names = [""; 3];
        for (slot, name) in names.iter_mut().enumerate() {
            idx[slot] = idx[slot].wrapping_add(series.i()?);
            *name = lookup(idx[slot])?;
        }
        let [tenant, device, metric] = names;
        let tag_count = series.len("tags on a series", lim.max_tags)?;
        let mut tags = Tags::new();
        let mut tag_bytes = 0;
        for _ in 0..tag_count {
            let k = lookup(series.u()? as i64)?;
            let v = lookup(series.u()? as i64)?;
            tag_bytes += k.len() + v.len();
            if tags.insert(k.to_owned(), v.to_owned()).is_some() {
                return Err(corrupt(format!("tag {k:?} repeats on one series")));
            }
        }
        let n = series.len("points in a series", reading_count - out.len())?;
        if n == 0 {
            return Err(corrupt("a series has no points"));
        }
        string_bytes = string_bytes.saturating_add(
            n.saturating_mul(tenant.len() + device.len() + metric.len() + tag_bytes),
        );
        tag_instances = tag_instances.saturating_add(n.saturating_mul(tag_count));
        check_size("decoded tags", tag_instances, lim.max_decoded_tags)?;
        check_size(
            "decoded string bytes",
            string_bytes,
            lim.max_decoded_string_bytes,
        )?;
        let flags = series.u8()?;
        if flags >> 5 != 0 {
            return Err(corrupt(format!("unknown series flags {flags:#04x}")));
        }

        if flags & FLAG_TS_SHARED != 0 {
            if ts.len() != n {
                return Err(corrupt(
                    "shared timestamps do not match the previous series",
                ));
            }
        } else {
            ts.clear();
            let (mut prev, mut delta) = (base_ts, 0i64);
            for i in 0..n {
                let d = ts_col.i()?;
                match i {
                    0 => prev = prev.wrapping_add(d),
                    1 => {
                        delta = d;
                        prev = prev.wrapping_add(delta);
                    }
                    _ => {
                        delta = delta.wrapping_add(d);
                        prev = prev.wrapping_add(delta);
                    }
                }
                ts.push(prev);
            }
        }

        let first = out.len();
        let mut k = 0;
        let mut push = |value: f64| {
            out.push(Reading {
                tenant: tenant.to_owned(),
                device: device.to_owned(),
                metric: metric.to_owned(),
                ts: Timestamp(ts[k]),
                value,
                tags: tags.clone(),
                seq: None,
            });
            k += 1;
        };
        match (flags >> 1) & 0b11 {
            VALUE_DECIMAL => read_decimal(&mut values, series.u8()?, n, &mut push)?,
            VALUE_XOR => read_xor(&mut values, n, &mut push)?,
            m => return Err(corrupt(format!("unknown value mode {m}"))),
        }
        let added = &mut out[first..];
        match (flags >> 3) & 0b11 {
            SEQ_NONE => {}
            SEQ_ALL => {
                let mut seq = 0u64;
                for r in added.iter_mut() {
                    seq = seq.wrapping_add(seqs.i()? as u64);
                    r.seq = Some(seq);
                }
            }
            SEQ_SOME => {
                for r in added.iter_mut() {
                    r.seq = match seqs.u8()? {
                        0 => None,
                        1 => Some(seqs.u()?),
                        b => return Err(corrupt(format!("sequence presence byte {b}"))),
                    };
                }
            }
            m => return Err(corrupt(format!("unknown sequence mode {m}"))),
        }
    }
    if out.len() != reading_count {
        return Err(corrupt(format!(
            "header says {reading_count} readings, series hold {}",
            out.len()
        )));
    }
    for col in [&series, &ts_col, &values, &seqs] {
        col.finish()?;
    }
    Ok(out)
}
