"""Concurrent clients on `slicemoe serve`: what --parallel does to throughput and to flash reads,
and how fast SIGTERM stops a long request. Side by side in one run:

    python scripts/bench_concurrency.py [--model M.gguf] [-n 64] [--repeats 3] [--cache-budget 50%]

Rows (each a server of its own, loaded once; the rows alternate per repeat and the table shows
medians): one client on --parallel 1 (the baseline), four clients at once on --parallel 1 (they
queue), four clients at once on --parallel 4 (they share batches). Aggregate tokens/s is every
completion token over the wall time from the first request sent to the last reply received; flash
bytes per token is the server's own flash_read_bytes_total over completion_tokens_total (/metrics).
Then SIGTERM under a running 5000-token stream: seconds to the stream's finish reason and to the
process's exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import threading
import time
import urllib.request

from benchlib import ServeProcess

PROMPTS = ["ROMEO.\nBut soft, what light through yonder window breaks?", "JULIET.\nO Romeo, Romeo, wherefore",
           "HAMLET.\nTo be, or not to be, that is", "KING RICHARD.\nNow is the winter of our discontent"]


def complete(base: str, prompt: str, n: int) -> int:
    body = json.dumps({"prompt": prompt, "max_tokens": n, "temperature": 0}).encode()
    request = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())["usage"]["completion_tokens"]


def clients_at_once(server: ServeProcess, prompts: list[str], n: int) -> tuple[float, float]:
    """(aggregate tokens/s, flash bytes per completion token) of the prompts sent at once."""
    before = server.metrics()
    tokens = [0] * len(prompts)
    barrier = threading.Barrier(len(prompts) + 1)

    def client(i: int) -> None:
        barrier.wait()
        tokens[i] = complete(server.base, prompts[i], n)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = server.metrics()
    flash = after["slicemoe_flash_read_bytes_total"] - before["slicemoe_flash_read_bytes_total"]
    generated = after["slicemoe_completion_tokens_total"] - before["slicemoe_completion_tokens_total"]
    return sum(tokens) / wall, flash / max(generated, 1)


def sigterm_under_a_long_stream(model: str, flags: list[str]) -> tuple[float, float]:
    server = ServeProcess(model, ["-c", "8192", *flags])
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps({"prompt": PROMPTS[0], "max_tokens": 5000,
                                                             "temperature": 0, "stream": True}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.readline()
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    signalled = time.perf_counter()
    finished = None
    for line in response:
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["finish_reason"]:
            finished = time.perf_counter() - signalled
    status = server.proc.wait(timeout=60)
    exited = time.perf_counter() - signalled
    if status != 0:
        raise SystemExit(f"slicemoe serve exited {status} on SIGTERM")
    return finished if finished is not None else float("nan"), exited


def main() -> int:
    from slicemoe_gguf.embedded import embedded_gguf

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF (default: the embedded model)")
    parser.add_argument("-n", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-budget", default="50%")
    parser.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    model = args.model or str(embedded_gguf(progress=False))
    flags = ["--cache-budget", args.cache_budget, "-t", str(args.threads)]

    rows = {"1 client, --parallel 1": ("1", PROMPTS[:1]), "4 clients, --parallel 1": ("1", PROMPTS),
            "4 clients, --parallel 4": ("4", PROMPTS)}
    servers = {"1": ServeProcess(model, ["-c", "2048", "--parallel", "1", *flags]),
               "4": ServeProcess(model, ["-c", "8192", "--parallel", "4", *flags])}
    results: dict[str, list[tuple[float, float]]] = {label: [] for label in rows}
    try:
        for server in servers.values():   # one warm-up round each: first-touch costs out of the numbers
            clients_at_once(server, PROMPTS, 8)
        for _ in range(args.repeats):
            for label, (parallel, prompts) in rows.items():
                results[label].append(clients_at_once(servers[parallel], prompts, args.n))
    finally:
        for server in servers.values():
            server.stop()

    print(f"{os.path.basename(model)}, cache budget {args.cache_budget}, {args.n} tokens per request, "
          f"{args.threads} threads, median of {args.repeats} (rows alternate)\n")
    print("| clients, slots | aggregate tokens/s | flash bytes per token |")
    print("|---|---|---|")
    medians = {}
    for label, runs in results.items():
        medians[label] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        print(f"| {label} | {medians[label][0]:.1f} | {medians[label][1]:.0f} |")
    one, queued, batched = (medians[label] for label in rows)
    print(f"\n--parallel 4 with 4 clients: {batched[0] / one[0]:.2f}x one client's tokens/s "
          f"({batched[0] / queued[0]:.2f}x the same 4 clients queued on --parallel 1); "
          f"{batched[1] / max(one[1], 1):.2f}x one client's flash bytes per token.")
    finish_s, exit_s = sigterm_under_a_long_stream(model, flags)
    print(f"SIGTERM under a 5000-token stream: finish reason after {finish_s:.2f} s, exit 0 after {exit_s:.2f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
