//! Query parameters: what each endpoint accepts, as a typed struct parsed from the query
//! string.
//!
//! A bad value is a 400 whose message starts `parameter <name>:` and says what is expected;
//! a parameter the endpoint does not know is one too, so a misspelt one is not silently
//! ignored. Parsing reads no clock: the handler passes `now_us` in.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::ApiError;
use crate::alerting::engine::AlertState;
use crate::postgres::queries::{Agg, Rollup};

#[cfg(test)]
mod tests;

/// A query string as axum's `Query` extracts it.
pub(super) type QueryMap = HashMap<String, String>;

/// Most points one series request returns; more sets `truncated`.
const MAX_POINTS: i64 = 100_000;
/// Most alerts one request returns.
const MAX_ALERTS: i64 = 10_000;
const HOUR_US: i64 = 3_600_000_000;
pub(super) const DAY_US: i64 = 24 * HOUR_US;
/// The earliest window end `/v1/alerts` reads (in 1934): before any alert, and well inside
/// what a PostgreSQL timestamp holds.
const EARLIEST_ALERT_US: i64 = -(1 << 50);

fn bad(param: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, format!("parameter {param}: {why}"))
}

/// The clock, read once per request by its handler.
pub(super) fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A time parameter: RFC 3339, or integer milliseconds since the epoch; in µs.
fn time(param: &str, v: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = v.parse::<i64>() {
        return ms
            .checked_mul(1000)
            .ok_or_else(|| bad(param, format!("{v} is out of range")));
    }
    let t = OffsetDateTime::parse(v, &Rfc3339).map_err(|_| {
        bad(
            param,
            format!(
                "{v:?} is not a time; give RFC 3339 (2026-11-21T08:00:00Z) or epoch milliseconds"
            ),
        )
    })?;
    i64::try_from(t.unix_timestamp_nanos() / 1000).map_err(|_| bad(param, "out of range"))
}

/// The optional time parameter `param`.
fn time_of(q: &QueryMap, param: &str) -> Result<Option<i64>, ApiError> {
    q.get(param).map(|v| time(param, v)).transpose()
}

/// Refuses a parameter not in `names`; of several, the first in sort order is named.
fn known(q: &QueryMap, names: &[&str]) -> Result<(), ApiError> {
    match q.keys().filter(|k| !names.contains(&k.as_str())).min() {
        Some(k) => Err(bad(
            k,
            format!("unknown; expected one of {}", names.join(", ")),
        )),
        None => Ok(()),
    }
}

/// `limit`: a number from 1 to `max`, `default` when absent.
fn limit(q: &QueryMap, default: i64, max: i64) -> Result<i64, ApiError> {
    match q.get("limit") {
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| bad("limit", format!("{v:?} is not a number from 1 to {max}"))),
        None => Ok(default),
    }
}

/// A non-empty parameter, or `None`.
fn non_empty<'q>(q: &'q QueryMap, param: &str) -> Option<&'q str> {
    q.get(param).map(String::as_str).filter(|v| !v.is_empty())
}

/// The time range of a request, in µs: `from` inclusive, `to` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Range {
    pub(super) from_us: i64,
    pub(super) to_us: i64,
}

impl Range {
    /// `from` and `to`: `to` defaults to now, `from` to an hour before `to`, and `from`
    /// must come first.
    fn parse(q: &QueryMap, now_us: i64) -> Result<Self, ApiError> {
        let to_us = time_of(q, "to")?.unwrap_or(now_us);
        let from_us = time_of(q, "from")?.unwrap_or(to_us.saturating_sub(HOUR_US));
        if from_us >= to_us {
            return Err(bad("from", "must be before to"));
        }
        Ok(Self { from_us, to_us })
    }

    /// Its length in µs (saturating).
    fn span_us(self) -> i64 {
        self.to_us.saturating_sub(self.from_us)
    }
}

/// Which table answers a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resolution {
    Raw,
    Hour,
    Day,
}

impl Resolution {
    /// The name the API uses.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Hour => "1h",
            Self::Day => "1d",
        }
    }

    /// The rollup that answers, or `None` for raw readings.
    pub(super) fn rollup(self) -> Option<Rollup> {
        match self {
            Self::Raw => None,
            Self::Hour => Some(Rollup::Hour),
            Self::Day => Some(Rollup::Day),
        }
    }

    /// `auto`: raw up to 2 days (or up to `max_raw_us`, if that is shorter), 1h up to 90
    /// days, 1d beyond.
    fn auto(range: Range, max_raw_us: i64) -> Self {
        let span = range.span_us();
        if span <= max_raw_us.min(2 * DAY_US) {
            Self::Raw
        } else if span <= 90 * DAY_US {
            Self::Hour
        } else {
            Self::Day
        }
    }

    /// `resolution`: raw, 1h, 1d, or auto (the default). Raw readings are read over
    /// `max_raw_us` at most (`[api] max_raw_range_days`); a longer raw range is refused
    /// before any query, and `auto` never asks for one.
    fn parse(q: &QueryMap, range: Range, max_raw_us: i64) -> Result<Self, ApiError> {
        let r = match q.get("resolution").map(String::as_str).unwrap_or("auto") {
            "raw" => Self::Raw,
            "1h" => Self::Hour,
            "1d" => Self::Day,
            "auto" => Self::auto(range, max_raw_us),
            other => {
                return Err(bad(
                    "resolution",
                    format!("{other:?} is not one of raw, 1h, 1d, auto"),
                ));
            }
        };
        if r == Self::Raw && range.span_us() > max_raw_us {
            let days = |us: i64| us.div_euclid(DAY_US) + i64::from(us.rem_euclid(DAY_US) > 0);
            return Err(bad(
                "resolution",
                format!(
                    "raw readings are read over at most {} days ([api] max_raw_range_days) and \
                     this range is {} days; use resolution=1h, 1d or auto, or a shorter range \
                     (from, to)",
                    days(max_raw_us),
                    days(range.span_us())
                ),
            ));
        }
        Ok(r)
    }
}

