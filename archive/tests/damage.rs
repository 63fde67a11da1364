//! Damaged repositories: every kind of damage gives a clear error naming the object, never
//! a panic, never wrong bytes.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use archive::check::{check, CheckOptions};
use archive::Repository;
use blockdev::BlockDev;
use common::*;

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_in(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn setup() -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), "fixed:64K");
    let mut data = noise(3, 3 << 20);
    data[(1 << 20)..(2 << 20)].fill(0);
    backup_mem(&repo, "vm", &[("xvda", &data)]);
    (dir, data)
}

/// Read the whole stream through the reader; an error is fine, wrong bytes are not.
fn read_back(root: &Path, data: &[u8]) -> Result<(), String> {
    let repo = Repository::open(&root.join("repo"), b"pw").map_err(|e| e.to_string())?;
    let snap = repo.resolve_snapshot("vm@latest").map_err(|e| e.to_string())?;
    let sref = snap.snapshot.stream("xvda").ok_or("no stream")?;
    let map = repo
        .load_stream_map(&sref.map.parse().map_err(|e: archive::Error| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let index = repo.load_index(16).map_err(|e| e.to_string())?;
    let store = Arc::new(archive::store::ChunkStore::new(Arc::new(repo), index, 1 << 20));
    let r = archive::reader::StreamReader::new(store, map, Default::default());
    let mut buf = vec![0u8; data.len()];
    r.read_at(0, &mut buf).map_err(|e| e.to_string())?;
    assert!(buf == data, "damaged repository returned wrong bytes without an error");
    Ok(())
}

fn mutate(path: &Path, how: &str) {
    let mut b = std::fs::read(path).unwrap();
    match how {
        "truncate" => b.truncate(b.len() / 2),
        "flip" => {
            let i = b.len() / 2;
            b[i] ^= 0x10;
        }
        "flip-end" => {
            let i = b.len() - 3;
            b[i] ^= 0x01;
        }
        "empty" => b.clear(),
        _ => unreachable!(),
    }
    std::fs::write(path, b).unwrap();
}

#[test]
fn every_damaged_file_is_detected_and_named() {
    let (template, data) = setup();
    let kinds = ["data", "index", "streams", "snapshots"];
    for kind in kinds {
        for how in ["truncate", "flip", "flip-end", "empty"] {
            let dir = tempfile::tempdir().unwrap();
            let status = std::process::Command::new("cp")
                .arg("-a")
                .arg(template.path().join("repo"))
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success());
            let victims = files_in(&dir.path().join("repo").join(kind));
            assert!(!victims.is_empty(), "{kind}");
            let victim = &victims[0];
            mutate(victim, how);
            let name = victim.file_name().unwrap().to_string_lossy().to_string();

            // Reading either works (the damage missed what we read) or fails cleanly.
            let read = read_back(dir.path(), &data);
            // check (structure, then all data) must find it.
            let repo = Repository::open(&dir.path().join("repo"), b"pw").unwrap();
            let report = check(&repo, CheckOptions { read_data: true, ..Default::default() }, &Default::default());
            let found = match &report {
                Ok(r) => r.problems.iter().any(|p| p.object.contains(&name[..8]) || p.detail.contains(&name[..8])),
                Err(e) => e.to_string().contains(&name[..8]),
            };
            assert!(found, "{kind}/{how}: check did not name {name}: {report:?}");
            // A flipped pack trailer leaves every chunk readable (reads go through the index);
            // everything else here damages bytes the stream needs.
            if !(kind == "data" && how == "flip-end") {
                assert!(read.is_err(), "{kind}/{how}: reading the damaged stream should fail");
            }
            if let Ok(r) = &report {
                assert!(r.errors() > 0, "{kind}/{how}: damage must be an error");
                if kind == "data" {
                    assert!(
                        r.problems.iter().any(|p| !p.damages.is_empty()),
                        "{kind}/{how}: the damaged snapshot is named: {r:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn wrong_passphrase_and_tampered_config() {
    let (dir, _) = setup();
    let err = Repository::open(&dir.path().join("repo"), b"nope").unwrap_err();
    assert!(matches!(err, archive::Error::WrongPassword(_)), "{err}");
    let cfg = dir.path().join("repo/config");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"version\": 1", "\"version\": 9")).unwrap();
    let err = Repository::open(&dir.path().join("repo"), b"pw").unwrap_err();
    assert!(err.to_string().contains("version 9"), "{err}");
    std::fs::write(&cfg, "garbage").unwrap();
    let err = Repository::open(&dir.path().join("repo"), b"pw").unwrap_err();
    assert!(err.to_string().contains("config"), "{err}");
}

#[test]
fn missing_pack_names_the_damaged_snapshot() {
    let (dir, data) = setup();
    let packs = files_in(&dir.path().join("repo/data"));
    std::fs::remove_file(&packs[0]).unwrap();
    assert!(read_back(dir.path(), &data).is_err());
    let repo = Repository::open(&dir.path().join("repo"), b"pw").unwrap();
    let r = check(&repo, CheckOptions::default(), &Default::default()).unwrap();
    let p = r.problems.iter().find(|p| p.detail.contains("missing")).expect("missing pack reported");
    assert!(p.damages.iter().any(|d| d.contains("(vm) xvda")), "{p:?}");
}

/// `--read-data-subset`: reads the requested share of packs (at least one), and a sample
/// covering every pack finds damage a structure-only check cannot see.
#[test]
fn read_data_subset_reads_a_sample_and_finds_damage_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), "fixed:64K");
    backup_mem(&repo, "vm", &[("xvda", &noise(5, 10 << 20))]); // 1 MiB packs: about 10
    let packs = repo.list_packs().unwrap();
    assert!(packs.len() >= 8, "{} packs", packs.len());
    let run = |f: f64| {
        check(&repo, CheckOptions { read_data_subset: Some(f), ..Default::default() }, &Default::default()).unwrap()
    };
    assert_eq!(run(0.0).packs_read, 1);
    assert_eq!(run(0.3).packs_read, (packs.len() as f64 * 0.3).ceil() as usize);
    assert_eq!(run(1.0).packs_read, packs.len());
    // Flip one byte inside a blob of one pack: only reading it shows the damage.
    let path = dir.path().join("repo").join(archive::pack::pack_path(&packs[0]));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(check(&repo, CheckOptions::default(), &Default::default()).unwrap().errors(), 0);
    let full = run(1.0);
    assert_eq!(full.errors(), 1, "{:#?}", full.problems);
    assert!(full.problems[0].object.contains(&packs[0].to_hex()), "{:#?}", full.problems);
    assert!(!full.problems[0].damages.is_empty(), "names the damaged snapshot");
}
