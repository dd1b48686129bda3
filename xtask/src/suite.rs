//! Runs a set of scenarios for the xtask front end: parallel jobs, repeats, progress lines, summary.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::engine::{self, Config, Outcome};
use crate::scenario::Scenario;

/// How to run the set.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Scenarios running at once.
    pub jobs: usize,
    /// Times the whole set runs.
    pub repeat: usize,
}

/// Everything that happened, for the caller's exit code.
#[derive(Debug)]
pub struct Summary {
    /// `(repetition, outcome)` in completion order.
    pub runs: Vec<(usize, Outcome)>,
    pub wall: Duration,
}

impl Summary {
    pub fn failed(&self) -> usize {
        self.runs.iter().filter(|(_, o)| o.failed()).count()
    }

    /// Runs skipped because the profile lacks a feature the scenario needs.
    pub fn skipped(&self) -> usize {
        self.runs
            .iter()
            .filter(|(_, o)| o.skipped.is_some())
            .count()
    }
}

struct Queue {
    pending: VecDeque<(usize, usize)>,
    /// Scenarios running now: one scenario never runs twice at once, because its log files and
    /// snapshot are per scenario.
    busy: BTreeSet<usize>,
}

/// Runs every scenario `opts.repeat` times on `opts.jobs` threads, printing to stdout as it goes.
pub fn run(scenarios: &[Scenario], cfg: &Config, opts: Options) -> Result<Summary> {
    std::fs::create_dir_all(&cfg.out_dir)
        .with_context(|| format!("create {}", cfg.out_dir.display()))?;
    let sync_log_path = cfg.out_dir.join("test_sync.log");
    let sync_log = Mutex::new(
        File::create(&sync_log_path)
            .with_context(|| format!("create {}", sync_log_path.display()))?,
    );
    let repeat = opts.repeat.max(1);
    let queue = Mutex::new(Queue {
        pending: (1..=repeat)
            .flat_map(|rep| (0..scenarios.len()).map(move |i| (rep, i)))
            .collect(),
        busy: BTreeSet::new(),
    });
    let freed = Condvar::new();
    let results = Mutex::new(Vec::new());
    let name_width = scenarios.iter().map(|s| s.id.len()).max().unwrap_or(10);
    let started = Instant::now();
    let jobs = opts.jobs.clamp(1, scenarios.len().max(1) * repeat);

    thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let (rep, idx) = {
                        let mut q = queue.lock().unwrap();
                        loop {
                            if q.pending.is_empty() {
                                return;
                            }
                            let pos = q.pending.iter().position(|(_, i)| !q.busy.contains(i));
                            if let Some(pos) = pos {
                                let item = q.pending.remove(pos).expect("position is valid");
                                q.busy.insert(item.1);
                                break item;
                            }
                            q = freed.wait(q).unwrap();
                        }
                    };
                    let sc = &scenarios[idx];
                    let outcome = engine::run(sc, cfg);
                    {
                        let mut f = sync_log.lock().unwrap();
                        let header = if repeat > 1 {
                            format!("--- repetition {rep}/{repeat}\n")
                        } else {
                            String::new()
                        };
                        let _ = writeln!(f, "{header}{}", outcome.run_log);
                    }
                    if outcome.failed() && repeat > 1 {
                        keep_failed_logs(&outcome, rep);
                    }
                    if repeat == 1 || outcome.failed() {
                        print_line(&outcome, rep, repeat, name_width);
                    }
                    results.lock().unwrap().push((rep, outcome));
                    queue.lock().unwrap().busy.remove(&idx);
                    freed.notify_all();
                }
            });
        }
    });

    let summary = Summary {
        runs: results.into_inner().unwrap(),
        wall: started.elapsed(),
    };
    print_summary(scenarios, &summary, repeat, cfg);
    Ok(summary)
}

