//! `cargo xtask bench latency`: how soon a change written into a watched tree is identical on the
//! server, ours (`client-sync DIR` as a daemon) side by side with lsyncd (inotify, then rsync to
//! the bench's rsync daemon) in the same run.
//!
//! Each tool in turn gets its own copy of the same source tree (W4's 100,000 × 1 KiB files in
//! 1,000 directories, a tenth with `--quick`, plus the directories the steps write into), starts,
//! mirrors it into an empty server-side directory (untimed), and then goes through the same steps:
//!
//! * L5: idle, watching: CPU and RSS of each side over a window;
//! * L1: single 4 KiB files written one after another, each timed until identical on the server;
//! * L2: 1,000 × 4 KiB files written at once;
//! * L3: W6's change (10 files rewritten, 10 added) in the big tree;
//! * L4: a directory of 10,000 files renamed, with the bytes on the wire meanwhile.
//!
//! Only one tool runs at a time, so neither pays for the other's work. [`converge`] is how
//! "identical on the server" is detected (the same for both tools), [`lsyncd`] the peer's
//! configuration, [`report`] the figures, targets and `latency.md`.

mod converge;
mod lsyncd;
mod report;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::data::{self, Dataset};
use super::proc::{
    OurServer, Proc, RsyncDaemon, cpu_ticks, lo_tx_bytes, log_tail, open_log, ticks_per_second,
    vm_rss_kib,
};
use super::report::{Machine, RSS_LIMIT_KIB, bytes, load_average};
use super::{Dirs, RSYNC, SOURCE_SETTLE, Tree, datasets, find_peer, size_text, thousands};
use converge::{Expect, Waited, wait_identical};
use report::{Goal, Got, Key, Measure, Report, ToolRun, Unit, percentile};

pub const USAGE: &str = "\
options of `bench latency` (ours as a daemon against lsyncd; writes target/bench/latency.md):
  --quick         a 10,000-file tree instead of W4's 100,000 and a 5 s idle window: a fast check
  --writes N      single-file writes timed one after another in L1 (default 200)
  --interval S    ours runs `client-sync --interval S` (default: the product's own when the build
                  watches; 1 when it polls)
  --no-watch      ours runs `client-sync --no-watch`: polling, for comparison
";

/// Longest a step may take to show on the server before it is reported as a timeout.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest the initial full sync of a tool may take.
const INITIAL_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// How long the bench waits on for a step that has timed out, before it gives up on the tool.
const LATE_LIMIT: Duration = Duration::from_secs(10 * 60);

/// After the initial sync a daemon may still save its cache, free its lists or look over its own
/// writes: L5 waits until each side has used at most 1 % of a core over this span...
const QUIET_SPAN: Duration = Duration::from_secs(2);

/// ...or this long, after which L5 shows the daemon still busy.
const QUIET_LIMIT: Duration = Duration::from_secs(120);

/// How long after the server side is identical L4 still counts bytes on the wire: what a tool
/// sends after its last change (acknowledgements, the end of a session) belongs to the step.
const WIRE_TAIL: Duration = Duration::from_millis(200);

/// The two tools, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tool {
    Ours,
    Lsyncd,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Ours => "ours",
            Tool::Lsyncd => "lsyncd",
        }
    }
}

struct Options {
    quick: bool,
    writes: u64,
    interval: Option<u64>,
    no_watch: bool,
}

fn parse_args(args: &[String]) -> Result<Option<Options>> {
    let mut o = Options {
        quick: false,
        writes: 200,
        interval: None,
        no_watch: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> Result<u64> {
            let v = it.next().with_context(|| format!("{name} needs a value"))?;
            Ok(crate::positive(v, name)? as u64)
        };
        match arg.as_str() {
            "-h" | "--help" => {
                print!(
                    "usage: cargo xtask bench latency [--quick] [--writes N] [--interval S] \
                     [--no-watch]\n\n\
                     {USAGE}"
                );
                return Ok(None);
            }
            "--quick" => o.quick = true,
            "--writes" => o.writes = number("--writes")?,
            "--interval" => o.interval = Some(number("--interval")?),
            "--no-watch" => o.no_watch = true,
            s => bail!("unknown argument {s:?} of `bench latency` (see --help)"),
        }
    }
    Ok(Some(o))
}

/// The trees and the sizes of the steps.
struct Sizes {
    /// W4's tree (a tenth with --quick): the watched tree every step runs in.
    many: Dataset,
    /// L1's files, written one at a time into `l1/d0000/`.
    l1: Dataset,
    /// L2's files, written at once into `l2/d0000/`.
    l2: Dataset,
    /// L4's directory `l4/d0000`, renamed as a whole.
    l4: Dataset,
    /// L5's window.
    idle: Duration,
}

