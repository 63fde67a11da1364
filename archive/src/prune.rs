//! Prune: delete the packs and stream maps no snapshot needs, repack packs that are mostly
//! unused, rewrite the index — while backups keep running, and so that a crash at any point
//! loses nothing. The protocol and why it is safe are in FORMAT.md §14; in short:
//!
//! 1. **Mark.** Read every manifest and stream map; the live set is every chunk they name.
//! 2. **Plan.** Walk the index page by page, counting live and dead bytes per pack. Packs
//!    with no live chunk (and packs no index lists) are to be deleted; partly used packs are
//!    repacked, emptiest first, until the unused space left is within `max_unused`.
//! 3. **Condemn.** Write `prune/<name>` listing those packs and the unreferenced stream maps,
//!    *then* list the locks: every backup that took its lock before that listing is waited
//!    for; every later one reads the marker after taking its lock and never reuses a chunk
//!    that only a condemned pack holds, nor a condemned stream map while the marker exists.
//! 4. **Wait** until those backups are gone, then **commit**: mark again (their manifests
//!    now count), copy every still-live chunk out of the condemned packs into new packs and
//!    index them, replace the index files that name condemned packs, delete the condemned
//!    packs and the still-unreferenced maps, and last the marker.
//!
//! Memory: the live set is a sorted list of 8-byte chunk-id prefixes (a dead chunk whose
//! prefix equals a live one's is kept — a miss that can only keep, never delete) and the
//! per-pack counters; condemned packs, index pages and stream maps are read one at a time.
//! Ten million chunks fit in well under 512 MiB.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::extents::ExtentKind;
use crate::id::{ChunkId, ObjectId, PackId};
use crate::index::build_index;
use crate::lock::{list_locks, LockKind};
use crate::pack::{open_chunk, pack_path, BlobEntry, PackBuilder};
use crate::progress::Progress;
use crate::repo::Repository;

/// Folder of pending prune markers.
pub const PRUNE_DIR: &str = "prune";
pub const PRUNE_MAGIC: &[u8; 8] = b"VMVPRUN1";
/// Entries per index file prune writes.
const INDEX_FILE_ENTRIES: usize = 1 << 19;

/// A pending prune: what it will delete. Written before it waits, removed when it is done.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneMarker {
    pub version: u32,
    pub created: String,
    pub host: String,
    pub pid: u32,
    /// Packs (hex ids) this prune deletes, after copying out whatever is live in them then.
    pub packs: Vec<String>,
    /// Stream maps (hex ids) no manifest named when the marker was written.
    pub maps: Vec<String>,
    /// Names of the shared locks held when the marker was written: the backups that may
    /// have reused condemned chunks before they could see it. `null` until recorded.
    /// Informational for a prune that resumes the marker: it waits for every backup
    /// running when it resumes.
    pub waiting_for: Option<Vec<String>>,
}

/// The condemned packs and maps of every pending prune, as a backup sees them.
#[derive(Debug, Default)]
pub struct Condemned {
    pub packs: HashSet<PackId>,
    /// Map id → names of the markers that condemn it.
    pub maps: HashMap<ObjectId, Vec<String>>,
}

impl Condemned {
    /// Read every marker in `prune/`. A marker that cannot be read is an error: nobody can
    /// tell what it condemns.
    pub fn load(repo: &Repository) -> Result<Self> {
        let mut out = Self::default();
        for (name, m) in pending(repo)? {
            for p in &m.packs {
                out.packs.insert(p.parse()?);
            }
            for id in &m.maps {
                out.maps.entry(id.parse()?).or_default().push(name.clone());
            }
        }
        Ok(out)
    }

