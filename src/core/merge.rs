//! Two-way sync's decision, no I/O: the base both sides agreed on and each side's list in, the
//! tree both must hold out, conflict copies included, so that no version either side wrote is lost.
//!
//! A change is a difference from the base by content (kind, and the hash or link target),
//! never a comparison of clocks across machines. Changed on one side only: it propagates
//! (deletions too). Changed on both to the same content: nothing to send. Changed on both
//! otherwise: a conflict, resolved so that both versions survive:
//! - two versions of a file (or link): the newer mtime keeps the name (ties: the larger side
//!   ID), the other is kept beside it as `NAME.sync-conflict-YYYYMMDD-HHMMSS-ID.EXT`, named
//!   after its own mtime and side, Syncthing's naming;
//! - modified against deleted: the modification stays;
//! - a directory against a file or link: the directory stays, the other becomes the copy;
//! - something added or changed inside a directory the other side deleted (or made a file):
//!   the directory comes back (and the file standing there becomes a copy).
//!
//! Without a base (never synced, or the base was lost) every path that differs is a conflict:
//! what one side has and the other lacks is kept, never deleted. Paths unreadable or special
//! on either side are left as each side has them, and the base keeps what it had there.
//!
//! The names of conflict copies depend only on the inputs, so a round that is interrupted and
//! run again makes the same copies rather than new ones.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::core::hash::ContentHash;
use crate::core::manifest::{Entry, Kind, Manifest, ManifestError, Meta, RelPath, Wanted};

/// One of the two sides of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Server => "server",
        })
    }
}

/// The two lists to merge, each with the short ID that names its side in conflict copies.
#[derive(Clone, Copy, Debug)]
pub struct Sides<'a> {
    pub client: &'a Manifest,
    pub server: &'a Manifest,
    pub client_id: &'a str,
    pub server_id: &'a str,
}

/// How a path both sides changed was settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Two versions: `winner`'s keeps `path`, the other's is kept as `kept_as`.
    Copy {
        path: RelPath,
        kept_as: RelPath,
        winner: Side,
    },
    /// Changed on one side, deleted on the other (or, without a base, present on one side
    /// only): what `kept_from` has stays.
    Kept { path: RelPath, kept_from: Side },
    /// A directory deleted (or replaced) on one side is back, because the other side has
    /// something new inside it.
    DirBack { path: RelPath },
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::core::text::Escaped;
        match self {
            // The server's log line is `Conflict: ` and this (issue 10's wording).
            Resolution::Copy { path, kept_as, .. } => write!(
                f,
                "{} (kept the other version as {})",
                Escaped(path.as_str()),
                Escaped(kept_as.as_str())
            ),
            Resolution::Kept { path, kept_from } => write!(
                f,
                "{} (changed on the {kept_from}, deleted on the {}: kept)",
                Escaped(path.as_str()),
                other(*kept_from)
            ),
            Resolution::DirBack { path } => write!(
                f,
                "{} (deleted on one side, but the other added to it: restored)",
                Escaped(path.as_str())
            ),
        }
    }
}

fn other(side: Side) -> Side {
    match side {
        Side::Client => Side::Server,
        Side::Server => Side::Client,
    }
}

/// The merge's result: the tree both sides are to hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merged {
    /// The agreed tree, without the paths left alone.
    pub target: Manifest,
    /// Paths (with what lies below them) each side keeps as it has them: unreadable or
    /// special on a side.
    pub left: Vec<RelPath>,
    pub resolutions: Vec<Resolution>,
}

impl Merged {
    /// What one side is to hold: the target, with that side's own entries at the paths left
    /// alone.
    pub fn for_side(&self, own: &Manifest) -> Manifest {
        if self.left.is_empty() {
            return self.target.clone();
        }
        let mut entries = self.target.entries().to_vec();
        for p in &self.left {
            entries.extend(own.subtree(p).iter().cloned());
        }
        Manifest::from_entries(entries).expect("the merge keeps the parents of the paths it leaves")
    }
}

/// What identifies a version at a path, apart from metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Content<'a> {
    Absent,
    File(&'a crate::core::hash::ContentHash),
    Dir,
    Link(&'a str),
    /// Not hashed: equal to nothing, so it is never silently replaced.
    Unknown,
}

fn content(e: Option<&Entry>) -> Content<'_> {
    match e.map(|e| &e.kind) {
        None => Content::Absent,
        Some(Kind::File { hash, .. }) => Content::File(hash),
        Some(Kind::Dir) => Content::Dir,
        Some(Kind::Symlink { target }) => Content::Link(target),
        Some(_) => Content::Unknown,
    }
}

