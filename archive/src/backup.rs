//! Backup: sources → pieces → ids → dedup → compress + seal → packs → index → stream maps →
//! manifest. Reading and cutting run on the calling thread; hashing, dedup lookups,
//! compression and encryption on a pool of workers; pack and index writing on one writer
//! thread. Queues between them are bounded, so memory stays flat.
//!
//! Crash safety: packs are written (temp file, sync, rename) before the index files that
//! list them, and index files before the stream maps and manifest that reference their
//! chunks. A killed backup leaves packs no manifest uses; the next backup adopts packs that
//! no index lists (their tables of contents say what they hold), so their chunks are reused.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use blockdev::BlockDev;
use crossbeam_channel::{bounded, Receiver, Sender};

use crate::chunker::Chunker;
use crate::error::{Error, Result};
use crate::extents::{ExtentKind, MapBuilder, StreamMap};
use crate::id::{ChunkId, ObjectId, PackId, SnapshotId};
use crate::index::{build_index, IndexSet, LiveIndex};
use crate::lock::LockKind;
use crate::manifest::{BackupSummary, Snapshot, SnapshotEntry, StreamKind, StreamRef};
use crate::object::STREAM_MAGIC;
use crate::pack::{pack_path, seal_chunk, BlobEntry, PackBuilder};
use crate::progress::Progress;
use crate::prune::Condemned;
use crate::repo::Repository;

/// One stream to back up.
pub struct Source {
    pub name: String,
    pub kind: StreamKind,
    pub dev: Box<dyn BlockDev>,
    /// Changed byte ranges since the parent's stream of the same name (from CBT). Only
    /// these are read; the rest is taken from the parent's map.
    pub changed: Option<Vec<Range<u64>>>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Source({}, {:?}, {} bytes)", self.name, self.kind, self.dev.len())
    }
}

/// Which snapshot a backup builds on.
#[derive(Clone, Debug, Default)]
pub enum ParentChoice {
    /// The newest snapshot of the same VM.
    #[default]
    Latest,
    None,
    Id(SnapshotId),
}

#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    pub vm: String,
    pub tags: Vec<String>,
    pub meta: Option<serde_json::Value>,
    pub parent: ParentChoice,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
}

struct Work {
    stream: usize,
    offset: u64,
    data: Vec<u8>,
}

struct Blob {
    id: ChunkId,
    bytes: Vec<u8>,
    raw_len: u32,
}

#[derive(Clone, Copy)]
enum Done {
    Zero(u64, u64),
    Chunk(u64, u32, ChunkId),
    Parent(u64, u64),
}

impl Done {
    fn offset(&self) -> u64 {
        match *self {
            Done::Zero(o, _) | Done::Chunk(o, _, _) | Done::Parent(o, _) => o,
        }
    }
}

/// What the writer thread did.
#[derive(Default)]
struct WriterStats {
    stored_bytes: u64,
}

/// Chunks known to be stored: the parent's, this session's, and the index's — never one
/// that only a pack condemned by a pending prune holds (FORMAT.md §14).
struct Known<'a> {
    repo: &'a Repository,
    index: &'a LiveIndex,
    condemned: &'a Condemned,
    parent: HashSet<ChunkId>,
    session: Mutex<HashSet<ChunkId>>,
}

impl Known<'_> {
    /// True when `id` is already stored; otherwise claims it for this caller to store.
    fn check_and_claim(&self, id: &ChunkId) -> Result<bool> {
        if self.parent.contains(id) {
            return Ok(true);
        }
        if self.session.lock().unwrap_or_else(|e| e.into_inner()).contains(id) {
            return Ok(true);
        }
        if self.usable(id)? {
            return Ok(true);
        }
        Ok(!self.session.lock().unwrap_or_else(|e| e.into_inner()).insert(*id))
    }

    /// Whether the index lists `id` in a pack no pending prune will delete.
    fn usable(&self, id: &ChunkId) -> Result<bool> {
        let packs = &self.condemned.packs;
        Ok(self.index.lookup_where(self.repo, id, |p| !packs.contains(p))?.is_some())
    }
}

