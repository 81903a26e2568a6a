#!/bin/bash
# (copy of ../shared/bench/w1.sh, so a clean clone can build the workloads)
# Builds the reference workloads:
#   W1: a real ~20,000-file source tree (subtrees of Debian's linux-source-6.1), as an uncompressed tar;
#   W2: 1 GiB of random data.
# Usage: w1.sh [DATA_DIR]   (default /var/tmp/izo-workloads); prints the two paths.
set -euo pipefail
D=${1:-/var/tmp/izo-workloads}; mkdir -p "$D"
SRC=/usr/src/linux-source-6.1.tar.xz
if [ ! -f "$SRC" ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-source-6.1 >/dev/null
fi
SUB="fs include Documentation net kernel lib"
if [ ! -f "$D/w1.tar" ]; then
  rm -rf "$D/w1src"; mkdir -p "$D/w1src"
  tar xJf "$SRC" -C "$D/w1src" --strip-components=1 $(for s in $SUB; do echo "linux-source-6.1/$s"; done)
  tar cf "$D/w1.tar.tmp" -C "$D/w1src" . && mv "$D/w1.tar.tmp" "$D/w1.tar"; rm -rf "$D/w1src"
fi
[ -f "$D/w2.bin" ] || { head -c 1G /dev/urandom > "$D/w2.bin.tmp" && mv "$D/w2.bin.tmp" "$D/w2.bin"; }
echo "$D/w1.tar"
echo "$D/w2.bin"
