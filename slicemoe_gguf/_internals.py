"""The thin layer over the C API, as llama-cpp-python's `_internals`: one class per native handle,
each owning its handle and freeing it once (close(), or when collected).

- NativeModel: a loaded model (slicemoe_model): vocabulary, chat template, metadata, and the
  engine it carries (cache counters, routing trace, forced routes).
- NativeContext: a context of a model (slicemoe_context): evaluation of one or several sequences,
  their logits and timings.
- NativeSampler: a sampler chain (slicemoe_sampler).

`runtime.Model` composes the three into the friendly class; a second context or sampler of the same
model is one more NativeContext or NativeSampler.
"""

from __future__ import annotations

import os

import numpy as np

from ._native import SliceMoEError, check, ffi, lib, string


def _grown(call, capacity: int, kind: str):
    """Call call(buf, capacity, n_out) with a buffer that grows until the result fits; the buffer
    and the length written."""
    n_out = ffi.new("int32_t *")
    while True:
        buf = ffi.new(f"{kind}[]", capacity)
        status = call(buf, capacity, n_out)
        if status == lib().SLICEMOE_ERR_BUFFER_TOO_SMALL:
            capacity = n_out[0]
            continue
        check(status)
        return buf, n_out[0]


class NativeModel:
    """A model loaded by the engine with `params` (struct slicemoe_model_params)."""

    def __init__(self, path: str | os.PathLike, params):
        self._lib = lib()
        out = ffi.new("slicemoe_model **")
        check(self._lib.slicemoe_model_load(os.fsencode(path), ffi.new("struct slicemoe_model_params *", params), out))
        self.handle = out[0]
        self.n_vocab = int(self._lib.slicemoe_model_n_vocab(self.handle))
        self.n_layer = int(self._lib.slicemoe_model_n_layer(self.handle))
        self.n_sliced_layers = int(self._lib.slicemoe_model_n_sliced_layers(self.handle))

    def close(self) -> None:
        if getattr(self, "handle", ffi.NULL) != ffi.NULL:
            self._lib.slicemoe_model_free(self.handle)
            self.handle = ffi.NULL

    def __del__(self) -> None:
        self.close()

    # -- metadata and text --------------------------------------------------------------------

    def description(self) -> str:
        buf = ffi.new("char[]", 256)
        check(self._lib.slicemoe_model_desc(self.handle, buf, 256))
        return string(buf)

    def metadata(self, key: str) -> str | None:
        buf = ffi.new("char[]", 4096)
        status = self._lib.slicemoe_model_meta(self.handle, key.encode(), buf, 4096)
        return string(buf) if status == 0 else None

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.slicemoe_model_is_eog(self.handle, token))

    def tokenize(self, data: bytes, add_special: bool, parse_special: bool) -> list[int]:
        buf, n = _grown(lambda out, cap, n_out: self._lib.slicemoe_tokenize(
            self.handle, data, len(data), add_special, parse_special, out, cap, n_out), len(data) + 8, "int32_t")
        return list(buf[0:n])

    def chat_apply(self, roles: list[str], contents: list[str], add_assistant: bool) -> str:
        keep = [ffi.new("char[]", text.encode("utf-8")) for text in roles + contents]
        role_ptrs = ffi.new("char *[]", keep[:len(roles)])
        content_ptrs = ffi.new("char *[]", keep[len(roles):])
        capacity = 256 + sum(len(c) + 64 for c in contents)
        buf, n = _grown(lambda out, cap, n_out: self._lib.slicemoe_chat_apply(
            self.handle, role_ptrs, content_ptrs, len(roles), add_assistant, out, cap, n_out), capacity, "char")
        return ffi.unpack(buf, n).decode("utf-8", "replace")

    def detokenize(self, tokens: list[int]) -> str:
        ids = ffi.new("int32_t[]", tokens)
        buf, n = _grown(lambda out, cap, n_out: self._lib.slicemoe_detokenize(
            self.handle, ids, len(tokens), out, cap, n_out), 16 * len(tokens) + 16, "char")
        return ffi.unpack(buf, n).decode("utf-8", "replace")

    def token_piece(self, token: int) -> bytes:
        buf, n = _grown(lambda out, cap, n_out: self._lib.slicemoe_token_piece(self.handle, token, out, cap, n_out),
                        32, "char")
        return ffi.unpack(buf, n)

    # -- the engine ---------------------------------------------------------------------------

    def cache_layers(self) -> int:
        return int(self._lib.slicemoe_cache_n_layers(self.handle))

    def cache_totals(self, out) -> int:
        return self._lib.slicemoe_cache_get_stats(self.handle, out)

    def cache_layer(self, i: int, out) -> int:
        return self._lib.slicemoe_cache_get_layer_stats(self.handle, i, out)

    def cache_io_note(self) -> str:
        return string(self._lib.slicemoe_cache_io_note(self.handle))

    def reset_cache_stats(self) -> None:
        self._lib.slicemoe_cache_reset_stats(self.handle)

    def fail_reads_after(self, n_reads: int) -> None:
        self._lib.slicemoe_cache_fail_reads_after(self.handle, n_reads)

    def release_cache(self) -> None:
        self._lib.slicemoe_cache_release(self.handle)

    def trace_top_k(self) -> int:
        return int(self._lib.slicemoe_trace_top_k(self.handle))

    def trace_records(self, n_experts: int):
        """Every recorded routing event: (request, layer, phase, experts, weights, logits or None)."""
        k = self.trace_top_k()
        request, layer, phase = ffi.new("int32_t *"), ffi.new("int32_t *"), ffi.new("int32_t *")
        experts, weights = ffi.new("int32_t[]", k), ffi.new("float[]", k)
        row, has = ffi.new("float[]", n_experts), ffi.new("bool *")
        for i in range(int(self._lib.slicemoe_trace_size(self.handle))):
            check(self._lib.slicemoe_trace_get(self.handle, i, request, layer, phase, experts, weights))
            check(self._lib.slicemoe_trace_get_logits(self.handle, i, row, has))
            yield request[0], layer[0], phase[0], list(experts), list(weights), (list(row) if has[0] else None)

    def force_routes(self, experts: np.ndarray | None, weights: np.ndarray | None, n_experts: int) -> None:
        if experts is None:
            check(self._lib.slicemoe_route_force(self.handle, 0, 0, 0, 0, ffi.NULL, ffi.NULL))
            return
        n_positions, n_layers, k = experts.shape
        check(self._lib.slicemoe_route_force(self.handle, n_positions, n_layers, n_experts, k,
                                             ffi.cast("const int32_t *", ffi.from_buffer(experts)),
                                             ffi.cast("const float *", ffi.from_buffer(weights))))


