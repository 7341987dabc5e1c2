#!/usr/bin/env python3
"""Full-size side by side under one RAM limit: the slice cache against stock llama.cpp with mmap.

The models are a full-shape checkpoint (scripts/make_full_moe.py) converted sliced (AMAT) and stock
(--experts q8_0), plus a 4-bit stock GGUF that llama.cpp's own quantizer (llama_model_quantize, in
our library) makes from the q8_0 file. Random routers route degenerately, so every run is
trace-driven: the embedded trained model's routing of a real prompt, widened onto the full shape
(slicemoe_gguf.trace.widen: the bigger router is the equal mixture of m copies of the small one)
and forced on every MoE layer (`--route-trace`), so all rows compute and read what real routing asks.

RAM: each configuration runs in its own process inside a memory cgroup (v1 memory.limit_in_bytes,
or v2 memory.max) whose limit is the same for every row of a budget: the dense weights, the budget
(a share of the 8-bit expert bytes, i.e. all AMAT slice bytes), and a fixed headroom for the
runtime, KV cache and compute buffers. The cgroup charges page cache, so stock llama.cpp keeps only
what fits of its mapped experts, as on a device whose RAM is that size. The page cache is dropped
before every run. Before the runs, fio measures the device (O_DIRECT random reads of the model file:
4 KiB and 1 MiB at queue depth 1 and 32, and 1 MiB at depth 8, the depth of the reader threads).

Per row: decode ms/token, time to first token (the prompt's prefill; then the same prompt again
after the decode, as a session's next request finds it), the bytes the first prompt read from the
device (/proc/self/io, its warm-up included), flash MB/token (bytes this
process read from the device during decode, /proc/self/io), the effective read rate, and the
ratio to the row's limit max(compute-only ms/token, flash bytes per token / device bandwidth),
where compute-only is the same configuration with everything resident and the page cache warm.

    python scripts/bench_side_by_side.py --hf /data/olmoe-full --work /data --prefix olmoe -o bench.md  # root
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
from benchlib import (BACKGROUND, LOW_PROMPT, dbsc_name, drop_page_cache, high_share, llama_quantize, machine_line,  # noqa: E402
                      markdown_table, plan_point, threshold_for_share)

PROMPT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
BUDGETS = (25, 50, 75, 100)
# lru4 is the sliced file's 4-bit model (MSB slices only), the like of a stock 4-bit GGUF; look-ahead
# prefetch is off by default (see bench_prefetch.py), its row says what it does at size
CONFIGS = {"lru8": {"policy": "lru8", "warmup": "none"}, "dbsc": {"policy": "dbsc", "warmup": "none"},
           "dbsc + pcw": {"policy": "dbsc", "warmup": "pcw"}, "hobbit + pcw": {"policy": "hobbit", "warmup": "pcw"},
           "lru4 + pcw": {"policy": "lru4", "warmup": "pcw"},
           BACKGROUND: {"policy": "dbsc", "warmup": "pcw", "lsb_background": True},
           LOW_PROMPT: {"policy": "dbsc", "warmup": "pcw", "low_precision_prompt": True},
           "dbsc + pcw + prefetch": {"policy": "dbsc", "warmup": "pcw", "prefetch": True}}
HEADROOM = 768 << 20   # runtime, libraries, KV cache and compute buffers, the same for every row
MiB = 1 << 20


# -- the device -------------------------------------------------------------------------------

def cold() -> None:
    """No dirty page left to write back (it would compete with the reads measured), none cached."""
    os.sync()
    drop_page_cache()


def fio(path: Path, block: str, depth: int, seconds: int = 5) -> float:
    """Random O_DIRECT reads of `path` at one block size and queue depth, page cache dropped: GB/s."""
    import shutil

    if shutil.which("fio") is None:
        raise SystemExit("fio measures the device the rows are stated against; install it (apt-get install fio)")
    cold()
    out = subprocess.run(["fio", "--name=r", f"--filename={path}", "--rw=randread", f"--bs={block}",
                          "--direct=1", "--ioengine=libaio", f"--iodepth={depth}", "--readonly",
                          f"--runtime={seconds}", "--time_based", "--output-format=json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["jobs"][0]["read"]["bw_bytes"] / 1e9


# -- the models -------------------------------------------------------------------------------

def widened_route(amat: Path, n_decode: int, out: Path) -> dict:
    """The embedded model's routing of PROMPT, widened onto the full model's shape, as a trace file."""
    from slicemoe_gguf import Model, trace as traces
    from slicemoe_gguf.embedded import embedded_gguf
    from slicemoe_gguf.model_info import describe

    small = embedded_gguf(progress=False)
    with Model(small, record_trace=True, n_threads=2) as model:
        model.generate(PROMPT, n_decode + 1, stop_at_eog=False)
        recorded = model.routing_trace()
    route = traces.request_route(recorded)
    info = describe(amat)
    wide = traces.widen(route, n_layers=len(info["moe_layers"]), n_experts=info["n_experts"], top_k=info["top_k"])
    layers = info["layers"]
    header = {"format": traces.FORMAT, "version": traces.VERSION, "n_layers": len(info["moe_layers"]),
              "n_experts": info["n_experts"], "top_k": info["top_k"], "moe_layers": info["moe_layers"],
              "slice_bytes": {"msb": layers[0]["msb_bytes_per_expert"], "lsb": layers[0]["lsb_bytes_per_expert"]},
              "model": f"{small.name} widened onto {amat.name}"}
    traces.route_trace(wide, header).write(out)
    return {"n_prompt": wide.n_prompt, "n_decode": wide.n_decode}


# -- one configuration, in a child process ------------------------------------------------------

def read_bytes() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def child(config: dict) -> dict:
    """Load, force the route, prefill, decode; the numbers of one row."""
    from slicemoe_gguf import Model, trace as traces

    route = traces.request_route(traces.read(config["trace"]))
    kwargs = {k: config[k] for k in ("cache_budget", "policy", "warmup", "precision", "prefetch", "high_threshold",
                                     "lsb_background", "low_precision_prompt") if k in config}
    t0 = time.perf_counter()
    with Model(config["model"], n_threads=config["threads"], forced_routes=True, n_ctx=512, **kwargs) as model:
        load_s = time.perf_counter() - t0
        model.force_routes(route.experts, route.weights, n_experts=route.n_experts)
        prompt = [1 + i % 1000 for i in range(route.n_prompt)]
        before_prefill = read_bytes()
        t1 = time.perf_counter()
        model.eval(prompt)
        token = int(np.argmax(model.logits()))
        ttft_ms = 1000 * (time.perf_counter() - t1)
        before_decode = read_bytes()
        model.reset_cache_stats()
        cpu = os.times()
        t2 = time.perf_counter()
        for _ in range(route.n_decode):
            model.eval([token])
            token = int(np.argmax(model.logits()))
        decode_ms = 1000 * (time.perf_counter() - t2) / route.n_decode
        # CPU time of every thread: steadier than the wall clock on a shared machine, and what a
        # cache's own work would add to
        after = os.times()
        cpu_ms = 1000 * (after.user + after.system - cpu.user - cpu.system) / route.n_decode
        decode_read = (read_bytes() - before_decode) / route.n_decode
        stats = model.cache_stats()
        # the same prompt again, as a session's next request: what the first request left in the
        # pools (or, for a stock file, in the page cache) serves it
        model.reset()
        model.force_routes(route.experts, route.weights, n_experts=route.n_experts)
        before_again = read_bytes()
        t3 = time.perf_counter()
        model.eval(prompt)
        again_ms = 1000 * (time.perf_counter() - t3)
        again_read = read_bytes() - before_again
    return {"load_s": load_s, "ttft_ms": ttft_ms, "ttft_again_ms": again_ms, "prefill_again_read": again_read,
            "decode_ms": decode_ms, "cpu_ms": cpu_ms, "read_per_token": decode_read,
            "prefill_read": before_decode - before_prefill,
            "io_ms": stats["io_ms"] / route.n_decode if stats else None,
            "engine_flash_per_token": stats["flash_bytes"] / route.n_decode if stats else None,
            "high_share": high_share(stats) if stats else None}


class MemoryLimit:
    """A memory cgroup (v2 if mounted as such, else v1) that a child process is started in."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.path = None
        if limit is None:
            return
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        root = Path("/sys/fs/cgroup") if v2.exists() else Path("/sys/fs/cgroup/memory")
        self.path = root / f"slicemoe-bench-{os.getpid()}"
        self.path.mkdir(exist_ok=True)
        (self.path / ("memory.max" if v2.exists() else "memory.limit_in_bytes")).write_text(str(limit))
        if not v2.exists():
            try:   # no swap here, but a swap account would let the limit leak
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
            except OSError:
                pass

    def enter(self) -> None:
        if self.path:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def close(self) -> None:
        if self.path:
            for _ in range(50):
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)


