#!/usr/bin/env bash
# The arm64 build and a place to run it, on an x86 Debian machine, for tests/test_arm64.py:
#
# 1. the wheel, cross-built for aarch64 by the same `pip wheel` a user runs (scikit-build-core,
#    native/cmake/aarch64-linux-gnu.cmake): an ARMv8.0 build (no -march beyond the baseline), so the
#    oldest arm64 phones run it; the fused expert product picks its sdot kernel at run time where the
#    CPU has dot products; OpenMP is off on arm64 (native/CMakeLists.txt), so no libgomp is needed;
# 2. an arm64 Python: Debian's python3.11 unpacked into OUT/rootfs (mmdebstrap's extract variant:
#    files only, no maintainer script runs, so nothing needs emulation to set it up);
# 3. the wheel installed with its dependencies into OUT/site by pip, for aarch64 and Python 3.11, as
#    `pip install` would on a phone (PyPI's aarch64 wheels of numpy, cffi, ...);
# 4. OUT/python, which runs that Python under qemu-user (QEMU_CPU picks the core), and OUT/arm64_check,
#    the C check program tests/native/arm64_check.cpp built against the installed library.
#
#   scripts/arm64.sh [OUT_DIR]     (default build/arm64; a second run rebuilds incrementally)
#
# Prints the paths of OUT/arm64_check and OUT/python, one per line, last. Installs Debian's cross
# compilers, qemu-user and mmdebstrap when they are missing (as root).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$root/build/arm64}" && cd "${1:-$root/build/arm64}" && pwd)"
python_version=3.11   # Debian bookworm's python3, and the wheels pip picks for it

packages="gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user mmdebstrap"
if ! dpkg -s $packages >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages >/dev/null
fi
# --no-build-isolation: an isolated build would fetch cmake and ninja for the target platform.
python -c "import scikit_build_core" 2>/dev/null || pip install -q "scikit-build-core>=0.10" ninja

rm -rf "$out/wheel"
(cd "$root" && CMAKE_ARGS="-DCMAKE_TOOLCHAIN_FILE=$root/native/cmake/aarch64-linux-gnu.cmake -DGGML_NATIVE=OFF -DGGML_VULKAN=OFF" \
    _PYTHON_HOST_PLATFORM=linux-aarch64 pip wheel --no-build-isolation --no-deps -w "$out/wheel" . \
    >"$out/wheel.log" 2>&1) || { tail -50 "$out/wheel.log"; exit 1; }
wheel="$(ls "$out"/wheel/slicemoe_gguf-*-linux_aarch64.whl)"

if [ ! -x "$out/rootfs/usr/bin/python$python_version" ]; then
    rm -rf "$out/rootfs"
    mmdebstrap --quiet --variant=extract --architectures=arm64 \
        --include="python$python_version-minimal,libpython$python_version-stdlib,libstdc++6" \
        bookworm "$out/rootfs" http://deb.debian.org/debian >"$out/rootfs.log" 2>&1 \
        || { tail -30 "$out/rootfs.log"; exit 1; }
fi

rm -rf "$out/site"
pip install -q --target "$out/site" --only-binary=:all: --implementation cp --python-version "$python_version" \
    --platform linux_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 \
    "$wheel" >"$out/site.log" 2>&1 || { cat "$out/site.log"; exit 1; }

cat >"$out/python" <<EOF
#!/bin/sh
# Debian's arm64 Python under qemu-user, with the arm64 wheel and its dependencies on its path.
PYTHONPATH="$out/site" PYTHONDONTWRITEBYTECODE=1 exec qemu-aarch64 -L "$out/rootfs" "$out/rootfs/usr/bin/python$python_version" "\$@"
EOF
chmod +x "$out/python"

library="$out/site/slicemoe_gguf/lib"
aarch64-linux-gnu-g++ -O2 -std=c++17 -Wall -Werror "$root/tests/native/arm64_check.cpp" \
    -I "$out/site/slicemoe_gguf/include" -L "$library" -lllama -Wl,-rpath,"$library" -o "$out/arm64_check"
echo "$out/arm64_check"
echo "$out/python"
