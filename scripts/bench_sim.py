#!/usr/bin/env python3
"""Trace replay throughput of the native cache manager (target: at least 5 M expert accesses/s).

A synthetic decode trace with OLMoE-1B-7B's routing shape (16 MoE layers, 64 experts, top-8) and
some reuse (each token keeps about half of the previous token's experts in every layer) is
replayed at half of the slice bytes for each policy.

    python scripts/bench_sim.py [--tokens 20000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from slicemoe_gguf import trace as traces

LAYERS, EXPERTS, TOP_K = 16, 64, 8
SLICE = 1024 * 2048 * 3 // 32 * 20   # one OLMoE expert's Q4_1 slice, three projections


def synthetic(tokens: int, seed: int = 0) -> traces.Trace:
    rng = np.random.default_rng(seed)
    experts = np.empty((tokens, LAYERS, TOP_K), dtype=np.int32)
    current = np.stack([rng.choice(EXPERTS, TOP_K, replace=False) for _ in range(LAYERS)])
    for t in range(tokens):
        for layer in range(LAYERS):
            keep = current[layer][rng.random(TOP_K) < 0.5]
            fresh = rng.permutation(np.setdiff1d(np.arange(EXPERTS), keep))[: TOP_K - len(keep)]
            current[layer] = np.concatenate([keep, fresh])
        experts[t] = current
    n = tokens * LAYERS
    header = {"format": traces.FORMAT, "version": traces.VERSION, "n_layers": LAYERS, "n_experts": EXPERTS,
              "top_k": TOP_K, "moe_layers": list(range(LAYERS)), "slice_bytes": {"msb": SLICE, "lsb": SLICE}}
    weights = rng.dirichlet(np.ones(TOP_K), size=n).astype(np.float32)
    weights = -np.sort(-weights, axis=1)
    return traces.Trace(header, np.ones(n, np.int32), np.tile(np.arange(LAYERS, dtype=np.int32), tokens),
                        np.ones(n, np.int32), experts.reshape(n, TOP_K), weights, np.zeros(n, np.int32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=20000)
    args = parser.parse_args()
    trace = synthetic(args.tokens)
    budget = traces.total_slice_bytes(trace) // 2
    accesses = len(trace) * TOP_K
    print(f"{args.tokens} decode tokens x {LAYERS} layers x top-{TOP_K} = {accesses / 1e6:.2f} M expert accesses, "
          f"budget 50% of slices")
    print("| policy | seconds | M accesses/s | vs 5 M/s target | slice miss rate |")
    print("|---|---|---|---|---|")
    for policy in ("dbsc", "lru8", "lfu8", "lru4", "hobbit", "belady"):
        t0 = time.perf_counter()
        stats = traces.replay(trace, policy=policy, budget=budget)
        seconds = time.perf_counter() - t0
        rate = accesses / seconds / 1e6
        print(f"| {policy} | {seconds:.2f} | {rate:.1f} | {rate / 5:.2f}x | {100 * traces.miss_rate(stats):.1f}% |")


if __name__ == "__main__":
    main()
