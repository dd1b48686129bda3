//! Shared fixtures for the CLI and hostile-peer integration tests: a running `server-sync` whose
//! log is captured and waited on, `client-sync --once` runs, a text rendering of a directory tree
//! to compare client and server, and a [`World`] that prints everything a person needs to
//! understand a failure (commands, exit statuses, output, both trees, the server log).

// Each integration-test crate compiles this module on its own and uses a different subset.
#![allow(dead_code)]

use std::ffi::CString;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use assert_fs::TempDir;

pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_server-sync");
pub const CLIENT_BIN: &str = env!("CARGO_BIN_EXE_client-sync");

/// Longest wait for any one awaited event. A passing test never comes near it: it only bounds
/// how long a broken one hangs before it reports.
pub const WAIT: Duration = Duration::from_secs(30);

/// The server's log line that closes every completed session.
pub const SESSION_DONE: &str = "sync:done with ";

// ---------------------------------------------------------------------------------------------
// Child processes with captured output

/// What a child writes to one pipe, collected by a thread as it arrives, so that a test waits
/// for a line instead of sleeping.
#[derive(Clone, Default)]
pub struct Capture(Arc<(Mutex<Captured>, Condvar)>);

#[derive(Default)]
struct Captured {
    text: String,
    closed: bool,
}

impl Capture {
    fn start(pipe: impl Read + Send + 'static) -> (Capture, JoinHandle<()>) {
        let cap = Capture::default();
        let shared = cap.clone();
        let reader = std::thread::spawn(move || {
            let (text, cv) = &*shared.0;
            let mut r = BufReader::new(pipe);
            let mut line = Vec::new();
            // Whole lines only, so that a waiter never sees half of the line it waits for.
            while matches!(r.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                text.lock()
                    .unwrap()
                    .text
                    .push_str(&String::from_utf8_lossy(&line));
                cv.notify_all();
                line.clear();
            }
            text.lock().unwrap().closed = true;
            cv.notify_all();
        });
        (cap, reader)
    }

    pub fn text(&self) -> String {
        self.0.0.lock().unwrap().text.clone()
    }

    /// Waits until `done` holds for the text so far. False when the pipe closed (the process
    /// exited) or `timeout` passed first.
    pub fn wait_until(&self, timeout: Duration, done: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let (text, cv) = &*self.0;
        let mut g = text.lock().unwrap();
        loop {
            if done(&g.text) {
                return true;
            }
            let now = Instant::now();
            if g.closed || now >= deadline {
                return false;
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Waits until `needle` occurs at least `n` times.
    pub fn wait_count(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |t| t.matches(needle).count() >= n)
    }
}

/// A running child process whose stdout and stderr are captured; killed when dropped.
pub struct Proc {
    pub cmdline: String,
    child: Child,
    pub stdout: Capture,
    pub stderr: Capture,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        let cmdline = describe(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmdline}: {e}"));
        let (stdout, r1) = Capture::start(child.stdout.take().unwrap());
        let (stderr, r2) = Capture::start(child.stderr.take().unwrap());
        Proc {
            cmdline,
            child,
            stdout,
            stderr,
            readers: vec![r1, r2],
            status: None,
        }
    }

    pub fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Sends `sig`, unless the process has already been reaped (its pid may be reused then).
    pub fn signal(&self, sig: libc::c_int) {
        if self.status.is_none() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
            unsafe { libc::kill(self.pid(), sig) };
        }
    }

    /// The exit status once the process has exited, waiting at most `timeout`; all of its
    /// output has been captured by then.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.status.is_none() {
            if let Some(s) = self.child.try_wait().expect("can wait for a child") {
                self.status = Some(s);
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
            } else if Instant::now() >= deadline {
                return None;
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.status
    }

    /// SIGTERM, then the exit status; fails the test if the process does not exit in time.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_exit(WAIT) {
            Some(s) => s,
            None => {
                let _ = self.child.kill();
                panic!("{} did not exit within {WAIT:?} of SIGTERM", self.cmdline);
            }
        }
    }

    pub fn report(&self) -> String {
        let status = match self.status {
            Some(s) => s.to_string(),
            None => "still running".into(),
        };
        format!(
            "$ {}\nstatus: {status}\n--- stdout\n{}--- stderr\n{}",
            self.cmdline,
            self.stdout.text(),
            self.stderr.text()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A command line a person can paste into a shell.
pub fn describe(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let _ = write!(
                s,
                "{}={} ",
                k.to_string_lossy(),
                quote(&v.to_string_lossy())
            );
        }
    }
    s.push_str(&quote(&cmd.get_program().to_string_lossy()));
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(&a.to_string_lossy()));
    }
    s
}

fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Makes a child's behaviour independent of the developer's environment: log level from the
/// flags only, hash cache and state (the client's ID, the server's record of its client) in
/// the test's own directory.
pub fn isolate(cmd: &mut Command, home: &Path) {
    cmd.env_remove("RUST_LOG")
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("XDG_STATE_HOME", home.join("state"))
        .env("HOME", home);
}

// ---------------------------------------------------------------------------------------------
// The server

/// A `server-sync` on ports chosen by the system, ready once constructed.
pub struct Server {
    pub proc: Proc,
    pub host: String,
    pub port: u16,
    pub data_port: u16,
}

impl Server {
    /// Starts `server-sync DIR` on 127.0.0.1 with both ports 0, plus `extra` flags, and waits
    /// for its `listening` line.
    pub fn start(dir: &Path, home: &Path, extra: &[&str]) -> Server {
        let mut cmd = Command::new(SERVER_BIN);
        cmd.arg(dir)
            .args(["--bind", "127.0.0.1", "--port", "0", "--data-port", "0"])
            .args(extra);
        isolate(&mut cmd, home);
        Server::spawn(cmd)
    }

    /// Runs an arbitrary server command line and waits for its `listening` line.
    pub fn spawn(cmd: Command) -> Server {
        let proc = Proc::spawn(cmd);
        let ready = proc
            .stdout
            .wait_until(WAIT, |t| t.lines().any(|l| l.starts_with("listening ")));
        assert!(
            ready,
            "server did not print its listening line\n{}",
            proc.report()
        );
        let text = proc.stdout.text();
        let line = text.lines().find(|l| l.starts_with("listening ")).unwrap();
        let (host, port, data_port) =
            parse_listening(line).unwrap_or_else(|| panic!("unexpected listening line {line:?}"));
        Server {
            proc,
            host,
            port,
            data_port,
        }
    }

    pub fn log(&self) -> String {
        self.proc.stdout.text()
    }

    /// A position in the log: [`Server::log_since`] returns what was logged after it.
    pub fn mark(&self) -> usize {
        self.log().len()
    }

    pub fn log_since(&self, mark: usize) -> String {
        self.log()[mark..].to_owned()
    }

    /// Waits for a log line containing `needle`; fails the test on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        self.wait_for_log_count(needle, 1, timeout);
    }

    pub fn wait_for_log_count(&self, needle: &str, n: usize, timeout: Duration) {
        assert!(
            self.proc.stdout.wait_count(needle, n, timeout),
            "server log did not show {needle:?} {n} time(s) within {timeout:?}"
        );
    }

    /// SIGTERM and the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.proc.terminate()
    }
}

/// `listening control=IP:PORT data=IP:PORT` → (IP, control port, data port).
pub fn parse_listening(line: &str) -> Option<(String, u16, u16)> {
    let mut control = None;
    let mut data = None;
    for word in line.split_whitespace().skip(1) {
        let split = |a: &str| {
            let (h, p) = a.rsplit_once(':')?;
            Some((
                h.trim_matches(['[', ']']).to_owned(),
                p.parse::<u16>().ok()?,
            ))
        };
        if let Some(a) = word.strip_prefix("control=") {
            control = split(a);
        } else if let Some(a) = word.strip_prefix("data=") {
            data = split(a);
        }
    }
    let (host, port) = control?;
    Some((host, port, data?.1))
}

/// A port on 127.0.0.1 that refuses connections and that no other test can take while this
/// is alive: a socket bound to it that never listens.
pub struct DeadPort {
    fd: libc::c_int,
    pub port: u16,
}

