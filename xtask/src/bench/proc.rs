//! Processes of the benchmark and what the kernel accounts for them: exit, peak and current RSS,
//! CPU time, loopback bytes.
//!
//! Peak RSS comes from the kernel's own counters, never from sampling: `wait4` returns
//! `ru_maxrss` of the reaped process (with `RUSAGE_BOTH` semantics: the largest of the process
//! and every descendant it reaped), and `/proc/PID/status` shows `VmHWM` (the same high-water
//! mark) of a process still running. Commands whose `ru_maxrss` is reported are started through
//! a supervisor (see `supervise.rs` for why). Every process is held by a [`Proc`] guard that
//! terminates and reaps it on drop, so an error anywhere leaves no server or daemon behind.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::supervise::Supervised;

/// How a reaped process ended and its peak resident set size.
#[derive(Clone, Copy, Debug)]
pub struct Exit {
    /// Raw wait status.
    status: libc::c_int,
    /// `ru_maxrss` from `wait4`, KiB.
    pub maxrss_kib: u64,
}

impl Exit {
    pub fn new(status: libc::c_int, maxrss_kib: u64) -> Exit {
        Exit { status, maxrss_kib }
    }

    pub fn success(&self) -> bool {
        libc::WIFEXITED(self.status) && libc::WEXITSTATUS(self.status) == 0
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if libc::WIFEXITED(self.status) {
            write!(f, "exit code {}", libc::WEXITSTATUS(self.status))
        } else if libc::WIFSIGNALED(self.status) {
            write!(f, "killed by signal {}", libc::WTERMSIG(self.status))
        } else {
            write!(f, "wait status {:#x}", self.status)
        }
    }
}

/// A child process we reap ourselves with `wait4` (std's `Child::wait` would drop the rusage).
/// Its exit is awaited through a pidfd, so a wait wakes the instant the process ends (no polling
/// interval in the timings) and can still give up at a deadline.
pub struct Proc {
    name: String,
    pid: libc::pid_t,
    pidfd: OwnedFd,
    exit: Option<Exit>,
}

impl Proc {
    /// Spawns `cmd`, handing back its stdout when piped. The child gets SIGKILL if this thread
    /// dies (PR_SET_PDEATHSIG), so even a bench killed by a signal, whose destructors never run,
    /// leaves no process behind.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<(Proc, Option<ChildStdout>)> {
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("start {name}"))?;
        let stdout = child.stdout.take();
        let pid = child.id() as libc::pid_t;
        // Dropping a std Child neither kills nor reaps it: from here on the pid is ours alone.
        drop(child);
        // SAFETY: plain syscall; the pid is our unreaped child, so it cannot have been recycled.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            // SAFETY: best effort: do not leave the child running when we cannot watch it.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            bail!("pidfd_open for {name}: {err}");
        }
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        let proc = Proc {
            name: name.to_string(),
            pid,
            pidfd,
            exit: None,
        };
        Ok((proc, stdout))
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Whether the process has ended (it may still need reaping).
    pub fn has_exited(&self) -> bool {
        self.exit.is_some() || self.poll_exit(Duration::ZERO)
    }

    fn poll_exit(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc > 0 {
                return true;
            }
            let interrupted =
                rc < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
            if !interrupted || left.is_zero() {
                return false;
            }
        }
    }

    /// Waits up to `timeout` for the process to end and reaps it. On timeout the process is
    /// killed and reaped, and the wait fails.
    pub fn wait(&mut self, timeout: Duration) -> Result<Exit> {
        if let Some(e) = self.exit {
            return Ok(e);
        }
        if !self.poll_exit(timeout) {
            self.kill_and_reap();
            bail!(
                "{} (pid {}) still running after {:.0} s: killed",
                self.name,
                self.pid,
                timeout.as_secs_f64()
            );
        }
        self.reap()
    }

    fn reap(&mut self) -> Result<Exit> {
        let mut status: libc::c_int = 0;
        // SAFETY: zeroed rusage is a valid value for wait4 to fill.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: valid pointers; the pid is our own child.
            let rc = unsafe { libc::wait4(self.pid, &mut status, 0, &mut usage) };
            if rc == self.pid {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                bail!("wait4 for {} (pid {}): {err}", self.name, self.pid);
            }
        }
        let exit = Exit {
            status,
            maxrss_kib: usage.ru_maxrss.max(0) as u64,
        };
        self.exit = Some(exit);
        Ok(exit)
    }

    /// SIGTERM, up to `grace` to end, then SIGKILL; reaps in every case.
    pub fn terminate(&mut self, grace: Duration) -> Result<Exit> {
        if let Some(e) = self.exit {
            return Ok(e);
        }
        // SAFETY: the pid is our unreaped child (a zombie at worst), never a recycled pid.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        if self.poll_exit(grace) {
            return self.reap();
        }
        self.kill_and_reap();
        self.exit
            .context("process could not be reaped after SIGKILL")
    }

    fn kill_and_reap(&mut self) {
        // SAFETY: as in `terminate`.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let _ = self.reap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.terminate(Duration::from_secs(5));
        }
    }
}

