//! `vmvault job run|log`: a job file names pool connections and jobs (selection, mode, CBT,
//! limits, retention); every run gets a run id and a JSON-lines log, one file per run, so a
//! run killed midway (no `end` line, its process gone) shows as interrupted.
//!
//! Schedules are the system's: a systemd timer or a cron line per job (README).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use capture::backup::{LogLine, Status, VmResult};
use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::commands::Ctx;
use crate::xapi::{self, BackupArgs, PoolArgs, SelectArgs, TransportArg};

#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// Run the jobs of a job file (or one of them), logging each run.
    Run(RunArgs),
    /// Show past runs (newest last), or one run's per-VM results and log.
    Log(LogArgs),
}

#[derive(Args, Debug)]
pub struct LogDir {
    /// Where run logs go: LOG_DIR/JOB/RUN_ID.jsonl. Default: $XDG_STATE_HOME/vmvault/jobs
    /// (~/.local/state/vmvault/jobs).
    #[arg(long, env = "VMVAULT_JOB_LOG_DIR")]
    pub log_dir: Option<PathBuf>,
}

impl LogDir {
    fn path(&self) -> Result<PathBuf> {
        if let Some(d) = &self.log_dir {
            return Ok(d.clone());
        }
        let state = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")));
        Ok(state.ok_or_else(|| anyhow!("no --log-dir, XDG_STATE_HOME or HOME"))?.join("vmvault/jobs"))
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The job file (TOML; see the README).
    pub file: PathBuf,
    /// Run only this job (default: every job in the file, in name order).
    #[arg(long)]
    pub job: Option<String>,
    #[command(flatten)]
    pub dir: LogDir,
}

#[derive(Args, Debug)]
pub struct LogArgs {
    /// Only this job's runs.
    #[arg(long)]
    pub job: Option<String>,
    /// One run in full: per-VM results and its log lines.
    #[arg(long)]
    pub run: Option<String>,
    #[command(flatten)]
    pub dir: LogDir,
}

/// A job file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    #[serde(default)]
    pool: BTreeMap<String, PoolSpec>,
    #[serde(default)]
    job: BTreeMap<String, JobSpec>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct PoolSpec {
    host: String,
    #[serde(default = "root")]
    user: String,
    password_file: Option<PathBuf>,
    fingerprint: Option<String>,
    cert: Option<PathBuf>,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    xml_rpc: bool,
}

fn root() -> String {
    "root".into()
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
struct JobSpec {
    pool: String,
    /// The repository this job writes to (default: `--repo` / `VMVAULT_REPO`).
    repo: Option<PathBuf>,
    /// Its password file (default: `--password-file` / `VMVAULT_PASSWORD(_FILE)`).
    repo_password_file: Option<PathBuf>,
    vms: Vec<String>,
    names: Vec<String>,
    tags: Vec<String>,
    all_tags: bool,
    all: bool,
    exclude_tags: Vec<String>,
    power_states: Vec<String>,
    memory: bool,
    cbt: bool,
    full: bool,
    transport: TransportArg,
    vms_at_once: usize,
    snapshots_at_once: usize,
    exports_at_once: usize,
    cbt_audit_every: u32,
    snapshot_tags: Vec<String>,
    retention: Option<Retention>,
}

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec {
            pool: String::new(),
            repo: None,
            repo_password_file: None,
            vms: Vec::new(),
            names: Vec::new(),
            tags: Vec::new(),
            all_tags: false,
            all: false,
            exclude_tags: Vec::new(),
            power_states: Vec::new(),
            memory: false,
            cbt: false,
            full: false,
            transport: TransportArg::Auto,
            vms_at_once: xapi::VMS_AT_ONCE,
            snapshots_at_once: xapi::SNAPSHOTS_AT_ONCE,
            exports_at_once: xapi::EXPORTS_AT_ONCE,
            cbt_audit_every: xapi::CBT_AUDIT_EVERY,
            snapshot_tags: Vec::new(),
            retention: None,
        }
    }
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields, default)]
struct Retention {
    keep_last: u32,
    keep_hourly: u32,
    keep_daily: u32,
    keep_weekly: u32,
    keep_monthly: u32,
    keep_yearly: u32,
    keep_within: Option<String>,
    /// Delete the data of forgotten snapshots right away (`prune`).
    prune: bool,
}

