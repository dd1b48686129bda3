//! The store layer: the only code that touches the synced tree (walks, reads, writes, the hash
//! cache behind them).

pub mod apply;
pub mod cache;
pub mod root;
pub mod scan;
