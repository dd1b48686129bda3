//! Scenario files (`scenarios/NNN-short-name.toml`): parsing and validation into typed steps.
//!
//! A scenario is a list of steps; each step is a one-line TOML table whose *verb* key names the
//! action and carries its main argument (`{ write = "client:a.txt", text = "hi" }`). The format is
//! documented for scenario authors in `scenarios/README.md`; this module is its single parser, so
//! typos (unknown keys, a modifier that does not apply to a verb) are reported with the step's
//! line before anything runs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use toml::Spanned;
use toml::value::{Datetime, Offset};

use crate::fsops::Content;
use crate::pattern::Pattern;
use crate::tree::{Kind, days_from_civil};

/// Default time limit of a step that waits for something, when neither step nor scenario sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// Seconds between a client daemon's syncs when `start` sets no `interval`: the product's own
/// default, long enough that a scenario finishing sooner proves the daemon acted by itself (it
/// watched), not on its timer.
pub const DEFAULT_INTERVAL: u64 = 60;

/// A location in one of the scenario's directories, written `side:relative/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loc {
    pub side: String,
    pub path: String,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.side, self.path)
    }
}

/// The exit a process must end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    /// Any exit code, or death by a signal.
    Any,
    /// Anything but exit code 0.
    Nonzero,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Any => f.write_str("any exit"),
            Exit::Nonzero => f.write_str("a non-zero exit"),
        }
    }
}

/// Where in a log a check or a wait starts looking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Since {
    /// From the beginning of the scenario.
    Start,
    /// From the beginning of the most recent `sync` step.
    LastSync,
    /// From the beginning of this step.
    Now,
    /// From an earlier `{ mark = "NAME" }` step (checked at parse time to exist).
    Mark(String),
}

/// Things a scenario may need of an implementation beyond the basics (`needs = ["watch"]`), which
/// a profile declares it has (`[client] features = ["watch"]`). A scenario whose needs a profile
/// lacks is skipped with it, not failed. Each with what it promises, for messages and docs.
pub const FEATURES: &[(&str, &str)] = &[(
    "watch",
    "the client daemon mirrors each change as it happens (it watches its directory), and the \
     server repairs changes made to its own directory while a watching client is connected",
)];

