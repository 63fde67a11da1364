//! XML-RPC `<value>` documents (what ova.xml is) to and from JSON values.
//!
//! Mapping: bare text and `<string>` ↔ JSON string; `<i4>`/`<int>`/`<i8>` and `<double>` →
//! JSON number; `<boolean>` ↔ bool; `<dateTime.iso8601>` and `<base64>` → string (as text);
//! `<array>` ↔ array; `<struct>` ↔ object. XAPI writes 64-bit ints as bare strings, so JSON
//! integers are written that way too; other numbers become `<double>`, null an empty value.

use serde_json::{Map, Value};

/// Deepest nesting accepted (XAPI records nest maps in records in arrays: ~5).
const MAX_DEPTH: usize = 64;

/// Escape text for element content.
pub fn escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            // XML 1.0 cannot carry most control characters even escaped; XAPI strings do not
            // contain them. Replace rather than write an unparsable document.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
}

/// Append `v` as an XML-RPC `<value>`, integers as XAPI writes int64 fields (bare strings).
pub fn write_value(v: &Value, out: &mut String) {
    write_value_as(v, out, false);
}

/// Append `v`, integers as `<i4>` when `i4` (what XAPI writes and expects for OCaml `int`
/// fields, like ova.xml's version record) or as bare strings otherwise.
pub fn write_value_as(v: &Value, out: &mut String, i4: bool) {
    write_styled(v, out, &Style { i4, datetime: &|_| false }, "");
}

/// How [`write_styled`] writes what JSON cannot say.
#[allow(missing_debug_implementations)] // holds a closure
pub struct Style<'a> {
    /// Integers as `<i4>` rather than bare strings.
    pub i4: bool,
    /// Whether the string under this struct member name is a datetime (written as
    /// `<dateTime.iso8601>`, as XAPI does for `snapshot_time` and the like).
    pub datetime: &'a dyn Fn(&str) -> bool,
}

/// Append `v` as an XML-RPC `<value>`; `key` is the struct member name it sits under.
pub fn write_styled(v: &Value, out: &mut String, style: &Style<'_>, key: &str) {
    out.push_str("<value>");
    match v {
        Value::Null => {}
        Value::Bool(b) => out.push_str(if *b { "<boolean>1</boolean>" } else { "<boolean>0</boolean>" }),
        Value::Number(n) if (n.is_i64() || n.is_u64()) && style.i4 => {
            out.push_str("<i4>");
            out.push_str(&n.to_string());
            out.push_str("</i4>");
        }
        Value::Number(n) if n.is_i64() || n.is_u64() => out.push_str(&n.to_string()),
        Value::Number(n) => {
            out.push_str("<double>");
            out.push_str(&n.to_string());
            out.push_str("</double>");
        }
        Value::String(s) if !key.is_empty() && (style.datetime)(key) => {
            out.push_str("<dateTime.iso8601>");
            escape(s, out);
            out.push_str("</dateTime.iso8601>");
        }
        Value::String(s) => escape(s, out),
        Value::Array(a) => {
            out.push_str("<array><data>");
            a.iter().for_each(|x| write_styled(x, out, style, ""));
            out.push_str("</data></array>");
        }
        Value::Object(m) => {
            out.push_str("<struct>");
            for (k, x) in m {
                out.push_str("<member><name>");
                escape(k, out);
                out.push_str("</name>");
                write_styled(x, out, style, k);
                out.push_str("</member>");
            }
            out.push_str("</struct>");
        }
    }
    out.push_str("</value>");
}

/// Parse a document whose root element is `<value>`.
pub fn parse_document(text: &str) -> Result<Value, String> {
    let doc = roxmltree::Document::parse(text).map_err(|e| e.to_string())?;
    let root = doc.root_element();
    if root.tag_name().name() != "value" {
        return Err(format!("root element <{}>, expected <value>", root.tag_name().name()));
    }
    read_value(root, 0)
}

fn elements<'a, 'i>(n: roxmltree::Node<'a, 'i>) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> {
    n.children().filter(roxmltree::Node::is_element)
}

fn text(n: roxmltree::Node<'_, '_>) -> String {
    n.children().filter(|c| c.is_text()).filter_map(|c| c.text()).collect()
}

/// Read one `<value>` element.
pub fn read_value(n: roxmltree::Node<'_, '_>, depth: usize) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err(format!("values nested deeper than {MAX_DEPTH}"));
    }
    let mut kids = elements(n);
    let Some(t) = kids.next() else { return Ok(Value::String(text(n))) };
    if kids.next().is_some() {
        return Err("a <value> with more than one element".into());
    }
    let s = text(t);
    let at = || format!("<{}> {s:?}", t.tag_name().name());
    Ok(match t.tag_name().name() {
        "string" | "dateTime.iso8601" | "base64" => Value::String(s),
        "i4" | "int" | "i8" => Value::from(s.trim().parse::<i64>().map_err(|_| format!("bad integer in {}", at()))?),
        "double" => {
            serde_json::Number::from_f64(s.trim().parse::<f64>().map_err(|_| format!("bad number in {}", at()))?)
                .map_or(Value::Null, Value::Number)
        }
        "boolean" => match s.trim() {
            "1" | "true" => Value::Bool(true),
            "0" | "false" => Value::Bool(false),
            _ => return Err(format!("bad boolean in {}", at())),
        },
        "nil" => Value::Null,
        "array" => {
            let data = elements(t).find(|d| d.tag_name().name() == "data").ok_or("an <array> without <data>")?;
            Value::Array(elements(data).map(|v| read_value(v, depth + 1)).collect::<Result<_, _>>()?)
        }
        "struct" => {
            let mut m = Map::new();
            for member in elements(t) {
                let name =
                    elements(member).find(|x| x.tag_name().name() == "name").ok_or("a <member> without <name>")?;
                let value =
                    elements(member).find(|x| x.tag_name().name() == "value").ok_or("a <member> without <value>")?;
                m.insert(text(name), read_value(value, depth + 1)?);
            }
            Value::Object(m)
        }
        other => return Err(format!("unknown XML-RPC type <{other}>")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_xapi_style_values() {
        let v = serde_json::json!({"a": "x<&>y", "n": "123", "b": true, "arr": ["1", {"k": "v"}], "e": {}, "f": 1.5});
        let mut s = String::new();
        write_value(&v, &mut s);
        assert_eq!(parse_document(&s).unwrap(), v);
        // XAPI's forms: bare strings, <string>, ints, dateTime.
        let x = "<value><struct><member><name>t</name><value><dateTime.iso8601>20240315T10:22:31Z</dateTime.iso8601></value></member>\
                 <member><name>i</name><value><i4>-3</i4></value></member><member><name>s</name><value><string>z</string></value></member></struct></value>";
        assert_eq!(parse_document(x).unwrap(), serde_json::json!({"t": "20240315T10:22:31Z", "i": -3, "s": "z"}));
        assert!(parse_document("<value><i4>x</i4></value>").unwrap_err().contains("bad integer"));
        let deep = "<value><array><data>".repeat(70) + &"</data></array></value>".repeat(70);
        assert!(parse_document(&deep).unwrap_err().contains("deeper"));
    }
}
