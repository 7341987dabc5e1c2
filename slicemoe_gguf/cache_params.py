"""The cache settings and counters as the native parameter and statistics structs hold them: the
names of the enum values, filling the policy fields that the live cache and trace replay share,
and reading their counters back. A leaf module: runtime.py and trace.py both import it, and it
imports neither.
"""

from __future__ import annotations

from ._native import check, ffi

# enum slicemoe_policy (belady runs only in replay)
POLICIES = {"dbsc": 0, "lru8": 1, "lfu8": 2, "lru4": 3, "belady": 4, "hobbit": 5, "dymoe": 6, "cache_prior": 7, "adapmoe": 8}
# routed-expert precision of sliced models (enum slicemoe_precision)
PRECISIONS = {"auto": 0, "high": 1, "low": 2}
WARMUPS = {"none": 0, "pcw": 1}
IO_MODES = {"auto": 0, "direct": 1, "buffered": 2}   # enum slicemoe_io_mode
CACHE_FIELDS = ("budget_bytes", "pool_bytes", "msb_hits", "msb_misses", "lsb_hits", "lsb_misses", "loads",
                "evictions", "flash_bytes", "ram_bytes", "high_uses", "low_uses", "warmup_loads",
                "decode_tokens", "io_ms", "high_threshold", "dropped_uses", "prefetch_loads",
                "prefetch_useful_bytes", "prefetch_wasted_bytes", "device_pool_bytes", "io_direct")
LAYER_FIELDS = ("layer", "msb_slots", "lsb_slots", "msb_hits", "msb_misses", "lsb_hits", "lsb_misses",
                "loads", "evictions", "flash_bytes", "ram_bytes", "io_ms", "shared_slots", "msb_resident",
                "lsb_resident")


def set_cache_params(params, *, policy: str, precision: str, warmup: str, high_threshold: float,
                     max_miss_rate: float, msb_share: float, high_ratio: float, prior_lambda: float,
                     gating_t: float, layer_slots: list[int] | None,
                     layer_sensitivity: list[float] | None = None, layer_high_uses: list[int] | None = None):
    """Fill the policy fields shared by the live cache's and the replay's parameter structs; returns
    the per-layer arrays, which must stay alive until the native call has read them."""
    for value, table, name in ((policy, POLICIES, "policy"), (precision, PRECISIONS, "precision"),
                               (warmup, WARMUPS, "warmup")):
        if value not in table:
            raise ValueError(f"{name} must be one of {', '.join(table)}")
    params.policy = POLICIES[policy]
    params.precision = PRECISIONS[precision]
    params.warmup = WARMUPS[warmup]
    params.high_threshold = high_threshold
    params.max_miss_rate = max_miss_rate
    params.msb_share = msb_share
    params.high_ratio = high_ratio
    params.prior_lambda = prior_lambda
    params.gating_t = gating_t
    slots = ffi.new("int32_t[]", list(layer_slots)) if layer_slots else ffi.NULL
    params.layer_slots = slots
    params.n_layer_slots = len(layer_slots) if layer_slots else 0
    sensitivity = ffi.new("float[]", [float(v) for v in layer_sensitivity]) if layer_sensitivity else ffi.NULL
    params.layer_sensitivity = sensitivity
    params.n_layer_sensitivity = len(layer_sensitivity) if layer_sensitivity else 0
    high_uses = ffi.new("int32_t[]", [int(v) for v in layer_high_uses]) if layer_high_uses else ffi.NULL
    params.layer_high_uses = high_uses
    params.n_layer_high_uses = len(layer_high_uses) if layer_high_uses else 0
    return slots, sensitivity, high_uses


def read_cache_stats(get_totals, get_layer, n_layers: int, *, live: bool = False) -> dict:
    """The counters of a live cache or a replay as one dict: totals (plus hits and misses over both
    slices) and per-layer arrays under "layers"; a live cache adds how it reads misses ("io_mode":
    "direct" or "buffered")."""
    t = ffi.new("slicemoe_cache_stats_t *")
    check(get_totals(t))
    stats = {name: getattr(t, name) for name in CACHE_FIELDS}
    io_direct = stats.pop("io_direct")
    if live:
        stats["io_mode"] = "direct" if io_direct else "buffered"
    stats["hits"] = stats["msb_hits"] + stats["lsb_hits"]
    stats["misses"] = stats["msb_misses"] + stats["lsb_misses"]
    rows = []
    row = ffi.new("slicemoe_layer_stats_t *")
    for i in range(n_layers):
        check(get_layer(i, row))
        rows.append({name: getattr(row, name) for name in LAYER_FIELDS})
    stats["layers"] = {name: [r[name] for r in rows] for name in LAYER_FIELDS}
    return stats
