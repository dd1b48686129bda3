//! The no-I/O core: paths, manifests, content hashes and the plan. Nothing here touches the
//! file system, the network or the async runtime (the tidy test enforces it).

pub mod hash;
pub mod identity;
pub mod manifest;
pub mod merge;
pub mod plan;
pub mod stamp;
pub mod text;
