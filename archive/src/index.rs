//! The chunk index: which pack holds each chunk, on disk in sorted, separately sealed pages,
//! so a lookup decrypts one small page instead of loading the whole index.
//!
//! ```text
//! index     := "VMVINDX1" index_id[32] page* directory dir_len:u32 "VMVIEND1"
//! page_i    := seal(aad = "VMVINDX1" || index_id || i:u32, entry*)        (sorted by chunk id)
//! entry     := chunk_id[32] pack_no:u32 offset:u32 stored_len:u32 raw_len:u32   (48 bytes)
//! directory := seal(aad = "VMVINDX1" || index_id || 0xffffffff,
//!                   pack_count:u32 page_count:u32 entry_count:u64 filter_bits:u64
//!                   pack_id[32] * pack_count
//!                   (first_id[32] offset:u64 sealed_len:u32 count:u32) * page_count
//!                   filter (filter_bits / 8 bytes, see `bloom.rs`))
//! ```
//! Only the directory (48 bytes per page of up to 1024 entries, 32 per pack, and a Bloom
//! filter of 10 bits per entry) stays in memory; pages are read on demand through a bounded
//! LRU of decrypted pages, and only from files whose filter admits the chunk.

use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::backend::Backend;
use crate::bloom::Bloom;
use crate::chunker::MAX_CHUNK;
use crate::crypto::{Sealer, SEAL_OVERHEAD};
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId};
use crate::pack::BlobEntry;

pub const INDEX_MAGIC: &[u8; 8] = b"VMVINDX1";
pub const INDEX_END: &[u8; 8] = b"VMVIEND1";
const ENTRY: usize = 48;
const PAGE_DESC: usize = 48;
/// Entries per page.
pub const PAGE_ENTRIES: usize = 1024;
const DIR_PAGE_NO: u32 = u32::MAX;
/// pack_count, page_count, entry_count, filter_bits.
const DIR_HEADER: usize = 24;

/// Where a chunk lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: PackId,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
}

impl Location {
    /// The pack-table-of-contents form of this entry, for chunk `id`.
    pub fn entry(&self, id: ChunkId) -> BlobEntry {
        BlobEntry { id, offset: self.offset, stored_len: self.stored_len, raw_len: self.raw_len }
    }
}