/// Whether a side's entry must be left alone: nothing can be said about its content.
fn leave_alone(e: Option<&Entry>) -> bool {
    matches!(
        e.map(|e| &e.kind),
        Some(Kind::Unreadable { .. } | Kind::Special { .. })
    )
}

/// Merges `sides` against `base` (the entries both agreed on last, in component order, each
/// path once; `None` when there is no trustworthy base).
pub fn merge(base: Option<&[Entry]>, sides: Sides<'_>) -> Merged {
    let mut m = Merger {
        sides,
        out: Vec::with_capacity(sides.client.len().max(sides.server.len())),
        copies: Vec::new(),
        left: Vec::new(),
        resolutions: Vec::new(),
        has_base: base.is_some(),
    };
    let base = base.unwrap_or_default();
    let lists = [base, sides.client.entries(), sides.server.entries()];
    let mut at = [0usize; 3];
    while let Some(path) = next_path(&lists, &at) {
        let path = path.clone();
        let [o, a, b] = [0, 1, 2].map(|i| {
            let e = lists[i].get(at[i]).filter(|e| e.path == path);
            at[i] += e.is_some() as usize;
            e
        });
        if leave_alone(a) || leave_alone(b) {
            m.leave(path.clone());
            for i in 0..3 {
                while lists[i].get(at[i]).is_some_and(|e| e.path.is_within(&path)) {
                    at[i] += 1;
                }
            }
            continue;
        }
        m.decide(&path, o, a, b);
    }
    m.finish()
}

/// The smallest path at the heads of the three lists.
fn next_path<'a>(lists: &[&'a [Entry]; 3], at: &[usize; 3]) -> Option<&'a RelPath> {
    (0..3)
        .filter_map(|i| lists[i].get(at[i]).map(|e| &e.path))
        .min_by(|x, y| x.cmp(y))
}

/// A version to keep beside the winner: its entry at the path it lost, the ID of its side,
/// and the resolution that reports it.
struct Copy {
    lost: Entry,
    side_id: String,
    resolution: usize,
}

struct Merger<'a> {
    sides: Sides<'a>,
    /// The target so far, in component order.
    out: Vec<Entry>,
    /// Conflict copies: placed at the end, where their names sort.
    copies: Vec<Copy>,
    left: Vec<RelPath>,
    resolutions: Vec<Resolution>,
    has_base: bool,
}

