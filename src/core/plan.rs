//! Decides what the server must do to mirror the client: two manifests in, actions out, no I/O.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use crate::core::hash::ContentHash;
use crate::core::manifest::{
    Ancestors, Entry, Kind, Manifest, Meta, RelPath, Wanted, cmp_components,
};

/// A file whose content the server already holds under another path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalCopy {
    pub src: RelPath,
    pub dst: RelPath,
    pub size: u64,
    pub hash: ContentHash,
    pub meta: Meta,
    /// The source was going to be deleted: move it instead of copying it.
    pub is_move: bool,
}

/// The actions, grouped by the phase that runs them. The executor runs the phases in this
/// order, which is what makes every case safe:
/// 1. `copies`: read every local source into a staging area (copies before moves, then
///    `dir_moves`) before
///    anything is deleted or overwritten, so a source may be due for deletion, or be
///    another copy's target (a swap), and still be read intact;
/// 2. `deletes`, deepest first: what the client lacks, and whatever stands where the client
///    has an entry of another kind;
/// 3. `mkdirs`, shallowest first;
/// 4. staged copies are renamed into place, `symlinks` created or replaced;
/// 5. `requests` are fetched from the client;
/// 6. `file_meta` for entries whose content was already right, then `dir_meta` deepest
///    first, last because every change inside a directory moves its mtime.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub copies: Vec<LocalCopy>,
    /// Directories the server has where the client has none, whose whole contents are what
    /// the client has in a directory the server lacks (a directory renamed on the client):
    /// `(from, to)`, moved whole, taken into the staging area with the copies and put in
    /// place with them.
    pub dir_moves: Vec<(RelPath, RelPath)>,
    pub deletes: Vec<RelPath>,
    pub mkdirs: Vec<RelPath>,
    pub symlinks: Vec<(RelPath, String)>,
    pub requests: Vec<Wanted>,
    pub file_meta: Vec<(RelPath, Meta)>,
    pub dir_meta: Vec<(RelPath, Meta)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }

    /// What carrying out this plan changes, given the files that were `received`: the files
    /// written or given metadata, and the directories whose listing or metadata changed
    /// (`None`: the top). Flushing these makes the batch durable.
    pub fn written(&self, received: &[RelPath]) -> (Vec<RelPath>, Vec<Option<RelPath>>) {
        let files: BTreeSet<RelPath> = (self.copies.iter().map(|c| &c.dst))
            .chain(received)
            .chain(self.file_meta.iter().map(|(p, _)| p))
            .cloned()
            .collect();
        let moved_from = (self.copies.iter().filter(|c| c.is_move).map(|c| &c.src))
            .chain(self.dir_moves.iter().flat_map(|(from, to)| [from, to]));
        let listed_in: BTreeSet<Option<RelPath>> = (files.iter().chain(moved_from))
            .chain(&self.deletes)
            .chain(&self.mkdirs)
            .chain(self.symlinks.iter().map(|(p, _)| p))
            .map(RelPath::parent)
            .chain(self.mkdirs.iter().cloned().map(Some))
            .chain(self.dir_meta.iter().map(|(p, _)| Some(p.clone())))
            .collect();
        (files.into_iter().collect(), listed_in.into_iter().collect())
    }
}

/// Which entries can stand in for each other at one path without deleting first.
fn same_category(a: &Kind, b: &Kind) -> bool {
    matches!(
        (a, b),
        (
            Kind::File { .. } | Kind::Unhashed { .. },
            Kind::File { .. } | Kind::Unhashed { .. }
        ) | (Kind::Dir, Kind::Dir)
            | (Kind::Symlink { .. }, Kind::Symlink { .. })
    )
}

