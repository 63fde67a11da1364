//! `vmvault xapi …` against the XAPI simulator (in this process, on a loopback port), with
//! the simulator's own state as the oracle; and the simulator against the official Python
//! XenAPI client.

use std::sync::Arc;

use blockdev::BlockDev;
use serde_json::Value;
use xapi_sim::{Config, Sim};

use crate::util::{text, Env};

/// Four VMs: web (running, 2 disks, NIC), db (suspended), mail (halted), test (not prod).
const SCENARIO: &str = r#"
[[network]]
name = "lan"
[[vm]]
name = "web"
tags = ["prod"]
power_state = "Running"
memory_image = "6MiB"
seed = 1
[[vm.disk]]
size = "12MiB"
data = 0.4
[[vm.disk]]
size = "4MiB"
data = 0.6
[[vm.vif]]
network = "lan"
[[vm]]
name = "db"
tags = ["prod"]
power_state = "Suspended"
memory_image = "4MiB"
seed = 2
[[vm.disk]]
size = "8MiB"
[[vm]]
name = "mail"
tags = ["prod"]
seed = 3
[[vm.disk]]
size = "6MiB"
data = 0.3
[[vm]]
name = "test"
tags = ["test"]
seed = 4
[[vm.disk]]
size = "2MiB"
"#;

struct Pool {
    sim: Arc<Sim>,
    url: String,
    env: Env,
}

impl Pool {
    fn start(scenario: &str, config: impl FnOnce(&mut Config)) -> Pool {
        let env = Env::new();
        let data = env.path("sim");
        std::fs::create_dir_all(&data).unwrap();
        let mut cfg = Config { data_dir: data.clone(), ..Config::default() };
        config(&mut cfg);
        let state = xapi_sim::scenario::from_str(scenario, &data, &data).unwrap();
        let (sim, addr) = Sim::spawn(cfg, state, "127.0.0.1:0").unwrap();
        env.init(&[]);
        Pool { sim, url: format!("http://{addr}"), env }
    }

    /// `vmvault xapi SUB --host URL ARGS…` with the pool password set.
    /// `vmvault xapi SUB --host URL ARGS…` with the pool password set.
    fn run_at(&self, url: &str, sub: &str, args: &[&str]) -> std::process::Output {
        let mut c = self.env.cmd();
        c.env("VMVAULT_XAPI_PASSWORD", "password").args(["xapi", sub, "--host", url]).args(args);
        c.output().unwrap()
    }

    fn xapi(&self, sub: &str, args: &[&str]) -> std::process::Output {
        self.run_at(&self.url, sub, args)
    }

    /// The same over HTTPS (the simulator's self-signed certificate, not checked).
    fn ok_https(&self, sub: &str, args: &[&str]) -> std::process::Output {
        let https = self.url.replace("http://", "https://");
        let out = self.run_at(&https, sub, &[&["--insecure"], args].concat());
        assert!(out.status.success(), "xapi {sub} {args:?} over HTTPS:\n{}", text(&out));
        out
    }

    fn ok(&self, sub: &str, args: &[&str]) -> std::process::Output {
        let out = self.xapi(sub, args);
        assert!(out.status.success(), "xapi {sub} {args:?}:\n{}", text(&out));
        out
    }

    fn vm(&self, name: &str) -> String {
        xapi_sim::hooks::find_vm(&self.sim.state(), name).unwrap_or_else(|| panic!("no VM {name}"))
    }

    /// The bytes of each disk of a VM, by user device.
    fn disks(&self, name: &str) -> Vec<(String, Vec<u8>)> {
        self.disks_of(&self.vm(name))
    }

    /// A running or suspended VM's memory image.
    fn memory(&self, name: &str) -> Vec<u8> {
        let vm = self.vm(name);
        let st = self.sim.state();
        let key = xapi_sim::hooks::memory_of(&st, &vm).unwrap_or_else(|| panic!("{name} has no memory image"));
        read_all(&st.disks[&key])
    }

    fn count(&self, class: &str, pred: impl Fn(&serde_json::Map<String, Value>) -> bool) -> usize {
        self.sim.state().db.all(class).filter(|(_, r)| pred(r)).count()
    }

    fn snapshots_on_pool(&self) -> usize {
        self.count("VM", |r| r.get("is_a_snapshot") == Some(&Value::Bool(true)))
    }

    /// The uuid of a VM's disk by VBD order.
    fn disk_uuid(&self, name: &str, i: usize) -> String {
        let st = self.sim.state();
        let vm = pool_vm(&st, name);
        let vbd = st.db.refs(&vm, "VBDs")[i].clone();
        st.db.str(&st.db.str(&vbd, "VDI"), "uuid")
    }

    fn field(&self, r: &str, f: &str) -> String {
        self.sim.state().db.str(r, f)
    }
}