def run_row(config: dict, limit: int | None, cold_start: bool = True, timeout: float = 3600) -> dict:
    cgroup = MemoryLimit(limit)
    try:
        if cold_start:
            cold()
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True,
                              preexec_fn=cgroup.enter, timeout=timeout)
    except subprocess.TimeoutExpired:   # a file thrashing under its limit: the row says so and the run goes on
        return {"error": f"over {timeout:.0f} s (load, prompt and decode)"}
    finally:
        cgroup.close()
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the table ---------------------------------------------------------------------------------

def targets(results: dict, compute: dict, nocache: dict, device: dict) -> str:
    """The issue's targets, each as the ratio measured in this run."""
    def ms(row: dict | None) -> float:
        return row.get("decode_ms", float("nan")) if row else float("nan")

    at50 = {name: results.get((50, name)) for name in ("dbsc + pcw", "lru8", "stock q8_0 (mmap)", "stock Q4_K_M (mmap)")}
    dbsc = at50["dbsc + pcw"] or {}
    lines = ["Targets (measured ratios):"]
    if dbsc.get("decode_ms"):
        lines += [f"- 50%: lru8 / dbsc + pcw ms/token = {ms(at50['lru8']) / ms(dbsc):.2f} (target >= 1.8)",
                  f"- 50%: stock q8_0 / dbsc + pcw = {ms(at50['stock q8_0 (mmap)']) / ms(dbsc):.2f}, "
                  f"stock Q4_K_M / dbsc + pcw = {ms(at50['stock Q4_K_M (mmap)']) / ms(dbsc):.2f} (target > 1)"]
        if dbsc.get("io_ms"):
            lines.append(f"- 50%: dbsc + pcw read path {dbsc['engine_flash_per_token'] / dbsc['io_ms'] / 1e6:.2f} GB/s = "
                         f"{dbsc['engine_flash_per_token'] / dbsc['io_ms'] / 1e6 / device['1m QD8']:.2f} of fio's 1 MiB QD8 "
                         "(target >= 0.8)")
    lines += [f"- 100%, compute only: dbsc + pcw / stock q8_0 = {ms(compute.get('dbsc + pcw')) / ms(compute.get('stock q8_0 (mmap)')):.2f}"
              " (target <= 1.15)",
              f"- 100%, fixed precision: lru8 cache / AMAT without cache (high) = "
              f"{ms(compute.get('lru8')) / ms(nocache['AMAT, no cache, high']):.2f} (target <= 1.05)"]
    return "\n".join(lines)

