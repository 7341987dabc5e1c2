"""`slicemoe sim` and `slicemoe plan`: trace replay, the offline optimum, and the planner's answers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from ._native import SliceMoEError
from .units import format_size
from .cli_run import _cache_settings, _modelled, _parse_budget, _profiles, _read_trace


def cmd_sim(args: argparse.Namespace) -> int:
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


def cmd_plan(args: argparse.Namespace) -> int:
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