/// Log file opened for appending, shared by a process's stdout and stderr (O_APPEND keeps their
/// lines from overwriting each other).
pub fn open_log(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))
}

/// The last `n` lines of a log, for an error message.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(n)..].join("\n");
    if tail.is_empty() {
        format!("(log {} is empty)", path.display())
    } else {
        format!("last lines of {}:\n{tail}", path.display())
    }
}

/// `VmHWM` of a running process, KiB.
pub fn vm_hwm_kib(pid: libc::pid_t) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    parse_kib_field(&status, "VmHWM:").context("no VmHWM in /proc/PID/status")
}

/// `VmRSS` of a running process (resident now, not its peak), KiB.
pub fn vm_rss_kib(pid: libc::pid_t) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    parse_kib_field(&status, "VmRSS:").context("no VmRSS in /proc/PID/status")
}

/// CPU time of a running process in clock ticks: utime + stime of all its threads, plus cutime +
/// cstime of the children it has reaped (lsyncd's rsync runs are such children).
pub fn cpu_ticks(pid: libc::pid_t) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat).context("unexpected /proc/PID/stat")
}

/// Clock ticks per second, the unit of [`cpu_ticks`].
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 { n as f64 } else { 100.0 }
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses: fields start after the last ')', with
    // the state as field 3 of proc(5); utime, stime, cutime, cstime are fields 14 to 17.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<u64>().ok())
        .sum()
}

fn parse_kib_field(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// Bytes transmitted on the loopback interface so far (`lo` tx_bytes in /proc/net/dev). Every
/// loopback byte is transmitted once, so the delta over a run is the traffic of both directions,
/// TCP/IP headers included, and of anything else using loopback meanwhile (normally nothing).
pub fn lo_tx_bytes() -> Result<u64> {
    let dev = std::fs::read_to_string("/proc/net/dev").context("read /proc/net/dev")?;
    parse_lo_tx(&dev).context("no `lo` line in /proc/net/dev")
}

fn parse_lo_tx(dev: &str) -> Option<u64> {
    let line = dev.lines().find(|l| l.trim_start().starts_with("lo:"))?;
    let fields: Vec<&str> = line.split_once(':')?.1.split_whitespace().collect();
    // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit bytes.
    fields.get(8)?.parse().ok()
}

/// Moves the calling thread into a network namespace of its own and brings its `lo` up, so the
/// loopback counters see the bench's traffic alone (not another process's tests or downloads).
/// Call it before any other thread exists: children inherit the namespace of the thread that
/// forks them. Needs CAP_SYS_ADMIN; on failure the thread stays in (or returns to) its namespace.
pub fn private_loopback() -> Result<()> {
    let original = File::open("/proc/self/ns/net").context("open /proc/self/ns/net")?;
    // SAFETY: plain syscall on the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    if let Err(e) = loopback_up() {
        // SAFETY: `original` is a namespace file descriptor of the right type.
        unsafe { libc::setns(original.as_raw_fd(), libc::CLONE_NEWNET) };
        return Err(e);
    }
    Ok(())
}

