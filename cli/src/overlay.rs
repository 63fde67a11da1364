//! `vmvault overlay list|commit|discard`: what `serve --writable` left behind.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use archive::backup::{BackupOptions, ParentChoice, Source};
use archive::manifest::StreamKind;
use archive::progress::Progress;
use blockdev::overlay::{read_overlay_header, remove_overlay, OverlayHeader};
use blockdev::{BlockDev, Overlay};
use clap::{Args, Subcommand};

use crate::commands::Ctx;
use crate::human;
use crate::progress::Bar;

#[derive(Subcommand, Debug)]
pub enum OverlayCommand {
    /// List overlay files under a folder (every session), with their base and size.
    List(ListArgs),
    /// Store base + overlays as a new snapshot of the same VM (only changed chunks are new).
    Commit(CommitArgs),
    /// Delete overlay files (refused while a server has them open).
    Discard(DiscardArgs),
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// The --overlay-dir given to `serve`.
    #[arg(long)]
    overlay_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct CommitArgs {
    /// Overlay files (or session folders) of one base snapshot, one per disk.
    #[arg(required = true)]
    overlays: Vec<PathBuf>,
    /// Extra tags for the new snapshot.
    #[arg(long = "tag")]
    tags: Vec<String>,
}

#[derive(Args, Debug)]
pub struct DiscardArgs {
    /// Overlay files or session folders.
    #[arg(required = true)]
    overlays: Vec<PathBuf>,
}

/// Overlay files named by `paths`: files as they are, folders searched recursively.
fn overlay_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(p)?.collect::<std::io::Result<_>>()?;
            entries.sort_by_key(|e| e.file_name());
            let children: Vec<PathBuf> = entries
                .into_iter()
                .map(|e| e.path())
                .filter(|c| c.is_dir() || c.extension().is_some_and(|x| x == "ovl"))
                .collect();
            out.extend(overlay_files(&children)?);
        } else if p.exists() {
            out.push(p.clone());
        } else {
            bail!("{}: no such overlay", p.display());
        }
    }
    Ok(out)
}

/// The base of an overlay made by `serve`, recorded in its header as `SNAPSHOT/STREAM`.
pub(crate) struct OverlayBase {
    /// Snapshot id, 64 hex digits.
    pub snapshot: String,
    pub stream: String,
}

impl OverlayBase {
    /// The identity written into the overlay header.
    pub fn id(&self) -> String {
        format!("{}/{}", self.snapshot, self.stream)
    }

    fn of(h: &OverlayHeader, path: &Path) -> Result<Self> {
        h.base_id
            .split_once('/')
            .map(|(a, b)| Self { snapshot: a.to_owned(), stream: b.to_owned() })
            .ok_or_else(|| anyhow!("{}: base {:?} is not SNAPSHOT/STREAM", path.display(), h.base_id))
    }
}

/// One overlay file, as `overlay list` shows it.
#[derive(serde::Serialize)]
struct Row {
    path: PathBuf,
    snapshot: String,
    stream: String,
    size: u64,
    block_size: u32,
    created: u64,
    disk_usage: u64,
}

pub fn run(ctx: &Ctx, cmd: OverlayCommand) -> Result<()> {
    match cmd {
        OverlayCommand::List(a) => list(ctx, a),
        OverlayCommand::Commit(a) => commit(ctx, a),
        OverlayCommand::Discard(a) => discard(ctx, a),
    }
}

fn list(ctx: &Ctx, a: ListArgs) -> Result<()> {
    let mut rows = Vec::new();
    for path in overlay_files(&[a.overlay_dir])? {
        let h = read_overlay_header(&path).with_context(|| format!("reading {}", path.display()))?;
        let OverlayBase { snapshot, stream } = OverlayBase::of(&h, &path)?;
        let disk_usage = std::fs::metadata(&path).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)?;
        let (size, block_size, created) = (h.size, h.block_size, h.created);
        rows.push(Row { path, snapshot, stream, size, block_size, created, disk_usage });
    }
    if ctx.json {
        return ctx.print_json(&rows);
    }
    for r in &rows {
        println!(
            "{}  base {}:{}  {} written",
            r.path.display(),
            &r.snapshot[..r.snapshot.len().min(8)],
            r.stream,
            human::bytes(r.disk_usage),
        );
    }
    Ok(())
}

