"""`slicemoe`: run and inspect MoE GGUF models through the slicemoe native engine.

Flags follow llama.cpp's tools (-m, -p, -n, --temp, --seed, -t, -ngl) where they overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__, defaults
from ._native import SliceMoEError
from .units import format_size, parse_size


def _cmd_info(args: argparse.Namespace) -> int:
    from .runtime import library_info

    info = library_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"slicemoe-gguf   {info['version']} (native {info['native_version']})")
    print(f"llama.cpp       {info['llama_cpp']}")
    print(f"library         {info['library']}")
    print("devices         " + ", ".join(f"{d['name']} ({d['description']})" for d in info["devices"]))
    print(f"cpu features    {info['system_info']}")
    print(f"expert product  {info['product_kernel']} (the fused MSB + LSB kernel decode runs)")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .model_info import describe

    try:
        info = describe(args.model)
    except FileNotFoundError:
        raise SliceMoEError(f"cannot open '{args.model}': No such file or directory", 2) from None
    except ValueError as exc:
        raise SliceMoEError(str(exc), 3) from exc
    from .memory import plan

    if args.cache_budget is not None and not info["sliced"]:
        raise SliceMoEError(f"'{args.model}' is not a sliced (AMAT) model: a slice cache needs a file written by "
                            "slicemoe-convert --experts amat", 1)
    budget = _cache_budget(args)
    memory = plan(args.model, n_ctx=args.ctx_size, n_batch=args.batch_size, cache_budget=budget)
    info["memory"] = {**memory.as_dict(), "n_ctx": args.ctx_size, "cache_budget_bytes": budget}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    print(f"{info['path']}: {info['architecture']} '{info['name']}', {mib(info['file_bytes'])}")
    print(f"layers {info['n_layers']}, MoE layers {len(info['moe_layers'])}, experts {info['n_experts']}, "
          f"top-k {info['top_k']}")
    if info["sliced"]:
        print(f"AMAT slices ({info['grid']} grid): MSB {mib(info['expert_msb_bytes'])}, LSB {mib(info['expert_lsb_bytes'])}; "
              f"other tensors {mib(info['other_bytes'])}")
        print("layer  MSB/expert  LSB/expert  MSB total   LSB total")
        for p in info["layers"]:
            print(f"{p['layer']:5d}  {p['msb_bytes_per_expert']:8d} B  {p['lsb_bytes_per_expert']:8d} B  "
                  f"{mib(p['msb_bytes']):>10s}  {mib(p['lsb_bytes']):>10s}")
        for key, value in info["slicemoe"].items():
            print(f"{key} = {value}")
    else:
        print(f"plain expert tensors {mib(info['expert_msb_bytes'])} (not sliced); "
              f"other tensors {mib(info['other_bytes'])}")
    experts = f"slice pools (budget {format_size(budget)})" if budget else "mapped experts (no cache)"
    print(f"resident memory at -c {args.ctx_size}: {memory.describe(experts)}")
    return 0


def _read_prompt(args: argparse.Namespace) -> str:
    if args.file is not None:
        try:
            return Path(args.file).read_text(encoding="utf-8")
        except OSError as exc:
            raise SliceMoEError(f"cannot read prompt file '{args.file}': {exc.strerror}", 2) from exc
    return args.prompt


def _cache_budget(args: argparse.Namespace) -> int:
    """--cache-budget in bytes; a percentage is of all routed-expert slice bytes of the file, and
    "auto" is what fits the memory available now (memory.auto_budget)."""
    if args.cache_budget is None:
        return 0
    if args.cache_budget.strip().lower() == "auto":
        from .memory import auto_budget

        margin = None if args.ram_margin is None else _parse_size_arg("--ram-margin", args.ram_margin)
        budget, how = auto_budget(args.model, n_ctx=args.ctx_size, n_batch=args.batch_size, margin=margin)
        print(f"cache budget auto: {format_size(budget)} = {how}", file=sys.stderr)
        return budget
    total = None
    if args.cache_budget.strip().endswith("%"):
        from .model_info import describe

        try:
            info = describe(args.model)
        except (OSError, ValueError) as exc:
            raise SliceMoEError(f"cannot read '{args.model}': {exc}", 3) from exc
        total = info["expert_msb_bytes"] + info["expert_lsb_bytes"]
    budget = _parse_budget(args.cache_budget, total)
    if budget <= 0:
        raise SliceMoEError("--cache-budget must be more than 0 bytes", 1)
    return budget


def _process_memory() -> dict:
    """This process's resident set now (anonymous and file-backed) and at its peak, in bytes,
    from /proc/self/status."""
    import re

    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    found = {k: int(v) * 1024 for k, v in re.findall(r"(VmRSS|VmHWM|RssAnon|RssFile):\s+(\d+) kB", status)}
    # anonymous memory (pools, KV cache, buffers) is what the run holds; file-backed pages are the
    # mapped model, which the kernel can drop and read again
    return {"rss_bytes": found.get("VmRSS"), "peak_rss_bytes": found.get("VmHWM"),
            "rss_anon_bytes": found.get("RssAnon"), "rss_file_bytes": found.get("RssFile")}


def _msb_slice_bytes(model_path: str) -> int:
    from .model_info import describe

    return describe(model_path)["msb_slice_bytes"]


# a prompt for --route-trace runs: its text does not matter, the trace routes every token
ROUTE_PROMPT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on in the sun."


def _read_route(args: argparse.Namespace):
    """The request of --route-trace to force, or None."""
    if not args.route_trace:
        return None
    from .trace import TraceError, request_route

    try:
        return request_route(_read_trace(args.route_trace), args.request)
    except TraceError as exc:
        raise SliceMoEError(f"{args.route_trace}: {exc}", 3) from exc


def _cmd_run(args: argparse.Namespace) -> int:
    from .runtime import Model, Sampling

    route = _read_route(args)
    text = _read_prompt(args) if route is None or args.prompt or args.file else ROUTE_PROMPT
    profiles = _profiles(args)
    sampling = Sampling(temperature=args.temp, top_p=args.top_p, seed=args.seed)
    budget = _cache_budget(args)
    from ._native import lib

    lib()   # the library and its backends (a Vulkan driver maps ~70 MB) are not the model's memory
    rss_before_load = _process_memory().get("rss_bytes")
    load_start = time.perf_counter()
    with Model(args.model, n_gpu_layers=args.gpu_layers, n_ctx=args.ctx_size, n_batch=args.batch_size,
               n_threads=args.threads, cache_budget=budget, prefetch=args.prefetch, io_mode=args.io_mode,
               forced_routes=route is not None, **_cache_settings(args)) as model:
        load_ms = 1000 * (time.perf_counter() - load_start)
        from .memory import plan_of_running

        memory = plan_of_running(model)
        prompt = model.chat_tokens([{"role": "user", "content": text}]) if args.chat else model.tokenize(text)
        if route is not None:
            # the routing is the trace's: the prompt only has to have its length, and decode runs
            # exactly the trace's decode steps
            model.force_routes(route.experts, route.weights, n_experts=route.n_experts)
            prompt = (prompt * (route.n_prompt // max(len(prompt), 1) + 1))[:route.n_prompt]
            args.n_predict, args.ignore_eos = route.n_decode + 1, True
        if not args.json:
            print(f"memory: {memory.describe('slice pools' if model.has_cache else 'mapped experts')}",
                  file=sys.stderr)
        if args.json or args.logits_out:
            result = model.generate(prompt, args.n_predict, sampling, keep_logits=bool(args.logits_out),
                                    stop_at_eog=not args.ignore_eos)
        else:
            # Stream text as it is produced; decode whole prefixes so multi-byte characters that
            # span tokens come out intact.
            tokens: list[int] = []
            shown = ""
            for token, _ in model.stream(prompt, args.n_predict, sampling, stop_at_eog=not args.ignore_eos):
                tokens.append(token)
                text = model.detokenize(tokens)
                if not text.endswith("\ufffd"):
                    sys.stdout.write(text[len(shown):])
                    sys.stdout.flush()
                    shown = text
            prefill_ms, decode_ms = model.timings()
            steps = max(len(tokens) - 1, 1)
            print(f"\n\nprefill: {prefill_ms:.1f} ms, decode: {decode_ms / steps:.2f} ms/token "
                  f"({len(tokens)} tokens)", file=sys.stderr)
            cache = model.cache_stats()
            if cache:
                uses = cache["hits"] + cache["misses"]
                print(f"cache: pools {format_size(cache['pool_bytes'])} of {format_size(cache['budget_bytes'])} "
                      f"budget, {cache['hits']} hits, {cache['misses']} misses "
                      f"({100 * cache['misses'] / max(uses, 1):.1f}% of slice uses), "
                      f"{format_size(cache['flash_bytes'] / max(cache['decode_tokens'], 1))}/token from flash, "
                      f"{cache['io_ms']:.1f} ms blocked on reads", file=sys.stderr)
                if cache.get("io_note"):
                    print(f"cache: {cache['io_note']}", file=sys.stderr)
                compute_ms = max(decode_ms - cache["io_ms"], 0.0) / steps
                _print_modelled(_modelled(cache, profiles, _msb_slice_bytes(args.model), compute_ms), profiles,
                                "(expert traffic and MACs; the latency adds this machine's compute)")
            return 0
        cache = model.cache_stats()
        measured = _process_memory()   # while the model is loaded
    if args.logits_out:
        np.save(args.logits_out, result.logits.astype(np.float32))
    if args.json:
        print(json.dumps({
            "text": result.text,
            "prompt_tokens": result.prompt_tokens,
            "tokens": result.tokens,
            "n_prompt": result.n_prompt,
            "n_decode": result.n_decode,
            "load_ms": round(load_ms, 1),
            "prefill_ms": round(result.prefill_ms, 3),
            "decode_ms_per_token": round(result.decode_ms_per_token, 3),
            **({"cache": cache} if cache else {}),
            **({"route_trace": {"path": args.route_trace, "request": route.request, "n_prompt": route.n_prompt,
                                "n_decode": route.n_decode}} if route is not None else {}),
            "memory": {**memory.as_dict(), **measured, "rss_before_load_bytes": rss_before_load},
            **({"modelled": _modelled(cache, profiles, _msb_slice_bytes(args.model),
                                      max(result.decode_ms_per_token - cache["io_ms"] / max(cache["decode_tokens"], 1), 0.0))}
               if cache else {}),
        }))
    else:
        print(result.text)
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from .runtime import Model, Sampling

    if args.file is not None:
        try:
            prompts = [line for line in Path(args.file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as exc:
            raise SliceMoEError(f"cannot read prompt file '{args.file}': {exc.strerror}", 2) from exc
    else:
        prompts = [args.prompt]
    if not prompts:
        raise SliceMoEError("no prompts: the prompt file has no non-empty line", 1)
    budget = _cache_budget(args)
    # the run that `slicemoe run` with these flags would make (greedy), recorded
    with Model(args.model, n_gpu_layers=args.gpu_layers, n_ctx=args.ctx_size, n_batch=args.batch_size,
               n_threads=args.threads, record_trace=True, cache_budget=budget, prefetch=args.prefetch,
               io_mode=args.io_mode, **_cache_settings(args)) as model:
        for prompt in prompts:
            model.generate(prompt, args.n_predict, Sampling(), stop_at_eog=not args.ignore_eos)
        trace = model.routing_trace()
    trace.write(args.output)
    decode = int((trace.phase == 1).sum())
    print(f"wrote {args.output}: {len(prompts)} request(s), {len(trace)} routing records "
          f"({decode} decode, {len(trace) - decode} prefill) over {trace.header['n_layers']} MoE layers")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _read_trace(path: str):
    from . import trace as traces

    try:
        return traces.read(path)
    except traces.TraceError as exc:
        raise SliceMoEError(str(exc), 3) from exc


def _parse_budget(text: str, total: int) -> int:
    return _parse_size_arg("--cache-budget", text, total)


def _parse_size_arg(flag: str, text: str, total: int | None = None) -> int:
    try:
        return parse_size(text, total)
    except ValueError as exc:
        raise SliceMoEError(f"{flag}: {exc}", 1) from exc


def _profiles(args: argparse.Namespace) -> list:
    from .energy import DEFAULT_PROFILES, load_profile

    try:
        return [load_profile(p) for p in (args.profile or DEFAULT_PROFILES)]
    except ValueError as exc:
        raise SliceMoEError(str(exc), 1) from exc


def _modelled(stats: dict, profiles: list, msb_slice_bytes: int, compute_ms: float = 0.0) -> dict:
    from .energy import per_token

    return {p.name: per_token(stats, p, msb_slice_bytes, compute_ms) for p in profiles}


def _print_modelled(modelled: dict, profiles: list, what: str) -> None:
    for p in profiles:
        m = modelled[p.name]
        print(f"modelled on {p.name} ({p.description}): {m['energy_mj_per_token']:.4g} mJ/token, "
              f"{m['latency_ms_per_token']:.4g} ms/token {what}", file=sys.stderr)


def _cmd_sim(args: argparse.Namespace) -> int:
    from . import trace as traces

    profiles = _profiles(args)
    trace = _read_trace(args.trace)
    budget = _parse_budget(args.cache_budget, traces.total_slice_bytes(trace))
    if args.policy == "optimal":
        return _print_optimal(args, trace, budget)
    stats = traces.replay(trace, budget=budget, **_cache_settings(args))
    decode_tokens = max(stats["decode_tokens"], 1)
    msb_uses = stats["msb_hits"] + stats["msb_misses"]
    lsb_uses = stats["lsb_hits"] + stats["lsb_misses"]
    uses = msb_uses + lsb_uses
    summary = {
        "policy": args.policy, **stats,
        "hit_rate": stats["hits"] / max(uses, 1), "miss_rate": stats["misses"] / max(uses, 1),
        "msb_miss_rate": stats["msb_misses"] / max(msb_uses, 1),
        "lsb_miss_rate": stats["lsb_misses"] / max(lsb_uses, 1),
        "flash_bytes_per_token": stats["flash_bytes"] / decode_tokens,
        "ram_bytes_per_token": stats["ram_bytes"] / decode_tokens,
        "layer_hit_rates": [h / max(h + m, 1) for h, m in zip(
            [a + b for a, b in zip(stats["layers"]["msb_hits"], stats["layers"]["lsb_hits"])],
            [a + b for a, b in zip(stats["layers"]["msb_misses"], stats["layers"]["lsb_misses"])])],
    }
    summary["modelled"] = _modelled(stats, profiles, traces.msb_slice_bytes(trace))
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{args.trace}: {len(trace)} records, {stats['decode_tokens']} decode tokens; policy {args.policy}, "
          f"budget {format_size(budget)} (pools {format_size(stats['pool_bytes'])})")
    print(f"slice uses {uses}: hits {stats['hits']}, misses {stats['misses']} ({100 * summary['miss_rate']:.1f}%); "
          f"MSB miss rate {100 * summary['msb_miss_rate']:.1f}%, LSB miss rate {100 * summary['lsb_miss_rate']:.1f}%")
    print(f"flash {format_size(summary['flash_bytes_per_token'])}/token, expert RAM reads "
          f"{format_size(summary['ram_bytes_per_token'])}/token, 8-bit/4-bit uses "
          f"{stats['high_uses']}/{stats['low_uses']}")
    print("layer hit rates: " + " ".join(f"{100 * r:.0f}%" for r in summary["layer_hit_rates"]))
    for p in profiles:
        m = summary["modelled"][p.name]
        print(f"modelled on {p.name} ({p.description}): {m['energy_mj_per_token']:.4g} mJ/token of expert "
              f"traffic and MACs, {m['latency_ms_per_token']:.4g} ms/token of expert memory traffic")
    return 0


def _print_optimal(args: argparse.Namespace, trace, budget: int) -> int:
    from .optimum import compare

    try:
        result = compare(trace, budget, _cache_settings(args))
    except ValueError as exc:
        raise SliceMoEError(str(exc), 1) from exc
    if args.json:
        print(json.dumps(result))
        return 0
    reference = result["optima"][result["reference_rule"]]
    tokens = max(reference["decode_tokens"], 1)
    kind = "exact: one slice size" if reference["exact"] else \
        f"lower bound; a feasible schedule reads {format_size(reference['upper'] / tokens)}/token"
    print(f"{args.trace}: {reference['decode_tokens']} decode tokens, budget {format_size(budget)}")
    print(f"optimal slice cache at precision {result['reference_rule']} ({reference['demanded_high']} of "
          f"{reference['demanded_uses']} uses at 8 bits): {format_size(reference['lower'] / tokens)}/token of flash "
          f"({kind})")
    print("| policy | flash/token | 8-bit uses | x optimum of its own demand | x optimum above |")
    print("|---|---|---|---|---|")
    for row in result["policies"]:
        own = "-" if row["vs_own_optimum"] is None else f"{row['vs_own_optimum']:.2f}" + \
            ("" if row["serves_demand"] else " (served fewer 8-bit uses)")
        print(f"| {row['policy']} | {format_size(row['flash_bytes'] / tokens)} | {row['high_uses']} | {own} | "
              f"{row['vs_reference']:.2f} |")
    return 0


def _plan_precision(args: argparse.Namespace, trace, budget: int) -> int:
    from . import trace as traces

    result = traces.plan_precision(trace, budget=budget, max_miss_rate=args.max_miss_rate, warmup=args.warmup)
    if not result:
        raise SliceMoEError(f"no dbsc configuration at {format_size(budget)} meets a slice miss rate of "
                            f"{args.max_miss_rate} on this trace, not even every use at 4 bits (or the budget is "
                            "below the minimum that can run)", 1)
    flags = f"--policy dbsc --cache-budget {budget}B --warmup {args.warmup} " + \
        (f"--high-threshold {result['high_threshold']}" if result["precision"] == "auto" else "--precision low")
    result["flags"] = flags
    if args.accuracy:
        result["accuracy"] = _plan_accuracy(args, budget / traces.total_slice_bytes(trace), result)
    if args.json:
        print(json.dumps(result))
        return 0
    stats = result["stats"]
    print(f"budget {format_size(budget)}: {100 * result['high_share']:.1f}% of expert uses at 8 bits "
          f"({'threshold ' + str(result['high_threshold']) if result['precision'] == 'auto' else 'every use at 4 bits'}), "
          f"slice miss rate {100 * result['miss_rate']:.2f}% (target {100 * args.max_miss_rate:.2f}%), "
          f"flash {format_size(stats['flash_bytes'] / max(stats['decode_tokens'], 1))}/token")
    if args.accuracy:
        acc = result["accuracy"]
        print(f"accuracy against the 8-bit model on {acc['positions']} held-out positions: KL {acc['kl']:.4g} nats, "
              f"top-1 agreement {100 * acc['top1']:.2f}% ({100 * acc['high_share']:.1f}% of uses at 8 bits there)")
    print(f"run it with: slicemoe run {flags}")
    return 0


def _plan_accuracy(args: argparse.Namespace, fraction: float, result: dict) -> dict:
    """The planned configuration's KL and top-1 against the 8-bit model; the budget is the same
    fraction of the model's slices as of the trace's."""
    from dataclasses import asdict

    from . import accuracy
    from .embedded import EMBEDDED_CHECKPOINT, embedded_gguf
    from .model_info import describe

    path = Path(args.model) if args.model else embedded_gguf(progress=False)
    text_path = Path(args.text) if args.text else EMBEDDED_CHECKPOINT / "heldout.txt"
    try:
        text = text_path.read_text(encoding="utf-8")
        windows = accuracy.heldout_windows(path, text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SliceMoEError(f"--accuracy: {exc}", 1) from exc
    info = describe(path)
    model_budget = int((info["expert_msb_bytes"] + info["expert_lsb_bytes"]) * fraction)
    ref = accuracy.reference(path, windows)
    measured = accuracy.evaluate(path, windows, ref, cache_budget=model_budget, policy="dbsc", warmup=args.warmup,
                                 precision=result["precision"], high_threshold=result["high_threshold"])
    return asdict(measured)


def _cmd_plan(args: argparse.Namespace) -> int:
    from . import trace as traces

    trace = _read_trace(args.trace)
    total = traces.total_slice_bytes(trace)
    if args.max_miss_rate is None and args.cache_budget is None:
        raise SliceMoEError("slicemoe plan needs --max-miss-rate, --cache-budget or both", 2)
    budget = None if args.cache_budget is None else _parse_budget(args.cache_budget, total)
    if budget is not None and args.max_miss_rate is not None and not args.per_layer:
        return _plan_precision(args, trace, budget)
    if args.accuracy:
        raise SliceMoEError("--accuracy needs both --cache-budget and --max-miss-rate", 2)
    if args.per_layer:
        if budget is None:
            raise SliceMoEError("--per-layer needs --cache-budget", 1)
        try:
            result = traces.plan_layers(trace, budget, policy=args.policy, gating_t=args.gating_t, warmup=args.warmup)
        except ValueError as exc:
            raise SliceMoEError(str(exc), 1) from exc
        equal = traces.replay(trace, policy=args.policy, budget=budget, gating_t=args.gating_t, warmup=args.warmup)
        if args.json:
            print(json.dumps({"layer_slots": result["layer_slots"], "misses": result["misses"],
                              "equal_split_misses": equal["misses"], "budget_bytes": budget}))
            return 0
        slots = ",".join(map(str, result["layer_slots"]))
        print(f"per-layer slots {slots}: {result['misses']} misses (equal split: {equal['misses']}) "
              f"with {format_size(budget)}")
        print(f"run it with: slicemoe run --policy {args.policy} --cache-budget {budget}B --layer-slots {slots}")
        return 0
    result = traces.plan(trace, max_miss_rate=args.max_miss_rate, budget=budget,
                         high_threshold=args.high_threshold, warmup=args.warmup)
    if not result:
        raise SliceMoEError(f"no budget up to all slices ({format_size(total)}) meets a miss rate of "
                            f"{args.max_miss_rate} on this trace" if budget is None else
                            "the budget is below the minimum that can run", 1)
    stats = result["stats"]
    profiles = _profiles(args)
    result["modelled"] = _modelled(stats, profiles, traces.msb_slice_bytes(trace))
    if args.json:
        print(json.dumps(result))
        return 0
    decode_tokens = max(stats["decode_tokens"], 1)
    energy = ", ".join(f"{p.name} {result['modelled'][p.name]['energy_mj_per_token']:.4g} mJ/token" for p in profiles)
    print(f"budget {format_size(result['budget_bytes'])} ({100 * result['budget_fraction']:.1f}% of slice bytes), "
          f"{'adaptive split' if result['msb_share'] == 0 else 'MSB share ' + format(result['msb_share'], '.2f')}: slice miss rate {100 * result['miss_rate']:.2f}%, "
          f"flash {format_size(stats['flash_bytes'] / decode_tokens)}/token; modelled {energy}")
    print(f"run it with: slicemoe run --policy dbsc --cache-budget {result['budget_bytes']}B "
          f"--msb-share {result['msb_share']:.4f} --high-threshold {args.high_threshold}")
    return 0


DEMO_PROMPT = "ROMEO.\nBut soft, what light"


def _cmd_demo(args: argparse.Namespace) -> int:
    from .embedded import embedded_gguf
    from .model_info import describe
    from .runtime import Model, Sampling

    from slicemoe_convert.checkpoint import CheckpointError

    try:
        path = embedded_gguf(progress=not args.model_path)
    except (FileNotFoundError, CheckpointError) as exc:
        raise SliceMoEError(str(exc), 2) from exc
    if args.model_path:
        print(path)
        return 0
    info = describe(path)
    total = info["expert_msb_bytes"] + info["expert_lsb_bytes"]
    budget = _parse_budget(args.cache_budget, total)
    msb_slice = info["msb_slice_bytes"]
    profiles = _profiles(args)
    setups = (("SliceMoE: dbsc + pcw", "dbsc", "pcw"), ("lru8 (whole 8-bit experts)", "lru8", "none"))
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    timings: dict[str, list[float]] = {label: [] for label, _, _ in setups}
    firsts = {}
    # the rows alternate, run after run, so that a change in the machine's load hits both alike;
    # each run starts from an empty cache, so the counters are the same every run
    for _ in range(args.runs):
        for label, policy, warmup in setups:
            with Model(path, n_threads=args.threads, cache_budget=budget, policy=policy, warmup=warmup) as model:
                result = model.generate(args.prompt, args.n_predict, Sampling(), stop_at_eog=False)
                firsts.setdefault(label, (result, model.cache_stats()))
            timings[label].append(result.decode_ms_per_token)
    rows = [(label, firsts[label][0], firsts[label][1], _modelled(firsts[label][1], profiles, msb_slice),
             float(np.median(timings[label]))) for label, _, _ in setups]
    print(f"{info['name'] or 'embedded model'}: {len(info['layers'])} MoE layers x {info['n_experts']} experts "
          f"(top-{info['top_k']}), {format_size(total)} of expert slices; budget {format_size(budget)} "
          f"({100 * budget / total:.0f}%)\n")
    print(args.prompt + rows[0][1].text + "\n")
    energy_cols = " | ".join(f"{p.name} mJ/token" for p in profiles)
    print(f"| policy | hits | misses | flash MB/token | {energy_cols} | ms/token (this machine) |")
    print("|---|---|---|---|" + "---|" * len(profiles) + "---|")
    for label, _, stats, modelled, ms_per_token in rows:
        tokens = max(stats["decode_tokens"], 1)
        energies = " | ".join(f"{modelled[p.name]['energy_mj_per_token']:.4f}" for p in profiles)
        print(f"| {label} | {stats['hits']} | {stats['misses']} | {stats['flash_bytes'] / tokens / 1e6:.3f} | "
              f"{energies} | {ms_per_token:.2f} |")
    (_, _, mine, mine_m, fast), (_, _, base, base_m, slow) = rows
    first = profiles[0].name
    print(f"\nSliceMoE against lru8 at the same budget: {base['flash_bytes'] / max(mine['flash_bytes'], 1):.2f}x less "
          f"flash traffic, {base_m[first]['energy_mj_per_token'] / mine_m[first]['energy_mj_per_token']:.2f}x less "
          f"modelled energy ({first}), {slow / fast:.2f}x decode speed here. Energy is modelled from the counters "
          f"with the device profiles (see docs/measuring.md); ms/token is measured: the median of {args.runs} alternating "
          f"runs per policy.")
    print(_timing_verdict(timings, load_before))
    return 0


def _timing_verdict(timings: dict[str, list[float]], load_before: float) -> str:
    """One line on whether the machine was quiet enough for the ms/token column to mean something."""
    cores = os.cpu_count() or 1
    spread = max((max(runs) - min(runs)) / max(float(np.median(runs)), 1e-9) for runs in timings.values())
    busy = load_before > 0.5 * cores or (len(next(iter(timings.values()))) > 1 and spread > 0.25)
    measured = f"load average {load_before:.1f} on {cores} cores before the runs; runs of one policy differ by " \
               f"up to {100 * spread:.0f}%"
    if busy:
        return (f"The machine was busy ({measured}): do not trust the ms/token column; the counters, flash "
                f"traffic and energy are exact. Run again on an idle machine, or with more --runs.")
    return f"Timings are steady ({measured})."


def _add_profile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", action="append", metavar="NAME|FILE.json",
                        help="device profile for the modelled energy and latency (repeatable; default: the "
                             "built-in phone and laptop profiles)")


def _add_cache_arguments(parser: argparse.ArgumentParser, *, live: bool) -> None:
    """The slice-cache flags, one definition for run and trace (live: a model runs) and sim (replay,
    which adds belady and needs a budget); every default comes from slicemoe_gguf.defaults."""
    d = defaults
    cache = parser.add_argument_group("slice cache (sliced models)")
    cache.add_argument("--precision", choices=["auto", "high", "low"], default=d.PRECISION,
                       help="routed experts of a sliced (AMAT) model: high = MSB+LSB slices (8-bit), "
                            "low = MSB slices only (4-bit), auto = per use by the cache policy, high "
                            f"without a cache (default {d.PRECISION}); ignored for stock models")
    if live:
        cache.add_argument("--cache-budget", metavar="SIZE",
                           help="RAM for routed-expert slices: bytes with a unit (512KB, 300MB, 2GiB), a "
                                "percentage of all expert slice bytes (50%%), or auto: the memory available now "
                                "(MemAvailable, or the memory cgroup's free room) less --ram-margin, less the dense "
                                "weights, KV cache and compute buffers. Decode then reads missing slices from the "
                                "file. Default: no cache, every expert mapped from the file")
        cache.add_argument("--ram-margin", metavar="SIZE",
                           help="--cache-budget auto: memory left free for everything else (default: 1 GiB or "
                                "10%% of the available memory, whichever is more)")
    else:
        cache.add_argument("--cache-budget", required=True, metavar="SIZE",
                           help="bytes with a unit (300MB, 2GiB) or a percentage of all slice bytes (50%%)")
    from .cache_params import policies as native_policies
    policies = list(native_policies(live_only=live)) + ([] if live else ["optimal"])
    cache.add_argument("--policy", choices=policies, default=d.POLICY,
                       help="cache policy: dbsc (SliceMoE: bit slices, precision per use), lru8 / "
                            "lfu8 (whole experts at 8 bits, least recently / frequently used out), lru4 "
                            "(MSB slices only: the 4-bit model), hobbit (misses of unimportant experts load "
                            "and run at 4 bits), dymoe (8-bit share falling with depth, --high-ratio), "
                            "cache_prior (dbsc plus cache-aware routing, --prior-lambda; changes outputs), "
                            "adapmoe (8-bit LRU with adaptive gating, --gating-t; changes outputs)"
                            + ("" if live else ", belady (whole experts, farthest next use out: the offline "
                                                "optimum of whole-expert caching), optimal (the offline optimum "
                                                "of any slice cache of the budget, serving the precision "
                                                "--precision asks for; prints every policy against it)")
                            + f" (default {d.POLICY})")
    cache.add_argument("--warmup", choices=["pcw", "none"], default=d.WARMUP,
                       help="pcw: load the slices the prompt used most before the first decode token "
                            f"(default {d.WARMUP})")
    cache.add_argument("--high-threshold", type=float, default=d.HIGH_THRESHOLD, metavar="W",
                       help="auto precision: a use runs at 8 bits if its routing weight is >= W; the "
                            f"top-ranked expert always does (default {d.HIGH_THRESHOLD})")
    cache.add_argument("--max-miss-rate", type=float, default=d.MAX_MISS_RATE, metavar="R",
                       help="auto precision: adapt the threshold at run time to keep the slice miss rate "
                            "near R (e.g. 0.05); default 0 = fixed threshold")
    cache.add_argument("--msb-share", type=float, default=d.MSB_SHARE, metavar="F",
                       help="a fixed share of each layer's budget for MSB slots, the rest for LSB slots; "
                            "default 0 = dbsc's adaptive split (one set of slots for both kinds), two thirds for "
                            "hobbit, dymoe and cache_prior")
    cache.add_argument("--high-ratio", type=float, default=d.HIGH_RATIO, metavar="F",
                       help="dymoe: share of a token's uses at 8 bits in the first MoE layer, falling by a half "
                            "cosine to 0 at the last (default 0 = 0.5)")
    cache.add_argument("--prior-lambda", type=float, default=d.PRIOR_LAMBDA, metavar="L",
                       help="cache_prior: bias of a cached expert's router logit, in mean logit ranges "
                            f"(default {d.PRIOR_LAMBDA}; 0 = the model's own routing)"
                            + ("" if live else "; replay re-picks the experts from the trace's router logits, "
                                               "which a trace recorded under cache_prior has"))
    cache.add_argument("--gating-t", type=float, default=d.GATING_T, metavar="T",
                       help="adapmoe: drop a use after the first when its routing weight < sqrt(T) "
                            f"(default {d.GATING_T}, i.e. weights below {d.GATING_T ** 0.5:g}; 0 = never, exactly lru8)")
    cache.add_argument("--layer-slots", type=_int_list, metavar="N,N,...",
                       help="whole-expert policies: slots per MoE layer (slicemoe plan --per-layer finds them); "
                            "default: an equal share of the budget")
    cache.add_argument("--layer-sensitivity", type=_float_list, metavar="S,S,...",
                       help="adapmoe: calibrated sensitivity S_l per MoE layer (a use is dropped when its weight < "
                            "sqrt(T / S_l); scripts/calibrate_policies.py measures them); default: 1 for every layer")
    cache.add_argument("--layer-high-uses", type=_int_list, metavar="N,N,...",
                       help="dymoe: how many best-ranked uses run at 8 bits in each MoE layer (calibrated by "
                            "scripts/calibrate_policies.py); default: the cosine depth schedule of --high-ratio")
    if live:
        cache.add_argument("--prefetch", action="store_true", default=d.PREFETCH,
                           help="look-ahead prefetch: apply the next MoE layer's router to this layer's input and "
                                "load its predicted MSB slices on an I/O thread while this layer computes (off "
                                "by default: see docs/design.md for the measurement)")
        cache.add_argument("--io", choices=["auto", "direct", "buffered"], default=d.IO_MODE, dest="io_mode",
                           help="how misses are read: direct (O_DIRECT, no page-cache copy), buffered (pread, then "
                                "dropped from the page cache) or auto, direct where the file system has it "
                                f"(default {d.IO_MODE}), once a direct read at load has matched a buffered one; "
                                "--json says which ran (cache.io_mode) and why auto fell back (cache.io_note)")


def _cache_settings(args: argparse.Namespace) -> dict:
    """The policy settings of the shared cache flags, as keyword arguments of Model and replay."""
    settings = {name: getattr(args, name) for name in defaults.CACHE_SETTINGS}
    settings["layer_slots"] = args.layer_slots
    settings["layer_sensitivity"] = args.layer_sensitivity
    settings["layer_high_uses"] = args.layer_high_uses
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slicemoe",
        description="Run Mixture-of-Experts GGUF models with the slicemoe llama.cpp engine.")
    parser.add_argument("--version", action="version", version=f"slicemoe-gguf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="versions, compute devices, CPU features, library path",
                          description="Print the package and pinned llama.cpp versions, the compute "
                                      "devices ggml found, the CPU features compiled in, and the library path.")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_cmd_info)

    inspect = sub.add_parser("inspect", help="architecture, experts and slice sizes of a GGUF",
                             description="Describe a GGUF: architecture, layers, experts, top-k, AMAT slice "
                                         "bytes per expert and per layer, totals, slicemoe.* metadata. For a "
                                         "stock file the whole expert tensors are reported as msb bytes. Also "
                                         "the resident memory a run implies: dense weights + slice pools (or "
                                         "all experts without a cache) + KV cache + compute buffers, as "
                                         "llama.cpp sizes them.")
    inspect.add_argument("model", help="path to a .gguf file")
    inspect.add_argument("--cache-budget", metavar="SIZE",
                         help="the budget to state memory for (as slicemoe run: size, %%, or auto)")
    inspect.add_argument("--ram-margin", metavar="SIZE", help="with --cache-budget auto (as slicemoe run)")
    inspect.add_argument("-c", "--ctx-size", type=int, default=defaults.N_CTX,
                         help=f"context length (default {defaults.N_CTX})")
    inspect.add_argument("-b", "--batch-size", type=int, default=defaults.N_BATCH,
                         help=f"prompt batch (default {defaults.N_BATCH})")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(func=_cmd_inspect)

    run = sub.add_parser("run", help="generate text from a prompt",
                         description="Evaluate a prompt and decode tokens. Works on any llama.cpp GGUF.")
    _add_model_arguments(run)
    source = run.add_mutually_exclusive_group()
    source.add_argument("-p", "--prompt", help="prompt text (required unless --route-trace)")
    source.add_argument("-f", "--file", help="read the prompt from this file")
    run.add_argument("--route-trace", metavar="TRACE.jsonl",
                     help="trace-driven decode: every MoE layer runs the trace's experts and router "
                          "probabilities instead of its router's choice, for one request of the trace, whose "
                          "prompt and decode lengths replace the prompt's and -n (the prompt text, default a "
                          "fixed one, is repeated or cut to the trace's length). The trace's MoE layer count, "
                          "expert count and top-k must be the model's. Works on stock models too")
    run.add_argument("--request", type=int, metavar="N",
                     help="with --route-trace: the trace's request number to replay (default its first)")
    run.add_argument("-n", "--n-predict", type=int, default=defaults.N_PREDICT,
                     help=f"tokens to decode (default {defaults.N_PREDICT})")
    run.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1 = off)")
    run.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    _add_cache_arguments(run, live=True)
    run.add_argument("--ignore-eos", action="store_true", help="keep decoding past end-of-generation tokens")
    run.add_argument("--chat", action="store_true",
                     help="the prompt is a user message: apply the model's chat template (chatml if it has "
                          "none), as slicemoe serve's /v1/chat/completions and slicemoe chat do")
    _add_profile_argument(run)
    run.add_argument("--json", action="store_true",
                     help="print one JSON object: text, prompt_tokens, tokens, n_prompt, n_decode, "
                          "prefill_ms, decode_ms_per_token")
    run.add_argument("--logits-out", metavar="FILE.npy",
                     help="save the float32 logits [n_decode, n_vocab] each decoded token was chosen from")
    run.set_defaults(func=_cmd_run)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)",
                           description="Serve the model over HTTP with the OpenAI API: /v1/models, /v1/completions "
                                       "and /v1/chat/completions (streaming too), /metrics (Prometheus text). Each "
                                       "response carries its cache counters under \"slicemoe\". --parallel requests "
                                       "decode together; the others wait in arrival order. A parameter the server does not "
                                       "honour (tools, n > 1, ...) is a 400 that names it. SIGTERM or Ctrl-C stops "
                                       "every decode at its next token and exits.")
    _add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    serve.add_argument("--alias", metavar="NAME", help="model id in the API (default: the file name)")
    serve.add_argument("-np", "--parallel", type=int, default=1, metavar="N",
                       help="requests decoded together in one batch per token, the cache serving the union of "
                            "their experts; each gets --ctx-size / N tokens of context (default 1)")
    serve.add_argument("--max-queue", type=int, default=defaults.MAX_QUEUE, metavar="N",
                       help=f"requests that may wait for the model; more get 503 with Retry-After "
                            f"(default {defaults.MAX_QUEUE})")
    serve.add_argument("--max-wait", type=float, default=defaults.MAX_WAIT_S, metavar="SECONDS",
                       help=f"the longest a request waits for the model before a 503 (default {defaults.MAX_WAIT_S} s)")
    _add_cache_arguments(serve, live=True)
    serve.set_defaults(func=_cmd_serve)

    chat = sub.add_parser("chat", help="an interactive chat in the terminal",
                          description="Chat with the model in the terminal: its chat template, streamed replies "
                                      "and one line of cache numbers after each. /reset clears the history; "
                                      "Ctrl-C stops a reply; Ctrl-D or Ctrl-C at the prompt exits.")
    _add_model_arguments(chat)
    chat.add_argument("-n", "--n-predict", type=int, default=256, help="most tokens per reply (default 256)")
    chat.add_argument("--system", metavar="TEXT", help="a system message that opens the conversation")
    chat.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1 = off)")
    chat.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    _add_cache_arguments(chat, live=True)
    chat.set_defaults(func=_cmd_chat)

    demo = sub.add_parser("demo", help="the embedded Shakespeare MoE under a tight RAM budget: SliceMoE vs lru8",
                          description="Convert the embedded model once (cached), decode a prompt with a tight "
                                      "budget under SliceMoE (dbsc + pcw) and under whole-expert lru8, and print "
                                      "the text with a table of hits, misses, flash traffic, modelled energy and "
                                      "measured ms/token.")
    demo.add_argument("--model-path", action="store_true",
                      help="print the converted GGUF's path (converting it if needed) and exit")
    demo.add_argument("-p", "--prompt", default=DEMO_PROMPT, help="prompt text (default: a line of Romeo)")
    demo.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to decode (default 64)")
    demo.add_argument("--cache-budget", default="25%", metavar="SIZE",
                      help="bytes with a unit or a percentage of all expert slice bytes (default 25%%)")
    demo.add_argument("-t", "--threads", type=int, default=defaults.N_THREADS,
                      help="compute threads (default: one per fast core; every core where they are alike)")
    demo.add_argument("--runs", type=int, default=3,
                      help="runs per policy, alternating; ms/token is their median (default 3)")
    _add_profile_argument(demo)
    demo.set_defaults(func=_cmd_demo)

    trace = sub.add_parser("trace", help="record expert routing to a slicemoe-trace JSONL file",
                           description="Run greedy decoding and record, for every MoE layer of every token, "
                                       "the chosen experts and their router probabilities (format in docs/design.md).")
    _add_model_arguments(trace)
    source = trace.add_mutually_exclusive_group(required=True)
    source.add_argument("-p", "--prompt", help="prompt text (one request)")
    source.add_argument("-f", "--file", help="prompts, one request per non-empty line")
    trace.add_argument("-n", "--n-predict", type=int, default=defaults.N_PREDICT,
                       help=f"tokens to decode per request (default {defaults.N_PREDICT})")
    trace.add_argument("-o", "--output", required=True, help="the .jsonl file to write")
    trace.add_argument("--ignore-eos", action="store_true", help="keep decoding past end-of-generation tokens")
    _add_cache_arguments(trace, live=True)
    trace.set_defaults(func=_cmd_trace)

    sim = sub.add_parser("sim", help="replay a routing trace through the cache manager (no compute)",
                         description="Drive the native slice cache with a recorded trace: the same policies as "
                                     "slicemoe run, plus belady (the offline optimum).")
    sim.add_argument("trace", help="a slicemoe-trace .jsonl file")
    _add_cache_arguments(sim, live=False)
    _add_profile_argument(sim)
    sim.add_argument("--json", action="store_true",
                     help="one JSON object, with the counter names of slicemoe run --json's cache object")
    sim.set_defaults(func=_cmd_sim)

    plan = sub.add_parser("plan", help="a dbsc deployment meeting a miss-rate target, with what it costs in accuracy",
                          description="Miss-rate-constrained deployment on a trace. With --cache-budget and "
                                      "--max-miss-rate: the configuration with the most 8-bit uses (the lowest "
                                      "--high-threshold, else every use at 4 bits) whose slice miss rate meets the "
                                      "target at that budget, with its share of 8-bit uses (and with --accuracy, its "
                                      "KL and top-1 agreement against the 8-bit model on held-out text). With "
                                      "--max-miss-rate alone: the smallest budget (and MSB split) that meets it. With "
                                      "--cache-budget alone: the MSB split with the lowest miss rate at that budget.")
    plan.add_argument("trace", help="a slicemoe-trace .jsonl file")
    plan.add_argument("--max-miss-rate", type=float, metavar="R", help="target slice miss rate, e.g. 0.05")
    plan.add_argument("--cache-budget", metavar="SIZE", help="a fixed budget (bytes with a unit, or %% of slices)")
    plan.add_argument("--accuracy", action="store_true",
                      help="with both targets: measure the answer's KL and top-1 agreement against the 8-bit model "
                           "(teacher-forced, held-out text; see --model and --text)")
    plan.add_argument("-m", "--model", metavar="GGUF",
                      help="--accuracy: the sliced model the trace is of (default: the embedded model)")
    plan.add_argument("--text", metavar="FILE",
                      help="--accuracy: held-out text (default: the embedded model's held-out plays)")
    plan.add_argument("--high-threshold", type=float, default=defaults.HIGH_THRESHOLD, metavar="W",
                      help=f"as slicemoe run (default {defaults.HIGH_THRESHOLD})")
    plan.add_argument("--per-layer", action="store_true",
                      help="with --cache-budget: AdapMoE's DP allocation of whole-expert slots across layers "
                           "(policy lru8 or adapmoe) instead of an MSB share")
    plan.add_argument("--policy", choices=["lru8", "adapmoe"], default="lru8", help="--per-layer only")
    plan.add_argument("--gating-t", type=float, default=defaults.GATING_T, metavar="T",
                      help=f"--per-layer with adapmoe (default {defaults.GATING_T})")
    plan.add_argument("--warmup", choices=["pcw", "none"], default=defaults.WARMUP,
                      help=f"as slicemoe run (default {defaults.WARMUP})")
    _add_profile_argument(plan)
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=_cmd_plan)
    return parser


def _open_model(args: argparse.Namespace, n_seq: int = 1):
    from .runtime import Model

    return Model(args.model, n_gpu_layers=args.gpu_layers, n_ctx=args.ctx_size, n_batch=args.batch_size,
                 n_threads=args.threads, cache_budget=_cache_budget(args), prefetch=args.prefetch, io_mode=args.io_mode,
                 n_seq=n_seq, **_cache_settings(args))


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    with _open_model(args, n_seq=args.parallel) as model:
        serve(model, host=args.host, port=args.port, name=args.alias, max_queue=args.max_queue,
              max_wait_s=args.max_wait)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from .chat import chat

    with _open_model(args) as model:
        return chat(model, max_tokens=args.n_predict, system=args.system,
                    sampling_args=(args.temp, args.top_p, args.seed))


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and context flags of run, trace, serve and chat."""
    parser.add_argument("-m", "--model", required=True, help="path to a .gguf file (a sliced or a stock model)")
    parser.add_argument("-t", "--threads", type=int, default=defaults.N_THREADS,
                        help="compute threads (default: one per fast core; every core where they are alike)")
    parser.add_argument("-c", "--ctx-size", type=int, default=defaults.N_CTX,
                        help=f"context length in tokens (default {defaults.N_CTX})")
    parser.add_argument("-b", "--batch-size", type=int, default=defaults.N_BATCH,
                        help=f"prompt tokens per llama_decode call (default {defaults.N_BATCH})")
    parser.add_argument("-ngl", "--gpu-layers", type=int, default=0,
                        help="layers to offload to a GPU backend (Vulkan/Metal); -1 = all (default 0)")


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.command == "plan" and args.max_miss_rate is not None and not 0.0 <= args.max_miss_rate < 1.0:
        parser.error("--max-miss-rate must be in [0, 1)")
    if args.command in ("trace", "demo") and args.n_predict < 1:
        parser.error("-n/--n-predict must be >= 1")
    if args.command == "demo" and args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.command in ("run", "trace", "sim", "serve", "chat"):
        if not 0.0 <= args.high_threshold <= 1.0 or not 0.0 <= args.max_miss_rate < 1.0 or \
                not 0.0 <= args.high_ratio <= 1.0 or not 0.0 <= args.msb_share <= 1.0 or \
                not 0.0 <= args.prior_lambda <= 1e6 or not 0.0 <= args.gating_t <= 1.0:
            parser.error("--high-threshold, --high-ratio, --msb-share and --gating-t must be in [0, 1], "
                         "--max-miss-rate in [0, 1), --prior-lambda in [0, 1e6]")
    if args.command == "serve" and not 0 <= args.port < 65536:
        parser.error("--port must be in [0, 65535]")
    if args.command == "serve" and (args.max_queue < 0 or not args.max_wait > 0 or not 1 <= args.parallel <= 64):
        parser.error("--max-queue must be >= 0, --max-wait > 0 (seconds) and --parallel in [1, 64]")
    if args.command == "run":
        if args.prompt is None and args.file is None and not args.route_trace:
            parser.error("one of -p/--prompt, -f/--file or --route-trace is required")
        if args.request is not None and not args.route_trace:
            parser.error("--request needs --route-trace")
        if args.route_trace and args.chat:
            parser.error("--route-trace replays a recorded request; it takes no --chat")
    if args.command in ("run", "chat"):
        if args.n_predict < 0:
            parser.error("-n/--n-predict must be >= 0")
        if args.ctx_size < 0 or args.batch_size < 1:
            parser.error("--ctx-size must be >= 0 and --batch-size >= 1")
        if not 0.0 < args.top_p <= 1.0:
            parser.error("--top-p must be in (0, 1]")
        if not 0 <= args.seed < 2**32:
            parser.error("--seed must be in [0, 2^32)")


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()   # the policy choices come from the native library
    except SliceMoEError as exc:
        print(f"slicemoe: error: {exc}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    _validate(args, parser)
    try:
        from ._native import lib
        if args.verbose:
            lib().slicemoe_set_verbose(True)
        return args.func(args)
    except SliceMoEError as exc:
        print(f"slicemoe: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("slicemoe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
