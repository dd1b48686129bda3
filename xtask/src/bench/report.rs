//! Results of `cargo xtask bench`: statistics, the table, `report.md`, `report.json`, machine info.
//!
//! JSON is written by hand (a small value type below): the report is a handful of numbers and
//! strings, not worth a serde_json dependency.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

/// Peak RSS allowed to each side of ours, on every workload (issue 4).
pub const RSS_LIMIT_KIB: u64 = 64 * 1024;

/// Bytes on the wire a re-sync of ours may move, as a multiple of rsync's on the same re-sync
/// (issue 4).
pub const WIRE_LIMIT: f64 = 1.5;

/// One timed run of one tool.
#[derive(Clone, Debug)]
pub struct Sample {
    pub wall_s: f64,
    /// `ru_maxrss` of the client process (and any child it reaped), KiB.
    pub client_rss_kib: u64,
    /// Peak RSS of the server side, KiB, or why it is not known.
    pub server_rss_kib: Result<u64, String>,
    /// `lo` tx_bytes delta over the client's run.
    pub lo_bytes: u64,
    /// How long a `sync` right after the run took: the data the run left unflushed.
    pub flush_s: f64,
}

/// The runs of one tool on one workload.
#[derive(Clone, Debug, Default)]
pub struct ToolRuns {
    pub warmup: Option<Sample>,
    pub runs: Vec<Sample>,
}

impl ToolRuns {
    pub fn median_s(&self) -> f64 {
        median(&self.runs.iter().map(|s| s.wall_s).collect::<Vec<_>>())
    }

    /// Median of wall time plus the flush that followed: the time until the data is on disk.
    pub fn median_flushed_s(&self) -> f64 {
        median(
            &self
                .runs
                .iter()
                .map(|s| s.wall_s + s.flush_s)
                .collect::<Vec<_>>(),
        )
    }

    /// The largest client peak over the measured runs.
    pub fn client_rss_kib(&self) -> u64 {
        self.runs
            .iter()
            .map(|s| s.client_rss_kib)
            .max()
            .unwrap_or(0)
    }

    /// The largest server peak over the measured runs, or why there is none.
    pub fn server_rss_kib(&self) -> Result<u64, String> {
        let mut best = None;
        for s in &self.runs {
            match &s.server_rss_kib {
                Ok(k) => best = best.max(Some(*k)),
                Err(why) => return Err(why.clone()),
            }
        }
        best.ok_or_else(|| "no run".to_string())
    }

    pub fn lo_bytes(&self) -> u64 {
        median(
            &self
                .runs
                .iter()
                .map(|s| s.lo_bytes as f64)
                .collect::<Vec<_>>(),
        ) as u64
    }
}

/// The walk floor of a re-sync ([`super::walk`]): both trees walked at once, one `lstat` per
/// entry, timed after each pair of the re-sync.
#[derive(Clone, Debug, Default)]
pub struct Walks {
    pub warmup: Option<f64>,
    pub runs: Vec<f64>,
    /// Entries below the source and below the destination, at the last walk.
    pub src_entries: u64,
    pub dst_entries: u64,
}

impl Walks {
    pub fn median_s(&self) -> f64 {
        median(&self.runs)
    }
}

/// What one workload measured for one of our hashes: our runs, rsync's, and for a re-sync the
/// walk floor.
#[derive(Clone, Debug)]
pub struct Measured {
    pub ours: ToolRuns,
    pub rsync: ToolRuns,
    pub walk: Option<Walks>,
}

/// Median; the mean of the middle two for an even count; NaN for none.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// What a time target compares ours with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Baseline {
    /// rsync's time as the user waits it.
    Rsync,
    /// rsync's time plus the flush timed right after it: the same durability as ours.
    RsyncFlush,
}

/// A time target: median(ours) ≤ `ratio` × median(baseline).
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub ratio: f64,
    pub against: Baseline,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let base = match self.against {
            Baseline::Rsync => "rsync",
            Baseline::RsyncFlush => "(rsync + flush)",
        };
        write!(f, "≤ {} × {base}", self.ratio)
    }
}

/// One line of the report: a workload, with one of our content hashes.
#[derive(Debug)]
pub struct Row {
    pub id: &'static str,
    /// `client-sync --hash` of our runs.
    pub hash: &'static str,
    pub title: String,
    pub target: Target,
    /// Most bytes on the wire ours may move, as a multiple of rsync's (re-syncs only).
    pub wire_target: Option<f64>,
    /// What was measured, or why the workload could not be.
    pub outcome: Result<Measured, String>,
}