/// Checks feature names (of a scenario's `needs` or a profile's `features`) against [`FEATURES`].
pub fn check_features(names: &[String]) -> Result<()> {
    for n in names {
        if !FEATURES.iter().any(|(f, _)| f == n) {
            bail!(
                "unknown feature {n:?} (known: {})",
                FEATURES
                    .iter()
                    .map(|(f, _)| *f)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(())
}

/// How the final trees are snapshotted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Every entry of both trees.
    #[default]
    Full,
    /// Entry counts, bytes and an MD5 of each listing (for trees of thousands of files).
    Digest,
    /// No snapshot.
    None,
}

/// What a step does.
#[derive(Clone, Debug)]
pub enum Action {
    Write {
        at: Loc,
        content: Content,
        mode: Option<u32>,
    },
    Append {
        at: Loc,
        content: Content,
        /// How many appends (1 unless `times`), the first at once and each next `every` later.
        times: u32,
        every: Duration,
    },
    Modify {
        at: Loc,
        offset: u64,
        content: Content,
    },
    Delete {
        at: Loc,
    },
    Rename {
        from: Loc,
        to: Loc,
    },
    Copy {
        from: Loc,
        to: Loc,
    },
    Mkdir {
        at: Loc,
        mode: Option<u32>,
    },
    Chmod {
        at: Loc,
        mode: u32,
    },
    Touch {
        at: Loc,
        mtime: (i64, u32),
    },
    Symlink {
        at: Loc,
        target: String,
    },
    Mkfifo {
        at: Loc,
    },
    Generate {
        at: Loc,
        files: u64,
        size: u64,
        seed: u64,
        /// All files in the directory itself, not 100 per subdirectory.
        flat: bool,
    },
    Clone {
        from: String,
        to: String,
    },
    Start {
        side: String,
        /// Seconds between a client daemon's syncs (ignored for the server).
        interval: u64,
    },
    Stop {
        side: String,
        exit: Exit,
    },
    Kill {
        side: String,
    },
    Sync {
        sides: Vec<String>,
        exit: Exit,
        background: bool,
    },
    WaitExit {
        side: String,
        exit: Exit,
    },
    Wait {
        side: String,
        pattern: Pattern,
        count: usize,
        since: Since,
    },
    WaitSync {
        side: String,
        count: usize,
    },
    /// Waits until two trees compare as `identical` does (re-compared on every output line and
    /// at least every 500 ms), failing at the timeout with the same report.
    WaitIdentical {
        a: String,
        b: String,
    },
    /// SIGSTOP to a running process, and wait until it has stopped.
    Pause {
        side: String,
    },
    /// SIGCONT to a paused process.
    Resume {
        side: String,
    },
    /// Names the present position in the logs, for `since = "NAME"` in later steps.
    Mark {
        name: String,
    },
    Exists {
        at: Loc,
        kind: Option<Kind>,
        md5: Option<String>,
        same_as: Option<String>,
        size: Option<u64>,
        mode: Option<u32>,
        mtime: Option<(i64, u32)>,
        target: Option<String>,
    },
    Absent {
        at: Loc,
    },
    Empty {
        side: String,
    },
    Identical {
        a: String,
        b: String,
    },
    Log {
        side: String,
        pattern: Pattern,
        present: bool,
        count: usize,
        since: Since,
    },
    NoTemp {
        side: String,
    },
}

/// One step of a scenario, with where it came from (for messages).
#[derive(Clone, Debug)]
pub struct Step {
    /// 1-based position in the scenario.
    pub number: usize,
    /// 1-based line in the scenario file.
    pub line: usize,
    /// The step's source text, on one line.
    pub source: String,
    pub action: Action,
    /// The step's own time limit, if it set one.
    pub timeout: Option<Duration>,
}

impl Step {
    /// Whether this step checks something (as opposed to acting).
    pub fn is_check(&self) -> bool {
        matches!(
            self.action,
            Action::Exists { .. }
                | Action::Absent { .. }
                | Action::Empty { .. }
                | Action::Identical { .. }
                | Action::Log { .. }
                | Action::NoTemp { .. }
        )
    }
}

/// A parsed scenario file.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The number from the file name (`7` for `007-…`).
    pub number: u32,
    /// The file stem, e.g. `001-add-file-on-client`.
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub file: PathBuf,
    pub timeout: Duration,
    pub snapshot: SnapshotMode,
    /// Features of [`FEATURES`] the implementation must have (`needs = ["watch"]`); with a
    /// profile that lacks one, the scenario is skipped.
    pub needs: Vec<String>,
    pub steps: Vec<Step>,
}

impl Scenario {
    /// The zero-padded number used in log file names (`test_001_server.log`).
    pub fn number_text(&self) -> String {
        format!("{:03}", self.number)
    }

    /// Whether `filter` selects this scenario: its number (`7`, `007`) or part of its file name.
    pub fn matches(&self, filter: &str) -> bool {
        if let Ok(n) = filter.parse::<u32>() {
            return n == self.number;
        }
        self.id.contains(filter)
    }

    /// Side names of client directories used anywhere in the scenario, `client` first.
    pub fn sides(&self) -> Vec<String> {
        let mut sides = vec![
            "client".to_string(),
            "server".to_string(),
            "outside".to_string(),
        ];
        for step in &self.steps {
            for s in step_sides(&step.action) {
                if !sides.contains(&s) {
                    sides.push(s);
                }
            }
        }
        sides
    }
}

fn step_sides(a: &Action) -> Vec<String> {
    match a {
        Action::Write { at, .. }
        | Action::Append { at, .. }
        | Action::Modify { at, .. }
        | Action::Delete { at }
        | Action::Mkdir { at, .. }
        | Action::Chmod { at, .. }
        | Action::Touch { at, .. }
        | Action::Symlink { at, .. }
        | Action::Mkfifo { at }
        | Action::Generate { at, .. }
        | Action::Absent { at }
        | Action::Exists { at, .. } => vec![at.side.clone()],
        Action::Rename { from, .. } | Action::Copy { from, .. } => vec![from.side.clone()],
        Action::Clone { from, to } => vec![from.clone(), to.clone()],
        Action::Sync { sides, .. } => sides.clone(),
        Action::Identical { a, b } | Action::WaitIdentical { a, b } => vec![a.clone(), b.clone()],
        Action::Mark { .. } => Vec::new(),
        Action::Pause { side } | Action::Resume { side } => vec![side.clone()],
        Action::Start { side, .. }
        | Action::Stop { side, .. }
        | Action::Kill { side }
        | Action::WaitExit { side, .. }
        | Action::Wait { side, .. }
        | Action::WaitSync { side, .. }
        | Action::Empty { side }
        | Action::Log { side, .. }
        | Action::NoTemp { side } => vec![side.clone()],
    }
}

/// Loads every `NNN-name.toml` in `dir`, sorted by number.
pub fn load_dir(dir: &Path) -> Result<Vec<Scenario>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))?;
    for item in rd {
        let path = item?.path();
        let is_scenario = path.extension().is_some_and(|e| e == "toml")
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.as_bytes().first().is_some_and(u8::is_ascii_digit));
        if is_scenario {
            out.push(load(&path)?);
        }
    }
    out.sort_by(|a, b| (a.number, &a.id).cmp(&(b.number, &b.id)));
    for pair in out.windows(2) {
        if pair[0].number == pair[1].number {
            bail!(
                "two scenarios share number {:03}: {} and {}",
                pair[0].number,
                pair[0].id,
                pair[1].id
            );
        }
    }
    Ok(out)
}

