//! The fleet console (`/console` on the API's listener) in a real headless Chromium, driven
//! by Debian's chromedriver, against a real stack: an agent reading Mosquitto, cloud-ingest
//! over QUIC with alerting on, and PostgreSQL.
//!
//! It signs in with tenant acme's token; sees the gateway connected and its devices; sees the
//! overheating alert open; opens a device's chart (points drawn from raw readings, then the
//! min/max band of the hourly rollup over 30 days); creates, edits and deletes a rule through
//! the form; then signs in as tenant globex and sees none of acme's gateway or devices, while
//! a request for acme's device from the console is answered 404, as from the API.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::net::SocketAddr;

use cloud_ingest::config::{Alerting, Api};
use cloud_ingest::server::Server;
use common::{Browser, Dir};
use serde_json::json;

const ACME: &str = "acme-console-token";
const GLOBEX: &str = "globex-console-token";

fn reading(device: &str, metric: &str, value: f64, ts_ms: i64) -> (String, String) {
    (
        format!("plant/p1/l1/{device}"),
        format!(
            r#"{{"sensor_id": "{device}", "measurement": "{metric}", "value": {value}, "ts": {ts_ms}}}"#
        ),
    )
}

/// Signs in with `token` at the sign-in form.
fn sign_in(b: &Browser, token: &str) {
    b.wait(
        "the sign-in form",
        "!document.querySelector('#signin').hidden",
    );
    b.type_into("#token", token);
    b.click("#signin-button");
}

/// Creates a threshold rule through the form on the alerts view and waits until it is
/// listed; returns its id.
fn create_rule(b: &Browser, name: &str, metric: &str, threshold: &str) -> String {
    b.wait("the rule form", "document.querySelector('#rule-form')");
    b.type_into("#rule-name", name);
    b.type_into("#rule-metric", metric);
    b.type_into("#rule-threshold", threshold);
    b.click("#rule-save");
    b.wait(
        "the new rule listed",
        &format!(
            "[...document.querySelectorAll('#rules tr[data-rule]')].some(r => \
             r.textContent.includes('{name}') && r.textContent.includes('{threshold}'))"
        ),
    );
    b.script(
        &format!(
            "return [...document.querySelectorAll('#rules tr[data-rule]')]\
             .find(r => r.textContent.includes('{name}')).dataset.rule"
        ),
        json!([]),
    )
    .as_str()
    .unwrap()
    .to_owned()
}

/// Deletes rule `id` with its button, confirming, and waits until it is gone.
fn delete_rule(b: &Browser, id: &str) {
    b.click(&format!("#rules tr[data-rule=\"{id}\"] button.delete"));
    b.accept_alert();
    b.wait(
        "the rule deleted",
        &format!("document.querySelector('#rules') && !document.querySelector('#rules tr[data-rule=\"{id}\"]')"),
    );
}

