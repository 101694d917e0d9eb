//! firmware-sim: sensor fleets for demos and load tests, and the codec benchmark.
//!
//! # Layout
//! - [`rng`]: a small seeded generator, so a seed means the same data on every build.
//! - [`refdata`]: the reference dataset that every bytes-per-reading figure is measured on.
//! - [`bench_codec`]: `firmware-sim bench-codec`, the batch codec against zstd over JSON lines.
//! - [`publish`]: `firmware-sim publish`, stdin lines to MQTT, waiting for every ack.
//! - [`fleet`]: device types, their firmware's payload shapes, and plant-like signals.
//! - [`run`]: `firmware-sim run`, a fleet over MQTT and/or CoAP with faults, a ledger and
//!   a report.
//! - [`sparkplug`]: Sparkplug B edge nodes (births, alias-only data, deaths, rebirths).
//! - [`coap`]: CoAP requests (CON with retransmission, or NON) for `run`.
//! - [`ledger`]: what the broker acknowledged, by reading identity (SQLite).
//! - [`verify`]: `firmware-sim verify`, the ledger against PostgreSQL and Kafka.
#![forbid(unsafe_code)]

pub mod bench_codec;
pub mod coap;
pub mod fleet;
pub mod ledger;
pub mod protobuf;
pub mod publish;
pub mod refdata;
pub mod rng;
pub mod run;
pub mod sparkplug;
pub mod verify;
