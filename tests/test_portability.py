"""The engine compiles for the platforms this machine cannot run: every unit of native/src against the
patched llama.cpp headers, for Apple silicon and Intel Macs (zig's clang and its bundled macOS
headers: no Apple SDK needed). This keeps the macOS paths (F_NOCACHE reads, the NEON kernels on
Apple cores) from rotting; Metal and linking need an Apple SDK and are not checked here. Android's
bionic target cannot be had here (no NDK; zig refuses it).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from slicemoe_gguf._native import build_info

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("ziglang") is None and not os.environ.get("CI"),
                                 reason="needs the ziglang package (the test extra installs it)")]

UNITS = sorted((REPO / "native" / "src").glob("*.cpp"))


@pytest.mark.parametrize("target", ["aarch64-macos", "x86_64-macos"])
def test_every_engine_unit_compiles_for_macos(target: str, tmp_path):
    source = Path(build_info()["llama_cpp_source"])   # the patched tree the build used
    includes = [REPO / "native" / "include", REPO / "native" / "src", source / "include", source / "ggml" / "include",
                source / "src"]
    env = {**os.environ, "ZIG_GLOBAL_CACHE_DIR": str(tmp_path / "cache"), "ZIG_LOCAL_CACHE_DIR": str(tmp_path / "local")}
    for unit in UNITS:
        command = [sys.executable, "-m", "ziglang", "c++", "-target", target, "-std=c++17", "-Wall", "-c",
                   "-o", str(tmp_path / f"{unit.stem}.o"), *(f"-I{path}" for path in includes), str(unit)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, f"{unit.name} for {target}:\n{proc.stderr[-3000:]}"
        assert "warning:" not in proc.stderr, f"{unit.name} for {target}:\n{proc.stderr[-3000:]}"
    assert sorted(path.stem for path in tmp_path.glob("*.o")) == sorted(unit.stem for unit in UNITS)
