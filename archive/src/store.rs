//! Reading chunks: index lookup, pack read, decrypt, decompress, verify, and a shared
//! byte-bounded LRU cache of decrypted chunks. Safe to call from many threads; concurrent
//! requests for the same chunk wait for one fetch instead of repeating it.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

use lru::LruCache;

use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::index::{IndexSet, LiveIndex, Location};
use crate::pack::{open_chunk_into, pack_path};
use crate::repo::Repository;

type Slot = Arc<(Mutex<Option<Result<Arc<Vec<u8>>, String>>>, Condvar)>;

/// The bytes of a chunk must fill its extent exactly; a mismatch is damage, never a short
/// or long read.
pub fn check_extent_len(id: &ChunkId, got: usize, extent_len: u32) -> Result<()> {
    if got == extent_len as usize {
        return Ok(());
    }
    Err(Error::corrupt(format!("chunk {}", id.short()), format!("holds {got} bytes, the stream map says {extent_len}")))
}

/// Chunk reader with a shared cache. See the module docs.
#[derive(Debug)]
pub struct ChunkStore {
    repo: Arc<Repository>,
    index: LiveIndex,
    cache: Mutex<Cache>,
    inflight: Mutex<HashMap<ChunkId, Slot>>,
}

#[derive(Debug)]
struct Cache {
    lru: LruCache<ChunkId, Arc<Vec<u8>>>,
    bytes: usize,
    budget: usize,
}

impl ChunkStore {
    /// `cache_bytes` bounds the decrypted chunks kept in memory.
    pub fn new(repo: Arc<Repository>, index: IndexSet, cache_bytes: usize) -> Self {
        Self {
            repo,
            index: LiveIndex::new(index),
            cache: Mutex::new(Cache { lru: LruCache::unbounded(), bytes: 0, budget: cache_bytes }),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    pub fn repo(&self) -> &Arc<Repository> {
        &self.repo
    }

    pub fn index(&self) -> Arc<IndexSet> {
        self.index.get()
    }

    pub fn locate(&self, id: &ChunkId) -> Result<Location> {
        self.index
            .lookup_where(&self.repo, id, |_| true)?
            .ok_or_else(|| Error::Missing { object: format!("chunk {}", id.short()), referenced_by: None })
    }

    /// Read a chunk from its pack, bypassing the cache.
    pub fn fetch_uncached(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.fetch_into(id, &mut Vec::new(), &mut out)?;
        Ok(out)
    }

    /// Read a chunk into `out`, using `blob` as scratch space (both reusable).
    ///
    /// A prune may move a chunk to another pack and delete the old one while this store is
    /// open: a chunk not found, or found in a pack that is gone, is looked up once more in
    /// the index as it is now. Still missing then means no snapshot needs it any more (the
    /// snapshot was forgotten and pruned) or the repository is damaged; the error says so.
    pub fn fetch_into(&self, id: &ChunkId, blob: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<()> {
        let loc = match self.read_located(id, blob) {
            Err(Error::Missing { object, .. }) => {
                let gone = Error::Missing {
                    object,
                    referenced_by: Some("a snapshot read here; it may have been forgotten and pruned".into()),
                };
                if !self.index.refresh(&self.repo)? {
                    return Err(gone);
                }
                match self.read_located(id, blob) {
                    Err(Error::Missing { .. }) => return Err(gone),
                    other => other?,
                }
            }
            other => other?,
        };
        open_chunk_into(self.repo.sealer(), self.repo.key(), id, blob, loc.raw_len, &pack_path(&loc.pack), out)
    }

    /// Look `id` up and read its blob into `blob`; returns where it was.
    fn read_located(&self, id: &ChunkId, blob: &mut Vec<u8>) -> Result<Location> {
        let loc = self.locate(id)?;
        let path = pack_path(&loc.pack);
        self.repo.backend().read_range_into(&path, u64::from(loc.offset), loc.stored_len as usize, blob)?;
        Ok(loc)
    }

    pub fn cached(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).lru.get(id).cloned()
    }

    fn insert(&self, id: ChunkId, data: Arc<Vec<u8>>) {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if data.len() > c.budget {
            return;
        }
        c.bytes += data.len();
        if let Some(old) = c.lru.put(id, data) {
            c.bytes -= old.len();
        }
        while c.bytes > c.budget {
            match c.lru.pop_lru() {
                Some((_, old)) => c.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// A chunk's bytes, from the cache or its pack.
    pub fn get(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>> {
        if let Some(d) = self.cached(id) {
            return Ok(d);
        }
        let (slot, leader) = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match inflight.get(id) {
                Some(s) => (s.clone(), false),
                None => {
                    let s: Slot = Arc::new((Mutex::new(None), Condvar::new()));
                    inflight.insert(*id, s.clone());
                    (s, true)
                }
            }
        };
        if leader {
            let result = self.fetch_uncached(id).map(Arc::new);
            if let Ok(d) = &result {
                self.insert(*id, d.clone());
            }
            let shared = result.as_ref().map(Arc::clone).map_err(|e| e.to_string());
            *slot.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(shared);
            slot.1.notify_all();
            self.inflight.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
            return result;
        }
        let mut guard = slot.0.lock().unwrap_or_else(|e| e.into_inner());
        while guard.is_none() {
            guard = slot.1.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        match guard.as_ref().expect("filled") {
            Ok(d) => Ok(d.clone()),
            Err(msg) => Err(Error::corrupt(format!("chunk {}", id.short()), msg.clone())),
        }
    }
}
