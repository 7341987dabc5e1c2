#!/usr/bin/env python3
"""Every policy against the offline optimum, and the 8-bit rule against KL, on held-out routing.

For a sliced GGUF and held-out text (default: the embedded model and its held-out plays):

1. records the model's routing, teacher-forced on held-out windows (prefill, then one decode
   step per token), as `slicemoe trace` would;
2. at 25%, 50% and 75% of the slice bytes, replays it through every policy and prints each one's
   flash bytes per token, as a ratio to lru8 and to the offline optimum of the demand it serves
   (`slicemoe sim --policy optimal`: exact, the slices being of one size);
3. for each 8-bit rule (dbsc's weight threshold, DyMoE's rank schedule), measures the share of
   8-bit uses, KL and top-1 agreement against the 8-bit model on the same windows (the rule runs
   at the 50% budget), and dbsc's flash bytes at 50%.

    python scripts/bench_optimum.py [--model M.gguf --text heldout.txt] [--windows 24] [-o out.md]

Replays are deterministic; the accuracy runs are the engine itself (2 threads).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from slicemoe_gguf import Model, accuracy, defaults
from slicemoe_gguf import trace as traces
from slicemoe_gguf.embedded import EMBEDDED_CHECKPOINT, embedded_gguf
from slicemoe_gguf.model_info import describe
from slicemoe_gguf.optimum import compare, optimum

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import emit, machine_line, markdown_table  # noqa: E402

FRACTIONS = (0.25, 0.5, 0.75)
THRESHOLDS = (0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 1.0)   # 1: the top-ranked use only (weights < 1)
DYMOE_RATIOS = (0.5, 0.75, 1.0)


def record(path: Path, windows: list[list[int]]) -> traces.Trace:
    with Model(path, record_trace=True, n_ctx=max(map(len, windows)) + 8, n_threads=2) as model:
        accuracy.teacher_forced(model, windows)
        return model.routing_trace()


def policy_table(trace: traces.Trace) -> tuple[str, dict]:
    total = traces.total_slice_bytes(trace)
    rows, summary = [], {}
    for fraction in FRACTIONS:
        result = compare(trace, int(total * fraction), dict(defaults.CACHE_SETTINGS))
        tokens = result["optima"]["auto"]["decode_tokens"]
        by_policy = {row["policy"]: row for row in result["policies"]}
        lru8 = by_policy["lru8"]["flash_bytes"]
        for row in result["policies"]:
            own = "-" if row["vs_own_optimum"] is None else f"{row['vs_own_optimum']:.2f}"
            rows.append([f"{fraction:.0%}", row["policy"], f"{row['flash_bytes'] / tokens / 1024:.1f}",
                         f"{row['flash_bytes'] / lru8:.3f}", own, f"{row['vs_reference']:.2f}"])
        # PCW's warm-up reads what the prompt used, some of which decode does not: dbsc without it
        bare = traces.replay(trace, budget=int(total * fraction), policy="dbsc", warmup="none")["flash_bytes"]
        rows.append([f"{fraction:.0%}", "dbsc, warm-up none", f"{bare / tokens / 1024:.1f}", f"{bare / lru8:.3f}",
                     f"{bare / result['optima']['auto']['lower']:.2f}", f"{bare / result['optima']['auto']['lower']:.2f}"])
        # the optimum of a cache with the engine's structure: each layer its own equal share
        n_layers = int(trace.header["n_layers"])
        per_layer = sum(optimum(traces.layer_trace(trace, layer), int(total * fraction) // n_layers).bytes
                        for layer in range(n_layers))
        summary[fraction] = {"dbsc_vs_lru8": by_policy["dbsc"]["flash_bytes"] / lru8,
                             "dbsc_vs_optimum": by_policy["dbsc"]["vs_own_optimum"],
                             "optimum_kib": result["optima"]["auto"]["lower"] / tokens / 1024,
                             "per_layer_vs_global": per_layer / result["optima"]["auto"]["lower"],
                             "bare_vs_per_layer": bare / per_layer}
    header = ["budget", "policy", "flash KiB/token", "x lru8", "x optimum (own demand)", "x optimum (dbsc's demand)"]
    return markdown_table(header, rows), summary


def rule_table(path: Path, trace: traces.Trace, windows: list[list[int]]) -> str:
    info = describe(path)
    model_total = info["expert_msb_bytes"] + info["expert_lsb_bytes"]
    half = traces.total_slice_bytes(trace) // 2
    ref = accuracy.reference(path, windows)
    lru8 = traces.replay(trace, budget=half, policy="lru8")["flash_bytes"]
    configs = [(f"dbsc, weight >= {t}" if t < 1 else "dbsc, top-ranked use only",
                {"policy": "dbsc", "high_threshold": t}) for t in THRESHOLDS]
    configs += [(f"dymoe, rank schedule {r}", {"policy": "dymoe", "high_ratio": r}) for r in DYMOE_RATIOS]
    configs += [("lru4 (every use 4-bit)", {"policy": "lru4"})]
    rows = []
    for label, settings in configs:
        measured = accuracy.evaluate(path, windows, ref, cache_budget=model_total // 2, n_threads=2, **settings)
        stats = traces.replay(trace, budget=half, **settings)
        rows.append([label, f"{100 * measured.high_share:.1f}%", f"{measured.kl:.4f}", f"{100 * measured.top1:.2f}%",
                     f"{stats['flash_bytes'] / lru8:.3f}"])
    return markdown_table(["8-bit rule", "8-bit uses", "KL vs 8-bit (nats)", "top-1 vs 8-bit", "flash x lru8 at 50%"],
                          rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a sliced GGUF (default: the embedded model)")
    parser.add_argument("--text", type=Path, help="held-out text (default: the embedded model's held-out plays)")
    parser.add_argument("--windows", type=int, default=24, help="held-out windows of 96 tokens (default 24)")
    parser.add_argument("--trace-out", type=Path, help="also write the recorded trace here")
    parser.add_argument("-o", "--output", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args()
    path = args.model or embedded_gguf(progress=False)
    text = (args.text or EMBEDDED_CHECKPOINT / "heldout.txt").read_text(encoding="utf-8")
    start = time.perf_counter()
    windows = accuracy.heldout_windows(path, text, args.windows)
    trace = record(path, windows)
    if args.trace_out:
        trace.write(args.trace_out)
    info = describe(path)
    policies, summary = policy_table(trace)
    lines = [f"# Policies against the offline optimum: {path.name}", "",
             f"{info['name'] or path.name}: {len(info['layers'])} MoE layers x {info['n_experts']} experts, top-"
             f"{info['top_k']}; {args.windows} held-out windows of {accuracy.WINDOW} tokens ({accuracy.N_PROMPT} prompt, "
             f"teacher-forced), {int((trace.phase == 1).sum() // len(info['layers']))} decode tokens. {machine_line()}",
             "", "## Flash bytes per decode token (replay; default settings: warm-up pcw, threshold 0.25)", "",
             policies, ""]
    for fraction, s in summary.items():
        lines.append(f"- {fraction:.0%}: dbsc reads {s['dbsc_vs_lru8']:.3f}x lru8 and {s['dbsc_vs_optimum']:.2f}x the "
                     f"optimum ({s['optimum_kib']:.1f} KiB/token). The optimum with the engine's structure (each "
                     f"layer its own equal share of the budget) reads {s['per_layer_vs_global']:.2f}x the global one; "
                     f"dbsc without warm-up reads {s['bare_vs_per_layer']:.2f}x that per-layer optimum")
    lines += ["", "## The 8-bit rule against accuracy (engine, 50% budget)", "", rule_table(path, trace, windows), "",
              f"({time.perf_counter() - start:.0f} s)"]
    report = "\n".join(lines) + "\n"
    emit(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
