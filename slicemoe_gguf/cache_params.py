"""The cache settings and counters as the native parameter and statistics structs hold them: the
names of the enum values, filling the policy fields that the live cache and trace replay share,
and reading their counters back. A leaf module: runtime.py and trace.py both import it, and it
imports neither.
"""

from __future__ import annotations

import functools
import os

from ._native import check, ffi, lib


@functools.cache
def enum_values(enum: str) -> dict[str, int]:
    """A C enum of slicemoe.h by the names its flags use (``enum_values("slicemoe_io_mode")`` is
    {"auto": 0, "direct": 1, "buffered": 2}), as cffi read it from the header."""
    lib()   # the header's declarations are read when the library loads
    elements = ffi.typeof(f"enum {enum}").elements   # value -> C name
    prefix = os.path.commonprefix(list(elements.values()))
    prefix = prefix[:prefix.rfind("_") + 1]
    return {name[len(prefix):].lower(): value for value, name in sorted(elements.items())}


@functools.cache
def policies(*, live_only: bool = False, needs_logits: bool = False) -> dict[str, int]:
    """The cache policies by name, as the native policy tables spell them (live_only: leave out
    those that need the future and run only in replay; needs_logits: only those that bias the
    router, whose replay needs a trace with the router logits)."""
    native, out = lib(), {}
    for policy in range(64):
        name = native.slicemoe_policy_name(policy)
        if name == ffi.NULL:
            break
        if (native.slicemoe_policy_runs_live(policy) or not live_only) and \
                (native.slicemoe_policy_needs_logits(policy) or not needs_logits):
            out[ffi.string(name).decode()] = policy
    return out


@functools.cache
def policy_demands() -> dict[str, str | None]:
    """Each policy's demand as the offline optimum bounds it (slicemoe_policy_demand): the rule of
    the uses it serves at 8 bits ("auto", "high", "low", "dymoe", "adapmoe"), or None."""
    native = lib()
    return {name: (ffi.string(native.slicemoe_policy_demand(policy)).decode()
                   if native.slicemoe_policy_demand(policy) != ffi.NULL else None)
            for name, policy in policies().items()}


SETTING_KINDS = ("size", "choice", "number", "flag")   # enum slicemoe_setting_kind


@functools.cache
def settings() -> dict[str, dict]:
    """The engine's settings by name, from its one table (slicemoe_setting_get): the CLI flag, the
    kind (size, choice, number or flag), the choices, the range of a number, the engine's default
    (a choice's name, a number, a bool, a size in bytes) and a line of help. The `slicemoe.<name>`
    overrides, the SLICEMOE_<NAME> variables and the CLI's checks all follow it."""
    native, out = lib(), {}
    row = ffi.new("struct slicemoe_setting *")
    i = 0
    while native.slicemoe_setting_get(i, row):
        kind = SETTING_KINDS[row.kind]
        choices = []
        while kind == "choice" and native.slicemoe_setting_choice(i, len(choices)) != ffi.NULL:
            choices.append(ffi.string(native.slicemoe_setting_choice(i, len(choices))).decode())
        default = {"size": int, "choice": lambda v: choices[int(v)], "flag": bool,
                   "number": lambda v: float(f"{v:.6g}")}[kind](row.default_value)   # a float32's shortest text
        out[ffi.string(row.name).decode()] = {
            "flag": ffi.string(row.flag).decode(), "kind": kind, "choices": choices, "default": default,
            "min": row.min, "max": row.max, "max_open": bool(row.max_open), "help": ffi.string(row.help).decode()}
        i += 1
    return out


def range_text(setting: dict) -> str:
    """A number setting's range as the engine writes it: "[0, 1)", "[0, 1e6]"."""
    def number(value: float) -> str:
        return f"{value:g}".replace("e+0", "e").replace("e+", "e")
    return f"[{number(setting['min'])}, {number(setting['max'])}{')' if setting['max_open'] else ']'}"


def range_problem(name: str, value: float) -> str | None:
    """None when value is in the range of the number setting `name`, else what the range is."""
    setting = settings()[name]
    low, high = setting["min"], setting["max"]
    if low <= value and (value < high if setting["max_open"] else value <= high):
        return None
    return f"{setting['flag'] or name} must be in {range_text(setting)}"


CACHE_FIELDS = ("budget_bytes", "pool_bytes", "msb_hits", "msb_misses", "lsb_hits", "lsb_misses", "loads",
                "evictions", "flash_bytes", "ram_bytes", "high_uses", "low_uses", "warmup_loads",
                "decode_tokens", "io_ms", "high_threshold", "dropped_uses", "prefetch_loads",
                "prefetch_useful_bytes", "prefetch_wasted_bytes", "device_pool_bytes", "io_direct",
                "dense_copied_bytes", "load_flash_bytes", "load_io_ms", "warmup_io_ms")
LAYER_FIELDS = ("layer", "msb_slots", "lsb_slots", "msb_hits", "msb_misses", "lsb_hits", "lsb_misses",
                "loads", "evictions", "flash_bytes", "ram_bytes", "io_ms", "shared_slots", "msb_resident",
                "lsb_resident")


def set_cache_params(params, *, policy: str, precision: str, warmup: str, high_threshold: float,
                     max_miss_rate: float, msb_share: float, high_ratio: float, prior_lambda: float,
                     gating_t: float, lsb_background: bool, layer_slots: list[int] | None,
                     layer_sensitivity: list[float] | None = None, layer_high_uses: list[int] | None = None):
    """Fill a struct slicemoe_cache_params (a live cache's, params.cache of slicemoe_model_params, or a
    replay's); returns the per-layer arrays, which must stay alive until the native call has read them."""
    tables = {"policy": policies(), "precision": enum_values("slicemoe_precision"),
              "warmup": enum_values("slicemoe_warmup")}
    for name, value in (("policy", policy), ("precision", precision), ("warmup", warmup)):
        if value not in tables[name]:
            raise ValueError(f"{name} must be one of {', '.join(tables[name])}")
    params.policy = tables["policy"][policy]
    params.precision = tables["precision"][precision]
    params.warmup = tables["warmup"][warmup]
    params.high_threshold = high_threshold
    params.max_miss_rate = max_miss_rate
    params.msb_share = msb_share
    params.high_ratio = high_ratio
    params.prior_lambda = prior_lambda
    params.gating_t = gating_t
    params.lsb_background = bool(lsb_background)
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
