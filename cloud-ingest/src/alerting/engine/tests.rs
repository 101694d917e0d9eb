//! The engine on a virtual clock: readings carry event times, `now` is whatever the test says.

use std::collections::BTreeMap;

use plantlink_model::{Reading, Timestamp};
use proptest::prelude::*;

use super::*;
use crate::alerting::rule::{Op, Selector, Window};

const S: i64 = 1_000_000;

fn rule(
    id: i64,
    aggregate: Aggregate,
    op: Op,
    threshold: f64,
    window: Window,
    for_windows: u32,
) -> Rule {
    Rule {
        id,
        tenant: "acme".into(),
        selector: Selector::default(),
        condition: Condition::Threshold {
            metric: "temperature".into(),
            aggregate,
            op,
            threshold,
            window,
            for_windows,
        },
        severity: "critical".into(),
    }
}

fn tumbling(seconds: u32) -> Window {
    Window::Tumbling { seconds }
}

fn reading(device: &str, ts_s: f64, value: f64) -> Reading {
    Reading::new(
        "acme",
        device,
        "temperature",
        Timestamp((ts_s * 1e6) as i64),
        value,
    )
}

/// Feeds readings (device, event second, value) at processing time = event time.
fn feed(e: &mut Engine, readings: &[(&str, f64, f64)], backfill: bool) -> Vec<Output> {
    let mut out = Vec::new();
    for (d, t, v) in readings {
        let r = reading(d, *t, *v);
        e.on_reading(
            Input {
                tenant: "acme",
                reading: &r,
                backfill,
            },
            r.ts.0,
            &mut out,
        );
    }
    out
}

fn alerts(out: &[Output]) -> Vec<(AlertState, i64, i64, f64, bool)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Alert(a) => Some((
                a.state,
                a.window_start_us / S,
                a.window_end_us / S,
                a.value,
                a.backfill,
            )),
            Output::Late { .. } => None,
        })
        .collect()
}

fn engine(rules: Vec<Rule>) -> Engine {
    let mut e = Engine::new(Settings::default());
    e.set_rules(rules);
    e
}

#[test]
fn a_tumbling_window_fires_when_the_watermark_passes_it_and_resolves_later() {
    let mut e = engine(vec![rule(1, Aggregate::Avg, Op::Gt, 80.0, tumbling(10), 1)]);
    // 90 for [0, 10): nothing until the watermark (newest - 1 s) reaches 10 s.
    let hot: Vec<(&str, f64, f64)> = (0..10).map(|t| ("p1", t as f64, 90.0)).collect();
    assert!(alerts(&feed(&mut e, &hot, false)).is_empty());
    assert!(alerts(&feed(&mut e, &[("p1", 10.5, 50.0)], false)).is_empty());
    let out = feed(&mut e, &[("p1", 11.0, 50.0)], false);
    assert_eq!(alerts(&out), vec![(AlertState::Firing, 0, 10, 90.0, false)]);
    // Cool for [10, 20): resolved once the watermark passes 20 s.
    let cool: Vec<(&str, f64, f64)> = (12..21).map(|t| ("p1", t as f64, 50.0)).collect();
    assert!(alerts(&feed(&mut e, &cool, false)).is_empty());
    let out = feed(&mut e, &[("p1", 21.0, 50.0)], false);
    assert_eq!(
        alerts(&out),
        vec![(AlertState::Resolved, 10, 20, 50.0, false)]
    );
}

#[test]
fn sliding_windows_overlap_and_each_is_evaluated() {
    // 10 s windows every 5 s; max > 100. One spike at 12 s is in [5, 15) and [10, 20).
    let mut e = engine(vec![rule(
        1,
        Aggregate::Max,
        Op::Gt,
        100.0,
        Window::Sliding {
            seconds: 10,
            every: 5,
        },
        1,
    )]);
    let mut rs: Vec<(&str, f64, f64)> = (0..30).map(|t| ("p1", t as f64, 1.0)).collect();
    rs[12].2 = 500.0;
    let got = alerts(&feed(&mut e, &rs, false));
    assert_eq!(
        got,
        vec![
            (AlertState::Firing, 5, 15, 500.0, false),
            (AlertState::Resolved, 15, 25, 1.0, false)
        ]
    );
}

