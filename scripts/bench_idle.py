#!/usr/bin/env python3
"""What an idle period under memory pressure does to a decode: pools left to the kernel (swapped
out, then faulted back 4 KiB at a time) against pools handed back before going idle
(Model.release_cache: the next tokens read their slices from the file as misses).

Each variant runs in its own process inside a memory cgroup. It decodes, goes idle (releasing its
pools or not), and while it is idle the cgroup's limit drops to what the process needs without its
pools, as a phone's memory pressure squeezes an idle app; then the limit is lifted and the decode
goes on. Swap is a swap file, or zswap in front of it (compressed in RAM, as Android's zram) with
--zswap. Per variant: ms/token before the idle period, the first token after it and the median of
the rest, what the engine read, and what came back from swap (/proc/vmstat pswpin + zswpin, 4 KiB pages).

    python scripts/bench_idle.py --model /data/olmoe-amat.gguf --zswap   # root: swap, cgroups
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
from bench_side_by_side import MemoryLimit, cold, widened_route  # noqa: E402
from benchlib import emit, machine_line, markdown_table  # noqa: E402

MiB = 1 << 20
ZSWAP = Path("/sys/module/zswap/parameters/enabled")


def vmstat(*names: str) -> int:
    total = 0
    for line in open("/proc/vmstat"):
        key, value = line.split()
        if key in names:
            total += int(value)
    return total


def swapped_in_pages() -> int:
    """Pages brought back from swap: from the swap device, or from zswap's compressed pool."""
    return vmstat("pswpin", "zswpin")


def swapped_out_pages() -> int:
    return vmstat("pswpout", "zswpout")


def child(config: dict) -> None:
    """Decode, go idle (telling the parent on stdout, waiting for its word on stdin), decode on."""
    from slicemoe_gguf import Model, trace as traces

    route = traces.request_route(traces.read(config["trace"]))
    half = route.n_decode // 2
    with Model(config["model"], n_threads=config["threads"], forced_routes=True, n_ctx=512,
               cache_budget=config["budget"], policy="dbsc", warmup="pcw") as model:
        model.force_routes(route.experts, route.weights, n_experts=route.n_experts)
        model.eval([1 + i % 1000 for i in range(route.n_prompt)])
        token = int(np.argmax(model.logits()))

        def decode(n: int) -> list[float]:
            nonlocal token
            times = []
            for _ in range(n):
                t = time.perf_counter()
                model.eval([token])
                times.append(1000 * (time.perf_counter() - t))
                token = int(np.argmax(model.logits()))
            return times

        before = decode(half)
        if config["release"]:
            model.release_cache()
        print("idle", flush=True)
        sys.stdin.readline()
        flash, swapped_in = model.cache_stats()["flash_bytes"], swapped_in_pages()
        after = decode(route.n_decode - half)
        print(json.dumps({"before_ms": float(np.median(before[2:])), "first_ms": after[0],
                          "after_ms": float(np.median(after[1:])),
                          "flash_mb": (model.cache_stats()["flash_bytes"] - flash) / 1e6,
                          "swap_in_mb": (swapped_in_pages() - swapped_in) * 4096 / 1e6}), flush=True)


def run_variant(config: dict, squeeze_to: int, idle_s: float) -> dict:
    cgroup = MemoryLimit(1 << 40)
    try:
        cold()
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(config)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, preexec_fn=cgroup.enter)
        assert proc.stdout.readline().strip() == "idle"
        usage = int((cgroup.path / "memory.usage_in_bytes").read_text())
        limit = cgroup.path / "memory.limit_in_bytes"
        swapped_out = swapped_out_pages()
        try:
            limit.write_text(str(squeeze_to))   # reclaims down to it now: page cache first, then anonymous memory to swap
        except OSError:
            pass   # what could not be reclaimed stays; the limit is then left as it was
        time.sleep(idle_s)
        squeezed = int((cgroup.path / "memory.usage_in_bytes").read_text())
        limit.write_text(str(1 << 40))
        out_mb = (swapped_out_pages() - swapped_out) * 4096 / 1e6
        proc.stdin.write("go\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
        proc.wait(timeout=600)
    finally:
        cgroup.close()
    return dict(result, idle_usage_mib=usage / MiB, squeezed_mib=squeezed / MiB, swap_out_mb=out_mb)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help="a sliced GGUF (full size for meaningful numbers)")
    parser.add_argument("--budget", type=int, default=25, help="percent of the 8-bit expert bytes (default 25)")
    parser.add_argument("--zswap", action="store_true", help="compressed swap in RAM in front of the swap file")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds squeezed (default 2)")
    parser.add_argument("-n", "--n-decode", type=int, default=32, help="decode tokens, half before the idle period")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    if os.geteuid() != 0 or not args.model:
        print("needs root (swap, memory cgroups, dropping the page cache) and --model", file=sys.stderr)
        return 2
    from slicemoe_gguf.memory import plan, routed_expert_bytes
    from slicemoe_gguf.model_info import describe

    budget = routed_expert_bytes(describe(args.model)) * args.budget // 100
    figure = plan(args.model, n_ctx=512, n_batch=512, cache_budget=budget)
    trace = args.model.with_suffix(".route.jsonl")
    widened_route(args.model, args.n_decode, trace)
    swapfile = args.model.parent / "slicemoe-bench.swap"
    subprocess.run(["fallocate", "-l", str(budget + (1 << 30)), str(swapfile)], check=True)
    swapfile.chmod(0o600)
    subprocess.run(["mkswap", str(swapfile)], check=True, capture_output=True)
    subprocess.run(["swapon", str(swapfile)], check=True)
    zswap_was = ZSWAP.read_text().strip() if ZSWAP.exists() else None
    try:
        if args.zswap:
            ZSWAP.write_text("Y")
        # what the process needs without its pools: the rest of the stated figure, its own runtime
        squeeze_to = figure.total_bytes - figure.expert_bytes + 256 * MiB
        rows = []
        base = {"model": str(args.model), "trace": str(trace), "threads": args.threads, "budget": budget}
        for release in (False, True):
            r = run_variant(dict(base, release=release), squeeze_to, args.idle)
            rows.append(["released before idle" if release else "left to the kernel", f"{r['idle_usage_mib']:.0f}",
                         f"{r['squeezed_mib']:.0f}", f"{r['swap_out_mb']:.0f}", f"{r['before_ms']:.1f}",
                         f"{r['first_ms']:.1f}", f"{r['after_ms']:.1f}", f"{r['swap_in_mb']:.1f}", f"{r['flash_mb']:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    finally:
        subprocess.run(["swapoff", str(swapfile)], check=False)
        swapfile.unlink(missing_ok=True)
        if zswap_was is not None:
            ZSWAP.write_text(zswap_was)
    text = "\n".join([
        f"Machine: {machine_line()}. Model: {args.model.name}, dbsc + pcw at {args.budget}% "
        f"({budget / MiB:.0f} MiB of pools); stated figure {figure.describe('pools')}. Swap: a swap file"
        f"{' behind zswap' if args.zswap else ''}. Idle: the cgroup squeezed to {squeeze_to / MiB:.0f} MiB for "
        f"{args.idle:g} s. {args.threads} threads, page cache dropped before each variant.", "",
        markdown_table(["pools", "RSS when idle (MiB)", "squeezed to (MiB)", "swapped out (MB)",
                        "ms/token before", "first token after (ms)", "ms/token after", "swapped in (MB)",
                        "read by the engine after (MB)"], rows)])
    emit(text + "\n", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
