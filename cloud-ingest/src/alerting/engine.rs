//! The alerting engine: a sans-IO state machine fed readings and the time.
//!
//! - **Event time.** Each device has a watermark: the newest event time seen from it minus
//!   `out_of_orderness`. A window is evaluated as soon as the watermark passes its end.
//! - **Clock sanity.** For the watermark, a reading's event time counts as at most its
//!   processing time plus `out_of_orderness`, so a device's watermark never runs ahead of
//!   processing time: one reading stamped a day ahead (a wrong gateway clock) does not close
//!   the windows of the day in one go and make every correct reading after it late. The
//!   reading itself still goes to the window of its own event time.
//! - **Lateness.** A reading behind the watermark still updates its window while the window's
//!   end is within `allowed_lateness` of the watermark; if that window was the latest one
//!   evaluated, the alert is corrected. Later readings are counted and reported as
//!   [`Output::Late`] (they are stored by the database, not re-alerted).
//! - **Quiet devices.** When a device has sent nothing for `out_of_orderness + idle_grace` of
//!   processing time, its event time is taken to go on with processing time: a window closes
//!   once `out_of_orderness + idle_grace` has passed since its end ([`Engine::on_tick`]).
//! - **Backfill.** Readings from a gateway's backlog lane are evaluated on their own clock and
//!   state, apart from live ones, so a replay of yesterday neither trips nor clears today's
//!   alerts; what they produce is marked `backfill`.
//! - **Lifecycle.** Per (rule, device, live or backfill) at most one alert is open: `Firing`
//!   once the condition held for `for_windows` consecutive evaluated windows, `Resolved` at
//!   the first window where it does not. Windows with no readings are not evaluated (silence
//!   is what absence rules are for).
//! - **Absence.** A rule of kind absence fires for a selected device that has sent no live
//!   reading for its `seconds` of processing time, and resolves at its next reading. A
//!   death certificate ([`is_death`]: a Sparkplug B NDEATH or DDEATH) makes it fire at the
//!   next tick instead.
//! - **Bounded, per tenant.** Only windows of rules are kept, and only until they pass the
//!   lateness; idle series go. Each tenant has its own caps ([`Settings`]): at most
//!   `max_rules_per_tenant` rules are active (the first by id; the others are counted in
//!   [`Quota::rules_over_cap`] and never evaluated), at most `max_devices_per_tenant` devices
//!   and `max_series_per_tenant` (rule, device) series are tracked. A reading that would start
//!   a device or series over its tenant's cap is counted ([`Quota::devices_dropped`],
//!   [`Quota::series_dropped`]) and not evaluated for it; nothing that is tracked is evicted.
//!   There is no global cap, so one tenant at its caps never takes room from another: the
//!   state is bounded by tenants x caps (tenants come from the fleet PKI).
//! - **Indexed.** Rules are found by tenant, then metric, then the selector's `device_id`
//!   (rules without one are visited for every device): a reading visits only its own
//!   tenant's rules of its metric that can select its device, and a tick visits only each
//!   tenant's own absence rules. [`Engine::rule_visits`] counts the visits.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

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
    /// Most (rule, device) series tracked per tenant.
    pub max_series_per_tenant: usize,
    /// Most devices tracked per tenant.
    pub max_devices_per_tenant: usize,
    /// Most rules active per tenant (the first by id).
    pub max_rules_per_tenant: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            out_of_orderness_us: 1_000_000,
            allowed_lateness_us: 30_000_000,
            idle_grace_us: 5_000_000,
            max_series_per_tenant: 100_000,
            max_devices_per_tenant: 100_000,
            max_rules_per_tenant: 1_000,
        }
    }
}

/// What one tenant holds of the engine, and what its caps kept out.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Quota {
    /// Rules active.
    pub rules: usize,
    /// Rules over `max_rules_per_tenant` (the highest ids), not evaluated.
    pub rules_over_cap: usize,
    /// (rule, device) series tracked now.
    pub series: usize,
    /// Devices tracked now.
    pub devices: usize,
    /// Since start: (reading, rule) pairs not evaluated because the tenant was at
    /// `max_series_per_tenant` and the series was new.
    pub series_dropped: u64,
    /// Since start: readings not evaluated because the tenant was at
    /// `max_devices_per_tenant` and the device was new.
    pub devices_dropped: u64,
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
    /// Event times taken, sorted (readings mostly come in order, so mostly a push).
    seen: Vec<i64>,
    evaluated: Option<bool>,
}

