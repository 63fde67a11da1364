//! `vmvault serve` against real NBD clients: qemu-img, nbdinfo, nbdcopy, qemu-io and fio.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::util::{noise, write_image, Env};

/// A running `vmvault serve`; killed when dropped (also when a test panics).
pub struct Server {
    child: Child,
    /// What the server printed: `nbd://ADDR/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
    url: String,
}

impl Server {
    /// A server on a free loopback port.
    pub fn start(env: &Env, extra: &[&str]) -> Self {
        Self::spawn(env, &[&["--listen", "127.0.0.1:0"], extra].concat())
    }

    pub fn spawn(env: &Env, args: &[&str]) -> Self {
        let mut child = env
            .cmd()
            .args(["serve", "-q"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start vmvault serve");
        let out = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(out).lines();
        let url = loop {
            let line = lines.next().expect("serve exited before listening").expect("read stdout");
            if let Some(rest) = line.strip_prefix("serving ") {
                break rest.to_owned();
            }
        };
        Self { child, url }
    }

    /// The URI of `export` on this server.
    pub fn uri(&self, export: &str) -> String {
        self.url.replace("EXPORT", export)
    }

    /// kill -9: no chance to flush anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "serve exited with {status} after SIGTERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tool(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd} is needed ({e})"));
    assert!(out.status.success(), "{cmd} {args:?} failed:\n{}", crate::util::text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 48 MiB disk: data, a long hole, more data, and a zero tail.
fn disk(env: &Env) -> std::path::PathBuf {
    let path = env.path("disk.img");
    let a = noise(1, 5 << 20);
    let b = noise(2, 3 << 20);
    write_image(&path, 48 << 20, &[(0, &a), (20 << 20, &b), (40 << 20, b"tail marker")]);
    path
}

fn backed_up(env: &Env) -> std::path::PathBuf {
    env.init(&[]);
    let img = disk(env);
    env.ok(&["backup", "--vm", "web01", &format!("xvda={}", img.display())]);
    img
}

#[test]
fn read_only_export_matches_the_image_for_every_client() {
    let env = Env::new();
    let img = backed_up(&env);
    let srv = Server::start(&env, &[]);
    let uri = srv.uri("web01@latest/xvda");
    let imgs = img.to_str().expect("utf-8 path");
    let out = tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", imgs, &uri]);
    assert!(out.contains("identical"), "{out}");
    // nbdcopy (which skips holes by block status) produces the same bytes.
    let copy = env.path("copy.img");
    tool("nbdcopy", &[&uri, copy.to_str().expect("path")]);
    assert!(crate::util::same_file(&img, &copy), "nbdcopy output differs");
    // The zero extents are reported as holes, the data as data.
    let map = tool("nbdinfo", &["--map", "--json", &uri]);
    let map: serde_json::Value = serde_json::from_str(&map).expect("nbdinfo json");
    let extents: Vec<(u64, u64, u64)> = map
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (e["offset"].as_u64().unwrap_or(0), e["length"].as_u64().unwrap_or(0), e["type"].as_u64().unwrap_or(9))
        })
        .collect();
    let is_zero = |off: u64| extents.iter().any(|&(o, l, t)| (o..o + l).contains(&off) && t == 3);
    assert!(!is_zero(0) && !is_zero((5 << 20) - 1), "{extents:?}");
    assert!(is_zero(6 << 20) && is_zero((20 << 20) - 1), "{extents:?}");
    assert!(!is_zero(20 << 20) && is_zero(45 << 20), "{extents:?}");
    // Listing names every stream, by snapshot id and as @latest, with descriptions.
    let list = tool("nbdinfo", &["--list", "--json", &srv.uri("")]);
    let list: serde_json::Value = serde_json::from_str(&list).expect("nbdinfo json");
    // nbdinfo shows each listed name in "uri" and the canonical name (the resolved snapshot)
    // in "export-name".
    let names: Vec<&str> =
        list["exports"].as_array().expect("exports").iter().filter_map(|e| e["uri"].as_str()).collect();
    assert!(names.iter().any(|n| n.ends_with("/web01@latest/xvda")), "{names:?}");
    assert!(names.iter().any(|n| n.contains("/web01@") && n.ends_with("/xvda") && !n.contains("latest")), "{names:?}");
    let info = tool("nbdinfo", &["--json", &uri]);
    let info: serde_json::Value = serde_json::from_str(&info).expect("nbdinfo json");
    let e = &info["exports"][0];
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["export-size"], 48 << 20);
    assert!(e["description"].as_str().unwrap_or("").contains("web01"));
    // Unknown exports are refused with a reason, not a hang.
    let out = Command::new("qemu-img").args(["info", &srv.uri("web01@latest/nope")]).output().expect("qemu-img");
    assert!(!out.status.success());
    // Writes are refused on a read-only server.
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 512", &uri]).output().expect("qemu-io");
    let all = crate::util::text(&out);
    assert!(
        !out.status.success() || all.contains("ermission") || all.contains("read-only") || all.contains("read only"),
        "{all}"
    );
    srv.stop();
}

#[test]
fn the_default_export_and_a_unix_socket() {
    let env = Env::new();
    let img = backed_up(&env);
    let sock = env.path("nbd.sock");
    let srv = Server::spawn(&env, &["--socket", sock.to_str().expect("path"), "--export", "web01@latest/xvda"]);
    // The empty name is the default export.
    let uri = srv.uri("");
    assert_eq!(uri, format!("nbd+unix:///?socket={}", sock.display()));
    let out = tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", img.to_str().expect("path"), &uri]);
    assert!(out.contains("identical"), "{out}");
    srv.stop();
    assert!(!sock.exists(), "the socket file is removed on exit");
}

#[test]
fn fio_random_reads_at_queue_depth_16_verify() {
    let env = Env::new();
    env.init(&[]);
    // fio writes a verifiable pattern into the image; vmvault backs it up; fio then reads it
    // back through the export in random order, 16 requests in flight, checking every block.
    let img = env.path("fio.img");
    write_image(&img, 32 << 20, &[]);
    let job = [
        "--name=v",
        "--size=32M",
        "--bs=4k",
        "--rw=randwrite",
        "--verify=crc32c",
        "--randrepeat=1",
        "--verify_state_save=0",
    ];
    tool("fio", &[&job[..], &["--ioengine=psync", &format!("--filename={}", img.display()), "--do_verify=0"]].concat());
    env.ok(&["backup", "--vm", "f", &format!("xvda={}", img.display())]);
    let srv = Server::start(&env, &[]);
    let uri = srv.uri("f@latest/xvda");
    let out = tool(
        "fio",
        &[&job[..], &["--ioengine=nbd", &format!("--uri={uri}"), "--verify_only", "--iodepth=16", "--verify_fatal=1"]]
            .concat(),
    );
    assert!(out.contains("err= 0"), "{out}");
    assert!(!out.contains("verify: bad"), "{out}");
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = tool("qemu-io", &args);
    assert!(!out.contains("failed") && !out.contains("Pattern verification"), "{out}");
    out
}

#[test]
fn writable_overlay_survives_kill_9_and_commits_as_a_new_snapshot() {
    let env = Env::new();
    let img = backed_up(&env);
    let base = env.json(&["snapshots"]);
    let ov = env.path("ov");
    let ovs = ov.to_str().expect("path");
    let args = ["--writable", "--overlay-dir", ovs, "--session", "boot1"];
    let srv = Server::start(&env, &args);
    let uri = srv.uri("web01@latest/xvda");
    qemu_io(
        &uri,
        &["write -P 0xab 1000 70000", "flush", "write -z 20M 1M", "discard 40M 64k", "write -f -P 0x11 30M 4k"],
    );
    qemu_io(&uri, &["read -P 0xab 1000 70000", "read -P 0 20M 1M", "read -P 0x11 30M 4k"]);
    // While served, the overlay can be neither discarded nor committed by someone else.
    let e = env.fails(&["overlay", "discard", &format!("{ovs}/boot1")]);
    assert!(e.contains("in use"), "{e}");
    srv.kill();
    // Everything acknowledged after a flush or with FUA is there after kill -9.
    let srv = Server::start(&env, &args);
    let uri = srv.uri("web01@latest/xvda");
    qemu_io(&uri, &["read -P 0xab 1000 70000", "read -P 0 20M 1M", "read -P 0x11 30M 4k", "read -P 0 40M 64k"]);
    srv.stop();
    // The expected disk: the same edits applied to the original image.
    let expect = env.path("expect.img");
    std::fs::copy(&img, &expect).expect("copy");
    let ex = expect.to_str().expect("path");
    tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1000 70000",
            "-c",
            "write -z 20M 1M",
            "-c",
            "write -z 40M 64k",
            "-c",
            "write -P 0x11 30M 4k",
            ex,
        ],
    );
    let list = env.ok(&["overlay", "list", "--overlay-dir", ovs]);
    assert!(list.contains("xvda"), "{list}");
    // The overlay holds its base: neither retention nor an explicit forget removes it.
    let held_id = base[0]["id"].as_str().expect("id").to_owned();
    let e = env.fails(&["forget", &held_id[..16]]);
    assert!(e.contains("is held") && e.contains("boot1"), "{e}");
    let plan = env.json(&["forget", "--keep-last", "1", "--dry-run"]);
    let row = plan["snapshots"].as_array().expect("rows").iter().find(|r| r["id"] == held_id.as_str()).cloned();
    assert!(row.is_some_and(|r| r["keep"] == true), "{plan}");
    env.ok(&["overlay", "commit", &format!("{ovs}/boot1"), "--tag", "booted"]);
    let after = env.json(&["snapshots"]);
    assert_eq!(after.as_array().map(Vec::len), base.as_array().map(|a| a.len() + 1));
    let restored = env.path("restored.img");
    env.ok(&["restore", "web01@latest:xvda", "--target", restored.to_str().expect("path")]);
    assert!(crate::util::same_file(&restored, &expect), "committed snapshot differs from base + writes");
    // The base snapshot is untouched.
    let base_id = base[0]["id"].as_str().expect("id").to_owned();
    let orig = env.path("orig.img");
    env.ok(&["restore", &format!("{base_id}:xvda"), "--target", orig.to_str().expect("path")]);
    assert!(crate::util::same_file(&orig, &img));
    env.ok(&["overlay", "discard", &format!("{ovs}/boot1")]);
    assert!(!Path::new(&format!("{ovs}/boot1/web01@{}.xvda.ovl", &base_id[..8])).exists());
    // Released: the base can go now, and prune frees what only it used.
    env.ok(&["forget", &base_id[..16], "--prune"]);
    env.ok(&["check", "--read-data"]);
    env.ok(&["restore", "web01@latest:xvda", "--target", restored.to_str().expect("path"), "--overwrite"]);
    assert!(crate::util::same_file(&restored, &expect), "the committed snapshot after the prune");
}

