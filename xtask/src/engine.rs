//! Runs one scenario against one implementation profile: directories, steps, checks, snapshot, report.
//!
//! Both front ends (`cargo xtask scenarios` and the nextest test binary) call [`run`]; everything a
//! scenario does and how its failure reads is decided here, once.

mod checks;
mod report;
mod watch;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use crate::fsops;
use crate::netstat;
use crate::process::{DeadPort, ExitInfo, Hub, Line, WaitError, log_path, signal_name};
use crate::profile::{Profile, Ready, SyncDone, Vars};
use crate::scenario::{Action, Exit, Loc, Scenario, Since, SnapshotMode, Step, is_client};
use crate::tree::{self, Tree, entry_at, format_time};
use rustix::process::Signal;

const SERVER_HOST: &str = "127.0.0.1";
/// How long teardown lets processes exit on SIGTERM before SIGKILL.
const TEARDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a `log … contains` check waits for a line still in flight in a pipe.
const LOG_SETTLE: Duration = Duration::from_secs(2);
/// Entries of a tree shown in a failure report before it is cut short.
const REPORT_TREE_LIMIT: usize = 60;
/// How long a fixed-port server may wait for its ports to leave TIME_WAIT (60 s on Linux), on top
/// of the step's own timeout.
const PORT_RELEASE_LIMIT: Duration = Duration::from_secs(90);
/// How often kernel state (socket table, thread states) is looked at while waiting on it: it
/// offers no event to wait for.
const POLL: Duration = Duration::from_millis(10);

/// How to run scenarios.
#[derive(Clone, Debug)]
pub struct Config {
    pub profile: Profile,
    /// Where `test_NNN_server.log` and `test_NNN_client.log` go.
    pub out_dir: PathBuf,
    /// Keep the scenario's temporary directory instead of deleting it.
    pub keep: bool,
    /// Directory of the insta snapshots; `None` disables snapshots whatever the profile says.
    pub snapshot_dir: Option<PathBuf>,
}

/// The result of one scenario run.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub id: String,
    pub passed: bool,
    pub duration: Duration,
    /// What a person needs when it failed: step, expected vs actual, trees, log paths.
    pub failure: Option<String>,
    /// The step-by-step record for `test_sync.log`.
    pub run_log: String,
    /// Log files written.
    pub logs: Vec<PathBuf>,
    /// The kept temporary directory (`--keep`).
    pub kept: Option<PathBuf>,
    /// Checks not run because the profile turned them off.
    pub skipped_checks: usize,
    /// Why the scenario did not run at all: it needs a feature the profile lacks (`needs`).
    /// A skipped scenario has neither passed nor failed.
    pub skipped: Option<String>,
}

impl Outcome {
    /// Ran and failed (a skipped scenario has not failed).
    pub fn failed(&self) -> bool {
        !self.passed && self.skipped.is_none()
    }
}

/// A failed step: what was expected, what happened, and optional detail (a diff, log lines).
struct Failure {
    expected: String,
    actual: String,
    detail: Option<String>,
    /// The detail already holds the client → server diff (do not repeat it).
    has_diff: bool,
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure {
            expected: "the step to run".into(),
            actual: format!("error: {e:#}"),
            detail: None,
            has_diff: false,
        }
    }
}

fn fail(expected: impl Into<String>, actual: impl Into<String>) -> Failure {
    Failure {
        expected: expected.into(),
        actual: actual.into(),
        detail: None,
        has_diff: false,
    }
}

type StepResult = std::result::Result<String, Failure>;

/// State of one scenario run.
struct Run<'a> {
    sc: &'a Scenario,
    cfg: &'a Config,
    root: PathBuf,
    dirs: BTreeMap<String, PathBuf>,
    hub: Arc<Hub>,
    server: Option<usize>,
    ports: Option<(u16, u16)>,
    daemons: BTreeMap<String, usize>,
    background: BTreeMap<String, usize>,
    last_sync_mark: usize,
    /// Log positions named by `mark` steps.
    marks: BTreeMap<String, usize>,
    skipped: usize,
    /// The port clients get while no server has started.
    no_server_port: Option<DeadPort>,
}

