//! One function per command: options in, archive calls, output out.

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use archive::backup::{BackupOptions, ParentChoice, Source};
use archive::check::{CheckOptions, Severity};
use archive::chunker::ChunkerParams;
use archive::keyfile::KdfParams;
use archive::manifest::{SnapshotEntry, StreamKind};
use archive::progress::Progress;
use archive::reader::{ReadAhead, StreamReader};
use archive::restore::RestoreOptions;
use archive::store::ChunkStore;
use archive::{InitOptions, Repository};
use blockdev::{BlockDev, FileDev};
use clap::{Args, Subcommand};

use crate::progress::Bar;
use crate::{human, password, Cli, Command};

/// Standard output went away (`vmvault cat | head`): not an error.
#[derive(Debug)]
pub struct BrokenPipe;

impl std::fmt::Display for BrokenPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("broken pipe")
    }
}

impl std::error::Error for BrokenPipe {}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Chunker: fixed:SIZE or fastcdc:MIN:AVG:MAX (sizes like 64K, 1M).
    #[arg(long, default_value = "fixed:1M")]
    chunker: String,
    /// zstd compression level (1-22).
    #[arg(long, default_value_t = 3)]
    zstd_level: i32,
    /// Target size of pack files in MiB (1-1024); smaller packs let prune free space in
    /// finer steps, larger ones mean fewer files.
    #[arg(long, value_name = "MIB", default_value_t = 16)]
    pack_size_mib: u32,
    /// Argon2id memory cost in KiB (lower only for tests).
    #[arg(long, default_value_t = 65536, hide = true)]
    kdf_memory_kib: u32,
    /// IANA time zone in which `forget` reads days, weeks, months and years (default: this
    /// machine's zone when it has a name, e.g. Europe/Berlin).
    #[arg(long)]
    time_zone: Option<String>,
}

/// A `--keep-*` count: a number, or `unlimited` (also -1, as restic) for every period.
fn parse_keep(s: &str) -> Result<u32, String> {
    match s {
        "unlimited" | "-1" => Ok(archive::retention::UNLIMITED),
        n => n.parse::<u32>().map_err(|_| format!("{n:?}: give a count or \"unlimited\"")),
    }
}

#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// Snapshots to remove (ID prefixes or VM@ID); instead of --keep-* rules.
    ids: Vec<String>,
    /// Only this VM's snapshots (rules always apply to each VM separately).
    #[arg(long)]
    vm: Option<String>,
    /// Keep the N newest snapshots (every count takes "unlimited", or -1, for all).
    #[arg(long, value_name = "N", default_value = "0", value_parser = parse_keep, allow_hyphen_values = true)]
    keep_last: u32,
    /// Keep the newest snapshot of each of the N newest hours that have one.
    #[arg(long, value_name = "N", default_value = "0", value_parser = parse_keep, allow_hyphen_values = true)]
    keep_hourly: u32,
    /// Keep the newest snapshot of each of the N newest days that have one.
    #[arg(long, value_name = "N", default_value = "0", value_parser = parse_keep, allow_hyphen_values = true)]
    keep_daily: u32,
    /// Keep the newest snapshot of each of the N newest ISO weeks that have one.
    #[arg(long, value_name = "N", default_value = "0", value_parser = parse_keep, allow_hyphen_values = true)]
    keep_weekly: u32,
    /// Keep the newest snapshot of each of the N newest months that have one.
    #[arg(long, value_name = "N", default_value = "0", value_parser = parse_keep, allow_hyphen_values = true)]
    keep_monthly: u32,
    /// Keep the newest snapshot of each of the N newest years that have one.
    #[arg(long, value_name = "N", default_value = "0", value_parser = parse_keep, allow_hyphen_values = true)]
    keep_yearly: u32,
    /// Keep snapshots newer than the VM's newest minus SPAN (2d, 1w, 6m, 1y, 12h, 1y6m).
    #[arg(long, value_name = "SPAN")]
    keep_within: Option<String>,
    /// Keep snapshots with this tag (repeatable).
    #[arg(long, value_name = "TAG")]
    keep_tag: Vec<String>,
    /// Read calendar periods in this IANA zone instead of the repository's.
    #[arg(long)]
    time_zone: Option<String>,
    /// Print what would be removed and remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Then delete the data no remaining snapshot needs (as `vmvault prune`).
    #[arg(long)]
    prune: bool,
    #[command(flatten)]
    prune_flags: crate::prune::PruneFlags,
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// The VM's name; snapshots are grouped by it.
    #[arg(long)]
    vm: String,
    /// Disks as NAME=PATH (an image file or block device), e.g. xvda=disk0.raw, or NAME=URI of
    /// an NBD export: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds://… with
    /// tls-certificates=DIR (DIR/ca-cert.pem) or tls-verify-peer=false.
    #[arg(required = true, value_name = "NAME=PATH")]
    disks: Vec<String>,
    /// A memory image to store as the `memory` stream.
    #[arg(long)]
    memory: Option<PathBuf>,
    /// A JSON file with hypervisor metadata (the VM record) to keep with the snapshot.
    #[arg(long)]
    meta: Option<PathBuf>,
    /// Tags for the snapshot.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Parent snapshot id (prefix) or `none`; default: the VM's latest snapshot.
    #[arg(long)]
    parent: Option<String>,
    /// Changed ranges of a disk since the parent, as NAME=FILE; FILE has `OFFSET LENGTH`
    /// lines (bytes). Only those ranges are read; the rest comes from the parent. For a disk
    /// read from an NBD URI, NAME=bitmap:BITMAP takes them from the export's dirty bitmap
    /// (`qemu:dirty-bitmap:BITMAP`: qemu-nbd -B, a running qemu's NBD export).
    #[arg(long = "changed", value_name = "NAME=FILE")]
    changed: Vec<String>,
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
}