/// Loads one scenario file.
pub fn load(path: &Path) -> Result<Scenario> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    parse(path, &text).with_context(|| format!("in scenario {}", path.display()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: String,
    description: Option<String>,
    timeout: Option<f64>,
    #[serde(default)]
    snapshot: SnapshotMode,
    needs: Option<Spanned<Vec<String>>>,
    steps: Vec<Spanned<RawStep>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawExit {
    Code(i32),
    Word(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawTime {
    Seconds(i64),
    Date(Datetime),
}

/// Every key a step may hold; which ones apply depends on the verb (checked in `build`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStep {
    // verbs
    write: Option<String>,
    append: Option<String>,
    modify: Option<String>,
    delete: Option<String>,
    rename: Option<String>,
    copy: Option<String>,
    mkdir: Option<String>,
    chmod: Option<String>,
    touch: Option<String>,
    symlink: Option<String>,
    mkfifo: Option<String>,
    generate: Option<String>,
    clone: Option<String>,
    start: Option<String>,
    stop: Option<String>,
    kill: Option<String>,
    sync: Option<OneOrMany>,
    wait_exit: Option<String>,
    wait: Option<String>,
    wait_sync: Option<String>,
    wait_identical: Option<Vec<String>>,
    pause: Option<String>,
    resume: Option<String>,
    mark: Option<String>,
    exists: Option<String>,
    absent: Option<String>,
    empty: Option<String>,
    identical: Option<Vec<String>>,
    log: Option<String>,
    no_temp: Option<String>,
    // modifiers
    text: Option<String>,
    size: Option<u64>,
    seed: Option<u64>,
    at: Option<u64>,
    to: Option<String>,
    mode: Option<u32>,
    mtime: Option<RawTime>,
    target: Option<String>,
    files: Option<u64>,
    flat: Option<bool>,
    times: Option<u32>,
    every_ms: Option<u64>,
    interval: Option<u64>,
    exit: Option<RawExit>,
    background: Option<bool>,
    timeout: Option<f64>,
    line: Option<String>,
    count: Option<usize>,
    since: Option<String>,
    contains: Option<String>,
    lacks: Option<String>,
    kind: Option<Kind>,
    md5: Option<String>,
    same_as: Option<String>,
}

impl RawStep {
    fn verbs(&self) -> Vec<&'static str> {
        let present = [
            ("write", self.write.is_some()),
            ("append", self.append.is_some()),
            ("modify", self.modify.is_some()),
            ("delete", self.delete.is_some()),
            ("rename", self.rename.is_some()),
            ("copy", self.copy.is_some()),
            ("mkdir", self.mkdir.is_some()),
            ("chmod", self.chmod.is_some()),
            ("touch", self.touch.is_some()),
            ("symlink", self.symlink.is_some()),
            ("mkfifo", self.mkfifo.is_some()),
            ("generate", self.generate.is_some()),
            ("clone", self.clone.is_some()),
            ("start", self.start.is_some()),
            ("stop", self.stop.is_some()),
            ("kill", self.kill.is_some()),
            ("sync", self.sync.is_some()),
            ("wait_exit", self.wait_exit.is_some()),
            ("wait", self.wait.is_some()),
            ("wait_sync", self.wait_sync.is_some()),
            ("wait_identical", self.wait_identical.is_some()),
            ("pause", self.pause.is_some()),
            ("resume", self.resume.is_some()),
            ("mark", self.mark.is_some()),
            ("exists", self.exists.is_some()),
            ("absent", self.absent.is_some()),
            ("empty", self.empty.is_some()),
            ("identical", self.identical.is_some()),
            ("log", self.log.is_some()),
            ("no_temp", self.no_temp.is_some()),
        ];
        present
            .into_iter()
            .filter_map(|(n, p)| p.then_some(n))
            .collect()
    }

    fn modifiers(&self) -> Vec<&'static str> {
        let present = [
            ("text", self.text.is_some()),
            ("size", self.size.is_some()),
            ("seed", self.seed.is_some()),
            ("at", self.at.is_some()),
            ("to", self.to.is_some()),
            ("mode", self.mode.is_some()),
            ("mtime", self.mtime.is_some()),
            ("target", self.target.is_some()),
            ("files", self.files.is_some()),
            ("flat", self.flat.is_some()),
            ("times", self.times.is_some()),
            ("every_ms", self.every_ms.is_some()),
            ("interval", self.interval.is_some()),
            ("exit", self.exit.is_some()),
            ("background", self.background.is_some()),
            ("timeout", self.timeout.is_some()),
            ("line", self.line.is_some()),
            ("count", self.count.is_some()),
            ("since", self.since.is_some()),
            ("contains", self.contains.is_some()),
            ("lacks", self.lacks.is_some()),
            ("kind", self.kind.is_some()),
            ("md5", self.md5.is_some()),
            ("same_as", self.same_as.is_some()),
        ];
        present
            .into_iter()
            .filter_map(|(n, p)| p.then_some(n))
            .collect()
    }
}

/// Which modifiers each verb accepts.
fn allowed_modifiers(verb: &str) -> &'static [&'static str] {
    match verb {
        "write" => &["text", "size", "seed", "mode"],
        "append" => &["text", "size", "seed", "times", "every_ms"],
        "modify" => &["text", "size", "seed", "at"],
        "rename" | "copy" => &["to"],
        "mkdir" => &["mode"],
        "chmod" => &["mode"],
        "touch" => &["mtime"],
        "symlink" => &["target"],
        "generate" => &["files", "size", "seed", "flat"],
        "clone" => &["to"],
        "start" => &["interval", "timeout"],
        "stop" => &["exit", "timeout"],
        "kill" => &["timeout"],
        "sync" => &["exit", "background", "timeout"],
        "wait_exit" => &["exit", "timeout"],
        "wait" => &["line", "count", "since", "timeout"],
        "wait_sync" => &["count", "timeout"],
        "wait_identical" => &["timeout"],
        "pause" => &["timeout"],
        "exists" => &["kind", "md5", "same_as", "size", "mode", "mtime", "target"],
        "log" => &["contains", "lacks", "count", "since"],
        _ => &[],
    }
}

