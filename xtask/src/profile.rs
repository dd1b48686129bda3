//! Implementation profiles (`--impl FILE`): how to start, recognise and stop some server and client.
//!
//! The scenarios describe behaviour; a profile says how to drive one implementation of it. Our own
//! binaries are the built-in profile (`scenarios/profiles/server-sync.toml`, compiled in), so any
//! other implementation of the protocol can be checked against the same scenarios.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::pattern::Pattern;
use crate::scenario::check_features;
use crate::tree::MtimePrecision;

/// The built-in profile: this repository's `server-sync` and `client-sync`.
pub const BUILTIN: &str = include_str!("../../scenarios/profiles/server-sync.toml");

/// A loaded profile with its placeholders checked.
#[derive(Clone, Debug)]
pub struct Profile {
    pub name: String,
    pub server: ServerSpec,
    pub client: ClientSpec,
    pub checks: Checks,
    /// Values for `{bin_dir}` and `{profile_dir}`.
    pub bin_dir: PathBuf,
    pub profile_dir: PathBuf,
    /// Where the profile came from (for messages).
    pub origin: String,
    /// Environment variables the profile needs (`[needs.NAME]`), checked by [`Profile::check_needs`].
    pub needs: BTreeMap<String, Need>,
}

/// An environment variable a profile needs, such as where another implementation is installed.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Need {
    /// What the variable must name, for the error message ("a directory holding …").
    #[serde(default)]
    pub what: String,
    /// Files that must exist in the directory it names.
    #[serde(default)]
    pub files: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    /// Program and arguments, with placeholders.
    pub command: Vec<String>,
    /// `"listen"` (wait until the kernel lists the fixed control port as listening; `"tcp"` is an
    /// old name for it), or a line pattern on the server's output; `{port}` / `{data_port}` in it
    /// capture the ports the server chose.
    pub ready: String,
    /// Control port passed as `{port}`; 0 lets the server choose (the ready line must capture it).
    /// Anything else is a fixed port, and then scenarios run one at a time.
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub data_port: u16,
    /// A line pattern the server prints at the end of every client session. When set, a `sync`
    /// also waits for it, so that log checks after a sync see the whole session.
    pub session_done: Option<String>,
    /// Also wait, once the server is ready and after each `session_done` line, until every thread
    /// of the server is asleep. For a server that prepares the next session (rereads its tree,
    /// say) after its last line about this one: without the wait, a scenario's next change would
    /// race that preparation.
    #[serde(default)]
    pub wait_idle: bool,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSpec {
    /// Command for one sync (`sync` steps).
    pub once: Vec<String>,
    /// Command for a client that keeps syncing (`start = "client"`); `{interval}` is available.
    pub daemon: Option<Vec<String>>,
    /// How a one-shot sync ends: `"exit"` (the process exits by itself), or a line pattern after
    /// which the harness stops the client with SIGTERM (for clients that never exit on their own).
    #[serde(default = "exit_word")]
    pub sync_done: String,
    /// A line pattern printed at the end of every cycle of the daemon (`wait_sync` steps).
    pub cycle_done: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// What the implementation can do beyond the basics (`"watch"`: see
    /// [`crate::scenario::FEATURES`]). Scenarios that need a feature not listed are skipped.
    #[serde(default)]
    pub features: Vec<String>,
}

fn exit_word() -> String {
    "exit".into()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    /// How precisely `identical` compares mtimes: "ns", "second" or "ignore".
    #[serde(default)]
    pub mtime: MtimePrecision,
    /// Whether `log` checks run (an implementation with other log wording can turn them off;
    /// they are then reported as skipped).
    #[serde(default = "yes")]
    pub logs: bool,
    /// Marker in the names of the implementation's temporary files (for `no_temp`).
    pub temp_marker: Option<String>,
    /// Whether final trees are compared with the stored insta snapshots.
    #[serde(default)]
    pub snapshots: bool,
}