/// Run a backup and save its snapshot.
pub fn backup(
    repo: &Repository,
    sources: Vec<Source>,
    opts: &BackupOptions,
    progress: &Progress,
) -> Result<SnapshotEntry> {
    let started = Instant::now();
    if opts.vm.is_empty() || opts.vm.contains(['@', ':', '/']) {
        return Err(Error::Usage(format!("VM name {:?} must be non-empty without '@', ':' or '/'", opts.vm)));
    }
    let mut names = HashSet::new();
    for s in &sources {
        if s.name.is_empty() || s.name.contains(['@', ':', '/']) || !names.insert(&s.name) {
            return Err(Error::Usage(format!("stream name {:?} is empty, repeated, or has '@', ':' or '/'", s.name)));
        }
    }
    let _lock = repo.lock(LockKind::Shared, &format!("backup {}", opts.vm))?;
    // After the lock, before any dedup decision: the prunes pending now are the ones that
    // will not wait for this backup.
    let condemned = Condemned::load(repo)?;
    let index = LiveIndex::new(repo.load_index(1024)?);
    let orphans = adopt_orphan_packs(repo, &index.get(), &condemned.packs)?;
    let parent = match &opts.parent {
        ParentChoice::None => None,
        ParentChoice::Latest => repo.latest_snapshot(&opts.vm)?,
        ParentChoice::Id(id) => Some(SnapshotEntry { id: *id, snapshot: repo.load_snapshot(id)? }),
    };
    let mut parent_maps = Vec::new();
    let mut parent_ids = HashSet::new();
    for s in &sources {
        let pm = match parent.as_ref().and_then(|p| p.snapshot.stream(&s.name)) {
            Some(r) => Some(repo.load_stream_map(&r.map.parse()?)?),
            None => None,
        };
        if let Some(m) = &pm {
            parent_ids.extend(m.chunk_ids());
        }
        if s.changed.is_some() && pm.as_ref().is_none_or(|m| m.size != s.dev.len()) {
            return Err(Error::Usage(format!(
                "stream {}: a changed-range list needs a parent snapshot with a stream of the same name and size",
                s.name
            )));
        }
        parent_maps.push(pm);
    }
    let mut known = Known {
        repo,
        index: &index,
        condemned: &condemned,
        parent: HashSet::new(),
        session: Mutex::new(HashSet::new()),
    };
    // With a prune pending, a parent's chunk counts only where a pack it keeps holds it;
    // unchanged ranges whose chunks it will delete are read again from the source.
    let mut unusable = HashSet::new();
    for id in parent_ids {
        if condemned.packs.is_empty() || known.usable(&id)? {
            known.parent.insert(id);
        } else {
            unusable.insert(id);
        }
    }
    for (_, e) in &orphans {
        known.parent.insert(e.id);
    }
    let chunker = Chunker::new(repo.config().chunker, repo.key().gear_seed())?;
    let plans: Vec<Vec<Range<u64>>> = sources
        .iter()
        .zip(&parent_maps)
        .map(|(s, pm)| read_plan(s, pm.as_ref(), &unusable, u64::from(repo.config().zero_block)))
        .collect();
    progress.total.store(plans.iter().flatten().map(|r| r.end - r.start).sum(), Ordering::Relaxed);

    let workers =
        if opts.workers == 0 { std::thread::available_parallelism().map_or(2, |n| n.get()) } else { opts.workers };
    let results: Vec<Mutex<Vec<Done>>> = sources.iter().map(|_| Mutex::new(Vec::new())).collect();
    let new_bytes = AtomicU64::new(0);
    let read_bytes = AtomicU64::new(0);
    let (work_tx, work_rx) = bounded::<Work>(workers * 2);
    let (blob_tx, blob_rx) = bounded::<Blob>(workers * 2);
    let (recycle_tx, recycle_rx) = bounded::<Vec<u8>>(workers * 4);

    let (read_result, worker_results, writer_result) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| write_packs(repo, blob_rx, orphans));
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (rx, tx, recycle) = (work_rx.clone(), blob_tx.clone(), recycle_tx.clone());
                let (known, results, new_bytes) = (&known, &results, &new_bytes);
                scope.spawn(move || work(repo, known, rx, tx, recycle, results, new_bytes))
            })
            .collect();
        drop(blob_tx);
        drop(work_rx);
        drop(recycle_tx);
        let reading =
            Reading { chunker: &chunker, zero_block: repo.config().zero_block, tx: &work_tx, recycled: recycle_rx };
        let read_result = read_sources(&sources, &plans, &reading, &results, progress, &read_bytes);
        drop(work_tx);
        let worker_results: Vec<Result<()>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Usage("worker panicked".into()))))
            .collect();
        let writer_result = writer.join().unwrap_or_else(|_| Err(Error::Usage("writer panicked".into())));
        (read_result, worker_results, writer_result)
    });
    // The reader's error is the cause when workers stopped because it stopped, and so on.
    read_result?;
    for r in worker_results {
        r?;
    }
    let wstats = writer_result?;

    let mut streams = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        let mut done = std::mem::take(&mut *results[i].lock().unwrap_or_else(|e| e.into_inner()));
        done.sort_by_key(Done::offset);
        let map = build_map(done, parent_maps[i].as_ref());
        if map.size != s.dev.len() {
            return Err(Error::corrupt(
                format!("stream {}", s.name),
                format!("map covers {} of {} bytes", map.size, s.dev.len()),
            ));
        }
        let body = map.to_bytes();
        condemned.wait_for_map(repo, &ObjectId(repo.key().keyed_hash(&body)), std::time::Duration::from_secs(1))?;
        let map_id = repo.save_object("streams", STREAM_MAGIC, &body)?;
        let (mut data_bytes, mut zero_bytes, mut chunks) = (0, 0, 0);
        for e in &map.extents {
            match e.kind {
                ExtentKind::Zero => zero_bytes += u64::from(e.len),
                ExtentKind::Chunk(_) => {
                    data_bytes += u64::from(e.len);
                    chunks += 1;
                }
            }
        }
        streams.push(StreamRef {
            name: s.name.clone(),
            kind: s.kind,
            size: map.size,
            map: map_id.to_hex(),
            data_bytes,
            zero_bytes,
            chunks,
        });
    }
    let snapshot = Snapshot {
        version: 1,
        vm: opts.vm.clone(),
        time: jiff::Timestamp::now().to_string(),
        host: crate::lock::hostname(),
        tags: opts.tags.clone(),
        parent: parent.map(|p| p.id.to_hex()),
        meta: opts.meta.clone(),
        streams,
        summary: BackupSummary {
            read_bytes: read_bytes.load(Ordering::Relaxed),
            new_chunks: known.session.lock().unwrap_or_else(|e| e.into_inner()).len() as u64,
            new_bytes: new_bytes.load(Ordering::Relaxed),
            stored_bytes: wstats.stored_bytes,
            duration_ms: started.elapsed().as_millis() as u64,
        },
        program: format!("vmvault {}", env!("CARGO_PKG_VERSION")),
    };
    let id = repo.save_snapshot(&snapshot)?;
    Ok(SnapshotEntry { id, snapshot })
}

