//! The merge's rules as one-line table tests, and a model of many replicas syncing at random
//! that checks they converge and that no version a user wrote is lost.

use super::*;
use crate::core::plan::tests::tree;

/// Merges `client` and `server` against `base` (`None`: no base), IDs `C` and `S`, and checks
/// the target tree and the resolutions (their log texts, `;`-separated).
fn check(base: Option<&str>, client: &str, server: &str, target: &str, resolutions: &str) {
    let base = base.map(tree);
    let (client, server) = (tree(client), tree(server));
    let got = merge(
        base.as_ref().map(Manifest::entries),
        Sides {
            client: &client,
            server: &server,
            client_id: "C",
            server_id: "S",
        },
    );
    let said: Vec<String> = got.resolutions.iter().map(ToString::to_string).collect();
    let want: Vec<&str> = resolutions
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(
        (got.target.clone(), said),
        (tree(target), want.iter().map(|s| s.to_string()).collect()),
        "\nbase: {base:?}\nclient: {client:?}\nserver: {server:?}"
    );
}

#[test]
fn one_side_changed_propagates() {
    let base = Some("f a x; d d; f d/b y");
    check(
        base,
        "f a x; d d; f d/b y",
        "f a x; d d; f d/b y",
        "f a x; d d; f d/b y",
        "",
    );
    check(
        base,
        "f a x; d d; f d/b y; f new z",
        "f a x; d d; f d/b y",
        "f a x; d d; f d/b y; f new z",
        "",
    );
    check(
        base,
        "f a x; d d; f d/b y",
        "f a x; d d; f d/b y; f new z",
        "f a x; d d; f d/b y; f new z",
        "",
    );
    check(
        base,
        "f a x2; d d; f d/b y",
        "f a x; d d; f d/b y",
        "f a x2; d d; f d/b y",
        "",
    );
    check(
        base,
        "f a x; d d; f d/b y",
        "f a x; d d; f d/b y2",
        "f a x; d d; f d/b y2",
        "",
    );
    check(base, "f a x", "f a x; d d; f d/b y", "f a x", "");
    check(
        base,
        "f a x; d d; f d/b y",
        "d d; f d/b y",
        "d d; f d/b y",
        "",
    );
    // Metadata alone changed: the changed side's.
    check(
        Some("f a x m=644"),
        "f a x m=600",
        "f a x m=644",
        "f a x m=600",
        "",
    );
    check(
        Some("f a x m=644"),
        "f a x m=644",
        "f a x m=755",
        "f a x m=755",
        "",
    );
}

#[test]
fn the_same_change_on_both_sides_is_no_conflict() {
    check(Some("f a x"), "f a y", "f a y", "f a y", "");
    check(Some("f a x"), "", "", "", "");
    check(Some(""), "d d; f d/n z", "d d; f d/n z", "d d; f d/n z", "");
}

#[test]
fn two_versions_keep_both_names_by_mtime_then_side() {
    check(
        Some("f a.txt x t=1"),
        "f a.txt c t=1764676800",
        "f a.txt s t=2",
        "f a.txt c t=1764676800; f a.sync-conflict-19700101-000002-S.txt s t=2",
        "a.txt (kept the other version as a.sync-conflict-19700101-000002-S.txt)",
    );
    check(
        Some("f a.txt x t=1"),
        "f a.txt c t=2",
        "f a.txt s t=1764676800",
        "f a.txt s t=1764676800; f a.sync-conflict-19700101-000002-C.txt c t=2",
        "a.txt (kept the other version as a.sync-conflict-19700101-000002-C.txt)",
    );
    // A tie goes to the larger side ID ("S" > "C").
    check(
        Some("f a x t=1"),
        "f a c t=5",
        "f a s t=5",
        "f a s t=5; f a.sync-conflict-19700101-000005-C c t=5",
        "a (kept the other version as a.sync-conflict-19700101-000005-C)",
    );
    // Both added the same new path.
    check(
        Some(""),
        "f .bashrc c t=1764676800",
        "f .bashrc s t=1",
        "f .bashrc c t=1764676800; f .bashrc.sync-conflict-19700101-000001-S s t=1",
        ".bashrc (kept the other version as .bashrc.sync-conflict-19700101-000001-S)",
    );
    // Links are versions too.
    check(
        Some("l l t0"),
        "l l t1 t=3",
        "l l t2 t=2",
        "l l t1 t=3; l l.sync-conflict-19700101-000002-S t2 t=2",
        "l (kept the other version as l.sync-conflict-19700101-000002-S)",
    );
}