fn read_all(d: &dyn BlockDev) -> Vec<u8> {
    let mut b = vec![0u8; d.len() as usize];
    d.read_at(0, &mut b).unwrap();
    b
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn xapi_backup_by_tag_then_restore_identical_with_memory() {
    let pool = Pool::start(SCENARIO, |_| {});
    let vdis_before = pool.count("VDI", |_| true);
    let out = pool.ok("backup", &["--tag", "prod", "--memory", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let vms = report["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 3, "{report}");
    assert!(vms.iter().all(|v| v["status"] == "success"), "{report}");
    let mem = |n: &str| vms.iter().find(|v| v["vm"] == n).unwrap()["memory"].clone();
    assert_eq!((mem("web"), mem("db"), mem("mail")), (Value::Bool(true), Value::Bool(true), Value::Bool(false)));
    // Cleanup: no snapshot VM and no snapshot disk or memory image left on the pool.
    assert_eq!(pool.snapshots_on_pool(), 0);
    assert_eq!(pool.count("VDI", |_| true), vdis_before);
    let log = stderr(&out);
    assert!(log.contains("web [snapshot] info: checkpoint taken"), "{log}");
    assert!(log.contains("mail [snapshot] info: the VM is halted"), "{log}");
    assert!(!log.contains("test"), "the test VM is not tagged prod: {log}");

    // Memory streams hold the memory images; disks restore byte-identical to new VMs.
    let mem_web = pool.env.cmd().args(["cat", "web@latest:memory"]).output().unwrap();
    assert!(mem_web.status.success());
    assert_eq!(mem_web.stdout, pool.memory("web"));
    let mem_db = pool.env.cmd().args(["cat", "db@latest:memory"]).output().unwrap();
    assert_eq!(mem_db.stdout, pool.memory("db"));

    pool.ok("restore", &["web@latest", "--name", "web-r", "--suspended", "--start", "--sr", "Local storage"]);
    pool.ok("restore", &["db@latest", "--name", "db-r", "--suspended"]);
    pool.ok("restore", &["mail@latest", "--name", "mail-r"]);
    for (src, dst) in [("web", "web-r"), ("db", "db-r"), ("mail", "mail-r")] {
        assert_eq!(pool.disks(src), pool.disks(dst), "{dst}'s disks differ from {src}'s");
    }
    let web_r = pool.vm("web-r");
    assert_eq!(pool.field(&web_r, "power_state"), "Running", "resumed from its memory");
    assert_eq!(pool.memory("web-r"), pool.memory("web"));
    let db_r = pool.vm("db-r");
    assert_eq!(pool.field(&db_r, "power_state"), "Suspended");
    assert_eq!(pool.memory("db-r"), pool.memory("db"));
    assert_eq!(pool.field(&pool.vm("mail-r"), "power_state"), "Halted");
    // The NIC came back on the same network with its MAC; names and tags kept.
    let st = pool.sim.state();
    let vifs = st.db.refs(&web_r, "VIFs");
    assert_eq!(vifs.len(), 1);
    let src_vif = st.db.refs(&pool_vm(&st, "web"), "VIFs")[0].clone();
    assert_eq!(st.db.str(&vifs[0], "MAC"), st.db.str(&src_vif, "MAC"));
    assert_eq!(st.db.str(&st.db.str(&vifs[0], "network"), "name_label"), "lan");
    drop(st);
    // The VM was created suspended by VM.create (not started and suspended afterwards).
    let calls = pool.sim.stats.calls.lock().unwrap().clone();
    assert!(calls.get("VM.create").copied().unwrap_or(0) >= 3);
    assert_eq!(calls.get("VM.suspend"), None);

    // XML-RPC speaks to the same pool.
    let out = pool.ok("vms", &["--xml-rpc", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(list.as_array().unwrap().iter().any(|v| v["name"] == "web-r" && v["power_state"] == "Running"));
    pool.env.ok(&["check", "--read-data"]);
}

fn pool_vm(st: &xapi_sim::State, name: &str) -> String {
    xapi_sim::hooks::find_vm(st, name).unwrap()
}

#[test]
fn xapi_checkpoint_failure_falls_back_to_a_disk_snapshot() {
    let pool = Pool::start(SCENARIO, |_| {});
    pool.sim.hooks.lock().unwrap().fail(
        "checkpoint",
        Some("web".into()),
        1,
        xapi_sim::Fault::new("VM_CHECKPOINT_SUSPEND_FAILED", ["x"]),
    );
    // Over HTTPS: close-delimited exports end with TLS close_notify, not a bare close.
    let out = pool.ok_https("backup", &["--vm", "web", "--memory"]);
    let log = stderr(&out);
    assert!(
        log.contains("checkpoint failed")
            && log.contains("VM_CHECKPOINT_SUSPEND_FAILED")
            && log.contains("disk-only snapshot"),
        "{log}"
    );
    let snaps = pool.env.json(&["snapshots"]);
    let streams: Vec<&str> =
        snaps[0]["streams"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(streams, ["xvda", "xvdb"], "no memory stream after the fallback");
    let xvda = pool.env.cmd().args(["cat", "web@latest:xvda"]).output().unwrap().stdout;
    assert_eq!(xvda, pool.disks("web")[0].1);
    assert_eq!(pool.snapshots_on_pool(), 0);
}

#[test]
fn xapi_dropped_export_fails_that_vm_only_and_cleans_up() {
    let pool = Pool::start(SCENARIO, |_| {});
    let vdis_before = pool.count("VDI", |_| true);
    let uuid = pool.disk_uuid("mail", 0);
    pool.sim.hooks.lock().unwrap().drop_export(uuid, 1 << 20);
    let out = pool.xapi("backup", &["--tag", "prod", "--json"]);
    assert!(!out.status.success(), "one VM failed: the run fails");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let status = |n: &str| report["vms"].as_array().unwrap().iter().find(|v| v["vm"] == n).unwrap().clone();
    assert_eq!(status("mail")["status"], "failure");
    assert!(status("mail")["error"].as_str().unwrap().contains("ended after"), "{report}");
    assert_eq!(status("web")["status"], "success");
    assert_eq!(status("db")["status"], "success");
    assert!(stderr(&out).contains("1 of 3 VM(s) failed"));
    assert_eq!(pool.snapshots_on_pool(), 0, "the failed VM's snapshot is cleaned up too");
    assert_eq!(pool.count("VDI", |_| true), vdis_before);
    let snaps = pool.env.json(&["snapshots"]);
    assert_eq!(snaps.as_array().unwrap().len(), 2);
    pool.env.ok(&["check"]);
}

#[test]
fn xapi_concurrency_limits_are_observed() {
    let scenario = (0..6)
        .map(|i| format!("[[vm]]\nname = \"vm{i}\"\nseed = {i}\n[[vm.disk]]\nsize = \"2MiB\"\n"))
        .collect::<String>();
    let pool = Pool::start(&scenario, |c| c.snapshot_delay = std::time::Duration::from_millis(300));
    pool.sim.hooks.lock().unwrap().set_delay(std::time::Duration::from_millis(100));
    pool.ok("backup", &["--all", "--snapshots-at-once", "2", "--vms-at-once", "3", "--exports-at-once", "2"]);
    let s = &pool.sim.stats;
    let snaps = s.snapshots_peak.load(std::sync::atomic::Ordering::SeqCst);
    let exports = s.exports_peak.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(snaps, 2, "6 snapshots of 300 ms, two at a time");
    assert_eq!(exports, 2, "3 VMs at once, but 2 exports at a time");

    let pool = Pool::start(&scenario, |c| c.snapshot_delay = std::time::Duration::from_millis(100));
    pool.ok("backup", &["--all", "--snapshots-at-once", "1", "--exports-at-once", "1", "--vms-at-once", "4"]);
    assert_eq!(pool.sim.stats.snapshots_peak.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(pool.sim.stats.exports_peak.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(pool.env.json(&["snapshots"]).as_array().unwrap().len(), 6);
}

#[test]
fn xapi_connection_errors_are_one_clear_line() {
    let pool = Pool::start(SCENARIO, |_| {});
    let one_line = |o: &std::process::Output, want: &str| {
        assert!(!o.status.success());
        let e = stderr(o);
        assert!(e.contains(want), "{e}");
        assert!(e.lines().filter(|l| !l.starts_with("hint:")).count() == 1, "one line: {e}");
    };
    let mut c = pool.env.cmd();
    let wrong = c.env("VMVAULT_XAPI_PASSWORD", "nope").args(["xapi", "vms", "--host", &pool.url]).output().unwrap();
    one_line(&wrong, "SESSION_AUTHENTICATION_FAILED");
    let https = pool.url.replace("http://", "https://");
    let pinned = pool.run_at(&https, "vms", &["--fingerprint", &"ab".repeat(32)]);
    one_line(&pinned, "not the pinned one");
    let roots = pool.run_at(&https, "vms", &[]);
    one_line(&roots, "cannot reach");
    // The right pin works.
    let pem = xapi_sim::tls::certificate_pem(&pool.env.path("sim")).unwrap();
    std::fs::write(pool.env.path("host.pem"), pem).unwrap();
    let ok = pool.run_at(&https, "vms", &["--cert", pool.env.path("host.pem").to_str().unwrap()]);
    assert!(ok.status.success(), "{}", text(&ok));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let gone = pool.run_at(&format!("http://{closed}"), "vms", &[]);
    one_line(&gone, "cannot reach");
}

/// The simulator as the official Python client sees it (`pip install XenAPI`).
#[test]
fn xapi_sim_fidelity_with_the_python_xenapi_client() {
    let pool = Pool::start(SCENARIO, |_| {});
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/xapi_fidelity.py");
    let out = std::process::Command::new("python3").arg(script).arg(&pool.url).output().expect("python3");
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.trim_end().ends_with("fidelity: all checks passed"), "{said}");
}

/// web: a sparse disk and a memory image, on a pool whose NBD server runs plain or TLS.
fn nbd_scenario(purpose: &str) -> String {
    format!(
        r#"
[[network]]
name = "lan"
purpose = ["{purpose}"]
[[vm]]
name = "web"
power_state = "Running"
memory_image = "4MiB"
seed = 9
[[vm.disk]]
size = "256MiB"
data = 0.002
[[vm.disk]]
size = "6MiB"
data = 0.5
"#
    )
}

/// Bytes an NBD reader fetches for a device read through its VHD block map: whole 2 MiB
/// blocks that hold any allocated 64 KiB block (clipped to the end).
fn nbd_bytes(d: &xapi_sim::disk::Disk) -> u64 {
    let mb2 = 2u64 << 20;
    (0..d.size.div_ceil(mb2))
        .filter(|b| (b * 32..(b + 1) * 32).any(|k| d.allocated(k)))
        .map(|b| mb2.min(d.size - b * mb2))
        .sum()
}

#[test]
fn xapi_backup_over_nbd_reads_only_the_blocks_holding_data() {
    for purpose in ["insecure_nbd", "nbd"] {
        let pool = Pool::start(&nbd_scenario(purpose), |_| {});
        let out = pool.ok("backup", &["--vm", "web", "--memory", "--transport", "nbd", "--json"]);
        let log = stderr(&out);
        assert!(log.contains("reading 3 stream(s)") && log.contains("over NBD"), "{purpose}: {log}");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let expect: u64 = {
            let st = pool.sim.state();
            let vm = pool_vm(&st, "web");
            let mut keys: Vec<String> =
                st.db.refs(&vm, "VBDs").iter().map(|v| st.db.str(&st.db.str(v, "VDI"), "uuid")).collect();
            keys.push(xapi_sim::hooks::memory_of(&st, &vm).unwrap());
            keys.iter().map(|k| nbd_bytes(&st.disks[k])).sum()
        };
        let total: u64 = pool.disks("web").iter().map(|d| d.1.len() as u64).sum::<u64>() + (4 << 20);
        assert_eq!(report["vms"][0]["bytes_read"], expect, "{purpose}: {report}");
        assert!(expect < total / 2, "the block map skipped most of the sparse disk ({expect} of {total})");
        for (i, (_, bytes)) in pool.disks("web").iter().enumerate() {
            let got = pool.env.cmd().args(["cat", &format!("web@latest:xvd{}", (b'a' + i as u8) as char)]).output();
            assert!(got.unwrap().stdout == *bytes, "{purpose}: disk {i} differs");
        }
        let mem = pool.env.cmd().args(["cat", "web@latest:memory"]).output().unwrap();
        assert!(mem.stdout == pool.memory("web"), "{purpose}: memory differs");
        // NBD connections were closed before cleanup: no snapshot, no dom0 VBD left.
        assert_eq!(pool.snapshots_on_pool(), 0, "{log}");
        assert_eq!(pool.count("VBD", |r| r["other_config"].get("xapi-nbd").is_some()), 0);
    }
}

#[test]
fn xapi_nbd_reconnects_after_a_drop_and_fails_cleanly_when_it_keeps_dropping() {
    let pool = Pool::start(&nbd_scenario("insecure_nbd"), |_| {});
    let uuid = pool.disk_uuid("web", 0);
    pool.sim.hooks.lock().unwrap().drop_export(uuid.clone(), 1 << 20);
    let out = pool.ok("backup", &["--vm", "web"]);
    let xvda = pool.env.cmd().args(["cat", "web@latest:xvda"]).output().unwrap().stdout;
    assert!(xvda == pool.disks("web")[0].1, "read again after the drop: identical\n{}", text(&out));

    // NBD offered but its server not answering: `auto` reads over HTTP and says why.
    pool.sim.hooks.lock().unwrap().nbd_down = true;
    let out = pool.ok("backup", &["--vm", "web"]);
    assert!(stderr(&out).contains("NBD offered but not usable"), "{}", text(&out));
    assert!(stderr(&out).contains("over HTTP"), "{}", text(&out));
    let xvda = pool.env.cmd().args(["cat", "web@latest:xvda"]).output().unwrap().stdout;
    assert!(xvda == pool.disks("web")[0].1, "identical over the HTTP fallback");
    let out = pool.xapi("backup", &["--vm", "web", "--transport", "nbd"]);
    assert!(!out.status.success(), "--transport nbd does not fall back");
    pool.sim.hooks.lock().unwrap().nbd_down = false;

    for _ in 0..10 {
        pool.sim.hooks.lock().unwrap().drop_export(uuid.clone(), 1 << 20);
    }
    let out = pool.xapi("backup", &["--vm", "web", "--json"]);
    assert!(!out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["vms"][0]["status"], "failure");
    assert!(report["vms"][0]["error"].as_str().unwrap().contains("NBD server at"), "{report}");
    assert_eq!(pool.snapshots_on_pool(), 0);
    assert_eq!(pool.count("VBD", |r| r["other_config"].get("xapi-nbd").is_some()), 0);
    pool.env.ok(&["check"]);
    // Without an NBD network, `--transport nbd` says so; `auto` uses HTTP.
    let http = Pool::start(SCENARIO, |_| {});
    let out = http.xapi("backup", &["--vm", "mail", "--transport", "nbd", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["vms"][0]["error"].as_str().unwrap().contains("offers no NBD"), "{report}");
    assert!(stderr(&http.ok("backup", &["--vm", "mail"])).contains("over HTTP"));
}

const CBT_SCENARIO: &str = r#"
[[network]]
name = "lan"
purpose = ["insecure_nbd"]
[[vm]]
name = "web"
seed = 11
[[vm.disk]]
size = "64MiB"
data = 0.6
[[vm.disk]]
size = "4MiB"
data = 0.5
"#;

impl Pool {
    /// Backup of web with `args`: the report's VM entry and the log.
    fn backup_web(&self, args: &[&str]) -> (Value, String) {
        let out = self.ok("backup", &[&["--vm", "web", "--json"], args].concat());
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        (report["vms"][0].clone(), stderr(&out))
    }

    fn cbt_bases(&self) -> Vec<String> {
        let st = self.sim.state();
        let mut v: Vec<String> = st
            .db
            .all("VDI")
            .filter(|(_, r)| r["type"] == "cbt_metadata")
            .map(|(_, r)| r["uuid"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    }

    fn assert_web_identical(&self, when: &str) {
        for (i, (_, bytes)) in self.disks("web").iter().enumerate() {
            let name = format!("web@latest:xvd{}", (b'a' + i as u8) as char);
            let got = self.env.cmd().args(["cat", &name]).output().unwrap().stdout;
            assert!(got == *bytes, "{when}: {name} differs from the pool's disk");
        }
    }

    /// Write `blocks` 64 KiB blocks of web's first disk, as the guest would (CBT sees them).
    fn write_blocks(&self, blocks: &[u64], untracked: bool) {
        let uuid = self.disk_uuid("web", 0);
        let mut st = self.sim.state();
        let d = st.disks.get_mut(&uuid).unwrap();
        for &b in blocks {
            let mut data = vec![0u8; 65536];
            xapi_sim::disk::fill(b ^ 0xabc, b * 65536, &mut data);
            if untracked {
                d.write_untracked(b * 65536, &data).unwrap();
            } else {
                d.write(b * 65536, &data).unwrap();
            }
        }
    }
}

#[test]
fn xapi_cbt_reads_only_changed_blocks_and_falls_back_with_a_reason() {
    let pool = Pool::start(CBT_SCENARIO, |_| {});
    // First CBT backup: CBT turned on, everything read, the snapshots kept as bases.
    let (vm, log) = pool.backup_web(&["--cbt"]);
    assert_eq!(vm["status"], "success", "{vm}");
    assert!(log.contains("CBT enabled on xvda") && log.contains("CBT enabled on xvdb"), "{log}");
    assert!(log.contains("reading all of xvda: the previous backup kept no CBT base"), "{log}");
    assert!(log.contains("2 kept as CBT base(s)"), "{log}");
    let bases = pool.cbt_bases();
    assert_eq!(bases.len(), 2);
    assert_eq!(pool.snapshots_on_pool(), 0);

    // 1 % of xvda's 1024 blocks written: the next backup reads exactly those 10 blocks.
    let changed: Vec<u64> = (0..10).map(|i| 7 + i * 101).collect();
    pool.write_blocks(&changed, false);
    let (vm, log) = pool.backup_web(&["--cbt", "--cbt-audit-every", "0"]);
    assert!(log.contains("CBT: xvda: 655360 bytes in 10 changed range(s)"), "{log}");
    assert!(log.contains("CBT: xvdb: 0 bytes in 0 changed range(s)"), "{log}");
    assert_eq!(vm["bytes_read"], 10 * 65536, "only the changed blocks crossed the network: {vm}");
    pool.assert_web_identical("after a CBT backup");
    let new_bases = pool.cbt_bases();
    assert_eq!(new_bases.len(), 2, "the previous bases are destroyed: {new_bases:?}");
    assert!(new_bases.iter().all(|b| !bases.contains(b)));

    // An audit re-reads unchanged blocks and finds them equal.
    pool.write_blocks(&[500], false);
    let (vm, log) = pool.backup_web(&["--cbt", "--cbt-audit-every", "1"]);
    assert!(log.contains("CBT audit of xvda: 32 unchanged blocks re-read, all equal"), "{log}");
    assert_eq!(vm["bytes_read"], 65536 + 2 * 32 * 65536, "{vm}");
    pool.assert_web_identical("after an audit");

    // A change CBT missed: the audit catches it and reads the whole disk.
    pool.write_blocks(&(0..1024).step_by(4).collect::<Vec<_>>(), true);
    let (_, log) = pool.backup_web(&["--cbt", "--cbt-audit-every", "1"]);
    assert!(log.contains("CBT audit FAILED for xvda"), "{log}");
    pool.assert_web_identical("after a failed audit");

    // A busy host: dom0 lets go of a disk 1.5 s after its NBD connection closed. The CBT
    // query right after the NBD probe waits for it rather than taking VDI_IN_USE for a reset.
    pool.sim.hooks.lock().unwrap().nbd_linger = std::time::Duration::from_millis(1500);
    pool.write_blocks(&[600], false);
    let (vm, log) = pool.backup_web(&["--cbt", "--cbt-audit-every", "0"]);
    assert!(log.contains("CBT: xvda: 65536 bytes in 1 changed range(s)"), "{log}");
    assert!(log.contains("2 kept as CBT base(s)"), "{log}");
    assert_eq!(vm["bytes_read"], 65536, "{vm}");
    pool.sim.hooks.lock().unwrap().nbd_linger = std::time::Duration::ZERO;
    pool.assert_web_identical("after waiting for dom0");

    // CBT reset (disabled and enabled again: a new chain): full read, with the reason.
    let uuid = pool.disk_uuid("web", 0);
    let vdi = pool.sim.state().db.find("VDI", "uuid", &uuid).unwrap();
    xapi_sim::api::dispatch_internal(&pool.sim, "VDI.disable_cbt", &[Value::from(vdi.clone())]).unwrap();
    pool.write_blocks(&[3], false);
    let (vm, log) = pool.backup_web(&["--cbt"]);
    assert!(log.contains("CBT enabled on xvda"), "{log}");
    assert!(
        log.contains("reading all of xvda: list_changed_blocks refused") && log.contains("SR_BACKEND_FAILURE_460"),
        "{log}"
    );
    assert!(vm["bytes_read"].as_u64().unwrap() >= 32 << 20, "a full read of xvda: {vm}");
    pool.assert_web_identical("after a CBT reset");

    // A base gone from the pool, and --full: full reads, said why.
    let base = pool.cbt_bases()[0].clone();
    let r = pool.sim.state().db.find("VDI", "uuid", &base).unwrap();
    xapi_sim::api::dispatch_internal(&pool.sim, "VDI.destroy", &[Value::from(r)]).unwrap();
    let (_, log) = pool.backup_web(&["--cbt"]);
    assert!(log.contains("is gone from the pool (CBT reset)"), "{log}");
    let (_, log) = pool.backup_web(&["--cbt", "--full"]);
    assert!(log.contains("reading all of xvda: --full asks for a new baseline"), "{log}");
    pool.assert_web_identical("after --full");
    assert_eq!(pool.cbt_bases().len(), 2);
    pool.env.ok(&["check", "--read-data"]);
}

#[test]
fn xapi_jobs_log_every_run_apply_retention_and_show_interrupted_runs() {
    let pool = Pool::start(SCENARIO, |_| {});
    let jobs = format!(
        r#"
[pool.sim]
host = "{}"

[job.prod]
pool = "sim"
tags = ["prod"]
memory = true
[job.prod.retention]
keep_last = 2

[job.lab]
pool = "sim"
vms = ["test"]
repo = "lab-repo"
repo_password_file = "lab.pw"
"#,
        pool.url
    );
    std::fs::write(pool.env.path("jobs.toml"), jobs).unwrap();
    // The lab job has a repository of its own, with its own passphrase.
    std::fs::write(pool.env.path("lab.pw"), "lab secret\n").unwrap();
    let lab = ["--repo", "lab-repo", "--password-file", "lab.pw"];
    pool.env.ok(&[&lab[..], &["init", "--kdf-memory-kib", "256"]].concat());
    let logs = pool.env.path("logs");
    let logs = logs.to_str().unwrap();
    let job = |args: &[&str]| {
        let mut c = pool.env.cmd();
        c.env("VMVAULT_XAPI_PASSWORD", "password").args(["job"]).args(args).args(["--log-dir", logs]);
        c.output().unwrap()
    };
    for _ in 0..3 {
        let out = job(&["run", "jobs.toml"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    // Retention kept the last 2 of each prod VM; the lab job has none.
    let snaps = pool.env.json(&["snapshots"]);
    let count = |vm: &str| snaps.as_array().unwrap().iter().filter(|s| s["vm"] == vm).count();
    assert_eq!((count("web"), count("db"), count("mail"), count("test")), (2, 2, 2, 0), "{snaps}");
    let in_lab = pool.env.json(&[&lab[..], &["snapshots"]].concat());
    assert_eq!(in_lab.as_array().unwrap().iter().filter(|s| s["vm"] == "test").count(), 3, "{in_lab}");

    let out = job(&["log", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let runs: Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 6);
    assert!(runs.iter().all(|r| r["status"] == "success"), "{runs:?}");
    let prod: Vec<&Value> = runs.iter().filter(|r| r["job"] == "prod").collect();
    assert_eq!(prod.len(), 3);
    let vms = prod[0]["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 3);
    assert!(vms.iter().all(|v| v["status"] == "success" && v["bytes_read"].as_u64().unwrap() > 0), "{vms:?}");
    assert!(prod[2]["lines"].as_array().unwrap().iter().any(|l| l["event"] == "retention"));
    let id = prod[0]["run"].as_str().unwrap();
    let out = job(&["log", "--job", "prod", "--run", id]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("job prod run {id}")) && said.contains("success") && said.contains("checkpoint taken"),
        "{said}"
    );

    // A run killed midway shows as interrupted at the next `job log`.
    pool.sim.hooks.lock().unwrap().set_delay(std::time::Duration::from_millis(400));
    let mut c = pool.env.cmd();
    c.env("VMVAULT_XAPI_PASSWORD", "password").args(["job", "run", "jobs.toml", "--job", "prod", "--log-dir", logs]);
    let mut child = c.stderr(std::process::Stdio::null()).spawn().unwrap();
    let dir = pool.env.path("logs/prod");
    let started = std::time::Instant::now();
    while std::fs::read_dir(&dir).unwrap().count() < 4 && started.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    let out = job(&["log", "--job", "prod"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(said.lines().count(), 4, "{said}");
    assert!(said.lines().last().unwrap().contains("interrupted"), "the newest run is the killed one: {said}");
    assert_eq!(said.lines().filter(|l| l.contains("interrupted")).count(), 1, "{said}");
    pool.sim.hooks.lock().unwrap().set_delay(std::time::Duration::ZERO);
    // The killed run could not clean up; the next run of the job does.
    assert!(pool.snapshots_on_pool() > 0, "a snapshot was left by the killed run");
    let out = job(&["run", "jobs.toml", "--job", "prod"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stderr(&out).contains("left by an interrupted run"), "{}", text(&out));
    assert_eq!(pool.snapshots_on_pool(), 0);

    // A job file with a mistake: one clear line.
    std::fs::write(pool.env.path("bad.toml"), "[job.x]\npool = \"nope\"\ntags = [\"a\"]\n").unwrap();
    let out = job(&["run", "bad.toml"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no [pool.nope]"), "{}", text(&out));
}

/// A plain HTTP/1.1 request to the simulator: the status code and the body (read to the
/// end of the connection, as XAPI's transfers are delimited).
fn http(pool: &Pool, method: &str, target: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let addr = pool.url.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    let head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n", body.len());
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(body).unwrap();
    let mut all = Vec::new();
    conn.read_to_end(&mut all).unwrap();
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, all[split + 4..].to_vec())
}

impl Pool {
    fn session(&self) -> String {
        let s = xapi_sim::api::call(&self.sim, "session.login_with_password", vec!["root".into(), "password".into()]);
        s.unwrap().as_str().unwrap().to_string()
    }

    fn call(&self, method: &str, args: &[&str]) -> Value {
        let mut params = vec![Value::from(self.session())];
        params.extend(args.iter().map(|a| Value::from(*a)));
        xapi_sim::api::call(&self.sim, method, params).unwrap_or_else(|f| panic!("{method}: {f:?}"))
    }

    /// The VM refs a finished import task names.
    fn imported(&self, head: &str) -> String {
        let task = head.lines().find_map(|l| l.strip_prefix("task-id: ")).unwrap().trim().to_string();
        let st = self.sim.state();
        assert_eq!(st.db.str(&task, "status"), "success", "import task: {:?}", st.db.get(&task));
        let result = st.db.str(&task, "result");
        let at = result.find("OpaqueRef:").unwrap();
        result[at..].split('<').next().unwrap().to_string()
    }

    fn disks_of(&self, vm: &str) -> Vec<(String, Vec<u8>)> {
        let st = self.sim.state();
        let mut out: Vec<(String, Vec<u8>)> = st
            .db
            .refs(vm, "VBDs")
            .iter()
            .map(|vbd| (st.db.str(vbd, "userdevice"), read_all(&st.disks[&st.db.str(&st.db.str(vbd, "VDI"), "uuid")])))
            .collect();
        out.sort();
        out
    }
}

#[test]
fn xapi_xva_export_and_import_carry_disks_and_memory_both_ways() {
    let pool = Pool::start(SCENARIO, |_| {});
    let s = pool.session();
    // The pool's export of a checkpoint, with its memory, imported by vmvault.
    let web = pool.vm("web");
    let cp = pool.call("VM.checkpoint", &[&web, "cp"]);
    let cp = cp.as_str().unwrap();
    let (status, head, xva) =
        http(&pool, "GET", &format!("/export?session_id={s}&ref={cp}&preserve_power_state=true"), b"");
    assert_eq!(status, 200, "{head}");
    assert!(head.starts_with("HTTP/1.0 200 OK") && head.contains("export.xva"), "{head}");
    std::fs::write(pool.env.path("web.xva"), &xva).unwrap();
    pool.env.ok(&["import", "--vm", "web-xva", pool.env.path("web.xva").to_str().unwrap()]);
    let cat = |name: &str| pool.env.cmd().args(["cat", name]).output().unwrap().stdout;
    assert!(cat("web-xva@latest:memory") == pool.memory("web"), "the checkpoint's memory came through");
    let disks = pool.disks("web");
    assert!(cat("web-xva@latest:xvda") == disks[0].1 && cat("web-xva@latest:xvdb") == disks[1].1);
    // Without preserve_power_state: halted, no memory in the package.
    let (_, _, plain) = http(&pool, "GET", &format!("/export?session_id={s}&ref={cp}"), b"");
    assert!(plain.len() < xva.len() - (4 << 20), "no memory image: {} vs {}", plain.len(), xva.len());
    // A running VM cannot be exported; a bad session is refused.
    let (status, _, _) = http(&pool, "GET", &format!("/export?session_id={s}&ref={web}"), b"");
    assert_eq!(status, 500);
    let (status, _, _) = http(&pool, "GET", &format!("/export?session_id=OpaqueRef:nope&ref={cp}"), b"");
    assert_eq!(status, 401);

    // vmvault's XVA of a disk & memory backup, imported by the pool: a suspended VM that resumes.
    pool.ok("backup", &["--vm", "web", "--memory"]);
    let out = pool.env.path("out.xva");
    pool.env.ok(&["export", "web@latest", "-f", "xva", "-o", out.to_str().unwrap()]);
    let (status, head, _) = http(&pool, "PUT", &format!("/import?session_id={s}"), &std::fs::read(&out).unwrap());
    assert_eq!(status, 200, "{head}");
    let vm = pool.imported(&head);
    assert_eq!(pool.field(&vm, "power_state"), "Suspended");
    assert_eq!(pool.disks_of(&vm), pool.disks("web"));
    let vifs = pool.sim.state().db.refs(&vm, "VIFs");
    assert_eq!(pool.field(&pool.field(&vifs[0], "network"), "name_label"), "lan");
    pool.call("VM.resume", &[&vm, "false", "false"]);
    assert_eq!(pool.field(&vm, "power_state"), "Running");
    let mem = xapi_sim::hooks::memory_of(&pool.sim.state(), &vm).unwrap();
    let resumed = read_all(&pool.sim.state().disks[&mem]);
    assert!(resumed == pool.memory("web"), "resumed with the backup's memory");

    // The pool's own export round trip, zstd-compressed: a halted VM with identical disks.
    let mail = pool.vm("mail");
    let (_, _, z) = http(&pool, "GET", &format!("/export?session_id={s}&ref={mail}&use_compression=zstd"), b"");
    assert_eq!(&z[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    let (_, head, _) = http(&pool, "PUT", &format!("/import?session_id={s}&restore=false"), &z);
    let copy = pool.imported(&head);
    assert_ne!(copy, mail);
    assert_eq!(pool.field(&copy, "power_state"), "Halted");
    assert_eq!(pool.disks_of(&copy), pool.disks("mail"));
    // A damaged package is refused and leaves nothing behind.
    let vms_before = pool.count("VM", |_| true);
    let vdis_before = pool.count("VDI", |_| true);
    let mut bad = std::fs::read(&out).unwrap();
    let n = bad.len();
    bad[n / 2] ^= 0xff;
    let (_, head, _) = http(&pool, "PUT", &format!("/import?session_id={s}"), &bad);
    let task = head.lines().find_map(|l| l.strip_prefix("task-id: ")).unwrap().trim().to_string();
    assert_eq!(pool.field(&task, "status"), "failure");
    assert!(pool.sim.state().db.get(&task).unwrap().rec["error_info"][0] == "IMPORT_ERROR");
    assert_eq!((pool.count("VM", |_| true), pool.count("VDI", |_| true)), (vms_before, vdis_before));
}

/// Two hosts on one socket (told apart by the Host header); the SR `far` only on the second.
const TWO_HOSTS: &str = r#"
[[host]]
name = "master"
[[host]]
name = "xcp2"
address = "localhost"
[[sr]]
name = "Local storage"
[[sr]]
name = "far"
hosts = ["xcp2"]
[[vm]]
name = "web"
seed = 21
[[vm.disk]]
size = "64MiB"
data = 0.01
sr = "far"
[[vm.disk]]
size = "3MiB"
data = 0.5
"#;

#[test]
fn xapi_http_transfers_follow_redirects_skip_holes_and_catch_errors_in_the_body() {
    let pool = Pool::start(TWO_HOSTS, |_| {});
    let out = pool.ok("backup", &["--vm", "web", "--transport", "http", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let redirects = pool.sim.stats.redirects.load(std::sync::atomic::Ordering::SeqCst);
    assert!(redirects >= 1, "the far disk's export went to xcp2");
    pool.assert_web_identical("over HTTP with a redirect");
    // The VHD export's block table lets 2 MiB blocks without data stay on the pool.
    let far = pool.disk_uuid("web", 0);
    let allocated = {
        let st = pool.sim.state();
        let d = &st.disks[&far];
        (0..32u64).filter(|b| (0..32).any(|k| d.allocated(b * 32 + k))).count() as u64
    };
    assert!(allocated < 28, "the scenario leaves some 2 MiB blocks empty ({allocated} of 32 hold data)");
    let served = pool.sim.stats.served.lock().unwrap().get(&far).copied().unwrap_or(0);
    assert!(served < (allocated + 1) * (2 << 20), "{served} bytes served for {allocated} blocks holding data");
    assert!(report["vms"][0]["bytes_read"].as_u64().unwrap() < 40 << 20, "{report}");

    // Restore into the far SR: the upload is redirected too (after an empty probe).
    pool.ok("restore", &["web@latest", "--name", "web-r", "--sr", "far"]);
    assert!(pool.sim.stats.redirects.load(std::sync::atomic::Ordering::SeqCst) > redirects);
    assert_eq!(pool.disks("web-r"), pool.disks("web"));

    // xen-api #4603: a 200 whose body is an HTTP error fails that VM with the pool's reason.
    pool.sim.hooks.lock().unwrap().fail("export", None, 1, xapi_sim::Fault::new("SR_BACKEND_FAILURE_46", ["", "x"]));
    let out = pool.xapi("backup", &["--vm", "web", "--transport", "http", "--json"]);
    assert!(!out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["vms"][0]["error"].as_str().unwrap().contains("SR_BACKEND_FAILURE_46"), "{report}");
    assert_eq!(pool.snapshots_on_pool(), 0);
    pool.env.ok(&["check", "--read-data"]);
}

#[test]
fn xapi_sim_exports_differencing_vhds_against_a_base_and_imports_them_as_deltas() {
    let pool = Pool::start(CBT_SCENARIO, |_| {});
    let s = pool.session();
    let web = pool.vm("web");
    let snap_vdi = |name: &str| {
        let snap = pool.call("VM.snapshot", &[&web, name]);
        let st = pool.sim.state();
        let vbd = st.db.refs(snap.as_str().unwrap(), "VBDs")[0].clone();
        let vdi = st.db.str(&vbd, "VDI");
        (vdi.clone(), st.db.str(&vdi, "uuid"))
    };
    let (a, a_uuid) = snap_vdi("a");
    let changed = [3u64, 4, 700];
    pool.write_blocks(&changed, false);
    let (b, b_uuid) = snap_vdi("b");
    let get = |q: &str| {
        let (status, head, body) = http(&pool, "GET", &format!("/export_raw_vdi?session_id={s}&{q}"), b"");
        assert_eq!(status, 200, "{head}");
        body
    };
    let base = get(&format!("vdi={a}&format=vhd"));
    let delta = get(&format!("vdi={b}&format=vhd&base={a_uuid}"));
    // Blocks 3 and 4 share a 2 MiB VHD block, 700 is in another: two blocks in the delta.
    assert!(delta.len() < 3 * (2 << 20), "{} bytes", delta.len());
    assert_eq!(u32::from_be_bytes(delta[60..64].try_into().unwrap()), 4, "a differencing disk");
    let (bp, dp) = (pool.env.path("base.vhd"), pool.env.path("delta.vhd"));
    std::fs::write(&bp, &base).unwrap();
    std::fs::write(&dp, &delta).unwrap();
    // vmvault reads the chain (the parent matched by unique id) as the newer snapshot.
    pool.env.ok(&["import", "--vm", "chain", &format!("xvda={}", dp.display()), "--parent", bp.to_str().unwrap()]);
    let got = pool.env.cmd().args(["cat", "chain@latest:xvda"]).output().unwrap().stdout;
    let want = read_all(&pool.sim.state().disks[&b_uuid]);
    assert!(got == want, "base + delta = the newer snapshot");
    // Raw with a base: full length, zeros outside the differing blocks.
    let raw = get(&format!("vdi={b}&format=raw&base={a}"));
    assert_eq!(raw.len(), want.len());
    assert!(raw[..2 << 20] == want[..2 << 20], "VHD block 0 holds 64 KiB blocks 3 and 4");
    assert!(raw[2 << 20..4 << 20].iter().all(|&x| x == 0) && want[2 << 20..4 << 20].iter().any(|&x| x != 0));
    // Uploading the base then the delta into a new VDI rebuilds it.
    let sr = pool.sim.state().db.str(&a, "SR");
    let rec = serde_json::json!({"SR": sr, "virtual_size": want.len(), "type": "user", "name_label": "rebuilt"});
    let params = vec![Value::from(s.clone()), rec];
    let new = xapi_sim::api::call(&pool.sim, "VDI.create", params).unwrap();
    for body in [&base, &delta] {
        let q = format!("/import_raw_vdi?session_id={s}&vdi={}&format=vhd", new.as_str().unwrap());
        let (status, head, _) = http(&pool, "PUT", &q, body);
        assert_eq!(status, 200, "{head}");
    }
    let uuid = pool.field(new.as_str().unwrap(), "uuid");
    assert!(read_all(&pool.sim.state().disks[&uuid]) == want);
    // A base outside the disk's tree is refused.
    let other = pool.disk_uuid("web", 1);
    let (status, _, _) =
        http(&pool, "GET", &format!("/export_raw_vdi?session_id={s}&vdi={b}&format=vhd&base={other}"), b"");
    assert_eq!(status, 500);
}

#[test]
fn xapi_cbt_bases_of_another_repository_are_kept_and_stale_ones_swept() {
    let pool = Pool::start(CBT_SCENARIO, |_| {});
    pool.backup_web(&["--cbt"]);
    let a = pool.cbt_bases();
    assert_eq!(a.len(), 2);
    // A second repository backing up the same VM keeps bases of its own.
    pool.env.ok(&["--repo", "other", "init", "--kdf-memory-kib", "256"]);
    pool.ok("backup", &["--repo", "other", "--vm", "web", "--cbt"]);
    let b: Vec<String> = pool.cbt_bases().into_iter().filter(|u| !a.contains(u)).collect();
    assert_eq!(b.len(), 2);
    // This repository's next backup is incremental against its own bases and replaces them.
    pool.write_blocks(&[9], false);
    let (vm, log) = pool.backup_web(&["--cbt"]);
    assert!(log.contains("CBT: xvda: 65536 bytes in 1 changed range(s)"), "{log}");
    assert_eq!(vm["bytes_read"], 65536);
    let now = pool.cbt_bases();
    assert!(b.iter().all(|u| now.contains(u)) && a.iter().all(|u| !now.contains(u)), "{now:?}");
    // Its latest snapshot forgotten, the bases it named are stale: the next CBT backup (a
    // full read: the snapshot before names bases already gone) destroys them.
    let latest = pool.env.json(&["snapshots"]).as_array().unwrap().last().unwrap()["id"].as_str().unwrap().to_string();
    pool.env.ok(&["forget", &latest]);
    let (_, log) = pool.backup_web(&["--cbt"]);
    assert!(log.contains("2 stale CBT base(s) of this repository destroyed"), "{log}");
    let end = pool.cbt_bases();
    assert_eq!(end.len(), 4, "2 of this repository, 2 of the other: {end:?}");
    assert!(b.iter().all(|u| end.contains(u)));
    pool.assert_web_identical("after the sweep");
    // CBT over HTTP, one export at a time: each disk's stream is let go after its last
    // changed range, so the second disk's export can start. xvda's last change is its last
    // block, so the audit's samples all lie before it.
    pool.write_blocks(&[3, 1023], false);
    {
        let uuid = pool.disk_uuid("web", 1);
        let mut st = pool.sim.state();
        st.disks.get_mut(&uuid).unwrap().write(65536, &[7u8; 65536]).unwrap();
    }
    // With an audit of each disk, whose reads must let the one export slot go too.
    let (vm, log) =
        pool.backup_web(&["--cbt", "--transport", "http", "--exports-at-once", "1", "--cbt-audit-every", "1"]);
    assert_eq!(vm["status"], "success", "{log}");
    assert!(log.contains("CBT audit of xvda") && log.contains("CBT audit of xvdb"), "{log}");
    assert!(log.contains("CBT: xvda: 131072 bytes in 2 changed range(s)"), "{log}");
    assert!(log.contains("CBT: xvdb: 65536 bytes in 1 changed range(s)"), "{log}");
    pool.assert_web_identical("after CBT over HTTP");
    // Read over HTTP, the bases were kept with their data: the next HTTP backup asks the pool
    // for the difference (base=) and reads only the 2 MiB blocks that differ.
    assert!(log.contains("2 kept as CBT base(s), 2 with its data"), "{log}");
    assert_eq!(pool.cbt_bases().len(), 2, "only the other repository's are change logs now");
    pool.write_blocks(&[40], false); // in xvda's second 2 MiB block
    {
        let uuid = pool.disk_uuid("web", 1);
        let mut st = pool.sim.state();
        st.disks.get_mut(&uuid).unwrap().write(3 << 20, &[9u8; 4096]).unwrap();
    }
    let (vm, log) = pool.backup_web(&["--cbt", "--transport", "http", "--exports-at-once", "1"]);
    assert_eq!(vm["status"], "success", "{log}");
    assert!(log.contains("delta: xvda: 2097152 bytes in 1 block(s) differ from its base"), "{log}");
    assert!(log.contains("delta: xvdb: 2097152 bytes in 1 block(s) differ from its base"), "{log}");
    let read = vm["bytes_read"].as_u64().unwrap();
    assert!((4 << 20..(4 << 20) + (128 << 10)).contains(&read), "two 2 MiB blocks and VHD heads: {read}");
    pool.assert_web_identical("after an HTTP delta");
    let with_data = || pool.count("VDI", |r| r["is_a_snapshot"] == Value::Bool(true) && r["type"] != "cbt_metadata");
    assert_eq!(with_data(), 2, "the new bases replaced the ones the difference was taken against");
    // Back on NBD, CBT works against bases that kept their data, which become change logs.
    pool.write_blocks(&[41], false);
    let (vm, log) = pool.backup_web(&["--cbt"]);
    assert!(log.contains("CBT: xvda: 65536 bytes in 1 changed range(s)"), "{log}");
    assert_eq!(vm["bytes_read"], 65536, "{log}");
    assert!(log.contains("2 kept as CBT base(s)") && !log.contains("with its data"), "{log}");
    assert_eq!(pool.cbt_bases().len(), 4);
    assert_eq!(with_data(), 0, "the bases that kept their data are destroyed once replaced");
    pool.assert_web_identical("after NBD again");
    pool.env.ok(&["check", "--read-data"]);
}
