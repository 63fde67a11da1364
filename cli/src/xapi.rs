//! `vmvault xapi backup|restore`: VMs of a XenServer / XCP-ng pool in and out of the
//! repository (the work is in the `capture` crate).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use capture::backup::{LogLine, Status, VmResult};
use capture::select::Selection;
use capture::xapi::{Client, Connect, Protocol, Trust};
use clap::{Args, Subcommand};

use crate::commands::Ctx;
use crate::human;

#[derive(Subcommand, Debug)]
pub enum XapiCommand {
    /// Back up VMs of a pool: snapshot (or checkpoint with --memory), read, clean up.
    Backup(BackupArgs),
    /// Recreate a backed-up VM on a pool, halted or (with --suspended) with its memory.
    Restore(RestoreArgs),
    /// List the pool's VMs with their tags and power states (what a selection would see).
    Vms(VmsArgs),
}

/// How to reach a pool.
#[derive(Args, Debug, Clone)]
pub struct PoolArgs {
    /// The pool master: https://HOST[:PORT] (or http://…).
    #[arg(long, env = "VMVAULT_XAPI_HOST")]
    pub host: String,
    #[arg(long, env = "VMVAULT_XAPI_USER", default_value = "root")]
    pub user: String,
    /// Read the pool password from this file (first line). Otherwise VMVAULT_XAPI_PASSWORD,
    /// or a prompt. (The global --password-file is the repository's.)
    #[arg(long)]
    pub pool_password_file: Option<PathBuf>,
    /// Trust only the certificate with this SHA-256 fingerprint (sha256:HEX), as XAPI hosts
    /// use self-signed certificates.
    #[arg(long, conflicts_with_all = ["cert", "insecure"])]
    pub fingerprint: Option<String>,
    /// Trust only the certificate in this PEM file (the host's own, e.g. from
    /// /etc/xensource/xapi-ssl.pem's certificate part).
    #[arg(long, conflicts_with = "insecure")]
    pub cert: Option<PathBuf>,
    /// Accept any certificate (encrypted, not authenticated).
    #[arg(long)]
    pub insecure: bool,
    /// Speak XML-RPC instead of JSON-RPC (for old hosts).
    #[arg(long)]
    pub xml_rpc: bool,
}

impl PoolArgs {
    pub fn connect(&self) -> Result<Arc<Client>> {
        let password = crate::password::pool(self.pool_password_file.as_deref())?;
        let trust = if self.insecure {
            Trust::Insecure
        } else if let Some(f) = &self.fingerprint {
            Trust::pin_fingerprint(f).map_err(anyhow::Error::msg)?
        } else if let Some(p) = &self.cert {
            let pem = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
            Trust::pin_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        } else {
            Trust::Roots
        };
        let conn = Connect {
            url: self.host.clone(),
            user: self.user.clone(),
            password,
            trust,
            protocol: if self.xml_rpc { Protocol::XmlRpc } else { Protocol::JsonRpc },
            retries: 2,
        };
        Ok(Arc::new(Client::connect(conn)?))
    }
}

/// Which VMs, as command-line flags.
#[derive(Args, Debug, Clone, Default)]
pub struct SelectArgs {
    /// A VM by name or uuid (repeatable).
    #[arg(long = "vm")]
    pub vms: Vec<String>,
    /// VMs whose name matches this pattern (`*`, `?`; repeatable).
    #[arg(long = "name")]
    pub names: Vec<String>,
    /// VMs with this tag (repeatable: any of them; all of them with --all-tags).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    #[arg(long)]
    pub all_tags: bool,
    /// Every VM of the pool (templates, snapshots and dom0 never count).
    #[arg(long)]
    pub all: bool,
    /// Leave out VMs with this tag (repeatable).
    #[arg(long = "exclude-tag")]
    pub exclude_tags: Vec<String>,
    /// Only VMs in this power state: running, halted, suspended (repeatable).
    #[arg(long = "power-state")]
    pub power_states: Vec<String>,
}

impl SelectArgs {
    pub fn selection(&self) -> Selection {
        Selection {
            vms: self.vms.clone(),
            names: self.names.clone(),
            tags: self.tags.clone(),
            all_tags: self.all_tags,
            exclude_tags: self.exclude_tags.clone(),
            power_states: self.power_states.clone(),
            all: self.all,
        }
    }
}

/// Defaults of the pool-wide limits (Xen Orchestra's) and of the CBT audit, shared by the
/// flags and by job files.
pub const VMS_AT_ONCE: usize = 1;
pub const SNAPSHOTS_AT_ONCE: usize = 2;
pub const EXPORTS_AT_ONCE: usize = 12;
pub const CBT_AUDIT_EVERY: u32 = 10;