impl JobSpec {
    /// The job as the flags of `xapi backup`.
    fn backup_args(&self, pools: &BTreeMap<String, PoolSpec>) -> Result<BackupArgs> {
        let p = pools.get(&self.pool).ok_or_else(|| anyhow!("no [pool.{}] in the job file", self.pool))?;
        Ok(BackupArgs {
            pool: PoolArgs {
                host: p.host.clone(),
                user: p.user.clone(),
                pool_password_file: p.password_file.clone(),
                fingerprint: p.fingerprint.clone(),
                cert: p.cert.clone(),
                insecure: p.insecure,
                xml_rpc: p.xml_rpc,
            },
            select: SelectArgs {
                vms: self.vms.clone(),
                names: self.names.clone(),
                tags: self.tags.clone(),
                all_tags: self.all_tags,
                all: self.all,
                exclude_tags: self.exclude_tags.clone(),
                power_states: self.power_states.clone(),
            },
            memory: self.memory,
            vms_at_once: self.vms_at_once,
            snapshots_at_once: self.snapshots_at_once,
            exports_at_once: self.exports_at_once,
            snapshot_tags: self.snapshot_tags.clone(),
            transport: self.transport,
            cbt: self.cbt,
            full: self.full,
            cbt_audit_every: self.cbt_audit_every,
        })
    }
}

fn load(path: &Path) -> Result<JobFile> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let f: JobFile = toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    for (name, j) in &f.job {
        if name.is_empty() || name.contains(['/', '\\', '.']) {
            bail!("{}: job name {name:?} must be non-empty without '/', '\\' or '.'", path.display());
        }
        let args = j.backup_args(&f.pool).with_context(|| format!("job {name}"))?;
        if args.select.selection().is_empty() {
            bail!("job {name}: no selection (vms, names, tags or all = true)");
        }
    }
    Ok(f)
}

/// One run's log file, a JSON object per line, each written through at once.
struct RunLog {
    file: Mutex<std::fs::File>,
    run: String,
}

