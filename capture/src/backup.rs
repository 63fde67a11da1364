//! Back up one VM from a pool, in the phases Xen Orchestra runs (reference §8.2):
//! snapshot (or checkpoint, for memory) → transfer (disks and memory into the archive, with
//! the VM's records as `meta.xapi`) → cleanup (the snapshot and its disks are destroyed,
//! always, even after a failure or an interruption).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use archive::backup::{BackupOptions, ParentChoice, Source};
use archive::manifest::{SnapshotEntry, StreamKind};
use archive::progress::Progress;
use archive::reader::RepoReader;
use archive::Repository;
use blockdev::BlockDev;
use serde_json::{json, Value};

use crate::cbt::{self, Patched};
use crate::error::{Error, Result};
use crate::nbd::{NbdDisk, Target};
use crate::run::{Limits, Transfer};
use crate::source::{nbd_target, nbd_wants_tls, vhd_block_map, HttpDisk};
use crate::xapi::records::{flag, is_null, list, s, Bundle};
use crate::xapi::Client;
use disk_formats::xva::int_field;

/// How to back up.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Capture the memory of running VMs (a checkpoint instead of a snapshot).
    pub memory: bool,
    /// Written into the snapshot's `other_config` (`vmvault:job`) so leftovers are findable.
    pub job: String,
    /// Tags on the repository snapshot.
    pub tags: Vec<String>,
    /// Archive worker threads (0: one per core).
    pub workers: usize,
    /// Set from outside (Ctrl-C) to stop: reads fail, cleanup still runs.
    pub cancel: Arc<AtomicBool>,
    /// How disk data is read.
    pub transport: Transport,
    /// Use changed block tracking: enable it on the VMs' disks, keep each disk's snapshot as
    /// a `cbt_metadata` VDI, read only the blocks changed since the previous backup.
    pub cbt: bool,
    /// Read every block, whatever CBT or the block map say (a new baseline).
    pub full: bool,
    /// Every this many incremental CBT backups of a disk, re-read a sample of "unchanged"
    /// blocks and compare them with the previous backup (0: never).
    pub audit_every: u32,
}

/// Blocks re-read by a CBT audit.
const AUDIT_BLOCKS: usize = 32;

/// How disk data is read from the pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// NBD when `VDI.get_nbd_info` offers it and its server answers, else HTTP.
    #[default]
    Auto,
    /// NBD or fail.
    Nbd,
    /// HTTP `/export_raw_vdi` only.
    Http,
}

/// What happened to one VM.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Success,
    Failure,
    Skipped,
}

/// One VM's result, as the run log and the summary show it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VmResult {
    pub vm: String,
    pub uuid: String,
    pub status: Status,
    pub error: Option<String>,
    pub snapshot: Option<String>,
    /// Whether the memory image was captured.
    pub memory: bool,
    pub bytes_read: u64,
    pub bytes_stored: u64,
    pub seconds: f64,
}

impl VmResult {
    /// A result that is a failure until the backup says otherwise.
    pub fn failed(vm: String, uuid: String, error: Option<String>) -> VmResult {
        VmResult {
            vm,
            uuid,
            status: Status::Failure,
            error,
            snapshot: None,
            memory: false,
            bytes_read: 0,
            bytes_stored: 0,
            seconds: 0.0,
        }
    }
}

/// A line of the run log.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LogLine {
    pub vm: String,
    pub phase: &'static str,
    pub level: &'static str,
    pub message: String,
}

/// Where log lines go.
pub type Log<'a> = &'a (dyn Fn(LogLine) + Sync);

fn line(log: Log<'_>, vm: &str, phase: &'static str, level: &'static str, message: String) {
    log(LogLine { vm: vm.to_string(), phase, level, message });
}

/// The stream name of a disk: `xvd` + the letter of its VBD's user device (stable whatever
/// the VM's power state; `device` is only filled in while plugged).
pub fn disk_stream_name(userdevice: &str) -> String {
    match userdevice.parse::<u8>() {
        Ok(n) if n < 26 => format!("xvd{}", char::from(b'a' + n)),
        _ => format!("disk{userdevice}"),
    }
}

/// A VM whose snapshot is taken (or failed), waiting for its transfer.
#[derive(Debug)]
pub struct Pending {
    rec: Result<Value>,
    snap: Option<Snap>,
    result: VmResult,
    start: Instant,
}