/// `GET /v1/devices`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct DeviceListParams {
    /// Devices at most (1,000 unless given).
    pub(super) limit: i64,
}

impl DeviceListParams {
    pub(super) fn parse(q: &QueryMap) -> Result<Self, ApiError> {
        known(q, &["limit"])?;
        Ok(Self {
            limit: limit(q, 1_000, 10_000)?,
        })
    }
}

/// `GET /v1/devices/{id}/metrics`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct SeriesParams {
    /// One metric, or all of the device's.
    pub(super) metric: Option<String>,
    pub(super) range: Range,
    pub(super) resolution: Resolution,
    /// Points at most (10,000 unless given).
    pub(super) limit: i64,
}

impl SeriesParams {
    /// `max_raw_us`: the longest raw range (see [`Resolution::parse`]).
    pub(super) fn parse(q: &QueryMap, now_us: i64, max_raw_us: i64) -> Result<Self, ApiError> {
        known(q, &["metric", "from", "to", "resolution", "limit"])?;
        let range = Range::parse(q, now_us)?;
        Ok(Self {
            resolution: Resolution::parse(q, range, max_raw_us)?,
            limit: limit(q, 10_000, MAX_POINTS)?,
            metric: non_empty(q, "metric").map(str::to_owned),
            range,
        })
    }
}

/// `GET /v1/tenants/{id}/metrics/aggregate`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct AggregateParams {
    pub(super) metric: String,
    /// avg unless given.
    pub(super) agg: Agg,
    pub(super) range: Range,
    pub(super) resolution: Resolution,
}

impl AggregateParams {
    /// `max_raw_us`: the longest raw range (see [`Resolution::parse`]).
    pub(super) fn parse(q: &QueryMap, now_us: i64, max_raw_us: i64) -> Result<Self, ApiError> {
        known(q, &["metric", "from", "to", "agg", "resolution"])?;
        let metric = non_empty(q, "metric")
            .ok_or_else(|| bad("metric", "required, e.g. metric=temperature"))?
            .to_owned();
        let range = Range::parse(q, now_us)?;
        let resolution = Resolution::parse(q, range, max_raw_us)?;
        let agg = match q.get("agg") {
            None => Agg::Avg,
            Some(v) => Agg::ALL
                .into_iter()
                .find(|a| a.name() == v)
                .ok_or_else(|| bad("agg", format!("{v:?} is not one of avg, min, max, count")))?,
        };
        Ok(Self {
            metric,
            agg,
            range,
            resolution,
        })
    }
}

/// `GET /v1/alerts`: filters on state, backfill and window end.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct AlertParams {
    /// Either state when absent.
    pub(super) state: Option<AlertState>,
    /// Both kinds when absent.
    pub(super) backfill: Option<bool>,
    /// From the earliest alert unless given.
    pub(super) from_us: i64,
    /// To a day from now unless given.
    pub(super) to_us: i64,
    /// Alerts at most (1,000 unless given).
    pub(super) limit: i64,
}

impl AlertParams {
    pub(super) fn parse(q: &QueryMap, now_us: i64) -> Result<Self, ApiError> {
        known(q, &["state", "from", "to", "limit", "backfill"])?;
        let state = match non_empty(q, "state") {
            None => None,
            Some("firing") => Some(AlertState::Firing),
            Some("resolved") => Some(AlertState::Resolved),
            Some(other) => {
                return Err(bad(
                    "state",
                    format!("{other:?} is not one of firing, resolved"),
                ));
            }
        };
        let backfill = match non_empty(q, "backfill") {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(other) => return Err(bad("backfill", format!("{other:?} is not true or false"))),
        };
        let to_us = time_of(q, "to")?.unwrap_or(now_us + DAY_US);
        let from_us = time_of(q, "from")?.map_or(EARLIEST_ALERT_US, |f| f.max(EARLIEST_ALERT_US));
        Ok(Self {
            state,
            backfill,
            from_us,
            to_us,
            limit: limit(q, 1_000, MAX_ALERTS)?,
        })
    }
}