    /// Before a backup saves stream map `id`: when a marker it saw at its start condemns
    /// the map, and a prune is running (it may be about to delete the map), wait until that
    /// marker is gone or no prune runs, so the map is written, or found, after. A prune that
    /// starts later waits for this backup before it commits any marker (FORMAT.md §14.3).
    pub fn wait_for_map(&self, repo: &Repository, id: &ObjectId, poll: Duration) -> Result<()> {
        let Some(markers) = self.maps.get(id) else { return Ok(()) };
        for m in markers {
            let path = format!("{PRUNE_DIR}/{m}");
            let mut said = false;
            while repo.backend().exists(&path) && prune_running(repo)? {
                if !said {
                    eprintln!("waiting for the prune of {m} to finish: it removes stream map {}", id.short());
                    said = true;
                }
                std::thread::sleep(poll);
            }
        }
        Ok(())
    }
}

/// Whether a live (not stale) prune lock exists.
fn prune_running(repo: &Repository) -> Result<bool> {
    Ok(list_locks(&**repo.backend(), repo.sealer())?.iter().any(|l| {
        l.info.as_ref().is_ok_and(|i| i.kind == LockKind::Prune && i.stale_reason(repo.stale_after).is_none())
    }))
}

/// Every pending marker, by name.
pub fn pending(repo: &Repository) -> Result<Vec<(String, PruneMarker)>> {
    let mut out = Vec::new();
    for name in repo.backend().list(PRUNE_DIR)? {
        let path = format!("{PRUNE_DIR}/{name}");
        let Some(m) = repo.read_json_object::<PruneMarker>(&path, PRUNE_MAGIC)? else { continue }; // finished
        if m.version != 1 {
            return Err(Error::Unsupported(format!("{path}: prune marker version {}", m.version)));
        }
        out.push((name, m));
    }
    Ok(out)
}

fn write_marker(repo: &Repository, name: &str, m: &PruneMarker) -> Result<()> {
    repo.write_json_object(&format!("{PRUNE_DIR}/{name}"), PRUNE_MAGIC, m)
}

/// How prune chooses and behaves.
#[derive(Clone, Debug)]
pub struct PruneOptions {
    /// Unused space (fraction of the repository after prune) left in partly used packs
    /// rather than repacked. 0 repacks every pack with a dead chunk; 1 repacks none.
    pub max_unused: f64,
    /// Plan only: nothing is written or deleted.
    pub dry_run: bool,
    /// How often to look whether the backups a prune waits for have finished.
    pub poll: Duration,
    /// Stop waiting after this long and leave the prune pending (a later `prune` finishes
    /// it); `None` waits as long as it takes.
    pub max_wait: Option<Duration>,
    /// Snapshots to count as forgotten (`forget --prune --dry-run` plans as if they were).
    pub assume_forgotten: HashSet<ObjectId>,
}

impl Default for PruneOptions {
    fn default() -> Self {
        Self {
            max_unused: 0.05,
            dry_run: false,
            poll: Duration::from_secs(1),
            max_wait: None,
            assume_forgotten: HashSet::new(),
        }
    }
}

/// The points between a prune's steps, where a test can stop it as if killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    MarkerWritten,
    WaitRecorded,
    PackWritten,
    IndexWritten,
    IndexRemoved,
    PackRemoved,
    MapRemoved,
}

/// One pack in a plan.
#[derive(Clone, Debug, Serialize)]
pub struct PackPlan {
    pub pack: String,
    /// File size.
    pub bytes: u64,
    /// Stored bytes of live chunks.
    pub live_bytes: u64,
    pub chunks: u64,
    pub live_chunks: u64,
}

/// What a prune found and decided (the `--dry-run` output).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Plan {
    pub snapshots: usize,
    pub live_chunks: u64,
    pub packs: usize,
    pub pack_bytes: u64,
    /// Bytes of dead chunks in packs that are kept.
    pub unused_bytes_left: u64,
    /// No live chunk (or listed by no index file): deleted.
    pub delete: Vec<PackPlan>,
    /// Partly used: live chunks copied to new packs, then deleted.
    pub repack: Vec<PackPlan>,
    pub unreferenced_maps: usize,
}