/// The ranges of a source to read: all of it, or its changed ranges — plus the extents
/// whose chunks a pending prune deletes — widened to the parent's chunk extents.
fn read_plan(s: &Source, parent: Option<&StreamMap>, unusable: &HashSet<ChunkId>, zero_block: u64) -> Vec<Range<u64>> {
    match (&s.changed, parent) {
        (Some(changed), Some(pm)) => {
            let mut ranges = changed.clone();
            ranges.extend(pm.extents.iter().filter_map(|e| match e.kind {
                ExtentKind::Chunk(id) if unusable.contains(&id) => Some(e.offset..e.end()),
                _ => None,
            }));
            expand_to_extents(&ranges, pm, zero_block)
        }
        _ => vec![0..s.dev.len()],
    }
}

/// Widen changed ranges to the parent's chunk extents they touch, merged and sorted. Where a
/// range starts or ends inside a zero extent, it is widened to a multiple of `zero_block`
/// within that extent only: a zero extent can be cut anywhere, and reading the rest of a
/// long run of zeros again (from the parent: memset and rescan) would be wasted work.
fn expand_to_extents(changed: &[Range<u64>], pm: &StreamMap, zero_block: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut sorted: Vec<Range<u64>> =
        changed.iter().filter(|r| r.start < r.end && r.start < pm.size).cloned().collect();
    sorted.sort_by_key(|r| r.start);
    for r in sorted {
        let first = &pm.extents[pm.find(r.start)];
        let a = match first.kind {
            ExtentKind::Chunk(_) => first.offset,
            ExtentKind::Zero => (r.start / zero_block * zero_block).max(first.offset),
        };
        let end = r.end.min(pm.size);
        let last = &pm.extents[pm.find(end - 1)];
        let b = match last.kind {
            ExtentKind::Chunk(_) => last.end(),
            ExtentKind::Zero => end.div_ceil(zero_block).saturating_mul(zero_block).min(last.end()),
        };
        match out.last_mut() {
            Some(last) if last.end >= a => last.end = last.end.max(b),
            _ => out.push(a..b),
        }
    }
    out
}

/// What the reading side needs: how to cut, where to send, buffers to reuse.
struct Reading<'a> {
    chunker: &'a Chunker,
    zero_block: u32,
    tx: &'a Sender<Work>,
    recycled: Receiver<Vec<u8>>,
}

