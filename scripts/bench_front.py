#!/usr/bin/env python3
"""The accuracy half of the accuracy-speed front: every configuration a user could run instead,
against the fp32 model, on held-out text of a trained checkpoint.

- Stock files, made as users make them: the checkpoint converted to f16 (`slicemoe-convert
  --experts f16 --dense-type f16`), then llama.cpp's own quantizer (llama_model_quantize, in our
  library) to Q4_0, Q4_K_M, Q5_K_M, Q6_K and Q8_0. K-quants need rows that are multiples of 256: on
  a model whose rows are not, llama.cpp falls back to other types and the rows say so.
- Experts only: transformers fp32 with each routed expert replaced by what a file holds, decoded by
  gguf-py (the stock files' expert tensors in whatever type the quantizer chose; the AMAT file's MSB
  slice alone and MSB + LSB), so encodings are compared without the dense tensors or the engine.
- Whole files through the engine, teacher-forced: the stock files as users run them, and the AMAT
  file (searched grid, dense q8_0: the converter's defaults) all-resident at 4 and 8 bits and under
  a RAM budget of 25/50/75/100% of its expert bytes with lru4, lru8, dbsc at its thresholds (--thresholds)
  and dbsc with its LSB misses read in the background (--lsb-background) and with its prompts at 4 bits
  (--low-precision-prompt: the cost shows with a longer --prompt, whose tokens are not scored).
  Budgeted rows also give the slice reads per token (the flash traffic a device would see).
- The same slices with the dense tensors of a stock file (`--dense-type q4_k_m` and `q5_k_m`: llama.cpp's
  own mix for them), whole files all resident at 4 and 8 bits and dbsc at 50%: what a sliced file
  costs in accuracy when its dense part is as small as the stock file's.

    python scripts/bench_front.py [--checkpoint DIR] [--windows 24] [--length 128] [--thresholds 0.1,0.25,0.5] [-o results/front.md]
                                  [--json front.json]

The speed half (decode ms/token at full size under the same RAM limit, trace-driven) is
scripts/bench_side_by_side.py; this script's ms/token is the small model's, all in RAM.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

STOCK = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
BUDGETS = (25, 50, 75, 100)
THRESHOLDS = (0.1, 0.25, 0.5)
DENSE_MIXES = ("q4_k_m", "q5_k_m")


def convert(checkpoint: Path, out: Path, *args: str) -> Path:
    from slicemoe_convert.cli import main as convert_main

    if convert_main([str(checkpoint), "-o", str(out), "-q", "--force", *args]) != 0:
        raise SystemExit(f"converting {checkpoint} failed")
    return out


def expert_tensors(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    """{gguf name: (float32 values [n_expert, n_out, n_in], type name)} of a file's routed experts."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(path).tensors:
        if "_exps." in t.name:
            shape = tuple(int(d) for d in reversed(t.shape))
            out[t.name] = (gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape), t.tensor_type.name)
    return out


def replace_from(tensors: dict, with_lsb: bool):
    """replace_experts for benchlib.hf_reference: HF expert parameters from a file's tensors."""
    def experts(layer: int, proj: str) -> np.ndarray:
        w = tensors[f"blk.{layer}.ffn_{proj}_exps.weight"][0]
        if with_lsb:
            w = w + tensors[f"blk.{layer}.ffn_{proj}_exps.lsb"][0]
        return w

    def replace(name: str, weight: np.ndarray) -> np.ndarray:
        layer = int(name.split(".layers.")[1].split(".")[0])
        if name.endswith("experts.gate_up_proj"):
            return np.concatenate([experts(layer, "gate"), experts(layer, "up")], axis=1)
        if name.endswith("experts.down_proj"):
            return experts(layer, "down")
        raise ValueError(f"unexpected expert parameter {name}")

    return replace