/// The plan that makes `server` mirror `client`. Its steps: what goes ([`deletions`]), what
/// is made or updated in place and which files need content ([`walk_client`]), where that
/// content comes from ([`find_content`]), and which directories get their metadata back.
pub fn plan(client: &Manifest, server: &Manifest) -> Plan {
    let mut p = Plan::default();
    let mut deletes = deletions(client, server);
    p.dir_moves = find_dir_moves(client, server, &mut deletes);
    let mut touched = Touched::new(client);
    let mut last = None;
    for parent in deletes.iter().filter_map(RelPath::parent_str) {
        // Deletions in component order mostly come in runs of one parent: a search per run.
        if last != Some(parent) {
            touched.mark(parent);
            last = Some(parent);
        }
    }
    for (_, to) in &p.dir_moves {
        touched.mark(to.as_str());
        if let Some(parent) = to.parent_str() {
            touched.mark(parent);
        }
    }
    let needs_content = walk_client(client, server, &mut p, &mut touched);
    find_content(needs_content, server, &mut p, &mut deletes);
    p.deletes = deletes.into_iter().rev().collect();
    p.dir_meta = (client.entries().iter().zip(touched.marks))
        .filter(|(c, marked)| *marked && c.kind == Kind::Dir)
        .map(|(c, _)| (c.path.clone(), c.meta))
        .rev()
        .collect();
    p
}

/// The client's entries whose listing or metadata changes, marked by their place in its list:
/// the directories among them get their metadata back at the end. Marks, not a set of paths:
/// a first sync marks a parent for each of its files, and a set would copy each one's path.
struct Touched<'a> {
    client: &'a [Entry],
    marks: Vec<bool>,
}

impl<'a> Touched<'a> {
    fn new(client: &'a Manifest) -> Self {
        let client = client.entries();
        let marks = vec![false; client.len()];
        Touched { client, marks }
    }

    /// Marks the client's directory found as an entry's parent (`None`: the top, or a parent
    /// the client does not list as a directory, which gets no metadata back either).
    fn mark_parent(&mut self, parent: Option<usize>) {
        if let Some(i) = parent {
            self.marks[i] = true;
        }
    }

    /// Marks the client's entry at `path`, if it has one: a search, for the few paths not met
    /// in a walk of the client's list.
    fn mark(&mut self, path: &str) {
        let found = self
            .client
            .binary_search_by(|e| cmp_components(e.path.as_str(), path));
        if let Ok(i) = found {
            self.marks[i] = true;
        }
    }
}

/// Both lists side by side in component order: each path once, with the client's entry and
/// the server's where they have one. One comparison a step, where looking each entry up in
/// the other list costs a binary search (14% of the server's CPU in a re-sync of an unchanged
/// 100,000-entry tree).
fn pairs<'a>(
    client: &'a Manifest,
    server: &'a Manifest,
) -> impl Iterator<Item = (Option<&'a Entry>, Option<&'a Entry>)> {
    use std::cmp::Ordering;
    let (mut c, mut s) = (client.iter().peekable(), server.iter().peekable());
    std::iter::from_fn(move || {
        let order = match (c.peek(), s.peek()) {
            (None, None) => return None,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(a), Some(b)) => a.path.cmp(&b.path),
        };
        Some(match order {
            Ordering::Less => (c.next(), None),
            Ordering::Greater => (None, s.next()),
            Ordering::Equal => (c.next(), s.next()),
        })
    })
}

/// What the server has that must go: what the client lacks, and whatever stands where the
/// client has an entry of another kind. What the client could not read keeps whatever the
/// server has there, and below it.
fn deletions(client: &Manifest, server: &Manifest) -> BTreeSet<RelPath> {
    // The client's unreadable entry the walk is at or below: what lies below a path follows
    // it as one run, so the server's entries it protects are those met until the walk leaves
    // it. Tracked as the walk goes, where looking up every entry's ancestors would cost a
    // search each.
    let mut protected: Option<&RelPath> = None;
    pairs(client, server)
        .filter_map(|(c, s)| {
            let path = &c.or(s)?.path;
            if protected.is_some_and(|u| !path.is_within(u)) {
                protected = None;
            }
            if protected.is_none()
                && let Some(c) = c.filter(|c| matches!(c.kind, Kind::Unreadable { .. }))
            {
                protected = Some(&c.path);
            }
            let s = s.filter(|_| protected.is_none())?;
            match c {
                Some(c) if same_category(&c.kind, &s.kind) => None,
                _ => Some(s.path.clone()),
            }
        })
        .collect()
}