#[test]
fn for_windows_needs_that_many_consecutive_windows() {
    let mut e = engine(vec![rule(1, Aggregate::Min, Op::Ge, 10.0, tumbling(5), 3)]);
    // Windows [0,5) hot, [5,10) cold, [10,25) hot: fires after the third hot window in a row.
    let rs: Vec<(&str, f64, f64)> = (0..40)
        .map(|t| {
            (
                "p1",
                t as f64,
                if (5..10).contains(&t) { 0.0 } else { 20.0 },
            )
        })
        .collect();
    let got = alerts(&feed(&mut e, &rs, false));
    assert_eq!(got, vec![(AlertState::Firing, 20, 25, 20.0, false)]);
}

#[test]
fn count_last_and_rate_aggregates() {
    let mut e = engine(vec![
        rule(1, Aggregate::Count, Op::Ge, 5.0, tumbling(10), 1),
        rule(2, Aggregate::Last, Op::Eq, 7.0, tumbling(10), 1),
        rule(3, Aggregate::Rate, Op::Gt, 1.5, tumbling(10), 1),
    ]);
    // [0, 10): readings every 2 s (5 of them), rising 2 per second, last value 7.
    let rs = [
        ("p1", 0.0, -1.0),
        ("p1", 2.0, 3.0),
        ("p1", 4.0, 5.0),
        ("p1", 6.0, 5.5),
        ("p1", 8.0, 7.0),
        ("p1", 11.0, 0.0),
    ];
    let out = feed(&mut e, &rs, false);
    let mut fired: Vec<(i64, f64)> = out
        .iter()
        .filter_map(|o| match o {
            Output::Alert(a) if a.state == AlertState::Firing => Some((a.rule_id, a.value)),
            _ => None,
        })
        .collect();
    fired.sort_by_key(|f| f.0);
    // Rate was 8 over 8 s = 1.0 per second, under 1.5: no alert for rule 3.
    assert_eq!(fired, vec![(1, 5.0), (2, 7.0)]);
}

#[test]
fn out_of_order_within_the_lateness_corrects_the_alert() {
    let mut e = engine(vec![rule(1, Aggregate::Avg, Op::Gt, 80.0, tumbling(10), 1)]);
    // [0, 10) evaluated with one cool reading; then the watermark moves on.
    let out = feed(&mut e, &[("p1", 1.0, 70.0), ("p1", 12.0, 70.0)], false);
    assert!(alerts(&out).is_empty());
    // A late hot reading for [0, 10), 2 s behind the watermark (lateness 30 s): avg 110.
    let out = feed(&mut e, &[("p1", 5.0, 150.0)], false);
    assert_eq!(
        alerts(&out),
        vec![(AlertState::Firing, 0, 10, 110.0, false)]
    );
    assert!(!out.iter().any(|o| matches!(o, Output::Late { .. })));
}

#[test]
fn readings_beyond_the_lateness_are_late_and_change_nothing() {
    let mut e = engine(vec![rule(1, Aggregate::Max, Op::Gt, 80.0, tumbling(10), 1)]);
    feed(&mut e, &[("p1", 1.0, 10.0), ("p1", 60.0, 10.0)], false);
    // [0, 10) ended 49 s before the watermark (59 s): past the 30 s lateness.
    let out = feed(&mut e, &[("p1", 5.0, 999.0)], false);
    assert!(alerts(&out).is_empty());
    assert_eq!(
        out,
        vec![Output::Late {
            rule_id: 1,
            device_id: "p1".into(),
            ts_us: 5 * S
        }]
    );
}

#[test]
fn backfill_is_evaluated_apart_and_marked() {
    let mut e = engine(vec![rule(1, Aggregate::Avg, Op::Gt, 80.0, tumbling(10), 1)]);
    // Live: hot now, firing.
    let live: Vec<(&str, f64, f64)> = (1000..1012).map(|t| ("p1", t as f64, 90.0)).collect();
    assert_eq!(
        alerts(&feed(&mut e, &live, false)),
        vec![(AlertState::Firing, 1000, 1010, 90.0, false)]
    );
    // The backlog of an hour ago crosses the threshold and comes back: a backfill pair,
    // and the live alert is untouched (no resolution from the cool backlog readings).
    let backlog: Vec<(&str, f64, f64)> = (0..40)
        .map(|t| {
            (
                "p1",
                t as f64,
                if (10..20).contains(&t) { 95.0 } else { 20.0 },
            )
        })
        .collect();
    let got = alerts(&feed(&mut e, &backlog, true));
    assert_eq!(
        got,
        vec![
            (AlertState::Firing, 10, 20, 95.0, true),
            (AlertState::Resolved, 20, 30, 20.0, true)
        ]
    );
    // Live carries on: still one open alert, resolved by live data only.
    let cool: Vec<(&str, f64, f64)> = (1012..1022).map(|t| ("p1", t as f64, 10.0)).collect();
    assert_eq!(
        alerts(&feed(&mut e, &cool, false)),
        vec![(AlertState::Resolved, 1010, 1020, 26.0, false)]
    );
}