#[derive(Args, Debug)]
pub struct SnapshotsArgs {
    /// Only this VM's snapshots.
    #[arg(long)]
    vm: Option<String>,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// What to restore: VM@latest:STREAM, VM@ID:STREAM or ID:STREAM.
    what: String,
    /// File or block device to write.
    #[arg(long)]
    target: PathBuf,
    /// Replace an existing file.
    #[arg(long)]
    overwrite: bool,
    /// Fetching threads (default: one per core, plus one).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args, Debug)]
pub struct CatArgs {
    /// What to print: VM@latest:STREAM, VM@ID:STREAM or ID:STREAM; or a file inside the guest,
    /// VM@latest:/DISK/VOLUME/PATH (see `vmvault ls`).
    what: String,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Also read, decrypt and re-hash every chunk.
    #[arg(long)]
    read_data: bool,
    /// Read, decrypt and re-hash the chunks of a random PERCENT of the packs ("10%"), so
    /// that regular runs verify everything over time in bounded time each.
    #[arg(long, value_name = "PERCENT", conflicts_with = "read_data", value_parser = crate::prune::parse_percent)]
    read_data_subset: Option<f64>,
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// List key files.
    List,
    /// Add a passphrase (from --new-password-file, VMVAULT_NEW_PASSWORD, or a prompt).
    Add(NewPassArgs),
    /// Remove a key file by id prefix.
    Remove { id: String },
    /// Change the passphrase of the key in use.
    Passwd(NewPassArgs),
}

#[derive(Args, Debug)]
pub struct NewPassArgs {
    #[arg(long)]
    new_password_file: Option<PathBuf>,
    #[arg(long, default_value_t = 65536, hide = true)]
    kdf_memory_kib: u32,
}

#[derive(Args, Debug)]
pub struct UnlockArgs {
    /// Remove every lock, not only stale ones.
    #[arg(long)]
    remove_all: bool,
}

/// A hint for the user after an error, where one helps.
pub fn hint(e: &anyhow::Error) -> Option<&'static str> {
    match e.downcast_ref::<archive::Error>()? {
        archive::Error::WrongPassword(_) => Some("check VMVAULT_PASSWORD or --password-file"),
        archive::Error::Corrupt { .. } | archive::Error::Missing { .. } => {
            Some("run `vmvault check --read-data` to see everything that is damaged")
        }
        _ => None,
    }
}

