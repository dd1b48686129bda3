//! Test-runner front end of the scenario harness: one test per `scenarios/NNN-name.toml`
//! (`scenario::001-add-file-on-client`, …) for `cargo nextest run` and `cargo test`.
//!
//! It drives the same engine as `cargo xtask scenarios` (the `xtask` library), against the
//! binaries Cargo built for this test. Every scenario has its own temporary directories and port-0
//! servers, so nextest runs them in parallel safely. Logs go to `target/scenarios/nextest/`.

use std::path::{Path, PathBuf};

use libtest_mimic::{Arguments, Failed, Trial};
use xtask::engine::{self, Config};
use xtask::profile::Profile;
use xtask::scenario::{self, Scenario};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // SAFETY: nothing else runs yet; libtest-mimic starts its threads later.
    unsafe { xtask::init_insta_workspace(root) };
    xtask::quiet_snapshot_panics();
    let args = Arguments::from_args();

    let bin_dir = Path::new(env!("CARGO_BIN_EXE_server-sync"))
        .parent()
        .expect("binary has a directory")
        .to_path_buf();
    // <target>/debug/server-sync → <target>/scenarios/nextest (apart from xtask's own output).
    let out_dir = bin_dir
        .parent()
        .unwrap_or(&bin_dir)
        .join("scenarios")
        .join("nextest");
    let scenarios = scenario::load_dir(&root.join("scenarios")).expect("scenarios/ loads");

    let mut trials: Vec<Trial> = scenarios
        .iter()
        .cloned()
        .map(|sc| {
            let (bin_dir, out_dir) = (bin_dir.clone(), out_dir.clone());
            let snapshots = root.join("scenarios").join("snapshots");
            Trial::test(format!("scenario::{}", sc.id), move || {
                run_scenario(&sc, &bin_dir, &out_dir, &snapshots)
            })
        })
        .collect();
    // The seven seed scenarios again with `--hash md5`, the seed's own hash.
    for sc in scenarios
        .iter()
        .filter(|sc| (1..=7).contains(&sc.number))
        .cloned()
    {
        let (bin_dir, out_dir) = (bin_dir.clone(), out_dir.join("md5"));
        let snapshots = root.join("scenarios").join("snapshots");
        let profile = root.join("scenarios/profiles/server-sync-md5.toml");
        trials.push(Trial::test(format!("scenario-md5::{}", sc.id), move || {
            run_md5_scenario(&sc, &profile, &bin_dir, &out_dir, &snapshots)
        }));
    }
    let (bin_dir2, out_dir2) = (bin_dir.clone(), out_dir.clone());
    trials.push(Trial::test(
        "harness::true-client-fails-001-and-004",
        move || true_client_self_test(root, &scenarios, &bin_dir2, &out_dir2.join("selftest")),
    ));
    libtest_mimic::run(&args, trials).exit();
}

fn run_scenario(
    sc: &Scenario,
    bin_dir: &Path,
    out_dir: &Path,
    snapshots: &Path,
) -> Result<(), Failed> {
    let cfg = Config {
        profile: Profile::builtin(bin_dir).map_err(|e| format!("{e:#}"))?,
        out_dir: out_dir.to_path_buf(),
        keep: false,
        snapshot_dir: Some(snapshots.to_path_buf()),
    };
    let outcome = engine::run(sc, &cfg);
    // Each test is its own process under nextest: one run log per scenario instead of one shared.
    let _ = std::fs::write(
        out_dir.join(format!("test_{}_sync.log", sc.number_text())),
        &outcome.run_log,
    );
    match outcome.failure {
        None => Ok(()),
        Some(report) => Err(report.into()),
    }
}

/// A seed scenario through the `--hash md5` profile: it must pass, with the same snapshot, and
/// every session must have used MD5.
fn run_md5_scenario(
    sc: &Scenario,
    profile: &Path,
    bin_dir: &Path,
    out_dir: &Path,
    snapshots: &Path,
) -> Result<(), Failed> {
    let cfg = Config {
        profile: Profile::load(profile, bin_dir).map_err(|e| format!("{e:#}"))?,
        out_dir: out_dir.to_path_buf(),
        keep: false,
        snapshot_dir: Some(snapshots.to_path_buf()),
    };
    let outcome = engine::run(sc, &cfg);
    if let Some(report) = outcome.failure {
        return Err(report.into());
    }
    let log = out_dir.join(format!("test_{}_server.log", sc.number_text()));
    let log = std::fs::read_to_string(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let sessions = log.matches(" connected (").count();
    if sessions == 0 || log.matches(" connected (md5)").count() != sessions {
        return Err(format!("{}: not every session used md5:\n{log}", sc.id).into());
    }
    Ok(())
}

/// The harness must catch an implementation that does nothing: with a client whose command is
/// `true`, 001 and 004 fail, and the report shows the tree diff.
fn true_client_self_test(
    root: &Path,
    scenarios: &[Scenario],
    bin_dir: &Path,
    out_dir: &Path,
) -> Result<(), Failed> {
    let profile = Profile::load(&root.join("scenarios/profiles/true-client.toml"), bin_dir)
        .map_err(|e| format!("{e:#}"))?;
    let cfg = Config {
        profile,
        out_dir: PathBuf::from(out_dir),
        keep: false,
        snapshot_dir: None,
    };
    for (number, file) in [(1, "test001.txt"), (4, "test004.txt")] {
        let sc = scenarios
            .iter()
            .find(|s| s.number == number)
            .ok_or_else(|| format!("scenario {number:03} is missing"))?;
        let outcome = engine::run(sc, &cfg);
        let Some(report) = outcome.failure else {
            return Err(format!("{} passed with a client that does nothing", sc.id).into());
        };
        for want in [
            "expected: client and server trees identical".to_string(),
            "diff client → server".to_string(),
            format!("- {file}: file only in client"),
            "server tree (".to_string(),
            "(empty)".to_string(),
            format!("test_{number:03}_server.log"),
        ] {
            if !report.contains(&want) {
                return Err(format!("{}: the report lacks {want:?}:\n{report}", sc.id).into());
            }
        }
    }
    Ok(())
}
