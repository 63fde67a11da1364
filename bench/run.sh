#!/usr/bin/env bash
# Usage: bench/run.sh WORKDIR [VMVAULT_BIN]
#
# Compares vmvault with restic on the corpus of bench/corpus.sh (WORKDIR/day0..day4.img), in the
# same run, RUNS times each (default 3), and reports min / median / max of:
#   - wall time of the first backup (day0) and of each next backup (day1..day4),
#   - stored bytes after the five backups (du -sb of the repository),
#   - wall time to restore day4 to a file (checked with cmp against day4.img),
#   - peak RSS of the backups and of the restore (/usr/bin/time -v).
# Each dayN.img is hard-linked to the fixed path WORKDIR/cur/disk.img before its backup, so
# both tools see one file changing from day to day. Page cache is dropped before every
# measured command. Writes a markdown report to stdout and WORKDIR/results.md, raw values to
# WORKDIR/results.tsv.
#
# VMVAULT_BIN defaults to $VMVAULT_BIN, then target/release/vmvault of this checkout, then
# vmvault in PATH.
# Env: RUNS (default 3); SKIP_VMVAULT=1 or SKIP_RESTIC=1 to measure only the other tool;
#      VMVAULT_INIT_ARGS (extra vmvault init flags, e.g. "--chunker fastcdc:256K:1M:4M");
#      RESTIC_INIT_ARGS, RESTIC_BACKUP_ARGS (extra restic flags);
#      BENCH_STAGES_ARGS (default "--input WORKDIR/day0.img"; the command is skipped
#      when it fails); VMVAULT_PASSWORD / RESTIC_PASSWORD (default "bench-password").
# Installs restic and time with apt-get when missing. Other load on the machine (builds!)
# skews the numbers: the report shows the load average at start and end.
set -euo pipefail

name=run.sh
# shellcheck source=bench/common.sh
source "$(dirname -- "$0")/common.sh"
runs=${RUNS:-3}
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
skip_v=${SKIP_VMVAULT:-0}
skip_r=${SKIP_RESTIC:-0}
if [[ $skip_v != 1 && ! -x $vmvault ]]; then
    die "no vmvault binary (${vmvault:-none found}); pass VMVAULT_BIN or set SKIP_VMVAULT=1"
fi

