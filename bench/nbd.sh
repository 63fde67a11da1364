#!/usr/bin/env bash
# Usage: bench/nbd.sh WORKDIR [VMVAULT_BIN]
#
# Serves the corpus image WORKDIR/day0.img (bench/corpus.sh) two ways in the same run —
# from a vmvault repository with `vmvault serve`, and as the raw file with `qemu-nbd -r` —
# and compares, RUNS times each (default 3), min / median / max of:
#   - sequential read of the whole export with `nbdcopy URI null:`: cold (fresh server, page
#     cache dropped) and warm (the same server, right after the cold read);
#   - random 4 KiB reads with fio (ioengine=nbd, QD 16, FIO_SECONDS, default 30), warm: IOPS;
#   - boot to marker: wall time of the fixtures/make-boot-guest.sh guest (TCG) from a vmvault
#     export versus from its raw disk file;
#   - peak RSS of the vmvault server while serving a 1 TiB sparse disk (nbdinfo --map,
#     nbdcopy of it to null, fio random reads on it), during the sequential reads of day0,
#     and under the fio load on day0 alone (the peak is reset in between).
# Writes a markdown report to stdout and WORKDIR/$OUT.md, raw values to WORKDIR/$OUT.tsv.
# Env: RUNS, FIO_SECONDS, VMVAULT_PASSWORD (default "bench-password"), SERVE_ARGS (extra
#      `vmvault serve` flags, e.g. "--read-cache-dir /dev/shm"), OUT (report name, default
#      nbd-results).
# Needs: qemu-utils (qemu-nbd), libnbd-bin (nbdcopy, nbdinfo), fio, qemu-system-x86.
set -euo pipefail

name=nbd.sh
# shellcheck source=bench/common.sh
source "$(dirname -- "$0")/common.sh"
runs=${RUNS:-3}
fio_seconds=${FIO_SECONDS:-30}
[[ -x $vmvault ]] || die "no vmvault binary (build with cargo build --release)"
for t in qemu-nbd nbdcopy nbdinfo fio qemu-system-x86_64; do
    command -v "$t" >/dev/null || die "$t missing (scripts/packages.sh installs it)"
done

repo=$work/nbd-repo
out=${OUT:-nbd-results}
tsv=$work/$out.tsv
read -r -a serve_args <<<"${SERVE_ARGS:-}"
: > "$tsv"
vm_port=10911
q_port=10912
img=$work/day0.img
guest=$work/boot-guest
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

record() { printf '%s\t%s\n' "$1" "$2" >> "$tsv"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f\n", b - a }'; }

if [[ ! -f $repo/config ]]; then
    log "backing up day0 and the 1 TiB sparse disk into $repo"
    "$vmvault" --repo "$repo" init -q >/dev/null
    "$vmvault" --repo "$repo" backup -q --vm day0 "xvda=$img" >/dev/null
    truncate -s 1T "$work/sparse1t.img"
    head -c $((64 << 20)) "$img" | dd of="$work/sparse1t.img" bs=1M seek=$((512 * 1024)) conv=notrunc status=none
    "$vmvault" --repo "$repo" backup -q --vm big "xvda=$work/sparse1t.img" >/dev/null
    rm -f "$work/sparse1t.img"
fi
if [[ ! -f $guest/ready ]]; then
    "$here/../fixtures/make-boot-guest.sh" "$guest" >/dev/null
fi
if ! "$vmvault" --repo "$repo" snapshots --json | grep -q '"vm": "tiny"'; then
    "$vmvault" --repo "$repo" backup -q --vm tiny "xvda=$guest/disk.img" >/dev/null
fi

# Start a server in the background; wait until it accepts connections.
start_vmvault() {
    "$vmvault" --repo "$repo" serve -q --listen "127.0.0.1:$vm_port" "${serve_args[@]}" >/dev/null &
    vm_pid=$!
    pids+=("$vm_pid")
    wait_port "$vm_port"
}
start_qemu_nbd() {
    qemu-nbd -r -t -f raw --shared=8 -b 127.0.0.1 -p "$q_port" "$img" &
    q_pid=$!
    pids+=("$q_pid")
    wait_port "$q_port"
}
wait_port() {
    for _ in $(seq 100); do
        nbdinfo --size "nbd://127.0.0.1:$1/" >/dev/null 2>&1 && return 0
        nbdinfo --list "nbd://127.0.0.1:$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "server on port $1 did not start"
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
hwm() { awk '/VmHWM/{print $2 * 1024}' "/proc/$1/status"; }

seq_read() {  # tool label uri
    local t0
    t0=$(now)
    nbdcopy "$3" null:
    record "$1-seq-$2" "$(elapsed "$t0")"
}
fio_iops() {  # label uri
    fio --name=r --ioengine=nbd --uri="$2" --rw=randread --bs=4k --iodepth=16 --time_based \
        --runtime="$fio_seconds" --output-format=json --output="$work/fio.json" >/dev/null
    record "$1-fio-iops" "$(python3 -c \
        'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"]))' "$work/fio.json")"
}

