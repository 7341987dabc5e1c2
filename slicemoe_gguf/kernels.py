"""The fused expert product's kernels on one expert's slices, as the MoE graph runs them.

For tests and benchmarks: the graph calls the same kernels through its own op (native/src/
slicemoe-product.h), the best one this CPU runs.
"""

from __future__ import annotations

import numpy as np

from slicemoe_gguf._native import check, ffi, lib
from slicemoe_gguf.amat import GROUP_SIZE, Q4_1_BLOCK_BYTES

KERNELS = ("auto", "scalar", "avx2", "avx512vnni", "neon", "neon-dotprod")   # index = enum slicemoe_kernel


def available() -> list[str]:
    """The kernels this CPU runs, the best last ("auto" resolves to it)."""
    return [name for index, name in enumerate(KERNELS) if index and lib().slicemoe_kernel_name(index) != ffi.NULL]


def best() -> str:
    return ffi.string(lib().slicemoe_kernel_name(0)).decode()


def expert_product(msb: np.ndarray, lsb: np.ndarray | None, x: np.ndarray, kernel: str = "auto") -> np.ndarray:
    """y [n_out] float32 = (MSB + LSB) x, or MSB x without lsb. msb and lsb are ggml Q4_1 rows,
    uint8 [n_out, n_in / 32 * 20] (amat.slice_blocks); x is float32 [n_in], quantized to 8 bits per
    32 values inside, as llama.cpp's Q8_1."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"activations {x.shape} are not one vector")
    y, _ = time_expert_product(msb, lsb, x[None, :], kernel, repeats=1)
    return y[0]


def _tokens(x: np.ndarray, n_in: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ValueError(f"activations {x.shape} are not [n_tokens, {n_in}]")
    return x


def time_expert_product(msb: np.ndarray, lsb: np.ndarray | None, x: np.ndarray, kernel: str = "auto",
                        repeats: int = 10) -> tuple[np.ndarray, float]:
    """(y [n_tokens, n_out], the fastest of `repeats` runs in seconds): expert_product for each row
    of x [n_tokens, n_in] in turn, timed inside the library on this thread (no Python in the time)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r} (one of {', '.join(KERNELS)})")
    msb = np.ascontiguousarray(msb, dtype=np.uint8)
    n_out, row_bytes = msb.shape
    if row_bytes % Q4_1_BLOCK_BYTES:
        raise ValueError(f"rows of {row_bytes} bytes are not whole Q4_1 blocks ({Q4_1_BLOCK_BYTES} bytes) of activations")
    x = _tokens(x, row_bytes // Q4_1_BLOCK_BYTES * GROUP_SIZE)
    if lsb is not None:
        lsb = np.ascontiguousarray(lsb, dtype=np.uint8)
        if lsb.shape != msb.shape:
            raise ValueError(f"LSB rows {lsb.shape} differ from MSB rows {msb.shape}")
    y = np.empty((x.shape[0], n_out), dtype=np.float32)
    seconds = ffi.new("double *")
    check(lib().slicemoe_expert_product_time(
        KERNELS.index(kernel), ffi.from_buffer(msb), ffi.NULL if lsb is None else ffi.from_buffer(lsb),
        x.shape[1], n_out, x.shape[0], ffi.cast("float *", ffi.from_buffer(x)), ffi.cast("float *", ffi.from_buffer(y)),
        repeats, seconds))
    return y, seconds[0]


def time_ggml_product(w: np.ndarray, x: np.ndarray, ggml_type: str, repeats: int = 10) -> tuple[np.ndarray, float, bool]:
    """(y [n_tokens, n_out], the fastest of `repeats` runs in seconds, whether ggml repacked the
    weights): ggml's own mul_mat of w (float [n_out, n_in], quantized by ggml to `ggml_type`, e.g.
    "Q8_0", "Q4_0", "Q4_K") with x [n_tokens, n_in], as llama.cpp runs a stock file's weights on
    one CPU thread."""
    import gguf

    try:
        type_id = int(gguf.GGMLQuantizationType[ggml_type])
    except KeyError:
        raise ValueError(f"unknown ggml type {ggml_type!r}") from None
    w = np.ascontiguousarray(w, dtype=np.float32)
    x = _tokens(x, w.shape[1])
    y = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    seconds, repacked = ffi.new("double *"), ffi.new("bool *")
    check(lib().slicemoe_ggml_product_time(
        type_id, ffi.cast("float *", ffi.from_buffer(w)), w.shape[1], w.shape[0], x.shape[0],
        ffi.cast("float *", ffi.from_buffer(x)), ffi.cast("float *", ffi.from_buffer(y)), repeats, seconds, repacked))
    return y, seconds[0], bool(repacked[0])