/// Parses scenario text; `path` gives the number, id and messages.
pub fn parse(path: &Path, text: &str) -> Result<Scenario> {
    let id = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| anyhow!("scenario file name is not UTF-8"))?
        .to_string();
    let digits: String = id.chars().take_while(char::is_ascii_digit).collect();
    if digits.len() != 3 || id.as_bytes().get(3) != Some(&b'-') {
        bail!("scenario file names are NNN-short-name.toml, not {id:?}");
    }
    let number: u32 = digits.parse()?;
    let raw: RawScenario = toml::from_str(text)?;
    let timeout = match raw.timeout {
        Some(t) => secs(t)?,
        None => DEFAULT_TIMEOUT,
    };
    let needs = match raw.needs {
        None => Vec::new(),
        Some(spanned) => {
            let line = line_of(text, spanned.span().start);
            let needs = spanned.into_inner();
            check_features(&needs).with_context(|| format!("needs (line {line})"))?;
            needs
        }
    };
    // Mark names set so far, with the step that set each (a `since` must name an earlier one).
    let mut marks: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut steps = Vec::with_capacity(raw.steps.len());
    for (i, spanned) in raw.steps.into_iter().enumerate() {
        let span = spanned.span();
        let line = line_of(text, span.start);
        let source = text[span.clone()]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let number = i + 1;
        let raw_step = spanned.into_inner();
        let step_timeout = raw_step.timeout.map(secs).transpose()?;
        let action = build(raw_step)
            .and_then(|a| check_marks(&a, &mut marks, number, line).map(|()| a))
            .with_context(|| format!("step {number} (line {line}): {source}"))?;
        steps.push(Step {
            number,
            line,
            source,
            action,
            timeout: step_timeout,
        });
    }
    if steps.is_empty() {
        bail!("a scenario needs at least one step");
    }
    Ok(Scenario {
        number,
        id,
        name: raw.name,
        description: raw.description,
        file: path.to_path_buf(),
        timeout,
        snapshot: raw.snapshot,
        needs,
        steps,
    })
}

/// The 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at].matches('\n').count() + 1
}

/// A `mark` sets a name once; a `since` names a mark an earlier step set.
fn check_marks(
    a: &Action,
    marks: &mut BTreeMap<String, (usize, usize)>,
    number: usize,
    line: usize,
) -> Result<()> {
    match a {
        Action::Mark { name } => {
            if let Some((n, l)) = marks.get(name) {
                bail!("mark {name:?} is already set by step {n} (line {l})");
            }
            marks.insert(name.clone(), (number, line));
        }
        Action::Wait {
            since: Since::Mark(name),
            ..
        }
        | Action::Log {
            since: Since::Mark(name),
            ..
        } if !marks.contains_key(name) => {
            bail!(
                "since = {name:?} names no earlier {{ mark = {name:?} }} step (`since` is \"start\", \"last-sync\", \"now\" or the name of an earlier mark)"
            );
        }
        _ => {}
    }
    Ok(())
}

fn secs(t: f64) -> Result<Duration> {
    if !(t > 0.0 && t <= 3600.0) {
        bail!("timeout must be between 0 and 3600 seconds, not {t}");
    }
    Ok(Duration::from_secs_f64(t))
}

/// Turns one raw step into its action: exactly one verb, only modifiers that verb takes, then the
/// verb's own arguments.
fn build(r: RawStep) -> Result<Action> {
    let verb = only_verb(&r)?;
    check_modifiers(&r, verb)?;
    let count = r.count.unwrap_or(1);
    if count == 0 {
        bail!("count must be at least 1");
    }
    match verb {
        "write" | "append" | "modify" | "delete" | "rename" | "copy" | "mkdir" | "chmod"
        | "touch" | "symlink" | "mkfifo" | "generate" | "clone" => build_change(verb, &r),
        "start" | "stop" | "kill" | "sync" | "wait_exit" | "wait" | "wait_sync"
        | "wait_identical" | "pause" | "resume" | "mark" => build_process(verb, &r, count),
        _ => build_check(verb, &r, count),
    }
}

/// The step's one verb.
fn only_verb(r: &RawStep) -> Result<&'static str> {
    match r.verbs().as_slice() {
        [v] => Ok(*v),
        [] => bail!("a step needs one verb (write, sync, exists, …); found none"),
        many => bail!("a step has exactly one verb; found {}", many.join(", ")),
    }
}

/// Rejects a modifier that does not belong to `verb`, naming those that do.
fn check_modifiers(r: &RawStep, verb: &str) -> Result<()> {
    let allowed = allowed_modifiers(verb);
    for m in r.modifiers() {
        if !allowed.contains(&m) {
            bail!(
                "`{m}` does not apply to `{verb}` (it takes: {})",
                if allowed.is_empty() {
                    "nothing else".to_string()
                } else {
                    allowed.join(", ")
                }
            );
        }
    }
    Ok(())
}

impl RawStep {
    /// File content: `text`, or `size` (and optionally `seed`) generated bytes.
    fn content(&self) -> Result<Content> {
        match (&self.text, self.size, self.seed) {
            (Some(t), None, None) => Ok(Content::Text(t.clone())),
            (None, Some(size), seed) => Ok(Content::Generated {
                size,
                seed: seed.unwrap_or(0),
            }),
            _ => bail!("give either `text`, or `size` (and optionally `seed`)"),
        }
    }

