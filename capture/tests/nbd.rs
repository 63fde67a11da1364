//! The NBD client against the XAPI simulator's NBD server (xapi-nbd's behaviour: EXPORT_NAME
//! only, 512-byte reads, TLS by network purpose) and against qemu-nbd (a real server that
//! speaks NBD_OPT_GO), with the simulator's disks and a file as oracles.

use std::sync::Arc;

use blockdev::BlockDev;
use capture::nbd::{NbdDisk, Target};
use capture::run::Transfer;
use capture::source::{nbd_target, nbd_wants_tls, vhd_block_map};
use capture::xapi::tls::Trust;
use capture::xapi::wire::Protocol;
use capture::xapi::{Client, Connect};
use serde_json::json;
use xapi_sim::{Config, Sim};

fn scenario(purpose: &str) -> String {
    format!(
        r#"
[[network]]
name = "lan"
purpose = [{purpose}]
[[vm]]
name = "web"
seed = 7
[[vm.disk]]
size = "24MiB"
data = 0.03
"#
    )
}

struct Pool {
    sim: Arc<Sim>,
    client: Arc<Client>,
    _dir: tempfile::TempDir,
}

fn pool(purpose: &str) -> Pool {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config { data_dir: dir.path().to_path_buf(), ..Config::default() };
    let state = xapi_sim::scenario::from_str(&scenario(purpose), dir.path(), dir.path()).unwrap();
    let (sim, addr) = Sim::spawn(cfg, state, "127.0.0.1:0").unwrap();
    let client = Client::connect(Connect {
        url: format!("http://{addr}"),
        user: "root".into(),
        password: "password".into(),
        trust: Trust::Roots,
        protocol: Protocol::JsonRpc,
        retries: 0,
    })
    .unwrap();
    Pool { sim, client: Arc::new(client), _dir: dir }
}

impl Pool {
    /// A snapshot of web's disk: (VDI ref, uuid, bytes).
    fn snapshot_disk(&self) -> (String, String, Vec<u8>) {
        let vm = xapi_sim::hooks::find_vm(&self.sim.state(), "web").unwrap();
        let snap = self.client.call("VM.snapshot", &[json!(vm), json!("t")]).unwrap();
        let st = self.sim.state();
        let vbd = st.db.refs(snap.as_str().unwrap(), "VBDs")[0].clone();
        let vdi = st.db.str(&vbd, "VDI");
        let uuid = st.db.str(&vdi, "uuid");
        let disk = &st.disks[&uuid];
        let mut bytes = vec![0u8; disk.len() as usize];
        disk.read_at(0, &mut bytes).unwrap();
        (vdi, uuid, bytes)
    }
}

#[test]
fn nbd_reads_match_the_disk_and_hold_it_in_use() {
    let p = pool("\"insecure_nbd\"");
    let (vdi, uuid, want) = p.snapshot_disk();
    assert!(!nbd_wants_tls(&p.client).unwrap());
    let target = nbd_target(&p.client, &vdi, &uuid, false).unwrap().expect("the pool offers NBD");
    assert!(!format!("{target:?}").contains("session"), "the export name stays out of Debug: {target:?}");
    let disk = NbdDisk::new(target, want.len() as u64, Transfer::default());
    // Unaligned reads (XAPI refuses them) are widened to 512 bytes and cut back.
    for (off, len) in [(100u64, 1000usize), (65_000, 3), (0, 512), (want.len() as u64 - 4096, 7)] {
        let mut b = vec![0u8; len];
        disk.read_at(off, &mut b).unwrap();
        assert_eq!(b, want[off as usize..off as usize + len], "read of {len} at {off}");
    }
    // While connected, the disk is plugged into dom0: it cannot be destroyed.
    let e = p.client.call("VDI.destroy", &[json!(vdi)]).unwrap_err();
    assert_eq!(e.code(), Some("VDI_IN_USE"), "{e}");
    let mut all = vec![0u8; want.len()];
    disk.read_at(0, &mut all).unwrap();
    assert!(all == want, "a whole-disk read (pipelined 2 MiB requests) differs");
    // A read reaching the end closed the connection: the VDI is free again.
    assert_eq!(p.sim.state().db.refs(&vdi, "VBDs").len(), 1, "only the snapshot's own VBD is left");
    p.client.call("VDI.destroy", &[json!(vdi)]).unwrap();
    assert!(p.sim.stats.served.lock().unwrap()[&uuid] >= want.len() as u64);
}

