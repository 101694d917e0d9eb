//! The built `firmware-sim` binary answers --help and refuses bad arguments clearly.
#![allow(clippy::unwrap_used)] // tests may panic

#[path = "../../tests/lib/help_readme.rs"]
mod help_readme;

use std::process::Command;

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
        .args(args)
        .output()
        .expect("run firmware-sim")
}

#[test]
fn help_teaches_the_commands() {
    let out = sim(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("bench-codec"), "{text}");
    let out = sim(&["bench-codec", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--batch") && text.contains("--json") && text.contains("--seed"));
}

#[test]
fn zero_batch_is_refused_with_the_value_named() {
    let out = sim(&["bench-codec", "--batch", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--batch 0"), "{err}");
}

/// Every subcommand `--help` lists has an example in the README, and every `firmware-sim` command
/// the README shows exists.
#[test]
fn the_readme_shows_every_command_and_only_real_ones() {
    help_readme::check(
        std::path::Path::new(env!("CARGO_BIN_EXE_firmware-sim")),
        "firmware-sim",
        &[],
    );
}
