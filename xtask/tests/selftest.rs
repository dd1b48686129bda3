//! Harness self-tests that need no product binaries: the engine against stand-in implementations.
//!
//! * A client that does nothing (`true`) must make 001 and 004 fail with a readable tree diff.
//! * The `cp -a` reference profile must pass the scenarios that only describe the end state, which
//!   also proves those scenarios do not over-specify.
//! * The steps made for a watching daemon (`wait_identical`, `pause`, `resume`, paced `append`,
//!   `mark`) work with the reference's polling daemon, and a scenario whose `needs` the profile
//!   lacks is skipped.

use std::path::{Path, PathBuf};

use xtask::engine::{self, Config, Outcome};
use xtask::profile::Profile;
use xtask::scenario::{self, Scenario};

fn root() -> PathBuf {
    xtask::workspace_root()
}

fn scenarios(numbers: &[u32]) -> Vec<Scenario> {
    let all = scenario::load_dir(&root().join("scenarios")).expect("scenarios load");
    let picked: Vec<_> = all
        .into_iter()
        .filter(|s| numbers.contains(&s.number))
        .collect();
    assert_eq!(picked.len(), numbers.len(), "missing scenarios");
    picked
}

fn config(profile: Profile, name: &str) -> Config {
    Config {
        profile,
        out_dir: std::env::temp_dir().join(format!("xtask-selftest-{name}-{}", std::process::id())),
        keep: false,
        snapshot_dir: None,
    }
}

fn run_all(scs: &[Scenario], cfg: &Config) -> Vec<Outcome> {
    scs.iter().map(|s| engine::run(s, cfg)).collect()
}

const FAKE_SERVER_DO_NOTHING_CLIENT: &str = r#"
name = "fake server, do-nothing client"
[server]
command = ["sh", "-c", "echo 'listening control=127.0.0.1:1 data=127.0.0.1:2'; exec sleep 3600"]
ready = "listening control=*:{port} data=*:{data_port}"
[client]
once = ["true"]
[checks]
mtime = "ns"
"#;

#[test]
fn do_nothing_client_fails_001_and_004_with_a_tree_diff() {
    let profile = Profile::parse(
        FAKE_SERVER_DO_NOTHING_CLIENT,
        "test",
        Path::new("/"),
        Path::new("/"),
    )
    .unwrap();
    let cfg = config(profile, "true");
    let outcomes = run_all(&scenarios(&[1, 4]), &cfg);
    for (o, file) in outcomes.iter().zip(["test001.txt", "test004.txt"]) {
        assert!(
            !o.passed,
            "{} must fail with a client that does nothing",
            o.id
        );
        let report = o.failure.as_deref().unwrap();
        for want in [
            "expected: client and server trees identical",
            "diff client → server",
            &format!("- {file}: file only in client"),
            "client tree (",
            "server tree (",
            "(empty)",
            "test_sync.log",
            &format!(
                "test_{:03}_server.log",
                if file.contains("001") { 1 } else { 4 }
            ),
        ] {
            assert!(
                report.contains(want),
                "{}: report lacks {want:?}:\n{report}",
                o.id
            );
        }
    }
    let _ = std::fs::remove_dir_all(&cfg.out_dir);
}

#[test]
fn cp_reference_passes_end_state_scenarios() {
    let profile = Profile::load(
        &root().join("scenarios/profiles/cp-reference.toml"),
        Path::new("/"),
    )
    .unwrap();
    let cfg = config(profile, "cp");
    // Everything but 012 (the server strips set-user/group-ID; cp -a keeps them), 014/015
    // (slow, nothing new for the engine), 017 (needs a real server to kill), 020 (cp copies
    // FIFOs) and 022 (needs exit code 3).
    let picked = scenarios(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 16, 18, 19, 21]);
    let failures: Vec<String> = run_all(&picked, &cfg)
        .into_iter()
        .filter(|o| !o.passed)
        .map(|o| o.failure.unwrap_or_default())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let _ = std::fs::remove_dir_all(&cfg.out_dir);
}

#[test]
fn every_shipped_scenario_parses() {
    let all = scenario::load_dir(&root().join("scenarios")).unwrap();
    assert!(all.len() >= 21);
    for n in 1..=7 {
        assert!(
            all.iter().any(|s| s.number == n),
            "seed scenario {n:03} missing"
        );
    }
}

