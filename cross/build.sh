#!/usr/bin/env bash
# Cross-builds the edge agent and firmware-sim for a plant gateway on a plain Debian 12 machine,
# with no Docker and no rustup targets: Debian's rustc-web/cargo-web (1.96) with the target
# architecture's standard library package and its gcc cross linker, installed when missing.
#
#   ./cross/build.sh aarch64      64-bit ARM gateways (aarch64-unknown-linux-gnu)
#   ./cross/build.sh armv7        32-bit ARM gateways (armv7-unknown-linux-gnueabihf)
#
# Writes stripped binaries and a SHA-256 file to target/dist/<target>/. firmware-sim is built
# without its Kafka check (`verify --kafka` needs librdkafka; everything else works).
#
# PLANTLINK_TARGET_SYSROOT=<dir> takes the target's standard library from <dir>/lib/rustlib/
# instead of the libstd-rust-web-dev package, for when apt cannot offer the compiler's version
# (cross/README.md shows how to unpack the package by hand). Exit status 3: the standard
# library is not available.
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/lib/services.sh

case "${1:-}" in
  aarch64) target=aarch64-unknown-linux-gnu; arch=arm64; gnu=aarch64-linux-gnu ;;
  armv7) target=armv7-unknown-linux-gnueabihf; arch=armhf; gnu=arm-linux-gnueabihf ;;
  *) echo "usage: $0 aarch64|armv7" >&2; exit 2 ;;
esac

need=()
[ -x /usr/bin/rustc ] && /usr/bin/rustc --version | grep -q . || need+=(rustc-web)
[ -x /usr/bin/cargo ] || need+=(cargo-web)
command -v "$gnu-gcc" >/dev/null || need+=("gcc-$gnu" "libc6-dev-$arch-cross")
command -v "$gnu-strip" >/dev/null || need+=("binutils-$gnu")
sysroot="${PLANTLINK_TARGET_SYSROOT:-}"
if [ -n "$sysroot" ]; then
  # A standard library from elsewhere (see cross/README.md): no dpkg architecture, no package.
  if [ ! -d "$sysroot/lib/rustlib/$target/lib" ]; then
    echo "error: PLANTLINK_TARGET_SYSROOT=$sysroot has no lib/rustlib/$target/lib;" \
         "point it at a folder holding the $target standard library of $(/usr/bin/rustc --version 2>/dev/null || echo rustc-web)" >&2
    exit 2
  fi
  log "using the $target standard library in $sysroot"
else
  added_arch=0
  if ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
    log "adding the $arch architecture to dpkg"
    as_root dpkg --add-architecture "$arch"
    added_arch=1
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      || log "apt-get update reported errors (above); going on with the indexes it could read"
    _apt_updated=1
  fi
  dpkg -s "libstd-rust-web-dev:$arch" >/dev/null 2>&1 || need+=("libstd-rust-web-dev:$arch")
  # The standard library must be the very version of the compiler. Exit status 3 says it is not
  # available here (./cross/smoke.sh reports that and skips the architecture).
  if ! dpkg -s "libstd-rust-web-dev:$arch" >/dev/null 2>&1; then
    # The installed compiler's version, else the one apt would install; the package is
    # Multi-Arch: same, so the versions must be equal to the last character.
    want=$(dpkg-query -W -f='${Version}' rustc-web 2>/dev/null \
      || apt-cache policy rustc-web | awk '/Candidate:/ {print $2}')
    have=$(apt-cache policy "libstd-rust-web-dev:$arch" | awk '/Candidate:/ {print $2}')
    if [ -z "$have" ] || [ "$have" = "(none)" ] || [ "$have" != "$want" ]; then
      echo "error: libstd-rust-web-dev:$arch ${have:-(none)} does not match rustc-web ${want:-(none)}:" \
           "the $target standard library of this compiler is not in your apt indexes." \
           "Fix: run 'apt-get update' and check that it reads the $arch index of bookworm-security without errors, then run this again; or unpack the package by hand and set PLANTLINK_TARGET_SYSROOT (cross/README.md)." >&2
      if [ "$added_arch" -eq 1 ]; then
        # Leave dpkg as it was: a foreign architecture whose index cannot be read makes every
        # later 'apt-get update' on this machine report an error.
        log "removing the $arch architecture again"
        as_root dpkg --remove-architecture "$arch"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
      fi
      exit 3
    fi
  fi
fi
if [ ${#need[@]} -gt 0 ]; then
  apt_install "${need[@]}" || {
    echo "error: could not install ${need[*]} (is libstd-rust-web-dev available for $arch in your Debian release?)" >&2
    # 3: the standard library is not to be had here, which smoke.sh reports and skips.
    [[ " ${need[*]} " == *" libstd-rust-web-dev:$arch "* ]] && exit 3
    exit 1
  }
fi

upper=$(echo "$target" | tr 'a-z-' 'A-Z_')
export "CARGO_TARGET_${upper}_LINKER=$gnu-gcc"
export "CC_${target//-/_}=$gnu-gcc"
export "AR_${target//-/_}=$gnu-ar"
export RUSTC=/usr/bin/rustc
[ -z "$sysroot" ] || export "CARGO_TARGET_${upper}_RUSTFLAGS=--sysroot $sysroot"
out="${CARGO_TARGET_DIR:-target}"
log "building edge-agent and firmware-sim for $target with $(/usr/bin/rustc --version)"
CARGO_TARGET_DIR="$out/cross" /usr/bin/cargo build --locked --release --target "$target" \
  -p edge-agent
CARGO_TARGET_DIR="$out/cross" /usr/bin/cargo build --locked --release --target "$target" \
  -p firmware-sim --no-default-features

dist="target/dist/$target"
mkdir -p "$dist"
for b in edge-agent firmware-sim; do
  "$gnu-strip" -o "$dist/$b" "$out/cross/$target/release/$b"
done
(cd "$dist" && sha256sum edge-agent firmware-sim > SHA256SUMS)
ls -l "$dist"
log "$(du -h "$dist/edge-agent" | cut -f1) edge-agent, $(du -h "$dist/firmware-sim" | cut -f1) firmware-sim in $dist"