#[test]
fn one_open_alert_per_rule_and_device() {
    let mut e = engine(vec![rule(1, Aggregate::Avg, Op::Gt, 80.0, tumbling(5), 1)]);
    let hot: Vec<(&str, f64, f64)> = (0..200)
        .flat_map(|t| [("a", t as f64, 90.0), ("b", t as f64, 90.0)])
        .collect();
    let out = feed(&mut e, &hot, false);
    let firing: Vec<&str> = out
        .iter()
        .filter_map(|o| match o {
            Output::Alert(a) => Some(a.device_id.as_str()),
            Output::Late { .. } => None,
        })
        .collect();
    assert_eq!(firing, vec!["a", "b"]);
    // State stays bounded: a few windows per series, not 40.
    assert!(e.window_count() <= 2 * 8, "{} windows", e.window_count());
}

#[test]
fn a_quiet_device_has_its_windows_closed_on_processing_time() {
    let mut e = engine(vec![rule(1, Aggregate::Max, Op::Gt, 80.0, tumbling(10), 1)]);
    let out = feed(&mut e, &[("p1", 3.0, 99.0)], false);
    assert!(alerts(&out).is_empty()); // the watermark is at 2 s
    let mut out = Vec::new();
    e.on_tick(3 * S + 5 * S, &mut out); // 5 s later: under bound + grace (6 s)
    assert!(out.is_empty());
    // Quiet, event time goes on with processing time: [0, 10) closes once bound + grace
    // (6 s) have passed since its end, i.e. at 16 s, not before.
    e.on_tick(15 * S, &mut out);
    assert!(out.is_empty(), "{out:?}");
    e.on_tick(16 * S, &mut out);
    assert_eq!(alerts(&out), vec![(AlertState::Firing, 0, 10, 99.0, false)]);
    // After the lateness the window goes; the firing series is kept.
    e.on_tick(16 * S + 30 * S, &mut out);
    assert_eq!(e.series_count(), 1);
    assert_eq!(e.window_count(), 0);
}

#[test]
fn absence_fires_after_the_silence_and_resolves_on_the_next_reading() {
    let mut tags = BTreeMap::new();
    tags.insert("device_type".to_owned(), "th-100".to_owned());
    let mut e = engine(vec![Rule {
        id: 9,
        tenant: "acme".into(),
        selector: Selector {
            device_type: Some("th-100".into()),
            ..Selector::default()
        },
        condition: Condition::Absence { seconds: 60 },
        severity: "warning".into(),
    }]);
    let mut out = Vec::new();
    let mut r = reading("s1", 100.0, 1.0);
    r.tags = tags.clone();
    e.on_reading(
        Input {
            tenant: "acme",
            reading: &r,
            backfill: false,
        },
        100 * S,
        &mut out,
    );
    let other = reading("x1", 100.0, 1.0); // not a th-100
    e.on_reading(
        Input {
            tenant: "acme",
            reading: &other,
            backfill: false,
        },
        100 * S,
        &mut out,
    );
    e.on_tick(159 * S, &mut out);
    assert!(alerts(&out).is_empty());
    e.on_tick(160 * S, &mut out);
    e.on_tick(170 * S, &mut out); // once
    let got: Vec<(i64, &str, AlertState)> = out
        .iter()
        .filter_map(|o| match o {
            Output::Alert(a) => Some((a.rule_id, a.device_id.as_str(), a.state)),
            Output::Late { .. } => None,
        })
        .collect();
    assert_eq!(got, vec![(9, "s1", AlertState::Firing)]);
    out.clear();
    // Backfill readings do not count as hearing from it; a live one does.
    let mut old = reading("s1", 50.0, 1.0);
    old.tags = tags.clone();
    e.on_reading(
        Input {
            tenant: "acme",
            reading: &old,
            backfill: true,
        },
        171 * S,
        &mut out,
    );
    assert!(alerts(&out).is_empty());
    let mut back = reading("s1", 172.0, 1.0);
    back.tags = tags;
    e.on_reading(
        Input {
            tenant: "acme",
            reading: &back,
            backfill: false,
        },
        172 * S,
        &mut out,
    );
    assert_eq!(alerts(&out).len(), 1);
    assert!(
        matches!(&out[0], Output::Alert(a) if a.state == AlertState::Resolved && a.rule_id == 9)
    );
}

