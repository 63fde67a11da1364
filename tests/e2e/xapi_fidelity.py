#!/usr/bin/env python3
"""Drive the XAPI simulator with the official XenAPI Python client (pip install XenAPI) and
raw JSON-RPC, checking what a client nobody here wrote expects. Usage: xapi_fidelity.py URL"""

import base64
import json
import sys
import time
import urllib.request

import XenAPI

URL = sys.argv[1]


def check(cond, what):
    if not cond:
        print("FAILED:", what)
        sys.exit(1)


def failure(fn, *args):
    try:
        fn(*args)
    except XenAPI.Failure as f:
        return f.details
    return None


# Login with 2 and 4 arguments; a wrong password is SESSION_AUTHENTICATION_FAILED.
s = XenAPI.Session(URL)
s.xenapi.login_with_password("root", "password", "2.0", "fidelity")
s2 = XenAPI.Session(URL)
s2.xenapi.login_with_password("root", "password")
bad = XenAPI.Session(URL)
d = failure(bad.xenapi.login_with_password, "root", "wrong")
check(d and d[0] == "SESSION_AUTHENTICATION_FAILED" and d[1] == "root", f"bad password: {d}")
x = s.xenapi

# Records: types as XAPI sends them over XML-RPC (ints as strings, bools, datetimes).
vms = x.VM.get_all_records()
names = sorted(v["name_label"] for v in vms.values() if not v["is_control_domain"])
check(names == ["db", "mail", "test", "web"], f"VM names {names}")
dom0 = [v for v in vms.values() if v["is_control_domain"]]
check(len(dom0) == 1 and dom0[0]["power_state"] == "Running" and dom0[0]["domid"] == "0", f"dom0 {dom0}")
host = x.host.get_all()[0]
check(x.host.get_control_domain(host) == x.VM.get_by_uuid(dom0[0]["uuid"]), "host.control_domain is dom0")
web = x.VM.get_by_name_label("web")[0]
rec = x.VM.get_record(web)
check(rec["power_state"] == "Running" and rec["memory_static_max"] == str(1 << 30), "VM record fields")
check(isinstance(rec["is_a_template"], bool), "bools are <boolean>")
check(str(rec["snapshot_time"]).startswith("19700101T"), f"datetime {rec['snapshot_time']!r}")
check(x.VM.get_uuid(web) == rec["uuid"] and x.VM.get_by_uuid(rec["uuid"]) == web, "uuid lookups")
check(rec["tags"] == ["prod"], "tags")

# Errors: bad ref, bad uuid, unknown method, arity, power state.
d = failure(x.VM.get_record, "OpaqueRef:00000000-0000-0000-0000-000000000000")
check(d and d[0] == "HANDLE_INVALID" and d[1] == "VM", f"bad ref: {d}")
d = failure(x.VDI.get_by_uuid, "nope")
check(d and d[0] == "UUID_INVALID", f"bad uuid: {d}")
d = failure(x.VM.frobnicate, web)
check(d and d[0] == "MESSAGE_METHOD_UNKNOWN", f"unknown method: {d}")
d = failure(x.VM.get_record)
check(d and d[0] == "MESSAGE_PARAMETER_COUNT_MISMATCH", f"arity: {d}")
mail = x.VM.get_by_name_label("mail")[0]
d = failure(x.VM.checkpoint, mail, "cp")
check(d and d[0] == "VM_BAD_POWER_STATE" and d[2] == "paused, suspended, running" and d[3] == "halted", f"checkpoint halted: {d}")

# Snapshot and checkpoint semantics.
snap = x.VM.snapshot(web, "snap1")
sr = x.VM.get_record(snap)
check(sr["is_a_snapshot"] and sr["is_a_template"] and sr["snapshot_of"] == web, "snapshot flags")
check(sr["power_state"] == "Halted" and sr["suspend_VDI"] == "OpaqueRef:NULL", "snapshot has no memory")
check(sr["snapshot_info"]["power-state-at-snapshot"] == "Running", "snapshot_info")
check(snap in x.VM.get_snapshots(web), "VM.snapshots")
cp = x.VM.checkpoint(web, "cp1")
cr = x.VM.get_record(cp)
check(cr["power_state"] == "Suspended" and x.VDI.get_type(cr["suspend_VDI"]) == "suspend", "checkpoint memory")
disks = [x.VBD.get_VDI(v) for v in cr["VBDs"] if x.VBD.get_type(v) == "Disk"]
check(all(x.VDI.get_is_a_snapshot(v) for v in disks), "snapshot VDIs")
d = failure(x.VM.destroy, web)
check(d and d[0] == "VM_BAD_POWER_STATE", f"destroy running VM: {d}")

