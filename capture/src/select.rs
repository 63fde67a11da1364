//! Which VMs a run backs up ("smart backup", re-evaluated at every run): explicit VMs,
//! name globs, tags (any or all), power states, exclusion tags. Templates, snapshots and
//! control domains are never selected.

use serde_json::Value;

use crate::error::Result;
use crate::xapi::records::{flag, list, s};
use crate::xapi::Client;

/// A selection rule. Empty lists do not restrict; `all` selects every VM the other rules
/// let through.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Selection {
    /// VMs by name or uuid.
    pub vms: Vec<String>,
    /// Name patterns (`*` and `?`).
    pub names: Vec<String>,
    /// VMs carrying any of these tags (all of them with `all_tags`).
    pub tags: Vec<String>,
    pub all_tags: bool,
    /// VMs with any of these tags are left out.
    pub exclude_tags: Vec<String>,
    /// Only VMs in these power states (`running`, `halted`, `suspended`, `paused`).
    pub power_states: Vec<String>,
    pub all: bool,
}

/// The VMs picked, and why others were not.
#[derive(Debug, Default)]
pub struct Picked {
    /// (ref, record), in name order.
    pub vms: Vec<(String, Value)>,
    /// Named VMs that do not exist.
    pub missing: Vec<String>,
    /// (name, reason) of VMs the rules matched but excluded.
    pub skipped: Vec<(String, String)>,
}

/// Shell-style match of `*` and `?`.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl Selection {
    /// Whether the rule selects anything at all (a run without a rule is a usage error).
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty() && self.names.is_empty() && self.tags.is_empty() && !self.all
    }

    fn matches(&self, rec: &Value) -> bool {
        let (name, uuid) = (s(rec, "name_label"), s(rec, "uuid"));
        let tags = list(rec, "tags");
        let has = |t: &String| tags.contains(t);
        let by_tag =
            !self.tags.is_empty() && if self.all_tags { self.tags.iter().all(has) } else { self.tags.iter().any(has) };
        self.all
            || self.vms.iter().any(|v| v == name || v == uuid)
            || self.names.iter().any(|g| glob(g, name))
            || by_tag
    }

    /// Apply the rule to the pool's VMs now.
    pub fn pick(&self, client: &Client) -> Result<Picked> {
        let all = client.call("VM.get_all_records", &[])?;
        let mut picked = Picked::default();
        let candidates: Vec<(String, Value)> = all
            .as_object()
            .map(|m| m.iter().map(|(r, v)| (r.clone(), v.clone())).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, v)| !flag(v, "is_a_template") && !flag(v, "is_a_snapshot") && !flag(v, "is_control_domain"))
            .collect();
        for want in &self.vms {
            if !candidates.iter().any(|(_, v)| s(v, "name_label") == want || s(v, "uuid") == want) {
                picked.missing.push(want.clone());
            }
        }
        for (r, v) in candidates {
            if !self.matches(&v) {
                continue;
            }
            let name = s(&v, "name_label").to_string();
            let tags = list(&v, "tags");
            if let Some(t) = self.exclude_tags.iter().find(|t| tags.contains(t)) {
                picked.skipped.push((name, format!("tagged {t}")));
                continue;
            }
            let power = s(&v, "power_state").to_lowercase();
            if !self.power_states.is_empty() && !self.power_states.iter().any(|p| p.to_lowercase() == power) {
                picked.skipped.push((name, format!("{power}, not {}", self.power_states.join(" or "))));
                continue;
            }
            picked.vms.push((r, v));
        }
        picked.vms.sort_by(|a, b| s(&a.1, "name_label").cmp(s(&b.1, "name_label")));
        Ok(picked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn globs() {
        assert!(glob("web*", "web01"));
        assert!(glob("*01", "web01"));
        assert!(glob("w?b*1", "web01"));
        assert!(!glob("db*", "web01"));
        assert!(glob("*", ""));
        assert!(!glob("?", ""));
    }

    #[test]
    fn rules() {
        let vm = json!({"name_label": "web01", "uuid": "u1", "tags": ["prod", "web"]});
        let sel = |f: fn(&mut Selection)| {
            let mut s = Selection::default();
            f(&mut s);
            s.matches(&vm)
        };
        assert!(sel(|s| s.tags = vec!["prod".into(), "x".into()]));
        assert!(!sel(|s| {
            s.tags = vec!["prod".into(), "x".into()];
            s.all_tags = true;
        }));
        assert!(sel(|s| s.vms = vec!["u1".into()]));
        assert!(sel(|s| s.names = vec!["web*".into()]));
        assert!(!sel(|_| {}));
    }
}
