//! Building the objects of a package: from the XAPI records a backup kept, or — for VMs
//! backed up from image files — complete records made from XAPI's defaults.
//!
//! Snapshot metadata layout (FORMAT.md "VM metadata"): `meta.xapi` is
//! `{"version": …, "objects": [{class, id, snapshot}], "streams": {VDI id: stream name}}` —
//! `ova.xml` in JSON, plus which stream holds each VDI.

use serde_json::{json, Map, Value};

use super::{empty_map, int_field, Object, OvaXml};

/// A stream of the snapshot being packaged.
#[derive(Clone, Debug)]
pub struct StreamSpec {
    pub name: String,
    pub size: u64,
    pub memory: bool,
}

/// The package's objects and which stream is each streamed VDI's data.
#[derive(Debug)]
pub struct Packaged {
    pub ova: OvaXml,
    /// (VDI id, stream name), one per VDI whose data goes in.
    pub vdis: Vec<(String, String)>,
    /// Notes for the user (a memory stream left out, and why).
    pub notes: Vec<String>,
}

const NULL: &str = "OpaqueRef:NULL";

impl Packaged {
    /// Keep what an OVF package can carry: the disks (no memory state), in user-device order.
    pub fn keep_ovf_disks(&mut self) {
        let ova = &self.ova;
        let suspend = ova.vm().ok().and_then(|v| v.snapshot["suspend_VDI"].as_str());
        self.vdis.retain(|(id, _)| Some(id.as_str()) != suspend);
        let order = |id: &str| {
            ova.of_class("VBD")
                .find(|b| b.snapshot["VDI"].as_str() == Some(id))
                .and_then(|b| int_field(&b.snapshot, "userdevice"))
                .unwrap_or(u64::MAX)
        };
        self.vdis.sort_by_key(|(id, _)| order(id));
    }
}