vm_uri=nbd://127.0.0.1:$vm_port/day0@latest/xvda
q_uri=nbd://127.0.0.1:$q_port/
for r in $(seq "$runs"); do
    log "run $r/$runs: sequential and random reads"
    drop_caches; start_qemu_nbd
    seq_read qemu-nbd cold "$q_uri"; seq_read qemu-nbd warm "$q_uri"
    fio_iops qemu-nbd "$q_uri"
    stop "$q_pid"
    drop_caches; start_vmvault
    seq_read vmvault cold "$vm_uri"; seq_read vmvault warm "$vm_uri"
    record vmvault-rss-seq "$(hwm "$vm_pid")"
    echo 5 > "/proc/$vm_pid/clear_refs"   # reset the peak: measure the fio phase alone
    fio_iops vmvault "$vm_uri"
    record vmvault-rss-fio "$(hwm "$vm_pid")"
    stop "$vm_pid"
done

boot() {  # drive
    local t0 out
    t0=$(now)
    out=$(qemu-system-x86_64 -accel tcg -machine q35 -m 256 -nographic -no-reboot -net none \
        -kernel "$guest/vmlinux" -initrd "$guest/initrd.cpio.gz" \
        -append 'console=ttyS0 quiet panic=-1' -drive "file=$1,format=raw,if=virtio,cache=none" </dev/null)
    grep -q VMVAULT-MARKER <<<"$out" || die "guest did not print its marker booting from $1"
    elapsed "$t0"
}
for r in $(seq "$runs"); do
    log "run $r/$runs: boot to marker"
    cp "$guest/disk.img" "$work/boot-copy.img"   # the guest writes; keep the fixture pristine
    record boot-raw "$(boot "$work/boot-copy.img")"
    "$vmvault" --repo "$repo" serve -q --listen "127.0.0.1:$vm_port" --writable \
        --overlay-dir "$work/nbd-overlays" --session "bench-$r" >/dev/null &
    vm_pid=$!; pids+=("$vm_pid"); wait_port "$vm_port"
    record boot-vmvault "$(boot "nbd://127.0.0.1:$vm_port/tiny@latest/xvda")"
    stop "$vm_pid"
    rm -rf "$work/nbd-overlays" "$work/boot-copy.img"
done

log "1 TiB sparse disk: RSS"
start_vmvault
big=nbd://127.0.0.1:$vm_port/big@latest/xvda
nbdinfo --map "$big" >/dev/null
t0=$(now); nbdcopy "$big" null:; record big-seq "$(elapsed "$t0")"
fio --name=r --ioengine=nbd --uri="$big" --rw=randread --bs=4k --iodepth=16 --time_based \
    --runtime=10 --offset=512g --size=64m >/dev/null
record vmvault-rss-1tib "$(hwm "$vm_pid")"
stop "$vm_pid"

python3 - "$tsv" "$runs" "$fio_seconds" <<'PY' | tee "$work/$out.md"
import statistics, sys
from collections import defaultdict
vals = defaultdict(list)
for line in open(sys.argv[1]):
    k, v = line.split("\t")
    vals[k].append(float(v))
def mmm(k, f="{:.2f}"):
    v = sorted(vals[k]); return " / ".join(f.format(x) for x in (v[0], statistics.median(v), v[-1]))
def med(k): return statistics.median(vals[k])
size = 2 * 1024**3
print(f"| measure ({sys.argv[2]} runs, min / median / max) | vmvault | qemu-nbd | ratio (median) | target |")
print("|---|---|---|---|---|")
for t in ("cold", "warm"):
    v, q = f"vmvault-seq-{t}", f"qemu-nbd-seq-{t}"
    print(f"| sequential read, {t} (s; nbdcopy to null, 2 GiB) | {mmm(v)} | {mmm(q)} | "
          f"{med(q) / med(v):.2f}× speed | ≥ 0.9× |")
print(f"| random 4 KiB reads, QD 16, {sys.argv[3]} s (IOPS) | {mmm('vmvault-fio-iops', '{:.0f}')} | "
      f"{mmm('qemu-nbd-fio-iops', '{:.0f}')} | {med('vmvault-fio-iops') / med('qemu-nbd-fio-iops'):.2f}× | ≥ 0.7× |")
print(f"| boot to marker (s; vmvault export vs raw file) | {mmm('boot-vmvault')} | {mmm('boot-raw')} (raw file) | "
      f"{med('boot-vmvault') / med('boot-raw'):.2f}× time | ≤ 1.2× |")
mib = lambda k: mmm(k, "{:.0f}").replace(" / ", " / ") 
rss = {k: [x / 2**20 for x in vals[k]] for k in ("vmvault-rss-fio", "vmvault-rss-1tib")}
rss["vmvault-rss-seq"] = [x / 2**20 for x in vals["vmvault-rss-seq"]]
for k, label in (("vmvault-rss-seq", "server peak RSS, sequential reads of day0 (MiB)"), ("vmvault-rss-fio", "server peak RSS under fio on day0 (MiB)"), ("vmvault-rss-1tib", "server peak RSS, 1 TiB sparse disk (MiB)")):
    v = sorted(rss[k])
    print(f"| {label} | {' / '.join(f'{x:.0f}' for x in (v[0], statistics.median(v), v[-1]))} | | | ≤ 256 |")
print(f"| nbdcopy of the 1 TiB sparse disk (s) | {mmm('big-seq')} | | | |")
PY
