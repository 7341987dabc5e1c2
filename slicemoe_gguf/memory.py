"""The resident memory a configuration implies, and the cache budget that fits the memory free now.

Resident memory of a decode run = dense weights (every tensor but the routed experts) + the slice
pools (at most the cache budget) + the KV cache + llama.cpp's compute buffers. llama.cpp sizes the
last two itself without allocating anything (its no_alloc load), so the figures are its own. Without
a cache the routed experts are mapped from the file and count in full (the most they can take).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ._native import SliceMoEError, check, ffi, lib
from .units import format_size

# What --cache-budget auto leaves free for everything outside the model: the Python process and
# its libraries, the page cache the miss reads go through, other programs. 1 GiB or 10% of the
# available memory, whichever is more.
AUTO_MARGIN_MIN = 2**30
AUTO_MARGIN_FRACTION = 0.10


@dataclass
class MemoryPlan:
    dense_bytes: int     # weights other than routed experts
    expert_bytes: int    # routed experts resident: the pools with a cache, all of them without
    kv_bytes: int
    compute_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.dense_bytes + self.expert_bytes + self.kv_bytes + self.compute_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}

    def describe(self, experts: str | None = None) -> str:
        """"dense weights A + <experts> B + KV cache C + compute buffers D = total"; experts None
        leaves the expert term out."""
        terms = [("dense weights", self.dense_bytes), (experts, self.expert_bytes),
                 ("KV cache", self.kv_bytes), ("compute buffers", self.compute_bytes)]
        return " + ".join(f"{name} {format_size(n)}" for name, n in terms if name) + f" = {format_size(self.total_bytes)}"


def _context_params(n_ctx: int, n_batch: int):
    params = lib().slicemoe_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    return params


def _llama_figures(path: str | os.PathLike, n_ctx: int, n_batch: int, with_cache: bool) -> tuple[int, int, int]:
    """(all weights, KV cache, compute buffers) in bytes, as llama.cpp sizes them for this file."""
    native = lib()   # declares the C types before ffi.new uses them
    out = ffi.new("struct slicemoe_memory *")
    check(native.slicemoe_memory_estimate(os.fsencode(Path(path)),
                                         ffi.new("struct slicemoe_context_params *", _context_params(n_ctx, n_batch)),
                                         with_cache, out))
    return int(out.weights_bytes), int(out.kv_bytes), int(out.compute_bytes)


def routed_expert_bytes(info: dict) -> int:
    return info["expert_msb_bytes"] + info["expert_lsb_bytes"]


def _mapping_padding(path: str | os.PathLike) -> int:
    """What a mapped model's buffer holds beyond the tensors as llama.cpp's no_alloc sizing counts
    them (each padded to 32 bytes): the buffer is the span of the file's tensor data, alignment
    padding between tensors included (up to 4 KiB each in a sliced file, written 4 KiB aligned)."""
    from .model_info import read_header

    _, tensors = read_header(path)
    if not tensors:
        return 0
    span = max(t.offset + t.n_bytes for t in tensors) - min(t.offset for t in tensors)
    return span - sum(-(-t.n_bytes // 32) * 32 for t in tensors)


def plan(path: str | os.PathLike, *, n_ctx: int, n_batch: int, cache_budget: int) -> MemoryPlan:
    """The resident memory of running `path` (mapped, on the CPU, as `slicemoe run` does) with a
    context of n_ctx tokens and a cache budget (0 = no cache: every expert mapped)."""
    from .model_info import describe

    experts = routed_expert_bytes(describe(path))
    weights, kv, compute = _llama_figures(path, n_ctx, n_batch, with_cache=cache_budget > 0)
    weights += _mapping_padding(path)
    resident_experts = min(cache_budget, experts) if cache_budget > 0 else experts
    return MemoryPlan(weights - experts, resident_experts, kv, compute)


def _without_experts(memory: MemoryPlan) -> MemoryPlan:
    return MemoryPlan(memory.dense_bytes, 0, memory.kv_bytes, memory.compute_bytes)


def plan_of_running(model) -> MemoryPlan:
    """The same figures for a loaded Model, with the pools as allocated."""
    out = model.memory()
    from .model_info import describe

    experts = routed_expert_bytes(describe(model.path))
    stats = model.cache_stats()
    resident_experts = stats["pool_bytes"] if stats else experts
    return MemoryPlan(int(out.weights_bytes) - experts, resident_experts, int(out.kv_bytes), int(out.compute_bytes))


def available_memory() -> tuple[int, str]:
    """Bytes this process can still use, and where the figure comes from: /proc/meminfo's
    MemAvailable, or the memory cgroup's limit less its usage when that is lower."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available, source = int(fields["MemAvailable"].split()[0]) * 1024, "MemAvailable"
    except (OSError, KeyError, ValueError):
        raise SliceMoEError("--cache-budget auto needs /proc/meminfo (Linux or Android); give a size instead", 1) from None
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free_in_cgroup = int(limit) - int((cgroup / "memory.current").read_text())
            if free_in_cgroup < available:
                available, source = free_in_cgroup, "the memory cgroup's limit less its usage"
    except (OSError, ValueError):
        pass
    return available, source


def auto_budget(path: str | os.PathLike, *, n_ctx: int, n_batch: int, margin: int | None = None,
                available: int | None = None) -> tuple[int, str]:
    """The cache budget that fits the memory available now, and a sentence saying how it was found.

    budget = available - margin - (dense weights + KV cache + compute buffers), at most every slice.
    Raises SliceMoEError with the numbers when the dense part alone does not fit."""
    from .model_info import describe

    source = "given"
    if available is None:
        available, source = available_memory()
    if margin is None:
        margin = max(AUTO_MARGIN_MIN, int(AUTO_MARGIN_FRACTION * available))
    # sized as a cached run (any budget > 0), then the pools taken out: they are what is left
    fixed = _without_experts(plan(path, n_ctx=n_ctx, n_batch=n_batch, cache_budget=1))
    budget = available - margin - fixed.total_bytes
    if budget <= 0:
        raise SliceMoEError(
            f"--cache-budget auto: the model does not fit: {fixed.describe()} before any expert slice, "
            f"but {format_size(available)} is available ({source}) and "
            f"{format_size(margin)} is kept free; use a smaller --ctx-size or free memory", 1)
    budget = min(budget, routed_expert_bytes(describe(path)))
    how = (f"{format_size(available)} available ({source}) - {format_size(margin)} margin - "
           f"{format_size(fixed.total_bytes)} dense weights, KV cache and compute buffers")
    return budget, how
