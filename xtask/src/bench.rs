//! `cargo xtask bench`: server-sync against rsync on the same workloads, side by side (issue 4).
//!
//! For each workload the bench runs a warm-up of each tool, then `--pairs` measured runs
//! alternately (ours, rsync, ours, rsync, …), so drift of the machine (other load, page cache,
//! disk state) falls on both tools alike. Every figure is a ratio against rsync measured in the
//! same run. Re-syncs run straight after the sync before them, as a script would run them, and
//! our durable sync is compared with rsync plus a flush as well as with rsync alone. With
//! `--hash blake3,md5` each pair runs ours once per content hash, so the hashes are compared
//! against the same rsync runs. Each re-sync pair is followed by the walk floor: both trees
//! walked with one `lstat` per entry, the least a re-sync can cost. Our binaries keep their
//! caches and state directories in the bench's work directory (per destination on the server
//! side, per source tree and hash on the client side), never in the user's home. The fairness
//! rules this follows, and why, are listed in `report::NOTES`, which also goes into the report.
//!
//! * [`data`] generates the trees and checks that each run produced a true mirror.
//! * [`proc`] starts and reaps processes and reads the kernel's accounting (RSS, loopback bytes).
//! * [`walk`] times the walk floor of a re-sync.
//! * [`report`] computes medians, checks the targets (time, peak RSS on every workload, re-sync
//!   bytes on the wire) and writes the table, `report.md` and `report.json`.

mod data;
mod latency;
mod proc;
mod report;
mod supervise;
mod walk;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use xtask::process::shell_quote;

use data::Dataset;
pub use latency::USAGE as LATENCY_USAGE;
use proc::{OurServer, RsyncDaemon, lo_tx_bytes, log_tail, vm_hwm_kib};
use report::{
    Baseline, Machine, Measured, Report, Row, Sample, Target, ToolRuns, WIRE_LIMIT, Walks, mib,
};
use supervise::Supervised;
pub use supervise::{SUBCOMMAND as SUPERVISE, supervise};

pub const USAGE: &str = "\
options of `bench`:
  --quick         reduced sizes (1/10), the whole bench in about a minute
  --pairs N       measured runs of each tool per workload, after one warm-up each (default 3)
  --hash LIST     content hash(es) of ours, passed to `client-sync --hash`: blake3 (the
                  product's default, and the bench's), md5, or both, comma-separated
                  (`--hash blake3,md5`): then each pair runs ours once per hash, in that
                  order, before rsync, and the report has a row per workload and hash
  FILTER...       only these workloads, by id (W1 W2 W3 W4 W4n W6); re-syncs whose initial
                  sync is left out get an untimed setup sync instead
";

/// Longest a single client run may take before the bench gives up on it.
const RUN_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Files changed less than this before a scan are not trusted to the hash cache (ARCHITECTURE.md:
/// 2 s, plus a margin). A freshly generated source tree is left this long before its first
/// (warm-up) sync, so that the client's cache can vouch for it as it would for a real tree
/// written long before. That is setup, never a pause between syncs: a re-sync runs straight
/// after the sync before it, as a script would run it, racy window and all.
pub const SOURCE_SETTLE: Duration = Duration::from_millis(2500);

/// The content hashes `client-sync --hash` accepts, the product's default first.
const HASHES: &[&str] = &["blake3", "md5"];

/// A bench started this soon after another's cleanup may meet ext4's slow file creation after
/// mass deletion. The allocator skips inodes freed within the last 60 s (360 s while their
/// inode table block is dirty); measured on this VM, creating 2,000 files took 1.7 s one
/// minute after deleting 20,000 and 0.2 s after six, and after the full bench's cleanup (about
/// a million entries) creation was still several times slower ten minutes later.
const RECENT_CLEANUP: Duration = Duration::from_secs(15 * 60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Into an empty destination.
    Initial,
    /// Into a mirror that is already up to date.
    Unchanged,
    /// Into a mirror, after a seeded change of the source before each pair.
    Changed { changed: u64, added: u64 },
}

/// Which source tree a workload syncs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tree {
    Small = 0,
    Big = 1,
    Many = 2,
}

struct Workload {
    id: &'static str,
    tree: Tree,
    kind: Kind,
    /// Target for median(ours) against the median of the baseline.
    target: Target,
    /// Most bytes on the wire ours may move, as a multiple of rsync's (re-syncs).
    wire: Option<f64>,
}

