//! Back up one VM from a pool, in the phases Xen Orchestra runs (reference §8.2):
//! snapshot (or checkpoint, for memory) → transfer (disks and memory into the archive, with
//! the VM's records as `meta.xapi`) → cleanup (the snapshot and its disks are destroyed,
//! always, even after a failure or an interruption).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use archive::backup::{BackupOptions, ParentChoice, Source};
use archive::manifest::{SnapshotEntry, StreamKind};
use archive::progress::Progress;
use archive::Repository;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::nbd::{NbdDisk, Target};
use crate::run::Limits;
use crate::source::{nbd_target, nbd_wants_tls, vhd_block_map, HttpRawDisk};
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
}

/// How disk data is read from the pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// NBD when `VDI.get_nbd_info` offers it, else HTTP.
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
    repo: &Repository,
    p: Pending,
    opts: &Options,
    limits: &Arc<Limits>,
    log: Log<'_>,
) -> VmResult {
    let Pending { rec, snap, mut result, start } = p;
    let outcome = rec.and_then(|rec| {
        let snap = snap.ok_or_else(|| Error::Usage("no snapshot".into()))?;
        let transfer = transfer(client, repo, &rec, &snap, opts, limits, log);
        cleanup(client, &result.vm, &snap, log);
        transfer
    });
    match outcome {
        Ok((entry, read, memory)) => {
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

fn take_snapshot(client: &Client, vm: &str, rec: &Value, opts: &Options, log: Log<'_>) -> Result<Snap> {
    let name = s(rec, "name_label");
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
    repo: &Repository,
    vm_rec: &Value,
    snap: &Snap,
    opts: &Options,
    limits: &Arc<Limits>,
    log: Log<'_>,
) -> Result<(SnapshotEntry, u64, bool)> {
    let name = s(vm_rec, "name_label").to_string();
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
        limits,
        log,
        vm: &name,
        nbd_tls: None,
        via: Vec::new(),
        received: Arc::default(),
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
    let Gather { mut bundle, sources, streams, received, mut via, .. } = g;
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
                    "kind": if snap.checkpoint { "checkpoint" } else { "snapshot" }, "job": opts.job},
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
        parent: ParentChoice::Latest,
        workers: opts.workers,
    };
    let entry = archive::backup::backup(repo, sources, &bopts, &progress)?;
    line(log, &name, "commit", "info", format!("snapshot {} saved", entry.id.short()));
    Ok((entry, received.load(Ordering::Relaxed), memory))
}

/// The streams of a backup being put together: each VDI's record and the source reading it.
struct Gather<'a> {
    client: &'a Arc<Client>,
    opts: &'a Options,
    limits: &'a Arc<Limits>,
    log: Log<'a>,
    vm: &'a str,
    /// Whether the pool's NBD server wants TLS (asked once).
    nbd_tls: Option<bool>,
    /// The transports used ("NBD", "HTTP").
    via: Vec<&'static str>,
    received: Arc<AtomicU64>,
    bundle: Bundle,
    sources: Vec<Source>,
    streams: Vec<(String, String)>,
}

impl Gather<'_> {
    /// Keep VDI `vdi`'s record (and its SR's) and read it as stream `name`.
    fn add(&mut self, vdi: &str, name: String, kind: StreamKind) -> Result<()> {
        let rec = self.client.call("VDI.get_record", &[json!(vdi)])?;
        add_sr(self.client, &mut self.bundle, &rec);
        let size = int_field(&rec, "virtual_size").unwrap_or(0);
        let uuid = s(&rec, "uuid").to_string();
        self.bundle.add("VDI", vdi, rec);
        self.streams.push((vdi.to_string(), name.clone()));
        let dev: Box<dyn blockdev::BlockDev> = match self.nbd_target(vdi, &uuid)? {
            Some(target) => {
                let mut d = NbdDisk::new(target, size, self.received.clone())
                    .cancel_on(self.opts.cancel.clone())
                    .limit(self.limits.exports.clone());
                match vhd_block_map(self.client, vdi, size, Some(&self.limits.exports)) {
                    Ok(map) => {
                        let last = map.present.iter().rposition(|&p| p).map_or(0, |i| (i as u64 + 1) * map.block);
                        d = d.with_map(map).finish_at(last);
                    }
                    Err(e) => line(
                        self.log,
                        self.vm,
                        "transfer",
                        "warning",
                        format!("no block map for disk {uuid} ({e}): reading all of it"),
                    ),
                }
                self.via.push("NBD");
                Box::new(d)
            }
            None => {
                self.via.push("HTTP");
                Box::new(
                    HttpRawDisk::new(self.client.clone(), vdi.to_string(), size, self.received.clone())
                        .cancel_on(self.opts.cancel.clone())
                        .limit(self.limits.exports.clone()),
                )
            }
        };
        self.sources.push(Source { name, kind, dev, changed: None });
        Ok(())
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
        let target = nbd_target(self.client, vdi, tls)?;
        if target.is_none() && self.opts.transport == Transport::Nbd {
            return Err(Error::Unsupported(format!(
                "disk {uuid}: the pool offers no NBD (no network has the nbd or insecure_nbd purpose)"
            )));
        }
        Ok(target)
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

/// Destroy the snapshot VM and its disks (and memory image). Errors are logged, not
/// returned: a backup that succeeded stays a success.
fn cleanup(client: &Client, vm_name: &str, snap: &Snap, log: Log<'_>) {
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
    let r = client.call("VM.destroy", &[json!(snap.r#ref)]);
    if !gone(&r) {
        line(
            log,
            vm_name,
            "cleanup",
            "warning",
            format!("could not destroy the snapshot: {}", r.err().map(|e| e.to_string()).unwrap_or_default()),
        );
    }
    let mut failed = 0;
    for vdi in &vdis {
        let mut r = client.call("VDI.destroy", &[json!(vdi)]);
        for _ in 0..3 {
            if r.as_ref().err().and_then(Error::code) != Some("VDI_IN_USE") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
            r = client.call("VDI.destroy", &[json!(vdi)]);
        }
        if !gone(&r) {
            failed += 1;
            line(
                log,
                vm_name,
                "cleanup",
                "warning",
                format!("could not destroy a snapshot disk: {}", r.err().map(|e| e.to_string()).unwrap_or_default()),
            );
        }
    }
    if failed == 0 {
        line(log, vm_name, "cleanup", "info", format!("snapshot and {} disk(s) destroyed", vdis.len()));
    }
}