impl Plan {
    pub fn freed_bytes(&self) -> u64 {
        self.delete.iter().chain(&self.repack).map(|p| p.bytes - p.live_bytes).sum()
    }
}

/// What a finished (or still pending) prune did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    /// Markers of earlier, interrupted prunes that this run finished first (a dry run:
    /// that a real run would finish first).
    pub resumed: usize,
    pub plan: Plan,
    /// True when the prune stopped waiting (`max_wait`) and is left pending.
    pub pending: bool,
    /// Backups waited for (lock descriptions).
    pub waited_for: Vec<String>,
    pub packs_deleted: usize,
    pub bytes_deleted: u64,
    /// Condemned packs found fully live again at commit (a backup reused them) and kept.
    pub packs_kept: usize,
    pub packs_written: usize,
    pub bytes_written: u64,
    pub chunks_copied: u64,
    pub index_files_removed: usize,
    pub index_files_written: usize,
    pub maps_deleted: usize,
}

/// Run a prune with no test hook.
pub fn prune(repo: &Repository, opts: &PruneOptions, progress: &Progress) -> Result<PruneReport> {
    prune_with(repo, opts, progress, &|_| Ok(()))
}

/// [`prune`], calling `hook` between steps; an error from it stops the prune there, as a
/// kill would (every file is written atomically, so that is the same state).
pub fn prune_with(
    repo: &Repository,
    opts: &PruneOptions,
    progress: &Progress,
    hook: &dyn Fn(Step) -> Result<()>,
) -> Result<PruneReport> {
    if !(0.0..=1.0).contains(&opts.max_unused) {
        return Err(Error::Usage(format!("max unused {} must be between 0 and 1", opts.max_unused)));
    }
    let mut report = PruneReport::default();
    if opts.dry_run {
        let live = mark(repo, &opts.assume_forgotten)?;
        report.plan = plan(repo, &live, opts.max_unused, progress)?.0;
        report.resumed = pending(repo)?.len();
        return Ok(report);
    }
    let _lock = repo.lock(LockKind::Prune, "prune")?;
    // Finish what an interrupted prune left first: its marker still condemns packs. Every
    // backup running now is waited for: some may have started when no prune ran and saved
    // maps the marker lists (see `Condemned::wait_for_map`).
    for (name, marker) in pending(repo)? {
        if !wait(repo, &name, &shared_locks(repo)?, opts, &mut report)? {
            report.pending = true;
            return Ok(report);
        }
        commit(repo, &name, &marker, progress, hook, &mut report)?;
        report.resumed += 1;
    }
    let live = mark(repo, &opts.assume_forgotten)?;
    let (plan, maps) = plan(repo, &live, opts.max_unused, progress)?;
    report.plan = plan;
    if report.plan.delete.is_empty() && report.plan.repack.is_empty() && maps.is_empty() {
        return Ok(report);
    }
    let name = hex::encode(crate::crypto::random_array::<16>()?);
    let mut marker = PruneMarker {
        version: 1,
        created: jiff::Timestamp::now().to_string(),
        host: crate::lock::hostname(),
        pid: std::process::id(),
        packs: report.plan.delete.iter().chain(&report.plan.repack).map(|p| p.pack.clone()).collect(),
        maps: maps.iter().map(ObjectId::to_hex).collect(),
        waiting_for: None,
    };
    write_marker(repo, &name, &marker)?;
    hook(Step::MarkerWritten)?;
    // Write, then list: a backup whose lock is not in this listing wrote it after the
    // marker existed, so it reads the marker.
    let holders = shared_locks(repo)?;
    marker.waiting_for = Some(holders.clone());
    write_marker(repo, &name, &marker)?;
    hook(Step::WaitRecorded)?;
    if !wait(repo, &name, &holders, opts, &mut report)? {
        report.pending = true;
        return Ok(report);
    }
    commit(repo, &name, &marker, progress, hook, &mut report)?;
    Ok(report)
}

