//! Restoring a stream onto a device. Several threads fetch, decrypt, decompress and verify
//! chunks (claiming neighbouring extents in order, so the output stays nearly sequential);
//! one thread writes. A single writer matters: buffered writes to one file serialize on the
//! inode lock, and several writers spin on it instead of decompressing. Zero extents are
//! skipped on sparse targets and written as zeros on others.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use blockdev::BlockDev;
use crossbeam_channel::{bounded, Receiver, Sender};

use crate::error::{Error, Result};
use crate::extents::{Extent, ExtentKind, StreamMap};
use crate::progress::Progress;
use crate::store::ChunkStore;

#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreOptions {
    /// Threads fetching and decrypting; 0 means one per core, plus one.
    pub threads: usize,
    /// Write zero extents (for targets that are not freshly created sparse files).
    pub write_zeros: bool,
}

/// Bytes written between hints that the written range may leave the page cache.
const RELEASE_EVERY: u64 = 64 << 20;

/// Extents claimed by a fetching thread at a time.
const BATCH: usize = 4;

enum Write {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

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
    // One more fetcher than cores, so reading packs overlaps with decrypting.
    let threads =
        if opts.threads == 0 { std::thread::available_parallelism().map_or(2, |n| n.get()) + 1 } else { opts.threads };
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let (write_tx, write_rx) = bounded::<Write>(threads * 2);
    let (recycle_tx, recycle_rx) = bounded::<Vec<u8>>(threads * 3);
    let results = std::thread::scope(|scope| {
        // Release hints (a sync, then a cache drop) run on their own thread, so the writer
        // keeps writing while earlier ranges go to disk.
        let (release_tx, release_rx) = bounded::<(u64, u64)>(4);
        scope.spawn(move || {
            for (offset, len) in release_rx {
                target.release(offset, len);
            }
        });
        let writer = scope.spawn(|| write_all(target, write_rx, recycle_tx, release_tx, progress));
        let fetchers: Vec<_> = (0..threads)
            .map(|_| {
                let (tx, recycled) = (write_tx.clone(), recycle_rx.clone());
                let (next, failed) = (&next, &failed);
                scope.spawn(move || {
                    let r = fetch_extents(store, map, opts.write_zeros, next, &tx, &recycled);
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                        next.store(usize::MAX / 2, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        drop(write_tx);
        let mut results: Vec<Result<()>> = fetchers
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Usage("restore thread panicked".into()))))
            .collect();
        results.push(writer.join().unwrap_or_else(|_| Err(Error::Usage("restore writer panicked".into()))));
        results
    });
    for r in results {
        r?;
    }
    target.flush().map_err(|e| Error::io("syncing the restore target", e))?;
    Ok(())
}

fn fetch_extents(
    store: &ChunkStore,
    map: &StreamMap,
    write_zeros: bool,
    next: &AtomicUsize,
    tx: &Sender<Write>,
    recycled: &Receiver<Vec<u8>>,
) -> Result<()> {
    let mut blob = Vec::new();
    loop {
        let start = next.fetch_add(BATCH, Ordering::Relaxed);
        if start >= map.extents.len() {
            return Ok(());
        }
        for e in &map.extents[start..(start + BATCH).min(map.extents.len())] {
            let w = match e.kind {
                ExtentKind::Chunk(id) => {
                    let mut data = recycled.try_recv().unwrap_or_default();
                    fetch_checked(store, e, id, &mut blob, &mut data)?;
                    Write::Data(e.offset, data)
                }
                ExtentKind::Zero => Write::Zero(e.offset, if write_zeros { u64::from(e.len) } else { 0 }),
            };
            if tx.send(w).is_err() {
                return Ok(()); // the writer failed; its error is reported
            }
        }
    }
}

fn fetch_checked(
    store: &ChunkStore,
    e: &Extent,
    id: crate::id::ChunkId,
    blob: &mut Vec<u8>,
    data: &mut Vec<u8>,
) -> Result<()> {
    store.fetch_into(&id, blob, data)?;
    crate::store::check_extent_len(&id, data.len(), e.len)
}

fn write_all(
    target: &dyn BlockDev,
    rx: Receiver<Write>,
    recycle: Sender<Vec<u8>>,
    release: Sender<(u64, u64)>,
    progress: &Progress,
) -> Result<()> {
    let zeros = vec![0u8; 1 << 20];
    // Written bytes since the last release hint, and the range they cover.
    let (mut pending, mut lo, mut hi) = (0u64, u64::MAX, 0u64);
    for w in rx {
        match w {
            Write::Data(offset, data) => {
                target.write_at(offset, &data).map_err(|e| Error::io(format!("writing the target at {offset}"), e))?;
                pending += data.len() as u64;
                lo = lo.min(offset);
                hi = hi.max(offset + data.len() as u64);
                if pending >= RELEASE_EVERY {
                    // If the releaser is behind, skip the hint rather than wait for it.
                    let _ = release.try_send((lo, hi - lo));
                    (pending, lo, hi) = (0, u64::MAX, 0);
                }
                progress.done.fetch_add(data.len() as u64, Ordering::Relaxed);
                let _ = recycle.try_send(data);
            }
            Write::Zero(offset, len) => {
                let mut pos = 0u64;
                while pos < len {
                    let n = (len - pos).min(zeros.len() as u64) as usize;
                    target
                        .write_at(offset + pos, &zeros[..n])
                        .map_err(|e| Error::io(format!("writing the target at {}", offset + pos), e))?;
                    pos += n as u64;
                }
                progress.done.fetch_add(len, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}
