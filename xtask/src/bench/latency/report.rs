//! Results of `cargo xtask bench latency`: the figures of each tool, percentiles, targets, the
//! table and `latency.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::super::report::{Machine, bytes, met, mib, table};

/// Each figure the bench measures, in the order of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    L1p50,
    L1p99,
    L2,
    L3,
    L4,
    L4Wire,
    L5CpuClient,
    L5CpuServer,
    L5RssClient,
    L5RssServer,
    /// Setup, no target: from starting the daemons to the first whole-tree match.
    Initial,
    /// Setup, no target: from then until both sides are quiet.
    Quiet,
}

/// A figure of one tool.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Got {
    /// Seconds, bytes, percent or KiB, by the measure's [`Unit`].
    Value(f64),
    /// Identical only after the step's time limit: how long it took, seconds.
    Late(f64),
    /// Not identical even long after the step's time limit.
    Timeout,
}

/// Everything one tool's part of the bench produced.
#[derive(Debug, Default)]
pub struct ToolRun {
    pub got: BTreeMap<Key, Got>,
    /// L1's latencies, seconds, in the order of the writes.
    pub l1: Vec<f64>,
    /// Why the tool's part stopped early (its later figures are missing).
    pub error: Option<String>,
    /// What the report should say besides the figures.
    pub notes: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Millis,
    Seconds,
    Bytes,
    Percent,
    Kib,
}

impl Unit {
    fn show(self, v: f64) -> String {
        match self {
            Unit::Millis => format!("{:.1} ms", v * 1e3),
            Unit::Seconds => format!("{v:.2} s"),
            Unit::Bytes => bytes(v as u64),
            Unit::Percent => format!("{v:.2} %"),
            Unit::Kib => mib(v as u64),
        }
    }
}

/// A target of ours: at most `max` (in the measure's unit) and, when `ratio` is set, at most
/// that fraction of lsyncd's figure in the same run.
#[derive(Clone, Copy, Debug)]
pub struct Goal {
    pub max: f64,
    pub ratio: Option<f64>,
}

/// One row of the report.
#[derive(Clone, Debug)]
pub struct Measure {
    pub key: Key,
    pub label: String,
    pub unit: Unit,
    pub goal: Option<Goal>,
    /// The target as the report words it.
    pub target: String,
}

/// The `p`th percentile (0 < p ≤ 100) by the nearest-rank method: the smallest sample that at
/// least `p` % of the samples do not exceed (so p99 of 200 samples is the 198th smallest). NaN
/// for no sample.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// Everything a run of `bench latency` produced.
#[derive(Debug)]
pub struct Report {
    pub quick: bool,
    /// How ours ran: watching or polling, and with which interval.
    pub ours_mode: String,
    pub lsyncd: String,
    pub machine: Machine,
    pub measures: Vec<Measure>,
    pub ours: ToolRun,
    pub peer: ToolRun,
    pub wall_s: f64,
    /// The bench's method, one item each.
    pub notes: Vec<String>,
}

fn shown(g: Option<&Got>, unit: Unit) -> String {
    match g {
        Some(Got::Value(v)) => unit.show(*v),
        Some(Got::Late(s)) => format!("timeout: {s:.1} s"),
        Some(Got::Timeout) => "timeout".into(),
        None => "–".into(),
    }
}

impl Report {
    fn value(run: &ToolRun, key: Key) -> Option<f64> {
        match run.got.get(&key) {
            Some(Got::Value(v)) => Some(*v),
            _ => None,
        }
    }

    /// ours / lsyncd, when both have a figure and lsyncd's is not zero.
    fn ratio(&self, key: Key) -> Option<f64> {
        let (o, p) = (Self::value(&self.ours, key)?, Self::value(&self.peer, key)?);
        (p > 0.0).then(|| o / p)
    }

    /// Whether ours meets the measure's target; unknown without a figure (or without lsyncd's
    /// when the target is relative); a timeout never meets it.
    fn met(&self, m: &Measure) -> Option<bool> {
        let goal = m.goal?;
        let v = match self.ours.got.get(&m.key)? {
            Got::Late(_) | Got::Timeout => return Some(false),
            Got::Value(v) => *v,
        };
        if v > goal.max {
            return Some(false);
        }
        match goal.ratio {
            None => Some(true),
            Some(r) => Some(v <= r * Self::value(&self.peer, m.key)?),
        }
    }

