//! Sets `SMSGW_COMMIT` at compile time: the commit `smsgw --version` reports next to the
//! Cargo version. It is `SMSGW_COMMIT` from the build's environment when set (the image's
//! build argument: the image's build has no `.git`), else `git rev-parse --short HEAD`,
//! else `unknown`.
//!
//! Cargo reruns this script only when `SMSGW_COMMIT` changes or, in a git checkout, when
//! HEAD moves (a commit, a checkout, a reset), so it costs no rebuild otherwise.

use std::{path::PathBuf, process::Command};

fn main() {
    println!("cargo::rerun-if-env-changed=SMSGW_COMMIT");
    let commit = match std::env::var("SMSGW_COMMIT") {
        Ok(given) if !given.trim().is_empty() => checked(given.trim()),
        _ => from_git().unwrap_or_else(|| "unknown".to_owned()),
    };
    println!("cargo::rustc-env=SMSGW_COMMIT={commit}");
}

/// A given commit must look like one: a typo in the build argument fails the build rather
/// than ending up in every `--version`.
fn checked(given: &str) -> String {
    if !(4..=40).contains(&given.len()) || !given.bytes().all(|b| b.is_ascii_hexdigit()) {
        panic!("SMSGW_COMMIT={given:?} is not a git commit hash (4 to 40 hex digits)");
    }
    given.to_ascii_lowercase()
}

fn from_git() -> Option<String> {
    let commit = git(&["rev-parse", "--short", "HEAD"])?;
    let git_dir = PathBuf::from(git(&["rev-parse", "--absolute-git-dir"])?);
    // Printed relative to the current directory (the package's) unless absolute; in a
    // linked worktree the branches live in the main repository's directory.
    let common_dir = std::env::current_dir()
        .ok()?
        .join(git(&["rev-parse", "--git-common-dir"])?);
    let mut watched = vec![git_dir.join("HEAD"), git_dir.join("logs/HEAD")];
    if let Ok(head) = std::fs::read_to_string(git_dir.join("HEAD"))
        && let Some(branch) = head.trim().strip_prefix("ref: ")
    {
        watched.push(common_dir.join(branch));
        watched.push(common_dir.join("packed-refs"));
    }
    // Cargo reruns a script whose watched file is missing on every build: only existing
    // files are watched.
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo::rerun-if-changed={}", path.display());
    }
    Some(commit)
}

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}
