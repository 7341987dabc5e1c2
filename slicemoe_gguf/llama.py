"""llama-cpp-python on this package's library: its `Llama` class, chat templates and server, with
the slice cache on.

    from slicemoe_gguf.llama import Llama
    llm = Llama("model-amat.gguf", cache_budget="50%", n_ctx=2048)
    print(llm("Once upon a time", max_tokens=32, temperature=0)["choices"][0]["text"])
    print(llm.cache_stats()["misses"])

llama-cpp-python binds libllama by name from the directory in LLAMA_CPP_LIB_PATH; ours carries the
same llama.cpp revision (the public structs of llama.h unchanged) plus the engine, which a sliced
GGUF gets at load through llama.cpp's own entry point, configured by `slicemoe.*` key-value
overrides. Importing this module points LLAMA_CPP_LIB_PATH at our library, so it must come before
any other import of llama_cpp. Install with `pip install "slicemoe-gguf[llama]"` (see docs/usage.md
for skipping llama-cpp-python's own build of llama.cpp, which this never loads).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import defaults
from ._native import SliceMoEError, check, ffi, lib, library_path
from .cache_params import read_cache_stats, settings

# the kv_overrides keys and the values they take (the names of `slicemoe run`'s flags)


def _point_llama_cpp_at_our_library() -> None:
    ours = str(Path(library_path()).parent)
    if "llama_cpp" in sys.modules:
        loaded = os.environ.get("LLAMA_CPP_LIB_PATH")
        if loaded is None or Path(loaded).resolve() != Path(ours).resolve():
            raise SliceMoEError("llama_cpp was imported before slicemoe_gguf.llama and runs its own library; "
                                "import slicemoe_gguf.llama first (or set LLAMA_CPP_LIB_PATH=" + ours + ")", 1)
    os.environ["LLAMA_CPP_LIB_PATH"] = ours


_point_llama_cpp_at_our_library()
lib()   # our cffi handle and llama_cpp's ctypes handle are then the same loaded library

# the engine's settings (its one table): each is a slicemoe.<name> override
SETTINGS = tuple(settings())

try:
    import llama_cpp
except ImportError as exc:   # pragma: no cover - depends on the environment
    raise SliceMoEError('llama-cpp-python is not installed: pip install "slicemoe-gguf[llama]"', 1) from exc


def overrides(cache_budget: str | int | None = None, **settings) -> dict:
    """The `slicemoe.*` key-value overrides for llama_cpp.Llama(kv_overrides=...). cache_budget is
    bytes (an int) or a size string ("2GiB", "40%" of all routed slices); None = no cache. The
    engine checks every value and refuses a bad one when the model loads."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"not slicemoe settings: {', '.join(unknown)} (known: {', '.join(SETTINGS)})")
    given = {"cache_budget": cache_budget, **settings}
    return {f"slicemoe.{name}": value for name, value in given.items() if value is not None}


class Llama(llama_cpp.Llama):
    """llama_cpp.Llama on our library: the keyword arguments of llama_cpp.Llama, plus the cache
    settings (cache_budget, policy, precision, warmup, ... with `slicemoe run`'s defaults)."""

    def __init__(self, model_path: str, *, cache_budget: str | int | None = None, policy: str = defaults.POLICY,
                 precision: str = defaults.PRECISION, warmup: str = defaults.WARMUP, kv_overrides: dict | None = None,
                 **kwargs):
        merged = {**overrides(cache_budget, policy=policy, precision=precision, warmup=warmup), **(kv_overrides or {})}
        kwargs.setdefault("verbose", False)
        super().__init__(model_path, kv_overrides=merged, **kwargs)

    def cache_stats(self) -> dict | None:
        """The slice cache's counters (as slicemoe_gguf.Model.cache_stats), None without a cache."""
        return cache_stats(self)

    def release_cache(self) -> None:
        """Empty the slice pools and give their memory back (as slicemoe_gguf.Model.release_cache)."""
        release_cache(self)


def _wrapped(llm: "llama_cpp.Llama"):
    """Our handle on the model of a llama_cpp.Llama running on our library."""
    native = lib()
    pointer = llm._model.model   # llama-cpp-python's struct llama_model * (a ctypes void pointer)
    handle = ffi.new("slicemoe_model **")
    check(native.slicemoe_model_wrap(ffi.cast("void *", int(pointer)), handle))
    return ffi.gc(handle[0], native.slicemoe_model_free)


def release_cache(llm: "llama_cpp.Llama") -> None:
    """Empty the slice pools of any llama_cpp.Llama running on our library (nothing without a cache)."""
    lib().slicemoe_cache_release(_wrapped(llm))


def cache_stats(llm: "llama_cpp.Llama") -> dict | None:
    """Counters of the slice cache of any llama_cpp.Llama running on our library, None without one."""
    native = lib()
    wrapped = _wrapped(llm)
    n_layers = native.slicemoe_cache_n_layers(wrapped)
    if n_layers == 0:
        return None
    return read_cache_stats(lambda t: native.slicemoe_cache_get_stats(wrapped, t),
                            lambda i, row: native.slicemoe_cache_get_layer_stats(wrapped, i, row), n_layers, live=True)