#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) repo_path: Option<PathBuf>,
    pub(crate) password_file: Option<PathBuf>,
    pub(crate) json: bool,
    pub(crate) quiet: bool,
    pub(crate) lock_stale_minutes: u64,
}

impl Ctx {
    fn repo_path(&self) -> Result<&Path> {
        self.repo_path.as_deref().ok_or_else(|| anyhow!("no repository: pass --repo PATH or set VMVAULT_REPO"))
    }

    pub(crate) fn open(&self) -> Result<Repository> {
        let path = self.repo_path()?;
        let pass = password::existing(self.password_file.as_deref())?;
        let mut repo = Repository::open(path, &pass)?;
        repo.stale_after = std::time::Duration::from_secs(self.lock_stale_minutes.max(1) * 60);
        Ok(repo)
    }

    pub(crate) fn print_json(&self, v: &impl serde::Serialize) -> Result<()> {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, v)?;
        writeln!(out)?;
        Ok(())
    }
}

pub fn run(cli: Cli) -> Result<()> {
    let ctx = Ctx {
        repo_path: cli.repo,
        password_file: cli.password_file,
        json: cli.json,
        quiet: cli.quiet,
        lock_stale_minutes: cli.lock_stale_minutes,
    };
    match cli.command {
        Command::Init(a) => init(&ctx, a),
        Command::Backup(a) => backup(&ctx, a),
        Command::Snapshots(a) => snapshots(&ctx, a),
        Command::Forget(a) => forget(&ctx, a),
        Command::Restore(a) => restore(&ctx, a),
        Command::Cat(a) => cat(&ctx, a),
        Command::Export(a) => crate::export::run(&ctx, a),
        Command::Import(a) => crate::import::run(&ctx, a),
        Command::Ls(a) => crate::browse::ls(&ctx, a),
        Command::Mount(a) => crate::mount::run(&ctx, a),
        Command::RestoreFiles(a) => crate::restore_files::run(&ctx, a),
        Command::Check(a) => check(&ctx, a),
        Command::Prune(a) => crate::prune::run(&ctx, a),
        Command::Stats => stats(&ctx),
        Command::Key(k) => key(&ctx, k),
        Command::Unlock(a) => unlock(&ctx, a),
        Command::Serve(a) => crate::serve::run(&ctx, a),
        Command::Overlay(c) => crate::overlay::run(&ctx, c),
        Command::BenchStages(a) => crate::stages::run(a, ctx.json),
        Command::Xapi(c) => crate::xapi::run(&ctx, c),
        Command::Job(c) => crate::job::run(&ctx, c),
    }
}

fn kdf(memory_kib: u32) -> KdfParams {
    KdfParams { memory_kib, ..KdfParams::default() }
}

fn init(ctx: &Ctx, a: InitArgs) -> Result<()> {
    let path = ctx.repo_path()?;
    let chunker = ChunkerParams::parse(&a.chunker)?;
    let pass = password::new(ctx.password_file.as_deref(), "VMVAULT_PASSWORD")?;
    let time_zone = a.time_zone.or_else(|| jiff::tz::TimeZone::system().iana_name().map(str::to_owned));
    let opts = InitOptions {
        chunker,
        zstd_level: a.zstd_level,
        kdf: kdf(a.kdf_memory_kib),
        time_zone,
        pack_size: a.pack_size_mib.checked_mul(1 << 20).ok_or_else(|| anyhow!("--pack-size-mib is too large"))?,
    };
    let repo =
        Repository::init(path, &pass, &opts).with_context(|| format!("creating a repository in {}", path.display()))?;
    if ctx.json {
        ctx.print_json(&serde_json::json!({"path": path, "id": repo.config().id, "chunker": chunker.to_string()}))
    } else {
        println!("created repository {} in {} (chunker {chunker})", &repo.config().id[..8], path.display());
        println!("keep the passphrase safe: without it the data cannot be read");
        Ok(())
    }
}

