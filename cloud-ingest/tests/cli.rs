//! The built binary answers --help and --version.

#[path = "../../tests/lib/help_readme.rs"]
mod help_readme;

use std::process::Command;

#[test]
fn help_and_version() {
    let bin = env!("CARGO_BIN_EXE_cloud-ingest");
    let out = Command::new(bin)
        .arg("--help")
        .output()
        .expect("run cloud-ingest");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Plantlink"), "{text}");
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .expect("run cloud-ingest");
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn pki_commands_write_the_documented_files() {
    let bin = env!("CARGO_BIN_EXE_cloud-ingest");
    let dir = std::env::temp_dir().join(format!("plantlink-pki-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .arg("--dir")
            .arg(&dir)
            .output()
            .expect("run");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(run(&["pki", "init"]).0);
    assert!(run(&["pki", "server", "--dns", "localhost", "--ip", "127.0.0.1"]).0);
    assert!(
        run(&[
            "pki",
            "gateway",
            "--gateway-id",
            "gw-plant1-01",
            "--tenant",
            "acme"
        ])
        .0
    );
    for f in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "gw-plant1-01.pem",
        "gw-plant1-01.key",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let (ok, err) = run(&[
        "pki",
        "gateway",
        "--gateway-id",
        "gw-plant1-01",
        "--tenant",
        "acme",
    ]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, err) = run(&["pki", "server"]);
    assert!(!ok && err.contains("--dns"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_config_reports_the_roles_a_config_can_run() {
    let bin = env!("CARGO_BIN_EXE_cloud-ingest");
    let dir = std::env::temp_dir().join(format!("plantlink-check-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    cloud_ingest::pki::init(&dir, 30).unwrap();
    cloud_ingest::pki::server(&dir, &["localhost".into()], &[], 30).unwrap();
    let base = "[quic]\nbind = \"127.0.0.1:4433\"\ncert = \"server.pem\"\nkey = \"server.key\"\n\
                client_ca = \"ca.pem\"\n[postgres]\nurl = \"host=127.0.0.1 dbname=x\"\n";
    let check = |toml: &str, role: Option<&str>| {
        let path = dir.join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(["check-config", "--config"]).arg(&path);
        if let Some(r) = role {
            cmd.args(["--role", r]);
        }
        let out = cmd.env_remove("PLANTLINK_ROLES").output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Without Kafka: the single node only.
    let (ok, out, _) = check(base, None);
    assert!(ok, "{out}");
    assert!(
        out.contains("--role receiver,writer,alerting (single node): yes"),
        "{out}"
    );
    assert!(out.contains("--role writer (scale-out): no"), "{out}");
    assert!(out.contains("set [kafka] brokers"), "{out}");
    let (ok, _, err) = check(base, Some("writer"));
    assert!(!ok);
    assert!(
        err.contains("--role writer: the roles apart talk through Kafka"),
        "{err}"
    );
    // With Kafka: every role, each saying what it uses.
    let kafka = format!("{base}[kafka]\nbrokers = \"127.0.0.1:9092\"\nwriter_group = \"w1\"\n");
    let (ok, out, _) = check(&kafka, Some("alerting"));
    assert!(ok, "{out}");
    for want in [
        "--role receiver (scale-out): yes",
        "produces accepted batches to plantlink.backbone",
        "--role writer (scale-out): yes",
        "consumer group w1",
        "--role alerting (scale-out): yes",
        "consumer group plantlink-alerting",
        "--role alerting: this config can run it",
    ] {
        assert!(out.contains(want), "{want:?} not in {out}");
    }
    // A receiver without its certificate is told which file is missing.
    std::fs::remove_file(dir.join("server.pem")).unwrap();
    let (ok, _, err) = check(&kafka, Some("receiver"));
    assert!(!ok);
    assert!(
        err.contains("quic.cert") && err.contains("server.pem"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every subcommand `--help` lists has an example in the README, and every `cloud-ingest` command
/// the README shows exists.
#[test]
fn the_readme_shows_every_command_and_only_real_ones() {
    help_readme::check(
        std::path::Path::new(env!("CARGO_BIN_EXE_cloud-ingest")),
        "cloud-ingest",
        &["pki"],
    );
}
