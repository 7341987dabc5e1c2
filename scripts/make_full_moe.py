#!/usr/bin/env python3
"""Write a random-weight checkpoint with a published MoE model's full shapes, tensor by tensor.

The model is built by transformers on the meta device from the published config.json
(published_configs.py), so tensor names and shapes are transformers' own (its in-memory layout:
fused experts in transformers 5), and no weight is ever materialized as a whole: each tensor is
generated in chunks of random bf16 values and streamed into safetensors shards of at most 5 GB,
with a model.safetensors.index.json, as published checkpoints are sharded. Peak memory is one
chunk. The tokenizer is the fixture's (fixture_tokenizers.py / make_tiny_moe.py).

Random routers route degenerately, so use these models for what scale shows (conversion, load,
memory, pools, reads), not for routing behaviour.

    python scripts/make_full_moe.py olmoe /data/olmoe-full
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_moe import write_tokenizer  # noqa: E402
from published_configs import HUB_NAMES, PUBLISHED  # noqa: E402

SHARD_BYTES = 5 * 10**9
CHUNK = 1 << 24   # elements generated at once (64 MiB of float32)


def meta_state_dict(arch: str) -> tuple[dict[str, tuple[int, ...]], object]:
    """Tensor names and shapes of the full-size model, from transformers on the meta device."""
    import torch
    import transformers as tf

    fields = dict(PUBLISHED[arch])
    config = tf.CONFIG_MAPPING[fields.pop("model_type")](**fields)
    config._name_or_path = HUB_NAMES[arch]
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return shapes, config


def random_bf16(n: int, std: float, rng: np.random.Generator):
    """n bf16 values (as little-endian uint16 bytes), generated CHUNK at a time."""
    for start in range(0, n, CHUNK):
        values = rng.standard_normal(min(CHUNK, n - start), dtype=np.float32)
        values *= std
        yield (values.view(np.uint32) >> 16).astype("<u2").tobytes()


def write_shards(out_dir: Path, shapes: dict[str, tuple[int, ...]], seed: int, progress: bool) -> int:
    from tqdm import tqdm

    names = sorted(shapes)
    groups, current, size = [], [], 0
    for name in names:
        nbytes = int(np.prod(shapes[name])) * 2
        if current and size + nbytes > SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, sum(int(np.prod(s)) * 2 for s in shapes.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not progress) as bar:
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name in group:
                nbytes = int(np.prod(shapes[name])) * 2
                header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header).encode()
            raw += b" " * (-len(raw) % 8)
            partial = out_dir / (fname + ".partial")
            with open(partial, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                for name in group:
                    shape = shapes[name]
                    # norms are ones (as initialized), matrices N(0, 0.02) like transformers' init
                    if len(shape) == 1:
                        ones = np.ones(shape, dtype=np.float32).view(np.uint32) >> 16
                        f.write(ones.astype("<u2").tobytes())
                        bar.update(shape[0] * 2)
                        continue
                    for chunk in random_bf16(int(np.prod(shape)), 0.02, rng):
                        f.write(chunk)
                        bar.update(len(chunk))
            partial.rename(out_dir / fname)
            weight_map.update({name: fname for name in group})
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arch", choices=sorted(PUBLISHED))
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shapes, config = meta_state_dict(args.arch)
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    write_tokenizer(args.arch, out_dir)
    config.save_pretrained(out_dir)
    total = write_shards(out_dir, shapes, args.seed, not args.quiet)
    print(f"wrote {out_dir}: {HUB_NAMES[args.arch]} shapes, {n_params / 1e9:.2f} B parameters, "
          f"{total / 1e9:.1f} GB of bf16 in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
