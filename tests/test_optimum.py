"""The offline optimum of slice caching (`slicemoe sim --policy optimal`): a bound every online
policy of the engine is measured against, so it must never read more than any of them, and where
it claims to be exact it must equal an exhaustive search."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import run_cli, run_json

from slicemoe_gguf import trace as traces
from slicemoe_gguf.optimum import optimum, demand_high


def make_trace(experts, weights=None, *, n_layers=1, n_experts=4, msb=1000, lsb=1000, layers=None) -> traces.Trace:
    """A decode-only trace: experts [n, top_k] (best first), one record per step, layers cycling."""
    experts = np.asarray(experts, dtype=np.int32)
    n, top_k = experts.shape
    if weights is None:
        weights = np.tile(np.linspace(0.5, 0.1, top_k, dtype=np.float32), (n, 1))
    layer = np.asarray(layers if layers is not None else np.arange(n) % n_layers, dtype=np.int32)
    header = {"format": traces.FORMAT, "version": traces.VERSION, "n_layers": n_layers, "n_experts": n_experts,
              "top_k": top_k, "moe_layers": list(range(n_layers)), "slice_bytes": {"msb": msb, "lsb": lsb}}
    return traces.Trace(header, np.ones(n, np.int32), layer, np.ones(n, np.int32), experts,
                        np.asarray(weights, np.float32), np.zeros(n, np.int32))


def brute_force(trace: traces.Trace, budget: int, rule: str) -> int:
    """The fewest flash bytes over every sequence of cache states (exhaustive dynamic program):
    each step's slices resident together, any others kept or dropped, total bytes <= budget."""
    decode = np.flatnonzero(trace.phase == 1)
    high, used = demand_high(trace, decode, rule, high_threshold=0.25, high_ratio=0.0, gating_t=0.04)
    sb = trace.header["slice_bytes"]
    msb = sb["msb"] if isinstance(sb["msb"], list) else [sb["msb"]] * trace.header["n_layers"]
    lsb = sb["lsb"] if isinstance(sb["lsb"], list) else [sb["lsb"]] * trace.header["n_layers"]
    steps = []
    for i, row in zip(decode, range(len(decode))):
        step = set()
        for r, e in enumerate(trace.experts[i]):
            if used[row, r]:
                step.add((int(trace.layer[i]), int(e), 0))
                if high[row, r]:
                    step.add((int(trace.layer[i]), int(e), 1))
        steps.append(frozenset(step))

    def size(s):
        return lsb[s[0]] if s[2] else msb[s[0]]

    states = {frozenset(): 0}
    for step in steps:
        following = {}
        for held, cost in states.items():
            extra = cost + sum(size(s) for s in step - held)
            keepable = sorted(held - step)
            for n in range(len(keepable) + 1):
                for kept in itertools.combinations(keepable, n):
                    state = step | frozenset(kept)
                    if sum(size(s) for s in state) <= budget and following.get(state, 1 << 62) > extra:
                        following[state] = extra
        states = following
    return min(states.values())


def test_a_hand_worked_trace_reads_what_belady_reads():
    # one layer, 4-bit uses of a, b, c, a, b, c with room for two slices: a and b miss, c evicts b
    # (a comes back sooner), a hits, b evicts a (never used again), c hits: 4 reads, where LRU reads 6
    trace = make_trace([[0], [1], [2], [0], [1], [2]])
    result = optimum(trace, 2000, rule="low")
    assert result.exact and result.bytes == 4 * 1000
    assert traces.replay(trace, budget=2000, policy="lru4", warmup="none")["flash_bytes"] == 6 * 1000


