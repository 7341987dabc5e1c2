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
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r} (one of {', '.join(KERNELS)})")
    msb = np.ascontiguousarray(msb, dtype=np.uint8)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_out, row_bytes = msb.shape
    if row_bytes % Q4_1_BLOCK_BYTES or x.shape != (row_bytes // Q4_1_BLOCK_BYTES * GROUP_SIZE,):
        raise ValueError(f"rows of {row_bytes} bytes do not match {x.shape[0]} activations")
    if lsb is not None:
        lsb = np.ascontiguousarray(lsb, dtype=np.uint8)
        if lsb.shape != msb.shape:
            raise ValueError(f"LSB rows {lsb.shape} differ from MSB rows {msb.shape}")
    y = np.empty(n_out, dtype=np.float32)
    check(lib().slicemoe_expert_product(
        KERNELS.index(kernel), ffi.from_buffer(msb), ffi.NULL if lsb is None else ffi.from_buffer(lsb),
        x.shape[0], n_out, ffi.cast("float *", ffi.from_buffer(x)), ffi.cast("float *", ffi.from_buffer(y))))
    return y
