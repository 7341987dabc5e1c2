#!/usr/bin/env python3
"""Decode under a RAM budget on the embedded trained model: every policy side by side.

The same held-out windows (default 8 x (16 prompt + 64 decode) tokens) run through the engine for
each policy at budgets of 25/50/75/100% of the 8-bit expert bytes (MSB + LSB slices), plus the
all-resident AMAT model (no cache, every expert mapped) and the stock llama.cpp path on the
`--experts q8_0` conversion. Reported per row:

- decode ms/token measured on this machine. Misses are real reads of the GGUF: pread, then
  POSIX_FADV_DONTNEED on the range so the next miss of that slice goes to the device again, and the
  page cache is dropped before each row when run as root. This machine's disk is a virtual disk
  cached by its host, not phone flash: the device columns come from the profiles instead.
- flash MB/token; modelled energy (mJ/token) and latency (ms/token: memory traffic from the profile
  plus this machine's measured compute) for the phone and laptop profiles (slicemoe_gguf/profiles).
- KL(fp32 || engine) and top-1 agreement against transformers' fp32 run of the same checkpoint,
  teacher-forced on the same tokens, and the engine's perplexity.
- ratios against lru8 at the same budget.

    python scripts/bench_decode.py [--quick] [--out results/]

Writes decode.md (the tables) and decode.png (ms/token and modelled phone energy against budget).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

# warm-up named in every row: PCW is its own row, the others run without it
POLICIES = [("lru8", {"policy": "lru8", "warmup": "none"}), ("lru4", {"policy": "lru4", "warmup": "none"}),
            ("hobbit", {"policy": "hobbit", "warmup": "none"}), ("dymoe", {"policy": "dymoe", "warmup": "none"}),
            ("dbsc", {"policy": "dbsc", "warmup": "none"}), ("dbsc + pcw", {"policy": "dbsc", "warmup": "pcw"})]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 windows x 32 decode tokens, budgets 25/50%% (~1 min)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=16, help="prefill tokens per window")
    parser.add_argument("--decode", type=int, default=64, help="decode tokens per window")
    parser.add_argument("--budgets", default="25,50,75,100", help="percent of the 8-bit expert bytes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results"), help="directory for decode.md and decode.png")
    args = parser.parse_args()
    if args.quick:
        args.windows, args.decode, args.budgets = 3, 32, "25,50"
    budgets = [int(b) for b in args.budgets.split(",")]

    from slicemoe_gguf.embedded import embedded_gguf
    from slicemoe_gguf.model_info import describe

    amat, q8 = embedded_gguf(), embedded_gguf(experts="q8_0")
    info = describe(amat)
    total = info["expert_msb_bytes"] + info["expert_lsb_bytes"]
    windows = benchlib.heldout_windows(args.windows, args.prompt + args.decode + 1)
    reference = benchlib.hf_reference(windows, args.prompt)

    def measure(label, path, **kw):
        run = benchlib.engine_run(path, windows, args.prompt, threads=args.threads, **kw)
        row = {"label": label, "run": run, **benchlib.agreement(reference, run.logprobs, windows, args.prompt)}
        print(f"  {label}: {run.ms_per_token:.2f} ms/token, KL {row['kl']:.4f}", file=sys.stderr, flush=True)
        return row

    print(f"embedded model: {len(info['layers'])} MoE layers x {info['n_experts']} experts, "
          f"{total / 1e6:.2f} MB of 8-bit expert slices", file=sys.stderr)
    baselines = [measure("stock q8_0 (llama.cpp path, all resident)", q8),
                 measure("AMAT 8-bit, all resident (no cache)", amat, precision="high")]
    by_budget = {}
    for b in budgets:
        budget = total * b // 100
        by_budget[b] = [measure(f"{name} @ {b}%", amat, cache_budget=budget, **kw) for name, kw in POLICIES]

    out = [f"Embedded model ({info['name']}: {len(info['layers'])} MoE layers x {info['n_experts']} experts, "
           f"top-{info['top_k']}, {total / 1e6:.2f} MB of 8-bit expert slices); {len(windows)} held-out windows x "
           f"{args.decode} decode tokens after a {args.prompt}-token prompt; {args.threads} threads; "
           f"{benchlib.machine_line()}.", ""]
    header = ["configuration", "ms/token", "flash MB/token", "phone mJ/token", "phone ms/token", "laptop mJ/token",
              "laptop ms/token", "KL (nats)", "top-1", "ppl", "vs lru8: flash", "vs lru8: phone energy",
              "vs lru8: speed"]
    rows = []
    for r in baselines:
        rows.append([r["label"], f"{r['run'].ms_per_token:.2f}", "0", "-", "-", "-", "-", f"{r['kl']:.2e}",
                     f"{100 * r['top1']:.1f}%", f"{r['ppl']:.2f}", "-", "-", "-"])
    for b, group in by_budget.items():
        lru = group[0]["run"]
        for r in group:
            run, m = r["run"], r["run"].modelled
            tokens = max(run.stats["decode_tokens"], 1)
            rows.append([r["label"], f"{run.ms_per_token:.2f}", f"{run.stats['flash_bytes'] / tokens / 1e6:.4f}",
                         f"{m['phone']['energy_mj_per_token']:.4f}", f"{m['phone']['latency_ms_per_token']:.3f}",
                         f"{m['laptop']['energy_mj_per_token']:.4f}", f"{m['laptop']['latency_ms_per_token']:.3f}",
                         f"{r['kl']:.2e}", f"{100 * r['top1']:.1f}%", f"{r['ppl']:.2f}",
                         f"{lru.stats['flash_bytes'] / max(run.stats['flash_bytes'], 1):.2f}x",
                         f"{lru.modelled['phone']['energy_mj_per_token'] / m['phone']['energy_mj_per_token']:.2f}x",
                         f"{lru.ms_per_token / run.ms_per_token:.2f}x"])
    out.append(benchlib.markdown_table(header, rows))
    out.append("")
    out.append("Ratios are lru8 / row at the same budget (above 1: the row moves less flash, uses less modelled "
               "energy, or decodes faster). KL and top-1 are against transformers fp32 on the same tokens.")
    text = "\n".join(out)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.md").write_text(text + "\n")
    plot(by_budget, args.out / "decode.png")
    print(f"\nwrote {args.out / 'decode.md'} and {args.out / 'decode.png'}", file=sys.stderr)
    return 0


def plot(by_budget: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(by_budget)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, _) in enumerate(POLICIES):
        runs = [by_budget[b][i]["run"] for b in budgets]
        ax1.plot(budgets, [r.ms_per_token for r in runs], marker="o", label=name)
        ax2.plot(budgets, [r.modelled["phone"]["energy_mj_per_token"] for r in runs], marker="o", label=name)
    ax1.set(xlabel="cache budget (% of 8-bit expert bytes)", ylabel="decode ms/token (this machine)")
    ax2.set(xlabel="cache budget (% of 8-bit expert bytes)", ylabel="modelled mJ/token (phone profile)")
    ax1.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
