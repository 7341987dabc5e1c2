"""The arm64 tier: the native library cross-built for aarch64 (scripts/arm64.sh, an ARMv8.0 build)
runs under qemu-user as a phone's cores would run it, and computes what this machine computes.

The same C program (tests/native/arm64_check.cpp) is built for this machine against the installed
library and for arm64 against the cross-built one. A Cortex-A76 (dot products, as most phones since
2019) runs the full comparison; a Cortex-A53 (ARMv8.0, older phones) the kernels and one decode,
which a build with dot products everywhere would kill with SIGILL.

Across architectures the floating-point sums of ggml's kernels run in other orders, so logits agree
to a tolerance, not bit for bit, and where two experts' router scores nearly tie a counter may move
by a slice or two: tokens must be identical everywhere, counters identical in nearly every row.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from slicemoe_gguf.embedded import embedded_gguf
from slicemoe_gguf.model_info import describe

TOOLS = ("aarch64-linux-gnu-g++", "qemu-aarch64")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not all(shutil.which(t) for t in TOOLS) and not os.environ.get("SLICEMOE_REQUIRE_ARM64")
    and not (os.geteuid() == 0 and shutil.which("apt-get")),
    reason="needs Debian's aarch64 cross compilers and qemu-user (scripts/arm64.sh installs them as root)")]

LOGIT_TOLERANCE = 5e-3   # of the largest logit: 8-bit activations turn 1e-7 sum-order noise into steps


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """(x86 program, arm64 program): the check built for this machine and cross-built."""
    arm64 = Path(subprocess.run(["bash", str(REPO / "scripts" / "arm64.sh")], capture_output=True, text=True,
                                check=True, timeout=1800).stdout.strip().splitlines()[-1])
    package = Path(sys.modules["slicemoe_gguf"].__file__).parent
    native = tmp_path_factory.mktemp("x86") / "arm64_check"
    subprocess.run(["g++", "-O2", "-std=c++17", str(REPO / "tests" / "native" / "arm64_check.cpp"),
                    "-I", str(package / "include"), "-L", str(package / "lib"), "-lllama",
                    f"-Wl,-rpath,{package / 'lib'}", "-o", str(native)], check=True)
    return native, arm64


def _run(program: Path, *args: str, cpu: str | None = None) -> list[str]:
    command = [str(program), *args]
    env = dict(os.environ)
    if cpu:
        command = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", *command]
        env["QEMU_CPU"] = cpu
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-2000:]}"
    return proc.stdout.splitlines()


def _budgets(path: Path) -> list[str]:
    info = describe(path)
    total = info["expert_msb_bytes"] + info["expert_lsb_bytes"]
    return [str(total // 4), str(total // 2), str(total)]


def _rows(lines: list[str]) -> dict[tuple[str, str], dict]:
    rows = {}
    for line in lines:
        words = line.split()
        rows[words[1], words[2]] = {"tokens": words[4], "counters": words[6:11],
                                    "logits": (float(words[12]), float(words[13]))}
    return rows


@pytest.mark.parametrize("cpu, kernels", [("cortex-a76", ["scalar", "neon", "neon-dotprod"]),
                                          ("cortex-a53", ["scalar", "neon"])])
def test_every_arm64_kernel_of_the_fused_product_agrees_with_the_scalar_one(programs, cpu, kernels):
    lines = _run(programs[1], "kernels", cpu=cpu)
    assert [line.split()[1] for line in lines if line.startswith("kernel ")] == kernels
    assert all(" agrees " in line for line in lines if line.startswith("kernel "))
    assert lines[-1] == f"auto {kernels[-1]}"


def test_the_embedded_model_decodes_on_arm64_as_on_this_machine_for_every_policy_and_budget(programs):
    model = embedded_gguf(progress=False)
    budgets = _budgets(model)
    here = _rows(_run(programs[0], "decode", str(model), *budgets))
    there = _rows(_run(programs[1], "decode", str(model), *budgets, cpu="cortex-a76"))
    assert set(here) == set(there) and len(here) == 8 * 3
    assert all(here[key]["tokens"] == there[key]["tokens"] for key in here)
    same = [key for key in here if here[key]["counters"] == there[key]["counters"]]
    assert len(same) >= len(here) - 3, sorted(set(here) - set(same))
    for key in here:
        top_here, top_there = here[key]["logits"][0], there[key]["logits"][0]
        assert abs(top_here - top_there) <= LOGIT_TOLERANCE * abs(top_here), key


def test_an_armv8_0_core_runs_the_build(programs):
    model = embedded_gguf(progress=False)
    budget = _budgets(model)[0]
    here = _rows(_run(programs[0], "decode", str(model), budget))
    there = _rows(_run(programs[1], "decode", str(model), budget, cpu="cortex-a53"))
    assert here["dbsc", budget]["tokens"] == there["dbsc", budget]["tokens"]


def test_the_arm64_libraries_need_nothing_a_minimal_system_lacks(programs):
    needed = set()
    for library in programs[1].parent.glob("lib*.so"):
        dynamic = subprocess.run(["aarch64-linux-gnu-readelf", "-d", str(library)], capture_output=True, text=True,
                                 check=True).stdout
        needed |= {line.split("[")[1].split("]")[0] for line in dynamic.splitlines() if "(NEEDED)" in line}
    assert "libgomp.so.1" not in needed   # ggml's own thread pool on arm64
    assert needed <= {"libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "ld-linux-aarch64.so.1",
                      "libllama.so", "libslicemoe-ggml.so", "libslicemoe-ggml-base.so", "libslicemoe-ggml-cpu.so"}, needed