/// Sets IFF_UP on `lo` (a new namespace starts with it down).
fn loopback_up() -> Result<()> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero ifreq is valid; the name is set below.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo") {
        *d = *s as libc::c_char;
    }
    // SAFETY: ifreq-sized argument, as SIOCGIFFLAGS/SIOCSIFFLAGS expect; the flags member of
    // the union is the one both requests use.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            bail!("SIOCGIFFLAGS lo: {}", std::io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) != 0 {
            bail!("SIOCSIFFLAGS lo: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether something listens on 127.0.0.1:`port`, read from /proc/net/tcp: unlike a test
/// connection, this does not make the rsync daemon fork a session for nothing.
pub fn listening_on_loopback(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A")
        })
    })
}

/// Pids whose parent is `pid` (zombies included: they have not been reaped yet).
pub fn children_of(pid: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                // The command name may hold spaces and parentheses: fields start after the last ')'.
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// A free loopback port right now (the daemon binds it a moment later; a clash is retried).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// One `server-sync`, started fresh for one measured run so that its peak RSS is that run's.
pub struct OurServer {
    pub proc: Proc,
    pub port: u16,
}

impl OurServer {
    /// Starts `server-sync dir` with its hash cache in `cache_dir` and its state (the client it
    /// mirrors, the list it last acknowledged) in `state_dir`.
    pub fn start(
        bin: &Path,
        dir: &Path,
        cache_dir: &Path,
        state_dir: &Path,
        log: &Path,
    ) -> Result<OurServer> {
        let out = open_log(log)?;
        let mut cmd = Command::new(bin);
        cmd.arg(dir)
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                "0",
                "--data-port",
                "0",
                "-q",
            ])
            .arg("--cache-dir")
            .arg(cache_dir)
            .arg("--state-dir")
            .arg(state_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(out.try_clone()?);
        let (proc, stdout) = Proc::spawn("server-sync", &mut cmd)?;
        let stdout = stdout.expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        let mut out = out;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                let _ = writeln!(out, "{line}");
                if let Some(port) = parse_listening(&line) {
                    let _ = tx.send(port);
                }
            }
        });
        let server = |port| OurServer { proc, port };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(port) => Ok(server(port)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                drop(server(0));
                bail!(
                    "server-sync printed no `listening` line within 30 s; {}",
                    log_tail(log, 20)
                )
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let mut s = server(0);
                let exit = s.proc.wait(Duration::from_secs(5))?;
                bail!(
                    "server-sync exited before listening ({exit}); {}",
                    log_tail(log, 20)
                )
            }
        }
    }
}

/// The control port from `listening control=127.0.0.1:PORT data=127.0.0.1:PORT`.
pub fn parse_listening(line: &str) -> Option<u16> {
    let rest = line.split("listening control=").nth(1)?;
    let addr = rest.split_whitespace().next()?;
    addr.rsplit_once(':')?.1.parse().ok()
}

/// An rsync daemon on loopback, started fresh for one run (under a supervisor, see
/// [`Supervised`]): its forked session processes are reaped by the daemon, so once it is reaped
/// in turn, `wait4` reports the peak RSS of the largest process of that session (rsync's
/// receiving side is two processes, generator and receiver; the kernel reports the larger,
/// not their sum).
pub struct RsyncDaemon {
    daemon: Supervised,
    pub port: u16,
}