impl Sizes {
    fn new(quick: bool, writes: u64) -> Sizes {
        let small = |name, files, size, seed| Dataset {
            name,
            files,
            dirs: 1,
            size,
            seed,
        };
        Sizes {
            many: datasets(quick)[Tree::Many as usize],
            l1: small("l1", writes, 4 << 10, 21),
            l2: small("l2", 1_000, 4 << 10, 22),
            l4: small("l4", 10_000, 1 << 10, 24),
            idle: Duration::from_secs(if quick { 5 } else { 10 }),
        }
    }
}

/// How our client runs: watching (a build that has `--no-watch`) or only polling.
struct OursMode {
    /// Whether this build can watch (its client has `--no-watch`).
    can_watch: bool,
    /// Whether the bench was told `--no-watch`.
    no_watch: bool,
    /// `--interval` passed to the client; none: the product's default.
    interval: Option<u64>,
}

impl OursMode {
    /// Asks the client's `--help` whether it can watch. A client that only polls gets a 1 s
    /// interval unless told otherwise, or every step would wait for a minute.
    fn detect(client: &Path, interval: Option<u64>, no_watch: bool) -> Result<OursMode> {
        let out = Command::new(client)
            .arg("--help")
            .output()
            .with_context(|| format!("run {} --help", client.display()))?;
        let can_watch = String::from_utf8_lossy(&out.stdout).contains("--no-watch");
        let watching = can_watch && !no_watch;
        Ok(OursMode {
            can_watch,
            no_watch,
            interval: if watching {
                interval
            } else {
                Some(interval.unwrap_or(1))
            },
        })
    }

    /// The client's arguments besides DIR, server and caches.
    fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if self.can_watch && self.no_watch {
            a.push("--no-watch".to_string());
        }
        if let Some(s) = self.interval {
            a.extend(["--interval".to_string(), s.to_string()]);
        }
        a
    }

    fn describe(&self) -> String {
        let interval = self.interval.map_or_else(
            || "the product's default `--interval`".to_string(),
            |s| format!("`--interval {s}`"),
        );
        match (self.can_watch, self.no_watch) {
            (true, false) => format!(
                "`client-sync DIR` watching with inotify, {interval} as the rescan safety net"
            ),
            (true, true) => format!(
                "`client-sync DIR --no-watch` with {interval}: polling (a full rescan and sync \
                 each interval)"
            ),
            (false, _) => format!(
                "`client-sync DIR` with {interval}: this build cannot watch, so it polls (a \
                 full rescan and sync each interval)"
            ),
        }
    }
}

/// The processes of one tool: the side that watches the source and the side that writes the
/// server's tree.
struct Daemons {
    client: Proc,
    server: ServerSide,
    client_log: PathBuf,
    server_log: PathBuf,
}

enum ServerSide {
    Ours(OurServer),
    Rsync(RsyncDaemon),
}

impl Daemons {
    fn server_pid(&self) -> libc::pid_t {
        match &self.server {
            ServerSide::Ours(s) => s.proc.pid(),
            ServerSide::Rsync(d) => d.pid(),
        }
    }

    /// Fails, with the last lines of its log, when either side has ended.
    fn check_running(&self) -> Result<()> {
        let server_ended = match &self.server {
            ServerSide::Ours(s) => s.proc.has_exited(),
            ServerSide::Rsync(d) => d.has_exited(),
        };
        if self.client.has_exited() {
            bail!(
                "the client side has ended; {}",
                log_tail(&self.client_log, 20)
            );
        }
        if server_ended {
            bail!(
                "the server side has ended; {}",
                log_tail(&self.server_log, 20)
            );
        }
        Ok(())
    }

    /// Stops the client side, then the server side.
    fn stop(mut self) -> Result<()> {
        let exit = self.client.terminate(Duration::from_secs(15))?;
        // lsyncd always ends with 143 on SIGTERM; ours should end cleanly.
        if !exit.success() && matches!(self.server, ServerSide::Ours(_)) {
            println!("  note: client-sync ended with {exit} after SIGTERM");
        }
        match self.server {
            ServerSide::Ours(mut s) => {
                s.proc.terminate(Duration::from_secs(15))?;
            }
            ServerSide::Rsync(d) => {
                let _ = d.finish();
            }
        }
        Ok(())
    }
}

