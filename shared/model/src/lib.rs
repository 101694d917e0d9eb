//! The reading model shared by every Plantlink component.
//!
//! A [`Reading`] is one value of one metric of one device at one instant. Its identity,
//! [`ReadingId`], is `(tenant, device, metric, ts)`: PostgreSQL stores each identity once,
//! and Kafka records carry it so that consumers can drop replays. The same identity with the
//! same value and tags is a replay; with another value or other tags it is a conflict, which
//! is reported and never silently dropped (the first value stored stays). A device that
//! numbers its messages also sends `seq`, which travels with the reading but takes no part.
//!
//! Timestamps are microseconds since the Unix epoch (UTC), see [`Timestamp`]. Devices that
//! stamp in seconds or milliseconds are scaled up on decode; readings stamped by the gateway
//! use the full microsecond resolution so that two quick readings never share an identity.
//!
//! # Layout
//! - [`reading`]: [`Reading`], [`Tags`] and [`ReadingId`].
//! - [`time`]: [`Timestamp`] and its conversions.
#![forbid(unsafe_code)]

pub mod reading;
pub mod time;

pub use reading::{Reading, ReadingId, Tags, value_key};
pub use time::Timestamp;
