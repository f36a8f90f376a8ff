//! Builds the in-container agent (`crates/agent`) as a static binary for the
//! target and leaves it in OUT_DIR, where `agent.rs` embeds it: a library user
//! gets the agent with the library, and any image can run it (no libc needed).
//!
//! The nested cargo uses its own target directory beside the main one, so it
//! never waits on the outer build's lock, and is shared by every profile.

#![allow(clippy::expect_used, clippy::panic)] // a build script fails by panicking, loudly

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target = std::env::var("TARGET").expect("cargo sets TARGET");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let agent_dir = manifest_dir.join("../agent");
    let workspace_manifest = manifest_dir.join("../../Cargo.toml");
    println!("cargo::rerun-if-changed={}", agent_dir.join("src").display());
    println!("cargo::rerun-if-changed={}", agent_dir.join("Cargo.toml").display());

    let target_dir = main_target_dir(&out_dir).map_or_else(|| out_dir.join("agent-target"), |dir| dir.join("agent"));
    let mut command = Command::new(cargo);
    command
        .args(["build", "--quiet", "--profile", "agent", "-p", "airlock-agent", "--bin", "airlock-agent"])
        .arg("--manifest-path")
        .arg(&workspace_manifest)
        .arg("--target")
        .arg(&target)
        .arg("--target-dir")
        .arg(&target_dir)
        // Static: the agent must run in images without (this) libc. With an
        // explicit --target these flags reach the agent only, not build scripts.
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        .env_remove("RUSTFLAGS")
        // Built the same under clippy, tests and builds, so it is built once.
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR");
    let status = command.status().expect("running cargo to build the airlock agent");
    assert!(status.success(), "building the airlock agent (crates/agent) failed: {status}");
    let built = target_dir.join(&target).join("agent").join("airlock-agent");
    std::fs::copy(&built, out_dir.join("airlock-agent"))
        .unwrap_or_else(|error| panic!("copying {}: {error}", built.display()));
}

/// The main build's target directory: the ancestor of OUT_DIR that cargo
/// marks with CACHEDIR.TAG.
fn main_target_dir(out_dir: &Path) -> Option<PathBuf> {
    out_dir.ancestors().find(|dir| dir.join("CACHEDIR.TAG").is_file()).map(Path::to_path_buf)
}
