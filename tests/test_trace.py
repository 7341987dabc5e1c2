"""Routing traces and their replay: one cache manager serves live runs and `slicemoe sim`."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import _load_script, run_cli, run_json

from slicemoe_gguf import Model, trace as traces
from slicemoe_gguf.memory import routed_expert_bytes
from slicemoe_gguf.model_info import describe

PROMPT = "Once upon a time there was a small village by the sea"
COUNTERS = ("msb_hits", "msb_misses", "lsb_hits", "lsb_misses", "loads", "evictions", "flash_bytes",
            "ram_bytes", "high_uses", "low_uses", "warmup_loads", "decode_tokens")


@pytest.fixture(scope="module")
def sliced(sliced_gguf):
    return sliced_gguf("qwen2_moe")


def slice_total(path) -> int:
    return routed_expert_bytes(describe(path))


@pytest.mark.parametrize("policy,warmup,fraction", [("dbsc", "pcw", 0.5), ("dbsc", "none", 0.3),
                                                    ("lru8", "none", 0.5), ("lfu8", "pcw", 0.4),
                                                    ("lru4", "none", 0.25), ("hobbit", "pcw", 0.5),
                                                    ("dymoe", "none", 0.5)])
def test_a_live_run_replayed_gives_the_same_counters(sliced, policy, warmup, fraction):
    budget = int(slice_total(sliced) * fraction)
    with Model(sliced, cache_budget=budget, policy=policy, warmup=warmup, record_trace=True) as model:
        for prompt in (PROMPT, "the fish and the sea and the stars"):
            model.generate(prompt, 24, stop_at_eog=False)
        live = model.cache_stats()
        trace = model.routing_trace()
    replayed = traces.replay(trace, policy=policy, budget=budget, warmup=warmup)
    for name in COUNTERS:
        assert replayed[name] == live[name], name
    assert replayed["layers"]["msb_misses"] == live["layers"]["msb_misses"]
    assert replayed["pool_bytes"] == live["pool_bytes"]


@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_lsb_slices_read_in_the_background_replay_to_the_same_decisions(sliced, fraction):
    """lsb_background: an 8-bit use whose MSB slice is resident and whose LSB slice is not runs at 4
    bits, and the LSB slice is read for the layer's next token; a use that waits for its MSB slice
    anyway reads its LSB slice with it. Which uses that demotes depends only on the routing, so a
    replay counts exactly what the live run did, and every LSB miss comes with an MSB miss."""
    budget = int(slice_total(sliced) * fraction)
    with Model(sliced, cache_budget=budget, lsb_background=True, record_trace=True) as model:
        for prompt in (PROMPT, "the fish and the sea and the stars"):
            model.generate(prompt, 24, stop_at_eog=False)
        live = model.cache_stats()
        trace = model.routing_trace()
    waiting = traces.replay(trace, budget=budget)
    replayed = traces.replay(trace, budget=budget, lsb_background=True)
    for name in COUNTERS:
        assert replayed[name] == live[name], name
    assert replayed["layers"]["loads"] == live["layers"]["loads"]
    assert live["lsb_misses"] <= live["msb_misses"] and live["lsb_misses"] < waiting["lsb_misses"]
    assert 0 < live["high_uses"] < waiting["high_uses"]   # the slices read behind serve later tokens


def test_the_threshold_found_for_a_share_of_8_bit_uses_gives_that_share_in_a_replay(sliced):
    """The accuracy-speed front runs each dbsc configuration at one share of 8-bit uses on both of
    its models, because a threshold is a routing weight whose scale depends on the model's top-k:
    the threshold found for a share gives that share when the trace is replayed, and a larger share
    takes a lower threshold."""
    benchlib = _load_script("benchlib")
    budget = int(slice_total(sliced) * 0.5)
    with Model(sliced, cache_budget=budget, record_trace=True) as model:
        model.generate(PROMPT, 32, stop_at_eog=False)
        trace = model.routing_trace()
    found = {}
    for share in (0.6, 0.8):
        threshold, reached = benchlib.threshold_for_share(trace, budget, share)
        stats = traces.replay(trace, budget=budget, high_threshold=threshold)
        assert stats["high_uses"] / (stats["high_uses"] + stats["low_uses"]) == pytest.approx(reached)
        assert reached == pytest.approx(share, abs=0.05)
        found[share] = threshold
    assert found[0.8] < found[0.6]


def test_trace_file_round_trips_and_sim_reports_the_run_counters(sliced, tmp_path):
    path = tmp_path / "t.jsonl"
    proc = run_cli("trace", "-m", str(sliced), "-p", PROMPT, "-n", "16", "--ignore-eos", "-o", str(path))
    assert "routing records" in proc.stdout
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["format"] == "slicemoe-trace" and header["version"] == 1
    info = describe(sliced)
    assert header["n_layers"] == 3 and header["top_k"] == info["top_k"] and header["moe_layers"] == [0, 1, 2]
    first = json.loads(lines[1])
    assert set(first) == {"request", "token", "phase", "layer", "experts", "weights"}
    assert first["phase"] == "prefill"

    trace = traces.read(path)
    assert len(trace) == len(lines) - 1
    sim = run_json("sim", str(path), "--policy", "lru8", "--cache-budget", "50%", "--json")
    # the same defaults everywhere (warm-up included): the sim of a plain trace is the run
    live = run_json("run", "-m", str(sliced), "-p", PROMPT, "-n", "16", "--json", "--ignore-eos",
                    "--policy", "lru8", "--cache-budget", str(sim["budget_bytes"]))["cache"]
    for name in ("hits", "misses", "flash_bytes", "loads", "evictions"):
        assert sim[name] == live[name], name


def _single_layer_trace(sequence: list[int], n_experts: int = 4) -> traces.Trace:
    header = {"format": "slicemoe-trace", "version": 1, "n_layers": 1, "n_experts": n_experts, "top_k": 1,
              "moe_layers": [0], "slice_bytes": {"msb": 1, "lsb": 1}}
    return traces.from_records(header, [(1, 0, 1, [e], [1.0]) for e in sequence])


@pytest.mark.parametrize("sequence,policy,misses", [
    # two whole-expert slots (budget 4 bytes, 1 byte per slice); worked out by hand
    ([0, 1, 2, 0, 3, 0, 1], "lru8", 6),
    ([0, 1, 2, 0, 3, 0, 1], "belady", 5),   # at 2 evict 1 (next use farthest), at 3 evict 2 (never again)
    ([0, 0, 1, 2, 0, 1], "lru8", 5),
    ([0, 0, 1, 2, 0, 1], "lfu8", 4),        # at 2 evict 1 (used once) rather than 0 (twice)
    ([0, 0, 1, 2, 0, 1], "belady", 4),
])
def test_hand_made_traces_give_the_worked_out_misses(sequence, policy, misses):
    stats = traces.replay(_single_layer_trace(sequence), policy=policy, budget=4)
    assert stats["msb_misses"] == misses and stats["lsb_misses"] == misses
    assert stats["msb_hits"] == len(sequence) - misses
    assert stats["pool_bytes"] == 4


@settings(max_examples=60, deadline=None)
@given(sequence=st.lists(st.integers(0, 7), min_size=1, max_size=200), slots=st.integers(1, 7))
def test_belady_never_misses_more_than_an_online_policy(sequence, slots):
    trace = _single_layer_trace(sequence, n_experts=8)
    budget = 2 * slots
    belady = traces.replay(trace, policy="belady", budget=budget)
    for policy in ("lru8", "lfu8"):
        online = traces.replay(trace, policy=policy, budget=budget)
        assert belady["misses"] <= online["misses"], policy
        assert online["pool_bytes"] <= budget


def _oracle_misses(steps: list[tuple[int, list[int]]], n_layers: int, slots: int, policy: str) -> int:
    """A whole-expert cache written from the specification, in plain Python: per layer `slots`
    slots; a step (one token of one layer) needs all its experts resident together, so the step's
    resident experts are never victims of its misses; a miss takes the lowest free slot, else
    evicts the lowest key among the others (lru8: the step it was last used; lfu8: its uses since
    it was loaded; belady: minus the step of its next use), ties going to the least recently used,
    then to the lowest slot."""
    expert = {layer: [-1] * slots for layer in range(n_layers)}
    last = {layer: [0] * slots for layer in range(n_layers)}
    uses = {layer: [0] * slots for layer in range(n_layers)}
    misses = 0
    for step, (layer, experts) in enumerate(steps, start=1):
        held, last_use, count = expert[layer], last[layer], uses[layer]
        for e in experts:
            if e in held:
                last_use[held.index(e)] = step

        def key(slot: int) -> tuple[float, int]:
            if policy == "lru8":
                return last_use[slot], last_use[slot]
            if policy == "lfu8":
                return count[slot], last_use[slot]
            later = [j for j in range(step, len(steps)) if steps[j][0] == layer and held[slot] in steps[j][1]]
            return (-later[0] if later else -1e300), last_use[slot]

        for e in experts:
            if e in held:
                slot = held.index(e)
            else:
                misses += 1
                free = [s for s in range(slots) if held[s] < 0]
                slot = free[0] if free else min((s for s in range(slots) if last_use[s] != step), key=key)
                held[slot], count[slot] = e, 0
            last_use[slot] = step
            count[slot] += 1
    return misses


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n_layers=st.integers(1, 3), top_k=st.integers(1, 3), spare=st.integers(0, 4))
def test_whole_expert_policies_replay_as_the_plain_python_oracle(data, n_layers, top_k, spare):
    """Replay of lru8, lfu8 and belady equals _oracle_misses on random multi-layer top-k traces.
    (It found that a miss of a better-ranked use could evict the slice a later use of the same
    token hits, which was then read again.)"""
    n_experts, slots = 8, top_k + spare
    steps = [(layer, data.draw(st.lists(st.integers(0, n_experts - 1), min_size=top_k, max_size=top_k, unique=True)))
             for _ in range(data.draw(st.integers(1, 60))) for layer in range(n_layers)]
    header = {"format": "slicemoe-trace", "version": 1, "n_layers": n_layers, "n_experts": n_experts, "top_k": top_k,
              "moe_layers": list(range(n_layers)), "slice_bytes": {"msb": 1, "lsb": 1}}
    trace = traces.from_records(header, [(1, layer, 1, experts, [1.0 / top_k] * top_k) for layer, experts in steps])
    for policy in ("lru8", "lfu8", "belady"):
        stats = traces.replay(trace, policy=policy, budget=2 * slots * n_layers, warmup="none")
        expected = _oracle_misses(steps, n_layers, slots, policy)
        assert (stats["msb_misses"], stats["lsb_misses"]) == (expected, expected), policy


def test_belady_on_a_recorded_trace_beats_lru_and_lfu(sliced):
    with Model(sliced, record_trace=True) as model:
        model.generate(PROMPT, 48, stop_at_eog=False)
        trace = model.routing_trace()
    for fraction in (0.4, 0.6, 0.8):   # above the minimum: top-k whole experts per layer
        budget = int(slice_total(sliced) * fraction)
        belady = traces.replay(trace, policy="belady", budget=budget)
        for policy in ("lru8", "lfu8"):
            assert belady["misses"] <= traces.replay(trace, policy=policy, budget=budget)["misses"]


@pytest.mark.slow
def test_a_stock_model_can_be_traced(stock_gguf, tmp_path):
    path = tmp_path / "stock.jsonl"
    run_cli("trace", "-m", str(stock_gguf("olmoe")), "-p", PROMPT, "-n", "8", "--ignore-eos", "-o", str(path))
    trace = traces.read(path)
    assert trace.header["slice_bytes"]["lsb"] == 0
    assert (trace.phase == 1).sum() > 0
    # a 4-bit-only policy can replay it (no LSB slices needed)
    stats = traces.replay(trace, policy="lru4", budget=10**7)
    assert stats["misses"] > 0


def test_belady_is_refused_live(sliced):
    with pytest.raises(Exception, match="only in trace replay"):
        Model(sliced, cache_budget=10**6, policy="belady")


def test_bad_trace_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "something-else"}\n')
    proc = run_cli("sim", str(bad), "--cache-budget", "1MB", check=False)
    assert proc.returncode == 1 and "not a slicemoe-trace" in proc.stderr
    bad.write_text(json.dumps({"format": "slicemoe-trace", "version": 1, "n_layers": 1, "n_experts": 4, "top_k": 1,
                               "slice_bytes": {"msb": 1, "lsb": 1}}) + "\n" + '{"request": 1, "layer": 3}\n')
    proc = run_cli("sim", str(bad), "--cache-budget", "1MB", check=False)
    assert proc.returncode == 1 and "line 2" in proc.stderr and "Traceback" not in proc.stderr


def test_sim_into_a_closed_pipe_stops_quietly_as_a_unix_filter(sliced, tmp_path):
    path = tmp_path / "t.jsonl"
    run_cli("trace", "-m", str(sliced), "-p", PROMPT, "-n", "4", "-o", str(path))
    # the reader is gone before the report is written, as with `slicemoe sim ... | head -c 0`
    proc = subprocess.Popen(["slicemoe", "sim", str(path), "--cache-budget", "50%", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def test_plan_finds_the_smallest_budget_that_meets_the_miss_rate(sliced, tmp_path):
    path = tmp_path / "t.jsonl"
    run_cli("trace", "-m", str(sliced), "-f", str(_prompts(tmp_path)), "-n", "24", "--ignore-eos", "-o", str(path))
    trace = traces.read(path)
    target = 0.25
    result = run_json("plan", str(path), "--max-miss-rate", str(target), "--json")
    assert result["miss_rate"] <= target
    total = traces.total_slice_bytes(trace)
    smaller = result["budget_bytes"] - total // 50
    try:
        below = traces.replay(trace, policy="dbsc", budget=smaller, msb_share=result["msb_share"])
        assert traces.miss_rate(below) > target
    except Exception as exc:        # or it is below the minimum that can run
        assert "below the minimum" in str(exc)
    # the chosen split is what `run --msb-share` and `sim` use: replaying it reproduces the plan
    again = traces.replay(trace, policy="dbsc", budget=result["budget_bytes"], msb_share=result["msb_share"])
    assert again["misses"] == result["stats"]["misses"]


def test_plan_at_a_fixed_budget_is_no_worse_than_the_default_split(sliced, tmp_path):
    path = tmp_path / "t.jsonl"
    run_cli("trace", "-m", str(sliced), "-f", str(_prompts(tmp_path)), "-n", "24", "--ignore-eos", "-o", str(path))
    trace = traces.read(path)
    budget = traces.total_slice_bytes(trace) * 35 // 100
    result = traces.plan(trace, budget=budget)
    default = traces.replay(trace, policy="dbsc", budget=budget)
    assert result["miss_rate"] <= traces.miss_rate(default)


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(f"{PROMPT}\nthe fish and the sea and the stars\n\nA journey of a thousand miles\n")
    return path


def test_hobbit_loads_unimportant_misses_at_4_bits_and_runs_hits_as_cached():
    header = {"format": "slicemoe-trace", "version": 1, "n_layers": 1, "n_experts": 4, "top_k": 2,
              "moe_layers": [0], "slice_bytes": {"msb": 1, "lsb": 1}}
    trace = traces.from_records(header, [
        (1, 0, 1, [0, 1], [0.9, 0.05]),   # both miss: 0 is important (8 bits), 1 is not (MSB only)
        (1, 0, 1, [1, 0], [0.9, 0.05]),   # both hit: 1 runs as cached (4 bits), 0 as cached (8 bits)
    ])
    stats = traces.replay(trace, policy="hobbit", budget=16, high_threshold=0.5)
    assert (stats["msb_misses"], stats["msb_hits"]) == (2, 2)
    assert (stats["lsb_misses"], stats["lsb_hits"]) == (1, 1)
    assert (stats["high_uses"], stats["low_uses"]) == (2, 2)


def test_dymoe_runs_fewer_8bit_uses_in_deeper_layers():
    layers, tokens = 5, 10
    header = {"format": "slicemoe-trace", "version": 1, "n_layers": layers, "n_experts": 8, "top_k": 4,
              "moe_layers": list(range(layers)), "slice_bytes": {"msb": 1, "lsb": 1}}
    records = [(1, layer, 1, [0, 1, 2, 3], [0.4, 0.3, 0.2, 0.1]) for _ in range(tokens) for layer in range(layers)]
    stats = traces.replay(traces.from_records(header, records), policy="dymoe", budget=10**6, high_ratio=1.0)
    # k * (1 + cos(pi * i / 4)) / 2 for i = 0..4, rounded: 4, 3, 2, 1, 0 per token; the LSB uses show it
    lsb_uses = [h + m for h, m in zip(stats["layers"]["lsb_hits"], stats["layers"]["lsb_misses"])]
    assert lsb_uses == [tokens * n for n in (4, 3, 2, 1, 0)]
    assert stats["high_uses"] == tokens * 10


def test_adapmoe_gating_t_zero_is_lru8_and_positive_t_drops_uses_live_and_in_replay(sliced):
    budget = int(slice_total(sliced) * 0.5)
    runs = {}
    for policy, t in (("lru8", 0.0), ("adapmoe", 0.0), ("adapmoe", 0.05)):
        with Model(sliced, cache_budget=budget, policy=policy, gating_t=t, record_trace=True) as model:
            result = model.generate(PROMPT, 24, keep_logits=True, stop_at_eog=False)
            runs[(policy, t)] = (result.logits, model.cache_stats(), model.routing_trace())
    np.testing.assert_array_equal(runs[("adapmoe", 0.0)][0], runs[("lru8", 0.0)][0])
    logits, live, trace = runs[("adapmoe", 0.05)]
    assert live["dropped_uses"] > 0 and live["misses"] < runs[("lru8", 0.0)][1]["misses"]
    assert not np.array_equal(logits, runs[("lru8", 0.0)][0])   # it changes outputs
    replayed = traces.replay(trace, policy="adapmoe", budget=budget, gating_t=0.05)
    for name in COUNTERS + ("dropped_uses",):
        assert replayed[name] == live[name], name


def test_per_layer_dp_allocation_never_misses_more_than_an_equal_split(sliced, tmp_path):
    with Model(sliced, record_trace=True) as model:
        for prompt in (PROMPT, "the fish and the sea and the stars", "A journey of a thousand miles"):
            model.generate(prompt, 24, stop_at_eog=False)
        trace = model.routing_trace()
    for fraction in (0.35, 0.6):
        budget = int(slice_total(sliced) * fraction)
        for policy in ("lru8", "adapmoe"):
            result = traces.plan_layers(trace, budget, policy=policy, gating_t=0.04)
            equal = traces.replay(trace, policy=policy, budget=budget, gating_t=0.04)
            assert result["misses"] <= equal["misses"]
            assert result["stats"]["pool_bytes"] <= budget
    # the allocation runs live as planned
    slots = traces.plan_layers(trace, int(slice_total(sliced) * 0.6))["layer_slots"]
    with Model(sliced, cache_budget=int(slice_total(sliced) * 0.6), policy="lru8", layer_slots=slots) as model:
        model.generate(PROMPT, 8, stop_at_eog=False)
        assert model.cache_stats()["layers"]["msb_slots"] == slots


def test_bad_per_layer_slots_are_refused(sliced):
    from slicemoe_gguf import SliceMoEError

    budget = slice_total(sliced)
    with pytest.raises(SliceMoEError, match="one count per MoE layer"):
        Model(sliced, cache_budget=budget, policy="lru8", layer_slots=[4, 4])
    info = describe(sliced)
    with pytest.raises(SliceMoEError, match=f"slots, need {info['top_k']} to {info['n_experts']}"):
        Model(sliced, cache_budget=budget, policy="lru8", layer_slots=[1, 4, 4])
    with pytest.raises(SliceMoEError, match="more than the budget"):   # all 3 layers full: 100% > 50%
        Model(sliced, cache_budget=budget // 2, policy="lru8", layer_slots=[info["n_experts"]] * 3)
    with pytest.raises(SliceMoEError, match="whole-expert policy"):
        Model(sliced, cache_budget=budget, policy="dbsc", layer_slots=[4, 4, 4])
