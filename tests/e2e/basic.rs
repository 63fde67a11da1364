//! Backup, list, restore, cat, check and stats through the binary.

use crate::util::*;

fn sample_disk(env: &Env, name: &str, seed: u64) -> std::path::PathBuf {
    let p = env.path(name);
    let text = "a log line that repeats\n".repeat(100_000);
    write_image(
        &p,
        48 << 20,
        &[(1 << 20, &noise(seed, 5 << 20)), (20 << 20, text.as_bytes()), ((48 << 20) - 4096, &[9u8; 4096])],
    );
    p
}

#[test]
fn backup_restore_cat_round_trip() {
    let env = Env::new();
    env.init(&[]);
    let disk = sample_disk(&env, "disk.img", 1);
    let mem = env.path("mem.img");
    write_image(&mem, 8 << 20, &[(0, &noise(2, 1 << 20))]);
    std::fs::write(env.path("vm.json"), r#"{"name_label":"web01","VCPUs_max":2}"#).unwrap();
    let out = env.json(&[
        "backup",
        "--vm",
        "web01",
        "xvda=disk.img",
        "--memory",
        "mem.img",
        "--meta",
        "vm.json",
        "--tag",
        "prod",
    ]);
    let id = out["id"].as_str().unwrap().to_string();
    assert_eq!(out["snapshot"]["meta"]["VCPUs_max"], 2);
    assert_eq!(out["snapshot"]["streams"].as_array().unwrap().len(), 2);

    env.ok(&["restore", "web01@latest:xvda", "--target", "out.raw"]);
    assert!(same_file(&disk, &env.path("out.raw")));
    env.ok(&["restore", &format!("{}:memory", &id[..8]), "--target", "mem.out"]);
    assert!(same_file(&mem, &env.path("mem.out")));
    // The restore is sparse: far fewer blocks than the logical size.
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(env.path("out.raw")).unwrap().blocks() * 512;
    assert!(blocks < 16 << 20, "restore allocated {blocks} bytes");

    let out = env.cmd().args(["cat", "web01@latest:xvda"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, std::fs::read(&disk).unwrap());

    let list = env.json(&["snapshots", "--vm", "web01"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["tags"][0], "prod");
    env.ok(&["check", "--read-data"]);
}

#[test]
fn second_backup_stores_only_changes_and_both_restore() {
    let env = Env::new();
    env.init(&[]);
    let disk = sample_disk(&env, "disk.img", 1);
    env.ok(&["backup", "--vm", "web01", "xvda=disk.img"]);
    let day0 = std::fs::read(&disk).unwrap();
    // Change 3 blocks in place.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(&noise(7, 12288), 2 << 20).unwrap();
    let second = env.json(&["backup", "--vm", "web01", "xvda=disk.img"]);
    let new = second["snapshot"]["summary"]["new_bytes"].as_u64().unwrap();
    assert!(new <= 1 << 20, "only the changed 1 MiB chunk is new, got {new}");
    assert!(second["snapshot"]["parent"].is_string());

    let list = env.json(&["snapshots"]);
    let first_id = list[0]["id"].as_str().unwrap();
    env.ok(&["restore", &format!("{}:xvda", &first_id[..12]), "--target", "day0.raw"]);
    assert_eq!(std::fs::read(env.path("day0.raw")).unwrap(), day0);
    env.ok(&["restore", "web01@latest:xvda", "--target", "day1.raw"]);
    assert!(same_file(&disk, &env.path("day1.raw")));
    let stats = env.json(&["stats"]);
    // Two snapshots of the same data extents, one 1 MiB chunk different between them.
    let logical = stats["logical_data_bytes"].as_u64().unwrap();
    assert_eq!(stats["unique_bytes"].as_u64().unwrap(), logical / 2 + (1 << 20), "{stats}");
}

#[test]
fn changed_ranges_read_only_what_changed() {
    let env = Env::new();
    env.init(&[]);
    let disk = sample_disk(&env, "disk.img", 3);
    env.ok(&["backup", "--vm", "db", "xvda=disk.img"]);
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(&noise(9, 4096), (3 << 20) + 8192).unwrap();
    f.write_all_at(&noise(10, 4096), 30 << 20).unwrap(); // was a hole
    std::fs::write(env.path("changes.txt"), format!("{} 4096\n{} 4096\n", (3 << 20) + 8192, 30 << 20)).unwrap();
    let out = env.json(&["backup", "--vm", "db", "xvda=disk.img", "--changed", "xvda=changes.txt"]);
    let read = out["snapshot"]["summary"]["read_bytes"].as_u64().unwrap();
    assert!(read <= 2 << 20, "read {read} bytes; only the two changed chunks should be read");
    env.ok(&["restore", "db@latest:xvda", "--target", "out.raw"]);
    assert!(same_file(&disk, &env.path("out.raw")));
}

#[test]
fn errors_are_one_clear_line() {
    let env = Env::new();
    let err = env.fails(&["snapshots"]);
    assert!(err.contains("not a vmvault repository"), "{err}");
    env.init(&[]);
    let err = env.fails(&["init", "--kdf-memory-kib", "256"]);
    assert!(err.contains("already holds a repository"), "{err}");
    let out = env.cmd().args(["snapshots"]).env("VMVAULT_PASSWORD", "wrong").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"));
    let err = env.fails(&["restore", "nosuchvm@latest:xvda", "--target", "x"]);
    assert!(err.contains("no snapshot of VM"), "{err}");
    let err = env.fails(&["backup", "--vm", "a", "xvda=missing.img"]);
    assert!(err.contains("missing.img"), "{err}");
}

#[test]
fn keys_add_passwd_remove() {
    let env = Env::new();
    env.init(&[]);
    let out = env
        .cmd()
        .args(["key", "add", "--kdf-memory-kib", "256"])
        .env("VMVAULT_NEW_PASSWORD", "second")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let keys = env.json(&["key", "list"]);
    assert_eq!(keys.as_array().unwrap().len(), 2);
    // The second passphrase opens the repository too.
    let out = env.cmd().args(["snapshots"]).env("VMVAULT_PASSWORD", "second").output().unwrap();
    assert!(out.status.success());
    // Change the first passphrase; the old one stops working.
    let out = env
        .cmd()
        .args(["key", "passwd", "--kdf-memory-kib", "256"])
        .env("VMVAULT_NEW_PASSWORD", "third")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    env.fails(&["snapshots"]);
    let out = env.cmd().args(["snapshots"]).env("VMVAULT_PASSWORD", "third").output().unwrap();
    assert!(out.status.success());
    // Remove the "second" key while opened with "third"; the last key cannot go.
    let run = |pass: &str, args: &[&str]| env.cmd().args(args).env("VMVAULT_PASSWORD", pass).output().unwrap();
    let keys: serde_json::Value = serde_json::from_slice(&run("third", &["key", "list", "--json"]).stdout).unwrap();
    let other =
        keys.as_array().unwrap().iter().find(|k| k["current"] == false).unwrap()["id"].as_str().unwrap().to_string();
    assert!(run("third", &["key", "remove", &other[..8]]).status.success());
    assert!(!run("second", &["snapshots"]).status.success(), "removed key still opens the repository");
    let current =
        keys.as_array().unwrap().iter().find(|k| k["current"] == true).unwrap()["id"].as_str().unwrap().to_string();
    let out = run("third", &["key", "remove", &current]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("in use"));
}
