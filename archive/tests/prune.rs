//! Prune: what it deletes, what it keeps, crashes at every step, backups that overlap it, and
//! a model-based property test of backup / forget / prune with crashes.

mod common;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use archive::check::{check, CheckOptions, Severity};
use archive::lock::LockKind;
use archive::manifest::SnapshotEntry;
use archive::progress::Progress;
use archive::prune::{prune, prune_with, PruneOptions, PruneReport, Step};
use archive::{Error, Repository, SnapshotId};
use blockdev::BlockDev;
use common::*;
use proptest::prelude::*;

const BLOCK: usize = 64 << 10;

fn opts(max_unused: f64) -> PruneOptions {
    PruneOptions { max_unused, poll: Duration::from_millis(20), ..PruneOptions::default() }
}

fn read_all(repo: &Arc<Repository>, snap: &SnapshotEntry) -> Vec<u8> {
    let r = reader(repo.clone(), snap, "xvda", 0);
    let mut buf = vec![0u8; r.len() as usize];
    r.read_at(0, &mut buf).unwrap();
    buf
}

/// `check --read-data` finds no error (warnings, e.g. unindexed packs, are allowed).
fn assert_check_clean(repo: &Repository) -> archive::check::CheckReport {
    let report = check(repo, CheckOptions { read_data: true, ..Default::default() }, &Progress::default()).unwrap();
    let errors: Vec<_> = report.problems.iter().filter(|p| p.severity == Severity::Error).collect();
    assert!(errors.is_empty(), "check finds errors: {errors:#?}");
    report
}

fn assert_restores(repo: &Arc<Repository>, expect: &BTreeMap<SnapshotId, Vec<u8>>) {
    for (id, data) in expect {
        let snap = SnapshotEntry { id: *id, snapshot: repo.load_snapshot(id).unwrap() };
        assert!(read_all(repo, &snap) == *data, "snapshot {} restores different bytes", id.short());
    }
}

fn pack_bytes(repo: &Repository) -> u64 {
    repo.list_packs().unwrap().iter().map(|p| repo.backend().size(&archive::pack::pack_path(p)).unwrap()).sum()
}

/// s1 = A (3 MiB); s2 = first half of A + new bytes; s3 = another VM's 2 MiB. Forget s1 and
/// s3: s3's packs die whole, s1's are half live (through s2).
fn scenario(dir: &std::path::Path) -> (Arc<Repository>, BTreeMap<SnapshotId, Vec<u8>>) {
    let repo = init(dir, "fixed:64K");
    let a = noise(1, 3 << 20);
    let mut b = a.clone();
    b[3 << 19..].copy_from_slice(&noise(2, 3 << 19));
    let s1 = backup_mem(&repo, "web", &[("xvda", &a)]);
    let s2 = backup_mem(&repo, "web", &[("xvda", &b)]);
    let s3 = backup_mem(&repo, "db", &[("xvda", &noise(3, 2 << 20))]);
    repo.forget_snapshot(&s1.id).unwrap();
    repo.forget_snapshot(&s3.id).unwrap();
    (Arc::new(repo), BTreeMap::from([(s2.id, b)]))
}

#[test]
fn prune_deletes_dead_packs_repacks_partial_ones_and_keeps_every_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, expect) = scenario(dir.path());
    let before = pack_bytes(&repo);
    let r = prune(&repo, &opts(0.0), &Progress::default()).unwrap();
    assert!(!r.plan.delete.is_empty(), "s3's packs hold no live chunk: {r:#?}");
    assert!(!r.plan.repack.is_empty(), "s1's packs are partly live: {r:#?}");
    assert!(r.chunks_copied > 0 && r.packs_written > 0, "{r:#?}");
    assert_eq!(r.plan.unreferenced_maps, 2, "s1's and s3's stream maps");
    assert_eq!(r.maps_deleted, 2);
    assert!(repo.backend().list("prune").unwrap().is_empty(), "the marker is gone when done");
    let after = pack_bytes(&repo);
    // 3 + 1.5 + 2 MiB stored before (random data: no compression); s2 needs 3 MiB.
    assert!(after < before * 2 / 3 && after < (3 << 20) + (256 << 10), "{before} -> {after} bytes of packs");
    let report = assert_check_clean(&repo);
    assert!(report.problems.is_empty(), "no warnings either: {:#?}", report.problems);
    assert_restores(&repo, &expect);
    // Nothing left to do: no pack has a dead chunk.
    let again = prune(&repo, &opts(0.0), &Progress::default()).unwrap();
    assert!(again.plan.delete.is_empty() && again.plan.repack.is_empty(), "{again:#?}");
    assert_eq!(again.plan.unused_bytes_left, 0);
    assert_eq!(again.packs_deleted + again.packs_written, 0);
}

#[test]
fn max_unused_leaves_partly_used_packs_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, expect) = scenario(dir.path());
    let r = prune(&repo, &opts(1.0), &Progress::default()).unwrap();
    assert!(r.plan.repack.is_empty() && r.chunks_copied == 0, "{r:#?}");
    assert!(r.packs_deleted > 0 && r.plan.unused_bytes_left > 0, "{r:#?}");
    assert_check_clean(&repo);
    assert_restores(&repo, &expect);
}

