//! The alerting engine: a sans-IO state machine fed readings and the time.
//!
//! - **Event time.** Each device has a watermark: the newest event time seen from it minus
//!   `out_of_orderness`. A window is evaluated as soon as the watermark passes its end.
//! - **Lateness.** A reading behind the watermark still updates its window while the window's
//!   end is within `allowed_lateness` of the watermark; if that window was the latest one
//!   evaluated, the alert is corrected. Later readings are counted and reported as
//!   [`Output::Late`] (they are stored by the database, not re-alerted).
//! - **Quiet devices.** When a device has sent nothing for `out_of_orderness + idle_grace` of
//!   processing time, its open windows are evaluated and closed ([`Engine::on_tick`]).
//! - **Backfill.** Readings from a gateway's backlog lane are evaluated on their own clock and
//!   state, apart from live ones, so a replay of yesterday neither trips nor clears today's
//!   alerts; what they produce is marked `backfill`.
//! - **Lifecycle.** Per (rule, device, live or backfill) at most one alert is open: `Firing`
//!   once the condition held for `for_windows` consecutive evaluated windows, `Resolved` at
//!   the first window where it does not. Windows with no readings are not evaluated (silence
//!   is what absence rules are for).
//! - **Absence.** A rule of kind absence fires for a selected device that has sent no live
//!   reading for its `seconds` of processing time, and resolves at its next reading.
//! - **Bounded.** Only windows of rules are kept, and only until they pass the lateness;
//!   idle series go; at most `max_series` series exist (more are counted, not tracked).

use std::collections::{BTreeMap, HashMap, HashSet};

use plantlink_model::Reading;

use super::rule::{Aggregate, Condition, Rule};

/// Durations in µs, and the state cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// The watermark trails the newest event time by this much.
    pub out_of_orderness_us: i64,
    /// How far behind the watermark a window still takes readings.
    pub allowed_lateness_us: i64,
    /// Processing time, beyond `out_of_orderness_us`, after which a quiet device's windows
    /// are closed.
    pub idle_grace_us: i64,
    /// Most (rule, device) series tracked.
    pub max_series: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            out_of_orderness_us: 1_000_000,
            allowed_lateness_us: 30_000_000,
            idle_grace_us: 5_000_000,
            max_series: 1_000_000,
        }
    }
}

/// An alert's state after a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// The condition became true.
    Firing,
    /// It ended.
    Resolved,
}

/// One transition of one alert.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AlertEvent {
    /// The rule.
    pub rule_id: i64,
    /// Its tenant.
    pub tenant: String,
    /// The device.
    pub device_id: String,
    /// The rule's metric (none for absence).
    pub metric: Option<String>,
    /// `firing` or `resolved`.
    pub state: AlertState,
    /// The rule's severity.
    pub severity: String,
    /// The aggregate observed (absence: seconds of silence).
    pub value: f64,
    /// The rule's threshold (absence: its seconds).
    pub threshold: f64,
    /// The window, in µs of event time (absence: last reading time to now).
    pub window_start_us: i64,
    /// Its end (exclusive).
    pub window_end_us: i64,
    /// From a replayed backlog: recorded, not notified.
    pub backfill: bool,
}

/// What the engine produces.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// An alert transition.
    Alert(AlertEvent),
    /// A reading too late for its window.
    Late {
        /// The rule whose window it missed.
        rule_id: i64,
        /// The device.
        device_id: String,
        /// Its event time.
        ts_us: i64,
    },
}

/// A reading as the engine sees it.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The tenant, from the gateway's certificate.
    pub tenant: &'a str,
    /// The reading.
    pub reading: &'a Reading,
    /// From a gateway's backlog lane.
    pub backfill: bool,
}

#[derive(Debug, Clone, Default)]
struct Acc {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    first: (i64, f64),
    last: (i64, f64),
    seen: HashSet<i64>,
    evaluated: Option<bool>,
}

impl Acc {
    fn add(&mut self, ts: i64, v: f64) -> bool {
        if !self.seen.insert(ts) {
            return false; // a replay of a reading this window has
        }
        if self.count == 0 {
            (self.min, self.max, self.first, self.last) = (v, v, (ts, v), (ts, v));
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
            if ts < self.first.0 {
                self.first = (ts, v);
            }
            if ts >= self.last.0 {
                self.last = (ts, v);
            }
        }
        self.count += 1;
        self.sum += v;
        true
    }