impl Merger<'_> {
    /// One path, both sides' entries and the base's.
    fn decide(&mut self, path: &RelPath, o: Option<&Entry>, a: Option<&Entry>, b: Option<&Entry>) {
        let (ca, cb) = (content(a), content(b));
        if ca == cb && ca != Content::Unknown {
            if let (Some(a), Some(b)) = (a, b) {
                // Same content: the metadata of the side that changed it.
                let e = match o.is_some_and(|o| o.meta == a.meta) {
                    true => b,
                    false => a,
                };
                self.keep(e.clone());
            }
            return;
        }
        let co = content(o);
        let (changed_a, changed_b) = match self.has_base {
            true => (ca != co, cb != co),
            false => (true, true),
        };
        match (changed_a, changed_b, a, b) {
            (true, false, _, _) => self.take(a),
            (false, true, _, _) => self.take(b),
            (_, _, None, Some(b)) => self.keep_over_deletion(path, Side::Server, b),
            (_, _, Some(a), None) => self.keep_over_deletion(path, Side::Client, a),
            (_, _, Some(a), Some(b)) => self.conflict(a, b),
            // Unreachable: absent on both is the same content.
            (_, _, None, None) => {}
        }
    }

    /// Present on one side only, both changed: modified against deleted (reported), or no
    /// base to tell an addition from a deletion (the union, as a first sync makes).
    fn keep_over_deletion(&mut self, path: &RelPath, kept_from: Side, e: &Entry) {
        if self.has_base {
            self.resolutions.push(Resolution::Kept {
                path: path.clone(),
                kept_from,
            });
        }
        self.keep(e.clone());
    }

    fn take(&mut self, e: Option<&Entry>) {
        if let Some(e) = e {
            self.keep(e.clone());
        }
    }

    /// Two different versions at one path.
    fn conflict(&mut self, a: &Entry, b: &Entry) {
        let winner = match (a.kind == Kind::Dir, b.kind == Kind::Dir) {
            (true, false) => Side::Client,
            (false, true) => Side::Server,
            _ => {
                let ta = (a.meta.mtime_secs, a.meta.mtime_nanos, self.sides.client_id);
                let tb = (b.meta.mtime_secs, b.meta.mtime_nanos, self.sides.server_id);
                match ta.cmp(&tb) {
                    Ordering::Greater => Side::Client,
                    _ => Side::Server,
                }
            }
        };
        let (win, lose, loser_id) = match winner {
            Side::Client => (a, b, self.sides.server_id),
            Side::Server => (b, a, self.sides.client_id),
        };
        let kept_as = conflict_name(&lose.path, &lose.meta, loser_id, 1);
        self.copies.push(Copy {
            lost: lose.clone(),
            side_id: loser_id.to_string(),
            resolution: self.resolutions.len(),
        });
        self.resolutions.push(Resolution::Copy {
            path: a.path.clone(),
            kept_as,
            winner,
        });
        self.keep(win.clone());
    }

    /// A path each side keeps as it has it; its parent must still be there.
    fn leave(&mut self, path: RelPath) {
        self.make_parent(&path);
        self.left.push(path);
    }

    /// Adds `e` to the target, after making sure its parent is a directory there.
    fn keep(&mut self, e: Entry) {
        self.make_parent(&e.path);
        self.out.push(e);
    }

    /// Makes `path`'s parent a directory of the target: brought back if the merge dropped it
    /// (and its own parent, up to the top), turned back into a directory if the merge made
    /// it a file or link there (which then becomes a conflict copy). Everything already in
    /// the target sorts before `path`, and nothing below a parent dropped or replaced can be
    /// in it (it would have needed this parent), so the parent, if present, is the last entry
    /// on its branch and goes back at the end.
    fn make_parent(&mut self, path: &RelPath) {
        let Some(parent) = path.parent() else { return };
        let found = self.out.binary_search_by(|e| e.path.cmp(&parent));
        match found {
            Ok(i) if self.out[i].kind == Kind::Dir => {}
            Ok(i) => {
                // A file or link the merge put where the other side still has a directory
                // with something new in it.
                let file = self.out.remove(i);
                debug_assert_eq!(i, self.out.len(), "nothing below a file is in the target");
                let (side, side_id) = self.side_of(&file);
                let kept_as = conflict_name(&file.path, &file.meta, side_id, 1);
                self.copies.push(Copy {
                    lost: file,
                    side_id: side_id.to_string(),
                    resolution: self.resolutions.len(),
                });
                self.resolutions.push(Resolution::Copy {
                    path: parent.clone(),
                    kept_as,
                    winner: other(side),
                });
                self.restore_dir(parent, false);
            }
            Err(_) => self.restore_dir(parent, true),
        }
    }

    /// Puts the directory `dir` back into the target, with the metadata a side that has it
    /// as a directory gives it.
    fn restore_dir(&mut self, dir: RelPath, report: bool) {
        self.make_parent(&dir);
        let from = [self.sides.server, self.sides.client]
            .into_iter()
            .filter_map(|m| m.get(&dir))
            .find(|e| e.kind == Kind::Dir);
        let meta = from.map(|e| e.meta).unwrap_or(Meta {
            mode: 0o755,
            ..Meta::default()
        });
        if report {
            self.resolutions
                .push(Resolution::DirBack { path: dir.clone() });
        }
        self.out.push(Entry {
            path: dir,
            kind: Kind::Dir,
            meta,
        });
    }

    /// Which side a version came from, and that side's ID (the client's when both have it).
    fn side_of(&self, e: &Entry) -> (Side, &str) {
        match self.sides.client.get(&e.path) == Some(e) {
            true => (Side::Client, self.sides.client_id),
            false => (Side::Server, self.sides.server_id),
        }
    }

    /// The target with its conflict copies placed: a copy whose name is taken by the same
    /// content is already there (a round run again); one taken by anything else gets a
    /// number after its side's ID.
    fn finish(mut self) -> Merged {
        let mut taken: HashSet<RelPath> = HashSet::new();
        let mut placed = Vec::with_capacity(self.copies.len());
        for c in std::mem::take(&mut self.copies) {
            let mut n = 1;
            let path = loop {
                let path = conflict_name(&c.lost.path, &c.lost.meta, &c.side_id, n);
                let here =
                    (self.out.binary_search_by(|e| e.path.cmp(&path)).ok()).map(|i| &self.out[i]);
                match here {
                    Some(e) if e.kind == c.lost.kind => break None,
                    None if !taken.contains(&path)
                        && self.sides.client.get(&path).is_none()
                        && self.sides.server.get(&path).is_none() =>
                    {
                        break Some(path);
                    }
                    _ => n += 1,
                }
            };
            if let Some(path) = path {
                taken.insert(path.clone());
                if let Resolution::Copy { kept_as, .. } = &mut self.resolutions[c.resolution] {
                    *kept_as = path.clone();
                }
                placed.push(Entry { path, ..c.lost });
            }
        }
        self.out.extend(placed);
        self.out.sort_by(|x, y| x.path.cmp(&y.path));
        let target = Manifest::from_entries(self.out)
            .unwrap_or_else(|e: ManifestError| unreachable!("the merge makes a tree: {e}"));
        Merged {
            target,
            left: self.left,
            resolutions: self.resolutions,
        }
    }
}

