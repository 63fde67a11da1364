#!/usr/bin/env bash
# Usage: bench/corpus.sh WORKDIR
#
# Builds the benchmark corpus in WORKDIR (e.g. bench/work, which git ignores):
#   rootfs/          a Debian bookworm root from debootstrap --variant=minbase plus a realistic
#                    package set (systemd, kernel, compilers, python3, perl, ...), ~1.3 GiB,
#                    with a 64 MiB page-structured database at /var/lib/db/data.db
#   day0.img         a 2 GiB sparse GPT disk image, ext4 from rootfs (fixtures/make-ext4-image.sh)
#   day1..day4.img   each the next day of the previous one (fixtures/next-day.sh)
#   offset           the partition's byte offset ("offset=1048576")
# Cached: does nothing when WORKDIR/day4.img exists; otherwise reuses a finished rootfs and any
# finished images. Installs debootstrap, e2fsprogs, fdisk, python3 with apt-get when missing.
# Env: MIRROR (default: the first URI of the configured Debian apt sources),
#      EXTRA_PACKAGES (comma-separated, added to the package list).
# Heavy steps run under nice -n 10.
set -euo pipefail

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
    exit 2
}
log() { echo "corpus.sh: $*" >&2; }

[[ $# -eq 1 ]] || usage
[[ $(id -u) -eq 0 ]] || { log "must run as root (debootstrap)"; exit 1; }
here=$(cd -- "$(dirname -- "$0")" && pwd)
fixtures=$here/../fixtures
mkdir -p -- "$1"
work=$(cd -- "$1" && pwd)
root=$work/rootfs

if [[ -f $work/day4.img ]]; then
    log "$work/day4.img exists; nothing to do"
    exit 0
fi

PATH=$PATH:/usr/sbin:/sbin
missing=()
for pair in debootstrap:debootstrap mke2fs:e2fsprogs debugfs:e2fsprogs sfdisk:fdisk python3:python3; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if (( ${#missing[@]} > 0 )); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

mirror=${MIRROR:-}
if [[ -z $mirror ]]; then
    mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
fi
if [[ -z $mirror && -f /etc/apt/sources.list ]]; then
    mirror=$(awk '$1 == "deb" && $0 !~ /security/ { print $2; exit }' /etc/apt/sources.list)
fi
mirror=${mirror:-http://deb.debian.org/debian}

packages=systemd-sysv,udev,kmod,dbus,ifupdown,iproute2,iputils-ping,netbase,openssh-server,sudo
packages+=,less,vim,curl,wget,ca-certificates,gnupg,xz-utils,zstd,bzip2,file,cron,logrotate
packages+=,rsyslog,man-db,manpages,bash-completion,locales,python3,python3-venv,perl,git
packages+=,build-essential,linux-image-amd64
packages+=${EXTRA_PACKAGES:+,$EXTRA_PACKAGES}

unmount_below() {   # anything a failed debootstrap left mounted under $1
    local m
    findmnt -rn -o TARGET | { grep -F -- "$1/" || true; } | sort -r |
        while read -r m; do umount -l -- "$m" || true; done
}

if [[ ! -f $work/rootfs.done ]]; then
    rm -f -- "$work"/day*.img
    if [[ -e $root ]]; then
        unmount_below "$root"
        rm -rf --one-file-system -- "$root"
    fi
    log "debootstrap bookworm from $mirror into $root"
    started=$SECONDS
    nice -n 10 debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || {
        unmount_below "$root"
        tail -n 30 "$work/debootstrap.log" >&2
        log "debootstrap failed (log: $work/debootstrap.log)"
        exit 1
    }
    unmount_below "$root"
    rm -f -- "$root"/var/cache/apt/archives/*.deb   # as apt-get clean: cloud images ship without
    log "debootstrap done in $((SECONDS - started)) s"

    # A database-like file: 64 MiB of 4 KiB pages with headers, rows and free space.
    nice -n 10 python3 - "$root/var/lib/db/data.db" <<'PY'
import hashlib, os, random, sys
path = sys.argv[1]
os.makedirs(os.path.dirname(path), exist_ok=True)
r = random.Random(hashlib.sha256(b"bench-corpus-db").digest())
words = [w.encode() for w in "alpha beta gamma delta order customer invoice paid open closed".split()]
with open(path, "wb") as f:
    for pno in range(16384):
        page = bytearray(4096)
        page[0:4] = pno.to_bytes(4, "little")
        page[4:12] = r.getrandbits(64).to_bytes(8, "little")
        pos, fill = 16, r.randint(2000, 4000)
        while pos < fill:
            row = (r.getrandbits(32).to_bytes(4, "little") + r.randbytes(r.randint(16, 96))
                   + b"|".join(r.choice(words) for _ in range(r.randint(2, 8))))
            row = row[:fill - pos]
            page[pos:pos + len(row)] = row
            pos += len(row)
        f.write(page)
os.chmod(path, 0o600)
PY
    du -sb --one-file-system -- "$root" | awk '{ printf "corpus.sh: rootfs holds %.2f GiB\n", $1 / 2^30 }' >&2
    touch -- "$work/rootfs.done"
fi

if [[ ! -f $work/day0.img ]]; then
    log "building day0.img (2 GiB)"
    started=$SECONDS
    nice -n 10 "$fixtures/make-ext4-image.sh" "$root" "$work/day0.img" 2048 | tail -n1 >"$work/offset"
    log "day0.img done in $((SECONDS - started)) s"
fi
offset=$(sed -n 's/^offset=//p' "$work/offset")

export DB_PATH=/var/lib/db/data.db LOG_PATH=/var/log/dpkg.log
for day in 1 2 3 4; do
    if [[ ! -f $work/day$day.img ]]; then
        nice -n 10 "$fixtures/next-day.sh" "$work/day$((day - 1)).img" "$work/day$day.img" "$offset" "$day"
    fi
done
ls -ls -- "$work"/day*.img >&2
log "corpus ready in $work (offset=$offset)"