fn uuid() -> String {
    let u = crate::vhd::footer::random_uuid();
    let h = hex::encode(u);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// The stream ↔ VDI map stored in `meta.xapi.streams`.
pub fn streams_of(xapi: &Value) -> Vec<(String, String)> {
    xapi["streams"].as_object().map_or_else(Vec::new, |m| {
        m.iter().filter_map(|(id, s)| s.as_str().map(|s| (id.clone(), s.to_string()))).collect()
    })
}

/// Objects for exporting a snapshot: its XAPI records when `meta.xapi` has them, else
/// synthesized. The VM comes out halted unless its memory stream is there to go with a
/// suspended state.
pub fn package(vm_name: &str, meta: Option<&Value>, streams: &[StreamSpec]) -> Packaged {
    match meta.and_then(|m| m.get("xapi")).and_then(|x| OvaXml::from_json(x).ok().map(|o| (o, x))) {
        Some((ova, xapi)) if ova.vm().is_ok() => from_records(ova, &streams_of(xapi), streams),
        _ => synthesize(vm_name, meta, streams),
    }
}

fn from_records(mut ova: OvaXml, map: &[(String, String)], streams: &[StreamSpec]) -> Packaged {
    let mut notes = Vec::new();
    let have = |s: &str| streams.iter().find(|x| x.name == s);
    let mut vdis: Vec<(String, String)> = map.iter().filter(|(_, s)| have(s).is_some()).cloned().collect();
    for o in ova.objects.iter_mut().filter(|o| o.class == "VDI") {
        if let Some((_, s)) = vdis.iter().find(|(id, _)| *id == o.id) {
            let size = have(s).map_or(0, |x| x.size);
            o.snapshot["virtual_size"] = json!(size.to_string());
        }
    }
    let vm_id = ova.vm().map(|v| v.id.clone()).unwrap_or_default();
    let vm = ova.objects.iter_mut().find(|o| o.id == vm_id).map(|o| &mut o.snapshot);
    if let Some(vm) = vm {
        let suspend = vm["suspend_VDI"].as_str().unwrap_or(NULL).to_string();
        let with_memory = vdis.iter().any(|(id, _)| *id == suspend);
        if !with_memory {
            if vm["power_state"] == json!("Suspended") {
                notes.push("no memory stream for the suspend VDI: the VM is exported halted".into());
            }
            vm["power_state"] = json!("Halted");
            vm["suspend_VDI"] = json!(NULL);
        } else {
            vm["power_state"] = json!("Suspended");
        }
        for (k, v) in [
            ("is_a_snapshot", json!(false)),
            ("is_a_template", json!(false)),
            ("snapshot_of", json!(NULL)),
            ("parent", json!(NULL)),
            ("snapshots", json!([])),
            ("resident_on", json!(NULL)),
            ("current_operations", empty_map()),
            ("allowed_operations", json!([])),
        ] {
            vm[k] = v;
        }
    }
    // Streams without a VDI in the records (added by hand) are left out, with a note.
    for s in streams.iter().filter(|s| !vdis.iter().any(|(_, n)| *n == s.name)) {
        notes.push(format!("stream {} has no VDI in the VM's records and is not exported", s.name));
    }
    vdis.retain(|(id, _)| ova.find(id).is_some());
    Packaged { ova, vdis, notes }
}

/// Complete VM, VBD, VDI and SR records with XAPI's defaults (what an XVA importer requires:
/// every field without a default in the datamodel).
fn synthesize(vm_name: &str, meta: Option<&Value>, streams: &[StreamSpec]) -> Packaged {
    let flat = meta.cloned().unwrap_or(Value::Null);
    let memory = int_field(&flat, "memory_static_max").unwrap_or(1 << 30);
    let vcpus = int_field(&flat, "VCPUs_max").unwrap_or(1).max(1);
    let name = flat["name_label"].as_str().unwrap_or(vm_name).to_string();
    let mut notes = Vec::new();
    let disks: Vec<&StreamSpec> = streams.iter().filter(|s| !s.memory).collect();
    for s in streams.iter().filter(|s| s.memory) {
        notes.push(format!(
            "stream {} (memory) is left out: without the VM's XAPI records it cannot be resumed",
            s.name
        ));
    }
    let (vm_id, sr_id) = ("Ref:0".to_string(), "Ref:1".to_string());
    let mut objects = Vec::new();
    let mut vbds = Vec::new();
    let mut vdis_ids = Vec::new();
    let mut vdis = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let (vdi, vbd) = (format!("Ref:{:03}", 100 + i), format!("Ref:{:03}", 200 + i));
        objects.push(Object {
            class: "VDI".into(),
            id: vdi.clone(),
            snapshot: vdi_record(&d.name, d.size, &sr_id, &vbd),
        });
        objects.push(Object { class: "VBD".into(), id: vbd.clone(), snapshot: vbd_record(&vm_id, &vdi, &d.name, i) });
        vbds.push(json!(vbd));
        vdis_ids.push(json!(vdi.clone()));
        vdis.push((vdi, d.name.clone()));
    }
    let m = memory.to_string();
    let vm = json!({
        "uuid": uuid(), "name_label": name, "name_description": "", "user_version": "1",
        "is_a_template": false, "is_a_snapshot": false, "is_control_domain": false,
        "power_state": "Halted", "resident_on": NULL, "affinity": NULL, "suspend_VDI": NULL,
        "memory_static_max": m, "memory_dynamic_max": m, "memory_dynamic_min": m, "memory_static_min": m,
        "memory_target": m, "memory_overhead": "0",
        "VCPUs_params": {}, "VCPUs_max": vcpus.to_string(), "VCPUs_at_startup": vcpus.to_string(),
        "actions_after_shutdown": "destroy", "actions_after_reboot": "restart", "actions_after_crash": "restart",
        "PV_bootloader": "", "PV_kernel": "", "PV_ramdisk": "", "PV_args": "", "PV_bootloader_args": "",
        "PV_legacy_args": "", "HVM_boot_policy": "BIOS order", "HVM_boot_params": {"order": "cd"},
        "HVM_shadow_multiplier": 1.0,
        "platform": {"acpi": "1", "apic": "true", "pae": "true", "nx": "true", "viridian": "false",
                     "timeoffset": "0", "device-model": "qemu-upstream-compat"},
        "PCI_bus": "", "other_config": {}, "xenstore_data": {}, "domid": "-1", "domarch": "",
        "metrics": NULL, "guest_metrics": NULL, "recommendations": "", "tags": [], "blocked_operations": {},
        "VBDs": vbds, "VIFs": [], "snapshots": [], "snapshot_of": NULL, "parent": NULL, "children": [],
        "ha_restart_priority": "", "ha_always_run": false, "last_booted_record": "", "last_boot_CPU_flags": {},
        "generation_id": "", "has_vendor_device": false, "current_operations": {}, "allowed_operations": [],
    });
    objects.insert(0, Object { class: "VM".into(), id: vm_id, snapshot: vm });
    let sr = json!({
        "uuid": uuid(), "name_label": "vmvault export", "name_description": "", "VDIs": vdis_ids,
        "virtual_allocation": "0", "physical_utilisation": "0", "physical_size": "0", "type": "user",
        "content_type": "user", "shared": false, "other_config": {}, "sm_config": {}, "tags": [],
    });
    objects.insert(1, Object { class: "SR".into(), id: sr_id, snapshot: sr });
    Packaged { ova: OvaXml { version: OvaXml::default_version(), objects }, vdis, notes }
}