impl Acc {
    fn add(&mut self, ts: i64, v: f64) -> bool {
        match self.seen.last() {
            Some(&newest) if ts <= newest => match self.seen.binary_search(&ts) {
                Ok(_) => return false, // a replay of a reading this window has
                Err(at) => self.seen.insert(at, ts),
            },
            _ => self.seen.push(ts),
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
    /// Start of the latest window evaluated, and the streak before it.
    latest: Option<(i64, u32)>,
    streak: u32,
    firing: bool,
}

/// A hasher for rule ids: one multiply, instead of SipHash on the hottest lookup (the ids
/// are ours, not an attacker's).
#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_i64(&mut self, n: i64) {
        self.0 = (n as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
}

type ById<V> = HashMap<i64, V, std::hash::BuildHasherDefault<IdHasher>>;

/// One device on one lane (live or backfill): its clock and its series, by rule.
#[derive(Debug, Clone)]
struct Track {
    max_ts: Option<i64>,
    last_arrival: i64,
    idle: bool,
    /// The earliest end of a window not yet evaluated (`i64::MAX` when none): nothing is
    /// due before the watermark reaches it.
    next_due: i64,
    series: ById<Series>,
}

impl Default for Track {
    fn default() -> Self {
        Self {
            max_ts: None,
            last_arrival: 0,
            idle: false,
            next_due: i64::MAX,
            series: ById::default(),
        }
    }
}

#[derive(Debug, Clone)]
struct Seen {
    last_arrival: i64,
    last_ts: i64,
    tags: BTreeMap<String, String>,
    absent: HashSet<i64>, // absence rules firing for it
    /// Its last reading was a death certificate ([`is_death`]): absence rules fire at once.
    stale: bool,
}

/// A reading that says its device went away: `online` = 0 tagged `event = death`, as the
/// agent writes for a Sparkplug B NDEATH or DDEATH.
pub fn is_death(r: &Reading) -> bool {
    r.metric == "online"
        && r.value == 0.0
        && r.tags.get("event").map(String::as_str) == Some("death")
}

/// A device: live and backfill tracks, and what absence rules need.
#[derive(Debug, Clone, Default)]
struct Device {
    lanes: [Track; 2],
    seen: Option<Seen>,
}

/// The threshold rules of one (tenant, metric): by the selector's device, and the others.
#[derive(Debug, Default)]
struct MetricRules {
    by_device: HashMap<String, Vec<Arc<Rule>>>,
    any_device: Vec<Arc<Rule>>,
}

/// The active rules of one tenant.
#[derive(Debug, Default)]
struct TenantRules {
    by_metric: HashMap<String, MetricRules>,
    /// Its absence rules: its live readings are all noted.
    absence: Vec<Arc<Rule>>,
}

/// The engine. Feed it with [`Engine::on_reading`] and [`Engine::on_tick`]; it returns
/// what happened.
#[derive(Debug, Default)]
pub struct Engine {
    s: Settings,
    /// Active rules by id.
    rules: ById<Arc<Rule>>,
    by_tenant: HashMap<String, TenantRules>,
    devices: HashMap<String, HashMap<String, Device>>,
    quotas: HashMap<String, Quota>,
    visits: u64,
}

fn lane(backfill: bool) -> usize {
    usize::from(backfill)
}

impl Engine {
    /// An engine with no rules.
    pub fn new(s: Settings) -> Self {
        Self {
            s,
            ..Self::default()
        }
    }

    /// Replaces the rules and rebuilds the index. Per tenant the first
    /// `max_rules_per_tenant` rules by id are active; the others are counted in
    /// [`Quota::rules_over_cap`]. Series of rules that are gone, changed or over the cap are
    /// dropped (an open alert of a changed rule starts over).
    pub fn set_rules(&mut self, mut rules: Vec<Rule>) {
        rules.sort_by(|a, b| (a.tenant.as_str(), a.id).cmp(&(b.tenant.as_str(), b.id)));
        let mut per_tenant: HashMap<String, (usize, usize)> = HashMap::new();
        let mut new: ById<Arc<Rule>> = ById::default();
        for r in rules {
            let (active, over) = per_tenant.entry(r.tenant.clone()).or_default();
            if *active >= self.s.max_rules_per_tenant {
                *over += 1;
                continue;
            }
            *active += 1;
            new.insert(r.id, Arc::new(r));
        }
        let same = |id: &i64| {
            new.get(id)
                .is_some_and(|r| self.rules.get(id).is_some_and(|o| **o == **r))
        };
        for q in self.quotas.values_mut() {
            (q.rules, q.rules_over_cap, q.series) = (0, 0, 0);
        }
        for (tenant, devices) in self.devices.iter_mut() {
            let mut kept = 0;
            for d in devices.values_mut() {
                for t in &mut d.lanes {
                    t.series.retain(|id, _| same(id));
                    kept += t.series.len();
                }
                if let Some(seen) = &mut d.seen {
                    seen.absent.retain(|id| same(id));
                }
            }
            self.quotas.entry(tenant.clone()).or_default().series = kept;
        }
        for (tenant, (active, over)) in per_tenant {
            let q = self.quotas.entry(tenant).or_default();
            (q.rules, q.rules_over_cap) = (active, over);
        }
        self.by_tenant.clear();
        let mut ordered: Vec<&Arc<Rule>> = new.values().collect();
        ordered.sort_by_key(|r| r.id);
        for r in ordered {
            let t = self.by_tenant.entry(r.tenant.clone()).or_default();
            match &r.condition {
                Condition::Threshold { metric, .. } => {
                    let m = t.by_metric.entry(metric.clone()).or_default();
                    match &r.selector.device_id {
                        Some(d) => m.by_device.entry(d.clone()).or_default().push(r.clone()),
                        None => m.any_device.push(r.clone()),
                    }
                }
                Condition::Absence { .. } => t.absence.push(r.clone()),
            }
        }
        self.rules = new;
    }

    /// Marks a live alert as open (read back from the `alerts` table after a restart), so
    /// that it is resolved, not fired again.
    pub fn restore_open(&mut self, rule_id: i64, tenant: &str, device: &str) {
        let Some(rule) = self.rules.get(&rule_id).cloned() else {
            return;
        };
        if rule.tenant != tenant {
            return;
        }
        let q = self.quotas.entry(tenant.to_owned()).or_default();
        let devices = self.devices.entry(tenant.to_owned()).or_default();
        let d = devices.entry(device.to_owned()).or_insert_with(|| {
            q.devices += 1;
            Device::default()
        });
        match rule.condition {
            Condition::Threshold { for_windows, .. } => {
                let s = d.lanes[0].series.entry(rule_id).or_insert_with(|| {
                    q.series += 1;
                    Series::default()
                });
                s.firing = true;
                s.streak = for_windows;
            }
            Condition::Absence { .. } => {
                let long_ago = i64::MIN / 4;
                d.seen
                    .get_or_insert_with(|| Seen {
                        last_arrival: long_ago,
                        last_ts: long_ago,
                        tags: BTreeMap::new(),
                        absent: HashSet::new(),
                        stale: false,
                    })
                    .absent
                    .insert(rule_id);
            }
        }
    }

    /// Series tracked now, all tenants (for a gauge and for tests of boundedness).
    pub fn series_count(&self) -> usize {
        self.quotas.values().map(|q| q.series).sum()
    }

    /// What `tenant` holds and what its caps kept out (`None`: never seen).
    pub fn quota(&self, tenant: &str) -> Option<&Quota> {
        self.quotas.get(tenant)
    }

    /// Every tenant's [`Quota`].
    pub fn quotas(&self) -> impl Iterator<Item = (&str, &Quota)> {
        self.quotas.iter().map(|(t, q)| (t.as_str(), q))
    }

    /// Rules visited so far to evaluate readings and ticks: the cost of rule lookup, which
    /// follows the rules that can match, not all rules.
    pub fn rule_visits(&self) -> u64 {
        self.visits
    }

    /// Windows held now.
    pub fn window_count(&self) -> usize {
        self.devices
            .values()
            .flat_map(|m| m.values())
            .flat_map(|d| d.lanes.iter())
            .flat_map(|t| t.series.values())
            .map(|s| s.windows.len())
            .sum()
    }

    /// One reading, at processing time `now_us`.
    pub fn on_reading(&mut self, input: Input<'_>, now_us: i64, out: &mut Vec<Output>) {
        let r = input.reading;
        let backfill = input.backfill;
        let s = self.s;
        let Some(tenant_rules) = self.by_tenant.get(input.tenant) else {
            return;
        };
        let (for_device, for_any): (&[Arc<Rule>], &[Arc<Rule>]) =
            match tenant_rules.by_metric.get(&r.metric) {
                Some(m) => (
                    m.by_device.get(&r.device).map_or(&[], Vec::as_slice),
                    &m.any_device,
                ),
                None => (&[], &[]),
            };
        let has_absence = !backfill && !tenant_rules.absence.is_empty();
        if for_device.is_empty() && for_any.is_empty() && !has_absence {
            return;
        }
        let quota = match self.quotas.get_mut(input.tenant) {
            Some(q) => q,
            None => self.quotas.entry(input.tenant.to_owned()).or_default(),
        };
        let tenant_devices = match self.devices.get_mut(input.tenant) {
            Some(m) => m,
            None => self.devices.entry(input.tenant.to_owned()).or_default(),
        };
        let device = match tenant_devices.get_mut(&r.device) {
            Some(d) => d,
            None => {
                // A new device is tracked only if something would track it, and only
                // within its tenant's cap.
                if !has_absence
                    && !for_device
                        .iter()
                        .chain(for_any)
                        .any(|rule| rule.selector.matches(&r.device, &r.tags))
                {
                    return;
                }
                if quota.devices >= s.max_devices_per_tenant {
                    quota.devices_dropped += 1;
                    return;
                }
                quota.devices += 1;
                tenant_devices.entry(r.device.clone()).or_default()
            }
        };
        // The event time as the clock sees it: at most processing time plus the bound.
        let clock_ts = r.ts.0.min(now_us.saturating_add(s.out_of_orderness_us));
        if has_absence {
            heard_from(device, &self.rules, input.tenant, r, clock_ts, now_us, out);
        }
        let track = &mut device.lanes[lane(backfill)];
        let old_wm = track.max_ts.map(|m| m - s.out_of_orderness_us);
        track.max_ts = Some(track.max_ts.map_or(clock_ts, |m| m.max(clock_ts)));
        track.last_arrival = now_us;
        track.idle = false;
        let wm = track.max_ts.map_or(i64::MIN, |m| m - s.out_of_orderness_us);
        for rule in for_device.iter().chain(for_any) {
            self.visits += 1;
            let Condition::Threshold { window, .. } = &rule.condition else {
                continue;
            };
            if !rule.selector.matches(&r.device, &r.tags) {
                continue;
            }
            let (span, step) = window.span_step_us();
            let series = match track.series.get_mut(&rule.id) {
                Some(x) => x,
                None => {
                    if quota.series >= s.max_series_per_tenant {
                        quota.series_dropped += 1;
                        continue;
                    }
                    quota.series += 1;
                    track.series.entry(rule.id).or_default()
                }
            };
            let first = (r.ts.0 - span).div_euclid(step) + 1;
            let last = r.ts.0.div_euclid(step);
            let mut late = false;
            for k in first..=last {
                let start = k * step;
                let end = start + span;
                if old_wm.is_some_and(|w| end + s.allowed_lateness_us <= w) {
                    late = true;
                    continue;
                }
                let acc = series.windows.entry(start).or_default();
                if acc.evaluated.is_none() {
                    track.next_due = track.next_due.min(end);
                }
                if acc.add(r.ts.0, r.value) && acc.evaluated.is_some() {
                    // A late reading changed a window already evaluated: correct it.
                    evaluate(series, rule, &r.device, start, span, backfill, true, out);
                }
            }
            if late {
                out.push(Output::Late {
                    rule_id: rule.id,
                    device_id: r.device.clone(),
                    ts_us: r.ts.0,
                });
            }
        }
        if wm >= track.next_due {
            advance(
                track,
                &self.rules,
                &r.device,
                backfill,
                wm,
                s.allowed_lateness_us,
                out,
            );
        }
    }

    /// Processing time passes: quiet devices' windows close, absence rules fire, idle state
    /// goes.
    pub fn on_tick(&mut self, now_us: i64, out: &mut Vec<Output>) {
        let quiet_after = self.s.out_of_orderness_us + self.s.idle_grace_us;
        let lateness = self.s.allowed_lateness_us;
        for (tenant, devices) in self.devices.iter_mut() {
            let quota = match self.quotas.get_mut(tenant) {
                Some(q) => q,
                None => self.quotas.entry(tenant.clone()).or_default(),
            };
            let absence: &[Arc<Rule>] = self
                .by_tenant
                .get(tenant)
                .map_or(&[], |t| t.absence.as_slice());
            let mut removed = 0;
            for (name, d) in devices.iter_mut() {
                for (i, t) in d.lanes.iter_mut().enumerate() {
                    let silence = now_us - t.last_arrival;
                    let Some(max_ts) = t.max_ts else { continue };
                    if t.idle || silence < quiet_after {
                        continue;
                    }
                    // While the device is quiet, its event time is taken to go on with
                    // processing time (less the bound and the grace): a window closes once
                    // that long has passed since its end, whether or not readings came.
                    let wm = max_ts - self.s.out_of_orderness_us + (silence - self.s.idle_grace_us);
                    advance(t, &self.rules, name, i == 1, wm, lateness, out);
                    let before = t.series.len();
                    t.series
                        .retain(|_, s| s.firing || s.streak > 0 || !s.windows.is_empty());
                    removed += before - t.series.len();
                    t.idle = t.series.values().all(|s| s.windows.is_empty());
                }
                // Absence rules of this tenant.
                let Some(seen) = &mut d.seen else { continue };
                for rule in absence {
                    self.visits += 1;
                    let Condition::Absence { seconds } = rule.condition else {
                        continue;
                    };
                    if seen.absent.contains(&rule.id) || !rule.selector.matches(name, &seen.tags) {
                        continue;
                    }
                    let silent_us = now_us - seen.last_arrival;
                    if seen.stale || silent_us >= i64::from(seconds) * 1_000_000 {
                        seen.absent.insert(rule.id);
                        out.push(Output::Alert(AlertEvent {
                            rule_id: rule.id,
                            tenant: tenant.clone(),
                            device_id: name.clone(),
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
            quota.series -= removed.min(quota.series);
            // Devices with nothing left to track go (one back later starts afresh); absence
            // rules need every device their tenant has been heard from.
            let watch_absence = !absence.is_empty();
            let before = devices.len();
            devices.retain(|_, d| {
                (watch_absence && d.seen.is_some())
                    || d.lanes.iter().any(|t| {
                        !t.series.is_empty() || now_us - t.last_arrival <= quiet_after + lateness
                    })
            });
            quota.devices -= (before - devices.len()).min(quota.devices);
        }
        self.devices.retain(|_, m| !m.is_empty());
    }
}

/// Evaluates a track's windows that end at or before `wm`, and drops those past the
/// lateness.
fn advance(
    t: &mut Track,
    rules: &ById<Arc<Rule>>,
    device: &str,
    backfill: bool,
    wm: i64,
    lateness: i64,
    out: &mut Vec<Output>,
) {
    let mut next_due = i64::MAX;
    for (id, series) in t.series.iter_mut() {
        let Some(rule) = rules.get(id) else { continue };
        let Condition::Threshold { window, .. } = rule.condition else {
            continue;
        };
        let (span, _) = window.span_step_us();
        let due: Vec<i64> = series
            .windows
            .iter()
            .filter(|(start, acc)| acc.evaluated.is_none() && *start + span <= wm)
            .map(|(s, _)| *s)
            .collect();
        for start in due {
            evaluate(series, rule, device, start, span, backfill, false, out);
        }
        series
            .windows
            .retain(|start, acc| acc.evaluated.is_none() || start + span + lateness > wm);
        if let Some((start, _)) = series.windows.iter().find(|(_, a)| a.evaluated.is_none()) {
            next_due = next_due.min(start + span);
        }
    }
    t.next_due = next_due;
}

/// Notes a live reading for absence rules; `clock_ts` is its event time clamped as the
/// watermark takes it.
fn heard_from(
    d: &mut Device,
    rules: &ById<Arc<Rule>>,
    tenant: &str,
    r: &Reading,
    clock_ts: i64,
    now_us: i64,
    out: &mut Vec<Output>,
) {
    let death = is_death(r);
    let seen = d.seen.get_or_insert_with(|| Seen {
        last_arrival: now_us,
        last_ts: clock_ts,
        tags: if death {
            BTreeMap::new()
        } else {
            r.tags.clone()
        },
        absent: HashSet::new(),
        stale: false,
    });
    if death {
        // Silent from now on, by its own word: absence rules need not wait out their time.
        seen.stale = true;
        return;
    }
    seen.stale = false;
    seen.last_arrival = now_us;
    seen.last_ts = seen.last_ts.max(clock_ts);
    if seen.tags != r.tags {
        seen.tags = r.tags.clone();
    }
    if seen.absent.is_empty() {
        return;
    }
    for id in std::mem::take(&mut seen.absent) {
        if let Some(rule) = rules.get(&id) {
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
