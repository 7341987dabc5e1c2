#!/usr/bin/env python3
"""Decode under a memory cgroup at the stated resident figure + 5%, side by side with the same run
unlimited, with the dense weights copied into anonymous memory (the default) and left mapped
(SLICEMOE_DENSE_MAPPED=1, as before).

The stated figure is what `slicemoe inspect` and `slicemoe run --json` state for the configuration
(slicemoe_gguf.memory.plan: dense weights + cache budget + KV cache + compute buffers); the limit adds
5% and what the child process holds before it loads anything (the interpreter and numpy, measured
here in the same kind of child). The side-by-side's own limit (dense + budget + 768 MiB,
bench_side_by_side.py) is run too. Each row is its own process, page cache dropped before it;
routing is forced from the embedded model's routing of a real prompt, widened onto the full shape,
as the side-by-side does. Per row: decode ms/token, the ratio to the unlimited run, and the bytes the
process read per decode token (/proc/self/io, faults included) next to the engine's own miss bytes:
the excess is pages that pressure evicted and decode faulted back in.

    python scripts/bench_memory_limit.py --model /data/olmoe-amat.gguf   # root
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from bench_side_by_side import CONFIGS, HEADROOM, MemoryLimit, run_row, widened_route  # noqa: E402
from benchlib import emit, machine_line, markdown_table  # noqa: E402

MiB = 1 << 20
N_CTX = 512   # bench_side_by_side's child runs this context


def baseline_bytes(model: Path, n_batch: int) -> int:
    """What a child holds in its memory cgroup before it loads the model: Python, numpy, the package
    and llama.cpp's backends (started by sizing the model, as the test does)."""
    cgroup = MemoryLimit(1 << 40)
    try:
        code = ("import sys, numpy; from pathlib import Path; from slicemoe_gguf import Model, trace; "
                "from slicemoe_gguf.memory import plan; "
                f"plan(sys.argv[1], n_ctx={N_CTX}, n_batch={n_batch}, cache_budget=1); print(Path(sys.argv[2]).read_text())")
        out = subprocess.run([sys.executable, "-c", code, str(model), str(cgroup.path / "memory.usage_in_bytes")],
                             check=True, capture_output=True, text=True, preexec_fn=cgroup.enter).stdout
    finally:
        cgroup.close()
    return int(out.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a sliced full-size GGUF")
    parser.add_argument("--budget", type=int, default=50, help="percent of the 8-bit expert bytes (default 50)")
    parser.add_argument("--configs", default="dbsc + pcw,lru4 + pcw",
                        help=f"cache configurations (default dbsc + pcw,lru4 + pcw; of {', '.join(CONFIGS)})")
    parser.add_argument("-n", "--n-decode", type=int, default=48, help="decode tokens per run (default 48)")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path, help="also write the markdown here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root: it drops the page cache and creates memory cgroups", file=sys.stderr)
        return 2
    from slicemoe_gguf import defaults
    from slicemoe_gguf.memory import plan, routed_expert_bytes
    from slicemoe_gguf.model_info import describe

    trace_path = args.model.with_suffix(".route.jsonl")
    widened_route(args.model, args.n_decode, trace_path)
    budget = routed_expert_bytes(describe(args.model)) * args.budget // 100
    figure = plan(args.model, n_ctx=N_CTX, n_batch=defaults.N_BATCH, cache_budget=budget)
    base = baseline_bytes(args.model, defaults.N_BATCH)
    limits = {"stated + 5%": base + int(1.05 * figure.total_bytes),
              "side-by-side": figure.dense_bytes + budget + HEADROOM}

    rows = []
    for name in args.configs.split(","):
        config = dict(CONFIGS[name], model=str(args.model), trace=str(trace_path), threads=args.threads,
                      cache_budget=budget)
        free = run_row(config, None)
        runs = [("none", "copied", free)]
        for limit_name, limit in limits.items():
            for dense in ("copied", "mapped"):
                os.environ.pop("SLICEMOE_DENSE_MAPPED", None)
                if dense == "mapped":
                    os.environ["SLICEMOE_DENSE_MAPPED"] = "1"
                runs.append((f"{limit_name} ({limit / MiB:.0f} MiB)", dense, run_row(config, limit)))
        os.environ.pop("SLICEMOE_DENSE_MAPPED", None)
        for limit_name, dense, r in runs:
            if "error" in r:
                rows.append([name, limit_name, dense, "failed: " + r["error"], "", "", ""])
            else:
                rows.append([name, limit_name, dense, f"{r['decode_ms']:.1f}",
                             f"{r['decode_ms'] / free.get('decode_ms', float('nan')):.2f}x",
                             f"{r['read_per_token'] / 1e6:.2f}", f"{r['engine_flash_per_token'] / 1e6:.2f}"])
            print(" | ".join(rows[-1]), flush=True)

    text = "\n".join([
        f"Machine: {machine_line()}. Model: {args.model.name}, budget {args.budget}% = {budget / MiB:.0f} MiB; "
        f"stated resident figure {figure.describe('pools')}; the child's own baseline {base / MiB:.0f} MiB. "
        f"{args.threads} threads, page cache dropped before every row, {args.n_decode} decode tokens.", "",
        markdown_table(["configuration", "memory limit", "dense weights", "decode ms/token", "vs unlimited",
                        "read MB/token (process)", "miss MB/token (engine)"], rows)])
    emit(text + "\n", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
