"""The offline optimum of slice caching: the fewest flash bytes any slice cache of a given budget
can read to serve a routing trace, at the precision each use asks for.

The model. A decode step of one MoE layer asks for a set of slices: the MSB slice of every expert
it uses and, for a use that runs at 8 bits, its LSB slice too. All of a step's slices must be in
RAM together; everything else may be kept or dropped at will, under one byte budget shared by all
layers (a cache free to split its bytes between layers and between MSB and LSB slices at every
moment, so it is at least as good as any online policy here, whose pools are fixed per layer).
Missing slices are read from flash; the cost is their bytes.

The algorithm: furthest-in-future eviction (Belady) among the slices the current step does not
use. With one slice size (every published model: uniform layers, MSB and LSB slices of the same
Q4_1 shape) it is exact, and `tests/test_optimum.py` checks it against a brute-force search over
every cache state. With sizes that differ, the exact problem is NP-hard; we then give

- `lower`: the same rule on bytes rather than slices (the fractional relaxation, where a slice may
  be partly kept: every byte is then a unit page and the rule is exact), a proven lower bound;
- `upper`: the rule on whole slices, evicting furthest-first until the step fits: a schedule
  that can run, so an upper bound. The optimum lies between.

Only decode records count (prefill streams the experts through the mapping, as in the engine),
the cache starts empty and persists across requests, and warm-up is never needed: loading a slice
earlier than its first use never saves a byte.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from .trace import Trace, layer_slice_bytes

INFINITY = 1 << 62
# precision rules an optimum can be asked for: the demand of a policy whose precision does not
# depend on the cache state
DEMANDS = ("auto", "high", "low", "dymoe", "adapmoe")


@dataclass
class Optimum:
    lower: float          # bytes: proven lower bound on any slice cache of this budget
    upper: int            # bytes: a feasible offline schedule's flash reads
    exact: bool           # one slice size: lower == upper == the optimum
    decode_tokens: int    # decode tokens of the trace (at its first MoE layer)
    demanded_high: int    # uses at 8 bits in the demand
    demanded_uses: int    # uses in the demand (dropped uses excluded)

    @property
    def bytes(self) -> float:
        """The figure to compare against: the optimum when exact, else the lower bound."""
        return self.lower


def demand_high(trace: Trace, decode: np.ndarray, rule: str, *, high_threshold: float, high_ratio: float,
                gating_t: float) -> tuple[np.ndarray, np.ndarray]:
    """(high, used) bool [n_decode, top_k]: which uses of the decode records run at 8 bits and
    which run at all, by the engine's own rules (slicemoe-serve.cpp, serve_step):
    auto = dbsc (the top-ranked use, and any use of weight >= high_threshold), high = every use
    (lru8, lfu8, belady), low = none (lru4), dymoe = the first round(ratio * k * half cosine of
    depth) ranks, adapmoe = every use not dropped (a use after the first of weight < sqrt(T))."""
    weights = trace.weights[decode]
    k = trace.top_k
    rank = np.broadcast_to(np.arange(k), weights.shape)
    used = np.ones(weights.shape, dtype=bool)
    if rule == "auto":
        high = (rank == 0) | (weights >= np.float32(high_threshold))
    elif rule == "high":
        high = used.copy()
    elif rule == "low":
        high = np.zeros(weights.shape, dtype=bool)
    elif rule == "dymoe":
        n_layers = int(trace.header["n_layers"])
        ratio = high_ratio if high_ratio > 0 else 0.5
        depth = trace.layer[decode] / (n_layers - 1) if n_layers > 1 else np.zeros(len(weights))
        # lround, as the engine: halves away from zero
        share = ratio * 0.5 * (1.0 + np.cos(np.pi * depth)) * k
        n_high = np.floor(share + 0.5).astype(int)
        high = rank < n_high[:, None]
    elif rule == "adapmoe":
        if gating_t > 0:
            used = (rank == 0) | ~(weights < np.float32(math.sqrt(np.float32(gating_t))))
        high = used.copy()
    else:
        raise ValueError(f"unknown precision rule {rule!r} (one of {', '.join(DEMANDS)})")
    return high, used


def _requests(trace: Trace, rule: str, high_threshold: float, high_ratio: float,
              gating_t: float) -> tuple[list[list[int]], int, int, int]:
    """Each decode step's slice ids (2 * (layer * n_experts + expert) + kind, kind 1 = LSB)."""
    decode = np.flatnonzero(trace.phase == 1)
    high, used = demand_high(trace, decode, rule, high_threshold=high_threshold, high_ratio=high_ratio,
                             gating_t=gating_t)
    n_experts = int(trace.header["n_experts"])
    base = 2 * (trace.layer[decode].astype(np.int64)[:, None] * n_experts + trace.experts[decode])
    steps = []
    for row_base, row_high, row_used in zip(base.tolist(), high.tolist(), used.tolist()):
        step = []
        for b, h, u in zip(row_base, row_high, row_used):
            if u:
                step.append(b)
                if h:
                    step.append(b + 1)
        steps.append(sorted(set(step)))
    tokens = int(np.count_nonzero(trace.layer[decode] == 0)) if len(decode) else 0
    return steps, tokens, int(high[used].sum()), int(used.sum())


