"""The arm64 tier: the native library cross-built for aarch64 (scripts/arm64.sh, an ARMv8.0 build)
runs under qemu-user as a phone's cores would run it, and computes what this machine computes.

The same C program (tests/native/arm64_check.cpp) is built for this machine against the installed
library and for arm64 against the cross-built one. A Cortex-A76 (dot products, as most phones since
2019) runs the full comparison; a Cortex-A53 (ARMv8.0, older phones) the kernels and one decode,
which a build with dot products everywhere would kill with SIGILL.

Across architectures the floating-point sums of ggml's kernels run in other orders, so logits agree
to a tolerance, not bit for bit, and where two experts' router scores nearly tie a counter may move
by a slice or two: tokens must be identical everywhere, counters identical in nearly every row.

The Python tier runs the wheel a user would install on an arm64 Linux machine or phone: the
cross-built wheel, installed by pip for aarch64 with PyPI's aarch64 wheels of its dependencies, on
Debian's arm64 Python, all under qemu-user (scripts/arm64.sh). It runs the command line, the replay
of a routing trace (pure integer cache logic: equal to x86 to the count) and the server, answered
over 127.0.0.1 to this machine's OpenAI client.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, Server, run_cli, run_json
from slicemoe_gguf.embedded import embedded_gguf
from slicemoe_gguf.model_info import describe

TOOLS = ("aarch64-linux-gnu-g++", "qemu-aarch64")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not all(shutil.which(t) for t in TOOLS) and not os.environ.get("SLICEMOE_REQUIRE_ARM64")
    and not (os.geteuid() == 0 and shutil.which("apt-get")),
    reason="needs Debian's aarch64 cross compilers and qemu-user (scripts/arm64.sh installs them as root)")]

LOGIT_TOLERANCE = 5e-3   # of the largest logit: 8-bit activations turn 1e-7 sum-order noise into steps


@pytest.fixture(scope="module")
def arm64():
    """(check program, python): scripts/arm64.sh's arm64 C check program and its arm64 Python
    launcher, with the cross-built wheel installed."""
    build = subprocess.run(["bash", str(REPO / "scripts" / "arm64.sh")], capture_output=True, text=True,
                           timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    check, python = build.stdout.strip().splitlines()[-2:]
    return Path(check), Path(python)


@pytest.fixture(scope="module")
def programs(arm64, tmp_path_factory):
    """(x86 program, arm64 program): the check built for this machine and cross-built."""
    package = Path(sys.modules["slicemoe_gguf"].__file__).parent
    native = tmp_path_factory.mktemp("x86") / "arm64_check"
    subprocess.run(["g++", "-O2", "-std=c++17", str(REPO / "tests" / "native" / "arm64_check.cpp"),
                    "-I", str(package / "include"), "-L", str(package / "lib"), "-lllama",
                    f"-Wl,-rpath,{package / 'lib'}", "-o", str(native)], check=True)
    return native, arm64[0]


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
    libraries = list((programs[1].parent / "site" / "slicemoe_gguf" / "lib").glob("lib*.so"))
    assert len(libraries) == 4
    for library in libraries:
        dynamic = subprocess.run(["aarch64-linux-gnu-readelf", "-d", str(library)], capture_output=True, text=True,
                                 check=True).stdout
        needed |= {line.split("[")[1].split("]")[0] for line in dynamic.splitlines() if "(NEEDED)" in line}
    assert "libgomp.so.1" not in needed   # ggml's own thread pool on arm64
    assert needed <= {"libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "ld-linux-aarch64.so.1",
                      "libllama.so", "libslicemoe-ggml.so", "libslicemoe-ggml-base.so", "libslicemoe-ggml-cpu.so"}, needed


# The Python tier: the wheel on Debian's arm64 Python, under emulation -----------------------------

PROMPT = "ROMEO:"
N_TOKENS = 16
COUNTERS = ("hits", "misses", "loads", "flash_bytes")
# A decode whose greedy tokens agree on both machines (a tie between two tokens within 1e-4 of the
# largest logit comes later without a cache: the 8-bit product over the mapped file sums in another
# order than the fused one over the pools).
TRACE_FLAGS = ("-p", PROMPT, "-n", str(N_TOKENS), "--cache-budget", "50%")
# Routing weights (0 to 1) drift with the logits (LOGIT_TOLERANCE): measured at most 2.7e-3 by the
# 12th decode token.
WEIGHT_TOLERANCE = 5e-3
SLICE_SLACK = 2   # slices a near-tie (router scores, or a weight at the 8-bit threshold) may move


def _arm64_cli(arm64, workdir: Path, *args: str, cpu: str = "cortex-a76") -> str:
    """`slicemoe ARGS` on the arm64 Python; run outside the source tree, whose slicemoe_gguf (no
    library) `python -m` would put first on the path."""
    command = [str(arm64[1]), "-m", "slicemoe_gguf.cli", *args]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=workdir, timeout=900,
                          env=dict(os.environ, QEMU_CPU=cpu))
    assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def _assert_counters_close(here: dict, there: dict, slice_bytes: int) -> None:
    for name in COUNTERS:
        slack = SLICE_SLACK * (slice_bytes if name == "flash_bytes" else 1)
        assert abs(here[name] - there[name]) <= slack, (name, here[name], there[name])


@pytest.mark.parametrize("cpu, kernel", [("cortex-a76", "neon-dotprod"), ("cortex-a53", "neon")])
def test_the_arm64_wheel_runs_on_debian_python_with_pypis_aarch64_dependencies(arm64, tmp_path, cpu, kernel):
    info = _arm64_cli(arm64, tmp_path, "info", cpu=cpu)
    assert f"library         {arm64[1].parent / 'site' / 'slicemoe_gguf' / 'lib' / 'libllama.so'}" in info
    assert "NEON = 1" in info
    assert f"expert product  {kernel} " in info


def test_slicemoe_run_on_arm64_writes_this_machines_text_and_reads(arm64, tmp_path):
    model = embedded_gguf(progress=False)
    flags = ["-m", str(model), "-p", PROMPT, "-n", str(N_TOKENS), "--cache-budget", "50%", "--json"]
    here = run_json("run", *flags)
    there = json.loads(_arm64_cli(arm64, tmp_path, "run", *flags))
    assert there["tokens"] == here["tokens"] and there["text"] == here["text"]
    _assert_counters_close(here["cache"], there["cache"], describe(model)["msb_slice_bytes"])


@pytest.fixture(scope="module")
def trace_here(tmp_path_factory):
    """A routing trace of the embedded model recorded on this machine."""
    path = tmp_path_factory.mktemp("trace") / "here.jsonl"
    run_cli("trace", "-m", str(embedded_gguf(progress=False)), *TRACE_FLAGS, "-o", str(path))
    return path


@pytest.mark.parametrize("budget", ["25%", "50%"])
def test_a_trace_recorded_here_replays_on_arm64_to_the_same_counts_for_every_policy(arm64, trace_here, tmp_path,
                                                                                    budget):
    # `--policy optimal` replays every policy and solves the offline optimum: integers and their ratios,
    # which no CPU may change.
    flags = [str(trace_here), "--cache-budget", budget, "--json"]
    assert json.loads(_arm64_cli(arm64, tmp_path, "sim", *flags, "--policy", "optimal")) == \
        run_json("sim", *flags, "--policy", "optimal")
    for policy in ("dbsc", "cache_prior"):   # every counter, per layer; cache_prior re-picks the experts
        here = run_json("sim", *flags, "--policy", policy)
        there = json.loads(_arm64_cli(arm64, tmp_path, "sim", *flags, "--policy", policy))
        assert there == here, policy


def test_arm64_routes_the_tokens_through_the_experts_this_machine_does(arm64, trace_here, tmp_path):
    there_path = tmp_path / "there.jsonl"
    _arm64_cli(arm64, tmp_path, "trace", "-m", str(embedded_gguf(progress=False)), *TRACE_FLAGS, "-o", str(there_path))
    here = [json.loads(line) for line in trace_here.read_text().splitlines()[1:]]
    there = [json.loads(line) for line in there_path.read_text().splitlines()[1:]]
    assert [(r["token"], r["phase"], r["layer"]) for r in there] == [(r["token"], r["phase"], r["layer"]) for r in here]
    for mine, theirs in zip(here, there):
        weight_here = dict(zip(mine["experts"], mine["weights"]))
        weight_there = dict(zip(theirs["experts"], theirs["weights"]))
        # an expert chosen on one side only is a swap at the cut-off between two near-equal scores
        only_here, only_there = set(weight_here) - set(weight_there), set(weight_there) - set(weight_here)
        assert len(only_here) == len(only_there) <= 1, (mine, theirs)
        for expert in only_here:
            (other,) = only_there
            assert abs(weight_here[expert] - weight_there[other]) < WEIGHT_TOLERANCE, (mine, theirs)
        for expert in set(weight_here) & set(weight_there):
            assert weight_there[expert] == pytest.approx(weight_here[expert], abs=WEIGHT_TOLERANCE)


def test_the_server_on_arm64_answers_this_machines_openai_client_as_the_server_here_does(arm64, tmp_path):
    import openai

    model = embedded_gguf(progress=False)
    flags = ("-c", "2048", "--cache-budget", "50%")
    launchers = {"here": (("slicemoe",), None),
                 "arm64": ((str(arm64[1]), "-m", "slicemoe_gguf.cli"), dict(os.environ, QEMU_CPU="cortex-a76"))}
    replies = {}
    for name, (launcher, env) in launchers.items():
        server = Server(model, tmp_path, *flags, launcher=launcher, env=env, start_timeout=300)
        try:
            client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", timeout=300, max_retries=0)
            completion = client.completions.create(model="any", prompt=PROMPT, max_tokens=N_TOKENS, temperature=0)
            stream = client.chat.completions.create(model="any", messages=[{"role": "user", "content": PROMPT}],
                                                    max_tokens=N_TOKENS, temperature=0, stream=True)
            chat = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            replies[name] = (completion.choices[0].text, completion.model_extra["slicemoe"]["cache"], chat)
        finally:
            assert server.stop() == 0, server.log[-3000:]
    assert replies["arm64"][0] == replies["here"][0] and len(replies["here"][0]) > 0
    assert replies["arm64"][2] == replies["here"][2] and len(replies["here"][2]) > 0
    _assert_counters_close(replies["here"][1], replies["arm64"][1], describe(model)["msb_slice_bytes"])
