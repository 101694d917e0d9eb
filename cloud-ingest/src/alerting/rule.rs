//! Alert rules: the JSON contract of `/v1/alert-rules`, and its checks.
//!
//! ```json
//! {"name": "press overheating", "metric": "temperature", "selector": {"device_id": "press01"},
//!  "aggregate": "avg", "op": ">", "threshold": 80.0, "window": {"kind": "tumbling", "seconds": 10},
//!  "for_windows": 1, "severity": "critical"}
//! {"name": "silent sensor", "kind": "absence", "selector": {"device_type": "th-100"},
//!  "seconds": 60, "severity": "warning"}
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Which devices a rule watches; every field given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// One device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Devices whose readings carry the tag `device_type` with this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    /// Tags that must all be equal.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

impl Selector {
    /// Whether a reading of `device` with `tags` is selected.
    pub fn matches(&self, device: &str, tags: &BTreeMap<String, String>) -> bool {
        self.device_id.as_deref().is_none_or(|d| d == device)
            && self
                .device_type
                .as_deref()
                .is_none_or(|t| tags.get("device_type").map(String::as_str) == Some(t))
            && self.tags.iter().all(|(k, v)| tags.get(k) == Some(v))
    }
}

/// The aggregate over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// Mean.
    Avg,
    /// Smallest.
    Min,
    /// Largest.
    Max,
    /// How many readings.
    Count,
    /// The latest by event time.
    Last,
    /// Change per second between the window's first and last reading.
    Rate,
}

/// The comparison with the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `>`
    #[serde(rename = ">")]
    Gt,
    /// `>=`
    #[serde(rename = ">=")]
    Ge,
    /// `<`
    #[serde(rename = "<")]
    Lt,
    /// `<=`
    #[serde(rename = "<=")]
    Le,
    /// `==`
    #[serde(rename = "==")]
    Eq,
    /// `!=`
    #[serde(rename = "!=")]
    Ne,
}

impl Op {
    /// `value op threshold`.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Self::Gt => value > threshold,
            Self::Ge => value >= threshold,
            Self::Lt => value < threshold,
            Self::Le => value <= threshold,
            Self::Eq => value == threshold,
            Self::Ne => value != threshold,
        }
    }
}

/// An event-time window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Window {
    /// Back-to-back windows of `seconds`.
    Tumbling {
        /// Length.
        seconds: u32,
    },
    /// Windows of `seconds` starting every `every` seconds.
    Sliding {
        /// Length.
        seconds: u32,
        /// Step.
        every: u32,
    },
}

impl Window {
    /// (length, step) in µs.
    pub fn span_step_us(self) -> (i64, i64) {
        match self {
            Self::Tumbling { seconds } => (
                i64::from(seconds) * 1_000_000,
                i64::from(seconds) * 1_000_000,
            ),
            Self::Sliding { seconds, every } => {
                (i64::from(seconds) * 1_000_000, i64::from(every) * 1_000_000)
            }
        }
    }
}

/// What a rule watches for.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// An aggregate of a metric over a window compared with a threshold.
    Threshold {
        /// The metric.
        metric: String,
        /// The aggregate.
        aggregate: Aggregate,
        /// The comparison.
        op: Op,
        /// The threshold.
        threshold: f64,
        /// The window.
        window: Window,
        /// Consecutive windows the condition must hold for.
        for_windows: u32,
    },
    /// Nothing from a selected device for `seconds`.
    Absence {
        /// Silence that fires it.
        seconds: u32,
    },
}

/// A rule as the engine uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// `alert_rules.rule_id`.
    pub id: i64,
    /// Owner.
    pub tenant: String,
    /// Which devices.
    pub selector: Selector,
    /// What to watch for.
    pub condition: Condition,
    /// e.g. `critical`, `warning`.
    pub severity: String,
}

