use super::*;

/// 2026-11-21T08:00:00Z.
const NOW: i64 = 1_795_248_000_000_000;
/// The default `[api] max_raw_range_days`.
const WEEK: i64 = 7 * DAY_US;

fn q(pairs: &[(&str, &str)]) -> QueryMap {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The 400's message.
fn refused<T: std::fmt::Debug>(r: Result<T, ApiError>) -> String {
    let e = r.unwrap_err();
    assert_eq!(e.0, StatusCode::BAD_REQUEST, "{e:?}");
    e.1
}

#[test]
fn a_time_is_rfc_3339_or_epoch_milliseconds() {
    assert_eq!(time("from", "2026-11-21T08:00:00Z").unwrap(), NOW);
    assert_eq!(
        time("from", "2026-11-21T09:00:00.5+01:00").unwrap(),
        NOW + 500_000
    );
    assert_eq!(time("to", "1795248000000").unwrap(), NOW);
    assert_eq!(time("to", "-1").unwrap(), -1000);
}

#[test]
fn a_bad_time_names_its_parameter_and_the_formats() {
    assert_eq!(
        refused(time("from", "yesterday")),
        "parameter from: \"yesterday\" is not a time; give RFC 3339 (2026-11-21T08:00:00Z) or epoch milliseconds"
    );
    assert!(refused(time("to", "2026-13-01T00:00:00Z")).starts_with("parameter to: "));
    assert_eq!(
        refused(time("to", "9223372036854775807")),
        "parameter to: 9223372036854775807 is out of range"
    );
}

#[test]
fn an_unknown_parameter_is_refused_by_name_with_the_known_ones() {
    let names = ["metric", "from", "to", "resolution", "limit"];
    assert!(known(&q(&[("metric", "t"), ("limit", "5")]), &names).is_ok());
    assert_eq!(
        refused(known(&q(&[("metrics", "t")]), &names)),
        "parameter metrics: unknown; expected one of metric, from, to, resolution, limit"
    );
    // Of several, always the same one.
    let two = q(&[("zz", "1"), ("aa", "1"), ("from", "1")]);
    assert!(refused(known(&two, &names)).starts_with("parameter aa: "));
}

#[test]
fn limit_is_from_one_to_max_and_defaults_when_absent() {
    assert_eq!(limit(&q(&[]), 10_000, MAX_POINTS).unwrap(), 10_000);
    assert_eq!(limit(&q(&[("limit", "1")]), 10, 50).unwrap(), 1);
    assert_eq!(limit(&q(&[("limit", "50")]), 10, 50).unwrap(), 50);
    for v in ["0", "51", "-3", "ten", ""] {
        assert_eq!(
            refused(limit(&q(&[("limit", v)]), 10, 50)),
            format!("parameter limit: {v:?} is not a number from 1 to 50")
        );
    }
}

#[test]
fn the_range_defaults_to_the_hour_before_now_and_from_must_come_first() {
    let hour = Range::parse(&q(&[]), NOW).unwrap();
    assert_eq!((hour.from_us, hour.to_us), (NOW - HOUR_US, NOW));
    let to = Range::parse(&q(&[("to", "1000")]), NOW).unwrap();
    assert_eq!((to.from_us, to.to_us), (1_000_000 - HOUR_US, 1_000_000));
    for (from, to) in [("2000", "1000"), ("1000", "1000")] {
        assert_eq!(
            refused(Range::parse(&q(&[("from", from), ("to", to)]), NOW)),
            "parameter from: must be before to"
        );
    }
    // `to` is read first.
    let both = q(&[("from", "x"), ("to", "y")]);
    assert!(refused(Range::parse(&both, NOW)).starts_with("parameter to: "));
}

#[test]
fn the_range_default_does_not_overflow_at_the_earliest_time() {
    let r = Range::parse(&q(&[("to", "-9223372036854775")]), NOW).unwrap();
    assert_eq!(r.from_us, i64::MIN);
}

#[test]
fn auto_reads_raw_up_to_two_days_hourly_up_to_ninety_and_daily_beyond() {
    let span = |us: i64| Range {
        from_us: NOW - us,
        to_us: NOW,
    };
    for (us, want) in [
        (1, Resolution::Raw),
        (2 * DAY_US, Resolution::Raw),
        (2 * DAY_US + 1, Resolution::Hour),
        (90 * DAY_US, Resolution::Hour),
        (90 * DAY_US + 1, Resolution::Day),
        (i64::MAX, Resolution::Day),
    ] {
        assert_eq!(Resolution::auto(span(us), WEEK), want, "{us} µs");
    }
    let whole = Range {
        from_us: i64::MIN,
        to_us: i64::MAX,
    };
    assert_eq!(Resolution::auto(whole, WEEK), Resolution::Day);
}

#[test]
fn an_explicit_resolution_wins_over_auto() {
    let day = Range {
        from_us: NOW - DAY_US,
        to_us: NOW,
    };
    for (v, want) in [
        ("raw", Resolution::Raw),
        ("1h", Resolution::Hour),
        ("1d", Resolution::Day),
        ("auto", Resolution::Raw),
    ] {
        let got = Resolution::parse(&q(&[("resolution", v)]), day, WEEK).unwrap();
        assert_eq!((got, got.name()), (want, v.replace("auto", "raw").as_str()));
    }
    assert_eq!(
        Resolution::parse(&q(&[]), day, WEEK).unwrap(),
        Resolution::Raw
    );
    assert_eq!(
        refused(Resolution::parse(&q(&[("resolution", "5m")]), day, WEEK)),
        "parameter resolution: \"5m\" is not one of raw, 1h, 1d, auto"
    );
    assert_eq!(Resolution::Raw.rollup(), None);
    assert_eq!(Resolution::Hour.rollup(), Some(Rollup::Hour));
    assert_eq!(Resolution::Day.rollup(), Some(Rollup::Day));
}

#[test]
fn series_parameters_default_and_an_empty_metric_means_all() {
    let p = SeriesParams::parse(&q(&[("metric", "")]), NOW, WEEK).unwrap();
    assert_eq!(
        p,
        SeriesParams {
            metric: None,
            range: Range {
                from_us: NOW - HOUR_US,
                to_us: NOW
            },
            resolution: Resolution::Raw,
            limit: 10_000,
        }
    );
    let p =
        SeriesParams::parse(&q(&[("metric", "temperature"), ("limit", "5")]), NOW, WEEK).unwrap();
    assert_eq!((p.metric.as_deref(), p.limit), (Some("temperature"), 5));
    assert!(
        refused(SeriesParams::parse(&q(&[("limit", "100001")]), NOW, WEEK))
            .starts_with("parameter limit: ")
    );
    assert!(
        refused(SeriesParams::parse(&q(&[("agg", "avg")]), NOW, WEEK))
            .starts_with("parameter agg: ")
    );
}

#[test]
fn an_aggregate_needs_a_metric_and_a_known_agg() {
    assert_eq!(
        refused(AggregateParams::parse(&q(&[]), NOW, WEEK)),
        "parameter metric: required, e.g. metric=temperature"
    );
    assert!(
        refused(AggregateParams::parse(&q(&[("metric", "")]), NOW, WEEK))
            .starts_with("parameter metric: ")
    );
    let p = AggregateParams::parse(&q(&[("metric", "t")]), NOW, WEEK).unwrap();
    assert_eq!((p.metric.as_str(), p.agg), ("t", Agg::Avg));
    for agg in Agg::ALL {
        let p =
            AggregateParams::parse(&q(&[("metric", "t"), ("agg", agg.name())]), NOW, WEEK).unwrap();
        assert_eq!(p.agg, agg);
    }
    for v in ["median", ""] {
        assert_eq!(
            refused(AggregateParams::parse(
                &q(&[("metric", "t"), ("agg", v)]),
                NOW,
                WEEK
            )),
            format!("parameter agg: {v:?} is not one of avg, min, max, count")
        );
    }
    assert!(
        refused(AggregateParams::parse(
            &q(&[("metric", "t"), ("limit", "5")]),
            NOW,
            WEEK
        ))
        .starts_with("parameter limit: unknown")
    );
}

#[test]
fn alert_filters_default_to_everything_up_to_a_day_ahead() {
    let p = AlertParams::parse(&q(&[("state", ""), ("backfill", "")]), NOW).unwrap();
    assert_eq!(
        p,
        AlertParams {
            state: None,
            backfill: None,
            from_us: EARLIEST_ALERT_US,
            to_us: NOW + DAY_US,
            limit: 1_000,
        }
    );
    let p = AlertParams::parse(
        &q(&[
            ("state", "resolved"),
            ("backfill", "true"),
            ("from", "-9223372036854775"),
        ]),
        NOW,
    )
    .unwrap();
    assert_eq!(
        (p.state, p.backfill, p.from_us),
        (Some(AlertState::Resolved), Some(true), EARLIEST_ALERT_US)
    );
    let p = AlertParams::parse(&q(&[("state", "firing"), ("backfill", "false")]), NOW).unwrap();
    assert_eq!(
        (p.state, p.backfill),
        (Some(AlertState::Firing), Some(false))
    );
}

#[test]
fn bad_alert_filters_name_the_parameter() {
    assert_eq!(
        refused(AlertParams::parse(&q(&[("state", "open")]), NOW)),
        "parameter state: \"open\" is not one of firing, resolved"
    );
    assert_eq!(
        refused(AlertParams::parse(&q(&[("backfill", "yes")]), NOW)),
        "parameter backfill: \"yes\" is not true or false"
    );
    assert!(
        refused(AlertParams::parse(&q(&[("limit", "10001")]), NOW))
            .starts_with("parameter limit: \"10001\" is not a number from 1 to 10000")
    );
    assert!(
        refused(AlertParams::parse(&q(&[("resolution", "1h")]), NOW))
            .starts_with("parameter resolution: unknown")
    );
}

/// `from` to `to` (µs before NOW) at `resolution`, as a query string.
fn span_query(span_us: i64, resolution: &str) -> QueryMap {
    let ms = |us: i64| (us / 1000).to_string();
    q(&[
        ("metric", "t"),
        ("from", &ms(NOW - span_us)),
        ("to", &ms(NOW)),
        ("resolution", resolution),
    ])
}

#[test]
fn raw_reads_at_most_the_raw_range_and_the_400_names_the_limit_and_the_way_out() {
    let ok = SeriesParams::parse(&span_query(WEEK, "raw"), NOW, WEEK).unwrap();
    assert_eq!(ok.resolution, Resolution::Raw);
    assert_eq!(
        refused(SeriesParams::parse(
            &span_query(WEEK + 1000, "raw"),
            NOW,
            WEEK
        )),
        "parameter resolution: raw readings are read over at most 7 days ([api] \
         max_raw_range_days) and this range is 8 days; use resolution=1h, 1d or auto, or a \
         shorter range (from, to)"
    );
    // Ten years, on both endpoints that read raw readings over a range.
    let ten_years = span_query(3653 * DAY_US, "raw");
    for msg in [
        refused(SeriesParams::parse(&ten_years, NOW, WEEK)),
        refused(AggregateParams::parse(&ten_years, NOW, WEEK)),
    ] {
        assert!(msg.contains("at most 7 days"), "{msg}");
        assert!(msg.contains("this range is 3653 days"), "{msg}");
        assert!(msg.contains("resolution=1h, 1d or auto"), "{msg}");
    }
    // The whole time line is refused without overflowing.
    let whole = q(&[
        ("from", "-9223372036854775"),
        ("to", "9223372036854775"),
        ("resolution", "raw"),
    ]);
    assert!(refused(SeriesParams::parse(&whole, NOW, WEEK)).starts_with("parameter resolution: "));
}

#[test]
fn rollups_and_auto_never_trip_the_raw_limit() {
    for res in ["1h", "1d", "auto"] {
        let p = SeriesParams::parse(&span_query(3653 * DAY_US, res), NOW, WEEK).unwrap();
        assert_ne!(p.resolution, Resolution::Raw, "{res}");
        AggregateParams::parse(&span_query(3653 * DAY_US, res), NOW, WEEK).unwrap();
    }
    // A raw limit under auto's two days moves auto to the hourly rollup sooner.
    let day = DAY_US;
    for (span, want) in [
        (day, Resolution::Raw),
        (day + 1000, Resolution::Hour),
        (2 * DAY_US, Resolution::Hour),
    ] {
        let p = SeriesParams::parse(&span_query(span, "auto"), NOW, day).unwrap();
        assert_eq!(p.resolution, want, "{span} µs");
    }
}