/// Plans directories, symlinks and metadata-only changes for every client entry, notes the
/// directories whose listing changes, and returns the files whose content must be found.
fn walk_client<'a>(
    client: &'a Manifest,
    server: &'a Manifest,
    p: &mut Plan,
    touched: &mut Touched,
) -> Vec<&'a Entry> {
    let mut needs_content = Vec::new();
    let mut moved = p.dir_moves.iter().map(|(_, to)| to).peekable();
    // The client's directories above the entry at hand, by their place in its list.
    let mut dirs = Ancestors::default();
    let client_side = pairs(client, server).filter_map(|(c, s)| Some((c?, s)));
    for (i, (c, s)) in client_side.enumerate() {
        let parent = dirs.parent_of(&c.path);
        if c.kind == Kind::Dir {
            dirs.push_dir(&c.path, i);
        }
        // What a directory moved whole holds is in place with it.
        while moved
            .next_if(|to| **to < c.path && !c.path.is_within(to))
            .is_some()
        {}
        if moved.peek().is_some_and(|to| c.path.is_within(to)) {
            continue;
        }
        let s = s.filter(|s| same_category(&s.kind, &c.kind));
        let meta_differs = s.is_some_and(|s| s.meta != c.meta);
        match &c.kind {
            // Never synced: whatever the server has there goes, like anything the client lacks.
            Kind::Unreadable { .. } | Kind::Special { .. } => continue,
            Kind::Dir => {
                if s.is_none() {
                    p.mkdirs.push(c.path.clone());
                    touched.marks[i] = true;
                    touched.mark_parent(parent);
                } else if meta_differs {
                    touched.marks[i] = true;
                }
                continue;
            }
            Kind::Symlink { target } => match s.map(|s| &s.kind) {
                Some(Kind::Symlink { target: t }) if t == target => {
                    // Permission bits mean nothing on a Linux symlink: only its mtime.
                    if s.is_some_and(|s| {
                        (s.meta.mtime_secs, s.meta.mtime_nanos)
                            != (c.meta.mtime_secs, c.meta.mtime_nanos)
                    }) {
                        p.file_meta.push((c.path.clone(), c.meta));
                    }
                    continue;
                }
                _ => {
                    p.symlinks.push((c.path.clone(), target.clone()));
                    p.file_meta.push((c.path.clone(), c.meta));
                }
            },
            Kind::Unhashed { .. } => needs_content.push(c),
            Kind::File { .. } => {
                if s.is_some_and(|s| s.kind == c.kind) {
                    if meta_differs {
                        p.file_meta.push((c.path.clone(), c.meta));
                    }
                    continue;
                }
                needs_content.push(c);
            }
        }
        touched.mark_parent(parent);
    }
    needs_content
}