/// A backup source: an image file or block device, or an NBD export by URI (`nbd://HOST[:PORT]/
/// EXPORT`, `nbd+unix:///EXPORT?socket=PATH`: qemu-nbd, nbdkit, a running qemu's NBD server),
/// whose block status lets holes go unread.
fn open_source(name: &str, path: &Path) -> Result<Box<dyn BlockDev>> {
    let spec = path.to_string_lossy();
    if ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"].iter().any(|p| spec.starts_with(p)) {
        let target = capture::nbd::Target::from_uri(&spec).map_err(|e| anyhow!("{name}: {e}"))?;
        let dev = capture::nbd::NbdDisk::open(target).with_context(|| format!("opening {name}={spec}"))?;
        return Ok(Box::new(dev));
    }
    let dev = FileDev::open(path).with_context(|| format!("opening {name}={}", path.display()))?;
    Ok(Box::new(dev))
}

fn parse_ranges(path: &Path) -> Result<Vec<std::ops::Range<u64>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut it = line.split_whitespace().map(str::parse::<u64>);
        match (it.next(), it.next(), it.next()) {
            (Some(Ok(off)), Some(Ok(len)), None) => {
                let end =
                    off.checked_add(len).ok_or_else(|| anyhow!("{}:{}: range overflows", path.display(), n + 1))?;
                out.push(off..end);
            }
            _ => bail!("{}:{}: expected `OFFSET LENGTH` in bytes", path.display(), n + 1),
        }
    }
    Ok(out)
}

