#!/usr/bin/env python3
"""What a prompt at 4 bits costs in accuracy: dbsc + pcw with its prompts at 8 bits (the default)
and with --low-precision-prompt (every prompt row on the MSB slices but the last), against the fp32
model on held-out text of a trained checkpoint, teacher-forced.

For each prompt length: the KL of the first token's distribution (the one the prompt's last row
gives), the KL and top-1 over the continuation, and the continuation's top-1 against the 8-bit
prompt's run; the 4-bit model (every use at 4 bits) is the scale. The arithmetic does not depend on
the budget (the cache changes where slices come from, not what is computed), so one budget runs.
What the 4-bit prompt saves is time to the first token at full size: scripts/bench_side_by_side.py's
"dbsc + pcw + 4-bit prompt" row against "dbsc + pcw".

    python scripts/bench_prompt.py [--checkpoint DIR] [--windows 24] [--prompts 32,96] [--scored 64] [-o out.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


def main() -> int:
    from slicemoe_gguf.embedded import EMBEDDED_CHECKPOINT, embedded_gguf
    from slicemoe_gguf.model_info import describe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=EMBEDDED_CHECKPOINT,
                        help="trained HF checkpoint with heldout.txt (default: the embedded model)")
    parser.add_argument("--gguf", type=Path, help="its sliced GGUF (default: converted with the converter's defaults)")
    parser.add_argument("--windows", type=int, default=24, help="held-out windows per prompt length (default 24)")
    parser.add_argument("--prompts", default="32,96", help="prompt lengths in tokens (default 32,96)")
    parser.add_argument("--scored", type=int, default=64, help="continuation tokens scored after each prompt (default 64)")
    parser.add_argument("--budget", type=int, default=50, help="percent of the expert slice bytes (default 50)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path, help="also write the report here (markdown)")
    args = parser.parse_args()

    if args.gguf:
        gguf = args.gguf
    elif args.checkpoint == EMBEDDED_CHECKPOINT:
        gguf = embedded_gguf(progress=False)
    else:
        import tempfile

        from slicemoe_convert.cli import main as convert_main

        gguf = Path(tempfile.mkdtemp(prefix="prompt-")) / f"{args.checkpoint.name}-amat.gguf"
        if convert_main([str(args.checkpoint), "-o", str(gguf), "-q"]) != 0:
            raise SystemExit(f"converting {args.checkpoint} failed")
    info = describe(gguf)
    budget = (info["expert_msb_bytes"] + info["expert_lsb_bytes"]) * args.budget // 100
    settings = {"8-bit prompt (default)": {"cache_budget": budget, "policy": "dbsc", "warmup": "pcw"},
                "4-bit prompt, last row 8-bit": {"cache_budget": budget, "policy": "dbsc", "warmup": "pcw",
                                                 "low_precision_prompt": True},
                "4-bit model (scale)": {"cache_budget": budget, "precision": "low"}}
    rows = []
    for n_prompt in map(int, args.prompts.split(",")):
        windows = benchlib.heldout_windows(args.windows, n_prompt + args.scored, args.checkpoint)
        reference = benchlib.hf_reference(windows, n_prompt, args.checkpoint)
        first_windows = [w[:n_prompt + 1] for w in windows]
        runs = {}
        for name, kwargs in settings.items():
            run = benchlib.engine_run(gguf, windows, n_prompt, threads=args.threads, **kwargs)
            runs[name] = run
            first = benchlib.agreement([r[:1] for r in reference], [lp[:1] for lp in run.logprobs], first_windows,
                                       n_prompt)
            rest = benchlib.agreement([r[1:] for r in reference], [lp[1:] for lp in run.logprobs],
                                      [w[:n_prompt] + w[n_prompt + 1:] for w in windows], n_prompt)
            eight = next(iter(runs.values()))
            vs_eight = benchlib.agreement(eight.logprobs, run.logprobs, windows, n_prompt)["top1"]
            rows.append([str(n_prompt), name, f"{first['kl']:.2e}", f"{100 * first['top1']:.1f}%", f"{rest['kl']:.2e}",
                         f"{100 * rest['top1']:.2f}%", f"{100 * vs_eight:.2f}%"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    report = "\n".join([
        f"A prompt at 4 bits against one at 8: `{args.checkpoint.name}`, {args.windows} held-out windows per prompt "
        f"length, teacher-forced, dbsc + pcw at {args.budget}% of the expert bytes (the arithmetic is the same at "
        f"every budget); KL (nats) and top-1 against transformers fp32; {benchlib.machine_line()}.", "",
        benchlib.markdown_table(["prompt tokens", "prompt", "first token KL", "first token top-1",
                                 f"next {args.scored - 1} tokens KL", "their top-1", "top-1 vs the 8-bit prompt"],
                                rows)])
    benchlib.emit(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