/// For each file that needs content: a local copy of a server file with the same hash (a
/// move when that source is due for deletion), else a request to the client.
fn find_content(
    needs_content: Vec<&Entry>,
    server: &Manifest,
    p: &mut Plan,
    deletes: &mut BTreeSet<RelPath>,
) {
    // Content the server already has, by hash, sorted so that a lookup is a binary search and
    // the choice among equal candidates is by path. Built only when some file needs content.
    let mut by_hash: Vec<(ContentHash, &RelPath)> = Vec::new();
    if !needs_content.is_empty() {
        by_hash = server
            .iter()
            .filter_map(|s| Some((s.hash()?, &s.path)))
            .collect();
        by_hash.sort_unstable();
    }
    let mut moves: HashMap<&RelPath, usize> = HashMap::new();
    for c in needs_content {
        let (size, hash) = match c.kind {
            Kind::File { size, hash } => (size, hash),
            Kind::Unhashed { size } => {
                p.requests.push(Wanted {
                    path: c.path.clone(),
                    size,
                    hash: None,
                    meta: c.meta,
                    from: None,
                });
                continue;
            }
            _ => unreachable!("only files need content"),
        };
        let first = by_hash.partition_point(|(m, _)| *m < hash);
        let sources = by_hash[first..]
            .iter()
            .take_while(|(m, _)| *m == hash)
            .map(|(_, p)| *p);
        // A source due for deletion is preferred: it can be moved rather than copied; one not
        // yet moved elsewhere, and of the same name, first (files of equal content renamed
        // together are each moved, not one moved and the rest copied from it).
        let mut chosen = None;
        let mut rank = 0;
        for src in sources {
            let r = match deletes.contains(src) {
                false => 1,
                true if moves.contains_key(src) => 2,
                true if src.file_name() != c.path.file_name() => 3,
                true => 4,
            };
            if r > rank {
                (chosen, rank) = (Some(src), r);
            }
        }
        match chosen {
            Some(src) => {
                if deletes.contains(src) {
                    moves.insert(src, p.copies.len());
                }
                p.copies.push(LocalCopy {
                    src: src.clone(),
                    dst: c.path.clone(),
                    size,
                    hash,
                    meta: c.meta,
                    is_move: false,
                });
            }
            None => p.requests.push(Wanted {
                path: c.path.clone(),
                size,
                hash: Some(hash),
                meta: c.meta,
                from: None,
            }),
        }
    }
    // The last use of a source due for deletion takes it: a move instead of copy + delete.
    for (src, i) in moves {
        p.copies[i].is_move = true;
        deletes.remove(src);
    }
    p.copies
        .sort_by(|a, b| (a.is_move, &a.dst).cmp(&(b.is_move, &b.dst)));
}

/// Directories the server would delete that hold exactly what a directory the client has
/// and the server lacks holds (names, kinds, content, targets, metadata): each pair becomes a
/// move of the whole directory, and leaves the deletions. Signatures are computed only when
/// there are both, and then only for those directories.
fn find_dir_moves(
    client: &Manifest,
    server: &Manifest,
    deletes: &mut BTreeSet<RelPath>,
) -> Vec<(RelPath, RelPath)> {
    let gone: Vec<&Entry> = server
        .iter()
        .filter(|s| s.kind == Kind::Dir && deletes.contains(&s.path))
        .collect();
    if gone.is_empty() {
        return Vec::new();
    }
    let new: Vec<&Entry> = client
        .iter()
        .filter(|c| c.kind == Kind::Dir)
        .filter(|c| !server.get(&c.path).is_some_and(|s| s.kind == Kind::Dir))
        .collect();
    if new.is_empty() {
        return Vec::new();
    }
    let mut by_signature: HashMap<ContentHash, Vec<&RelPath>> = HashMap::new();
    for d in gone {
        if let Some(sig) = signature(server, &d.path) {
            by_signature.entry(sig).or_default().push(&d.path);
        }
    }
    let mut moves: Vec<(RelPath, RelPath)> = Vec::new();
    for c in new {
        if moves.last().is_some_and(|(_, to)| c.path.is_within(to)) {
            continue; // inside a directory already moved whole
        }
        let Some(sig) = signature(client, &c.path) else {
            continue;
        };
        let Some(from) = by_signature.get_mut(&sig).and_then(Vec::pop) else {
            continue;
        };
        // Not one moved already, nor inside or around one.
        if moves
            .iter()
            .any(|(f, _)| from.is_within(f) || f.is_within(from))
        {
            continue;
        }
        moves.push((from.clone(), c.path.clone()));
    }
    for (from, _) in &moves {
        let inside: Vec<RelPath> = deletes
            .range(from.clone()..)
            .take_while(|d| d.is_within(from))
            .cloned()
            .collect();
        for d in inside {
            deletes.remove(&d);
        }
    }
    moves
}

