//! Recreate a VM on a pool from a snapshot (reference §2.5, §3.5, §8.4): VM.create from
//! the kept record, a VDI + VBD per disk with its contents uploaded, VIFs on networks
//! mapped by name — halted, or suspended with its memory image so it resumes where it was.

use std::io::{self, Read};
use std::sync::Arc;

use archive::manifest::SnapshotEntry;
use archive::reader::RepoReader;
use blockdev::BlockDev;
use disk_formats::xva::{Object, OvaXml};
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::xapi::records::{s, NULL};
use crate::xapi::Client;

/// How to restore.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// SR name or uuid (default: the pool's default SR).
    pub sr: Option<String>,
    /// The new VM's name (default: the original's).
    pub name: Option<String>,
    /// (old network name, new network name).
    pub network_map: Vec<(String, String)>,
    /// Create the VM suspended with its memory image (needs a memory stream).
    pub suspended: bool,
    /// Start it (or resume it, when suspended) once created.
    pub start: bool,
    /// Go on when the target host lacks CPU features the VM ran with.
    pub force: bool,
}

/// What a restore did.
#[derive(Debug, serde::Serialize)]
pub struct Restored {
    pub vm: String,
    pub uuid: String,
    pub disks: usize,
    pub bytes_sent: u64,
    pub power_state: String,
    pub notes: Vec<String>,
}

/// VM fields `VM.create` takes (reference §2.5).
const VM_FIELDS: &[&str] = &[
    "name_label",
    "name_description",
    "user_version",
    "is_a_template",
    "memory_static_max",
    "memory_dynamic_max",
    "memory_dynamic_min",
    "memory_static_min",
    "memory_target",
    "VCPUs_params",
    "VCPUs_max",
    "VCPUs_at_startup",
    "actions_after_shutdown",
    "actions_after_reboot",
    "actions_after_crash",
    "PV_bootloader",
    "PV_kernel",
    "PV_ramdisk",
    "PV_args",
    "PV_bootloader_args",
    "PV_legacy_args",
    "HVM_boot_policy",
    "HVM_boot_params",
    "HVM_shadow_multiplier",
    "platform",
    "PCI_bus",
    "other_config",
    "recommendations",
    "xenstore_data",
    "ha_always_run",
    "ha_restart_priority",
    "tags",
    "blocked_operations",
    "start_delay",
    "shutdown_delay",
    "order",
    "version",
    "generation_id",
    "hardware_platform_version",
    "has_vendor_device",
    "reference_label",
    "domain_type",
    "NVRAM",
];

fn pick(rec: &Value, fields: &[&str]) -> Map<String, Value> {
    fields.iter().filter_map(|f| rec.get(*f).map(|v| ((*f).to_string(), v.clone()))).collect()
}

fn find_sr(client: &Client, want: Option<&str>) -> Result<String> {
    let Some(want) = want else {
        let pools = client.call("pool.get_all", &[])?;
        let pool = pools.get(0).and_then(Value::as_str).unwrap_or(NULL).to_string();
        let sr = client.call("pool.get_default_SR", &[json!(pool)])?;
        return sr
            .as_str()
            .filter(|r| *r != NULL)
            .map(String::from)
            .ok_or_else(|| Error::Usage("the pool has no default SR; name one with --sr".into()));
    };
    if let Ok(r) = client.call("SR.get_by_uuid", &[json!(want)]) {
        return Ok(r.as_str().unwrap_or_default().to_string());
    }
    let refs = client.call("SR.get_by_name_label", &[json!(want)])?;
    match refs.as_array().map(Vec::as_slice) {
        Some([one]) => Ok(one.as_str().unwrap_or_default().to_string()),
        Some([]) | None => Err(Error::Usage(format!("no SR named {want:?}"))),
        Some(_) => Err(Error::Usage(format!("several SRs are named {want:?}; give its uuid"))),
    }
}

/// CPU feature words (hex, dash-separated) the VM had that the host lacks.
fn missing_cpu_features(vm_flags: &str, host_flags: &str) -> bool {
    let words = |t: &str| t.split('-').map(|w| u32::from_str_radix(w.trim(), 16).unwrap_or(0)).collect::<Vec<_>>();
    let (want, have) = (words(vm_flags), words(host_flags));
    want.iter().enumerate().any(|(i, w)| w & !have.get(i).copied().unwrap_or(0) != 0)
}