/// In the order they run: a re-sync follows the initial sync whose mirror it reuses.
const WORKLOADS: &[Workload] = &[
    Workload {
        id: "W1",
        tree: Tree::Small,
        kind: Kind::Initial,
        target: Target {
            ratio: 0.5,
            against: Baseline::Rsync,
        },
        wire: None,
    },
    Workload {
        id: "W2",
        tree: Tree::Big,
        kind: Kind::Initial,
        // Equal durability: our server flushes before `sync:done`, rsync does not.
        target: Target {
            ratio: 0.8,
            against: Baseline::RsyncFlush,
        },
        wire: None,
    },
    Workload {
        id: "W3",
        tree: Tree::Small,
        kind: Kind::Unchanged,
        target: Target {
            ratio: 0.3,
            against: Baseline::Rsync,
        },
        wire: Some(WIRE_LIMIT),
    },
    Workload {
        id: "W4",
        tree: Tree::Many,
        kind: Kind::Initial,
        target: Target {
            ratio: 0.7,
            against: Baseline::Rsync,
        },
        wire: None,
    },
    Workload {
        id: "W4n",
        tree: Tree::Many,
        kind: Kind::Unchanged,
        target: Target {
            ratio: 0.3,
            against: Baseline::Rsync,
        },
        wire: Some(WIRE_LIMIT),
    },
    Workload {
        id: "W6",
        tree: Tree::Many,
        kind: Kind::Changed {
            changed: 10,
            added: 10,
        },
        target: Target {
            ratio: 0.3,
            against: Baseline::Rsync,
        },
        wire: Some(WIRE_LIMIT),
    },
];

/// The three source trees, full size or `--quick` (a tenth).
pub fn datasets(quick: bool) -> [Dataset; 3] {
    let (small, many, big) = if quick {
        ((1_000, 10), (10_000, 100), 100 << 20)
    } else {
        ((10_000, 100), (100_000, 1_000), 1 << 30)
    };
    [
        Dataset {
            name: "small",
            files: small.0,
            dirs: small.1,
            size: 4 << 10,
            seed: 1,
        },
        Dataset {
            name: "big",
            files: 1,
            dirs: 1,
            size: big,
            seed: 2,
        },
        Dataset {
            name: "many",
            files: many.0,
            dirs: many.1,
            size: 1 << 10,
            seed: 3,
        },
    ]
}

pub fn size_text(b: u64) -> String {
    match b {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// 100000 → "100,000".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn title(w: &Workload, ds: &Dataset) -> String {
    let initial = WORKLOADS
        .iter()
        .find(|o| o.tree == w.tree && o.kind == Kind::Initial)
        .map_or("?", |o| o.id);
    match w.kind {
        Kind::Initial if ds.files == 1 => format!("initial sync, one {} file", size_text(ds.size)),
        Kind::Initial => format!(
            "initial sync, {} files × {} in {} dirs",
            thousands(ds.files),
            size_text(ds.size),
            thousands(ds.dirs)
        ),
        Kind::Unchanged => format!("re-sync of {initial}, nothing changed"),
        Kind::Changed { changed, added } => {
            format!("re-sync of {initial} after {changed} files changed and {added} added")
        }
    }
}

struct Options {
    quick: bool,
    pairs: usize,
    /// Content hashes of ours, in the order each pair runs them.
    hashes: Vec<&'static str>,
    filters: Vec<String>,
}

/// `blake3,md5` → the hashes, each once, in the order given.
fn parse_hashes(v: &str) -> Result<Vec<&'static str>> {
    let mut out = Vec::new();
    for name in v.split(',').map(str::trim) {
        let Some(h) = HASHES.iter().find(|h| h.eq_ignore_ascii_case(name)) else {
            bail!(
                "--hash takes {} or a comma-separated list of them, not {name:?}",
                HASHES.join(", ")
            );
        };
        if !out.contains(h) {
            out.push(*h);
        }
    }
    Ok(out)
}

fn parse_args(args: &[String]) -> Result<Option<Options>> {
    let mut o = Options {
        quick: false,
        pairs: 3,
        hashes: vec![HASHES[0]],
        filters: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                print!(
                    "usage: cargo xtask bench [--quick] [--pairs N] [--hash LIST] [FILTER...]\n\n\
                     {USAGE}"
                );
                return Ok(None);
            }
            "--quick" => o.quick = true,
            "--pairs" => {
                let v = it.next().context("--pairs needs a value")?;
                o.pairs = crate::positive(v, "--pairs")?;
            }
            "--hash" => {
                let v = it
                    .next()
                    .context("--hash needs a value (blake3, md5 or both)")?;
                o.hashes = parse_hashes(v)?;
            }
            s if s.starts_with('-') => bail!("unknown option {s:?} (see --help)"),
            s => o.filters.push(s.to_string()),
        }
    }
    Ok(Some(o))
}

