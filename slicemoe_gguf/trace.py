"""Routing traces (format `slicemoe-trace` v1, JSON Lines) and their replay through the native
cache manager.

Line 1 is a header; every other line is one routing event of one MoE layer:

    {"format": "slicemoe-trace", "version": 1, "n_layers": 3, "n_experts": 8, "top_k": 2,
     "moe_layers": [0, 1, 2], "slice_bytes": {"msb": 3840, "lsb": 3840}, "model": "..."}
    {"request": 1, "token": 0, "phase": "prefill", "layer": 0, "experts": [3, 5], "weights": [0.41, 0.22]}

`layer` indexes `moe_layers` (the model's layer numbers of the MoE layers); `token` counts the
events of that layer within the request; `weights` are router probabilities (0 where not observed).
Records come in the order the engine saw them, which replay keeps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import defaults
from ._native import SliceMoEError, check, ffi, lib
from .cache_params import read_cache_stats, set_cache_params

FORMAT = "slicemoe-trace"
VERSION = 1
PHASES = ("prefill", "decode")


class TraceError(ValueError):
    """A trace file that is not a readable slicemoe-trace v1."""


@dataclass
class Trace:
    header: dict
    request: np.ndarray          # int32 [n]
    layer: np.ndarray            # int32 [n]
    phase: np.ndarray            # int32 [n], 0 prefill, 1 decode
    experts: np.ndarray          # int32 [n, top_k]
    weights: np.ndarray          # float32 [n, top_k]
    tokens: np.ndarray = field(default=None)  # int32 [n]
    logits: np.ndarray | None = None  # float32 [n, n_experts], NaN rows where not recorded

    @property
    def top_k(self) -> int:
        return int(self.header["top_k"])

    def __len__(self) -> int:
        return len(self.layer)

    def write(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial")
        try:
            self._write_lines(tmp)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)   # a failed write leaves neither a trace nor a partial file
            raise

    def _write_lines(self, tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.header) + "\n")
            for i in range(len(self)):
                record = {
                    "request": int(self.request[i]), "token": int(self.tokens[i]),
                    "phase": PHASES[int(self.phase[i])], "layer": int(self.layer[i]),
                    "experts": self.experts[i].tolist(),
                    "weights": [float(w) for w in self.weights[i]],
                }
                if self.logits is not None and not np.isnan(self.logits[i, 0]):
                    record["logits"] = [float(x) for x in self.logits[i]]
                f.write(json.dumps(record) + "\n")


def _token_indices(request: np.ndarray, layer: np.ndarray) -> np.ndarray:
    counters: dict[tuple[int, int], int] = {}
    tokens = np.empty(len(layer), dtype=np.int32)
    for i, key in enumerate(zip(request.tolist(), layer.tolist())):
        tokens[i] = counters.get(key, 0)
        counters[key] = tokens[i] + 1
    return tokens


def from_records(header: dict, records: list[tuple[int, int, int, list[int], list[float]]],
                 logits: list[list[float] | None] | None = None) -> Trace:
    """A Trace from (request, layer, phase, experts, weights) tuples, and optionally each record's
    router logits (None where absent)."""
    k = int(header["top_k"])
    n = len(records)
    request = np.array([r[0] for r in records], dtype=np.int32).reshape(n)
    layer = np.array([r[1] for r in records], dtype=np.int32).reshape(n)
    phase = np.array([r[2] for r in records], dtype=np.int32).reshape(n)
    experts = np.array([r[3] for r in records], dtype=np.int32).reshape(n, k)
    weights = np.array([r[4] for r in records], dtype=np.float32).reshape(n, k)
    rows = None
    if logits is not None and any(row is not None for row in logits):
        rows = np.full((n, int(header["n_experts"])), np.nan, dtype=np.float32)
        for i, row in enumerate(logits):
            if row is not None:
                rows[i] = row
    return Trace(header, request, layer, phase, experts, weights, _token_indices(request, layer), rows)


def read(path: str | Path) -> Trace:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TraceError(f"cannot read trace '{path}': {exc.strerror}") from exc
    if not lines:
        raise TraceError(f"'{path}' is empty (expected a slicemoe-trace header line)")
    try:
        header = json.loads(lines[0])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise TraceError(f"'{path}' line 1: not JSON") from exc
    _check_header(header, path, lines[0])
    records, logits = [], []
    n_layers, n_experts, k = header["n_layers"], header["n_experts"], header["top_k"]
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            phase = PHASES.index(r["phase"])
            experts = [int(e) for e in r["experts"]]
            weights = [float(w) for w in r.get("weights", [0.0] * len(experts))]
            record = (int(r["request"]), int(r["layer"]), phase, experts, weights)
            row = [float(x) for x in r["logits"]] if "logits" in r else None
        except (json.JSONDecodeError, KeyError, ValueError, TypeError, RecursionError) as exc:
            raise TraceError(f"'{path}' line {number}: not a routing record ({exc})") from exc
        if len(experts) != k or len(weights) != k or not 0 <= record[1] < n_layers or \
                not all(0 <= e < n_experts for e in experts):
            raise TraceError(f"'{path}' line {number}: needs {k} experts in [0, {n_experts}) "
                             f"and a layer in [0, {n_layers})")
        if row is not None and len(row) != n_experts:
            raise TraceError(f"'{path}' line {number}: logits need {n_experts} values")
        records.append(record)
        logits.append(row)
    return from_records(header, records, logits)


def _positive_int(value, allow_zero: bool = False) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)


def _check_header(header, path, line: str) -> None:
    """TraceError unless the header is a slicemoe-trace v1 header whose sizes replay can use."""
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise TraceError(f"'{path}' is not a {FORMAT} v{VERSION} trace (header {line[:80]!r})")
    for key in ("n_layers", "n_experts", "top_k", "slice_bytes"):
        if key not in header:
            raise TraceError(f"'{path}': header lacks {key!r}")
    for key in ("n_layers", "n_experts", "top_k"):
        if not _positive_int(header[key]):
            raise TraceError(f"'{path}': header field {key!r} must be a positive integer, not {header[key]!r}")
    if header["top_k"] > header["n_experts"]:
        raise TraceError(f"'{path}': header top_k {header['top_k']} exceeds n_experts {header['n_experts']}")
    sizes = header["slice_bytes"]
    if not isinstance(sizes, dict) or "msb" not in sizes:
        raise TraceError(f"'{path}': header field 'slice_bytes' must be an object with 'msb' (and 'lsb') byte counts")
    for key, allow_zero in (("msb", False), ("lsb", True)):
        value = sizes.get(key, 0)
        values = value if isinstance(value, list) and value else [value]
        if not all(_positive_int(v, allow_zero) for v in values):
            raise TraceError(f"'{path}': slice_bytes.{key} must be a byte count (or a non-empty list of them), "
                             f"not {value!r}")


def layer_slice_bytes(header: dict) -> tuple[list[int], list[int]]:
    """(MSB bytes, LSB bytes) of one expert's slice in each MoE layer (a header may give one size
    for all layers or a list)."""
    n_layers = int(header["n_layers"])
    sizes = header["slice_bytes"]

    def per_layer(value) -> list[int]:
        if isinstance(value, list):
            if len(value) != n_layers:
                raise TraceError(f"slice_bytes lists {len(value)} sizes for {n_layers} MoE layers")
            return [int(v) for v in value]
        return [int(value)] * n_layers

    return per_layer(sizes["msb"]), per_layer(sizes.get("lsb", 0))


def _slice_bytes(header: dict) -> tuple[int, int]:
    """The largest MSB and LSB slice of any layer (one figure for summaries)."""
    msb, lsb = layer_slice_bytes(header)
    return max(msb), max(lsb)


def replay(trace: Trace, *, budget: int, policy: str = defaults.POLICY, precision: str = defaults.PRECISION,
           warmup: str = defaults.WARMUP, high_threshold: float = defaults.HIGH_THRESHOLD,
           max_miss_rate: float = defaults.MAX_MISS_RATE, msb_share: float = defaults.MSB_SHARE,
           high_ratio: float = defaults.HIGH_RATIO, gating_t: float = defaults.GATING_T,
           prior_lambda: float = defaults.PRIOR_LAMBDA, layer_slots: list[int] | None = None,
           layer_sensitivity: list[float] | None = None, layer_high_uses: list[int] | None = None,
           lsb_background: bool = defaults.LSB_BACKGROUND) -> dict:
    """Drive the native cache manager with the trace (no compute) and return its counters, with the
    same names as `slicemoe run --json`'s `cache` object."""
    native = lib()
    msb, lsb = _slice_bytes(trace.header)
    params = native.slicemoe_sim_default_params()
    params.n_layers = int(trace.header["n_layers"])
    params.n_expert = int(trace.header["n_experts"])
    params.top_k = trace.top_k
    params.msb_bytes = msb
    params.lsb_bytes = lsb
    params.cache.budget_bytes = int(budget)
    layer_msb, layer_lsb = layer_slice_bytes(trace.header)
    if len(set(layer_msb)) > 1 or len(set(layer_lsb)) > 1:
        sizes = (ffi.new("int64_t[]", layer_msb), ffi.new("int64_t[]", layer_lsb))  # kept alive to the run
        params.layer_msb_bytes, params.layer_lsb_bytes = sizes
    slots = set_cache_params(params.cache, policy=policy, precision=precision, warmup=warmup,  # noqa: F841 (kept alive)
                             high_threshold=high_threshold, max_miss_rate=max_miss_rate, msb_share=msb_share,
                             high_ratio=high_ratio, prior_lambda=prior_lambda, gating_t=gating_t,
                             layer_slots=layer_slots, layer_sensitivity=layer_sensitivity,
                             layer_high_uses=layer_high_uses, lsb_background=lsb_background)
    out = ffi.new("slicemoe_sim **")
    check(native.slicemoe_sim_create(ffi.new("struct slicemoe_sim_params *", params), out))
    sim = ffi.gc(out[0], native.slicemoe_sim_free)
    arrays = [np.ascontiguousarray(a) for a in (trace.request, trace.layer, trace.phase, trace.experts, trace.weights)]
    ptrs = [ffi.from_buffer("int32_t[]", a) for a in arrays[:4]] + [ffi.from_buffer("float[]", arrays[4])]
    logits = ffi.NULL
    if trace.logits is not None:
        rows = np.ascontiguousarray(trace.logits, dtype=np.float32)
        logits = ffi.from_buffer("float[]", rows)
    check(native.slicemoe_sim_run(sim, len(trace), *ptrs, logits))
    return read_cache_stats(lambda t: native.slicemoe_sim_get_stats(sim, t),
                            lambda i, row: native.slicemoe_sim_get_layer_stats(sim, i, row), params.n_layers)