#[test]
fn replayed_readings_count_once() {
    let mut e = engine(vec![rule(
        1,
        Aggregate::Count,
        Op::Gt,
        3.0,
        tumbling(10),
        1,
    )]);
    let rs = [("p1", 1.0, 1.0), ("p1", 2.0, 1.0), ("p1", 3.0, 1.0)];
    feed(&mut e, &rs, false);
    feed(&mut e, &rs, false); // a replay of the same batch
    let out = feed(&mut e, &[("p1", 12.0, 1.0)], false);
    assert!(alerts(&out).is_empty(), "three readings, not six");
}

#[test]
fn changing_the_rules_drops_their_state() {
    let mut e = engine(vec![rule(1, Aggregate::Avg, Op::Gt, 80.0, tumbling(10), 1)]);
    feed(&mut e, &[("p1", 1.0, 90.0)], false);
    assert_eq!(e.series_count(), 1);
    e.set_rules(vec![rule(1, Aggregate::Avg, Op::Gt, 85.0, tumbling(10), 1)]);
    assert_eq!(e.series_count(), 0);
    e.set_rules(vec![]);
    feed(&mut e, &[("p1", 2.0, 90.0)], false);
    assert_eq!(e.series_count(), 0);
}

#[test]
fn a_reading_stamped_a_day_ahead_does_not_freeze_the_device() {
    // The same correct readings with and without one reading stamped a day ahead in the
    // middle: the alerts are the same. Without the clamp its watermark would jump a day
    // ahead and every correct reading after it would be late.
    let rules = || vec![rule(1, Aggregate::Avg, Op::Gt, 80.0, tumbling(10), 1)];
    let before: Vec<(&str, f64, f64)> = (0..12).map(|t| ("p1", t as f64, 90.0)).collect();
    let after: Vec<(&str, f64, f64)> = (12..45)
        .map(|t| ("p1", t as f64, if t < 30 { 20.0 } else { 95.0 }))
        .collect();
    let mut clean = engine(rules());
    let mut expected = alerts(&feed(&mut clean, &before, false));
    expected.extend(alerts(&feed(&mut clean, &after, false)));
    assert_eq!(
        expected,
        vec![
            (AlertState::Firing, 0, 10, 90.0, false),
            (AlertState::Resolved, 10, 20, 34.0, false),
            (AlertState::Firing, 30, 40, 95.0, false),
        ]
    );

    let mut e = engine(rules());
    let mut got = alerts(&feed(&mut e, &before, false));
    let ahead = reading("p1", 86_400.0, 20.0);
    let mut out = Vec::new();
    e.on_reading(
        Input {
            tenant: "acme",
            reading: &ahead,
            backfill: false,
        },
        (11.5 * S as f64) as i64, // processing time: just after the correct readings
        &mut out,
    );
    assert!(out.is_empty(), "{out:?}");
    let out = feed(&mut e, &after, false);
    assert!(
        !out.iter().any(|o| matches!(o, Output::Late { .. })),
        "no correct reading is late: {out:?}"
    );
    got.extend(alerts(&out));
    assert_eq!(got, expected);
    // Quiet time on processing time closes the open windows, not the day-ahead one.
    let mut out = Vec::new();
    e.on_tick(60 * S, &mut out);
    assert!(
        alerts(&out).iter().all(|a| a.1 < 86_400),
        "{:?}",
        alerts(&out)
    );
}

