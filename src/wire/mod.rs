//! The wire layer: the only code that knows byte layouts (frames, control and data messages).

pub mod cache_file;
pub mod protocol;
