//! `vmvault prune` (and `forget --prune`): delete the data no snapshot needs.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use archive::progress::Progress;
use archive::prune::{PruneOptions, PruneReport};
use archive::Repository;
use clap::Args;

use crate::commands::Ctx;
use crate::human;
use crate::progress::Bar;

/// Options shared by `prune` and `forget --prune`.
#[derive(Args, Debug, Clone)]
pub struct PruneFlags {
    /// Unused space left in partly used packs instead of repacking them, as a percentage of
    /// the repository ("5%" or "5"); 0 repacks every pack holding a dead chunk.
    #[arg(long, value_name = "PERCENT", default_value = "5%", value_parser = parse_percent)]
    pub max_unused: f64,
    /// Stop waiting for backups that started before the prune after this many seconds and
    /// leave it pending (the next `prune` finishes it); default: wait.
    #[arg(long, value_name = "SECONDS")]
    pub max_wait: Option<u64>,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    #[command(flatten)]
    pub flags: PruneFlags,
    /// Print the plan (packs deleted and repacked, bytes freed) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim_end_matches('%').trim().parse().map_err(|_| format!("{s:?} is not a percentage"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("{s:?} is not between 0% and 100%"));
    }
    Ok(v / 100.0)
}

pub fn run(ctx: &Ctx, a: PruneArgs) -> Result<()> {
    let repo = ctx.open()?;
    let report = run_on(ctx, &repo, &a.flags, a.dry_run, Default::default())?;
    if ctx.json {
        ctx.print_json(&serde_json::json!({"dry_run": a.dry_run, "report": report}))?;
    }
    pending_is_error(&report)
}

/// A prune that stopped waiting did not finish: say so through the exit status.
pub fn pending_is_error(report: &PruneReport) -> Result<()> {
    if report.pending {
        return Err(anyhow!(
            "prune is pending: backups that started before it are still running; run `vmvault prune` again to finish"
        ));
    }
    Ok(())
}

/// Prune `repo`, printing what was done unless `--json` or `--quiet` (also used by
/// `forget --prune`, whose dry run plans as if the snapshots it would remove were gone).
pub fn run_on(
    ctx: &Ctx,
    repo: &Repository,
    f: &PruneFlags,
    dry_run: bool,
    assume_forgotten: HashSet<archive::SnapshotId>,
) -> Result<PruneReport> {
    let opts = PruneOptions {
        max_unused: f.max_unused,
        dry_run,
        assume_forgotten,
        max_wait: f.max_wait.map(Duration::from_secs),
        ..PruneOptions::default()
    };
    let progress = Arc::new(Progress::default());
    let report = {
        let _bar = Bar::start(progress.clone(), "prune", ctx.quiet);
        archive::prune::prune(repo, &opts, &progress)?
    };
    if !ctx.json && !ctx.quiet {
        print(&report, dry_run);
    }
    Ok(report)
}

fn print(r: &PruneReport, dry_run: bool) {
    let p = &r.plan;
    if r.resumed > 0 {
        let verb = if dry_run { "would finish first" } else { "finished" };
        println!("{verb} {} interrupted prune(s)", r.resumed);
    }
    println!(
        "{} snapshots use {} chunks; {} packs hold {}",
        p.snapshots,
        p.live_chunks,
        p.packs,
        human::bytes(p.pack_bytes)
    );
    for (what, list) in [("delete", &p.delete), ("repack", &p.repack)] {
        for pk in list {
            println!(
                "  {what:<6} {}  {:>10}  {}/{} chunks used ({} live)",
                &pk.pack[..16],
                human::bytes(pk.bytes),
                pk.live_chunks,
                pk.chunks,
                human::bytes(pk.live_bytes)
            );
        }
    }
    let verb = if dry_run { "would free" } else { "frees" };
    println!(
        "{} packs to delete, {} to repack, {} unreferenced stream maps: {verb} {}, {} stays unused in kept packs",
        p.delete.len(),
        p.repack.len(),
        p.unreferenced_maps,
        human::bytes(p.freed_bytes()),
        human::bytes(p.unused_bytes_left)
    );
    if dry_run {
        return;
    }
    if !r.waited_for.is_empty() {
        println!("waited for {} backup(s) that started before the prune", r.waited_for.len());
    }
    println!(
        "deleted {} packs ({}), wrote {} packs ({}, {} chunks copied), replaced {} index files by {}, deleted {} stream maps{}",
        r.packs_deleted,
        human::bytes(r.bytes_deleted),
        r.packs_written,
        human::bytes(r.bytes_written),
        r.chunks_copied,
        r.index_files_removed,
        r.index_files_written,
        r.maps_deleted,
        if r.packs_kept > 0 { format!("; kept {} packs a backup reused meanwhile", r.packs_kept) } else { String::new() }
    );
}
