# shellcheck shell=bash
# Sourced by bench/run.sh and bench/chunkers.sh (not run on its own): the shared start.
# Before sourcing, set `name` (for messages); callers pass their "$@".
# Sets: work (the corpus folder, checked to hold day0..4.img), here (bench/),
# vmvault (the binary: argument 2, VMVAULT_BIN, target/release/vmvault, or PATH).
# Defines: usage, log, die, drop_caches.

: "${name:?set name before sourcing bench/common.sh}"

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
    exit 2
}
log() { echo "$name: $*" >&2; }
die() {
    log "$*"
    exit 1
}
drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || log "warning: cannot drop caches"
}

[[ $# -ge 1 && $# -le 2 ]] || usage
work=$(cd -- "$1" && pwd)
here=$(cd -- "$(dirname -- "$0")" && pwd)
for d in 0 1 2 3 4; do
    [[ -f $work/day$d.img ]] || die "$work/day$d.img missing: run bench/corpus.sh $work first"
done
vmvault=${2:-${VMVAULT_BIN:-}}
if [[ -z $vmvault ]]; then
    if [[ -x $here/../target/release/vmvault ]]; then
        vmvault=$(cd -- "$here/../target/release" && pwd)/vmvault
    else
        vmvault=$(command -v vmvault || true)
    fi
fi
export VMVAULT_PASSWORD=${VMVAULT_PASSWORD:-bench-password}