fn backup(ctx: &Ctx, a: BackupArgs) -> Result<()> {
    let repo = ctx.open()?;
    // Changed ranges first: a dirty bitmap is read over a connection of its own, closed
    // before the disk's (servers such as qemu-nbd take one client at a time by default).
    let mut changed = Vec::new();
    for c in &a.changed {
        let (name, file) = c.split_once('=').ok_or_else(|| anyhow!("--changed {c:?}: expected NAME=FILE"))?;
        let disk = a.disks.iter().find_map(|d| d.strip_prefix(name)?.strip_prefix('='));
        let disk = disk.ok_or_else(|| anyhow!("--changed names {name:?}, which is not a disk of this backup"))?;
        let ranges = match file.strip_prefix("bitmap:") {
            Some(bitmap) => {
                let target = capture::nbd::Target::from_uri(disk)
                    .map_err(|e| anyhow!("--changed {name}=bitmap:…: the disk must be an NBD URI ({e})"))?;
                capture::nbd::dirty_ranges(&target, bitmap)
                    .with_context(|| format!("dirty bitmap {bitmap} of {name}"))?
            }
            None => parse_ranges(Path::new(file))?,
        };
        changed.push((name.to_string(), ranges));
    }
    let mut sources = Vec::new();
    for d in &a.disks {
        let (name, path) =
            d.split_once('=').ok_or_else(|| anyhow!("disk {d:?}: expected NAME=PATH, e.g. xvda=disk0.raw"))?;
        let ranges = changed.iter().find(|(n, _)| n == name).map(|(_, r)| r.clone());
        sources.push(Source {
            name: name.into(),
            kind: StreamKind::Disk,
            dev: open_source(name, Path::new(path))?,
            changed: ranges,
        });
    }
    if let Some(m) = &a.memory {
        sources.push(Source {
            name: "memory".into(),
            kind: StreamKind::Memory,
            dev: open_source("memory", m)?,
            changed: None,
        });
    }
    let meta = match &a.meta {
        Some(p) => {
            let text = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            Some(serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", p.display()))?)
        }
        None => None,
    };
    let parent = match a.parent.as_deref() {
        None => ParentChoice::Latest,
        Some("none") => ParentChoice::None,
        Some(p) => ParentChoice::Id(repo.resolve_snapshot(p)?.id),
    };
    let opts = BackupOptions { vm: a.vm.clone(), tags: a.tags, meta, parent, workers: a.workers };
    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let entry = {
        let _bar = Bar::start(progress.clone(), &format!("backup {}", a.vm), ctx.quiet);
        archive::backup::backup(&repo, sources, &opts, &progress)?
    };
    report_backup(ctx, &entry, start.elapsed().as_secs_f64())
}

/// Print what a backup (or import) saved.
pub(crate) fn report_backup(ctx: &Ctx, entry: &SnapshotEntry, secs: f64) -> Result<()> {
    let s = &entry.snapshot;
    if ctx.json {
        return ctx.print_json(&serde_json::json!({"id": entry.id.to_hex(), "snapshot": s, "seconds": secs}));
    }
    let logical: u64 = s.streams.iter().map(|x| x.size).sum();
    println!(
        "snapshot {} of {} saved: {} streams, {} logical, {} read, {} new ({} stored) in {secs:.1} s ({})",
        entry.id.short(),
        s.vm,
        s.streams.len(),
        human::bytes(logical),
        human::bytes(s.summary.read_bytes),
        human::bytes(s.summary.new_bytes),
        human::bytes(s.summary.stored_bytes),
        human::rate(s.summary.read_bytes, secs),
    );
    Ok(())
}

fn snapshot_json(e: &SnapshotEntry) -> serde_json::Value {
    let mut v = serde_json::to_value(&e.snapshot).unwrap_or_default();
    v["id"] = serde_json::Value::String(e.id.to_hex());
    v
}

fn snapshots(ctx: &Ctx, a: SnapshotsArgs) -> Result<()> {
    let repo = ctx.open()?;
    let list: Vec<SnapshotEntry> =
        repo.list_snapshots()?.into_iter().filter(|e| a.vm.as_ref().is_none_or(|vm| &e.snapshot.vm == vm)).collect();
    if ctx.json {
        return ctx.print_json(&list.iter().map(snapshot_json).collect::<Vec<_>>());
    }
    println!("{:<10} {:<21} {:<16} {:<12} {:>10}  streams", "id", "time", "vm", "host", "size");
    for e in &list {
        let s = &e.snapshot;
        let time = s.timestamp().map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_else(|| s.time.clone());
        let size: u64 = s.streams.iter().map(|x| x.size).sum();
        let streams: Vec<&str> = s.streams.iter().map(|x| x.name.as_str()).collect();
        println!(
            "{:<10} {:<21} {:<16} {:<12} {:>10}  {}",
            e.id.short(),
            time,
            s.vm,
            s.host,
            human::bytes(size),
            streams.join(",")
        );
    }
    println!("{} snapshots", list.len());
    Ok(())
}

fn forget(ctx: &Ctx, a: ForgetArgs) -> Result<()> {
    use archive::retention::{Decision, Policy};
    let repo = ctx.open()?;
    let policy = Policy {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
        within: a.keep_within.as_deref().map(archive::retention::parse_within).transpose()?,
        tags: a.keep_tag.clone(),
    };
    // Removing manifests never removes data (prune does): a shared lock, like backup.
    let lock = repo.lock(archive::lock::LockKind::Shared, "forget")?;
    let tz = repo.time_zone(a.time_zone.as_deref())?;
    // Held snapshots (overlay bases) are kept whatever the rules say.
    let held = held_snapshots(&repo)?;
    let plan: Vec<(SnapshotEntry, Decision)> = if !a.ids.is_empty() {
        if !policy.is_empty() {
            anyhow::bail!("give snapshot ids or --keep-* rules, not both");
        }
        let mut chosen = Vec::new();
        for spec in &a.ids {
            let e = repo.resolve_snapshot(spec)?;
            if let Some(h) = held.get(&e.id) {
                anyhow::bail!("snapshot {spec} is held ({h}); release it first (vmvault overlay discard)");
            }
            if a.vm.as_ref().is_some_and(|vm| vm != &e.snapshot.vm) {
                anyhow::bail!(
                    "snapshot {spec} belongs to VM {:?}, not {:?}",
                    e.snapshot.vm,
                    a.vm.as_deref().unwrap_or("")
                );
            }
            chosen.push((e, Decision { keep: false, reasons: vec!["named".into()] }));
        }
        chosen
    } else {
        if policy.is_empty() {
            anyhow::bail!(
                "no --keep-* rule given, so nothing would be removed; give rules (e.g. --keep-daily 7) or snapshot ids"
            );
        }
        retention_plan(&repo, a.vm.as_deref(), &policy, &tz)?
    };
    let forgotten: std::collections::HashSet<archive::SnapshotId> =
        plan.iter().filter(|(_, d)| !d.keep).map(|(e, _)| e.id).collect();
    let mut removed = 0usize;
    if !a.dry_run {
        for (e, d) in &plan {
            if !d.keep {
                repo.forget_snapshot(&e.id)?;
                removed += 1;
            }
        }
    }
    if ctx.json {
        let rows: Vec<serde_json::Value> = plan
            .iter()
            .map(|(e, d)| {
                serde_json::json!({"id": e.id.to_hex(), "vm": e.snapshot.vm, "time": e.snapshot.time,
                    "keep": d.keep, "reasons": d.reasons})
            })
            .collect();
        drop(lock);
        let pruned =
            if a.prune { Some(crate::prune::run_on(ctx, &repo, &a.prune_flags, a.dry_run, forgotten)?) } else { None };
        ctx.print_json(&serde_json::json!({"dry_run": a.dry_run, "removed": removed, "snapshots": rows,
            "prune": pruned}))?;
        return pruned.as_ref().map_or(Ok(()), crate::prune::pending_is_error);
    }
    if !ctx.quiet {
        let mut vm = None;
        for (e, d) in &plan {
            if vm != Some(&e.snapshot.vm) {
                vm = Some(&e.snapshot.vm);
                println!("{}:", e.snapshot.vm);
            }
            // In the zone the rules read periods in.
            let time = e.snapshot.timestamp().map_or_else(
                || e.snapshot.time.clone(),
                |t| t.to_zoned(tz.clone()).strftime("%Y-%m-%d %H:%M:%S %Z").to_string(),
            );
            let what = if d.keep {
                "keep  "
            } else if a.dry_run {
                "would remove"
            } else {
                "remove"
            };
            println!("  {what:<12} {}  {time}  {}", e.id.short(), d.reasons.join(", "));
        }
        let gone = plan.iter().filter(|(_, d)| !d.keep).count();
        let verb = if a.dry_run { "would remove" } else { "removed" };
        let then = if a.prune { "" } else { " (their data stays until `vmvault prune`)" };
        println!("{} kept, {verb} {gone}{then}", plan.len() - gone);
    }
    // The forget lock is shared, the prune lock coexists with it; released anyway, so the
    // prune does not wait for this process's own forget.
    drop(lock);
    if a.prune {
        let report = crate::prune::run_on(ctx, &repo, &a.prune_flags, a.dry_run, forgotten)?;
        return crate::prune::pending_is_error(&report);
    }
    Ok(())
}

/// The retention rules applied to the repository's snapshots (of VM `vm` only, when given),
/// held snapshots (overlay bases) kept whatever the rules say. What `forget` and jobs run.
pub(crate) fn retention_plan(
    repo: &archive::Repository,
    vm: Option<&str>,
    policy: &archive::retention::Policy,
    tz: &jiff::tz::TimeZone,
) -> Result<Vec<(SnapshotEntry, archive::retention::Decision)>> {
    let held = held_snapshots(repo)?;
    let mut plan = archive::retention::plan(repo.list_snapshots()?, vm, policy, tz)?;
    for (e, d) in &mut plan {
        if let Some(h) = held.get(&e.id) {
            d.keep = true;
            d.reasons.push(format!("held: {h}"));
        }
    }
    Ok(plan)
}

/// Held snapshots and why.
fn held_snapshots(repo: &archive::Repository) -> Result<std::collections::HashMap<archive::SnapshotId, String>> {
    let mut held: std::collections::HashMap<archive::SnapshotId, String> = std::collections::HashMap::new();
    for (_, h) in archive::hold::holds(repo)? {
        if let Ok(id) = h.snapshot.parse() {
            held.entry(id).and_modify(|r: &mut String| r.push_str(&format!("; {}", h.reason))).or_insert(h.reason);
        }
    }
    Ok(held)
}

/// Split `SNAPSHOT:STREAM` at the last colon.
pub(crate) fn split_what(what: &str) -> Result<(&str, &str)> {
    what.rsplit_once(':')
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .ok_or_else(|| anyhow!("{what:?}: expected SNAPSHOT:STREAM, e.g. web01@latest:xvda"))
}

/// A chunk store over the repository's index, keeping `index_pages` index pages and
/// `cache_bytes` of decompressed chunks in memory.
pub(crate) fn chunk_store(repo: &Arc<Repository>, index_pages: usize, cache_bytes: usize) -> Result<Arc<ChunkStore>> {
    Ok(Arc::new(ChunkStore::new(repo.clone(), repo.load_index(index_pages)?, cache_bytes)))
}

fn open_stream(ctx: &Ctx, what: &str, cache: usize) -> Result<(Arc<ChunkStore>, archive::extents::StreamMap)> {
    let (snap, stream) = split_what(what)?;
    let repo = Arc::new(ctx.open()?);
    let entry = repo.resolve_snapshot(snap)?;
    let sref = entry.stream_ref(stream)?;
    let map = repo.load_stream_map(&sref.map.parse()?)?;
    Ok((chunk_store(&repo, 1024, cache)?, map))
}

fn restore(ctx: &Ctx, a: RestoreArgs) -> Result<()> {
    let (store, map) = open_stream(ctx, &a.what, 0)?;
    let meta = std::fs::metadata(&a.target);
    let is_block = meta.as_ref().is_ok_and(|m| m.file_type().is_block_device());
    let target = if is_block {
        FileDev::open_rw(&a.target)?
    } else {
        if meta.is_ok() && !a.overwrite {
            bail!("{} exists; pass --overwrite to replace it", a.target.display());
        }
        sized_file(&a.target, map.size)?
    };
    let start = Instant::now();
    let opts = RestoreOptions { threads: a.threads, write_zeros: is_block };
    restore_with_bar(ctx, &store, &map, &target, opts, "restore")?;
    let secs = start.elapsed().as_secs_f64();
    if ctx.json {
        return ctx.print_json(&serde_json::json!({"target": a.target, "bytes": map.size, "seconds": secs}));
    }
    println!(
        "restored {} to {} in {secs:.1} s ({})",
        human::bytes(map.size),
        a.target.display(),
        human::rate(map.size, secs)
    );
    Ok(())
}

/// A new (or truncated) file of `size` bytes, all hole, as a writable device.
pub(crate) fn sized_file(path: &Path, size: u64) -> Result<FileDev> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    Ok(FileDev::from_file(f, true)?)
}

