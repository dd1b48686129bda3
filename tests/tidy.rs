//! Tidy: the layering rules of ARCHITECTURE.md, checked on the source text (as rust-analyzer's
//! tidy test does), so that a change that breaks one fails here with the file and line.
//!
//! - Every Rust file opens with a `//!` line.
//! - Arrows point down: a module of `src/` uses only the layers its row below allows.
//! - The no-I/O core uses no `std::fs`, `std::net`, `std::process`, `std::thread` or tokio.
//! - Only the wire layer knows byte layouts: integer byte-order conversions appear nowhere else.
//! - Only the store layer touches the file system (and so the synced tree): `std::fs`, `File`,
//!   `OpenOptions` and `rustix::fs` appear nowhere else in the library.

use std::fs;
use std::path::{Path, PathBuf};

/// What each layer of `src/` may use of the crate; the binaries may use anything.
const LAYERS: &[(&str, &[&str])] = &[
    ("core", &["core"]),
    ("events", &["core", "events"]),
    ("wire", &["core", "wire"]),
    ("process", &["process"]),
    ("store", &["core", "wire", "events", "process", "store"]),
    (
        "transfer",
        &["core", "wire", "events", "store", "transfer", "process"],
    ),
    (
        "server",
        &[
            "core", "wire", "events", "store", "transfer", "process", "server",
        ],
    ),
    (
        "client",
        &[
            "core", "wire", "events", "store", "transfer", "process", "client",
        ],
    ),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = rd.map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The layer of a file under `src/`: its first path component, without `.rs`.
fn layer_of(rel: &Path) -> Option<String> {
    let mut c = rel.strip_prefix("src").ok()?.components();
    let first = c.next()?.as_os_str().to_str()?;
    match first {
        "bin" | "lib.rs" => None,
        f => Some(f.trim_end_matches(".rs").to_owned()),
    }
}

/// The code lines of a file with their numbers: comments and the `#[cfg(test)]` module left
/// out (tests may use files and sockets to check the code that may not). The test module is
/// the last item of a file (clippy's `items_after_test_module`); a single `#[cfg(test)]` item
/// elsewhere is checked like the rest.
fn code_lines(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut in_tests = false;
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let next_is_mod = lines.get(i + 1).is_some_and(|n| {
            let n = n.trim_start();
            n.starts_with("mod ") || n.starts_with("pub(crate) mod ")
        });
        if t.starts_with("#[cfg(test)]") && next_is_mod {
            in_tests = true;
        }
        if in_tests || t.starts_with("//") {
            continue;
        }
        let code = match line.find("//") {
            // A `//` inside a string literal (a URL, a path) is rare enough here to ignore.
            Some(at) => &line[..at],
            None => line,
        };
        out.push((i + 1, code));
    }
    out
}

/// The crate modules a line names: `crate::x` and `use crate::{x, y}`.
fn crate_uses(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name = item.trim().split("::").next().unwrap_or("").trim();
                if !name.is_empty() {
                    out.push(name.to_owned());
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out
}

fn violations() -> Vec<String> {
    let root = root();
    let mut files = Vec::new();
    for dir in ["src", "tests", "xtask/src", "xtask/tests"] {
        rust_files(&root.join(dir), &mut files);
    }
    let mut bad = Vec::new();
    for path in files {
        let rel = path.strip_prefix(&root).unwrap().to_owned();
        let text = fs::read_to_string(&path).unwrap();
        if !text.starts_with("//!") {
            bad.push(format!(
                "{}:1: does not open with a `//!` line",
                rel.display()
            ));
        }
        let Some(layer) = layer_of(&rel) else {
            continue;
        };
        let allowed = LAYERS
            .iter()
            .find(|(l, _)| *l == layer)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("{}: layer {layer:?} is not in LAYERS", rel.display()));
        for (n, line) in code_lines(&text) {
            let at = format!("{}:{n}", rel.display());
            for used in crate_uses(line) {
                if !allowed.contains(&used.as_str()) {
                    bad.push(format!("{at}: the {layer} layer uses crate::{used}"));
                }
            }
            if layer == "core" {
                for word in [
                    "std::fs",
                    "std::net",
                    "std::process",
                    "std::thread",
                    "tokio",
                ] {
                    if line.contains(word) {
                        bad.push(format!("{at}: the no-I/O core uses {word}"));
                    }
                }
            }
            if layer != "wire" {
                for word in [
                    "to_be_bytes",
                    "from_be_bytes",
                    "to_le_bytes",
                    "from_le_bytes",
                ] {
                    if line.contains(word) {
                        bad.push(format!("{at}: byte layout ({word}) outside the wire layer"));
                    }
                }
            }
            if layer != "store" {
                for word in ["std::fs", "fs::", "File::", "OpenOptions", "rustix::fs"] {
                    if line.contains(word) {
                        bad.push(format!(
                            "{at}: file system access ({word}) outside the store"
                        ));
                    }
                }
            }
        }
    }
    bad
}

#[test]
fn layering_rules_hold() {
    let bad = violations();
    assert!(
        bad.is_empty(),
        "{} rule(s) broken (see ARCHITECTURE.md, \"Invariants\"):\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn the_checks_can_fail() {
    assert_eq!(crate_uses("use crate::{core::x, wire};"), ["core", "wire"]);
    assert_eq!(
        crate_uses("let a = crate::store::root::Root::new();"),
        ["store"]
    );
    assert_eq!(
        layer_of(Path::new("src/core/plan.rs")).as_deref(),
        Some("core")
    );
    assert_eq!(
        layer_of(Path::new("src/events.rs")).as_deref(),
        Some("events")
    );
    assert_eq!(layer_of(Path::new("src/bin/x.rs")), None);
    let lines = code_lines("a\n// b\nc // d\n#[cfg(test)]\nmod tests { e }");
    assert_eq!(lines, [(1, "a"), (3, "c ")]);
    let lines = code_lines("#[cfg(test)]\nfn f() {}\ng");
    assert_eq!(lines, [(1, "#[cfg(test)]"), (2, "fn f() {}"), (3, "g")]);
}
