//! cloud-ingest: the Plantlink cloud service, as a library so that its parts can be tested.
//!
//! # Layout
//! - [`alerting`]: alert rules and the stream evaluator.
//! - [`api`]: the query API (axum): device series, latest values, fleet aggregates, lag.
//! - [`config`]: the TOML configuration.
//! - [`kafka`]: the Kafka sink: reading records, dead letters, alerts.
//! - [`pki`]: the fleet CA, server and gateway certificates, and reading a gateway's identity
//!   from its certificate.
//! - [`postgres`]: the schema (TimescaleDB or plain partitions), the idempotent batch
//!   writer, and upkeep (partitions, rollups, retention).
//! - [`quic`]: mutual TLS for the QUIC listener, revocation, and admitting a connection.
//! - [`server`]: `cloud-ingest run`: batches from admitted gateways into the sink.
//! - [`sink`]: the bounded write pipeline: merged batches, parallel writers, acks after
//!   commit.
//! - [`status`]: each gateway's uplink as this replica sees it.
//! - [`telemetry`]: the Prometheus endpoint and the metrics it serves.
#![forbid(unsafe_code)]

pub mod alerting;
pub mod api;
pub mod backbone;
pub mod config;
pub mod kafka;
pub mod memory;
pub mod pki;
pub mod postgres;
pub mod quic;
pub mod registry;
pub mod server;
pub mod sink;
pub mod status;
pub mod telemetry;
