#!/usr/bin/env python3
"""Held-out accuracy of the embedded trained model under every encoding of its experts.

Perplexity, KL(fp32 || row) and top-1 agreement on the same held-out windows (plays the model never
saw), teacher-forced:

- fp32: transformers on the checkpoint (the reference).
- AMAT 8-bit, MSB-only 4-bit centred, MSB-only 4-bit plain truncation: transformers with the
  experts replaced by the numpy AMAT reconstructions (slicemoe_gguf.amat), so the formats are compared
  without any engine effect. Plain truncation (lo + 16 s h, no half-step centring) exists only here:
  the GGUF stores the centred MSB slice.
- engine rows: the GGUFs through the native engine: stock Q8_0 experts, AMAT high (8-bit) and low
  (MSB only) with every expert resident, and DBSC at each budget.

    python scripts/bench_accuracy.py [--quick] [--out results/]

Writes accuracy.md and accuracy.png (KL of each row, log scale).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


def amat_reconstruction(kind: str):
    from slicemoe_gguf import amat

    def replace(name, weight):
        g = amat.quantize(weight, name=name)
        if kind == "high":
            return amat.dequantize_high(g)
        return amat.dequantize_msb(g, centred=(kind == "centred"))

    return replace


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 windows of 64 tokens, budgets 25/50%%")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=128, help="tokens per window")
    parser.add_argument("--prompt", type=int, default=8, help="prefill tokens per window (not scored)")
    parser.add_argument("--budgets", default="25,50,75,100", help="percent of the 8-bit expert bytes, for DBSC")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    if args.quick:
        args.windows, args.length, args.budgets = 4, 64, "25,50"

    from slicemoe_gguf.embedded import embedded_gguf
    from slicemoe_gguf.model_info import describe

    amat_gguf, q8 = embedded_gguf(), embedded_gguf(experts="q8_0")
    total = describe(amat_gguf)["expert_msb_bytes"] + describe(amat_gguf)["expert_lsb_bytes"]
    windows = benchlib.heldout_windows(args.windows, args.length)
    reference = benchlib.hf_reference(windows, args.prompt)

    rows = []

    def add(label, logprobs):
        a = benchlib.agreement(reference, logprobs, windows, args.prompt)
        rows.append([label, f"{a['ppl']:.3f}", f"{a['kl']:.2e}", f"{100 * a['top1']:.1f}%"])
        print(f"  {label}: ppl {a['ppl']:.3f}", file=sys.stderr, flush=True)

    add("fp32 (transformers)", reference)
    for kind, label in (("high", "AMAT 8-bit (numpy reconstruction)"),
                        ("centred", "MSB-only 4-bit, centred (numpy)"),
                        ("plain", "MSB-only 4-bit, plain truncation (numpy)")):
        add(label, benchlib.hf_reference(windows, args.prompt, replace_experts=amat_reconstruction(kind)))
    add("engine: stock Q8_0 experts", benchlib.engine_run(q8, windows, args.prompt, threads=args.threads).logprobs)
    add("engine: AMAT 8-bit (high), resident",
        benchlib.engine_run(amat_gguf, windows, args.prompt, threads=args.threads, precision="high").logprobs)
    add("engine: MSB-only 4-bit (low), resident",
        benchlib.engine_run(amat_gguf, windows, args.prompt, threads=args.threads, precision="low").logprobs)
    for b in (int(x) for x in args.budgets.split(",")):
        run = benchlib.engine_run(amat_gguf, windows, args.prompt, threads=args.threads,
                                  cache_budget=total * b // 100, policy="dbsc", warmup="pcw")
        share = run.stats["high_uses"] / max(run.stats["high_uses"] + run.stats["low_uses"], 1)
        add(f"engine: DBSC + PCW @ {b}% ({100 * share:.0f}% of uses 8-bit)", run.logprobs)

    text = "\n".join([
        f"Held-out perplexity of the embedded model: {len(windows)} windows x {args.length - args.prompt} scored "
        f"tokens from plays it never trained on; {benchlib.machine_line()}.", "",
        benchlib.markdown_table(["experts", "perplexity", "KL vs fp32 (nats)", "top-1 vs fp32"], rows)])
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy.md").write_text(text + "\n")
    benchlib.save_plot(args.out / "accuracy.png", {"KL vs fp32": ([r[0] for r in rows[1:]], [float(r[2]) for r in rows[1:]])},
                       "", "KL(fp32 || row), nats", bars=True, log_y=True)
    print(f"\nwrote {args.out / 'accuracy.md'} and {args.out / 'accuracy.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
