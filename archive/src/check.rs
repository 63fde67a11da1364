//! `check`: is every byte a snapshot needs present, intact and findable?
//!
//! Structure (always): every index file and page authenticates and is sorted; every index
//! entry points inside an existing pack; every manifest and stream map opens; every chunk a
//! stream uses is in the index. With `read_data`: every pack hashes to its name, its table
//! of contents opens and agrees with the index, and every chunk decrypts and hashes to its
//! id. Each problem names the damaged object and the snapshots and streams it damages.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::extents::ExtentKind;
use crate::id::{ChunkId, PackId, SnapshotId};
use crate::index::IndexFile;
use crate::lock::LockKind;
use crate::pack::{open_chunk, pack_path, parse_toc, BlobEntry};
use crate::progress::Progress;
use crate::repo::Repository;

#[derive(Clone, Copy, Debug, Default)]
pub struct CheckOptions {
    pub read_data: bool,
    /// Read only this fraction (0..=1) of the packs, chosen at random — a sample that
    /// verifies in bounded time; `read_data` wins when both are set.
    pub read_data_subset: Option<f64>,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Data a snapshot needs is missing or damaged, or metadata is unreadable.
    Error,
    /// Untidy but harmless: unreferenced packs, stray files.
    Warning,
}

#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    pub severity: Severity,
    pub object: String,
    pub detail: String,
    /// `snapshot-id (vm) stream` for each stream this problem damages.
    pub damages: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    pub snapshots: usize,
    pub index_files: usize,
    pub packs: usize,
    pub chunks: u64,
    /// Packs read whole (all with `read_data`, a sample with `read_data_subset`).
    pub packs_read: usize,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
}

impl CheckReport {
    pub fn errors(&self) -> usize {
        self.problems.iter().filter(|p| p.severity == Severity::Error).count()
    }

    fn error(&mut self, object: impl Into<String>, detail: impl Into<String>) {
        self.problems.push(Problem {
            severity: Severity::Error,
            object: object.into(),
            detail: detail.into(),
            damages: vec![],
        });
    }

    fn warn(&mut self, object: impl Into<String>, detail: impl Into<String>) {
        self.problems.push(Problem {
            severity: Severity::Warning,
            object: object.into(),
            detail: detail.into(),
            damages: vec![],
        });
    }
}

/// Chunk id → (pack, entry), from every readable index page.
type ChunkTable = HashMap<ChunkId, (PackId, BlobEntry)>;

pub fn check(repo: &Repository, opts: CheckOptions, progress: &Progress) -> Result<CheckReport> {
    let _lock = repo.lock(LockKind::Exclusive, "check")?;
    let mut report = CheckReport::default();
    let (table, indexed) = check_index(repo, &mut report)?;
    // Chunks that are unusable, with why, and the problem that says so.
    let mut bad: HashMap<ChunkId, usize> = HashMap::new();
    check_packs(repo, &table, &indexed, opts, progress, &mut report, &mut bad)?;
    check_snapshots(repo, &table, &mut report, &bad)?;
    match crate::prune::pending(repo) {
        Ok(markers) => {
            for (name, m) in markers {
                report.warn(
                    format!("prune/{name}"),
                    format!(
                        "a prune started {} is unfinished ({} packs condemned); run `vmvault prune` to finish it",
                        m.created,
                        m.packs.len()
                    ),
                );
            }
        }
        Err(e) if e.is_damage() || matches!(e, Error::Unsupported(_)) => {
            report.error(crate::prune::PRUNE_DIR, e.to_string());
        }
        Err(e) => return Err(e),
    }
    Ok(report)
}

/// The chunk table, and every pack some index entry points into (duplicates included).
fn check_index(repo: &Repository, report: &mut CheckReport) -> Result<(ChunkTable, HashSet<PackId>)> {
    let mut table = ChunkTable::new();
    let mut indexed = HashSet::new();
    for name in repo.backend().list("index")? {
        report.index_files += 1;
        let file = match IndexFile::open(&**repo.backend(), repo.sealer(), &name) {
            Ok(f) => f,
            Err(e) if e.is_damage() => {
                report.error(format!("index/{name}"), e.to_string());
                continue;
            }
            Err(e) => return Err(e),
        };
        for p in 0..file.page_count() {
            match file.read_page(&**repo.backend(), repo.sealer(), p) {
                Ok(page) => {
                    for (id, loc) in file.entries(&page) {
                        indexed.insert(loc.pack);
                        table.entry(id).or_insert((loc.pack, loc.entry(id)));
                    }
                }
                Err(e) if e.is_damage() => report.error(format!("index/{name}"), e.to_string()),
                Err(e) => return Err(e),
            }
        }
    }
    report.chunks = table.len() as u64;
    Ok((table, indexed))
}