#[test]
fn a_modification_beats_a_deletion() {
    check(
        Some("f a x"),
        "",
        "f a y",
        "f a y",
        "a (changed on the server, deleted on the client: kept)",
    );
    check(
        Some("f a x"),
        "f a y",
        "",
        "f a y",
        "a (changed on the client, deleted on the server: kept)",
    );
}

#[test]
fn a_directory_deleted_on_one_side_comes_back_with_what_the_other_added() {
    check(
        Some("d d; f d/old x"),
        "",
        "d d; f d/old x; f d/new y",
        "d d; f d/new y",
        "d (deleted on one side, but the other added to it: restored)",
    );
    check(
        Some("d d; d d/e; f d/e/old x"),
        "d d; d d/e; f d/e/old x2",
        "",
        "d d; d d/e; f d/e/old x2",
        "d/e/old (changed on the client, deleted on the server: kept); \
         d (deleted on one side, but the other added to it: restored); \
         d/e (deleted on one side, but the other added to it: restored)",
    );
}

#[test]
fn a_file_against_a_directory_keeps_both_the_file_as_the_copy() {
    check(
        Some(""),
        "f p c t=9",
        "d p; f p/in s",
        "d p; f p/in s; f p.sync-conflict-19700101-000009-C c t=9",
        "p (kept the other version as p.sync-conflict-19700101-000009-C)",
    );
    // The client made a directory a file; the server added to the directory meanwhile.
    check(
        Some("d p; f p/old x"),
        "f p c t=9",
        "d p; f p/old x; f p/new y",
        "d p; f p/new y; f p.sync-conflict-19700101-000009-C c t=9",
        "p (kept the other version as p.sync-conflict-19700101-000009-C)",
    );
    // …and nothing added: the file wins, the directory's old contents go.
    check(
        Some("d p; f p/old x"),
        "f p c",
        "d p; f p/old x",
        "f p c",
        "",
    );
}

#[test]
fn a_rename_on_one_side_and_an_edit_on_the_other_both_survive() {
    check(
        Some("f a x"),
        "f b x",
        "f a y",
        "f a y; f b x",
        "a (changed on the server, deleted on the client: kept)",
    );
}

#[test]
fn without_a_base_nothing_is_deleted_and_differences_are_conflicts() {
    check(
        None,
        "f a x; f only-c c",
        "f a x; f only-s s",
        "f a x; f only-c c; f only-s s",
        "",
    );
    check(
        None,
        "f a c t=2",
        "f a s t=1",
        "f a c t=2; f a.sync-conflict-19700101-000001-S s t=1",
        "a (kept the other version as a.sync-conflict-19700101-000001-S)",
    );
}

#[test]
fn a_round_run_again_makes_no_second_copy() {
    // The server applied the last merge (its copy is there), the client did not.
    check(
        Some("f a x t=1"),
        "f a c t=1",
        "f a s t=2; f a.sync-conflict-19700101-000001-C c t=1",
        "f a s t=2; f a.sync-conflict-19700101-000001-C c t=1",
        "a (kept the other version as a.sync-conflict-19700101-000001-C)",
    );
    // A name taken by other content: the copy gets a number.
    check(
        Some("f a x t=1"),
        "f a c t=1; f a.sync-conflict-19700101-000001-C other",
        "f a s t=2; f a.sync-conflict-19700101-000001-C other",
        "f a s t=2; f a.sync-conflict-19700101-000001-C other; f a.sync-conflict-19700101-000001-C-2 c t=1",
        "a (kept the other version as a.sync-conflict-19700101-000001-C-2)",
    );
}

