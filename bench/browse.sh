#!/usr/bin/env bash
# Usage: bench/browse.sh WORKDIR [VMVAULT_BIN]
#
# File-level browsing of a backup through `vmvault mount` against libguestfs's `guestmount`
# on the same raw image, in the same run, RUNS times each (default 3), min / median / max of:
#   - mount to first `ls` of /etc inside the ext4 of the 2 GiB corpus disk WORKDIR/day0.img
#     (bench/corpus.sh): vmvault (repository mount, caches dropped) versus
#     `guestmount -a day0.img -m /dev/sda1 --ro` (the corpus is not a bootable OS, so
#     `-i` inspection cannot be used; -m names the filesystem instead);
#   - sequential read (`cat > /dev/null`) of a 512 MiB file inside an ext4 of a backup
#     through the mount — first read on a fresh mount with the page cache dropped, and a
#     re-read after dropping the kernel's page cache again, and one more with the page cache
#     warm (the mount keeps it across opens) — versus `cat` of the same file on the host with
#     a warm page cache;
#   - `find` over the whole corpus tree through the mount: wall time, entries, and the peak
#     RSS of the vmvault process.
# Writes a markdown report to stdout and WORKDIR/browse-results.md, raw values to
# WORKDIR/browse-results.tsv.
# Env: RUNS, VMVAULT_PASSWORD (default "bench-password"), NO_GUESTMOUNT=1 to skip libguestfs.
# Needs: fuse3, libguestfs-tools (guestmount), e2fsprogs, fdisk; runs as root (drop_caches).
set -euo pipefail

name=browse.sh
# shellcheck source=bench/common.sh
source "$(dirname -- "$0")/common.sh"
runs=${RUNS:-3}
[[ -x $vmvault ]] || die "no vmvault binary (build with cargo build --release)"
command -v fusermount3 >/dev/null || die "fusermount3 missing (apt-get install fuse3)"
guestmount=1
[[ ${NO_GUESTMOUNT:-} == 1 ]] && guestmount=0
((guestmount)) && ! command -v guestmount >/dev/null && die "guestmount missing (apt-get install libguestfs-tools, or NO_GUESTMOUNT=1)"

# libguestfs boots an appliance with the host's kernel; this machine kind has none in /boot,
# so give supermin Debian's (downloaded, not installed) and run it under TCG (no usable KVM).
guestfs_kernel() {
    local dir=$work/libguestfs-kernel kver
    if [[ ! -d $dir/root/lib/modules ]]; then
        mkdir -p "$dir"
        (cd "$dir" && apt-get download -q \
            "$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image/{print $2; exit}')" >/dev/null 2>&1)
        dpkg-deb -x "$dir"/linux-image-*.deb "$dir/root"
    fi
    kver=$(ls "$dir/root/lib/modules" | head -n1)
    [[ -f $dir/root/lib/modules/$kver/modules.dep ]] || /usr/sbin/depmod -b "$dir/root" "$kver"
    mkdir -p /lib/modules   # supermin looks at the host's module folder even when told another
    export SUPERMIN_KERNEL=$dir/root/boot/vmlinuz-$kver SUPERMIN_MODULES=$dir/root/lib/modules/$kver
    export LIBGUESTFS_BACKEND_SETTINGS=${LIBGUESTFS_BACKEND_SETTINGS:-force_tcg}
}
((guestmount)) && [[ ! -d /boot || -z $(ls /boot/vmlinuz-* 2>/dev/null) ]] && guestfs_kernel

repo=$work/browse-repo
tsv=$work/browse-results.tsv
mnt=$work/browse-mnt
gmnt=$work/guestmount-mnt
: > "$tsv"
mkdir -p "$mnt" "$gmnt"
mpid=
cleanup() {
    fusermount3 -u "$mnt" 2>/dev/null || true
    ((guestmount)) && mountpoint -q "$gmnt" && { guestunmount "$gmnt" >/dev/null 2>&1 || true; }
    [[ -n $mpid ]] && wait "$mpid" 2>/dev/null || true
}
trap cleanup EXIT
record() { printf '%s\t%s\n' "$1" "$2" >> "$tsv"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" -v n="${2:-1}" 'BEGIN { printf "%.5f\n", (b - a) / n }'; }
# Warm reads take ~20-40 ms: time five in a row, several times, so process start-up and
# timer granularity do not decide the ratio.
warm_cat() {   # NAME FILE
    local i t0
    for i in 1 2 3 4 5; do
        t0=$(now); for _ in 1 2 3 4 5; do cat "$2" > /dev/null; done; record "$1" "$(elapsed "$t0" 5)"
    done
}
hwm() { awk '/VmHWM/{print $2 * 1024}' "/proc/$1/status"; }

big=$work/browse-big
if [[ ! -f $repo/config ]]; then
    log "backing up day0 and a disk holding a 512 MiB file into $repo"
    "$vmvault" --repo "$repo" init -q >/dev/null
    "$vmvault" --repo "$repo" backup -q --vm day0 "xvda=$work/day0.img" >/dev/null
    rm -rf "$big"; mkdir -p "$big/tree"
    # Half random, half text-like: a file that compresses about 2:1, like most data.
    python3 - "$big/tree/big.bin" <<'PY'
import os, random, sys
r = random.Random(7)
words = [bytes(r.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(3, 9))) for _ in range(500)]
with open(sys.argv[1], "wb") as f:
    for i in range(512):
        if i % 2:
            f.write(os.urandom(1 << 20))
        else:
            line = b" ".join(r.choice(words) for _ in range(200000))
            f.write((line * 2)[: 1 << 20])