/// The parallel restore of one stream into `target`, with a progress bar on a terminal.
pub(crate) fn restore_with_bar(
    ctx: &Ctx,
    store: &ChunkStore,
    map: &archive::extents::StreamMap,
    target: &FileDev,
    opts: RestoreOptions,
    label: &str,
) -> Result<()> {
    let progress = Arc::new(Progress::default());
    let _bar = Bar::start(progress.clone(), label, ctx.quiet);
    archive::restore::restore(store, map, target, opts, &progress)?;
    Ok(())
}

fn cat(ctx: &Ctx, a: CatArgs) -> Result<()> {
    if a.what.contains(":/") {
        let file = crate::browse::open_file(ctx, &a.what)?;
        return write_out(&*file);
    }
    let (store, map) = open_stream(ctx, &a.what, 256 << 20)?;
    let reader = StreamReader::new(store, map, ReadAhead::default());
    write_out(&reader)
}

/// Copy a whole device to standard output.
fn write_out(reader: &dyn BlockDev) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0u64;
    while pos < reader.len() {
        let n = (reader.len() - pos).min(buf.len() as u64) as usize;
        reader.read_at(pos, &mut buf[..n])?;
        match out.write_all(&buf[..n]) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Err(BrokenPipe.into()),
            r => r.context("writing to standard output")?,
        }
        pos += n as u64;
    }
    out.flush().or_else(|e| {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Err(BrokenPipe.into())
        } else {
            Err(anyhow!(e))
        }
    })
}