#[test]
fn unreadable_and_special_paths_are_left_as_each_side_has_them() {
    let base = tree("d d; f d/u x; f s y");
    let (client, server) = (tree("d d; u d/u; f s y2"), tree("d d; f d/u z; s s"));
    let got = merge(
        Some(base.entries()),
        Sides {
            client: &client,
            server: &server,
            client_id: "C",
            server_id: "S",
        },
    );
    assert_eq!(got.target, tree("d d"));
    assert_eq!(
        got.left,
        vec![RelPath::new("d/u").unwrap(), RelPath::new("s").unwrap()]
    );
    assert_eq!(got.for_side(&client), client);
    assert_eq!(got.for_side(&server), server);
}

#[test]
fn conflict_names() {
    let name = |p: &str, t: i64| {
        let meta = Meta {
            mtime_secs: t,
            ..Meta::default()
        };
        conflict_name(&RelPath::new(p).unwrap(), &meta, "ABCDEFG", 1).to_string()
    };
    assert_eq!(
        name("photo.jpg", 1764676800),
        "photo.sync-conflict-20251202-120000-ABCDEFG.jpg"
    );
    assert_eq!(
        name("d/archive.tar.gz", 0),
        "d/archive.tar.sync-conflict-19700101-000000-ABCDEFG.gz"
    );
    assert_eq!(
        name("Makefile", 951782400),
        "Makefile.sync-conflict-20000229-000000-ABCDEFG"
    );
    assert_eq!(name("old", -1), "old.sync-conflict-19691231-235959-ABCDEFG");
    let long = name(&"é".repeat(127), 0);
    assert!(long.len() <= 255, "{}", long.len());
    assert!(long.ends_with("-ABCDEFG"));
}

/// A model of a star of replicas: the server's own directory and clients, each changed by
/// random user operations and synced with the server in random orders, some rounds cut
/// short. At the end every replica must hold the same tree, and every file version a user
/// wrote and did not overwrite or delete themselves must still be in it.
mod model {
    use std::collections::{BTreeMap, HashMap, HashSet};

    use super::*;
    use crate::core::hash::{ContentHash, HashAlgorithm};

    use xtask::testkit::SplitMix as Rng;

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Node {
        Dir,
        File { version: u64, mtime: i64 },
    }

    type Replica = BTreeMap<RelPath, Node>;

    #[derive(Default)]
    struct World {
        replicas: Vec<Replica>,
        /// Per client (replica 1…), the base it shares with the server.
        bases: Vec<Option<Vec<Entry>>>,
        clock: i64,
        next_version: u64,
        hashes: HashMap<ContentHash, u64>,
        /// Versions a user replaced or deleted: only these may disappear.
        killed: HashSet<u64>,
        written: HashSet<u64>,
        log: Vec<String>,
    }

    const NAMES: [&str; 3] = ["a", "b", "c.txt"];

    impl World {
        fn new_file(&mut self) -> Node {
            self.clock += 1;
            self.next_version += 1;
            self.written.insert(self.next_version);
            let hash = HashAlgorithm::Blake3.of(format!("v{}", self.next_version).as_bytes());
            self.hashes.insert(hash, self.next_version);
            Node::File {
                version: self.next_version,
                mtime: self.clock,
            }
        }

        /// Removes `path` and what lies below it from replica `r`, as a user would.
        fn user_remove(&mut self, r: usize, path: &RelPath) {
            let gone: Vec<RelPath> = (self.replicas[r].keys())
                .filter(|p| p.is_within(path))
                .cloned()
                .collect();
            for p in gone {
                if let Some(Node::File { version, .. }) = self.replicas[r].remove(&p) {
                    self.killed.insert(version);
                }
            }
        }

        /// A free path in an existing directory of replica `r`.
        fn free_path(&mut self, rng: &mut Rng, r: usize) -> Option<RelPath> {
            let mut dirs: Vec<Option<RelPath>> = vec![None];
            dirs.extend(
                (self.replicas[r].iter())
                    .filter(|(p, n)| **n == Node::Dir && p.depth() < 3)
                    .map(|(p, _)| Some(p.clone())),
            );
            let dir = rng.pick(&dirs)?.clone();
            let name = NAMES[rng.below(NAMES.len())];
            let path = match dir {
                Some(d) => d.join(name).ok()?,
                None => RelPath::new(name).ok()?,
            };
            (!self.replicas[r].contains_key(&path)).then_some(path)
        }

