//! kill -9 at several points of a backup: the repository stays valid, the next backup
//! completes, reuses what the killed one stored, and restores byte-identically.

use std::time::Duration;

use crate::util::*;

#[test]
fn killed_backups_leave_a_valid_repository() {
    let env = Env::new();
    env.init(&["--chunker", "fixed:256K"]);
    let disk = env.path("disk.img");
    let data = noise(11, 96 << 20);
    write_image(&disk, 160 << 20, &[(8 << 20, &data)]);

    let mut reused_checked = false;
    for delay_ms in [30u64, 120, 300, 700] {
        let mut child =
            env.cmd().args(["backup", "--vm", "crash", "xvda=disk.img", "--parent", "none"]).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();

        // The dead process's lock is stale, so check runs; damage would be an error.
        let report = env.json(&["check", "--read-data"]);
        let errors: Vec<_> =
            report["problems"].as_array().unwrap().iter().filter(|p| p["severity"] == "error").collect();
        assert!(errors.is_empty(), "after a kill at {delay_ms} ms: {errors:?}");
        // Every snapshot that exists restores identically.
        for s in env.json(&["snapshots"]).as_array().unwrap() {
            let id = s["id"].as_str().unwrap();
            env.ok(&["restore", &format!("{}:xvda", &id[..16]), "--target", "r.raw", "--overwrite"]);
            assert!(same_file(&disk, &env.path("r.raw")), "snapshot {id} after a kill at {delay_ms} ms");
        }
        let unindexed = report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["detail"].as_str().unwrap().contains("no index entry points"));
        if unindexed && !reused_checked {
            // The next backup adopts the orphan packs: it stores less than everything.
            let out = env.json(&["backup", "--vm", "reuse", "xvda=disk.img"]);
            let new = out["snapshot"]["summary"]["new_bytes"].as_u64().unwrap();
            assert!(new < data.len() as u64, "a backup after a kill re-stored everything ({new} bytes)");
            reused_checked = true;
        }
    }
    let packs_exist = std::fs::read_dir(env.repo().join("data")).unwrap().next().is_some();
    let out = env.json(&["backup", "--vm", "crash", "xvda=disk.img"]);
    if packs_exist {
        assert!(out["snapshot"]["summary"]["new_bytes"].as_u64().unwrap() < data.len() as u64);
    }
    env.ok(&["restore", "crash@latest:xvda", "--target", "final.raw"]);
    assert!(same_file(&disk, &env.path("final.raw")));
    env.ok(&["check", "--read-data"]);
    // Killed processes leave their lock files; unlock removes them (they are stale: the
    // processes are gone), and nothing else.
    let out = env.ok(&["unlock"]);
    assert!(out.contains("locks removed"), "{out}");
    assert_eq!(std::fs::read_dir(env.repo().join("locks")).unwrap().count(), 0);
}
