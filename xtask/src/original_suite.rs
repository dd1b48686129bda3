//! `cargo xtask original-suite`: the original project's own test suite (`test-sync.py`) run
//! against this repository's binaries, as a check from outside.
//!
//! `test-sync.py` starts `python3 server-sync.py DIR` and `python3 client-sync.py DIR` in its
//! current directory, with folders hard-coded in its class body and fixed sleeps (about 12
//! minutes). So the run happens in `target/original-suite/`, which gets two generated shims under
//! those script names that `exec` our `server-sync` / `client-sync` (same default ports, 7101 and
//! 7100; a private `--cache-dir`), and a copy of `test-sync.py` whose folders are rewritten to
//! fresh temporary directories. The original's code is read from `SERVER_SYNC_ORIGINAL` at run
//! time and never stored in this repository.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use xtask::netstat;
use xtask::profile::need_dir;

use crate::target_dir;

pub const USAGE: &str = "\
options of `original-suite`:
  --release       build and test release binaries (default: debug)
  TEST...         only these tests, as unittest names (ServerSyncTest.test_003_client_file_rename)
  SERVER_SYNC_ORIGINAL (environment) names the original project's directory, holding test-sync.py
";

/// The environment variable naming the original project's directory (shared with
/// `scenarios/profiles/python-original.toml`).
const ENV: &str = "SERVER_SYNC_ORIGINAL";
const SUITE: &str = "test-sync.py";
/// The ports the original's scripts, and so its tests, hard-code; our defaults are the same.
const PORTS: [u16; 2] = [7101, 7100];