impl Row {
    /// median(ours) / median(rsync).
    fn ratio(&self) -> Option<f64> {
        let m = self.outcome.as_ref().ok()?;
        Some(m.ours.median_s() / m.rsync.median_s())
    }

    /// median(ours) / median(rsync + flush): durable against durable.
    fn ratio_flushed(&self) -> Option<f64> {
        let m = self.outcome.as_ref().ok()?;
        Some(m.ours.median_s() / m.rsync.median_flushed_s())
    }

    /// median(ours) / median(walk floor), for a re-sync.
    fn ratio_floor(&self) -> Option<f64> {
        let m = self.outcome.as_ref().ok()?;
        Some(m.ours.median_s() / m.walk.as_ref()?.median_s())
    }

    /// median(our loopback bytes) / median(rsync's).
    fn wire_ratio(&self) -> Option<f64> {
        let m = self.outcome.as_ref().ok()?;
        Some(m.ours.lo_bytes() as f64 / m.rsync.lo_bytes() as f64)
    }

    /// Whether ours moved at most `wire_target` × rsync's bytes; only re-syncs carry that target.
    fn wire_met(&self) -> Option<bool> {
        let limit = self.wire_target?;
        self.wire_ratio().map(|r| r <= limit)
    }

    fn target_ratio(&self) -> Option<f64> {
        match self.target.against {
            Baseline::Rsync => self.ratio(),
            Baseline::RsyncFlush => self.ratio_flushed(),
        }
    }

    fn time_met(&self) -> Option<bool> {
        self.target_ratio().map(|r| r <= self.target.ratio)
    }

    /// Whether both sides of ours stay under the RSS limit (every workload carries that
    /// target); `None` when a side's peak is not known.
    fn rss_met(&self) -> Option<bool> {
        let o = &self.outcome.as_ref().ok()?.ours;
        let server = o.server_rss_kib().ok()?;
        Some(o.client_rss_kib() <= RSS_LIMIT_KIB && server <= RSS_LIMIT_KIB)
    }
}

/// What the report says about the machine.
#[derive(Debug)]
pub struct Machine {
    pub date: String,
    pub nproc: usize,
    pub cpu: String,
    pub memory: String,
    pub kernel: String,
    pub rsync: String,
    pub filesystem: String,
    pub product: String,
    pub loopback: String,
    /// `ru_maxrss` of `true` started like the measured commands: the least any of them shows.
    pub rss_floor_kib: Option<u64>,
    /// When the previous bench deleted its trees.
    pub last_cleanup: String,
    /// /proc/loadavg's 1, 5 and 15 minute averages as the bench starts, and as it ends.
    pub load_start: String,
    pub load_end: String,
}

/// The 1, 5 and 15 minute load averages, from /proc/loadavg.
pub fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    if fields.len() == 3 {
        fields.join(" ")
    } else {
        "unknown".into()
    }
}

impl Machine {
    /// Reads it off this machine; `work` is where the trees live, `root` the workspace.
    pub fn read(work: &Path, root: &Path, loopback: String, rss_floor_kib: Option<u64>) -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let field = |text: &str, key: &str| {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_else(|| "unknown".into())
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let date = xtask::tree::format_time(now, 0);
        Machine {
            date: format!("{} UTC", &date[..19]),
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu: field(&cpuinfo, "model name"),
            memory: memory_text(&field(&read("/proc/meminfo"), "MemTotal")),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            rsync: command_line(Command::new("rsync").arg("--version")),
            filesystem: filesystem_of(work),
            product: product_version(root),
            loopback,
            rss_floor_kib,
            last_cleanup: "none recorded".into(),
            load_start: load_average(),
            load_end: String::new(),
        }
    }
}

impl Machine {
    /// What every bench report lists about the machine, as (name, value).
    pub fn facts(&self) -> Vec<(&'static str, String)> {
        vec![
            ("date", self.date.clone()),
            ("nproc", self.nproc.to_string()),
            ("cpu", self.cpu.clone()),
            ("memory", self.memory.clone()),
            ("kernel", self.kernel.clone()),
            ("rsync", self.rsync.clone()),
            ("file system of the trees", self.filesystem.clone()),
            ("product", self.product.clone()),
            ("loopback", self.loopback.clone()),
            ("previous bench's cleanup", self.last_cleanup.clone()),
            (
                "load average (1, 5, 15 min) at start / end",
                format!("{} / {}", self.load_start, self.load_end),
            ),
        ]
    }
}

