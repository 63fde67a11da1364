#!/usr/bin/env bash
# Usage: bench/xapi.sh WORKDIR [VMVAULT_BIN]
#
# Capture from a pool (issue 5): the 2 GiB corpus disk (WORKDIR/day0.img, bench/corpus.sh) as
# the disk of a VM in the XAPI simulator on loopback, backed up into a fresh repository by
#   - local:    `vmvault backup` reading the image file itself (the baseline),
#   - nbd:      `vmvault xapi backup --transport nbd` (plain NBD, purpose insecure_nbd),
#   - nbd-tls:  the same against a second simulator whose network has purpose nbd (TLS),
#   - http:     `vmvault xapi backup --transport http` (/export_raw_vdi?format=vhd, parsed as
#               it streams: blocks without data are not sent),
#   - http-raw: the same with `--full` (format=raw: every byte of the disk crosses),
# and, from one `--cbt` baseline, `--cbt` incrementals after the guest wrote 1 % of the disk
# through the simulator's write hook (new places each run): `scattered` = random 64 KiB
# blocks, `clustered` = random 1 MiB runs (the chunk size: a file rewritten whole); `0pct` =
# nothing written (what every CBT run costs whatever changed: the repository's passphrase KDF,
# the pool's calls, the commit); `open` = `vmvault snapshots` (opening the repository: the
# KDF). The `-64k` rows repeat the full and the CBT runs in a repository made with
# `init --chunker fixed:64K` (FORMAT.md §6.4: for disks with scattered churn), compared with
# the full backup into that kind of repository.
# RUNS times each (default 3), wall time and peak RSS (/usr/bin/time), min / median / max,
# MB/s of the disk's 2 GiB. Targets: NBD and HTTP close to the local read; a CBT incremental
# with 1 % changed ≤ 3 % of the full NBD backup's time. Page cache warm (the simulator's
# layer files and the image are read once first). Writes a markdown report to stdout and
# WORKDIR/xapi-results.md, raw values to WORKDIR/xapi-results.tsv.
# Env: RUNS (default 3). IMAGE=PATH backs up that image instead of day0.img; with CBT_ONLY=1
# only the NBD full and the CBT cases run (results in WORKDIR/xapi-scale-results.*): how the
# CBT ratio scales with the disk (e.g. IMAGE=an 8 GiB concatenation of day0..day3.img).
set -euo pipefail

name=xapi.sh
# shellcheck source=bench/common.sh
source "$(dirname -- "$0")/common.sh"
runs=${RUNS:-3}
[[ -x $vmvault ]] || die "no vmvault binary (${vmvault:-none found}); build with cargo build --release"
sim_bin=$(dirname -- "$vmvault")/xapi-sim
[[ -x $sim_bin ]] || die "no xapi-sim next to $vmvault; build with cargo build --release"
[[ -x /usr/bin/time ]] || { apt-get update -qq && apt-get install -y -qq time >&2; }

image=${IMAGE:-$work/day0.img}
only_cbt=${CBT_ONLY:-0}
results=$work/xapi-results
[[ $only_cbt == 1 ]] && results=$work/xapi-scale-results
size=$(stat -c %s "$image")
dir=$work/xapi
tsv=$results.tsv
rm -rf "$dir" && mkdir -p "$dir"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf -- "$dir"' EXIT

# start PURPOSE: a simulator whose VM "big" has $image as its disk; sets $url.
start() {
    local d=$dir/sim-$1
    mkdir -p "$d"
    cat >"$d/pool.toml" <<TOML
[[network]]
name = "lan"
purpose = ["$1"]
[[vm]]
name = "big"
seed = 1
[[vm.disk]]
image = "$image"
TOML
    "$sim_bin" --listen 127.0.0.1:0 --scenario "$d/pool.toml" --data-dir "$d" >"$d/log" 2>&1 &
    pids+=($!)
    for _ in $(seq 600); do grep -q listening "$d/log" && break; sleep 0.1; done
    grep -q listening "$d/log" || die "the simulator did not start: $(cat "$d/log")"
    url=$(grep -o 'http://[0-9.:]*' "$d/log")
}
log "loading $image into the simulators"
start insecure_nbd
plain=$url
if [[ $only_cbt != 1 ]]; then
    start nbd
    tls=https://${url#http://}