fn check(ctx: &Ctx, a: CheckArgs) -> Result<()> {
    let repo = ctx.open()?;
    let progress = Arc::new(Progress::default());
    let report = {
        let reads = a.read_data || a.read_data_subset.is_some();
        let _bar = Bar::start(progress.clone(), "check", ctx.quiet || !reads);
        let opts = CheckOptions { read_data: a.read_data, read_data_subset: a.read_data_subset };
        archive::check::check(&repo, opts, &progress)?
    };
    if ctx.json {
        ctx.print_json(&report)?;
    } else {
        for p in &report.problems {
            let sev = if p.severity == Severity::Error { "error" } else { "warning" };
            println!("{sev}: {}: {}", p.object, p.detail);
            for d in &p.damages {
                println!("    damages snapshot {d}");
            }
        }
        println!(
            "checked {} snapshots, {} index files, {} packs, {} chunks{}: {} errors, {} warnings",
            report.snapshots,
            report.index_files,
            report.packs,
            report.chunks,
            if report.packs_read > 0 {
                format!(", read {} in {} packs", human::bytes(report.bytes_read), report.packs_read)
            } else {
                String::new()
            },
            report.errors(),
            report.problems.len() - report.errors(),
        );
    }
    if report.errors() > 0 {
        bail!("the repository has {} errors (listed above)", report.errors());
    }
    Ok(())
}