fn page_aad(index_id: &[u8; 32], page: u32) -> Vec<u8> {
    let mut aad = INDEX_MAGIC.to_vec();
    aad.extend_from_slice(index_id);
    aad.extend_from_slice(&page.to_le_bytes());
    aad
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// Serialize an index file for `entries` (chunk → pack). Duplicate chunk ids keep the first.
/// Returns the index id and the file bytes.
pub fn build_index(sealer: &Sealer, entries: &[(PackId, BlobEntry)]) -> Result<(crate::id::ObjectId, Vec<u8>)> {
    build_index_with_id(sealer, entries, crate::id::ObjectId::random()?)
}

/// [`build_index`] with a chosen index id (golden vectors).
pub fn build_index_with_id(
    sealer: &Sealer,
    entries: &[(PackId, BlobEntry)],
    index_id: crate::id::ObjectId,
) -> Result<(crate::id::ObjectId, Vec<u8>)> {
    let mut packs: Vec<PackId> = entries.iter().map(|(p, _)| *p).collect();
    packs.sort();
    packs.dedup();
    let mut sorted: Vec<&(PackId, BlobEntry)> = entries.iter().collect();
    sorted.sort_by(|a, b| a.1.id.cmp(&b.1.id));
    sorted.dedup_by(|a, b| a.1.id == b.1.id);

    let mut out = INDEX_MAGIC.to_vec();
    out.extend_from_slice(&index_id.0);
    let mut dir = Vec::new();
    let page_count = sorted.len().div_ceil(PAGE_ENTRIES);
    dir.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    dir.extend_from_slice(&(page_count as u32).to_le_bytes());
    dir.extend_from_slice(&(sorted.len() as u64).to_le_bytes());
    let mut filter = Bloom::for_entries(sorted.len() as u64);
    sorted.iter().for_each(|(_, e)| filter.insert(&e.id));
    dir.extend_from_slice(&filter.bits().to_le_bytes());
    for p in &packs {
        dir.extend_from_slice(&p.0);
    }
    for (page_no, page) in sorted.chunks(PAGE_ENTRIES).enumerate() {
        let mut plain = Vec::with_capacity(page.len() * ENTRY);
        for (pack, e) in page {
            let pack_no = packs.binary_search(pack).expect("pack listed") as u32;
            plain.extend_from_slice(&e.id.0);
            plain.extend_from_slice(&pack_no.to_le_bytes());
            plain.extend_from_slice(&e.offset.to_le_bytes());
            plain.extend_from_slice(&e.stored_len.to_le_bytes());
            plain.extend_from_slice(&e.raw_len.to_le_bytes());
        }
        let offset = out.len() as u64;
        let before = out.len();
        sealer.seal_into(&page_aad(&index_id.0, page_no as u32), &plain, &mut out)?;
        dir.extend_from_slice(&page[0].1.id.0);
        dir.extend_from_slice(&offset.to_le_bytes());
        dir.extend_from_slice(&((out.len() - before) as u32).to_le_bytes());
        dir.extend_from_slice(&(page.len() as u32).to_le_bytes());
    }
    dir.extend_from_slice(&filter.to_bytes());
    let before = out.len();
    sealer.seal_into(&page_aad(&index_id.0, DIR_PAGE_NO), &dir, &mut out)?;
    let dir_len = (out.len() - before) as u32;
    out.extend_from_slice(&dir_len.to_le_bytes());
    out.extend_from_slice(INDEX_END);
    Ok((index_id, out))
}

#[derive(Clone, Debug)]
struct PageDesc {
    first: ChunkId,
    offset: u64,
    sealed_len: u32,
    count: u32,
}

/// One index file's directory, kept in memory.
#[derive(Debug)]
pub struct IndexFile {
    pub name: String,
    id: [u8; 32],
    pub packs: Vec<PackId>,
    pages: Vec<PageDesc>,
    pub entry_count: u64,
    filter: Bloom,
}

impl IndexFile {
    /// Read the directory of `index/<name>`.
    pub fn open(backend: &dyn Backend, sealer: &Sealer, name: &str) -> Result<Self> {
        let path = format!("index/{name}");
        let size = backend.size(&path)?;
        if size < 8 + 32 + 12 {
            return Err(Error::corrupt(&path, format!("{size} bytes is too short for an index")));
        }
        let head = backend.read_range(&path, 0, 40)?;
        if &head[..8] != INDEX_MAGIC {
            return Err(Error::corrupt(&path, "bad magic at offset 0"));
        }
        let id: [u8; 32] = head[8..40].try_into().expect("32 bytes");
        if hex::encode(id) != name {
            return Err(Error::corrupt(&path, "index id in the header does not match the file name"));
        }
        let tail = backend.read_range(&path, size - 12, 12)?;
        if &tail[4..] != INDEX_END {
            return Err(Error::corrupt(&path, format!("no end marker at offset {}", size - 8)));
        }
        let dir_len = u64::from(u32_at(&tail, 0));
        if dir_len + 12 + 40 > size {
            return Err(Error::corrupt(&path, format!("directory length {dir_len} exceeds the file")));
        }
        let sealed = backend.read_range(&path, size - 12 - dir_len, dir_len as usize)?;
        let dir = sealer.open(&page_aad(&id, DIR_PAGE_NO), &sealed, &format!("{path} directory"))?;
        Self::parse_dir(&path, name, id, &dir, size - 12 - dir_len)
    }

    fn parse_dir(path: &str, name: &str, id: [u8; 32], dir: &[u8], pages_end: u64) -> Result<Self> {
        let bad = |d: String| Error::corrupt(path, d);
        if dir.len() < DIR_HEADER {
            return Err(bad("directory too short".into()));
        }
        let pack_count = u32_at(dir, 0) as usize;
        let page_count = u32_at(dir, 4) as usize;
        let entry_count = u64_at(dir, 8);
        let filter_bits = u64_at(dir, 16);
        if filter_bits != Bloom::bits_for(entry_count) {
            return Err(bad(format!("filter of {filter_bits} bits does not fit {entry_count} entries")));
        }
        let packs_end = pack_count.checked_mul(32).map(|p| DIR_HEADER + p);
        let pages_end_at = packs_end.and_then(|p| page_count.checked_mul(PAGE_DESC).map(|q| p + q));
        let want = pages_end_at.and_then(|p| usize::try_from(filter_bits / 8).ok().map(|f| p + f));
        let (Some(packs_end), Some(descs_end), Some(total_len)) = (packs_end, pages_end_at, want) else {
            return Err(bad("directory counts overflow".into()));
        };
        if total_len != dir.len() {
            return Err(bad(format!(
                "directory of {} bytes does not fit {pack_count} packs, {page_count} pages and the filter",
                dir.len()
            )));
        }
        let packs =
            dir[DIR_HEADER..packs_end].chunks_exact(32).map(|c| PackId(c.try_into().expect("32 bytes"))).collect();
        let mut pages: Vec<PageDesc> = Vec::with_capacity(page_count);
        let mut total = 0u64;
        for d in dir[packs_end..descs_end].chunks_exact(PAGE_DESC) {
            let p = PageDesc {
                first: ChunkId(d[..32].try_into().expect("32 bytes")),
                offset: u64_at(d, 32),
                sealed_len: u32_at(d, 40),
                count: u32_at(d, 44),
            };
            let sane = p.count >= 1
                && p.count as usize <= PAGE_ENTRIES
                && p.sealed_len as usize == p.count as usize * ENTRY + SEAL_OVERHEAD
                && p.offset >= 40
                && p.offset + u64::from(p.sealed_len) <= pages_end
                && pages.last().is_none_or(|q| q.first < p.first);
            if !sane {
                return Err(bad(format!("page {} has impossible bounds or order", pages.len())));
            }
            total += u64::from(p.count);
            pages.push(p);
        }
        if total != entry_count {
            return Err(bad(format!("pages hold {total} entries, directory says {entry_count}")));
        }
        let filter = Bloom::from_bytes(&dir[descs_end..]).ok_or_else(|| bad("filter is not whole words".into()))?;
        Ok(Self { name: name.to_string(), id, packs, pages, entry_count, filter })
    }

    /// False when this file certainly does not list `id`.
    pub fn may_contain(&self, id: &ChunkId) -> bool {
        self.filter.may_contain(id)
    }

    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// Read, authenticate and check one page; returns its raw entry bytes.
    pub fn read_page(&self, backend: &dyn Backend, sealer: &Sealer, page: usize) -> Result<Vec<u8>> {
        let d = &self.pages[page];
        let path = format!("index/{}", self.name);
        let sealed = backend.read_range(&path, d.offset, d.sealed_len as usize)?;
        let plain = sealer.open(&page_aad(&self.id, page as u32), &sealed, &format!("{path} page {page}"))?;
        let sorted = plain.len() == d.count as usize * ENTRY
            && plain[..32] == d.first.0
            && plain.chunks_exact(ENTRY).zip(plain.chunks_exact(ENTRY).skip(1)).all(|(a, b)| a[..32] < b[..32])
            && plain.chunks_exact(ENTRY).all(|e| {
                (u32_at(e, 32) as usize) < self.packs.len()
                    && u32_at(e, 44) <= MAX_CHUNK
                    && (u32_at(e, 40) as usize) <= MAX_CHUNK as usize + 1 + SEAL_OVERHEAD
            })
            // Entries must fall between this page's first id and the next page's.
            && self.pages.get(page + 1).is_none_or(|next| plain[plain.len() - ENTRY..plain.len() - ENTRY + 32] < next.first.0[..]);
        if !sorted {
            return Err(Error::corrupt(path, format!("page {page} is not a sorted list of valid entries")));
        }
        Ok(plain)
    }

    /// Every entry of a page's bytes (as returned by [`read_page`](Self::read_page)).
    pub fn entries<'a>(&'a self, page: &'a [u8]) -> impl Iterator<Item = (ChunkId, Location)> + 'a {
        (0..page.len() / ENTRY).map(move |i| self.entry(page, i))
    }

    /// Decode entry `i` of a page's bytes.
    pub fn entry(&self, page: &[u8], i: usize) -> (ChunkId, Location) {
        let e = &page[i * ENTRY..(i + 1) * ENTRY];
        let id = ChunkId(e[..32].try_into().expect("32 bytes"));
        let loc = Location {
            pack: self.packs[u32_at(e, 32) as usize],
            offset: u32_at(e, 36),
            stored_len: u32_at(e, 40),
            raw_len: u32_at(e, 44),
        };
        (id, loc)
    }

    fn page_for(&self, id: &ChunkId) -> Option<usize> {
        let n = self.pages.partition_point(|p| p.first <= *id);
        n.checked_sub(1)
    }
}

/// All index files of a repository, with a bounded cache of decrypted pages.
#[derive(Debug)]
pub struct IndexSet {
    pub files: Vec<IndexFile>,
    cache_pages: usize,
    cache: Mutex<LruCache<(usize, usize), Arc<Vec<u8>>>>,
}

impl IndexSet {
    /// `cache_pages` pages of up to 48 KiB each stay decrypted in memory.
    pub fn new(files: Vec<IndexFile>, cache_pages: usize) -> Self {
        let cap = std::num::NonZeroUsize::new(cache_pages.max(1)).expect("nonzero");
        Self { files, cache_pages, cache: Mutex::new(LruCache::new(cap)) }
    }

    /// The page-cache size this set was made with.
    pub fn cache_pages(&self) -> usize {
        self.cache_pages
    }

    /// True when `names` (a listing of `index/`) is exactly the files loaded here.
    pub fn same_files(&self, names: &[String]) -> bool {
        names.len() == self.files.len() && names.iter().zip(&self.files).all(|(n, f)| *n == f.name)
    }

    pub fn entry_count(&self) -> u64 {
        self.files.iter().map(|f| f.entry_count).sum()
    }

    fn page(&self, backend: &dyn Backend, sealer: &Sealer, file: usize, page: usize) -> Result<Arc<Vec<u8>>> {
        if let Some(p) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&(file, page)) {
            return Ok(p.clone());
        }
        let p = Arc::new(self.files[file].read_page(backend, sealer, page)?);
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).put((file, page), p.clone());
        Ok(p)
    }

    /// Find a chunk. When several index files list it (a pack adopted twice, say), any of
    /// their entries is valid; the first found is returned.
    pub fn lookup(&self, backend: &dyn Backend, sealer: &Sealer, id: &ChunkId) -> Result<Option<Location>> {
        self.lookup_where(backend, sealer, id, |_| true)
    }

    /// [`lookup`](Self::lookup) among the entries whose pack passes `usable` (a backup
    /// skips packs a pending prune will delete).
    pub fn lookup_where(
        &self,
        backend: &dyn Backend,
        sealer: &Sealer,
        id: &ChunkId,
        usable: impl Fn(&PackId) -> bool,
    ) -> Result<Option<Location>> {
        for (fi, file) in self.files.iter().enumerate().rev() {
            if !file.may_contain(id) {
                continue;
            }
            let Some(pi) = file.page_for(id) else { continue };
            let page = self.page(backend, sealer, fi, pi)?;
            let n = page.len() / ENTRY;
            let (mut lo, mut hi) = (0, n);
            while lo < hi {
                let mid = (lo + hi) / 2;
                match page[mid * ENTRY..mid * ENTRY + 32].cmp(&id.0[..]) {
                    std::cmp::Ordering::Less => lo = mid + 1,
                    std::cmp::Ordering::Greater => hi = mid,
                    std::cmp::Ordering::Equal => {
                        let loc = file.entry(&page, mid).1;
                        if usable(&loc.pack) {
                            return Ok(Some(loc));
                        }
                        break;
                    }
                }
            }
        }
        Ok(None)
    }
}