/// Names of the shared locks (and unreadable ones, which may be backups') present now.
fn shared_locks(repo: &Repository) -> Result<Vec<String>> {
    Ok(list_locks(&**repo.backend(), repo.sealer())?
        .into_iter()
        .filter(|l| l.info.as_ref().map_or(true, |i| i.kind == LockKind::Shared))
        .map(|l| l.name)
        .collect())
}

/// Wait until the locks named `holders` are gone or stale. False when `max_wait` ran out.
fn wait(
    repo: &Repository,
    marker_name: &str,
    holders: &[String],
    opts: &PruneOptions,
    report: &mut PruneReport,
) -> Result<bool> {
    let start = Instant::now();
    let mut said = HashSet::new();
    loop {
        let mut busy = Vec::new();
        for l in list_locks(&**repo.backend(), repo.sealer())? {
            if !holders.contains(&l.name) {
                continue;
            }
            match &l.info {
                Ok(info) if info.stale_reason(repo.stale_after).is_some() => {}
                Ok(info) => busy.push((l.name.clone(), info.describe())),
                Err(e) => busy.push((l.name.clone(), format!("unreadable lock {} ({e})", l.name))),
            }
        }
        if busy.is_empty() {
            return Ok(true);
        }
        for (name, desc) in busy {
            if said.insert(name) {
                eprintln!("prune {}: waiting for a backup that started before it: {desc}", &marker_name[..8]);
                report.waited_for.push(desc);
            }
        }
        if opts.max_wait.is_some_and(|w| start.elapsed() >= w) {
            return Ok(false);
        }
        std::thread::sleep(opts.poll);
    }
}

/// Chunk ids (as 8-byte prefixes) named by every manifest, and the stream maps they use.
#[derive(Debug)]
pub struct Live {
    prefixes: Vec<u64>,
    pub maps: HashSet<ObjectId>,
    pub snapshots: usize,
}

fn prefix(id: &ChunkId) -> u64 {
    u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"))
}

impl Live {
    /// True when `id` may be live (a false "live" only keeps a dead chunk).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.prefixes.binary_search(&prefix(id)).is_ok()
    }

    pub fn len(&self) -> usize {
        self.prefixes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }
}

/// Read every manifest and every stream map it names. Any unreadable one stops the prune:
/// what it references would otherwise count as dead.
/// Snapshots in `except` are skipped.
pub fn mark(repo: &Repository, except: &HashSet<ObjectId>) -> Result<Live> {
    let mut prefixes: Vec<u64> = Vec::new();
    let mut compacted = 0usize;
    let mut maps = HashSet::new();
    let mut snapshots = 0;
    for name in repo.backend().list("snapshots")? {
        let id: ObjectId = name
            .parse()
            .map_err(|_| Error::corrupt(format!("snapshots/{name}"), "not a snapshot id; remove it or run check"))?;
        if except.contains(&id) {
            continue;
        }
        let snap = match repo.load_snapshot(&id) {
            Ok(s) => s,
            Err(Error::Missing { .. }) => continue, // forgotten meanwhile
            Err(e) => return Err(with_hint(e)),
        };
        snapshots += 1;
        for s in &snap.streams {
            let map_id: ObjectId = s.map.parse()?;
            if !maps.insert(map_id) {
                continue;
            }
            let map = repo.load_stream_map(&map_id).map_err(with_hint)?;
            for e in &map.extents {
                if let ExtentKind::Chunk(c) = e.kind {
                    prefixes.push(prefix(&c));
                }
            }
            // Keep the list near its distinct size: snapshots share most chunks.
            if prefixes.len() > 2 * compacted.max(1 << 16) {
                prefixes.sort_unstable();
                prefixes.dedup();
                compacted = prefixes.len();
            }
        }
    }
    prefixes.sort_unstable();
    prefixes.dedup();
    prefixes.shrink_to_fit();
    Ok(Live { prefixes, maps, snapshots })
}

