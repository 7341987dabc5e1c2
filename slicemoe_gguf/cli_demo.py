"""`slicemoe demo`: the embedded model under a few cache policies, side by side."""

from __future__ import annotations

import argparse
import os

import numpy as np

from ._native import SliceMoEError
from .units import format_size
from .cli_run import _modelled, _parse_budget, _profiles


DEMO_PROMPT = "ROMEO.\nBut soft, what light"


def cmd_demo(args: argparse.Namespace) -> int:
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