    /// The expected exit: `exit = N`, `"any"` or `"nonzero"`; `default` when not given.
    fn exit(&self, default: Exit) -> Result<Exit> {
        match &self.exit {
            None => Ok(default),
            Some(RawExit::Code(c)) => Ok(Exit::Code(*c)),
            Some(RawExit::Word(w)) if w == "any" => Ok(Exit::Any),
            Some(RawExit::Word(w)) if w == "nonzero" => Ok(Exit::Nonzero),
            Some(RawExit::Word(w)) => bail!("exit is a number, \"any\" or \"nonzero\", not {w:?}"),
        }
    }

    /// Where a log search starts (`since`), which must be one of `allowed` for this verb. Any
    /// other word names a mark; [`parse`] checks that an earlier step set it.
    fn since(&self, allowed: &[Since]) -> Result<Since> {
        let s = match self.since.as_deref() {
            None | Some("start") => Since::Start,
            Some("last-sync") => Since::LastSync,
            Some("now") => Since::Now,
            Some(name) => Since::Mark(mark_name(name)?),
        };
        if !matches!(s, Since::Mark(_)) && !allowed.contains(&s) {
            bail!(
                "since = {:?} does not apply here",
                self.since.as_deref().unwrap_or("")
            );
        }
        Ok(s)
    }

    /// `times` appends `every_ms` apart (one, at once, without them).
    fn repetition(&self) -> Result<(u32, Duration)> {
        let times = self.times.unwrap_or(1);
        if times == 0 {
            bail!("times must be at least 1");
        }
        let every = match (times, self.every_ms) {
            (1, None) => Duration::ZERO,
            (1, Some(_)) => bail!("`every_ms` needs `times` (2 or more)"),
            (_, None) => bail!("`times` needs `every_ms`, the time between two appends"),
            (_, Some(ms)) => Duration::from_millis(ms),
        };
        // Appends spread over more than an hour are a typo, not a scenario.
        if every * (times - 1) > Duration::from_secs(3600) {
            bail!("times × every_ms must stay within an hour");
        }
        Ok((times, every))
    }
}

/// A mark's name: a word of letters, digits, `-` and `_`, and not one of the words `since` has
/// for itself.
fn mark_name(name: &str) -> Result<String> {
    if matches!(name, "start" | "last-sync" | "now") {
        bail!("{name:?} is a word of `since` itself; name the mark otherwise");
    }
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        bail!(
            "a mark is named with letters, digits, - and _, not {name:?} (`since` is \"start\", \"last-sync\", \"now\" or the name of an earlier mark)"
        );
    }
    Ok(name.to_string())
}

/// Steps that change a side's files.
fn build_change(verb: &str, r: &RawStep) -> Result<Action> {
    Ok(match verb {
        "write" => Action::Write {
            at: loc(r.write.as_deref())?,
            content: r.content()?,
            mode: r.mode,
        },
        "append" => {
            let (times, every) = r.repetition()?;
            Action::Append {
                at: loc(r.append.as_deref())?,
                content: r.content()?,
                times,
                every,
            }
        }
        "modify" => Action::Modify {
            at: loc(r.modify.as_deref())?,
            offset: r.at.unwrap_or(0),
            content: r.content()?,
        },
        "delete" => Action::Delete {
            at: loc(r.delete.as_deref())?,
        },
        "rename" | "copy" => build_rename_or_copy(verb, r)?,
        "mkdir" => Action::Mkdir {
            at: loc(r.mkdir.as_deref())?,
            mode: r.mode,
        },
        "chmod" => Action::Chmod {
            at: loc(r.chmod.as_deref())?,
            mode: r
                .mode
                .ok_or_else(|| anyhow!("`chmod` needs `mode`, e.g. mode = 0o600"))?,
        },
        "touch" => Action::Touch {
            at: loc(r.touch.as_deref())?,
            mtime: time(
                r.mtime
                    .as_ref()
                    .ok_or_else(|| anyhow!("`touch` needs `mtime`"))?,
            )?,
        },
        "symlink" => Action::Symlink {
            at: loc(r.symlink.as_deref())?,
            target: r
                .target
                .clone()
                .ok_or_else(|| anyhow!("`symlink` needs `target`"))?,
        },
        "mkfifo" => Action::Mkfifo {
            at: loc(r.mkfifo.as_deref())?,
        },
        "generate" => Action::Generate {
            at: loc(r.generate.as_deref())?,
            files: r.files.ok_or_else(|| anyhow!("`generate` needs `files`"))?,
            size: r.size.ok_or_else(|| anyhow!("`generate` needs `size`"))?,
            seed: r.seed.unwrap_or(0),
            flat: r.flat.unwrap_or(false),
        },
        "clone" => {
            let from = side(r.clone.as_deref(), &[SideKind::Client])?;
            let to = side(r.to.as_deref(), &[SideKind::Client])?;
            Action::Clone { from, to }
        }
        other => unreachable!("{other} is not a change step"),
    })
}