/// Runs `sc` with `cfg`. Never panics on a scenario failure: everything ends up in the outcome.
pub fn run(sc: &Scenario, cfg: &Config) -> Outcome {
    let started = Instant::now();
    let mut log = String::new();
    let _ = writeln!(log, "=== {} — {} ({})", sc.id, sc.name, show_path(&sc.file));
    if let Some(why) = cfg.profile.unmet_needs(&sc.needs) {
        let _ = writeln!(log, "=== {} SKIP: {why}", sc.id);
        return Outcome {
            id: sc.id.clone(),
            passed: false,
            duration: started.elapsed(),
            failure: None,
            run_log: log,
            logs: Vec::new(),
            kept: None,
            skipped_checks: 0,
            skipped: Some(why),
        };
    }
    let logs = vec![
        log_path(&cfg.out_dir, &sc.number_text(), "server"),
        log_path(&cfg.out_dir, &sc.number_text(), "client"),
    ];
    let (tmp, hub) = match set_up(sc, cfg, &logs) {
        Ok(x) => x,
        Err(e) => {
            return Outcome {
                id: sc.id.clone(),
                passed: false,
                duration: started.elapsed(),
                failure: Some(format!("FAIL {}: cannot set up: {e:#}\n", sc.id)),
                run_log: log,
                logs,
                kept: None,
                skipped_checks: 0,
                skipped: None,
            };
        }
    };
    // Canonical, so that symlink targets and messages show the path the product sees.
    let root = tmp
        .path()
        .canonicalize()
        .unwrap_or_else(|_| tmp.path().to_path_buf());
    let mut run = Run {
        sc,
        cfg,
        dirs: BTreeMap::new(),
        root: root.clone(),
        hub,
        server: None,
        ports: None,
        daemons: BTreeMap::new(),
        background: BTreeMap::new(),
        last_sync_mark: 0,
        marks: BTreeMap::new(),
        skipped: 0,
        no_server_port: None,
    };
    let _ = writeln!(log, "    directory: {}", root.display());
    let mut failure = run.make_side_dirs();
    if failure.is_none() {
        failure = run.run_steps(started, &mut log);
    }
    for line in run.hub.stop_all(TEARDOWN_GRACE) {
        let _ = writeln!(log, "      teardown: {line}");
    }
    let report = run.final_report(failure, &logs, &mut log);
    let kept = if cfg.keep {
        let p = tmp.keep();
        let _ = writeln!(log, "    kept: {}", p.display());
        Some(p)
    } else {
        None
    };
    let duration = started.elapsed();
    let passed = report.is_none();
    let _ = writeln!(
        log,
        "=== {} {} in {}{}",
        sc.id,
        if passed { "PASS" } else { "FAIL" },
        fmt_ms(duration),
        if run.skipped > 0 {
            format!(" ({} check(s) skipped by the profile)", run.skipped)
        } else {
            String::new()
        }
    );
    Outcome {
        id: sc.id.clone(),
        passed,
        duration,
        failure: report,
        run_log: log,
        logs,
        kept,
        skipped_checks: run.skipped,
        skipped: None,
    }
}

/// The scenario's temporary directory and a hub writing the server and client logs.
fn set_up(sc: &Scenario, cfg: &Config, logs: &[PathBuf]) -> Result<(tempfile::TempDir, Arc<Hub>)> {
    cfg.profile.check_needs()?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!("scenario-{}-", sc.number_text()))
        .tempdir()?;
    let hub = Hub::new(&BTreeMap::from([
        ("server".to_string(), logs[0].clone()),
        ("client".to_string(), logs[1].clone()),
    ]))?;
    Ok((tmp, hub))
}