/// `24683656 kB` → `23.5 GiB`.
fn memory_text(meminfo: &str) -> String {
    match meminfo.trim_end_matches("kB").trim().parse::<f64>() {
        Ok(kib) => format!("{:.1} GiB", kib / f64::from(1 << 20)),
        Err(_) => meminfo.to_string(),
    }
}

fn command_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `fstype (device)` of the mount holding `path`, from /proc/self/mountinfo.
fn filesystem_of(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let (pre, post) = line.split_once(" - ").unwrap_or((line, ""));
        let Some(mount) = pre.split_whitespace().nth(4) else {
            continue;
        };
        let mut post = post.split_whitespace();
        let (fstype, source) = (post.next().unwrap_or("?"), post.next().unwrap_or("?"));
        if path.starts_with(mount) && best.as_ref().is_none_or(|(n, _)| mount.len() >= *n) {
            best = Some((mount.len(), format!("{fstype} ({source})")));
        }
    }
    best.map_or_else(|| "unknown".into(), |(_, s)| s)
}

/// The commit benchmarked, and whether the product had uncommitted changes.
fn product_version(root: &Path) -> String {
    let head =
        command_line(
            Command::new("git")
                .arg("-C")
                .arg(root)
                .args(["log", "-1", "--format=%h %s"]),
        );
    let dirty = Command::new("git")
        .arg("-C")
        .arg(root)
        .args([
            "status",
            "--porcelain",
            "--",
            "src",
            "Cargo.toml",
            "Cargo.lock",
        ])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if dirty {
        format!("{head} (plus uncommitted changes to the product)")
    } else {
        head
    }
}

/// Everything a run of the bench produced.
#[derive(Debug)]
pub struct Report {
    pub quick: bool,
    pub pairs: usize,
    /// Our content hashes, in the order each pair ran them.
    pub hashes: Vec<&'static str>,
    pub machine: Machine,
    pub rows: Vec<Row>,
    pub wall_s: f64,
}

fn secs(s: f64) -> String {
    if s.is_nan() {
        "–".into()
    } else {
        format!("{s:.3} s")
    }
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub fn bytes(b: u64) -> String {
    if b >= 10 << 20 {
        format!("{:.0} MiB", b as f64 / (1 << 20) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
    } else {
        format!("{:.0} KiB", b as f64 / 1024.0)
    }
}

/// A ratio with two decimals, or `–` when there is none.
fn ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r.is_finite() => format!("{r:.2}"),
        _ => "–".into(),
    }
}

pub fn met(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "–",
    }
}

/// A markdown table with padded columns, readable as plain text too.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out += &line(width.iter().map(|w| "-".repeat(*w)).collect());
    for r in rows {
        out += &line(r.clone());
    }
    out
}