proptest! {
    /// Whatever arrives, in whatever order: per (rule, device, lane) transitions alternate
    /// firing/resolved starting with firing, so at most one alert is open.
    #[test]
    fn transitions_alternate(
        readings in prop::collection::vec((0u8..3, 0i64..300, 0.0f64..200.0, any::<bool>()), 1..400),
        window in 1u32..20,
        for_windows in 1u32..4,
    ) {
        let mut e = engine(vec![
            rule(1, Aggregate::Avg, Op::Gt, 100.0, tumbling(window), for_windows),
            rule(2, Aggregate::Max, Op::Ge, 150.0, Window::Sliding { seconds: window * 2, every: window }, 1),
        ]);
        let mut out = Vec::new();
        let mut now = 0;
        for (d, t, v, backfill) in readings {
            let r = reading(["a", "b", "c"][d as usize], t as f64, v);
            now += 100_000;
            e.on_reading(Input { tenant: "acme", reading: &r, backfill }, now, &mut out);
            if t % 17 == 0 {
                e.on_tick(now, &mut out);
            }
        }
        e.on_tick(now + 3600 * S, &mut out);
        let mut open: std::collections::HashMap<(i64, String, bool), bool> = Default::default();
        for o in &out {
            if let Output::Alert(a) = o {
                let was = open.insert((a.rule_id, a.device_id.clone(), a.backfill), a.state == AlertState::Firing);
                prop_assert_eq!(was.unwrap_or(false), a.state == AlertState::Resolved, "{:?}", a);
            }
        }
        // Bounded: after everyone went quiet, only firing series remain, with no windows.
        prop_assert_eq!(e.window_count(), 0);
    }
}

// --- Per-tenant quotas and the rule index ---

/// A catch-all threshold rule of `tenant` on `metric`: avg > `threshold` over 2 s.
fn tenant_rule(id: i64, tenant: &str, metric: &str, device: Option<&str>, threshold: f64) -> Rule {
    Rule {
        id,
        tenant: tenant.into(),
        selector: Selector {
            device_id: device.map(str::to_owned),
            ..Selector::default()
        },
        condition: Condition::Threshold {
            metric: metric.into(),
            aggregate: Aggregate::Avg,
            op: Op::Gt,
            threshold,
            window: tumbling(2),
            for_windows: 1,
        },
        severity: "critical".into(),
    }
}

fn absence_rule(id: i64, tenant: &str, seconds: u32) -> Rule {
    Rule {
        id,
        tenant: tenant.into(),
        selector: Selector::default(),
        condition: Condition::Absence { seconds },
        severity: "warning".into(),
    }
}

fn at(e: &mut Engine, tenant: &str, device: &str, metric: &str, ts_us: i64, v: f64) -> Vec<Output> {
    let r = Reading::new(tenant, device, metric, Timestamp(ts_us), v);
    let mut out = Vec::new();
    e.on_reading(
        Input {
            tenant,
            reading: &r,
            backfill: false,
        },
        ts_us,
        &mut out,
    );
    out
}

/// (tenant, rule, device, state) of the alerts.
fn who(out: &[Output]) -> Vec<(String, i64, String, AlertState)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Alert(a) => Some((a.tenant.clone(), a.rule_id, a.device_id.clone(), a.state)),
            Output::Late { .. } => None,
        })
        .collect()
}

fn small_caps() -> Settings {
    Settings {
        max_series_per_tenant: 500,
        max_devices_per_tenant: 1_000,
        max_rules_per_tenant: 3,
        ..Settings::default()
    }
}