impl RunLog {
    fn create(dir: &Path, job: &str) -> Result<(RunLog, PathBuf)> {
        let dir = dir.join(job);
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        let mut r = [0u8; 3];
        getrandom::getrandom(&mut r).map_err(|e| anyhow!("random: {e}"))?;
        let run = format!("{}-{}", jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ"), hex::encode(r));
        let path = dir.join(format!("{run}.jsonl"));
        let file = std::fs::OpenOptions::new().create_new(true).append(true).open(&path)?;
        Ok((RunLog { file: Mutex::new(file), run }, path))
    }

    fn write(&self, event: &str, mut v: Value) {
        v["t"] = json!(jiff::Timestamp::now().to_string());
        v["event"] = json!(event);
        v["run"] = json!(self.run);
        let mut line = v.to_string();
        line.push('\n');
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        // A log that cannot be written must not stop the backup; stderr still has it all.
        let _ = f.write_all(line.as_bytes());
    }
}

pub fn run(ctx: &Ctx, cmd: JobCommand) -> Result<()> {
    match cmd {
        JobCommand::Run(a) => run_jobs(ctx, a),
        JobCommand::Log(a) => show_log(ctx, a),
    }
}

fn run_jobs(ctx: &Ctx, a: RunArgs) -> Result<()> {
    let file = load(&a.file)?;
    let jobs: Vec<(&String, &JobSpec)> =
        file.job.iter().filter(|(n, _)| a.job.as_ref().is_none_or(|j| j == *n)).collect();
    if jobs.is_empty() {
        bail!("{}: no job {}", a.file.display(), a.job.as_deref().map_or("at all".into(), |j| format!("{j:?}")));
    }
    let dir = a.dir.path()?;
    let cancel = crate::xapi::interrupt_flag();
    let mut failed = Vec::new();
    for (name, spec) in jobs {
        if let Err(e) = run_job(ctx, name, spec, &file.pool, &dir, &cancel) {
            eprintln!("job {name}: {e:#}");
            failed.push(name.clone());
        }
        if cancel.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
    }
    if !failed.is_empty() {
        bail!("job(s) failed: {}", failed.join(", "));
    }
    Ok(())
}

fn run_job(
    ctx: &Ctx,
    name: &str,
    spec: &JobSpec,
    pools: &BTreeMap<String, PoolSpec>,
    dir: &Path,
    cancel: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    let start = Instant::now();
    let (log, path) = RunLog::create(dir, name)?;
    let repo = spec.repo.as_ref().or(ctx.repo_path.as_ref());
    let host = archive::lock::hostname();
    log.write("start", json!({"job": name, "pid": std::process::id(), "host": host, "repo": repo}));
    if !ctx.quiet {
        eprintln!("job {name}: run {} (log {})", log.run, path.display());
    }
    let outcome = backup_and_retain(ctx, name, spec, pools, &log, cancel);
    let (status, error) = match &outcome {
        Ok(r) if r.iter().all(|v| v.status != Status::Failure) => ("success", None),
        Ok(r) => {
            let n = r.iter().filter(|v| v.status == Status::Failure).count();
            ("failure", Some(format!("{n} of {} VM(s) failed", r.len())))
        }
        Err(e) => ("failure", Some(format!("{e:#}"))),
    };
    let status = if cancel.load(Ordering::SeqCst) { "interrupted" } else { status };
    log.write("end", json!({"status": status, "error": error, "seconds": start.elapsed().as_secs_f64()}));
    match error {
        Some(e) => Err(anyhow!(e)),
        None => Ok(()),
    }
}

fn backup_and_retain(
    ctx: &Ctx,
    name: &str,
    spec: &JobSpec,
    pools: &BTreeMap<String, PoolSpec>,
    log: &RunLog,
    cancel: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<Vec<VmResult>> {
    let write = |l: &LogLine| {
        log.write("log", json!({"vm": l.vm, "phase": l.phase, "level": l.level, "message": l.message}));
    };
    let ctx = &Ctx {
        repo_path: spec.repo.clone().or_else(|| ctx.repo_path.clone()),
        password_file: spec.repo_password_file.clone().or_else(|| ctx.password_file.clone()),
        ..ctx.clone()
    };
    let (repo, report) = crate::xapi::run_backup(ctx, &spec.backup_args(pools)?, name, cancel, &write)?;
    for r in &report.results {
        log.write("vm", serde_json::to_value(r).unwrap_or_default());
    }
    for (vm, why) in &report.skipped {
        log.write("vm", json!({"vm": vm, "status": "skipped", "error": why}));
    }
    if let Some(ret) = &spec.retention {
        if !cancel.load(Ordering::SeqCst) {
            let done: Vec<&str> =
                report.results.iter().filter(|r| r.status == Status::Success).map(|r| r.vm.as_str()).collect();
            retain(ctx, &repo, ret, &done, log)?;
        }
    }
    Ok(report.results)
}

/// Apply the job's retention to the VMs it just backed up (only those: a VM whose backup
/// failed keeps everything), then prune when asked.
fn retain(ctx: &Ctx, repo: &archive::Repository, r: &Retention, vms: &[&str], log: &RunLog) -> Result<()> {
    let policy = archive::retention::Policy {
        last: r.keep_last,
        hourly: r.keep_hourly,
        daily: r.keep_daily,
        weekly: r.keep_weekly,
        monthly: r.keep_monthly,
        yearly: r.keep_yearly,
        within: r.keep_within.as_deref().map(archive::retention::parse_within).transpose()?,
        tags: Vec::new(),
    };
    if policy.is_empty() {
        bail!("retention: no keep_* rule (it would remove every snapshot)");
    }
    let tz = repo.time_zone(None)?;
    let mut forgotten = std::collections::HashSet::new();
    {
        let _lock = repo.lock(archive::lock::LockKind::Shared, "job retention")?;
        for vm in vms {
            for (e, d) in crate::commands::retention_plan(repo, Some(vm), &policy, &tz)? {
                if !d.keep {
                    repo.forget_snapshot(&e.id)?;
                    forgotten.insert(e.id);
                }
            }
        }
    }
    log.write("retention", json!({"forgotten": forgotten.iter().map(|i| i.to_hex()).collect::<Vec<_>>()}));
    if !ctx.quiet {
        println!("retention: {} snapshot(s) forgotten", forgotten.len());
    }
    if r.prune && !forgotten.is_empty() {
        let flags = crate::prune::PruneFlags { max_unused: 0.05, max_wait: None };
        let report = crate::prune::run_on(ctx, repo, &flags, false, forgotten)?;
        log.write("prune", serde_json::to_value(&report).unwrap_or_default());
        crate::prune::pending_is_error(&report)?;
    }
    Ok(())
}

/// A run as its log file tells it.
#[derive(Debug, serde::Serialize)]
struct Run {
    job: String,
    run: String,
    started: String,
    /// success, failure, interrupted (no end line and its process is gone) or running.
    status: String,
    seconds: Option<f64>,
    vms: Vec<Value>,
    lines: Vec<Value>,
    error: Option<String>,
}

fn read_run(path: &Path, job: &str) -> Result<Run> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let run = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut r = Run {
        job: job.into(),
        run,
        started: String::new(),
        status: String::new(),
        seconds: None,
        vms: Vec::new(),
        lines: Vec::new(),
        error: None,
    };
    let (mut pid, mut host) = (None, None);
    // A line cut by a kill (the last one, without its newline) is skipped.
    for v in text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
        match v["event"].as_str() {
            Some("start") => {
                r.started = v["t"].as_str().unwrap_or("").into();
                pid = v["pid"].as_u64();
                host = v["host"].as_str().map(String::from);
            }
            Some("vm") => r.vms.push(v),
            Some("end") => {
                r.status = v["status"].as_str().unwrap_or("").into();
                r.seconds = v["seconds"].as_f64();
                r.error = v["error"].as_str().map(String::from);
            }
            _ => r.lines.push(v),
        }
    }
    if r.status.is_empty() {
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists())
            && host.as_deref() == Some(archive::lock::hostname().as_str());
        r.status = if alive { "running" } else { "interrupted" }.into();
    }
    Ok(r)
}