class NativeContext:
    """A context of `model` with `params` (struct slicemoe_context_params)."""

    def __init__(self, model: NativeModel, params):
        self._lib = lib()
        self.model = model   # a context never outlives its model
        out = ffi.new("slicemoe_context **")
        check(self._lib.slicemoe_context_create(model.handle, ffi.new("struct slicemoe_context_params *", params), out))
        self.handle = out[0]
        self.n_ctx = int(self._lib.slicemoe_context_n_ctx(self.handle))

    def close(self) -> None:
        if getattr(self, "handle", ffi.NULL) != ffi.NULL:
            self._lib.slicemoe_context_free(self.handle)
            self.handle = ffi.NULL

    def __del__(self) -> None:
        self.close()

    def reset(self) -> None:
        self._lib.slicemoe_context_reset(self.handle)

    def eval(self, tokens: list[int]) -> None:
        check(self._lib.slicemoe_eval(self.handle, ffi.new("int32_t[]", tokens), len(tokens)))

    def eval_seq(self, seq: int, tokens: list[int]) -> None:
        check(self._lib.slicemoe_eval_seq(self.handle, seq, ffi.new("int32_t[]", tokens), len(tokens)))

    def decode_batch(self, seqs: list[int], tokens: list[int]) -> None:
        check(self._lib.slicemoe_decode_batch(self.handle, len(seqs), ffi.new("int32_t[]", seqs),
                                              ffi.new("int32_t[]", tokens)))

    def logits(self, seq: int | None = None) -> np.ndarray:
        """A copy of the last token's logits (of sequence `seq`), float32 [n_vocab]."""
        ptr = self._lib.slicemoe_logits(self.handle) if seq is None else self._lib.slicemoe_logits_seq(self.handle, seq)
        if ptr == ffi.NULL:
            raise SliceMoEError("no logits yet: evaluate a prompt first" if seq is None else
                                f"sequence {seq} has no logits from the last evaluation", 1)
        return np.frombuffer(ffi.buffer(ptr, 4 * self.model.n_vocab), dtype=np.float32).copy()

    def sample(self, sampler: "NativeSampler", seq: int = 0) -> int:
        token = ffi.new("int32_t *")
        check(self._lib.slicemoe_sample_seq(sampler.handle, self.handle, seq, token))
        return int(token[0])

    def reset_seq(self, seq: int) -> None:
        self._lib.slicemoe_seq_reset(self.handle, seq)

    def timings(self) -> tuple[float, float]:
        t = ffi.new("struct slicemoe_timings *")
        self._lib.slicemoe_timings_get(self.handle, t)
        return float(t.prefill_ms), float(t.decode_ms)

    def memory(self):
        out = ffi.new("struct slicemoe_memory *")
        check(self._lib.slicemoe_context_memory(self.handle, out))
        return out


class NativeSampler:
    """A sampler chain of `model` for `params` (struct slicemoe_sampling_params); `keep` holds what
    the params point at until the chain is made."""

    def __init__(self, model: NativeModel, params, keep=()):
        self._lib = lib()
        out = ffi.new("slicemoe_sampler **")
        check(self._lib.slicemoe_sampler_create(model.handle, ffi.new("struct slicemoe_sampling_params *", params), out))
        self.handle = out[0]

    def close(self) -> None:
        if getattr(self, "handle", ffi.NULL) != ffi.NULL:
            self._lib.slicemoe_sampler_free(self.handle)
            self.handle = ffi.NULL

    def __del__(self) -> None:
        self.close()