/// One path's change to the base after a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BaseChange {
    Set(Entry),
    Remove(RelPath),
}

impl BaseChange {
    pub fn path(&self) -> &RelPath {
        match self {
            BaseChange::Set(e) => &e.path,
            BaseChange::Remove(p) => p,
        }
    }
}

/// What the base becomes after a round that made `target` on both sides, except at the
/// `unsettled` paths (and below them): those one side failed to make, or left alone. The base
/// takes the target's state at every other path, one change per path that differs from `old`
/// (in component order); at the unsettled ones it keeps what it had, so the next round sees
/// there what it saw in this one. Only files, directories and links are ever agreed on.
pub fn settle(old: &[Entry], target: &Manifest, unsettled: &[RelPath]) -> Vec<BaseChange> {
    let mut unsettled = unsettled.to_vec();
    unsettled.sort();
    let is_unsettled = |p: &RelPath| {
        !unsettled.is_empty()
            && std::iter::successors(Some(p.clone()), RelPath::parent)
                .any(|a| unsettled.binary_search(&a).is_ok())
    };
    let agreed = |e: &Entry| matches!(e.kind, Kind::File { .. } | Kind::Dir | Kind::Symlink { .. });
    let mut changes = Vec::new();
    let (mut old, mut new) = (old.iter().peekable(), target.iter().peekable());
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(o), Some(n)) => o.path.cmp(&n.path),
        };
        let change = match order {
            Ordering::Less => Some(BaseChange::Remove(old.next().expect("peeked").path.clone())),
            Ordering::Greater => {
                let n = new.next().expect("peeked");
                agreed(n).then(|| BaseChange::Set(n.clone()))
            }
            Ordering::Equal => {
                let (o, n) = (old.next().expect("peeked"), new.next().expect("peeked"));
                match (o == n, agreed(n)) {
                    (true, _) => None,
                    (false, true) => Some(BaseChange::Set(n.clone())),
                    (false, false) => Some(BaseChange::Remove(o.path.clone())),
                }
            }
        };
        if let Some(c) = change.filter(|c| !is_unsettled(c.path())) {
            changes.push(c);
        }
    }
    changes
}

/// Names, for each file a side must get from the other, where the other holds its content
/// when not at the same path (a conflict copy of the sender's version, new on both sides):
/// `Wanted::from`. A request the sender cannot answer at all is left as it is and fails.
pub fn name_sources(requests: &mut [Wanted], sender: &Manifest) {
    let mut by_hash: Option<HashMap<ContentHash, &RelPath>> = None;
    for w in requests {
        let Some(hash) = w.hash else { continue };
        if sender.get(&w.path).and_then(Entry::hash) == Some(hash) {
            continue;
        }
        let index = by_hash.get_or_insert_with(|| {
            (sender.iter())
                .filter_map(|e| Some((e.hash()?, &e.path)))
                .collect()
        });
        w.from = index.get(&hash).map(|p| (*p).clone());
    }
}

/// `NAME.sync-conflict-YYYYMMDD-HHMMSS-ID.EXT` beside `path`, the date the version's mtime in
/// UTC; the `n`th name, when earlier ones are taken, has `-n` after the ID. A name too long
/// for a path component loses the end of its stem.
pub fn conflict_name(path: &RelPath, meta: &Meta, side_id: &str, n: u32) -> RelPath {
    let name = path.file_name();
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let mut tag = format!(".sync-conflict-{}-{side_id}", utc_stamp(meta.mtime_secs));
    if n > 1 {
        tag.push_str(&format!("-{n}"));
    }
    // Keep the component within 255 bytes, cutting the stem on a character boundary.
    let room = 255usize.saturating_sub(tag.len() + ext.len()).max(1);
    let mut cut = stem.len().min(room);
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    let file = format!("{}{tag}{ext}", &stem[..cut]);
    sibling(path, &file)
}

fn sibling(path: &RelPath, name: &str) -> RelPath {
    let full = match path.parent_str() {
        Some(p) => format!("{p}/{name}"),
        None => name.to_string(),
    };
    // The name is made of a valid component and ASCII; only the whole path's length can be
    // refused, and then the copy goes to the top with a shorter name.
    RelPath::new(full).unwrap_or_else(|_| RelPath::new(name).expect("a component is a valid path"))
}

/// `YYYYMMDD-HHMMSS` in UTC for seconds since the epoch (Hinnant's civil-from-days).
fn utc_stamp(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
#[path = "merge_tests.rs"]
mod tests;