#[test]
fn a_tenant_over_its_series_and_device_caps_does_not_stop_another_tenants_alert() {
    // A: pump-1 avg > 80 over 2 s windows. B: a catch-all rule on the same metric, and
    // 200,000 invented device ids, all hot, interleaved with A's readings.
    let rules = || {
        vec![
            tenant_rule(1, "a", "temperature", Some("pump-1"), 80.0),
            tenant_rule(2, "b", "temperature", None, 80.0),
        ]
    };
    let a_alone = {
        let mut e = Engine::new(small_caps());
        e.set_rules(rules());
        let mut out = Vec::new();
        for i in 0..40 {
            out.extend(at(&mut e, "a", "pump-1", "temperature", i * S / 10, 95.0));
        }
        who(&out)
    };
    assert_eq!(
        a_alone,
        vec![("a".to_owned(), 1, "pump-1".to_owned(), AlertState::Firing)]
    );

    let mut e = Engine::new(small_caps());
    e.set_rules(rules());
    let mut a_out = Vec::new();
    let mut b_firing = 0;
    let mut id = 0u64;
    for i in 0..40 {
        let ts = i * S / 10;
        for _ in 0..5_000 {
            id += 1;
            b_firing += who(&at(
                &mut e,
                "b",
                &format!("fake-{id}"),
                "temperature",
                ts,
                99.0,
            ))
            .len();
        }
        a_out.extend(at(&mut e, "a", "pump-1", "temperature", ts, 95.0));
    }
    // A's alert fires exactly as it does alone: same window, same reading.
    assert_eq!(who(&a_out), a_alone);
    // B got what its caps allow, and the rest is counted, for B only.
    let b = e.quota("b").unwrap().clone();
    assert_eq!((b.series, b.devices), (500, 1_000));
    assert_eq!(
        b.series_dropped, 500,
        "devices 501..=1000: tracked, no series"
    );
    assert_eq!(b.devices_dropped, 200_000 - 1_000);
    assert!(b_firing <= 500);
    let a = e.quota("a").unwrap();
    assert_eq!(
        (a.series, a.devices, a.series_dropped, a.devices_dropped),
        (1, 1, 0, 0)
    );
    // Once B's fakes go quiet their state goes, and new B devices are tracked again.
    let mut out = Vec::new();
    e.on_tick(3_600 * S, &mut out);
    let b = e.quota("b").unwrap();
    assert!(b.devices <= b.series && b.series <= 500, "{b:?}");
    assert_eq!(e.series_count(), b.series + e.quota("a").unwrap().series);
}

#[test]
fn rules_over_the_tenant_cap_are_counted_and_not_evaluated() {
    // B has ten rules (ids 1..=10), A two (11, 12); the cap is three per tenant. B's first
    // three by id are active, whatever the order they come in.
    let mut rules: Vec<Rule> = (1..=10)
        .rev()
        .map(|id| tenant_rule(id, "b", &format!("m{id}"), None, 0.0))
        .collect();
    rules.push(tenant_rule(11, "a", "m11", None, 0.0));
    rules.push(tenant_rule(12, "a", "m12", None, 0.0));
    let mut e = Engine::new(small_caps());
    e.set_rules(rules);
    let b = e.quota("b").unwrap();
    assert_eq!((b.rules, b.rules_over_cap), (3, 7));
    let a = e.quota("a").unwrap();
    assert_eq!((a.rules, a.rules_over_cap), (2, 0));
    // Readings for each rule's metric, then one closing the window: only active rules fire.
    let mut fired = Vec::new();
    for (tenant, id) in (1..=10).map(|i| ("b", i)).chain([("a", 11), ("a", 12)]) {
        let (m, d) = (format!("m{id}"), format!("d{id}"));
        fired.extend(who(&at(&mut e, tenant, &d, &m, S / 2, 1.0)));
        fired.extend(who(&at(&mut e, tenant, &d, &m, 4 * S, 1.0)));
    }
    let ids: Vec<i64> = fired.iter().map(|f| f.1).collect();
    assert_eq!(ids, vec![1, 2, 3, 11, 12]);
    // Fewer rules: nothing over the cap any more.
    e.set_rules(vec![tenant_rule(1, "b", "m1", None, 0.0)]);
    let b = e.quota("b").unwrap();
    assert_eq!((b.rules, b.rules_over_cap), (1, 0));
}

/// A's rules: a catch-all, one for pump-1, 100 for other devices, and an absence rule.
fn a_rules() -> Vec<Rule> {
    let mut v = vec![
        tenant_rule(1, "a", "temperature", None, 80.0),
        tenant_rule(2, "a", "temperature", Some("pump-1"), 50.0),
        absence_rule(3, "a", 30),
    ];
    v.extend(
        (0..100).map(|i| tenant_rule(10 + i, "a", "temperature", Some(&format!("other-{i}")), 1.0)),
    );
    v
}

