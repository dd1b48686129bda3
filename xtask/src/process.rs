//! Child processes of a scenario: spawn, capture output to log files, wait for lines and exits, signal.
//!
//! Every wait here is event-driven: reader threads push each output line and a waiter thread
//! publishes each exit, both under one mutex with a condition variable, so a wait returns the
//! moment its line or exit arrives and gives up only at its deadline. Nothing sleeps for a fixed time.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

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
        // SAFETY: prctl is async-signal-safe. It makes the kernel kill the child if the thread
        // that spawned it dies (e.g. the harness is interrupted), so no server outlives a run.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let shown = argv
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ");
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
        drop(st);
        self.changed.notify_all();
    }

    /// Waits for the child's exit without reaping it (WNOWAIT), then reaps it under the lock: the
    /// pid stays valid for `signal` until `exit` is set, so a signal never hits a recycled pid.
    fn reap(&self, id: usize, mut child: Child) {
        let pid = child.id();
        loop {
            // SAFETY: `info` is a properly sized, zeroed siginfo_t owned by this frame.
            let rc = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        let mut st = self.lock();
        let exit = match child.wait() {
            Ok(s) => ExitInfo::from_status(s),
            Err(_) => ExitInfo::Code(-1),
        };
        st.procs[id].exit = Some(exit);
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
    pub fn signal(&self, id: usize, sig: i32) -> bool {
        let stamp = self.elapsed();
        let mut st = self.lock();
        let p = &st.procs[id];
        if p.exit.is_some() {
            return false;
        }
        // SAFETY: plain kill(2); the pid is not reaped yet (see `reap`), so it is still our child.
        let sent = unsafe { libc::kill(p.pid, sig) == 0 };
        let (log, name) = (p.log.clone(), p.name.clone());
        if let Some(f) = st.files.get_mut(&log) {
            let what = match sig {
                libc::SIGTERM => "SIGTERM".to_string(),
                libc::SIGKILL => "SIGKILL".to_string(),
                n => format!("signal {n}"),
            };
            let _ = writeln!(f, "==== {stamp} harness sends {what} to {name}");
        }
        sent
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
            self.signal(id, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        let mut out = Vec::new();
        for &id in &ids {
            let exit = match self.wait_exit(id, deadline) {
                Some(e) => e,
                None => {
                    self.signal(id, libc::SIGKILL);
                    self.wait_exit(id, Instant::now() + Duration::from_secs(5))
                        .unwrap_or(ExitInfo::Code(-1))
                }
            };
            out.push(format!("{}: {exit}", self.name(id)));
        }
        out
    }
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

/// A loopback port that refuses connections for as long as the returned socket lives: bound but
/// never listening. A client sent there finds no server, and no other process (a server of a
/// scenario running in parallel, say) can take the port in the meantime.
pub fn refusing_port() -> Result<(u16, std::os::fd::OwnedFd)> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the descriptor is owned (and closed) by the OwnedFd at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_in is a valid value; fields are set below.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let ptr = (&raw mut addr).cast::<libc::sockaddr>();
    // SAFETY: `ptr` points to a sockaddr_in of `len` bytes, valid for both calls.
    unsafe {
        if libc::bind(fd, ptr, len) != 0 || libc::getsockname(fd, ptr, &mut len) != 0 {
            bail!("bind: {}", std::io::Error::last_os_error());
        }
    }
    Ok((u16::from_be(addr.sin_port), owned))
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
    fn refusing_port_refuses() {
        let (port, _socket) = refusing_port().unwrap();
        assert!(port != 0);
        assert!(!port_open("127.0.0.1", port));
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err());
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
        assert!(hub.signal(id, libc::SIGKILL));
        let exit = hub.wait_exit(id, Instant::now() + Duration::from_secs(10));
        assert_eq!(exit, Some(ExitInfo::Signal(9)));
        assert!(!hub.signal(id, libc::SIGKILL), "no signal after reaping");
    }
}
