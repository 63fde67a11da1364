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
    assert!(e.contains("not a VHD"), "{e}");
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