def test_a_budget_that_holds_every_slice_reads_each_once():
    rng = np.random.default_rng(0)
    experts = np.stack([rng.choice(8, 2, replace=False) for _ in range(50)])
    trace = make_trace(experts, n_layers=2, n_experts=8)
    distinct = {(i % 2, int(e)) for i, row in enumerate(experts) for e in row}
    assert optimum(trace, 10 ** 9, rule="high").bytes == len(distinct) * 2000


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_the_optimum_equals_an_exhaustive_search_on_small_traces(data):
    n_layers = data.draw(st.integers(1, 2))
    n_experts = data.draw(st.integers(2, 3))
    top_k = data.draw(st.integers(1, 2).filter(lambda k: k <= n_experts))
    n = data.draw(st.integers(1, 7))
    experts = [data.draw(st.permutations(range(n_experts)))[:top_k] for _ in range(n)]
    weights = [sorted(data.draw(st.lists(st.sampled_from([0.05, 0.3, 0.6]), min_size=top_k, max_size=top_k)),
                      reverse=True) for _ in range(n)]
    rule = data.draw(st.sampled_from(["auto", "high", "low"]))
    trace = make_trace(experts, weights, n_layers=n_layers, n_experts=n_experts)
    slots = data.draw(st.integers(2 * top_k, 2 * top_k + 3))
    result = optimum(trace, slots * 1000 + data.draw(st.integers(0, 999)), rule=rule)
    assert result.exact
    assert result.bytes == brute_force(trace, slots * 1000, rule)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_with_sizes_that_differ_the_optimum_lies_between_its_bounds(data):
    n = data.draw(st.integers(1, 6))
    experts = [data.draw(st.permutations(range(3)))[:2] for _ in range(n)]
    msb = data.draw(st.lists(st.integers(500, 1500), min_size=2, max_size=2))
    lsb = data.draw(st.lists(st.integers(500, 1500), min_size=2, max_size=2))
    trace = make_trace(experts, n_layers=2, n_experts=3, msb=msb, lsb=lsb)
    budget = 2 * (max(msb) + max(lsb)) + data.draw(st.integers(0, 3000))
    result = optimum(trace, budget, rule="high")
    exact = brute_force(trace, budget, "high")
    assert result.lower <= exact + 1e-6
    assert exact <= result.upper


# every online policy that serves a fixed demand, and the demand it serves
BOUNDED = [("lru8", "high"), ("lfu8", "high"), ("belady", "high"), ("lru4", "low"), ("dbsc", "auto"),
           ("dymoe", "dymoe"), ("adapmoe", "adapmoe")]


def random_trace(seed: int, n_tokens: int = 120) -> traces.Trace:
    """Decode routing of 3 layers, 8 experts, top-2, with reuse (each token keeps an expert of the
    last with probability 1/2), Dirichlet weights."""
    rng = np.random.default_rng(seed)
    experts, current = [], [rng.choice(8, 2, replace=False) for _ in range(3)]
    for _ in range(n_tokens):
        for layer in range(3):
            keep = [e for e in current[layer] if rng.random() < 0.5][:1]
            fresh = [e for e in rng.permutation(8) if e not in keep][: 2 - len(keep)]
            current[layer] = np.array(keep + fresh)
            experts.append(current[layer])
    weights = -np.sort(-rng.dirichlet(np.ones(2), size=len(experts)), axis=1)
    return make_trace(np.stack(experts), weights, n_layers=3, n_experts=8)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fraction", [0.25, 0.4, 0.6, 0.9])
def test_the_optimum_never_reads_more_than_an_online_policy(seed, fraction):
    trace = random_trace(seed)
    budget = int(traces.total_slice_bytes(trace) * fraction)
    for policy, rule in BOUNDED:
        for warmup in ("none", "pcw"):
            stats = traces.replay(trace, budget=budget, policy=policy, warmup=warmup)
            best = optimum(trace, budget, rule=rule)
            # the demand the optimum serves is the one the policy served
            assert best.demanded_high == stats["high_uses"] or policy in ("dbsc", "dymoe")
            if best.demanded_high != stats["high_uses"]:
                continue   # every LSB slot served the token already: it ran fewer 8-bit uses
            assert best.bytes <= stats["flash_bytes"], (policy, warmup)


def test_sim_prints_every_policy_against_the_optimum(tmp_path):
    trace = random_trace(7)
    path = tmp_path / "t.jsonl"
    trace.write(path)
    result = run_json("sim", str(path), "--policy", "optimal", "--cache-budget", "40%", "--json")
    rows = {row["policy"]: row for row in result["policies"]}
    assert set(rows) == {"dbsc", "lru8", "lfu8", "belady", "lru4", "dymoe", "adapmoe", "hobbit"}
    reference = result["optima"]["auto"]
    assert reference["exact"]
    for row in rows.values():
        assert row["vs_reference"] == pytest.approx(row["flash_bytes"] / reference["lower"])
    assert rows["belady"]["vs_own_optimum"] >= 1.0
    text = run_cli("sim", str(path), "--policy", "optimal", "--cache-budget", "40%").stdout
    assert "exact: one slice size" in text and "| lru8 |" in text
    failed = run_cli("sim", str(path), "--policy", "optimal", "--cache-budget", "40%", "--max-miss-rate", "0.05",
                     check=False)
    assert failed.returncode == 1 and "fixed precision rule" in failed.stderr
