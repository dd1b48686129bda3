//! Child processes of a scenario: spawn, capture output to log files, wait for lines and exits, signal.
//!
//! Every wait here is event-driven: reader threads push each output line and a waiter thread
//! publishes each exit, both under one mutex with a condition variable, so a wait returns the
//! moment its line or exit arrives and gives up only at its deadline. Nothing sleeps for a fixed time.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal, WaitId, WaitIdOptions, kill_process};

use crate::pattern::{Captures, Pattern};

/// How long output may keep coming after a process exited (from grandchildren holding its pipes).
const STREAM_GRACE: Duration = Duration::from_secs(1);

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitInfo {
    Code(i32),
    Signal(i32),
}

impl ExitInfo {
    fn from_status(s: ExitStatus) -> Self {
        match (s.code(), s.signal()) {
            (Some(c), _) => ExitInfo::Code(c),
            (None, Some(sig)) => ExitInfo::Signal(sig),
            (None, None) => ExitInfo::Code(-1),
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitInfo::Code(c) => write!(f, "exit code {c}"),
            ExitInfo::Signal(9) => f.write_str("killed by signal 9 (SIGKILL)"),
            ExitInfo::Signal(15) => f.write_str("killed by signal 15 (SIGTERM)"),
            ExitInfo::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// One line of output.
#[derive(Clone, Debug)]
pub struct Line {
    pub proc: usize,
    /// The scenario side the process belongs to (`server`, `client`, `client2`, …).
    pub side: String,
    pub text: String,
}

struct ProcState {
    name: String,
    side: String,
    log: String,
    pid: i32,
    exit: Option<ExitInfo>,
    open_streams: u8,
    started: Instant,
    /// Stopped by the harness's SIGSTOP and not continued since (teardown continues it first: a
    /// stopped process would not act on SIGTERM).
    paused: bool,
}

impl ProcState {
    /// Exited and all its output read.
    fn finished(&self) -> bool {
        self.exit.is_some() && self.open_streams == 0
    }
}

struct State {
    lines: Vec<Line>,
    procs: Vec<ProcState>,
    files: BTreeMap<String, File>,
    /// Counts every line and every exit: what [`Hub::wait_change`] waits to see move.
    changes: u64,
}

/// The processes and output of one scenario run.
pub struct Hub {
    state: Mutex<State>,
    changed: Condvar,
    t0: Instant,
}

/// Why a wait for a line ended without it.
#[derive(Debug)]
pub enum WaitError {
    /// The deadline passed; holds how many matching lines were seen.
    Timeout(usize),
    /// Every process that could print it has exited.
    Exited(String),
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitError::Timeout(0) => f.write_str("no such line before the timeout"),
            WaitError::Timeout(n) => write!(f, "only {n} such line(s) before the timeout"),
            WaitError::Exited(why) => f.write_str(why),
        }
    }
}

impl Hub {
    /// A hub writing the output of processes into the given log files (by log name), truncating them.
    pub fn new(logs: &BTreeMap<String, PathBuf>) -> Result<Arc<Hub>> {
        let mut files = BTreeMap::new();
        for (name, path) in logs {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
            files.insert(name.clone(), f);
        }
        Ok(Arc::new(Hub {
            state: Mutex::new(State {
                lines: Vec::new(),
                procs: Vec::new(),
                files,
                changes: 0,
            }),
            changed: Condvar::new(),
            t0: Instant::now(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking reader thread must not take the whole scenario down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn elapsed(&self) -> String {
        format!("+{:.3}s", self.t0.elapsed().as_secs_f64())
    }

    /// Writes a harness note (not process output) into a log file.
    pub fn note(&self, log: &str, text: &str) {
        let stamp = self.elapsed();
        let mut st = self.lock();
        if let Some(f) = st.files.get_mut(log) {
            let _ = writeln!(f, "---- {stamp} {text}");
        }
    }

    /// Starts `argv` for `side`, its stdout and stderr going line by line to the log `log`.
    /// Returns the process id used by the other methods.
    pub fn spawn(
        self: &Arc<Self>,
        side: &str,
        log: &str,
        argv: &[String],
        env: &BTreeMap<String, String>,
    ) -> Result<usize> {
        let (program, args) = argv.split_first().context("empty command")?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe (a bare system call, no allocation). It makes the
        // kernel kill the child if the thread that spawned it dies (e.g. the harness is
        // interrupted), so no server outlives a run.
        unsafe {
            cmd.pre_exec(|| {
                let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
                Ok(())
            });
        }
        let shown = describe_command(&cmd);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                self.note(log, &format!("{side}: cannot start `{shown}`: {e}"));
                bail!("cannot start `{shown}`: {e}");
            }
        };
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let pid = child.id() as i32;
        let id = {
            let stamp = self.elapsed();
            let mut st = self.lock();
            let id = st.procs.len();
            let n = st.procs.iter().filter(|p| p.side == side).count() + 1;
            let name = format!("{side}#{n}");
            if let Some(f) = st.files.get_mut(log) {
                let _ = writeln!(f, "==== {stamp} {name} started (pid {pid}): {shown}");
            }
            st.procs.push(ProcState {
                name,
                side: side.to_string(),
                log: log.to_string(),
                pid,
                exit: None,
                open_streams: 2,
                started: Instant::now(),
                paused: false,
            });
            id
        };
        self.read_stream(id, stdout);
        self.read_stream(id, stderr);
        let hub = Arc::clone(self);
        thread::spawn(move || hub.reap(id, child));
        Ok(id)
    }

    fn read_stream(self: &Arc<Self>, id: usize, stream: impl Read + Send + 'static) {
        let hub = Arc::clone(self);
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_string();
                        hub.push_line(id, text);
                    }
                }
            }
            let mut st = hub.lock();
            st.procs[id].open_streams -= 1;
            hub.footer_if_finished(&mut st, id);
            drop(st);
            hub.changed.notify_all();
        });
    }

    fn push_line(&self, id: usize, text: String) {
        let mut st = self.lock();
        let (side, log) = (st.procs[id].side.clone(), st.procs[id].log.clone());
        if let Some(f) = st.files.get_mut(&log) {
            let _ = writeln!(f, "{text}");
        }
        st.lines.push(Line {
            proc: id,
            side,
            text,
        });
        st.changes += 1;
        drop(st);
        self.changed.notify_all();
    }

    /// Waits for the child's exit without reaping it (WNOWAIT), then reaps it under the lock: the
    /// pid stays valid for `signal` until `exit` is set, so a signal never hits a recycled pid.
    fn reap(&self, id: usize, mut child: Child) {
        let pid = Pid::from_child(&child);
        let how = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT;
        while let Err(rustix::io::Errno::INTR) = rustix::process::waitid(WaitId::Pid(pid), how) {}
        let mut st = self.lock();
        let exit = match child.wait() {
            Ok(s) => ExitInfo::from_status(s),
            Err(_) => ExitInfo::Code(-1),
        };
        st.procs[id].exit = Some(exit);
        st.changes += 1;
        self.footer_if_finished(&mut st, id);
        drop(st);
        self.changed.notify_all();
    }

    fn footer_if_finished(&self, st: &mut State, id: usize) {
        if !st.procs[id].finished() {
            return;
        }
        let p = &st.procs[id];
        let text = format!(
            "==== {} {} ended after {:.3}s: {}",
            self.elapsed(),
            p.name,
            p.started.elapsed().as_secs_f64(),
            p.exit.expect("finished")
        );
        let log = p.log.clone();
        if let Some(f) = st.files.get_mut(&log) {
            let _ = writeln!(f, "{text}");
        }
    }

    /// Number of lines captured so far (a mark for "lines from now on").
    pub fn line_count(&self) -> usize {
        self.lock().lines.len()
    }

    /// The display name of a process (`server#2`).
    pub fn name(&self, id: usize) -> String {
        self.lock().procs[id].name.clone()
    }

    pub fn pid(&self, id: usize) -> i32 {
        self.lock().procs[id].pid
    }

    /// The exit of a process, if it has exited.
    pub fn exit_of(&self, id: usize) -> Option<ExitInfo> {
        self.lock().procs[id].exit
    }

    /// Sends `sig` unless the process has already been reaped. Returns whether it was sent.
    /// SIGSTOP and SIGCONT also record whether the process is paused.
    pub fn signal(&self, id: usize, sig: Signal) -> bool {
        let stamp = self.elapsed();
        let mut st = self.lock();
        let p = &mut st.procs[id];
        if p.exit.is_some() {
            return false;
        }
        // The pid is not reaped yet (see `reap`), so it is still our child, never a recycled pid.
        let sent = Pid::from_raw(p.pid).is_some_and(|pid| kill_process(pid, sig).is_ok());
        if sent && sig == Signal::STOP {
            p.paused = true;
        } else if sent && sig == Signal::CONT {
            p.paused = false;
        }
        let (log, name) = (p.log.clone(), p.name.clone());
        if let Some(f) = st.files.get_mut(&log) {
            let _ = writeln!(
                f,
                "==== {stamp} harness sends {} to {name}",
                signal_name(sig)
            );
        }
        sent
    }

    /// Whether the harness paused the process (SIGSTOP) and has not continued it since.
    pub fn is_paused(&self, id: usize) -> bool {
        self.lock().procs[id].paused
    }

    /// Sends SIGCONT to a process the harness paused, so that a SIGTERM that follows is acted
    /// on (a stopped process only queues it). Returns whether it was paused.
    pub fn resume_if_paused(&self, id: usize) -> bool {
        self.is_paused(id) && self.signal(id, Signal::CONT)
    }

    /// Processes that run and are not paused: those that can still print or change a file.
    pub fn active(&self) -> Vec<usize> {
        let st = self.lock();
        (0..st.procs.len())
            .filter(|&i| st.procs[i].exit.is_none() && !st.procs[i].paused)
            .collect()
    }

    /// A count of every output line and exit so far, for [`Hub::wait_change`].
    pub fn changes(&self) -> u64 {
        self.lock().changes
    }

    /// Waits until some process printed a line or exited since [`Hub::changes`] returned `seen`,
    /// or the deadline passes. Returns the count now.
    pub fn wait_change(&self, seen: u64, deadline: Instant) -> u64 {
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            if st.changes != seen || now >= deadline {
                return st.changes;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until the process has exited and its output is read, or the deadline passes.
    pub fn wait_exit(&self, id: usize, mut deadline: Instant) -> Option<ExitInfo> {
        let mut st = self.lock();
        let mut exit_seen = false;
        loop {
            let p = &st.procs[id];
            if p.finished() {
                return p.exit;
            }
            let now = Instant::now();
            if p.exit.is_some() && !exit_seen {
                // Its output normally ends with it; a grandchild that inherited the pipes must
                // not hold the wait much longer: the exit is what matters.
                exit_seen = true;
                deadline = deadline.min(now + STREAM_GRACE);
            }
            if now >= deadline {
                return p.exit;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for the `count`-th line (from line index `from` on) that belongs to a process
    /// accepted by `which` and matches `pattern`; returns that line's captures.
    ///
    /// Gives up early when every process in `watch` has finished, since no such line can come.
    pub fn wait_line(
        &self,
        which: &dyn Fn(&Line) -> bool,
        pattern: &Pattern,
        from: usize,
        count: usize,
        watch: &[usize],
        deadline: Instant,
    ) -> Result<Captures, WaitError> {
        let mut st = self.lock();
        let mut seen = 0;
        let mut scanned = from.min(st.lines.len());
        loop {
            while scanned < st.lines.len() {
                let line = &st.lines[scanned];
                scanned += 1;
                if which(line) {
                    if let Some(caps) = pattern.captures(&line.text) {
                        seen += 1;
                        if seen >= count {
                            return Ok(caps);
                        }
                    }
                }
            }
            if !watch.is_empty() && watch.iter().all(|&id| st.procs[id].finished()) {
                let why = watch
                    .iter()
                    .map(|&id| {
                        let p = &st.procs[id];
                        format!("{} ended ({})", p.name, p.exit.expect("finished"))
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(WaitError::Exited(format!(
                    "{why} after {seen} such line(s)"
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitError::Timeout(seen));
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lines from index `from` on that `which` accepts (copies, for checks and reports).
    pub fn lines(&self, from: usize, which: &dyn Fn(&Line) -> bool) -> Vec<Line> {
        let st = self.lock();
        st.lines[from.min(st.lines.len())..]
            .iter()
            .filter(|l| which(l))
            .cloned()
            .collect()
    }

    /// Ids of processes that have not exited.
    pub fn running(&self) -> Vec<usize> {
        let st = self.lock();
        (0..st.procs.len())
            .filter(|&i| st.procs[i].exit.is_none())
            .collect()
    }

    /// Ends every process still running: SIGTERM, then SIGKILL for those still there after
    /// `grace`. Returns one line per process stopped.
    pub fn stop_all(&self, grace: Duration) -> Vec<String> {
        let ids = self.running();
        for &id in &ids {
            self.resume_if_paused(id);
            self.signal(id, Signal::TERM);
        }
        let deadline = Instant::now() + grace;
        let mut out = Vec::new();
        for &id in &ids {
            let exit = match self.wait_exit(id, deadline) {
                Some(e) => e,
                None => {
                    self.signal(id, Signal::KILL);
                    self.wait_exit(id, Instant::now() + Duration::from_secs(5))
                        .unwrap_or(ExitInfo::Code(-1))
                }
            };
            out.push(format!("{}: {exit}", self.name(id)));
        }
        out
    }
}

/// `SIGTERM`, `SIGKILL`, or `signal N`.
pub fn signal_name(sig: Signal) -> String {
    if sig == Signal::TERM {
        "SIGTERM".into()
    } else if sig == Signal::KILL {
        "SIGKILL".into()
    } else if sig == Signal::INT {
        "SIGINT".into()
    } else if sig == Signal::STOP {
        "SIGSTOP".into()
    } else if sig == Signal::CONT {
        "SIGCONT".into()
    } else {
        format!("signal {}", sig.as_raw())
    }
}

/// A command line a person can paste into a shell: its environment settings, program and
/// arguments, each quoted when needed.
pub fn describe_command(cmd: &Command) -> String {
    let env = cmd.get_envs().filter_map(|(k, v)| {
        Some(format!(
            "{}={}",
            k.to_string_lossy(),
            shell_quote(&v?.to_string_lossy())
        ))
    });
    let argv = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| shell_quote(&a.to_string_lossy()));
    env.chain(argv).collect::<Vec<_>>().join(" ")
}

/// Quotes an argument for display when it has spaces or shell-special characters.
pub fn shell_quote(a: &str) -> String {
    let plain = !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// Whether a TCP connection to `host:port` succeeds right now.
pub fn port_open(host: &str, port: u16) -> bool {
    use std::net::{TcpStream, ToSocketAddrs};
    let Ok(mut addrs) = (host, port).to_socket_addrs() else {
        return false;
    };
    addrs.any(|a| TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok())
}

/// A free port right now (for fixed-port test profiles; another process may take it later).
pub fn unused_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A loopback port that refuses connections for as long as this lives: a socket bound to it
/// that never listens. A client sent there finds no server, and no other process (a server of a
/// scenario or test running in parallel, say) can take the port in the meantime.
#[derive(Debug)]
pub struct DeadPort {
    pub port: u16,
    _socket: OwnedFd,
}

impl DeadPort {
    /// Binds a fresh socket to a free port of 127.0.0.1.
    pub fn bind() -> std::io::Result<DeadPort> {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let socket = rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )?;
        rustix::net::bind(&socket, &SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
        let addr = SocketAddr::try_from(rustix::net::getsockname(&socket)?)
            .map_err(|_| std::io::Error::other("getsockname returned no IP address"))?;
        Ok(DeadPort {
            port: addr.port(),
            _socket: socket,
        })
    }

    /// [`DeadPort::bind`] for tests: panics when no socket can be bound.
    pub fn new() -> DeadPort {
        DeadPort::bind().unwrap_or_else(|e| panic!("cannot bind a loopback socket: {e}"))
    }
}

impl Default for DeadPort {
    fn default() -> Self {
        DeadPort::new()
    }
}

/// Log file path for `kind` (`server`, `client`) of scenario number `nnn` in `out`.
pub fn log_path(out: &Path, nnn: &str, kind: &str) -> PathBuf {
    out.join(format!("test_{nnn}_{kind}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_lines_and_exit_codes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        let hub = Hub::new(&BTreeMap::from([("x".to_string(), log.clone())])).unwrap();
        let argv: Vec<String> = ["sh", "-c", "echo one; echo two >&2; echo port=41; exit 3"]
            .map(String::from)
            .to_vec();
        let id = hub.spawn("server", "x", &argv, &BTreeMap::new()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let caps = hub
            .wait_line(
                &|_| true,
                &Pattern::new("port={port}").unwrap(),
                0,
                1,
                &[id],
                deadline,
            )
            .unwrap();
        assert_eq!(caps["port"], "41");
        assert_eq!(hub.wait_exit(id, deadline), Some(ExitInfo::Code(3)));
        let err = hub
            .wait_line(
                &|_| true,
                &Pattern::new("never").unwrap(),
                0,
                1,
                &[id],
                deadline,
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("server#1 ended (exit code 3)"),
            "{err}"
        );
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("one\n") && text.contains("two\n"), "{text}");
        assert!(text.contains("server#1 ended"), "{text}");
    }

    #[test]
    fn dead_port_refuses() {
        let dead = DeadPort::bind().unwrap();
        let port = dead.port;
        assert!(port != 0);
        assert!(!port_open("127.0.0.1", port));
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err());
        drop(dead);
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
    }

    #[test]
    fn describes_commands_for_a_shell() {
        let mut cmd = Command::new("/bin/prog");
        cmd.args(["plain", "two words", "it's"]).env("K", "v v");
        assert_eq!(
            describe_command(&cmd),
            r"K='v v' /bin/prog plain 'two words' 'it'\''s'"
        );
    }

    /// A paused process is continued before teardown's SIGTERM (a stopped process would only
    /// queue it and be killed after the grace period), and every signal is in its log.
    #[test]
    fn teardown_continues_a_paused_process() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.log");
        let hub = Hub::new(&BTreeMap::from([("c".to_string(), log.clone())])).unwrap();
        let argv: Vec<String> = ["sleep", "30"].map(String::from).to_vec();
        let id = hub.spawn("client", "c", &argv, &BTreeMap::new()).unwrap();
        assert!(hub.signal(id, Signal::STOP));
        assert!(hub.is_paused(id));
        assert!(hub.active().is_empty(), "a paused process is not active");
        let started = Instant::now();
        let ended = hub.stop_all(Duration::from_secs(20));
        assert_eq!(ended, ["client#1: killed by signal 15 (SIGTERM)"]);
        assert!(started.elapsed() < Duration::from_secs(10));
        let text = std::fs::read_to_string(&log).unwrap();
        let stop = text.find("harness sends SIGSTOP to client#1").expect(&text);
        let cont = text.find("harness sends SIGCONT to client#1").expect(&text);
        let term = text.find("harness sends SIGTERM to client#1").expect(&text);
        assert!(stop < cont && cont < term, "{text}");
    }

    #[test]
    fn waits_for_the_next_line_or_exit() {
        let hub = Hub::new(&BTreeMap::new()).unwrap();
        let seen = hub.changes();
        let argv: Vec<String> = ["sh", "-c", "sleep 0.2; echo late"]
            .map(String::from)
            .to_vec();
        let t = Instant::now();
        let id = hub
            .spawn("client", "none", &argv, &BTreeMap::new())
            .unwrap();
        // The line or the exit, whichever the harness learns of first (the exit may be reaped
        // before the line is read from the pipe); nothing before the 0.2 s the child sleeps.
        let now = hub.wait_change(seen, t + Duration::from_secs(10));
        assert!(now > seen);
        assert!(t.elapsed() >= Duration::from_millis(200));
        hub.wait_exit(id, Instant::now() + Duration::from_secs(10));
        assert_eq!(hub.lines(0, &|_| true)[0].text, "late");
        assert_eq!(hub.changes(), 2, "one line, one exit");
        // Nothing more happens: the wait ends at its deadline with the count unchanged.
        let quiet = hub.changes();
        let t = Instant::now();
        assert_eq!(hub.wait_change(quiet, t + Duration::from_millis(50)), quiet);
        assert!(t.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn signals_and_timeouts() {
        let hub = Hub::new(&BTreeMap::new()).unwrap();
        let argv: Vec<String> = ["sleep", "30"].map(String::from).to_vec();
        let id = hub
            .spawn("client", "none", &argv, &BTreeMap::new())
            .unwrap();
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(matches!(
            hub.wait_line(&|_| true, &Pattern::new("x").unwrap(), 0, 1, &[id], soon),
            Err(WaitError::Timeout(0))
        ));
        assert!(hub.signal(id, Signal::KILL));
        let exit = hub.wait_exit(id, Instant::now() + Duration::from_secs(10));
        assert_eq!(exit, Some(ExitInfo::Signal(9)));
        assert!(!hub.signal(id, Signal::KILL), "no signal after reaping");
    }
}
