"""What a cache configuration costs in accuracy: its next-token distributions against those of
the same GGUF run at 8 bits (every use MSB + LSB, no cache), on held-out text.

Teacher forcing: each window's first `n_prompt` tokens are one prefill batch, every later token
is evaluated alone (a decode step, where the cache and the precision rule act), and both runs
see the same tokens whatever they would have sampled, so KL and top-1 agreement compare
position by position.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .runtime import Model

N_WINDOWS = 16      # windows of held-out text
WINDOW = 96         # tokens per window
N_PROMPT = 32       # of which the prompt


@dataclass
class Accuracy:
    kl: float           # mean KL(8-bit || configuration), nats per decode position
    top1: float         # share of decode positions whose most likely token is the 8-bit model's
    high_share: float   # share of the configuration's expert uses that ran at 8 bits
    positions: int
    dropped_uses: int = 0   # uses left out of the mixture (adapmoe)


def heldout_windows(path: str | Path, text: str, n_windows: int = N_WINDOWS, length: int = WINDOW) -> list[list[int]]:
    """n_windows runs of `length` tokens, evenly spaced through `text` (tokenized by the GGUF)."""
    with Model(path, n_ctx=64) as model:
        ids = model.tokenize(text, add_special=False)
    if len(ids) < length + n_windows:
        raise ValueError(f"the text has {len(ids)} tokens, too few for {n_windows} windows of {length}")
    step = (len(ids) - length) // n_windows
    return [ids[i * step:i * step + length] for i in range(n_windows)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def teacher_forced(model: Model, windows: list[list[int]], n_prompt: int = N_PROMPT) -> list[np.ndarray]:
    """Log-probabilities [len - n_prompt, vocab] at each decode position of each window."""
    out = []
    for window in windows:
        model.reset()
        model.eval(window[:n_prompt])
        rows = [model.logits()]
        for token in window[n_prompt:-1]:
            model.eval([token])
            rows.append(model.logits())
        out.append(log_softmax(np.stack(rows)))
    return out


def reference(path: str | Path, windows: list[list[int]], n_prompt: int = N_PROMPT) -> list[np.ndarray]:
    """The 8-bit model's log-probabilities (precision high, no cache)."""
    with Model(path, precision="high", n_ctx=max(map(len, windows)) + 8) as model:
        return teacher_forced(model, windows, n_prompt)


def evaluate(path: str | Path, windows: list[list[int]], ref: list[np.ndarray], n_prompt: int = N_PROMPT,
             **model_kwargs) -> Accuracy:
    """The configuration `model_kwargs` (cache_budget, policy, high_threshold, ...) against `ref`."""
    with Model(path, n_ctx=max(map(len, windows)) + 8, **model_kwargs) as model:
        got = teacher_forced(model, windows, n_prompt)
        stats = model.cache_stats()
    kl, top1, n = 0.0, 0, 0
    for r, g in zip(ref, got):
        kl += float((np.exp(r) * (r - g)).sum())
        top1 += int((r.argmax(-1) == g.argmax(-1)).sum())
        n += len(r)
    uses = stats["high_uses"] + stats["low_uses"] if stats else 0
    return Accuracy(kl / n, top1 / n, stats["high_uses"] / uses if uses else 1.0, n,
                    stats["dropped_uses"] if stats else 0)
