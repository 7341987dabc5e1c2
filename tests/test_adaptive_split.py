"""dbsc's adaptive split and per-layer slice sizes: one set of slots per layer, each holding an
MSB or an LSB slice, so the share of each follows the routing; the budget is split between
layers by their own sizes. Whatever the split, the pools stay within the budget, and a run's
output does not depend on it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_optimum import make_trace, random_trace

from slicemoe_gguf import Model, SliceMoEError
from slicemoe_gguf import trace as traces
from slicemoe_gguf.model_info import describe

PROMPT = "Once upon a time there was a small village by the sea"


def prefix(trace: traces.Trace, n: int) -> traces.Trace:
    return traces.Trace(trace.header, trace.request[:n], trace.layer[:n], trace.phase[:n], trace.experts[:n],
                        trace.weights[:n], trace.tokens[:n])


def resident_bytes(stats: dict, msb: list[int], lsb: list[int]) -> list[int]:
    rows = stats["layers"]
    return [m * a + n * b for m, n, a, b in zip(rows["msb_resident"], rows["lsb_resident"], msb, lsb)]


def pool_bytes(stats: dict, msb: list[int], lsb: list[int]) -> list[int]:
    rows = stats["layers"]
    return [m * a + (0 if shared else n * b)
            for m, n, shared, a, b in zip(rows["msb_slots"], rows["lsb_slots"], rows["shared_slots"], msb, lsb)]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 50), fraction=st.floats(0.15, 0.95), cut=st.floats(0.05, 1.0),
       threshold=st.sampled_from([0.0, 0.25, 0.6]))
def test_the_adaptive_split_never_exceeds_the_budget(seed, fraction, cut, threshold):
    trace = random_trace(seed, n_tokens=60)
    budget = int(traces.total_slice_bytes(trace) * fraction)
    msb, lsb = traces.layer_slice_bytes(trace.header)
    try:
        stats = traces.replay(prefix(trace, max(1, int(len(trace) * cut))), budget=budget, policy="dbsc",
                              high_threshold=threshold)
    except SliceMoEError:
        assert budget < 3 * 2 * msb[0]   # below top-k MSB slices in each layer
        return
    assert all(stats["layers"]["shared_slots"])
    held = resident_bytes(stats, msb, lsb)
    pools = pool_bytes(stats, msb, lsb)
    assert all(h <= p for h, p in zip(held, pools))
    assert stats["pool_bytes"] == sum(pools) <= budget


def test_the_split_follows_each_layers_demand():
    # layer 0 runs every use at 8 bits (heavy weights), layer 1 only its top-ranked use: the same
    # slot count ends up holding far more LSB slices in layer 0, which no fixed split can do
    rng = np.random.default_rng(1)
    experts = np.stack([rng.choice(16, 2, replace=False) for _ in range(400)])
    weights = np.where(np.arange(400)[:, None] % 2 == 0, [[0.5, 0.45]], [[0.5, 0.05]]).astype(np.float32)
    trace = make_trace(experts, weights, n_layers=2, n_experts=16)
    stats = traces.replay(trace, budget=int(traces.total_slice_bytes(trace) * 0.5), policy="dbsc", warmup="none")
    rows = stats["layers"]
    assert rows["msb_slots"][0] == rows["msb_slots"][1]
    share = [l / (m + l) for m, l in zip(rows["msb_resident"], rows["lsb_resident"])]
    assert share[0] > 0.4 and share[1] < 0.25, share
    fixed = traces.replay(trace, budget=int(traces.total_slice_bytes(trace) * 0.5), policy="dbsc", warmup="none",
                          msb_share=2 / 3)
    assert not any(fixed["layers"]["shared_slots"])
    assert stats["flash_bytes"] < fixed["flash_bytes"]


def layered_trace(msb: list[int], lsb: list[int]) -> traces.Trace:
    trace = random_trace(3)
    trace.header["slice_bytes"] = {"msb": msb, "lsb": lsb}
    return trace


@pytest.mark.parametrize("policy", ["dbsc", "lru8", "lfu8", "lru4", "hobbit", "dymoe", "adapmoe", "belady"])
@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_layers_of_different_sizes_keep_their_pools_within_the_budget(policy, fraction):
    msb, lsb = [1000, 3000, 2000], [1000, 3000, 2000]
    trace = layered_trace(msb, lsb)
    total = traces.total_slice_bytes(trace)
    assert total == 8 * (6000 + 6000)
    budget = int(total * fraction)
    try:
        stats = traces.replay(trace, budget=budget, policy=policy)
    except SliceMoEError as exc:
        assert "below the minimum" in str(exc)
        return
    pools = pool_bytes(stats, msb, lsb)
    assert stats["pool_bytes"] == sum(pools) <= budget
    assert all(h <= p for h, p in zip(resident_bytes(stats, msb, lsb), pools))
    # every layer gets about the same fraction of its own slice bytes (within one slot of each kind)
    for i in range(3):
        whole = 8 * (msb[i] + (0 if policy == "lru4" else lsb[i]))
        assert pools[i] <= whole
        if budget < total:
            assert pools[i] >= min(whole, budget * whole / total) - 2 * (msb[i] + lsb[i]) - 1


def test_the_minimum_budget_counts_each_layers_own_slices():
    msb, lsb = [1000, 3000, 2000], [1000, 3000, 2000]
    trace = layered_trace(msb, lsb)
    minimum = 2 * sum(msb)   # top-2 MSB slices in each layer
    traces.replay(trace, budget=minimum, policy="dbsc")
    with pytest.raises(SliceMoEError, match="below the minimum that can run, 11.7 KiB"):
        traces.replay(trace, budget=minimum - 1, policy="dbsc")


@pytest.mark.parametrize("fraction", [0.4, 0.5])
@pytest.mark.slow
def test_shared_slots_run_the_same_tokens_as_every_slice_resident(sliced_gguf, fraction):
    # the LSB products index the same pool tensor as the MSB products: a wrong slot would show in
    # the logits. At 100% every slice is resident (no sharing); below, the slots are shared (at 50%
    # there are as many slots as experts, the count at which every MSB slice would fit).
    path = sliced_gguf("qwen2_moe")
    info = describe(path)
    total = info["expert_msb_bytes"] + info["expert_lsb_bytes"]
    runs = {}
    for share in (1.0, fraction):
        with Model(path, cache_budget=int(total * share), policy="dbsc", high_threshold=0.1) as model:
            runs[share] = (model.generate(PROMPT, 24, keep_logits=True, stop_at_eog=False), model.cache_stats())
    (full, full_stats), (shared, shared_stats) = runs[1.0], runs[fraction]
    assert all(shared_stats["layers"]["shared_slots"]) and not any(full_stats["layers"]["shared_slots"])
    assert shared_stats["misses"] > 0 and shared_stats["high_uses"] == full_stats["high_uses"]
    assert shared.tokens == full.tokens
    np.testing.assert_array_equal(shared.logits, full.logits)


def test_the_per_layer_planner_spends_each_layers_own_bytes():
    import itertools

    msb, lsb = [1000, 3000, 2000], [1000, 3000, 2000]
    trace = layered_trace(msb, lsb)
    budget = int(traces.total_slice_bytes(trace) * 0.5)
    result = traces.plan_layers(trace, budget)
    cost = [m + l for m, l in zip(msb, lsb)]
    assert sum(s * c for s, c in zip(result["layer_slots"], cost)) <= budget
    # the fewest misses of every allocation that fits (each layer's pools are its own)
    best = min(traces.replay(trace, budget=budget, policy="lru8", layer_slots=list(slots))["misses"]
               for slots in itertools.product(range(2, 9), repeat=3)
               if sum(s * c for s, c in zip(slots, cost)) <= budget)
    assert result["misses"] == best
