//! `firmware-sim bench-codec`: bytes per reading and speed of the batch codec on the
//! reference dataset, against zstd level 3 over the same readings as JSON lines.
//!
//! The dataset is cut into consecutive batches in arrival order, as the agent's queue
//! hands them out. Plantlink's figure counts whole wire frames (length prefix, version,
//! postcard header and payload); the peer's counts its compressed bytes only.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use plantlink_model::Reading;
use plantlink_wire::frame::{self, Batch, Frame, Lane};
use plantlink_wire::{BatchDecoder, BatchEncoder};
use serde::Serialize;

/// What was measured for one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct BatchFigures {
    /// Readings per batch.
    pub batch: usize,
    /// Batches the dataset was cut into.
    pub batches: usize,
    /// Wire bytes per reading, frame headers included.
    pub bytes_per_reading: f64,
    /// zstd -3 over JSON lines, per reading, same batches.
    pub peer_bytes_per_reading: f64,
    /// `bytes_per_reading / peer_bytes_per_reading`.
    pub ratio_to_peer: f64,
    /// Median encode rate (payload and frame), one core.
    pub encode_readings_per_sec: f64,
    /// Median decode rate (frame and payload), one core.
    pub decode_readings_per_sec: f64,
}

/// Measures one batch size. `rounds` timed passes over the dataset; the median counts.
pub fn measure(readings: &[Reading], batch: usize, rounds: usize) -> anyhow::Result<BatchFigures> {
    ensure!(batch > 0, "--batch must be at least 1");
    let chunks: Vec<&[Reading]> = readings.chunks(batch).collect();
    let mut enc = BatchEncoder::default();
    let mut dec = BatchDecoder::default();

    let encode_all = |enc: &mut BatchEncoder| -> Vec<Vec<u8>> {
        chunks
            .iter()
            .enumerate()
            .map(|(seq, chunk)| {
                let f = Frame::Batch(Batch {
                    seq: seq as u64,
                    lane: Lane::Live,
                    readings: chunk.len() as u32,
                    payload: enc.encode(chunk),
                });
                let mut buf = Vec::new();
                frame::encode_frame(&f, &mut buf);
                buf
            })
            .collect()
    };

    let frames = encode_all(&mut enc);
    let wire_bytes: usize = frames.iter().map(Vec::len).sum();

    // Check losslessness once before timing anything.
    for (f, chunk) in frames.iter().zip(&chunks) {
        let got = decode_frame_batch(&mut dec, f)?;
        ensure!(
            got.len() == chunk.len(),
            "decoded {} of {} readings",
            got.len(),
            chunk.len()
        );
        let mut want: Vec<_> = chunk.iter().map(key).collect();
        let mut have: Vec<_> = got.iter().map(key).collect();
        want.sort();
        have.sort();
        ensure!(want == have, "a batch did not round-trip exactly");
    }

    let mut enc_times = Vec::new();
    let mut dec_times = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let again = encode_all(&mut enc);
        enc_times.push(t.elapsed());
        std::hint::black_box(again);
        let t = Instant::now();
        for f in &frames {
            std::hint::black_box(decode_frame_batch(&mut dec, f)?);
        }
        dec_times.push(t.elapsed());
    }

    let mut peer_bytes = 0usize;
    let mut lines = Vec::new();
    for chunk in &chunks {
        lines.clear();
        for r in *chunk {
            serde_json::to_writer(&mut lines, r)?;
            lines.push(b'\n');
        }
        peer_bytes += zstd::bulk::compress(&lines, 3)?.len();
    }

    let n = readings.len() as f64;
    let bytes_per_reading = wire_bytes as f64 / n;
    let peer_bytes_per_reading = peer_bytes as f64 / n;
    Ok(BatchFigures {
        batch,
        batches: chunks.len(),
        bytes_per_reading,
        peer_bytes_per_reading,
        ratio_to_peer: bytes_per_reading / peer_bytes_per_reading,
        encode_readings_per_sec: n / median(&mut enc_times).as_secs_f64(),
        decode_readings_per_sec: n / median(&mut dec_times).as_secs_f64(),
    })
}

fn decode_frame_batch(dec: &mut BatchDecoder, buf: &[u8]) -> anyhow::Result<Vec<Reading>> {
    let (f, _) = frame::decode_frame(buf, frame::DEFAULT_MAX_FRAME)?;
    let Frame::Batch(b) = f else {
        anyhow::bail!("expected a batch frame");
    };
    dec.decode(&b.payload).context("decoding a batch payload")
}

type Key = (String, String, i64, u64);

fn key(r: &Reading) -> Key {
    (
        r.device.clone(),
        r.metric.clone(),
        r.ts.0,
        r.value.to_bits(),
    )
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refdata::{RefSpec, generate};

    #[test]
    fn codec_beats_the_json_peer_on_a_small_plant() {
        let readings = generate(&RefSpec {
            devices: 50,
            seconds: 60,
            seed: 9,
        });
        // `measure` itself fails unless every batch round-trips exactly.
        let f = measure(&readings, 2_000, 1).unwrap();
        assert_eq!(f.batches, readings.len().div_ceil(2_000));
        assert!(
            f.bytes_per_reading < 0.5 * f.peer_bytes_per_reading,
            "{f:?}"
        );
        assert!(f.encode_readings_per_sec > 0.0 && f.decode_readings_per_sec > 0.0);
    }
}
