//! `vmvault prune` as separate processes: beside running backups, and killed with SIGKILL at
//! random points. Every snapshot that exists afterwards restores byte-identically and
//! `check --read-data` finds no error.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::util::*;

/// Deterministic pseudo-random numbers (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// A disk of 64 KiB blocks, half drawn from a small pool (so snapshots share chunks), half
/// unique (so forgetting one leaves dead chunks in partly used packs).
fn disk(rng: &mut Rng, pool: &[Vec<u8>], blocks: usize) -> Vec<u8> {
    (0..blocks)
        .flat_map(|_| match rng.next(2) {
            0 => pool[rng.next(pool.len() as u64) as usize].clone(),
            _ => noise(rng.next(u64::MAX), 64 << 10),
        })
        .collect()
}

fn assert_clean_and_restorable(env: &Env, images: &HashMap<String, PathBuf>, when: &str) -> usize {
    let report = env.json(&["check", "--read-data"]);
    let errors: Vec<_> = report["problems"].as_array().unwrap().iter().filter(|p| p["severity"] == "error").collect();
    assert!(errors.is_empty(), "{when}: {errors:#?}");
    let snaps = env.json(&["snapshots"]);
    let snaps = snaps.as_array().unwrap();
    for s in snaps {
        let id = s["id"].as_str().unwrap();
        env.ok(&["restore", &format!("{}:xvda", &id[..16]), "--target", "r.raw", "--overwrite"]);
        let src = images.get(id).unwrap_or_else(|| panic!("{when}: snapshot {id} has no source image"));
        assert!(same_file(src, &env.path("r.raw")), "{when}: snapshot {id} restores different bytes");
    }
    snaps.len()
}

/// Backups and `forget --prune` run at the same time, again and again, with the prune
/// started at varying moments of the backup.
#[test]
fn backups_and_prunes_in_parallel_processes_lose_nothing() {
    let env = Env::new();
    env.init(&["--chunker", "fixed:64K", "--pack-size-mib", "1"]);
    let mut rng = Rng(0x5eed_1234_abcd);
    let pool: Vec<Vec<u8>> = (0..24).map(|i| noise(1000 + i, 64 << 10)).collect();
    let mut images: HashMap<String, PathBuf> = HashMap::new();
    let mut waited = 0;
    let mut backup_ms = 50;
    for round in 0..24 {
        let img = env.path(&format!("img{round}.raw"));
        let blocks = 96 + rng.next(64) as usize;
        std::fs::write(&img, disk(&mut rng, &pool, blocks)).unwrap();
        let vm = format!("vm{}", round % 3);
        let backup = env
            .cmd()
            .args(["backup", "--json", "--vm", &vm, &format!("xvda={}", img.display())])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Start the prune somewhere inside the backup (as long as the last one took).
        let started = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(rng.next(backup_ms)));
        let prune = env
            .cmd()
            .args(["forget", "--keep-last", "2", "--prune", "--max-unused", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let b = backup.wait_with_output().unwrap();
        backup_ms = (started.elapsed().as_millis() as u64).max(2);
        let p = prune.wait_with_output().unwrap();
        assert!(b.status.success(), "round {round} backup: {}", text(&b));
        assert!(p.status.success(), "round {round} prune: {}", text(&p));
        if String::from_utf8_lossy(&p.stderr).contains("waiting for a backup") {
            waited += 1;
        }
        let out: serde_json::Value = serde_json::from_slice(&b.stdout).expect("backup --json");
        images.insert(out["id"].as_str().expect("snapshot id").to_owned(), img);
        assert_clean_and_restorable(&env, &images, &format!("round {round}"));
    }
    // The last round's backup may have finished after its prune looked: one more prune.
    env.ok(&["forget", "--keep-last", "2", "--prune", "--max-unused", "0"]);
    let left = assert_clean_and_restorable(&env, &images, "at the end");
    assert_eq!(left, 6, "two per VM");
    let report = env.json(&["check"]);
    assert!(report["problems"].as_array().unwrap().is_empty(), "{report:#}");
    eprintln!("the prune waited for a running backup in {waited} of 24 rounds");
}

/// SIGKILL a prune at random moments until one run completes; after each kill the
/// repository checks clean and restores, and the run that completes leaves no garbage.
#[test]
fn prune_killed_at_random_points_loses_nothing_and_a_rerun_finishes() {
    let env = Env::new();
    env.init(&["--chunker", "fixed:64K", "--pack-size-mib", "1"]);
    let mut rng = Rng(0xdead_beef_0042);
    let pool: Vec<Vec<u8>> = (0..32).map(|i| noise(2000 + i, 64 << 10)).collect();
    let mut images: HashMap<String, PathBuf> = HashMap::new();
    let mut kills = 0;
    let mut n = 0;
    for round in 0..4 {
        for _ in 0..4 {
            let img = env.path(&format!("img{n}.raw"));
            n += 1;
            std::fs::write(&img, disk(&mut rng, &pool, 160)).unwrap();
            let out = env.json(&["backup", "--vm", "web", &format!("xvda={}", img.display())]);
            images.insert(out["id"].as_str().expect("id").to_owned(), img);
        }
        env.ok(&["forget", "--keep-last", "3"]);
        assert_eq!(assert_clean_and_restorable(&env, &images, "before"), 3);
        // How long a whole prune takes here, on a copy: kills are spread over that time.
        let copy = env.path("copy");
        assert!(std::process::Command::new("cp").arg("-a").arg(env.repo()).arg(&copy).status().unwrap().success());
        let t = std::time::Instant::now();
        let out = env.cmd().env("VMVAULT_REPO", &copy).args(["prune", "--max-unused", "0"]).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let full_ms = (t.elapsed().as_millis() as u64).max(4);
        std::fs::remove_dir_all(&copy).unwrap();
        for attempt in 0..40 {
            let mut child = env
                .cmd()
                .args(["prune", "--max-unused", "0"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // Early in the run more often: each kill leaves less to do.
            std::thread::sleep(Duration::from_millis(rng.next(full_ms) >> rng.next(3)));
            let _ = child.kill();
            let status = child.wait().unwrap();
            if status.success() {
                break;
            }
            kills += 1;
            assert_clean_and_restorable(&env, &images, &format!("round {round}, after kill {attempt}"));
        }
    }
    // Whatever the last kill left, one more run finishes it.
    env.ok(&["prune", "--max-unused", "0"]);
    assert_eq!(assert_clean_and_restorable(&env, &images, "at the end"), 3);
    let report = env.json(&["check"]);
    assert!(report["problems"].as_array().unwrap().is_empty(), "garbage left: {report:#}");
    let plan = env.json(&["prune", "--dry-run", "--max-unused", "0"]);
    assert!(plan["report"]["plan"]["delete"].as_array().unwrap().is_empty(), "{plan:#}");
    assert!(plan["report"]["plan"]["repack"].as_array().unwrap().is_empty(), "{plan:#}");
    eprintln!("{kills} prunes killed");
    assert!(kills >= 4, "only {kills} runs were killed before finishing");
}
