#!/usr/bin/env python3
"""AMAT quantization + Q4_1 slice packing throughput on one core, per grid (target: >= 50 M
weights/s for the paper and aligned grids; the searched grid spends about 8x that on its search).

    python scripts/bench_amat.py [--experts 8] [--rows 1024] [--cols 2048] [--grids paper,aligned,searched]
"""

from __future__ import annotations

import argparse
import os
import time

# one core: the target is per core, and numpy must not use a thread pool behind our back
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np  # noqa: E402

from slicemoe_gguf import amat  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1024, help="output features per expert")
    parser.add_argument("--cols", type=int, default=2048, help="input features (multiple of 32)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--grids", default=",".join(amat.GRIDS))
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((args.experts, args.rows, args.cols)) * 0.02).astype(np.float32)
    n = w.size
    print("| grid | weights | quantize | pack MSB+LSB | total | throughput | target |")
    print("|---|---|---|---|---|---|---|")
    for grid in args.grids.split(","):
        best_q = best_p = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            g = amat.quantize(w, "bench", grid=grid)
            t1 = time.perf_counter()
            amat.slice_blocks(g)
            t2 = time.perf_counter()
            best_q, best_p = min(best_q, t1 - t0), min(best_p, t2 - t1)
        total = best_q + best_p
        print(f"| {grid} | {n / 1e6:.1f} M | {best_q * 1e3:.0f} ms | {best_p * 1e3:.0f} ms | {total * 1e3:.0f} ms "
              f"| {n / total / 1e6:.1f} M weights/s | {n / total / 1e6 / 50:.2f}x of 50 M/s |")


if __name__ == "__main__":
    main()
