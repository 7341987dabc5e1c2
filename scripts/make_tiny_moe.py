#!/usr/bin/env python3
"""Create a tiny random-weight MoE checkpoint of a supported architecture with transformers.

The checkpoint is a real Hugging Face directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json): the same layout and config fields as the published models, only small.
Its tokenizer is a byte-level BPE trained with `tokenizers` on a few English sentences.

    python scripts/make_tiny_moe.py qwen2_moe out/tiny-qwen2moe
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# A few hundred words of plain English: enough for a 512-token byte-level BPE whose merges cover
# ordinary words, so prompts tokenize to word-sized pieces.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time there was a small village by the sea, where the fishermen went out every morning
and came back every evening with their boats full of fish. The children played on the beach and the
old men sat in the shade and told stories about the sea, the wind and the stars. In the winter the
storms came, and the people stayed in their houses by the fire. In the spring the flowers came back,
and the birds sang in the trees. It was a quiet life, and the people of the village were happy with it.
Machine learning models learn from data. A mixture of experts routes each token to a few experts, so
only part of the model runs for each token. The experts that are not used still need to be stored,
and on a phone or a laptop the memory is small, so the experts live in flash and a cache keeps the
most useful ones in memory. Every miss is a read from flash, which costs time and energy.
"""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(out_dir: Path, vocab_size: int = 512) -> int:
    """Train and save a GPT-2-style byte-level BPE; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": 256,
    }, indent=2))
    return tokenizer.get_vocab_size()


def train_spm_style_tokenizer(out_dir: Path, vocab_size: int = 512) -> int:
    """Train and save a Llama-2/Mistral-style tokenizer.json: BPE over "▁"-joined words with byte
    fallback (<0x00>..<0xFF> at ids 3..258 after <unk>, <s>, </s>), as the published Mixtral has."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(byte_tokens), special_tokens=specials,
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    # Re-number: specials, then the 256 byte tokens, then the learned pieces (the Llama layout).
    data = json.loads(tokenizer.to_str())
    learned = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    data["model"]["vocab"] = {t: i for i, t in enumerate(specials + byte_tokens + learned)}
    data["added_tokens"] = [dict(a, id=specials.index(a["content"])) for a in data["added_tokens"]]
    tokenizer = Tokenizer.from_str(json.dumps(data))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 256,
    }, indent=2))
    return tokenizer.get_vocab_size()


def tiny_config(arch: str, vocab_size: int):
    """A transformers config of `arch` with every dimension small but every feature present."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, eos_token_id=0, bos_token_id=None, pad_token_id=0)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=48, num_experts=8,
                                 num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=False)
    if arch == "olmoe":
        # OLMoE-1B-7B has no GQA and llama.cpp sizes its q/k norms by n_embd accordingly.
        common["num_key_value_heads"] = common["num_attention_heads"]
        return tf.OlmoeConfig(**common, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                              norm_topk_prob=False)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
                                 num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
                                 norm_topk_prob=True)
    if arch == "deepseek_v2":
        # DeepSeek-V2-Lite's structure: MLA without a q LoRA, the first layer dense, shared
        # experts, softmax routing scaled by routed_scaling_factor.
        common["num_key_value_heads"] = common["num_attention_heads"]
        return tf.DeepseekV2Config(**common, intermediate_size=96, moe_intermediate_size=32,
                                   n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                   first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
                                   qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, head_dim=16,
                                   routed_scaling_factor=1.5, topk_method="greedy", norm_topk_prob=False,
                                   n_group=1, topk_group=1)
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")


ARCHITECTURES = ("qwen2_moe", "olmoe", "mixtral", "qwen3_moe", "deepseek_v2")


def make_tiny_moe(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random MoE checkpoint of `arch` to out_dir and return the directory."""
    import torch
    import transformers as tf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = train_spm_style_tokenizer(out_dir) if arch == "mixtral" else train_tokenizer(out_dir)
    config = tiny_config(arch, vocab_size)
    if arch == "mixtral":
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init uses std 0.02: scale up so logits differ clearly between tokens and greedy
    # decoding is not decided by rounding noise.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir

def llama_cpp_source() -> Path:
    from slicemoe_gguf._native import build_info

    return Path(build_info()["llama_cpp_source"])


def convert_with_pinned_llama_cpp(hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """Convert with the pinned source's own convert_hf_to_gguf.py (a reference tool until
    slicemoe-convert exists).

    Its BPE pre-tokenizer check hashes the tokenizer's output against known published models; our
    tiny tokenizer is GPT-2 style byte-level BPE, so we name that pre-tokenizer directly.
    """
    tree = llama_cpp_source()
    code = (
        "import sys\n"
        f"sys.path[:0] = [{str(tree)!r}, {str(tree / 'gguf-py')!r}]\n"
        "import conversion.base as base\n"
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'\n"
        "import convert_hf_to_gguf\n"
        f"sys.argv = ['convert_hf_to_gguf.py', {str(hf_dir)!r}, '--outfile', {str(out)!r}, '--outtype', {outtype!r}]\n"
        "convert_hf_to_gguf.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-4000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arch", choices=ARCHITECTURES)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gguf", metavar="OUT.gguf", help="also convert it to an F32 GGUF with the "
                        "pinned llama.cpp's convert_hf_to_gguf.py (needs the package installed)")
    args = parser.parse_args(argv)
    path = make_tiny_moe(args.arch, args.out_dir, args.seed)
    print(f"wrote {path}")
    if args.gguf:
        print(f"wrote {convert_with_pinned_llama_cpp(path, Path(args.gguf))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
