//! The columnar batch codec: many readings in, one compact, lossless payload out.
//!
//! # Payload format (version 1)
//! A payload is one version byte followed by one zstd frame (with its content size). The
//! decompressed body is, with `u` an unsigned LEB128 varint and `i` a zigzag varint:
//!
//! ```text
//! u reading_count   u series_count   i base_ts (smallest timestamp, µs)
//! u string_count    { u len, UTF-8 bytes } * string_count     -- the dictionary
//! u len, series column      -- per series: dictionary indices and flags
//! u len, timestamp column   -- per series: ts0 - base_ts, first delta, deltas-of-deltas
//! u len, value column       -- per series: decimal-scaled integers or XOR-coded f64 bits
//! u len, sequence column    -- per series: device sequence numbers, if any
//! ```
//!
//! A series is the readings of one `(tenant, device, metric, tags)` in the order they
//! were given. Series are written sorted by that key, so neighbouring series usually share
//! a device: the series column stores dictionary indices as deltas against the previous
//! series, and a series whose timestamps equal the previous one's (the metrics of one
//! multi-metric message) sets a flag instead of repeating them.
//!
//! Series column, per series: `i Δtenant, i Δdevice, i Δmetric, u tag_count,
//! {u key, u value} * tag_count, u points, flags` and, for decimal values, one exponent
//! byte. `flags` bit 0: timestamps equal the previous series'; bits 1-2: value mode
//! (0 decimal, 1 XOR); bits 3-4: sequence mode (0 none, 1 all present, 2 some present).
//!
//! Values: a series is decimal when every value `v` equals `x / 10^e` exactly, bit for
//! bit, for integers `x` with `|x| <= 2^53` and one exponent `e <= 15`; it stores `x0`
//! and then deltas. Anything else (NaN, ±inf, -0.0, values needing more digits) uses XOR
//! coding: the first value's 8 bytes, then per value a control byte `lead << 4 | trail`
//! (zero bytes at each end of `prev ^ v`) and the bytes between, or `0xff` when equal.
//!
//! Decoding returns every reading with bit-identical values and exact timestamps,
//! grouped by series, each series in its original order.

mod decode;
mod encode;
mod values;

pub use decode::{BatchDecoder, declared_body_len, decode_batch};
pub use encode::{BatchEncoder, encode_batch};

/// The payload format version written by this build, as the payload's first byte.
pub const CODEC_VERSION: u8 = 1;

/// The zstd level used unless the caller picks another.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Caps on everything a payload can make the decoder allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest compressed payload accepted.
    pub max_payload_bytes: usize,
    /// Largest decompressed body accepted.
    pub max_body_bytes: usize,
    /// Most readings in one batch.
    pub max_readings: usize,
    /// Most dictionary strings in one batch.
    pub max_strings: usize,
    /// Longest string (device id, metric, tag key or value), in bytes.
    pub max_string_len: usize,
    /// Most tags on one series.
    pub max_tags: usize,
    /// Most bytes of strings the decoded readings may hold in total, so that a small
    /// payload cannot expand into gigabytes of repeated long names.
    pub max_decoded_string_bytes: usize,
    /// Most tags the decoded readings may hold in total (points x tags of their series):
    /// each is a map entry of its own once decoded, however short.
    pub max_decoded_tags: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 8 << 20,
            max_body_bytes: 32 << 20,
            max_readings: 100_000,
            max_strings: 200_000,
            max_string_len: 1024,
            max_tags: 32,
            max_decoded_string_bytes: 64 << 20,
            max_decoded_tags: 500_000,
        }
    }
}

/// Why a payload was refused. Every variant names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload had no bytes at all.
    #[error("batch payload is empty")]
    Empty,
    /// The payload was written by a newer or unknown codec.
    #[error(
        "batch codec version {found} is not supported (this build reads version {supported}); \
         upgrade cloud-ingest or downgrade the agent"
    )]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
        /// The version this build reads.
        supported: u8,
    },
    /// A size or count was over its limit.
    #[error("{what} is {found}, over the limit of {limit}")]
    TooLarge {
        /// What was counted.
        what: &'static str,
        /// The value found.
        found: u64,
        /// The limit in force.
        limit: u64,
    },
    /// The zstd frame did not decompress.
    #[error("batch does not decompress: {0}")]
    Decompress(String),
    /// The body broke the format.
    #[error("batch is corrupt: {0}")]
    Corrupt(String),
}