/// A CA and a server certificate for 127.0.0.1 / localhost, made with openssl, in `dir`
/// (named as qemu and libnbd expect: ca-cert.pem, server-cert.pem, server-key.pem).
fn make_certs(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let d = |n: &str| dir.join(n).to_str().expect("path").to_owned();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    tool(
        "openssl",
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", &d("ca-key.pem"), "-out", &d("ca-cert.pem"), "-days", "30", "-subj", "/CN=vmvault test CA"],
        ]
        .concat(),
    );
    tool(
        "openssl",
        &[&["req"][..], &ec, &["-keyout", &d("server-key.pem"), "-out", &d("server.csr"), "-subj", "/CN=localhost"]]
            .concat(),
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        .expect("write");
    tool(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &d("server.csr"),
            "-CA",
            &d("ca-cert.pem"),
            "-CAkey",
            &d("ca-key.pem"),
            "-CAcreateserial",
            "-out",
            &d("server-cert.pem"),
            "-days",
            "30",
            "-extfile",
            &d("ext.cnf"),
        ],
    );
}

#[test]
fn tls_is_required_when_configured_and_works_with_qemu_and_libnbd() {
    let env = Env::new();
    let img = backed_up(&env);
    let certs = env.path("pki");
    make_certs(&certs);
    let c = |n: &str| certs.join(n).to_str().expect("path").to_owned();
    let srv = Server::start(&env, &["--tls-cert", &c("server-cert.pem"), "--tls-key", &c("server-key.pem")]);
    let uri = srv.uri("web01@latest/xvda");
    assert!(uri.starts_with("nbds://"), "{uri}");
    let port = uri.trim_start_matches("nbds://127.0.0.1:").split('/').next().expect("port").to_owned();
    // qemu-img over TLS sees the same bytes.
    let out = tool(
        "qemu-img",
        &["compare", "--object", &format!("tls-creds-x509,id=tls0,dir={},endpoint=client", certs.display()),
          "--image-opts", &format!("driver=raw,file.driver=file,file.filename={}", img.display()),
          &format!("driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port},file.export=web01@latest/xvda,file.tls-creds=tls0")],
    );
    assert!(out.contains("identical"), "{out}");
    let info = tool("nbdinfo", &[&format!("{uri}?tls-certificates={}", certs.display())]);
    assert!(info.contains("with TLS"), "{info}");
    // Without TLS the client is told why it cannot have the export.
    let plain = uri.replacen("nbds://", "nbd://", 1);
    let out = Command::new("qemu-img").args(["info", &plain]).output().expect("qemu-img");
    assert!(!out.status.success());
    assert!(crate::util::text(&out).contains("TLS"), "{}", crate::util::text(&out));
    srv.stop();
    // Clear text on a non-loopback address needs --insecure; TLS makes it acceptable.
    let e = env.fails(&["serve", "--listen", "0.0.0.0:0"]);
    assert!(e.contains("--insecure"), "{e}");
}

