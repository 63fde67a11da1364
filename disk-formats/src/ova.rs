//! OVA packages: a tar of the OVF descriptor, its SHA-256 manifest, and one stream-optimized
//! VMDK per disk (DSP0243's order: descriptor first, then manifest, then the files in the
//! order of the References section).
//!
//! The VMDKs are written to spool files first: their sizes go in the tar headers and the
//! descriptor, their digests in the manifest, and all three come before the disks' bytes.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::Path;

use blockdev::BlockDev;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::IoContext;
use crate::out::{write_zeros, Output};
use crate::tarball::{now, pad, write_end, write_header, write_member};
use crate::xva::xmlrpc::escape;
use crate::xva::{int_field, OvaXml};
use crate::Result;

pub const VMDK_FORMAT: &str = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";

/// What the descriptor says about the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvfVm {
    pub name: String,
    pub description: String,
    pub vcpus: u64,
    pub memory_mib: u64,
    pub uefi: bool,
    /// One network name per NIC, in device order.
    pub nics: Vec<String>,
    pub disks: Vec<OvfDisk>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvfDisk {
    pub file: String,
    pub capacity: u64,
    /// Bytes of the file in the package.
    pub size: u64,
}

impl OvfVm {
    /// From a VM's XAPI records (see [`crate::xva::objects`]); disks are given in order.
    pub fn from_records(ova: &OvaXml, disks: Vec<OvfDisk>) -> Self {
        let vm = ova.vm().map(|v| v.snapshot.clone()).unwrap_or_default();
        let mut vifs: Vec<(u64, String)> = ova
            .of_class("VIF")
            .filter(|v| ova.vm().is_ok_and(|vm| v.snapshot["VM"] == json!(vm.id)))
            .map(|v| {
                let net = v.snapshot["network"].as_str().and_then(|n| ova.find(n));
                let name = net.and_then(|n| n.snapshot["name_label"].as_str()).unwrap_or("default").to_string();
                (int_field(&v.snapshot, "device").unwrap_or(u64::MAX), name)
            })
            .collect();
        vifs.sort();
        OvfVm {
            name: vm["name_label"].as_str().unwrap_or("vm").to_string(),
            description: vm["name_description"].as_str().unwrap_or("").to_string(),
            vcpus: int_field(&vm, "VCPUs_max").unwrap_or(1).max(1),
            memory_mib: (int_field(&vm, "memory_static_max").unwrap_or(1 << 30) >> 20).max(4),
            uefi: vm["HVM_boot_params"]["firmware"] == json!("uefi"),
            nics: vifs.into_iter().map(|v| v.1).collect(),
            disks,
        }
    }
}

fn x(s: &str) -> String {
    let mut out = String::new();
    escape(s, &mut out);
    out
}

/// The OVF 1.x descriptor: disks on one LSI Logic SCSI controller, E1000 NICs.
pub fn descriptor(vm: &OvfVm) -> String {
    let mut s = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Envelope xmlns=\"http://schemas.dmtf.org/ovf/envelope/1\" \
         xmlns:ovf=\"http://schemas.dmtf.org/ovf/envelope/1\" \
         xmlns:rasd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData\" \
         xmlns:vssd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData\" \
         xmlns:vmw=\"http://www.vmware.com/schema/ovf\">\n  <References>\n",
    );
    for (i, d) in vm.disks.iter().enumerate() {
        s += &format!("    <File ovf:id=\"file{}\" ovf:href=\"{}\" ovf:size=\"{}\"/>\n", i + 1, x(&d.file), d.size);
    }
    s += "  </References>\n  <DiskSection>\n    <Info>Virtual disks</Info>\n";
    for (i, d) in vm.disks.iter().enumerate() {
        s += &format!(
            "    <Disk ovf:diskId=\"vmdisk{n}\" ovf:fileRef=\"file{n}\" ovf:capacity=\"{}\" ovf:format=\"{VMDK_FORMAT}\"/>\n",
            d.capacity,
            n = i + 1
        );
    }
    s += "  </DiskSection>\n  <NetworkSection>\n    <Info>Networks</Info>\n";
    let mut nets: Vec<&String> = vm.nics.iter().collect();
    nets.sort();
    nets.dedup();
    for n in &nets {
        s += &format!("    <Network ovf:name=\"{}\"><Description>{}</Description></Network>\n", x(n), x(n));
    }
    s += &format!(
        "  </NetworkSection>\n  <VirtualSystem ovf:id=\"{n}\">\n    <Info>A virtual machine</Info>\n    <Name>{n}</Name>\n\
         \x20   <AnnotationSection><Info>Description</Info><Annotation>{}</Annotation></AnnotationSection>\n\
         \x20   <OperatingSystemSection ovf:id=\"1\"><Info>Guest OS</Info></OperatingSystemSection>\n\
         \x20   <VirtualHardwareSection>\n      <Info>Virtual hardware</Info>\n      <System>\n\
         \x20       <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>\n        <vssd:InstanceID>0</vssd:InstanceID>\n\
         \x20       <vssd:VirtualSystemIdentifier>{n}</vssd:VirtualSystemIdentifier>\n\
         \x20       <vssd:VirtualSystemType>vmx-07</vssd:VirtualSystemType>\n      </System>\n",
        x(&vm.description),
        n = x(&vm.name)
    );
    let item = |fields: &[(&str, String)]| {
        let mut f: Vec<&(&str, String)> = fields.iter().collect();
        f.sort_by_key(|p| p.0);
        let body: String = f.iter().map(|(k, v)| format!("<rasd:{k}>{v}</rasd:{k}>")).collect();
        format!("      <Item>{body}</Item>\n")
    };
    s += &item(&[
        ("ElementName", format!("{} virtual CPU(s)", vm.vcpus)),
        ("InstanceID", "1".into()),
        ("ResourceType", "3".into()),
        ("VirtualQuantity", vm.vcpus.to_string()),
        ("AllocationUnits", "hertz * 10^6".into()),
    ]);
    s += &item(&[
        ("AllocationUnits", "byte * 2^20".into()),
        ("ElementName", format!("{} MB of memory", vm.memory_mib)),
        ("InstanceID", "2".into()),
        ("ResourceType", "4".into()),
        ("VirtualQuantity", vm.memory_mib.to_string()),
    ]);
    s += &item(&[
        ("Address", "0".into()),
        ("ElementName", "SCSI controller 0".into()),
        ("InstanceID", "3".into()),
        ("ResourceSubType", "lsilogic".into()),
        ("ResourceType", "6".into()),
    ]);
    let mut id = 4;
    for (i, _) in vm.disks.iter().enumerate() {
        s += &item(&[
            ("AddressOnParent", i.to_string()),
            ("ElementName", format!("Hard disk {}", i + 1)),
            ("HostResource", format!("ovf:/disk/vmdisk{}", i + 1)),
            ("InstanceID", id.to_string()),
            ("Parent", "3".into()),
            ("ResourceType", "17".into()),
        ]);
        id += 1;
    }
    for (i, n) in vm.nics.iter().enumerate() {
        s += &item(&[
            ("AddressOnParent", (7 + i).to_string()),
            ("AutomaticAllocation", "true".into()),
            ("Connection", x(n)),
            ("ElementName", format!("Network adapter {}", i + 1)),
            ("InstanceID", id.to_string()),
            ("ResourceSubType", "E1000".into()),
            ("ResourceType", "10".into()),
        ]);
        id += 1;
    }
    if vm.uefi {
        s += "      <vmw:Config ovf:required=\"false\" vmw:key=\"firmware\" vmw:value=\"efi\"/>\n";
    }
    s += "    </VirtualHardwareSection>\n  </VirtualSystem>\n</Envelope>\n";
    s
}