impl Report {
    /// The results table (stdout and report.md).
    pub fn table(&self) -> String {
        let rss_target = format!("RSS ≤ {} each", mib(RSS_LIMIT_KIB));
        let wire_target = format!("bytes ≤ {WIRE_LIMIT} × rsync");
        let header = [
            "id",
            "hash",
            "workload",
            "ours",
            "rsync",
            "rsync + flush",
            "walk floor",
            "ours/rsync",
            "ours/(rsync + flush)",
            "ours/floor",
            "target",
            "time target",
            "ours client RSS",
            "ours server RSS",
            &rss_target,
            "rsync client RSS",
            "rsync server RSS",
            "loopback ours",
            "loopback rsync",
            "bytes ours/rsync",
            &wire_target,
        ];
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                let mut cells = vec![r.id.to_string(), r.hash.to_string(), r.title.clone()];
                match &r.outcome {
                    Ok(m) => {
                        let (o, s) = (&m.ours, &m.rsync);
                        let server = |t: &ToolRuns| match t.server_rss_kib() {
                            Ok(k) => mib(k),
                            Err(_) => "n/a".into(),
                        };
                        cells.extend([
                            secs(o.median_s()),
                            secs(s.median_s()),
                            secs(s.median_flushed_s()),
                            m.walk.as_ref().map_or("–".into(), |w| secs(w.median_s())),
                            ratio(r.ratio()),
                            ratio(r.ratio_flushed()),
                            ratio(r.ratio_floor()),
                            r.target.to_string(),
                            met(r.time_met()).into(),
                            mib(o.client_rss_kib()),
                            server(o),
                            met(r.rss_met()).into(),
                            mib(s.client_rss_kib()),
                            server(s),
                            bytes(o.lo_bytes()),
                            bytes(s.lo_bytes()),
                            ratio(r.wire_ratio()),
                            met(r.wire_met()).into(),
                        ]);
                    }
                    Err(_) => {
                        cells.push("FAILED".into());
                        cells.extend(std::iter::repeat_n("–".to_string(), 6));
                        cells.push(r.target.to_string());
                        cells.extend(std::iter::repeat_n("–".to_string(), 10));
                    }
                }
                assert_eq!(cells.len(), header.len());
                cells
            })
            .collect();
        table(&header, &rows)
    }

    /// Lines under the table: each verdict's detail where it is not met, and the count of each.
    pub fn verdicts(&self) -> String {
        let mut out = String::new();
        for r in &self.rows {
            let m = match &r.outcome {
                Ok(m) => m,
                Err(e) => {
                    let _ = writeln!(out, "{} ({}) FAILED: {e}", r.id, r.hash);
                    continue;
                }
            };
            if r.rss_met() != Some(true) {
                let _ = writeln!(
                    out,
                    "{} ({}) peak RSS of ours: client {}, server {} (limit {} each): {}",
                    r.id,
                    r.hash,
                    mib(m.ours.client_rss_kib()),
                    m.ours.server_rss_kib().map_or_else(|e| e, mib),
                    mib(RSS_LIMIT_KIB),
                    met(r.rss_met())
                );
            }
            if let (Some(limit), Some(false)) = (r.wire_target, r.wire_met()) {
                let _ = writeln!(
                    out,
                    "{} ({}) bytes on the wire: ours {}, rsync {}: {} × rsync's (limit {limit}): {}",
                    r.id,
                    r.hash,
                    bytes(m.ours.lo_bytes()),
                    bytes(m.rsync.lo_bytes()),
                    ratio(r.wire_ratio()),
                    met(r.wire_met())
                );
            }
        }
        // A failed row, or one whose figure is unknown, counts as not met.
        let count =
            |f: fn(&Row) -> Option<bool>| self.rows.iter().filter(|r| f(r) == Some(true)).count();
        let (time, rss, n) = (count(Row::time_met), count(Row::rss_met), self.rows.len());
        let resyncs: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| r.wire_target.is_some())
            .collect();
        let wire = resyncs
            .iter()
            .filter(|r| r.wire_met() == Some(true))
            .count();
        let _ = writeln!(out, "time targets met: {time} of {n}");
        let _ = writeln!(
            out,
            "memory targets (peak RSS ≤ {} on each side of ours) met: {rss} of {n}",
            mib(RSS_LIMIT_KIB)
        );
        let _ = writeln!(
            out,
            "re-sync bytes on the wire (≤ {WIRE_LIMIT} × rsync's) met: {wire} of {}",
            resyncs.len()
        );
        out
    }

    fn samples_table(&self) -> String {
        let list = |v: &mut dyn Iterator<Item = f64>| {
            v.map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", ")
        };
        let runs = |t: &ToolRuns| list(&mut t.runs.iter().map(|s| s.wall_s));
        let flushes = |t: &ToolRuns| list(&mut t.runs.iter().map(|s| s.flush_s));
        let warm = |w: Option<f64>| w.map_or("–".into(), |w| format!("{w:.3}"));
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .filter_map(|r| {
                let m = r.outcome.as_ref().ok()?;
                let (o, s) = (&m.ours, &m.rsync);
                Some(vec![
                    r.id.to_string(),
                    r.hash.to_string(),
                    runs(o),
                    warm(o.warmup.as_ref().map(|s| s.wall_s)),
                    runs(s),
                    flushes(s),
                    warm(s.warmup.as_ref().map(|s| s.wall_s)),
                    m.walk
                        .as_ref()
                        .map_or("–".into(), |w| list(&mut w.runs.iter().copied())),
                    warm(m.walk.as_ref().and_then(|w| w.warmup)),
                ])
            })
            .collect();
        table(
            &[
                "id",
                "hash",
                "ours runs (s)",
                "ours warm-up",
                "rsync runs (s)",
                "flush after each",
                "rsync warm-up",
                "walk floor runs (s)",
                "walk warm-up",
            ],
            &rows,
        )
    }

    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# server-sync vs rsync{}\n",
            if self.quick {
                " (--quick: reduced sizes, indicative only)"
            } else {
                ""
            }
        );
        let order: Vec<String> = self.hashes.iter().map(|h| format!("ours {h}")).collect();
        let _ = writeln!(
            out,
            "Medians of {} measured run(s) per tool and workload, run alternately ({}, rsync) \
             after one warm-up run of each; re-syncs straight after the sync before them. \
             `cargo xtask bench{}` took {:.0} s.\n",
            self.pairs,
            order.join(", "),
            if self.quick { " --quick" } else { "" },
            self.wall_s
        );
        out += &self.table();
        out.push('\n');
        out += &self.verdicts();
        let _ = writeln!(out, "\n## All runs\n");
        out += &self.samples_table();
        let _ = writeln!(out, "\n## Machine\n");
        let floor = (
            "RSS floor (`true` started as the clients are)",
            m.rss_floor_kib.map_or("unknown".into(), mib),
        );
        for (k, v) in m.facts().into_iter().chain([floor]) {
            let _ = writeln!(out, "- {k}: {v}");
        }
        let _ = writeln!(out, "\n## Method\n");
        for n in NOTES {
            let _ = writeln!(out, "- {n}");
        }
        out
    }

    pub fn json(&self) -> String {
        let m = &self.machine;
        let tool = |t: &ToolRuns| {
            let (server, note) = match t.server_rss_kib() {
                Ok(k) => (J::Int(k), J::Null),
                Err(e) => (J::Null, J::Str(e)),
            };
            J::Obj(vec![
                ("median_s", J::Num(t.median_s())),
                ("median_with_flush_s", J::Num(t.median_flushed_s())),
                (
                    "runs_s",
                    J::Arr(t.runs.iter().map(|s| J::Num(s.wall_s)).collect()),
                ),
                (
                    "warmup_s",
                    t.warmup.as_ref().map_or(J::Null, |s| J::Num(s.wall_s)),
                ),
                (
                    "flush_after_runs_s",
                    J::Arr(t.runs.iter().map(|s| J::Num(s.flush_s)).collect()),
                ),
                ("client_peak_rss_kib", J::Int(t.client_rss_kib())),
                ("server_peak_rss_kib", server),
                ("server_peak_rss_note", note),
                ("loopback_bytes", J::Int(t.lo_bytes())),
                (
                    "loopback_bytes_runs",
                    J::Arr(t.runs.iter().map(|s| J::Int(s.lo_bytes)).collect()),
                ),
            ])
        };
        let walk = |w: &Walks| {
            J::Obj(vec![
                ("median_s", J::Num(w.median_s())),
                (
                    "runs_s",
                    J::Arr(w.runs.iter().map(|s| J::Num(*s)).collect()),
                ),
                ("warmup_s", w.warmup.map_or(J::Null, J::Num)),
                ("source_entries", J::Int(w.src_entries)),
                ("destination_entries", J::Int(w.dst_entries)),
            ])
        };
        let opt_bool = |b: Option<bool>| b.map_or(J::Null, J::Bool);
        let rows = self
            .rows
            .iter()
            .map(|r| {
                let (ours, rsync, floor, error) = match &r.outcome {
                    Ok(m) => (
                        tool(&m.ours),
                        tool(&m.rsync),
                        m.walk.as_ref().map_or(J::Null, walk),
                        J::Null,
                    ),
                    Err(e) => (J::Null, J::Null, J::Null, J::Str(e.clone())),
                };
                J::Obj(vec![
                    ("id", J::Str(r.id.into())),
                    ("hash", J::Str(r.hash.into())),
                    ("workload", J::Str(r.title.clone())),
                    ("target_ratio", J::Num(r.target.ratio)),
                    (
                        "target_against",
                        J::Str(
                            match r.target.against {
                                Baseline::Rsync => "rsync",
                                Baseline::RsyncFlush => "rsync + flush",
                            }
                            .into(),
                        ),
                    ),
                    ("ratio", r.ratio().map_or(J::Null, J::Num)),
                    (
                        "ratio_with_flush",
                        r.ratio_flushed().map_or(J::Null, J::Num),
                    ),
                    (
                        "ratio_to_walk_floor",
                        r.ratio_floor().map_or(J::Null, J::Num),
                    ),
                    ("time_met", opt_bool(r.time_met())),
                    ("rss_met", opt_bool(r.rss_met())),
                    ("wire_ratio", r.wire_ratio().map_or(J::Null, J::Num)),
                    ("wire_target_ratio", r.wire_target.map_or(J::Null, J::Num)),
                    ("wire_met", opt_bool(r.wire_met())),
                    ("ours", ours),
                    ("rsync", rsync),
                    ("walk_floor", floor),
                    ("error", error),
                ])
            })
            .collect();
        let doc = J::Obj(vec![
            ("quick", J::Bool(self.quick)),
            ("pairs", J::Int(self.pairs as u64)),
            (
                "hashes",
                J::Arr(self.hashes.iter().map(|h| J::Str((*h).into())).collect()),
            ),
            ("bench_wall_s", J::Num(self.wall_s)),
            ("rss_limit_kib", J::Int(RSS_LIMIT_KIB)),
            ("wire_limit_ratio", J::Num(WIRE_LIMIT)),
            (
                "machine",
                J::Obj(vec![
                    ("date", J::Str(m.date.clone())),
                    ("nproc", J::Int(m.nproc as u64)),
                    ("cpu", J::Str(m.cpu.clone())),
                    ("memory", J::Str(m.memory.clone())),
                    ("kernel", J::Str(m.kernel.clone())),
                    ("rsync", J::Str(m.rsync.clone())),
                    ("filesystem", J::Str(m.filesystem.clone())),
                    ("product", J::Str(m.product.clone())),
                    ("loopback", J::Str(m.loopback.clone())),
                    ("previous_cleanup", J::Str(m.last_cleanup.clone())),
                    ("load_start", J::Str(m.load_start.clone())),
                    ("load_end", J::Str(m.load_end.clone())),
                    ("rss_floor_kib", m.rss_floor_kib.map_or(J::Null, J::Int)),
                ]),
            ),
            ("workloads", J::Arr(rows)),
            (
                "method",
                J::Arr(NOTES.iter().map(|n| J::Str((*n).into())).collect()),
            ),
        ]);
        let mut s = String::new();
        doc.write(&mut s, 0);
        s.push('\n');
        s
    }
}