/// Where everything lives during one run, and how ours runs.
struct Latency {
    server_bin: PathBuf,
    client_bin: PathBuf,
    logs: PathBuf,
    work: PathBuf,
    rsync_conf: PathBuf,
    mode: OursMode,
    sizes: Sizes,
}

impl Latency {
    fn src(&self, tool: Tool) -> PathBuf {
        self.work.join(format!("src-{}", tool.name()))
    }

    fn dst(&self, tool: Tool) -> PathBuf {
        self.work.join(format!("dst-{}", tool.name()))
    }

    /// Writes the tool's source tree: the watched tree, L4's directory, and the empty
    /// directories L1 and L2 write into (there from the start, so the steps only add files).
    fn generate(&self, tool: Tool) -> Result<()> {
        let src = self.src(tool);
        let t = Instant::now();
        self.sizes.many.generate(&src)?;
        self.sizes.l4.generate(&src.join("l4"))?;
        for d in ["l1", "l2"] {
            fs::create_dir_all(src.join(d).join("d0000"))?;
        }
        println!(
            "  generated {} ({} × {}, and {} × {} for L4) in {:.1} s",
            src.display(),
            thousands(self.sizes.many.files),
            size_text(self.sizes.many.size),
            thousands(self.sizes.l4.files),
            size_text(self.sizes.l4.size),
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn start(&self, tool: Tool) -> Result<Daemons> {
        let (src, dst) = (self.src(tool), self.dst(tool));
        fs::create_dir_all(&dst)?;
        let client_log = self.logs.join(format!("{}-client.log", tool.name()));
        let (mut cmd, server, server_log) = match tool {
            Tool::Ours => {
                let server_log = self.logs.join("ours-server.log");
                let (server_cache, client_cache) = (
                    self.work.join("cache-server"),
                    self.work.join("cache-client"),
                );
                for d in [&server_cache, &client_cache] {
                    fs::create_dir_all(d)?;
                }
                // State of this run alone (never the user's ~/.local/state): the product
                // creates these.
                let (server_state, client_state) = (
                    self.work.join("state-server"),
                    self.work.join("state-client"),
                );
                let server = OurServer::start(
                    &self.server_bin,
                    &dst,
                    &server_cache,
                    &server_state,
                    &server_log,
                )?;
                let mut cmd = Command::new(&self.client_bin);
                cmd.arg(&src)
                    .args(["--server", "127.0.0.1", "--port"])
                    .arg(server.port.to_string())
                    .arg("-q")
                    .arg("--cache-dir")
                    .arg(&client_cache)
                    .arg("--state-dir")
                    .arg(&client_state);
                cmd.args(self.mode.args());
                (cmd, ServerSide::Ours(server), server_log)
            }
            Tool::Lsyncd => {
                let server_log = self.logs.join("rsyncd.log");
                let daemon = RsyncDaemon::start(&self.rsync_conf, &server_log)?;
                let conf = self.work.join("lsyncd.conf.lua");
                let target = format!("rsync://127.0.0.1:{}/latency/", daemon.port);
                fs::write(&conf, lsyncd::config(&src, &target))?;
                let mut cmd = Command::new(lsyncd::LSYNCD.program);
                cmd.arg(&conf);
                (cmd, ServerSide::Rsync(daemon), server_log)
            }
        };
        let out = open_log(&client_log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let (client, _) = Proc::spawn(tool.name(), &mut cmd)?;
        Ok(Daemons {
            client,
            server,
            client_log,
            server_log,
        })
    }

    /// Runs the tool's part; a failure ends it, and the figures gathered so far stay.
    fn measure(&self, tool: Tool) -> ToolRun {
        println!("{}:", tool.name());
        let mut run = ToolRun::default();
        if let Err(e) = self.steps(tool, &mut run) {
            println!("  {} FAILED: {e:#}", tool.name());
            run.error = Some(format!("{e:#}"));
        }
        run
    }

    fn steps(&self, tool: Tool, run: &mut ToolRun) -> Result<()> {
        let daemons = self.start(tool)?;
        let initial = self.wait_initial(tool, &daemons)?;
        run.got.insert(Key::Initial, Got::Value(initial));
        println!(
            "  initial full sync: identical after {initial:.1} s (polled about once a second)"
        );
        match quiet(&daemons)? {
            Some(s) => {
                run.got.insert(Key::Quiet, Got::Value(s));
                println!("  then quiet after {s:.0} s");
            }
            None => {
                run.got.insert(Key::Quiet, Got::Timeout);
                println!(
                    "  still busy {} s after the initial sync",
                    QUIET_LIMIT.as_secs()
                );
            }
        }
        self.idle(&daemons, run)?;
        daemons.check_running()?;
        self.l1(tool, run)?;
        daemons.check_running()?;
        self.l2(tool, run)?;
        daemons.check_running()?;
        self.l3(tool, run)?;
        daemons.check_running()?;
        self.l4(tool, run)?;
        daemons.check_running()?;
        daemons.stop()
    }

    /// Waits until the server side mirrors the whole source: untimed setup, polled about once
    /// a second (a whole-tree comparison takes about that long).
    fn wait_initial(&self, tool: Tool, daemons: &Daemons) -> Result<f64> {
        let (src, dst) = (self.src(tool), self.dst(tool));
        let t0 = Instant::now();
        loop {
            daemons.check_running()?;
            let check = data::check_mirror(&src, &dst);
            if check.is_ok() {
                return Ok(t0.elapsed().as_secs_f64());
            }
            if t0.elapsed() > INITIAL_TIMEOUT {
                check.context("the initial sync did not finish in time")?;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Untimed, after a step: the whole tree mirrors the source (paths, kinds, modes, sizes,
    /// mtimes) and `changed` hold the same bytes on both sides. A difference is looked at once
    /// more a second later, to tell a tool's passing temporary file from a real difference;
    /// either way it is reported.
    fn verify(&self, tool: Tool, step: &str, changed: &[PathBuf], run: &mut ToolRun) -> Result<()> {
        let (src, dst) = (self.src(tool), self.dst(tool));
        let check = || -> Result<()> {
            data::check_mirror(&src, &dst)?;
            data::check_content(&src, &dst, changed)
        };
        if let Err(first) = check() {
            std::thread::sleep(Duration::from_secs(1));
            check().with_context(|| format!("after {step} the server side is not a mirror"))?;
            run.notes.push(format!(
                "after {step}, the whole-tree check found a difference that was gone 1 s later: \
                 {first:#}"
            ));
        }
        Ok(())
    }

    /// L5: CPU time and resident memory of both sides over a window in which nothing changes.
    fn idle(&self, daemons: &Daemons, run: &mut ToolRun) -> Result<()> {
        let pids = [daemons.client.pid(), daemons.server_pid()];
        let before = [cpu_ticks(pids[0])?, cpu_ticks(pids[1])?];
        let t = Instant::now();
        std::thread::sleep(self.sizes.idle);
        let after = [cpu_ticks(pids[0])?, cpu_ticks(pids[1])?];
        let secs = t.elapsed().as_secs_f64();
        let pct = |k: usize| (after[k] - before[k]) as f64 / ticks_per_second() / secs * 100.0;
        let rss = [vm_rss_kib(pids[0])?, vm_rss_kib(pids[1])?];
        for (key, v) in [
            (Key::L5CpuClient, pct(0)),
            (Key::L5CpuServer, pct(1)),
            (Key::L5RssClient, rss[0] as f64),
            (Key::L5RssServer, rss[1] as f64),
        ] {
            run.got.insert(key, Got::Value(v));
        }
        println!(
            "  L5 idle {secs:.0} s: CPU client {:.2} %, server {:.2} %; RSS client {}, server {}",
            pct(0),
            pct(1),
            bytes(rss[0] << 10),
            bytes(rss[1] << 10)
        );
        Ok(())
    }

    /// L1: each file written, then waited for on the server, before the next is written.
    fn l1(&self, tool: Tool, run: &mut ToolRun) -> Result<()> {
        let (src, dst) = (self.src(tool), self.dst(tool));
        let ds = &self.sizes.l1;
        let mut written = Vec::new();
        for i in 0..ds.files {
            let rel = Path::new("l1").join(ds.rel(i));
            let bytes = ds.file_bytes(i);
            let t0 = Instant::now();
            write_file(&src.join(&rel), &bytes)?;
            let expect = [Expect::File {
                rel: rel.clone(),
                bytes,
            }];
            let step = format!("L1 write {} of {}", i + 1, ds.files);
            // A late write is noted and counted at its real time; one that never arrives ends L1.
            let s = match wait_step(run, None, &step, &dst, &expect, t0) {
                Ok(s) => s,
                Err(e) => {
                    for key in [Key::L1p50, Key::L1p99] {
                        run.got.insert(key, Got::Timeout);
                    }
                    return Err(e);
                }
            };
            run.l1.push(s);
            written.push(rel);
        }
        let (p50, p99) = (percentile(&run.l1, 50.0), percentile(&run.l1, 99.0));
        run.got.insert(Key::L1p50, Got::Value(p50));
        run.got.insert(Key::L1p99, Got::Value(p99));
        println!(
            "  L1 {} sequential writes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            run.l1.len(),
            p50 * 1e3,
            p99 * 1e3,
            percentile(&run.l1, 100.0) * 1e3
        );
        self.verify(tool, "L1", &written, run)
    }

    /// L2: all files written as fast as the bench can, then waited for together.
    fn l2(&self, tool: Tool, run: &mut ToolRun) -> Result<()> {
        let (src, dst) = (self.src(tool), self.dst(tool));
        let ds = &self.sizes.l2;
        // Content made beforehand, so the timing holds the writing alone.
        let expects: Vec<Expect> = (0..ds.files)
            .map(|i| Expect::File {
                rel: Path::new("l2").join(ds.rel(i)),
                bytes: ds.file_bytes(i),
            })
            .collect();
        let t0 = Instant::now();
        for e in &expects {
            if let Expect::File { rel, bytes } = e {
                write_file(&src.join(rel), bytes)?;
            }
        }
        let s = wait_step(run, Some(Key::L2), "L2", &dst, &expects, t0)?;
        println!(
            "  L2 {} × {} written at once: {:.1} ms",
            thousands(ds.files),
            size_text(ds.size),
            s * 1e3
        );
        let changed: Vec<PathBuf> = expects.iter().map(|e| e.rel().to_owned()).collect();
        self.verify(tool, "L2", &changed, run)
    }

    /// L3: W6's change (the same seeded change for both tools) in the watched tree.
    fn l3(&self, tool: Tool, run: &mut ToolRun) -> Result<()> {
        let (src, dst) = (self.src(tool), self.dst(tool));
        let t0 = Instant::now();
        let touched = self.sizes.many.apply_change(&src, 1, 10, 10)?;
        // Reading back 20 small files just written costs microseconds.
        let expects = touched
            .iter()
            .map(|rel| {
                Ok(Expect::File {
                    rel: rel.clone(),
                    bytes: fs::read(src.join(rel))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let s = wait_step(run, Some(Key::L3), "L3", &dst, &expects, t0)?;
        println!("  L3 10 files changed and 10 added: {:.1} ms", s * 1e3);
        self.verify(tool, "L3", &touched, run)
    }

    /// L4: the 10,000-file directory renamed; loopback bytes from just before the rename until
    /// [`WIRE_TAIL`] after the server side is identical. Then the content of every file of the
    /// tree is compared, as the last check of the tool's part.
    fn l4(&self, tool: Tool, run: &mut ToolRun) -> Result<()> {
        let (src, dst) = (self.src(tool), self.dst(tool));
        let (old, new) = (Path::new("l4/d0000"), Path::new("l4/renamed"));
        let names = fs::read_dir(src.join(old))?
            .map(|e| Ok(e?.file_name()))
            .collect::<Result<BTreeSet<OsString>>>()?;
        let expects = [
            Expect::Absent(old.to_owned()),
            Expect::Names {
                rel: new.to_owned(),
                names,
            },
        ];
        let lo_before = lo_tx_bytes()?;
        let t0 = Instant::now();
        fs::rename(src.join(old), src.join(new))?;
        let s = wait_step(run, Some(Key::L4), "L4", &dst, &expects, t0)?;
        std::thread::sleep(WIRE_TAIL);
        let wire = lo_tx_bytes()?.saturating_sub(lo_before);
        run.got.insert(Key::L4Wire, Got::Value(wire as f64));
        println!(
            "  L4 directory of {} files renamed: {:.1} ms, {} on the wire",
            thousands(self.sizes.l4.files),
            s * 1e3,
            bytes(wire)
        );
        self.verify(tool, "L4", &data::files_under(&src)?, run)
    }
}

/// Waits until each side of the tool has used at most 1 % of a core over [`QUIET_SPAN`] and
/// every thread of it is asleep (none in disk I/O); returns
/// how long that took, or none when it did not happen within [`QUIET_LIMIT`].
fn quiet(daemons: &Daemons) -> Result<Option<f64>> {
    let pids = [daemons.client.pid(), daemons.server_pid()];
    let allowed = (ticks_per_second() * QUIET_SPAN.as_secs_f64() / 100.0).max(1.0) as u64;
    let t0 = Instant::now();
    loop {
        let before = [cpu_ticks(pids[0])?, cpu_ticks(pids[1])?];
        std::thread::sleep(QUIET_SPAN);
        let after = [cpu_ticks(pids[0])?, cpu_ticks(pids[1])?];
        // Asleep too: a thread blocked in disk I/O (a server's flush before its `sync:done`)
        // uses no CPU, but its side is not done.
        let asleep = || {
            pids.iter()
                .all(|&p| xtask::netstat::tree_asleep(p).ok().flatten() == Some(true))
        };
        if (0..2).all(|k| after[k] - before[k] <= allowed) && asleep() {
            return Ok(Some(t0.elapsed().as_secs_f64()));
        }
        if t0.elapsed() >= QUIET_LIMIT {
            return Ok(None);
        }
    }
}

/// Waits for a step and records its figure under `key`. A step not identical within
/// [`STEP_TIMEOUT`] is a timeout; the bench then waits on, untimed, up to [`LATE_LIMIT`] in all,
/// so that the later steps still start from an identical tree (and a slow tool still gets a
/// figure, shown as a timeout); past that the tool's part ends.
fn wait_step(
    run: &mut ToolRun,
    key: Option<Key>,
    step: &str,
    dst: &Path,
    expects: &[Expect],
    t0: Instant,
) -> Result<f64> {
    if let Waited::Identical(d) = wait_identical(dst, expects, t0, STEP_TIMEOUT) {
        let s = d.as_secs_f64();
        if let Some(key) = key {
            run.got.insert(key, Got::Value(s));
        }
        return Ok(s);
    }
    println!(
        "  {step}: not identical within {} s; waiting on, untimed, up to {} s",
        STEP_TIMEOUT.as_secs(),
        LATE_LIMIT.as_secs()
    );
    match wait_identical(dst, expects, t0, LATE_LIMIT) {
        Waited::Identical(d) => {
            let s = d.as_secs_f64();
            if let Some(key) = key {
                run.got.insert(key, Got::Late(s));
            }
            run.notes.push(format!(
                "{step}: identical only after {s:.1} s, past the {} s limit",
                STEP_TIMEOUT.as_secs()
            ));
            Ok(s)
        }
        Waited::Timeout { left, first } => {
            if let Some(key) = key {
                run.got.insert(key, Got::Timeout);
            }
            bail!(
                "{step}: the server side was not identical within {} s ({left} changed path(s) \
                 not yet as expected, the first {})",
                LATE_LIMIT.as_secs(),
                first.display()
            )
        }
    }
}

/// Creates `path` and writes `bytes` in one call, closing it at once (lsyncd acts on the close).
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    File::create(path)
        .and_then(|mut f| f.write_all(bytes))
        .with_context(|| format!("write {}", path.display()))
}

/// The report's rows, worded for these sizes.
fn measures(s: &Sizes) -> Vec<Measure> {
    let l4_data = s.l4.files * s.l4.size;
    let row = |key, label: String, unit, goal: Option<(f64, Option<f64>)>, target: &str| Measure {
        key,
        label,
        unit,
        goal: goal.map(|(max, ratio)| Goal { max, ratio }),
        target: target.to_string(),
    };
    let tree = format!("the {}-file tree", thousands(s.many.files));
    let rss_limit = RSS_LIMIT_KIB as f64;
    vec![
        row(
            Key::L1p50,
            format!(
                "L1 p50: one {} file written → identical ({} sequential writes)",
                size_text(s.l1.size),
                thousands(s.l1.files)
            ),
            Unit::Millis,
            Some((0.020, Some(0.2))),
            "≤ 20 ms and ≤ 0.2 × lsyncd",
        ),
        row(
            Key::L1p99,
            "L1 p99".into(),
            Unit::Millis,
            Some((0.100, Some(0.2))),
            "≤ 100 ms and ≤ 0.2 × lsyncd",
        ),
        row(
            Key::L2,
            format!(
                "L2: {} × {} files written at once → identical",
                thousands(s.l2.files),
                size_text(s.l2.size)
            ),
            Unit::Millis,
            Some((1.0, None)),
            "≤ 1 s",
        ),
        row(
            Key::L3,
            format!("L3: W6 in {tree}: 10 files changed + 10 new → identical"),
            Unit::Millis,
            Some((0.050, None)),
            "≤ 50 ms",
        ),
        row(
            Key::L4,
            format!(
                "L4: a directory of {} files renamed → identical",
                thousands(s.l4.files)
            ),
            Unit::Millis,
            Some((0.200, None)),
            "≤ 200 ms",
        ),
        row(
            Key::L4Wire,
            "L4: bytes on the wire (loopback, both directions)".into(),
            Unit::Bytes,
            Some((l4_data as f64, None)),
            &format!(
                "no file data: ≤ {} (the renamed files' size)",
                bytes(l4_data)
            ),
        ),
        row(
            Key::L5CpuClient,
            format!("L5: idle, watching {tree}: CPU of the client side (client-sync; lsyncd)"),
            Unit::Percent,
            Some((1.0, None)),
            "≤ 1 %",
        ),
        row(
            Key::L5CpuServer,
            "L5: CPU of the server side (server-sync; rsync daemon)".into(),
            Unit::Percent,
            Some((1.0, None)),
            "≤ 1 %",
        ),
        row(
            Key::L5RssClient,
            "L5: RSS of the client side".into(),
            Unit::Kib,
            Some((rss_limit, None)),
            "≤ 64 MiB",
        ),
        row(
            Key::L5RssServer,
            "L5: RSS of the server side".into(),
            Unit::Kib,
            Some((rss_limit, None)),
            "≤ 64 MiB",
        ),
        row(
            Key::Initial,
            format!("setup: initial full sync of {tree} (polled about once a second)"),
            Unit::Seconds,
            None,
            "–",
        ),
        row(
            Key::Quiet,
            "setup: then both sides quiet (≤ 1 % CPU over 2 s, every thread asleep) after".into(),
            Unit::Seconds,
            None,
            "–",
        ),
    ]
}

/// How the figures were obtained, for whoever reads them (latency.md).
fn method(s: &Sizes) -> Vec<String> {
    vec![
        "Ours: `server-sync DST --bind 127.0.0.1 --port 0 --data-port 0 -q --cache-dir S \
         --state-dir SS`, and `client-sync SRC --server 127.0.0.1 --port P -q --cache-dir C \
         --state-dir CS` as a daemon (no `--once`); caches and state directories are the \
         bench's own, fresh each run. lsyncd: `settings { nodaemon = true, insist = true }` and `sync { \
         default.rsync, source = SRC, target = \"rsync://127.0.0.1:P/latency/\", delay = 0, \
         rsync = { archive = true, compress = false } }`, pushing to `rsync --daemon \
         --no-detach` (module with `use chroot = no`, `munge symlinks = no`, `reverse lookup = \
         no`, running as the current user): the rsync daemon is lsyncd's server side in every \
         figure."
            .into(),
        format!(
            "Each tool in turn (the other is not running) mirrors its own copy of the same seeded \
             source (W4's {} × {} files in {} directories, plus L4's directory and the empty \
             directories L1 and L2 write into) into an empty directory; the figures are taken \
             after its first whole-tree match and once each side has used at most 1 % of a core \
             over {} s (a daemon may still be busy with the initial sync; both waits are setup \
             rows; after {} s L5 goes ahead and shows the daemon still busy), in the order L5, \
             L1, L2, L3, L4.",
            thousands(s.many.files),
            size_text(s.many.size),
            thousands(s.many.dirs),
            QUIET_SPAN.as_secs(),
            QUIET_LIMIT.as_secs()
        ),
        "Identical on the server: the bench polls the server's directory with stat, open and \
         read (no inotify), every 0.5 ms or as long as the last pass took if longer, checking \
         only the paths the step changed: each file's size and bytes; for L4 the old directory \
         gone and the new one listing exactly the expected names (both tools write a file under \
         a temporary name and rename it into place, so a final name is a complete file). A \
         figure is the time from just before the first write (or the rename) starts to the end \
         of the first pass that finds all of it so. The same code waits for both tools."
            .into(),
        format!(
            "After each step, untimed, the whole tree is compared with the source (paths, kinds, \
             modes, sizes, file mtimes) and the changed files byte for byte; after L4 every \
             file's content. A difference fails the tool's part (one that is gone a second later \
             is reported as a note). A step not identical within {} s is a timeout: the bench \
             waits on, untimed, up to {} s in all, so that the later steps start from an \
             identical tree, and shows how long it took; past that the tool's part ends. An L1 \
             write past the limit is noted and counted at its real time.",
            STEP_TIMEOUT.as_secs(),
            LATE_LIMIT.as_secs()
        ),
        "L1 writes each file with create, write and close, waits until it is identical on the \
         server, then writes the next at once; p50 and p99 are nearest-rank percentiles. L2 \
         writes its files one after another as fast as the bench can, with their content made \
         beforehand. L3 is W6's seeded change: 10 files rewritten with new content of the same \
         size and 10 added, across the tree."
            .into(),
        format!(
            "L4's bytes on the wire: delta of `lo` tx_bytes in /proc/net/dev from just before the \
             rename until {} ms after the server side is identical, both directions, TCP/IP \
             headers included.",
            WIRE_TAIL.as_millis()
        ),
        format!(
            "L5: over {} s with nothing changing, the CPU time (utime + stime, plus cutime + \
             cstime of reaped children, from /proc/PID/stat) of each side divided by the \
             window, and each side's resident memory now (VmRSS in /proc/PID/status). Client \
             side: client-sync or lsyncd; server side: server-sync or the rsync daemon.",
            s.idle.as_secs()
        ),
    ]
}

pub fn run(args: &[String]) -> Result<bool> {
    let Some(opts) = parse_args(args)? else {
        return Ok(true);
    };
    let bench_name = "cargo xtask bench latency";
    find_peer(&RSYNC, bench_name)?;
    // lsyncd prints `Version: 2.2.3`.
    let lsyncd_version = find_peer(&lsyncd::LSYNCD, bench_name)?;
    let lsyncd_version = format!(
        "lsyncd {}",
        lsyncd_version.trim_start_matches("Version:").trim()
    );
    let root = xtask::workspace_root();
    let target = crate::target_dir(&root)?;
    super::build(&root)?;
    let bin_dir = target.join("release");
    let mode = OursMode::detect(&bin_dir.join("client-sync"), opts.interval, opts.no_watch)?;
    let loopback = super::isolate_loopback();
    let dirs = Dirs::prepare(&target.join("bench"), "latency-logs")?;
    let started = Instant::now();
    let mut machine = Machine::read(dirs.work.path(), &root, loopback, None);
    machine.last_cleanup = dirs.last_cleanup_text();
    let work = dirs.work.path().to_owned();
    let bench = Latency {
        server_bin: bin_dir.join("server-sync"),
        client_bin: bin_dir.join("client-sync"),
        logs: dirs.logs.clone(),
        rsync_conf: work.join("rsyncd.conf"),
        mode,
        sizes: Sizes::new(opts.quick, opts.writes),
        work,
    };
    RsyncDaemon::write_config(
        &bench.rsync_conf,
        &bench.logs.join("rsyncd.log"),
        "latency",
        &bench.dst(Tool::Lsyncd),
    )?;
    println!(
        "bench latency{}: ours: {}; {lsyncd_version}; trees in {}, logs in {}",
        if opts.quick { " --quick" } else { "" },
        bench.mode.describe(),
        bench.work.display(),
        dirs.logs.display()
    );
    // Both trees before either tool starts: generating them is heavy disk work.
    for tool in [Tool::Ours, Tool::Lsyncd] {
        bench.generate(tool)?;
    }
    // Setup, as in `bench`: see SOURCE_SETTLE.
    std::thread::sleep(SOURCE_SETTLE);
    let ours = bench.measure(Tool::Ours);
    let peer = bench.measure(Tool::Lsyncd);
    machine.load_end = load_average();
    let report = Report {
        quick: opts.quick,
        ours_mode: bench.mode.describe(),
        lsyncd: lsyncd_version,
        machine,
        measures: measures(&bench.sizes),
        ours,
        peer,
        wall_s: started.elapsed().as_secs_f64(),
        notes: method(&bench.sizes),
    };
    let path = dirs.bench.join("latency.md");
    fs::write(&path, report.markdown())?;
    println!("\n{}\n{}", report.table(), report.verdicts());
    println!(
        "load average (1, 5, 15 min): {} at start, {} at end",
        report.machine.load_start, report.machine.load_end
    );
    println!("report: {} ({:.0} s)", path.display(), report.wall_s);
    dirs.remove_trees(bench)?;
    Ok(report.complete())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let parse = |a: &[&str]| {
            let a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
            parse_args(&a).map(|o| o.map(|o| (o.quick, o.writes, o.interval)))
        };
        assert_eq!(parse(&[]).unwrap(), Some((false, 200, None)));
        assert_eq!(
            parse(&["--quick", "--writes", "20", "--interval", "2"]).unwrap(),
            Some((true, 20, Some(2)))
        );
        let mode = |can_watch, no_watch, interval| {
            OursMode {
                can_watch,
                no_watch,
                interval,
            }
            .args()
            .join(" ")
        };
        assert_eq!(mode(true, false, None), "");
        assert_eq!(mode(true, true, Some(1)), "--no-watch --interval 1");
        assert_eq!(mode(false, true, Some(1)), "--interval 1");
        assert!(parse(&["--writes", "0"]).is_err());
        assert!(parse(&["W1"]).is_err());
        assert_eq!(parse(&["--help"]).unwrap(), None);
        let rows = measures(&Sizes::new(false, 200));
        assert_eq!(
            rows[0].label,
            "L1 p50: one 4 KiB file written → identical (200 sequential writes)"
        );
        assert_eq!(
            rows[3].label,
            "L3: W6 in the 100,000-file tree: 10 files changed + 10 new → identical"
        );
    }
}