fn check_packs(
    repo: &Repository,
    table: &ChunkTable,
    indexed: &HashSet<PackId>,
    opts: CheckOptions,
    progress: &Progress,
    report: &mut CheckReport,
    bad: &mut HashMap<ChunkId, usize>,
) -> Result<()> {
    let present: Vec<PackId> = repo.list_packs()?;
    report.packs = present.len();
    let mut sizes: HashMap<PackId, u64> = HashMap::new();
    for p in &present {
        sizes.insert(*p, repo.backend().size(&pack_path(p))?);
    }
    let mut by_pack: HashMap<PackId, Vec<BlobEntry>> = HashMap::new();
    for (pack, e) in table.values() {
        by_pack.entry(*pack).or_default().push(*e);
    }
    for (pack, entries) in &by_pack {
        let path = pack_path(pack);
        let problem = match sizes.get(pack) {
            None => Some(format!("pack is missing; {} chunks in it are lost", entries.len())),
            Some(size) => entries.iter().find(|e| u64::from(e.offset) + u64::from(e.stored_len) > *size).map(|e| {
                format!(
                    "index says chunk {} ends at {}, past the pack end {size}",
                    e.id.short(),
                    e.offset + e.stored_len
                )
            }),
        };
        if let Some(detail) = problem {
            report.error(path, detail);
            for e in entries {
                bad.insert(e.id, report.problems.len() - 1);
            }
        }
    }
    for p in &present {
        if !indexed.contains(p) {
            report.warn(
                pack_path(p),
                "no index entry points into this pack (an interrupted backup leaves such packs; the next backup adopts packs no index lists)",
            );
        }
    }
    let to_read: Vec<PackId> = match (opts.read_data, opts.read_data_subset) {
        (true, _) => present.clone(),
        (false, Some(f)) => sample(&present, f)?,
        (false, None) => Vec::new(),
    };
    if !to_read.is_empty() {
        let present = &to_read;
        let total: u64 = present.iter().map(|p| sizes[p]).sum();
        progress.total.store(total, Ordering::Relaxed);
        let found = Mutex::new(Vec::<(String, String, Vec<ChunkId>)>::new());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(pack) = present.get(i) else { return };
                    let empty = Vec::new();
                    let indexed = by_pack.get(pack).unwrap_or(&empty);
                    if let Some(f) = read_pack(repo, pack, indexed) {
                        found.lock().unwrap_or_else(|e| e.into_inner()).push(f);
                    }
                    progress.done.fetch_add(sizes[pack], Ordering::Relaxed);
                });
            }
        });
        report.bytes_read = total;
        report.packs_read = present.len();
        for (object, detail, chunks) in found.into_inner().unwrap_or_else(|e| e.into_inner()) {
            report.error(object, detail);
            for c in chunks {
                bad.insert(c, report.problems.len() - 1);
            }
        }
    }
    Ok(())
}

/// `fraction` of `packs` (at least one when there are any), chosen at random.
fn sample(packs: &[PackId], fraction: f64) -> Result<Vec<PackId>> {
    if !(0.0..=1.0).contains(&fraction) {
        return Err(Error::Usage(format!("read-data subset {fraction} must be between 0 and 1")));
    }
    let want = ((packs.len() as f64 * fraction).ceil() as usize).clamp(usize::from(!packs.is_empty()), packs.len());
    // Rank by a random keyed hash of the name: a uniform sample without a PRNG crate.
    let salt: [u8; 32] = crate::crypto::random_array()?;
    let mut ranked: Vec<([u8; 32], PackId)> =
        packs.iter().map(|p| (*blake3::keyed_hash(&salt, &p.0).as_bytes(), *p)).collect();
    ranked.sort_unstable();
    Ok(ranked.into_iter().take(want).map(|(_, p)| p).collect())
}