PY
    "$here/../fixtures/make-ext4-image.sh" "$big/tree" "$big/big.img" 768 >/dev/null
    "$vmvault" --repo "$repo" backup -q --vm big "xvda=$big/big.img" >/dev/null
    rm -f "$big/big.img"
fi
[[ -f $big/tree/big.bin ]] || die "$big/tree/big.bin missing: remove $repo to rebuild"

start_mount() {
    "$vmvault" --repo "$repo" mount -q "$mnt" >/dev/null &
    mpid=$!
}
stop_mount() {
    fusermount3 -u "$mnt"
    wait "$mpid" 2>/dev/null || true
    mpid=
}

for r in $(seq "$runs"); do
    log "run $r/$runs: mount to first ls"
    drop_caches
    t0=$(now)
    start_mount
    until ls "$mnt/day0/latest/files/xvda/p1/etc" >/dev/null 2>&1; do sleep 0.005; done
    record vmvault-first-ls "$(elapsed "$t0")"
    stop_mount
    if ((guestmount)); then
        drop_caches
        t0=$(now)
        guestmount -a "$work/day0.img" -m /dev/sda1 --ro "$gmnt"
        ls "$gmnt/etc" >/dev/null
        record guestmount-first-ls "$(elapsed "$t0")"
        guestunmount "$gmnt"
    fi

    log "run $r/$runs: 512 MiB file"
    cat "$big/tree/big.bin" > /dev/null
    warm_cat host-cat-warm "$big/tree/big.bin"
    drop_caches
    start_mount
    until [[ -e $mnt/big/latest ]]; do sleep 0.01; done
    f=$mnt/big/latest/files/xvda/p1/big.bin
    t0=$(now); cat "$f" > /dev/null; record vmvault-cat-first "$(elapsed "$t0")"
    drop_caches
    t0=$(now); cat "$f" > /dev/null; record vmvault-cat-reread "$(elapsed "$t0")"
    warm_cat vmvault-cat-warm "$f"
    cmp -s "$f" "$big/tree/big.bin" || die "the 512 MiB file read through the mount differs"
    stop_mount

    log "run $r/$runs: find over the corpus"
    drop_caches
    start_mount
    until [[ -e $mnt/day0/latest ]]; do sleep 0.01; done
    t0=$(now)
    n=$(find "$mnt/day0/latest/files" | wc -l)
    record vmvault-find "$(elapsed "$t0")"
    record vmvault-find-entries "$n"
    record vmvault-find-rss "$(hwm "$mpid")"
    stop_mount
done

python3 - "$tsv" "$runs" <<'PY' | tee "$work/browse-results.md"
import statistics, sys
vals = {}
for line in open(sys.argv[1]):
    k, v = line.split("\t")
    vals.setdefault(k, []).append(float(v))
def mmm(k, f="{:.3f}"):
    if k not in vals: return "not run"
    v = sorted(vals[k]); return " / ".join(f.format(x) for x in (v[0], statistics.median(v), v[-1]))
def med(k): return statistics.median(vals[k])
print(f"| measure ({sys.argv[2]} runs, min / median / max) | vmvault | peer | ratio (median) | target |")
print("|---|---|---|---|---|")
if "guestmount-first-ls" in vals:
    print(f"| mount → first `ls /etc` (s) | {mmm('vmvault-first-ls')} | guestmount {mmm('guestmount-first-ls')} | {med('vmvault-first-ls') / med('guestmount-first-ls'):.3f}× | ≤ 0.1× |")
else:
    print(f"| mount → first `ls /etc` (s) | {mmm('vmvault-first-ls')} | guestmount not run | | ≤ 0.1× |")
mib = 512
for k, label in (("vmvault-cat-first", "first read, fresh mount, caches dropped"), ("vmvault-cat-reread", "re-read, page cache dropped"), ("vmvault-cat-warm", "re-read, page cache warm")):
    speed = sorted(mib / x for x in vals[k])
    host = sorted(mib / x for x in vals["host-cat-warm"])
    show = lambda v: " / ".join(f"{x:.0f}" for x in (v[0], statistics.median(v), v[-1]))
    print(f"| 512 MiB file, {label} (MiB/s) | {show(speed)} | host `cat`, warm {show(host)} | {statistics.median(speed) / statistics.median(host):.2f}× | ≥ 0.5× |")
print(f"| `find` over the corpus tree (s) | {mmm('vmvault-find')} | | | reported |")
print(f"| entries found | {mmm('vmvault-find-entries', '{:.0f}')} | | | |")
rss = sorted(x / 2**20 for x in vals["vmvault-find-rss"])
print(f"| peak RSS of `vmvault mount` after `find` (MiB) | {' / '.join(f'{x:.0f}' for x in (rss[0], statistics.median(rss), rss[-1]))} | | | ≤ 256 |")
PY
