//! The built binary answers --help and --version.
#![allow(clippy::unwrap_used)] // tests may panic

use std::process::Command;

#[test]
fn help_and_version() {
    let bin = env!("CARGO_BIN_EXE_edge-agent");
    let out = Command::new(bin)
        .arg("--help")
        .output()
        .expect("run edge-agent");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Plantlink"), "{text}");
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .expect("run edge-agent");
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}