/// Every file under `dir`, recursively.
fn files_in(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(files_in(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_damaged_chunk_is_an_io_error_never_wrong_data() {
    let env = Env::new();
    backed_up(&env);
    // Flip a byte in every 4 KiB of every pack: every chunk fails authentication.
    for pack in files_in(&env.repo().join("data")) {
        let mut b = std::fs::read(&pack).expect("read pack");
        for i in (100..b.len()).step_by(4096) {
            b[i] ^= 0x40;
        }
        std::fs::write(&pack, b).expect("write pack");
    }
    let srv = Server::start(&env, &[]);
    let uri = srv.uri("web01@latest/xvda");
    let out = Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read 0 4M", &uri]).output().expect("qemu-io");
    let all = crate::util::text(&out);
    assert!(all.contains("Input/output error"), "expected EIO:\n{all}");
    assert!(!all.contains("read 4194304/4194304"), "a damaged read succeeded:\n{all}");
    // Zero extents need no chunk: they still read, and the server still serves.
    let out = tool("qemu-io", &["-r", "-f", "raw", "-c", "read -P 0 10M 1M", &uri]);
    assert!(out.contains("read 1048576/1048576"), "{out}");
    srv.stop();
}

#[test]
fn memory_images_are_served_read_only_even_on_a_writable_server() {
    let env = Env::new();
    env.init(&[]);
    let img = disk(&env);
    let mem = env.path("mem.img");
    write_image(&mem, 16 << 20, &[(4096, &noise(9, 1 << 20))]);
    env.ok(&["backup", "--vm", "m", &format!("xvda={}", img.display()), "--memory", mem.to_str().expect("path")]);
    let ov = env.path("ov");
    let srv = Server::start(&env, &["--writable", "--overlay-dir", ov.to_str().expect("path")]);
    let info = tool("nbdinfo", &["--json", &srv.uri("m@latest/memory")]);
    let info: serde_json::Value = serde_json::from_str(&info).expect("json");
    assert_eq!(info["exports"][0]["is_read_only"], true, "{info}");
    let disk_info = tool("nbdinfo", &["--json", &srv.uri("m@latest/xvda")]);
    let disk_info: serde_json::Value = serde_json::from_str(&disk_info).expect("json");
    assert_eq!(disk_info["exports"][0]["is_read_only"], false);
    assert_eq!(disk_info["exports"][0]["can_flush"], true);
    assert_eq!(disk_info["exports"][0]["can_fast_zero"], true);
    let copy = env.path("mem.copy");
    tool("nbdcopy", &[&srv.uri("m@latest/memory"), copy.to_str().expect("path")]);
    assert!(crate::util::same_file(&copy, &mem));
    srv.stop();
}

/// A `qemu-nbd` serving `image` read-only as export `disk0` at `addr` (`-k SOCKET` or
/// `-b HOST -p PORT` arguments); killed when dropped.
struct QemuNbd(Child);

impl QemuNbd {
    fn start(image: &Path, format: &str, addr: &[&str]) -> Self {
        let img = image.to_str().expect("utf-8 path");
        let child = Command::new("qemu-nbd")
            .args(["-r", "-t", "-f", format, "-x", "disk0"])
            .args(addr)
            .arg(img)
            .spawn()
            .expect("qemu-nbd is needed");
        QemuNbd(child)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait until `ready` holds (a server coming up), at most 10 s.
fn wait_until(what: &str, ready: impl Fn() -> bool) {
    for _ in 0..200 {
        if ready() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{what} did not come up");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

#[test]
fn backup_from_nbd_exports_reads_only_data_and_keeps_every_byte() {
    let env = Env::new();
    env.init(&[]);
    // A qcow2 with 3 MiB of data, 64 KiB more further on, a zeroed MiB, holes elsewhere.
    let qcow = env.path("src.qcow2");
    let q = qcow.to_str().expect("utf-8 path");
    tool("qemu-img", &["create", "-q", "-f", "qcow2", q, "64M"]);
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xab 1M 3M", "-c", "write -P 0x11 40M 64k", "-c", "write -z 50M 1M", q],
    );
    let raw = env.path("src.raw");
    tool("qemu-img", &["convert", "-O", "raw", q, raw.to_str().expect("path")]);

    // Over a Unix socket: only what block status calls data is read.
    let sock = env.path("nbd.sock");
    let _unix = QemuNbd::start(&qcow, "qcow2", &["-k", sock.to_str().expect("path")]);
    wait_until("qemu-nbd on its socket", || std::os::unix::net::UnixStream::connect(&sock).is_ok());
    let uri = format!("nbd+unix:///disk0?socket={}", sock.display());
    let out = env.json(&["backup", "--vm", "q", &format!("xvda={uri}")]);
    let read = out["snapshot"]["summary"]["read_bytes"].as_u64().unwrap();
    assert!(
        read >= 3 << 20 && read <= (3 << 20) + (64 << 10),
        "read {read} bytes of a 64 MiB export holding 3 MiB + 64 KiB"
    );
    let got = env.cmd().args(["cat", "q@latest:xvda"]).output().unwrap().stdout;
    assert!(got == std::fs::read(&raw).unwrap(), "the backup differs from qemu-img convert's image");

    // Over TCP: the same bytes, nothing new stored.
    let port = free_port().to_string();
    let _tcp = QemuNbd::start(&qcow, "qcow2", &["-b", "127.0.0.1", "-p", &port]);
    wait_until("qemu-nbd on its port", || std::net::TcpStream::connect(("127.0.0.1", port.parse().unwrap())).is_ok());
    let out = env.json(&["backup", "--vm", "q", &format!("xvda=nbd://127.0.0.1:{port}/disk0")]);
    assert_eq!(out["snapshot"]["summary"]["new_bytes"], 0, "{out}");
    let got = env.cmd().args(["cat", "q@latest:xvda"]).output().unwrap().stdout;
    assert!(got == std::fs::read(&raw).unwrap());

    // From vmvault's own server: a backup of a backup, holes again unread.
    let srv = Server::start(&env, &[]);
    let out = env.json(&["backup", "--vm", "copy", &format!("xvda={}", srv.uri("q@latest/xvda"))]);
    let read = out["snapshot"]["summary"]["read_bytes"].as_u64().unwrap();
    assert!(read <= 4 << 20, "read {read} bytes from vmvault serve");
    let got = env.cmd().args(["cat", "copy@latest:xvda"]).output().unwrap().stdout;
    assert!(got == std::fs::read(&raw).unwrap());

    // Clear errors.
    let err = env.fails(&["backup", "--vm", "x", &format!("xvda=nbd://127.0.0.1:{port}/nosuch")]);
    assert!(err.contains("no such export"), "{err}");
    let err = env.fails(&["backup", "--vm", "x", "xvda=nbds://127.0.0.1/disk0"]);
    assert!(err.contains("tls-certificates=DIR"), "{err}");
    let err = env.fails(&["backup", "--vm", "x", "xvda=nbd+unix:///disk0"]);
    assert!(err.contains("no socket=PATH"), "{err}");
    let err = env.fails(&["backup", "--vm", "x", "xvda=nbd://127.0.0.1:1/disk0"]);
    assert!(err.contains("connecting to NBD server 127.0.0.1:1"), "{err}");
}

/// A qemu VM's changed block tracking: a persistent dirty bitmap in the qcow2, updated by
/// qemu's own writes, offered by qemu-nbd as `qemu:dirty-bitmap:b0`.
#[test]
fn an_nbd_exports_dirty_bitmap_makes_an_incremental_backup() {
    let env = Env::new();
    env.init(&[]);
    let qcow = env.path("vm.qcow2");
    let q = qcow.to_str().expect("utf-8 path");
    tool("qemu-img", &["create", "-q", "-f", "qcow2", q, "64M"]);
    tool("qemu-io", &["-f", "qcow2", "-c", "write -P 0xab 1M 3M", "-c", "write -P 0xcd 20M 2M", q]);
    let sock = env.path("nbd.sock");
    let uri = format!("nbd+unix:///disk0?socket={}", sock.display());
    let disk = format!("xvda={uri}");
    {
        let _srv = QemuNbd::start(&qcow, "qcow2", &["-k", sock.to_str().expect("path")]);
        wait_until("qemu-nbd", || std::os::unix::net::UnixStream::connect(&sock).is_ok());
        env.ok(&["backup", "--vm", "kvm", &disk]);
    }
    // Tracking starts with the full backup; then the guest writes 64 KiB and 4 KiB.
    tool("qemu-img", &["bitmap", "--add", q, "b0"]);
    tool("qemu-io", &["-f", "qcow2", "-c", "write -P 0x22 5M 64k", "-c", "write -P 0x33 33M 4k", q]);
    let raw = env.path("now.raw");
    tool("qemu-img", &["convert", "-O", "raw", q, raw.to_str().expect("path")]);
    let _ = std::fs::remove_file(&sock);
    let _srv = QemuNbd::start(&qcow, "qcow2", &["-k", sock.to_str().expect("path"), "-B", "b0"]);
    wait_until("qemu-nbd", || std::os::unix::net::UnixStream::connect(&sock).is_ok());
    let out = env.json(&["backup", "--vm", "kvm", &disk, "--changed", "xvda=bitmap:b0"]);
    let read = out["snapshot"]["summary"]["read_bytes"].as_u64().unwrap();
    // Two dirty 64 KiB blocks, each widened to its 1 MiB chunk.
    assert!(read > 0 && read <= 2 << 20, "read {read} bytes for two dirty blocks");
    let got = env.cmd().args(["cat", "kvm@latest:xvda"]).output().unwrap().stdout;
    assert!(got == std::fs::read(&raw).unwrap(), "the incremental backup differs from the image");
    // A bitmap the export does not offer, and a bitmap of a disk that is not an NBD export.
    let err = env.fails(&["backup", "--vm", "kvm", &disk, "--changed", "xvda=bitmap:nosuch"]);
    assert!(err.contains("offers no qemu:dirty-bitmap:nosuch"), "{err}");
    let err = env.fails(&["backup", "--vm", "kvm", &format!("xvda={}", raw.display()), "--changed", "xvda=bitmap:b0"]);
    assert!(err.contains("must be an NBD URI"), "{err}");
}