fn select(filters: &[String]) -> Result<Vec<&'static Workload>> {
    for f in filters {
        if !WORKLOADS.iter().any(|w| w.id.eq_ignore_ascii_case(f)) {
            let ids: Vec<_> = WORKLOADS.iter().map(|w| w.id).collect();
            bail!("no workload {f:?}; the workloads are {}", ids.join(" "));
        }
    }
    Ok(WORKLOADS
        .iter()
        .filter(|w| filters.is_empty() || filters.iter().any(|f| w.id.eq_ignore_ascii_case(f)))
        .collect())
}

/// A peer tool of the benches: its name, the option that prints its version, and its package.
pub struct Peer {
    pub program: &'static str,
    pub version_arg: &'static str,
    pub package: &'static str,
}

pub const RSYNC: Peer = Peer {
    program: "rsync",
    version_arg: "--version",
    package: "rsync",
};

/// The first line of `peer`'s version text (whitespace collapsed), or the one-line advice on
/// installing it; `bench` names the command that needs it.
pub fn find_peer(peer: &Peer, bench: &str) -> Result<String> {
    let Peer {
        program,
        version_arg,
        package,
    } = peer;
    match Command::new(program).arg(version_arg).output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or(program)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")),
        Ok(o) => bail!(
            "`{program} {version_arg}` failed ({}); `{bench}` compares against {program}",
            o.status
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{program} is not installed and `{bench}` compares against it: install it \
             (`apt-get install -y {package}` on Debian/Ubuntu) and run again"
        ),
        Err(e) => bail!("cannot run {program}: {e}"),
    }
}

/// Moves the bench into a network namespace of its own, so that the loopback counters see its
/// traffic alone; returns what the report says about it. Call before any thread is started.
pub fn isolate_loopback() -> String {
    match proc::private_loopback() {
        Ok(()) => "private network namespace: only the bench's own traffic is counted".to_string(),
        Err(e) => {
            format!("shared with the rest of the machine ({e:#}): other traffic is counted too")
        }
    }
}

/// Builds the release binaries the bench measures.
pub fn build(root: &Path) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--package", "server-sync", "--bins"])
        .current_dir(root)
        .status()
        .context("run cargo build")?;
    if !status.success() {
        bail!("cargo build --release of server-sync and client-sync failed ({status})");
    }
    Ok(())
}

pub fn run(args: &[String]) -> Result<bool> {
    if args.first().is_some_and(|a| a == "latency") {
        return latency::run(&args[1..]);
    }
    let Some(opts) = parse_args(args)? else {
        return Ok(true);
    };
    let selected = select(&opts.filters)?;
    let rsync_version = find_peer(&RSYNC, "cargo xtask bench")?;
    let root = xtask::workspace_root();
    let target = crate::target_dir(&root)?;
    build(&root)?;
    let loopback = isolate_loopback();
    let dirs = Dirs::prepare(&target.join("bench"), "logs")?;

    let started = Instant::now();
    let bench = Bench::new(&target.join("release"), dirs.work.path(), &dirs.logs)?;
    let floor = Supervised::start(&["true".to_string()], &dirs.logs.join("floor.log"))
        .and_then(|s| s.finish(Duration::from_secs(10)))
        .ok()
        .map(|m| m.exit.maxrss_kib);
    let mut machine = Machine::read(dirs.work.path(), &root, loopback, floor);
    machine.last_cleanup = dirs.last_cleanup_text();
    println!(
        "bench{}: {} measured pair(s) per workload after a warm-up of each; ours with --hash {}; \
         {}; trees in {}, logs in {}",
        if opts.quick { " --quick" } else { "" },
        opts.pairs,
        opts.hashes.join(", then --hash "),
        rsync_version,
        dirs.work.path().display(),
        dirs.logs.display()
    );
    let rows = measure(&bench, &selected, &opts);
    machine.load_end = report::load_average();
    let report = Report {
        quick: opts.quick,
        pairs: opts.pairs,
        hashes: opts.hashes.clone(),
        machine,
        rows,
        wall_s: started.elapsed().as_secs_f64(),
    };
    fs::write(dirs.bench.join("report.md"), report.markdown())?;
    fs::write(dirs.bench.join("report.json"), report.json())?;
    println!("\n{}\n{}", report.table(), report.verdicts());
    println!(
        "load average (1, 5, 15 min): {} at start, {} at end",
        report.machine.load_start, report.machine.load_end
    );
    println!(
        "report: {} and report.json ({:.0} s)",
        dirs.bench.join("report.md").display(),
        report.wall_s
    );
    // Every tree goes only now, in one go (never between timed runs).
    dirs.remove_trees(bench)?;
    Ok(report.rows.iter().all(|r| r.outcome.is_ok()))
}