/// Signs out and in again with another tenant's `token`: the fleet view names neither
/// `gateway` nor `device`, and a request for the device from the console is a 404.
fn other_tenant_sees_none_of_it(b: &Browser, token: &str, gateway: &str, device: &str) {
    b.click("#signout");
    b.wait("signed out", "!document.querySelector('#signin').hidden");
    sign_in(b, token);
    b.wait(
        "the other tenant's fleet",
        "document.querySelector('#gateways') && document.querySelector('#devices')",
    );
    let seen = b.script(
        "return document.querySelector('#view').textContent",
        json!([]),
    );
    let seen = seen.as_str().unwrap();
    assert!(!seen.contains(gateway) && !seen.contains(device), "{seen}");
    let status = b.script_async(
        &format!(
            "const done = arguments[arguments.length - 1];
             fetch('/v1/devices/{device}/metrics/latest', {{headers: {{Authorization: 'Bearer ' + sessionStorage.getItem('plantlink-token')}}}})
               .then(r => done(r.status), e => done(String(e)));"
        ),
        json!([]),
    );
    assert_eq!(status, json!(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_shows_a_tenants_fleet_charts_and_alerts_and_edits_rules() {
    let d = Dir::new("console");
    common::fleet(&d.0, "gw-console");
    let pid = std::process::id();
    let db = format!("plantlink_test_console_{pid}");
    let (admin, url, pgc) = common::database(&db).await;
    let api: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    let config = {
        let mut c = common::cloud_config(&d.0, url, 16, 8 << 20);
        c.postgres.rollup_interval_ms = 200;
        c.api = Some(Api::new(
            api,
            [
                ("acme".to_owned(), ACME.to_owned()),
                ("globex".to_owned(), GLOBEX.to_owned()),
            ]
            .into(),
        ));
        c.alerting = Alerting {
            tick_ms: 100,
            rules_reload_ms: 200,
            out_of_orderness_ms: 1_000,
            ..Alerting::default()
        };
        c
    };
    let server = Server::bind(config).unwrap();
    let cloud_addr = server.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(stop_rx.clone()));
    common::api_up(api).await;
    let (st, body) = common::http_json(
        api,
        "POST",
        "/v1/alert-rules",
        ACME,
        Some(&json!({"name": "overheating", "metric": "temperature",
            "selector": {"device_id": "press01"}, "aggregate": "avg", "op": ">",
            "threshold": 80.0, "window": {"kind": "tumbling", "seconds": 2},
            "severity": "critical"})),
    );
    assert_eq!(st, 201, "{body}");

    // The agent, and an hour of press01's temperature: cool, then hot for the last 20 s.
    let broker = common::Mosquitto::start(&d.0);
    let client_id = format!("gw-console-{pid}");
    let agent = common::Agent {
        gateway: "gw-console",
        mqtt: Some((broker.port, &client_id, "plant/{site}/{line}/{device}")),
        cloud: cloud_addr.to_string(),
        store: "",
        uplink: "batch_max_readings = 500\nbatch_linger_ms = 20",
    }
    .config(&d.0);
    common::create_session(broker.port, &client_id).await;
    let mut agent_stop = stop_rx.clone();
    let agent = tokio::spawn(edge_agent::agent::run_until(agent, async move {
        let _ = agent_stop.changed().await;
    }));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut messages: Vec<(String, String)> = (0..120)
        .map(|i| {
            let t = now_ms - 3_600_000 + i * 30_000;
            reading("press01", "temperature", 60.0 + (i % 10) as f64, t)
        })
        .collect();
    messages.extend(
        (0..20).map(|i| reading("press01", "temperature", 95.0, now_ms - 20_000 + i * 1000)),
    );
    messages.extend((0..5).map(|i| reading("press02", "pressure", 6.5, now_ms - 5_000 + i * 1000)));
    common::publish_all(broker.port, &format!("pub-{pid}"), messages).await;

    let console = format!("http://{api}/console");
    let profile = d.0.join("chromium");
    let browsing = tokio::task::spawn_blocking(move || {
        let b = Browser::start(&profile, 1000);
        b.open(&console);
        sign_in(&b, ACME);
        b.wait(
            "the gateway connected",
            r#"document.querySelector('#gateways tr[data-gateway="gw-console"][data-state="connected"]')"#,
        );
        // The agent and the cloud speak uplink revision 1.1: the oldest queued reading's age
        // is reported (a number, 0 when the queue is empty), not "not reported".
        b.wait(
            "the gateway's oldest queued reading reported",
            r#"(() => { const c = document.querySelector('#gateways tr[data-gateway="gw-console"] td:nth-child(4)');
                return c && c.dataset.value !== '' && !c.textContent.includes('not reported'); })()"#,
        );
        b.wait(
            "both devices listed",
            r#"document.querySelector('#devices tr[data-device="press01"]') && document.querySelector('#devices tr[data-device="press02"]')"#,
        );
        b.wait(
            "the overheating alert open",
            r#"[...document.querySelectorAll('#open-alerts tr[data-state="firing"]')].some(r => r.textContent.includes('overheating') && r.textContent.includes('press01'))"#,
        );
        let fleet = b.screenshot("console-fleet");

        // A device: raw points over the last hour, then the hourly rollup's band.
        b.click(r#"#devices tr[data-device="press01"] a"#);
        b.wait(
            "press01's chart drawn from raw readings",
            "document.querySelector('#chart') && document.querySelector('#chart').dataset.resolution === 'raw' \
             && +document.querySelector('#chart').dataset.points >= 100 \
             && document.querySelectorAll('#chart circle').length >= 100",
        );
        let latest = b.script(
            "return document.querySelector('#latest tr[data-metric=\"temperature\"]').textContent",
            json!([]),
        );
        assert!(
            latest.as_str().unwrap().contains("95"),
            "latest value: {latest}"
        );
        let device = b.screenshot("console-device");
        b.script(
            "const s = document.querySelector('#range'); s.value = '30d'; s.dispatchEvent(new Event('change'));",
            json!([]),
        );
        b.wait(
            "the 30-day chart from the hourly rollup, with its min/max band",
            "document.querySelector('#chart') && document.querySelector('#chart').dataset.resolution === '1h' \
             && +document.querySelector('#chart').dataset.points >= 1 && document.querySelector('#chart-band')",
        );

        // Rules: create, edit, delete through the form.
        b.click("#nav-alerts");
        let id = create_rule(&b, "pressure high", "pressure", "7.5");
        let alerts = b.screenshot("console-alerts");
        b.click(&format!("#rules tr[data-rule=\"{id}\"] button.edit"));
        b.wait(
            "the edit form",
            "document.querySelector('#rule-form h3').textContent.startsWith('Edit')",
        );
        b.type_into("#rule-threshold", "9.25");
        b.click("#rule-save");
        b.wait(
            "the rule edited",
            &format!("(document.querySelector('#rules tr[data-rule=\"{id}\"]') || {{}}).textContent?.includes('9.25')"),
        );
        delete_rule(&b, &id);

        // Tenant globex sees none of acme's fleet; acme's device is a 404 to it.
        other_tenant_sees_none_of_it(&b, GLOBEX, "gw-console", "press01");
        b.open(&format!("{console}#/device/press01"));
        b.wait(
            "acme's device not found for globex",
            "document.querySelector('#not-found')",
        );
        // A token that is no tenant's is refused at sign-in.
        b.click("#signout");
        b.type_into("#token", "no-such-token");
        b.click("#signin-button");
        b.wait(
            "a wrong token refused",
            "document.querySelector('#signin-error').textContent.includes('not accepted')",
        );
        (fleet, device, alerts)
    });
    let (fleet, device, alerts) = browsing.await.unwrap();
    println!(
        "screenshots: {}, {}, {}",
        fleet.display(),
        device.display(),
        alerts.display()
    );
    let (_, lag) = common::http_json(api, "GET", "/v1/pipeline/lag", ACME, None);
    assert!(
        lag["gateways"]["gw-console"]["queue"]["queued_bytes"].is_u64(),
        "the agent reports with uplink revision 1.1: {lag}"
    );
    // What the console listed is the API's: acme's devices to acme, none to globex.
    let (_, devices) = common::http_json(api, "GET", "/v1/devices", ACME, None);
    let ids: Vec<&str> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["press01", "press02"], "{devices}");
    // press01's 140 readings span the last hour: this clock hour and the one before hold
    // them all, unless the hour turned while they were sent; press02's 5 are all recent.
    let recent = devices["devices"][0]["readings_recent"].as_i64().unwrap();
    assert!((100..=140).contains(&recent), "{devices}");
    assert_eq!(devices["devices"][1]["readings_recent"], 5, "{devices}");
    let (_, theirs) = common::http_json(api, "GET", "/v1/devices", GLOBEX, None);
    assert_eq!(theirs["devices"], json!([]), "{theirs}");
    let (st, _) = common::http_json(api, "GET", "/v1/devices?limit=0", ACME, None);
    assert_eq!(st, 400);
    let (_, rules) = common::http_json(api, "GET", "/v1/alert-rules", ACME, None);
    assert_eq!(rules["rules"].as_array().unwrap().len(), 1, "{rules}");

    let _ = stop_tx.send(true);
    agent.await.unwrap().unwrap();
    cloud.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// The value of `name`, which `./deploy/demo.sh --ci` sets for this test.
fn demo_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: this test runs against the stack of ./deploy/demo.sh --ci, \
             which sets it (run the demo rather than this test)"
        )
    })
}