impl Default for Checks {
    fn default() -> Self {
        Checks {
            mtime: MtimePrecision::default(),
            logs: true,
            temp_marker: None,
            snapshots: false,
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: String,
    server: ServerSpec,
    client: ClientSpec,
    #[serde(default)]
    checks: Checks,
    #[serde(default)]
    needs: BTreeMap<String, Need>,
}

/// How the harness learns that the server is ready.
#[derive(Clone, Debug)]
pub enum Ready {
    /// The fixed control port is in the kernel's LISTEN state (observed without connecting).
    Listen,
    Line(Pattern),
}

/// How the harness learns that a one-shot sync finished.
#[derive(Clone, Debug)]
pub enum SyncDone {
    Exit,
    Line(Pattern),
}

/// Values substituted into command lines.
#[derive(Clone, Debug, Default)]
pub struct Vars {
    pub dir: PathBuf,
    pub port: u16,
    pub data_port: u16,
    pub server_host: String,
    pub interval: u64,
    /// The server's directory: only for reference and test profiles whose "client" writes there
    /// directly (a real client knows only its own directory).
    pub server_dir: PathBuf,
}

const PLACEHOLDERS: &[&str] = &[
    "dir",
    "port",
    "data_port",
    "server_host",
    "interval",
    "bin_dir",
    "profile_dir",
    "server_dir",
];

impl Profile {
    /// The built-in profile for binaries in `bin_dir`.
    pub fn builtin(bin_dir: &Path) -> Result<Profile> {
        Profile::parse(BUILTIN, "built-in profile", bin_dir, bin_dir)
    }

    /// Loads a profile file; `{profile_dir}` is the file's directory.
    pub fn load(path: &Path, bin_dir: &Path) -> Result<Profile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read profile {}", path.display()))?;
        let dir = path
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("."));
        Profile::parse(&text, &path.display().to_string(), bin_dir, &dir)
    }

    /// Parses profile text and checks every command and pattern.
    pub fn parse(text: &str, origin: &str, bin_dir: &Path, profile_dir: &Path) -> Result<Profile> {
        let raw: RawProfile =
            toml::from_str(text).with_context(|| format!("in profile {origin}"))?;
        let p = Profile {
            name: raw.name,
            server: raw.server,
            client: raw.client,
            checks: raw.checks,
            needs: raw.needs,
            bin_dir: bin_dir.to_path_buf(),
            profile_dir: profile_dir.to_path_buf(),
            origin: origin.to_string(),
        };
        p.validate()
            .with_context(|| format!("in profile {origin}"))?;
        Ok(p)
    }

    fn validate(&self) -> Result<()> {
        for (what, cmd) in self.commands() {
            if cmd.is_empty() {
                bail!("{what} is empty");
            }
            for arg in cmd {
                check_placeholders(arg).with_context(|| format!("{what}: {arg:?}"))?;
            }
        }
        match self.ready()? {
            Ready::Listen if self.server.port == 0 => {
                bail!(
                    "ready = \"listen\" needs a fixed server.port (with port 0 only a ready line can say which port was chosen)"
                )
            }
            Ready::Line(p) if self.server.port == 0 && !p.capture_names().contains(&"port") => {
                bail!("with server.port = 0 the ready line must capture {{port}}")
            }
            _ => {}
        }
        self.sync_done()?;
        self.session_done()?;
        self.cycle_done()?;
        check_features(&self.client.features).context("client.features")?;
        if self.client.features.iter().any(|f| f == "watch") && self.client.daemon.is_none() {
            bail!("client.features has \"watch\", which is about the daemon: give client.daemon");
        }
        Ok(())
    }