/// Restore snapshot `entry` as a new VM.
pub fn restore(client: &Arc<Client>, reader: &RepoReader, entry: &SnapshotEntry, opts: &Options) -> Result<Restored> {
    let meta = entry.snapshot.meta.as_ref().and_then(|m| m.get("xapi")).ok_or_else(|| {
        Error::Usage(format!(
            "snapshot {} has no XAPI records (it was not captured from a pool); use export or restore instead",
            entry.id.short()
        ))
    })?;
    let ova = OvaXml::from_json(meta).map_err(|e| Error::protocol("meta.xapi", e))?;
    let vm = ova.vm()?.clone();
    let streams = disk_formats::xva::objects::streams_of(meta);
    let stream_of = |id: &str| streams.iter().find(|(v, _)| v == id).map(|(_, n)| n.clone());
    let sr = find_sr(client, opts.sr.as_deref())?;
    let mut notes = Vec::new();
    let name = opts.name.clone().unwrap_or_else(|| s(&vm.snapshot, "name_label").to_string());
    let suspend_id = s(&vm.snapshot, "suspend_VDI").to_string();
    let memory_stream = stream_of(&suspend_id).filter(|_| s(&vm.snapshot, "power_state") == "Suspended");
    if opts.suspended && memory_stream.is_none() {
        return Err(Error::Usage(format!(
            "snapshot {} has no memory image; restore without --suspended",
            entry.id.short()
        )));
    }
    if opts.suspended {
        check_cpu(client, &vm.snapshot, opts.force, &mut notes)?;
    }
    let mut bytes_sent = 0;
    // 0. The memory image first: VM.create needs its VDI.
    let mut suspend_vdi = NULL.to_string();
    if let (true, Some(stream)) = (opts.suspended, &memory_stream) {
        let dev = reader.open(entry, stream)?;
        let rec = ova.find(&suspend_id).map(|o| o.snapshot.clone()).unwrap_or(json!({}));
        suspend_vdi = create_vdi(client, &rec, &sr, dev.len(), "suspend", &format!("Suspend image for {name}"))?;
        bytes_sent += upload(client, &suspend_vdi, Arc::new(dev))?;
    }
    // 1. The VM, blocked from starting while it is incomplete.
    let mut rec = pick(&vm.snapshot, VM_FIELDS);
    rec.insert("name_label".into(), json!(format!("[Importing…] {name}")));
    rec.insert("is_a_template".into(), json!(false));
    rec.insert("ha_always_run".into(), json!(false));
    let blocked = vm.snapshot.get("blocked_operations").cloned().unwrap_or(json!({}));
    rec.insert("blocked_operations".into(), json!({"start": "Importing…", "start_on": "Importing…"}));
    if let Some(oc) = rec.get_mut("other_config").and_then(Value::as_object_mut) {
        oc.remove("mac_seed");
        oc.retain(|k, _| !k.starts_with("vmvault:"));
    }
    if opts.suspended {
        rec.insert("power_state".into(), json!("Suspended"));
        rec.insert("suspend_VDI".into(), json!(suspend_vdi));
        for f in ["last_booted_record", "last_boot_CPU_flags"] {
            rec.insert(f.into(), vm.snapshot.get(f).cloned().unwrap_or(json!("")));
        }
    }
    let new_vm = client.call("VM.create", &[Value::Object(rec)])?;
    let new_vm = new_vm.as_str().ok_or_else(|| Error::protocol("VM.create", "no VM reference"))?.to_string();
    // 2. Disks.
    let mut disks = 0;
    for vbd in ova.of_class("VBD").filter(|b| s(&b.snapshot, "VM") == vm.id) {
        let vdi_id = s(&vbd.snapshot, "VDI");
        let Some(stream) = stream_of(vdi_id) else { continue };
        let dev = reader.open(entry, &stream)?;
        let vdi_rec = ova.find(vdi_id).map(|o| o.snapshot.clone()).unwrap_or(json!({}));
        let t = match s(&vdi_rec, "type") {
            "system" => "system",
            _ => "user",
        };
        let vdi = create_vdi(client, &vdi_rec, &sr, dev.len(), t, s(&vdi_rec, "name_label"))?;
        create_vbd(client, &new_vm, &vdi, &vbd.snapshot, opts.suspended)?;
        bytes_sent += upload(client, &vdi, Arc::new(dev))?;
        disks += 1;
    }
    // 3. NICs.
    for vif in ova.of_class("VIF").filter(|v| s(&v.snapshot, "VM") == vm.id) {
        create_vif(client, &new_vm, vif, &ova, opts, &mut notes)?;
    }
    // 4. Done: the real name and blocked operations.
    client.call("VM.set_name_label", &[json!(new_vm), json!(name)])?;
    client.call("VM.set_blocked_operations", &[json!(new_vm), blocked])?;
    if opts.start {
        let m = if opts.suspended { "VM.resume" } else { "VM.start" };
        client.call_async(m, &[json!(new_vm), json!(false), json!(false)])?;
    }
    let rec = client.call("VM.get_record", &[json!(new_vm)])?;
    Ok(Restored {
        vm: name,
        uuid: s(&rec, "uuid").into(),
        disks,
        bytes_sent,
        power_state: s(&rec, "power_state").into(),
        notes,
    })
}