/// `rename` and `copy`: from a location to a path on the same side.
fn build_rename_or_copy(verb: &str, r: &RawStep) -> Result<Action> {
    let from = loc(r.rename.as_deref().or(r.copy.as_deref()))?;
    let to = Loc {
        side: from.side.clone(),
        path: rel_path(
            r.to.as_deref()
                .ok_or_else(|| anyhow!("`{verb}` needs `to`"))?,
        )?,
    };
    Ok(if verb == "rename" {
        Action::Rename { from, to }
    } else {
        Action::Copy { from, to }
    })
}

/// Steps that start, stop or wait for processes.
fn build_process(verb: &str, r: &RawStep, count: usize) -> Result<Action> {
    let any_process = &[SideKind::Server, SideKind::Client];
    Ok(match verb {
        "start" => {
            let side = side(r.start.as_deref(), any_process)?;
            if side == "server" && r.interval.is_some() {
                bail!("`interval` applies to a client daemon, not the server");
            }
            let interval = r.interval.unwrap_or(DEFAULT_INTERVAL);
            if interval == 0 {
                bail!("interval must be at least 1 second");
            }
            Action::Start { side, interval }
        }
        "stop" => Action::Stop {
            side: side(r.stop.as_deref(), any_process)?,
            exit: r.exit(Exit::Code(0))?,
        },
        "kill" => Action::Kill {
            side: side(r.kill.as_deref(), any_process)?,
        },
        "sync" => build_sync(r)?,
        "wait_exit" => Action::WaitExit {
            side: side(r.wait_exit.as_deref(), any_process)?,
            exit: r.exit(Exit::Code(0))?,
        },
        "wait" => Action::Wait {
            side: side(r.wait.as_deref(), any_process)?,
            pattern: Pattern::new(
                r.line
                    .as_deref()
                    .ok_or_else(|| anyhow!("`wait` needs `line`"))?,
            )?,
            count,
            since: r.since(&[Since::Start, Since::Now, Since::LastSync])?,
        },
        "wait_sync" => Action::WaitSync {
            side: side(r.wait_sync.as_deref(), &[SideKind::Client])?,
            count,
        },
        "wait_identical" => {
            let (a, b) = two_sides(r.wait_identical.as_deref(), "wait_identical")?;
            Action::WaitIdentical { a, b }
        }
        "pause" => Action::Pause {
            side: side(r.pause.as_deref(), any_process)?,
        },
        "resume" => Action::Resume {
            side: side(r.resume.as_deref(), any_process)?,
        },
        "mark" => Action::Mark {
            name: mark_name(r.mark.as_deref().unwrap_or_default())?,
        },
        other => unreachable!("{other} is not a process step"),
    })
}