    /// Why a scenario needing `needs` cannot run with this profile, or `None` when it can.
    pub fn unmet_needs(&self, needs: &[String]) -> Option<String> {
        let missing: Vec<&str> = needs
            .iter()
            .filter(|n| !self.client.features.contains(n))
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            return None;
        }
        Some(format!(
            "needs {}, which profile {:?} lacks (client.features)",
            missing.join(", "),
            self.name
        ))
    }

    /// Fixed ports mean scenarios cannot run side by side.
    pub fn fixed_ports(&self) -> bool {
        self.server.port != 0
    }

    pub fn ready(&self) -> Result<Ready> {
        if matches!(self.server.ready.as_str(), "listen" | "tcp") {
            Ok(Ready::Listen)
        } else {
            Ok(Ready::Line(Pattern::new(&self.server.ready)?))
        }
    }

    pub fn sync_done(&self) -> Result<SyncDone> {
        if self.client.sync_done == "exit" {
            Ok(SyncDone::Exit)
        } else {
            Ok(SyncDone::Line(Pattern::new(&self.client.sync_done)?))
        }
    }

    pub fn session_done(&self) -> Result<Option<Pattern>> {
        self.server
            .session_done
            .as_deref()
            .map(Pattern::new)
            .transpose()
    }

    pub fn cycle_done(&self) -> Result<Option<Pattern>> {
        self.client
            .cycle_done
            .as_deref()
            .map(Pattern::new)
            .transpose()
    }

    /// Whether any command uses `{bin_dir}` (then our binaries must be built first).
    pub fn uses_bin_dir(&self) -> bool {
        self.commands()
            .flat_map(|(_, cmd)| cmd)
            .any(|a| a.contains("{bin_dir}"))
    }

    /// Substitutes placeholders in a command line.
    pub fn expand(&self, cmd: &[String], vars: &Vars) -> Vec<String> {
        cmd.iter()
            .map(|arg| {
                arg.replace("{dir}", &vars.dir.to_string_lossy())
                    .replace("{port}", &vars.port.to_string())
                    .replace("{data_port}", &vars.data_port.to_string())
                    .replace("{server_host}", &vars.server_host)
                    .replace("{interval}", &vars.interval.to_string())
                    .replace("{bin_dir}", &self.bin_dir.to_string_lossy())
                    .replace("{profile_dir}", &self.profile_dir.to_string_lossy())
                    .replace("{server_dir}", &vars.server_dir.to_string_lossy())
            })
            .map(|arg| expand_env(&arg))
            .collect()
    }

    /// Checks every environment variable the profile needs (declared in `[needs.NAME]` or used as
    /// `{env:NAME}`): set, not empty, and naming a directory that holds the declared files.
    /// The error is one line saying which variable is missing or wrong and what it must name.
    pub fn check_needs(&self) -> Result<()> {
        let mut names: BTreeMap<String, Need> = self.needs.clone();
        for arg in self.commands().flat_map(|(_, cmd)| cmd) {
            for name in env_placeholders(arg) {
                names.entry(name.to_string()).or_default();
            }
        }
        for (name, need) in &names {
            need_dir(name, &need.what, &need.files)
                .with_context(|| format!("profile {} cannot run", self.origin))?;
        }
        Ok(())
    }

    fn commands(&self) -> impl Iterator<Item = (&'static str, &Vec<String>)> {
        [
            ("server.command", Some(&self.server.command)),
            ("client.once", Some(&self.client.once)),
            ("client.daemon", self.client.daemon.as_ref()),
        ]
        .into_iter()
        .filter_map(|(what, cmd)| cmd.map(|c| (what, c)))
    }
}

/// The directory named by environment variable `name`, which must hold `files`. Shared by profiles
/// (`[needs.NAME]`) and `cargo xtask original-suite`, so both explain a missing setting alike.
pub fn need_dir(name: &str, what: &str, files: &[String]) -> Result<PathBuf> {
    let what = if what.is_empty() {
        String::new()
    } else {
        format!(" to {what}")
    };
    let dir = match std::env::var_os(name) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => bail!("{name} is not set; set it{what}"),
    };
    for f in files {
        let path = dir.join(f);
        if !path.is_file() {
            bail!(
                "{name}={} has no {f} ({} is not a file); set it{what}",
                dir.display(),
                path.display()
            );
        }
    }
    Ok(dir)
}

/// Names `NAME` of the `{env:NAME}` placeholders in `arg`.
fn env_placeholders(arg: &str) -> impl Iterator<Item = &str> {
    arg.split("{env:")
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
}

/// Replaces each `{env:NAME}` with the variable's value (empty when unset: [`Profile::check_needs`]
/// reports that before anything runs).
fn expand_env(arg: &str) -> String {
    let mut out = arg.to_string();
    for name in env_placeholders(arg) {
        let value = std::env::var(name).unwrap_or_default();
        out = out.replace(&format!("{{env:{name}}}"), &value);
    }
    out
}

