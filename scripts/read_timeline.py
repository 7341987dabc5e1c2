"""Summarise a read timeline (SLICEMOE_READ_TIMELINE=PATH): when each step's slice reads were
submitted, started and ended, to see whether reads overlap compute and what holds them up.

    SLICEMOE_READ_TIMELINE=/tmp/reads.tsv slicemoe run -m M.gguf --cache-budget 50% -n 32 ...
    python scripts/read_timeline.py /tmp/reads.tsv

Per step (an urgent batch: one MoE layer's misses of one decode token) it takes the time from
submission to the first read's start (waking a reader), the batch's span (submission to its last
read's end) and what follows until the next step is submitted (the products after the last read
landed, then the next layer's attention and router). Over the decode it prints the share of time
the device had a read in flight: reads that overlap compute keep it busy while the products run.
Batches submitted within --skip-ms of the first (loading and warm-up) are left out.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys


def busy_ns(intervals: list[tuple[int, int]]) -> int:
    """Length of the union of [start, end) intervals."""
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("timeline", help="the TSV written by SLICEMOE_READ_TIMELINE")
    parser.add_argument("--skip-ms", type=float, default=0.0,
                        help="leave out batches submitted within this many ms of the first (default 0)")
    args = parser.parse_args(argv)
    try:
        with open(args.timeline, newline="") as f:
            rows = [{k: int(v) for k, v in row.items()} for row in csv.DictReader(f, delimiter="\t")]
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot read the timeline {args.timeline!r}: {e}", file=sys.stderr)
        return 1
    steps: dict[int, list[dict]] = {}
    for row in rows:
        if row["urgent"]:
            steps.setdefault(row["batch"], []).append(row)
    if not steps:
        print("no step reads in the timeline (nothing missed?)", file=sys.stderr)
        return 1
    first = min(r[0]["submitted_ns"] for r in steps.values())
    order = sorted((b for b in steps if steps[b][0]["submitted_ns"] - first >= args.skip_ms * 1e6),
                   key=lambda b: steps[b][0]["submitted_ns"])
    wake, span, after, rates, callers = [], [], [], [], 0
    for here, following in zip(order, order[1:] + [None]):
        reads = steps[here]
        submitted = reads[0]["submitted_ns"]
        last_end = max(r["ended_ns"] for r in reads)
        wake.append((min(r["started_ns"] for r in reads) - submitted) / 1e6)
        span.append((last_end - submitted) / 1e6)
        rates.append(sum(r["bytes"] for r in reads) / max(1, last_end - submitted))   # bytes/ns = GB/s
        callers += sum(r["by_caller"] for r in reads)
        if following is not None:
            after.append((steps[following][0]["submitted_ns"] - last_end) / 1e6)
    window_start = steps[order[0]][0]["submitted_ns"]
    window_end = max(r["ended_ns"] for b in order for r in steps[b])
    all_reads = [r for b in order for r in steps[b]]
    busy = busy_ns([(r["started_ns"], r["ended_ns"]) for r in all_reads])
    n_bytes = sum(r["bytes"] for r in all_reads)
    print(f"{len(order)} steps, {len(all_reads)} reads, {n_bytes / 1e6:.1f} MB over {(window_end - window_start) / 1e6:.1f} ms "
          f"({callers} read by the waiting thread)")
    print(f"device busy {100.0 * busy / max(1, window_end - window_start):.1f}% of the window; "
          f"{n_bytes / max(1, busy):.2f} GB/s while busy")
    print("per step (median, p90):")
    for name, values, unit in (("submission to first read start", wake, "ms"), ("submission to last read end", span, "ms"),
                               ("last read end to next step", after, "ms"), ("step read rate", rates, "GB/s")):
        values = sorted(values)
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        print(f"  {name:32s} {statistics.median(values):8.3f} {p90:8.3f} {unit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