/// The index as it is now, reloaded when the files under `index/` change: a prune replaces
/// index files while backups, mounts and servers keep running (FORMAT.md §14).
#[derive(Debug)]
pub struct LiveIndex {
    current: std::sync::RwLock<Arc<IndexSet>>,
}

impl LiveIndex {
    pub fn new(set: IndexSet) -> Self {
        Self { current: std::sync::RwLock::new(Arc::new(set)) }
    }

    pub fn get(&self) -> Arc<IndexSet> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reload when `index/` lists other files than those loaded. Returns whether it did.
    pub fn refresh(&self, repo: &crate::Repository) -> Result<bool> {
        let names = repo.backend().list("index")?;
        let cur = self.get();
        if cur.same_files(&names) {
            return Ok(false);
        }
        let fresh = Arc::new(repo.load_index(cur.cache_pages())?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(true)
    }

    /// [`IndexSet::lookup_where`], retried on a reloaded index when an index file vanished
    /// under it (a prune replaced it).
    pub fn lookup_where(
        &self,
        repo: &crate::Repository,
        id: &ChunkId,
        usable: impl Fn(&PackId) -> bool,
    ) -> Result<Option<Location>> {
        let (backend, sealer) = (&**repo.backend(), &**repo.sealer());
        let first = self.get().lookup_where(backend, sealer, id, &usable);
        if matches!(first, Err(Error::Missing { .. })) && self.refresh(repo)? {
            return self.get().lookup_where(backend, sealer, id, &usable);
        }
        first
    }
}
