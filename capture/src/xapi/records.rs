//! Reading XAPI records (JSON values whose ints may be numbers or decimal strings), and the
//! `meta.xapi` document a backup keeps: the VM and its objects, refs rewritten to `Ref:N`
//! (FORMAT.md §9.3.1).

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

pub const NULL: &str = "OpaqueRef:NULL";

/// A string field ("" when absent).
pub fn s<'a>(rec: &'a Value, k: &str) -> &'a str {
    rec.get(k).and_then(Value::as_str).unwrap_or("")
}

/// A bool field (false when absent).
pub fn flag(rec: &Value, k: &str) -> bool {
    match rec.get(k) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(t)) => t == "true" || t == "1",
        _ => false,
    }
}

/// A ref-set (or string-set) field.
pub fn list(rec: &Value, k: &str) -> Vec<String> {
    rec.get(k)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// Whether a ref points nowhere (`OpaqueRef:NULL`, empty, or an import leftover `Ref:…`).
pub fn is_null(r: &str) -> bool {
    r.is_empty() || r == NULL || r.starts_with("Ref:")
}

/// Objects gathered for `meta.xapi`, in the order added, each with its local id.
#[derive(Debug, Default)]
pub struct Bundle {
    objects: Vec<(String, String, Value)>,
    ids: BTreeMap<String, String>,
}

impl Bundle {
    /// Add an object (by its pool ref); returns its local id. Adding twice is harmless.
    pub fn add(&mut self, class: &str, r: &str, rec: Value) -> String {
        if let Some(id) = self.ids.get(r) {
            return id.clone();
        }
        let id = format!("Ref:{}", self.objects.len());
        self.ids.insert(r.to_string(), id.clone());
        self.objects.push((class.to_string(), r.to_string(), rec));
        id
    }

    /// The local id of a pool ref already added.
    pub fn id_of(&self, r: &str) -> Option<&str> {
        self.ids.get(r).map(String::as_str)
    }

    /// `{"version", "objects", "streams"}`, with every ref between the objects rewritten to
    /// local ids and refs to objects not kept set to `OpaqueRef:NULL`. `streams` maps pool
    /// VDI refs to stream names.
    pub fn to_meta(&self, version: Value, streams: &[(String, String)]) -> Value {
        let objects: Vec<Value> = self
            .objects
            .iter()
            .map(|(class, r, rec)| json!({"class": class, "id": self.ids[r], "snapshot": self.rewrite(rec)}))
            .collect();
        let streams: Map<String, Value> =
            streams.iter().filter_map(|(r, name)| self.id_of(r).map(|id| (id.to_string(), json!(name)))).collect();
        json!({"version": version, "objects": objects, "streams": streams})
    }

    fn rewrite(&self, v: &Value) -> Value {
        match v {
            Value::String(t) if t.starts_with("OpaqueRef:") => json!(self.ids.get(t).map_or(NULL, String::as_str)),
            Value::Array(a) => Value::Array(
                a.iter()
                    .filter(|x| !x.as_str().is_some_and(|t| t.starts_with("OpaqueRef:") && !self.ids.contains_key(t)))
                    .map(|x| self.rewrite(x))
                    .collect(),
            ),
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(k, _)| !k.starts_with("OpaqueRef:")) // maps keyed by task refs (current_operations)
                    .map(|(k, x)| (k.clone(), self.rewrite(x)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_refs_between_kept_objects_only() {
        let mut b = Bundle::default();
        let vm = b.add("VM", "OpaqueRef:a", json!({"VBDs": ["OpaqueRef:b", "OpaqueRef:zz"], "resident_on": "OpaqueRef:host",
                                                    "current_operations": {"OpaqueRef:task": "export"}, "memory_static_max": "1024"}));
        let vbd = b.add("VBD", "OpaqueRef:b", json!({"VM": "OpaqueRef:a", "VDI": "OpaqueRef:c"}));
        let vdi = b.add("VDI", "OpaqueRef:c", json!({"VBDs": ["OpaqueRef:b"]}));
        assert_eq!(b.add("VM", "OpaqueRef:a", json!({})), vm);
        let m = b.to_meta(json!({}), &[("OpaqueRef:c".into(), "xvda".into())]);
        assert_eq!(m["objects"][0]["snapshot"]["VBDs"], json!([vbd]));
        assert_eq!(m["objects"][0]["snapshot"]["resident_on"], json!(NULL));
        assert_eq!(m["objects"][0]["snapshot"]["current_operations"], json!({}));
        assert_eq!(m["objects"][1]["snapshot"]["VDI"], json!(vdi));
        assert_eq!(m["streams"], json!({vdi: "xvda"}));
        assert_eq!(disk_formats::xva::int_field(&m["objects"][0]["snapshot"], "memory_static_max"), Some(1024));
    }
}