def _next_uses(steps: list[list[int]]) -> list[list[int]]:
    """For each step and each of its slices, the index of the slice's next step (INFINITY if none)."""
    upcoming: dict[int, int] = {}
    out: list[list[int]] = [[] for _ in steps]
    for t in range(len(steps) - 1, -1, -1):
        out[t] = [upcoming.get(s, INFINITY) for s in steps[t]]
        for s in steps[t]:
            upcoming[s] = t
    return out


def _belady(steps: list[list[int]], next_uses: list[list[int]], size_of, capacity: float,
            fractional: bool) -> float:
    """Flash bytes of furthest-in-future eviction among the slices the current step does not use.
    fractional: a slice may be partly kept (capacity and costs in bytes, evict byte by byte)."""
    resident: dict[int, float] = {}   # slice -> bytes held
    next_of: dict[int, int] = {}      # slice -> its next step
    heap: list[tuple[int, int]] = []  # (-next step, slice); stale entries skipped
    used = 0.0
    flash = 0.0
    for t, (step, nexts) in enumerate(zip(steps, next_uses)):
        need = 0.0
        for s in step:
            need += size_of(s) - resident.get(s, 0.0)
        # room for the step's missing bytes, from the slices it does not use, furthest first
        pinned = set(step)
        deferred = []
        while used + need > capacity + 1e-9:
            if not heap:
                raise ValueError(f"step {t} needs {need + sum(resident.get(s, 0.0) for s in step):.0f} bytes "
                                 f"at once, more than the budget {capacity:.0f}")
            neg_next, victim = heapq.heappop(heap)
            if victim not in resident or next_of.get(victim) != -neg_next:
                continue
            if victim in pinned:
                deferred.append((neg_next, victim))
                continue
            held = resident[victim]
            take = min(held, used + need - capacity) if fractional else held
            if take >= held - 1e-9:
                del resident[victim]
                take = held
            else:
                resident[victim] = held - take
                deferred.append((neg_next, victim))
            used -= take
        for item in deferred:
            heapq.heappush(heap, item)
        for s, n in zip(step, nexts):
            missing = size_of(s) - resident.get(s, 0.0)
            flash += missing
            used += missing
            resident[s] = float(size_of(s))
            next_of[s] = n
            heapq.heappush(heap, (-n, s))
    return flash


