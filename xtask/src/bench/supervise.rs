//! Measured processes run under a small supervisor (`xtask __bench-run`), a fresh process that
//! starts the command, times it and reaps it with `wait4`.
//!
//! Why not start them from the bench itself: a child's `ru_maxrss` includes the resident
//! anonymous memory of the process that forked it (fork copies it, and exec records the old
//! image's high-water mark before loading the new one). The bench holds directory snapshots of
//! 100,000 entries, so everything it forked reported at least its ~25 MiB, and rsync's client
//! and daemon both showed exactly that. The supervisor is a fresh exec of this small binary, so
//! the floor it passes on is a few MiB; the bench measures that floor (`true` under the
//! supervisor) and reports it.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::proc::{Exit, Proc, open_log};

/// The hidden subcommand that runs the supervisor.
pub const SUBCOMMAND: &str = "__bench-run";

/// What the supervisor measured.
#[derive(Clone, Copy, Debug)]
pub struct Measured {
    pub exit: Exit,
    /// From just before fork to `wait4` returning, taken inside the supervisor.
    pub wall_s: f64,
}

/// The supervisor's side: `__bench-run LOG PROGRAM ARGS...`. Prints `pid N` once the command
/// runs and `exit STATUS MAXRSS_KIB WALL_NS` once it is reaped.
pub fn supervise(args: &[String]) -> Result<bool> {
    let [log, program, rest @ ..] = args else {
        bail!("usage: xtask {SUBCOMMAND} LOG PROGRAM [ARGS...]");
    };
    let out = open_log(Path::new(log))?;
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: prctl is async-signal-safe. The command dies with its supervisor, which dies
    // with the bench (the bench sets the same on the supervisor).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let t0 = Instant::now();
    let child = cmd.spawn().with_context(|| format!("start {program}"))?;
    let pid = child.id() as libc::pid_t;
    drop(child);
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "pid {pid}")?;
    stdout.flush()?;
    let mut status: libc::c_int = 0;
    // SAFETY: zeroed rusage is valid for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers; `pid` is our child.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if rc == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            bail!("wait4 {pid}: {err}");
        }
    }
    let wall = t0.elapsed();
    writeln!(
        stdout,
        "exit {status} {} {}",
        usage.ru_maxrss.max(0),
        wall.as_nanos()
    )?;
    stdout.flush()?;
    Ok(true)
}

/// The bench's side: one command running under a supervisor.
pub struct Supervised {
    sup: Proc,
    lines: BufReader<ChildStdout>,
    /// The command's own pid, and a pidfd to signal it without a pid-reuse race.
    pub pid: libc::pid_t,
    pidfd: Option<OwnedFd>,
}

impl Supervised {
    /// Starts `argv` under a supervisor, its output appended to `log`; returns once it runs.
    pub fn start(argv: &[String], log: &Path) -> Result<Supervised> {
        let exe = std::env::current_exe().context("locate the xtask binary")?;
        let mut cmd = Command::new(exe);
        cmd.arg(SUBCOMMAND)
            .arg(log)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(open_log(log)?);
        let (mut sup, stdout) = Proc::spawn(&argv[0], &mut cmd)?;
        let mut lines = BufReader::new(stdout.expect("stdout is piped"));
        let mut line = String::new();
        lines.read_line(&mut line)?;
        let Some(pid) = line
            .strip_prefix("pid ")
            .and_then(|p| p.trim().parse::<libc::pid_t>().ok())
        else {
            let exit = sup.wait(Duration::from_secs(5))?;
            bail!(
                "could not start `{}` ({exit}); {}",
                argv.join(" "),
                super::proc::log_tail(log, 10)
            );
        };
        // SAFETY: plain syscall. The command cannot have been reaped and its pid reused
        // unnoticed: its supervisor reports its end on the pipe we read before trusting this.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        // SAFETY: a fresh descriptor when non-negative (ESRCH: it has already ended).
        let pidfd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) });
        Ok(Supervised {
            sup,
            lines,
            pid,
            pidfd,
        })
    }

    /// Whether the command has ended (its supervisor exits right after reaping it).
    pub fn has_exited(&self) -> bool {
        self.sup.has_exited()
    }

    /// Sends `sig` to the command, if it still runs.
    pub fn signal(&self, sig: libc::c_int) {
        if let Some(fd) = &self.pidfd {
            // SAFETY: plain syscall on our pidfd; a process that already ended is ignored.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    sig,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
        }
    }

    /// Waits up to `timeout` for the command to end and returns what the supervisor measured.
    /// On timeout the supervisor is killed, and the command with it (PR_SET_PDEATHSIG).
    pub fn finish(mut self, timeout: Duration) -> Result<Measured> {
        let sup_exit = self.sup.wait(timeout)?;
        let mut line = String::new();
        self.lines.read_line(&mut line)?;
        parse_exit(&line).with_context(|| {
            format!(
                "the supervisor of pid {} reported {line:?} ({sup_exit})",
                self.pid
            )
        })
    }
}

fn parse_exit(line: &str) -> Option<Measured> {
    let mut f = line.strip_prefix("exit ")?.split_whitespace();
    let status = f.next()?.parse().ok()?;
    let maxrss_kib = f.next()?.parse().ok()?;
    let wall_ns: u64 = f.next()?.parse().ok()?;
    Some(Measured {
        exit: Exit::new(status, maxrss_kib),
        wall_s: wall_ns as f64 / 1e9,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_exit_line() {
        let m = parse_exit("exit 768 4096 1500000000\n").unwrap();
        assert_eq!(m.exit.to_string(), "exit code 3");
        assert_eq!(m.exit.maxrss_kib, 4096);
        assert_eq!(m.wall_s, 1.5);
        assert!(parse_exit("pid 3").is_none());
    }
}