# Async + tasks: result is an XML-RPC fragment.
task = x.Async.VM.snapshot(web, "snap2")
while x.task.get_status(task) == "pending":
    time.sleep(0.05)
t = x.task.get_record(task)
check(t["status"] == "success" and t["result"].startswith("<value>OpaqueRef:"), f"task result {t['result']!r}")
x.task.destroy(task)
task = x.Async.VM.checkpoint(mail, "x")
while x.task.get_status(task) == "pending":
    time.sleep(0.05)
check(x.task.get_error_info(task)[0] == "VM_BAD_POWER_STATE", "task error_info")

# CBT: enable, snapshot, write through the test hook, snapshot, list_changed_blocks.
vbd0 = [v for v in x.VM.get_VBDs(web) if x.VBD.get_userdevice(v) == "0"][0]
vdi = x.VBD.get_VDI(vbd0)
x.VDI.enable_cbt(vdi)
check(x.VDI.get_cbt_enabled(vdi), "cbt_enabled")
a = x.VM.snapshot(web, "cbt-a")
uuid = x.VDI.get_uuid(vdi)
req = urllib.request.Request(f"{URL}/sim/write?vdi={uuid}&offset={5 * 65536 + 100}&len=70000&seed=9", method="POST", data=b"")
urllib.request.urlopen(req).read()
b = x.VM.snapshot(web, "cbt-b")
va = [x.VBD.get_VDI(v) for v in x.VM.get_VBDs(a) if x.VBD.get_userdevice(v) == "0"][0]
vb = [x.VBD.get_VDI(v) for v in x.VM.get_VBDs(b) if x.VBD.get_userdevice(v) == "0"][0]
check(x.VDI.get_cbt_enabled(va) and x.VDI.get_cbt_enabled(vb), "CBT propagates to snapshots")
bitmap = base64.b64decode(x.VDI.list_changed_blocks(va, vb))
size = int(x.VDI.get_virtual_size(vdi))
check(len(bitmap) == (size // 65536 + 7) // 8, "bitmap length")
bits = [i for i in range(len(bitmap) * 8) if bitmap[i // 8] & (0x80 >> (i % 8))]
check(bits == [5, 6], f"changed blocks MSB first: {bits}")
d = failure(x.VDI.enable_cbt, va)
check(d and d[0] == "OPERATION_NOT_ALLOWED", f"CBT on a snapshot: {d}")
d = failure(x.VDI.data_destroy, vdi)
check(d and d[0] == "OPERATION_NOT_ALLOWED", f"data_destroy on a live VDI: {d}")
x.VM.destroy(a)
x.VDI.data_destroy(va)
check(x.VDI.get_type(va) == "cbt_metadata", "data_destroy -> cbt_metadata")
check(x.VDI.list_changed_blocks(va, vb) == base64.b64encode(bitmap).decode(), "CBT from cbt_metadata")
d = failure(x.VDI.get_nbd_info, va)
check(d and d[0] == "VDI_INCOMPATIBLE_TYPE", f"nbd info on cbt_metadata: {d}")
other = x.VBD.get_VDI([v for v in x.VM.get_VBDs(mail)][0])
x.VDI.enable_cbt(other)
c = x.VM.snapshot(mail, "other")
vc = x.VBD.get_VDI(x.VM.get_VBDs(c)[0])
d = failure(x.VDI.list_changed_blocks, va, vc)
check(d and d[0] == "SR_BACKEND_FAILURE_460", f"unrelated VDIs: {d}")

# Events.
ev = getattr(x.event, "from")(["vm"], "", 1.0)
check(len(ev["events"]) >= 4 and all(e["class"] == "vm" for e in ev["events"]), "event.from initial")
token = ev["token"]
x.VM.set_name_description(mail, "changed")
ev = getattr(x.event, "from")(["vm"], token, 5.0)
check(any(e["ref"] == mail and e["operation"] == "mod" for e in ev["events"]), "event.from mod")
t0 = time.time()
ev = getattr(x.event, "from")(["vm"], ev["token"], 0.3)
check(ev["events"] == [] and time.time() - t0 >= 0.25, "event.from timeout")

# NBD (§6), with libnbd's nbdinfo/nbdcopy as the client: no NBD network, no info; with
# insecure_nbd, a snapshot disk copies byte-identical; with nbd (TLS), plain text is refused.
import subprocess, tempfile, urllib.parse
lan = x.network.get_by_name_label("lan")[0]
wsnap = x.VM.snapshot(web, "nbd")
wvdi = [x.VBD.get_VDI(v) for v in x.VM.get_VBDs(wsnap) if x.VBD.get_type(v) == "Disk"][0]
check(x.VDI.get_nbd_info(wvdi) == [], "no NBD network: no NBD info")
x.network.add_purpose(lan, "insecure_nbd")
info = x.VDI.get_nbd_info(wvdi)
check(len(info) == 1 and info[0]["exportname"].startswith("/" + x.VDI.get_uuid(wvdi) + "?session_id=")
      and info[0]["cert"].startswith("-----BEGIN CERTIFICATE-----") and info[0]["subject"], f"nbd info {info}")
nbd_url = "nbd://%s:%s/%s" % (info[0]["address"], info[0]["port"], urllib.parse.quote(info[0]["exportname"], safe=""))
out = subprocess.run(["nbdinfo", "--json", nbd_url], capture_output=True, text=True)
check(out.returncode == 0, f"nbdinfo: {out.stderr}")
exp = json.loads(out.stdout)["exports"][0]
check(exp["export-size"] == int(x.VDI.get_virtual_size(wvdi)) and exp["is_read_only"], f"nbdinfo: {exp}")
with tempfile.TemporaryDirectory() as tmp:
    copy = subprocess.run(["nbdcopy", nbd_url, f"{tmp}/d.raw"], capture_output=True, text=True)
    check(copy.returncode == 0, f"nbdcopy: {copy.stderr}")
    oracle = urllib.request.urlopen(f"{URL}/sim/disk?vdi={x.VDI.get_uuid(wvdi)}").read()
    check(open(f"{tmp}/d.raw", "rb").read() == oracle, "nbdcopy copied the disk byte-identical")
x.network.remove_purpose(lan, "insecure_nbd")
x.network.add_purpose(lan, "nbd")
out = subprocess.run(["nbdinfo", nbd_url], capture_output=True, text=True)
check(out.returncode != 0, "a FORCEDTLS NBD server refuses plain text")
x.network.remove_purpose(lan, "nbd")
x.VM.destroy(wsnap)
x.VDI.destroy(wvdi)

# JSON-RPC: the same session, numbers as numbers, v1 errors.
sid = s._session
body = json.dumps({"method": "VM.get_record", "params": [sid, web], "id": 7}).encode()
r = json.loads(urllib.request.urlopen(urllib.request.Request(f"{URL}/jsonrpc", data=body, headers={"Content-Type": "application/json"})).read())
check(r["id"] == 7 and r["error"] is None and r["result"]["memory_static_max"] == 1 << 30, f"JSON-RPC: {r}")
body = json.dumps({"jsonrpc": "2.0", "method": "VM.get_record", "params": [sid, "OpaqueRef:x"], "id": 8}).encode()
r = json.loads(urllib.request.urlopen(urllib.request.Request(f"{URL}/jsonrpc", data=body)).read())
check(r["error"]["message"] == "HANDLE_INVALID" and r["error"]["data"] == ["VM", "OpaqueRef:x"], f"JSON-RPC 2.0 error: {r}")

# A logged-out session is invalid (asked with the raw XML-RPC proxy: XenAPI.Session would
# log in again by itself); the other session still works.
import xmlrpc.client
raw = xmlrpc.client.ServerProxy(URL)
gone = s2._session
s2.xenapi.session.logout()
r = raw.VM.get_all(gone)
check(r["Status"] == "Failure" and r["ErrorDescription"][0] == "SESSION_INVALID", f"after logout: {r}")
check(len(x.VM.get_all()) >= 4, "other session")
s.xenapi.session.logout()
print("fidelity: all checks passed")
