//! Steps for scenarios of a daemon that mirrors changes as they happen: `wait_identical` (wait
//! until two trees match), `pause` and `resume` (SIGSTOP / SIGCONT a running process).
//!
//! A watching daemon prints nothing a scenario could wait for that means "the mirror has caught
//! up" (a burst of changes may take several batches, a repair on the server none on the client),
//! so `wait_identical` waits for the trees themselves: compared whenever some process prints a
//! line (output is what accompanies a change), and at least every [`RECHECK`] for a change that
//! prints nothing.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use rustix::process::Signal;

use super::{Failure, POLL, Run, StepResult, fail, fmt_ms};
use crate::netstat;
use crate::scenario::Step;
use crate::tree::{self, Tree};

/// The longest `wait_identical` goes without comparing the trees again when nothing prints.
const RECHECK: Duration = Duration::from_millis(500);

impl Run<'_> {
    /// Waits until the trees of `a` and `b` are identical (as the `identical` check sees them),
    /// and fails at the step's timeout with the report `identical` gives.
    pub(super) fn wait_identical(&self, step: &Step, a: &str, b: &str) -> StepResult {
        let limit = step.timeout.unwrap_or(self.sc.timeout);
        let started = Instant::now();
        let deadline = started + limit;
        let mut compares = 0usize;
        loop {
            // Taken before comparing: a line printed while the trees are read counts as news.
            let seen = self.hub.changes();
            let t = Instant::now();
            compares += 1;
            if self.stats_match(a, b) {
                // The cheap look saw no difference; only the full comparison (content too) decides.
                if let Ok(n) = self.check_identical(a, b) {
                    return Ok(format!(
                        "{n} after {} ({compares} comparison(s))",
                        fmt_ms(started.elapsed())
                    ));
                }
            }
            let took = t.elapsed();
            let now = Instant::now();
            if now >= deadline {
                return self.identical_at_the_end(a, b, compares, |f| {
                    f.expected = format!("{a} and {b} trees identical within {}", fmt_ms(limit));
                });
            }
            if self.hub.active().is_empty() {
                // No process runs (or every one is paused): nothing will change the trees now.
                return self.identical_at_the_end(a, b, compares, |f| {
                    f.actual = format!(
                        "{}, and no process is left running (or each is paused) to change them",
                        f.actual
                    );
                });
            }
            self.hub.wait_change(seen, deadline.min(now + RECHECK));
            // A comparison of thousands of files takes a while, and a sync prints a line per
            // file: comparing again at once after each line would keep a core busy that the
            // daemon under test needs (CI machines have two). Waiting as long as the comparison
            // took keeps the harness to at most half a core, and costs a small tree nothing.
            let rest = (t + took * 2).min(deadline);
            let now = Instant::now();
            if rest > now {
                std::thread::sleep(rest - now);
            }
        }
    }

    /// Whether two trees match in everything but file content (which this does not read).
    /// A tree that cannot be read (an entry vanished while it was listed, as happens during a
    /// sync) does not match.
    fn stats_match(&self, a: &str, b: &str) -> bool {
        let (Ok(ta), Ok(tb)) = (Tree::scan_stat(self.dir(a)), Tree::scan_stat(self.dir(b))) else {
            return false;
        };
        tree::diff(&ta, &tb, a, b, self.cfg.profile.checks.mtime).is_empty()
    }

    /// A last, full comparison when waiting longer is pointless: it passes if the trees have
    /// just become identical, and otherwise fails with `identical`'s report, reworded by `edit`.
    fn identical_at_the_end(
        &self,
        a: &str,
        b: &str,
        compares: usize,
        edit: impl FnOnce(&mut Failure),
    ) -> StepResult {
        match self.check_identical(a, b) {
            Ok(n) => Ok(format!(
                "{n}, at the last of {} comparison(s)",
                compares + 1
            )),
            Err(mut f) => {
                f.actual = format!("{} after {compares} comparison(s)", f.actual);
                edit(&mut f);
                Err(f)
            }
        }
    }

    /// SIGSTOP to the running process of `side`, then waits until every thread of it has
    /// stopped (the signal takes effect asynchronously; a scenario that piles changes up behind
    /// a paused daemon must not start before it is).
    pub(super) fn pause(&self, step: &Step, side: &str) -> StepResult {
        let id = self.running_proc_of(side)?;
        if self.hub.is_paused(id) {
            return Err(anyhow!("{} is already paused", self.hub.name(id)).into());
        }
        let pid = self.hub.pid(id);
        if !self.hub.signal(id, Signal::STOP) {
            return Err(fail(format!("{side} running"), "it had already ended"));
        }
        let deadline = self.deadline(step);
        loop {
            match netstat::stopped(pid).map_err(anyhow::Error::from)? {
                Some(true) => return Ok(format!("{} stopped", self.hub.name(id))),
                None => {
                    let f = fail(format!("{side} stopped"), "it ended instead");
                    return Err(self.with_output(f, id));
                }
                Some(false) if Instant::now() >= deadline => {
                    return Err(fail(
                        format!("{side} stopped by SIGSTOP"),
                        "still running at the timeout",
                    ));
                }
                // /proc offers no event for a thread stopping.
                Some(false) => std::thread::sleep(POLL),
            }
        }
    }

    /// SIGCONT to the paused process of `side`.
    pub(super) fn resume(&self, side: &str) -> StepResult {
        let id = self.running_proc_of(side)?;
        if !self.hub.is_paused(id) {
            return Err(anyhow!("{} is not paused", self.hub.name(id)).into());
        }
        if !self.hub.signal(id, Signal::CONT) {
            return Err(fail(format!("{side} paused"), "it had already ended"));
        }
        Ok(format!("{} continued", self.hub.name(id)))
    }

    /// The one running process of a side: the server, or a client's daemon or background sync.
    fn running_proc_of(&self, side: &str) -> Result<usize, Failure> {
        self.live_procs_of(side)
            .into_iter()
            .find(|&id| self.hub.exit_of(id).is_none())
            .ok_or_else(|| anyhow!("nothing of {side} is running").into())
    }
}
