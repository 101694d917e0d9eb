//! Stream alerting: rules over event-time windows, evaluated as readings arrive.
//!
//! - [`rule`]: the rule contract of `/v1/alert-rules` and its checks.
//! - [`engine`]: the sans-IO evaluator (watermarks, lateness, backfill, lifecycle).
//! - [`service`]: runs the engine for the single-node mode.
//! - [`deliver`]: delivers transitions, once each by their id (Kafka, table, webhooks).
//!
//! Tenants are kept apart: each has its own caps on rules, devices and series (the engine),
//! and its own queue of readings waiting for the engine, bounded in readings and served in
//! turn (the service). What a cap or a full queue keeps out is counted per tenant and
//! warned about; ingest never waits on alerting (readings are stored whatever alerting makes
//! of them).

pub mod deliver;
pub mod engine;
pub mod rule;
pub mod service;
