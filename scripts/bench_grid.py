#!/usr/bin/env python3
"""Every AMAT grid's 4-bit and 8-bit halves against gguf-py's stock encodings of the same experts.

Each routed expert of a trained checkpoint is replaced by the reconstruction of one encoding (the
rest of the model stays fp32) and transformers runs it teacher-forced on held-out text; KL and top-1
are against the unmodified fp32 model. The stock rows use gguf-py's own quantize/dequantize (an
implementation independent of ours); the AMAT rows decode the slices this package writes with
gguf-py's Q4_1 dequantizer, so they are what the GGUF holds. Error columns are over all expert
weights: RMS and mean of (reconstruction - weight).

    python scripts/bench_grid.py [--checkpoint DIR] [--windows 24] [--length 128] [-o results/grid.md]

DIR defaults to the embedded model; any trained checkpoint with `heldout.txt` beside it works.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

STOCK = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q8_0": 8.5}   # bits per weight as stored


def stock_round_trip(kind: str):
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]

    def replace(name, weight):
        return gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype).reshape(weight.shape)

    return replace


def amat_round_trip(grid: str, half: str):
    """The GGUF's slices decoded by gguf-py: MSB alone, or MSB + LSB."""
    import gguf

    from slicemoe_gguf import amat

    q4_1 = gguf.GGMLQuantizationType.Q4_1

    def replace(name, weight):
        msb, lsb = amat.slice_blocks(amat.quantize(weight, name=name, grid=grid))
        values = gguf.quants.dequantize(msb, q4_1)
        if half == "8-bit":
            values = values + gguf.quants.dequantize(lsb, q4_1)
        return values.reshape(weight.shape)

    return replace


def main() -> int:
    from slicemoe_gguf import amat

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    benchlib.add_heldout_arguments(parser)
    parser.add_argument("--grids", default=",".join(amat.GRIDS), help="comma-separated AMAT grids")
    parser.add_argument("-o", "--output", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args()

    windows = benchlib.heldout_windows(args.windows, args.length, args.checkpoint)
    reference = benchlib.hf_reference(windows, args.prompt, args.checkpoint)
    rows = []

    def add(label: str, bits: float, replace) -> None:
        errors = []

        def recording(name, weight):
            out = replace(name, weight)
            errors.append((out - weight).astype(np.float64).ravel())
            return out

        logprobs = benchlib.hf_reference(windows, args.prompt, args.checkpoint, replace_experts=recording)
        a = benchlib.agreement(reference, logprobs, windows, args.prompt)
        err = np.concatenate(errors)
        rows.append([label, f"{bits:.1f}", f"{a['kl']:.2e}", f"{100 * a['top1']:.2f}%",
                     f"{np.sqrt((err ** 2).mean()):.3e}", f"{err.mean():+.2e}"])
        print(f"  {label}: KL {a['kl']:.2e}", file=sys.stderr, flush=True)

    for kind, bits in STOCK.items():
        add(f"gguf-py {kind}", bits, stock_round_trip(kind))
    for grid in args.grids.split(","):
        add(f"AMAT {grid}: MSB only", 5.0, amat_round_trip(grid, "msb"))
        add(f"AMAT {grid}: MSB + LSB", 10.0, amat_round_trip(grid, "8-bit"))

    text = "\n".join([
        f"Experts of `{args.checkpoint.name}` replaced by each encoding's reconstruction, transformers fp32 "
        f"otherwise; {len(windows)} held-out windows x {args.length - args.prompt} scored tokens, teacher-forced; "
        f"KL and top-1 against the fp32 model; {benchlib.machine_line()}.", "",
        benchlib.markdown_table(["experts", "bits/weight stored", "KL (nats)", "top-1", "RMS error", "mean error"], rows)])
    benchlib.emit(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
