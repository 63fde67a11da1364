//! LVM2 read without device-mapper, checked against LVM's own tools: a VG across two disks
//! (a GPT partition and a whole disk) made by fixtures/make-lvm-images.sh; segments compared
//! with `lvs --segments`, LV contents assembled from the images by that report.

use std::path::Path;
use std::sync::Arc;

use blockdev::{read_all, BlockDev, FileDev};
use guestfs::{lvm, open_disk, Content};

fn fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/make-lvm-images.sh");
    let out = std::process::Command::new(script).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "make-lvm-images.sh (needs root and lvm2): {}", String::from_utf8_lossy(&out.stderr));
    dir
}

fn json(p: &Path, key: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    v["report"][0][key].as_array().unwrap().clone()
}

fn num(v: &serde_json::Value) -> u64 {
    v.as_str().unwrap().parse().unwrap()
}

/// The PV devices of the fixture: partition 1 of disk1, and disk2.
fn pv_devices(dir: &Path) -> (Arc<dyn BlockDev>, Arc<dyn BlockDev>) {
    let d1 = open_disk(Arc::new(FileDev::open(dir.join("disk1.img")).unwrap())).unwrap();
    assert_eq!(d1.volumes[0].content, Content::LvmPv);
    let p1 = d1.volumes.into_iter().next().unwrap();
    let p1: Arc<dyn BlockDev> = Arc::new(p1.dev);
    let d2 = open_disk(Arc::new(FileDev::open(dir.join("disk2.img")).unwrap())).unwrap();
    assert_eq!(d2.volumes[0].content, Content::LvmPv);
    let d2: Arc<dyn BlockDev> = Arc::new(d2.volumes.into_iter().next().unwrap().dev);
    (p1, d2)
}

/// What LVM says LV `name` contains, read straight from the image files.
fn expected(dir: &Path, name: &str) -> Vec<u8> {
    let loops: Vec<(String, String, u64)> = std::fs::read_to_string(dir.join("loops"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[0].to_owned(), f[1].to_owned(), f[2].parse().unwrap())
        })
        .collect();
    let pvs = json(&dir.join("pvs.json"), "pv");
    let extent = num(&pvs[0]["vg_extent_size"]);
    // A device column entry "/dev/loopN(PE)" → bytes of that image from that extent on.
    let at = |dev: &str| -> (Vec<u8>, u64) {
        let (loopdev, pe) = dev.trim_end_matches(')').split_once('(').unwrap();
        let (_, img, off) = loops.iter().find(|l| l.0 == loopdev).unwrap();
        let pe_start = num(&pvs.iter().find(|p| p["pv_name"] == loopdev).unwrap()["pe_start"]);
        (std::fs::read(dir.join(img)).unwrap(), off + pe_start + pe.parse::<u64>().unwrap() * extent)
    };
    let mut segs: Vec<_> =
        json(&dir.join("segments.json"), "seg").into_iter().filter(|s| s["lv_name"] == name).collect();
    segs.sort_by_key(|s| num(&s["seg_start_pe"]));
    let mut out = Vec::new();
    for s in segs {
        let len = (num(&s["seg_size_pe"]) * extent) as usize;
        let devs: Vec<(Vec<u8>, u64)> = s["devices"].as_str().unwrap().split(',').map(at).collect();
        if devs.len() == 1 {
            let (img, o) = &devs[0];
            out.extend_from_slice(&img[*o as usize..*o as usize + len]);
        } else {
            // Striped: chunks of stripe_size taken from each device in turn.
            let chunk = num(&s["stripe_size"]) as usize;
            for i in 0..len / chunk {
                let (img, o) = &devs[i % devs.len()];
                let from = *o as usize + (i / devs.len()) * chunk;
                out.extend_from_slice(&img[from..from + chunk]);
            }
        }
    }
    out
}