#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    pub pool: PoolArgs,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Capture the memory of running VMs too (a checkpoint); suspended VMs always have theirs.
    #[arg(long)]
    pub memory: bool,
    /// VMs backed up at once.
    #[arg(long, default_value_t = VMS_AT_ONCE)]
    pub vms_at_once: usize,
    /// Snapshots or checkpoints taken at once on the pool.
    #[arg(long, default_value_t = SNAPSHOTS_AT_ONCE)]
    pub snapshots_at_once: usize,
    /// Disk exports running at once on the pool.
    #[arg(long, default_value_t = EXPORTS_AT_ONCE)]
    pub exports_at_once: usize,
    /// Tag the repository snapshots (repeatable).
    #[arg(long = "snapshot-tag")]
    pub snapshot_tags: Vec<String>,
    /// How disks are read: NBD when the pool offers it (a network with the nbd or
    /// insecure_nbd purpose), else HTTP; or only one of them.
    #[arg(long, value_enum, default_value_t = TransportArg::Auto)]
    pub transport: TransportArg,
    /// Changed block tracking: enable it on the disks, keep each disk's snapshot as a
    /// cbt_metadata VDI, and read only the blocks changed since the previous backup.
    #[arg(long)]
    pub cbt: bool,
    /// Read every block (a new baseline), whatever CBT says.
    #[arg(long)]
    pub full: bool,
    /// With --cbt: every N incremental backups of a disk, re-read a sample of unchanged
    /// blocks and compare them with the previous backup (0: never).
    #[arg(long, default_value_t = CBT_AUDIT_EVERY, value_name = "N")]
    pub cbt_audit_every: u32,
}

#[derive(clap::ValueEnum, serde::Deserialize, Clone, Copy, Debug, Default)]
#[serde(rename_all = "lowercase")]
pub enum TransportArg {
    #[default]
    Auto,
    Nbd,
    Http,
}

impl From<TransportArg> for capture::backup::Transport {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Auto => capture::backup::Transport::Auto,
            TransportArg::Nbd => capture::backup::Transport::Nbd,
            TransportArg::Http => capture::backup::Transport::Http,
        }
    }
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The snapshot: ID, VM@latest, VM@N.
    pub snapshot: String,
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Storage repository for the disks (name or uuid; default: the pool's default SR).
    #[arg(long)]
    pub sr: Option<String>,
    /// Name of the new VM (default: the original's).
    #[arg(long)]
    pub name: Option<String>,
    /// Put NICs of network OLD on network NEW (repeatable): OLD=NEW, by name.
    #[arg(long = "network-map", value_parser = parse_pair)]
    pub network_map: Vec<(String, String)>,
    /// Create the VM suspended with its memory image (RAM-enabled restore).
    #[arg(long)]
    pub suspended: bool,
    /// Start the VM (resume it, with --suspended) once restored.
    #[arg(long)]
    pub start: bool,
    /// Restore suspended even when the target host lacks CPU features the VM ran with.
    #[arg(long)]
    pub force: bool,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| format!("{s:?}: expected OLD=NEW"))
}

#[derive(Args, Debug)]
pub struct VmsArgs {
    #[command(flatten)]
    pub pool: PoolArgs,
}

pub fn run(ctx: &Ctx, c: XapiCommand) -> Result<()> {
    match c {
        XapiCommand::Backup(a) => backup(ctx, a),
        XapiCommand::Restore(a) => restore(ctx, a),
        XapiCommand::Vms(a) => vms(ctx, a),
    }
}

/// Set the returned flag on Ctrl-C (or SIGTERM), so runs stop reading and clean up.
pub fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_io().build() else { return };
        rt.block_on(async {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        eprintln!("vmvault: interrupted: stopping, cleaning up snapshots on the pool…");
        f.store(true, Ordering::SeqCst);
    });
    flag
}

fn backup(ctx: &Ctx, a: BackupArgs) -> Result<()> {
    let cancel = interrupt_flag();
    let (_, report) = run_backup(ctx, &a, "", &cancel, &|_| {})?;
    let failed = report.results.iter().filter(|r| r.status == Status::Failure).count();
    if cancel.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    if failed > 0 {
        bail!("{failed} of {} VM(s) failed", report.results.len());
    }
    Ok(())
}