fn with_hint(e: Error) -> Error {
    match e {
        Error::Corrupt { object, detail } => Error::Corrupt {
            object,
            detail: format!("{detail}; prune stops rather than guess what it references (run check)"),
        },
        other => other,
    }
}

#[derive(Default, Clone, Copy)]
struct PackCount {
    chunks: u64,
    live_chunks: u64,
    live_stored: u64,
}

/// Count live and dead bytes per pack and choose what to delete and repack. Also returns
/// the stream maps no manifest names.
fn plan(repo: &Repository, live: &Live, max_unused: f64, progress: &Progress) -> Result<(Plan, Vec<ObjectId>)> {
    let index = repo.load_index(4)?;
    let mut counts: HashMap<PackId, PackCount> = HashMap::new();
    progress.total.store(index.files.iter().map(|f| f.page_count() as u64).sum(), Ordering::Relaxed);
    for f in &index.files {
        for p in 0..f.page_count() {
            let page = f.read_page(&**repo.backend(), repo.sealer(), p)?;
            for (id, loc) in f.entries(&page) {
                let c = counts.entry(loc.pack).or_default();
                c.chunks += 1;
                if live.contains(&id) {
                    c.live_chunks += 1;
                    c.live_stored += u64::from(loc.stored_len);
                }
            }
            progress.done.fetch_add(1, Ordering::Relaxed);
        }
    }
    let present = repo.list_packs()?;
    let present_set: HashSet<PackId> = present.iter().copied().collect();
    if let Some(gone) = counts.keys().find(|p| !present_set.contains(p)) {
        return Err(Error::Missing {
            object: pack_path(gone),
            referenced_by: Some("the index; prune stops (run check)".into()),
        });
    }
    let mut out = Plan { snapshots: live.snapshots, live_chunks: live.len() as u64, ..Plan::default() };
    let mut partial = Vec::new();
    for pack in &present {
        let bytes = repo.backend().size(&pack_path(pack))?;
        out.packs += 1;
        out.pack_bytes += bytes;
        let c = counts.get(pack).copied().unwrap_or_default();
        let pp = PackPlan {
            pack: pack.to_hex(),
            bytes,
            live_bytes: c.live_stored,
            chunks: c.chunks,
            live_chunks: c.live_chunks,
        };
        if c.live_chunks == 0 {
            out.delete.push(pp); // unused, or listed by no index (a killed backup's)
        } else if c.live_chunks < c.chunks {
            partial.push(pp);
        }
    }
    // Repack the emptiest packs until what stays unused is within the limit.
    partial.sort_by(|a, b| (a.live_bytes * b.bytes).cmp(&(b.live_bytes * a.bytes)).then(a.pack.cmp(&b.pack)));
    let deleted: u64 = out.delete.iter().map(|p| p.bytes).sum();
    let mut unused: u64 = partial.iter().map(|p| p.bytes - p.live_bytes.min(p.bytes)).sum();
    let mut after = out.pack_bytes - deleted;
    for p in partial {
        if unused as f64 <= max_unused * after as f64 {
            break;
        }
        let dead = p.bytes - p.live_bytes.min(p.bytes);
        unused -= dead;
        after -= dead;
        out.repack.push(p);
    }
    out.unused_bytes_left = unused;
    let mut maps = Vec::new();
    for name in repo.backend().list("streams")? {
        match name.parse::<ObjectId>() {
            Ok(id) if id.to_hex() == name && !live.maps.contains(&id) => maps.push(id),
            _ => {}
        }
    }
    out.unreferenced_maps = maps.len();
    Ok((out, maps))
}