/// Each kind of check must catch the problem it claims to, with a message that names it.
#[test]
fn checks_fail_with_a_useful_message() {
    let mut profile = Profile::load(
        &root().join("scenarios/profiles/cp-reference.toml"),
        Path::new("/"),
    )
    .unwrap();
    profile.checks.logs = true;
    profile.checks.temp_marker = Some(".server-sync-tmp.".into());
    let cfg = config(profile, "neg");
    let prelude = r#"{ start = "server" }, { write = "client:a.txt", text = "a\n" }, { symlink = "client:l", target = "a.txt" }, { sync = "client" },"#;
    let cases = [
        (
            r#"{ chmod = "server:a.txt", mode = 0o600 }, { identical = ["client", "server"] }"#,
            "~ a.txt: mode 0644 vs 0600 (client vs server)",
        ),
        (
            r#"{ touch = "server:a.txt", mtime = 0 }, { identical = ["client", "server"] }"#,
            "~ a.txt: mtime ",
        ),
        (
            r#"{ write = "server:a.txt", text = "b\n" }, { identical = ["client", "server"] }"#,
            "~ a.txt: md5 60b725f10c9c85c70d97880dfe8191b3 vs 3b5d5c3712955042212316173ccf37be",
        ),
        (
            r#"{ delete = "server:l" }, { symlink = "server:l", target = "b" }, { identical = ["client", "server"] }"#,
            "~ l: target a.txt vs b",
        ),
        (
            r#"{ delete = "server:l" }, { mkdir = "server:l" }, { identical = ["client", "server"] }"#,
            "~ l: kind symlink vs dir",
        ),
        (
            r#"{ write = "server:.server-sync-tmp.1", text = "" }, { no_temp = "server" }"#,
            "actual:   .server-sync-tmp.1",
        ),
        (
            r#"{ exists = "server:a.txt", md5 = "00000000000000000000000000000000" }"#,
            "md5 60b725f10c9c85c70d97880dfe8191b3 (expected 00000000000000000000000000000000)",
        ),
        (r#"{ absent = "server:a.txt" }"#, "it exists: f 0644"),
        (r#"{ exists = "server:nope" }"#, "it does not exist"),
        (
            r#"{ log = "client", contains = "never printed" }"#,
            "| sync:done",
        ),
        (
            r#"{ log = "client", lacks = "sync:*" }"#,
            "matching lines:\n    | sync:done",
        ),
        (
            r#"{ wait = "server", line = "never printed", timeout = 0.2 }"#,
            "no such line before the timeout",
        ),
        (r#"{ sync = "client", exit = 3 }"#, "actual:   exit code 0"),
        (
            r#"{ empty = "server" }"#,
            "expected: server directory empty",
        ),
        // With nothing to mirror it (no client daemon), the wait ends at its timeout with the
        // report `identical` gives.
        (
            r#"{ write = "server:x.txt", text = "x\n" }, { wait_identical = ["client", "server"], timeout = 0.3 }"#,
            "expected: client and server trees identical within 300ms",
        ),
        (
            r#"{ write = "server:x.txt", text = "x\n" }, { wait_identical = ["client", "server"], timeout = 0.3 }"#,
            "+ x.txt: file only in server",
        ),
        // With no process left that could change a tree, it fails at once, saying why.
        (
            r#"{ stop = "server" }, { write = "server:x.txt", text = "x\n" }, { wait_identical = ["client", "server"], timeout = 600 }"#,
            "and no process is left running (or each is paused) to change them",
        ),
        (
            r#"{ mark = "m" }, { log = "client", contains = "sync:done", since = "m" }"#,
            "expected: 1 line matching \"sync:done\" in the client log since mark \"m\"",
        ),
        (r#"{ resume = "server" }"#, "server#1 is not paused"),
        (r#"{ pause = "client" }"#, "nothing of client is running"),
    ];
    for (steps, want) in cases {
        let text = format!("name = \"negative\"\nsteps = [ {prelude} {steps} ]\n");
        let sc = scenario::parse(Path::new("scenarios/900-negative.toml"), &text).unwrap();
        let o = engine::run(&sc, &cfg);
        let report = o.failure.unwrap_or_else(|| panic!("{steps} passed"));
        assert!(
            report.contains(want),
            "{steps}: report lacks {want:?}:\n{report}"
        );
    }
    let _ = std::fs::remove_dir_all(&cfg.out_dir);
}

/// The profile features for implementations unlike ours: a fixed port with readiness read from the
/// kernel's socket table (no ready line), a server that must be idle before the scenario goes on,
/// and a client that never exits by itself (a sync ends at its `sync:done` line, then the harness
/// stops it). Exercised with a single-threaded Python listener that, like the original server,
/// takes the first connection for its client: a readiness probe would show in its log.
#[test]
fn fixed_port_listen_ready_and_line_terminated_client() {
    let port = xtask::process::unused_port().unwrap();
    let text = format!(
        r#"
name = "fixed port, listen readiness, idle server, client stopped after its line"
[server]
command = ["python3", "-u", "-c", "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('127.0.0.1',{port}))\ns.listen()\nc,a=s.accept()\nprint('connection from',a)\nc.recv(1)"]
port = {port}
data_port = {port}
ready = "listen"
wait_idle = true
[client]
once = ["sh", "-c", "find \"$1\" -mindepth 1 -delete && cp -a \"$2\"/. \"$1\"/ || exit 1; echo sync:done; exec sleep 3600 >/dev/null", "sh", "{{server_dir}}", "{{dir}}"]
sync_done = "sync:done"
[checks]
mtime = "ns"
logs = false
"#
    );
    let profile = Profile::parse(&text, "test", Path::new("/"), Path::new("/")).unwrap();
    assert!(profile.fixed_ports());
    let cfg = config(profile, "fixed");
    for o in run_all(&scenarios(&[1, 4]), &cfg) {
        assert!(o.passed, "{}", o.failure.unwrap_or_default());
        let server_log = std::fs::read_to_string(&o.logs[0]).unwrap();
        assert!(server_log.contains("started"), "{server_log}");
        assert!(
            !server_log.contains("connection from ('127.0.0.1'"),
            "the harness connected to the server to learn it was ready:\n{server_log}"
        );
    }
    let _ = std::fs::remove_dir_all(&cfg.out_dir);
}

/// A profile that needs an environment variable says which, and what it must name, in one line.
#[test]
fn missing_or_wrong_environment_is_one_clear_line() {
    let text = r#"
name = "needs a variable"
[needs.XTASK_SELFTEST_NEVER_SET]
what = "a directory holding prog.sh"
files = ["prog.sh"]
[server]
command = ["{env:XTASK_SELFTEST_NEVER_SET}/prog.sh", "{dir}"]
port = 7
ready = "listen"
[client]
once = ["true"]
"#;
    let profile = Profile::parse(text, "t.toml", Path::new("/"), Path::new("/")).unwrap();
    let err = format!("{:#}", profile.check_needs().unwrap_err());
    assert_eq!(
        err,
        "profile t.toml cannot run: XTASK_SELFTEST_NEVER_SET is not set; set it to a directory holding prog.sh"
    );
    // The engine refuses to run it too, with the same words, instead of starting "/prog.sh".
    let o = engine::run(&scenarios(&[1])[0], &config(profile, "needs"));
    assert!(
        o.failure
            .unwrap()
            .contains("XTASK_SELFTEST_NEVER_SET is not set")
    );
}

/// `wait_identical`, `pause`, `resume`, appends over time and marks, with the `cp -a` reference
/// daemon (`interval = 1`): the wait ends once a cycle has copied the changes, and a paused
/// daemon copies nothing until it is resumed.
#[test]
fn wait_identical_pause_and_resume_with_a_polling_reference_daemon() {
    let mut profile = Profile::load(
        &root().join("scenarios/profiles/cp-reference.toml"),
        Path::new("/"),
    )
    .unwrap();
    profile.checks.logs = true;
    let cfg = config(profile, "watchsteps");
    let text = r#"
name = "wait_identical with a polling daemon"
timeout = 30
steps = [
  { start = "server" },
  { write = "client:a.txt", text = "one\n" },
  { start = "client", interval = 1 },
  { wait_identical = ["client", "server"] },
  { pause = "client" },
  { mark = "paused" },
  { append = "client:a.txt", text = "more\n", times = 4, every_ms = 250 },
  { exists = "server:a.txt", size = 4 },
  { log = "client", lacks = "sync:done", since = "paused" },
  { resume = "client" },
  { wait_identical = ["client", "server"] },
  { exists = "server:a.txt", size = 24, same_as = "client" },
  { log = "client", contains = "sync:done", since = "paused" },
]
"#;
    let sc = scenario::parse(Path::new("scenarios/901-watch-steps.toml"), text).unwrap();
    let o = engine::run(&sc, &cfg);
    assert!(o.passed, "{}\n{}", o.failure.unwrap_or_default(), o.run_log);
    // The four appends were spread over at least 750 ms: the step took that long.
    let append = o
        .run_log
        .lines()
        .find(|l| l.contains("{ append = "))
        .unwrap();
    assert!(append.contains("4 appends over "), "{append}");
    let _ = std::fs::remove_dir_all(&cfg.out_dir);
}

/// A scenario needing a feature the profile lacks is skipped, not failed, and runs nothing.
#[test]
fn unmet_needs_skip_the_scenario() {
    let profile = Profile::load(
        &root().join("scenarios/profiles/cp-reference.toml"),
        Path::new("/"),
    )
    .unwrap();
    let cfg = config(profile, "skip");
    let text = "name = \"needs watch\"\nneeds = [\"watch\"]\nsteps = [ { start = \"server\" } ]\n";
    let sc = scenario::parse(Path::new("scenarios/902-needs.toml"), text).unwrap();
    let o = engine::run(&sc, &cfg);
    assert!(!o.passed && !o.failed(), "{o:?}");
    let why = o.skipped.unwrap();
    assert!(why.starts_with("needs watch, which profile "), "{why}");
    assert!(o.run_log.contains("SKIP: needs watch"), "{}", o.run_log);
    assert!(o.logs.is_empty(), "nothing ran, so no logs");
}