/// What a directory holds, as one hash: every entry below it (its path from there, kind,
/// content or target, metadata). `None` when something below has no known content (an
/// unhashed, unreadable or special entry): such a directory is never moved whole.
fn signature(m: &Manifest, dir: &RelPath) -> Option<ContentHash> {
    use std::fmt::Write;
    let below = &m.subtree(dir).get(1..)?;
    if below.is_empty() {
        return None; // an empty directory is as cheap to make as to move
    }
    let mut h = crate::core::hash::HashAlgorithm::Blake3.hasher();
    let skip = dir.as_str().len() + 1;
    // As text, so that no byte layout lives outside the wire layer; NUL ends each field.
    let mut line = String::new();
    for e in below.iter() {
        line.clear();
        let path = &e.path.as_str()[skip..];
        let m = e.meta;
        let _ = write!(
            line,
            "{path}\0{:o} {}.{}\0",
            m.mode, m.mtime_secs, m.mtime_nanos
        );
        match &e.kind {
            Kind::File { size, hash } => {
                let _ = write!(line, "f {size} {hash}\0");
            }
            Kind::Dir => line.push_str("d\0"),
            Kind::Symlink { target } => {
                let _ = write!(line, "l {target}\0");
            }
            _ => return None,
        }
        h.update(line.as_bytes());
    }
    Some(h.finish())
}

