//! The checking steps of a scenario: `exists`, `absent`, `empty`, `identical`, `log`, `no_temp`.
//!
//! Each check either passes with a short note for the run log, or fails with what was expected,
//! what was found, and the detail that explains it (a tree diff, the log lines in question).

use std::time::Instant;

use super::{Failure, LOG_SETTLE, REPORT_TREE_LIMIT, Run, StepResult, fail, plural};
use crate::pattern::Pattern;
use crate::process::Line;
use crate::scenario::{Action, Loc, Since, Step};
use crate::tree::{self, Entry, Kind, MtimePrecision, Tree, entry_at, format_time, render_entry};

/// What an `exists` step asks of the entry, beyond existing.
struct Expect<'a> {
    kind: Option<Kind>,
    md5: Option<&'a str>,
    same_as: Option<&'a str>,
    size: Option<u64>,
    mode: Option<u32>,
    mtime: Option<(i64, u32)>,
    target: Option<&'a str>,
}

impl Run<'_> {
    pub(super) fn check(&mut self, step: &Step) -> StepResult {
        match &step.action {
            Action::Exists {
                at,
                kind,
                md5,
                same_as,
                size,
                mode,
                mtime,
                target,
            } => self.check_exists(
                at,
                &Expect {
                    kind: *kind,
                    md5: md5.as_deref(),
                    same_as: same_as.as_deref(),
                    size: *size,
                    mode: *mode,
                    mtime: *mtime,
                    target: target.as_deref(),
                },
            ),
            Action::Absent { at } => match entry_at(&self.path(at), &at.path) {
                Err(_) => Ok(String::new()),
                Ok(e) => Err(fail(
                    format!("{at} absent"),
                    format!("it exists: {}", render_entry(&e, false)),
                )),
            },
            Action::Empty { side } => self.check_empty(side),
            Action::Identical { a, b } => self.check_identical(a, b),
            Action::Log {
                side,
                pattern,
                present,
                count,
                since,
            } => {
                if !self.cfg.profile.checks.logs {
                    self.skipped += 1;
                    return Ok("skipped: the profile turns log checks off".into());
                }
                if *present {
                    self.check_log_contains(step, side, pattern, *count, since)
                } else {
                    self.check_log_lacks(side, pattern, since)
                }
            }
            Action::NoTemp { side } => self.check_no_temp(side),
            other => unreachable!("not a check: {other:?}"),
        }
    }

    fn check_empty(&self, side: &str) -> StepResult {
        let t = Tree::scan(self.dir(side))?;
        if t.is_empty() {
            Ok(String::new())
        } else {
            Err(fail(
                format!("{side} directory empty"),
                format!(
                    "{}:\n{}",
                    plural(t.len(), "entry"),
                    t.render(true, REPORT_TREE_LIMIT)
                ),
            ))
        }
    }

    /// Two sides' trees compared entry by entry (mtimes as precisely as the profile says).
    pub(super) fn check_identical(&self, a: &str, b: &str) -> StepResult {
        let (ta, tb) = (Tree::scan(self.dir(a))?, Tree::scan(self.dir(b))?);
        let d = tree::diff(&ta, &tb, a, b, self.cfg.profile.checks.mtime);
        if d.is_empty() {
            return Ok(plural(ta.len(), "entry"));
        }
        let lines: Vec<String> = d.iter().map(|l| format!("  {l}")).collect();
        Err(Failure {
            expected: format!("{a} and {b} trees identical"),
            actual: plural(d.len(), "difference"),
            detail: Some(format!(
                "diff {a} → {b} (- only in {a}, + only in {b}, ~ differs):\n{}",
                lines.join("\n")
            )),
            has_diff: a == "client" && b == "server",
        })
    }

    /// No file named with the profile's temporary marker (skipped when it names none).
    fn check_no_temp(&mut self, side: &str) -> StepResult {
        let Some(marker) = self.cfg.profile.checks.temp_marker.clone() else {
            self.skipped += 1;
            return Ok("skipped: the profile names no temp_marker".into());
        };
        let found = Tree::scan(self.dir(side))?.temp_files(&marker);
        if found.is_empty() {
            Ok(String::new())
        } else {
            Err(fail(
                format!("no {marker}* files under {side}"),
                found.join(", "),
            ))
        }
    }

    fn check_exists(&self, at: &Loc, want: &Expect<'_>) -> StepResult {
        let Ok(e) = entry_at(&self.path(at), &at.path) else {
            return Err(fail(format!("{at} exists"), "it does not exist"));
        };
        let mut problems = Vec::new();
        if let Some(k) = want.kind.filter(|k| *k != e.kind) {
            problems.push(format!("kind {} (expected {})", e.kind.name(), k.name()));
        }
        if let Some(m) = want.md5.filter(|m| e.md5.as_deref() != Some(*m)) {
            problems.push(format!(
                "md5 {} (expected {m})",
                e.md5.as_deref().unwrap_or("-")
            ));
        }
        if let Some(s) = want.size.filter(|s| *s != e.size) {
            problems.push(format!("size {} (expected {s})", e.size));
        }
        if let Some(m) = want.mode.filter(|m| *m != e.mode) {
            problems.push(format!("mode {:04o} (expected {m:04o})", e.mode));
        }
        if let Some(t) = want.mtime {
            let same = match self.cfg.profile.checks.mtime {
                MtimePrecision::Ns => e.mtime == t,
                MtimePrecision::Second => e.mtime.0 == t.0,
                MtimePrecision::Ignore => true,
            };
            if !same {
                problems.push(format!(
                    "mtime {} (expected {})",
                    format_time(e.mtime.0, e.mtime.1),
                    format_time(t.0, t.1)
                ));
            }
        }
        if let Some(t) = want.target {
            let t = t.replace("{outside}", &self.dir("outside").to_string_lossy());
            if e.target.as_deref() != Some(t.as_str()) {
                problems.push(format!(
                    "target {} (expected {t})",
                    e.target.as_deref().unwrap_or("- (not a symlink)")
                ));
            }
        }
        if let Some(other) = want.same_as {
            problems.extend(self.same_as(at, &e, other));
        }
        if problems.is_empty() {
            let shown = render_entry(&e, false);
            Ok(shown
                .split_whitespace()
                .take(4)
                .collect::<Vec<_>>()
                .join(" "))
        } else {
            Err(fail(
                format!("{at} exists as described"),
                problems.join("; "),
            ))
        }
    }

    /// Compares an entry with the one at the same path on `other` (kind, content, target).
    fn same_as(&self, at: &Loc, e: &Entry, other: &str) -> Option<String> {
        let op = self.dir(other).join(&at.path);
        match entry_at(&op, &at.path) {
            Err(_) => Some(format!(
                "{other}:{} does not exist to compare with",
                at.path
            )),
            Ok(o) if o.kind != e.kind || o.md5 != e.md5 || o.target != e.target => Some(format!(
                "content differs from {other}:{}:\n{at}: {}\n{other}: {}",
                at.path,
                render_entry(e, false),
                render_entry(&o, false)
            )),
            Ok(_) => None,
        }
    }

    fn check_log_contains(
        &self,
        step: &Step,
        side: &str,
        pattern: &Pattern,
        count: usize,
        since: &Since,
    ) -> StepResult {
        let from = self.mark(since);
        let owned = side.to_string();
        let which = move |l: &Line| l.side == owned;
        // A line may still be in a pipe when a check follows a step at once: wait a little for it
        // (this returns the moment it arrives; only a failing check waits the whole time).
        let deadline = Instant::now() + LOG_SETTLE.min(step.timeout.unwrap_or(LOG_SETTLE));
        if self
            .hub
            .wait_line(&which, pattern, from, count, &[], deadline)
            .is_ok()
        {
            return Ok(String::new());
        }
        let lines = self.hub.lines(from, &which);
        let n = lines.iter().filter(|l| pattern.is_match(&l.text)).count();
        let shown: Vec<String> = lines
            .iter()
            .rev()
            .take(30)
            .rev()
            .map(|l| format!("  | {}", l.text))
            .collect();
        Err(Failure {
            expected: format!(
                "{} matching {:?} in the {side} log{}",
                plural(count, "line"),
                pattern.source(),
                since_text(since)
            ),
            actual: format!("{n} matching line(s)"),
            detail: Some(if shown.is_empty() {
                format!("the {side} log has no lines in that range")
            } else {
                format!(
                    "{side} log (last {} of the lines searched):\n{}",
                    shown.len(),
                    shown.join("\n")
                )
            }),
            has_diff: false,
        })
    }

    fn check_log_lacks(&self, side: &str, pattern: &Pattern, since: &Since) -> StepResult {
        let from = self.mark(since);
        let hits: Vec<String> = self
            .hub
            .lines(from, &|l: &Line| l.side == side)
            .into_iter()
            .filter(|l| pattern.is_match(&l.text))
            .map(|l| format!("  | {}", l.text))
            .collect();
        if hits.is_empty() {
            return Ok(String::new());
        }
        Err(Failure {
            expected: format!(
                "no line matching {:?} in the {side} log{}",
                pattern.source(),
                since_text(since)
            ),
            actual: format!("{} matching line(s)", hits.len()),
            detail: Some(format!("matching lines:\n{}", hits.join("\n"))),
            has_diff: false,
        })
    }
}

fn since_text(since: &Since) -> String {
    match since {
        Since::Start => String::new(),
        Since::LastSync => " since the last sync".into(),
        Since::Now => " since the step began".into(),
        Since::Mark(name) => format!(" since mark {name:?}"),
    }
}