fi
export VMVAULT_XAPI_PASSWORD=password VMVAULT_PASSWORD=bench

printf 'case\trun\tseconds\tmax_rss_kib\tbytes_read\n' >"$tsv"
# timed CASE RUN REPO COMMAND...: time a backup into a repository made just before.
timed() {
    local c=$1 r=$2 repo=$3
    shift 3
    /usr/bin/time -f '%e %M' -o "$dir/time" "$@" --json >"$dir/out.json" 2>"$dir/err" ||
        die "$c run $r failed: $(tail -5 "$dir/err")"
    read -r secs rss <"$dir/time"
    local read
    read=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["vms"][0]["bytes_read"] if "vms" in d else d["snapshot"]["summary"]["read_bytes"])' "$dir/out.json")
    printf '%s\t%s\t%s\t%s\t%s\n' "$c" "$r" "$secs" "$rss" "$read" >>"$tsv"
}
fresh() {
    rm -rf "$dir/repo"
    "$vmvault" -r "$dir/repo" init -q >/dev/null
    echo "$dir/repo"
}
cat "$image" >/dev/null
for r in $(seq "$runs"); do
    repo=$(fresh)
    timed nbd "$r" "$repo" "$vmvault" -r "$repo" xapi backup --host "$plain" --vm big --transport nbd
    [[ $only_cbt == 1 ]] && continue
    repo=$(fresh)
    timed local "$r" "$repo" "$vmvault" -r "$repo" backup -q --vm big xvda="$image"
    repo=$(fresh)
    timed nbd-tls "$r" "$repo" "$vmvault" -r "$repo" xapi backup --host "$tls" --insecure --vm big --transport nbd
    repo=$(fresh)
    timed http "$r" "$repo" "$vmvault" -r "$repo" xapi backup --host "$plain" --vm big --transport http
    if [[ $r == "$runs" ]]; then
        "$vmvault" -r "$repo" cat big@latest:xvda | cmp - "$image" || die "the VHD-streamed disk differs from $image"
    fi
    repo=$(fresh)
    timed http-raw "$r" "$repo" "$vmvault" -r "$repo" xapi backup --host "$plain" --vm big --transport http --full
done
# The last repository holds a backup of the disk; check it once against the image.
"$vmvault" -r "$dir/repo" cat big@latest:xvda | cmp - "$image" || die "the captured disk differs from $image"

