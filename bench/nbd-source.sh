#!/usr/bin/env bash
# Usage: bench/nbd-source.sh WORKDIR [VMVAULT_BIN]
#
# Backup from an NBD export: WORKDIR/day0.img (2 GiB, 1.25 GiB allocated, bench/corpus.sh)
# served read-only by qemu-nbd over a Unix socket, backed up into a fresh repository each run by
#   - local: `vmvault backup xvda=day0.img` (the file itself: the baseline),
#   - nbd:   `vmvault backup xvda=nbd+unix:///disk0?socket=…` (block status skips the holes),
# and read by the peer `nbdcopy … null:` (libnbd: block status, 4 connections, no processing —
# how fast the export can be read at all). RUNS times each (default 3), page cache warm, wall
# time and peak RSS (/usr/bin/time), min / median / max. Target: nbd close to local. Writes a
# markdown table to stdout and WORKDIR/nbd-source-results.md; raw values to
# WORKDIR/nbd-source-results.tsv.
set -euo pipefail

name=nbd-source.sh
# shellcheck source=bench/common.sh
source "$(dirname -- "$0")/common.sh"
runs=${RUNS:-3}
[[ -x $vmvault ]] || die "no vmvault binary (${vmvault:-none found}); build with cargo build --release"
command -v qemu-nbd >/dev/null || apt-get install -y -qq qemu-utils >&2
command -v nbdcopy >/dev/null || apt-get install -y -qq libnbd-bin >&2
[[ -x /usr/bin/time ]] || apt-get install -y -qq time >&2

dir=$work/nbd-source
tsv=$work/nbd-source-results.tsv
rm -rf "$dir" && mkdir -p "$dir"
sock=$dir/nbd.sock
qemu-nbd -r -t -e 4 -f raw -x disk0 -k "$sock" "$work/day0.img" &
srv=$!
trap 'kill "$srv" 2>/dev/null || true; rm -rf -- "$dir"' EXIT
for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
[[ -S $sock ]] || die "qemu-nbd did not start"
uri="nbd+unix:///disk0?socket=$sock"

printf 'case\trun\tseconds\tmax_rss_kib\tread_bytes\n' >"$tsv"
# timed CASE RUN COMMAND...
timed() {
    local c=$1 r=$2
    shift 2
    /usr/bin/time -f '%e %M' -o "$dir/time" "$@" >"$dir/out" 2>"$dir/err" || die "$c run $r failed: $(tail -5 "$dir/err")"
    read -r secs rss <"$dir/time"
    local read=0
    if [[ $c != nbdcopy ]]; then
        read=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["snapshot"]["summary"]["read_bytes"])' "$dir/out")
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$c" "$r" "$secs" "$rss" "$read" >>"$tsv"
}
fresh() {
    rm -rf "$dir/repo"
    "$vmvault" -r "$dir/repo" init -q >/dev/null
}
cat "$work/day0.img" >/dev/null
for r in $(seq "$runs"); do
    fresh
    timed local "$r" "$vmvault" -r "$dir/repo" backup -q --json --vm big xvda="$work/day0.img"
    fresh
    timed nbd "$r" "$vmvault" -r "$dir/repo" backup -q --json --vm big xvda="$uri"
    timed nbdcopy "$r" nbdcopy "$uri" null:
done
"$vmvault" -r "$dir/repo" cat big@latest:xvda | cmp - "$work/day0.img" || die "the NBD backup differs from day0.img"

python3 - "$tsv" "$work/nbd-source-results.md" <<'PY'
import sys, statistics as st
rows = [l.rstrip('\n').split('\t') for l in open(sys.argv[1])][1:]
def vals(case, col):
    return [float(r[col]) for r in rows if r[0] == case]
size = 2 << 30
local = st.median(vals("local", 2))
out = ["| case | time s (min / median / max) | MB/s of the 2 GiB disk (median) | read MiB (median) | peak RSS MiB (median) | vs local (median) |",
       "|---|---|---|---|---|---|"]
for case in ("local", "nbd", "nbdcopy"):
    t = vals(case, 2)
    m = st.median(t)
    out.append(f"| {case} | {min(t):.2f} / {m:.2f} / {max(t):.2f} | {size / m / 1e6:.0f} | "
               f"{st.median(vals(case, 4)) / 2**20:.0f} | {st.median(vals(case, 3)) / 1024:.0f} | {m / local:.2f}× |")
text = "\n".join(out) + "\n"
open(sys.argv[2], "w").write(text)
print(text)
PY
