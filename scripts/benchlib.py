"""What the evaluation benchmarks share: held-out token windows of the embedded model, the fp32
transformers reference, teacher-forced runs of the engine, and the page-cache drop.

Every configuration sees the same token windows. A window's first `n_prompt` tokens are one prefill
batch; each later token is evaluated alone, as decode does, so the cache decides per token. The
engine's next-token distribution at each decode position is compared with transformers' fp32
distribution at the same position (teacher forcing: both see the same tokens, whatever they would
have sampled), which makes KL, top-1 agreement and perplexity comparable across configurations.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slicemoe_gguf import Model
from slicemoe_gguf.accuracy import log_softmax
from slicemoe_gguf.embedded import EMBEDDED_CHECKPOINT
from slicemoe_gguf.energy import load_profile, per_token

PROFILES = ("phone", "laptop")


def heldout_windows(n_windows: int, length: int, checkpoint: Path = EMBEDDED_CHECKPOINT) -> list[list[int]]:
    """n_windows runs of `length` tokens, evenly spaced through the held-out plays (never trained on)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    ids = tokenizer.encode((checkpoint / "heldout.txt").read_text(encoding="utf-8")).ids
    step = (len(ids) - length) // n_windows
    return [ids[i * step:i * step + length] for i in range(n_windows)]


def add_heldout_arguments(parser) -> None:
    """--checkpoint, --windows, --length, --prompt: the held-out text an accuracy benchmark scores."""
    parser.add_argument("--checkpoint", type=Path, default=EMBEDDED_CHECKPOINT,
                        help="trained HF checkpoint with heldout.txt (default: the embedded model)")
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--length", type=int, default=128, help="tokens per window")
    parser.add_argument("--prompt", type=int, default=8, help="leading tokens per window not scored")


def hf_reference(windows: list[list[int]], n_prompt: int, checkpoint: Path = EMBEDDED_CHECKPOINT,
                 replace_experts=None) -> list[np.ndarray]:
    """transformers' fp32 log-probabilities at each decode position of each window
    [len - n_prompt, vocab]. `replace_experts(name, weight) -> weight` swaps expert weights (for the
    numpy AMAT reconstructions)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    if replace_experts is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".experts." in name and p.dim() >= 2:
                    p.copy_(torch.from_numpy(replace_experts(name, p.detach().numpy())))
    out = []
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=torch.tensor([w])).logits[0].numpy()
            out.append(log_softmax(logits[n_prompt - 1:-1]))
    return out


@dataclass
class EngineRun:
    logprobs: list[np.ndarray]
    decode_ms: float
    decode_tokens: int
    stats: dict | None
    wall_s: float = 0.0
    modelled: dict = field(default_factory=dict)

    @property
    def ms_per_token(self) -> float:
        return self.decode_ms / max(self.decode_tokens, 1)


def drop_page_cache() -> bool:
    """Drop clean page-cache pages (root only) so that the first reads of a run go to the device."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def engine_run(path: Path, windows: list[list[int]], n_prompt: int, *, threads: int = 2, **model_kwargs) -> EngineRun:
    """Teacher-forced decode of every window through one Model (the cache persists across windows,
    as it does across the requests of a session)."""
    drop_page_cache()
    start = time.perf_counter()
    logprobs, decode_ms, decode_tokens = [], 0.0, 0
    with Model(path, n_threads=threads, n_ctx=max(len(w) for w in windows) + 8, **model_kwargs) as model:
        for w in windows:
            model.reset()
            model.eval(w[:n_prompt])
            rows = [model.logits()]
            for token in w[n_prompt:-1]:
                model.eval([token])
                rows.append(model.logits())
            logprobs.append(log_softmax(np.stack(rows)))
            decode_ms += model.timings()[1]
            decode_tokens += len(w) - 1 - n_prompt
        stats = model.cache_stats()
    run = EngineRun(logprobs, decode_ms, decode_tokens, stats, time.perf_counter() - start)
    if stats:
        from slicemoe_gguf.model_info import describe

        msb_slice = describe(path)["msb_slice_bytes"]
        compute_ms = max(decode_ms - stats["io_ms"], 0.0) / max(decode_tokens, 1)
        run.modelled = {name: per_token(stats, load_profile(name), msb_slice, compute_ms) for name in PROFILES}
    return run


def agreement(reference: list[np.ndarray], logprobs: list[np.ndarray], windows: list[list[int]], n_prompt: int) -> dict:
    """Mean KL(reference || engine) in nats, top-1 agreement, and the engine's perplexity on the windows."""
    kl, top1, nll, n = 0.0, 0, 0.0, 0
    for ref, got, w in zip(reference, logprobs, windows):
        targets = np.asarray(w[n_prompt:])
        kl += float((np.exp(ref) * (ref - got)).sum())
        top1 += int((ref.argmax(-1) == got.argmax(-1)).sum())
        nll -= float(got[np.arange(len(targets)), targets].sum())
        n += len(targets)
    return {"kl": kl / n, "top1": top1 / n, "ppl": float(np.exp(nll / n))}


