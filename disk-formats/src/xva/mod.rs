//! XVA, XenServer / XCP-ng's VM package: a tar of `ova.xml` (the VM's objects as an XML-RPC
//! value) and each VDI's data as 1 MiB chunks `Ref:N/NNNNNNNN`, each followed by its XXH64
//! checksum member `Ref:N/NNNNNNNN.xxhash`.
//!
//! [`OvaXml`] is the metadata; [`write()`] streams a package; [`Xva::open`] checks one and
//! shows each VDI as a device reading straight from the package file.

pub mod objects;
mod read;
mod write;
pub mod xmlrpc;

use serde_json::{json, Map, Value};

pub use read::{Xva, XvaDisk};
pub use write::write;

use crate::{Error, Result};

/// Chunk size of disk data.
pub const CHUNK: u64 = 1 << 20;

/// One exported object: its class, its export-local id (`Ref:N`) and its record.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    pub class: String,
    pub id: String,
    pub snapshot: Value,
}

/// The contents of `ova.xml`.
#[derive(Clone, Debug, PartialEq)]
pub struct OvaXml {
    pub version: Value,
    pub objects: Vec<Object>,
}

impl OvaXml {
    /// A version record importable by any XAPI since 2010 (XO writes the same low version;
    /// importers refuse versions newer than their own).
    pub fn default_version() -> Value {
        json!({
            "hostname": "vmvault", "date": "", "product_version": "", "product_brand": "vmvault",
            "build_number": "", "xapi_major": 1, "xapi_minor": 20, "export_vsn": 2,
        })
    }

    /// The document: the version record's integers as `<i4>` (XAPI reads them as OCaml
    /// ints), record integers as bare strings (XAPI's int64 encoding).
    pub fn to_xml(&self) -> String {
        let mut s = String::with_capacity(64 << 10);
        s.push_str("<value><struct><member><name>version</name>");
        xmlrpc::write_value_as(&self.version, &mut s, true);
        s.push_str("</member><member><name>objects</name><value><array><data>");
        for o in &self.objects {
            let v = json!({"class": o.class, "id": o.id, "snapshot": o.snapshot});
            xmlrpc::write_value(&v, &mut s);
        }
        s.push_str("</data></array></value></member></struct></value>");
        s
    }

    pub fn parse(text: &str) -> Result<Self> {
        let bad = |d: String| Error::corrupt("ova.xml", 0, d);
        let v = xmlrpc::parse_document(text).map_err(bad)?;
        Self::from_json(&v).map_err(bad)
    }

    /// From `{"version": …, "objects": [{class, id, snapshot}]}`.
    pub fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let objects = v["objects"].as_array().ok_or("no \"objects\" array")?;
        let objects = objects
            .iter()
            .map(|o| {
                let field = |k: &str| o[k].as_str().map(str::to_string).ok_or(format!("an object without \"{k}\""));
                let snapshot = o.get("snapshot").filter(|s| s.is_object()).ok_or("an object without a record")?;
                Ok(Object { class: field("class")?, id: field("id")?, snapshot: snapshot.clone() })
            })
            .collect::<std::result::Result<Vec<_>, String>>()?;
        Ok(OvaXml { version: v.get("version").cloned().unwrap_or(Value::Null), objects })
    }

    pub fn to_json(&self) -> Value {
        let objects: Vec<Value> =
            self.objects.iter().map(|o| json!({"class": o.class, "id": o.id, "snapshot": o.snapshot})).collect();
        json!({"version": self.version, "objects": objects})
    }

    pub fn find(&self, id: &str) -> Option<&Object> {
        self.objects.iter().find(|o| o.id == id)
    }

    pub fn of_class<'a>(&'a self, class: &'a str) -> impl Iterator<Item = &'a Object> + 'a {
        self.objects.iter().filter(move |o| o.class == class)
    }

    /// The one VM (packages of one VM are what export and import deal in).
    pub fn vm(&self) -> Result<&Object> {
        let mut vms = self.of_class("VM").filter(|o| o.snapshot["is_control_domain"] != json!(true));
        match (vms.next(), vms.next()) {
            (Some(vm), None) => Ok(vm),
            (None, _) => Err(Error::corrupt("ova.xml", 0, "no VM object")),
            (Some(_), Some(_)) => Err(Error::Unsupported("an XVA holding more than one VM".into())),
        }
    }

    /// VDIs whose data the package carries, by XAPI's rule: VDIs of non-CD VBDs of the VM
    /// (in SRs whose content type is not `iso`), and the VM's suspend VDI.
    pub fn streamed_vdis(&self) -> Result<Vec<&Object>> {
        let vm = self.vm()?;
        let mut out: Vec<&Object> = Vec::new();
        for vbd in self.of_class("VBD").filter(|b| b.snapshot["VM"] == json!(vm.id)) {
            let r = &vbd.snapshot;
            if r["type"] == json!("CD") || r["empty"] == json!(true) {
                continue;
            }
            if let Some(vdi) = r["VDI"].as_str().and_then(|id| self.find(id)).filter(|o| o.class == "VDI") {
                let iso = vdi.snapshot["SR"]
                    .as_str()
                    .and_then(|sr| self.find(sr))
                    .is_some_and(|sr| sr.snapshot["content_type"] == json!("iso"));
                if !iso && !out.iter().any(|o| o.id == vdi.id) {
                    out.push(vdi);
                }
            }
        }
        if let Some(s) = vm.snapshot["suspend_VDI"].as_str().and_then(|id| self.find(id)).filter(|o| o.class == "VDI") {
            if !out.iter().any(|o| o.id == s.id) {
                out.push(s);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

/// A record field holding an integer, as XAPI writes it (a string of digits) or as JSON-RPC
/// does (a number).
pub fn int_field(record: &Value, key: &str) -> Option<u64> {
    match &record[key] {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// An empty map, for record fields.
pub fn empty_map() -> Value {
    Value::Object(Map::new())
}
