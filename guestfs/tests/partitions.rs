//! Partition tables written by sfdisk (util-linux), read back and compared with what
//! `sfdisk --json` itself says; damaged tables; whole-disk filesystems.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use blockdev::{BlockDev, FileDev};
use guestfs::{open_disk, read_table, Content, PartitionType, Scheme};

fn sh(cmd: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut c = Command::new(cmd)
        .args(args)
        .env("PATH", format!("{}:/usr/sbin:/sbin", std::env::var("PATH").unwrap_or_default()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd} is needed: {e}"));
    c.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn image(dir: &Path, name: &str, mib: u64, script: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(mib << 20).unwrap();
    sh("sfdisk", &["--quiet", "--no-reread", "--no-tell-kernel", p.to_str().unwrap()], Some(script));
    p
}

/// (start sector, size in sectors, type) of every partition, as sfdisk reports them.
fn oracle(p: &Path) -> Vec<(u64, u64, String)> {
    let j: serde_json::Value = serde_json::from_str(&sh("sfdisk", &["--json", p.to_str().unwrap()], None)).unwrap();
    j["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["start"].as_u64().unwrap(), x["size"].as_u64().unwrap(), x["type"].as_str().unwrap().to_owned()))
        .collect()
}

fn dev(p: &Path) -> Arc<dyn BlockDev> {
    Arc::new(FileDev::open(p).unwrap())
}

#[test]
fn mbr_with_primaries_and_logicals_matches_sfdisk() {
    let dir = tempfile::tempdir().unwrap();
    // Three primaries, the extended one fourth, three logicals inside it.
    let script = "label: dos\n,8M,83\n,4M,8e\n,2M,c\n,40M,5\n,5M,83\n,6M,7\n,7M,b\n";
    let p = image(dir.path(), "mbr.img", 64, script);
    let t = read_table(&*dev(&p)).unwrap().unwrap();
    assert_eq!(t.scheme, Scheme::Mbr);
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    let want: Vec<_> = oracle(&p).into_iter().filter(|o| o.2 != "5").collect();
    let got: Vec<_> = t
        .partitions
        .iter()
        .map(|x| {
            let PartitionType::Mbr(ty) = x.kind else { panic!("not MBR") };
            (x.start / 512, x.len / 512, format!("{ty:x}"))
        })
        .collect();
    assert_eq!(got, want);
    let numbers: Vec<u32> = t.partitions.iter().map(|x| x.number).collect();
    assert_eq!(numbers, [1, 2, 3, 5, 6, 7], "Linux numbering: logicals from 5");
}

#[test]
fn gpt_matches_sfdisk_and_survives_a_damaged_primary_header() {
    let dir = tempfile::tempdir().unwrap();
    let script = "label: gpt\n\
        size=8M, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"EFI system\"\n\
        size=16M, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root ünïcode\"\n\
        type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n";
    let p = image(dir.path(), "gpt.img", 64, script);
    let t = read_table(&*dev(&p)).unwrap().unwrap();
    assert_eq!(t.scheme, Scheme::Gpt);
    let want = oracle(&p);
    let got: Vec<_> = t
        .partitions
        .iter()
        .map(|x| {
            let PartitionType::Gpt { type_guid, .. } = &x.kind else { panic!("not GPT") };
            (x.start / 512, x.len / 512, type_guid.to_string())
        })
        .collect();
    assert_eq!(got, want);
    let PartitionType::Gpt { name, .. } = &t.partitions[1].kind else { panic!() };
    assert_eq!(name, "root ünïcode");
    // Damage the primary header: the backup at the last LBA gives the same partitions.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"garbage!", 512 + 24).unwrap();
    let t2 = read_table(&*dev(&p)).unwrap().unwrap();
    assert_eq!(t2.partitions, t.partitions);
    assert!(t2.warnings.iter().any(|w| w.contains("backup")), "{:?}", t2.warnings);
    // Both headers damaged: an error naming both, not a guess.
    let last = (64u64 << 20) - 512;
    std::os::unix::fs::FileExt::write_all_at(&f, b"garbage!", last + 24).unwrap();
    let e = read_table(&*dev(&p)).unwrap_err().to_string();
    assert!(e.contains("primary") && e.contains("backup"), "{e}");
}

#[test]
fn whole_disk_filesystems_have_no_table_and_are_probed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ext4.img");
    std::fs::File::create(&p).unwrap().set_len(32 << 20).unwrap();
    sh("mke2fs", &["-q", "-t", "ext4", "-L", "data", p.to_str().unwrap()], None);
    let d = open_disk(dev(&p)).unwrap();
    assert!(d.table.is_none());
    assert_eq!(d.volumes.len(), 1);
    assert_eq!(d.volumes[0].content, Content::Ext { version: 4, label: "data".into() });
    // A FAT boot sector ends in 55AA too, but it is not a partition table.
    let f = dir.path().join("fat.img");
    std::fs::File::create(&f).unwrap().set_len(32 << 20).unwrap();
    sh("mkfs.vfat", &["-F", "16", f.to_str().unwrap()], None);
    let d = open_disk(dev(&f)).unwrap();
    assert!(d.table.is_none());
    assert_eq!(d.volumes[0].content, Content::Fat { bits: 16 });
}

#[test]
fn partitions_are_probed_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), "mixed.img", 64, "label: gpt\n,20M,L\n,20M,L\n,,S\n");
    let t = read_table(&*dev(&p)).unwrap().unwrap();
    // ext3 in p1 (through mke2fs -E offset), swap in p3.
    let (s1, l1) = (t.partitions[0].start, t.partitions[0].len);
    sh(
        "mke2fs",
        &["-q", "-t", "ext3", "-E", &format!("offset={s1}"), p.to_str().unwrap(), &format!("{}k", l1 / 1024)],
        None,
    );
    let (s3, l3) = (t.partitions[2].start, t.partitions[2].len);
    let sw = dir.path().join("swap.img");
    std::fs::File::create(&sw).unwrap().set_len(l3).unwrap();
    sh("mkswap", &[sw.to_str().unwrap()], None);
    let data = std::fs::read(&sw).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &data[..8192], s3).unwrap();
    let d = open_disk(dev(&p)).unwrap();
    let kinds: Vec<String> = d.volumes.iter().map(|v| format!("{}:{}", v.name, v.content.name())).collect();
    assert_eq!(kinds, ["p1:ext3", "p2:unknown", "p3:swap"]);
}
