"""What a GGUF holds, read with gguf-py: architecture, expert counts and slice byte sizes."""

from __future__ import annotations

import re
from pathlib import Path

_EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.(weight|lsb)$")


def describe(path: str | Path) -> dict:
    """A JSON-ready summary of the model file; raises ValueError for a file gguf-py cannot read."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as exc:
        raise ValueError(f"'{path}' is not a readable GGUF (truncated or corrupt: {exc})") from exc
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    arch = fields.get("general.architecture", "?")

    layers: dict[int, dict[str, int]] = {}
    n_expert_tensor = 0
    other_bytes = 0
    for t in reader.tensors:
        m = _EXPERT_TENSOR.match(t.name)
        if not m:
            other_bytes += int(t.n_bytes)
            continue
        layer, kind = int(m.group(1)), m.group(3)
        n_expert_tensor = int(t.shape[2])
        slot = "msb" if kind == "weight" else "lsb"
        layers.setdefault(layer, {"msb": 0, "lsb": 0})[slot] += int(t.n_bytes)

    sliced = any(v["lsb"] for v in layers.values())
    per_layer = [{"layer": i, "msb_bytes": v["msb"], "lsb_bytes": v["lsb"],
                  "msb_bytes_per_expert": v["msb"] // max(n_expert_tensor, 1),
                  "lsb_bytes_per_expert": v["lsb"] // max(n_expert_tensor, 1)}
                 for i, v in sorted(layers.items())]
    return {
        "path": str(path),
        "architecture": arch,
        "name": fields.get("general.name"),
        "n_layers": fields.get(f"{arch}.block_count"),
        "n_experts": fields.get(f"{arch}.expert_count"),
        "top_k": fields.get(f"{arch}.expert_used_count"),
        "moe_layers": [p["layer"] for p in per_layer],
        "sliced": sliced,
        "expert_msb_bytes": sum(p["msb_bytes"] for p in per_layer),
        "expert_lsb_bytes": sum(p["lsb_bytes"] for p in per_layer),
        # the engine sizes every layer's slots by the largest slice (the energy model's MAC count)
        "msb_slice_bytes": max((p["msb_bytes_per_expert"] for p in per_layer), default=0),
        "other_bytes": other_bytes,
        "file_bytes": Path(path).stat().st_size,
        "layers": per_layer,
        "slicemoe": {k: v for k, v in fields.items() if k.startswith("slicemoe.")},
    }
