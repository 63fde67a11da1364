//! Restoring a stream onto a device: chunks fetched, decrypted and written by several
//! threads at once, in any order (each write goes to its own offset). Zero extents are
//! skipped on sparse targets and written as zeros on others.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use blockdev::BlockDev;

use crate::backup::Progress;
use crate::error::{Error, Result};
use crate::extents::{ExtentKind, StreamMap};
use crate::store::ChunkStore;

#[derive(Clone, Copy, Debug)]
pub struct RestoreOptions {
    /// Threads fetching and writing; 0 means two per core.
    pub threads: usize,
    /// Write zero extents (for targets that are not freshly created sparse files).
    pub write_zeros: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self { threads: 0, write_zeros: false }
    }
}

/// Extents claimed by a thread at a time: neighbours stay together for the disk's sake.
const BATCH: usize = 4;

pub fn restore(
    store: &ChunkStore,
    map: &StreamMap,
    target: &dyn BlockDev,
    opts: RestoreOptions,
    progress: &Progress,
) -> Result<()> {
    if target.len() < map.size {
        return Err(Error::Usage(format!("target holds {} bytes, the stream needs {}", target.len(), map.size)));
    }
    progress.total.store(map.size, Ordering::Relaxed);
    let threads =
        if opts.threads == 0 { 2 * std::thread::available_parallelism().map_or(2, |n| n.get()) } else { opts.threads };
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let zeros = vec![0u8; 1 << 20];
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    let (mut blob, mut data) = (Vec::new(), Vec::new());
                    loop {
                        if failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let start = next.fetch_add(BATCH, Ordering::Relaxed);
                        if start >= map.extents.len() {
                            return Ok(());
                        }
                        for e in &map.extents[start..(start + BATCH).min(map.extents.len())] {
                            let r = restore_extent(store, e, target, opts.write_zeros, &zeros, (&mut blob, &mut data));
                            if r.is_err() {
                                failed.store(true, Ordering::Relaxed);
                                return r;
                            }
                            written.fetch_add(u64::from(e.len), Ordering::Relaxed);
                            progress.done.fetch_add(u64::from(e.len), Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Usage("restore thread panicked".into()))))
            .collect::<Result<Vec<()>>>()
    })?;
    target.flush().map_err(|e| Error::io("syncing the restore target", e))?;
    Ok(())
}

fn restore_extent(
    store: &ChunkStore,
    e: &crate::extents::Extent,
    target: &dyn BlockDev,
    write_zeros: bool,
    zeros: &[u8],
    (blob, data): (&mut Vec<u8>, &mut Vec<u8>),
) -> Result<()> {
    let io = |err| Error::io(format!("writing the target at {}", e.offset), err);
    match e.kind {
        ExtentKind::Chunk(id) => {
            store.fetch_into(&id, blob, data)?;
            if data.len() != e.len as usize {
                return Err(Error::corrupt(
                    format!("chunk {}", id.short()),
                    format!("holds {} bytes, the stream map says {}", data.len(), e.len),
                ));
            }
            target.write_at(e.offset, data).map_err(io)
        }
        ExtentKind::Zero if write_zeros => {
            let mut pos = 0u64;
            while pos < u64::from(e.len) {
                let n = (u64::from(e.len) - pos).min(zeros.len() as u64) as usize;
                target.write_at(e.offset + pos, &zeros[..n]).map_err(io)?;
                pos += n as u64;
            }
            Ok(())
        }
        ExtentKind::Zero => Ok(()),
    }
}
