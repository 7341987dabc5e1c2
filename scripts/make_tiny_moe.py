#!/usr/bin/env python3
"""Create a tiny random-weight MoE checkpoint of a supported architecture with transformers.

The checkpoint is a real Hugging Face directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) written by transformers: the published model's config field for field
(published_configs.py) with only sizes shrunk, padded vocabulary included, and the most real
tokenizer a registry package ships (fixture_tokenizers.py).

    python scripts/make_tiny_moe.py qwen2_moe out/tiny-qwen2moe [--layout state_dict]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # the fixture modules beside this script
import fixture_tokenizers  # noqa: E402
from published_configs import HUB_NAMES, PUBLISHED, shrink  # noqa: E402

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


ARCHITECTURES = tuple(PUBLISHED)
LAYOUTS = ("save_pretrained", "state_dict")


def write_tokenizer(arch: str, out_dir: Path) -> int:
    """The fixture's tokenizer files (see fixture_tokenizers.py for where each comes from)."""
    if arch == "qwen2_moe":
        return fixture_tokenizers.write_qwen(out_dir, fixture_tokenizers.QWEN15_SPECIALS, "<|endoftext|>")
    if arch == "qwen3_moe":
        return fixture_tokenizers.write_qwen(out_dir, fixture_tokenizers.QWEN3_SPECIALS, "<|im_end|>")
    if arch == "deepseek_v2":
        return fixture_tokenizers.write_deepseek(out_dir)
    if arch == "olmoe":
        return fixture_tokenizers.write_olmoe(out_dir)
    return train_spm_style_tokenizer(out_dir)


def make_tiny_moe(arch: str, out_dir: str | Path, seed: int = 0, layout: str = "save_pretrained") -> Path:
    """Write a tiny random MoE checkpoint of `arch`, shaped as the published one (published_configs.py)
    with only its sizes shrunk, and return the directory.

    layout "save_pretrained": transformers' save_pretrained (the published per-expert tensor names);
    "state_dict": the model's own in-memory state dict written with safetensors (transformers 5 keeps
    experts fused there), as training and merging tools write it. Weights are bf16, as published."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_tokens = write_tokenizer(arch, out_dir)
    fields = shrink(arch)
    if n_tokens > fields["vocab_size"]:
        raise ValueError(f"{arch}: tokenizer has {n_tokens} tokens, more than vocab_size {fields['vocab_size']}")
    config = tf.CONFIG_MAPPING[fields.pop("model_type")](**fields)
    config._name_or_path = HUB_NAMES[arch]
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init uses std 0.02: scale up so logits differ clearly between tokens and greedy
    # decoding is not decided by rounding noise.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    model = model.to(torch.bfloat16).eval()
    if layout == "save_pretrained":
        model.save_pretrained(out_dir, safe_serialization=True)
    else:
        model.config.save_pretrained(out_dir)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out_dir / "model.safetensors",
                  metadata={"format": "pt"})
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
    parser.add_argument("--layout", choices=LAYOUTS, default="save_pretrained",
                        help="save_pretrained: published per-expert tensor names; state_dict: the "
                             "model's in-memory state dict (fused experts in transformers 5)")
    parser.add_argument("--gguf", metavar="OUT.gguf", help="also convert it to an F32 GGUF with the "
                        "pinned llama.cpp's convert_hf_to_gguf.py (needs the package installed)")
    args = parser.parse_args(argv)
    path = make_tiny_moe(args.arch, args.out_dir, args.seed, args.layout)
    print(f"wrote {path}")
    if args.gguf:
        print(f"wrote {convert_with_pinned_llama_cpp(path, Path(args.gguf))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