fn stats(ctx: &Ctx) -> Result<()> {
    let repo = ctx.open()?;
    let s = archive::stats::stats(&repo)?;
    if ctx.json {
        return ctx.print_json(&s);
    }
    println!("snapshots          {} of {} VMs", s.snapshots, s.vms);
    println!(
        "logical size       {}  ({} in data extents)",
        human::bytes(s.logical_bytes),
        human::bytes(s.logical_data_bytes)
    );
    println!("unique chunks      {}  ({})", s.unique_chunks, human::bytes(s.unique_bytes));
    println!("stored             {}  in {} packs", human::bytes(s.stored_bytes), s.packs);
    println!("dedup ratio        {:.2}x", s.dedup_ratio);
    println!("compression ratio  {:.2}x", s.compression_ratio);
    println!("total ratio        {:.2}x  (logical / stored, zero extents included)", s.total_ratio);
    Ok(())
}

fn key(ctx: &Ctx, k: KeyCommand) -> Result<()> {
    let mut repo = ctx.open()?;
    match k {
        KeyCommand::List => {
            let keys = repo.list_keys()?;
            if ctx.json {
                let v: Vec<_> = keys
                    .iter()
                    .map(|(n, kf)| serde_json::json!({"id": n, "current": n == repo.key_name(), "created": kf.created, "host": kf.host, "user": kf.user}))
                    .collect();
                return ctx.print_json(&v);
            }
            println!("  {:<32} {:<28} {:<16} user", "id", "created", "host");
            for (n, kf) in &keys {
                let mark = if n == repo.key_name() { "*" } else { " " };
                println!("{mark} {n:<32} {:<28} {:<16} {}", kf.created, kf.host, kf.user);
            }
        }
        KeyCommand::Add(a) => {
            let pass = password::new(a.new_password_file.as_deref(), "VMVAULT_NEW_PASSWORD")?;
            let _lock = repo.lock(archive::lock::LockKind::Exclusive, "key add")?;
            let name = repo.add_key(&pass, kdf(a.kdf_memory_kib))?;
            println!("added key {name}");
        }
        KeyCommand::Remove { id } => {
            let _lock = repo.lock(archive::lock::LockKind::Exclusive, "key remove")?;
            let name = repo.remove_key(&id)?;
            println!("removed key {name}");
        }
        KeyCommand::Passwd(a) => {
            let pass = password::new(a.new_password_file.as_deref(), "VMVAULT_NEW_PASSWORD")?;
            let lock = repo.lock(archive::lock::LockKind::Exclusive, "key passwd")?;
            let name = repo.change_passphrase(&pass, kdf(a.kdf_memory_kib))?;
            drop(lock);
            println!("passphrase changed; the key is now {name}");
        }
    }
    Ok(())
}

fn unlock(ctx: &Ctx, a: UnlockArgs) -> Result<()> {
    let repo = ctx.open()?;
    let mut removed = 0;
    for l in archive::lock::list_locks(&**repo.backend(), repo.sealer())? {
        let why = match &l.info {
            _ if a.remove_all => Some("--remove-all".to_string()),
            Ok(info) => info.stale_reason(repo.stale_after),
            Err(e) => Some(format!("unreadable: {e}")),
        };
        if let Some(why) = why {
            repo.backend().remove(&format!("locks/{}", l.name))?;
            println!("removed lock {} ({why})", l.name);
            removed += 1;
        }
    }
    println!("{removed} locks removed");
    Ok(())
}
