#!/usr/bin/env bash
# Usage: bench/prune-scale.sh WORKDIR [VMVAULT_BIN]
#
# Peak memory of `vmvault prune` on a synthetic repository of SCALE_CHUNKS (default 10 million)
# distinct 16-byte chunks in 100 snapshots, half of them forgotten (archive/tests/prune_scale.rs
# builds it in WORKDIR/scale/repo, ~1 GB). Target (issue 7): within 512 MiB. Also reports the
# wall time, and checks afterwards that two kept snapshots restore to the bytes they were made
# of and that a second prune finds nothing to do. Needs cargo (builds the generator).
set -euo pipefail
[[ $# -ge 1 && $# -le 2 ]] || { sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
work=$(cd -- "$1" && pwd)
here=$(cd -- "$(dirname -- "$0")/.." && pwd)
vmvault=${2:-${VMVAULT_BIN:-$here/target/release/vmvault}}
chunks=${SCALE_CHUNKS:-10000000}
log() { echo "prune-scale.sh: $*" >&2; }
[[ -x $vmvault ]] || { log "no $vmvault; cargo build --release first"; exit 1; }
[[ -x /usr/bin/time ]] || { apt-get update -qq && apt-get install -y -qq time >&2; }
dir=$work/scale
rm -rf -- "$dir"
mkdir -p -- "$dir"
trap 'rm -rf -- "$dir"' EXIT
log "building a repository of $chunks chunks"
start=$EPOCHREALTIME
(cd "$here" && VMVAULT_SCALE_REPO=$dir/repo SCALE_CHUNKS=$chunks \
    cargo test -q --release -p archive --test prune_scale -- --ignored >&2)
log "built in $(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }') s: $(du -sh -- "$dir/repo" | cut -f1)"
export VMVAULT_PASSWORD=pw VMVAULT_REPO=$dir/repo
sync
echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
start=$EPOCHREALTIME
/usr/bin/time -v -o "$dir/time" "$vmvault" prune >"$dir/prune.out" 2>&1 || { cat "$dir/prune.out" >&2; exit 1; }
secs=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
rss=$(awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$dir/time")
tail -n 2 "$dir/prune.out" >&2
for f in "$dir"/expect-*.raw; do
    id=$(basename "$f" .raw)
    id=${id#expect-}
    "$vmvault" restore -q "${id:0:16}:xvda" --target "$dir/r.raw" --overwrite >/dev/null
    cmp -- "$f" "$dir/r.raw" || { log "snapshot $id restores different bytes"; exit 1; }
done
"$vmvault" prune --dry-run --json >"$dir/again.json"
python3 -c 'import json,sys; p=json.load(open(sys.argv[1]))["report"]["plan"]; sys.exit(len(p["delete"]) + len(p["repack"]) > 0)' "$dir/again.json" ||
    { log "a second prune still finds work"; exit 1; }
verdict=met
(( rss <= 512 )) || verdict=MISSED
echo "| prune of $chunks chunks, 50 of 100 snapshots forgotten | $secs s | $rss MiB | ≤ 512 MiB ($verdict) |"
