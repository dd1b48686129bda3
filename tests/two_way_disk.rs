//! Two-way rounds on real directories: the merge's target made on each side by the mirror's
//! own `plan` and the store's guarded apply (conflict copies as local copies staged before the
//! overwrite, directory moves, deletes), the files a side lacks copied from the other side as
//! a transfer would. Random operations from a seed, then rounds to quiescence: every replica
//! must hold the same tree, with every version no user replaced. The sessions that carry this
//! over the network are issue 10's remaining work; this proves the parts they will be made of.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use server_sync::core::hash::HashAlgorithm;
use server_sync::core::manifest::{Entry, Kind, Manifest, RelPath};
use server_sync::core::merge::{Sides, merge, name_sources, settle};
use server_sync::core::plan::plan;
use server_sync::events::Recorder;
use server_sync::store::Store;
use server_sync::store::apply::{apply_local, apply_meta};
use server_sync::store::root::Root;
use server_sync::store::scan::Options;
use support::SplitMix;

const ALG: HashAlgorithm = HashAlgorithm::Blake3;
const NAMES: [&str; 3] = ["a", "b", "c.txt"];

struct Replica {
    dir: PathBuf,
    root: Root,
}

struct World {
    _tmp: tempfile::TempDir,
    /// 0 is the server's directory.
    replicas: Vec<Replica>,
    bases: Vec<Option<Vec<Entry>>>,
    clock: u64,
    written: HashSet<String>,
    killed: HashSet<String>,
    log: Vec<String>,
}