/// The body of `POST /v1/alert-rules` and `PUT /v1/alert-rules/{id}`, and what `GET` returns
/// (with `id`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleBody {
    /// Set by the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// A name for people.
    pub name: String,
    /// `threshold` (the default) or `absence`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Threshold rules: the metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// Which devices; all of the tenant's when absent.
    #[serde(default)]
    pub selector: Selector,
    /// Threshold rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<Aggregate>,
    /// Threshold rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<Op>,
    /// Threshold rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Threshold rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    /// Threshold rules: consecutive windows (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_windows: Option<u32>,
    /// Absence rules: seconds of silence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<u32>,
    /// e.g. `critical`, `warning`, `info`.
    pub severity: String,
    /// For people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A rule that cannot be used: the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field {field}: {why}")]
pub struct RuleError {
    /// The JSON field.
    pub field: &'static str,
    /// What is wrong, and what is expected.
    pub why: String,
}

fn err(field: &'static str, why: impl Into<String>) -> RuleError {
    RuleError {
        field,
        why: why.into(),
    }
}

/// The longest window or silence a rule may have: a day.
pub const MAX_SECONDS: u32 = 86_400;

impl RuleBody {
    /// Checks the body and turns it into a rule of `tenant` with `id`.
    pub fn to_rule(&self, id: i64, tenant: &str) -> Result<Rule, RuleError> {
        if self.name.trim().is_empty() {
            return Err(err("name", "must not be empty"));
        }
        if !["critical", "warning", "info"].contains(&self.severity.as_str()) {
            return Err(err(
                "severity",
                format!("{:?} is not one of critical, warning, info", self.severity),
            ));
        }
        let condition = match self.kind.as_deref().unwrap_or("threshold") {
            "absence" => {
                for (field, present) in [
                    ("metric", self.metric.is_some()),
                    ("aggregate", self.aggregate.is_some()),
                    ("op", self.op.is_some()),
                    ("threshold", self.threshold.is_some()),
                    ("window", self.window.is_some()),
                    ("for_windows", self.for_windows.is_some()),
                ] {
                    if present {
                        return Err(err(field, "does not apply to an absence rule"));
                    }
                }
                let seconds = self
                    .seconds
                    .ok_or_else(|| err("seconds", "required for an absence rule"))?;
                if !(1..=MAX_SECONDS).contains(&seconds) {
                    return Err(err(
                        "seconds",
                        format!("{seconds} is not from 1 to {MAX_SECONDS}"),
                    ));
                }
                Condition::Absence { seconds }
            }
            "threshold" => {
                if self.seconds.is_some() {
                    return Err(err(
                        "seconds",
                        "only for absence rules; give window.seconds",
                    ));
                }
                let metric = self
                    .metric
                    .clone()
                    .filter(|m| !m.is_empty())
                    .ok_or_else(|| err("metric", "required"))?;
                let aggregate = self.aggregate.ok_or_else(|| {
                    err(
                        "aggregate",
                        "required: one of avg, min, max, count, last, rate",
                    )
                })?;
                let op = self
                    .op
                    .ok_or_else(|| err("op", "required: one of > >= < <= == !="))?;
                let threshold = self.threshold.ok_or_else(|| err("threshold", "required"))?;
                if !threshold.is_finite() {
                    return Err(err("threshold", "must be a finite number"));
                }
                let window = self.window.ok_or_else(|| {
                    err(
                        "window",
                        "required, e.g. {\"kind\": \"tumbling\", \"seconds\": 10}",
                    )
                })?;
                match window {
                    Window::Tumbling { seconds } if !(1..=MAX_SECONDS).contains(&seconds) => {
                        return Err(err(
                            "window.seconds",
                            format!("{seconds} is not from 1 to {MAX_SECONDS}"),
                        ));
                    }
                    Window::Sliding { seconds, every }
                        if !(1..=MAX_SECONDS).contains(&seconds)
                            || every == 0
                            || every > seconds
                            || seconds / every > 60 =>
                    {
                        return Err(err(
                            "window",
                            format!(
                                "sliding window of {seconds} s every {every} s: give 1 <= every <= seconds <= {MAX_SECONDS}, \
                                 with at most 60 windows overlapping"
                            ),
                        ));
                    }
                    _ => {}
                }
                let for_windows = self.for_windows.unwrap_or(1);
                if !(1..=1000).contains(&for_windows) {
                    return Err(err(
                        "for_windows",
                        format!("{for_windows} is not from 1 to 1000"),
                    ));
                }
                Condition::Threshold {
                    metric,
                    aggregate,
                    op,
                    threshold,
                    window,
                    for_windows,
                }
            }
            other => {
                return Err(err(
                    "kind",
                    format!("{other:?} is not one of threshold, absence"),
                ));
            }
        };
        Ok(Rule {
            id,
            tenant: tenant.to_owned(),
            selector: self.selector.clone(),
            condition,
            severity: self.severity.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Rule, RuleError> {
        let body: RuleBody = serde_json::from_str(json).map_err(|e| err("body", e.to_string()))?;
        body.to_rule(1, "acme")
    }

    #[test]
    fn the_documented_examples_are_rules() {
        let r = parse(
            r#"{"name": "press overheating", "metric": "temperature", "selector": {"device_id": "press01"},
                "aggregate": "avg", "op": ">", "threshold": 80.0, "window": {"kind": "tumbling", "seconds": 10},
                "for_windows": 1, "severity": "critical"}"#,
        )
        .unwrap();
        assert!(matches!(
            r.condition,
            Condition::Threshold {
                op: Op::Gt,
                for_windows: 1,
                ..
            }
        ));
        let r = parse(
            r#"{"name": "silent sensor", "kind": "absence", "selector": {"device_type": "th-100"},
                "seconds": 60, "severity": "warning"}"#,
        )
        .unwrap();
        assert_eq!(r.condition, Condition::Absence { seconds: 60 });
    }

    #[test]
    fn bad_rules_name_the_field() {
        let base = r#""name": "x", "metric": "t", "aggregate": "avg", "op": ">", "threshold": 1, "severity": "warning""#;
        for (json, field) in [
            (format!(r#"{{{base}}}"#), "window"),
            (format!(r#"{{{base}, "window": {{"kind": "tumbling", "seconds": 0}}}}"#), "window.seconds"),
            (format!(r#"{{{base}, "window": {{"kind": "sliding", "seconds": 10, "every": 20}}}}"#), "window"),
            (format!(r#"{{{base}, "window": {{"kind": "tumbling", "seconds": 5}}, "for_windows": 0}}"#), "for_windows"),
            (format!(r#"{{{base}, "window": {{"kind": "tumbling", "seconds": 5}}, "seconds": 3}}"#), "seconds"),
            (r#"{"name": "x", "kind": "absence", "severity": "warning"}"#.to_owned(), "seconds"),
            (r#"{"name": "x", "kind": "absence", "seconds": 5, "metric": "t", "severity": "warning"}"#.to_owned(), "metric"),
            (r#"{"name": "x", "kind": "other", "seconds": 5, "severity": "warning"}"#.to_owned(), "kind"),
            (r#"{"name": "x", "kind": "absence", "seconds": 5, "severity": "loud"}"#.to_owned(), "severity"),
            (r#"{"name": " ", "kind": "absence", "seconds": 5, "severity": "info"}"#.to_owned(), "name"),
        ] {
            assert_eq!(parse(&json).unwrap_err().field, field, "{json}");
        }
    }

    #[test]
    fn selectors_match_device_type_and_tags() {
        let s = Selector {
            device_id: None,
            device_type: Some("th-100".into()),
            tags: BTreeMap::from([("line".into(), "2".into())]),
        };
        let mut tags = BTreeMap::from([("device_type".to_owned(), "th-100".to_owned())]);
        assert!(!s.matches("a", &tags));
        tags.insert("line".into(), "2".into());
        assert!(s.matches("a", &tags));
        assert!(Selector::default().matches("anything", &BTreeMap::new()));
    }
}