def main() -> int:
    from slicemoe_gguf.model_info import describe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    benchlib.add_heldout_arguments(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="where the GGUFs go (default: a temporary directory)")
    parser.add_argument("-o", "--output", type=Path, help="also write the report here (markdown)")
    parser.add_argument("--thresholds", default=",".join(f"{t:g}" for t in THRESHOLDS),
                        help="dbsc's 8-bit thresholds under each budget (comma-separated; default %(default)s); the "
                             "front's run takes every one `slicemoe plan` may choose (slicemoe_gguf.trace.THRESHOLDS), "
                             "so that plan's answer at full size has its accuracy here")
    parser.add_argument("--json", type=Path,
                        help="also write each whole-file and budgeted row's KL and top-1 here, named as "
                             "bench_side_by_side.py names the same configuration (scripts/plot_front.py joins them)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="front-"))
    work.mkdir(parents=True, exist_ok=True)
    name = args.checkpoint.name
    f16 = convert(args.checkpoint, work / f"{name}-f16.gguf", "--experts", "f16", "--dense-type", "f16")
    stock = {t: benchlib.llama_quantize(f16, work / f"{name}-{t}.gguf", t, args.threads) for t in STOCK}
    sliced = convert(args.checkpoint, work / f"{name}-amat.gguf")
    mixed = {mix: convert(args.checkpoint, work / f"{name}-amat-dense-{mix}.gguf", "--dense-type", mix)
             for mix in DENSE_MIXES}
    info = describe(sliced)
    expert_bytes = info["expert_msb_bytes"] + info["expert_lsb_bytes"]
    n_weights = expert_bytes / 2 / 20 * 32   # two Q4_1 slices of 20 bytes per 32 weights

    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    windows = benchlib.heldout_windows(args.windows, args.length, args.checkpoint)
    reference = benchlib.hf_reference(windows, args.prompt, args.checkpoint)

    scores: dict = {"model": name, "windows": len(windows), "scored_tokens": args.length - args.prompt,
                    "machine": benchlib.machine_line(), "files": {}, "budgets": {}}

    def score(logprobs, key: tuple | None = None, stats: dict | None = None) -> list[str]:
        a = benchlib.agreement(reference, logprobs, windows, args.prompt)
        if key:   # (section, [budget,] configuration as bench_side_by_side.py names it)
            section = scores[key[0]] if len(key) == 2 else scores[key[0]].setdefault(key[1], {})
            section[key[-1]] = {"kl": float(a["kl"]), "top1": float(a["top1"])}
            if stats:   # the share the side-by-side's --match-shares runs the same configuration at
                section[key[-1]]["high_share"] = benchlib.high_share(stats)
        return [f"{a['kl']:.2e}", f"{100 * a['top1']:.2f}%"]

    experts_rows = []
    for t, path in stock.items():
        tensors = expert_tensors(path)
        types = ", ".join(sorted({v[1] for v in tensors.values()}))
        bits = 8 * describe(path)["expert_msb_bytes"] / n_weights   # a stock file's expert tensors
        experts_rows.append([f"llama.cpp {t}", types, f"{bits:.2f}",
                             *score(benchlib.hf_reference(windows, args.prompt, args.checkpoint,
                                                          replace_experts=replace_from(tensors, False)))])
        print(f"  experts {t}: {experts_rows[-1][3]}", file=sys.stderr, flush=True)
    tensors = expert_tensors(sliced)
    for label, with_lsb, bits in (("AMAT MSB only (4-bit)", False, 5.0), ("AMAT MSB + LSB (8-bit)", True, 10.0)):
        experts_rows.append([label, "Q4_1 slices", f"{bits:.2f}",
                             *score(benchlib.hf_reference(windows, args.prompt, args.checkpoint,
                                                          replace_experts=replace_from(tensors, with_lsb)))])

    eight_bit: list = []   # the AMAT file's 8-bit model, the reference a cache's own loss is measured by

    def engine_row(label: str, path: Path, key: tuple | None = None, **kwargs) -> list[str]:
        run = benchlib.engine_run(path, windows, args.prompt, threads=args.threads, **kwargs)
        row = [label, *score(run.logprobs, key, run.stats), f"{run.ms_per_token:.2f}"]
        if kwargs.get("precision") == "high" and not eight_bit:
            eight_bit.extend(run.logprobs)
        if eight_bit and kwargs.get("cache_budget"):
            row.append(f"{100 * benchlib.agreement(eight_bit, run.logprobs, windows, args.prompt)['top1']:.2f}%")
        if run.stats:
            tokens = max(run.stats["decode_tokens"], 1)
            uses = max(run.stats["high_uses"] + run.stats["low_uses"], 1)
            row += [f"{run.stats['flash_bytes'] / tokens / 1e3:.1f}", f"{100 * run.stats['high_uses'] / uses:.0f}%"]
        else:
            row += ["-", "-"]
        print(f"  {label}: KL {row[1]}", file=sys.stderr, flush=True)
        return row

    file_rows = [engine_row(f"llama.cpp {t} (whole file, {describe(p)['file_bytes'] / 2**20:.1f} MiB)", p,
                            key=("files", side_by_side_stock_name(t)))
                 for t, p in stock.items()]
    file_rows.append(engine_row("AMAT 4-bit, all resident", sliced, precision="low"))
    file_rows.append(engine_row("AMAT 8-bit, all resident", sliced, precision="high"))
    for mix, path in mixed.items():
        size = f"{describe(path)['file_bytes'] / 2**20:.1f} MiB"
        file_rows.append(engine_row(f"AMAT 4-bit, dense {mix.upper()} ({size})", path, precision="low"))
        file_rows.append(engine_row(f"AMAT 8-bit, dense {mix.upper()}", path, precision="high"))
    budget_rows = []
    for b in BUDGETS:
        budget = expert_bytes * b // 100
        for policy, side_name in (("lru4", "lru4 + pcw"), ("lru8", "lru8")):
            budget_rows.append([f"{b}%", *engine_row(policy, sliced, key=("budgets", str(b), side_name),
                                                      cache_budget=budget, policy=policy)])
        for threshold in thresholds:
            budget_rows.append([f"{b}%", *engine_row(f"dbsc + pcw, threshold {threshold:g}", sliced,
                                                      key=("budgets", str(b), benchlib.dbsc_name(threshold)),
                                                      cache_budget=budget, policy="dbsc", warmup="pcw",
                                                      high_threshold=threshold)])
        budget_rows.append([f"{b}%", *engine_row(benchlib.BACKGROUND, sliced,
                                                  key=("budgets", str(b), benchlib.BACKGROUND), cache_budget=budget,
                                                  policy="dbsc", warmup="pcw", lsb_background=True)])
        budget_rows.append([f"{b}%", *engine_row(benchlib.LOW_PROMPT, sliced,
                                                  key=("budgets", str(b), benchlib.LOW_PROMPT), cache_budget=budget,
                                                  policy="dbsc", warmup="pcw", low_precision_prompt=True)])
    for mix, path in mixed.items():
        budget_rows.append(["50%", *engine_row(f"dbsc + pcw, dense {mix.upper()}", path,
                                               key=("budgets", "50", f"dbsc + pcw, dense {mix.upper()}"),
                                               cache_budget=expert_bytes // 2, policy="dbsc", warmup="pcw")])

    report = "\n".join([
        f"Accuracy front of `{name}` ({info['n_experts']} experts, top-{info['top_k']}); {len(windows)} held-out "
        f"windows x {args.length - args.prompt} scored tokens, teacher-forced; KL and top-1 against transformers "
        f"fp32; {benchlib.machine_line()}.", "",
        "Experts only (the rest of the model fp32):", "",
        benchlib.markdown_table(["experts", "tensor types", "bits/weight", "KL (nats)", "top-1"], experts_rows), "",
        "Whole files through the engine, every expert in RAM (ms/token: this small model on this machine):", "",
        benchlib.markdown_table(["file", "KL (nats)", "top-1", "ms/token", "flash kB/token", "8-bit uses"], file_rows),
        "", f"The AMAT file under a RAM budget (percent of its {expert_bytes / 2**20:.1f} MiB of expert slices):", "",
        benchlib.markdown_table(["budget", "policy", "KL (nats)", "top-1", "ms/token", "top-1 vs 8-bit",
                                 "flash kB/token", "8-bit uses"], budget_rows)])
    benchlib.emit(report, args.output)
    if args.json:
        args.json.write_text(json.dumps(scores, indent=1) + "\n")
    return 0


def side_by_side_stock_name(file_type: str) -> str:
    """A stock file's row name in bench_side_by_side.py (its q8_0 file is the converter's, lower case)."""
    return "stock q8_0 (mmap)" if file_type == "Q8_0" else f"stock {file_type} (mmap)"


if __name__ == "__main__":
    sys.exit(main())
