#!/usr/bin/env python3
"""The accuracy-speed front, a table and a plot per RAM limit: every configuration as a point whose
x is its decode time at full size under that limit (scripts/bench_side_by_side.py --json: trace-
driven, page cache dropped, a memory cgroup per row) and whose y is its KL against fp32 on a trained
model's held-out text (scripts/bench_front.py --json: the same encoding and policy, teacher-forced).
The two scripts name a configuration alike ("lru8", "dbsc + pcw, threshold 0.5", "stock Q4_K_M
(mmap)"); a stock file's accuracy is its whole file's, the same under every limit. `slicemoe plan`'s
answer (bench_side_by_side.py --plan-miss-rate) is chosen on the speed run's trace and takes the
accuracy of the configuration it chose (bench_front.py scores every threshold plan may choose).

A dbsc point's two runs should use their 8-bit slices alike: the table gives the share of uses at 8
bits in each (bench_side_by_side.py --match-shares runs the speed side at the accuracy side's share).

The issue's targets are checked on the points and printed with the tables:
- at every limit, some dbsc point that no stock point beats on both axes (faster and more accurate);
- at 25% and 50%, a dbsc point with KL at most stock Q5_K_M's that is faster than every stock file
  (a stock row that did not finish under the limit counts as slower).

    python scripts/plot_front.py --speed side.json --accuracy front.json -o results/front
      -> results/front.md, results/front_25.png, results/front_50.png, ...
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


@dataclass
class Point:
    name: str
    ms: float | None        # decode ms/token under the limit; None: did not finish (error says why)
    kl: float | None        # None: no accuracy measured for this configuration
    top1: float | None
    error: str = ""
    shares: tuple = (None, None)   # the share of uses at 8 bits in the speed run and in the accuracy run

    @property
    def stock(self) -> bool:
        return self.name.startswith("stock ")

    @property
    def dbsc(self) -> bool:   # plan's answer is a dbsc deployment too
        return self.name.startswith(("dbsc", "plan"))

    def beats(self, other: "Point") -> bool:
        """Faster and more accurate, at least as good on both and better on one."""
        if None in (self.ms, self.kl, other.kl):
            return False
        other_ms = other.ms if other.ms is not None else float("inf")
        return self.ms <= other_ms and self.kl <= other.kl and (self.ms < other_ms or self.kl < other.kl)


def nearest_share(row: dict, scored_at: dict) -> str | None:
    """The plain dbsc row of the accuracy run whose share of 8-bit uses is nearest the speed row's,
    where both runs recorded shares: plan's threshold was chosen on the speed trace, whose routing
    weights are on another scale than the accuracy model's (see bench_side_by_side.py --match-shares)."""
    if row.get("high_share") is None or row["settings"]["precision"] == "low":
        return None
    candidates = {name: scored["high_share"] for name, scored in scored_at.items()
                  if (name == "dbsc + pcw" or name.startswith("dbsc + pcw, threshold ")) and "high_share" in scored}
    return min(candidates, key=lambda name: abs(candidates[name] - row["high_share"]), default=None)


def points_at(budget: str, speed: dict, accuracy: dict) -> list[Point]:
    points = []
    scored_at = accuracy["budgets"].get(budget, {})
    for name, row in speed["budgets"][budget].items():
        # plan's answer was chosen on the speed run's trace: its accuracy is that of the same
        # computation, at the nearest share of 8-bit uses where the runs recorded shares
        same = (nearest_share(row, scored_at) or benchlib.same_computation(row["settings"])) if "settings" in row else name
        scored = scored_at.get(same) or accuracy["files"].get(name) or {}
        points.append(Point(name, row.get("decode_ms"), scored.get("kl"), scored.get("top1"), row.get("error", ""),
                            (row.get("high_share"), scored.get("high_share"))))
    return points