        fn user_op(&mut self, rng: &mut Rng, r: usize) {
            let paths: Vec<RelPath> = self.replicas[r].keys().cloned().collect();
            let files: Vec<RelPath> = (self.replicas[r].iter())
                .filter(|(_, n)| matches!(n, Node::File { .. }))
                .map(|(p, _)| p.clone())
                .collect();
            let dirs: Vec<RelPath> = (self.replicas[r].iter())
                .filter(|(_, n)| **n == Node::Dir)
                .map(|(p, _)| p.clone())
                .collect();
            let op = rng.below(8);
            let done = match op {
                0 | 1 => self.free_path(rng, r).map(|p| {
                    let f = self.new_file();
                    self.replicas[r].insert(p.clone(), f);
                    format!("create {p}")
                }),
                2 => rng.pick(&files).cloned().map(|p| {
                    self.user_remove(r, &p);
                    let f = self.new_file();
                    self.replicas[r].insert(p.clone(), f);
                    format!("modify {p}")
                }),
                3 => rng.pick(&paths).cloned().map(|p| {
                    self.user_remove(r, &p);
                    format!("delete {p}")
                }),
                4 => self.free_path(rng, r).map(|p| {
                    self.replicas[r].insert(p.clone(), Node::Dir);
                    format!("mkdir {p}")
                }),
                5 => {
                    let (Some(from), Some(to)) =
                        (rng.pick(&paths).cloned(), self.free_path(rng, r))
                    else {
                        return;
                    };
                    if to.is_within(&from) {
                        return;
                    }
                    let moved: Vec<(RelPath, Node)> = (self.replicas[r].iter())
                        .filter(|(p, _)| p.is_within(&from))
                        .map(|(p, n)| (p.clone(), n.clone()))
                        .collect();
                    for (p, n) in moved {
                        self.replicas[r].remove(&p);
                        let rest = &p.as_str()[from.as_str().len()..];
                        let new = RelPath::new(format!("{to}{rest}")).unwrap();
                        self.replicas[r].insert(new, n);
                    }
                    Some(format!("rename {from} -> {to}"))
                }
                6 => rng.pick(&files).cloned().map(|p| {
                    self.user_remove(r, &p);
                    self.replicas[r].insert(p.clone(), Node::Dir);
                    let f = self.new_file();
                    self.replicas[r].insert(p.join("a").unwrap(), f);
                    format!("file->dir {p}")
                }),
                _ => rng.pick(&dirs).cloned().map(|p| {
                    self.user_remove(r, &p);
                    let f = self.new_file();
                    self.replicas[r].insert(p.clone(), f);
                    format!("dir->file {p}")
                }),
            };
            if let Some(what) = done {
                self.log.push(format!("replica {r}: {what}"));
            }
        }

        fn manifest(&self, r: usize) -> Manifest {
            Manifest::from_entries(self.replicas[r].iter().map(|(p, n)| entry(p, n))).unwrap()
        }

        fn replica_of(&self, m: &Manifest) -> Replica {
            (m.iter())
                .map(|e| {
                    let node = match &e.kind {
                        Kind::Dir => Node::Dir,
                        Kind::File { hash, .. } => Node::File {
                            version: self.hashes[hash],
                            mtime: e.meta.mtime_secs,
                        },
                        k => unreachable!("the model makes no {k:?}"),
                    };
                    (e.path.clone(), node)
                })
                .collect()
        }

