#!/usr/bin/env python3
"""The expert product with everything resident: the fused one-pass product against ggml's two Q4_1
passes and against stock llama.cpp files, at full size, on compute alone.

Every row runs in its own process on the same forced routing (the side-by-side's widened trace,
bench_side_by_side.widened_route), page cache warm, no memory limit, each row measured in
--rounds alternating rounds (the best round is reported, every round beside it), with a pause
between rows. Rows: stock q8_0 and Q4_K_M (llama.cpp's own kernels, repacked where ggml repacks), the
AMAT file without a cache at 8 and 4 bits, dbsc and lru4 with a budget of 100% of the expert bytes;
the 8-bit AMAT rows twice, fused and with SLICEMOE_PRODUCT=ggml (ggml's two mul_mat_id passes).

Then a kernel microbenchmark at the published expert shapes: one expert's product (fused 8-bit, MSB
only) against ggml's own product of the same weights in Q8_0, Q4_0 and Q4_K (quantized by ggml,
repacked where llama.cpp repacks them), for one token and a 32-token ubatch, one thread, with the
ratios the targets are stated in; and every kernel of ours (scalar, AVX2, AVX512-VNNI, NEON) in GB/s.
`--skip-models` runs only that part (no model files needed).

    python scripts/bench_product.py --amat /data/olmoe-amat.gguf --stock /data/olmoe-q8_0.gguf \\
        --stock /data/olmoe-q4_k_m.gguf --trace /data/olmoe-route.jsonl -o results/product.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from benchlib import emit, machine_line, markdown_table  # noqa: E402

# (name, expert width, hidden size) of the published models' routed experts
SHAPES = (("OLMoE-1B-7B", 1024, 2048), ("Qwen1.5-MoE-A2.7B", 1408, 2048), ("Qwen3-30B-A3B", 768, 2048),
          ("DeepSeek-V2-Lite", 1408, 2048), ("Mixtral-8x7B", 14336, 4096))


def rows(amats: list[Path], stock: list[Path]) -> list[tuple[str, dict, dict]]:
    """(row name, child config, environment) of every configuration. The first sliced file gets
    every row; a further one (e.g. the same experts with another --dense-type) the fused rows only,
    named by its file."""
    from slicemoe_gguf.model_info import describe

    fused, two_pass = {}, {"SLICEMOE_PRODUCT": "ggml"}
    out = [(f"stock {path.stem}", {"model": str(path)}, fused) for path in stock]
    for index, amat in enumerate(amats):
        info = describe(amat)
        everything = sum(layer["msb_bytes_per_expert"] + layer["lsb_bytes_per_expert"] for layer in info["layers"]) \
            * info["n_experts"]
        cached = {"model": str(amat), "cache_budget": everything, "warmup": "none"}
        mine = [("AMAT 8-bit, no cache (fused)", {"model": str(amat), "precision": "high"}, fused),
                ("AMAT 8-bit, no cache (ggml x2)", {"model": str(amat), "precision": "high"}, two_pass),
                ("AMAT 4-bit, no cache", {"model": str(amat), "precision": "low"}, fused),
                ("dbsc @ 100% (fused)", {**cached, "policy": "dbsc"}, fused),
                ("dbsc @ 100% (ggml x2)", {**cached, "policy": "dbsc"}, two_pass),
                ("lru8 @ 100% (fused)", {**cached, "policy": "lru8"}, fused),
                ("lru4 @ 100%", {**cached, "policy": "lru4"}, fused)]
        if index == 0:
            out += mine
        else:
            out += [(f"{amat.stem}: {name}", config, env) for name, config, env in mine if env is fused]
    return out


def fixed_precision_ratios(configs: list, best: dict, least_cpu: dict) -> str:
    """A cache at a fixed precision against the same file without one (the "one pass" issue's 1.05x),
    by the best round's wall time and by CPU time (both threads' user + system: a cache's own work
    adds to it, and it moves less than the wall clock with the neighbours of a shared machine)."""
    lines = ["Fixed precision against the same file without a cache (best round; CPU ms/token):"]
    for cached, plain in (("lru8 @ 100% (fused)", "AMAT 8-bit, no cache (fused)"), ("lru4 @ 100%", "AMAT 4-bit, no cache")):
        for prefix in sorted({name[:-len(cached)] for name, _, _ in configs if name.endswith(cached)}):
            a, b = prefix + cached, prefix + plain
            if "decode_ms" in best.get(a, {}) and "decode_ms" in best.get(b, {}):
                lines.append(f"- {a} / {b}: {best[a]['decode_ms'] / best[b]['decode_ms']:.2f}x wall, "
                             f"{least_cpu[a] / least_cpu[b]:.2f}x CPU")
    return "\n".join(lines)


def warm(path: Path) -> None:
    """Read the file through once, so that the row finds it in the page cache as the table says
    (after a row with GiB of pools, part of the next row's file has been evicted, and re-reading
    it by page faults would be counted as that row's compute)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


def run_child(config: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_side_by_side.py"), "--child", json.dumps(config)],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=3600)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kernel_table(repeats: int) -> str:
    """Every kernel of ours on one expert and one token, in GB/s of the slice bytes it reads."""
    from slicemoe_gguf import amat, kernels

    rng = np.random.default_rng(0)
    table = []
    for name, n_ff, n_embd in SHAPES:
        for label, n_out, n_in in (("gate/up", n_ff, n_embd), ("down", n_embd, n_ff)):
            w = rng.standard_normal((n_out, n_in)).astype(np.float32) * np.float32(0.02)
            msb, lsb = amat.slice_blocks(amat.quantize(w, grid="paper"))   # the grid changes no byte count
            x = rng.standard_normal((1, n_in)).astype(np.float32)
            cells = [name, label, f"{n_out} x {n_in}"]
            for kernel in kernels.available():
                for high in (True, False):
                    _, best = kernels.time_expert_product(msb, lsb if high else None, x, kernel, repeats)
                    nbytes = msb.nbytes + (lsb.nbytes if high else 0)
                    cells.append(f"{nbytes / best / 1e9:.1f}")
            table.append(cells)
    header = ["model", "projection", "rows x columns"]
    header += [f"{kernel} {bits} (GB/s)" for kernel in kernels.available() for bits in ("8-bit", "MSB")]
    return markdown_table(header, table)


STOCK_TYPES = ("Q8_0", "Q4_0", "Q4_K")


def versus_ggml_table(repeats: int, batches: tuple[int, ...] = (1, 32)) -> str:
    """Ours (the best kernel) against ggml's own product of the same weights and activations in
    Q8_0, Q4_0 and Q4_K (repacked where ggml repacks them, as llama.cpp loads a stock file), one
    thread: microseconds per call, and the ratios the targets are stated in."""
    from slicemoe_gguf import amat, kernels

    rng = np.random.default_rng(1)
    table = []
    for name, n_ff, n_embd in SHAPES:
        for label, n_out, n_in in (("gate/up", n_ff, n_embd), ("down", n_embd, n_ff)):
            w = rng.standard_normal((n_out, n_in)).astype(np.float32) * np.float32(0.02)
            msb, lsb = amat.slice_blocks(amat.quantize(w, grid="paper"))
            for n_tokens in batches:
                x = rng.standard_normal((n_tokens, n_in)).astype(np.float32)
                _, high = kernels.time_expert_product(msb, lsb, x, "auto", repeats)
                _, low = kernels.time_expert_product(msb, None, x, "auto", repeats)
                stock = {}
                for ggml_type in STOCK_TYPES:
                    if n_in % (256 if ggml_type.endswith("_K") else 32):
                        continue   # llama.cpp stores such a tensor in another type
                    _, seconds, repacked = kernels.time_ggml_product(w, x, ggml_type, repeats)
                    stock[ggml_type] = (seconds, repacked)
                four_bit = "Q4_K" if "Q4_K" in stock else "Q4_0"
                cells = [name, label, f"{n_out} x {n_in}", str(n_tokens),
                         f"{high * 1e6:.0f} ({(msb.nbytes + lsb.nbytes) / high / 1e9:.1f} GB/s)",
                         f"{low * 1e6:.0f} ({msb.nbytes / low / 1e9:.1f} GB/s)"]
                cells += [f"{stock[t][0] * 1e6:.0f}{' r' if stock[t][1] else ''}" if t in stock else "-"
                          for t in STOCK_TYPES]
                cells += [f"{high / stock['Q8_0'][0]:.2f}x", f"{low / stock[four_bit][0]:.2f}x ({four_bit})"]
                table.append(cells)
    header = ["model", "projection", "rows x columns", "tokens", "ours 8-bit (us)", "ours MSB (us)"]
    header += [f"ggml {t} (us)" for t in STOCK_TYPES] + ["8-bit / Q8_0", "MSB / stock 4-bit"]
    return markdown_table(header, table)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--amat", type=Path, action="append", default=[],
                    help="the sliced (AMAT) full-size GGUF; repeat for the same experts in another file "
                         "(e.g. --dense-type q4_k_m), which gets the fused rows")
    ap.add_argument("--stock", type=Path, action="append", default=[], help="a stock GGUF of the same model (repeatable)")
    ap.add_argument("--trace", type=Path, help="route trace (bench_side_by_side's widened routing)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds over all rows (default 2)")
    ap.add_argument("--settle", type=float, default=10.0,
                    help="seconds between rows (default 10): the kernel is still freeing the last row's GiB of "
                         "pools when the next starts, and the first row after one runs up to 1.8x slower")
    ap.add_argument("--kernel-repeats", type=int, default=20)
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="only the rows whose name contains TEXT (repeatable), e.g. --only stock --only lru4")
    ap.add_argument("--skip-models", action="store_true", help="only the kernel microbenchmark")
    ap.add_argument("--skip-kernels", action="store_true", help="only the full-size rows")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    if not args.skip_models and not (args.amat and args.trace):
        ap.error("--amat and --trace are needed unless --skip-models")

    report = [f"# The expert product, everything resident\n\n{machine_line()}, {args.threads} threads.\n"]
    if not args.skip_models:
        configs = [row for row in rows(args.amat, args.stock)
                   if not args.only or any(text in row[0] for text in args.only)]
        best: dict[str, dict] = {}
        least_cpu: dict[str, float] = {}
        every: dict[str, list[str]] = {name: [] for name, _, _ in configs}
        for round_index in range(args.rounds):
            for name, config, env in configs:
                time.sleep(args.settle)
                warm(Path(config["model"]))
                result = run_child({**config, "trace": str(args.trace), "threads": args.threads}, env)
                every[name].append(f"{result['decode_ms']:.0f}" if "decode_ms" in result else "error")
                print(f"round {round_index + 1}: {name}: {result.get('decode_ms', result.get('error'))}", file=sys.stderr)
                if "cpu_ms" in result:
                    least_cpu[name] = min(least_cpu.get(name, float("inf")), result["cpu_ms"])
                if "error" in result:
                    best.setdefault(name, result)
                elif result["decode_ms"] < best.get(name, {}).get("decode_ms", float("inf")):
                    best[name] = result
        q8 = next((r["decode_ms"] for n, r in best.items() if "q8_0" in n.lower() and "decode_ms" in r), None)
        q4km = next((r["decode_ms"] for n, r in best.items() if "q4_k_m" in n.lower() and "decode_ms" in r), None)
        table = []
        for name, _, _ in configs:
            r = best[name]
            if "error" in r:
                table.append([name, r["error"], "", "", "", "", "", " / ".join(every[name])])
                continue
            table.append([name, f"{r['decode_ms']:.1f}", f"{least_cpu[name]:.1f}", f"{r['ttft_ms']:.0f}",
                          f"{r['decode_ms'] / q8:.2f}x" if q8 else "",
                          f"{r['decode_ms'] / q4km:.2f}x" if q4km else "", f"{r['read_per_token'] / 1e6:.1f}",
                          " / ".join(every[name])])
        report.append(f"Full size: {', '.join(path.name for path in args.amat)}, routing forced from {args.trace.name}, page cache warm, "
                      f"best of {args.rounds} alternating rounds.\n")
        report.append(markdown_table(["configuration", "decode ms/token", "CPU ms/token", "prefill ms", "vs stock q8_0",
                                      "vs stock Q4_K_M", "read from disk (MB/token)", "every round (ms/token)"], table))
        report.append("\n" + fixed_precision_ratios(configs, best, least_cpu))
        report.append("\nA nonzero read column means the page cache did not hold that row's file: its time "
                      "includes disk reads.")
    if args.skip_kernels:
        emit("\n".join(report) + "\n", args.output)
        return 0
    report.append("\n## Kernels against ggml's: one expert\n\nBest of "
                  f"{args.kernel_repeats}, one thread, timed inside the library (activation quantization "
                  "included on both sides); ggml's weights quantized by ggml and loaded as llama.cpp loads a "
                  "stock file (r: repacked). A 32-token row is a prefill ubatch's product.\n")
    report.append(versus_ggml_table(args.kernel_repeats))
    report.append("\n## Every kernel of ours: one expert, one token\n\nGB/s of the slice bytes read, best of "
                  f"{args.kernel_repeats}, one thread.\n")
    report.append(kernel_table(args.kernel_repeats))
    emit("\n".join(report) + "\n", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