# write RUN SHAPE: the guest writes 1 % of the disk (SHAPE scattered or clustered).
write() {
    python3 - "$plain" "$1" "$2" "$size" <<'PY'
import random, sys, urllib.request
url, run, shape, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
blocks = size // 65536
mibs = size >> 20
rng = random.Random(run * 2 + (shape == "clustered"))
if shape == "scattered":   # 1 % of the 64 KiB blocks, anywhere
    writes = [(b * 65536, 65536) for b in rng.sample(range(blocks), blocks // 100)]
else:                      # 1 % of the disk as 1 MiB runs (files rewritten whole)
    writes = [(m << 20, 1 << 20) for m in rng.sample(range(mibs), mibs // 100)]
for off, n in writes:
    q = f"{url}/sim/write?vm=big&disk=0&offset={off}&len={n}&seed={run * 100000 + off // 65536}"
    urllib.request.urlopen(urllib.request.Request(q, method="POST")).read()
PY
}
# check REPO: its latest backup is the simulator's disk.
check() {
    "$vmvault" -r "$1" cat big@latest:xvda >"$dir/cbt.raw"
    python3 - "$plain" "$dir/cbt.raw" <<'PY' || die "the CBT backup in $1 differs from the simulator's disk"
import sys, urllib.request
want = urllib.request.urlopen(f"{sys.argv[1]}/sim/disk?vm=big&disk=0").read()
sys.exit(0 if open(sys.argv[2], "rb").read() == want else 1)
PY
    rm -f "$dir/cbt.raw"
}
cbt=(xapi backup --host "$plain" --vm big --cbt --cbt-audit-every 0)
repo=$(fresh)
"$vmvault" -r "$repo" xapi backup -q --host "$plain" --vm big --cbt >/dev/null 2>&1 || die "CBT baseline failed"
for r in $(seq "$runs"); do
    for shape in scattered clustered; do
        write "$((2 * r))" "$shape"
        timed "cbt-1pct-$shape" "$r" "$repo" "$vmvault" -r "$repo" "${cbt[@]}"
        grep -q "changed range" "$dir/err" || die "the CBT run did not use CBT: $(cat "$dir/err")"
    done
    timed cbt-0pct "$r" "$repo" "$vmvault" -r "$repo" "${cbt[@]}"
    /usr/bin/time -f '%e %M' -o "$dir/time" "$vmvault" -r "$repo" snapshots -q >/dev/null
    read -r secs rss <"$dir/time"
    printf 'open\t%s\t%s\t%s\t0\n' "$r" "$secs" "$rss" >>"$tsv"
done
check "$repo"
# The same in a fixed:64K repository, a new one each run: a full (CBT on: the baseline of
# the incrementals that follow), then the two shapes.
repo64=$dir/repo64
for r in $(seq "$runs"); do
    rm -rf "$repo64"
    "$vmvault" -r "$repo64" init -q --chunker fixed:64K >/dev/null
    timed nbd-64k "$r" "$repo64" "$vmvault" -r "$repo64" "${cbt[@]}"
    for shape in scattered clustered; do
        write "$((2 * r + 1))" "$shape"
        timed "cbt-1pct-$shape-64k" "$r" "$repo64" "$vmvault" -r "$repo64" "${cbt[@]}"
        grep -q "changed range" "$dir/err" || die "the CBT run did not use CBT: $(cat "$dir/err")"
    done
done
check "$repo64"

python3 - "$tsv" "$results.md" "$size" <<'PY'
import sys, statistics as st
rows = [l.rstrip('\n').split('\t') for l in open(sys.argv[1])][1:]
def vals(case, col):
    return [float(r[col]) for r in rows if r[0] == case]
size = int(sys.argv[3])
local = st.median(vals("local", 2) or [float("nan")])
full = st.median(vals("nbd", 2))
full64 = st.median(vals("nbd-64k", 2))
out = ["| case | time s (min / median / max) | MB/s (median) | read from the source MiB (median) | peak RSS MiB (median) | vs local (median) | vs the NBD full, same repository kind (median) |",
       "|---|---|---|---|---|---|---|"]
cases = ("local", "nbd", "nbd-tls", "http", "http-raw", "cbt-1pct-scattered", "cbt-1pct-clustered", "cbt-0pct",
         "open", "nbd-64k", "cbt-1pct-scattered-64k", "cbt-1pct-clustered-64k")
for case in cases:
    t = vals(case, 2)
    if not t:
        continue  # not run (CBT_ONLY)
    m = st.median(t)
    base = full64 if case.endswith("64k") else full
    out.append(f"| {case} | {min(t):.2f} / {m:.2f} / {max(t):.2f} | {size / m / 1e6:.0f} | "
               f"{st.median(vals(case, 4)) / 2**20:.0f} | {st.median(vals(case, 3)) / 1024:.0f} | "
               f"{m / local:.2f}× | {m / base * 100:.1f} % |".replace("nan×", "—"))
fixed = st.median(vals("cbt-0pct", 2))
out.append("")
out.append(f"A CBT run with nothing changed takes {fixed:.2f} s (opening the repository alone: "
           f"{st.median(vals('open', 2)):.2f} s). Beyond that, 1 % changed costs (median minus that): "
           + ", ".join(f"{c} {(st.median(vals(c, 2)) - fixed) / (full64 if c.endswith('64k') else full) * 100:.1f} %"
                       for c in ("cbt-1pct-scattered", "cbt-1pct-clustered", "cbt-1pct-scattered-64k", "cbt-1pct-clustered-64k"))
           + " of the full backup into the same kind of repository.")
text = "\n".join(out) + "\n"
open(sys.argv[2], "w").write(text)
print(text)
PY
