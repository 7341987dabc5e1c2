"""The Python API over the native engine: load a model, evaluate, sample, stream tokens.

    from slicemoe_gguf import Model
    with Model("model.gguf") as model:
        result = model.generate("Once upon a time", n_predict=32)
        print(result.text, result.decode_ms_per_token)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import defaults
from ._internals import NativeContext, NativeModel, NativeSampler
from ._native import SliceMoEError, check, ffi, lib, string
from .cache_params import enum_values, read_cache_stats, set_cache_params
from .model_info import describe
from .trace import FORMAT, VERSION, from_records


@dataclass
class Sampling:
    """llama.cpp's sampler chain: logit biases, penalties and a grammar, then greedy decoding when
    temperature <= 0, else top-k, top-p, min-p, temperature and a seeded draw. The defaults
    disable everything but the draw."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0                 # 0: off
    min_p: float = 0.0             # 0: off
    repeat_penalty: float = 1.0    # 1: off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64       # the sampled tokens the penalties look back on; -1: all of them
    grammar: str | None = None     # GBNF with a "root" rule the text must match
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: list[int]
    tokens: list[int]
    prefill_ms: float
    decode_ms: float
    logits: np.ndarray | None = field(default=None, repr=False)  # [n_decode, n_vocab] float32

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_tokens)

    @property
    def n_decode(self) -> int:
        return len(self.tokens)

    @property
    def decode_ms_per_token(self) -> float:
        # The last sampled token is never evaluated, so n_decode - 1 single-token steps ran.
        steps = max(self.n_decode - 1, 0)
        return self.decode_ms / steps if steps else 0.0


def check_model(path: str | os.PathLike) -> None:
    """Raise SliceMoEError with llama.cpp's reason unless the pinned llama.cpp would load `path`
    (hyperparameters, vocabulary, tensor names, counts and shapes; no tensor data is read)."""
    check(lib().slicemoe_model_check(os.fsencode(Path(path))))


def quantize_file(src: str | os.PathLike, dst: str | os.PathLike, file_type: str, *, keep_experts: bool = False,
                  threads: int = defaults.N_THREADS) -> None:
    """llama.cpp's own quantizer from `src` to `dst` (written in place) with the file type users pick
    by name (Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0, ...): the stock files they download. keep_experts: the
    routed experts keep their type and bytes (a sliced file's slices), only the dense tensors change."""
    check(lib().slicemoe_quantize_file(os.fsencode(Path(src)), os.fsencode(Path(dst)), file_type.encode(),
                                       keep_experts, threads))


