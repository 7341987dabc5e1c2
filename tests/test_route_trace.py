"""Trace-driven decode (`slicemoe run --route-trace`): every MoE layer runs a recorded route
instead of its router's choice, so a model of a published shape computes and reads what a real
model's routing asked for."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import run_cli, run_json
from slicemoe_gguf import Model, trace as traces
from slicemoe_gguf._native import SliceMoEError
from slicemoe_gguf.embedded import embedded_gguf

PROMPT = "ROMEO: But soft, what light through yonder window breaks?"
OTHER_PROMPT = "Now is the winter of our discontent made glorious summer"
COUNTERS = ("msb_hits", "msb_misses", "lsb_hits", "lsb_misses", "loads", "evictions", "flash_bytes",
            "high_uses", "low_uses", "warmup_loads", "decode_tokens", "dropped_uses")


@pytest.fixture(scope="module")
def embedded():
    return embedded_gguf(progress=False)


@pytest.fixture(scope="module")
def own_route(embedded):
    """The embedded model's own routing of PROMPT, as a route to force."""
    with Model(embedded, record_trace=True, n_threads=2) as model:
        model.generate(PROMPT, 8, stop_at_eog=False)
        return traces.request_route(model.routing_trace())


@pytest.mark.parametrize("policy", ["dbsc", "lru8", "hobbit", "adapmoe"])
def test_a_recorded_route_forced_onto_another_prompt_reproduces_the_run(embedded, tmp_path, policy):
    flags = ("--cache-budget", "40%", "--policy", policy, "-t", "2")
    path = tmp_path / "route.jsonl"
    run_cli("trace", "-m", str(embedded), "-p", PROMPT, "-n", "24", "--ignore-eos", "-o", str(path), *flags)
    recorded = run_json("run", "-m", str(embedded), "-p", PROMPT, "-n", "24", "--ignore-eos", "--json", *flags)

    forced = run_json("run", "-m", str(embedded), "--route-trace", str(path), "-p", OTHER_PROMPT, "--json", *flags)

    assert forced["route_trace"]["n_prompt"] == recorded["n_prompt"]
    for name in COUNTERS:
        assert forced["cache"][name] == recorded["cache"][name], name
    assert forced["cache"]["layers"]["msb_misses"] == recorded["cache"]["layers"]["msb_misses"]
    # the same prompt under its own recorded routing computes the same model
    same = run_json("run", "-m", str(embedded), "--route-trace", str(path), "-p", PROMPT, "--json", *flags)
    assert same["tokens"] == recorded["tokens"]


@pytest.mark.parametrize("policy, warmup", [("lru8", "none"), ("dbsc", "pcw"), ("hobbit", "none")])
def test_a_forced_route_counts_what_the_replay_of_its_trace_counts(embedded, tmp_path, policy, warmup):
    """Live and replay are one engine: a route forced onto a decode reads, hits and misses exactly
    as `slicemoe sim` of the same trace says (no step more or less on either side)."""
    flags = ("--cache-budget", "30%", "--policy", policy, "--warmup", warmup)
    path = tmp_path / "route.jsonl"
    run_cli("trace", "-m", str(embedded), "-p", PROMPT, "-n", "24", "--ignore-eos", "-o", str(path), "-t", "2", *flags)
    live = run_json("run", "-m", str(embedded), "--route-trace", str(path), "-p", OTHER_PROMPT, "--json", "-t", "2",
                    *flags)["cache"]
    replayed = run_json("sim", str(path), "--json", *flags)
    for name in COUNTERS:
        assert live[name] == replayed[name], name
    for name in ("msb_hits", "msb_misses", "lsb_hits", "lsb_misses", "loads", "evictions"):
        assert live["layers"][name] == replayed["layers"][name], name


