//! The uplink to cloud-ingest.
//!
//! - [`schedule`]: the sans-IO scheduler that decides what to send and when to reconnect.
//!
//! The QUIC driver that feeds it (quinn, mutual TLS, one stream per lane) is not built yet;
//! the queue side it needs is in [`crate::store`] (`read_batch`, `ack`, `restart_lanes`).

pub mod schedule;