/// Phase 1: the VM's record and its snapshot (or checkpoint), under a snapshot permit.
pub fn prepare(client: &Client, vm: &str, opts: &Options, limits: &Limits, log: Log<'_>) -> Pending {
    let start = Instant::now();
    let rec = client.call("VM.get_record", &[json!(vm)]);
    let (name, uuid) = rec.as_ref().map_or_else(
        |_| (vm.to_string(), String::new()),
        |r| (s(r, "name_label").to_string(), s(r, "uuid").to_string()),
    );
    let result = VmResult::failed(name.clone(), uuid, None);
    let mut p = Pending { rec, snap: None, result, start };
    if opts.cancel.load(Ordering::SeqCst) {
        p.rec = Err(Error::Usage("interrupted before its snapshot".into()));
        return p;
    }
    if let Ok(rec) = &p.rec {
        let _permit = limits.snapshots.acquire();
        match take_snapshot(client, vm, rec, opts, log) {
            Ok(snap) => p.snap = Some(snap),
            Err(e) => p.rec = Err(e),
        }
    }
    p
}

/// Phase 2: transfer into the archive, then clean up the snapshot whatever happened.
pub fn complete(
    client: &Arc<Client>,
    repo: &Arc<Repository>,
    p: Pending,
    opts: &Options,
    limits: &Arc<Limits>,
    log: Log<'_>,
) -> VmResult {
    let Pending { rec, snap, mut result, start } = p;
    let outcome = rec.and_then(|rec| {
        let snap = snap.ok_or_else(|| Error::Usage("no snapshot".into()))?;
        let transfer = transfer(client, repo, &rec, &snap, opts, limits, log);
        let keep = transfer.as_ref().ok().map(|t| &t.3);
        cleanup(client, &result.vm, &snap, keep, log);
        transfer
    });
    match outcome {
        Ok((entry, read, memory, _)) => {
            result.status = Status::Success;
            result.snapshot = Some(entry.id.to_hex());
            result.bytes_read = read;
            result.bytes_stored = entry.snapshot.summary.stored_bytes;
            result.memory = memory;
        }
        Err(e) => {
            line(log, &result.vm, "transfer", "error", e.to_string());
            result.error = Some(e.to_string());
        }
    }
    result.seconds = start.elapsed().as_secs_f64();
    result
}

/// A snapshot that must be cleaned up.
#[derive(Debug)]
struct Snap {
    r#ref: String,
    checkpoint: bool,
}

/// Turn CBT on for the VM's disks that do not have it yet (their snapshots then carry it).
fn enable_cbt(client: &Client, rec: &Value, log: Log<'_>) {
    let name = s(rec, "name_label");
    for vbd in list(rec, "VBDs") {
        let Ok(v) = client.call("VBD.get_record", &[json!(vbd)]) else { continue };
        let vdi = s(&v, "VDI");
        if s(&v, "type") != "Disk" || is_null(vdi) {
            continue;
        }
        let Ok(d) = client.call("VDI.get_record", &[json!(vdi)]) else { continue };
        if flag(&d, "cbt_enabled") {
            continue;
        }
        let device = disk_stream_name(s(&v, "userdevice"));
        match client.call("VDI.enable_cbt", &[json!(vdi)]) {
            Ok(_) => line(log, name, "snapshot", "info", format!("CBT enabled on {device}")),
            Err(e) => line(log, name, "snapshot", "warning", format!("CBT cannot be enabled on {device}: {e}")),
        }
    }
}