impl World {
    fn new(clients: usize) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let replicas = (0..=clients)
            .map(|i| {
                let dir = tmp.path().join(format!("r{i}"));
                fs::create_dir(&dir).unwrap();
                Replica {
                    root: Root::new(&dir),
                    dir,
                }
            })
            .collect();
        World {
            _tmp: tmp,
            replicas,
            bases: vec![None; clients + 1],
            clock: 0,
            written: HashSet::new(),
            killed: HashSet::new(),
            log: Vec::new(),
        }
    }

    fn scan(&self, r: usize) -> Manifest {
        let scan = (self.replicas[r].root)
            .list(None, Options::new(ALG))
            .unwrap();
        Manifest::from_entries(scan.entries).unwrap()
    }

    /// Writes a new version at `path` of replica `r`, with an mtime later than any before.
    fn write_new(&mut self, r: usize, path: &Path) {
        self.clock += 1;
        let content = format!("version {}", self.clock);
        let mut f = fs::File::create(path).unwrap();
        f.write_all(content.as_bytes()).unwrap();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + self.clock);
        f.set_modified(t).unwrap();
        self.written.insert(content);
        let _ = r;
    }

    /// Removes `path` (and below) as a user would: the versions there are the user's to lose.
    fn user_remove(&mut self, path: &Path) {
        let m = fs::symlink_metadata(path).unwrap();
        if m.is_dir() {
            for e in fs::read_dir(path).unwrap() {
                self.user_remove(&e.unwrap().path());
            }
            fs::remove_dir(path).unwrap();
        } else {
            self.killed.insert(fs::read_to_string(path).unwrap());
            fs::remove_file(path).unwrap();
        }
    }

    fn user_op(&mut self, rng: &mut SplitMix, r: usize) {
        let m = self.scan(r);
        let paths: Vec<RelPath> = m.iter().map(|e| e.path.clone()).collect();
        let files: Vec<RelPath> = (m.iter().filter(|e| e.is_file()))
            .map(|e| e.path.clone())
            .collect();
        let dirs: Vec<RelPath> = (m.iter().filter(|e| e.kind == Kind::Dir))
            .map(|e| e.path.clone())
            .collect();
        let dir = self.replicas[r].dir.clone();
        let at = |p: &RelPath| p.to_path(&dir);
        let free = |rng: &mut SplitMix| -> Option<RelPath> {
            let mut parents: Vec<Option<&RelPath>> = vec![None];
            parents.extend(dirs.iter().filter(|d| d.depth() < 3).map(Some));
            let name = NAMES[rng.below(NAMES.len())];
            let p = match rng.pick(&parents)? {
                Some(d) => d.join(name).ok()?,
                None => RelPath::new(name).ok()?,
            };
            m.get(&p).is_none().then_some(p)
        };
        let what = match rng.below(8) {
            0 | 1 => free(rng).map(|p| {
                self.write_new(r, &at(&p));
                format!("create {p}")
            }),
            2 => rng.pick(&files).cloned().map(|p| {
                self.user_remove(&at(&p));
                self.write_new(r, &at(&p));
                format!("modify {p}")
            }),
            3 => rng.pick(&paths).cloned().map(|p| {
                self.user_remove(&at(&p));
                format!("delete {p}")
            }),
            4 => free(rng).map(|p| {
                fs::create_dir(at(&p)).unwrap();
                format!("mkdir {p}")
            }),
            5 => match (rng.pick(&paths).cloned(), free(rng)) {
                (Some(from), Some(to)) if !to.is_within(&from) => {
                    fs::rename(at(&from), at(&to)).unwrap();
                    Some(format!("rename {from} -> {to}"))
                }
                _ => None,
            },
            6 => rng.pick(&files).cloned().map(|p| {
                self.user_remove(&at(&p));
                fs::create_dir(at(&p)).unwrap();
                self.write_new(r, &at(&p).join("a"));
                format!("file->dir {p}")
            }),
            _ => rng.pick(&dirs).cloned().map(|p| {
                self.user_remove(&at(&p));
                self.write_new(r, &at(&p));
                format!("dir->file {p}")
            }),
        };
        if let Some(what) = what {
            self.log.push(format!("replica {r}: {what}"));
        }
    }

    /// Makes `target` on replica `r` (scanned as `scanned`), taking the content it lacks from
    /// replica `from` (scanned as `source`). Returns the paths it could not make.
    fn make(
        &self,
        r: usize,
        (scanned, target): (&Manifest, &Manifest),
        (from, source): (usize, &Manifest),
    ) -> Vec<RelPath> {
        let root = &self.replicas[r].root;
        let events = Recorder::default();
        let plan = plan(target, scanned);
        let mut out = apply_local(root, &plan, Some(scanned), &events);
        let mut requests = plan.requests.clone();
        requests.extend(out.refetch.iter().cloned());
        name_sources(&mut requests, source);
        for w in &requests {
            // What a transfer does: the sender reads what was asked for.
            let data = fs::read(w.asked().to_path(&self.replicas[from].dir)).unwrap();
            let mut tmp = root.temp_for(&w.path).unwrap();
            tmp.file().write_all(&data).unwrap();
            tmp.set_meta(&w.meta).unwrap();
            if let Err(e) = root.place_unchanged(tmp, &w.path, scanned.get(&w.path)) {
                out.changed.push(w.path.clone());
                eprintln!("{e}");
            }
        }
        apply_meta(root, &plan, &mut out, &events);
        let mut unsettled = out.changed;
        unsettled.extend(
            out.failed
                .iter()
                .map(|f| RelPath::new(f.path.clone()).unwrap()),
        );
        unsettled
    }

    /// One whole round between client `c` and the server: the server makes its target first
    /// (content from the client), then the client (content from the server, which has it now).
    fn sync(&mut self, c: usize) -> bool {
        let (client, server) = (self.scan(c), self.scan(0));
        let client_id = format!("C{c}");
        let merged = merge(
            self.bases[c].as_deref(),
            Sides {
                client: &client,
                server: &server,
                client_id: &client_id,
                server_id: "S",
            },
        );
        let (for_server, for_client) = (merged.for_side(&server), merged.for_side(&client));
        let changed = !same(&for_server, &server) || !same(&for_client, &client);
        self.log.push(format!("sync client {c}"));
        let mut unsettled = self.make(0, (&server, &for_server), (c, &client));
        let server_now = self.scan(0);
        unsettled.extend(self.make(c, (&client, &for_client), (0, &server_now)));
        unsettled.extend(merged.left.iter().cloned());
        let old = self.bases[c].take().unwrap_or_default();
        let mut base: BTreeMap<RelPath, Entry> =
            old.iter().map(|e| (e.path.clone(), e.clone())).collect();
        for change in settle(&old, &merged.target, &unsettled) {
            match change {
                server_sync::core::merge::BaseChange::Set(e) => base.insert(e.path.clone(), e),
                server_sync::core::merge::BaseChange::Remove(p) => base.remove(&p),
            };
        }
        self.bases[c] = Some(base.into_values().collect());
        changed
    }
}