fn read_sources(
    sources: &[Source],
    plans: &[Vec<Range<u64>>],
    reading: &Reading<'_>,
    results: &[Mutex<Vec<Done>>],
    progress: &Progress,
    read_bytes: &AtomicU64,
) -> Result<()> {
    for (i, (s, ranges)) in sources.iter().zip(plans).enumerate() {
        let mut covered = 0u64;
        for r in ranges.iter().cloned() {
            if r.start > covered {
                results[i].lock().unwrap_or_else(|e| e.into_inner()).push(Done::Parent(covered, r.start - covered));
            }
            let mut sp =
                crate::splitter::Splitter::new(&*s.dev, reading.chunker, reading.zero_block, r.start, r.end, &s.name);
            sp.recycle_from(reading.recycled.clone());
            while let Some(piece) = sp.next_piece()? {
                match piece {
                    crate::splitter::Piece::Zero { offset, len } => {
                        results[i].lock().unwrap_or_else(|e| e.into_inner()).push(Done::Zero(offset, len));
                        progress.done.fetch_add(len, Ordering::Relaxed);
                    }
                    crate::splitter::Piece::Data { offset, data } => {
                        progress.done.fetch_add(data.len() as u64, Ordering::Relaxed);
                        if reading.tx.send(Work { stream: i, offset, data }).is_err() {
                            return Ok(()); // a worker failed; its error is reported
                        }
                    }
                }
            }
            read_bytes.fetch_add(sp.read_bytes, Ordering::Relaxed);
            covered = r.end;
        }
        if covered < s.dev.len() {
            results[i].lock().unwrap_or_else(|e| e.into_inner()).push(Done::Parent(covered, s.dev.len() - covered));
        }
    }
    Ok(())
}

fn work(
    repo: &Repository,
    known: &Known<'_>,
    rx: Receiver<Work>,
    tx: Sender<Blob>,
    recycle: Sender<Vec<u8>>,
    results: &[Mutex<Vec<Done>>],
    new_bytes: &AtomicU64,
) -> Result<()> {
    let level = repo.config().compression.level;
    for w in rx {
        let id = repo.key().chunk_id(&w.data);
        let len = w.data.len() as u32;
        if !known.check_and_claim(&id)? {
            let bytes = seal_chunk(repo.sealer(), &id, &w.data, level)?;
            new_bytes.fetch_add(w.data.len() as u64, Ordering::Relaxed);
            if tx.send(Blob { id, bytes, raw_len: len }).is_err() {
                return Err(Error::Usage("pack writer stopped".into()));
            }
        }
        results[w.stream].lock().unwrap_or_else(|e| e.into_inner()).push(Done::Chunk(w.offset, len, id));
        let _ = recycle.try_send(w.data);
    }
    Ok(())
}

/// Index files are written after every this many packs, so a killed backup loses little.
const PACKS_PER_INDEX: usize = 32;

fn write_packs(repo: &Repository, rx: Receiver<Blob>, adopted: Vec<(PackId, BlobEntry)>) -> Result<WriterStats> {
    let mut stats = WriterStats::default();
    let mut pending: Vec<(PackId, BlobEntry)> = adopted;
    let mut packs_since_index = 0;
    let mut pack = PackBuilder::new();
    let target = repo.config().pack_size as usize;
    let flush = |pack: PackBuilder, pending: &mut Vec<(PackId, BlobEntry)>, stats: &mut WriterStats| -> Result<()> {
        let (id, bytes, entries) = pack.finish(repo.sealer())?;
        repo.backend().write(&pack_path(&id), &bytes)?;
        stats.stored_bytes += bytes.len() as u64;
        pending.extend(entries.into_iter().map(|e| (id, e)));
        Ok(())
    };
    for blob in rx {
        pack.add(blob.id, &blob.bytes, blob.raw_len);
        if pack.len() >= target {
            flush(std::mem::take(&mut pack), &mut pending, &mut stats)?;
            packs_since_index += 1;
            if packs_since_index >= PACKS_PER_INDEX {
                write_index(repo, &mut pending)?;
                packs_since_index = 0;
            }
        }
    }
    if !pack.is_empty() {
        flush(pack, &mut pending, &mut stats)?;
    }
    write_index(repo, &mut pending)?;
    Ok(stats)
}

fn write_index(repo: &Repository, pending: &mut Vec<(PackId, BlobEntry)>) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let (id, bytes) = build_index(repo.sealer(), pending)?;
    repo.backend().write(&format!("index/{}", id.to_hex()), &bytes)?;
    pending.clear();
    Ok(())
}

