//! File data over data connections: the client streams requested files in bounded chunks
//! (holes as holes); the server writes each to a temporary file next to its target, hashing as
//! it writes, and renames it into place only when size and content hash match what the client
//! announced.
//!
//! Both ends are blocking code run on a thread of their own per connection: per file this is a
//! handful of system calls, where async file I/O would add a thread-pool hop to each of them.

mod hasher;
mod receive;
mod send;

pub use receive::{Received, receive};
pub use send::{Sent, Ticket, send};
