//! The scenario harness engine behind `cargo xtask scenarios` and `tests/scenarios.rs`.
//!
//! One engine, two front ends: the xtask binary (filters, `--repeat`, `--jobs`, summary) and the
//! libtest-mimic test binary (one nextest test per scenario) both call [`engine::run`].
//!
//! * [`scenario`] parses `scenarios/NNN-name.toml` into typed steps.
//! * [`profile`] says how to start and recognise a given implementation (ours is built in).
//! * [`engine`] runs one scenario: temp directories, processes, checks, snapshot, failure report.
//! * [`suite`] runs many (parallel jobs, repeats, summary) for the xtask front end.
//! * [`process`], [`tree`], [`fsops`], [`netstat`] and [`pattern`] are the building blocks.
//! * [`testkit`] holds the fixtures of the product's integration tests (`tests/support`), built on
//!   the same blocks.

pub mod engine;
pub mod fsops;
pub mod netstat;
pub mod pattern;
pub mod process;
pub mod profile;
pub mod scenario;
pub mod suite;
pub mod testkit;
pub mod tree;

use std::path::{Path, PathBuf};

/// The workspace root, i.e. the parent of this crate's directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Points insta at the workspace root, so it need not run `cargo metadata` to find it.
///
/// # Safety
/// Sets an environment variable: call it before any other thread is started.
pub unsafe fn init_insta_workspace(root: &Path) {
    if std::env::var_os("INSTA_WORKSPACE_ROOT").is_none() {
        // SAFETY: the caller guarantees no other thread runs yet.
        unsafe { std::env::set_var("INSTA_WORKSPACE_ROOT", root) };
    }
}

/// insta reports a snapshot mismatch by printing its diff and then panicking; the engine catches
/// that panic and reports the scenario as failed, so the panic message and backtrace are noise.
/// Installs a panic hook that drops exactly those and shows every other panic in full.
pub fn quiet_snapshot_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if !msg.starts_with("snapshot assertion for ") {
            default(info);
        }
    }));
}
