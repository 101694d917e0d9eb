//! The built binary answers --help and --version.

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
