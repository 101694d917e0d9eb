//! The wire between the Plantlink edge agent and cloud-ingest, without any I/O.
//!
//! Nothing here touches a socket, a file or a clock: callers hand in bytes and get values
//! (or typed errors) back, so both ends, the fuzzers and the benchmarks share one codec.
//!
//! # Layout
//! - [`batch`]: the columnar, lossless batch codec for readings (series grouped by
//!   device and metric, delta-of-delta timestamps, decimal-scaled or XOR values, zstd).
//! - [`frame`]: the versioned, length-prefixed postcard frames that travel on QUIC streams
//!   (hello, welcome, batch, ack, error).
//! - `varint` (private): LEB128 and zigzag integers, and a bounds-checked reader.
//!
//! # Safety of decoding
//! Every decoder checks before it parses: an input that is too short yields
//! [`frame::FrameError::Incomplete`] or a typed corruption error, and every size that
//! drives an allocation (decompressed bytes, readings, strings, tags, decoded bytes) is
//! capped by [`batch::Limits`] or the frame length limit. Arbitrary bytes never panic.
#![forbid(unsafe_code)]

pub mod batch;
pub mod frame;
mod varint;

pub use batch::{BatchDecoder, BatchEncoder, DecodeError, Limits};
pub use frame::{Frame, FrameError};
