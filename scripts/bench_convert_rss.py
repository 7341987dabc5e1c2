#!/usr/bin/env python3
"""Peak RSS of slicemoe-convert on a synthetic checkpoint with real OLMoE-1B-7B layer shapes.

OLMoE-1B-7B: hidden 2048, 64 experts of intermediate 1024, top-8, 16 heads; here only --layers
layers (random bf16 weights, a 512-token tokenizer) so that it fits the disk and runs in minutes.
The target: peak RSS at most about twice the largest expert tensor (one projection of one layer,
all experts, float32) plus a fixed overhead.

    python scripts/bench_convert_rss.py [--layers 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_moe import train_tokenizer  # noqa: E402

HIDDEN, N_EXPERT, N_FF, N_HEAD = 2048, 64, 1024, 16


def write_bf16_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    """safetensors with BF16 tensors, written tensor by tensor (bf16 = top 16 bits of float32)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in shapes.items():
            w = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
            f.write((w.view(np.uint32) >> 16).astype(np.uint16).tobytes())


def make_checkpoint(out: Path, layers: int, hidden: int = HIDDEN, n_expert: int = N_EXPERT, n_ff: int = N_FF,
                    n_head: int = N_HEAD) -> Path:
    """An OLMoE-layout checkpoint with random bf16 weights (OLMoE-1B-7B's shapes by default)."""
    out.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(out)
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    config = {"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": n_ff, "num_hidden_layers": layers,
              "num_attention_heads": n_head, "num_key_value_heads": n_head, "num_experts": n_expert,
              "num_experts_per_tok": 8, "norm_topk_prob": False, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
    (out / "config.json").write_text(json.dumps(config))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden),
                                          "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,),
                       f"{p}.self_attn.q_norm.weight": (hidden,), f"{p}.self_attn.k_norm.weight": (hidden,),
                       f"{p}.mlp.gate.weight": (n_expert, hidden)})
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}.self_attn.{proj}_proj.weight"] = (hidden, hidden)
        for e in range(n_expert):
            shapes[f"{p}.mlp.experts.{e}.gate_proj.weight"] = (n_ff, hidden)
            shapes[f"{p}.mlp.experts.{e}.up_proj.weight"] = (n_ff, hidden)
            shapes[f"{p}.mlp.experts.{e}.down_proj.weight"] = (hidden, n_ff)
    write_bf16_safetensors(out / "model.safetensors", shapes, np.random.default_rng(0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--keep", help="directory to keep the checkpoint and GGUF in")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        root = Path(args.keep or tmp)
        t0 = time.perf_counter()
        hf = make_checkpoint(root / "olmoe-shapes", args.layers)
        made = time.perf_counter() - t0
        out = root / "olmoe-shapes.gguf"
        t0 = time.perf_counter()
        subprocess.run(["slicemoe-convert", str(hf), "-o", str(out), "-q", "--force"], check=True)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        largest = N_EXPERT * N_FF * HIDDEN * 4
        print(f"synthetic OLMoE-1B-7B shapes, {args.layers} layers, bf16 checkpoint "
              f"{(hf / 'model.safetensors').stat().st_size / 2**30:.2f} GiB (made in {made:.0f} s)")
        print("| largest expert tensor (f32) | peak RSS | ratio | convert time | output |")
        print("|---|---|---|---|---|")
        print(f"| {largest / 2**20:.0f} MiB | {peak / 2**20:.0f} MiB | {peak / largest:.2f}x | {seconds:.1f} s "
              f"| {out.stat().st_size / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