impl DeadPort {
    pub fn new() -> DeadPort {
        // SAFETY: plain socket calls on a descriptor we own; `addr` and `len` are valid for
        // the sizes passed.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let sa = &mut addr as *mut libc::sockaddr_in as *mut libc::sockaddr;
            assert_eq!(
                libc::bind(fd, sa, len),
                0,
                "bind: {}",
                std::io::Error::last_os_error()
            );
            assert_eq!(libc::getsockname(fd, sa, &mut len), 0);
            DeadPort {
                fd,
                port: u16::from_be(addr.sin_port),
            }
        }
    }
}

impl Default for DeadPort {
    fn default() -> Self {
        DeadPort::new()
    }
}

impl Drop for DeadPort {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor and close it once.
        unsafe { libc::close(self.fd) };
    }
}

// ---------------------------------------------------------------------------------------------
// One-shot commands

/// A finished command and everything it printed.
pub struct Ran {
    pub cmdline: String,
    pub output: Output,
}

impl Ran {
    pub fn report(&self) -> String {
        format!(
            "$ {}\nexit status: {}\n--- stdout\n{}--- stderr\n{}",
            self.cmdline,
            self.output.status,
            String::from_utf8_lossy(&self.output.stdout),
            String::from_utf8_lossy(&self.output.stderr)
        )
    }
}

/// Runs a command to completion (killed after [`WAIT`]) with assert_cmd.
pub fn run(cmd: Command) -> Ran {
    let cmdline = describe(&cmd);
    let output = assert_cmd::Command::from_std(cmd)
        .timeout(WAIT)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmdline}: {e}"));
    Ran { cmdline, output }
}

/// `client-sync DIR --server 127.0.0.1 --port PORT --once`, its hash cache under `home`.
pub fn client_command(dir: &Path, port: u16, home: &Path) -> Command {
    let mut cmd = Command::new(CLIENT_BIN);
    cmd.arg(dir).args([
        "--server",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--once",
    ]);
    isolate(&mut cmd, home);
    cmd
}

/// One `client-sync --once` of `dir` against the server on `port`.
pub fn client_once(dir: &Path, port: u16, home: &Path) -> Output {
    run(client_command(dir, port, home)).output
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The counters of the client's closing `summary:` line, without the timing that varies from
/// run to run: `requested=1 copied=0 renamed=0 deleted=0 failed=0 bytes=5`.
pub fn summary(o: &Output) -> String {
    let out = stdout(o);
    let line = out
        .lines()
        .rev()
        .find_map(|l| l.split_once("summary: ").map(|(_, s)| s))
        .unwrap_or_else(|| panic!("no summary line in client output:\n{out}"));
    line.split(' ')
        .filter(|w| !w.starts_with("seconds="))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Trees as text

/// A tree as sorted text lines, one per entry below `root` (the root itself excluded):
/// `path file SIZE MD5 MODE MTIME`, `path dir MODE MTIME`, `path -> TARGET MTIME`, or
/// `path fifo|socket|device MODE`. Temporary files are listed like anything else, so a
/// leftover one shows up as a difference. Symlinks are never followed.
pub fn tree(root: &Path) -> String {
    let mut lines = Vec::new();
    list(root, root, &mut lines);
    lines.sort();
    lines.into_iter().map(|l| l + "\n").collect()
}

fn list(root: &Path, dir: &Path, lines: &mut Vec<String>) {
    let rel = |p: &Path| {
        let r = p
            .strip_prefix(root)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned();
        if r.is_empty() { ".".to_owned() } else { r }
    };
    let entries = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => return lines.push(format!("{} <cannot list: {e}>", rel(dir))),
    };
    for ent in entries.flatten() {
        let path = ent.path();
        let name = rel(&path);
        let md = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                lines.push(format!("{name} <cannot stat: {e}>"));
                continue;
            }
        };
        let mode = md.mode() & 0o7777;
        let mtime = format!("{}.{:09}", md.mtime(), md.mtime_nsec());
        let ft = md.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&path).map_or_else(
                |e| format!("<unreadable: {e}>"),
                |t| t.to_string_lossy().into_owned(),
            );
            lines.push(format!("{name} -> {target} {mtime}"));
        } else if ft.is_dir() {
            lines.push(format!("{name} dir {mode:04o} {mtime}"));
            list(root, &path, lines);
        } else if ft.is_file() {
            let md5 = md5_file(&path).unwrap_or_else(|e| format!("<unreadable: {e}>"));
            lines.push(format!("{name} file {} {md5} {mode:04o} {mtime}", md.len()));
        } else {
            let kind = if ft.is_fifo() {
                "fifo"
            } else if ft.is_socket() {
                "socket"
            } else {
                "device"
            };
            lines.push(format!("{name} {kind} {mode:04o}"));
        }
    }
}