need=()
[[ -x /usr/bin/time ]] || need+=(time)
[[ $skip_r == 1 ]] || command -v restic >/dev/null || need+=(restic)
if (( ${#need[@]} > 0 )); then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

export RESTIC_PASSWORD=${RESTIC_PASSWORD:-bench-password}
read -r -a vm_init_args <<<"${VMVAULT_INIT_ARGS:-}"
read -r -a restic_init_args <<<"${RESTIC_INIT_ARGS:-}"
read -r -a restic_backup_args <<<"${RESTIC_BACKUP_ARGS:-}"

scratch=$(mktemp -d)
trap 'rm -rf -- "$scratch" "$work/cur" "$work/restore" "$work/repos"' EXIT
tsv=$work/results.tsv
rm -f -- "$work/vmvault-stats.json"
printf 'tool\tmetric\trun\tvalue\n' >"$tsv"

# measure TOOL METRIC RUN CMD...: run CMD under /usr/bin/time -v with a cold page cache and
# record its wall time (s) and peak RSS (KiB).
measure() {
    local tool=$1 metric=$2 run=$3 start end
    shift 3
    drop_caches
    start=$EPOCHREALTIME
    if ! /usr/bin/time -v -o "$scratch/time" "$@" >"$scratch/out" 2>&1; then
        tail -n 20 "$scratch/out" >&2
        die "$tool $metric failed: $*"
    fi
    end=$EPOCHREALTIME
    printf '%s\t%s\t%s\t%s\n' "$tool" "$metric" "$run" "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')" >>"$tsv"
    printf '%s\t%s_rss\t%s\t%s\n' "$tool" "$metric" "$run" \
        "$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$scratch/time")" >>"$tsv"
}

stage() {   # the fixed path both tools back up
    mkdir -p -- "$work/cur"
    ln -f -- "$work/day$1.img" "$work/cur/disk.img" 2>/dev/null ||
        cp --sparse=always --reflink=auto -- "$work/day$1.img" "$work/cur/disk.img"
}

run_vmvault() {
    local run=$1 repo=$work/repos/vmvault day out=$work/restore/vmvault.img
    rm -rf -- "$repo" "$out"
    mkdir -p -- "$work/repos" "$work/restore"
    "$vmvault" init --repo "$repo" "${vm_init_args[@]}" >"$scratch/init.out" 2>&1 ||
        { cat "$scratch/init.out" >&2; die "vmvault init failed"; }
    for day in 0 1 2 3 4; do
        stage "$day"
        measure vmvault "backup$day" "$run" "$vmvault" backup --repo "$repo" --vm bench "xvda=$work/cur/disk.img"
    done
    printf 'vmvault\tstored\t%s\t%s\n' "$run" "$(du -sb -- "$repo" | cut -f1)" >>"$tsv"
    "$vmvault" stats --repo "$repo" --json >"$work/vmvault-stats.json" 2>"$scratch/stats.err" ||
        log "vmvault stats --json failed: $(head -c 300 "$scratch/stats.err")"
    measure vmvault restore "$run" "$vmvault" restore --repo "$repo" bench@latest:xvda --target "$out"
    cmp -- "$out" "$work/day4.img" || die "vmvault restore differs from day4.img"
    rm -f -- "$out"
}

run_restic() {
    local run=$1 repo=$work/repos/restic day out=$work/restore/restic
    local cache=$work/repos/restic-cache
    rm -rf -- "$repo" "$out" "$cache"
    mkdir -p -- "$work/repos" "$work/restore"
    restic init --repo "$repo" --cache-dir "$cache" "${restic_init_args[@]}" >"$scratch/init.out" 2>&1 ||
        { cat "$scratch/init.out" >&2; die "restic init failed"; }
    for day in 0 1 2 3 4; do
        stage "$day"
        measure restic "backup$day" "$run" restic backup --repo "$repo" --cache-dir "$cache" \
            --host bench "${restic_backup_args[@]}" "$work/cur/disk.img"
    done
    printf 'restic\tstored\t%s\t%s\n' "$run" "$(du -sb -- "$repo" | cut -f1)" >>"$tsv"
    measure restic restore "$run" restic restore latest --repo "$repo" --cache-dir "$cache" --target "$out"
    cmp -- "$out$work/cur/disk.img" "$work/day4.img" || die "restic restore differs from day4.img"
    rm -rf -- "$out" "$cache"
}

# --- machine and versions ----------------------------------------------------------------------
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
mem=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 2^20 }' /proc/meminfo)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
v_version=n/a
r_version=n/a
[[ $skip_v == 1 ]] || v_version=$("$vmvault" --version 2>&1 | head -n1)
[[ $skip_r == 1 ]] || r_version=$(restic version | head -n1)
log "machine: $(nproc) cores, $cpu, $mem; vmvault: $v_version; restic: $r_version"

stages_note=
if [[ $skip_v != 1 ]]; then
    read -r -a stages_args <<<"${BENCH_STAGES_ARGS:---input $work/day0.img}"
    rm -f -- "$work/bench-stages.json"
    if "$vmvault" bench-stages "${stages_args[@]}" >"$scratch/stages.out" 2>&1; then
        if [[ -s $work/bench-stages.json ]]; then
            stages_note=$(cat -- "$work/bench-stages.json")
        else
            stages_note=$(cat -- "$scratch/stages.out")
        fi
    else
        log "vmvault bench-stages failed or does not exist yet; skipped"
    fi
fi

for ((run = 1; run <= runs; run++)); do
    if [[ $skip_v != 1 ]]; then
        log "run $run/$runs: vmvault"
        run_vmvault "$run"
    fi
    if [[ $skip_r != 1 ]]; then
        log "run $run/$runs: restic"
        run_restic "$run"
    fi
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report ------------------------------------------------------------------------------------
# summary TOOL METRIC SCALE: "min median max" of the values divided by SCALE, or nothing
summary() {
    awk -F'\t' -v t="$1" -v m="$2" -v s="$3" '$1 == t && $2 == m { print $4 / s }' "$tsv" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR) print v[1], (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2), v[NR] }'
}
# Synthesised metrics: total of the next backups and peak RSS over backups, per run.
awk -F'\t' 'BEGIN { OFS = "\t" }
    $2 ~ /^backup[1-4]$/ { next_total[$1 OFS $3] += $4 }
    $2 ~ /^backup[0-4]_rss$/ { if ($4 > rss[$1 OFS $3]) rss[$1 OFS $3] = $4 }
    END { for (k in next_total) { split(k, a, OFS); print a[1], "next_total", a[2], next_total[k] }
          for (k in rss) { split(k, a, OFS); print a[1], "backup_rss", a[2], rss[k] } }' "$tsv" >"$scratch/extra"
