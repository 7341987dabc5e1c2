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
    shared: bool = False            # decoded in batches with other requests: `cache` counts theirs too
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
            out["cache"] = {**self.cache, "flash_bytes_per_token": self.cache["flash_bytes"] / max(len(self.tokens), 1),
                            "shared": self.shared}
        return out


def cache_counters(model: Model) -> dict | None:
    """COUNTERS of the model's cache now (None without a cache)."""
    stats = model.cache_stats()
    return None if stats is None else {name: stats[name] for name in COUNTERS}


def token_logprobs(logits: np.ndarray, token: int, n_top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-softmax of `logits` at `token`, and the n_top most likely tokens with theirs."""
    shifted = logits.astype(np.float64) - float(logits.max())
    logprobs = shifted - np.log(np.exp(shifted).sum())
    top = np.argpartition(-logprobs, n_top)[:n_top] if 0 < n_top < len(logprobs) else np.arange(min(n_top, len(logprobs)))
    top = top[np.argsort(-logprobs[top], kind="stable")]
    return float(logprobs[token]), [(int(t), float(logprobs[t])) for t in top]


class ReplyWriter:
    """One reply's text, token by token: the pieces that may be shown (never part of a UTF-8
    character or the start of a stop string), the end (an end-of-generation token, a stop string,
    max_tokens, or cancel()), and with top_logprobs each token's logprobs, kept in the Reply before
    the piece that carries the token is returned."""

    def __init__(self, model: Model, reply: Reply, max_tokens: int, stop: list[str] | None = None,
                 top_logprobs: int | None = None):
        self.model, self.reply, self.max_tokens, self.top_logprobs = model, reply, max_tokens, top_logprobs
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1   # characters that may start a stop string
        self.shown = 0
        self.done = max_tokens <= 0

    def add(self, token: int, logits: np.ndarray | None) -> str:
        """Takes the next sampled token; returns the text that may be shown now ("" for none). The
        logits it was sampled from are needed only with top_logprobs."""
        reply, model = self.reply, self.model
        if model.is_eog(token):
            reply.finish_reason, self.done = "stop", True
            return ""
        reply.offsets.append(len(reply.text))
        if self.top_logprobs is not None:
            reply.logprobs.append(token_logprobs(logits, token, self.top_logprobs))
        reply.tokens.append(token)
        self.done = len(reply.tokens) >= self.max_tokens   # finish_reason stays "length"
        text = model.detokenize(reply.tokens)
        start = max(self.shown - self.hold, 0)
        cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            reply.text, reply.finish_reason, self.done = text[:cut], "stop", True
            return ""
        reply.text = text
        if text.endswith("\ufffd"):
            return ""   # a character split across tokens: wait for the rest
        safe = len(text) - self.hold
        if safe <= self.shown:
            return ""
        piece, self.shown = text[self.shown:safe], safe
        return piece

    def cancel(self) -> None:
        self.reply.finish_reason, self.done = "cancelled", True

    def rest(self) -> str:
        """The text held back until the end (call once the reply is done)."""
        piece, self.shown = self.reply.text[self.shown:], len(self.reply.text)
        return piece


def stream_reply(model: Model, prompt: list[int], max_tokens: int, sampling: Sampling, reply: Reply,
                 stop: list[str] | None = None, cancel: threading.Event | None = None,
                 top_logprobs: int | None = None) -> Iterator[str]:
    """Yields the reply's text in pieces and fills `reply` as it goes (complete when exhausted), the
    model decoding alone. Setting `cancel` ends the reply before the next token (finish_reason
    "cancelled")."""
    started = time.perf_counter()
    before = cache_counters(model)
    reply.prompt_tokens = len(prompt)
    writer = ReplyWriter(model, reply, max_tokens, stop, top_logprobs)
    try:
        for token, logits in model.stream(prompt, max_tokens, sampling):
            if cancel is not None and cancel.is_set():
                writer.cancel()
                break
            if not reply.tokens:
                reply.ttft_ms = 1000 * (time.perf_counter() - started)
            piece = writer.add(token, logits)
            if piece:
                yield piece
            if writer.done:
                break
    finally:
        reply.prefill_ms, reply.decode_ms = model.timings()
        after = cache_counters(model)
        if before is not None and after is not None:
            reply.cache = {name: after[name] - before[name] for name in COUNTERS}
    rest = writer.rest()
    if rest:
        yield rest
