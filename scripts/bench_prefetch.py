#!/usr/bin/env python3
"""Does look-ahead prefetch pay? The embedded trained model, dbsc, with and without --prefetch.

Per budget and warm-up: decode ms/token, slice misses, flash bytes per token and the prefetched
bytes that were never used, each the median of alternating runs (so drift hits both sides). The
model is small enough to stay in the page cache between runs, so this measures what prefetch costs
and saves in the engine (threads, slot churn, extra reads), not the device.

    python scripts/bench_prefetch.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine_line, markdown_table  # noqa: E402

from slicemoe_gguf import Model  # noqa: E402
from slicemoe_gguf.embedded import embedded_gguf  # noqa: E402
from slicemoe_gguf.memory import routed_expert_bytes  # noqa: E402
from slicemoe_gguf.model_info import describe  # noqa: E402

PROMPT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."


def decode(path: Path, budget: int, warmup: str, prefetch: bool, n: int, threads: int) -> dict:
    with Model(path, cache_budget=budget, warmup=warmup, prefetch=prefetch, n_threads=threads) as model:
        result = model.generate(PROMPT, n, stop_at_eog=False)
        stats = model.cache_stats()
    tokens = max(stats["decode_tokens"], 1)
    return {"ms": result.decode_ms_per_token, "misses": stats["misses"], "flash_kb": stats["flash_bytes"] / tokens / 1e3,
            "wasted_kb": stats["prefetch_wasted_bytes"] / tokens / 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--n-predict", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("-t", "--threads", type=int, default=2)
    args = parser.parse_args()
    path = embedded_gguf(progress=False)
    total = routed_expert_bytes(describe(path))
    rows = []
    for percent in (25, 50, 75):
        for warmup in ("none", "pcw"):
            runs = {False: [], True: []}
            for _ in range(args.repeats):
                for prefetch in (False, True):
                    runs[prefetch].append(decode(path, total * percent // 100, warmup, prefetch, args.n_predict, args.threads))
            med = {p: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for p, rs in runs.items()}
            off, on = med[False], med[True]
            rows.append([f"{percent}%", warmup, f"{off['ms']:.2f}", f"{on['ms']:.2f}", f"{on['ms'] / off['ms']:.2f}x",
                         f"{off['misses']:.0f} -> {on['misses']:.0f}", f"{off['flash_kb']:.0f} -> {on['flash_kb']:.0f}",
                         f"{on['wasted_kb']:.0f}"])
            print(" | ".join(rows[-1]), flush=True)
    print(f"\n{machine_line()}; embedded model, dbsc, {args.n_predict} tokens, {args.threads} threads, "
          f"median of {args.repeats} alternating runs\n")
    print(markdown_table(["budget", "warm-up", "off ms/token", "on ms/token", "on / off", "misses", "flash KB/token",
                          "wasted KB/token"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