#[test]
fn the_vhd_block_map_lists_the_blocks_holding_data() {
    let p = pool("\"insecure_nbd\"");
    let (vdi, uuid, want) = p.snapshot_disk();
    let map = vhd_block_map(&p.client, &vdi, None, want.len() as u64, &Transfer::default()).unwrap();
    assert_eq!(map.block, 2 << 20);
    let st = p.sim.state();
    let d = &st.disks[&uuid];
    let expect: Vec<bool> =
        (0..want.len() as u64 / map.block).map(|b| (b * 32..(b + 1) * 32).any(|k| d.allocated(k))).collect();
    assert_eq!(map.present, expect);
    assert!(expect.iter().any(|p| *p) && expect.iter().any(|p| !*p), "a mix of present and absent blocks");
    // Absent blocks really are zeros.
    for (i, present) in map.present.iter().enumerate() {
        if !present {
            let b = i * (2 << 20);
            assert!(want[b..b + (2 << 20)].iter().all(|&x| x == 0));
        }
    }
}

#[test]
fn nbd_with_tls_pins_the_hosts_certificate() {
    let p = pool("\"nbd\"");
    let (vdi, uuid, want) = p.snapshot_disk();
    assert!(nbd_wants_tls(&p.client).unwrap());
    let target = nbd_target(&p.client, &vdi, &uuid, true).unwrap().unwrap();
    let disk = NbdDisk::new(target.clone(), want.len() as u64, Transfer::default());
    let mut all = vec![0u8; want.len()];
    disk.read_at(0, &mut all).unwrap();
    assert!(all == want);
    // Without TLS, a FORCEDTLS server answers GO with TLS_REQD.
    let plain = Target { tls: None, ..target.clone() };
    let e = NbdDisk::new(plain, want.len() as u64, Transfer::default()).read_at(0, &mut [0u8; 512]).unwrap_err();
    assert!(e.to_string().contains("TLS required"), "{e}");
    // Another certificate pinned: the TLS handshake fails and says why.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap().cert.pem();
    let config = Trust::pin_pem(&other).unwrap().client_config().unwrap();
    let tls = capture::nbd::TlsTarget { config, name: target.tls.unwrap().name };
    let wrong = Target { tls: Some(tls), ..target };
    let e = NbdDisk::new(wrong, want.len() as u64, Transfer::default()).read_at(0, &mut [0u8; 512]).unwrap_err();
    assert!(e.to_string().contains("not the pinned one"), "{e}");
}

#[test]
fn nbd_refuses_a_stale_session_with_a_clear_error() {
    let p = pool("\"insecure_nbd\"");
    let (vdi, uuid, want) = p.snapshot_disk();
    let target = nbd_target(&p.client, &vdi, &uuid, false).unwrap().unwrap();
    p.client.logout();
    let e = NbdDisk::new(target, want.len() as u64, Transfer::default()).read_at(0, &mut [0u8; 512]).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("when the export was selected") && msg.contains("expired session"), "{msg}");
    assert!(!msg.contains("OpaqueRef"), "no session in errors: {msg}");
}

#[test]
fn no_nbd_purpose_means_no_target() {
    let p = pool("");
    let (vdi, uuid, _) = p.snapshot_disk();
    assert!(nbd_target(&p.client, &vdi, &uuid, true).unwrap().is_none());
}

/// A qemu-nbd serving `file` read-only and persistently on a free loopback port, with `args`
/// besides; killed when dropped (also when an assertion fails). Returns it and its port.
fn qemu_nbd(file: &std::path::Path, args: &[String]) -> (Kill, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = std::process::Command::new("qemu-nbd")
        .args(["--read-only", "--format=raw", "--bind=127.0.0.1", "--persistent"])
        .args(args)
        .arg(format!("--port={port}"))
        .arg(file)
        .spawn()
        .expect("qemu-nbd (apt-get install qemu-utils)");
    (Kill(child), port)
}

struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `NbdDisk::open`, retried while the server is not listening yet.
fn open_when_up(target: &Target) -> std::io::Result<NbdDisk> {
    let mut disk = NbdDisk::open(target.clone());
    for _ in 0..100 {
        if !disk.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        disk = NbdDisk::open(target.clone());
    }
    disk
}

/// qemu-nbd speaks NBD_OPT_GO (with block sizes): the other handshake path.
#[test]
fn nbd_reads_from_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    // qemu-nbd rounds sizes up to 512 bytes; reads below are unaligned anyway.
    let data: Vec<u8> = (0..(5u32 << 20) + 1536).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let (_server, port) = qemu_nbd(&file, &["--export-name=vm-disk".into(), "--shared=2".into()]);
    let target = Target {
        addr: format!("127.0.0.1:{port}"),
        export: "vm-disk".into(),
        label: "test".into(),
        tls: None,
        block_status: false,
    };
    let disk = open_when_up(&target).expect("qemu-nbd answers");
    assert_eq!(disk.len(), data.len() as u64);
    assert_eq!(disk.server_read_only(), Some(true));
    for (off, len) in [(0u64, data.len()), (3, 5), (data.len() as u64 - 1, 1), (1 << 20, 3 << 20)] {
        let mut b = vec![0u8; len];
        disk.read_at(off, &mut b).unwrap();
        assert!(b == data[off as usize..off as usize + len], "read of {len} at {off}");
    }
    let bad = Target { export: "nope".into(), ..target };
    let e = NbdDisk::open(bad).unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
}

/// `nbds://` against qemu-nbd with x509 credentials: the server's certificate is checked
/// against the CA in `tls-certificates=DIR` for the URI's host name; another CA fails the
/// handshake, and plain `nbd://` is refused by the TLS-only server.
#[test]
fn nbds_uris_check_the_servers_certificate_against_a_ca() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
    let dir = tempfile::tempdir().unwrap();
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        (p.self_signed(&key).unwrap(), key)
    };
    let (ca_cert, ca_key) = ca("vmvault test CA");
    let mut sp = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    sp.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    sp.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    sp.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().unwrap();
    let server_cert = sp.signed_by(&server_key, &ca_cert, &ca_key).unwrap();
    let creds = dir.path().join("server");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("ca-cert.pem"), ca_cert.pem()).unwrap();
    std::fs::write(creds.join("server-cert.pem"), server_cert.pem()).unwrap();
    std::fs::write(creds.join("server-key.pem"), server_key.serialize_pem()).unwrap();
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("ca-cert.pem"), ca("another CA").0.pem()).unwrap();

    let file = dir.path().join("disk.raw");
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let tls = format!("--object=tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir={}", creds.display());
    let args = ["--export-name=d".into(), "--shared=4".into(), tls, "--tls-creds=tls0".into()];
    let (_server, port) = qemu_nbd(&file, &args);
    let uri = |scheme: &str, dir: &std::path::Path| {
        format!("{scheme}://localhost:{port}/d?tls-certificates={}", dir.display())
    };
    let target = Target::from_uri(&uri("nbds", &creds)).unwrap();
    let disk = open_when_up(&target).expect("qemu-nbd answers over TLS");
    let mut all = vec![0u8; data.len()];
    disk.read_at(0, &mut all).unwrap();
    assert!(all == data);
    assert_eq!(disk.allocation(0, data.len() as u64).unwrap().len, data.len() as u64);
    let e = NbdDisk::open(Target::from_uri(&uri("nbds", &other)).unwrap()).unwrap_err().to_string();
    assert!(e.contains("TLS with NBD server") && e.to_lowercase().contains("certificate"), "{e}");
    let e = NbdDisk::open(Target::from_uri(&format!("nbd://localhost:{port}/d")).unwrap()).unwrap_err().to_string();
    assert!(e.contains("TLS required"), "{e}");
    // Encrypted without checking the certificate, when asked for.
    let unchecked = Target::from_uri(&format!("nbds://127.0.0.1:{port}/d?tls-verify-peer=false")).unwrap();
    let mut head = vec![0u8; 4096];
    NbdDisk::open(unchecked).unwrap().read_at(0, &mut head).unwrap();
    assert!(head == data[..4096]);
}
