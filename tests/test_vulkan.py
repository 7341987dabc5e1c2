"""The slice cache on a GPU-class backend: Vulkan (Mesa's lavapipe, software Vulkan, in CI).

With layers offloaded, the experts stay mapped on the host and the pools live in device memory; a
miss is a flash read then a host-to-device copy. The cache's decisions run on the host from the
router output, so they must be the same as on the CPU; only the arithmetic of the products differs.

These tests need a build with the Vulkan backend (`slicemoe info` lists a Vulkan device). Without
one they are skipped, unless SLICEMOE_REQUIRE_VULKAN is set (CI sets it), where that is a failure.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import convert, run_cli

from slicemoe_gguf import Model
from slicemoe_gguf.model_info import describe
from slicemoe_gguf.runtime import library_info

PROMPT = "Once upon a time there was a small village by the sea"
COUNTERS = ("msb_hits", "msb_misses", "lsb_hits", "lsb_misses", "loads", "evictions", "flash_bytes",
            "ram_bytes", "high_uses", "low_uses", "decode_tokens", "pool_bytes")
# Measured on lavapipe against the CPU backend: max |logit difference| 2e-3 .. 6e-3 over 16 decode
# steps (tiny models, logits of order 10). Vulkan's quantized products round activations and
# accumulate in another order than the CPU's, so bit equality is not expected; 5e-2 leaves margin
# while still failing on a wrong slot (a wrong expert moves logits by whole units).
LOGIT_TOLERANCE = 5e-2


def vulkan_devices() -> list[str]:
    return [d["name"] for d in library_info()["devices"] if d["name"].lower().startswith("vulkan")]


@pytest.fixture(scope="module", autouse=True)
def needs_vulkan():
    if not vulkan_devices():
        message = "no Vulkan device in this build (install libvulkan-dev, glslc, spirv-headers and a driver, then rebuild)"
        if os.environ.get("SLICEMOE_REQUIRE_VULKAN"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def sliced(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("vulkan")
    made = {}

    def get(arch: str):
        if arch not in made:
            made[arch] = root / f"{arch}.gguf"
            assert convert(tiny_checkpoints(arch), made[arch]).returncode == 0
        return made[arch]

    return get


def decode(path, budget: int, n_gpu_layers: int):
    with Model(path, precision="high", cache_budget=budget, n_gpu_layers=n_gpu_layers, n_threads=2) as model:
        result = model.generate(PROMPT, 16, keep_logits=True, stop_at_eog=False)
        return result, model.cache_stats()


def test_info_lists_the_vulkan_device():
    proc = run_cli("info")
    assert "Vulkan" in proc.stdout


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_vulkan_decode_matches_the_cpu_with_the_same_counters(sliced, arch, fraction):
    path = sliced(arch)
    info = describe(path)
    budget = int((info["expert_msb_bytes"] + info["expert_lsb_bytes"]) * fraction)
    cpu, cpu_stats = decode(path, budget, n_gpu_layers=0)
    gpu, gpu_stats = decode(path, budget, n_gpu_layers=99)
    assert gpu.tokens == cpu.tokens
    assert np.abs(gpu.logits - cpu.logits).max() < LOGIT_TOLERANCE
    for name in COUNTERS:
        assert gpu_stats[name] == cpu_stats[name], name
    assert gpu_stats["layers"]["msb_misses"] == cpu_stats["layers"]["msb_misses"]


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.3])
def test_device_pools_never_exceed_the_budget(sliced, fraction):
    path = sliced("olmoe")
    info = describe(path)
    budget = int((info["expert_msb_bytes"] + info["expert_lsb_bytes"]) * fraction)
    _, on_cpu = decode(path, budget, n_gpu_layers=0)
    _, offloaded = decode(path, budget, n_gpu_layers=99)
    assert on_cpu["device_pool_bytes"] == 0
    # device_pool_bytes is the size of the backend buffers that hold the pools
    assert 0 < offloaded["device_pool_bytes"] <= budget
    assert offloaded["device_pool_bytes"] >= offloaded["pool_bytes"]