    fn value(&self, a: Aggregate) -> f64 {
        match a {
            Aggregate::Avg => self.sum / self.count as f64,
            Aggregate::Min => self.min,
            Aggregate::Max => self.max,
            Aggregate::Count => self.count as f64,
            Aggregate::Last => self.last.1,
            Aggregate::Rate => {
                let dt = (self.last.0 - self.first.0) as f64 / 1e6;
                if dt > 0.0 {
                    (self.last.1 - self.first.1) / dt
                } else {
                    0.0
                }
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Series {
    windows: BTreeMap<i64, Acc>,
    /// Start of the latest window evaluated, the streak before it and after it.
    latest: Option<(i64, u32)>,
    streak: u32,
    firing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Lane(bool);

type DeviceKey = (String, String, Lane); // tenant, device, backfill
type SeriesKey = (i64, String, Lane); // rule, device, backfill

#[derive(Debug, Clone, Default)]
struct Clock {
    max_ts: Option<i64>,
    last_arrival: i64,
    idle: bool,
    series: HashSet<i64>, // rule ids with a series for this device and lane
}

#[derive(Debug, Clone)]
struct Seen {
    last_arrival: i64,
    last_ts: i64,
    tags: BTreeMap<String, String>,
    absent: HashSet<i64>, // absence rules firing for it
}

/// The engine. Feed it with [`Engine::on_reading`] and [`Engine::on_tick`]; it returns
/// what happened.
#[derive(Debug, Default)]
pub struct Engine {
    s: Settings,
    rules: HashMap<i64, Rule>,
    by_tenant: HashMap<String, Vec<i64>>,
    clocks: HashMap<DeviceKey, Clock>,
    series: HashMap<SeriesKey, Series>,
    devices: HashMap<(String, String), Seen>,
    /// Series not tracked because `max_series` was reached.
    pub untracked: u64,
}

impl Engine {
    /// An engine with no rules.
    pub fn new(s: Settings) -> Self {
        Self {
            s,
            ..Self::default()
        }
    }

    /// Replaces the rules. Series of rules that are gone or changed are dropped (an open
    /// alert of a changed rule starts over).
    pub fn set_rules(&mut self, rules: Vec<Rule>) {
        let new: HashMap<i64, Rule> = rules.into_iter().map(|r| (r.id, r)).collect();
        self.series
            .retain(|(id, _, _), _| new.get(id).is_some_and(|r| self.rules.get(id) == Some(r)));
        for c in self.clocks.values_mut() {
            c.series
                .retain(|id| new.get(id).is_some_and(|r| self.rules.get(id) == Some(r)));
        }
        for d in self.devices.values_mut() {
            d.absent
                .retain(|id| new.get(id).is_some_and(|r| self.rules.get(id) == Some(r)));
        }
        self.by_tenant.clear();
        for r in new.values() {
            self.by_tenant
                .entry(r.tenant.clone())
                .or_default()
                .push(r.id);
        }
        self.rules = new;
    }

    /// Marks a live alert as open (read back from the `alerts` table after a restart), so
    /// that it is resolved, not fired again.
    pub fn restore_open(&mut self, rule_id: i64, tenant: &str, device: &str) {
        let Some(rule) = self.rules.get(&rule_id) else {
            return;
        };
        if rule.tenant != tenant {
            return;
        }
        match rule.condition {
            Condition::Threshold { for_windows, .. } => {
                let key: SeriesKey = (rule_id, device.to_owned(), Lane(false));
                let s = self.series.entry(key).or_default();
                s.firing = true;
                s.streak = for_windows;
                self.clocks
                    .entry((tenant.to_owned(), device.to_owned(), Lane(false)))
                    .or_default()
                    .series
                    .insert(rule_id);
            }
            Condition::Absence { .. } => {
                let now = i64::MIN / 4;
                self.devices
                    .entry((tenant.to_owned(), device.to_owned()))
                    .or_insert_with(|| Seen {
                        last_arrival: now,
                        last_ts: now,
                        tags: BTreeMap::new(),
                        absent: HashSet::new(),
                    })
                    .absent
                    .insert(rule_id);
            }
        }
    }

    /// Series tracked now (for a gauge and for tests of boundedness).
    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// Windows held now.
    pub fn window_count(&self) -> usize {
        self.series.values().map(|s| s.windows.len()).sum()
    }

    /// One reading, at processing time `now_us`.
    pub fn on_reading(&mut self, input: Input<'_>, now_us: i64, out: &mut Vec<Output>) {
        let r = input.reading;
        let lane = Lane(input.backfill);
        if !input.backfill {
            self.heard_from(input.tenant, r, now_us, out);
        }
        let dkey: DeviceKey = (input.tenant.to_owned(), r.device.clone(), lane);
        let clock = self.clocks.entry(dkey.clone()).or_default();
        let old_wm = clock.max_ts.map(|m| m - self.s.out_of_orderness_us);
        clock.max_ts = Some(clock.max_ts.map_or(r.ts.0, |m| m.max(r.ts.0)));
        clock.last_arrival = now_us;
        clock.idle = false;
        let wm = clock
            .max_ts
            .map_or(i64::MIN, |m| m - self.s.out_of_orderness_us);
        let rule_ids = self
            .by_tenant
            .get(input.tenant)
            .cloned()
            .unwrap_or_default();
        for id in rule_ids {
            let Some(rule) = self.rules.get(&id) else {
                continue;
            };
            let Condition::Threshold { metric, window, .. } = &rule.condition else {
                continue;
            };
            if *metric != r.metric || !rule.selector.matches(&r.device, &r.tags) {
                continue;
            }
            let (span, step) = window.span_step_us();
            let skey: SeriesKey = (id, r.device.clone(), lane);
            if !self.series.contains_key(&skey) {
                if self.series.len() >= self.s.max_series {
                    self.untracked += 1;
                    continue;
                }
                self.series.insert(skey.clone(), Series::default());
                if let Some(c) = self.clocks.get_mut(&dkey) {
                    c.series.insert(id);
                }
            }
            let first = (r.ts.0 - span).div_euclid(step) + 1;
            let last = r.ts.0.div_euclid(step);
            let mut late = false;
            for k in first..=last {
                let start = k * step;
                let end = start + span;
                if old_wm.is_some_and(|w| end + self.s.allowed_lateness_us <= w) {
                    late = true;
                    continue;
                }
                let rule = rule.clone();
                let Some(series) = self.series.get_mut(&skey) else {
                    continue;
                };
                let acc = series.windows.entry(start).or_default();
                if acc.add(r.ts.0, r.value) && acc.evaluated.is_some() {
                    // A late reading changed a window already evaluated: correct it.
                    evaluate(
                        series,
                        &rule,
                        &r.device,
                        start,
                        span,
                        input.backfill,
                        true,
                        out,
                    );
                }
            }
            if late {
                out.push(Output::Late {
                    rule_id: id,
                    device_id: r.device.clone(),
                    ts_us: r.ts.0,
                });
            }
        }
        self.advance(&dkey, wm, out);
    }

    /// Evaluates the windows of a device's series that end at or before `wm`, and drops
    /// those past the lateness.
    fn advance(&mut self, dkey: &DeviceKey, wm: i64, out: &mut Vec<Output>) {
        let Some(clock) = self.clocks.get(dkey) else {
            return;
        };
        let ids: Vec<i64> = clock.series.iter().copied().collect();
        for id in ids {
            let Some(rule) = self.rules.get(&id).cloned() else {
                continue;
            };
            let Condition::Threshold { window, .. } = rule.condition else {
                continue;
            };
            let (span, _) = window.span_step_us();
            let skey: SeriesKey = (id, dkey.1.clone(), dkey.2);
            let Some(series) = self.series.get_mut(&skey) else {
                continue;
            };
            let due: Vec<i64> = series
                .windows
                .iter()
                .filter(|(start, acc)| acc.evaluated.is_none() && *start + span <= wm)
                .map(|(s, _)| *s)
                .collect();
            for start in due {
                evaluate(series, &rule, &dkey.1, start, span, dkey.2.0, false, out);
            }
            let lateness = self.s.allowed_lateness_us;
            series
                .windows
                .retain(|start, acc| acc.evaluated.is_none() || start + span + lateness > wm);
        }
    }

    fn heard_from(&mut self, tenant: &str, r: &Reading, now_us: i64, out: &mut Vec<Output>) {
        let seen = self
            .devices
            .entry((tenant.to_owned(), r.device.clone()))
            .or_insert_with(|| Seen {
                last_arrival: now_us,
                last_ts: r.ts.0,
                tags: r.tags.clone(),
                absent: HashSet::new(),
            });
        seen.last_arrival = now_us;
        seen.last_ts = seen.last_ts.max(r.ts.0);
        if seen.tags != r.tags {
            seen.tags = r.tags.clone();
        }
        for id in std::mem::take(&mut seen.absent) {
            if let Some(rule) = self.rules.get(&id) {
                let seconds = match rule.condition {
                    Condition::Absence { seconds } => f64::from(seconds),
                    Condition::Threshold { .. } => 0.0,
                };
                out.push(Output::Alert(AlertEvent {
                    rule_id: id,
                    tenant: tenant.to_owned(),
                    device_id: r.device.clone(),
                    metric: None,
                    state: AlertState::Resolved,
                    severity: rule.severity.clone(),
                    value: 0.0,
                    threshold: seconds,
                    window_start_us: r.ts.0,
                    window_end_us: r.ts.0,
                    backfill: false,
                }));
            }
        }
    }

    /// Processing time passes: quiet devices' windows close, absence rules fire, idle state
    /// goes.
    pub fn on_tick(&mut self, now_us: i64, out: &mut Vec<Output>) {
        let quiet_after = self.s.out_of_orderness_us + self.s.idle_grace_us;
        let quiet: Vec<DeviceKey> = self
            .clocks
            .iter()
            .filter(|(_, c)| !c.idle && now_us - c.last_arrival >= quiet_after)
            .map(|(k, _)| k.clone())
            .collect();
        for k in quiet {
            // As if the watermark had passed every window.
            self.advance(&k, i64::MAX / 2, out);
            if let Some(c) = self.clocks.get_mut(&k) {
                c.idle = true;
                let series = &mut self.series;
                c.series.retain(|id| {
                    let key = (*id, k.1.clone(), k.2);
                    let keep = series
                        .get(&key)
                        .is_some_and(|s| s.firing || !s.windows.is_empty());
                    if !keep {
                        series.remove(&key);
                    }
                    keep
                });
            }
        }
        // Idle clocks with no series left carry nothing but their watermark; a device back
        // after the lateness starts afresh.
        let lateness = self.s.allowed_lateness_us;
        self.clocks.retain(|_, c| {
            !(c.idle && c.series.is_empty() && now_us - c.last_arrival > quiet_after + lateness)
        });

        let absence: Vec<(i64, u32)> = self
            .rules
            .values()
            .filter_map(|r| match r.condition {
                Condition::Absence { seconds } => Some((r.id, seconds)),
                Condition::Threshold { .. } => None,
            })
            .collect();
        for (id, seconds) in absence {
            let Some(rule) = self.rules.get(&id) else {
                continue;
            };
            for ((tenant, device), seen) in self.devices.iter_mut() {
                if *tenant != rule.tenant
                    || seen.absent.contains(&id)
                    || !rule.selector.matches(device, &seen.tags)
                {
                    continue;
                }
                let silent_us = now_us - seen.last_arrival;
                if silent_us >= i64::from(seconds) * 1_000_000 {
                    seen.absent.insert(id);
                    out.push(Output::Alert(AlertEvent {
                        rule_id: id,
                        tenant: tenant.clone(),
                        device_id: device.clone(),
                        metric: None,
                        state: AlertState::Firing,
                        severity: rule.severity.clone(),
                        value: silent_us as f64 / 1e6,
                        threshold: f64::from(seconds),
                        window_start_us: seen.last_ts,
                        window_end_us: now_us,
                        backfill: false,
                    }));
                }
            }
        }
    }
}

/// Evaluates one window of a series and emits what changes. `correction`: the window was
/// evaluated before and a late reading changed it.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    series: &mut Series,
    rule: &Rule,
    device: &str,
    start: i64,
    span: i64,
    backfill: bool,
    correction: bool,
    out: &mut Vec<Output>,
) {
    let Condition::Threshold {
        metric,
        aggregate,
        op,
        threshold,
        for_windows,
        ..
    } = &rule.condition
    else {
        return;
    };
    let Some(acc) = series.windows.get_mut(&start) else {
        return;
    };
    let value = acc.value(*aggregate);
    let holds = op.holds(value, *threshold);
    let before = acc.evaluated.replace(holds);
    // Only the newest evaluated window drives the lifecycle; a correction of an older one
    // (or a first look at a window behind it) changes nothing that was already said.
    let streak_before = match series.latest {
        Some((latest, before_it)) if latest == start && correction => {
            if before == Some(holds) {
                return;
            }
            before_it
        }
        Some((latest, _)) if latest >= start => return,
        _ => series.streak,
    };
    series.latest = Some((start, streak_before));
    series.streak = if holds { streak_before + 1 } else { 0 };
    let event = |state| {
        Output::Alert(AlertEvent {
            rule_id: rule.id,
            tenant: rule.tenant.clone(),
            device_id: device.to_owned(),
            metric: Some(metric.clone()),
            state,
            severity: rule.severity.clone(),
            value,
            threshold: *threshold,
            window_start_us: start,
            window_end_us: start + span,
            backfill,
        })
    };
    if series.streak >= *for_windows && !series.firing {
        series.firing = true;
        out.push(event(AlertState::Firing));
    } else if !holds && series.firing {
        series.firing = false;
        out.push(event(AlertState::Resolved));
    }
}

#[cfg(test)]
mod tests;