        /// One round between client `c` and the server (replica 0). `cut`: 0 runs it whole;
        /// 1 stops after the server applied the merge; 2 stops before either did; 3 runs it
        /// whole but the client fails to make one top-level path (it keeps what it had there).
        fn sync(&mut self, rng: &mut Rng, c: usize, cut: usize) -> bool {
            let (client, server) = (self.manifest(c), self.manifest(0));
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
            let target = self.replica_of(&merged.target);
            let changed = self.replicas[c] != target || self.replicas[0] != target;
            self.log.push(format!("sync client {c} cut {cut}"));
            if cut < 2 || cut == 3 {
                self.replicas[0] = target.clone();
            }
            let mut unsettled = Vec::new();
            if cut == 3 {
                let differing: Vec<RelPath> = (target.keys().chain(self.replicas[c].keys()))
                    .filter(|p| target.get(*p) != self.replicas[c].get(*p))
                    .map(|p| RelPath::new(p.as_str().split('/').next().unwrap()).unwrap())
                    .collect();
                if let Some(top) = rng.pick(&differing) {
                    self.log.push(format!("  client {c} fails {top}"));
                    unsettled.push(top.clone());
                }
            }
            if cut == 0 || cut == 3 {
                let kept: Vec<(RelPath, Node)> = (self.replicas[c].iter())
                    .filter(|(p, _)| unsettled.iter().any(|u| p.is_within(u)))
                    .map(|(p, n)| (p.clone(), n.clone()))
                    .collect();
                let mut next: Replica = (target.into_iter())
                    .filter(|(p, _)| !unsettled.iter().any(|u| p.is_within(u)))
                    .collect();
                next.extend(kept);
                self.replicas[c] = next;
                let old = self.bases[c].take().unwrap_or_default();
                let changes = settle(&old, &merged.target, &unsettled);
                self.bases[c] = Some(applied(old, changes));
            }
            changed
        }
    }

    /// A base with `changes` (from [`settle`]) made.
    fn applied(old: Vec<Entry>, changes: Vec<BaseChange>) -> Vec<Entry> {
        let mut map: BTreeMap<RelPath, Entry> =
            old.into_iter().map(|e| (e.path.clone(), e)).collect();
        for c in changes {
            match c {
                BaseChange::Set(e) => map.insert(e.path.clone(), e),
                BaseChange::Remove(p) => map.remove(&p),
            };
        }
        map.into_values().collect()
    }

    fn entry(p: &RelPath, n: &Node) -> Entry {
        match n {
            Node::Dir => Entry {
                path: p.clone(),
                kind: Kind::Dir,
                meta: Meta {
                    mode: 0o755,
                    ..Meta::default()
                },
            },
            Node::File { version, mtime } => Entry {
                path: p.clone(),
                kind: Kind::File {
                    size: 8,
                    hash: HashAlgorithm::Blake3.of(format!("v{version}").as_bytes()),
                },
                meta: Meta {
                    mode: 0o644,
                    mtime_secs: *mtime,
                    mtime_nanos: 0,
                },
            },
        }
    }

    /// One case: random operations and rounds, then rounds to quiescence; panics with the
    /// case's history when a rule is broken.
    fn run(seed: u64) {
        let mut rng = Rng(seed);
        let clients = 1 + rng.below(3);
        let mut w = World {
            replicas: vec![Replica::new(); clients + 1],
            bases: vec![None; clients + 1],
            ..World::default()
        };
        for _ in 0..rng.below(40) {
            match rng.below(10) {
                0..6 => {
                    let r = rng.below(clients + 1);
                    w.user_op(&mut rng, r);
                }
                6 => {
                    // A base lost or damaged.
                    let c = 1 + rng.below(clients);
                    w.bases[c] = None;
                    w.log.push(format!("base of client {c} lost"));
                }
                _ => {
                    let c = 1 + rng.below(clients);
                    let cut = [0, 0, 0, 1, 2, 3][rng.below(6)];
                    w.sync(&mut rng, c, cut);
                }
            }
        }
        let mut quiet = false;
        for _ in 0..8 {
            let mut changed = false;
            for c in 1..=clients {
                changed |= w.sync(&mut rng, c, 0);
            }
            if !changed {
                quiet = true;
                break;
            }
        }
        let history = w.log.join("\n  ");
        assert!(quiet, "no quiescence after 8 passes\n  {history}");
        for c in 1..=clients {
            assert_eq!(
                w.replicas[c], w.replicas[0],
                "replica {c} differs\n  {history}"
            );
        }
        let held: HashSet<u64> = (w.replicas[0].values())
            .filter_map(|n| match n {
                Node::File { version, .. } => Some(*version),
                Node::Dir => None,
            })
            .collect();
        for v in w.written.difference(&w.killed) {
            assert!(
                held.contains(v),
                "version {v} was lost\n  {history}\n  final: {:?}",
                w.replicas[0]
            );
        }

        // Once all agree, a deletion anywhere reaches everyone, and nothing else changes.
        let agreed = w.replicas[0].clone();
        let files: Vec<RelPath> = (agreed.iter())
            .filter(|(_, n)| matches!(n, Node::File { .. }))
            .map(|(p, _)| p.clone())
            .collect();
        if let Some(p) = rng.pick(&files).cloned() {
            let r = rng.below(clients + 1);
            w.user_remove(r, &p);
            for _ in 0..2 {
                for c in 1..=clients {
                    w.sync(&mut rng, c, 0);
                }
            }
            let mut expected = agreed;
            expected.remove(&p);
            for r in 0..=clients {
                assert_eq!(
                    w.replicas[r], expected,
                    "replica {r} after deleting {p}\n  {history}"
                );
            }
        }
    }