#[test]
fn dry_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, _) = scenario(dir.path());
    let listing = |repo: &Repository| {
        ["data", "index", "streams", "snapshots", "prune"].map(|d| {
            let mut all = repo.backend().list(d).unwrap();
            if d == "data" {
                all = repo.list_packs().unwrap().iter().map(|p| p.to_hex()).collect();
            }
            all
        })
    };
    let before = listing(&repo);
    let r = prune(&repo, &PruneOptions { dry_run: true, ..opts(0.0) }, &Progress::default()).unwrap();
    assert!(!r.plan.delete.is_empty() && !r.plan.repack.is_empty());
    assert_eq!(r.packs_deleted + r.packs_written + r.maps_deleted, 0);
    assert_eq!(listing(&repo), before);
}

/// Kill the prune after each of its steps in turn (every write is atomic, so stopping
/// between steps is what a kill leaves); every time the repository checks clean and
/// restores, and a second prune finishes the job.
#[test]
fn crash_after_any_step_loses_nothing_and_rerun_finishes() {
    let mut k = 0;
    loop {
        let dir = tempfile::tempdir().unwrap();
        let (repo, expect) = scenario(dir.path());
        let seen = Cell::new(0);
        let crashed_at = Cell::new(None);
        let hook = |s: Step| {
            seen.set(seen.get() + 1);
            if seen.get() > k {
                crashed_at.set(Some(s));
                return Err(Error::Usage(format!("injected crash after step {k} ({s:?})")));
            }
            Ok(())
        };
        let first = prune_with(&repo, &opts(0.0), &Progress::default(), &hook);
        let Some(step) = crashed_at.get() else {
            first.unwrap();
            assert!(k > 8, "only {k} steps: the scenario should exercise every kind");
            break;
        };
        assert!(first.is_err(), "crash at {step:?}");
        assert_check_clean(&repo);
        assert_restores(&repo, &expect);
        let r = prune(&repo, &opts(0.0), &Progress::default()).unwrap();
        if std::env::var("DBG").is_ok() {
            eprintln!("k={k} step={step:?} {r:#?}");
        }
        assert_eq!(r.resumed, 1, "after {step:?}: {r:#?}");
        assert!(repo.backend().list("prune").unwrap().is_empty());
        let report = assert_check_clean(&repo);
        assert!(report.problems.is_empty(), "after a crash at {step:?} and a re-run: {:#?}", report.problems);
        assert_restores(&repo, &expect);
        let done = prune(&repo, &opts(0.0), &Progress::default()).unwrap();
        assert!(done.plan.delete.is_empty() && done.plan.repack.is_empty(), "after {step:?}: {done:#?}");
        k += 1;
    }
}

/// A backup that starts while a prune is pending must not count chunks of condemned packs
/// as stored: it stores them again, and survives the prune finishing.
#[test]
fn backup_during_pending_prune_stores_condemned_chunks_again() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Arc::new(init(dir.path(), "fixed:64K"));
    let a = noise(7, 2 << 20);
    let s1 = backup_mem(&repo, "web", &[("xvda", &a)]);
    repo.forget_snapshot(&s1.id).unwrap();
    let stop = |s: Step| if s == Step::WaitRecorded { Err(Error::Usage("stop".into())) } else { Ok(()) };
    assert!(prune_with(&repo, &opts(0.0), &Progress::default(), &stop).is_err());
    assert_eq!(repo.backend().list("prune").unwrap().len(), 1, "pending marker");
    // Same bytes again: every chunk is in the index, but only in condemned packs.
    let s2 = backup_mem(&repo, "web", &[("xvda", &a)]);
    assert_eq!(s2.snapshot.summary.new_chunks, 32, "all 32 chunks stored again");
    let r = prune(&repo, &opts(0.0), &Progress::default()).unwrap();
    assert_eq!(r.resumed, 1);
    assert!(r.packs_deleted > 0, "{r:#?}");
    assert_check_clean(&repo);
    assert_restores(&repo, &BTreeMap::from([(s2.id, a)]));
}

/// A backup that held its lock before the marker was written may have reused condemned
/// chunks; the prune waits for it and keeps what its snapshot uses.
#[test]
fn prune_waits_for_earlier_backups_and_keeps_what_they_used() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Arc::new(init(dir.path(), "fixed:64K"));
    let a = noise(9, 2 << 20);
    let s1 = backup_mem(&repo, "web", &[("xvda", &a)]);
    // A backup running since before the prune, which found s1's chunks in the index ...
    let backup_lock = repo.lock(LockKind::Shared, "backup web").unwrap();
    repo.forget_snapshot(&s1.id).unwrap();
    let limited = PruneOptions { max_wait: Some(Duration::from_millis(200)), ..opts(0.0) };
    let r = prune(&repo, &limited, &Progress::default()).unwrap();
    assert!(r.pending && r.waited_for.len() == 1, "{r:#?}");
    assert_eq!(r.packs_deleted, 0);
    // ... and finishes with a snapshot made of them (s1's manifest, saved again as new).
    let mut snap = s1.snapshot.clone();
    snap.time = "2030-01-01T00:00:00Z".into();
    let s2 = repo.save_snapshot(&snap).unwrap();
    drop(backup_lock);
    let r = prune(&repo, &opts(0.0), &Progress::default()).unwrap();
    assert_eq!(r.resumed, 1);
    assert!(r.packs_kept > 0 && r.packs_deleted == 0 && r.chunks_copied == 0, "{r:#?}");
    assert_eq!(r.maps_deleted, 0, "s2 uses s1's map");
    assert_check_clean(&repo);
    assert_restores(&repo, &BTreeMap::from([(s2, a)]));
}