fn commit(ctx: &Ctx, a: CommitArgs) -> Result<()> {
    let files = overlay_files(&a.overlays)?;
    let mut bases = Vec::new();
    for f in &files {
        let h = read_overlay_header(f).with_context(|| format!("reading {}", f.display()))?;
        bases.push((f, OverlayBase::of(&h, f)?));
    }
    let Some((first, base)) = bases.first() else { bail!("no overlay files found") };
    if let Some((other, _)) = bases.iter().find(|(_, b)| b.snapshot != base.snapshot) {
        bail!("{} and {} overlay different snapshots; commit them one at a time", first.display(), other.display());
    }
    let repo = Arc::new(ctx.open()?);
    let entry = repo.resolve_snapshot(&base.snapshot)?;
    if let Some((path, b)) = bases.iter().find(|(_, b)| entry.snapshot.stream(&b.stream).is_none()) {
        bail!("snapshot {} has no disk {:?} for {}", entry.id.short(), b.stream, path.display());
    }
    let streams = archive::reader::RepoReader::new(repo.clone(), 1024, 64 << 20)?;
    let mut sources = Vec::new();
    for s in entry.snapshot.streams.iter().filter(|s| s.kind == StreamKind::Disk) {
        let reader = streams.open(&entry, &s.name)?;
        let (dev, changed): (Box<dyn BlockDev>, _) = match bases.iter().find(|(_, b)| b.stream == s.name) {
            Some((path, b)) => {
                let ov = Overlay::open(path, reader, Some(&b.id()), false)
                    .with_context(|| format!("opening {}", path.display()))?;
                let changed = ov.changed_ranges();
                (Box::new(ov), changed)
            }
            None => (Box::new(reader), Vec::new()),
        };
        sources.push(Source { name: s.name.clone(), kind: s.kind, dev, changed: Some(changed) });
    }
    let mut tags = entry.snapshot.tags.clone();
    tags.extend(a.tags);
    let opts = BackupOptions {
        vm: entry.snapshot.vm.clone(),
        tags,
        meta: Some(serde_json::json!({
            "overlay_of": entry.id.to_hex(),
            "overlays": files,
            "base_meta": entry.snapshot.meta,
        })),
        parent: ParentChoice::Id(entry.id),
        workers: 0,
    };
    let progress = Arc::new(Progress::default());
    let new = {
        let _bar = Bar::start(progress.clone(), "commit", ctx.quiet);
        archive::backup::backup(&repo, sources, &opts, &progress)?
    };
    if ctx.json {
        return ctx.print_json(&serde_json::json!({"snapshot": new.id.to_hex(), "base": entry.id.to_hex(),
            "new_bytes": new.snapshot.summary.new_bytes}));
    }
    println!(
        "snapshot {} of {} saved from {} + {} overlay(s): {} read, {} new",
        new.id.short(),
        new.snapshot.vm,
        entry.id.short(),
        files.len(),
        human::bytes(new.snapshot.summary.read_bytes),
        human::bytes(new.snapshot.summary.new_bytes),
    );
    Ok(())
}

fn discard(ctx: &Ctx, a: DiscardArgs) -> Result<()> {
    let files = overlay_files(&a.overlays)?;
    let abs: Vec<String> = files
        .iter()
        .map(|f| std::fs::canonicalize(f).map(|p| p.to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    for f in &files {
        let h = remove_overlay(f).with_context(|| format!("discarding {}", f.display()))?;
        println!("discarded {} (overlay of {})", f.display(), h.base_id);
    }
    // The holds `serve --writable` put on the bases: the snapshots may be forgotten now.
    match ctx.open() {
        Ok(repo) => {
            for p in &abs {
                archive::hold::release_overlay(&repo, p)?;
            }
        }
        Err(e) => eprintln!("warning: the repository's holds for these overlays stay ({e:#})"),
    }
    Ok(())
}