    /// `MERGE_SEED=N` replays one case; `MERGE_CASES=N` runs more (default 3,000).
    #[test]
    fn replicas_converge_and_no_version_is_lost() {
        let seeds: Vec<u64> = match std::env::var("MERGE_SEED") {
            Ok(s) => vec![s.parse().expect("MERGE_SEED is a number")],
            Err(_) => {
                let n = std::env::var("MERGE_CASES").map_or(3_000, |s| s.parse().unwrap());
                (0..n).collect()
            }
        };
        for seed in seeds {
            if std::panic::catch_unwind(|| run(seed)).is_err() {
                panic!("model case failed; replay it with MERGE_SEED={seed}");
            }
        }
    }
}

/// The base changes a round makes: `old` and `target` as trees, `unsettled` paths
/// `,`-separated, the changes as `set PATH` / `remove PATH`.
fn check_settle(old: &str, target: &str, unsettled: &str, expected: &str) {
    let unsettled: Vec<RelPath> = (unsettled.split(',').map(str::trim))
        .filter(|s| !s.is_empty())
        .map(|s| RelPath::new(s).unwrap())
        .collect();
    let got: Vec<String> = settle(tree(old).entries(), &tree(target), &unsettled)
        .iter()
        .map(|c| match c {
            BaseChange::Set(e) => format!("set {}", e.path),
            BaseChange::Remove(p) => format!("remove {p}"),
        })
        .collect();
    assert_eq!(got.join("; "), expected, "\nold: {old}\ntarget: {target}");
}

#[test]
fn the_base_takes_the_target_where_both_sides_made_it() {
    check_settle("f a x", "f a x", "", "");
    check_settle("", "d d; f d/a x", "", "set d; set d/a");
    check_settle(
        "d d; f d/a x; f b y",
        "f b y2",
        "",
        "set b; remove d; remove d/a",
    );
    // One side failed to make d/a: the base keeps what it had there, and only there.
    check_settle(
        "d d; f d/a x; f b y",
        "d d; f d/a x2; f b y2",
        "d/a",
        "set b",
    );
    check_settle("d d; f d/a x", "f d z", "d", "");
    // What is never agreed on stays out of the base.
    check_settle("f a x", "u a; s b", "", "remove a");
}

#[test]
fn a_conflict_copy_is_asked_for_where_the_sender_has_it() {
    let sender = tree("f a theirs; f b same");
    let target = tree("f a ours; f a.sync-conflict-19700101-000000-C theirs; f b same; f n new");
    let server = tree("f a ours");
    let mut requests = crate::core::plan::plan(&target, &server).requests;
    name_sources(&mut requests, &sender);
    let asked: Vec<(&str, &str)> = (requests.iter())
        .map(|w| (w.path.as_str(), w.asked().as_str()))
        .collect();
    assert_eq!(
        asked,
        [
            ("a.sync-conflict-19700101-000000-C", "a"),
            ("b", "b"),
            // Nowhere on the sender: asked for as it is, and it fails there.
            ("n", "n"),
        ]
    );
}
