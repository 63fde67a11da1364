#!/usr/bin/env bash
# Usage: bench/export.sh WORKDIR [VMVAULT_BIN]
#
# Export of the 2 GiB corpus disk (WORKDIR/day0.img, bench/corpus.sh) to dynamic VHD and to
# qcow2: `vmvault export` from the repository vs `qemu-img convert` from the restored raw
# file, in the same run, RUNS times each (default 3), wall time and peak RSS
# (/usr/bin/time), min / median / max. Target (issue 6): vmvault ≤ 1.2× qemu-img's time.
#
# The repository (one backup of day0.img, default settings) and the restored raw file are
# built once in WORKDIR/export-repo and WORKDIR/export-raw.img. Page cache warm for both
# (one untimed run of each first): both sides read what they would read on a server that
# just made the backup. Outputs go to WORKDIR/export-out; each of ours is checked once with
# `qemu-img compare` against the raw file. Writes a markdown report to stdout and
# WORKDIR/export-results.md, raw values to WORKDIR/export-results.tsv.
# Env: RUNS (default 3).
set -euo pipefail

name=export.sh
# shellcheck source=bench/common.sh
source "$(dirname -- "$0")/common.sh"
runs=${RUNS:-3}
[[ -x $vmvault ]] || die "no vmvault binary (${vmvault:-none found}); build with cargo build --release"
command -v qemu-img >/dev/null || die "qemu-img missing (scripts/packages.sh)"
[[ -x /usr/bin/time ]] || { apt-get update -qq && apt-get install -y -qq time >&2; }

repo=$work/export-repo
raw=$work/export-raw.img
out=$work/export-out
tsv=$work/export-results.tsv
mkdir -p "$out"
trap 'rm -rf -- "$out"' EXIT
if [[ ! -d $repo ]]; then
    log "building $repo"
    "$vmvault" -r "$repo" init -q >/dev/null
    "$vmvault" -r "$repo" backup -q --vm corpus xvda="$work/day0.img" >/dev/null
fi
if [[ ! -f $raw ]]; then
    "$vmvault" -r "$repo" restore -q corpus@latest:xvda --target "$raw" >/dev/null
fi
cmp "$raw" "$work/day0.img" || die "the restored raw file differs from day0.img"

printf 'tool\tformat\trun\tseconds\tmax_rss_kib\n' >"$tsv"
ours() { echo "$vmvault" -r "$repo" export -q corpus@latest:xvda -f "$1" -o "$out/ours.$1" --overwrite; }
theirs() {
    case $1 in
        vhd) echo qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on "$raw" "$out/theirs.vhd" ;;
        qcow2) echo qemu-img convert -f raw -O qcow2 "$raw" "$out/theirs.qcow2" ;;
    esac
}
timed() { # tool format run command-line (paths without spaces)
    local t=$1 f=$2 r=$3
    # shellcheck disable=SC2086 # the command line is split on purpose
    /usr/bin/time -f '%e %M' -o "$out/time" $4 >/dev/null
    read -r secs rss <"$out/time"
    printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$f" "$r" "$secs" "$rss" >>"$tsv"
}
for f in vhd qcow2; do
    $(ours "$f") >/dev/null
    $(theirs "$f")
    qfmt=$f
    [[ $f == vhd ]] && qfmt=vpc
    qemu-img compare -q -f "$qfmt" -F raw "$out/ours.$f" "$raw" || die "our $f differs from the raw disk"
    for r in $(seq "$runs"); do
        timed vmvault "$f" "$r" "$(ours "$f")"
        rm -f "$out/ours.$f"
        timed qemu-img "$f" "$r" "$(theirs "$f")"
        rm -f "$out/theirs.$f"
    done
done

python3 - "$tsv" "$work/export-results.md" <<'PY'
import sys, statistics as st
rows = [l.rstrip('\n').split('\t') for l in open(sys.argv[1])][1:]
def vals(tool, fmt, col):
    return [float(r[col]) for r in rows if r[0] == tool and r[1] == fmt]
out = ["| format | tool | time s (min / median / max) | peak RSS MiB (median) | time vs qemu-img (median) |",
       "|---|---|---|---|---|"]
for fmt in ("vhd", "qcow2"):
    q = st.median(vals("qemu-img", fmt, 3))
    for tool in ("vmvault", "qemu-img"):
        t = vals(tool, fmt, 3)
        m = vals(tool, fmt, 4)
        out.append(f"| {fmt} | {tool} | {min(t):.2f} / {st.median(t):.2f} / {max(t):.2f} | "
                   f"{st.median(m)/1024:.0f} | {st.median(t)/q:.2f}× |")
text = "\n".join(out) + "\n"
open(sys.argv[2], "w").write(text)
print(text)
PY
