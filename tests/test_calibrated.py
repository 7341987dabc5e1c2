"""Calibrated policies: AdapMoE's per-layer sensitivity S_l and DyMoE's per-layer 8-bit uses,
given per MoE layer (scripts/calibrate_policies.py measures them on training text)."""

from __future__ import annotations

import pytest

from helpers import run_cli, run_json
from test_optimum import random_trace

from slicemoe_gguf import Model, SliceMoEError
from slicemoe_gguf import trace as traces
from slicemoe_gguf.model_info import describe

PROMPT = "Once upon a time there was a small village by the sea"


@pytest.fixture(scope="module")
def trace():
    return random_trace(11, n_tokens=200)   # 3 layers, 8 experts, top-2


def test_dymoe_runs_each_layers_calibrated_count_at_8_bits(trace):
    budget = traces.total_slice_bytes(trace)
    decode_per_layer = int((trace.phase == 1).sum()) // 3
    for counts in ([2, 2, 2], [0, 0, 0], [2, 0, 1]):
        stats = traces.replay(trace, budget=budget, policy="dymoe", layer_high_uses=counts)
        assert stats["high_uses"] == decode_per_layer * sum(counts)


def test_adapmoe_with_unit_sensitivity_is_the_calibration_free_rule(trace):
    budget = traces.total_slice_bytes(trace) // 2
    plain = traces.replay(trace, budget=budget, policy="adapmoe", gating_t=0.1)
    unit = traces.replay(trace, budget=budget, policy="adapmoe", gating_t=0.1, layer_sensitivity=[1.0, 1.0, 1.0])
    assert unit == plain
    # a sensitive layer drops less, an insensitive one more
    guarded = traces.replay(trace, budget=budget, policy="adapmoe", gating_t=0.1, layer_sensitivity=[1e6, 1.0, 1.0])
    loose = traces.replay(trace, budget=budget, policy="adapmoe", gating_t=0.1, layer_sensitivity=[1e-3, 1.0, 1.0])
    assert guarded["dropped_uses"] < plain["dropped_uses"] < loose["dropped_uses"]


def test_a_calibration_of_another_layer_count_is_refused(trace, sliced_gguf):
    with pytest.raises(SliceMoEError, match="layer_high_uses: 2 values for 3 MoE layers"):
        traces.replay(trace, budget=traces.total_slice_bytes(trace), policy="dymoe", layer_high_uses=[1, 1])
    with pytest.raises(SliceMoEError, match="every S_l must be in"):
        traces.replay(trace, budget=traces.total_slice_bytes(trace), policy="adapmoe", layer_sensitivity=[0, 1, 1])
    path = sliced_gguf("qwen2_moe")
    n_layers = len(describe(path)["layers"])
    with pytest.raises(SliceMoEError, match=f"layer_sensitivity: {n_layers + 1} values for {n_layers} MoE layers"):
        Model(path, cache_budget=10 ** 9, policy="adapmoe", layer_sensitivity=[1.0] * (n_layers + 1))


@pytest.mark.slow
def test_the_flags_reach_live_runs_and_replay_alike(sliced_gguf, tmp_path):
    path = sliced_gguf("qwen2_moe")
    info = describe(path)
    counts = ",".join(str(i % 2) for i in range(len(info["layers"])))
    out = tmp_path / "t.jsonl"
    flags = ["--cache-budget", "60%", "--policy", "dymoe", "--layer-high-uses", counts, "--ignore-eos"]
    run_cli("trace", "-m", str(path), "-p", PROMPT, "-n", "12", "-o", str(out), *flags)
    live = run_json("run", "-m", str(path), "-p", PROMPT, "-n", "12", "--json", *flags)["cache"]
    replayed = run_json("sim", str(out), "--json", *flags[:-1])
    for key in ("high_uses", "low_uses", "misses", "flash_bytes"):
        assert live[key] == replayed[key], key