/// 50,000 rules of B: catch-alls on A's metric, rules for A's device names, absence
/// rules, other metrics.
fn b_rules() -> Vec<Rule> {
    (0..50_000)
        .map(|i| {
            let id = 1_000_000 + i;
            match i % 4 {
                0 => tenant_rule(id, "b", "temperature", None, 80.0),
                1 => tenant_rule(id, "b", "temperature", Some("pump-1"), 80.0),
                2 => absence_rule(id, "b", 30),
                _ => tenant_rule(id, "b", &format!("m{i}"), Some(&format!("d{i}")), 80.0),
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
    /// Whatever A sends, 50,000 rules of B change neither what A's readings and ticks cost
    /// in rule visits nor what they produce.
    #[test]
    fn another_tenants_rules_do_not_change_a_readings_lookup_cost(
        readings in prop::collection::vec((0u8..3, 0i64..120, 0.0f64..120.0), 1..200),
    ) {
        let settings = Settings { max_rules_per_tenant: 100_000, ..Settings::default() };
        let mut alone = Engine::new(settings);
        alone.set_rules(a_rules());
        let mut crowded = Engine::new(settings);
        let mut all = a_rules();
        all.extend(b_rules());
        crowded.set_rules(all);
        prop_assert_eq!(crowded.quota("b").map(|q| q.rules), Some(50_000));
        let (mut out1, mut out2) = (Vec::new(), Vec::new());
        let mut expected_visits = 0;
        for (n, (d, t, v)) in readings.into_iter().enumerate() {
            let device = ["pump-1", "other-7", "new"][d as usize];
            // pump-1: its own rule and the catch-all; other-7: likewise; new: the catch-all.
            expected_visits += if device == "new" { 1 } else { 2 };
            let ts = t * S;
            out1.extend(at(&mut alone, "a", device, "temperature", ts, v));
            out2.extend(at(&mut crowded, "a", device, "temperature", ts, v));
            if n % 10 == 0 {
                alone.on_tick(ts + 40 * S, &mut out1);
                crowded.on_tick(ts + 40 * S, &mut out2);
            }
        }
        // The same outputs (devices are visited in hash order on ticks, so compare sorted).
        let sorted = |o: &[Output]| {
            let mut v: Vec<String> = o.iter().map(|x| format!("{x:?}")).collect();
            v.sort();
            v
        };
        prop_assert!(sorted(&out1) == sorted(&out2), "outputs differ");
        prop_assert_eq!(alone.rule_visits(), crowded.rule_visits());
        prop_assert!(alone.rule_visits() >= expected_visits);
        // The excess over the readings' visits is ticks visiting A's one absence rule per
        // device: at most 3 devices per tick.
        prop_assert!(alone.rule_visits() <= expected_visits + 3 * 20);
    }
}

#[test]
fn a_death_certificate_fires_absence_at_the_next_tick_and_a_birth_resolves_it() {
    let mut e = engine(vec![absence_rule(4, "acme", 600)]);
    let mut out = at(
        &mut e,
        "acme",
        "plant/line1/press",
        "temperature",
        100 * S,
        20.0,
    );
    e.on_tick(101 * S, &mut out);
    assert!(alerts(&out).is_empty());
    // `online` = 0 with event=death: silent by its own word.
    let mut death = Reading::new(
        "acme",
        "plant/line1/press",
        "online",
        Timestamp(102 * S),
        0.0,
    );
    death.tags.insert("event".into(), "death".into());
    assert!(is_death(&death));
    e.on_reading(
        Input {
            tenant: "acme",
            reading: &death,
            backfill: false,
        },
        102 * S,
        &mut out,
    );
    assert!(alerts(&out).is_empty(), "the death itself is no alert");
    e.on_tick(103 * S, &mut out);
    e.on_tick(104 * S, &mut out); // once
    let states: Vec<AlertState> = out
        .iter()
        .filter_map(|o| match o {
            Output::Alert(a) => Some(a.state),
            Output::Late { .. } => None,
        })
        .collect();
    assert_eq!(states, vec![AlertState::Firing]);
    // A death of a device never heard from also counts; a zero without the tag does not.
    let mut zero = Reading::new("acme", "other", "online", Timestamp(102 * S), 0.0);
    assert!(!is_death(&zero));
    zero.tags.insert("event".into(), "birth".into());
    assert!(!is_death(&zero));
    // The birth (online = 1) resolves it.
    out.clear();
    let mut birth = Reading::new(
        "acme",
        "plant/line1/press",
        "online",
        Timestamp(110 * S),
        1.0,
    );
    birth.tags.insert("event".into(), "birth".into());
    e.on_reading(
        Input {
            tenant: "acme",
            reading: &birth,
            backfill: false,
        },
        110 * S,
        &mut out,
    );
    let states: Vec<AlertState> = out
        .iter()
        .filter_map(|o| match o {
            Output::Alert(a) => Some(a.state),
            Output::Late { .. } => None,
        })
        .collect();
    assert_eq!(states, vec![AlertState::Resolved]);
}
