//! A stream of a snapshot as a [`BlockDev`]: random access by binary search in the stream
//! map, zero extents answered without I/O (and reported by `allocation`), chunks fetched in
//! parallel through the shared [`ChunkStore`], and read-ahead when reads are sequential.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blockdev::{check_range, Allocation, BlockDev, Run};
use crossbeam_channel::{Receiver, Sender};

use crate::extents::{ExtentKind, StreamMap};
use crate::id::ChunkId;
use crate::store::ChunkStore;

/// Read-ahead tuning.
#[derive(Clone, Copy, Debug)]
pub struct ReadAhead {
    /// Chunks fetched ahead of a sequential reader.
    pub chunks: usize,
    /// Threads fetching in the background: the chunks of multi-chunk reads, of
    /// [`BlockDev::will_need`] hints and of read-ahead. 0: every chunk is fetched by the read
    /// that needs it, and hints are ignored.
    pub threads: usize,
}

impl ReadAhead {
    /// No guessing: only reads and [`BlockDev::will_need`] hints fetch chunks. For a caller
    /// whose sequential reads are not a sign of more to come (a CBT backup reads the parent
    /// around each change only, the hints say where).
    pub fn hinted() -> Self {
        Self { chunks: 0, ..Self::default() }
    }
}

impl Default for ReadAhead {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8);
        Self { chunks: 2 * threads, threads }
    }
}

/// A readable stream. `Send + Sync`: FUSE and NBD threads may read concurrently.
#[derive(Debug)]
pub struct StreamReader {
    store: Arc<ChunkStore>,
    map: StreamMap,
    ahead: ReadAhead,
    last_end: AtomicU64,
    prefetch: Option<Sender<ChunkId>>,
}

impl StreamReader {
    pub fn new(store: Arc<ChunkStore>, map: StreamMap, ahead: ReadAhead) -> Self {
        let prefetch = (ahead.threads > 0).then(|| spawn_prefetchers(&store, ahead.threads));
        Self { store, map, ahead, last_end: AtomicU64::new(u64::MAX), prefetch }
    }

    /// The chunk store the stream reads from.
    pub fn store(&self) -> &Arc<ChunkStore> {
        &self.store
    }

    pub fn map(&self) -> &StreamMap {
        &self.map
    }

    /// Queue background fetches of the chunks of extents `from..` (up to `n` chunks).
    fn queue(&self, from: usize, n: usize) {
        let Some(tx) = &self.prefetch else { return };
        let ids = self.map.extents[from.min(self.map.extents.len())..]
            .iter()
            .filter_map(|e| match e.kind {
                ExtentKind::Chunk(id) => Some(id),
                ExtentKind::Zero => None,
            })
            .take(n);
        for id in ids {
            if self.store.cached(&id).is_none() && tx.try_send(id).is_err() {
                break; // queue full: the fetchers are busy enough
            }
        }
    }
}

fn spawn_prefetchers(store: &Arc<ChunkStore>, threads: usize) -> Sender<ChunkId> {
    let (tx, rx): (Sender<ChunkId>, Receiver<ChunkId>) = crossbeam_channel::bounded(64);
    for i in 0..threads {
        let (rx, store) = (rx.clone(), Arc::downgrade(store));
        let _ = std::thread::Builder::new().name(format!("prefetch-{i}")).spawn(move || {
            while let Ok(id) = rx.recv() {
                let Some(store) = store.upgrade() else { return };
                // Errors surface when the reader itself asks for the chunk.
                let _ = store.get(&id);
            }
        });
    }
    tx
}

impl BlockDev for StreamReader {
    fn len(&self) -> u64 {
        self.map.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.map.size, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let first = self.map.find(offset);
        let end = offset + buf.len() as u64;
        let last = self.map.find(end - 1);
        let sequential = self.last_end.swap(end, Ordering::Relaxed) == offset;
        // Fetch every chunk of a multi-chunk read in parallel; read ahead when sequential.
        let ahead = if sequential { self.ahead.chunks } else { 0 };
        if last > first || ahead > 0 {
            self.queue(first + 1, last - first + ahead);
        }
        for e in &self.map.extents[first..=last] {
            let (s, t) = (e.offset.max(offset), e.end().min(end));
            let out = &mut buf[(s - offset) as usize..(t - offset) as usize];
            match e.kind {
                ExtentKind::Zero => out.fill(0),
                ExtentKind::Chunk(id) => {
                    let data = self.store.get(&id).map_err(io::Error::from)?;
                    crate::store::check_extent_len(&id, data.len(), e.len)?;
                    let from = (s - e.offset) as usize;
                    out.copy_from_slice(&data[from..from + out.len()]);
                }
            }
        }
        Ok(())
    }

