//! Progress counters that long operations (backup, restore, check) update and a display
//! polls from another thread.

use std::sync::atomic::AtomicU64;

/// Bytes processed so far out of a total; both only ever grow.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}