/// How the figures were obtained, for whoever reads them (report.md and report.json).
const NOTES: &[&str] = &[
    "Ours: `client-sync SRC --server 127.0.0.1 --port P --once -q --hash H --cache-dir C \
     --state-dir CS` against a fresh `server-sync DST --bind 127.0.0.1 --port 0 --data-port 0 -q \
     --cache-dir S --state-dir SS` per run. \
     rsync: `rsync -a --delete SRC/ rsync://127.0.0.1:P/bench/DST/` against a fresh `rsync \
     --daemon --no-detach` per run (module with `use chroot = no`, `munge symlinks = no`, \
     `reverse lookup = no`, running as the current user). Only the client is timed: the server \
     or daemon is already listening.",
    "Content hash: `--hash H` makes our client offer that hash alone, so the session uses it or \
     fails. `blake3` is the product's default (what a client without `--hash` negotiates with \
     this server); `md5` is the original tool's. With `cargo xtask bench --hash blake3,md5` \
     each pair runs ours once per hash, in that order, then rsync, and the report has a row per \
     workload and hash, each against the same rsync runs; every hash has its own client cache, \
     destinations and server caches (a cache file holds one algorithm's hashes).",
    "Durability: `sync` runs before every timed run, so neither tool pays for the other's (or \
     the generator's) dirty pages. Our server calls syncfs() before `sync:done` when a session \
     wrote anything (what it reports done survives a power cut), inside the timed run; rsync \
     never flushes, so its written data is still only in the page cache when it exits. \
     `rsync + flush` adds the `sync` timed right after each rsync run, the cost of the same \
     guarantee for rsync: `ours/(rsync + flush)` compares durable with durable, `ours/rsync` \
     the plain times as the user waits them. Each target names the one it uses: W2's is \
     against rsync + flush; the others keep issue 4's targets against plain rsync, which are \
     stricter.",
    "Page cache warm: one untimed warm-up run of each tool precedes the measured runs.",
    "Initial syncs (W1, W2, W4) write into a fresh, never-used destination every run, and no \
     tree is deleted before the end: on ext4, creating files right after deleting many is \
     much slower (`recently_deleted` in ext4_create), which would penalise whichever run comes \
     next. That lasts minutes, so a bench started soon after another's cleanup still sees it \
     (see Machine: previous bench's cleanup).",
    "Hash caches: the client cache persists for the whole bench (a real client has scanned \
     its tree before; the warm-up fills it), so initial syncs run with a warm client cache and \
     a fresh, empty server cache. A freshly generated source tree is left 2.5 s before its \
     first (warm-up) sync, since files changed less than 2 s before a scan are never cached: \
     that is setup, as a real tree is older than that.",
    "State directories (the client's ID and the list the server last acknowledged, from which \
     a re-sync sends only what changed): every destination of ours has its own server state \
     directory SS beside its server cache, created empty with the destination, so an initial \
     sync starts with fresh server state and a re-sync finds the state its mirror's last sync \
     left. Every source tree (and hash) has its own client state directory CS, which, like the \
     client cache, persists for the whole bench: a re-sync's client holds the list the mirror's \
     server acknowledged in the sync before it, as a script running `--once` would; an initial \
     sync's client holds the previous run's list, which the fresh server does not, so it sends \
     the whole list. Both live in the bench's work directory: nothing is shared between \
     destinations, with other benches, or with the user's own state \
     (~/.local/state/server-sync).",
    "Re-syncs (W3, W4n, W6) reuse the mirrors, server caches and server state of the last \
     measured initial sync of the same tree, and run straight after the sync before them, with no pause, as a \
     script would run them: whatever the 2 s rule leaves uncached at that moment is paid for \
     in the timing. (Our server keeps the hash of every file it received, so an unchanged \
     re-sync straight after a sync need not read the files again.)",
    "Walk floor (re-syncs): the time to walk the source and our destination with one `lstat` \
     per entry (`openat` per directory, `getdents64`, `fstatat` relative to the directory, \
     symlinks not followed, nothing read), the two trees at once on two threads, as client and \
     server walk theirs; timed until both are done. It is measured by the bench itself right \
     after each pair of the re-sync (warm-up pair included, as its warm-up), so it sees the same \
     tree in the same page cache; the median of the measured pairs is shown. `ours/floor` is \
     how many walks a re-sync of ours costs: any tool that looks at every entry pays the floor \
     at least. With several hashes, the first hash's destination is walked.",
    "W6: before each pair (warm-up included) a fresh seeded change rewrites 10 files and adds \
     10, and every run of the pair syncs that same change, straight after writing it.",
    "Every run is checked afterwards (outside the timing): the destination must match the \
     source in paths, kinds, modes, sizes and file mtimes; the content of the files W6 changed \
     is compared byte for byte after every W6 run, and the content of every file after the \
     last measured run of each tool (and hash) on every workload.",
    "Peak RSS is the kernel's high-water mark: `ru_maxrss` from wait4() for the clients; for \
     our server, VmHWM from /proc/PID/status right after the client exits; for rsync's server \
     side, `ru_maxrss` of the per-run daemon after it has reaped its session processes, i.e. \
     the largest single process of that session (rsync's receiving side is a generator and a \
     receiver process: their peaks are not added up). The largest over the measured runs is \
     shown. The memory target, at most 64 MiB on each side of ours, applies to every workload; \
     a side whose peak is not known does not meet it. The clients and the daemon are started and reaped by a small supervisor process \
     (`xtask __bench-run`), not by the bench: `ru_maxrss` includes the resident memory of the \
     process that forked, and the bench itself grows to tens of MiB; the floor this leaves is \
     listed under Machine.",
    "Loopback bytes: delta of `lo` tx_bytes in /proc/net/dev over the client's run: both \
     directions, TCP/IP headers included; median over the measured runs. Re-syncs (W3, W4n, \
     W6) carry a target of their own on it: ours at most 1.5 × rsync's bytes (`bytes \
     ours/rsync`).",
];