/// A writer that hashes what passes through.
struct Hashing<W> {
    inner: W,
    sha: Sha256,
    n: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.sha.update(&b[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Output for Hashing<W> {
    fn zeros(&mut self, n: u64) -> io::Result<()> {
        write_zeros(self, n)
    }
}

/// A file-name-safe form of `s`.
pub fn file_stem(s: &str) -> String {
    let t: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    let t = t.trim_start_matches('.').to_string();
    if t.is_empty() {
        "vm".into()
    } else {
        t
    }
}

/// Write the OVA for the VM in `ova` with `disks` (in order) to `out`, spooling VMDKs in
/// `spool_dir`. Returns the bytes written.
pub fn write(ova: &OvaXml, disks: &[&dyn BlockDev], out: &mut dyn Write, spool_dir: &Path) -> Result<u64> {
    let base = file_stem(ova.vm().ok().and_then(|v| v.snapshot["name_label"].as_str()).unwrap_or("vm"));
    let mut spooled: Vec<(File, OvfDisk, String)> = Vec::new();
    for (i, dev) in disks.iter().enumerate() {
        let file = format!("{base}-disk{}.vmdk", i + 1);
        let tmp =
            tempfile::tempfile_in(spool_dir).ctx(|| format!("creating a spool file in {}", spool_dir.display()))?;
        let mut h = Hashing { inner: BufWriter::with_capacity(1 << 20, tmp), sha: Sha256::new(), n: 0 };
        crate::vmdk::write_stream_optimized(*dev, &mut h, &file)?;
        h.flush().ctx(|| "writing a spool file".into())?;
        let digest = hex::encode(h.sha.finalize());
        let mut tmp = h.inner.into_inner().map_err(|e| crate::Error::io("writing a spool file", e.into_error()))?;
        tmp.rewind().ctx(|| "rewinding a spool file".into())?;
        spooled.push((tmp, OvfDisk { file, capacity: dev.len(), size: h.n }, digest));
    }
    let vm = OvfVm::from_records(ova, spooled.iter().map(|s| s.1.clone()).collect());
    let ovf = descriptor(&vm);
    let mtime = now();
    let ovf_name = format!("{base}.ovf");
    let mut mf = format!("SHA256({ovf_name})= {}\n", hex::encode(Sha256::digest(ovf.as_bytes())));
    for (_, d, digest) in &spooled {
        mf += &format!("SHA256({})= {digest}\n", d.file);
    }
    let mut n = write_member(out, &ovf_name, ovf.as_bytes(), mtime)?;
    n += write_member(out, &format!("{base}.mf"), mf.as_bytes(), mtime)?;
    for (tmp, d, _) in spooled {
        n += write_header(out, &d.file, d.size, mtime)?;
        let copied = io::copy(&mut BufReader::with_capacity(1 << 20, tmp).take(d.size), out)
            .ctx(|| format!("copying {} into the OVA", d.file))?;
        if copied != d.size {
            return Err(crate::Error::io("copying a spool file", io::ErrorKind::UnexpectedEof.into()));
        }
        n += d.size + pad(out, d.size)?;
    }
    n += write_end(out)?;
    out.flush().ctx(|| "writing the OVA".into())?;
    Ok(n)
}
