"""Read a Hugging Face checkpoint directory one tensor at a time, without torch.

safetensors is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
data_offsets), then raw little-endian data. Reading a tensor is one pread of its byte range, so
the converter holds at most the tensors it is working on (no whole-file mmap in the RSS).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class CheckpointError(Exception):
    """A user-facing problem with the input checkpoint (the CLI prints it without a traceback)."""


_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
           "F64": np.dtype("<f8")}


@dataclass(frozen=True)
class TensorRef:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int   # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, TensorRef]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path.name}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8:
                raise CheckpointError(f"{path.name}: truncated or not a safetensors file")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path.name}: not a safetensors file (bad header)") from exc
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']} "
                                  f"(supported: {', '.join(_DTYPES)})")
        if 8 + n + end > size:
            raise CheckpointError(f"{path.name}: truncated: tensor {name} ends past the end of the file")
        refs[name] = TensorRef(name, path, info["dtype"], tuple(info["shape"]), 8 + n + start, end - start)
    return refs


class Checkpoint:
    """config.json plus the tensors of every safetensors shard (model.safetensors.index.json)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a directory (expected a Hugging Face checkpoint)")
        config_path = self.path / "config.json"
        try:
            self.config = json.loads(config_path.read_text())
        except FileNotFoundError as exc:
            raise CheckpointError(f"{config_path} not found") from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {config_path}: {exc}") from exc
        self.tensors: dict[str, TensorRef] = {}
        for shard in self._shards():
            self.tensors.update(_read_header(shard))

    def _shards(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"cannot read {index}: {exc}") from exc
            shards = [self.path / name for name in sorted(set(weight_map.values()))]
            for shard in shards:
                if not shard.exists():
                    raise CheckpointError(f"missing shard {shard.name} (listed in {index.name})")
            return shards
        single = self.path / "model.safetensors"
        if single.exists():
            return [single]
        found = sorted(self.path.glob("*.safetensors"))
        if not found:
            raise CheckpointError(f"no .safetensors files in {self.path}")
        return found

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def ref(self, name: str) -> TensorRef:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} not found in the checkpoint") from None

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 (bf16 and f16 widened exactly)."""
        ref = self.ref(name)
        return self._pread(ref, [(ref.offset, ref.nbytes)]).reshape(ref.shape)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of every matrix of a 3-D tensor [E, R, C], as float32 [E, stop - start, C].

        One read per matrix: the gate and up halves of a fused gate_up_proj are read separately
        without ever holding the whole tensor."""
        ref = self.ref(name)
        n_mat, n_rows, n_cols = ref.shape
        row_bytes = n_cols * _DTYPES[ref.dtype].itemsize
        ranges = [(ref.offset + (e * n_rows + start) * row_bytes, (stop - start) * row_bytes) for e in range(n_mat)]
        return self._pread(ref, ranges).reshape(n_mat, stop - start, n_cols)

    def _pread(self, ref: TensorRef, ranges: list[tuple[int, int]]) -> np.ndarray:
        fd = os.open(ref.file, os.O_RDONLY)
        try:
            chunks = [os.pread(fd, n, offset) for offset, n in ranges]
        finally:
            os.close(fd)
        if any(len(c) != n for c, (_, n) in zip(chunks, ranges)):
            raise CheckpointError(f"{ref.file.name}: short read of tensor {ref.name}")
        a = np.frombuffer(b"".join(chunks) if len(chunks) > 1 else chunks[0], dtype=_DTYPES[ref.dtype])
        if ref.dtype == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32, copy=False)