/// Finish a marker: copy out what is live in its packs, replace the index files that name
/// them, delete them and the maps still unreferenced, then the marker.
fn commit(
    repo: &Repository,
    marker_name: &str,
    m: &PruneMarker,
    progress: &Progress,
    hook: &dyn Fn(Step) -> Result<()>,
    report: &mut PruneReport,
) -> Result<()> {
    let condemned: HashSet<PackId> = m.packs.iter().map(|p| p.parse()).collect::<Result<_>>()?;
    // After the wait: the waited-for backups' manifests count. Later backups neither reuse
    // condemned chunks nor save a condemned map while this prune runs, so this one mark
    // serves the packs and the maps.
    let live = mark(repo, &HashSet::new())?;
    let index = repo.load_index(64)?;
    let indexed: HashSet<PackId> = index.files.iter().flat_map(|f| f.packs.iter().copied()).collect();
    let present: HashSet<PackId> = repo.list_packs()?.into_iter().collect();
    let mut packs: Vec<PackId> = condemned.iter().filter(|p| present.contains(p)).copied().collect();
    packs.sort();
    let mut keep = HashSet::new();
    let mut copier = Copier::new(repo);
    progress.total.store(packs.len() as u64, Ordering::Relaxed);
    progress.done.store(0, Ordering::Relaxed);
    // One condemned pack at a time: its table of contents, its live chunks, copied.
    for pack in packs {
        let entries = match repo.read_pack_toc(&pack) {
            Ok(e) => e,
            // Nothing lists it, so nothing can use what it holds.
            Err(e) if e.is_damage() && !indexed.contains(&pack) => Vec::new(),
            Err(e) => return Err(with_hint(e)),
        };
        let mut needed = Vec::new();
        let mut live_entries: Vec<&BlobEntry> = entries.iter().filter(|e| live.contains(&e.id)).collect();
        let live_count = live_entries.len();
        // In id order, so the lookups walk the index pages in order (each decrypted once).
        live_entries.sort_unstable_by_key(|e| e.id);
        for e in live_entries {
            // Already stored in a pack that stays (copied by an interrupted commit, or
            // stored again by a backup that avoided this pack): not again.
            let elsewhere =
                index.lookup_where(&**repo.backend(), repo.sealer(), &e.id, |p| !condemned.contains(p))?.is_some();
            if !elsewhere {
                needed.push(*e);
            }
        }
        // Made fully live again by a waited-for backup, and the only copy of each of its
        // chunks: it stays as it is, copying it would gain nothing.
        if indexed.contains(&pack)
            && !entries.is_empty()
            && live_count == entries.len()
            && needed.len() == entries.len()
        {
            keep.insert(pack);
            continue;
        }
        if !needed.is_empty() {
            copier.copy_from(&pack, &needed, hook, report)?;
        }
        progress.done.fetch_add(1, Ordering::Relaxed);
    }
    copier.finish(hook, report)?;
    report.packs_kept += keep.len();
    let doomed: HashSet<PackId> = condemned.iter().filter(|p| !keep.contains(p)).copied().collect();

    // Replace every index file that lists a doomed pack by one without those entries. Files
    // written since `index` was loaded (the copies, backups) list no condemned pack.
    let mut replaced = Vec::new();
    let mut kept_entries: Vec<(PackId, BlobEntry)> = Vec::new();
    for f in &index.files {
        if !f.packs.iter().any(|p| doomed.contains(p)) {
            continue;
        }
        for p in 0..f.page_count() {
            let page = f.read_page(&**repo.backend(), repo.sealer(), p)?;
            for (id, loc) in f.entries(&page) {
                if !doomed.contains(&loc.pack) {
                    kept_entries.push((loc.pack, loc.entry(id)));
                }
            }
            if kept_entries.len() >= INDEX_FILE_ENTRIES {
                write_index(repo, &mut kept_entries, hook, report)?;
            }
        }
        replaced.push(f.name.clone());
    }
    write_index(repo, &mut kept_entries, hook, report)?;
    for name in replaced {
        repo.backend().remove(&format!("index/{name}"))?;
        report.index_files_removed += 1;
        hook(Step::IndexRemoved)?;
    }
    // No index names them now: delete.
    for pack in &doomed {
        if !present.contains(pack) {
            continue;
        }
        let path = pack_path(pack);
        report.bytes_deleted += repo.backend().size(&path).unwrap_or(0);
        repo.backend().remove(&path)?;
        report.packs_deleted += 1;
        hook(Step::PackRemoved)?;
    }
    // Maps: still unreferenced after the waited-for backups saved theirs.
    for id in &m.maps {
        let id: ObjectId = id.parse()?;
        if !live.maps.contains(&id) {
            repo.backend().remove(&format!("streams/{}", id.to_hex()))?;
            report.maps_deleted += 1;
            hook(Step::MapRemoved)?;
        }
    }
    repo.backend().remove(&format!("{PRUNE_DIR}/{marker_name}"))
}

