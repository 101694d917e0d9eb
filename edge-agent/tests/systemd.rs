//! The agent under systemd's notification protocol, as a `Type=notify` unit with `WatchdogSec=`
//! runs it: the real binary, a notification socket of the test's own, and SIGTERM.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Proc, TempDir, free_udp_port};

fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = sock
        .recv(&mut buf)
        .expect("a notification from the agent within the socket's timeout");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

/// Starts the agent (CoAP only) with a notification socket of the test's own and the given
/// watchdog settings.
fn start(dir: &TempDir, watchdog: &[(&str, &str)]) -> (UnixDatagram, Proc) {
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nid = \"gw\"\n[store]\npath = \"{}\"\n[coap]\nbind = \"127.0.0.1:{}\"\n",
            dir.path().join("queue.db").display(),
            free_udp_port()
        ),
    )
    .unwrap();
    let agent = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock_path)
        // Not the test runner's own, should it run under a systemd watchdog.
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .envs(watchdog.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    (sock, Proc(agent))
}

fn terminate(agent: &Proc) {
    let kill = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
}

#[test]
fn tells_systemd_ready_pings_the_watchdog_and_says_stopping() {
    let dir = TempDir::new("sdnotify");
    // 0.4 s: a ping every 0.2 s.
    let (sock, mut agent) = start(&dir, &[("WATCHDOG_USEC", "400000")]);

    let ready = next(&sock);
    assert!(
        ready.starts_with("READY=1\n"),
        "first notification: {ready:?}"
    );
    for _ in 0..3 {
        let ping = next(&sock);
        assert_eq!(ping, "WATCHDOG=1\nSTATUS=collecting; 0 readings queued");
    }

    terminate(&agent);
    // Pings already on their way may come first.
    let stopping = loop {
        let m = next(&sock);
        if !m.starts_with("WATCHDOG=1") {
            break m;
        }
    };
    assert!(
        stopping.starts_with("STOPPING=1\n"),
        "after SIGTERM: {stopping:?}"
    );
    let status = agent.0.wait().unwrap();
    assert!(status.success(), "agent exited with {status}");
}

#[test]
fn watchdog_for_another_process_is_not_pinged() {
    let dir = TempDir::new("sdnotify-pid");
    // systemd sets WATCHDOG_PID to the main process; a child must not ping for it.
    let (sock, mut agent) = start(&dir, &[("WATCHDOG_USEC", "400000"), ("WATCHDOG_PID", "1")]);
    assert!(next(&sock).starts_with("READY=1\n"));
    // Absence needs a window: pings would come every 0.2 s, five in this one.
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 512];
    let quiet = sock.recv(&mut buf);
    assert!(
        quiet.is_err(),
        "pinged another process's watchdog: {:?}",
        String::from_utf8_lossy(&buf[..quiet.unwrap()])
    );
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    terminate(&agent);
    let m = next(&sock);
    assert!(m.starts_with("STOPPING=1\n"), "{m:?}");
    assert!(agent.0.wait().unwrap().success());
}