/// Lines only in `a` (`-`) or only in `b` (`+`): what a person looks at first.
pub fn diff(a: &str, b: &str) -> String {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out = String::new();
    for l in &la {
        if !lb.contains(l) {
            let _ = writeln!(out, "- {l}");
        }
    }
    for l in &lb {
        if !la.contains(l) {
            let _ = writeln!(out, "+ {l}");
        }
    }
    out
}

/// MD5 of a file, streamed: computed independently of the product's own hashing code.
pub fn md5_file(path: &Path) -> std::io::Result<String> {
    use md5::Digest;
    let mut f = fs::File::open(path)?;
    let mut h = md5::Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Temporary files of the server anywhere below `dir`.
pub fn temp_files(dir: &Path) -> Vec<String> {
    tree(dir)
        .lines()
        .filter(|l| l.contains(".server-sync-tmp."))
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Changes to a tree, as data

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// One change to one side's tree; built with [`write`], [`mkdir`], ... and sent to the server's
/// side with [`Step::on_server`].
#[derive(Clone, Debug)]
pub struct Step {
    pub side: Side,
    pub action: Action,
}

#[derive(Clone, Debug)]
pub enum Action {
    /// Creates missing parent directories.
    Write(String, Vec<u8>),
    Mkdir(String),
    /// A file, a symlink, or a whole directory tree.
    Remove(String),
    Rename(String, String),
    Chmod(String, u32),
    /// Seconds and nanoseconds; applied to a symlink itself, not its target.
    Mtime(String, i64, u32),
    /// Replaces whatever is at the path.
    Symlink(String, String),
    Fifo(String),
}

impl Step {
    pub fn on_server(mut self) -> Step {
        self.side = Side::Server;
        self
    }
}

fn step(action: Action) -> Step {
    Step {
        side: Side::Client,
        action,
    }
}

pub fn write(path: &str, content: impl AsRef<[u8]>) -> Step {
    step(Action::Write(path.into(), content.as_ref().to_vec()))
}
pub fn mkdir(path: &str) -> Step {
    step(Action::Mkdir(path.into()))
}
pub fn rm(path: &str) -> Step {
    step(Action::Remove(path.into()))
}
pub fn mv(from: &str, to: &str) -> Step {
    step(Action::Rename(from.into(), to.into()))
}
pub fn chmod(path: &str, mode: u32) -> Step {
    step(Action::Chmod(path.into(), mode))
}
pub fn mtime(path: &str, secs: i64, nanos: u32) -> Step {
    step(Action::Mtime(path.into(), secs, nanos))
}
pub fn symlink(path: &str, target: &str) -> Step {
    step(Action::Symlink(path.into(), target.into()))
}
pub fn fifo(path: &str) -> Step {
    step(Action::Fifo(path.into()))
}

/// Carries out one action below `root`.
pub fn apply(root: &Path, action: &Action) {
    let p = |rel: &str| root.join(rel);
    let res = match action {
        Action::Write(rel, content) => {
            if let Some(parent) = p(rel).parent() {
                fs::create_dir_all(parent).unwrap();
            }
            fs::write(p(rel), content)
        }
        Action::Mkdir(rel) => fs::create_dir_all(p(rel)),
        Action::Remove(rel) => match fs::symlink_metadata(p(rel)) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(p(rel)),
            _ => fs::remove_file(p(rel)),
        },
        Action::Rename(from, to) => fs::rename(p(from), p(to)),
        Action::Chmod(rel, mode) => fs::set_permissions(p(rel), fs::Permissions::from_mode(*mode)),
        Action::Mtime(rel, secs, nanos) => set_mtime(&p(rel), *secs, *nanos),
        Action::Symlink(rel, target) => {
            if fs::symlink_metadata(p(rel)).is_ok() {
                fs::remove_file(p(rel)).unwrap();
            }
            std::os::unix::fs::symlink(target, p(rel))
        }
        Action::Fifo(rel) => mkfifo(&p(rel)),
    };
    res.unwrap_or_else(|e| panic!("cannot apply {action:?} in {}: {e}", root.display()));
}

/// Sets the mtime of `p` itself (not of a symlink's target).
pub fn set_mtime(p: &Path, secs: i64, nanos: u32) -> std::io::Result<()> {
    server_sync::store::root::set_mtime_nofollow(p, secs, nanos)
}

pub fn mkfifo(p: &Path) -> std::io::Result<()> {
    let c = CString::new(p.as_os_str().as_bytes())?;
    // SAFETY: `c` is a NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o644) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The world of one test

/// One test's directories, server and commands. Layout, all in one temporary directory:
/// `client/` (what client-sync sends), `server/` (the server's DIR) and `outside/` (a sibling
/// that nothing may ever write to). The hash caches live in a second temporary directory, so
/// that the first one holds exactly those three entries unless something escaped.
///
/// When a test fails, dropping the world prints every command it ran with its exit status and
/// output, the client, server and outside trees, and the server's log.
pub struct World {
    pub tmp: TempDir,
    pub home: TempDir,
    pub client: PathBuf,
    pub server_dir: PathBuf,
    pub outside: PathBuf,
    server: Option<Server>,
    runs: Mutex<Vec<Ran>>,
    /// Entries of `tmp` a test created on purpose, besides the three above.
    expected_top: Mutex<Vec<String>>,
    /// What `outside` must look like: a test may put things there, nothing else may.
    outside_tree: Mutex<String>,
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

impl World {
    /// The three directories, no server yet.
    pub fn new() -> World {
        let tmp = TempDir::new().unwrap();
        let home = TempDir::new().unwrap();
        let client = tmp.path().join("client");
        let server_dir = tmp.path().join("server");
        let outside = tmp.path().join("outside");
        for d in [&client, &server_dir, &outside] {
            fs::create_dir(d).unwrap();
        }
        World {
            tmp,
            home,
            client,
            server_dir,
            outside,
            server: None,
            runs: Mutex::new(Vec::new()),
            expected_top: Mutex::new(vec!["client".into(), "outside".into(), "server".into()]),
            outside_tree: Mutex::new(String::new()),
        }
    }

    /// A world with a server already listening, started with `extra` flags.
    pub fn start(extra: &[&str]) -> World {
        let mut w = World::new();
        w.start_server(extra);
        w
    }

    pub fn start_server(&mut self, extra: &[&str]) -> &Server {
        self.start_server_with(extra, |_| {})
    }

    /// Like [`World::start_server`], letting the test adjust the command first (to run the
    /// server as another user, say).
    pub fn start_server_with(
        &mut self,
        extra: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> &Server {
        assert!(self.server.is_none(), "server already started");
        let mut cmd = Command::new(SERVER_BIN);
        cmd.arg(&self.server_dir)
            .args(["--bind", "127.0.0.1", "--port", "0", "--data-port", "0"])
            .args(extra);
        isolate(&mut cmd, self.home.path());
        adjust(&mut cmd);
        self.server = Some(Server::spawn(cmd));
        self.server()
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("server started")
    }

    pub fn server_mut(&mut self) -> &mut Server {
        self.server.as_mut().expect("server started")
    }

    pub fn port(&self) -> u16 {
        self.server().port
    }

    pub fn data_port(&self) -> u16 {
        self.server().data_port
    }

    /// `client-sync DIR --once` against this world's server, not yet run.
    pub fn client_command(&self, dir: &Path) -> Command {
        client_command(dir, self.port(), self.home.path())
    }

    /// Runs a command, records it for the failure report, and when it was a client whose
    /// session completed, waits for the server to log the end of that session: the server
    /// logs `sync:done` after answering, so without this the log would be checked too early.
    pub fn run(&self, cmd: Command) -> Output {
        let done_before = self.sessions_done();
        let ran = run(cmd);
        let output = ran.output.clone();
        self.runs.lock().unwrap().push(ran);
        if self.server.is_some() && stdout(&output).contains("sync:done") {
            self.server()
                .wait_for_log_count(SESSION_DONE, done_before + 1, WAIT);
        }
        output
    }

    fn sessions_done(&self) -> usize {
        self.server
            .as_ref()
            .map_or(0, |s| s.log().matches(SESSION_DONE).count())
    }

    /// `client-sync --once` of the client directory.
    pub fn sync(&self) -> Output {
        self.sync_dir(&self.client)
    }

    pub fn sync_dir(&self, dir: &Path) -> Output {
        self.run(self.client_command(dir))
    }

    /// A sync that must exit 0.
    pub fn sync_ok(&self) -> Output {
        let out = self.sync();
        assert_eq!(
            out.status.code(),
            Some(0),
            "client-sync --once failed:\n{}",
            stderr(&out)
        );
        out
    }

    /// The server DIR mirrors the client DIR exactly (content, kinds, modes, mtimes, links).
    pub fn assert_mirrored(&self) {
        assert_same_tree(&self.client, &self.server_dir);
    }

    /// Nothing was written outside the server DIR: `outside` is as the test left it, and the
    /// server DIR's parent holds no new entry (a `../x` write would land there).
    pub fn assert_contained(&self) {
        let want = self.outside_tree.lock().unwrap().clone();
        let got = tree(&self.outside);
        assert_eq!(
            got,
            want,
            "something changed outside the server DIR:\n{}",
            diff(&want, &got)
        );
        let mut names: Vec<String> = fs::read_dir(self.tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut expected = self.expected_top.lock().unwrap().clone();
        expected.sort();
        assert_eq!(names, expected, "new entries next to the server DIR");
    }

    /// Puts a file outside the server DIR, and records it as what must stay there.
    pub fn put_outside(&self, rel: &str, content: &str) {
        apply(&self.outside, &write(rel, content).action);
        *self.outside_tree.lock().unwrap() = tree(&self.outside);
    }

    /// A directory next to client/server/outside that the test creates on purpose.
    pub fn extra_dir(&self, name: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        fs::create_dir(&p).unwrap();
        self.expected_top.lock().unwrap().push(name.into());
        p
    }

    pub fn apply(&self, steps: &[Step]) {
        for s in steps {
            let root = match s.side {
                Side::Client => &self.client,
                Side::Server => &self.server_dir,
            };
            apply(root, &s.action);
        }
    }

    pub fn mark(&self) -> usize {
        self.server().mark()
    }

    pub fn log_since(&self, mark: usize) -> String {
        self.server().log_since(mark)
    }

    /// The server logged `needle` after `mark` (waiting for it if need be).
    pub fn assert_logged(&self, mark: usize, needle: &str) {
        let s = self.server();
        let found = s
            .proc
            .stdout
            .wait_until(WAIT, |t| t.get(mark..).is_some_and(|t| t.contains(needle)));
        assert!(found, "server did not log {needle:?}");
    }

    /// The server did not log `needle` after `mark`. Meaningful once the session is over,
    /// which [`World::run`] waits for.
    pub fn assert_not_logged(&self, mark: usize, needle: &str) {
        let since = self.log_since(mark);
        if let Some(line) = since.lines().find(|l| l.contains(needle)) {
            panic!("server logged {needle:?}, which it must not: {line}");
        }
    }

    /// Everything a person needs to understand a failure.
    pub fn dump(&self) -> String {
        let mut s = String::from("\n======== what the test saw ========\n");
        if let Ok(runs) = self.runs.lock() {
            for r in runs.iter() {
                let _ = writeln!(s, "{}", r.report());
            }
        }
        for (name, dir) in [
            ("client", &self.client),
            ("server", &self.server_dir),
            ("outside", &self.outside),
        ] {
            let _ = writeln!(s, "--- {name} tree ({})\n{}", dir.display(), tree(dir));
        }
        if let Some(srv) = &self.server {
            let _ = writeln!(s, "--- server process\n{}", srv.proc.report());
        }
        s
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.dump());
        }
    }
}

/// Two trees are equal as text; on failure shows what differs (the world's report shows both
/// in full).
pub fn assert_same_tree(client: &Path, server: &Path) {
    let (c, s) = (tree(client), tree(server));
    assert!(
        c == s,
        "server DIR is not a mirror of the client DIR (- client only, + server only):\n{}",
        diff(&c, &s)
    );
}
