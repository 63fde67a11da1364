//! `vmvault forget`: rules per VM, tags, explicit ids, dry runs; what remains restores.
//! Calendar rules (days, weeks, months, time zones) are tested against hand-worked
//! calendars in archive/src/retention.rs, where snapshot times can be chosen.

use crate::util::{noise, Env};

fn ids(v: &serde_json::Value, keep: bool) -> Vec<String> {
    let rows = v["snapshots"].as_array().expect("rows");
    rows.iter().filter(|r| r["keep"] == keep).map(|r| r["id"].as_str().expect("id").to_owned()).collect()
}

#[test]
fn forget_keeps_by_rule_per_vm_and_what_remains_restores() {
    let env = Env::new();
    env.init(&["--time-zone", "Europe/Berlin"]);
    let disk = env.path("disk.img");
    for (vm, n) in [("web", 4), ("db", 2)] {
        for i in 0..n {
            std::fs::write(&disk, noise(i * 7 + vm.len() as u64, 256 << 10)).expect("write");
            let tag = if vm == "web" && i == 0 { "--tag=pinned" } else { "--tag=daily" };
            env.ok(&["backup", "--vm", vm, tag, &format!("xvda={}", disk.display())]);
        }
    }
    let snaps = env.json(&["snapshots"]);
    let all: Vec<String> =
        snaps.as_array().expect("list").iter().map(|s| s["id"].as_str().expect("id").to_owned()).collect();
    assert_eq!(all.len(), 6);

    // No rule: refused, nothing removed.
    let err = env.fails(&["forget"]);
    assert!(err.contains("no --keep-* rule"), "{err}");
    // A dry run plans per VM and removes nothing: keep the newest of each VM, and the pinned one.
    let plan = env.json(&["forget", "--keep-last", "1", "--keep-tag", "pinned", "--dry-run"]);
    assert_eq!(plan["dry_run"], true);
    assert_eq!(ids(&plan, true).len(), 3, "{plan}");
    assert_eq!(ids(&plan, false).len(), 3, "{plan}");
    assert_eq!(env.json(&["snapshots"]).as_array().expect("list").len(), 6, "a dry run removed something");
    let reasons: Vec<String> = plan["snapshots"]
        .as_array()
        .expect("rows")
        .iter()
        .flat_map(|r| r["reasons"].as_array().cloned().unwrap_or_default())
        .map(|r| r.as_str().unwrap_or("").to_owned())
        .collect();
    assert!(
        reasons.contains(&"tag pinned".to_owned()) && reasons.iter().filter(|r| *r == "last 1").count() == 2,
        "{reasons:?}"
    );

    // Only one VM's snapshots, for real.
    let done = env.json(&["forget", "--vm", "web", "--keep-last", "2"]);
    assert_eq!(done["removed"], 2);
    let left = env.json(&["snapshots"]);
    let left: Vec<(String, String)> = left
        .as_array()
        .expect("list")
        .iter()
        .map(|s| (s["vm"].as_str().expect("vm").to_owned(), s["id"].as_str().expect("id").to_owned()))
        .collect();
    assert_eq!(left.iter().filter(|(vm, _)| vm == "web").count(), 2);
    assert_eq!(left.iter().filter(|(vm, _)| vm == "db").count(), 2, "another VM's snapshots were touched");
    for gone in ids(&done, false) {
        assert!(!left.iter().any(|(_, id)| *id == gone));
    }

    // By id; an id and a rule together are refused.
    let db_old = left.iter().find(|(vm, _)| vm == "db").expect("db").1.clone();
    assert!(env.fails(&["forget", "--keep-last", "1", &db_old[..8]]).contains("not both"));
    env.ok(&["forget", &db_old[..8]]);
    let after = env.json(&["snapshots"]);
    assert_eq!(after.as_array().expect("list").len(), 3);

    // Everything that remains restores and the repository checks (data of forgotten
    // snapshots stays until prune, which does not exist yet).
    env.ok(&["check", "--read-data"]);
    std::fs::write(&disk, noise(3 * 7 + 3, 256 << 10)).expect("write");
    let out = env.path("restored.img");
    env.ok(&["restore", "web@latest:xvda", "--target", out.to_str().expect("utf-8")]);
    assert!(std::fs::read(&out).expect("restored") == noise(3 * 7 + 3, 256 << 10));
}