    /// The results table (stdout and latency.md).
    pub fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .measures
            .iter()
            .map(|m| {
                vec![
                    m.label.clone(),
                    shown(self.ours.got.get(&m.key), m.unit),
                    shown(self.peer.got.get(&m.key), m.unit),
                    self.ratio(m.key).map_or("–".into(), |r| format!("{r:.2}")),
                    m.target.clone(),
                    met(self.met(m)).into(),
                ]
            })
            .collect();
        table(
            &[
                "measure",
                "ours",
                "lsyncd",
                "ours/lsyncd",
                "target (ours)",
                "met",
            ],
            &rows,
        )
    }

    /// Lines under the table: the targets met, failures and notes of each tool.
    pub fn verdicts(&self) -> String {
        let mut out = String::new();
        for (name, run) in [("ours", &self.ours), ("lsyncd", &self.peer)] {
            for n in &run.notes {
                let _ = writeln!(out, "{name}: {n}");
            }
            if let Some(e) = &run.error {
                let _ = writeln!(out, "{name} FAILED: {e}");
            }
        }
        let with_goal: Vec<&Measure> = self.measures.iter().filter(|m| m.goal.is_some()).collect();
        let n_met = with_goal
            .iter()
            .filter(|m| self.met(m) == Some(true))
            .count();
        let _ = writeln!(out, "targets met: {n_met} of {}", with_goal.len());
        out
    }

    /// L1's distribution for both tools.
    fn l1_table(&self) -> String {
        let ps = [
            ("min", 0.0),
            ("p50", 50.0),
            ("p90", 90.0),
            ("p99", 99.0),
            ("max", 100.0),
        ];
        let rows: Vec<Vec<String>> = [("ours", &self.ours), ("lsyncd", &self.peer)]
            .iter()
            .map(|(name, run)| {
                let mut row = vec![name.to_string(), run.l1.len().to_string()];
                row.extend(ps.iter().map(|(_, p)| match percentile(&run.l1, *p) {
                    v if v.is_nan() => "–".to_string(),
                    v => Unit::Millis.show(v),
                }));
                row
            })
            .collect();
        let mut header = vec!["tool", "writes"];
        header.extend(ps.iter().map(|(n, _)| *n));
        table(&header, &rows)
    }

    /// Whether every step of both tools ran to the end (timeouts and failed checks do not).
    pub fn complete(&self) -> bool {
        self.ours.error.is_none() && self.peer.error.is_none()
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# server-sync vs lsyncd: latency{}\n",
            if self.quick {
                " (--quick: a 10,000-file tree, indicative only)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "Ours: {}. Peer: {}. Each tool in turn mirrors its own copy of the same tree; \
             `cargo xtask bench latency{}` took {:.0} s.\n",
            self.ours_mode,
            self.lsyncd,
            if self.quick { " --quick" } else { "" },
            self.wall_s
        );
        out += &self.table();
        out.push('\n');
        out += &self.verdicts();
        let _ = writeln!(out, "\n## L1: every write\n");
        out += &self.l1_table();
        let _ = writeln!(out, "\n## Machine\n");
        for (k, v) in self.machine.facts() {
            let _ = writeln!(out, "- {k}: {v}");
        }
        let _ = writeln!(out, "- peer: {}", self.lsyncd);
        let _ = writeln!(out, "\n## Method\n");
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=200).rev().map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 100.0);
        assert_eq!(percentile(&v, 99.0), 198.0);
        assert_eq!(percentile(&v, 100.0), 200.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[5.0], 99.0), 5.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), 2.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn targets_absolute_and_relative() {
        let goal = |max, ratio| Measure {
            key: Key::L1p50,
            label: "L1".into(),
            unit: Unit::Millis,
            goal: Some(Goal { max, ratio }),
            target: String::new(),
        };
        let run = |v: Option<Got>| ToolRun {
            got: v.map(|g| (Key::L1p50, g)).into_iter().collect(),
            ..ToolRun::default()
        };
        let report = |o, p| Report {
            quick: true,
            ours_mode: String::new(),
            lsyncd: String::new(),
            machine: Machine::read(
                std::path::Path::new("/"),
                std::path::Path::new("/"),
                String::new(),
                None,
            ),
            measures: Vec::new(),
            ours: run(o),
            peer: run(p),
            wall_s: 0.0,
            notes: Vec::new(),
        };
        let r = report(Some(Got::Value(0.004)), Some(Got::Value(0.040)));
        assert_eq!(r.met(&goal(0.020, Some(0.2))), Some(true));
        assert_eq!(r.met(&goal(0.020, Some(0.05))), Some(false));
        assert_eq!(r.met(&goal(0.003, None)), Some(false));
        assert!((r.ratio(Key::L1p50).unwrap() - 0.1).abs() < 1e-9);
        let r = report(Some(Got::Value(0.004)), Some(Got::Timeout));
        assert_eq!(r.met(&goal(0.020, Some(0.2))), None);
        assert_eq!(r.met(&goal(0.020, None)), Some(true));
        assert_eq!(r.ratio(Key::L1p50), None);
        let r = report(Some(Got::Timeout), None);
        assert_eq!(r.met(&goal(0.020, None)), Some(false));
        let r = report(Some(Got::Value(0.5)), Some(Got::Value(0.0)));
        assert_eq!(r.ratio(Key::L1p50), None);
    }
}
