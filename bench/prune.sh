#!/usr/bin/env bash
# Usage: bench/prune.sh WORKDIR [VMVAULT_BIN]
#
# `forget --keep-last 2 --prune` on the 5-day corpus (bench/corpus.sh: WORKDIR/day0..day4.img),
# vmvault vs restic in the same run, RUNS times each (default 3): wall time and peak RSS
# (/usr/bin/time -v), min / median / max. Targets (issue 7): vmvault ≤ 0.5× restic's time and
# ≤ restic's RSS.
#
# Each tool's repository is built once (five backups of one file changing from day to day,
# default settings: 16 MiB packs, vmvault fixed 1 MiB chunks, restic's CDC) and kept in
# WORKDIR/prune-base; each run times the command on a fresh copy (restic's cache is copied
# too, its best case) with the page cache dropped. After the first run of each tool the
# result is checked: vmvault check --read-data and restic check --read-data pass, and the
# newest snapshot restores identical to day4.img. Writes a markdown report to stdout and
# WORKDIR/prune-results.md, raw values to WORKDIR/prune-results.tsv.
# Env: RUNS (default 3); REBUILD=1 to rebuild the base repositories.
set -euo pipefail

name=prune.sh
# shellcheck source=bench/common.sh
source "$(dirname -- "$0")/common.sh"
runs=${RUNS:-3}
[[ -x $vmvault ]] || die "no vmvault binary (${vmvault:-none found}); build with cargo build --release"
need=()
[[ -x /usr/bin/time ]] || need+=(time)
command -v restic >/dev/null || need+=(restic)
if (( ${#need[@]} > 0 )); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
export RESTIC_PASSWORD=${RESTIC_PASSWORD:-bench-password}

base=$work/prune-base
runroot=$work/prune-run
scratch=$(mktemp -d)
trap 'rm -rf -- "$scratch" "$runroot" "$work/cur"' EXIT
tsv=$work/prune-results.tsv
printf 'tool\tmetric\trun\tvalue\n' >"$tsv"

stage() {
    mkdir -p -- "$work/cur"
    ln -f -- "$work/day$1.img" "$work/cur/disk.img" 2>/dev/null ||
        cp --sparse=always --reflink=auto -- "$work/day$1.img" "$work/cur/disk.img"
}

if [[ ${REBUILD:-0} == 1 || ! -f $base/done ]]; then
    rm -rf -- "$base"
    mkdir -p -- "$base"
    log "building the base repositories (5 backups each)"
    "$vmvault" init --repo "$base/vmvault" >/dev/null
    restic init --repo "$base/restic" --cache-dir "$base/restic-cache" >/dev/null
    for day in 0 1 2 3 4; do
        stage "$day"
        "$vmvault" backup -q --repo "$base/vmvault" --vm bench "xvda=$work/cur/disk.img" >/dev/null
        restic backup -q --repo "$base/restic" --cache-dir "$base/restic-cache" --host bench "$work/cur/disk.img" >/dev/null
    done
    touch -- "$base/done"
fi

# measure TOOL RUN CMD...: wall time (s) and peak RSS (KiB), cold page cache.
measure() {
    local tool=$1 run=$2 start end
    shift 2
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || log "warning: cannot drop caches"
    start=$EPOCHREALTIME
    if ! /usr/bin/time -v -o "$scratch/time" "$@" >"$scratch/out" 2>&1; then
        tail -n 20 "$scratch/out" >&2
        die "$tool failed: $*"
    fi
    end=$EPOCHREALTIME
    printf '%s\ttime\t%s\t%s\n' "$tool" "$run" "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')" >>"$tsv"
    printf '%s\trss\t%s\t%s\n' "$tool" "$run" "$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$scratch/time")" >>"$tsv"
    cp -- "$scratch/out" "$work/prune-$tool.out"
}

for ((run = 1; run <= runs; run++)); do
    rm -rf -- "$runroot"
    mkdir -p -- "$runroot"
    cp -a -- "$base/vmvault" "$base/restic" "$base/restic-cache" "$runroot/"
    log "run $run/$runs: vmvault"
    measure vmvault "$run" "$vmvault" forget --repo "$runroot/vmvault" --keep-last 2 --prune
    log "run $run/$runs: restic"
    measure restic "$run" restic forget --repo "$runroot/restic" --cache-dir "$runroot/restic-cache" --keep-last 2 --prune
    printf 'vmvault\tsize_after\t%s\t%s\n' "$run" "$(du -sb -- "$runroot/vmvault" | cut -f1)" >>"$tsv"
    printf 'restic\tsize_after\t%s\t%s\n' "$run" "$(du -sb -- "$runroot/restic" | cut -f1)" >>"$tsv"
    if [[ $run == 1 ]]; then
        log "checking the pruned repositories"
        "$vmvault" check -q --repo "$runroot/vmvault" --read-data >/dev/null || die "vmvault check failed after prune"
        "$vmvault" restore -q --repo "$runroot/vmvault" bench@latest:xvda --target "$scratch/v.img"
        cmp -- "$scratch/v.img" "$work/day4.img" || die "vmvault restore differs after prune"
        rm -f -- "$scratch/v.img"
        restic check -q --repo "$runroot/restic" --cache-dir "$runroot/restic-cache" --read-data >/dev/null ||
            die "restic check failed after prune"
    fi
done
for tool in vmvault restic; do
    printf '%s\tsize_before\t0\t%s\n' "$tool" "$(du -sb -- "$base/$tool" | cut -f1)" >>"$tsv"
done

summary() {   # TOOL METRIC SCALE -> "min median max"
    awk -F'\t' -v t="$1" -v m="$2" -v s="$3" '$1 == t && $2 == m { print $4 / s }' "$tsv" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR) print v[1], (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2), v[NR] }'
}
cell() { awk -v d="$2" '{ printf "%.*f / %.*f / %.*f", d, $1, d, $2, d, $3 }' <<<"$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.2f", x[2] / y[2] }'; }
vt=$(summary vmvault time 1); rt=$(summary restic time 1)
vr=$(summary vmvault rss 1024); rr=$(summary restic rss 1024)
tq=$(ratio "$vt" "$rt"); mq=$(ratio "$vr" "$rr")
verdict() { awk -v q="$1" -v l="$2" 'BEGIN { print (q <= l ? "met" : "MISSED") }'; }
{
    echo "# forget --keep-last 2 --prune — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- machine: $(nproc) cores, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- vmvault: $("$vmvault" --version | head -n1); restic: $(restic version | head -n1); $runs runs, min / median / max"
    echo "- repository size before: vmvault $(summary vmvault size_before 1048576 | cut -d' ' -f1) MiB, restic $(summary restic size_before 1048576 | cut -d' ' -f1) MiB; after: vmvault $(summary vmvault size_after 1048576 | cut -d' ' -f2) MiB, restic $(summary restic size_after 1048576 | cut -d' ' -f2) MiB"
    echo
    echo "| metric | vmvault | restic | ratio (median) | target |"
    echo "|---|---|---|---|---|"
    echo "| wall time (s) | $(cell "$vt" 2) | $(cell "$rt" 2) | ${tq}× | ≤ 0.5× ($(verdict "$tq" 0.5)) |"
    echo "| peak RSS (MiB) | $(cell "$vr" 1) | $(cell "$rr" 1) | ${mq}× | ≤ 1× ($(verdict "$mq" 1)) |"
} | tee "$work/prune-results.md"
