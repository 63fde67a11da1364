#!/usr/bin/env bash
# The quickstart: build vmvault, make a small ext4 disk image and a "next day" version of it,
# back both up, list, restore, prove the restores byte-identical, and show the dedup figures.
# Usage: scripts/demo.sh          (work files go to ./demo, replaced on every run)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/packages.sh
cargo build --release --locked -q
vmvault() { target/release/vmvault "$@"; }

rm -rf demo && mkdir demo
echo "== building a disk image (ext4 from a directory tree, no mounting)"
fixtures/make-tree.sh demo/tree 1 >/dev/null
offset=$(fixtures/make-ext4-image.sh demo/tree demo/day0.img 256 2>/dev/null | tail -n 1)
fixtures/next-day.sh demo/day0.img demo/day1.img "$offset" 1 >/dev/null 2>&1
# A memory image: mostly zero pages with some data, like a small idle guest.
truncate -s 64M demo/mem.img
head -c 6M demo/day0.img | dd of=demo/mem.img bs=1M seek=10 conv=notrunc status=none
printf '{"name_label": "web01", "VCPUs_max": 2, "memory_static_max": 67108864}\n' > demo/vm.json

export VMVAULT_REPO=demo/repo VMVAULT_PASSWORD=demo-passphrase
echo "== vmvault init"
vmvault init
echo "== day 0 backup"
cp --sparse=always demo/day0.img demo/disk.img
vmvault backup --vm web01 xvda=demo/disk.img --memory demo/mem.img --meta demo/vm.json --tag demo
echo "== day 1 backup (the image changed through debugfs)"
cp --sparse=always demo/day1.img demo/disk.img
vmvault backup --vm web01 xvda=demo/disk.img --memory demo/mem.img --meta demo/vm.json --tag demo
echo "== vmvault snapshots"
vmvault snapshots
echo "== restore both days and compare"
first=$(vmvault snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"][:8])')
vmvault restore "$first:xvda" --target demo/restored-day0.raw
vmvault restore web01@latest:xvda --target demo/restored-day1.raw
vmvault restore web01@latest:memory --target demo/restored-mem.raw
cmp demo/restored-day0.raw demo/day0.img && echo "day 0 restore is byte-identical"
cmp demo/restored-day1.raw demo/day1.img && echo "day 1 restore is byte-identical"
cmp demo/restored-mem.raw demo/mem.img && echo "memory restore is byte-identical"
echo "== vmvault check --read-data"
vmvault check --read-data
echo "== vmvault stats"
vmvault stats
echo "== keep only the newest snapshot, and delete the data only day 0 used"
vmvault forget --keep-last 1 --prune
vmvault check
vmvault restore web01@latest:xvda --target demo/restored-day1.raw --overwrite
cmp demo/restored-day1.raw demo/day1.img && echo "day 1 still restores byte-identically after prune"
echo "== export the newest snapshot as a dynamic VHD and as an XVA, and check them"
vmvault export web01@latest:xvda --format vhd -o demo/xvda.vhd --overwrite
qemu-img compare -f vpc -F raw demo/xvda.vhd demo/day1.img
vmvault export web01@latest --format xva -o demo/web01.xva --overwrite
vmvault import demo/web01.xva --vm web01-from-xva
vmvault restore web01-from-xva@latest:xvda --target demo/restored-xva.raw --overwrite
cmp demo/restored-xva.raw demo/day1.img && echo "the XVA round trip is byte-identical"

echo "== capture from a XenServer / XCP-ng pool: the XAPI simulator (fixtures/xapi-sim)"
# web01 runs with the day-1 disk and 32 MiB of memory; db01 is suspended; mail01 is halted;
# scratch is tagged no-backup.
cat > demo/pool.toml <<'TOML'
[pool]
name = "demo pool"
[[network]]
name = "Pool-wide network associated with eth0"
purpose = ["nbd"]     # disks are read over NBD, with TLS
[[vm]]
name = "web01"
tags = ["prod"]
power_state = "Running"
memory_image = "32MiB"
vcpus = 2
seed = 1
[[vm.disk]]
image = "day1.img"
[[vm.vif]]
network = "Pool-wide network associated with eth0"
[[vm]]
name = "db01"
tags = ["prod"]
power_state = "Suspended"
memory_image = "16MiB"
seed = 2
[[vm.disk]]
size = "64MiB"
data = 0.3
[[vm]]
name = "mail01"
tags = ["prod"]
seed = 3
[[vm.disk]]
size = "32MiB"
data = 0.2
[[vm]]
name = "scratch"
tags = ["prod", "no-backup"]
power_state = "Running"
seed = 4
[[vm.disk]]
size = "16MiB"
TOML
target/release/xapi-sim --listen 127.0.0.1:0 --scenario demo/pool.toml --data-dir demo/sim >demo/sim.log 2>&1 &
sim=$!
trap 'kill $sim 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q listening demo/sim.log && break; sleep 0.1; done
cat demo/sim.log
host=$(grep -o 'https://[0-9.:]*' demo/sim.log)
pin=$(grep -o 'sha256:[0-9a-f]*' demo/sim.log)
export VMVAULT_XAPI_HOST=$host VMVAULT_XAPI_PASSWORD=password
vmvault xapi vms --fingerprint "$pin"
echo "== vmvault xapi backup --tag prod --exclude-tag no-backup --memory --cbt"
vmvault xapi backup --fingerprint "$pin" --tag prod --exclude-tag no-backup --memory --cbt
echo "== the guest of db01 writes 1 MiB; the next backup reads only the changed blocks (CBT)"
python3 -c 'import sys, urllib.request as u; print(u.urlopen(u.Request(sys.argv[1], method="POST")).read().decode())' \
    "http://${host#https://}/sim/write?vm=db01&disk=0&offset=4194304&len=1048576&seed=7"
vmvault xapi backup --fingerprint "$pin" --vm db01 --cbt
vmvault snapshots
echo "== files inside web01's disk, as captured from the pool"
vmvault ls web01@latest:/xvda/p1/ | head
echo "== restore web01 to the pool as a new VM, suspended with its memory, and resume it"
vmvault xapi restore web01@latest --fingerprint "$pin" --name web01-restored --suspended --start
echo "== package db01 (suspended, with its memory) as an XVA and import it into the pool (PUT /import)"
vmvault export db01@latest --format xva -o demo/db01.xva
python3 - "http://${host#https://}" demo/db01.xva <<'PY'
import json, sys, time, urllib.request as u
base, path = sys.argv[1], sys.argv[2]
def call(method, *params):
    body = json.dumps({"jsonrpc": "2.0", "method": method, "params": list(params), "id": 1}).encode()
    req = u.Request(base + "/jsonrpc", data=body, headers={"content-type": "application/json"})
    return json.load(u.urlopen(req))["result"]
s = call("session.login_with_password", "root", "password")
data = open(path, "rb").read()
resp = u.urlopen(u.Request(f"{base}/import?session_id={s}", data=data, method="PUT"))
task = resp.headers["task-id"]
while call("task.get_status", s, task) == "pending":
    time.sleep(0.1)
result = call("task.get_result", s, task)
vm = result[result.index("OpaqueRef:"):].split("<")[0]
call("VM.set_name_label", s, vm, "db01-from-xva")
print(f"imported {len(data) >> 20} MiB: db01-from-xva is {call('VM.get_power_state', s, vm)}")
PY
vmvault xapi vms --fingerprint "$pin"
