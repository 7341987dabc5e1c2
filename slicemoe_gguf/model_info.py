"""What a GGUF holds: architecture, expert counts and slice byte sizes, from its header alone.

gguf-py's GGUFReader materializes every element of every array (a 151936-token vocabulary takes it
tens of seconds), so the header is walked here directly: scalars are kept, arrays skipped, tensor
infos read; type sizes come from gguf-py's table.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

_EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.(weight|lsb)$")

# GGUF value types (gguf-py's GGUFValueType): fixed sizes of the scalar ones; 8 = string, 9 = array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]   # ggml order (innermost first), as GGUFReader reports it
    n_bytes: int
    offset: int              # of its data, from the start of the file


class _Cursor:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.data):
            raise ValueError("string runs past the end of the file")
        text = self.data[self.pos:self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return text

    def skip_value(self, vtype: int) -> None:
        if vtype == _STRING:
            self.string()
        elif vtype == _ARRAY:
            etype, n = self.take("<I"), self.take("<Q")
            if etype in _SCALAR:
                self.pos += n * struct.calcsize(_SCALAR[etype])
            else:
                for _ in range(n):
                    self.skip_value(etype)
        elif vtype in _SCALAR:
            self.pos += struct.calcsize(_SCALAR[vtype])
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")
        if self.pos > len(self.data):
            raise ValueError("a metadata value runs past the end of the file")


def read_header(path: str | Path) -> tuple[dict, list[TensorInfo]]:
    """(scalar and string metadata, tensor infos) of a GGUF; raises ValueError if it is not one."""
    import mmap

    import gguf

    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise ValueError("empty file") from None
    try:
        cur = _Cursor(data)
        if data[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        cur.pos = 4
        version = cur.take("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        fields: dict = {}
        for _ in range(n_kv):
            key, vtype = cur.string(), cur.take("<I")
            if vtype in _SCALAR:
                fields[key] = cur.take(_SCALAR[vtype])
            elif vtype == _STRING:
                fields[key] = cur.string()
            else:
                cur.skip_value(vtype)
        infos = []
        for _ in range(n_tensors):
            name, n_dims = cur.string(), cur.take("<I")
            shape = tuple(cur.take("<Q") for _ in range(n_dims))
            ggml_type, offset = cur.take("<I"), cur.take("<Q")
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                raise ValueError(f"tensor {name} has unknown type {ggml_type}") from None
            n_elements = 1
            for d in shape:
                n_elements *= d
            infos.append((name, shape, n_elements // block * type_size, offset))
        alignment = fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment!r} is not a power of 2")
        data_start = -(-cur.pos // alignment) * alignment
        tensors = [TensorInfo(name, shape, n_bytes, data_start + offset) for name, shape, n_bytes, offset in infos]
        for t in tensors:
            if t.offset + t.n_bytes > len(data):
                raise ValueError(f"tensor {t.name} ends past the end of the file")
        return fields, tensors
    except (struct.error, OverflowError):
        raise ValueError("the header runs past the end of the file") from None
    finally:
        data.close()


def describe(path: str | Path) -> dict:
    """A JSON-ready summary of the model file; raises ValueError for a file that is not a readable GGUF."""
    try:
        fields, tensors = read_header(path)
    except ValueError as exc:
        raise ValueError(f"'{path}' is not a readable GGUF (truncated or corrupt: {exc})") from exc
    arch = fields.get("general.architecture", "?")

    layers: dict[int, dict[str, int]] = {}
    n_expert_tensor = 0
    other_bytes = 0
    for t in tensors:
        m = _EXPERT_TENSOR.match(t.name)
        if not m:
            other_bytes += int(t.n_bytes)
            continue
        layer, kind = int(m.group(1)), m.group(3)
        if len(t.shape) != 3:
            raise ValueError(f"'{path}' is not a readable MoE GGUF: expert tensor {t.name} has shape {t.shape}, "
                             "expected [n_in, n_out, n_expert]")
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
        # the AMAT grid of the slices: named by format version 2, implied (the paper's) by version 1
        "grid": (fields.get("slicemoe.grid") or "paper") if sliced else None,
        "expert_msb_bytes": sum(p["msb_bytes"] for p in per_layer),
        "expert_lsb_bytes": sum(p["lsb_bytes"] for p in per_layer),
        # the engine sizes every layer's slots by the largest slice (the energy model's MAC count)
        "msb_slice_bytes": max((p["msb_bytes_per_expert"] for p in per_layer), default=0),
        "other_bytes": other_bytes,
        "file_bytes": Path(path).stat().st_size,
        "layers": per_layer,
        "slicemoe": {k: v for k, v in fields.items() if k.startswith("slicemoe.")},
    }
