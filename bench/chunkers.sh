#!/usr/bin/env bash
# Usage: bench/chunkers.sh WORKDIR [VMVAULT_BIN]
#
# Compares vmvault chunker settings on the corpus of bench/corpus.sh (WORKDIR/day0..day4.img).
# For each setting: a fresh repository (vmvault init --chunker SETTING), one backup of each of
# day0..day4 through the fixed path WORKDIR/cur/disk.img, then vmvault stats --json. Reports
# stored bytes (du -sb of the repository, and stored_bytes from stats), the dedup ratio
# (logical_bytes / stored_bytes from stats) and the total backup wall time, as a markdown
# table on stdout and in WORKDIR/chunkers.md.
#
# VMVAULT_BIN defaults to $VMVAULT_BIN, then target/release/vmvault of this checkout, then
# vmvault in PATH.
# Env: CHUNKERS (space-separated settings; default
#      "fixed:256K fixed:1M fixed:4M fastcdc:64K:256K:1M fastcdc:256K:1M:4M"),
#      VMVAULT_PASSWORD (default "bench-password").
# Needs python3 to read the stats JSON. Page cache is dropped before every backup.
set -euo pipefail

name=chunkers.sh
# shellcheck source=bench/common.sh
source "$(dirname -- "$0")/common.sh"
[[ -x $vmvault ]] || die "no vmvault binary (${vmvault:-none found}); pass VMVAULT_BIN"
command -v python3 >/dev/null || die "python3 is required"
read -r -a chunkers <<<"${CHUNKERS:-fixed:256K fixed:1M fixed:4M fastcdc:64K:256K:1M fastcdc:256K:1M:4M}"

scratch=$(mktemp -d)
repo=$work/repos/chunkers
trap 'rm -rf -- "$scratch" "$repo" "$work/cur"; rmdir -- "$work/repos" 2>/dev/null || true' EXIT

# json_field FILE NAME: a top-level number from the stats JSON (empty when absent)
json_field() {
    python3 -c 'import json, sys
v = json.load(open(sys.argv[1])).get(sys.argv[2])
print("" if v is None else v)' "$1" "$2" 2>/dev/null || true
}

rows=()
for chunker in "${chunkers[@]}"; do
    log "chunker $chunker"
    rm -rf -- "$repo"
    mkdir -p -- "$work/repos" "$work/cur"
    "$vmvault" init --repo "$repo" --chunker "$chunker" >"$scratch/out" 2>&1 ||
        { cat "$scratch/out" >&2; die "init --chunker $chunker failed"; }
    total=0
    for day in 0 1 2 3 4; do
        ln -f -- "$work/day$day.img" "$work/cur/disk.img" 2>/dev/null ||
            cp --sparse=always --reflink=auto -- "$work/day$day.img" "$work/cur/disk.img"
        drop_caches
        start=$EPOCHREALTIME
        "$vmvault" backup --repo "$repo" --vm bench "xvda=$work/cur/disk.img" >"$scratch/out" 2>&1 ||
            { cat "$scratch/out" >&2; die "backup of day$day with $chunker failed"; }
        total=$(awk -v t="$total" -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", t + b - a }')
    done
    du=$(du -sb -- "$repo" | cut -f1)
    "$vmvault" stats --repo "$repo" --json >"$scratch/stats.json" 2>"$scratch/out" ||
        { cat "$scratch/out" >&2; die "stats --json failed"; }
    cp -- "$scratch/stats.json" "$work/chunkers-stats-${chunker//:/_}.json"
    logical=$(json_field "$scratch/stats.json" logical_bytes)
    stored=$(json_field "$scratch/stats.json" stored_bytes)
    rows+=("$(awk -v c="$chunker" -v du="$du" -v l="$logical" -v s="$stored" -v t="$total" 'BEGIN {
        ratio = (l != "" && s > 0) ? sprintf("%.2f", l / s) : "—"
        sm = (s != "") ? sprintf("%.1f", s / 2^20) : "—"
        printf "| %s | %.1f | %s | %s | %.2f |", c, du / 2^20, sm, ratio, t }')")
done

{
    echo "# vmvault chunker comparison — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- vmvault: $("$vmvault" --version 2>&1 | head -n1) ($vmvault)"
    echo "- corpus: $work/day0..4.img, one backup of each, page cache dropped before each"
    echo "- machine: $(nproc) cores, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo); load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "| chunker | repository size, du -sb (MiB) | stored_bytes (MiB) | dedup ratio (logical / stored) | total backup time day0–4 (s) |"
    echo "| --- | --- | --- | --- | --- |"
    printf '%s\n' "${rows[@]}"
} | tee "$work/chunkers.md"