def high_uses(row: dict) -> str:
    """The share of decode uses a row ran at 8 bits, with the share it was matched to (and the
    threshold that gave it) under --match-shares."""
    if row.get("high_share") is None:
        return "-"
    text = f"{100 * row['high_share']:.0f}%"
    if "accuracy_high_share" in row:
        text += f" (accuracy model {100 * row['accuracy_high_share']:.0f}%, threshold {row['high_threshold']:.3g})"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--hf", type=Path, help="the full-shape checkpoint (make_full_moe.py)")
    parser.add_argument("--work", type=Path, required=False, default=Path("/data"), help="where the GGUFs are made")
    parser.add_argument("--prefix", default="full", help="file names: PREFIX-amat.gguf, PREFIX-q8_0.gguf, ... (default full)")
    parser.add_argument("-n", "--n-decode", type=int, default=48, help="decode tokens per run (default 48)")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="percent of the 8-bit expert bytes")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"cache configurations of the sliced file (default all: {', '.join(CONFIGS)})")
    parser.add_argument("--thresholds", default="",
                        help="also dbsc + pcw at these 8-bit thresholds (comma-separated), for the accuracy-speed front")
    parser.add_argument("--stock", default="Q4_K_M",
                        help="stock files made by llama.cpp's quantizer from the q8_0 file, besides it (default Q4_K_M; "
                             "the front: Q4_0,Q4_K_M,Q5_K_M,Q6_K)")
    parser.add_argument("--dense-types", default="",
                        help="also every configuration on the sliced file with its dense tensors in these llama.cpp "
                             "mixes (comma-separated: q4_k_m, q5_k_m, q6_k), made from PREFIX-amat.gguf by llama.cpp's "
                             "quantizer with the experts kept, as the stock files are made from the q8_0 one")
    parser.add_argument("-o", "--output", type=Path, help="also write the markdown here")
    parser.add_argument("--json", type=Path, help="also write every row's numbers here (scripts/plot_front.py reads them)")
    parser.add_argument("--plan-miss-rate", type=float,
                        help="also `slicemoe plan`'s answer at each budget for this slice miss rate (a dbsc threshold "
                             "chosen on this run's trace), for the accuracy-speed front")
    parser.add_argument("--match-shares", type=Path, metavar="FRONT_JSON",
                        help="run each dbsc configuration at the share of 8-bit uses it had on the accuracy model "
                             "(bench_front.py --json), at the threshold that gives that share on this run's trace "
                             "under each budget: a threshold is a routing weight, and the widened trace's weights are "
                             "m times smaller than its top-k/m source's, so the same threshold runs fewer uses at 8 "
                             "bits here than where the accuracy was measured")
    parser.add_argument("--row-timeout", type=float, default=3600.0,
                        help="seconds a row under a limit may take before it is reported as over that (default 3600)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if os.geteuid() != 0:
        print("needs root: it drops the page cache and creates memory cgroups", file=sys.stderr)
        return 2
    from slicemoe_gguf.model_info import describe

    work = args.work
    amat, q8 = (work / f"{args.prefix}-{kind}.gguf" for kind in ("amat", "q8_0"))
    for path, experts in ((amat, "amat"), (q8, "q8_0")):
        if not path.exists():
            subprocess.run(["slicemoe-convert", "-q", "--experts", experts, str(args.hf), "-o", str(path)], check=True)
    quantized = {}
    for ftype in filter(None, args.stock.split(",")):
        quantized[ftype] = work / f"{args.prefix}-{ftype.lower()}.gguf"
        if not quantized[ftype].exists():
            llama_quantize(q8, quantized[ftype], ftype, args.threads)
    from slicemoe_gguf.runtime import quantize_file

    mixed = {}
    for mix in filter(None, args.dense_types.lower().split(",")):
        mixed[mix] = work / f"{args.prefix}-amat-dense-{mix}.gguf"
        if not mixed[mix].exists():
            partial = mixed[mix].with_name(mixed[mix].name + ".partial")
            quantize_file(amat, partial, mix.upper(), keep_experts=True, threads=args.threads)
            partial.replace(mixed[mix])
    trace_path = work / f"{args.prefix}-route.jsonl"
    shape = widened_route(amat, args.n_decode, trace_path)

    info = describe(amat)
    expert_bytes = sum(layer["msb_bytes_per_expert"] + layer["lsb_bytes_per_expert"] for layer in info["layers"]) \
        * info["n_experts"]
    dense = amat.stat().st_size - expert_bytes
    device = {f"{bs} QD{qd}": fio(amat, bs, qd) for bs, qd in (("4k", 1), ("4k", 32), ("1m", 1), ("1m", 8), ("1m", 32))}
    bandwidth = device["1m QD8"] * 1e9   # the reader threads' depth

    base = {"trace": str(trace_path), "threads": args.threads}
    configs = {}
    for name in args.configs.split(","):
        if name not in CONFIGS:
            parser.error(f"unknown configuration {name!r} (one of {', '.join(CONFIGS)})")
        configs[name] = dict(base, model=str(amat), **CONFIGS[name])
    for threshold in map(float, filter(None, args.thresholds.split(","))):
        configs[dbsc_name(threshold)] = dict(base, model=str(amat), **CONFIGS["dbsc + pcw"], high_threshold=threshold)
    for mix, path in mixed.items():
        configs.update({f"{name}, dense {mix.upper()}": dict(config, model=str(path))
                        for name, config in list(configs.items()) if "dense" not in name})
    stock = {"stock q8_0 (mmap)": dict(base, model=str(q8))}
    stock.update({f"stock {ftype} (mmap)": dict(base, model=str(path)) for ftype, path in quantized.items()})

    # compute-only: everything resident, page cache warm, no limit
    compute = {}
    for name, config in configs.items():
        compute[name] = run_row(dict(config, cache_budget=expert_bytes), None)
    for name, config in stock.items():
        run_row(config, None, cold_start=False)   # warms the page cache with the whole file
        compute[name] = run_row(config, None, cold_start=False)
    nocache = {"AMAT, no cache, high": run_row(dict(base, model=str(amat), precision="high"), None, cold_start=False),
               "AMAT, no cache, low": run_row(dict(base, model=str(amat), precision="low"), None, cold_start=False)}

    def write_json(results: dict) -> None:
        if not args.json:
            return
        budgets = {}
        for (percent, name), row in results.items():
            budgets.setdefault(str(percent), {})[name] = row
        args.json.write_text(json.dumps({
            "machine": machine_line(), "model": info.get("architecture", "?"), "n_decode": shape["n_decode"],
            "device_gb_s": device, "limits_mib": {str(p): (dense + expert_bytes * p // 100 + HEADROOM) / MiB
                                                  for p in map(int, args.budgets.split(","))},
            "compute_only": {**compute, **nocache}, "budgets": budgets}, indent=1) + "\n")

    from slicemoe_gguf import trace as traces

    # the input of plan and of the share matching
    route_trace = traces.read(trace_path) if args.plan_miss_rate is not None or args.match_shares else None
    shares = json.loads(args.match_shares.read_text())["budgets"] if args.match_shares else {}
    rows, results = [], {}
    for percent in map(int, args.budgets.split(",")):
        budget = expert_bytes * percent // 100
        limit = dense + budget + HEADROOM
        planned, compute_of = {}, dict(compute)
        if args.plan_miss_rate is not None:
            point = plan_point(route_trace, budget, args.plan_miss_rate)
            if point:
                planned[point[0]] = dict(base, model=str(amat), **point[1])
                print(f"{percent}%: {point[0]}: {point[1]}", flush=True)
                # its compute-only time: the same settings with everything resident (once per setting)
                key = f"{point[0]}: {point[1]['precision']} {point[1]['high_threshold']}"
                if key not in compute:
                    compute[key] = run_row(dict(planned[point[0]], cache_budget=expert_bytes), None)
                compute_of[point[0]] = compute[key]
        matched = {}   # dbsc configurations at the accuracy model's share of 8-bit uses under this budget
        for name, config in configs.items():
            share = shares.get(str(percent), {}).get(name, {}).get("high_share")
            if config.get("policy") != "dbsc" or share is None:
                continue
            threshold, reached = threshold_for_share(route_trace, budget, share,
                                                     lsb_background=config.get("lsb_background", False))
            matched[name] = dict(config, high_threshold=threshold)
            print(f"{percent}%: {name}: threshold {threshold:.4g} runs {100 * reached:.1f}% of uses at 8 bits "
                  f"on this trace ({100 * share:.1f}% on the accuracy model)", flush=True)
            key = f"{name}: threshold {threshold:.4g}"
            if key not in compute:
                compute[key] = run_row(dict(matched[name], cache_budget=expert_bytes), None)
            compute_of[name] = compute[key]
        for name, config in {**configs, **planned, **stock}.items():
            config = matched.get(name, config)
            cfg = dict(config, cache_budget=budget) if name in configs or name in planned else config
            r = run_row(cfg, limit, timeout=args.row_timeout)
            if name in planned:   # what plan chose: the front takes its accuracy from the same computation
                r["settings"] = {k: planned[name][k] for k in ("policy", "precision", "high_threshold")}
            if name in matched:
                r["high_threshold"] = config["high_threshold"]
                r["accuracy_high_share"] = shares[str(percent)][name]["high_share"]
            results[(percent, name)] = r
            write_json(results)   # row by row: a run cut short keeps what it measured
            if "error" in r:
                rows.append([f"{percent}%", name, f"{limit / MiB:.0f}", "failed: " + r["error"], *[""] * 8])
                print(" | ".join(rows[-1]), flush=True)
                continue
            ideal = max(compute_of[name].get("decode_ms", 0.0), r["read_per_token"] / bandwidth * 1000)
            # the read path's own rate: the engine's bytes over the time it blocked on them
            io_rate = f"{r['engine_flash_per_token'] / r['io_ms'] / 1e6:.2f}" if r.get("io_ms") else "-"
            rows.append([f"{percent}%", name, f"{limit / MiB:.0f}", f"{r['decode_ms']:.1f}",
                         f"{r['ttft_ms']:.0f} / {r['ttft_again_ms']:.0f}", f"{r['prefill_read'] / 1e9:.2f}",
                         f"{r['read_per_token'] / 1e6:.1f}",
                         f"{r['read_per_token'] / max(r['decode_ms'], 1e-9) / 1e6:.2f}", io_rate,
                         f"{ideal:.1f}", f"{r['decode_ms'] / max(ideal, 1e-9):.2f}x", high_uses(r)])
            print(" | ".join(rows[-1]), flush=True)

    lines = [f"Machine: {machine_line()}. Model: {info.get('architecture', '?')} full shape, "
             f"{info['n_experts']} experts top-{info['top_k']}, {len(info['moe_layers'])} MoE layers; AMAT "
             f"{amat.stat().st_size / 1e9:.2f} GB, q8_0 {q8.stat().st_size / 1e9:.2f} GB" +
             "".join(f", {t} {p.stat().st_size / 1e9:.2f} GB" for t, p in quantized.items()) +
             f". Route: the embedded model's routing of a {shape['n_prompt']}-token "
             f"prompt and {shape['n_decode']} decode tokens, widened. {args.threads} threads; page cache dropped "
             f"before every row; RAM limit = dense {dense / MiB:.0f} MiB + budget + {HEADROOM / MiB:.0f} MiB.",
             "", "Device (fio, O_DIRECT random reads of the model file, GB/s): " +
             ", ".join(f"{k} {v:.2f}" for k, v in device.items()), "",
             "Compute-only (everything resident, warm; ms/token): " +
             ", ".join(f"{k} {v.get('decode_ms', float('nan')):.1f}" for k, v in {**compute, **nocache}.items()), "",
             markdown_table(["budget", "configuration", "RAM limit MiB", "decode ms/token", "TTFT ms (first / again)",
                             "first prompt GB read", "flash MB/token", "read GB/s", "read path GB/s", "limit ms/token", "vs limit",
                             "8-bit uses"], rows),
             "", targets(results, compute, nocache, device)]
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    write_json(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