/// A JSON value, just enough for the report.
enum J {
    Null,
    Bool(bool),
    Int(u64),
    Num(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(&'static str, J)>),
}

impl J {
    fn write(&self, out: &mut String, indent: usize) {
        let pad = |n: usize| "  ".repeat(n);
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Int(i) => out.push_str(&i.to_string()),
            // JSON has no NaN or infinity.
            J::Num(f) if !f.is_finite() => out.push_str("null"),
            J::Num(f) => {
                // Six decimals (microseconds, for times) without trailing zeros: 2.0, 1.5.
                let s = format!("{f:.6}");
                let s = s.trim_end_matches('0');
                out.push_str(s);
                if s.ends_with('.') {
                    out.push('0');
                }
            }
            J::Str(s) => write_str(out, s),
            J::Arr(items) if items.is_empty() => out.push_str("[]"),
            J::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    out.push_str(&pad(indent + 1));
                    item.write(out, indent + 1);
                }
                out.push('\n');
                out.push_str(&pad(indent));
                out.push(']');
            }
            J::Obj(fields) => {
                out.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    out.push_str(&pad(indent + 1));
                    write_str(out, k);
                    out.push_str(": ");
                    v.write(out, indent + 1);
                }
                out.push('\n');
                out.push_str(&pad(indent));
                out.push('}');
            }
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    fn runs(wall_s: f64, rss_kib: u64, lo_bytes: u64) -> ToolRuns {
        let s = Sample {
            wall_s,
            client_rss_kib: rss_kib,
            server_rss_kib: Ok(rss_kib),
            lo_bytes,
            flush_s: 0.5,
        };
        ToolRuns {
            warmup: Some(s.clone()),
            runs: vec![s.clone(), s],
        }
    }