def msb_slice_bytes(trace: Trace) -> int:
    return _slice_bytes(trace.header)[0]


def total_slice_bytes(trace: Trace) -> int:
    msb, lsb = layer_slice_bytes(trace.header)
    return int(trace.header["n_experts"]) * (sum(msb) + sum(lsb))


def miss_rate(stats: dict) -> float:
    return stats["misses"] / max(stats["hits"] + stats["misses"], 1)


# MSB shares of a fixed split the planner tries; 0 is dbsc's adaptive split (shared slots)
SHARES = (0.0, 0.4, 0.5, 0.6, 2 / 3, 0.75, 0.85, 1.0)
# auto-precision thresholds, most 8-bit uses first: 0 runs every use at 8 bits, 1 only the
# top-ranked use of each token
THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0)


def high_share(stats: dict) -> float:
    """The share of expert uses that ran at 8 bits."""
    return stats["high_uses"] / max(stats["high_uses"] + stats["low_uses"], 1)


def plan_precision(trace: Trace, *, budget: int, max_miss_rate: float, warmup: str = defaults.WARMUP) -> dict:
    """The dbsc configuration at `budget` with the most 8-bit uses whose slice miss rate meets
    `max_miss_rate`: the lowest threshold of THRESHOLDS that meets it, else every use at 4 bits
    (precision low). Returns the settings, the replay's 8-bit share, miss rate and counters, or {}
    when not even 4-bit uses meet the target (or the budget is below the minimum)."""
    candidates = [("auto", t) for t in THRESHOLDS] + [("low", defaults.HIGH_THRESHOLD)]
    for precision, threshold in candidates:
        try:
            stats = replay(trace, budget=budget, policy="dbsc", precision=precision, high_threshold=threshold,
                           warmup=warmup)
        except SliceMoEError:   # below the minimum that can run
            return {}
        if miss_rate(stats) <= max_miss_rate:
            return {"budget_bytes": int(budget), "precision": precision, "high_threshold": threshold,
                    "high_share": high_share(stats), "miss_rate": miss_rate(stats), "stats": stats}
    return {}