fn write_index(
    repo: &Repository,
    entries: &mut Vec<(PackId, BlobEntry)>,
    hook: &dyn Fn(Step) -> Result<()>,
    report: &mut PruneReport,
) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let (id, bytes) = build_index(repo.sealer(), entries)?;
    repo.backend().write(&format!("index/{}", id.to_hex()), &bytes)?;
    entries.clear();
    report.index_files_written += 1;
    hook(Step::IndexWritten)
}

/// Copies blobs (verified: a damaged chunk stops the prune before anything is deleted) into
/// new packs, and indexes them every [`INDEX_FILE_ENTRIES`] entries and at the end.
struct Copier<'a> {
    repo: &'a Repository,
    pack: PackBuilder,
    entries: Vec<(PackId, BlobEntry)>,
}

impl<'a> Copier<'a> {
    fn new(repo: &'a Repository) -> Self {
        Self { repo, pack: PackBuilder::new(), entries: Vec::new() }
    }

    /// Copy `chunks` (entries of pack `src`), reading the pack once.
    fn copy_from(
        &mut self,
        src: &PackId,
        chunks: &[BlobEntry],
        hook: &dyn Fn(Step) -> Result<()>,
        report: &mut PruneReport,
    ) -> Result<()> {
        let path = pack_path(src);
        let bytes = self.repo.backend().read(&path)?;
        let mut seen = HashSet::new();
        for e in chunks.iter().filter(|e| seen.insert(e.id)) {
            let (start, end) = (e.offset as usize, e.offset as usize + e.stored_len as usize);
            let blob = bytes
                .get(start..end)
                .ok_or_else(|| Error::corrupt(&path, format!("chunk {} lies past the end", e.id.short())))?;
            open_chunk(self.repo.sealer(), self.repo.key(), &e.id, blob, e.raw_len, &path).map_err(with_hint)?;
            self.pack.add(e.id, blob, e.raw_len);
            report.chunks_copied += 1;
            if self.pack.len() >= self.repo.config().pack_size as usize {
                self.flush(hook, report)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self, hook: &dyn Fn(Step) -> Result<()>, report: &mut PruneReport) -> Result<()> {
        let (id, bytes, written) = std::mem::take(&mut self.pack).finish(self.repo.sealer())?;
        self.repo.backend().write(&pack_path(&id), &bytes)?;
        report.packs_written += 1;
        report.bytes_written += bytes.len() as u64;
        self.entries.extend(written.into_iter().map(|e| (id, e)));
        hook(Step::PackWritten)?;
        if self.entries.len() >= INDEX_FILE_ENTRIES {
            write_index(self.repo, &mut self.entries, hook, report)?;
        }
        Ok(())
    }

    /// The last pack, and the index of what is not indexed yet: all durable before any old
    /// pack goes.
    fn finish(mut self, hook: &dyn Fn(Step) -> Result<()>, report: &mut PruneReport) -> Result<()> {
        if !self.pack.is_empty() {
            self.flush(hook, report)?;
        }
        write_index(self.repo, &mut self.entries, hook, report)
    }
}