fn vdi_record(name: &str, size: u64, sr: &str, vbd: &str) -> Value {
    json!({
        "uuid": uuid(), "name_label": name, "name_description": "", "SR": sr, "VBDs": [vbd],
        "virtual_size": size.to_string(), "physical_utilisation": size.to_string(), "type": "user",
        "sharable": false, "read_only": false, "other_config": {}, "storage_lock": false, "managed": true,
        "missing": false, "parent": NULL, "location": "", "xenstore_data": {}, "sm_config": {},
        "snapshots": [], "is_a_snapshot": false, "snapshot_of": NULL, "tags": [], "on_boot": "persist",
        "allow_caching": false, "metadata_latest": false, "is_tools_iso": false, "cbt_enabled": false,
        "current_operations": {}, "allowed_operations": [], "crash_dumps": [],
    })
}

fn vbd_record(vm: &str, vdi: &str, stream: &str, i: usize) -> Value {
    // A stream named like a Xen device (xvda, hdb, sdc) keeps its name; others get xvd + letter.
    let device = if ["xvd", "hd", "sd"].iter().any(|p| stream.starts_with(p)) && stream.len() <= 5 {
        stream.to_string()
    } else {
        format!("xvd{}", char::from(b'a' + (i % 26) as u8))
    };
    json!({
        "uuid": uuid(), "VM": vm, "VDI": vdi, "device": device, "userdevice": i.to_string(),
        "bootable": i == 0, "mode": "RW", "type": "Disk", "unpluggable": false, "storage_lock": false,
        "empty": false, "other_config": {}, "status_code": "0", "status_detail": "", "runtime_properties": {},
        "qos_algorithm_type": "", "qos_algorithm_params": {}, "qos_supported_algorithms": [],
        "currently_attached": false, "current_operations": {}, "allowed_operations": [],
    })
}

/// For import: the stream name of each VDI the package carries — the suspend VDI is
/// `memory`; disks take their VBD's device name (`xvda`), else `xvd` + the user device's letter,
/// else the VDI id.
pub fn stream_names(ova: &OvaXml, vdis: &[String]) -> Vec<(String, String, bool)> {
    let vm = ova.vm().ok();
    let suspend = vm.and_then(|v| v.snapshot["suspend_VDI"].as_str()).unwrap_or(NULL);
    let mut out: Vec<(String, String, bool)> = Vec::new();
    for id in vdis {
        let memory = id == suspend || ova.find(id).is_some_and(|o| o.snapshot["type"] == json!("suspend"));
        let vbd = ova.of_class("VBD").find(|b| b.snapshot["VDI"].as_str() == Some(id.as_str()));
        let mut name = if memory {
            "memory".to_string()
        } else if let Some(d) = vbd.and_then(|b| b.snapshot["device"].as_str()).filter(|d| valid_name(d)) {
            d.to_string()
        } else if let Some(u) = vbd.and_then(|b| int_field(&b.snapshot, "userdevice")).filter(|&u| u < 26) {
            format!("xvd{}", char::from(b'a' + u as u8))
        } else {
            id.replace(':', "-")
        };
        while out.iter().any(|(_, n, _)| *n == name) {
            name.push('_');
        }
        out.push((id.clone(), name, memory));
    }
    out
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `meta.xapi` for a snapshot made from a package.
pub fn meta_for(ova: &OvaXml, names: &[(String, String, bool)]) -> Value {
    let mut x = ova.to_json();
    let streams: Map<String, Value> = names.iter().map(|(id, n, _)| (id.clone(), json!(n))).collect();
    x["streams"] = Value::Object(streams);
    json!({ "xapi": x })
}