fn show_log(ctx: &Ctx, a: LogArgs) -> Result<()> {
    let dir = a.dir.path()?;
    let mut runs = Vec::new();
    let jobs = match std::fs::read_dir(&dir) {
        Ok(d) => d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| dir.display().to_string()),
    };
    for job in jobs.iter().filter(|j| a.job.as_ref().is_none_or(|want| want == *j)) {
        for e in std::fs::read_dir(dir.join(job))?.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "jsonl") {
                runs.push(read_run(&p, job)?);
            }
        }
    }
    // In the order they started (run ids of one second differ only by their random part).
    let key = |r: &Run| (r.started.parse::<jiff::Timestamp>().ok(), r.run.clone());
    runs.sort_by_key(key);
    if let Some(id) = &a.run {
        let r = runs.into_iter().find(|r| &r.run == id).ok_or_else(|| anyhow!("no run {id} in {}", dir.display()))?;
        if ctx.json {
            return ctx.print_json(&r);
        }
        println!("job {} run {} started {}: {}", r.job, r.run, r.started, r.status);
        for v in &r.vms {
            let s = v["status"].as_str().unwrap_or("");
            let detail = match s {
                "success" => format!(
                    "{} read, {} stored, {:.1} s",
                    crate::human::bytes(v["bytes_read"].as_u64().unwrap_or(0)),
                    crate::human::bytes(v["bytes_stored"].as_u64().unwrap_or(0)),
                    v["seconds"].as_f64().unwrap_or(0.0)
                ),
                _ => v["error"].as_str().unwrap_or("").to_string(),
            };
            println!("  {:<24} {s:<8} {detail}", v["vm"].as_str().unwrap_or(""));
        }
        for l in &r.lines {
            println!(
                "  {} {} [{}] {}: {}",
                l["t"].as_str().unwrap_or(""),
                l["vm"].as_str().unwrap_or(""),
                l["phase"].as_str().unwrap_or(l["event"].as_str().unwrap_or("")),
                l["level"].as_str().unwrap_or("info"),
                l["message"].as_str().map_or_else(|| l.to_string(), String::from)
            );
        }
        return Ok(());
    }
    if ctx.json {
        return ctx.print_json(&runs);
    }
    if runs.is_empty() {
        println!("no runs in {}", dir.display());
    }
    for r in &runs {
        let count = |s: &str| r.vms.iter().filter(|v| v["status"] == s).count();
        println!(
            "{:<16} {:<30} {:<12} {} ok, {} failed, {} skipped{}",
            r.job,
            r.run,
            r.status,
            count("success"),
            count("failure"),
            count("skipped"),
            r.seconds.map_or_else(String::new, |s| format!(", {s:.1} s"))
        );
    }
    Ok(())
}
