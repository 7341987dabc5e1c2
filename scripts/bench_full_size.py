#!/usr/bin/env python3
"""Published MoE models at their full size: write, convert, load and decode under budgets.

For each architecture: a random-weight checkpoint with the published shapes (make_full_moe.py,
streamed, bf16), converted sliced (AMAT) and stock (--experts q8_0); then `slicemoe run` on each
with the page cache dropped before every configuration: the stock file with mmap and no cache, and
the sliced file at 25%, 50% and 100% of its slice bytes. Per configuration: load time, the resident
memory `slicemoe run` states and the measured peak RSS, prefill ms of a 64-token prompt, decode
ms/token and flash MB/token. Random routers route degenerately: this measures what size does to
conversion, loading, memory and reads, not routing quality.

    python scripts/bench_full_size.py --arch olmoe --work /data/full   # about 20 minutes on 2 cores

Each model's files are deleted after it is measured unless --keep (they take 30-60 GB).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

# about 64 tokens with any of the fixtures' tokenizers
PROMPT = ("The old men sat in the shade and told stories about the sea, the wind and the stars. In the "
          "winter the storms came, and the people stayed in their houses by the fire. In the spring the "
          "flowers came back, and the birds sang in the trees of the village by the")
BUDGETS = ["25%", "50%", "100%"]
SCRIPTS = Path(__file__).resolve().parent


def drop_page_cache() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes, stdout) of a command, run under its own Python parent so
    that the peak is this command's alone."""
    wrapper = ("import resource, subprocess, sys\n"
               "proc = subprocess.run(sys.argv[1:])\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(proc.returncode)\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds, int(proc.stderr.strip().splitlines()[-1]) * 1024, proc.stdout


def run_config(model: Path, budget: str | None, threads: int) -> dict:
    dropped = drop_page_cache()
    cmd = ["slicemoe", "run", "-m", str(model), "-p", PROMPT, "-n", "16",
           "--ignore-eos", "--json", "-t", str(threads), "-c", "512"]
    if budget:
        cmd += ["--cache-budget", budget]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    result = json.loads(proc.stdout)
    cache = result.get("cache") or {}
    tokens = max(cache.get("decode_tokens", 0), 1)
    return {"dropped": dropped, "load_ms": result["load_ms"], "n_prompt": result["n_prompt"],
            "prefill_ms": result["prefill_ms"], "decode_ms": result["decode_ms_per_token"],
            "stated": result["memory"]["total_bytes"], "peak_rss": result["memory"]["peak_rss_bytes"],
            "rss_before_load": result["memory"]["rss_before_load_bytes"],
            "anon": result["memory"]["rss_anon_bytes"], "file": result["memory"]["rss_file_bytes"],
            "pool_bytes": cache.get("pool_bytes", 0),
            "flash_mb_per_token": cache.get("flash_bytes", 0) / tokens / 1e6}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def bench(arch: str, work: Path, threads: int, keep: bool) -> list[str]:
    hf = work / f"{arch}-hf"
    sliced, stock = work / f"{arch}-amat.gguf", work / f"{arch}-q8_0.gguf"
    lines = []
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(SCRIPTS / "make_full_moe.py"), arch, str(hf), "-q"], check=True)
    made = time.perf_counter() - t0
    conv = {}
    for out, extra in ((sliced, []), (stock, ["--experts", "q8_0"])):
        seconds, peak, _ = timed(["slicemoe-convert", str(hf), "-o", str(out), "-q", "--force", *extra])
        conv[out] = (seconds, peak)
    source_bytes = du(hf)
    if not keep:
        shutil.rmtree(hf)
    lines.append(f"#### {arch}: {source_bytes / 1e9:.1f} GB of bf16 safetensors (written in {made:.0f} s)")
    lines.append("")
    lines.append("| file | GGUF size | convert wall | convert peak RSS |")
    lines.append("|---|---|---|---|")
    for out, (seconds, peak) in conv.items():
        lines.append(f"| {out.name} | {du(out) / 1e9:.2f} GB | {seconds:.0f} s | {peak / 2**30:.2f} GiB |")
    lines.append("")
    lines.append("| configuration | load | stated resident | RSS after decode: anon + file | peak RSS | pools | "
                 "prefill (64-token prompt) | decode | flash |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    configs = [(stock, None, "stock q8_0, mmap, no cache")] + \
        [(sliced, None, "AMAT, no cache (mapped)")] + [(sliced, b, f"AMAT dbsc + pcw @ {b}") for b in BUDGETS]
    for model, budget, label in configs:
        r = run_config(model, budget, threads)
        if "error" in r:
            lines.append(f"| {label} | error: {r['error']} | | | | | | | |")
            continue
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        lines.append(f"| {label} | {r['load_ms'] / 1000:.1f} s | {gib(r['stated'])} | "
                     f"{gib(r['anon'])} + {gib(r['file'])} | {gib(r['peak_rss'])} | {gib(r['pool_bytes'])} | "
                     f"{r['prefill_ms']:.0f} ms ({r['n_prompt']} tokens) | {r['decode_ms']:.1f} ms/token | "
                     f"{r['flash_mb_per_token']:.1f} MB/token |")
    if not keep:
        sliced.unlink()
        stock.unlink()
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", choices=["olmoe", "qwen2_moe", "deepseek_v2", "mixtral", "qwen3_moe"],
                        help="repeatable; default olmoe and qwen2_moe")
    parser.add_argument("--work", required=True, help="directory for the checkpoints and GGUFs")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and GGUFs")
    parser.add_argument("-o", "--output", help="also write the tables to this markdown file")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lines = [f"Full-size random-weight models, {args.threads} threads, page cache dropped before each run "
             f"(`slicemoe run -c 512 -n 16`); {platform.processor() or platform.machine()}, "
             f"{platform.system()} {platform.release()}; {date.today()}.", ""]
    for arch in args.arch or ["olmoe", "qwen2_moe"]:
        lines += bench(arch, work, args.threads, args.keep) + [""]
        print("\n".join(lines), flush=True)
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