/// Verify one pack fully. Returns (object, detail, damaged chunks) on trouble.
fn read_pack(repo: &Repository, pack: &PackId, indexed: &[BlobEntry]) -> Option<(String, String, Vec<ChunkId>)> {
    let path = pack_path(pack);
    let all_indexed = || indexed.iter().map(|e| e.id).collect();
    let bytes = match repo.backend().read(&path) {
        Ok(b) => b,
        Err(e) => return Some((path, e.to_string(), all_indexed())),
    };
    if !bytes.starts_with(crate::pack::PACK_MAGIC) {
        return Some((path, "bad magic at offset 0".into(), all_indexed()));
    }
    if blake3::hash(&bytes).as_bytes() != &pack.0 {
        return Some((path, "contents do not hash to the pack's name".into(), all_indexed()));
    }
    let toc = match parse_toc(repo.sealer(), bytes.len() as u64, &bytes, &path) {
        Ok(t) => t,
        Err(e) => return Some((path, e.to_string(), all_indexed())),
    };
    let in_toc: HashSet<BlobEntry> = toc.iter().copied().collect();
    let mut damaged = Vec::new();
    let mut details = Vec::new();
    for e in indexed {
        if !in_toc.contains(e) {
            damaged.push(e.id);
            details.push(format!("index entry for chunk {} disagrees with the pack", e.id.short()));
        }
    }
    for e in &toc {
        let blob = &bytes[e.offset as usize..(e.offset + e.stored_len) as usize];
        if let Err(err) = open_chunk(repo.sealer(), repo.key(), &e.id, blob, e.raw_len, &path) {
            damaged.push(e.id);
            details.push(err.to_string());
        }
    }
    if details.is_empty() {
        return None;
    }
    let n = details.len();
    let mut detail = details.swap_remove(0);
    if n > 1 {
        detail.push_str(&format!(" (and {} more problems in this pack)", n - 1));
    }
    Some((path, detail, damaged))
}

fn check_snapshots(
    repo: &Repository,
    table: &ChunkTable,
    report: &mut CheckReport,
    bad: &HashMap<ChunkId, usize>,
) -> Result<()> {
    for name in repo.backend().list("snapshots")? {
        report.snapshots += 1;
        let object = format!("snapshots/{name}");
        let id: SnapshotId = match name.parse() {
            Ok(id) => id,
            Err(_) => {
                report.warn(object, "file name is not an object id");
                continue;
            }
        };
        let snap = match repo.load_snapshot(&id) {
            Ok(s) => s,
            Err(e) if e.is_damage() || matches!(e, Error::Unsupported(_)) => {
                report.error(object, e.to_string());
                continue;
            }
            Err(e) => return Err(e),
        };
        for st in &snap.streams {
            let who = format!("{} ({}) {}", id.short(), snap.vm, st.name);
            let map = match st.map.parse().map_err(Error::from).and_then(|m| repo.load_stream_map(&m)) {
                Ok(m) => m,
                Err(e) if e.is_damage() || matches!(e, Error::Unsupported(_) | Error::Usage(_)) => {
                    report.problems.push(Problem {
                        severity: Severity::Error,
                        object: format!("streams/{}", st.map),
                        detail: e.to_string(),
                        damages: vec![who],
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            if map.size != st.size {
                report.error(
                    format!("streams/{}", st.map),
                    format!("map covers {} bytes, manifest says {}", map.size, st.size),
                );
            }
            let mut missing = 0usize;
            let mut first_missing = None;
            let mut hit: HashSet<usize> = HashSet::new();
            for e in &map.extents {
                if let ExtentKind::Chunk(c) = e.kind {
                    match table.get(&c) {
                        None => {
                            missing += 1;
                            first_missing.get_or_insert(c);
                        }
                        Some((_, entry)) if entry.raw_len != e.len => {
                            report.error(
                                format!("chunk {}", c.short()),
                                format!("stored with {} bytes, {who} uses {}", entry.raw_len, e.len),
                            );
                        }
                        Some(_) => {
                            if let Some(&p) = bad.get(&c) {
                                hit.insert(p);
                            }
                        }
                    }
                }
            }
            for p in hit {
                report.problems[p].damages.push(who.clone());
            }
            if let Some(c) = first_missing {
                report.problems.push(Problem {
                    severity: Severity::Error,
                    object: format!("chunk {}", c.short()),
                    detail: format!("{missing} chunk(s) referenced but not in the index"),
                    damages: vec![who],
                });
            }
        }
    }
    Ok(())
}
