//! The uplink to cloud-ingest.
//!
//! - [`schedule`]: the sans-IO scheduler that decides what to send and when to reconnect.
//! - [`driver`]: the QUIC connection that carries out its decisions.
//!
//! The queue side is in [`crate::store`] (`read_batch`, `ack`, `restart_lanes`), reached
//! through the writer thread's [`crate::ingest::UplinkRequest`]s.

pub mod driver;
pub mod schedule;