/// Rejects `{name}` placeholders that do not exist (typos). Braces around anything that is not a
/// lowercase name (`{ exit 0 }` in a Perl one-liner, say) are plain text.
fn check_placeholders(arg: &str) -> Result<()> {
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            break;
        };
        let name = &after[..close];
        let is_name = !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        if let Some(var) = name.strip_prefix("env:") {
            let valid = !var.is_empty()
                && var
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if !valid {
                bail!("{{env:{var}}}: an environment variable name is A-Z, 0-9 and _");
            }
        } else if is_name && !PLACEHOLDERS.contains(&name) {
            bail!(
                "unknown placeholder {{{name}}} (known: {})",
                PLACEHOLDERS
                    .iter()
                    .map(|p| format!("{{{p}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
                    + ", {env:NAME}"
            );
        }
        rest = after;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profile_is_valid() {
        let p = Profile::builtin(Path::new("/bin-dir")).unwrap();
        assert!(!p.fixed_ports());
        assert!(p.uses_bin_dir());
        let cmd = p.expand(
            &p.server.command,
            &Vars {
                dir: "/tmp/s".into(),
                ..Vars::default()
            },
        );
        assert_eq!(cmd[0], "/bin-dir/server-sync");
        assert!(cmd.contains(&"/tmp/s".to_string()));
    }

    #[test]
    fn shipped_profiles_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/profiles");
        let mut n = 0;
        for item in std::fs::read_dir(&dir).unwrap() {
            let path = item.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Profile::load(&path, Path::new("/bin")).unwrap();
                n += 1;
            }
        }
        assert!(n >= 2);
    }

    #[test]
    fn rejects_bad_profiles() {
        let base = |server: &str| {
            format!("name = \"x\"\n[server]\n{server}\n[client]\nonce = [\"true\"]\n")
        };
        let cases = [
            (
                base("command = [\"s\", \"{dri}\"]\nready = \"listen\"\nport = 1"),
                "unknown placeholder",
            ),
            (
                base("command = [\"s\"]\nready = \"listen\""),
                "fixed server.port",
            ),
            (
                base("command = [\"s\"]\nready = \"listening\""),
                "capture {port}",
            ),
            (base("command = []\nready = \"listen\"\nport = 7"), "empty"),
            (
                base("command = [\"{env:lower}/s\"]\nready = \"listen\"\nport = 7"),
                "environment variable name",
            ),
            (
                base("command = [\"s\"]\nready = \"listen\"\nport = 7") + "features = [\"wach\"]\n",
                "client.features: unknown feature \"wach\" (known: watch)",
            ),
            (
                base("command = [\"s\"]\nready = \"listen\"\nport = 7")
                    + "features = [\"watch\"]\n",
                "give client.daemon",
            ),
        ];
        for (text, want) in cases {
            let err = Profile::parse(&text, "t", Path::new("/"), Path::new("/")).unwrap_err();
            assert!(format!("{err:#}").contains(want), "{err:#}");
        }
    }

    #[test]
    fn features_meet_needs() {
        let ours = Profile::builtin(Path::new("/bin")).unwrap();
        assert_eq!(ours.unmet_needs(&["watch".into()]), None);
        assert_eq!(ours.unmet_needs(&[]), None);
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/profiles");
        let original = Profile::load(&dir.join("python-original.toml"), Path::new("/")).unwrap();
        let why = original.unmet_needs(&["watch".into()]).unwrap();
        assert!(why.starts_with("needs watch, which profile "), "{why}");
    }

    #[test]
    fn env_placeholders_expand_and_are_checked() {
        assert_eq!(
            env_placeholders("{env:A}/x{env:B_2}").collect::<Vec<_>>(),
            ["A", "B_2"]
        );
        // PATH is set in any test environment; its value replaces the placeholder.
        let path = std::env::var("PATH").unwrap();
        assert_eq!(expand_env("[{env:PATH}]"), format!("[{path}]"));
        let home = need_dir("PATH", "", &[]).unwrap();
        assert_eq!(home, PathBuf::from(&path));
        let err = need_dir(
            "CARGO_MANIFEST_DIR",
            "a directory with it",
            &["no-such.py".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("CARGO_MANIFEST_DIR=") && err.contains("has no no-such.py"),
            "{err}"
        );
        assert!(err.ends_with("; set it to a directory with it"), "{err}");
    }
}
