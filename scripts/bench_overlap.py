"""Reads overlapped with compute, side by side: the same cached decode with each step's misses read
before its expert products run (SLICEMOE_OVERLAP=0, the default) and read while the fused products
compute the resident uses (SLICEMOE_OVERLAP=1), page cache dropped before every run. With
--compare graph-step, the decode step served by the eval callback, which stops the graph at every
MoE layer (SLICEMOE_GRAPH_STEP=0), against the step as an op of the graph, one graph run per token
(SLICEMOE_GRAPH_STEP=1).

    sudo python scripts/bench_overlap.py [--model M.gguf] [--cache-budget 50%] [-n 32] [--repeats 3]
                                         [--compare overlap|graph-step]

Runs `slicemoe run --json --ignore-eos` alternately in both modes and prints medians of decode
ms/token, the time blocked on reads per token and flash MB per token, with the ratio overlapped /
reads first. Reading first, decode time is compute plus reads; the bound overlapping can reach is
the larger of the two (compute = decode - blocked, reads = blocked, both from the reads-first runs),
printed beside it. The counters of both modes must agree (same hits, misses and bytes), which the
script checks. Dropping the page cache needs root; without it the script says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import PROMPT, drop_page_cache  # noqa: E402

# what is compared: the environment switch, and the names of its off and on modes
COMPARISONS = {"overlap": ("SLICEMOE_OVERLAP", "reads first", "overlapped"),
               "graph-step": ("SLICEMOE_GRAPH_STEP", "callback step", "in-graph step")}
COUNTERS = ("hits", "misses", "flash_bytes", "loads", "evictions")


def main() -> int:
    from slicemoe_gguf.embedded import embedded_gguf

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a sliced GGUF (default: the embedded model)")
    parser.add_argument("--cache-budget", default="50%")
    parser.add_argument("-n", type=int, default=32, help="tokens to decode (default 32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--compare", choices=COMPARISONS, default="overlap",
                        help="overlap: reads first against overlapped (default); graph-step: the callback's "
                             "step against the in-graph step")
    args = parser.parse_args()
    model = args.model or str(embedded_gguf(progress=False))
    variable, off, on = COMPARISONS[args.compare]
    modes = {off: "0", on: "1"}

    rows: dict[str, list[dict]] = {mode: [] for mode in modes}
    counters: dict[str, tuple] = {}
    dropped = True
    for _ in range(args.repeats):
        for mode, switch in modes.items():
            dropped = drop_page_cache() and dropped
            out = json.loads(subprocess.run(
                ["slicemoe", "run", "-m", model, "-p", PROMPT, "-n", str(args.n), "--ignore-eos", "--json",
                 "--cache-budget", args.cache_budget, "-t", str(args.threads)],
                capture_output=True, text=True, check=True, env={**os.environ, variable: switch}).stdout)
            cache = out["cache"]
            tokens = max(cache["decode_tokens"], 1)
            counters.setdefault(mode, tuple(cache[name] for name in COUNTERS))
            rows[mode].append({"ms_per_token": out["decode_ms_per_token"], "io_ms_per_token": cache["io_ms"] / tokens,
                               "flash_mb_per_token": cache["flash_bytes"] / tokens / 1e6})
    if len(set(counters.values())) != 1:
        print(f"the modes counted differently: {counters}", file=sys.stderr)
        return 1
    med = {mode: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for mode, runs in rows.items()}
    first, second = med[off], med[on]
    compute = first["ms_per_token"] - first["io_ms_per_token"]
    bound = max(compute, first["io_ms_per_token"])
    print(f"model {model}, cache budget {args.cache_budget}, {args.n} tokens, {args.threads} threads, median of "
          f"{args.repeats}; page cache {'dropped before each run' if dropped else 'NOT dropped (needs root)'}")
    print(f"{'':28} {off:>14} {on:>14} {'ratio':>7}")
    for key, label in (("ms_per_token", "decode ms/token"), ("io_ms_per_token", "blocked on reads ms/token"),
                       ("flash_mb_per_token", "flash MB/token")):
        a, b = first[key], second[key]
        print(f"{label:28} {a:14.2f} {b:14.2f} {b / a if a else float('nan'):7.2f}")
    if args.compare == "overlap":
        print(f"bound max(compute {compute:.2f}, reads {first['io_ms_per_token']:.2f}) = {bound:.2f} ms/token; "
              f"overlapped is {second['ms_per_token'] / bound:.2f}x the bound")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
