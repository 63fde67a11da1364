#!/usr/bin/env bash
# Install the Debian packages vmvault's demo and tests use, when missing. Idempotent.
# Usage: scripts/packages.sh
set -euo pipefail

pkgs=(e2fsprogs fdisk python3 zstd qemu-utils libnbd-bin fio qemu-system-x86 kmod cpio xz-utils)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    echo "installing: ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
    echo "vmvault needs a Rust toolchain (cargo, rustc >= 1.80); install it with rustup" >&2
    exit 1
fi