/// Back up what `a` selects (the work of `xapi backup` and of each job run): log lines to
/// stderr and to `also`, results printed. `job` names the job (its snapshots on the pool
/// carry the name, and the ones a killed run of it left are destroyed first); "" for none.
pub fn run_backup(
    ctx: &Ctx,
    a: &BackupArgs,
    job: &str,
    cancel: &Arc<AtomicBool>,
    also: &(dyn Fn(&LogLine) + Sync),
) -> Result<(Arc<archive::Repository>, capture::run::Report)> {
    let sel = a.select.selection();
    if sel.is_empty() {
        bail!("say which VMs: --vm NAME, --name PATTERN, --tag TAG or --all");
    }
    let repo = Arc::new(ctx.open()?);
    let client = a.pool.connect()?;
    let opts = capture::backup::Options {
        memory: a.memory,
        job: job.to_string(),
        tags: a.snapshot_tags.clone(),
        workers: 0,
        cancel: cancel.clone(),
        transport: a.transport.into(),
        cbt: a.cbt,
        full: a.full,
        audit_every: a.cbt_audit_every,
    };
    let limits = capture::run::Limits::new(a.vms_at_once, a.snapshots_at_once, a.exports_at_once);
    let line = |l: LogLine| {
        if !ctx.quiet || l.level != "info" {
            eprintln!("{} [{}] {}: {}", l.vm, l.phase, l.level, l.message);
        }
        also(&l);
    };
    if !job.is_empty() {
        capture::backup::sweep_leftovers(&client, job, &line)?;
    }
    let start = Instant::now();
    let report = capture::run::run(&client, &repo, &sel, &opts, &limits, &line)?;
    client.logout();
    print_results(ctx, &report.results, &report.skipped, start.elapsed().as_secs_f64())?;
    Ok((repo, report))
}

pub fn print_results(ctx: &Ctx, results: &[VmResult], skipped: &[(String, String)], secs: f64) -> Result<()> {
    if ctx.json {
        return ctx.print_json(&serde_json::json!({"vms": results, "skipped": skipped.iter().map(|(v, w)| serde_json::json!({"vm": v, "reason": w})).collect::<Vec<_>>(), "seconds": secs}));
    }
    for r in results {
        let what = match r.status {
            Status::Success => format!(
                "ok, snapshot {}{}, {} read, {} stored",
                &r.snapshot.as_deref().unwrap_or("")[..8.min(r.snapshot.as_deref().unwrap_or("").len())],
                if r.memory { " (with memory)" } else { "" },
                human::bytes(r.bytes_read),
                human::bytes(r.bytes_stored)
            ),
            Status::Failure => format!("FAILED: {}", r.error.as_deref().unwrap_or("")),
            Status::Skipped => format!("skipped: {}", r.error.as_deref().unwrap_or("")),
        };
        println!("{:<24} {what} in {:.1} s", r.vm, r.seconds);
    }
    for (vm, why) in skipped {
        println!("{vm:<24} skipped: {why}");
    }
    Ok(())
}

fn restore(ctx: &Ctx, a: RestoreArgs) -> Result<()> {
    let repo = Arc::new(ctx.open()?);
    let entry = repo.resolve_snapshot(&a.snapshot)?;
    let client = a.pool.connect()?;
    let reader = archive::reader::RepoReader::new(repo.clone(), 1024, 64 << 20)?;
    let opts = capture::restore::Options {
        sr: a.sr,
        name: a.name,
        network_map: a.network_map,
        suspended: a.suspended,
        start: a.start,
        force: a.force,
    };
    let start = Instant::now();
    let done = capture::restore::restore(&client, &reader, &entry, &opts)?;
    client.logout();
    let secs = start.elapsed().as_secs_f64();
    if ctx.json {
        return ctx.print_json(&serde_json::json!({"restored": done, "seconds": secs}));
    }
    for n in &done.notes {
        eprintln!("note: {n}");
    }
    println!(
        "VM {} ({}) restored: {} disk(s), {} sent, {} in {secs:.1} s",
        done.vm,
        done.uuid,
        done.disks,
        human::bytes(done.bytes_sent),
        done.power_state.to_lowercase()
    );
    Ok(())
}

fn vms(ctx: &Ctx, a: VmsArgs) -> Result<()> {
    let client = a.pool.connect()?;
    let sel = Selection { all: true, ..Selection::default() };
    let picked = sel.pick(&client)?;
    client.logout();
    let rows: Vec<serde_json::Value> = picked
        .vms
        .iter()
        .map(|(_, v)| serde_json::json!({"name": v["name_label"], "uuid": v["uuid"], "power_state": v["power_state"], "tags": v["tags"]}))
        .collect();
    if ctx.json {
        return ctx.print_json(&serde_json::json!(rows));
    }
    for r in &rows {
        let tags: Vec<&str> =
            r["tags"].as_array().map(|a| a.iter().filter_map(|t| t.as_str()).collect()).unwrap_or_default();
        println!(
            "{:<24} {:<10} {}  {}",
            r["name"].as_str().unwrap_or(""),
            r["power_state"].as_str().unwrap_or(""),
            r["uuid"].as_str().unwrap_or(""),
            tags.join(",")
        );
    }
    Ok(())
}
