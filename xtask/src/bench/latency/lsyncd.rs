//! lsyncd, the peer of `bench latency`: its configuration, and the check that it is installed.
//!
//! lsyncd watches the source with inotify and runs rsync for each batch of changes; here it
//! pushes to the bench's own rsync daemon on loopback, so both tools cross the same loopback
//! into a server process, and the rsync daemon is lsyncd's server side in every figure.

use std::path::Path;

use super::super::Peer;

pub const LSYNCD: Peer = Peer {
    program: "lsyncd",
    version_arg: "--version",
    package: "lsyncd",
};

/// The configuration lsyncd runs with, for fairness as close to ours as lsyncd allows: in the
/// foreground (`nodaemon`, so the bench can stop and measure it), retrying a target not yet
/// reachable (`insist`), no batching delay (`delay = 0`: lsyncd starts rsync as soon as an
/// event arrives, as ours sends at once), and rsync in archive mode without compression (ours
/// does not compress, and on loopback compression only costs CPU). Deletions are on (lsyncd's
/// default), as ours mirrors them.
pub fn config(source: &Path, target: &str) -> String {
    // lsyncd wants the source as a directory; a trailing slash is how it is usually written.
    let mut source = source.display().to_string();
    if !source.ends_with('/') {
        source.push('/');
    }
    format!(
        "-- Written by `cargo xtask bench latency`.\n\
         settings {{\n    nodaemon = true,\n    insist = true,\n}}\n\n\
         sync {{\n    default.rsync,\n    source = {},\n    target = {},\n    delay = 0,\n    \
         rsync = {{\n        archive = true,\n        compress = false,\n    }},\n}}\n",
        lua_string(&source),
        lua_string(target)
    )
}

/// A Lua string literal holding `s`.
fn lua_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_configuration() {
        let c = config(
            Path::new("/tmp/src \"x\""),
            "rsync://127.0.0.1:873/latency/",
        );
        assert_eq!(
            c,
            "-- Written by `cargo xtask bench latency`.\n\
             settings {\n    nodaemon = true,\n    insist = true,\n}\n\n\
             sync {\n    default.rsync,\n    source = \"/tmp/src \\\"x\\\"/\",\n    \
             target = \"rsync://127.0.0.1:873/latency/\",\n    delay = 0,\n    \
             rsync = {\n        archive = true,\n        compress = false,\n    },\n}\n"
        );
        assert_eq!(lua_string("a\\b\nc"), "\"a\\\\b\\nc\"");
    }
}