/// `sync`: one client or a list of them, at once.
fn build_sync(r: &RawStep) -> Result<Action> {
    let names = match r.sync.as_ref() {
        Some(OneOrMany::One(s)) => vec![s.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
        None => unreachable!("verb present"),
    };
    if names.is_empty() {
        bail!("`sync` needs at least one client");
    }
    let sides = names
        .iter()
        .map(|n| side(Some(n), &[SideKind::Client]))
        .collect::<Result<Vec<_>>>()?;
    Ok(Action::Sync {
        sides,
        exit: r.exit(Exit::Code(0))?,
        background: r.background.unwrap_or(false),
    })
}

/// Steps that check trees and logs.
fn build_check(verb: &str, r: &RawStep, count: usize) -> Result<Action> {
    let any_side = &[SideKind::Server, SideKind::Client, SideKind::Outside];
    Ok(match verb {
        "exists" => {
            let at = loc(r.exists.as_deref())?;
            if let Some(other) = &r.same_as {
                side(Some(other), any_side)?;
            }
            Action::Exists {
                at,
                kind: r.kind,
                md5: r.md5.clone(),
                same_as: r.same_as.clone(),
                size: r.size,
                mode: r.mode,
                mtime: r.mtime.as_ref().map(time).transpose()?,
                target: r.target.clone(),
            }
        }
        "absent" => Action::Absent {
            at: loc(r.absent.as_deref())?,
        },
        "empty" => Action::Empty {
            side: side(r.empty.as_deref(), any_side)?,
        },
        "identical" => {
            let (a, b) = two_sides(r.identical.as_deref(), "identical")?;
            Action::Identical { a, b }
        }
        "log" => build_log(r, count)?,
        "no_temp" => Action::NoTemp {
            side: side(r.no_temp.as_deref(), &[SideKind::Server, SideKind::Client])?,
        },
        other => unreachable!("verb {other} has no builder"),
    })
}

/// `log`: a pattern that must (`contains`) or must not (`lacks`) be in a side's output.
fn build_log(r: &RawStep, count: usize) -> Result<Action> {
    let (text, present) = match (&r.contains, &r.lacks) {
        (Some(t), None) => (t, true),
        (None, Some(t)) => (t, false),
        _ => bail!("`log` needs exactly one of `contains` or `lacks`"),
    };
    if !present && r.count.is_some() {
        bail!("`count` applies to `contains` only");
    }
    Ok(Action::Log {
        side: side(r.log.as_deref(), &[SideKind::Server, SideKind::Client])?,
        pattern: Pattern::new(text)?,
        present,
        count,
        since: r.since(&[Since::Start, Since::LastSync])?,
    })
}

/// The two sides `identical` and `wait_identical` compare.
fn two_sides(v: Option<&[String]>, verb: &str) -> Result<(String, String)> {
    let any_side = &[SideKind::Server, SideKind::Client, SideKind::Outside];
    match v {
        Some([a, b]) => Ok((side(Some(a), any_side)?, side(Some(b), any_side)?)),
        _ => bail!("`{verb}` takes two sides, e.g. {verb} = [\"client\", \"server\"]"),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SideKind {
    Server,
    Client,
    Outside,
}

/// The kind of a side name: `server`, `outside`, or a client (`client`, `client2`, `client-b`…).
fn side_kind(name: &str) -> Option<SideKind> {
    match name {
        "server" => Some(SideKind::Server),
        "outside" => Some(SideKind::Outside),
        n if n.starts_with("client")
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
        {
            Some(SideKind::Client)
        }
        _ => None,
    }
}

/// Whether a side name is a client directory.
pub fn is_client(name: &str) -> bool {
    side_kind(name) == Some(SideKind::Client)
}

fn side(name: Option<&str>, allowed: &[SideKind]) -> Result<String> {
    let name = name.ok_or_else(|| anyhow!("missing side"))?;
    match side_kind(name) {
        Some(k) if allowed.contains(&k) => Ok(name.to_string()),
        Some(_) => bail!("side {name:?} cannot be used here"),
        None => bail!("unknown side {name:?}: use server, client (client2, …) or outside"),
    }
}

fn loc(text: Option<&str>) -> Result<Loc> {
    let text = text.ok_or_else(|| anyhow!("missing location"))?;
    let (s, p) = text
        .split_once(':')
        .ok_or_else(|| anyhow!("a location is side:path, e.g. \"client:a.txt\", not {text:?}"))?;
    Ok(Loc {
        side: side(
            Some(s),
            &[SideKind::Server, SideKind::Client, SideKind::Outside],
        )?,
        path: rel_path(p)?,
    })
}

/// A relative path that stays inside its side's directory.
fn rel_path(p: &str) -> Result<String> {
    let p = p.trim_end_matches('/');
    if p.is_empty() || p.starts_with('/') || p.contains('\0') {
        bail!("path {p:?} must be relative and non-empty");
    }
    if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        bail!("path {p:?} must not contain empty, `.` or `..` components");
    }
    Ok(p.to_string())
}

fn time(t: &RawTime) -> Result<(i64, u32)> {
    match t {
        RawTime::Seconds(s) => Ok((*s, 0)),
        RawTime::Date(dt) => {
            let (Some(date), Some(tm)) = (dt.date, dt.time) else {
                bail!("mtime needs a date and a time, e.g. 2001-09-09T01:46:40Z");
            };
            let offset_minutes = match dt.offset {
                None | Some(Offset::Z) => 0,
                Some(Offset::Custom { minutes }) => i64::from(minutes),
            };
            let days = days_from_civil(i64::from(date.year), date.month.into(), date.day.into());
            let secs = days * 86_400
                + i64::from(tm.hour) * 3600
                + i64::from(tm.minute) * 60
                + i64::from(tm.second.unwrap_or(0))
                - offset_minutes * 60;
            Ok((secs, tm.nanosecond.unwrap_or(0)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Scenario> {
        parse(Path::new("scenarios/042-test.toml"), text)
    }

    #[test]
    fn parses_steps_with_lines_and_sources() {
        let s = parse_str(
            r#"
name = "demo"
steps = [
  { start = "server" },
  { write = "client:a b/ü.txt", text = "hi\n", mode = 0o600 },
  { sync = ["client", "client2"], exit = "any" },
  { touch = "client:a", mtime = 2001-09-09T01:46:40.5Z },
  { log = "server", lacks = "Requesting file", since = "last-sync" },
]
"#,
        )
        .unwrap();
        assert_eq!(s.number, 42);
        assert_eq!(s.steps.len(), 5);
        assert_eq!(s.steps[1].line, 5);
        assert_eq!(
            s.steps[1].source,
            r#"{ write = "client:a b/ü.txt", text = "hi\n", mode = 0o600 }"#
        );
        match &s.steps[3].action {
            Action::Touch { mtime, .. } => assert_eq!(*mtime, (1_000_000_000, 500_000_000)),
            a => panic!("{a:?}"),
        }
        assert_eq!(s.sides(), ["client", "server", "outside", "client2"]);
    }

    #[test]
    fn rejects_mistakes_with_the_step() {
        let cases = [
            (r#"{ wirte = "client:a" }"#, "unknown field"),
            (r#"{ write = "client:a" }"#, "either `text`"),
            (
                r#"{ write = "client:a", text = "", line = "x" }"#,
                "`line` does not apply",
            ),
            (
                r#"{ write = "client:../a", text = "" }"#,
                "must not contain",
            ),
            (r#"{ write = "/etc/passwd", text = "" }"#, "side:path"),
            (r#"{ write = "nowhere:a", text = "" }"#, "unknown side"),
            (
                r#"{ delete = "client:a", sync = "client" }"#,
                "exactly one verb",
            ),
            (r#"{ sync = "server" }"#, "cannot be used here"),
            (
                r#"{ log = "server", contains = "a", lacks = "b" }"#,
                "exactly one of",
            ),
        ];
        for (step, want) in cases {
            let err = parse_str(&format!("name = \"x\"\nsteps = [ {step} ]\n")).unwrap_err();
            let msg = format!("{err:#}");
            assert!(msg.contains(want), "{step}: {msg}");
        }
    }

    #[test]
    fn parses_the_steps_for_a_watching_daemon() {
        let s = parse_str(
            r#"
name = "watch"
needs = ["watch"]
steps = [
  { start = "client" },
  { mark = "before-rename" },
  { append = "client:f.txt", text = "x\n", times = 5, every_ms = 400 },
  { append = "client:g.txt", text = "y" },
  { pause = "client" },
  { resume = "client" },
  { wait_identical = ["client", "server"], timeout = 90 },
  { log = "server", lacks = "Requesting file", since = "before-rename" },
  { wait = "client", line = "overflow", since = "before-rename" },
]
"#,
        )
        .unwrap();
        assert_eq!(s.needs, ["watch"]);
        let actions: Vec<&Action> = s.steps.iter().map(|s| &s.action).collect();
        assert!(matches!(actions[0], Action::Start { interval: 60, .. }));
        match actions[2] {
            Action::Append { times, every, .. } => {
                assert_eq!((*times, *every), (5, Duration::from_millis(400)));
            }
            a => panic!("{a:?}"),
        }
        assert!(matches!(actions[3], Action::Append { times: 1, .. }));
        assert!(
            matches!(actions[6], Action::WaitIdentical { a, b } if a == "client" && b == "server")
        );
        assert_eq!(s.steps[6].timeout, Some(Duration::from_secs(90)));
        assert!(
            matches!(actions[7], Action::Log { since: Since::Mark(m), .. } if m == "before-rename")
        );
        assert!(matches!(
            actions[8],
            Action::Wait {
                since: Since::Mark(_),
                ..
            }
        ));
        // A scenario without `needs` needs nothing.
        let plain = parse_str("name = \"x\"\nsteps = [ { start = \"server\" } ]\n").unwrap();
        assert!(plain.needs.is_empty());
    }

    /// Mistakes in the new keys are reported with the step (or key) and its line.
    #[test]
    fn rejects_mistakes_in_the_watch_steps_with_their_line() {
        let cases = [
            (
                r#"{ append = "client:a", text = "x", times = 3 }"#,
                "step 2 (line 4): { append = \"client:a\", text = \"x\", times = 3 }: `times` needs `every_ms`",
            ),
            (
                r#"{ append = "client:a", text = "x", every_ms = 3 }"#,
                "`every_ms` needs `times`",
            ),
            (
                r#"{ append = "client:a", text = "x", times = 0, every_ms = 3 }"#,
                "times must be at least 1",
            ),
            (
                r#"{ write = "client:a", text = "x", times = 2 }"#,
                "`times` does not apply to `write`",
            ),
            (
                r#"{ wait_identical = ["client"] }"#,
                "`wait_identical` takes two sides",
            ),
            (
                r#"{ wait_identical = ["client", "server"], count = 2 }"#,
                "`count` does not apply to `wait_identical`",
            ),
            (r#"{ pause = "outside" }"#, "cannot be used here"),
            (
                r#"{ resume = "client", timeout = 3 }"#,
                "`timeout` does not apply to `resume`",
            ),
            (r#"{ mark = "now" }"#, "a word of `since` itself"),
            (r#"{ mark = "a b" }"#, "a mark is named with letters"),
            (
                r#"{ log = "server", contains = "x", since = "nowhere" }"#,
                "step 2 (line 4): { log = \"server\", contains = \"x\", since = \"nowhere\" }: since = \"nowhere\" names no earlier { mark = \"nowhere\" } step",
            ),
            (
                r#"{ start = "server", interval = 1 }"#,
                "`interval` applies to a client daemon",
            ),
            (
                r#"{ start = "client", interval = 0 }"#,
                "interval must be at least 1",
            ),
        ];
        for (step, want) in cases {
            let text = format!("name = \"x\"\nsteps = [\n  {{ mark = \"m\" }},\n  {step},\n]\n");
            let err = parse_str(&text).unwrap_err();
            let msg = format!("{err:#}");
            assert!(msg.contains(want), "{step}: {msg}");
        }
        // A mark is set once; a `since` must not name a later one.
        let twice = "name = \"x\"\nsteps = [\n  { mark = \"m\" },\n  { mark = \"m\" },\n]\n";
        let msg = format!("{:#}", parse_str(twice).unwrap_err());
        assert!(
            msg.contains(
                "step 2 (line 4): { mark = \"m\" }: mark \"m\" is already set by step 1 (line 3)"
            ),
            "{msg}"
        );
        let later = "name = \"x\"\nsteps = [\n  { log = \"server\", lacks = \"x\", since = \"m\" },\n  { mark = \"m\" },\n]\n";
        let msg = format!("{:#}", parse_str(later).unwrap_err());
        assert!(
            msg.contains("step 1 (line 3)") && msg.contains("names no earlier"),
            "{msg}"
        );
        // An unknown feature in `needs`, with the key's line.
        let needs = "name = \"x\"\n\nneeds = [\"wach\"]\nsteps = [ { mark = \"m\" } ]\n";
        let msg = format!("{:#}", parse_str(needs).unwrap_err());
        assert!(
            msg.contains("needs (line 3): unknown feature \"wach\" (known: watch)"),
            "{msg}"
        );
    }
}
