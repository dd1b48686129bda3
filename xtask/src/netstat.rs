//! TCP port states as the kernel lists them in `/proc/net/tcp` and `/proc/net/tcp6`, and the run
//! state of a process (tree) from `/proc/PID/task/*/stat`.
//!
//! The harness must learn that a fixed-port server is ready without connecting to it: a
//! single-threaded server (the original Python one) takes a probe connection for its client and
//! then serves nothing else. Reading the kernel's socket table observes the port without touching
//! it. The same table shows a port still held after the previous scenario (a server that closed a
//! connection first keeps it in TIME_WAIT for 60 s, and a server without `SO_REUSEADDR` cannot
//! bind it until then).

use std::collections::BTreeMap;
use std::io;

/// The kernel's `st` value for a listening socket.
pub const LISTEN: u8 = 0x0A;

/// Name of a TCP state number of `/proc/net/tcp` (see `include/net/tcp_states.h`).
pub fn state_name(st: u8) -> &'static str {
    match st {
        0x01 => "ESTABLISHED",
        0x02 => "SYN_SENT",
        0x03 => "SYN_RECV",
        0x04 => "FIN_WAIT1",
        0x05 => "FIN_WAIT2",
        0x06 => "TIME_WAIT",
        0x07 => "CLOSE",
        0x08 => "CLOSE_WAIT",
        0x09 => "LAST_ACK",
        0x0A => "LISTEN",
        0x0B => "CLOSING",
        0x0C => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

/// The states of every IPv4 and IPv6 TCP socket whose local port is `port`.
pub fn states_on_port(port: u16) -> io::Result<Vec<u8>> {
    let mut states = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(table) {
            Ok(text) => states.extend(parse_table(&text, port)),
            // A kernel without IPv6 has no tcp6 table; that is not an error.
            Err(e) if e.kind() == io::ErrorKind::NotFound && table.ends_with('6') => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("read {table}: {e}"))),
        }
    }
    Ok(states)
}

/// Whether some socket listens on `port` (any address, IPv4 or IPv6).
pub fn is_listening(port: u16) -> io::Result<bool> {
    Ok(states_on_port(port)?.contains(&LISTEN))
}

/// "2 × TIME_WAIT, 1 × ESTABLISHED" (for messages).
pub fn describe(states: &[u8]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for &s in states {
        *counts.entry(state_name(s)).or_default() += 1;
    }
    counts
        .iter()
        .map(|(name, n)| format!("{n} × {name}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `st` of every line of one table whose local address has `port`. Lines look like
/// `0: 0100007F:1BBD 00000000:0000 0A …` (local address, remote address, state; hex).
fn parse_table(text: &str, port: u16) -> Vec<u8> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let st = fields.nth(1)?;
            let local_port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            (local_port == port).then(|| u8::from_str_radix(st, 16).ok())?
        })
        .collect()
}

/// Whether every thread of process `pid` and of all its descendants is asleep (state `S`): blocked
/// in `accept`, `poll` or a read, not running (`R`) or in disk I/O (`D`). `None` when `pid` is gone.
///
/// A single-threaded server that is asleep after printing the end of a session is waiting for the
/// next client, so whatever it prepares for that session (a rescan of its tree) is done.
pub fn tree_asleep(pid: i32) -> io::Result<Option<bool>> {
    let mut pids = vec![pid];
    let mut parents: Vec<(i32, i32)> = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // Processes may exit while we look; a missing one simply is not in the tree.
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            if let Some((_, ppid)) = parse_stat(&stat) {
                parents.push((p, ppid));
            }
        }
    }
    let mut i = 0;
    while i < pids.len() {
        let parent = pids[i];
        pids.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    for (n, p) in pids.iter().enumerate() {
        let tasks = match std::fs::read_dir(format!("/proc/{p}/task")) {
            Ok(t) => t,
            Err(_) if n == 0 => return Ok(None),
            Err(_) => continue,
        };
        for task in tasks {
            let Ok(task) = task else { continue };
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            match parse_stat(&stat) {
                Some(('S', _)) => {}
                // A zombie main thread of the server itself means it is gone.
                Some(('Z', _)) if n == 0 => return Ok(None),
                Some(('Z' | 'X', _)) => {}
                _ => return Ok(Some(false)),
            }
        }
    }
    Ok(Some(true))
}

/// Whether every thread of process `pid` is stopped (state `T`, as SIGSTOP leaves it). `None`
/// when `pid` is gone or a zombie.
///
/// SIGSTOP is delivered asynchronously: each thread stops when it next handles signals. A
/// scenario that pauses a daemon to pile changes up behind it must know it has stopped first.
pub fn stopped(pid: i32) -> io::Result<Option<bool>> {
    let tasks = match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(t) => t,
        Err(_) => return Ok(None),
    };
    for task in tasks {
        let Ok(task) = task else { continue };
        // A thread that ended while we look is no running thread.
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        match parse_stat(&stat) {
            Some(('T', _)) => {}
            Some(('Z' | 'X', _)) if task.file_name().to_str() == Some(&pid.to_string()) => {
                return Ok(None);
            }
            Some(('Z' | 'X', _)) => {}
            _ => return Ok(Some(false)),
        }
    }
    Ok(Some(true))
}

/// State and parent pid from a `/proc/PID/stat` line: `pid (comm) S ppid …`, where comm may itself
/// hold spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_table() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1BBD 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 13855 1\n   2: 0100007F:1BBD 0100007F:B776 06 00000000:00000000 03:00001588 00000000     0        0 0 3\n   3: 0100007F:A124 0100007F:1BBD 06 00000000:00000000 03:00001588 00000000     0        0 0 3\n";
        assert_eq!(parse_table(text, 7101), vec![LISTEN, 0x06]);
        assert_eq!(parse_table(text, 7100), Vec::<u8>::new());
        assert_eq!(describe(&[6, 10, 6]), "1 × LISTEN, 2 × TIME_WAIT");
    }

    #[test]
    fn sees_a_listener_without_connecting() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(is_listening(port).unwrap());
        drop(l);
        assert!(!is_listening(port).unwrap());
    }

    #[test]
    fn parses_stat_with_odd_command_names() {
        assert_eq!(parse_stat("42 (a) b (c)) S 7 42 42 0"), Some(('S', 7)));
    }

    #[test]
    fn sees_a_process_stopped_and_continued() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let p = rustix::process::Pid::from_raw(pid).unwrap();
        assert_eq!(stopped(pid).unwrap(), Some(false));
        rustix::process::kill_process(p, rustix::process::Signal::STOP).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stopped(pid).unwrap() != Some(true) {
            assert!(std::time::Instant::now() < deadline, "never stopped");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // SIGCONT takes effect as it is sent: the process is no longer stopped at once.
        rustix::process::kill_process(p, rustix::process::Signal::CONT).unwrap();
        assert_eq!(stopped(pid).unwrap(), Some(false));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(stopped(pid).unwrap(), None);
    }

    #[test]
    fn tells_asleep_from_busy() {
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut spinner = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        // A freshly started process runs for a moment before `sleep` blocks: wait for that.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while tree_asleep(sleeper.id() as i32).unwrap() != Some(true) {
            assert!(std::time::Instant::now() < deadline, "sleep never slept");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // A busy loop is never seen asleep (it may be preempted, which is state R, not S).
        for _ in 0..20 {
            assert_eq!(tree_asleep(spinner.id() as i32).unwrap(), Some(false));
        }
        for c in [&mut sleeper, &mut spinner] {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        assert_eq!(tree_asleep(sleeper.id() as i32).unwrap(), None);
    }
}