/// Runs the suite; the exit code is the suite's own (2 when it cannot be started).
pub fn run(args: &[String]) -> ExitCode {
    match run_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_inner(args: &[String]) -> Result<ExitCode> {
    let mut release = false;
    let mut tests = Vec::new();
    for a in args {
        match a.as_str() {
            "--release" => release = true,
            "-h" | "--help" => {
                print!("usage: cargo xtask original-suite [--release] [TEST...]\n\n{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            s if s.starts_with('-') => bail!("unknown option {s:?} (see --help)"),
            s => tests.push(s.to_string()),
        }
    }
    let original = need_dir(
        ENV,
        "the directory holding the original project's test-sync.py",
        &[SUITE.to_string()],
    )?;
    for port in PORTS {
        let states = netstat::states_on_port(port)?;
        if states.contains(&netstat::LISTEN) {
            bail!(
                "port {port} is already listening; the suite needs 7101 and 7100 free (is a server-sync running?)"
            );
        }
    }

    let root = xtask::workspace_root();
    let bin_dir = build(&root, release)?;
    let work = target_dir(&root)?.join("original-suite");
    let folders = prepare(&work, &original, &bin_dir)?;
    let (client, server) = (folders.path().join("client"), folders.path().join("server"));
    println!(
        "running {SUITE} from {} against {} in {}\n  client folder {}, server folder {}",
        original.display(),
        bin_dir.display(),
        work.display(),
        client.display(),
        server.display()
    );
    let status = Command::new("python3")
        .args([SUITE, "-v"])
        .args(&tests)
        .current_dir(&work)
        .status()
        .context("run python3")?;
    println!(
        "{SUITE} ended: {status}; its logs: {}/test_sync.log and test_NNN_{{server,client}}.log",
        work.display()
    );
    Ok(match status.code() {
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

/// Fills `work` (emptied first) with the two shims and the suite with its folders rewritten,
/// and returns the temporary directory holding those folders (`client/`, `server/`) and the
/// shims' hash caches (`cache/`): it and all in it go when it is dropped.
fn prepare(work: &Path, original: &Path, bin_dir: &Path) -> Result<tempfile::TempDir> {
    if work.exists() {
        std::fs::remove_dir_all(work).with_context(|| format!("clear {}", work.display()))?;
    }
    std::fs::create_dir_all(work)?;
    let tmp = tempfile::Builder::new()
        .prefix("original-suite-")
        .tempdir()?;
    let (client, server, cache) = (
        tmp.path().join("client"),
        tmp.path().join("server"),
        tmp.path().join("cache"),
    );
    for d in [&client, &server, &cache] {
        std::fs::create_dir(d)?;
    }
    for name in ["server-sync", "client-sync"] {
        let shim = shim(&bin_dir.join(name), &cache.join(name));
        std::fs::write(work.join(format!("{name}.py")), shim)?;
    }
    let suite = std::fs::read_to_string(original.join(SUITE))
        .with_context(|| format!("read {}", original.join(SUITE).display()))?;
    let suite = set_folders(&suite, &client, &server)
        .with_context(|| format!("in {}", original.join(SUITE).display()))?;
    std::fs::write(work.join(SUITE), suite)?;
    Ok(tmp)
}

/// Builds both product binaries and returns their directory.
fn build(root: &Path, release: bool) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--package", "server-sync", "--bins"])
        .current_dir(root);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("run cargo build")?;
    if !status.success() {
        bail!("cargo build of server-sync and client-sync failed ({status})");
    }
    let profile = if release { "release" } else { "debug" };
    Ok(target_dir(root)?.join(profile))
}

/// A stand-in for one of the original scripts: replaces itself with our binary, passing the
/// arguments it got (the directory) and a private hash cache.
fn shim(binary: &Path, cache: &Path) -> String {
    format!(
        "# Generated by `cargo xtask original-suite`: runs this repository's binary where the\n\
         # original's test suite expects its Python script.\n\
         import os, sys\n\
         binary = {}\n\
         os.execv(binary, [binary, *sys.argv[1:], '--cache-dir', {}])\n",
        py_str(&binary.to_string_lossy()),
        py_str(&cache.to_string_lossy())
    )
}

/// Rewrites the suite's `CLIENT_FOLDER = '…'` and `SERVER_FOLDER = '…'` class attributes, each of
/// which must appear exactly once.
fn set_folders(suite: &str, client: &Path, server: &Path) -> Result<String> {
    let mut out = String::with_capacity(suite.len());
    let mut seen = [0; 2];
    for line in suite.split_inclusive('\n') {
        let body = line.trim_start();
        let indent = &line[..line.len() - body.len()];
        let mut replaced = false;
        for (i, (name, dir)) in [("CLIENT_FOLDER", client), ("SERVER_FOLDER", server)]
            .into_iter()
            .enumerate()
        {
            let is_assignment = body
                .strip_prefix(name)
                .is_some_and(|rest| rest.trim_start().starts_with('='));
            if is_assignment {
                seen[i] += 1;
                out.push_str(&format!(
                    "{indent}{name} = {}\n",
                    py_str(&dir.to_string_lossy())
                ));
                replaced = true;
            }
        }
        if !replaced {
            out.push_str(line);
        }
    }
    if seen != [1, 1] {
        bail!(
            "expected one CLIENT_FOLDER and one SERVER_FOLDER assignment, found {} and {}",
            seen[0],
            seen[1]
        );
    }
    Ok(out)
}

/// A Python string literal for `s`.
fn py_str(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_exactly_the_two_folders() {
        let suite = "class T:\n\n    CLIENT_FOLDER = '/path/to/client/folder'\n    SERVER_FOLDER = '/path/to/server/folder'\n    CLIENT_CYCLE = 60\n    x = CLIENT_FOLDER\n";
        let out = set_folders(suite, Path::new("/tmp/c"), Path::new("/tmp/it's")).unwrap();
        assert_eq!(
            out,
            "class T:\n\n    CLIENT_FOLDER = '/tmp/c'\n    SERVER_FOLDER = '/tmp/it\\'s'\n    CLIENT_CYCLE = 60\n    x = CLIENT_FOLDER\n"
        );
        let err = set_folders("CLIENT_FOLDER = 'a'\n", Path::new("/c"), Path::new("/s"));
        assert!(err.unwrap_err().to_string().contains("found 1 and 0"));
    }

    #[test]
    fn shim_execs_the_binary_with_a_private_cache() {
        let text = shim(Path::new("/t/debug/server-sync"), Path::new("/tmp/x/cache"));
        assert!(text.contains("binary = '/t/debug/server-sync'"), "{text}");
        assert!(
            text.contains(
                "os.execv(binary, [binary, *sys.argv[1:], '--cache-dir', '/tmp/x/cache'])"
            ),
            "{text}"
        );
        // Run it, with echo standing in for our binary: it must pass the directory through.
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("client-sync.py");
        std::fs::write(&script, shim(Path::new("/bin/echo"), Path::new("/c"))).unwrap();
        let out = Command::new("python3")
            .arg(&script)
            .arg("/some dir")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "/some dir --cache-dir /c\n"
        );
    }
}
