//! Failure reports and the snapshot check of a finished scenario.
//!
//! A report is written for the person who has to fix the failure without rerunning anything: the
//! step (with its line in the file), expected vs actual, the client → server diff, both trees
//! with modes and mtimes, and where the logs are.

use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use super::{
    Failure, REPORT_TREE_LIMIT, Run, indent_block, indent_tail, plural, show_path, snapshot_text,
};
use crate::scenario::{SnapshotMode, is_client};
use crate::tree::{self, Tree};

impl Run<'_> {
    pub(super) fn report_header(&self, what: &str) -> String {
        format!(
            "FAIL {} — {}\n  scenario: {}\n  {what}\n",
            self.sc.id,
            self.sc.name,
            show_path(&self.sc.file)
        )
    }

    /// The report of a failed step.
    pub(super) fn failure_report(&self, step_no: usize, f: &Failure, logs: &[PathBuf]) -> String {
        let step_text = match self.sc.steps.get(step_no.wrapping_sub(1)) {
            Some(s) => format!(
                "step {} of {} (line {}): {}",
                s.number,
                self.sc.steps.len(),
                s.line,
                s.source
            ),
            None => "setting up".to_string(),
        };
        let mut out = self.report_header(&step_text);
        let _ = writeln!(out, "  expected: {}", indent_tail(&f.expected, 12));
        let _ = writeln!(out, "  actual:   {}", indent_tail(&f.actual, 12));
        if let Some(d) = &f.detail {
            out.push_str(&indent_block(d, 2));
        }
        out.push_str(&self.report_trees_and_logs(logs, !f.has_diff));
        out
    }

    /// The client → server diff (unless the failure already showed it), every tree, the logs.
    pub(super) fn report_trees_and_logs(&self, logs: &[PathBuf], with_diff: bool) -> String {
        let mut out = String::new();
        let shown_sides = self.dirs.keys().filter(|s| {
            is_client(s)
                || *s == "server"
                // `outside` only matters when something is in it.
                || (*s == "outside"
                    && self
                        .dir(s)
                        .read_dir()
                        .is_ok_and(|mut r| r.next().is_some()))
        });
        let trees: Vec<(String, Option<Tree>)> = shown_sides
            .map(|s| (s.clone(), Tree::scan(self.dir(s)).ok()))
            .collect();
        let get = |name: &str| {
            trees
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, t)| t.as_ref())
        };
        if let (true, Some(c), Some(s)) = (with_diff, get("client"), get("server")) {
            let d = tree::diff(c, s, "client", "server", self.cfg.profile.checks.mtime);
            let _ = writeln!(
                out,
                "  diff client → server (- only in client, + only in server, ~ differs): {}",
                plural(d.len(), "difference")
            );
            for l in d.iter().take(REPORT_TREE_LIMIT) {
                let _ = writeln!(out, "    {l}");
            }
            if d.len() > REPORT_TREE_LIMIT {
                let _ = writeln!(out, "    … {} more", d.len() - REPORT_TREE_LIMIT);
            }
        }
        for (name, t) in &trees {
            match t {
                Some(t) => {
                    let _ = writeln!(
                        out,
                        "  {name} tree ({}, {}):",
                        show_path(&t.root),
                        plural(t.len(), "entry")
                    );
                    out.push_str(&indent_block(&t.render(true, REPORT_TREE_LIMIT), 4));
                }
                None => {
                    let _ = writeln!(out, "  {name} tree: cannot be read");
                }
            }
        }
        let _ = writeln!(out, "  logs:");
        for l in logs {
            let _ = writeln!(out, "    {}", show_path(l));
        }
        let sync_log = self.cfg.out_dir.join("test_sync.log");
        let _ = writeln!(out, "    {}", show_path(&sync_log));
        out
    }

    /// Compares both final trees with the stored snapshot; `Err` holds a message for the report.
    pub(super) fn check_snapshot(&self) -> Result<(), String> {
        let Some(dir) = &self.cfg.snapshot_dir else {
            return Ok(());
        };
        if !self.cfg.profile.checks.snapshots || self.sc.snapshot == SnapshotMode::None {
            return Ok(());
        }
        let text = snapshot_text(self.sc, &self.root, &self.dirs).map_err(|e| format!("{e:#}"))?;
        let name = self.sc.id.clone();
        let file = self.sc.file.clone();
        let dir = dir.clone();
        // insta reports a mismatch by panicking; one scenario's mismatch must not end the run.
        catch_unwind(AssertUnwindSafe(|| {
            let mut settings = insta::Settings::clone_current();
            settings.set_snapshot_path(dir);
            settings.set_prepend_module_to_snapshot(false);
            settings.set_omit_expression(true);
            settings.set_input_file(file);
            settings.bind(|| insta::assert_snapshot!(name, text));
        }))
        .map_err(|panic| {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!(
                "{msg}\ninsta printed the difference above. Review it with `cargo insta review`, or \
                 accept it with INSTA_UPDATE=always (see scenarios/README.md)."
            )
        })
    }
}