fn check_cpu(client: &Client, vm: &Value, force: bool, notes: &mut Vec<String>) -> Result<()> {
    let want = vm.get("last_boot_CPU_flags").and_then(|f| f.get("features")).and_then(Value::as_str).unwrap_or("");
    let pools = client.call("pool.get_all", &[])?;
    let pool = pools.get(0).cloned().unwrap_or(json!(NULL));
    let master = client.call("pool.get_master", &[pool])?;
    let info = client.call("host.get_cpu_info", &[master])?;
    let have = s(&info, "features");
    if want.is_empty() || !missing_cpu_features(want, have) {
        return Ok(());
    }
    let msg =
        format!("the target host's CPU lacks features the VM ran with (VM {want}, host {have}): resuming may fail");
    if !force {
        return Err(Error::Usage(format!("{msg}; pass --force to restore it suspended anyway, or restore it halted")));
    }
    notes.push(msg);
    Ok(())
}

fn create_vdi(client: &Client, rec: &Value, sr: &str, size: u64, kind: &str, name: &str) -> Result<String> {
    let new = json!({
        "name_label": name, "name_description": s(rec, "name_description"), "SR": sr, "virtual_size": size,
        "type": kind, "sharable": false, "read_only": false, "other_config": {},
        "xenstore_data": rec.get("xenstore_data").cloned().unwrap_or(json!({})), "sm_config": {},
        "tags": rec.get("tags").cloned().unwrap_or(json!([])),
    });
    let r = client.call("VDI.create", &[new])?;
    r.as_str().map(String::from).ok_or_else(|| Error::protocol("VDI.create", "no VDI reference"))
}

fn create_vbd(client: &Client, vm: &str, vdi: &str, rec: &Value, suspended: bool) -> Result<()> {
    let mut new =
        pick(rec, &["userdevice", "bootable", "mode", "unpluggable", "qos_algorithm_type", "qos_algorithm_params"]);
    new.insert("VM".into(), json!(vm));
    new.insert("VDI".into(), json!(vdi));
    new.insert("type".into(), json!("Disk"));
    new.insert("empty".into(), json!(false));
    new.insert("other_config".into(), json!({}));
    if suspended {
        new.insert("device".into(), rec.get("device").cloned().unwrap_or(json!("")));
        new.insert("currently_attached".into(), rec.get("currently_attached").cloned().unwrap_or(json!(false)));
    }
    client.call("VBD.create", &[Value::Object(new)])?;
    Ok(())
}

fn create_vif(
    client: &Client,
    vm: &str,
    vif: &Object,
    ova: &OvaXml,
    opts: &Options,
    notes: &mut Vec<String>,
) -> Result<()> {
    let old_net = ova.find(s(&vif.snapshot, "network")).map(|n| n.snapshot.clone()).unwrap_or(json!({}));
    let old_name = s(&old_net, "name_label").to_string();
    let want = opts.network_map.iter().find(|(o, _)| *o == old_name).map_or(old_name.clone(), |(_, n)| n.clone());
    let mut net =
        client.call("network.get_by_name_label", &[json!(want)])?.get(0).and_then(Value::as_str).map(String::from);
    if net.is_none() && !s(&old_net, "bridge").is_empty() {
        let all = client.call("network.get_all_records", &[])?;
        net = all
            .as_object()
            .and_then(|m| m.iter().find(|(_, n)| s(n, "bridge") == s(&old_net, "bridge")).map(|(r, _)| r.clone()));
    }
    let Some(net) = net else {
        notes.push(format!(
            "NIC {} left out: no network {want:?} on the target (map one with --network-map {old_name}=NAME)",
            s(&vif.snapshot, "device")
        ));
        return Ok(());
    };
    let mut new = pick(
        &vif.snapshot,
        &[
            "device",
            "MAC",
            "MTU",
            "qos_algorithm_type",
            "qos_algorithm_params",
            "locking_mode",
            "ipv4_allowed",
            "ipv6_allowed",
        ],
    );
    new.insert("VM".into(), json!(vm));
    new.insert("network".into(), json!(net));
    new.insert("other_config".into(), json!({}));
    client.call("VIF.create", &[Value::Object(new)])?;
    Ok(())
}