def targets_at(budget: str, points: list[Point]) -> list[str]:
    stock = [p for p in points if p.stock]
    dbsc = [p for p in points if p.dbsc and p.ms is not None and p.kl is not None]
    lines = []
    unbeaten = [p for p in dbsc if not any(s.beats(p) for s in stock)]
    lines.append(f"- {budget}%: dbsc points that no stock file beats on both axes: "
                 f"{', '.join(p.name for p in unbeaten) or 'none'} ({len(unbeaten)} of {len(dbsc)})"
                 f" -> {'met' if unbeaten else 'NOT met'}")
    if budget in ("25", "50"):
        q5 = next((p for p in stock if "Q5_K_M" in p.name and p.kl is not None), None)
        if q5 is None:
            lines.append(f"- {budget}%: no stock Q5_K_M point to compare with")
        else:
            finished = [s.ms for s in stock if s.ms is not None]
            fastest_stock = min(finished) if finished else float("inf")
            good = [p for p in dbsc if p.kl <= q5.kl and p.ms < fastest_stock]
            best = min((p for p in dbsc if p.kl <= q5.kl), key=lambda p: p.ms, default=None)
            fastest = f"{fastest_stock:.1f} ms/token" if finished else "no stock file finished under the limit"
            lines.append(f"- {budget}%: a dbsc point at most Q5_K_M's KL ({q5.kl:.2e}) faster than every stock file "
                         f"({fastest}): " +
                         (", ".join(f"{p.name} {p.ms:.1f} ms/token" for p in good) if good else
                          f"none (the fastest such point: {best.name} {best.ms:.1f})" if best else "none") +
                         f" -> {'met' if good else 'NOT met'}")
    return lines


def table(points: list[Point]) -> str:
    rows = []
    for p in sorted(points, key=lambda p: (p.ms is None, p.ms or 0.0)):
        beaten_by = [q.name for q in points if q is not p and q.beats(p)]
        rows.append([p.name, f"{p.ms:.1f}" if p.ms is not None else f"- ({p.error})",
                     f"{p.kl:.2e}" if p.kl is not None else "-", f"{100 * p.top1:.2f}%" if p.top1 is not None else "-",
                     "on the front" if p.kl is not None and p.ms is not None and not beaten_by else
                     ("beaten by " + ", ".join(beaten_by) if beaten_by else "-"),
                     " / ".join("-" if share is None else f"{100 * share:.0f}%" for share in p.shares)])
    return benchlib.markdown_table(["configuration", "decode ms/token", "KL (nats)", "top-1", "front",
                                    "8-bit uses (speed / accuracy run)"], rows)


def plot(path: Path, budget: str, limit_mib: float, points: list[Point]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, marker, color in (("stock", "s", "tab:red"), ("dbsc", "o", "tab:blue"), ("other", "^", "tab:gray")):
        # dbsc: its thresholds and plan's answer; other: whole-expert and 4-bit caches of the same file
        chosen = [p for p in points if p.ms is not None and p.kl is not None and
                  (p.stock if kind == "stock" else p.dbsc if kind == "dbsc" else not (p.stock or p.dbsc))]
        ax.scatter([p.ms for p in chosen], [p.kl for p in chosen], marker=marker, color=color,
                   label={"stock": "stock llama.cpp (mmap)", "dbsc": "SliceMoE dbsc (and plan's answer)", "other": "other slice caches"}[kind])
        for p in chosen:
            ax.annotate(p.name.replace("stock ", "").replace(" (mmap)", ""), (p.ms, p.kl), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="decode ms/token at full size under the limit (log)", ylabel="KL against fp32, nats (log)",
           title=f"{budget}% of the 8-bit expert bytes (RAM limit {limit_mib:.0f} MiB): lower left is better")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed", type=Path, required=True, help="bench_side_by_side.py --json output")
    parser.add_argument("--accuracy", type=Path, required=True, help="bench_front.py --json output")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="path prefix: PREFIX.md and PREFIX_<budget>.png are written")
    args = parser.parse_args()
    speed, accuracy = json.loads(args.speed.read_text()), json.loads(args.accuracy.read_text())

    sections = [f"Speed: {speed['model']} full shape, {speed['n_decode']} decode tokens, trace-driven, page cache "
                f"dropped before every row; {speed['machine']}. Accuracy: `{accuracy['model']}`, {accuracy['windows']} "
                f"held-out windows x {accuracy['scored_tokens']} tokens, teacher-forced, against fp32; "
                f"{accuracy['machine']}.", ""]
    checks = []
    for budget in sorted(speed["budgets"], key=int):
        points = points_at(budget, speed, accuracy)
        image = args.output.with_name(f"{args.output.name}_{budget}.png")
        plot(image, budget, speed["limits_mib"][budget], points)
        sections += [f"## {budget}% (RAM limit {speed['limits_mib'][budget]:.0f} MiB)", "", f"![front]({image.name})", "",
                     table(points), ""]
        checks += targets_at(budget, points)
    report = "\n".join(sections + ["## Targets", ""] + checks)
    benchlib.emit(report, args.output.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
