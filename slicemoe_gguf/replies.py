"""Text replies streamed from a Model, shared by `slicemoe serve` and `slicemoe chat`: text deltas
that never split a UTF-8 character or show part of a stop string, and the request's own cache
counters and timings."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .runtime import Model, Sampling

# the cache counters a reply reports as its own (the difference over the request)
COUNTERS = ("hits", "misses", "msb_hits", "msb_misses", "lsb_hits", "lsb_misses", "loads", "evictions",
            "flash_bytes", "high_uses", "low_uses", "dropped_uses", "decode_tokens", "io_ms")


@dataclass
class Reply:
    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"   # "stop": an end-of-generation token or a stop string
    ttft_ms: float = 0.0            # request start to the first token
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    cache: dict | None = None       # COUNTERS over this reply, None without a cache
    offsets: list[int] = field(default_factory=list)   # where each token's text starts in `text`
    # with top_logprobs: per token (its logprob, [(alternative, logprob), ...] most likely first), the
    # log-softmax of the model's logits (before penalties, biases, grammar and temperature)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)

    @property
    def ms_per_token(self) -> float:
        return self.decode_ms / max(len(self.tokens) - 1, 1)

    def summary(self) -> dict:
        """The reply's numbers as serve puts them in each response ("slicemoe")."""
        out = {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens),
               "ttft_ms": round(self.ttft_ms, 3), "prefill_ms": round(self.prefill_ms, 3),
               "decode_ms_per_token": round(self.ms_per_token, 3)}
        if self.cache is not None:
            out["cache"] = {**self.cache, "flash_bytes_per_token": self.cache["flash_bytes"] / max(len(self.tokens), 1)}
        return out


def _counters(model: Model) -> dict | None:
    stats = model.cache_stats()
    return None if stats is None else {name: stats[name] for name in COUNTERS}


def token_logprobs(logits: np.ndarray, token: int, n_top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-softmax of `logits` at `token`, and the n_top most likely tokens with theirs."""
    shifted = logits.astype(np.float64) - float(logits.max())
    logprobs = shifted - np.log(np.exp(shifted).sum())
    top = np.argpartition(-logprobs, n_top)[:n_top] if 0 < n_top < len(logprobs) else np.arange(min(n_top, len(logprobs)))
    top = top[np.argsort(-logprobs[top], kind="stable")]
    return float(logprobs[token]), [(int(t), float(logprobs[t])) for t in top]


def stream_reply(model: Model, prompt: list[int], max_tokens: int, sampling: Sampling, reply: Reply,
                 stop: list[str] | None = None, cancel: threading.Event | None = None,
                 top_logprobs: int | None = None) -> Iterator[str]:
    """Yields the reply's text in pieces and fills `reply` as it goes (complete when exhausted).
    Setting `cancel` ends the reply before the next token (finish_reason "cancelled"). With
    top_logprobs (0 or more alternatives) each token's logprobs are kept in reply.logprobs, filled
    before the piece that carries the token is yielded."""
    started = time.perf_counter()
    before = _counters(model)
    stop = [s for s in (stop or []) if s]
    hold = max((len(s) for s in stop), default=1) - 1   # characters that may start a stop string
    reply.prompt_tokens = len(prompt)
    shown = 0
    try:
        for token, logits in model.stream(prompt, max_tokens, sampling):
            if cancel is not None and cancel.is_set():
                reply.finish_reason = "cancelled"
                break
            if not reply.tokens:
                reply.ttft_ms = 1000 * (time.perf_counter() - started)
            if model.is_eog(token):
                reply.finish_reason = "stop"
                break
            reply.offsets.append(len(reply.text))
            if top_logprobs is not None:
                reply.logprobs.append(token_logprobs(logits, token, top_logprobs))
            reply.tokens.append(token)
            text = model.detokenize(reply.tokens)
            cut = min((i for i in (text.find(s, max(shown - hold, 0)) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                reply.text = text[:cut]
                reply.finish_reason = "stop"
                break
            reply.text = text
            if text.endswith("\ufffd"):
                continue   # a character split across tokens: wait for the rest
            safe = len(text) - hold
            if safe > shown:
                yield text[shown:safe]
                shown = safe
    finally:
        reply.prefill_ms, reply.decode_ms = model.timings()
        after = _counters(model)
        if before is not None and after is not None:
            reply.cache = {name: after[name] - before[name] for name in COUNTERS}
    if len(reply.text) > shown:
        yield reply.text[shown:]
