//! The Sparkplug B specification's example payloads, recorded with pysparkplug (an
//! independent encoder; `fixtures/sparkplug/record.py`), read by the agent's host state as
//! a session: NBIRTH, DBIRTH, alias-only DDATA, NDATA, NDEATH.
#![allow(clippy::unwrap_used)] // tests may panic

use edge_agent::config::Sparkplug;
use edge_agent::sparkplug::{Host, Item};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/sparkplug/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn items(items: &[Item]) -> Vec<(&str, &str, f64, Option<u64>)> {
    items
        .iter()
        .map(|i| (i.device.as_str(), i.metric.as_str(), i.value, i.ts_ms))
        .collect()
}

const T: u64 = 1_486_144_502_122;

#[test]
fn the_specifications_session_reads_as_it_says() {
    let mut h = Host::new(Sparkplug {
        groups: vec!["Sparkplug B Devices".into()],
        node: "{group}/{node}".into(),
        device: "{group}/{node}/{device}".into(),
        rebirth: true,
    });
    let g = "spBv1.0/Sparkplug B Devices";
    let out = h.handle(
        &format!("{g}/NBIRTH/Raspberry Pi"),
        &fixture("nbirth.bin"),
        0,
    );
    assert!(out.rejects.is_empty(), "{:?}", out.rejects);
    let node = "Sparkplug B Devices/Raspberry Pi";
    // bdSeq and Node Control/* are not stored; the string property is skipped and counted.
    assert_eq!(
        items(&out.items),
        [
            (node, "online", 1.0, Some(T)),
            (node, "Properties/Weight", 200.0, Some(T)),
            (node, "Supply Voltage", 12.100000381469727, Some(T)),
            (node, "Current", -3.0, Some(T)),
        ]
    );
    assert_eq!(out.skipped, ["String"]);

    let out = h.handle(
        &format!("{g}/DBIRTH/Raspberry Pi/Pibrella"),
        &fixture("dbirth.bin"),
        0,
    );
    let dev = "Sparkplug B Devices/Raspberry Pi/Pibrella";
    assert!(out.rejects.is_empty(), "{:?}", out.rejects);
    let got = items(&out.items);
    assert_eq!(got[0], (dev, "online", 1.0, Some(T)));
    assert_eq!(
        got[1..5].iter().map(|i| (i.1, i.2)).collect::<Vec<_>>(),
        [
            ("Inputs/A", 0.0),
            ("Inputs/B", 0.0),
            ("Outputs/E", 0.0),
            ("Outputs/F", 0.0)
        ]
    );
    assert_eq!(
        &got[5..],
        [
            (dev, "Properties/Weight", 20.0, Some(T)),
            (dev, "Temperature", 21.5, Some(T))
        ]
    );

    // DDATA carries aliases only, and no datatypes: names and types come from DBIRTH.
    let out = h.handle(
        &format!("{g}/DDATA/Raspberry Pi/Pibrella"),
        &fixture("ddata.bin"),
        0,
    );
    assert!(
        out.rejects.is_empty() && out.publish.is_none(),
        "{:?}",
        out.rejects
    );
    assert_eq!(
        items(&out.items),
        [
            (dev, "Inputs/A", 1.0, Some(T + 1000)),
            (dev, "Inputs/B", 1.0, Some(T + 1000)),
            (dev, "Temperature", 22.25, Some(T + 1000)),
        ]
    );
    let out = h.handle(&format!("{g}/NDATA/Raspberry Pi"), &fixture("ndata.bin"), 0);
    assert_eq!(
        items(&out.items),
        [(node, "Supply Voltage", 12.300000190734863, Some(T + 2000))]
    );

    // The will: offline, node and device.
    let out = h.handle(
        &format!("{g}/NDEATH/Raspberry Pi"),
        &fixture("ndeath.bin"),
        0,
    );
    assert_eq!(
        items(&out.items),
        [(node, "online", 0.0, None), (dev, "online", 0.0, None)]
    );
    assert!(out.items.iter().all(|i| i.event == Some("death")));
    // Dead: data waits for a birth, and a rebirth is asked for.
    let out = h.handle(
        &format!("{g}/DDATA/Raspberry Pi/Pibrella"),
        &fixture("ddata.bin"),
        0,
    );
    assert_eq!(out.rejects[0].reason.as_str(), "unknown_alias");
    assert_eq!(out.publish.unwrap().0, format!("{g}/NCMD/Raspberry Pi"));
}
