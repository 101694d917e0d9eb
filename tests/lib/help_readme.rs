//! Each program's subcommands, as its `--help` lists them, against the commands the README
//! shows (in code blocks and code spans): every subcommand is shown, and every command shown
//! exists. Included by each package's `tests/cli.rs` (`#[path]`), with its own binary.

#![allow(clippy::unwrap_used)] // tests may panic

use std::path::Path;
use std::process::Command;

/// The subcommands `bin args... --help` lists under "Commands:", without `help`.
fn commands(bin: &Path, args: &[&str]) -> Vec<String> {
    let out = Command::new(bin).args(args).arg("--help").output().unwrap();
    assert!(
        out.status.success(),
        "{} {args:?} --help failed",
        bin.display()
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines().skip_while(|l| l.trim_end() != "Commands:");
    lines.next();
    lines
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

/// The text of the README's code blocks and code spans.
fn readme_code() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut code = String::new();
    let mut in_block = false;
    for line in readme.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            code.push_str(line);
            code.push('\n');
        } else {
            for (i, span) in line.split('`').enumerate() {
                if i % 2 == 1 {
                    code.push_str(span);
                    code.push('\n');
                }
            }
        }
    }
    code
}

/// Checks `name` (the program, at `bin`) against the README; `nested` are its subcommands
/// that have subcommands of their own.
pub(crate) fn check(bin: &Path, name: &str, nested: &[&str]) {
    let code = readme_code();
    let mut missing = Vec::new();
    let top = commands(bin, &[]);
    for sub in &top {
        if nested.contains(&sub.as_str()) {
            for leaf in commands(bin, &[sub]) {
                if !code.contains(&format!("{name} {sub} {leaf}")) {
                    missing.push(format!("{name} {sub} {leaf}"));
                }
            }
        } else if !code.contains(&format!("{name} {sub}")) {
            missing.push(format!("{name} {sub}"));
        }
    }
    assert!(
        missing.is_empty(),
        "the README shows no example of {missing:?}: add each to its command list"
    );
    // Every command the README shows is one the program has.
    let mut unknown = Vec::new();
    for (at, _) in code.match_indices(&format!("{name} ")) {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '-' || c == '/' || c == '_') {
            continue; // part of a longer word or a path
        }
        let mut words = code[at + name.len()..].split_whitespace();
        let Some(sub) = words.next() else { continue };
        if sub.starts_with('-') || !sub.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
            continue; // an option, or prose
        }
        if !top.iter().any(|t| t == sub) {
            unknown.push(format!("{name} {sub}"));
        } else if nested.contains(&sub)
            && let Some(leaf) = words.next()
            && leaf.chars().all(|c| c.is_ascii_lowercase() || c == '-')
            && !leaf.starts_with('-')
            && !commands(bin, &[sub]).iter().any(|l| l == leaf)
        {
            unknown.push(format!("{name} {sub} {leaf}"));
        }
    }
    assert!(
        unknown.is_empty(),
        "the README shows commands the program does not have: {unknown:?}"
    );
}