def test_the_forced_route_is_the_route_another_model_takes(sliced_gguf, stock_gguf, tmp_path):
    """A route recorded on the sliced model, forced onto the stock q8_0 file of the same checkpoint
    (another model of the shape): the stock model's recorded routing is the forced one."""
    sliced, stock = sliced_gguf("qwen2_moe"), stock_gguf("qwen2_moe")
    with Model(sliced, record_trace=True) as model:
        model.generate(PROMPT, 12, stop_at_eog=False)
        route = traces.request_route(model.routing_trace())
    with Model(stock, record_trace=True, forced_routes=True) as model:
        model.force_routes(route.experts, route.weights)
        prompt = [1 + i % 50 for i in range(route.n_prompt)]
        model.generate(prompt, route.n_decode + 1, stop_at_eog=False)
        taken = traces.request_route(model.routing_trace())
    # the last layer of the prompt runs its last token only, in both runs
    np.testing.assert_array_equal(taken.experts[route.n_prompt - 1:], route.experts[route.n_prompt - 1:])
    np.testing.assert_array_equal(taken.weights[route.n_prompt - 1:], route.weights[route.n_prompt - 1:])
    np.testing.assert_array_equal(taken.experts[:, :-1], route.experts[:, :-1])


def test_a_route_of_another_shape_is_refused_with_both_shapes(embedded, sliced_gguf, tmp_path):
    path = tmp_path / "embedded.jsonl"
    run_cli("trace", "-m", str(embedded), "-p", PROMPT, "-n", "4", "-o", str(path))
    proc = run_cli("run", "-m", str(sliced_gguf("qwen2_moe")), "--route-trace", str(path), check=False)
    assert proc.returncode != 0
    assert "the route has 6 MoE layers, top-4 of 32 experts; the model has 3 MoE layers, top-4 of 12 experts" \
        in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_batch_beyond_the_route_fails_and_the_model_routes_itself_again(embedded, own_route):
    with Model(embedded, cache_budget=embedded.stat().st_size // 3, n_threads=2) as model:
        expected = model.generate(PROMPT, 8, stop_at_eog=False).tokens
        route = own_route
        model.force_routes(route.experts[:5], route.weights[:5])
        with pytest.raises(SliceMoEError, match="covers positions 0 to 4"):
            model.generate(PROMPT, 8, stop_at_eog=False)
        model.force_routes(None)
        assert model.generate(PROMPT, 8, stop_at_eog=False).tokens == expected


def test_bad_routes_are_refused(embedded, own_route):
    with Model(embedded, n_threads=2) as model:
        route = own_route
        experts = route.experts.copy()
        experts[3, 2, 1] = 32
        with pytest.raises(SliceMoEError, match="position 3, MoE layer 2: expert 32"):
            model.force_routes(experts, route.weights)
        weights = route.weights.copy()
        weights[0, 0, 0] = np.nan
        with pytest.raises(SliceMoEError, match="finite number"):
            model.force_routes(route.experts, weights)


@pytest.mark.slow
def test_a_stock_model_needs_forced_routes_at_load(stock_gguf):
    with Model(stock_gguf("olmoe")) as model:
        with pytest.raises(SliceMoEError, match="forced_routes"):
            model.force_routes(np.zeros((2, 1, 1), np.int32), np.zeros((2, 1, 1), np.float32))


def test_widening_maps_each_copy_onto_its_own_experts():
    rng = np.random.default_rng(0)
    experts = np.stack([rng.permutation(32)[:4] for _ in range(5 * 6)]).reshape(5, 6, 4).astype(np.int32)
    weights = np.sort(rng.random((5, 6, 4)).astype(np.float32), axis=2)[:, :, ::-1].copy()
    wide = traces.widen(traces.RequestRoute(1, 3, 2, experts, weights, 32), n_layers=16, n_experts=64, top_k=8)
    assert wide.experts.shape == (5, 16, 8)
    assert np.all(np.diff(wide.weights, axis=2) <= 0)              # best first
    np.testing.assert_allclose(wide.weights.sum(axis=2), (weights.sum(axis=2)[:, [L % 6 for L in range(16)]]
                                                          + weights.sum(axis=2)[:, [(L + 3) % 6 for L in range(16)]]) / 2,
                               rtol=1e-6)
    for L in range(16):   # copy 0 is the small model's layer L mod 6, copy 1 layer (L + 3) mod 6, shifted by 32
        assert set(wide.experts[0, L]) == set(experts[0, L % 6]) | set(experts[0, (L + 3) % 6] + 32)
    with pytest.raises(ValueError, match="same integer factor"):
        traces.widen(traces.RequestRoute(1, 3, 2, experts, weights, 32), n_layers=16, n_experts=64, top_k=6)

