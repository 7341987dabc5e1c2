"""tokenizer.json / tokenizer_config.json -> llama.cpp's BPE tokenizer metadata."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import gguf

from .checkpoint import CheckpointError

# Split regexes of the pre-tokenizers llama.cpp implements, by the name it expects in
# tokenizer.ggml.pre. A ByteLevel pre-tokenizer with use_regex is GPT-2's own regex.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Pre-tokenizers with several Split regexes (long Unicode classes) are known by the sha256 of their
# regexes joined by newlines: DeepSeek LLM's (DeepSeek-V2 and -V2-Lite ship it) is llama.cpp's
# "deepseek-llm".
_KNOWN_SPLITS = {hashlib.sha256(_QWEN2_SPLIT.encode()).hexdigest(): "qwen2",
                 "aa393e0646ca4ca62f78c04e1b3cfcfd273d8629295c4d8049cf395b8ba8a90f": "deepseek-llm"}
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _pre_tokenizer_name(pre: dict | None) -> str:
    if pre is None:
        raise CheckpointError("tokenizer.json has no pre_tokenizer; only byte-level BPE tokenizers are supported")
    parts = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    splits = [p.get("pattern", {}).get("Regex") or "" for p in parts if p.get("type") == "Split"]
    if splits:
        name = _KNOWN_SPLITS.get(hashlib.sha256("\n".join(splits).encode()).hexdigest())
        if name:
            return name
        raise CheckpointError(f"tokenizer.json pre-tokenizer regex {splits[0]!r} is not one this converter "
                              "recognizes (GPT-2 byte-level, Qwen2, DeepSeek LLM); name llama.cpp's "
                              "pre-tokenizer with --tokenizer-pre")
    if any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts):
        return "gpt-2"
    raise CheckpointError(f"unsupported pre-tokenizer {pre.get('type')!r} in tokenizer.json")


def _write_spm_style(w: gguf.GGUFWriter, tokens: list[str], types: list, merges: list[str],
                     vocab: dict[str, int]) -> None:
    """A BPE with byte fallback over "▁"-joined text (Llama-2, Mistral, Mixtral) as llama.cpp's
    SentencePiece tokenizer: <0xXX> pieces are BYTE tokens, and each piece scores minus the rank
    of the merge that makes it, so that llama.cpp's highest-score-first merging applies the
    merges in the order the BPE ranks them."""
    scores = [0.0] * len(tokens)
    for rank, merge in enumerate(merges):
        merged = merge.replace(" ", "", 1)
        idx = vocab.get(merged)
        if idx is not None and scores[idx] == 0.0:
            scores[idx] = -float(rank + 1)
    for i, text in enumerate(tokens):
        if types[i] == gguf.TokenType.UNUSED:
            scores[i] = -1000.0   # padding never wins a merge (llama.cpp's converter's value)
        if _BYTE_PIECE.fullmatch(text):
            types[i] = gguf.TokenType.BYTE
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)


def write_tokenizer(w: gguf.GGUFWriter, hf_dir: Path, n_rows: int, pre: str | None = None) -> int:
    """Write the vocabulary, merges, token types and special tokens; returns the tokenizer's size.

    ``n_rows`` is the number of embedding rows. Published checkpoints pad them beyond the tokenizer
    (OLMoE 50304 for 50280 tokens, Qwen 151936 for 151646, DeepSeek-V2 102400 for 100015) and
    llama.cpp requires one token per row, so the list is padded with unused ``[PADi]`` tokens, as
    llama.cpp's own converter does. ``pre`` names llama.cpp's pre-tokenizer (tokenizer.ggml.pre)
    instead of detecting it."""
    try:
        tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{hf_dir / 'tokenizer.json'} not found (a fast tokenizer is required)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read tokenizer.json: {exc}") from exc
    config_path = hf_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}

    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise CheckpointError(f"tokenizer model {model.get('type')!r} is not supported; supported: BPE "
                              "(byte-level as GPT-2/Qwen2/OLMoE, or with byte fallback as Llama/Mistral)")

    vocab: dict[str, int] = dict(model["vocab"])
    special: set[str] = set()
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["content"])
    n_vocab = max(vocab.values()) + 1
    if n_vocab > n_rows:
        raise CheckpointError(f"the tokenizer has {n_vocab} tokens but the embedding only {n_rows} rows "
                              "(config.json vocab_size); tokenizer.json does not belong to these weights")
    tokens = [f"[PAD{i}]" for i in range(n_rows)]   # ids the tokenizer leaves unused, and the padding
    types = [gguf.TokenType.UNUSED] * n_rows
    for text, idx in vocab.items():
        tokens[idx] = text
        types[idx] = gguf.TokenType.CONTROL if text in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    if model.get("byte_fallback"):
        _write_spm_style(w, tokens, types, merges, vocab)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre or _pre_tokenizer_name(tok.get("pre_tokenizer")))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)

    def token_id(key: str) -> int | None:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return vocab.get(value) if value else None

    for key, add in [("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("pad_token", w.add_pad_token_id), ("unk_token", w.add_unk_token_id)]:
        idx = token_id(key)
        if idx is not None:
            add(idx)
    w.add_add_bos_token(bool(config.get("add_bos_token", False)))
    if config.get("chat_template"):
        w.add_chat_template(config["chat_template"])
    return n_vocab