fn print_line(o: &Outcome, rep: usize, repeat: usize, width: usize) {
    let status = match (&o.skipped, o.passed) {
        (Some(_), _) => "SKIP",
        (None, true) => "PASS",
        (None, false) => "FAIL",
    };
    let rep = if repeat > 1 {
        format!("  (repetition {rep})")
    } else {
        String::new()
    };
    let kept = o
        .kept
        .as_ref()
        .map(|p| format!("  kept: {}", p.display()))
        .unwrap_or_default();
    let why = o
        .skipped
        .as_ref()
        .map(|w| format!("  ({w})"))
        .unwrap_or_default();
    println!(
        "{:<width$}  {status}  {:>7.2}s{rep}{kept}{why}",
        o.id,
        o.duration.as_secs_f64()
    );
}

/// With `--repeat`, the logs of a failed repetition are copied aside before the next one
/// overwrites them: `test_NNN_server.rep7.log`.
fn keep_failed_logs(o: &Outcome, rep: usize) {
    for log in &o.logs {
        let Some(stem) = log.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let copy = log.with_file_name(format!("{stem}.rep{rep}.log"));
        let _ = std::fs::copy(log, copy);
    }
}

fn print_summary(scenarios: &[Scenario], s: &Summary, repeat: usize, cfg: &Config) {
    let failed: Vec<&(usize, Outcome)> = s.runs.iter().filter(|(_, o)| o.failed()).collect();
    if repeat > 1 {
        let mut per: BTreeMap<&str, Vec<&Outcome>> = BTreeMap::new();
        for (_, o) in &s.runs {
            per.entry(o.id.as_str()).or_default().push(o);
        }
        println!(
            "\n{:<40} {:>5} {:>6} {:>8} {:>8} {:>8}",
            "scenario", "runs", "failed", "min", "median", "max"
        );
        for sc in scenarios {
            let Some(runs) = per.get(sc.id.as_str()) else {
                continue;
            };
            if runs.iter().all(|o| o.skipped.is_some()) {
                println!("{:<40} skipped", sc.id);
                continue;
            }
            let mut times: Vec<f64> = runs.iter().map(|o| o.duration.as_secs_f64()).collect();
            times.sort_by(f64::total_cmp);
            let fails = runs.iter().filter(|o| o.failed()).count();
            println!(
                "{:<40} {:>5} {:>6} {:>7.2}s {:>7.2}s {:>7.2}s{}",
                sc.id,
                runs.len(),
                fails,
                times[0],
                times[times.len() / 2],
                times[times.len() - 1],
                if fails > 0 { "  FLAKY/FAILING" } else { "" }
            );
        }
    }
    // Each distinct failure once per scenario: with --repeat the same report can come 50 times.
    let mut shown = BTreeSet::new();
    for (rep, o) in &failed {
        if !shown.insert(o.id.clone()) {
            continue;
        }
        println!();
        if repeat > 1 {
            println!("(first failure, repetition {rep})");
        }
        if let Some(f) = &o.failure {
            print!("{f}");
        }
    }
    let skipped: usize = s.runs.iter().map(|(_, o)| o.skipped_checks).sum();
    let not_run = s.skipped();
    println!(
        "\n{} scenario run(s): {} passed, {} failed{} in {:.2}s wall{}",
        s.runs.len(),
        s.runs.len() - failed.len() - not_run,
        failed.len(),
        if not_run > 0 {
            format!(", {not_run} skipped (needs the profile lacks)")
        } else {
            String::new()
        },
        s.wall.as_secs_f64(),
        if skipped > 0 {
            format!(" ({skipped} check(s) skipped by the profile)")
        } else {
            String::new()
        }
    );
    println!(
        "logs: {} (test_NNN_server.log, test_NNN_client.log, test_sync.log)",
        cfg.out_dir.display()
    );
}

/// Appends to a file (used by front ends for extra notes in `test_sync.log`).
pub fn append(path: &std::path::Path, text: &str) -> Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
