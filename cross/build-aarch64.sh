#!/usr/bin/env bash
# Builds the aarch64 (ARM64 edge server) release binaries on an x86_64
# Debian host and checks them under qemu-user: `--version` of both
# binaries, and the proto and edge-config unit tests run as aarch64 code.
#
# rustls uses the ring provider everywhere (aws-lc does not cross-build
# reliably); ring and LMDB need only the cross C compiler.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu

need=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi
rustup target list --installed | grep -qx "$TARGET" || rustup target add "$TARGET"

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $SYSROOT"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar

cargo build --release --locked --target "$TARGET" -p touchline -p touchline-central

for bin in touchline touchline-central; do
    path="target/$TARGET/release/$bin"
    file "$path" | grep -q "ARM aarch64" || { echo "$path is not an aarch64 binary"; exit 1; }
    echo "$bin (aarch64 under qemu): $(qemu-aarch64 -L "$SYSROOT" "$path" --version)"
done

cargo test --release --locked --target "$TARGET" -p touchline-proto -p touchline-edge-config
echo "aarch64 release binaries in target/$TARGET/release/"