cat "$scratch/extra" >>"$tsv"

fmt_cell() {   # "min / median / max" with DEC decimals, or a dash
    if [[ -z $1 ]]; then echo "—"; else awk -v d="$2" '{ printf "%.*f / %.*f / %.*f", d, $1, d, $2, d, $3 }' <<<"$1"; fi
}
# row LABEL METRIC SCALE DECIMALS KIND LIMIT: KIND "ratio" checks median ratio <= LIMIT,
# "abs" checks vmvault's max <= LIMIT (in the scaled unit).
row() {
    local label=$1 metric=$2 scale=$3 dec=$4 kind=$5 limit=$6 v r ratio=— target verdict=n/a
    v=$(summary vmvault "$metric" "$scale")
    r=$(summary restic "$metric" "$scale")
    if [[ -n $v && -n $r ]]; then   # fields: min median max
        ratio=$(awk -v a="$v" -v b="$r" 'BEGIN { split(a, x, " "); split(b, y, " ");
            if (y[2] > 0) printf "%.2f×", x[2] / y[2]; else print "—" }')
    fi
    if [[ $kind == ratio ]]; then
        target="≤ ${limit}× restic"
        if [[ $ratio != — ]]; then
            verdict=$(awk -v q="${ratio%×}" -v l="$limit" 'BEGIN { print (q <= l ? "met" : "MISSED") }')
        fi
    else
        target="≤ $limit MiB"
        if [[ -n $v ]]; then
            verdict=$(awk -v m="$v" -v l="$limit" 'BEGIN { split(m, x, " "); print (x[3] <= l ? "met" : "MISSED") }')
        fi
    fi
    printf '| %s | %s | %s | %s | %s (%s) |\n' "$label" "$(fmt_cell "$v" "$dec")" "$(fmt_cell "$r" "$dec")" \
        "$ratio" "$target" "$verdict"
}

{
    echo "# vmvault vs restic — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- machine: $(nproc) cores, $cpu, $mem RAM, kernel $(uname -r)"
    echo "- load average at start: $load_start; at end: $load_end"
    echo "- vmvault: $v_version (${vmvault:-none})${VMVAULT_INIT_ARGS:+, init args: $VMVAULT_INIT_ARGS}"
    echo "- restic: $r_version${RESTIC_INIT_ARGS:+, init args: $RESTIC_INIT_ARGS}"
    echo "- corpus: $work/day0..4.img, $(stat -c %s -- "$work/day0.img" | awk '{ printf "%.2f GiB", $1 / 2^30 }') each," \
        "$(du -B1 -- "$work/day0.img" | awk '{ printf "%.2f GiB", $1 / 2^30 }') allocated in day0"
    echo "- $runs run(s) per tool, page cache dropped before each measured command; values are min / median / max"
    echo
    echo "| metric | vmvault min / median / max | restic min / median / max | ratio of medians | target |"
    echo "| --- | --- | --- | --- | --- |"
    row "first backup, day0 (s)" backup0 1 2 ratio 0.5
    for d in 1 2 3 4; do
        row "next backup, day$d (s)" "backup$d" 1 2 ratio 0.3
    done
    row "next backups, day1–4 total (s)" next_total 1 2 ratio 0.3
    row "stored after 5 backups (MiB)" stored 1048576 1 ratio 1.0
    row "restore day4 to a file (s)" restore 1 2 ratio 0.5
    row "peak RSS, backups (MiB)" backup_rss 1024 0 abs 512
    row "peak RSS, restore (MiB)" restore_rss 1024 0 abs 512
    if [[ -s $work/vmvault-stats.json ]]; then
        echo
        echo "vmvault stats --json after day4 (last run):"
        echo
        echo '```json'
        cat -- "$work/vmvault-stats.json"
        echo '```'
    fi
    if [[ -n $stages_note ]]; then
        echo
        echo "vmvault bench-stages:"
        echo
        echo '```'
        echo "$stages_note"
        echo '```'
    fi
} | tee "$work/results.md"