fn fmt_ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1}ms")
    } else if ms < 10_000.0 {
        format!("{ms:.0}ms")
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Indents every line after the first by `n` spaces (for multi-line values in reports).
fn indent_tail(s: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    s.trim_end().replace('\n', &format!("\n{pad}"))
}

fn exit_ok(expect: Exit, got: ExitInfo) -> bool {
    match (expect, got) {
        (Exit::Any, _) => true,
        (Exit::Code(c), ExitInfo::Code(g)) => c == g,
        (Exit::Code(_), ExitInfo::Signal(_)) => false,
        (Exit::Nonzero, ExitInfo::Code(g)) => g != 0,
        (Exit::Nonzero, ExitInfo::Signal(_)) => true,
    }
}

impl Run<'_> {
    /// One directory per side the scenario uses. A failure is reported as step 0.
    fn make_side_dirs(&mut self) -> Option<(usize, Failure)> {
        let mut failure = None;
        for side in self.sc.sides() {
            let dir = self.root.join(&side);
            if let Err(e) = fsops::mkdir_p(&dir, 0o755) {
                failure = Some((0, fail("scenario directories", format!("{e:#}"))));
            }
            self.dirs.insert(side, dir);
        }
        failure
    }

    /// Runs the steps in order until one fails, recording each in the run log.
    fn run_steps(&mut self, started: Instant, log: &mut String) -> Option<(usize, Failure)> {
        for step in &self.sc.steps {
            let t = Instant::now();
            let offset = started.elapsed();
            let result = self.step(step);
            let took = t.elapsed();
            match result {
                Ok(detail) => {
                    let _ = writeln!(
                        log,
                        "  {:>3} +{:>7.3}s {:>8}  ok    {}{}",
                        step.number,
                        offset.as_secs_f64(),
                        fmt_ms(took),
                        step.source,
                        if detail.is_empty() {
                            String::new()
                        } else {
                            format!("  ({detail})")
                        }
                    );
                }
                Err(f) => {
                    let _ = writeln!(
                        log,
                        "  {:>3} +{:>7.3}s {:>8}  FAIL  {}\n        expected: {}\n        actual:   {}",
                        step.number,
                        offset.as_secs_f64(),
                        fmt_ms(took),
                        step.source,
                        f.expected,
                        indent_tail(&f.actual, 18)
                    );
                    return Some((step.number, f));
                }
            }
        }
        None
    }

    /// The failure report of the failed step, or else of a snapshot mismatch; `None` when the
    /// scenario passed. Also appended to the run log.
    fn final_report(
        &self,
        failure: Option<(usize, Failure)>,
        logs: &[PathBuf],
        log: &mut String,
    ) -> Option<String> {
        if let Some((n, f)) = failure {
            let r = self.failure_report(n, &f, logs);
            log.push_str(&indent_block(&r, 6));
            return Some(r);
        }
        let msg = self.check_snapshot().err()?;
        let r = self.report_header(&format!(
            "final trees differ from the snapshot\n  {}",
            indent_tail(&msg, 2)
        )) + &self.report_trees_and_logs(logs, true);
        let _ = writeln!(log, "      snapshot: FAIL");
        log.push_str(&indent_block(&r, 6));
        Some(r)
    }

    fn deadline(&self, step: &Step) -> Instant {
        Instant::now() + step.timeout.unwrap_or(self.sc.timeout)
    }

    /// A process's environment: the profile's, plus a cache and state directory of this
    /// scenario's own (unless the profile sets them), so that runs never share a hash cache or
    /// a server's record of its client with each other or with the user's.
    fn isolated(&self, env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut env = env.clone();
        for (var, sub) in [("XDG_CACHE_HOME", "cache"), ("XDG_STATE_HOME", "state")] {
            env.entry(var.to_owned())
                .or_insert_with(|| self.root.join("home").join(sub).display().to_string());
        }
        env
    }

    fn dir(&self, side: &str) -> &Path {
        &self.dirs[side]
    }

    fn path(&self, at: &Loc) -> PathBuf {
        self.dir(&at.side).join(&at.path)
    }

    fn vars(&mut self, side: &str, interval: u64) -> Result<Vars> {
        let dir = self.dir(side).to_path_buf();
        let p = &self.cfg.profile;
        let (port, data_port) = match self.ports {
            Some(ports) => ports,
            None if p.fixed_ports() => (p.server.port, p.server.data_port),
            // No server yet: a port that refuses connections, so the client finds no server.
            None => {
                if self.no_server_port.is_none() {
                    self.no_server_port = Some(DeadPort::bind()?);
                }
                (self.no_server_port.as_ref().map_or(0, |p| p.port), 0)
            }
        };
        Ok(Vars {
            dir,
            port,
            data_port,
            server_host: SERVER_HOST.to_string(),
            interval,
            server_dir: self.dir("server").to_path_buf(),
        })
    }

    fn step(&mut self, step: &Step) -> StepResult {
        if step.is_check() {
            return self.check(step);
        }
        match &step.action {
            Action::Start { side, .. } if side == "server" => self.start_server(step),
            Action::Start { side, interval } => self.start_daemon(side, *interval),
            Action::Stop { side, exit } => self.stop(step, side, Signal::TERM, Some(*exit)),
            Action::Kill { side } => self.stop(step, side, Signal::KILL, None),
            Action::Sync {
                sides,
                exit,
                background,
            } => self.sync(step, sides, *exit, *background),
            Action::WaitExit { side, exit } => {
                let id = self
                    .background
                    .remove(side)
                    .or_else(|| self.daemons.remove(side))
                    .ok_or_else(|| anyhow!("no background process of {side} to wait for"))?;
                let got = self.hub.wait_exit(id, self.deadline(step));
                match got {
                    Some(e) if exit_ok(*exit, e) => Ok(e.to_string()),
                    Some(e) => Err(self.with_output(fail(exit.to_string(), e.to_string()), id)),
                    None => Err(fail(exit.to_string(), "still running at the timeout")),
                }
            }
            Action::Wait {
                side,
                pattern,
                count,
                since,
            } => {
                let from = self.mark(since);
                let watch = self.live_procs_of(side);
                let side2 = side.clone();
                let which = move |l: &Line| l.side == side2;
                match self
                    .hub
                    .wait_line(&which, pattern, from, *count, &watch, self.deadline(step))
                {
                    Ok(_) => Ok(String::new()),
                    Err(e) => Err(fail(
                        format!(
                            "{count} line(s) matching {:?} from {side}",
                            pattern.source()
                        ),
                        e.to_string(),
                    )),
                }
            }
            Action::WaitSync { side, count } => {
                let pattern = self.cfg.profile.cycle_done()?.ok_or_else(|| {
                    anyhow!("the profile has no client.cycle_done pattern for wait_sync")
                })?;
                let id = *self
                    .daemons
                    .get(side)
                    .ok_or_else(|| anyhow!("no client daemon running for {side}"))?;
                let from = self.hub.line_count();
                let which = move |l: &Line| l.proc == id;
                match self
                    .hub
                    .wait_line(&which, &pattern, from, *count, &[id], self.deadline(step))
                {
                    Ok(_) => Ok(String::new()),
                    Err(e) => Err(fail(
                        format!(
                            "{count} more completed sync cycle(s) of {side} ({:?})",
                            pattern.source()
                        ),
                        e.to_string(),
                    )),
                }
            }
            Action::WaitIdentical { a, b } => self.wait_identical(step, a, b),
            Action::Pause { side } => self.pause(step, side),
            Action::Resume { side } => self.resume(side),
            Action::Mark { name } => {
                let at = self.hub.line_count();
                self.marks.insert(name.clone(), at);
                // In the logs too, so a person reading them sees where "since the mark" starts.
                for log in ["server", "client"] {
                    self.hub.note(log, &format!("mark {name:?}"));
                }
                Ok(format!("after {} line(s)", at))
            }
            _ => self.change_files(&step.action),
        }
    }

    /// The steps that change files of a side.
    fn change_files(&mut self, action: &Action) -> StepResult {
        match action {
            Action::Write { at, content, mode } => {
                let p = self.path(at);
                fsops::write(&p, content, *mode)?;
                Ok(describe_file(&p))
            }
            Action::Append {
                at,
                content,
                times,
                every,
            } => {
                let p = self.path(at);
                // The scenario's input spread over time (a log file growing, say), not a wait for
                // a result: append i happens `every × i` after the first, however long each takes.
                let first = Instant::now();
                for i in 0..*times {
                    let due = first + *every * i;
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    fsops::append(&p, content)?;
                }
                let d = describe_file(&p);
                Ok(if *times > 1 {
                    format!("{times} appends over {}; {d}", fmt_ms(first.elapsed()))
                } else {
                    d
                })
            }
            Action::Modify {
                at,
                offset,
                content,
            } => {
                let p = self.path(at);
                fsops::modify(&p, *offset, content)?;
                Ok(describe_file(&p))
            }
            Action::Delete { at } => {
                fsops::delete(&self.path(at))?;
                Ok(String::new())
            }
            Action::Rename { from, to } => {
                fsops::rename(&self.path(from), &self.path(to))?;
                Ok(String::new())
            }
            Action::Copy { from, to } => {
                let p = self.path(to);
                fsops::copy(&self.path(from), &p)?;
                Ok(describe_file(&p))
            }
            Action::Mkdir { at, mode } => {
                fsops::mkdir_p(&self.path(at), mode.unwrap_or(fsops::DEFAULT_DIR_MODE))?;
                Ok(String::new())
            }
            Action::Chmod { at, mode } => {
                let p = self.path(at);
                if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                    return Err(anyhow!("chmod would follow the symlink {at}").into());
                }
                fsops::set_mode(&p, *mode)?;
                Ok(String::new())
            }
            Action::Touch { at, mtime } => {
                fsops::set_mtime(&self.path(at), mtime.0, mtime.1)?;
                Ok(format_time(mtime.0, mtime.1))
            }
            Action::Symlink { at, target } => {
                let target = target.replace("{outside}", &self.dir("outside").to_string_lossy());
                fsops::make_symlink(&self.path(at), &target)?;
                Ok(format!("-> {target}"))
            }
            Action::Mkfifo { at } => {
                fsops::mkfifo(&self.path(at))?;
                Ok(String::new())
            }
            Action::Generate {
                at,
                files,
                size,
                seed,
                flat,
            } => {
                fsops::generate_files(&self.path(at), *files, *size, *seed, *flat)?;
                Ok(format!("{files} files of {size} bytes"))
            }
            Action::Clone { from, to } => {
                fsops::clone_tree(self.dir(from), self.dir(to))?;
                Ok(String::new())
            }
            other => unreachable!("not a file change: {other:?}"),
        }
    }

    fn mark(&self, since: &Since) -> usize {
        match since {
            Since::Start => 0,
            Since::LastSync => self.last_sync_mark,
            Since::Now => self.hub.line_count(),
            // The parser made sure an earlier step sets it; a step that failed before it would
            // have ended the scenario.
            Since::Mark(name) => self.marks.get(name).copied().unwrap_or(0),
        }
    }

    fn live_procs_of(&self, side: &str) -> Vec<usize> {
        let mut ids: Vec<usize> = Vec::new();
        if side == "server" {
            ids.extend(self.server);
        } else {
            ids.extend(self.daemons.get(side));
            ids.extend(self.background.get(side));
        }
        ids
    }

    /// Adds the last lines a process printed to a failure (why a client failed is usually there).
    fn with_output(&self, mut f: Failure, id: usize) -> Failure {
        let lines = self.hub.lines(0, &|l: &Line| l.proc == id);
        let tail: Vec<_> = lines
            .iter()
            .rev()
            .take(15)
            .rev()
            .map(|l| l.text.as_str())
            .collect();
        if !tail.is_empty() {
            f.detail = Some(format!(
                "last output of {}:\n{}",
                self.hub.name(id),
                tail.iter()
                    .map(|t| format!("  | {t}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
        f
    }

    fn start_server(&mut self, step: &Step) -> StepResult {
        if let Some(id) = self.server {
            if self.hub.exit_of(id).is_none() {
                return Err(
                    anyhow!("the server is already running ({})", self.hub.name(id)).into(),
                );
            }
        }
        let p = &self.cfg.profile;
        let mut notes = Vec::new();
        if p.fixed_ports() {
            notes.extend(self.wait_ports_free()?);
        }
        let vars = Vars {
            dir: self.dir("server").to_path_buf(),
            port: p.server.port,
            data_port: p.server.data_port,
            server_host: SERVER_HOST.to_string(),
            interval: 0,
            server_dir: self.dir("server").to_path_buf(),
        };
        let argv = p.expand(&p.server.command, &vars);
        let from = self.hub.line_count();
        let env = self.isolated(&p.server.env);
        let id = self.hub.spawn("server", "server", &argv, &env)?;
        self.server = Some(id);
        let deadline = self.deadline(step);
        let (port, data_port) = match p.ready()? {
            Ready::Line(pattern) => {
                let which = move |l: &Line| l.proc == id;
                match self
                    .hub
                    .wait_line(&which, &pattern, from, 1, &[id], deadline)
                {
                    Ok(caps) => {
                        let get = |k: &str, default: u16| {
                            caps.get(k).and_then(|v| v.parse().ok()).unwrap_or(default)
                        };
                        (
                            get("port", p.server.port),
                            get("data_port", p.server.data_port),
                        )
                    }
                    Err(e) => {
                        let f = fail(
                            format!("a ready line matching {:?}", pattern.source()),
                            e.to_string(),
                        );
                        return Err(self.with_output(f, id));
                    }
                }
            }
            Ready::Listen => {
                self.wait_listening(id, p.server.port, deadline)?;
                (p.server.port, p.server.data_port)
            }
        };
        if p.server.wait_idle {
            self.wait_server_idle(id, deadline)?;
        }
        self.ports = Some((port, data_port));
        notes.insert(0, format!("control port {port}, data port {data_port}"));
        Ok(notes.join("; "))
    }

    /// Waits until the kernel lists the server's fixed control port as listening. Nothing
    /// connects to it: a single-threaded server would take the probe for its client.
    fn wait_listening(&self, id: usize, port: u16, deadline: Instant) -> Result<(), Failure> {
        let expected = || format!("port {port} listening (in /proc/net/tcp or tcp6)");
        loop {
            if netstat::is_listening(port).map_err(anyhow::Error::from)? {
                return Ok(());
            }
            if let Some(e) = self.hub.exit_of(id) {
                let f = fail(expected(), format!("server ended ({e})"));
                return Err(self.with_output(f, id));
            }
            if Instant::now() >= deadline {
                let f = fail(expected(), "not listening at the timeout");
                return Err(self.with_output(f, id));
            }
            std::thread::sleep(POLL);
        }
    }

    /// With fixed ports, the previous scenario's server may have left its control port in
    /// TIME_WAIT (it closed a connection first), and a server that does not set SO_REUSEADDR
    /// cannot bind it for 60 s. Waits, within [`PORT_RELEASE_LIMIT`], until no socket is bound to
    /// either fixed port; a listener there is another server, reported at once.
    fn wait_ports_free(&self) -> Result<Option<String>, Failure> {
        let p = &self.cfg.profile;
        let mut ports = vec![p.server.port];
        if p.server.data_port != 0 && p.server.data_port != p.server.port {
            ports.push(p.server.data_port);
        }
        let started = Instant::now();
        loop {
            let mut busy = Vec::new();
            for &port in &ports {
                let states = netstat::states_on_port(port).map_err(anyhow::Error::from)?;
                if states.contains(&netstat::LISTEN) {
                    return Err(fail(
                        format!("port {port} free before the server starts"),
                        format!(
                            "something else listens on it ({}); is another server running?",
                            netstat::describe(&states)
                        ),
                    ));
                }
                if !states.is_empty() {
                    busy.push(format!("{port}: {}", netstat::describe(&states)));
                }
            }
            let waited = started.elapsed();
            if busy.is_empty() {
                return Ok((waited >= POLL).then(|| {
                    let text = format!(
                        "waited {} for ports {} to be released",
                        fmt_ms(waited),
                        ports
                            .iter()
                            .map(u16::to_string)
                            .collect::<Vec<_>>()
                            .join("/")
                    );
                    self.hub.note("server", &text);
                    text
                }));
            }
            if waited >= PORT_RELEASE_LIMIT {
                return Err(fail(
                    format!("ports free before the server starts (waited {PORT_RELEASE_LIMIT:?})"),
                    format!("still in use: {}", busy.join("; ")),
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until every thread of the server is asleep (profile `wait_idle`): it has finished
    /// what it does between sessions and waits for the next client.
    fn wait_server_idle(&self, id: usize, deadline: Instant) -> Result<(), Failure> {
        let pid = self.hub.pid(id);
        loop {
            match netstat::tree_asleep(pid).map_err(anyhow::Error::from)? {
                Some(true) => return Ok(()),
                None => {
                    let e = self.hub.wait_exit(id, deadline);
                    let e = e.map(|e| e.to_string()).unwrap_or_default();
                    let f = fail(
                        "the server idle, waiting for a client",
                        format!("ended ({e})"),
                    );
                    return Err(self.with_output(f, id));
                }
                Some(false) if Instant::now() >= deadline => {
                    let f = fail(
                        "the server idle, waiting for a client (all threads asleep)",
                        "still busy at the timeout",
                    );
                    return Err(self.with_output(f, id));
                }
                Some(false) => std::thread::sleep(POLL),
            }
        }
    }

    fn start_daemon(&mut self, side: &str, interval: u64) -> StepResult {
        let cfg = self.cfg;
        let p = &cfg.profile;
        let cmd = p
            .client
            .daemon
            .as_ref()
            .ok_or_else(|| anyhow!("the profile has no client.daemon command"))?;
        if self.daemons.contains_key(side) {
            return Err(anyhow!("a client daemon for {side} is already running").into());
        }
        let vars = self.vars(side, interval)?;
        let argv = p.expand(cmd, &vars);
        let env = self.isolated(&p.client.env);
        let id = self.hub.spawn(side, "client", &argv, &env)?;
        self.daemons.insert(side.to_string(), id);
        Ok(format!("pid {}", self.hub.pid(id)))
    }

    fn stop(&mut self, step: &Step, side: &str, sig: Signal, expect: Option<Exit>) -> StepResult {
        let id = if side == "server" {
            self.server.take()
        } else {
            self.daemons
                .remove(side)
                .or_else(|| self.background.remove(side))
        }
        .ok_or_else(|| anyhow!("nothing of {side} is running"))?;
        // A paused process would only queue SIGTERM; SIGKILL needs no help.
        if sig != Signal::KILL {
            self.hub.resume_if_paused(id);
        }
        if !self.hub.signal(id, sig) {
            let e = self
                .hub
                .exit_of(id)
                .map(|e| e.to_string())
                .unwrap_or_default();
            return Err(self.with_output(
                fail(
                    format!("{side} running"),
                    format!("it had already ended ({e})"),
                ),
                id,
            ));
        }
        match (self.hub.wait_exit(id, self.deadline(step)), expect) {
            (None, _) => Err(fail(
                format!("{side} to exit after {}", signal_name(sig)),
                "still running at the timeout",
            )),
            (Some(e), Some(x)) if !exit_ok(x, e) => {
                Err(self.with_output(fail(format!("{side} to end with {x}"), e.to_string()), id))
            }
            (Some(e), _) => Ok(e.to_string()),
        }
    }

    fn sync(&mut self, step: &Step, sides: &[String], exit: Exit, background: bool) -> StepResult {
        let cfg = self.cfg;
        let p = &cfg.profile;
        let mark = self.hub.line_count();
        self.last_sync_mark = mark;
        let mut ids = Vec::new();
        for side in sides {
            let vars = self.vars(side, 0)?;
            let argv = p.expand(&p.client.once, &vars);
            ids.push((
                side.clone(),
                self.hub
                    .spawn(side, "client", &argv, &self.isolated(&p.client.env))?,
            ));
        }
        if background {
            for (side, id) in ids {
                self.background.insert(side, id);
            }
            return Ok("in the background".into());
        }
        let deadline = self.deadline(step);
        let mut outcomes = Vec::new();
        for (side, id) in &ids {
            let e = self.wait_sync_end(side, *id, mark, exit, deadline)?;
            outcomes.push(format!("{side}: {e}"));
        }
        // The client may exit a moment before the server logs the end of its session; wait for
        // that line so later log checks see the whole session.
        if exit == Exit::Code(0) {
            self.wait_sessions_done(mark, ids.len(), deadline)?;
        }
        Ok(outcomes.join(", "))
    }

    /// Waits until one client's sync has ended as the profile tells (its exit, or its done line
    /// and then SIGTERM), and checks that it ended with `exit`.
    fn wait_sync_end(
        &self,
        side: &str,
        id: usize,
        mark: usize,
        exit: Exit,
        deadline: Instant,
    ) -> Result<ExitInfo, Failure> {
        let got = match self.cfg.profile.sync_done()? {
            SyncDone::Exit => self.hub.wait_exit(id, deadline),
            SyncDone::Line(pattern) => {
                let which = move |l: &Line| l.proc == id;
                match self
                    .hub
                    .wait_line(&which, &pattern, mark, 1, &[id], deadline)
                {
                    // A client that never exits by itself: the line says it is done.
                    Ok(_) => {
                        self.hub.signal(id, Signal::TERM);
                        self.hub.wait_exit(id, deadline);
                        Some(ExitInfo::Code(0))
                    }
                    Err(WaitError::Exited(_)) => self.hub.exit_of(id),
                    Err(WaitError::Timeout(_)) => None,
                }
            }
        };
        let expected = || format!("{side}'s sync to finish with {exit}");
        match got {
            None => Err(self.with_output(fail(expected(), "still running at the timeout"), id)),
            Some(e) if !exit_ok(exit, e) => {
                Err(self.with_output(fail(expected(), e.to_string()), id))
            }
            Some(e) => Ok(e),
        }
    }

    /// Waits for the server's `session_done` line of `sessions` sessions since `mark` (when the
    /// profile has one and a server runs), then, with `wait_idle`, until the server is idle.
    fn wait_sessions_done(
        &self,
        mark: usize,
        sessions: usize,
        deadline: Instant,
    ) -> Result<(), Failure> {
        let p = &self.cfg.profile;
        let (Some(pattern), Some(server)) = (p.session_done()?, self.server) else {
            return Ok(());
        };
        let which = move |l: &Line| l.proc == server;
        if let Err(e) = self
            .hub
            .wait_line(&which, &pattern, mark, sessions, &[server], deadline)
        {
            let f = fail(
                format!(
                    "the server to log {:?} for {sessions} session(s)",
                    pattern.source(),
                ),
                e.to_string(),
            );
            return Err(self.with_output(f, server));
        }
        if p.server.wait_idle {
            self.wait_server_idle(server, deadline)?;
        }
        Ok(())
    }
}

/// "1 entry", "2 entries", "1 difference", "3 differences".
fn plural(n: usize, word: &str) -> String {
    match (n, word.strip_suffix('y')) {
        (1, _) => format!("1 {word}"),
        (_, Some(stem)) => format!("{n} {stem}ies"),
        _ => format!("{n} {word}s"),
    }
}

/// A path relative to the current directory when it is inside it (shorter reports).
pub fn show_path(p: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| p.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .filter(|r| !r.as_os_str().is_empty())
        .unwrap_or_else(|| p.to_path_buf())
        .display()
        .to_string()
}

fn indent_block(s: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    s.lines().map(|l| format!("{pad}{l}\n")).collect()
}

fn describe_file(p: &Path) -> String {
    match entry_at(p, "") {
        Ok(e) if e.kind == tree::Kind::File => {
            format!("{} bytes, md5 {}", e.size, e.md5.unwrap_or_default())
        }
        _ => String::new(),
    }
}

/// The snapshot of a finished scenario: both final trees (client sides first, then the server),
/// sorted, without mtimes (they vary run to run), with the temporary root redacted.
pub fn snapshot_text(
    sc: &Scenario,
    root: &Path,
    dirs: &BTreeMap<String, PathBuf>,
) -> Result<String> {
    let mut out = String::new();
    let mut sides: Vec<&String> = dirs.keys().filter(|s| is_client(s)).collect();
    sides.push(dirs.keys().find(|s| *s == "server").expect("server side"));
    if dirs
        .get("outside")
        .is_some_and(|d| d.read_dir().is_ok_and(|mut r| r.next().is_some()))
    {
        sides.push(dirs.keys().find(|s| *s == "outside").expect("outside side"));
    }
    for side in sides {
        let t = Tree::scan(&dirs[side.as_str()])?;
        match sc.snapshot {
            SnapshotMode::Digest => {
                let listing = t.render(false, usize::MAX);
                let files = t
                    .entries
                    .values()
                    .filter(|e| e.kind == tree::Kind::File)
                    .count();
                let bytes: u64 = t.entries.values().map(|e| e.size).sum();
                let _ = writeln!(
                    out,
                    "{side}: {} entries, {files} files, {bytes} bytes, listing md5 {}",
                    t.len(),
                    tree::md5_bytes(listing.as_bytes())
                );
            }
            _ => {
                let _ = writeln!(out, "{side}: {}", plural(t.len(), "entry"));
                out.push_str(&indent_block(&t.render(false, usize::MAX), 2));
            }
        }
    }
    Ok(out.replace(&root.to_string_lossy().into_owned(), "[ROOT]"))
}