class Model:
    """A GGUF model loaded by the native library. Use as a context manager or call close()."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int = 0, use_mmap: bool = True,
                 n_ctx: int = defaults.N_CTX, n_batch: int = defaults.N_BATCH, n_threads: int = defaults.N_THREADS,
                 precision: str = defaults.PRECISION, cache_budget: int = 0, warmup: str = defaults.WARMUP,
                 high_threshold: float = defaults.HIGH_THRESHOLD, max_miss_rate: float = defaults.MAX_MISS_RATE,
                 policy: str = defaults.POLICY, record_trace: bool = False, msb_share: float = defaults.MSB_SHARE,
                 high_ratio: float = defaults.HIGH_RATIO, prior_lambda: float = defaults.PRIOR_LAMBDA,
                 gating_t: float = defaults.GATING_T, prefetch: bool = defaults.PREFETCH,
                 layer_slots: list[int] | None = None, io_mode: str = defaults.IO_MODE,
                 forced_routes: bool = False, layer_sensitivity: list[float] | None = None,
                 layer_high_uses: list[int] | None = None, n_seq: int = 1,
                 lsb_background: bool = defaults.LSB_BACKGROUND,
                 low_precision_prompt: bool = defaults.LOW_PRECISION_PROMPT):
        self.path = Path(path)
        io_modes = enum_values("slicemoe_io_mode")
        if io_mode not in io_modes:
            raise ValueError(f"io_mode must be one of {', '.join(io_modes)}")
        self._lib = lib()
        params = self._lib.slicemoe_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_mmap = use_mmap
        params.cache.budget_bytes = int(cache_budget)
        params.record_trace = record_trace
        params.prefetch = prefetch
        params.low_precision_prompt = low_precision_prompt
        params.io_mode = io_modes[io_mode]
        params.forced_routes = forced_routes
        arrays = set_cache_params(params.cache, policy=policy, precision=precision, warmup=warmup,
                                 high_threshold=high_threshold, max_miss_rate=max_miss_rate, msb_share=msb_share,
                                 high_ratio=high_ratio, prior_lambda=prior_lambda, gating_t=gating_t,
                                 layer_slots=layer_slots, layer_sensitivity=layer_sensitivity,
                                 layer_high_uses=layer_high_uses, lsb_background=lsb_background)
        self._model = NativeModel(self.path, params)
        del arrays   # what params pointed at, needed until the model is loaded
        try:
            cparams = self._lib.slicemoe_context_default_params()
            cparams.n_ctx = n_ctx
            cparams.n_batch = n_batch
            cparams.n_threads = n_threads
            cparams.n_seq = n_seq
            self._ctx = NativeContext(self._model, cparams)
        except BaseException:
            self._model.close()
            raise
        self.n_vocab = self._model.n_vocab
        self.n_layer = self._model.n_layer
        self.n_seq = n_seq
        # per sequence: llama.cpp splits the context evenly between the sequences
        self.n_ctx = self._ctx.n_ctx // n_seq
        self.n_sliced_layers = self._model.n_sliced_layers

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Free the context, then the model (samplers made by sampler() stay valid until collected)."""
        if hasattr(self, "_ctx"):
            self._ctx.close()
        if hasattr(self, "_model"):
            self._model.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # -- metadata ---------------------------------------------------------------------------

    @property
    def description(self) -> str:
        return self._model.description()

    def metadata(self, key: str) -> str | None:
        return self._model.metadata(key)

    # -- slice cache ------------------------------------------------------------------------

    @property
    def has_cache(self) -> bool:
        return self._model.cache_layers() > 0

    def cache_stats(self) -> dict | None:
        """Counters of the slice cache (None without one): totals, hits/misses summed over MSB and
        LSB slices, and per-layer arrays."""
        if not self.has_cache:
            return None
        stats = read_cache_stats(self._model.cache_totals, self._model.cache_layer, self._model.cache_layers(),
                                 live=True)
        # why misses are read buffered on a file system that opened the file with O_DIRECT, or None
        stats["io_note"] = self._model.cache_io_note() or None
        return stats

    def routing_trace(self):
        """The routing recorded so far (record_trace=True) as a slicemoe-trace Trace."""
        k = self._model.trace_top_k()
        if k == 0:
            raise SliceMoEError("no routing was recorded: load the model with record_trace=True", 1)
        info = describe(self.path)
        layers = info["layers"]
        msb = [row["msb_bytes_per_expert"] for row in layers]
        lsb = [row["lsb_bytes_per_expert"] for row in layers]
        # one size when every layer has it (the common case), else a list: replay and the optimum
        # then use each layer's own
        header = {"format": FORMAT, "version": VERSION, "n_layers": len(layers), "n_experts": info["n_experts"],
                  "top_k": k, "moe_layers": info["moe_layers"],
                  "slice_bytes": {"msb": msb[0] if len(set(msb)) == 1 else msb,
                                  "lsb": lsb[0] if len(set(lsb)) == 1 else lsb},
                  "model": str(self.path.name)}
        records, logits = [], []
        for *record, row in self._model.trace_records(int(info["n_experts"])):
            records.append(tuple(record))
            logits.append(row)
        return from_records(header, records, logits)

    def force_routes(self, experts: np.ndarray | None, weights: np.ndarray | None = None, *,
                     n_experts: int | None = None) -> None:
        """Trace-driven routing: position p of every following sequence runs, in MoE layer l, the
        experts experts[p, l] with router probabilities weights[p, l] instead of its router's choice
        (arrays [n_positions, n_moe_layers, top_k]); None returns to the model's routing. n_experts:
        the expert count of the model the route comes from (default: this model's); it must be this
        model's. A stock model must be loaded with forced_routes=True."""
        if experts is None:
            self._model.force_routes(None, None, 0)
            return
        experts = np.ascontiguousarray(experts, dtype=np.int32)
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        if experts.ndim != 3 or weights.shape != experts.shape:
            raise ValueError("experts and weights must both be [n_positions, n_moe_layers, top_k]")
        if n_experts is None:
            n_experts = int(self.metadata(f"{self.metadata('general.architecture')}.expert_count") or 0)
        self._model.force_routes(experts, weights, n_experts)

    def reset_cache_stats(self) -> None:
        self._model.reset_cache_stats()

    def release_cache(self) -> None:
        """Empty the slice pools and give their memory back to the system, for a process going idle
        (on a phone, before the system reclaims it: swapped-out pools come back 4 KiB at a time,
        released ones as the next tokens' misses, read from the file). The model stays usable."""
        self._model.release_cache()

    def fail_reads_after(self, n_reads: int) -> None:
        """Testing: make every slice read after the next n_reads fail (-1 turns it off)."""
        self._model.fail_reads_after(n_reads)

    def is_eog(self, token: int) -> bool:
        return self._model.is_eog(token)

    # -- text -------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_special, parse_special)

    def chat_prompt(self, messages: list[dict], *, add_assistant: bool = True) -> str:
        """The conversation ([{"role": ..., "content": ...}, ...]) as the model's chat template writes
        it: llama.cpp's built-in templates, recognised from the GGUF's tokenizer.chat_template
        (chatml for a model without one), with the assistant's turn opened at the end."""
        if not messages:
            raise ValueError("a chat needs at least one message")
        return self._model.chat_apply([str(m["role"]) for m in messages], [str(m["content"]) for m in messages],
                                      add_assistant)

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """The prompt tokens of a chat: its template's markup becomes special tokens, as llama-server
        tokenizes a chat."""
        return self.tokenize(self.chat_prompt(messages), add_special=True, parse_special=True)

    def detokenize(self, tokens: list[int]) -> str:
        return self._model.detokenize(tokens)

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token (special tokens written out); may be part of a UTF-8 character."""
        return self._model.token_piece(token)

    # -- evaluation -------------------------------------------------------------------------

    def reset(self) -> None:
        self._ctx.reset()

    def eval(self, tokens: list[int]) -> None:
        """Append tokens to the sequence and run the model over them."""
        self._ctx.eval(tokens)

    def logits(self) -> np.ndarray:
        """A copy of the last evaluated token's logits, float32 [n_vocab]."""
        return self._ctx.logits()

    # -- several sequences (n_seq > 1) --------------------------------------------------------

    def eval_seq(self, seq: int, tokens: list[int]) -> None:
        """Append tokens to sequence `seq` (a prompt) and run the model over them."""
        self._ctx.eval_seq(seq, tokens)

    def decode_batch(self, seqs: list[int], tokens: list[int]) -> None:
        """One token for each of the sequences `seqs`, in one batch: the slice cache serves the union
        of the experts they select (a missing slice is read once for all of them)."""
        if len(seqs) != len(tokens):
            raise ValueError("one token per sequence")
        self._ctx.decode_batch(seqs, tokens)

    def logits_seq(self, seq: int) -> np.ndarray:
        """A copy of the logits of sequence `seq`'s last token, float32 [n_vocab]."""
        return self._ctx.logits(seq)

    def sample(self, sampler: NativeSampler, seq: int = 0) -> int:
        """The next token of sequence `seq` from its logits (a sampler from Model.sampler)."""
        return self._ctx.sample(sampler, seq)

    def reset_seq(self, seq: int) -> None:
        """Forget sequence `seq`'s tokens (it is free for a new prompt)."""
        self._ctx.reset_seq(seq)

    def timings(self) -> tuple[float, float]:
        """(prefill_ms, decode_ms) since the last reset."""
        return self._ctx.timings()

    def memory(self):
        """The context's memory (struct slicemoe_memory)."""
        return self._ctx.memory()

    def sampler(self, sampling: Sampling) -> NativeSampler:
        """A native sampler for `sampling` (freed with the returned object). Raises SliceMoEError
        for a grammar that does not parse or a value out of range."""
        params = self._lib.slicemoe_sampling_default_params()
        for name in ("temperature", "top_p", "seed", "top_k", "min_p", "repeat_penalty", "frequency_penalty",
                     "presence_penalty", "penalty_last_n"):
            setattr(params, name, getattr(sampling, name))
        keep = []   # what the params point at, alive until the sampler is made
        if sampling.grammar:
            keep.append(ffi.new("char[]", sampling.grammar.encode("utf-8")))
            params.grammar = keep[-1]
        if sampling.logit_bias:
            keep.append(ffi.new("int32_t[]", [int(t) for t in sampling.logit_bias]))
            keep.append(ffi.new("float[]", [float(v) for v in sampling.logit_bias.values()]))
            params.logit_bias_tokens, params.logit_bias_values = keep[-2], keep[-1]
            params.n_logit_bias = len(sampling.logit_bias)
        return NativeSampler(self._model, params)

    def stream(self, prompt: str | list[int], n_predict: int, sampling: Sampling | None = None,
               *, stop_at_eog: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        """Reset, evaluate the prompt, then yield (token, logits it was sampled from) per step."""
        if n_predict < 0:
            raise ValueError("n_predict must be >= 0")
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise ValueError("the prompt is empty (no tokens)")
        sampler = self.sampler(sampling or Sampling())
        self.reset()
        self.eval(tokens)
        for step in range(n_predict):
            logits = self.logits()
            token = self._ctx.sample(sampler)
            yield token, logits
            if stop_at_eog and self.is_eog(token):
                return
            if step + 1 < n_predict:
                self.eval([token])

    def generate(self, prompt: str | list[int], n_predict: int = 32, sampling: Sampling | None = None,
                 *, keep_logits: bool = False, stop_at_eog: bool = True) -> GenerationResult:
        prompt_tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        tokens: list[int] = []
        rows: list[np.ndarray] = []
        for token, logits in self.stream(prompt_tokens, n_predict, sampling, stop_at_eog=stop_at_eog):
            tokens.append(token)
            if keep_logits:
                rows.append(logits)
        prefill_ms, decode_ms = self.timings()
        logits = np.stack(rows) if rows else (np.zeros((0, self.n_vocab), np.float32) if keep_logits else None)
        return GenerationResult(text=self.detokenize(tokens), prompt_tokens=prompt_tokens, tokens=tokens,
                                prefill_ms=prefill_ms, decode_ms=decode_ms, logits=logits)


def library_info() -> dict:
    """Versions, compute devices and CPU features of the loaded native library."""
    from . import __version__
    from ._native import build_info, library_path

    native = lib()
    devices = []
    for i in range(native.slicemoe_device_count()):
        devices.append({"name": string(native.slicemoe_device_name(i)),
                        "description": string(native.slicemoe_device_description(i))})
    return {
        "version": __version__,
        "native_version": string(native.slicemoe_version()),
        "llama_cpp": string(native.slicemoe_llama_cpp_version()),
        "devices": devices,
        "system_info": string(native.slicemoe_system_info()).strip(),
        "product_kernel": string(native.slicemoe_kernel_name(0)),   # the fused expert product's
        "library": str(library_path()),
        "build": build_info(),
    }
