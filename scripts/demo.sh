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