impl RsyncDaemon {
    /// Writes a daemon configuration with one writable `module` at `path`. The daemon runs as
    /// ourselves (as root, rsync would otherwise switch to `nobody`), without chroot, so it needs
    /// no privilege; symlink munging and reverse DNS are switched off because they are costs ours
    /// does not have and the benches do not need.
    pub fn write_config(config: &Path, log: &Path, module: &str, path: &Path) -> Result<()> {
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let conf = format!(
            "# Written by `cargo xtask bench`.\n\
             uid = {uid}\ngid = {gid}\nuse chroot = no\nmunge symlinks = no\n\
             reverse lookup = no\nlog file = {}\n\n[{module}]\n    path = {}\n    read only = no\n",
            log.display(),
            path.display()
        );
        std::fs::write(config, conf).with_context(|| format!("write {}", config.display()))
    }

    pub fn start(config: &Path, log: &Path) -> Result<RsyncDaemon> {
        let mut last_err = None;
        // A free port can be taken between our probe and the daemon's bind: try a few.
        for _ in 0..3 {
            let port = free_port()?;
            let argv = [
                "rsync".to_string(),
                "--daemon".into(),
                "--no-detach".into(),
                format!("--config={}", config.display()),
                format!("--port={port}"),
                "--address=127.0.0.1".into(),
            ];
            let daemon = Supervised::start(&argv, log)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if listening_on_loopback(port) {
                    return Ok(RsyncDaemon { daemon, port });
                }
                if daemon.has_exited() || Instant::now() > deadline {
                    daemon.signal(libc::SIGKILL);
                    let why = match daemon.finish(Duration::from_secs(5)) {
                        Ok(m) => m.exit.to_string(),
                        Err(e) => format!("{e:#}"),
                    };
                    last_err = Some(format!(
                        "rsync daemon did not listen on port {port} ({why}); {}",
                        log_tail(log, 10)
                    ));
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        bail!("{}", last_err.unwrap_or_default())
    }

    /// Whether the daemon has ended.
    pub fn has_exited(&self) -> bool {
        self.daemon.has_exited()
    }

    /// The daemon's own pid (its sessions are its children).
    pub fn pid(&self) -> libc::pid_t {
        self.daemon.pid
    }

    /// Waits for the session processes to be reaped by the daemon, then stops it. Returns the
    /// peak RSS of the daemon's process tree, or why it cannot be given.
    pub fn finish(self) -> std::result::Result<u64, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !children_of(self.daemon.pid).is_empty() {
            if Instant::now() > deadline {
                return Err("rsync session processes still running 30 s after the client".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.daemon.signal(libc::SIGTERM);
        self.daemon
            .finish(Duration::from_secs(10))
            .map(|m| m.exit.maxrss_kib)
            .map_err(|e| format!("{e:#}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files_and_server_line() {
        let dev = "Inter-|   Receive                                                |  Transmit\n \
                   face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
                   lo: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n  \
                   eth0: 5 1 0 0 0 0 0 0 6 1 0 0 0 0 0 0\n";
        assert_eq!(parse_lo_tx(dev), Some(2000));
        assert_eq!(
            parse_kib_field("Name:\tx\nVmHWM:\t   12345 kB\n", "VmHWM:"),
            Some(12345)
        );
        assert_eq!(
            parse_listening("listening control=127.0.0.1:40891 data=127.0.0.1:44135"),
            Some(40891)
        );
        assert_eq!(parse_listening("something else"), None);
        assert_eq!(
            parse_cpu_ticks("42 (a) b (c)) S 1 42 42 0 -1 0 0 0 0 0 7 3 2 1 20 0 1 0"),
            Some(13)
        );
        assert_eq!(parse_cpu_ticks("42 (x) S 1"), None);
    }

    #[test]
    fn wait4_reports_exit_and_rss() {
        let (mut p, _) = Proc::spawn("sh", Command::new("sh").args(["-c", "exit 3"])).unwrap();
        let e = p.wait(Duration::from_secs(10)).unwrap();
        assert!(!e.success());
        assert_eq!(e.to_string(), "exit code 3");
        assert!(e.maxrss_kib > 0);
    }
}