/// Runs every selected workload, one report row each (a failed workload is a row too).
fn measure(bench: &Bench, selected: &[&Workload], opts: &Options) -> Vec<Row> {
    let sets = datasets(opts.quick);
    let mut state = State::default();
    let mut rows = Vec::new();
    for w in selected {
        let ds = sets[w.tree as usize];
        let title = title(w, &ds);
        println!("{} {title} (target ours {})", w.id, w.target);
        let outcome = bench
            .workload(w, &ds, opts.pairs, &opts.hashes, &mut state)
            .map_err(|e| format!("{e:#}"));
        if let Err(e) = &outcome {
            println!("  {} FAILED: {e}", w.id);
        }
        // A row per hash, each against the same rsync runs and walk floor.
        for (k, hash) in opts.hashes.iter().enumerate() {
            rows.push(Row {
                id: w.id,
                hash,
                title: title.clone(),
                target: w.target,
                wire_target: w.wire,
                outcome: match &outcome {
                    Ok(runs) => Ok(Measured {
                        ours: runs.ours[k].clone(),
                        rsync: runs.rsync.clone(),
                        walk: runs.walk.clone(),
                    }),
                    Err(e) => Err(e.clone()),
                },
            });
        }
    }
    rows
}

/// The bench's directories under `target/bench/`.
pub struct Dirs {
    /// `target/bench/`: reports and the cleanup stamp.
    pub bench: PathBuf,
    /// This run's trees, under `work/`.
    pub work: tempfile::TempDir,
    /// Trees an interrupted earlier bench left in `work/`.
    stale: Vec<PathBuf>,
    pub logs: PathBuf,
    /// When the last bench deleted its trees (from the stamp file).
    last_cleanup: Option<Duration>,
}

impl Dirs {
    /// Creates the work directory and the log directory `logs` (emptied), and warns when the
    /// last bench's mass deletion is recent enough to slow this one down.
    pub fn prepare(bench: &Path, logs: &str) -> Result<Dirs> {
        let work_parent = bench.join("work");
        fs::create_dir_all(&work_parent)
            .with_context(|| format!("create {}", work_parent.display()))?;
        let last_cleanup = since_stamp(&bench.join(".last-cleanup"));
        if let Some(ago) = last_cleanup.filter(|a| *a < RECENT_CLEANUP) {
            println!(
                "note: the last bench deleted its trees {} s ago; on ext4, creating files for some \
                 minutes after deleting many is slower, which may inflate both tools' initial syncs",
                ago.as_secs()
            );
        }
        // Trees of an interrupted earlier bench are left alone until the end: deleting them now
        // would slow file creation during the measurements (see RECENT_CLEANUP).
        let stale: Vec<PathBuf> = fs::read_dir(&work_parent)?
            .filter_map(|e| Some(e.ok()?.path()))
            .collect();
        let work = tempfile::Builder::new()
            .prefix("run-")
            .tempdir_in(&work_parent)
            .context("create the bench's work directory")?;
        let logs = bench.join(logs);
        let _ = fs::remove_dir_all(&logs);
        fs::create_dir_all(&logs)?;
        Ok(Dirs {
            bench: bench.to_path_buf(),
            work,
            stale,
            logs,
            last_cleanup,
        })
    }

    /// When the previous bench deleted its trees, for the report.
    pub fn last_cleanup_text(&self) -> String {
        match self.last_cleanup {
            Some(ago) => format!(
                "{} min before this bench (mass deletion slows ext4 file creation for minutes)",
                ago.as_secs() / 60
            ),
            None => "none recorded".into(),
        }
    }