/// Packs in `data/` that no index file lists (left by a killed backup), with their contents
/// read from their tables of contents. Damaged ones are skipped; `check` reports them. Packs
/// a pending prune condemned are not adopted: it deletes them.
pub fn adopt_orphan_packs(
    repo: &Repository,
    index: &IndexSet,
    condemned: &HashSet<PackId>,
) -> Result<Vec<(PackId, BlobEntry)>> {
    let indexed: HashSet<PackId> = index.files.iter().flat_map(|f| f.packs.iter().copied()).collect();
    let mut out = Vec::new();
    for pack in repo.list_packs()? {
        if indexed.contains(&pack) || condemned.contains(&pack) {
            continue;
        }
        if let Ok(entries) = repo.read_pack_toc(&pack) {
            out.extend(entries.into_iter().map(|e| (pack, e)));
        }
    }
    Ok(out)
}

fn build_map(done: Vec<Done>, parent: Option<&StreamMap>) -> StreamMap {
    let mut b = MapBuilder::default();
    for d in done {
        match d {
            Done::Zero(_, len) => b.push_zero(len),
            Done::Chunk(_, len, id) => b.push_chunk(len, id),
            Done::Parent(off, len) => {
                if let Some(pm) = parent {
                    b.push_from(pm, off, len);
                }
            }
        }
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extents::MapBuilder;

    const K: u64 = 1024;
    const M: u64 = 1024 * K;

    /// chunk 0..1M, zeros 1M..10M, chunk 10M..11M, zeros 11M..20M.
    fn parent() -> StreamMap {
        let mut b = MapBuilder::default();
        b.push_chunk(M as u32, ChunkId([1; 32]));
        b.push_zero(9 * M);
        b.push_chunk(M as u32, ChunkId([2; 32]));
        b.push_zero(9 * M);
        b.finish()
    }

    #[test]
    fn changes_widen_to_whole_chunks_but_cut_zero_extents_at_zero_blocks() {
        let pm = parent();
        let z = 64 * K;
        // Inside a zero extent: only the 64 KiB block around it, not the 9 MiB of zeros.
        assert_eq!(expand_to_extents(&[M + 100 * K..M + 104 * K], &pm, z), vec![M + 64 * K..M + 128 * K]);
        // From a chunk into zeros: the whole chunk, then up to the next zero block.
        assert_eq!(expand_to_extents(&[512 * K..M + 4 * K], &pm, z), vec![0..M + 64 * K]);
        // One byte of a chunk is the whole chunk; ranges that meet after widening merge.
        assert_eq!(
            expand_to_extents(&[10 * M + 5..10 * M + 6, 11 * M - 10..11 * M + 10], &pm, z),
            vec![10 * M..11 * M + 64 * K]
        );
        // A zero block larger than the zero extent's part: clipped to the extent.
        assert_eq!(expand_to_extents(&[9 * M + 1..9 * M + 2], &pm, 4 * M), vec![8 * M..10 * M]);
        assert_eq!(expand_to_extents(&[19 * M..19 * M + 1], &pm, 16 * M), vec![16 * M..20 * M]);
        assert_eq!(expand_to_extents(&[12 * M..12 * M + 1], &pm, 16 * M), vec![11 * M..16 * M]);
    }

    #[test]
    fn a_map_rebuilt_around_cut_zero_extents_covers_the_stream() {
        let pm = parent();
        let plan = expand_to_extents(&[M + 100 * K..M + 104 * K], &pm, 64 * K);
        let new = ChunkId([3; 32]);
        let done = vec![
            Done::Parent(0, plan[0].start),
            Done::Chunk(plan[0].start, 64 * K as u32, new),
            Done::Parent(plan[0].end, pm.size - plan[0].end),
        ];
        let map = build_map(done, Some(&pm));
        assert_eq!(map.size, pm.size);
        let kinds: Vec<(u64, u32, ExtentKind)> = map.extents.iter().map(|e| (e.offset, e.len, e.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, M as u32, ExtentKind::Chunk(ChunkId([1; 32]))),
                (M, 64 * K as u32, ExtentKind::Zero),
                (M + 64 * K, 64 * K as u32, ExtentKind::Chunk(new)),
                (M + 128 * K, (9 * M - 128 * K) as u32, ExtentKind::Zero),
                (10 * M, M as u32, ExtentKind::Chunk(ChunkId([2; 32]))),
                (11 * M, 9 * M as u32, ExtentKind::Zero),
            ]
        );
        StreamMap::from_bytes(&map.to_bytes(), "t").expect("a valid map");
    }
}
