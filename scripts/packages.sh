#!/usr/bin/env bash
# Install the Debian packages vmvault's demo and tests use, when missing. Idempotent.
# QEMU (qemu-utils for qemu-img/qemu-io/qemu-nbd, qemu-system-x86 for the boot test) comes
# from bookworm-backports, both at one version: the machines this runs on ship qemu-utils 10
# from backports, and installing Debian 12's qemu-system-x86 7.2 next to it would remove it.
# Usage: scripts/packages.sh
set -euo pipefail

pkgs=(e2fsprogs fdisk python3 zstd libnbd-bin fio kmod cpio xz-utils openssl dosfstools lvm2 fuse3 mtools ntfs-3g attr tzdata xxhash)
qemu=(qemu-utils qemu-system-x86)
sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done
qemu_missing=0
for p in "${qemu[@]}"; do installed "$p" || qemu_missing=1; done

if ((${#missing[@]} || qemu_missing)); then
    if ((qemu_missing)) && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # The same mirror as the configured Debian archive, backports suite.
        uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        uri=${uri:-http://deb.debian.org/debian}
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
            "$uri" /usr/share/keyrings/debian-archive-keyring.gpg |
            $sudo tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
    fi
    echo "installing: ${missing[*]} $( ((qemu_missing)) && echo "${qemu[*]} (backports)")" >&2
    $sudo apt-get update -qq
    export DEBIAN_FRONTEND=noninteractive
    if ((${#missing[@]})); then
        $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if ((qemu_missing)); then
        $sudo apt-get install -y -qq --no-install-recommends -t bookworm-backports "${qemu[@]}" >/dev/null
    fi
fi
if ! command -v cargo >/dev/null; then
    echo "vmvault needs a Rust toolchain (cargo, rustc >= 1.80); install it with rustup" >&2
    exit 1
fi