/// The console against the demo's own stack, while `./deploy/demo.sh --ci` has it running
/// (cloud-ingest with Kafka and alerting, the agent, Mosquitto, PostgreSQL, and the plant
/// firmware-sim drove): the demo tenant sees its gateway connected and every device the API
/// lists, the press's chart drawn, the overheating alert; it creates a rule and sees it
/// listed (then deletes it); the second tenant's token sees none of it.
#[test]
#[ignore = "run by ./deploy/demo.sh --ci against its stack"]
fn the_console_on_the_demo_stack() {
    let api: SocketAddr = demo_env("PLANTLINK_DEMO_API").parse().unwrap();
    let token = demo_env("PLANTLINK_DEMO_TOKEN");
    let other = demo_env("PLANTLINK_DEMO_OTHER_TOKEN");
    let gateway = demo_env("PLANTLINK_DEMO_GATEWAY");
    let press = demo_env("PLANTLINK_DEMO_PRESS");
    let (st, devices) = common::http_json(api, "GET", "/v1/devices?limit=1000", &token, None);
    assert_eq!(st, 200, "{devices}");
    let listed = devices["devices"].as_array().unwrap().len();
    assert!(
        listed > 10,
        "the demo's plant has only {listed} devices: {devices}"
    );
    let rule = format!("demo console check {}", std::process::id());

    let d = Dir::new("console-demo");
    let b = Browser::start(&d.0.join("chromium"), 1000);
    let console = format!("http://{api}/console");
    b.open(&console);
    sign_in(&b, &token);
    b.wait(
        "the demo's gateway connected",
        &format!(r#"document.querySelector('#gateways tr[data-gateway="{gateway}"][data-state="connected"]')"#),
    );
    b.wait(
        "the gateway's oldest queued reading reported",
        &format!(
            r#"(() => {{ const c = document.querySelector('#gateways tr[data-gateway="{gateway}"] td:nth-child(4)');
                return c && c.dataset.value !== '' && !c.textContent.includes('not reported'); }})()"#
        ),
    );
    // It is the agent's revision 1.1 report: bytes are in it (an agent before 1.1 has none).
    let (_, lag) = common::http_json(api, "GET", "/v1/pipeline/lag", &token, None);
    assert!(
        lag["gateways"][&gateway]["queue"]["queued_bytes"].is_u64(),
        "{lag}"
    );
    // The plant has stopped: the console lists the devices the API does, no more or fewer.
    b.wait(
        "every device listed",
        &format!(
            "document.querySelector('#devices tr[data-device=\"{press}\"]') && \
             document.querySelectorAll('#devices tr[data-device]').length === {listed}"
        ),
    );
    let fleet = b.screenshot("demo-console-fleet");

    b.click(&format!(r#"#devices tr[data-device="{press}"] a"#));
    b.wait(
        "the press's temperature drawn from raw readings",
        "document.querySelector('#chart') && document.querySelector('#chart').dataset.resolution === 'raw' \
         && +document.querySelector('#chart').dataset.points >= 30 \
         && document.querySelectorAll('#chart circle').length >= 30",
    );
    let device = b.screenshot("demo-console-device");

    b.click("#nav-alerts");
    b.wait(
        "the overheating alert",
        &format!(
            "[...document.querySelectorAll('#alerts tr[data-alert]')].some(r => \
             r.textContent.includes('press overheating') && r.textContent.includes('{press}'))"
        ),
    );
    let id = create_rule(&b, &rule, "pressure", "12.5");
    let alerts = b.screenshot("demo-console-alerts");
    let (st, made) = common::http_json(api, "GET", &format!("/v1/alert-rules/{id}"), &token, None);
    assert_eq!(
        (st, made["name"].as_str()),
        (200, Some(rule.as_str())),
        "{made}"
    );
    delete_rule(&b, &id);

    // The other tenant's token: none of the demo's gateway or devices.
    other_tenant_sees_none_of_it(&b, &other, &gateway, &press);
    let other_view = b.screenshot("demo-console-other-tenant");
    for p in [fleet, device, alerts, other_view] {
        println!("screenshot: {}", p.display());
    }
}
