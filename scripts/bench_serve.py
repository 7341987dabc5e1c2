"""Server overhead: `slicemoe serve` streaming to one client against `slicemoe run`, side by side.

    python scripts/bench_serve.py [--model M.gguf] [-n 64] [--repeats 5] [--cache-budget 50%]

Per repeat (alternating): `slicemoe run --json` (decode ms/token as the engine measures it, and
the wall time of prefill plus the first token) and one streamed /v1/completions request through
the official OpenAI client (tokens/s between the first and the last chunk, and time to first
token measured by the client). Prints medians and the ratios. One model load per side: the server
runs throughout, run loads per repeat, and load time is excluded on both sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

from benchlib import ServeProcess

PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?"


def main() -> int:
    from slicemoe_gguf.embedded import embedded_gguf

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF (default: the embedded model)")
    parser.add_argument("-n", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache-budget", default="50%")
    parser.add_argument("-t", "--threads", type=int, default=2)
    args = parser.parse_args()
    model = args.model or str(embedded_gguf(progress=False))
    flags = ["--cache-budget", args.cache_budget, "-t", str(args.threads), "-c", "512"]

    import openai

    server = ServeProcess(model, flags)
    try:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0)
        run_ms, run_first, http_ms, http_first = [], [], [], []
        for _ in range(args.repeats):
            out = json.loads(subprocess.run(["slicemoe", "run", "-m", model, "-p", PROMPT, "-n", str(args.n),
                                             "--ignore-eos", "--json", *flags], capture_output=True, text=True,
                                            check=True).stdout)
            run_ms.append(out["decode_ms_per_token"])
            run_first.append(out["prefill_ms"])
            start = time.perf_counter()
            stamps = []
            for chunk in client.completions.create(model="m", prompt=PROMPT, max_tokens=args.n, temperature=0,
                                                   stream=True):
                if chunk.choices and chunk.choices[0].text:
                    stamps.append(time.perf_counter())
            http_first.append(1000 * (stamps[0] - start))
            http_ms.append(1000 * (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1))
    finally:
        server.stop()

    med = statistics.median
    print(f"model {model}, {args.n} tokens, cache budget {args.cache_budget}, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'':28} {'slicemoe run':>14} {'serve (HTTP)':>14} {'ratio':>7}")
    print(f"{'decode ms/token':28} {med(run_ms):14.2f} {med(http_ms):14.2f} {med(http_ms) / med(run_ms):7.2f}")
    print(f"{'tokens/s':28} {1000 / med(run_ms):14.1f} {1000 / med(http_ms):14.1f} {med(run_ms) / med(http_ms):7.2f}")
    print(f"{'time to first token, ms':28} {med(run_first):14.1f} {med(http_first):14.1f} "
          f"{med(http_first) / med(run_first):7.2f}")
    print("(run's first token: its prefill; serve's: request sent to first chunk received, tokenizing, prefill, "
          "the first decode step and HTTP included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
