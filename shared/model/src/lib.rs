//! The reading model shared by every Plantlink component.
//!
//! A [`Reading`] is one value of one metric of one device at one instant. Its identity,
//! [`ReadingId`], is `(device, metric, ts)`: PostgreSQL stores each identity once, and Kafka
//! records carry it so that consumers can drop replays. A device that numbers its messages
//! also sends `seq`, which travels with the reading but is not part of the key.
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

pub use reading::{Reading, ReadingId, Tags};
pub use time::Timestamp;