/// Upload a stream into a VDI with `format=raw&chunked` (xapi's own framing of data
/// extents, reference §5.3): zero extents are never sent. Returns the bytes of data sent.
pub fn upload(client: &Client, vdi: &str, dev: Arc<dyn BlockDev>) -> Result<u64> {
    let extents = data_extents(&*dev)?;
    let data: u64 = extents.iter().map(|(_, l)| l).sum();
    let length = extents.len() as u64 * 12 + data + 12;
    let task = client.create_task("vmvault import_raw_vdi")?;
    let query = [("vdi", vdi), ("format", "raw"), ("chunked", "true"), ("task_id", task.as_str())];
    let mut body = || -> Box<dyn Read + Send> {
        Box::new(Framed { dev: dev.clone(), extents: extents.clone(), at: 0, pending: Vec::new(), ended: false })
    };
    client.http_put("/import_raw_vdi", &query, length, &mut body)?;
    client.wait_task("import_raw_vdi", &task, None)?;
    Ok(data)
}

/// Data extents of a device, in 64 KiB granules (`disk_formats::out::data_granules`), split
/// to at most 4 MiB each: (offset, length).
fn data_extents(dev: &dyn BlockDev) -> Result<Vec<(u64, u64)>> {
    const MAX: u64 = 4 << 20;
    const GRANULE: u64 = 64 << 10;
    let granules = disk_formats::out::data_granules(dev, GRANULE).map_err(|e| Error::io("reading the snapshot", e))?;
    let len = dev.len();
    Ok(granules
        .into_iter()
        .flat_map(|r| {
            let (start, end) = (r.start * GRANULE, (r.end * GRANULE).min(len));
            (start..end).step_by(MAX as usize).map(move |o| (o, MAX.min(end - o)))
        })
        .collect())
}

/// The `chunked` body: `[offset u64 LE][length u32 LE][bytes]…` and a zero header.
struct Framed {
    dev: Arc<dyn BlockDev>,
    extents: Vec<(u64, u64)>,
    at: usize,
    pending: Vec<u8>,
    ended: bool,
}

impl Read for Framed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pending.is_empty() {
            if let Some(&(off, len)) = self.extents.get(self.at) {
                self.at += 1;
                let mut frame = vec![0u8; 12 + len as usize];
                frame[..8].copy_from_slice(&off.to_le_bytes());
                frame[8..12].copy_from_slice(&(len as u32).to_le_bytes());
                self.dev.read_at(off, &mut frame[12..])?;
                self.pending = frame;
            } else if !self.ended {
                self.ended = true;
                self.pending = vec![0u8; 12];
            } else {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_features_compare_word_by_word() {
        assert!(!missing_cpu_features("0000000f-00000001", "000000ff-00000003"));
        assert!(missing_cpu_features("0000010f-00000001", "000000ff-00000003"));
        assert!(missing_cpu_features("00000001-00000001", "00000001"));
        assert!(!missing_cpu_features("", "00000001"));
    }

    #[test]
    fn framing_round_trips() {
        let mut data = vec![0u8; 3 << 20];
        data[5..10].fill(7);
        data[(2 << 20) + 1] = 9;
        let dev: Arc<dyn BlockDev> = Arc::new(blockdev::MemDev::new(data.clone()));
        let ext = data_extents(&*dev).unwrap();
        let mut f = Framed { dev, extents: ext.clone(), at: 0, pending: Vec::new(), ended: false };
        let mut out = Vec::new();
        f.read_to_end(&mut out).unwrap();
        // Re-apply the frames onto zeros: equal to the source.
        let mut back = vec![0u8; data.len()];
        let mut p = 0;
        loop {
            let off = u64::from_le_bytes(out[p..p + 8].try_into().unwrap()) as usize;
            let len = u32::from_le_bytes(out[p + 8..p + 12].try_into().unwrap()) as usize;
            p += 12;
            if off == 0 && len == 0 {
                break;
            }
            back[off..off + len].copy_from_slice(&out[p..p + len]);
            p += len;
        }
        assert_eq!(p, out.len());
        assert_eq!(back, data);
    }
}
