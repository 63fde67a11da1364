//! The two encodings of a call (reference §1.2, §1.10): JSON-RPC 2.0 on `/jsonrpc`, or
//! XML-RPC on `/`.

use serde_json::{json, Value};

use crate::error::{Error, Result};
use disk_formats::xva::xmlrpc;

/// Which encoding to speak. JSON-RPC is the default (ints as numbers, no XML parsing);
/// XML-RPC works with every XAPI version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    JsonRpc,
    XmlRpc,
}

/// (path, content type, body) of a call.
pub fn encode(p: Protocol, method: &str, args: &[Value]) -> (&'static str, &'static str, String) {
    match p {
        Protocol::JsonRpc => {
            let body = json!({"jsonrpc": "2.0", "method": method, "params": args, "id": 1});
            ("/jsonrpc", "application/json", body.to_string())
        }
        Protocol::XmlRpc => {
            let mut body = String::from("<?xml version=\"1.0\"?><methodCall><methodName>");
            xmlrpc::escape(method, &mut body);
            body.push_str("</methodName><params>");
            for a in args {
                body.push_str("<param>");
                xmlrpc::write_value(a, &mut body);
                body.push_str("</param>");
            }
            body.push_str("</params></methodCall>");
            ("/", "text/xml", body)
        }
    }
}

fn failure(method: &str, desc: Vec<String>) -> Error {
    let mut it = desc.into_iter();
    let code = it.next().unwrap_or_else(|| "UNKNOWN".into());
    Error::Api { method: method.into(), code, params: it.collect() }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_str().map_or_else(|| x.to_string(), String::from)).collect())
        .unwrap_or_default()
}

/// The result of a call, or XAPI's failure as [`Error::Api`].
pub fn decode(p: Protocol, method: &str, text: &str) -> Result<Value> {
    let bad = |d: String| Error::protocol(format!("{method}: the pool's answer"), d);
    match p {
        Protocol::JsonRpc => {
            let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON-RPC ({e})")))?;
            match v.get("error") {
                Some(Value::Null) | None => v.get("result").cloned().ok_or_else(|| bad("no result".into())),
                Some(Value::Array(_)) => Err(failure(method, strings(&v["error"]))),
                Some(e) => {
                    let code = e["message"].as_str().unwrap_or("UNKNOWN").to_string();
                    Err(failure(method, std::iter::once(code).chain(strings(&e["data"])).collect()))
                }
            }
        }
        Protocol::XmlRpc => {
            let doc = roxmltree::Document::parse(text).map_err(|e| bad(format!("not XML ({e})")))?;
            let value = doc
                .descendants()
                .find(|n| n.has_tag_name("param"))
                .and_then(|p| p.children().find(|c| c.has_tag_name("value")))
                .ok_or_else(|| bad("no <param><value>".into()))?;
            let v = xmlrpc::read_value(value, 0).map_err(bad)?;
            match v["Status"].as_str() {
                Some("Success") => Ok(v.get("Value").cloned().unwrap_or(Value::Null)),
                Some("Failure") => Err(failure(method, strings(&v["ErrorDescription"]))),
                _ => Err(bad("no Status".into())),
            }
        }
    }
}