    /// Ends the bench (`owner` holds its servers), deletes this run's trees and any stale ones,
    /// and stamps the time of a mass deletion.
    pub fn remove_trees<T>(self, owner: T) -> Result<()> {
        let t = Instant::now();
        print!("removing the bench's trees… ");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        drop(owner);
        let mut removed = data::remove_tree_parallel(&self.work.keep());
        for dir in self.stale {
            removed += data::remove_tree_parallel(&dir);
        }
        // Only a mass deletion can slow the next bench down; a few files cannot.
        if removed >= 10_000 {
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            let _ = fs::write(self.bench.join(".last-cleanup"), format!("{now}\n"));
        }
        println!(
            "{} entries in {:.1} s",
            thousands(removed),
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

fn since_stamp(stamp: &Path) -> Option<Duration> {
    let secs: u64 = fs::read_to_string(stamp).ok()?.trim().parse().ok()?;
    SystemTime::now()
        .duration_since(UNIX_EPOCH + Duration::from_secs(secs))
        .ok()
}

/// One destination of ours that mirrors a source, with our server's cache and state directory
/// for it (both as new as the destination).
struct OursMirror {
    dst: PathBuf,
    server_cache: PathBuf,
    server_state: PathBuf,
}

/// The destinations of each tool that mirror a source: one of ours per content hash (a cache
/// file holds one algorithm's hashes, so the hashes never share a mirror), one of rsync's.
struct Mirror {
    ours: Vec<OursMirror>,
    rsync: String,
}

/// What one workload measured: our runs per hash, rsync's, and the walk floor of a re-sync.
struct WorkloadRuns {
    ours: Vec<ToolRuns>,
    rsync: ToolRuns,
    walk: Option<Walks>,
}

/// Trees and mirrors carried from one workload to the next, by `Tree`.
#[derive(Default)]
struct State {
    sources: [Option<PathBuf>; 3],
    mirrors: [Option<Mirror>; 3],
}

/// How much of a destination is compared with its source after a run (outside the timing).
#[derive(Clone, Copy)]
enum Verify<'a> {
    /// Paths, kinds, modes, sizes and mtimes.
    Meta,
    /// That, and the content of these files byte for byte.
    These(&'a [PathBuf]),
    /// That, and the content of every file byte for byte.
    All,
}

/// Where everything lives during one bench.
struct Bench {
    server_bin: PathBuf,
    client_bin: PathBuf,
    logs: PathBuf,
    sources: PathBuf,
    ours_root: PathBuf,
    rsync_root: PathBuf,
    server_caches: PathBuf,
    /// Our server's state directory per destination, beneath (see [`OursMirror`]).
    server_states: PathBuf,
    /// The client's cache directory per hash, beneath: it persists for the whole bench.
    client_caches: PathBuf,
    /// The client's state directory per source tree and hash, beneath: it persists for the
    /// whole bench, so each re-sync finds the list its tree's previous sync left.
    client_states: PathBuf,
    rsync_conf: PathBuf,
}

impl Bench {
    fn new(bin_dir: &Path, work: &Path, logs: &Path) -> Result<Bench> {
        let b = Bench {
            server_bin: bin_dir.join("server-sync"),
            client_bin: bin_dir.join("client-sync"),
            logs: logs.to_owned(),
            sources: work.join("src"),
            ours_root: work.join("dst-ours"),
            rsync_root: work.join("dst-rsync"),
            server_caches: work.join("cache-server"),
            server_states: work.join("state-server"),
            client_caches: work.join("cache-client"),
            client_states: work.join("state-client"),
            rsync_conf: work.join("rsyncd.conf"),
        };
        // The state directories beneath are left to the product to create (private, 0700).
        for d in [
            &b.sources,
            &b.ours_root,
            &b.rsync_root,
            &b.server_caches,
            &b.server_states,
            &b.client_caches,
            &b.client_states,
        ] {
            fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        RsyncDaemon::write_config(
            &b.rsync_conf,
            &logs.join("rsyncd.log"),
            "bench",
            &b.rsync_root,
        )?;
        Ok(b)
    }

    /// The workload's source tree, generated on first use.
    fn source(&self, ds: &Dataset, tree: Tree, st: &mut State) -> Result<PathBuf> {
        let slot = &mut st.sources[tree as usize];
        if let Some(dir) = slot {
            return Ok(dir.clone());
        }
        let dir = self.sources.join(ds.name);
        let t = Instant::now();
        ds.generate(&dir)?;
        println!(
            "  generated {} ({} × {}) in {:.1} s",
            dir.display(),
            thousands(ds.files),
            size_text(ds.size),
            t.elapsed().as_secs_f64()
        );
        // Setup, not a pause between syncs: see SOURCE_SETTLE.
        std::thread::sleep(SOURCE_SETTLE);
        *slot = Some(dir.clone());
        Ok(dir)
    }

    /// Our fresh destination, server cache and server state for run `name` with `hash`.
    fn fresh_ours(&self, name: &str, hash: &str) -> OursMirror {
        let name = format!("{name}-{hash}");
        OursMirror {
            dst: self.ours_root.join(&name),
            server_cache: self.server_caches.join(&name),
            server_state: self.server_states.join(&name),
        }
    }

    /// The client's state directory for source tree `src` (one of `self.sources`) with `hash`:
    /// the same for every run of that tree and hash.
    fn client_state(&self, src: &Path, hash: &str) -> PathBuf {
        let tree = src
            .file_name()
            .map_or("tree".into(), |n| n.to_string_lossy());
        self.client_states.join(format!("{tree}-{hash}"))
    }

    /// Runs one workload: a warm-up and `pairs` measured runs of each tool; in each, ours
    /// once per hash (in `hashes` order), then rsync, then for a re-sync the walk floor.
    fn workload(
        &self,
        w: &Workload,
        ds: &Dataset,
        pairs: usize,
        hashes: &[&str],
        st: &mut State,
    ) -> Result<WorkloadRuns> {
        let src = self.source(ds, w.tree, st)?;
        let mut ours = vec![ToolRuns::default(); hashes.len()];
        let mut rsync = ToolRuns::default();
        if w.kind == Kind::Initial {
            let mut last = None;
            for i in 0..=pairs {
                // Fresh, never-used destinations and server caches every run (see NOTES); the
                // content of every file is compared after the last run of each tool.
                let verify = if i == pairs {
                    Verify::All
                } else {
                    Verify::Meta
                };
                let name = format!("{}-{i}", w.id);
                let mut mirror = Mirror {
                    ours: Vec::new(),
                    rsync: name.clone(),
                };
                for (k, hash) in hashes.iter().enumerate() {
                    let m = self.fresh_ours(&name, hash);
                    let tag = format!("{name}-ours-{hash}");
                    record(
                        i,
                        &mut ours[k],
                        self.run_ours(&src, &m, hash, &tag, i, verify)?,
                    );
                    mirror.ours.push(m);
                }
                let tag = format!("{name}-rsync");
                record(i, &mut rsync, self.run_rsync(&src, &name, &tag, i, verify)?);
                last = Some(mirror);
            }
            st.mirrors[w.tree as usize] = last;
            return Ok(WorkloadRuns {
                ours,
                rsync,
                walk: None,
            });
        }

        // A re-sync takes the mirror out of the state and puts it back only when all went well,
        // so a later workload never builds on a half-synced destination. It runs straight after
        // the sync before it (no pause: see SOURCE_SETTLE).
        let mirror = match st.mirrors[w.tree as usize].take() {
            Some(m) => m,
            None => self.setup_mirror(w, &src, hashes)?,
        };
        let mut walks = Walks::default();
        for i in 0..=pairs {
            let touched = match w.kind {
                // The same fresh change for every run of the pair: applied once, before it.
                Kind::Changed { changed, added } => {
                    ds.apply_change(&src, i as u64, changed, added)?
                }
                _ => Vec::new(),
            };
            let verify = match w.kind {
                _ if i == pairs => Verify::All,
                Kind::Changed { .. } => Verify::These(&touched),
                _ => Verify::Meta,
            };
            let name = format!("{}-{i}", w.id);
            for (k, (hash, m)) in hashes.iter().zip(&mirror.ours).enumerate() {
                let tag = format!("{name}-ours-{hash}");
                record(
                    i,
                    &mut ours[k],
                    self.run_ours(&src, m, hash, &tag, i, verify)?,
                );
            }
            let tag = format!("{name}-rsync");
            record(
                i,
                &mut rsync,
                self.run_rsync(&src, &mirror.rsync, &tag, i, verify)?,
            );
            // The floor of this pair, on the trees it left (the first hash's destination).
            let dst = &mirror.ours[0].dst;
            let walked = self.walk_floor(&src, dst, &format!("{name}-walk"), i)?;
            if i == 0 {
                walks.warmup = Some(walked.wall_s);
            } else {
                walks.runs.push(walked.wall_s);
            }
            (walks.src_entries, walks.dst_entries) = (walked.src_entries, walked.dst_entries);
        }
        st.mirrors[w.tree as usize] = Some(mirror);
        Ok(WorkloadRuns {
            ours,
            rsync,
            walk: Some(walks),
        })
    }

    /// Times one walk floor of `src` and `dst` ([`walk::floor`]), after a flush like any timed
    /// run; fails when the two trees do not hold as many entries (then one is not a mirror).
    fn walk_floor(&self, src: &Path, dst: &Path, tag: &str, i: usize) -> Result<walk::Walked> {
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        let w = walk::floor(src, dst)?;
        if w.src_entries != w.dst_entries {
            bail!(
                "walk floor: {} holds {} entries, {} holds {}",
                src.display(),
                w.src_entries,
                dst.display(),
                w.dst_entries
            );
        }
        let which = if i == 0 { " (warm-up)" } else { "" };
        println!(
            "  {tag:<20}{which:<10} {:>8.3} s   {} entries on each side",
            w.wall_s,
            thousands(w.src_entries)
        );
        Ok(w)
    }

    /// An untimed initial sync of each tool, for a re-sync whose initial workload was filtered out.
    fn setup_mirror(&self, w: &Workload, src: &Path, hashes: &[&str]) -> Result<Mirror> {
        let name = format!("setup-{}", w.id);
        println!("  setting up mirrors for {} (untimed)", w.id);
        let mut ours = Vec::new();
        for hash in hashes {
            let m = self.fresh_ours(&name, hash);
            let tag = format!("{name}-ours-{hash}");
            self.run_ours(src, &m, hash, &tag, usize::MAX, Verify::Meta)?;
            ours.push(m);
        }
        let tag = format!("{name}-rsync");
        self.run_rsync(src, &name, &tag, usize::MAX, Verify::Meta)?;
        Ok(Mirror { ours, rsync: name })
    }

    /// Runs `argv` to completion, timed, after flushing all dirty pages; then times one more
    /// flush, which is what the run left unwritten (rsync's data; ours has flushed already).
    fn timed(&self, argv: &[String], log: &Path) -> Result<Timed> {
        // Neither tool may pay for the other's (or the generator's) dirty pages.
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        let lo_before = lo_tx_bytes()?;
        let m = Supervised::start(argv, log)?.finish(RUN_TIMEOUT)?;
        let lo_bytes = lo_tx_bytes()?.saturating_sub(lo_before);
        let t1 = Instant::now();
        // SAFETY: as above.
        unsafe { libc::sync() };
        Ok(Timed {
            wall_s: m.wall_s,
            exit: m.exit,
            lo_bytes,
            flush_s: t1.elapsed().as_secs_f64(),
        })
    }

    fn run_ours(
        &self,
        src: &Path,
        m: &OursMirror,
        hash: &str,
        tag: &str,
        i: usize,
        verify: Verify,
    ) -> Result<Sample> {
        let client_cache = self.client_caches.join(hash);
        let client_state = self.client_state(src, hash);
        for d in [&m.dst, &m.server_cache, &client_cache] {
            fs::create_dir_all(d)?;
        }
        let (server_log, client_log) = (
            self.logs.join(format!("{tag}-server.log")),
            self.logs.join(format!("{tag}-client.log")),
        );
        let mut server = OurServer::start(
            &self.server_bin,
            &m.dst,
            &m.server_cache,
            &m.server_state,
            &server_log,
        )?;
        // `--hash` makes the client offer that hash alone: the session uses it or fails.
        let argv: Vec<String> = vec![
            self.client_bin.display().to_string(),
            src.display().to_string(),
            "--server".into(),
            "127.0.0.1".into(),
            "--port".into(),
            server.port.to_string(),
            "--once".into(),
            "-q".into(),
            "--hash".into(),
            hash.into(),
            "--cache-dir".into(),
            client_cache.display().to_string(),
            "--state-dir".into(),
            client_state.display().to_string(),
        ];
        let Timed {
            wall_s,
            exit,
            lo_bytes,
            flush_s,
        } = self.timed(&argv, &client_log)?;
        // The session is over once the client has its `sync:done`: the high-water mark now is
        // the run's (server start-up included, shutdown not).
        let hwm = vm_hwm_kib(server.proc.pid()).map_err(|e| format!("{e:#}"));
        let server_exit = server.proc.terminate(Duration::from_secs(15))?;
        if !exit.success() {
            bail!(
                "`{}` failed ({exit}); {}\n{}",
                shown(&argv),
                log_tail(&client_log, 20),
                log_tail(&server_log, 20)
            );
        }
        if !server_exit.success() {
            bail!(
                "server-sync ended with {server_exit} after SIGTERM; {}",
                log_tail(&server_log, 20)
            );
        }
        check(src, &m.dst, verify).with_context(|| format!("after `{}`", shown(&argv)))?;
        let s = Sample {
            wall_s,
            client_rss_kib: exit.maxrss_kib,
            server_rss_kib: hwm,
            lo_bytes,
            flush_s,
        };
        progress(tag, i, &s);
        Ok(s)
    }

    fn run_rsync(
        &self,
        src: &Path,
        name: &str,
        tag: &str,
        i: usize,
        verify: Verify,
    ) -> Result<Sample> {
        let dst = self.rsync_root.join(name);
        fs::create_dir_all(&dst)?;
        let daemon = RsyncDaemon::start(&self.rsync_conf, &self.logs.join("rsyncd.log"))?;
        let argv: Vec<String> = vec![
            "rsync".into(),
            "-a".into(),
            "--delete".into(),
            format!("{}/", src.display()),
            format!("rsync://127.0.0.1:{}/bench/{name}/", daemon.port),
        ];
        let log = self.logs.join(format!("{tag}-client.log"));
        let Timed {
            wall_s,
            exit,
            lo_bytes,
            flush_s,
        } = self.timed(&argv, &log)?;
        let server_rss = daemon.finish();
        if !exit.success() {
            bail!(
                "`{}` failed ({exit}); {}\n{}",
                shown(&argv),
                log_tail(&log, 20),
                log_tail(&self.logs.join("rsyncd.log"), 10)
            );
        }
        check(src, &dst, verify).with_context(|| format!("after `{}`", shown(&argv)))?;
        let s = Sample {
            wall_s,
            client_rss_kib: exit.maxrss_kib,
            server_rss_kib: server_rss,
            lo_bytes,
            flush_s,
        };
        progress(tag, i, &s);
        Ok(s)
    }
}

/// Fails unless `dst` mirrors `src` as far as `verify` asks.
fn check(src: &Path, dst: &Path, verify: Verify) -> Result<()> {
    data::check_mirror(src, dst)?;
    match verify {
        Verify::Meta => Ok(()),
        Verify::These(paths) => data::check_content(src, dst, paths),
        Verify::All => data::check_content(src, dst, &data::files_under(src)?),
    }
}

/// What [`Bench::timed`] measured.
struct Timed {
    wall_s: f64,
    exit: proc::Exit,
    lo_bytes: u64,
    flush_s: f64,
}

/// Files run `i` of a tool: run 0 is the warm-up.
fn record(i: usize, runs: &mut ToolRuns, s: Sample) {
    if i == 0 {
        runs.warmup = Some(s);
    } else {
        runs.runs.push(s);
    }
}

fn shown(argv: &[String]) -> String {
    argv.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

fn progress(tag: &str, i: usize, s: &Sample) {
    let which = match i {
        0 => " (warm-up)",
        usize::MAX => " (setup)",
        _ => "",
    };
    println!(
        "  {tag:<20}{which:<10} {:>8.3} s (+{:.3} s flush)   client {:>9}   server {:>9}   \
         loopback {:>7.1} MiB",
        s.wall_s,
        s.flush_s,
        mib(s.client_rss_kib),
        s.server_rss_kib.as_ref().map_or("n/a".into(), |k| mib(*k)),
        s.lo_bytes as f64 / f64::from(1 << 20)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_and_selection() {
        let sets = datasets(false);
        let t: Vec<String> = WORKLOADS
            .iter()
            .map(|w| title(w, &sets[w.tree as usize]))
            .collect();
        assert_eq!(t[0], "initial sync, 10,000 files × 4 KiB in 100 dirs");
        assert_eq!(t[1], "initial sync, one 1 GiB file");
        assert_eq!(t[2], "re-sync of W1, nothing changed");
        assert_eq!(t[3], "initial sync, 100,000 files × 1 KiB in 1,000 dirs");
        assert_eq!(t[5], "re-sync of W4 after 10 files changed and 10 added");
        let ids = |f: &[&str]| {
            let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
            select(&f).map(|v| v.iter().map(|w| w.id).collect::<Vec<_>>())
        };
        assert_eq!(ids(&["w4N", "W1"]).unwrap(), ["W1", "W4n"]);
        assert_eq!(ids(&[]).unwrap().len(), WORKLOADS.len());
        assert!(ids(&["W5"]).is_err());
    }

    #[test]
    fn hash_option() {
        let args = |a: &[&str]| {
            let a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
            parse_args(&a).map(|o| o.expect("not --help").hashes)
        };
        assert_eq!(args(&[]).unwrap(), ["blake3"]);
        assert_eq!(args(&["--hash", "md5", "W2"]).unwrap(), ["md5"]);
        assert_eq!(
            args(&["--hash", "MD5,blake3,md5"]).unwrap(),
            ["md5", "blake3"]
        );
        assert!(args(&["--hash", "sha1"]).is_err());
        assert!(args(&["--hash"]).is_err());
        let w2 = WORKLOADS.iter().find(|w| w.id == "W2").unwrap();
        assert_eq!(w2.target.to_string(), "≤ 0.8 × (rsync + flush)");
        assert_eq!(WORKLOADS[0].target.to_string(), "≤ 0.5 × rsync");
    }

    #[test]
    fn targets_of_the_issue() {
        let target = |id: &str| WORKLOADS.iter().find(|w| w.id == id).unwrap();
        for (id, ratio) in [
            ("W1", 0.5),
            ("W3", 0.3),
            ("W4", 0.7),
            ("W4n", 0.3),
            ("W6", 0.3),
        ] {
            assert_eq!(target(id).target.ratio, ratio, "{id}");
            assert_eq!(target(id).target.against, Baseline::Rsync, "{id}");
        }
        // The bytes on the wire are a target of re-syncs only.
        for w in WORKLOADS {
            assert_eq!(w.wire.is_some(), w.kind != Kind::Initial, "{}", w.id);
        }
    }
}