/// Same paths, kinds and contents (directories' mtimes are their own on each side).
fn same(a: &Manifest, b: &Manifest) -> bool {
    let key = |m: &Manifest| -> Vec<(RelPath, Kind)> {
        m.iter().map(|e| (e.path.clone(), e.kind.clone())).collect()
    };
    key(a) == key(b)
}

fn run(seed: u64) {
    let mut rng = SplitMix(seed);
    let clients = 1 + rng.below(2);
    let mut w = World::new(clients);
    for _ in 0..rng.below(25) {
        match rng.below(3) {
            0 | 1 => {
                let r = rng.below(clients + 1);
                w.user_op(&mut rng, r);
            }
            _ => {
                let c = 1 + rng.below(clients);
                w.sync(c);
            }
        }
    }
    let history = |w: &World| w.log.join("\n  ");
    assert!(quiesce(&mut w, clients), "no quiescence\n  {}", history(&w));
    let server = w.scan(0);
    for c in 1..=clients {
        let client = w.scan(c);
        assert!(
            same(&client, &server),
            "replica {c} differs\n  {}\n  server: {server:#?}\n  client: {client:#?}",
            history(&w)
        );
    }
    let held: HashSet<String> = (server.iter().filter(|e| e.is_file()))
        .map(|e| fs::read_to_string(e.path.to_path(&w.replicas[0].dir)).unwrap())
        .collect();
    for v in w.written.difference(&w.killed) {
        assert!(held.contains(v), "{v} was lost\n  {}", history(&w));
    }

    // Once all agree, a deletion anywhere reaches everyone, and nothing else changes.
    let files: Vec<RelPath> = (server.iter().filter(|e| e.is_file()))
        .map(|e| e.path.clone())
        .collect();
    if let Some(p) = rng.pick(&files).cloned() {
        let r = rng.below(clients + 1);
        w.log
            .push(format!("replica {r}: delete {p} (after agreement)"));
        w.user_remove(&p.to_path(&w.replicas[r].dir));
        assert!(quiesce(&mut w, clients), "no quiescence\n  {}", history(&w));
        let expected =
            Manifest::from_entries(server.iter().filter(|e| e.path != p).cloned()).unwrap();
        for c in 0..=clients {
            assert!(
                same(&w.scan(c), &expected),
                "replica {c} after deleting {p}\n  {}",
                history(&w)
            );
        }
    }
}

/// Rounds with every client until one pass changes nothing; false if that never comes.
fn quiesce(w: &mut World, clients: usize) -> bool {
    for _ in 0..6 {
        let mut changed = false;
        for c in 1..=clients {
            changed |= w.sync(c);
        }
        if !changed {
            return true;
        }
    }
    false
}

/// `MERGE_SEED=N` replays one case; `DISK_CASES=N` runs more (default 150).
#[test]
fn replicas_on_disk_converge_and_keep_every_version() {
    let seeds: Vec<u64> = match std::env::var("MERGE_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (0..std::env::var("DISK_CASES").map_or(150, |s| s.parse().unwrap())).collect(),
    };
    for seed in seeds {
        if std::panic::catch_unwind(|| run(seed)).is_err() {
            panic!("case failed; replay it with MERGE_SEED={seed}");
        }
    }
}
