"""Miss I/O, side by side: O_DIRECT against buffered reads under the same cache, page cache dropped
before every run.

    sudo python scripts/bench_io.py [--model M.gguf] [--cache-budget 25%] [-n 64] [--repeats 3]

Runs `slicemoe run --json --ignore-eos` alternately with `--io direct` and `--io buffered` and prints
medians of decode ms/token, the time blocked on reads per token, flash MB per token and the
effective read bandwidth (flash bytes / time blocked on reads), with the ratio direct / buffered.
The runs read each step's misses before its products run (SLICEMOE_OVERLAP=0), so that the time
blocked is the reads' own time, not what is left of it once overlapped with compute.
Dropping the page cache needs root (`echo 1 > /proc/sys/vm/drop_caches`); without it the script
says so and the buffered rows may be served from memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path

PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun."


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def main() -> int:
    from slicemoe_gguf.embedded import embedded_gguf

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a sliced GGUF (default: the embedded model)")
    parser.add_argument("--cache-budget", default="25%")
    parser.add_argument("-n", type=int, default=64, help="tokens to decode (default 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("-t", "--threads", type=int, default=2)
    args = parser.parse_args()
    model = args.model or str(embedded_gguf(progress=False))

    rows: dict[str, list[dict]] = {"direct": [], "buffered": []}
    dropped = True
    for _ in range(args.repeats):
        for mode in rows:
            dropped = drop_page_cache() and dropped
            out = json.loads(subprocess.run(
                ["slicemoe", "run", "-m", model, "-p", PROMPT, "-n", str(args.n), "--ignore-eos", "--json",
                 "--cache-budget", args.cache_budget, "--io", mode, "-t", str(args.threads)],
                capture_output=True, text=True, check=True, env={**os.environ, "SLICEMOE_OVERLAP": "0"}).stdout)
            cache = out["cache"]
            assert cache["io_mode"] == mode, cache["io_mode"]
            tokens = max(cache["decode_tokens"], 1)
            rows[mode].append({"ms_per_token": out["decode_ms_per_token"], "io_ms_per_token": cache["io_ms"] / tokens,
                               "flash_mb_per_token": cache["flash_bytes"] / tokens / 1e6,
                               "gb_per_s": cache["flash_bytes"] / max(cache["io_ms"], 1e-9) / 1e6})
    med = {mode: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for mode, runs in rows.items()}
    print(f"model {model}, cache budget {args.cache_budget}, {args.n} tokens, {args.threads} threads, median of "
          f"{args.repeats}; page cache {'dropped before each run' if dropped else 'NOT dropped (needs root)'}")
    print(f"{'':24} {'direct':>10} {'buffered':>10} {'ratio':>7}")
    for key, label in (("ms_per_token", "decode ms/token"), ("io_ms_per_token", "blocked on reads ms/token"),
                       ("flash_mb_per_token", "flash MB/token"), ("gb_per_s", "effective read GB/s")):
        d, b = med["direct"][key], med["buffered"][key]
        print(f"{label:24} {d:10.3f} {b:10.3f} {d / b if b else float('nan'):7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
