//! `cargo xtask`: developer tasks of this workspace: `scenarios` (the conformance harness),
//! `bench` (server-sync against rsync, see `bench.rs`; `bench latency` against lsyncd, see
//! `bench/latency.rs`) and `original-suite` (the original project's test suite against our
//! binaries, see `original_suite.rs`).
//!
//! Arguments are parsed by hand: a handful of flags does not justify another dependency, and new
//! subcommands slot into `main`'s match.

mod bench;
mod original_suite;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use xtask::engine::Config;
use xtask::profile::Profile;
use xtask::{scenario, suite, workspace_root};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  scenarios [FILTER...] [options]   build server-sync and client-sync, then run the scenarios
                                    in scenarios/ (all, or those whose number or name matches)
  bench [--quick] [--pairs N] [--hash LIST] [FILTER...]
                                    build release binaries and time them against rsync on
                                    generated trees; writes target/bench/report.md and .json
  bench latency [--quick] [--writes N] [--interval S] [--no-watch]
                                    build release binaries and time how soon a change written
                                    into a watched tree is on the server, ours (daemon) side by
                                    side with lsyncd; writes target/bench/latency.md
  original-suite [--release] [TEST...]
                                    run the original project's test-sync.py (found through
                                    SERVER_SYNC_ORIGINAL) against our binaries; about 12 minutes

options of `scenarios`:
  --keep          keep each scenario's temporary directories and print where they are
  --repeat N      run the selected set N times and report any scenario that fails (flakes)
  --jobs N        run N scenarios at once (default: number of CPUs; 1 with fixed-port profiles)
  --out DIR       where logs go (default: target/scenarios)
  --impl FILE     run against another implementation described by a profile (see
                  scenarios/profiles/ and scenarios/README.md); default: this repository's binaries
  -h, --help      this text
";

fn main() -> ExitCode {
    xtask::quiet_snapshot_panics();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("scenarios") => scenarios(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        // Exits with the suite's own status, so it handles its errors itself.
        Some("original-suite") => return original_suite::run(&args[1..]),
        // Internal: the process supervisor of `bench` (see bench/supervise.rs).
        Some(bench::SUPERVISE) => bench::supervise(&args[1..]),
        Some("-h" | "--help" | "help") => {
            print!(
                "{USAGE}\n{}\n{}\n{}",
                bench::USAGE,
                bench::LATENCY_USAGE,
                original_suite::USAGE
            );
            Ok(true)
        }
        Some(other) => {
            eprintln!("unknown command {other:?}\n\n{USAGE}");
            return ExitCode::from(2);
        }
        None => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

struct Args {
    filters: Vec<String>,
    keep: bool,
    repeat: usize,
    jobs: Option<usize>,
    out: Option<PathBuf>,
    profile: Option<PathBuf>,
}

fn parse_args(args: &[String]) -> Result<Option<Args>> {
    let mut a = Args {
        filters: Vec::new(),
        keep: false,
        repeat: 1,
        jobs: None,
        out: None,
        profile: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(None);
            }
            "--keep" => a.keep = true,
            "--repeat" => a.repeat = positive(&value("--repeat")?, "--repeat")?,
            "--jobs" | "-j" => a.jobs = Some(positive(&value("--jobs")?, "--jobs")?),
            "--out" => a.out = Some(PathBuf::from(value("--out")?)),
            "--impl" => a.profile = Some(PathBuf::from(value("--impl")?)),
            s if s.starts_with('-') => bail!("unknown option {s:?} (see --help)"),
            s => a.filters.push(s.to_string()),
        }
    }
    Ok(Some(a))
}

fn positive(v: &str, name: &str) -> Result<usize> {
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!("{name} needs a positive number, not {v:?}"),
    }
}

/// The target directory: `CARGO_TARGET_DIR` (relative to the current directory, as for cargo)
/// or `<root>/target`.
fn target_dir(root: &Path) -> Result<PathBuf> {
    Ok(match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => std::env::current_dir()?.join(d),
        None => root.join("target"),
    })
}

fn scenarios(args: &[String]) -> Result<bool> {
    let Some(args) = parse_args(args)? else {
        return Ok(true);
    };
    let root = workspace_root();
    // SAFETY: no other thread has been started yet.
    unsafe { xtask::init_insta_workspace(&root) };
    let target = target_dir(&root)?;
    let bin_dir = target.join("debug");

    let all = scenario::load_dir(&root.join("scenarios"))?;
    let selected: Vec<_> = if args.filters.is_empty() {
        all
    } else {
        all.into_iter()
            .filter(|s| args.filters.iter().any(|f| s.matches(f)))
            .collect()
    };
    if selected.is_empty() {
        bail!("no scenario matches {:?}", args.filters);
    }

    let (profile, builtin) = match &args.profile {
        Some(p) => (Profile::load(p, &bin_dir)?, false),
        None => (Profile::builtin(&bin_dir)?, true),
    };
    // Before building: a profile missing its environment says so in one line, at once.
    profile.check_needs()?;
    if builtin || profile.uses_bin_dir() {
        build(&root)?;
    }
    let jobs = if profile.fixed_ports() {
        1
    } else {
        args.jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }
    .min(selected.len() * args.repeat);
    let out_dir = match args.out {
        Some(o) => std::env::current_dir()?.join(o),
        None => target.join("scenarios"),
    };
    println!(
        "running {} scenario(s) against {} ({} at a time{})",
        selected.len(),
        profile.name,
        jobs,
        if args.repeat > 1 {
            format!(", {} times", args.repeat)
        } else {
            String::new()
        }
    );
    let cfg = Config {
        profile,
        out_dir,
        keep: args.keep,
        snapshot_dir: Some(root.join("scenarios").join("snapshots")),
    };
    let summary = suite::run(
        &selected,
        &cfg,
        suite::Options {
            jobs,
            repeat: args.repeat,
        },
    )?;
    Ok(summary.failed() == 0)
}

/// Builds both product binaries (debug), so scenarios never run stale code.
fn build(root: &Path) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--package", "server-sync", "--bins"])
        .current_dir(root)
        .status()
        .context("run cargo build")?;
    if !status.success() {
        bail!("cargo build of server-sync and client-sync failed ({status})");
    }
    Ok(())
}