#[test]
fn a_volume_group_across_two_disks_reads_like_lvm_says() {
    let dir = fixture();
    let (p1, d2) = pv_devices(dir.path());
    let groups = lvm::scan(&[p1, d2]).unwrap();
    assert_eq!(groups.len(), 1);
    let g = &groups[0];
    assert_eq!(g.vg.name, "vgt");
    assert!(g.devices.iter().all(Option::is_some));
    let mut names: Vec<&str> = g.vg.lvs.iter().map(|l| l.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["lin", "rest", "str"]);
    let segs = json(&dir.path().join("segments.json"), "seg");
    for lv in &g.vg.lvs {
        let ours = lv.layout.as_ref().unwrap();
        let theirs: Vec<_> = segs.iter().filter(|s| s["lv_name"] == lv.name.as_str()).collect();
        assert_eq!(ours.len(), theirs.len(), "{}", lv.name);
        for t in theirs {
            let o = ours.iter().find(|o| o.start_extent == num(&t["seg_start_pe"])).unwrap();
            assert_eq!(o.extent_count, num(&t["seg_size_pe"]));
            assert_eq!(o.stripes.len() as u64, num(&t["stripes"]));
            assert_eq!(o.stripe_size, num(&t["stripe_size"]));
        }
        let dev = g.open(&lv.name).unwrap();
        let want = expected(dir.path(), &lv.name);
        assert_eq!(dev.len(), want.len() as u64, "{}", lv.name);
        assert!(read_all(&dev).unwrap() == want, "LV {} reads other bytes than LVM maps", lv.name);
        // Reads that cross stripe chunks and segment ends agree too.
        for (off, n) in [(65_000u64, 200_000usize), (dev.len() - 4_194_400, 300)] {
            let mut b = vec![0u8; n];
            dev.read_at(off, &mut b).unwrap();
            assert!(b == want[off as usize..off as usize + n], "LV {} at {off}", lv.name);
        }
    }
}

#[test]
fn a_missing_disk_and_damaged_metadata_are_clear_errors() {
    let dir = fixture();
    let (p1, d2) = pv_devices(dir.path());
    let groups = lvm::scan(&[d2.clone()]).unwrap();
    let g = &groups[0];
    assert!(g.devices[0].is_none() && g.devices[1].is_some());
    let e = g.open("lin").unwrap_err().to_string();
    assert!(e.contains("not on any disk"), "{e}");
    assert!(g.open("rest").is_err());
    drop(p1);
    // Flip a byte of the metadata text: its CRC no longer matches.
    let label = lvm::read_label(&*d2).unwrap().unwrap();
    let text = lvm::read_metadata(&*d2, &label).unwrap().unwrap();
    let img = std::fs::read(dir.path().join("disk2.img")).unwrap();
    let pos = img.windows(text.len().min(64)).position(|w| w == &text[..text.len().min(64)]).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(dir.path().join("disk2.img")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[img[pos + 10] ^ 1], (pos + 10) as u64).unwrap();
    let d2: Arc<dyn BlockDev> = Arc::new(FileDev::open(dir.path().join("disk2.img")).unwrap());
    let e = lvm::scan(&[d2]).unwrap_err().to_string();
    assert!(e.contains("CRC"), "{e}");
}

#[test]
fn discover_names_partitions_and_logical_volumes_per_disk() {
    let dir = fixture();
    // Put an ext4 into LV "lin" (linear on disk1's partition, from its first extent) the way
    // the machine notes describe: at partition start + pe_start.
    let pvs = json(&dir.path().join("pvs.json"), "pv");
    let at = 1_048_576 + num(&pvs[0]["pe_start"]);
    let disk1 = dir.path().join("disk1.img");
    let out = std::process::Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-L", "lin", "-E", &format!("offset={at}"), disk1.to_str().unwrap(), "40M"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let disks: Vec<(String, Arc<dyn BlockDev>)> = vec![
        ("xvda".into(), Arc::new(FileDev::open(&disk1).unwrap())),
        ("xvdb".into(), Arc::new(FileDev::open(dir.path().join("disk2.img")).unwrap())),
    ];
    let entries = guestfs::discover(&disks).unwrap();
    let shown: Vec<String> = entries.iter().map(|e| format!("{e:?}")).collect();
    assert_eq!(shown, ["xvda/vgt-lin (ext4)", "xvda/vgt-str (unknown)", "xvda/vgt-rest (unknown)"]);
}