    fn row(id: &'static str, ours: ToolRuns, rsync: ToolRuns, walk: Option<f64>) -> Row {
        Row {
            id,
            hash: "blake3",
            title: format!("{id} workload"),
            target: Target {
                ratio: 0.3,
                against: Baseline::Rsync,
            },
            wire_target: walk.map(|_| WIRE_LIMIT),
            outcome: Ok(Measured {
                ours,
                rsync,
                walk: walk.map(|s| Walks {
                    warmup: Some(s),
                    runs: vec![s, s],
                    src_entries: 10,
                    dst_entries: 10,
                }),
            }),
        }
    }

    #[test]
    fn verdicts_on_every_row_and_wire_on_resyncs() {
        // An initial sync within every target but memory; a re-sync over the wire limit.
        let w1 = row(
            "W1",
            runs(0.1, 65 * 1024, 1000),
            runs(1.0, 1024, 1000),
            None,
        );
        let w3 = row(
            "W3",
            runs(0.2, 1024, 1600),
            runs(1.0, 1024, 1000),
            Some(0.05),
        );
        assert_eq!(w1.rss_met(), Some(false));
        assert_eq!(w1.wire_met(), None);
        assert_eq!(w1.ratio_floor(), None);
        assert_eq!(w3.rss_met(), Some(true));
        assert_eq!(w3.wire_ratio(), Some(1.6));
        assert_eq!(w3.wire_met(), Some(false));
        assert_eq!(w3.ratio_floor(), Some(4.0));
        assert_eq!(w3.ratio_flushed(), Some(0.2 / 1.5));
        let failed = Row {
            outcome: Err("boom".into()),
            ..row("W6", ToolRuns::default(), ToolRuns::default(), Some(0.1))
        };
        let report = Report {
            quick: true,
            pairs: 2,
            hashes: vec!["blake3"],
            machine: Machine::read(Path::new("/"), Path::new("/"), String::new(), None),
            rows: vec![w1, w3, failed],
            wall_s: 1.0,
        };
        let v = report.verdicts();
        assert!(
            v.contains("W1 (blake3) peak RSS of ours: client 65.0 MiB"),
            "{v}"
        );
        assert!(!v.contains("W3 (blake3) peak RSS"), "{v}");
        assert!(v.contains("W3 (blake3) bytes on the wire"), "{v}");
        assert!(v.contains("W6 (blake3) FAILED: boom"), "{v}");
        assert!(v.contains("time targets met: 2 of 3"), "{v}");
        assert!(v.contains("met: 1 of 3\n"), "{v}");
        assert!(
            v.contains("re-sync bytes on the wire (≤ 1.5 × rsync's) met: 0 of 2"),
            "{v}"
        );
        // Every row has every column (the table asserts it), the floor only on re-syncs.
        let t = report.table();
        let header = t.lines().next().unwrap();
        for col in [
            "rsync + flush",
            "walk floor",
            "ours/floor",
            "bytes ours/rsync",
        ] {
            assert!(header.contains(col), "{header}");
        }
        assert!(t.lines().nth(3).unwrap().contains("| 0.050 s "), "{t}");
        let j = report.json();
        assert!(j.contains("\"ratio_to_walk_floor\": 4.0"), "{j}");
        assert!(j.contains("\"wire_met\": false"), "{j}");
        assert!(j.contains("\"median_with_flush_s\": 1.5"), "{j}");
    }

    #[test]
    fn json_escapes_and_numbers() {
        let mut s = String::new();
        J::Obj(vec![
            ("a", J::Str("x\"y\\\n\u{1}".into())),
            ("n", J::Num(1.5)),
            ("w", J::Num(2.0)),
            ("nan", J::Num(f64::NAN)),
            ("l", J::Arr(vec![J::Int(1), J::Null, J::Bool(true)])),
        ])
        .write(&mut s, 0);
        assert_eq!(
            s,
            "{\n  \"a\": \"x\\\"y\\\\\\n\\u0001\",\n  \"n\": 1.5,\n  \"w\": 2.0,\n  \"nan\": null,\n  \
             \"l\": [\n    1,\n    null,\n    true\n  ]\n}"
        );
    }
}
