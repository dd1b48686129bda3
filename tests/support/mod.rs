//! Shared fixtures of the integration tests. They live in the `xtask` library
//! ([`xtask::testkit`]): a running `server-sync` whose log is captured and waited on,
//! `client-sync --once` runs, a text listing of a directory tree to compare client and server,
//! changes to a tree as data, and a `World` that prints everything a person needs to understand
//! a failure. Being a library, it lets each test crate use any subset without dead code, and it
//! shares the tree listing, MD5, shell quoting and refusing port with the scenario harness.

pub use xtask::testkit::*;

/// The binaries Cargo built for this test crate, for tests that start them by hand (the
/// fixtures find them at run time, see `xtask::testkit::server_bin`).
#[allow(dead_code, reason = "only some test crates start the binaries by hand")]
pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_server-sync");
#[allow(dead_code, reason = "only some test crates start the binaries by hand")]
pub const CLIENT_BIN: &str = env!("CARGO_BIN_EXE_client-sync");
