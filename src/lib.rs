//! server-sync: keeps a server directory an exact, verified mirror of a client directory.
//!
//! The binaries are thin: `server-sync` calls [`server::run`], `client-sync` calls
//! [`client::sync_once`] or [`client::run`]. See ARCHITECTURE.md for the map; the layering
//! rules are checked by `tests/tidy.rs`.

// Layers, arrows pointing down: binaries → server, client → transfer → store → wire → core;
// events and process beside them (events uses only core, process nothing).
pub mod client;
pub mod core;
pub mod events;
pub mod process;
pub mod server;
pub mod store;
pub mod transfer;
pub mod wire;
