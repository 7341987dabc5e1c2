#!/usr/bin/env python3
"""Predictive cache warm-up (PCW): misses and decode time over the first 16 decode tokens of each
request, with and without warm-up, on the embedded trained model.

Each request is a held-out window: a 48-token prompt (one prefill batch, whose routing PCW scores),
then 16 teacher-forced decode tokens. The requests run one after another through one model, so the
cache a request starts from is what the previous request left, as in a session.

    python scripts/bench_pcw.py [--quick] [--out results/]

Writes pcw.md and pcw.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 requests, budgets 25/50%%")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--prompt", type=int, default=48)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--budgets", default="25,50,75")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    if args.quick:
        args.requests, args.budgets = 4, "25,50"

    from slicemoe_gguf.embedded import embedded_gguf
    from slicemoe_gguf.model_info import describe

    path = embedded_gguf()
    total = describe(path)["expert_msb_bytes"] + describe(path)["expert_lsb_bytes"]
    windows = benchlib.heldout_windows(args.requests, args.prompt + args.decode + 1)
    rows = []
    for b in (int(x) for x in args.budgets.split(",")):
        runs = {w: benchlib.engine_run(path, windows, args.prompt, threads=args.threads, cache_budget=total * b // 100,
                                       policy="dbsc", warmup=w) for w in ("none", "pcw")}
        for w, run in runs.items():
            s = run.stats
            misses_per_token = s["misses"] / max(s["decode_tokens"], 1)
            rows.append([f"{b}%", "pcw" if w == "pcw" else "no warm-up", f"{misses_per_token:.2f}",
                         f"{100 * s['misses'] / max(s['hits'] + s['misses'], 1):.1f}%", str(s["warmup_loads"]),
                         f"{s['flash_bytes'] / max(s['decode_tokens'], 1) / 1e3:.1f}", f"{run.ms_per_token:.2f}"])
        none, pcw = runs["none"].stats, runs["pcw"].stats
        print(f"  {b}%: misses {none['misses']} -> {pcw['misses']}", file=sys.stderr, flush=True)

    text = "\n".join([
        f"PCW on the embedded model: {len(windows)} requests of {args.prompt} prompt + {args.decode} decode tokens, "
        f"policy dbsc; flash includes the warm-up loads; {benchlib.machine_line()}.", "",
        benchlib.markdown_table(["budget", "warm-up", "misses/token", "slice miss rate", "warm-up loads",
                                 "flash kB/token", "ms/token"], rows)])
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pcw.md").write_text(text + "\n")
    budgets = [r[0] for r in rows[::2]]
    benchlib.save_plot(args.out / "pcw.png", {"no warm-up": (budgets, [float(r[2]) for r in rows[::2]]),
                                              "pcw": (budgets, [float(r[2]) for r in rows[1::2]])},
                       "cache budget (% of 8-bit expert bytes)", "slice misses per decode token (first 16)", bars=True)
    print(f"\nwrote {args.out / 'pcw.md'} and {args.out / 'pcw.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
