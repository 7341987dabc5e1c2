#!/usr/bin/env bash
# Build the engine (libllama with our sources, and ggml) with AddressSanitizer and
# UndefinedBehaviorSanitizer, then run the tests that drive the native path against it.
#
#     bash scripts/sanitize.sh                    # build (cached in build/sanitize) and run
#     bash scripts/sanitize.sh tests/test_cache.py # other tests
#
# The installed package (`pip install .`) provides the Python side; SLICEMOE_LIB points it at the
# sanitized library. CPython is not instrumented, so libasan is preloaded and leak detection is
# off (the interpreter keeps its allocations to exit); an allocation too large to make returns NULL,
# as malloc does, rather than ending the process. Every report goes to build/sanitize/reports/;
# the script fails when a test fails or any report was written.
set -euo pipefail
cd "$(dirname "$0")/.."
build=build/sanitize
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g"
cmake -S native -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DGGML_VULKAN=OFF -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
    -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
cmake --build "$build" --target slicemoe_libraries -j "$(nproc)"
lib=$(find "$build" -name libllama.so -path '*bin*' | head -1)
reports="$PWD/$build/reports"
rm -rf "$reports" && mkdir -p "$reports"
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
    tests=(tests/test_hostile.py tests/test_cache.py tests/test_trace.py tests/test_foundation.py)
fi
status=0
SLICEMOE_LIB="$PWD/$lib" \
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:log_path=$reports/asan" \
UBSAN_OPTIONS="print_stacktrace=1:log_path=$reports/ubsan" \
    pytest -q -p no:cacheprovider "${tests[@]}" || status=$?
n_reports=$(find "$reports" -type f | wc -l)
echo "sanitizer reports: $n_reports (in $reports); pytest status: $status"
[ "$status" -eq 0 ] && [ "$n_reports" -eq 0 ]