impl fmt::Display for Plan {
    /// One line per action, in execution order: the form the table tests compare.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.copies {
            let verb = if c.is_move { "move" } else { "copy" };
            writeln!(f, "{verb} {} -> {}", c.src, c.dst)?;
        }
        for (from, to) in &self.dir_moves {
            writeln!(f, "movedir {from} -> {to}")?;
        }
        for d in &self.deletes {
            writeln!(f, "delete {d}")?;
        }
        for d in &self.mkdirs {
            writeln!(f, "mkdir {d}")?;
        }
        for (l, t) in &self.symlinks {
            writeln!(f, "symlink {l} -> {t}")?;
        }
        for r in &self.requests {
            writeln!(f, "request {}", r.path)?;
        }
        for (path, m) in &self.file_meta {
            writeln!(f, "meta {path} {:o} {}", m.mode, m.mtime_secs)?;
        }
        for (path, m) in &self.dir_meta {
            writeln!(f, "dirmeta {path} {:o} {}", m.mode, m.mtime_secs)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Parses a compact tree: entries separated by `;`, each `f PATH CONTENT`, `d PATH`,
    /// `l PATH TARGET`, `h PATH SIZE` (unhashed file), `u PATH` (unreadable) or `s PATH`
    /// (special), optionally followed by `m=MODE` (octal) and `t=MTIME`.
    /// Defaults: files 644, dirs 755, mtime 0.
    pub(crate) fn tree(spec: &str) -> Manifest {
        let entries = spec
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|item| {
                let mut words: Vec<&str> = item.split_whitespace().collect();
                let mut meta = Meta {
                    mode: if words[0] == "d" { 0o755 } else { 0o644 },
                    ..Meta::default()
                };
                words.retain(|w| {
                    if let Some(m) = w.strip_prefix("m=") {
                        meta.mode = u32::from_str_radix(m, 8).unwrap();
                    } else if let Some(t) = w.strip_prefix("t=") {
                        meta.mtime_secs = t.parse().unwrap();
                    } else {
                        return true;
                    }
                    false
                });
                let kind = match words[0] {
                    "f" => {
                        let content = words.get(2).copied().unwrap_or("");
                        Kind::File {
                            size: content.len() as u64,
                            hash: crate::core::hash::HashAlgorithm::Blake3.of(content.as_bytes()),
                        }
                    }
                    "d" => Kind::Dir,
                    "l" => Kind::Symlink {
                        target: words[2].into(),
                    },
                    "u" => Kind::Unreadable {
                        reason: "denied".into(),
                    },
                    "h" => Kind::Unhashed {
                        size: words[2].parse().unwrap(),
                    },
                    "s" => Kind::Special {
                        what: "FIFO".into(),
                    },
                    k => panic!("unknown kind {k}"),
                };
                Entry {
                    path: RelPath::new(words[1]).unwrap(),
                    kind,
                    meta,
                }
            });
        Manifest::from_entries(entries).unwrap()
    }

    fn check(client: &str, server: &str, expected: &str) {
        let got = plan(&tree(client), &tree(server)).to_string();
        let want: String = expected
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(got, want, "\nclient: {client}\nserver: {server}");
    }

    #[test]
    fn seed_cases() {
        // 001 add, 002 delete, 003 rename, 004 modify, 005 duplicate MD5.
        check("f a.txt x", "", "request a.txt");
        check("", "f a.txt x", "delete a.txt");
        check("f b.txt x", "f a.txt x", "move a.txt -> b.txt");
        check("f a.txt y", "f a.txt x", "request a.txt");
        check("f a x; f b x", "f a x", "copy a -> b");
        // 006 a file added on the server goes; 007 one deleted there comes back.
        check("f a x", "f a x; f extra y", "delete extra");
        check("f a x; f b y", "f a x", "request b");
    }

    #[test]
    fn nothing_to_do() {
        check("", "", "");
        check("d d; f d/a x; l s d/a", "d d; f d/a x; l s d/a", "");
    }

    #[test]
    fn directories() {
        check(
            "d a; d a/b; f a/b/c x",
            "",
            "mkdir a; mkdir a/b; request a/b/c; dirmeta a/b 755 0; dirmeta a 755 0",
        );
        check(
            "",
            "d a; d a/b; f a/b/c x",
            "delete a/b/c; delete a/b; delete a",
        );
        check("d e", "", "mkdir e; dirmeta e 755 0");
        check("d e m=700 t=9", "d e", "dirmeta e 700 9");
    }

    #[test]
    fn rename_across_directories() {
        check(
            "d a; d b; f b/f x",
            "d a; d b; f a/f x",
            "move a/f -> b/f; dirmeta b 755 0; dirmeta a 755 0",
        );
    }

    #[test]
    fn directories_renamed_move_whole() {
        // Renamed: one move, nothing inside touched, nothing requested.
        check(
            "d new; f new/a 1; d new/s; f new/s/b 2",
            "d old; f old/a 1; d old/s; f old/s/b 2",
            "movedir old -> new; dirmeta new 755 0",
        );
        // Moved into a directory made for it.
        check(
            "d top; d top/old; f top/old/a 1",
            "d old; f old/a 1",
            "movedir old -> top/old; mkdir top; dirmeta top/old 755 0; dirmeta top 755 0",
        );
        // Not the same contents (a file changed, or one more): file by file.
        check(
            "d new; f new/a 2",
            "d old; f old/a 1",
            "delete old/a; delete old; mkdir new; request new/a; dirmeta new 755 0",
        );
        check(
            "d new; f new/a 1; f new/b 1",
            "d old; f old/a 1",
            "copy old/a -> new/a; move old/a -> new/b; delete old; mkdir new; dirmeta new 755 0",
        );
        // Metadata differs inside: not whole.
        check(
            "d new; f new/a 1 m=600",
            "d old; f old/a 1",
            "move old/a -> new/a; delete old; mkdir new; dirmeta new 755 0",
        );
    }

    #[test]
    fn duplicate_md5() {
        // Several targets, one source due for deletion: copy all but the last, which moves it.
        check("f b x; f c x", "f a x", "copy a -> b; move a -> c");
        // A source that stays is copied, even if another candidate is kept too.
        check("f a x; f c x; f d x", "f a x; f c x", "copy a -> d");
        // The source may be a file being overwritten: staging reads it before.
        check("f a y; f b x", "f a x", "copy a -> b; request a");
        // A swap: both are read before either is replaced.
        check("f a y; f b x", "f a x; f b y", "copy b -> a; copy a -> b");
        // Empty files are content too.
        check("f e1; f e2", "f e1", "copy e1 -> e2");
        // Files of equal content renamed together: each moved, by name.
        check(
            "d n; f n/a x; f n/b x",
            "d o; f o/a x; f o/b x",
            "movedir o -> n; dirmeta n 755 0",
        );
        check(
            "f n1 x; f n2 x",
            "f o1 x; f o2 x",
            "move o1 -> n1; move o2 -> n2",
        );
    }

    #[test]
    fn kind_changes_delete_first() {
        check(
            "d a; f a/x 1",
            "f a 0",
            "delete a; mkdir a; request a/x; dirmeta a 755 0",
        );
        check("f a 0", "d a; f a/x 1", "delete a/x; delete a; request a");
        check("l a t", "f a 0", "delete a; symlink a -> t; meta a 644 0");
        check("f a 0", "l a t", "delete a; request a");
        check("l a new", "l a old", "symlink a -> new; meta a 644 0");
    }

    #[test]
    fn server_symlink_where_client_has_a_directory() {
        // The escape case: the link is replaced by a real directory before anything is written.
        check(
            "d link; f link/x 1",
            "l link /elsewhere",
            "delete link; mkdir link; request link/x; dirmeta link 755 0",
        );
    }

    #[test]
    fn metadata_only() {
        check("f a x m=600", "f a x", "meta a 600 0");
        check("f a x t=7", "f a x", "meta a 644 7");
        check("l s t t=7", "l s t", "meta s 644 7");
        check("l s t m=777", "l s t", "");
        check("d d m=700; f d/a x", "d d; f d/a x", "dirmeta d 700 0");
    }

    #[test]
    fn unreadable_on_client_keeps_server_copy() {
        check("u a", "f a x", "");
        check("u d", "d d; f d/a x; d d/e", "");
        check(
            "d d; u d/a",
            "d d; f d/a x; f d/b y",
            "delete d/b; dirmeta d 755 0",
        );
        check("u a", "", "");
    }

    #[test]
    fn unhashed_files_are_requested_with_their_md5_to_follow() {
        check("h big 9", "", "request big");
        check("h big 9", "f big 123456789", "request big");
        check("h big 9 m=600", "d big", "delete big; request big");
        // Never a copy source or target by MD5: it has none yet.
        check("h big 9; f b x", "f a x", "move a -> b; request big");
    }

    #[test]
    fn special_files_on_the_server_go() {
        check("", "s fifo", "delete fifo");
        check(
            "d a; f a/x 1",
            "s a",
            "delete a; mkdir a; request a/x; dirmeta a 755 0",
        );
        check("s a", "f a x", "delete a");
    }

    #[test]
    fn unreadable_on_server_is_replaced() {
        check("f a x", "u a", "delete a; request a");
        check("", "u a", "delete a");
    }

    /// The re-sync of an unchanged tree of 1,000 directories of 100 files: how long checking
    /// both lists and planning take. Prints figures, asserts only that nothing is planned; run
    /// with `cargo test --release --lib plan::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn timing_of_an_unchanged_tree() {
        use std::time::{Duration, Instant};
        let hash = crate::core::hash::HashAlgorithm::Blake3.of(b"x");
        let mut entries = Vec::with_capacity(101_000);
        for d in 0..1_000 {
            let dir = format!("d{d:04}");
            for f in 0..100 {
                entries.push(Entry {
                    path: RelPath::new(format!("{dir}/f{:06}", d * 100 + f)).unwrap(),
                    kind: Kind::File { size: 1, hash },
                    meta: Meta::default(),
                });
            }
            entries.push(Entry {
                path: RelPath::new(dir).unwrap(),
                kind: Kind::Dir,
                meta: Meta::default(),
            });
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        // The best of ten runs, each on its own copy of the input; the copy and the drop of
        // the result are not timed.
        fn best<I: Clone, O>(input: &I, mut f: impl FnMut(I) -> O) -> Duration {
            (0..10)
                .map(|_| {
                    let input = input.clone();
                    let t = Instant::now();
                    let out = std::hint::black_box(f(input));
                    let took = t.elapsed();
                    drop(out);
                    took
                })
                .min()
                .unwrap_or(Duration::ZERO)
        }
        let build = best(&entries, |e| Manifest::from_entries(e).unwrap());
        let client = Manifest::from_entries(entries).unwrap();
        let server = client.clone();
        let planning = best(&(), |()| plan(&client, &server));
        assert!(plan(&client, &server).is_empty());
        println!(
            "{} entries: from_entries {build:?}, plan {planning:?}",
            client.len()
        );
    }
}
