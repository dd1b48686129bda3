//! Test-runner front end of the scenario harness: one test per `scenarios/NNN-name.toml`
//! (`scenario::001-add-file-on-client`, …) for `cargo nextest run` and `cargo test`.
//!
//! It drives the same engine as `cargo xtask scenarios` (the `xtask` library), against the
//! binaries Cargo built for this test. Every scenario has its own temporary directories and port-0
//! servers, so nextest runs them in parallel safely. Logs go to `target/scenarios/nextest/`.
//!
//! A scenario that needs a feature our profile lacks (`needs = ["watch"]`) is an ignored test.
//! Two `harness::` tests check the harness itself with our binaries: a client that does nothing
//! must fail 001 and 004, and the steps made for a watching daemon must work with today's polling
//! one.

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
    // Known now, not inside a test: a scenario needing what our profile lacks is listed as
    // ignored (not failed), as `cargo xtask scenarios` reports it skipped.
    let ours = Profile::builtin(&bin_dir).expect("the built-in profile loads");

    let mut trials: Vec<Trial> = scenarios
        .iter()
        .cloned()
        .map(|sc| {
            let unmet = ours.unmet_needs(&sc.needs).is_some();
            let (bin_dir, out_dir) = (bin_dir.clone(), out_dir.clone());
            let snapshots = root.join("scenarios").join("snapshots");
            Trial::test(format!("scenario::{}", sc.id), move || {
                run_scenario(&sc, &bin_dir, &out_dir, &snapshots)
            })
            .with_ignored_flag(unmet)
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
    let (bin_dir3, out_dir3) = (bin_dir.clone(), out_dir.clone());
    trials.push(Trial::test(
        "harness::polling-daemon-wait-identical-pause-resume",
        move || polling_daemon_self_test(&bin_dir3, &out_dir3.join("selftest")),
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

/// The steps made for a watching daemon, checked with today's polling one (`interval = 1`):
/// `wait_identical` ends once a cycle has mirrored the changes; `pause` holds the daemon (its
/// changes wait) and `resume` lets it go on; appends spread over time; a `since` mark; and a
/// daemon left paused is continued by teardown, so it ends on SIGTERM (exit 0), not SIGKILL.
const POLLING_DAEMON: &str = r#"
name = "harness self-test: wait_identical, pause, resume, append times, mark (polling daemon)"
timeout = 30
snapshot = "none"
steps = [
  { start = "server" },
  { write = "client:a.txt", text = "one\n" },
  { start = "client", interval = 1 },
  { wait_sync = "client" },
  { mark = "first-cycle" },
  { pause = "client" },
  { write = "client:d/b.txt", text = "two\n" },
  { append = "client:a.txt", text = "more\n", times = 3, every_ms = 100 },
  { resume = "client" },
  { wait_identical = ["client", "server"] },
  { exists = "server:a.txt", same_as = "client", size = 19 },
  { log = "server", contains = "Received file: d/b.txt", since = "first-cycle" },
  { log = "server", contains = "Received file: a.txt", count = 2 },
  { pause = "client" },
]
"#;

fn polling_daemon_self_test(bin_dir: &Path, out_dir: &Path) -> Result<(), Failed> {
    let sc = scenario::parse(
        Path::new("scenarios/900-polling-daemon.toml"),
        POLLING_DAEMON,
    )
    .map_err(|e| format!("{e:#}"))?;
    let cfg = Config {
        profile: Profile::builtin(bin_dir).map_err(|e| format!("{e:#}"))?,
        out_dir: out_dir.to_path_buf(),
        keep: false,
        snapshot_dir: None,
    };
    let outcome = engine::run(&sc, &cfg);
    if let Some(report) = outcome.failure {
        return Err(format!("{report}\n{}", outcome.run_log).into());
    }
    let client_log = std::fs::read_to_string(&outcome.logs[1]).map_err(|e| e.to_string())?;
    for want in [
        "harness sends SIGSTOP to client#1",
        "harness sends SIGCONT to client#1",
        "harness sends SIGTERM to client#1",
        "---- +",
    ] {
        if !client_log.contains(want) {
            return Err(format!("the client log lacks {want:?}:\n{client_log}").into());
        }
    }
    if !outcome.run_log.contains("teardown: client#1: exit code 0") {
        return Err(format!(
            "teardown did not end the paused daemon with SIGTERM:\n{}",
            outcome.run_log
        )
        .into());
    }
    Ok(())
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