fn take_snapshot(client: &Client, vm: &str, rec: &Value, opts: &Options, log: Log<'_>) -> Result<Snap> {
    let name = s(rec, "name_label");
    if opts.cbt {
        enable_cbt(client, rec, log);
    }
    let power = s(rec, "power_state");
    let label = format!("vmvault {}", jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ"));
    let suspended = power == "Suspended";
    let want_memory = opts.memory || suspended;
    let mut checkpoint = false;
    let snap = if want_memory && matches!(power, "Running" | "Paused" | "Suspended") {
        match client.call_async("VM.checkpoint", &[json!(vm), json!(label)]) {
            Ok(r) => {
                checkpoint = true;
                let why =
                    if suspended { "the VM is suspended: its memory image is captured" } else { "disk and memory" };
                line(log, name, "snapshot", "info", format!("checkpoint taken ({why})"));
                r
            }
            Err(e) => {
                line(
                    log,
                    name,
                    "snapshot",
                    "warning",
                    format!("checkpoint failed ({e}); falling back to a disk-only snapshot"),
                );
                client.call_async("VM.snapshot", &[json!(vm), json!(label)])?
            }
        }
    } else {
        if opts.memory {
            line(
                log,
                name,
                "snapshot",
                "info",
                format!("the VM is {}: no memory to capture, disks only", power.to_lowercase()),
            );
        }
        let r = client.call_async("VM.snapshot", &[json!(vm), json!(label)])?;
        line(log, name, "snapshot", "info", "snapshot taken".into());
        r
    };
    let snap =
        snap.as_str().ok_or_else(|| Error::protocol("VM.snapshot", "no VM reference in the result"))?.to_string();
    if !opts.job.is_empty() {
        let _ = client.call("VM.add_to_other_config", &[json!(snap), json!("vmvault:job"), json!(opts.job)]);
    }
    Ok(Snap { r#ref: snap, checkpoint })
}

/// Read the snapshot's disks (and memory) into the archive with the VM's records.
fn transfer(
    client: &Arc<Client>,
    repo: &Arc<Repository>,
    vm_rec: &Value,
    snap: &Snap,
    opts: &Options,
    limits: &Arc<Limits>,
    log: Log<'_>,
) -> Result<(SnapshotEntry, u64, bool, Keep)> {
    let name = s(vm_rec, "name_label").to_string();
    let parent = repo.latest_snapshot(&name)?;
    let snap_rec = client.call("VM.get_record", &[json!(snap.r#ref)])?;
    let mut bundle = Bundle::default();
    let mut vm_copy = snap_rec.clone();
    // The snapshot's record, under the VM's own name (the snapshot carries a label of ours).
    vm_copy["name_label"] = json!(name);
    vm_copy["name_description"] = vm_rec.get("name_description").cloned().unwrap_or(json!(""));
    bundle.add("VM", &snap.r#ref, vm_copy);
    let mut g = Gather {
        client,
        opts,
        log,
        vm: &name,
        repo,
        parent: parent.as_ref(),
        reader: None,
        cbt: serde_json::Map::new(),
        keep: Keep { mark: repo.config().id.clone(), ..Keep::default() },
        incremental: false,
        nbd_tls: None,
        nbd_up: HashMap::new(),
        via: Vec::new(),
        transfer: Transfer {
            received: Arc::default(),
            cancel: opts.cancel.clone(),
            exports: Some(limits.exports.clone()),
        },
        bundle,
        sources: Vec::new(),
        streams: Vec::new(),
    };
    for vbd in list(&snap_rec, "VBDs") {
        let vbd_rec = client.call("VBD.get_record", &[json!(vbd)])?;
        let vdi = s(&vbd_rec, "VDI").to_string();
        if s(&vbd_rec, "type") != "Disk" || flag(&vbd_rec, "empty") || is_null(&vdi) {
            continue;
        }
        let stream = disk_stream_name(s(&vbd_rec, "userdevice"));
        g.bundle.add("VBD", &vbd, vbd_rec);
        g.add(&vdi, stream, StreamKind::Disk)?;
    }
    let suspend = s(&snap_rec, "suspend_VDI").to_string();
    let memory = snap.checkpoint && !is_null(&suspend);
    if memory {
        g.add(&suspend, "memory".into(), StreamKind::Memory)?;
    }
    let Gather { mut bundle, sources, streams, transfer, mut via, cbt, mut keep, incremental, .. } = g;
    for vif in list(&snap_rec, "VIFs") {
        let vif_rec = client.call("VIF.get_record", &[json!(vif)])?;
        let net = s(&vif_rec, "network").to_string();
        if !is_null(&net) {
            if let Ok(net_rec) = client.call("network.get_record", &[json!(net)]) {
                bundle.add("network", &net, net_rec);
            }
        }
        bundle.add("VIF", &vif, vif_rec);
    }
    if sources.is_empty() {
        return Err(Error::Usage(format!("VM {name} has no disks to back up")));
    }
    let mut version = disk_formats::xva::OvaXml::default_version();
    version["hostname"] = json!(client.base().host_str().unwrap_or(""));
    let meta = json!({
        "xapi": bundle.to_meta(version, &streams),
        "capture": {"source": "xapi", "pool": client.base().host_str().unwrap_or(""), "vm_uuid": s(vm_rec, "uuid"),
                    "kind": if snap.checkpoint { "checkpoint" } else { "snapshot" }, "job": opts.job,
                    "cbt": cbt},
    });
    let total: u64 = sources.iter().map(|s| s.dev.len()).sum();
    via.dedup();
    line(
        log,
        &name,
        "transfer",
        "info",
        format!("reading {} stream(s), {} bytes, over {}", sources.len(), total, via.join(" and ")),
    );
    let progress = Progress::default();
    let bopts = BackupOptions {
        vm: name.clone(),
        tags: opts.tags.clone(),
        meta: Some(meta),
        // Changed ranges are relative to the snapshot whose CBT bases they were asked against.
        parent: match (&parent, incremental) {
            (Some(p), true) => ParentChoice::Id(p.id),
            _ => ParentChoice::Latest,
        },
        workers: opts.workers,
    };
    let entry = archive::backup::backup(repo, sources, &bopts, &progress)?;
    line(log, &name, "commit", "info", format!("snapshot {} saved", entry.id.short()));
    // The bases the previous backup kept are replaced by this one's.
    if let Some(prev) =
        parent.as_ref().and_then(|p| p.snapshot.meta.as_ref()).and_then(|m| m["capture"]["cbt"].as_object())
    {
        let kept: Vec<&String> = keep.vdis.iter().map(|k| &k.uuid).collect();
        keep.old_bases = prev
            .values()
            .filter_map(|v| v["vdi"].as_str())
            .filter(|u| !kept.contains(&&u.to_string()))
            .map(String::from)
            .collect();
    }
    Ok((entry, transfer.received.load(Ordering::Relaxed), memory, keep))
}

/// What cleanup keeps after a successful backup: each disk snapshot with CBT, as the next
/// backup's base (its data destroyed, unless it was read over HTTP), and the previous bases,
/// which it destroys.
#[derive(Debug, Default)]
struct Keep {
    /// This backup's disk snapshots to keep.
    vdis: Vec<Base>,
    /// Uuids of the previous backup's bases.
    old_bases: Vec<String>,
    /// The repository's id, written into the kept bases' `other_config["vmvault:cbt-base"]`
    /// so stale bases of this repository can be told from another's.
    mark: String,
}

/// A disk snapshot kept as the next backup's base.
#[derive(Debug)]
struct Base {
    r#ref: String,
    uuid: String,
    /// The disk it is a snapshot of (`snapshot_of`).
    live: String,
    /// Kept with its data: the disk was read over HTTP, where the next backup asks the pool
    /// for the difference against it (`base=`), which needs the data. Otherwise only the
    /// change log stays (`VDI.data_destroy` → `cbt_metadata`): NBD reads the changed blocks.
    data: bool,
}

/// What a disk source is made for.
enum Reading<'a> {
    /// All of it (the VDI's uuid, for messages).
    Whole(&'a str),
    /// These ranges, and nothing after the last; with a base VDI (ref) and the backup of it,
    /// as the difference from that base.
    Changed(&'a [std::ops::Range<u64>], Option<(String, Arc<archive::reader::StreamReader>)>),
    /// A sample of blocks anywhere, for the CBT audit.
    Audit,
}

/// How a disk is read incrementally.
struct Plan {
    /// The ranges to read from the pool; the rest is the previous backup's.
    changed: Vec<std::ops::Range<u64>>,
    /// `meta.capture.cbt.<disk>.runs`: incrementals since the last audit.
    runs: u64,
    /// The base VDI (ref) to export the difference against, when the changes come from a
    /// `base=` export rather than from `list_changed_blocks`.
    base: Option<String>,
}

/// The `other_config` key marking a CBT base kept by vmvault (its value: the repository id).
const BASE_MARK: &str = "vmvault:cbt-base";

/// The streams of a backup being put together: each VDI's record and the source reading it.
struct Gather<'a> {
    client: &'a Arc<Client>,
    opts: &'a Options,
    log: Log<'a>,
    vm: &'a str,
    repo: &'a Arc<Repository>,
    /// The VM's latest snapshot in the repository: the CBT bases and the unchanged data.
    parent: Option<&'a SnapshotEntry>,
    reader: Option<RepoReader>,
    /// `meta.capture.cbt`: per stream, the base kept on the pool and the incremental count.
    cbt: serde_json::Map<String, Value>,
    keep: Keep,
    /// Whether a stream is read as changed ranges.
    incremental: bool,
    /// Whether the pool's NBD server wants TLS (asked once).
    nbd_tls: Option<bool>,
    /// With `--transport auto`: whether the NBD server at each address answered a probe.
    nbd_up: HashMap<String, bool>,
    /// The transports used ("NBD", "HTTP").
    via: Vec<&'static str>,
    transfer: Transfer,
    bundle: Bundle,
    sources: Vec<Source>,
    streams: Vec<(String, String)>,
}

impl Gather<'_> {
    fn say(&self, level: &'static str, message: String) {
        line(self.log, self.vm, "transfer", level, message);
    }

    /// Keep VDI `vdi`'s record (and its SR's) and read it as stream `name`.
    fn add(&mut self, vdi: &str, name: String, kind: StreamKind) -> Result<()> {
        let rec = self.client.call("VDI.get_record", &[json!(vdi)])?;
        add_sr(self.client, &mut self.bundle, &rec);
        let size = int_field(&rec, "virtual_size").unwrap_or(0);
        let uuid = s(&rec, "uuid").to_string();
        let live = s(&rec, "snapshot_of").to_string();
        let tracked = self.opts.cbt && kind == StreamKind::Disk && flag(&rec, "cbt_enabled");
        self.bundle.add("VDI", vdi, rec);
        self.streams.push((vdi.to_string(), name.clone()));
        let target = self.nbd_target(vdi, &uuid)?;
        self.via.push(if target.is_some() { "NBD" } else { "HTTP" });
        let (mut changed, mut delta_base) = (None, None);
        // Kept with its data only where a base= difference can be asked for: read over HTTP,
        // small enough for a VHD export.
        let data = target.is_none() && size <= crate::source::VHD_MAX;
        if tracked {
            let runs = self.plan_cbt(&name, vdi, &live, size, target.is_some()).map(|p| {
                changed = Some(p.changed);
                delta_base = p.base;
                p.runs
            });
            self.keep.vdis.push(Base { r#ref: vdi.to_string(), uuid: uuid.clone(), live, data });
            self.cbt.insert(name.clone(), json!({"vdi": uuid, "runs": runs.unwrap_or(0), "data": data}));
        }
        let parent_dev = match &changed {
            Some(_) => Some(self.parent_dev(&name)?),
            None => None,
        };
        // The audit reads through a source of its own, dropped with its export slot before
        // the next disk is planned (one slot, two disks: no waiting on ourselves). A difference
        // from a base= export is the pool's VHD metadata, not CBT: nothing to audit.
        if let (Some(c), None, Some(p)) = (&changed, &delta_base, &parent_dev) {
            let sample_from = self.source(target.clone(), vdi, size, Reading::Audit)?;
            if !self.audit(&name, &*sample_from, &**p, c)? {
                // An audit failure reads everything after all.
                self.cbt.insert(name.clone(), json!({"vdi": uuid, "runs": 0, "data": data}));
                changed = None;
            }
        }
        let (dev, changed) = match (changed, parent_dev) {
            (Some(c), Some(parent)) => {
                let delta = delta_base.map(|b| (b, parent.clone()));
                let source = self.source(target, vdi, size, Reading::Changed(&c, delta))?;
                self.incremental = true;
                let patched = Patched { source, parent: Box::new(parent), changed: c.clone() };
                (Box::new(patched) as Box<dyn BlockDev>, Some(c))
            }
            _ => (self.source(target, vdi, size, Reading::Whole(&uuid))?, None),
        };
        self.sources.push(Source { name, kind, dev, changed });
        Ok(())
    }

    /// VDI `vdi` (of `size` bytes) read over NBD at `target`, else over HTTP, for `how`.
    fn source(&self, target: Option<Target>, vdi: &str, size: u64, how: Reading<'_>) -> Result<Box<dyn BlockDev>> {
        let last = |c: &[std::ops::Range<u64>]| c.last().map_or(0, |r| r.end);
        Ok(match target {
            Some(target) => {
                let mut d = NbdDisk::new(target, size, self.transfer.clone());
                match how {
                    Reading::Changed(c, _) => d = d.finish_at(last(c)),
                    Reading::Whole(uuid) if !self.opts.full => {
                        match vhd_block_map(self.client, vdi, None, size, &self.transfer) {
                            Ok(map) => {
                                let end = last(&map.ranges(size));
                                d = d.with_map(map).finish_at(end);
                            }
                            Err(e) => {
                                self.say("warning", format!("no block map for disk {uuid} ({e}): reading all of it"))
                            }
                        }
                    }
                    Reading::Whole(_) | Reading::Audit => {}
                }
                Box::new(d)
            }
            None => {
                let (client, vdi, transfer) = (self.client.clone(), vdi.to_string(), self.transfer.clone());
                let d = match how {
                    Reading::Changed(c, Some((base, parent))) => {
                        HttpDisk::delta(client, vdi, base, size, transfer, parent).finish_at(last(c))
                    }
                    Reading::Changed(c, None) => HttpDisk::new(client, vdi, size, transfer).finish_at(last(c)),
                    Reading::Whole(_) | Reading::Audit => HttpDisk::new(client, vdi, size, transfer),
                };
                Box::new(if self.opts.full { d.raw() } else { d })
            }
        })
    }

    /// Stream `name` of the previous backup, read where the changes leave it unchanged.
    fn parent_dev(&mut self, name: &str) -> Result<Arc<archive::reader::StreamReader>> {
        let parent = self.parent.expect("changed ranges come with a parent");
        let reader = match &mut self.reader {
            Some(r) => r,
            None => self.reader.insert(RepoReader::new(self.repo.clone(), 64, 64 << 20)?),
        };
        Ok(Arc::new(reader.open_with(parent, name, archive::reader::ReadAhead::hinted())?))
    }

    /// How to read disk stream `name` (snapshot VDI `vdi`) as its changes since the previous
    /// backup; `None` (said in the log) when the disk must be read in full. Over NBD (`nbd`)
    /// the changes are CBT's; over HTTP, against a base kept with its data, they are the
    /// blocks the pool's `base=` export holds.
    fn plan_cbt(&mut self, name: &str, vdi: &str, live: &str, size: u64, nbd: bool) -> Option<Plan> {
        let full = |g: &Self, why: &str| -> Option<Plan> {
            g.say("info", format!("CBT: reading all of {name}: {why}"));
            None
        };
        if self.opts.full {
            return full(self, "--full asks for a new baseline");
        }
        let meta = self.parent.and_then(|p| p.snapshot.meta.as_ref());
        let Some(base) = meta.map(|m| &m["capture"]["cbt"][name]).filter(|b| b.is_object()) else {
            return full(self, "the previous backup kept no CBT base for it (first CBT backup)");
        };
        let parent = self.parent.expect("a parent has the meta");
        if parent.snapshot.stream(name).is_none_or(|st| st.size != size) {
            return full(self, "its size differs from the previous backup's");
        }
        let base_uuid = base["vdi"].as_str().unwrap_or("");
        let base_ref = match self.client.call("VDI.get_by_uuid", &[json!(base_uuid)]) {
            Ok(r) => r.as_str().unwrap_or("").to_string(),
            Err(_) => return full(self, &format!("its base {base_uuid} is gone from the pool (CBT reset)")),
        };
        // A disk replaced by another of the same size at the same place is not a change.
        if self.client.call("VDI.get_snapshot_of", &[json!(base_ref)]).ok() != Some(json!(live)) {
            return full(self, &format!("its base {base_uuid} is a snapshot of another disk"));
        }
        if !nbd && base["data"].as_bool() == Some(true) {
            match vhd_block_map(self.client, vdi, Some(&base_ref), size, &self.transfer) {
                Ok(map) => {
                    let changed = map.ranges(size);
                    let bytes: u64 = changed.iter().map(|r| r.end - r.start).sum();
                    let blocks = bytes.div_ceil(map.block);
                    self.say(
                        "info",
                        format!("delta: {name}: {bytes} bytes in {blocks} block(s) differ from its base (no NBD: base= export)"),
                    );
                    return Some(Plan { changed, runs: 0, base: Some(base_ref) });
                }
                Err(e) => {
                    self.say("warning", format!("delta: {name}: the pool sent no difference from its base ({e})"))
                }
            }
        }
        let bitmap = match call_unless_in_use(self.client, "VDI.list_changed_blocks", &[json!(base_ref), json!(vdi)]) {
            Ok(b) => b,
            Err(e) => {
                let why = if e.code() == Some("VDI_IN_USE") { "the disk stayed in use" } else { "CBT was reset" };
                return full(self, &format!("list_changed_blocks refused ({e}): {why}"));
            }
        };
        let changed = match cbt::decode(bitmap.as_str().unwrap_or(""), size) {
            Ok(c) => c,
            Err(e) => return full(self, e.as_str()),
        };
        let bytes: u64 = changed.iter().map(|r| r.end - r.start).sum();
        let how = if nbd { "" } else { " (no NBD: the whole disk is streamed over HTTP, only they are processed)" };
        self.say("info", format!("CBT: {name}: {bytes} bytes in {} changed range(s){how}", changed.len()));
        Some(Plan { changed, runs: base["runs"].as_u64().unwrap_or(0) + 1, base: None })
    }

    /// Every `audit_every` incrementals, re-read a sample of unchanged blocks and compare
    /// them with the previous backup. False: they differ (CBT missed changes).
    fn audit(
        &mut self,
        name: &str,
        dev: &dyn BlockDev,
        parent: &dyn BlockDev,
        changed: &[std::ops::Range<u64>],
    ) -> Result<bool> {
        let runs = self.cbt[name]["runs"].as_u64().unwrap_or(0);
        let every = u64::from(self.opts.audit_every);
        if every == 0 || runs < every {
            return Ok(true);
        }
        let seed = jiff::Timestamp::now().as_nanosecond() as u64;
        let sample = cbt::sample_unchanged(changed, dev.len(), AUDIT_BLOCKS, seed);
        let (mut a, mut b) = (vec![0u8; cbt::BLOCK as usize], vec![0u8; cbt::BLOCK as usize]);
        for &at in &sample {
            dev.read_at(at, &mut a).map_err(|e| Error::io(format!("CBT audit of {name} at {at}"), e))?;
            parent.read_at(at, &mut b).map_err(|e| Error::io(format!("CBT audit of {name} at {at}"), e))?;
            if a != b {
                self.say(
                    "error",
                    format!(
                        "CBT audit FAILED for {name}: the block at {at} changed but CBT says it did not; \
                         reading the whole disk (check the SR's CBT; the previous backups of this disk \
                         may be wrong from here)"
                    ),
                );
                return Ok(false);
            }
        }
        self.say("info", format!("CBT audit of {name}: {} unchanged blocks re-read, all equal", sample.len()));
        if let Some(v) = self.cbt.get_mut(name) {
            v["runs"] = json!(0);
        }
        Ok(true)
    }

    /// Where to read VDI `vdi` over NBD, when the transport allows and the pool offers it.
    fn nbd_target(&mut self, vdi: &str, uuid: &str) -> Result<Option<Target>> {
        if self.opts.transport == Transport::Http {
            return Ok(None);
        }
        let tls = match self.nbd_tls {
            Some(t) => t,
            None => *self.nbd_tls.insert(nbd_wants_tls(self.client)?),
        };
        let target = nbd_target(self.client, vdi, uuid, tls)?;
        if target.is_none() && self.opts.transport == Transport::Nbd {
            return Err(Error::Unsupported(format!(
                "disk {uuid}: the pool offers no NBD (no network has the nbd or insecure_nbd purpose)"
            )));
        }
        let Some(target) = target else { return Ok(None) };
        if self.opts.transport == Transport::Auto {
            // Offered is not reachable (a firewall, a host without the NBD service): one
            // probe per server, and HTTP when it does not answer.
            let up = match self.nbd_up.get(&target.addr) {
                Some(&up) => up,
                None => {
                    // Connect, negotiate and disconnect: whether it serves the export now.
                    let probed = NbdDisk::open(target.clone()).map(drop);
                    if let Err(e) = &probed {
                        self.say("warning", format!("NBD offered but not usable ({e}): reading over HTTP"));
                    }
                    self.nbd_up.insert(target.addr.clone(), probed.is_ok());
                    probed.is_ok()
                }
            };
            if !up {
                return Ok(None);
            }
        }
        Ok(Some(target))
    }
}

fn add_sr(client: &Client, bundle: &mut Bundle, vdi_rec: &Value) {
    let sr = s(vdi_rec, "SR");
    if !is_null(sr) && bundle.id_of(sr).is_none() {
        if let Ok(rec) = client.call("SR.get_record", &[json!(sr)]) {
            bundle.add("SR", sr, rec);
        }
    }
}

/// Destroy the snapshots a previous run of job `job` left on the pool (a killed process
/// cannot clean up): snapshot VMs whose `other_config` names the job, with their disks.
/// Returns how many were found.
pub fn sweep_leftovers(client: &Client, job: &str, log: Log<'_>) -> Result<usize> {
    let vms = client.call("VM.get_all_records", &[])?;
    let mut n = 0;
    for (r, rec) in vms.as_object().into_iter().flatten() {
        if flag(rec, "is_a_snapshot") && rec["other_config"]["vmvault:job"].as_str() == Some(job) {
            line(
                log,
                s(rec, "name_label"),
                "cleanup",
                "warning",
                "a snapshot left by an interrupted run: destroying it".into(),
            );
            cleanup(client, s(rec, "name_label"), &Snap { r#ref: r.clone(), checkpoint: false }, None, log);
            n += 1;
        }
    }
    Ok(n)
}

/// Destroy the CBT bases of this VM's disks that this repository kept and no longer needs
/// (a backup between that did not name them — a run without `--cbt`, a forgotten snapshot —
/// left them behind). Bases marked by another repository are left alone.
fn sweep_stale_bases(client: &Client, vm_name: &str, keep: &Keep, log: Log<'_>) {
    let kept: Vec<&String> = keep.vdis.iter().map(|b| &b.r#ref).collect();
    let mut n = 0;
    for base in &keep.vdis {
        let Ok(snaps) = client.call("VDI.get_snapshots", &[json!(base.live)]) else { continue };
        for snap in snaps.as_array().into_iter().flatten().filter_map(Value::as_str) {
            if kept.contains(&&snap.to_string()) {
                continue;
            }
            let Ok(other) = client.call("VDI.get_other_config", &[json!(snap)]) else { continue };
            let ours = other[BASE_MARK].as_str() == Some(keep.mark.as_str());
            if ours && call_unless_in_use(client, "VDI.destroy", &[json!(snap)]).is_ok() {
                n += 1;
            }
        }
    }
    if n > 0 {
        line(log, vm_name, "cleanup", "info", format!("{n} stale CBT base(s) of this repository destroyed"));
    }
}

/// `client.call(method, args)`, retried while it fails with `VDI_IN_USE`, for up to ~15 s: dom0
/// lets go of a disk read over NBD (or probed) a little after the connection closes, later on
/// a busy host — XO retries these too.
fn call_unless_in_use(client: &Client, method: &str, args: &[Value]) -> Result<Value> {
    let mut r = client.call(method, args);
    for wait_ms in [250, 500, 1000, 2000, 2000, 2000, 2000, 2000, 2000] {
        if r.as_ref().err().and_then(Error::code) != Some("VDI_IN_USE") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(wait_ms));
        r = client.call(method, args);
    }
    r
}

/// Destroy the snapshot VM and its disks (and memory image) — except, after a successful
/// CBT backup, the disks kept as the next backup's bases: their data is destroyed, their
/// change log stays (`cbt_metadata`) — or, read over HTTP, they stay whole for the next
/// `base=` difference —, and the bases they replace are destroyed. Errors are logged, not
/// returned: a backup that succeeded stays a success.
fn cleanup(client: &Client, vm_name: &str, snap: &Snap, keep: Option<&Keep>, log: Log<'_>) {
    let mut vdis = Vec::new();
    if let Ok(rec) = client.call("VM.get_record", &[json!(snap.r#ref)]) {
        for vbd in list(&rec, "VBDs") {
            if let Ok(v) = client.call("VBD.get_record", &[json!(vbd)]) {
                if s(&v, "type") == "Disk" && !is_null(s(&v, "VDI")) {
                    vdis.push(s(&v, "VDI").to_string());
                }
            }
        }
        let suspend = s(&rec, "suspend_VDI");
        if !is_null(suspend) {
            vdis.push(suspend.to_string());
        }
    }
    let gone =
        |r: &Result<Value>| matches!(r, Ok(_)) || r.as_ref().err().and_then(Error::code) == Some("HANDLE_INVALID");
    let warn = |what: &str, r: Result<Value>| {
        let e = r.err().map(|e| e.to_string()).unwrap_or_default();
        line(log, vm_name, "cleanup", "warning", format!("could not {what}: {e}"));
    };
    let r = client.call("VM.destroy", &[json!(snap.r#ref)]);
    if !gone(&r) {
        warn("destroy the snapshot", r);
    }
    let kept: Vec<&Base> = keep.map(|k| k.vdis.iter().collect()).unwrap_or_default();
    let (mut failed, mut bases, mut with_data) = (0, 0, 0);
    for vdi in &vdis {
        let found = kept.iter().find(|b| &b.r#ref == vdi);
        let base = found.is_some();
        if base {
            let mark = keep.map(|k| k.mark.as_str()).unwrap_or_default();
            let _ = client.call("VDI.remove_from_other_config", &[json!(vdi), json!(BASE_MARK)]);
            let _ = client.call("VDI.add_to_other_config", &[json!(vdi), json!(BASE_MARK), json!(mark)]);
        }
        if found.is_some_and(|b| b.data) {
            bases += 1;
            with_data += 1;
            continue;
        }
        let call = if base { "VDI.data_destroy" } else { "VDI.destroy" };
        let mut r = call_unless_in_use(client, call, &[json!(vdi)]);
        if base && r.is_err() {
            // Not kept after all: the next backup reads this disk in full.
            let e = r.err().map(|e| e.to_string()).unwrap_or_default();
            line(log, vm_name, "cleanup", "warning", format!("could not keep a CBT base ({e}); destroying it"));
            r = client.call("VDI.destroy", &[json!(vdi)]);
        } else if base {
            bases += 1;
            continue;
        }
        if !gone(&r) {
            failed += 1;
            warn("destroy a snapshot disk", r);
        }
    }
    for uuid in keep.map(|k| k.old_bases.as_slice()).unwrap_or_default() {
        if let Ok(r) = client.call("VDI.get_by_uuid", &[json!(uuid)]) {
            let d = call_unless_in_use(client, "VDI.destroy", &[r]);
            if !gone(&d) {
                warn(&format!("destroy the previous CBT base {uuid}"), d);
            }
        }
    }
    if let Some(k) = keep.filter(|_| bases > 0) {
        sweep_stale_bases(client, vm_name, k, log);
    }
    if failed == 0 {
        let kept = match (bases, with_data) {
            (0, _) => String::new(),
            (b, 0) => format!(", {b} kept as CBT base(s)"),
            (b, d) => format!(", {b} kept as CBT base(s), {d} with its data (read over HTTP: the next backup asks the pool for the difference)"),
        };
        line(log, vm_name, "cleanup", "info", format!("snapshot and {} disk(s) destroyed{kept}", vdis.len() - bases));
    }
}
