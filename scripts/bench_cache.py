#!/usr/bin/env python3
"""Decode speed and flash traffic of the slice cache, side by side on one model and one prompt.

The model has OLMoE-1B-7B layer shapes (hidden 2048, 64 experts of 1024, top-8) with random bf16
weights and --layers MoE layers, converted twice: AMAT slices (the cache's input) and plain q8_0
experts (the stock llama.cpp path, our baseline). Rows:

  stock q8_0           stock llama.cpp path, every expert mapped from the file (warm page cache)
  amat low/high, no cache  4-bit (MSB products) / 8-bit AMAT (MSB + LSB products), every expert mapped
  amat low/high, 100%  the slice cache holding (and preloading) every slice: the cache's own overhead
  amat high, B%        whole-expert 8-bit caching (LRU) with B% of the slice bytes (--budgets)
  amat auto, B%        DBSC: precision per use
  amat auto, B%, pcw   DBSC with prefill warm-up

Misses are real reads of the GGUF (pread, then POSIX_FADV_DONTNEED on the range, so the next miss
of that slice reads the device again). Random weights route less predictably than trained ones, so
hit rates here are not a model's; the ratios between rows are the point.

    python scripts/bench_cache.py [--layers 2] [--tokens 32] [--repeat 3] [--budgets 25,50,75] [--keep DIR]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert_rss import make_checkpoint  # noqa: E402

PROMPT = ("Once upon a time there was a small village by the sea, where the fishermen went out every "
          "morning and came back every evening with their boats full of fish.")


def convert(hf: Path, out: Path, experts: str) -> Path:
    if not out.exists():
        # the converter's summary goes to stderr: stdout is this script's tables
        subprocess.run(["slicemoe-convert", str(hf), "-o", str(out), "-q", "--experts", experts], check=True,
                       stdout=sys.stderr)
    return out


def read_through(path: Path) -> None:
    """Read the whole file once so that a run without a cache finds every expert in the page cache
    (the cache's own runs drop the file's pages, which would otherwise bill those runs for reads)."""
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def run(path: Path, n: int, threads: int, repeat: int, **kw) -> dict:
    from slicemoe_gguf import Model

    if not kw.get("cache_budget"):
        read_through(path)
    per_token = []
    with Model(path, n_threads=threads, **kw) as model:
        model.generate(PROMPT, 4, stop_at_eog=False)          # warm-up run (page cache, graph)
        if model.has_cache:
            model.reset_cache_stats()
        for _ in range(repeat):
            result = model.generate(PROMPT, n, stop_at_eog=False)
            per_token.append(result.decode_ms / max(result.n_decode - 1, 1))
        stats = model.cache_stats() or {}
    return {"ms_per_token": statistics.median(per_token),
            "flash_per_token": stats.get("flash_bytes", 0) / max(stats.get("decode_tokens", 0), 1),
            "miss_rate": stats["misses"] / max(stats["hits"] + stats["misses"], 1) if stats else 0.0,
            "pool": stats.get("pool_bytes", 0), "high": stats.get("high_uses", 0), "low": stats.get("low_uses", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; ms/token is their median")
    parser.add_argument("--keep", help="directory for the checkpoint and GGUFs (reused when present)")
    parser.add_argument("--plot", type=Path, help="write ms/token against budget (LRU 8-bit, DBSC, DBSC + PCW) to this PNG")
    parser.add_argument("--budgets", type=lambda t: [int(x) for x in t.split(",")], default=[25, 50, 75],
                        help="cache budgets, percent of the slice bytes (default 25,50,75)")
    args = parser.parse_args()

    from slicemoe_gguf.model_info import describe

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        hf = root / f"olmoe-shapes-{args.layers}"
        if not (hf / "model.safetensors").exists():
            make_checkpoint(hf, args.layers)
        amat = convert(hf, root / f"olmoe-shapes-{args.layers}-amat.gguf", "amat")
        q8 = convert(hf, root / f"olmoe-shapes-{args.layers}-q8_0.gguf", "q8_0")
        info = describe(amat)
        total = info["expert_msb_bytes"] + info["expert_lsb_bytes"]
        rows = [
            ("stock q8_0, no cache", q8, {}),
            ("amat low, no cache", amat, {"precision": "low"}),
            ("amat low, 100%", amat, {"precision": "low", "cache_budget": total}),
            ("amat high, no cache", amat, {"precision": "high"}),
            ("amat high, 100%", amat, {"precision": "high", "cache_budget": total}),
        ]
        for b in args.budgets:
            rows += [(f"amat high, {b}% (LRU 8-bit)", amat,
                      {"precision": "high", "cache_budget": total * b // 100, "warmup": "none"}),
                     (f"amat auto, {b}% (DBSC)", amat,
                      {"precision": "auto", "cache_budget": total * b // 100, "warmup": "none"}),
                     (f"amat auto, {b}% (DBSC + PCW)", amat,
                      {"precision": "auto", "cache_budget": total * b // 100, "warmup": "pcw"})]
        results = {name: run(path, args.tokens, args.threads, args.repeat, **kw) for name, path, kw in rows}

    base = results["stock q8_0, no cache"]["ms_per_token"]
    import benchlib

    print(f"OLMoE-1B-7B shapes, {args.layers} MoE layers, {args.tokens} decode tokens x {args.repeat} runs "
          f"(median ms/token), {args.threads} threads; slice bytes {total / 2**20:.0f} MiB; {benchlib.machine_line()}.")
    print()
    print("| configuration | ms/token | vs stock q8_0 | flash MiB/token | vs LRU 8-bit, same budget | slice miss rate | 8-bit/4-bit uses |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        budget = name.split(", ")[1].split("%")[0] if "% (" in name else None
        lru = results.get(f"amat high, {budget}% (LRU 8-bit)") if budget else None
        flash_ratio = f"{lru['flash_per_token'] / r['flash_per_token']:.2f}x" if lru and r["flash_per_token"] else "-"
        print(f"| {name} | {r['ms_per_token']:.2f} | {r['ms_per_token'] / base:.2f}x | "
              f"{r['flash_per_token'] / 2**20:.2f} | {flash_ratio} | {100 * r['miss_rate']:.1f}% | "
              f"{r['high']}/{r['low']} |")
    print()
    for b in args.budgets:
        lru, dbsc = results[f"amat high, {b}% (LRU 8-bit)"], results[f"amat auto, {b}% (DBSC)"]
        print(f"DBSC vs LRU 8-bit at {b}%: {lru['ms_per_token'] / dbsc['ms_per_token']:.2f}x decode speed, "
              f"{lru['flash_per_token'] / max(dbsc['flash_per_token'], 1):.2f}x less flash traffic")
    if args.plot:
        benchlib.save_plot(args.plot, {label: (args.budgets, [results[f"amat {prec}, {b}% ({label})"]["ms_per_token"]
                                                               for b in args.budgets])
                                       for prec, label in (("high", "LRU 8-bit"), ("auto", "DBSC"), ("auto", "DBSC + PCW"))},
                           "cache budget (% of slice bytes)", "decode ms/token (this machine)")
    for p in ("low", "high"):
        print(f"cache overhead at 100% (amat {p}, cache vs no cache): "
              f"{results[f'amat {p}, 100%']['ms_per_token'] / results[f'amat {p}, no cache']['ms_per_token']:.2f}x")

if __name__ == "__main__":
    main()
