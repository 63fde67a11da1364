//! `export` to raw / VHD / qcow2 / VMDK checked by qemu-img; `import` of VHD files.

use std::process::{Command, Stdio};

use crate::util::*;

fn qemu_img(args: &[&str], env: &Env) -> String {
    let out = Command::new("qemu-img").args(args).current_dir(env.dir.path()).output().expect("run qemu-img");
    assert!(out.status.success(), "qemu-img {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn backed_up_disk(env: &Env) -> std::path::PathBuf {
    env.init(&[]);
    let disk = env.path("disk.img");
    // 40 MiB + 64 KiB: not a whole number of VHD blocks or qcow2 L2 ranges.
    write_image(
        &disk,
        (40 << 20) + (64 << 10),
        &[(0, &noise(1, 3 << 20)), (17 << 20, &noise(2, 4097)), ((40 << 20) + 4096, &[7u8; 512])],
    );
    env.ok(&["backup", "--vm", "web01", "xvda=disk.img"]);
    disk
}

#[test]
fn every_disk_format_matches_the_source_for_qemu() {
    let env = Env::new();
    backed_up_disk(&env);
    for (format, qfmt) in [("raw", "raw"), ("vhd", "vpc"), ("vhd-fixed", "vpc"), ("qcow2", "qcow2"), ("vmdk", "vmdk")] {
        let out = format!("out.{format}");
        let j = env.json(&["export", "web01@latest:xvda", "--format", format, "-o", &out]);
        assert_eq!(j["size"], (40 << 20) + (64 << 10));
        assert_eq!(j["written"], std::fs::metadata(env.path(&out)).unwrap().len(), "{format}");
        qemu_img(&["compare", "-q", "-f", qfmt, "-F", "raw", &out, "disk.img"], &env);
        if matches!(format, "qcow2" | "vmdk") {
            qemu_img(&["check", "-q", "-f", qfmt, &out], &env);
        }
    }
    // qemu's conversion of our VHD back to raw is the source, byte for byte.
    qemu_img(&["convert", "-f", "vpc", "-O", "raw", "out.vhd", "back.raw"], &env);
    assert!(same_file(&env.path("back.raw"), &env.path("disk.img")));
    // Nothing left behind but the outputs.
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // An existing file is kept unless --overwrite.
    let e = env.fails(&["export", "web01@latest:xvda", "--format", "vhd", "-o", "out.vhd"]);
    assert!(e.contains("--overwrite"), "{e}");
    env.ok(&["export", "web01@latest:xvda", "--format", "vhd", "-o", "out.vhd", "--overwrite"]);
}

#[test]
fn export_streams_to_a_pipe() {
    let env = Env::new();
    let disk = backed_up_disk(&env);
    let out = env.cmd().args(["export", "web01@latest:xvda", "-f", "raw", "-o", "-"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(out.stdout, std::fs::read(&disk).unwrap());
    for (format, qfmt) in [("vhd", "vpc"), ("qcow2", "qcow2"), ("vmdk", "vmdk")] {
        let out = env.cmd().args(["export", "web01@latest:xvda", "-f", format, "-o", "-"]).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        std::fs::write(env.path("piped"), &out.stdout).unwrap();
        qemu_img(&["compare", "-q", "-f", qfmt, "-F", "raw", "piped", "disk.img"], &env);
    }
    // A reader that goes away early is not an error.
    let mut child = env
        .cmd()
        .args(["export", "web01@latest:xvda", "-f", "vhd-fixed", "-o", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "a closed pipe should end the export quietly");
}

#[test]
fn import_vhd_from_qemu_and_our_own_export() {
    let env = Env::new();
    let disk = backed_up_disk(&env);
    qemu_img(
        &["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on", "disk.img", "q.vhd"],
        &env,
    );
    env.ok(&["export", "web01@latest:xvda", "-f", "vhd-fixed", "-o", "fixed.vhd"]);
    let j = env.json(&["import", "--vm", "imported", "xvda=q.vhd", "fixed.vhd"]);
    let streams: Vec<&str> =
        j["snapshot"]["streams"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(streams, ["xvda", "fixed"]);
    // Same content as the first backup: nothing new stored.
    assert_eq!(j["snapshot"]["summary"]["new_bytes"], 0);
    for s in ["xvda", "fixed"] {
        env.ok(&["restore", &format!("imported@latest:{s}"), "--target", &format!("{s}.raw")]);
        assert!(same_file(&env.path(&format!("{s}.raw")), &disk), "{s}");
    }
    env.ok(&["check", "--read-data"]);
}

#[test]
fn a_damaged_vhd_imports_nothing() {
    let env = Env::new();
    backed_up_disk(&env);
    env.ok(&["export", "web01@latest:xvda", "-f", "vhd", "-o", "good.vhd"]);
    let mut b = std::fs::read(env.path("good.vhd")).unwrap();
    // Point the first BAT entry far past the end of the file.
    b[1536..1540].copy_from_slice(&0x7fff_0000u32.to_be_bytes());
    std::fs::write(env.path("bad.vhd"), &b).unwrap();
    let packs_before = count_files(&env.repo());
    let e = env.fails(&["import", "--vm", "bad", "bad.vhd"]);
    assert!(e.contains("past the file's end") && e.contains("bad.vhd"), "{e}");
    let e = env.fails(&["import", "--vm", "bad", "disk.img"]);
    assert!(e.contains("neither a VHD"), "{e}");
    assert_eq!(count_files(&env.repo()), packs_before, "nothing written to the repository");
    let list = env.json(&["snapshots"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
}

fn count_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| if e.file_type().unwrap().is_dir() { count_files(&e.path()) } else { 1 })
        .sum()
}

/// XAPI records of a suspended VM with two disks, a memory image and a NIC, as a capture
/// would keep them (`meta.xapi`), with ints as XAPI's strings.
fn suspended_vm_meta() -> serde_json::Value {
    serde_json::json!({"xapi": {
        "version": {"xapi_major": 1, "xapi_minor": 20, "export_vsn": 2, "hostname": "h1"},
        "objects": [
            {"class": "VM", "id": "Ref:0", "snapshot": {
                "uuid": "0b7c1f6e-8d2a-4c5e-9f10-123456789abc", "name_label": "db 01", "name_description": "test <db>",
                "power_state": "Suspended", "suspend_VDI": "Ref:9", "is_a_template": false, "is_a_snapshot": true,
                "snapshot_of": "Ref:77", "memory_static_max": "2147483648", "VCPUs_max": "4",
                "VBDs": ["Ref:3", "Ref:4"], "VIFs": ["Ref:5"], "last_booted_record": "(xen-record)",
                "last_boot_CPU_flags": {"vendor": "GenuineIntel", "features": "1fcbfbff-f7fa3223-2d93fbff"},
                "HVM_boot_params": {"order": "cd", "firmware": "uefi"}, "platform": {"acpi": "1"}}},
            {"class": "VDI", "id": "Ref:1", "snapshot": {"uuid": "u1", "name_label": "root", "virtual_size": "0", "type": "user", "SR": "Ref:8"}},
            {"class": "VDI", "id": "Ref:2", "snapshot": {"uuid": "u2", "name_label": "data", "virtual_size": "0", "type": "user", "SR": "Ref:8"}},
            {"class": "VDI", "id": "Ref:9", "snapshot": {"uuid": "u9", "name_label": "suspend", "virtual_size": "0", "type": "suspend", "SR": "Ref:8"}},
            {"class": "VBD", "id": "Ref:3", "snapshot": {"VM": "Ref:0", "VDI": "Ref:1", "device": "xvda", "userdevice": "0", "type": "Disk", "empty": false}},
            {"class": "VBD", "id": "Ref:4", "snapshot": {"VM": "Ref:0", "VDI": "Ref:2", "device": "xvdb", "userdevice": "1", "type": "Disk", "empty": false}},
            {"class": "VIF", "id": "Ref:5", "snapshot": {"VM": "Ref:0", "network": "Ref:6", "device": "0", "MAC": "aa:bb:cc:00:11:22"}},
            {"class": "network", "id": "Ref:6", "snapshot": {"name_label": "Pool-wide network", "bridge": "xenbr0"}},
            {"class": "SR", "id": "Ref:8", "snapshot": {"name_label": "Local storage", "content_type": "user"}}
        ],
        "streams": {"Ref:1": "xvda", "Ref:2": "xvdb", "Ref:9": "memory"}
    }})
}

fn suspended_vm(env: &Env) {
    env.init(&[]);
    write_image(&env.path("a.img"), 24 << 20, &[(0, &noise(1, 3 << 20)), ((24 << 20) - 512, &[1u8; 512])]);
    write_image(&env.path("b.img"), (5 << 20) + 4096, &[(2 << 20, &noise(2, 70_000))]);
    write_image(&env.path("m.img"), 16 << 20, &[(1 << 20, &noise(3, 1 << 20)), (9 << 20, &noise(4, 8192))]);
    std::fs::write(env.path("meta.json"), suspended_vm_meta().to_string()).unwrap();
    env.ok(&["backup", "--vm", "db01", "xvda=a.img", "xvdb=b.img", "--memory", "m.img", "--meta", "meta.json"]);
}

#[test]
fn xva_round_trips_disks_memory_and_records() {
    let env = Env::new();
    suspended_vm(&env);
    let j = env.json(&["export", "db01@latest", "-f", "xva", "-o", "db.xva"]);
    assert_eq!(j["streams"], serde_json::json!(["xvda", "xvdb", "memory"]));
    // GNU tar reads it: ova.xml first, chunks in Ref order, first and last chunks always there,
    // all-zero chunks left out, each followed by its checksum.
    let list = Command::new("tar").arg("-tf").arg(env.path("db.xva")).output().unwrap();
    let names: Vec<String> = String::from_utf8(list.stdout).unwrap().lines().map(String::from).collect();
    assert_eq!(names[0], "ova.xml");
    let chunks: Vec<&str> =
        names.iter().filter(|n| !n.ends_with(".xxhash") && *n != "ova.xml").map(|s| s.as_str()).collect();
    assert_eq!(
        chunks,
        [
            "Ref:1/00000000",
            "Ref:1/00000001",
            "Ref:1/00000002",
            "Ref:1/00000023",
            "Ref:2/00000000",
            "Ref:2/00000002",
            "Ref:2/00000005",
            "Ref:9/00000001",
            "Ref:9/00000009",
            "Ref:9/00000015",
            "Ref:9/00000000",
        ]
        .iter()
        .copied()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
    );
    // Checksums agree with xxhsum's XXH64.
    let x = std::process::Command::new("bash")
        .current_dir(env.dir.path())
        .args(["-c", "tar -xOf db.xva Ref:2/00000002 | xxhsum -H1 | cut -c1-16; tar -xOf db.xva Ref:2/00000002.xxhash"])
        .output()
        .unwrap();
    let out = String::from_utf8(x.stdout).unwrap();
    let mut lines = out.lines();
    let (theirs, ours) = (lines.next().unwrap().to_string(), out.trim_end().rsplit('\n').next().unwrap().to_string());
    assert_eq!(theirs.to_uppercase(), ours.trim(), "{out}");
    // The package is suspended with its memory; the records keep what resuming needs.
    let xml = Command::new("tar").arg("-xOf").arg(env.path("db.xva")).arg("ova.xml").output().unwrap().stdout;
    let xml = String::from_utf8(xml).unwrap();
    assert!(xml.contains("<name>power_state</name><value>Suspended</value>"), "{xml}");
    assert!(xml.contains("<name>is_a_snapshot</name><value><boolean>0</boolean></value>"));
    assert!(xml.contains("test &lt;db&gt;") && xml.contains("last_boot_CPU_flags"));

    // Import: the same streams, the same records.
    let j = env.json(&["import", "db.xva", "--vm", "db01-copy"]);
    let s = &j["snapshot"];
    assert_eq!(s["summary"]["new_bytes"], 0, "everything deduplicated against the original");
    let kinds: Vec<(String, String)> = s["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["name"].as_str().unwrap().into(), x["kind"].as_str().unwrap().into()))
        .collect();
    assert_eq!(
        kinds,
        [("xvda".into(), "disk".into()), ("xvdb".into(), "disk".into()), ("memory".into(), "memory".into())]
    );
    for (stream, src) in [("xvda", "a.img"), ("xvdb", "b.img"), ("memory", "m.img")] {
        let t = format!("{stream}.back");
        env.ok(&["restore", &format!("db01-copy@latest:{stream}"), "--target", &t]);
        assert!(same_file(&env.path(&t), &env.path(src)), "{stream}");
    }
    let vm = s["meta"]["xapi"]["objects"].as_array().unwrap().iter().find(|o| o["class"] == "VM").unwrap().clone();
    assert_eq!(vm["snapshot"]["power_state"], "Suspended");
    assert_eq!(vm["snapshot"]["suspend_VDI"], "Ref:9");
    assert_eq!(vm["snapshot"]["last_boot_CPU_flags"]["vendor"], "GenuineIntel");
    assert_eq!(s["meta"]["xapi"]["streams"]["Ref:9"], "memory");
    // Export → import → export: the same ova.xml.
    env.ok(&["export", "db01-copy@latest", "-f", "xva", "-o", "again.xva"]);
    let again = Command::new("tar").arg("-xOf").arg(env.path("again.xva")).arg("ova.xml").output().unwrap().stdout;
    assert_eq!(String::from_utf8(again).unwrap(), xml);
    env.ok(&["check", "--read-data"]);
}

#[test]
fn ova_has_descriptor_manifest_and_vmdks() {
    let env = Env::new();
    suspended_vm(&env);
    env.ok(&["export", "db01@latest", "-f", "ova", "-o", "db.ova"]);
    let list = Command::new("tar").arg("-tf").arg(env.path("db.ova")).output().unwrap();
    let names: Vec<String> = String::from_utf8(list.stdout).unwrap().lines().map(String::from).collect();
    assert_eq!(names, ["db_01.ovf", "db_01.mf", "db_01-disk1.vmdk", "db_01-disk2.vmdk"]);
    std::fs::create_dir(env.path("x")).unwrap();
    let run = |cmd: &str| {
        let o = Command::new("bash").current_dir(env.path("x")).args(["-c", cmd]).output().unwrap();
        assert!(o.status.success(), "{cmd}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    run("tar -xf ../db.ova");
    assert_eq!(run("sha256sum -c db_01.mf"), "db_01.ovf: OK\ndb_01-disk1.vmdk: OK\ndb_01-disk2.vmdk: OK\n");
    let py = r#"
import xml.etree.ElementTree as E
ns = {'o': 'http://schemas.dmtf.org/ovf/envelope/1', 'r': 'http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData'}
t = E.parse('db_01.ovf').getroot()
print([f.get('{%s}href' % ns['o']) for f in t.find('o:References', ns)])
print([d.get('{%s}capacity' % ns['o']) for d in t.find('o:DiskSection', ns).findall('o:Disk', ns)])
items = t.find('o:VirtualSystem/o:VirtualHardwareSection', ns).findall('o:Item', ns)
def key(i):
    for k in ('VirtualQuantity', 'Connection', 'HostResource', 'ResourceSubType'):
        e = i.find('r:' + k, ns)
        if e is not None:
            return e.text
print([(i.find('r:ResourceType', ns).text, key(i)) for i in items])
"#;
    std::fs::write(env.path("x/ovf.py"), py).unwrap();
    let out = run("python3 ovf.py");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "['db_01-disk1.vmdk', 'db_01-disk2.vmdk']");
    assert_eq!(lines[1], format!("['{}', '{}']", 24 << 20, (5 << 20) + 4096));
    assert_eq!(
        lines[2],
        "[('3', '4'), ('4', '2048'), ('6', 'lsilogic'), ('17', 'ovf:/disk/vmdisk1'), ('17', 'ovf:/disk/vmdisk2'), ('10', 'Pool-wide network')]"
    );
    for (vmdk, src) in [("db_01-disk1.vmdk", "../a.img"), ("db_01-disk2.vmdk", "../b.img")] {
        run(&format!("qemu-img check -q -f vmdk {vmdk} && qemu-img compare -q -f vmdk -F raw {vmdk} {src}"));
    }
    assert!(std::fs::read_to_string(env.path("x/db_01.ovf")).unwrap().contains("vmw:value=\"efi\""));
}

#[test]
fn damaged_xvas_import_nothing() {
    let env = Env::new();
    suspended_vm(&env);
    env.ok(&["export", "db01@latest", "-f", "xva", "-o", "good.xva"]);
    let good = std::fs::read(env.path("good.xva")).unwrap();
    let find = |needle: &str| good.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap();
    let before = count_files(&env.repo());
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    // A flipped byte in the data of Ref:2/00000002.
    let mut b = good.clone();
    let at = find("Ref:2/00000002\0") + 512 + 100;
    b[at] ^= 0xff;
    cases.push(("flip", b, "checksum"));
    // Cut in the middle of the memory chunks.
    cases.push((
        "cut",
        good[..find("Ref:9/00000009\0")].to_vec(),
        "VDI Ref:9: chunks cover 2097152 of its 16777216 bytes",
    ));
    // A member renamed to escape its folder (its header checksum recomputed).
    let mut b = good.clone();
    let h = find("Ref:2/00000005\0");
    let name = b"../../etc/00000005";
    b[h..h + 100].fill(0);
    b[h..h + name.len()].copy_from_slice(name);
    let mut hb = [0u8; 512];
    hb.copy_from_slice(&b[h..h + 512]);
    hb[148..156].fill(b' ');
    let sum: u32 = hb.iter().map(|&x| u32::from(x)).sum();
    b[h + 148..h + 156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    cases.push(("escape", b, "escapes"));
    // Not an XVA's first member.
    cases.push(("xml", good[512..].to_vec(), "neither"));
    for (name, bytes, want) in cases {
        let file = format!("{name}.xva");
        std::fs::write(env.path(&file), bytes).unwrap();
        let e = env.fails(&["import", &file, "--vm", "bad"]);
        assert!(e.contains(want), "{name}: {e}");
    }
    assert_eq!(count_files(&env.repo()), before, "nothing written to the repository");
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 1);
}
