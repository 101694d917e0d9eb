//! edge-agent: the Plantlink gateway program, as a library so that its parts can be tested.
//!
//! # Layout
//! - [`config`]: the TOML configuration and its checks.
//! - [`topic`]: MQTT topic templates, and device ids composed from their captures.
//! - [`payload`]: payload bytes to readings, per firmware shape; rejects with reasons.
//! - [`devicebook`]: each device's type, firmware and schema, as reported to the cloud.
//! - [`ratelimit`]: per-device token buckets (sans-IO).
//! - [`store`]: the SQLite store-and-forward queue, its dedupe and eviction.
//! - [`intake`]: what the sources hand the writer (messages, commands, completions).
//! - [`ingest`]: the writer thread: group commit, then device acknowledgements.
//! - [`mqtt`] and [`coap`]: the sources.
//! - [`telemetry`]: logging and the Prometheus endpoint.
//! - [`status`]: the gateway's status page, `/` beside `/metrics`.
//! - [`uplink`]: the uplink scheduler (sans-IO) and its QUIC driver.
//! - [`sdnotify`]: readiness and watchdog notifications to systemd.
//! - [`agent`]: wires it all together for `edge-agent run`.
//! - [`check`]: what `edge-agent check-config` prints.
#![forbid(unsafe_code)]

pub mod agent;
pub mod check;
pub mod coap;
pub mod config;
pub mod devicebook;
pub mod ingest;
pub mod intake;
pub mod mqtt;
pub mod payload;
pub mod ratelimit;
pub mod schemas;
pub mod sdnotify;
pub mod sparkplug;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod topic;
pub mod uplink;