/// Readers opened before a prune keep reading snapshots whose chunks it moved, and get a
/// clear error for a snapshot it removed.
#[test]
fn open_readers_follow_moved_chunks_and_name_removed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, expect) = scenario(dir.path());
    let (id, data) = expect.iter().next().unwrap();
    let snap = SnapshotEntry { id: *id, snapshot: repo.load_snapshot(id).unwrap() };
    let live = reader(repo.clone(), &snap, "xvda", 0);
    let doomed = backup_mem(&repo, "tmp", &[("xvda", &noise(11, 1 << 20))]);
    let gone = reader(repo.clone(), &doomed, "xvda", 0);
    repo.forget_snapshot(&doomed.id).unwrap();
    let r = prune(&repo, &opts(0.0), &Progress::default()).unwrap();
    assert!(r.chunks_copied > 0 && r.packs_deleted > 0, "{r:#?}");
    let mut buf = vec![0u8; data.len()];
    live.read_at(0, &mut buf).unwrap();
    assert!(buf == *data, "an open reader reads moved chunks");
    let err = gone.read_at(0, &mut vec![0u8; 4096]).unwrap_err().to_string();
    assert!(err.contains("forgotten and pruned"), "{err}");
}

#[derive(Clone, Debug)]
enum Op {
    /// VM (0..3) and its disk as 64 KiB blocks from a small pool (None = zeros).
    Backup(u8, Vec<Option<u8>>),
    /// Forget the n-th live snapshot (mod count).
    Forget(usize),
    /// Prune with max unused (percent) and maybe a crash after step n.
    Prune(u8, Option<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, proptest::collection::vec(proptest::option::weighted(0.85, 0u8..10), 4..24))
            .prop_map(|(vm, blocks)| Op::Backup(vm, blocks)),
        2 => any::<usize>().prop_map(Op::Forget),
        2 => (prop_oneof![Just(0u8), Just(30), Just(100)], proptest::option::of(0u8..30))
            .prop_map(|(u, c)| Op::Prune(u, c)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, .. ProptestConfig::default() })]

    /// The model is the set of snapshots and their bytes. After every operation, each
    /// snapshot the model has restores identically; at the end the repository checks clean.
    #[test]
    fn backup_forget_prune_with_crashes_match_the_model(ops in proptest::collection::vec(op(), 1..14)) {
        let dir = tempfile::tempdir().unwrap();
        let repo = Arc::new(init(dir.path(), "fixed:64K"));
        let pool: Vec<Vec<u8>> = (0..10).map(|s| noise(100 + s, BLOCK)).collect();
        let mut model: BTreeMap<SnapshotId, Vec<u8>> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Backup(vm, blocks) => {
                    let data: Vec<u8> = blocks
                        .iter()
                        .flat_map(|b| b.map_or_else(|| vec![0u8; BLOCK], |i| pool[i as usize].clone()))
                        .collect();
                    let s = backup_mem(&repo, &format!("vm{vm}"), &[("xvda", &data)]);
                    model.insert(s.id, data);
                }
                Op::Forget(n) => {
                    if !model.is_empty() {
                        let id = *model.keys().nth(n % model.len()).unwrap();
                        repo.forget_snapshot(&id).unwrap();
                        model.remove(&id);
                    }
                }
                Op::Prune(unused, crash) => {
                    let seen = Cell::new(0u8);
                    let hook = |_s: Step| {
                        seen.set(seen.get() + 1);
                        match crash {
                            Some(c) if seen.get() > c => Err(Error::Usage("injected crash".into())),
                            _ => Ok(()),
                        }
                    };
                    let r: Result<PruneReport, _> =
                        prune_with(&repo, &opts(f64::from(unused) / 100.0), &Progress::default(), &hook);
                    if crash.is_none() {
                        r.unwrap();
                    }
                }
            }
            assert_restores(&repo, &model);
        }
        let r = prune(&repo, &opts(0.0), &Progress::default()).unwrap();
        prop_assert!(!r.pending);
        let report = assert_check_clean(&repo);
        prop_assert!(report.problems.is_empty(), "{:#?}", report.problems);
        assert_restores(&repo, &model);
        let names = repo.list_snapshots().unwrap().iter().map(|e| e.id).collect::<Vec<_>>();
        prop_assert_eq!(names.len(), model.len());
    }
}