def plan(trace: Trace, *, max_miss_rate: float | None = None, budget: int | None = None,
         high_threshold: float = defaults.HIGH_THRESHOLD, warmup: str = defaults.WARMUP) -> dict:
    """Miss-rate-constrained deployment for dbsc on this trace.

    With max_miss_rate: for each MSB share of the budget, the smallest budget (binary search to
    1% of the slice bytes) whose slice miss rate meets the target; the answer is the smallest such
    budget (ties: fewer flash bytes). With budget: the share with the lowest miss rate at that
    budget (ties: fewer flash bytes). Returns the chosen budget, share and the replay's counters."""
    total = total_slice_bytes(trace)
    kw = {"policy": "dbsc", "warmup": warmup, "high_threshold": high_threshold}

    def run(b: int, share: float) -> dict | None:
        try:
            return replay(trace, budget=b, msb_share=share, **kw)
        except SliceMoEError:   # below the minimum that can run
            return None

    candidates = []
    for share in SHARES:
        if budget is not None:
            stats = run(budget, share)
            if stats:
                candidates.append((miss_rate(stats), stats["flash_bytes"], budget, share, stats))
            continue
        lo, hi = 1, total
        best = run(hi, share)
        if best is None or miss_rate(best) > max_miss_rate:
            continue
        while hi - lo > max(total // 100, 1):
            mid = (lo + hi) // 2
            stats = run(mid, share)
            if stats is not None and miss_rate(stats) <= max_miss_rate:
                hi, best = mid, stats
            else:
                lo = mid
        candidates.append((hi, best["flash_bytes"], hi, share, best))
    if not candidates:
        return {}
    _, _, chosen_budget, share, stats = min(candidates, key=lambda c: (c[0], c[1]))
    return {"budget_bytes": chosen_budget, "msb_share": share, "budget_fraction": chosen_budget / total,
            "miss_rate": miss_rate(stats), "stats": stats}


def layer_trace(trace: Trace, layer: int) -> Trace:
    """The records of one MoE layer, as a one-layer trace."""
    keep = trace.layer == layer
    header = dict(trace.header, n_layers=1, moe_layers=[trace.header.get("moe_layers", [layer])[layer]]
                  if "moe_layers" in trace.header else [layer])
    return Trace(header, trace.request[keep], np.zeros(int(keep.sum()), np.int32), trace.phase[keep],
                 trace.experts[keep], trace.weights[keep], trace.tokens[keep] if trace.tokens is not None else None,
                 trace.logits[keep] if trace.logits is not None else None)


def plan_layers(trace: Trace, budget: int, *, policy: str = "lru8", gating_t: float = defaults.GATING_T,
                warmup: str = defaults.WARMUP) -> dict:
    """AdapMoE's allocation of whole-expert slots across layers: each layer's misses as a function
    of its slot count (replaying that layer alone), then a dynamic program over layers that
    minimizes the total misses with slots whose bytes (each layer's own MSB + LSB size) fit the
    budget. The program keeps, per layer, the Pareto front of (bytes, misses) over the layers so
    far, so layers of different sizes cost what they weigh."""
    msb, lsb = layer_slice_bytes(trace.header)
    per_slot = [m + l for m, l in zip(msb, lsb)]
    n_layers, k, n_experts = int(trace.header["n_layers"]), trace.top_k, int(trace.header["n_experts"])
    minimum = k * sum(per_slot)
    if budget < minimum:
        raise ValueError(f"the budget holds less than {k} whole experts in every layer ({minimum} bytes)")
    curves = []
    for layer in range(n_layers):
        sub = layer_trace(trace, layer)
        sub.header["slice_bytes"] = {"msb": msb[layer], "lsb": lsb[layer]}
        curves.append({s: replay(sub, policy=policy, budget=s * per_slot[layer], gating_t=gating_t,
                                 warmup=warmup)["misses"] for s in range(k, n_experts + 1)})
    # front: (bytes, misses, slots per layer so far), bytes ascending, misses strictly falling
    front = [(0, 0, [])]
    for layer in range(n_layers):
        grown = sorted((used + s * per_slot[layer], misses + m, slots + [s])
                       for used, misses, slots in front for s, m in curves[layer].items()
                       if used + s * per_slot[layer] <= budget)
        front = []
        for entry in grown:
            if not front or entry[1] < front[-1][1]:
                front.append(entry)
    _, misses, slots = min(front, key=lambda e: (e[1], e[0]))
    stats = replay(trace, policy=policy, budget=budget, gating_t=gating_t, warmup=warmup, layer_slots=slots)
    return {"layer_slots": slots, "misses": stats["misses"], "stats": stats}


@dataclass
class RequestRoute:
    """One request of a trace as a route to force (Model.force_routes): experts and weights
    [n_prompt + n_decode, n_layers, top_k], prompt positions first."""
    request: int
    n_prompt: int
    n_decode: int
    experts: np.ndarray
    weights: np.ndarray
    n_experts: int   # of the model that routed


def request_route(trace: Trace, request: int | None = None) -> RequestRoute:
    """The route of one request (default: the trace's first), prefill tokens first. A layer with
    fewer records than the request has positions holds its last positions: llama.cpp runs the last
    layer of a prompt on its output row only (recorded as a decode token), and the prompt positions
    it never ran get a copy of its first record, which no run uses."""
    if len(trace) == 0:
        raise TraceError("the trace has no records")
    chosen = int(trace.request[0]) if request is None else int(request)
    keep = trace.request == chosen
    if not keep.any():
        raise TraceError(f"the trace has no request {chosen} (requests: {sorted(set(trace.request.tolist()))})")
    n_layers = int(trace.header["n_layers"])
    layer, phase = trace.layer[keep], trace.phase[keep]
    per_layer = np.bincount(layer, minlength=n_layers)
    n_prompt = int(np.bincount(layer[phase == 0], minlength=n_layers).max())
    n_positions = int(per_layer.max())
    if n_prompt == 0 or per_layer.min() == 0:
        raise TraceError(f"request {chosen} needs prompt records and a record in every MoE layer "
                         f"(records per layer: {per_layer.tolist()})")
    order = np.lexsort((trace.tokens[keep], phase))   # prefill first, then token order; stable per layer
    experts = np.empty((n_positions, n_layers, trace.top_k), np.int32)
    weights = np.empty_like(experts, dtype=np.float32)
    position = n_positions - per_layer   # each layer's records fill its last positions
    kept_experts, kept_weights = trace.experts[keep], trace.weights[keep]
    for i in order:
        l = int(layer[i])
        experts[position[l], l] = kept_experts[i]
        weights[position[l], l] = kept_weights[i]
        position[l] += 1
    for l in range(n_layers):
        first = n_positions - int(per_layer[l])
        experts[:first, l], weights[:first, l] = experts[first, l], weights[first, l]
    return RequestRoute(chosen, n_prompt, n_positions - n_prompt, experts, weights, int(trace.header["n_experts"]))


def widen(route: RequestRoute, n_layers: int, n_experts: int, top_k: int) -> RequestRoute:
    """A route of a small model mapped onto a bigger one with m = n_experts / route.n_experts =
    top_k / source top-k (an integer): the bigger router is taken as the equal mixture of m copies
    of the small one. Copy j of MoE layer L uses the small model's layer (L + j * s) mod n_src
    (s = max(1, n_src // m)), its experts shifted by j * route.n_experts, its weights divided by m;
    the m * k uses are ordered by weight, best first. Layers beyond the small model's reuse its
    layers in turn. So every layer sees real temporal locality, and the m copies are as independent
    as the small model's layers are."""
    n_src_layers, k, n_source_experts = route.experts.shape[1], route.experts.shape[2], route.n_experts
    if n_experts % n_source_experts or top_k % k or n_experts // n_source_experts != top_k // k:
        raise ValueError(f"cannot widen top-{k} of {n_source_experts} to top-{top_k} of {n_experts}: "
                         "both must grow by the same integer factor")
    m = n_experts // n_source_experts
    step = max(1, n_src_layers // m)
    n_pos = route.experts.shape[0]
    experts = np.empty((n_pos, n_layers, top_k), np.int32)
    weights = np.empty((n_pos, n_layers, top_k), np.float32)
    for L in range(n_layers):
        parts_e = [route.experts[:, (L + j * step) % n_src_layers] + j * n_source_experts for j in range(m)]
        parts_w = [route.weights[:, (L + j * step) % n_src_layers] / m for j in range(m)]
        e, w = np.concatenate(parts_e, axis=1), np.concatenate(parts_w, axis=1)
        order = np.argsort(-w, axis=1, kind="stable")
        experts[:, L] = np.take_along_axis(e, order, axis=1)
        weights[:, L] = np.take_along_axis(w, order, axis=1)
    return RequestRoute(route.request, route.n_prompt, route.n_decode, experts, weights, n_experts)


def route_trace(route: RequestRoute, header: dict) -> Trace:
    """A one-request trace of a route (every layer at every position), for --route-trace."""
    n_positions, n_layers, _ = route.experts.shape
    records = [(route.request, layer, int(position >= route.n_prompt), route.experts[position, layer].tolist(),
                route.weights[position, layer].tolist())
               for position in range(n_positions) for layer in range(n_layers)]
    return from_records(dict(header, n_layers=n_layers), records)