def perplexity(logprobs: list[np.ndarray], windows: list[list[int]], n_prompt: int) -> float:
    nll = sum(-float(lp[np.arange(len(w) - n_prompt), np.asarray(w[n_prompt:])].sum()) for lp, w in zip(logprobs, windows))
    return float(np.exp(nll / sum(len(w) - n_prompt for w in windows)))


# dbsc + pcw with --lsb-background: the name the side-by-side and the front give the configuration
BACKGROUND = "dbsc + pcw + LSB in background"
# dbsc + pcw with --low-precision-prompt (the prompt's products on the MSB slices alone)
LOW_PROMPT = "dbsc + pcw + 4-bit prompt"


def dbsc_name(threshold: float) -> str:
    """A dbsc + pcw row's name in the front's scripts: the default threshold has none."""
    from slicemoe_gguf import defaults

    return "dbsc + pcw" if threshold == defaults.HIGH_THRESHOLD else f"dbsc + pcw, threshold {threshold:g}"


def same_computation(settings: dict) -> str:
    """The row of the front that computes what dbsc with these settings computes: every use at 4
    bits is lru4's model (a cache never changes what a fixed precision computes), else dbsc at the
    threshold."""
    return "lru4 + pcw" if settings["precision"] == "low" else dbsc_name(settings["high_threshold"])


def plan_point(trace, budget: int, max_miss_rate: float) -> tuple[str, dict] | None:
    """`slicemoe plan`'s answer as a configuration of the front: (its row name, Model settings) of the
    dbsc deployment with the most 8-bit uses whose slice miss rate on `trace` meets `max_miss_rate` at
    `budget`, or None where none does. Each benchmark asks it of its own model's trace, as a user
    would, so the same name may stand for another threshold on another model."""
    from slicemoe_gguf import trace as traces

    answer = traces.plan_precision(trace, budget=budget, max_miss_rate=max_miss_rate)
    if not answer:
        return None
    settings = {"policy": "dbsc", "warmup": "pcw", "precision": answer["precision"],
                "high_threshold": answer["high_threshold"]}
    return f"plan (slice miss rate <= {max_miss_rate:g})", settings


def high_share(stats: dict) -> float:
    """The share of a run's uses that ran at 8 bits (cache counters, live or replayed)."""
    return stats["high_uses"] / max(stats["high_uses"] + stats["low_uses"], 1)


def threshold_for_share(trace, budget: int, share: float, **settings) -> tuple[float, float]:
    """(threshold, share reached): the dbsc threshold at which a replay of `trace` under `budget`
    runs `share` of its uses at 8 bits. A threshold is a routing weight, so the same threshold
    picks other uses on a model with another top-k (a widened trace's weights are m times smaller
    than its source's); the front compares a configuration's speed and accuracy at the same share.
    The share falls as the threshold rises (bisection); a token's first use always runs at 8 bits,
    so no share below 1 / top_k can be reached (the nearest is returned)."""
    from slicemoe_gguf import trace as traces

    def replayed(threshold: float) -> float:
        return high_share(traces.replay(trace, budget=budget, policy="dbsc", warmup="pcw", high_threshold=threshold,
                                        **settings))

    # the bracket [low, high] with replayed(low) >= share >= replayed(high), where the share can be reached
    (low, at_low), (high, at_high) = (0.0, replayed(0.0)), (1.0, replayed(1.0))
    for _ in range(16):
        middle = (low + high) / 2
        at_middle = replayed(middle)
        if at_middle > share:
            low, at_low = middle, at_middle
        else:
            high, at_high = middle, at_middle
    return (low, at_low) if abs(at_low - share) <= abs(at_high - share) else (high, at_high)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    import datetime
    import os
    import platform

    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
            f"{datetime.date.today().isoformat()}")


def save_plot(path: Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, *, bars: bool = False,
              log_y: bool = False) -> None:
    """One axes: a line per series ({name: (xs, ys)}), or with bars=True grouped bars over the
    categorical xs of the series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    if bars:
        names = list(series)
        xs = series[names[0]][0]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ax.bar([j + i * width for j in range(len(xs))], series[name][1], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(xs))], [str(x) for x in xs],
                      rotation=30 if max(len(str(x)) for x in xs) > 8 else 0, ha="right" if max(len(str(x)) for x in xs) > 8 else "center",
                      fontsize=8)
    else:
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def emit(report: str, output: Path | None) -> None:
    """Print a markdown report and, with an output path, write it there too."""
    print(report)
    if output:
        output.write_text(report)


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int = 2) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize, in our library) from `src` to `dst` with the
    file type users pick by name (Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0): the stock files they download.
    Written to a temporary name and renamed, so an interrupted run leaves no half file."""
    from slicemoe_gguf.runtime import quantize_file

    tmp = dst.with_name(dst.name + ".partial")
    try:
        quantize_file(src, tmp, ftype, threads=threads)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(dst)
    return dst


class ServeProcess:
    """`slicemoe serve -m MODEL FLAGS` on a free port of 127.0.0.1, started and healthy (output discarded)."""

    def __init__(self, model: str, flags: list[str]):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc = subprocess.Popen(["slicemoe", "serve", "-m", model, "--port", str(self.port), *flags],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(self.base + "/health", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("slicemoe serve did not start")

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(self.base + "/metrics", timeout=30).read().decode()
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
