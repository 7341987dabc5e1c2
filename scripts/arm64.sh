#!/usr/bin/env bash
# The arm64 build, on an x86 Debian machine: cross-compiles the native library for aarch64 and the C
# check program tests/native/arm64_check.cpp against it, for tests/test_arm64.py to run under
# qemu-user. The build is ARMv8.0 (no -march beyond the baseline), so the oldest arm64 phones run
# it; the fused expert product picks its sdot kernel at run time where the CPU has dot products.
# OpenMP is off on arm64 (native/CMakeLists.txt), so a minimal system needs no libgomp.
#
#   scripts/arm64.sh [BUILD_DIR]     (default build/arm64; incremental on a second run)
#
# Installs Debian's cross compilers and qemu-user when they are missing (as root).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build/arm64}"

packages="gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user"
if ! dpkg -s $packages >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages >/dev/null
fi

cmake -S "$root/native" -B "$build" -DCMAKE_TOOLCHAIN_FILE="$root/native/cmake/aarch64-linux-gnu.cmake" \
      -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_VULKAN=OFF >"$build.configure.log" 2>&1 \
    || { cat "$build.configure.log"; exit 1; }
cmake --build "$build" -j "$(nproc)" --target slicemoe_libraries >"$build.build.log" 2>&1 \
    || { tail -50 "$build.build.log"; exit 1; }
aarch64-linux-gnu-g++ -O2 -std=c++17 -Wall -Werror "$root/tests/native/arm64_check.cpp" -I "$root/native/include" \
    -L "$build/bin" -lllama -Wl,-rpath,'$ORIGIN' -o "$build/bin/arm64_check"
echo "$build/bin/arm64_check"