def optimum(trace: Trace, budget: int, *, rule: str = "auto", high_threshold: float = 0.25,
            high_ratio: float = 0.0, gating_t: float = 0.04) -> Optimum:
    """The offline optimum (or its bounds) of `trace`'s decode records under `budget` bytes, at
    the precision `rule` asks for (see demand_high)."""
    msb, lsb = layer_slice_bytes(trace.header)
    n_experts = int(trace.header["n_experts"])
    if rule != "low" and min(lsb) <= 0:
        raise ValueError("this precision rule needs LSB slices (slice_bytes.lsb > 0)")
    steps, tokens, n_high, n_uses = _requests(trace, rule, high_threshold, high_ratio, gating_t)

    def size_of(s: int) -> int:
        layer = (s >> 1) // n_experts
        return lsb[layer] if s & 1 else msb[layer]

    next_uses = _next_uses(steps)
    sizes = {msb[i] for i in range(len(msb))} | ({lsb[i] for i in range(len(lsb))} if rule != "low" else set())
    lower = _belady(steps, next_uses, size_of, float(budget), fractional=True)
    exact = len(sizes) == 1
    if exact:
        size = sizes.pop()
        upper = int(_belady(steps, next_uses, size_of, float(budget // size * size), fractional=False))
        lower = float(upper)
    else:
        upper = int(_belady(steps, next_uses, size_of, float(budget), fractional=False))
    return Optimum(lower, upper, exact, tokens, n_high, n_uses)


def compare(trace: Trace, budget: int, settings: dict) -> dict:
    """Every replayable policy's flash bytes at `budget` next to the optimum of the demand it
    serves and to the optimum of the demand `settings["precision"]` asks for (auto: dbsc's rule).
    settings: the cache settings of `trace.replay` (policy is ignored)."""
    from .cache_params import policies, policy_demands
    from .trace import replay

    if settings.get("max_miss_rate", 0.0) > 0.0:
        raise ValueError("the optimum needs a fixed precision rule: --max-miss-rate changes it at run time")
    rules = {"auto": "auto", "high": "high", "low": "low"}
    reference_rule = rules[settings.get("precision", "auto")]
    knobs = {k: settings[k] for k in ("high_threshold", "high_ratio", "gating_t") if k in settings}
    optima: dict[str, Optimum] = {}

    def optimum_of(rule: str) -> Optimum:
        if rule not in optima:
            optima[rule] = optimum(trace, budget, rule=rule, **knobs)
        return optima[rule]

    reference = optimum_of(reference_rule)
    rows = []
    replay_settings = {k: v for k, v in settings.items() if k not in ("policy", "precision", "layer_slots")}
    # the demand of a calibrated dymoe or adapmoe is not the rule's: compare those on their own only
    calibrated = {"dymoe": bool(settings.get("layer_high_uses")), "adapmoe": bool(settings.get("layer_sensitivity"))}
    # the demand each policy serves (the policy tables'); None: no fixed demand's optimum bounds it
    demands = policy_demands()
    needs_logits = policies(needs_logits=True)
    names = [p for p in demands if p not in needs_logits or trace.logits is not None]
    for policy in names:
        stats = replay(trace, budget=budget, policy=policy, **replay_settings)
        rule = None if calibrated.get(policy) else demands[policy]
        own = optimum_of(rule) if rule else None
        # an online policy that ran fewer 8-bit uses than its rule asks (dbsc when every LSB slot
        # serves the token already) served less than the demand, and the optimum does not bound it
        served = own is not None and stats["high_uses"] == own.demanded_high
        rows.append({"policy": policy, "flash_bytes": stats["flash_bytes"], "high_uses": stats["high_uses"],
                     "low_uses": stats["low_uses"], "demand": rule,
                     "vs_own_optimum": stats["flash_bytes"] / own.bytes if own and own.bytes > 0 else None,
                     "serves_demand": served,
                     "vs_reference": stats["flash_bytes"] / reference.bytes if reference.bytes > 0 else None})
    return {"budget_bytes": budget, "reference_rule": reference_rule,
            "optima": {rule: vars(o) for rule, o in optima.items()}, "policies": rows}
