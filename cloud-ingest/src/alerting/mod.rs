//! Stream alerting: rules over event-time windows, evaluated as readings arrive.
//!
//! - [`rule`]: the rule contract of `/v1/alert-rules` and its checks.
//! - [`engine`]: the sans-IO evaluator (watermarks, lateness, backfill, lifecycle).
//! - [`service`]: runs the engine and delivers alerts (table, Kafka, webhooks).

pub mod engine;
pub mod rule;
pub mod service;
