"""`slicemoe chat`: a conversation in the terminal on the engine, one line of cache numbers per reply."""

from __future__ import annotations

import sys

from .replies import Reply, stream_reply
from .runtime import Model, Sampling

PROMPT = "> "


def _summary(reply: Reply) -> str:
    line = f"[{len(reply.tokens)} tokens, {reply.ms_per_token:.1f} ms/token, first token {reply.ttft_ms:.0f} ms"
    if reply.cache is not None:
        per_token = reply.cache["flash_bytes"] / max(len(reply.tokens), 1) / 1e6
        line += f"; cache {reply.cache['hits']} hits, {reply.cache['misses']} misses, {per_token:.2f} MB/token from flash"
    return line + "]"


def chat(model: Model, *, max_tokens: int, system: str | None, sampling_args: tuple[float, float, int]) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:   # pragma: no cover - platforms without readline
        pass
    temperature, top_p, seed = sampling_args
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    print(f"slicemoe chat: {model.path.name}. /reset clears the history; Ctrl-D or Ctrl-C exits.", file=sys.stderr)
    while True:
        try:
            text = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            history = list(opening)
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        prompt = model.chat_tokens(history)
        room = model.n_ctx - len(prompt)
        if room < 1:
            history.pop()
            print(f"(the conversation no longer fits the context of {model.n_ctx} tokens: /reset)", file=sys.stderr)
            continue
        reply = Reply()
        try:
            for piece in stream_reply(model, prompt, min(max_tokens, room), Sampling(temperature, top_p, seed), reply):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            reply.finish_reason = "interrupted"
        print()
        print(_summary(reply), file=sys.stderr, flush=True)
        history.append({"role": "assistant", "content": reply.text})
