//! Fixtures for the product's integration tests (`tests/cli.rs`, `tests/hostile.rs`, …), which
//! reach them through `tests/support/mod.rs` (`pub use xtask::testkit::*`): a running
//! `server-sync` whose log is captured and waited on, `client-sync --once` runs, a text listing
//! of a directory tree to compare client and server, changes to a tree as data, and a [`World`]
//! that prints everything a person needs to understand a failure (commands, exit statuses,
//! output, both trees, the server log).
//!
//! They live in this library, not in `tests/support`, so that each test crate may use any subset
//! of them without dead-code warnings, and so that the tree listing, MD5, shell quoting, the
//! refusing port and the file-system actions exist once for the harness and the tests alike.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};
use tempfile::TempDir;

pub use crate::fsops::{mkfifo, set_mtime};
pub use crate::process::DeadPort;
pub use crate::process::describe_command as describe;
use crate::process::describe_command;
use crate::tree::Tree;
pub use crate::tree::md5_file;

/// Longest wait for any one awaited event. A passing test never comes near it: it only bounds
/// how long a broken one hangs before it reports.
pub const WAIT: Duration = Duration::from_secs(30);

/// The server's log line that closes every completed session.
pub const SESSION_DONE: &str = "sync:done with ";

/// The `server-sync` binary Cargo built for the running test.
pub fn server_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| find_bin("server-sync"))
}

/// The `client-sync` binary Cargo built for the running test.
pub fn client_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| find_bin("client-sync"))
}

/// Cargo (and nextest) tell a running integration test where the package's binaries are; older
/// Cargo only at compile time, so otherwise they are found beside the test's own executable
/// (`target/debug/deps/cli-…` → `target/debug/server-sync`).
fn find_bin(name: &str) -> PathBuf {
    for var in [
        format!("CARGO_BIN_EXE_{name}"),
        format!("NEXTEST_BIN_EXE_{name}"),
    ] {
        if let Some(p) = std::env::var_os(var) {
            return PathBuf::from(p);
        }
    }
    let exe = std::env::current_exe().expect("the test knows its own executable");
    let dir = exe.parent().expect("an executable is in a directory");
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    dir.join(name)
}

// ---------------------------------------------------------------------------------------------
// Child processes with captured output

/// What a child writes to one pipe, collected by a thread as it arrives, so that a test waits
/// for a line instead of sleeping.
#[derive(Clone, Default)]
pub struct Capture(Arc<(Mutex<Captured>, Condvar)>);

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    /// `bytes` as (lossy) UTF-8, whole lines only, for waiting on text.
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
                let mut c = text.lock().unwrap();
                c.bytes.extend_from_slice(&line);
                c.text.push_str(&String::from_utf8_lossy(&line));
                drop(c);
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

    /// Everything captured, byte for byte.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.0.lock().unwrap().bytes.clone()
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
        let cmdline = describe_command(&cmd);
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

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` (`libc::SIGTERM`, say), unless the process has already been reaped (its pid
    /// may be reused then).
    pub fn signal(&self, sig: i32) {
        if self.status.is_none() {
            let sig = Signal::from_named_raw(sig)
                .unwrap_or_else(|| panic!("{sig} is not a signal number"));
            let _ = kill_process(Pid::from_child(&self.child), sig);
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
        self.signal(Signal::TERM.as_raw());
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
        let mut cmd = Command::new(server_bin());
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

/// Runs a command to completion, or kills it after [`WAIT`], and keeps all it printed.
pub fn run(cmd: Command) -> Ran {
    let mut p = Proc::spawn(cmd);
    let status = match p.wait_exit(WAIT) {
        Some(s) => s,
        None => {
            p.signal(Signal::KILL.as_raw());
            p.wait_exit(WAIT)
                .unwrap_or_else(|| panic!("{} survived SIGKILL", p.cmdline))
        }
    };
    let output = Output {
        status,
        stdout: p.stdout.bytes(),
        stderr: p.stderr.bytes(),
    };
    Ran {
        cmdline: p.cmdline.clone(),
        output,
    }
}

/// `client-sync DIR --server 127.0.0.1 --port PORT --once`, its hash cache under `home`.
pub fn client_command(dir: &Path, port: u16, home: &Path) -> Command {
    let mut cmd = Command::new(client_bin());
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
/// `path fifo|socket|device MODE` (see [`Tree::listing`]). Temporary files are listed like
/// anything else, so a leftover one shows up as a difference. Symlinks are never followed; what
/// cannot be read is listed as `<cannot …>` / `<unreadable: …>` rather than failing.
pub fn tree(root: &Path) -> String {
    Tree::scan_lenient(root).listing()
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
    let res = (|| -> anyhow::Result<()> {
        match action {
            Action::Write(rel, content) => {
                if let Some(parent) = p(rel).parent() {
                    fs::create_dir_all(parent)?;
                }
                fs::write(p(rel), content)?;
            }
            Action::Mkdir(rel) => fs::create_dir_all(p(rel))?,
            Action::Remove(rel) => match fs::symlink_metadata(p(rel)) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(p(rel))?,
                _ => fs::remove_file(p(rel))?,
            },
            Action::Rename(from, to) => fs::rename(p(from), p(to))?,
            Action::Chmod(rel, mode) => {
                fs::set_permissions(p(rel), fs::Permissions::from_mode(*mode))?;
            }
            Action::Mtime(rel, secs, nanos) => set_mtime(&p(rel), *secs, *nanos)?,
            Action::Symlink(rel, target) => {
                if fs::symlink_metadata(p(rel)).is_ok() {
                    fs::remove_file(p(rel))?;
                }
                std::os::unix::fs::symlink(target, p(rel))?;
            }
            Action::Fifo(rel) => mkfifo(&p(rel))?,
        }
        Ok(())
    })();
    res.unwrap_or_else(|e| panic!("cannot apply {action:?} in {}: {e:#}", root.display()));
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
        let mut cmd = Command::new(server_bin());
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

    /// `BIN --help`, which must exit 0, with its whitespace collapsed to single spaces so that
    /// a phrase can be looked for whatever the terminal width wrapped.
    pub fn help(&self, bin: impl AsRef<std::ffi::OsStr>) -> String {
        let mut cmd = Command::new(bin);
        cmd.arg("--help");
        isolate(&mut cmd, self.home.path());
        let out = self.run(cmd);
        assert_eq!(out.status.code(), Some(0), "--help failed");
        stdout(&out)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
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

/// splitmix64: a deterministic sequence from a seed, for seeded model tests (a failing case
/// prints its seed and replays exactly), without a dependency.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (> 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// One of `v`, if any.
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        (!v.is_empty()).then(|| &v[self.below(v.len())])
    }
}