    /// Queue the chunks of the range to the background fetchers (NBD CACHE, FUSE
    /// read-ahead).
    fn will_need(&self, offset: u64, len: u64) {
        if offset >= self.map.size || len == 0 {
            return;
        }
        let first = self.map.find(offset);
        let last = self.map.find(offset.saturating_add(len).min(self.map.size) - 1);
        self.queue(first, last - first + 1);
    }

    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<Run> {
        check_range(self.map.size, offset, 1)?;
        let limit = offset.saturating_add(max_len).min(self.map.size);
        let mut i = self.map.find(offset);
        let zero = self.map.extents[i].kind == ExtentKind::Zero;
        let mut end = self.map.extents[i].end();
        while end < limit
            && i + 1 < self.map.extents.len()
            && (self.map.extents[i + 1].kind == ExtentKind::Zero) == zero
        {
            i += 1;
            end = self.map.extents[i].end();
        }
        let kind = if zero { Allocation::Zero } else { Allocation::Data };
        Ok(Run { kind, len: end.min(limit) - offset })
    }
}

/// Opens any stream of any snapshot of a repository for reading, sharing one [`ChunkStore`]
/// (and so one chunk cache) among them. Long-lived readers (NBD server, FUSE mount) see
/// snapshots made after they started: asking for one reloads the index first.
#[derive(Debug)]
pub struct RepoReader {
    repo: Arc<crate::Repository>,
    index_pages: usize,
    cache_bytes: usize,
    /// The store, and the snapshots whose chunks its index is known to cover.
    store: std::sync::Mutex<(Arc<ChunkStore>, std::collections::HashSet<crate::SnapshotId>)>,
}

impl RepoReader {
    /// `index_pages` decrypted index pages and `cache_bytes` of decompressed chunks are
    /// kept in memory.
    pub fn new(repo: Arc<crate::Repository>, index_pages: usize, cache_bytes: usize) -> crate::Result<Self> {
        let store = Self::load(&repo, index_pages, cache_bytes)?;
        Ok(Self { repo, index_pages, cache_bytes, store: std::sync::Mutex::new(store) })
    }

    fn load(
        repo: &Arc<crate::Repository>,
        pages: usize,
        cache: usize,
    ) -> crate::Result<(Arc<ChunkStore>, std::collections::HashSet<crate::SnapshotId>)> {
        // Snapshots listed before the index is loaded: their chunks are all in it.
        let known = repo.list_snapshots()?.into_iter().map(|e| e.id).collect();
        let store = Arc::new(ChunkStore::new(repo.clone(), repo.load_index(pages)?, cache));
        Ok((store, known))
    }

    pub fn repo(&self) -> &Arc<crate::Repository> {
        &self.repo
    }

    /// The store whose index covers snapshot `id`'s chunks.
    pub fn store_for(&self, id: &crate::SnapshotId) -> crate::Result<Arc<ChunkStore>> {
        let mut guard = self.store.lock().unwrap_or_else(|e| e.into_inner());
        if !guard.1.contains(id) {
            *guard = Self::load(&self.repo, self.index_pages, self.cache_bytes)?;
        }
        Ok(guard.0.clone())
    }

    /// A reader of stream `name` of snapshot `entry`.
    pub fn open(&self, entry: &crate::manifest::SnapshotEntry, name: &str) -> crate::Result<StreamReader> {
        self.open_with(entry, name, ReadAhead::default())
    }

    /// [`open`](Self::open) with other read-ahead.
    pub fn open_with(
        &self,
        entry: &crate::manifest::SnapshotEntry,
        name: &str,
        ahead: ReadAhead,
    ) -> crate::Result<StreamReader> {
        let sref = entry.stream_ref(name)?;
        let map = self.repo.load_stream_map(&sref.map.parse()?)?;
        Ok(StreamReader::new(self.store_for(&entry.id)?, map, ahead))
    }
}
