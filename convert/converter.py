"""HF MoE checkpoint -> GGUF, one tensor at a time, with AMAT bit-sliced routed experts.

The plan (every output tensor's name, shape, type and byte size) is made from the safetensors
headers alone, so the GGUF header is written first and tensor data streams after it. The output
goes to a temporary file in the target directory that is fsynced and renamed into place only when
complete: an interrupted or failed conversion never leaves a partial OUT.gguf.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from slicemoe_gguf import amat

from .architectures import ATTENTION_TENSORS, DENSE_FFN_TENSORS, Architecture, architecture_for, moe_layers, n_expert, write_hparams
from .checkpoint import Checkpoint, CheckpointError
from .tokenizer import write_tokenizer

LSB_SUFFIX = "lsb"
Q = gguf.GGMLQuantizationType
EXPERT_TYPES = ("amat", "q8_0", "f16", "f32")
SLICE_ALIGNMENT = 4096   # general.alignment of sliced files: O_DIRECT's block size
# Bumped whenever the bytes written for the same checkpoint change, so that converted files cached
# by that key (the embedded model's) are made again (2: sliced files aligned to 4 KiB; 3: the
# searched AMAT grid by default).
FILE_REVISION = 3
# The K mixes are llama.cpp's own file types, made by its quantizer from an f32 file with the
# routed experts pinned: the dense part of a sliced file then matches the stock file users compare
# it with, tensor for tensor.
DENSE_MIXES = ("q4_k_m", "q5_k_m", "q6_k")
DENSE_TYPES = ("q8_0", "f16", "f32", *DENSE_MIXES)


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]   # numpy (row-major) element shape; GGUF stores it reversed
    qtype: Q
    role: str                # "dense", "expert_msb", "expert_lsb", "expert"

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * type_size


@dataclass
class PlanItem:
    """One source tensor (or stacked expert group) and the 1 or 2 GGUF tensors it becomes."""

    outputs: list[OutTensor]
    load: Callable[[], np.ndarray]
    source_bytes: int
    # source array -> one array per output (a permutation, or a split like MLA's kv_b_proj)
    transform: Callable[[np.ndarray], list[np.ndarray]] | None = None


@dataclass
class ConversionSummary:
    path: Path
    arch: str
    file_bytes: int
    bytes_by_role: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary halves -> llama.cpp's interleaved pairs for the 'llama' architecture."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _dense_type(shape: tuple[int, ...], requested: str, name: str) -> Q:
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight") or name.endswith("ffn_gate_inp_shexp.weight"):
        return Q.F32   # norms, biases and routers stay f32: routing decides which experts run
    if requested == "q8_0" and shape[-1] % 32 != 0:
        return Q.F16
    if requested in DENSE_MIXES:
        return Q.F32   # the quantizer's input, so that no weight is rounded twice
    return {"q8_0": Q.Q8_0, "f16": Q.F16, "f32": Q.F32}[requested]


def _encode_plain(t: OutTensor, data: np.ndarray) -> np.ndarray:
    if not np.isfinite(data).all():
        raise CheckpointError(f"{t.name}: contains NaN or Inf")
    if t.qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if t.qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, t.qtype)


def _remove_abandoned_partials(out: Path) -> None:
    """Remove `.NAME.*.partial` files of `out` that no converter holds (their writer was killed);
    a partial file another converter is writing right now is locked and left alone."""
    for leftover in out.parent.glob(f".{out.name}.*.partial"):
        try:
            fd = os.open(leftover, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue   # held by a running conversion
        finally:
            os.close(fd)
        leftover.unlink(missing_ok=True)


def _free_bytes(directory: Path) -> int:
    import shutil

    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0


def _quantize_dense(path: Path, mix: str, progress: bool) -> int:
    """Requantize the dense tensors of `path` in place with llama.cpp's quantizer and mix `mix`
    (routed experts kept as they are), through a sibling partial file. Returns the descriptor that
    holds the lock of the file now at `path`, for the caller to close once it is renamed."""
    from slicemoe_gguf._native import SliceMoEError
    from slicemoe_gguf.runtime import quantize_file

    if progress:
        print(f"quantizing the dense tensors to {mix.upper()} with llama.cpp's quantizer", file=sys.stderr)
    fd, name = tempfile.mkstemp(prefix=path.name.split(".partial")[0] + ".", suffix=".partial", dir=path.parent)
    fcntl.flock(fd, fcntl.LOCK_EX)   # see Converter.write: a locked partial file is in use
    try:
        quantize_file(path, name, mix.upper(), keep_experts=True)
        os.replace(name, path)
        return fd
    except BaseException as exc:
        Path(name).unlink(missing_ok=True)
        os.close(fd)
        if isinstance(exc, SliceMoEError):
            raise CheckpointError(f"quantizing the dense tensors to {mix.upper()} failed: {exc}") from None
        raise


def _check_loads(path: Path) -> None:
    """Refuse a file the pinned llama.cpp would not load (its own checks of hyperparameters,
    vocabulary and every tensor's name and shape, without reading tensor data): a conversion that
    succeeds gives a file that runs."""
    from slicemoe_gguf._native import SliceMoEError
    from slicemoe_gguf.runtime import check_model

    try:
        check_model(path)
    except SliceMoEError as exc:
        raise CheckpointError(f"the converted file would not load in llama.cpp, so it was not written: {exc}") from None


class Converter:
    def __init__(self, hf_dir: str | os.PathLike, experts: str = "amat", dense_type: str = "q8_0",
                 tokenizer_pre: str | None = None, grid: str = amat.DEFAULT_GRID):
        if experts not in EXPERT_TYPES:
            raise CheckpointError(f"--experts must be one of {', '.join(EXPERT_TYPES)}")
        if grid not in amat.GRIDS:
            raise CheckpointError(f"--grid must be one of {', '.join(amat.GRIDS)}")
        if dense_type not in DENSE_TYPES:
            raise CheckpointError(f"--dense-type must be one of {', '.join(DENSE_TYPES)}")
        self.ckpt = Checkpoint(hf_dir)
        self.config = self.ckpt.config
        self.arch: Architecture = architecture_for(self.config)
        self.experts = experts
        self.dense_type = dense_type
        self.grid = grid
        self.tokenizer_pre = tokenizer_pre
        self.plan = self._make_plan()
        # embedding rows: config.json's vocab_size, often padded beyond the tokenizer
        self.n_rows = self.ckpt.ref("model.embed_tokens.weight").shape[0]
        if self.config.get("vocab_size") not in (None, self.n_rows):
            raise CheckpointError(f"config.json vocab_size {self.config['vocab_size']} != "
                                  f"{self.n_rows} rows of model.embed_tokens.weight")

    # -- plan --------------------------------------------------------------------------------

    def _dense(self, hf_name: str, gguf_name: str, permute_heads: int = 0) -> PlanItem:
        ref = self.ckpt.ref(hf_name)
        out = OutTensor(gguf_name, ref.shape, _dense_type(ref.shape, self.dense_type, gguf_name), "dense")
        transform = (lambda a: [_permute_qk(a, permute_heads)]) if permute_heads else None
        return PlanItem([out], lambda: self.ckpt.read(hf_name), ref.nbytes, transform)

    def _mla_kv_b(self, layer: int) -> PlanItem:
        """kv_b_proj [n_head * (qk_nope + v), kv_lora] -> attn_k_b [n_head, kv_lora, qk_nope]
        (transposed, for the absorbed-MLA path) and attn_v_b [n_head, v, kv_lora]."""
        c = self.config
        name = f"model.layers.{layer}.self_attn.kv_b_proj.weight"
        ref = self.ckpt.ref(name)
        n_head, nope, v_dim = c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"]
        kv_lora = ref.shape[1]
        if ref.shape[0] != n_head * (nope + v_dim):
            raise CheckpointError(f"{name}: shape {ref.shape} does not match n_head * (qk_nope + v_head_dim)")

        def split(a: np.ndarray) -> list[np.ndarray]:
            kv = a.reshape(n_head, nope + v_dim, kv_lora)
            return [np.ascontiguousarray(kv[:, :nope, :].transpose(0, 2, 1)), np.ascontiguousarray(kv[:, nope:, :])]

        outs = [OutTensor(f"blk.{layer}.attn_k_b.weight", (n_head, kv_lora, nope), Q.F32, "dense"),
                OutTensor(f"blk.{layer}.attn_v_b.weight", (n_head, v_dim, kv_lora), Q.F32, "dense")]
        for t in outs:
            t.qtype = _dense_type(t.shape, self.dense_type, t.name)
        return PlanItem(outs, lambda: self.ckpt.read(name), ref.nbytes, split)

    def _moe_block(self, layer: int) -> str:
        """The module of layer `layer` that holds the router (the published name, else the one
        transformers uses in memory)."""
        for block in self.arch.moe_blocks:
            if f"model.layers.{layer}.{block}.{self.arch.router}.weight" in self.ckpt:
                return block
        return self.arch.moe_blocks[0]   # not found: the error then names the published tensor

    def _expert_source(self, layer: int, proj: str) -> tuple[str, tuple[int, int, int], int, Callable[[], np.ndarray]]:
        """(name for messages, [n_expert, n_out, n_in] shape, source bytes, loader) of one projection,
        from per-expert tensors or from the fused 3-D ones (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
        a, c = self.arch, self.config
        prefix = f"model.layers.{layer}.{self._moe_block(layer)}.experts"
        per_expert = [f"{prefix}.{e}.{a.expert_proj[proj]}.weight" for e in range(n_expert(c))]
        if per_expert[0] in self.ckpt:
            refs = [self.ckpt.ref(n) for n in per_expert]   # names the first missing expert
            return per_expert[0], (len(refs), *refs[0].shape), sum(r.nbytes for r in refs), lambda: self._stack(per_expert)
        fused = f"{prefix}.down_proj" if proj == "down" else f"{prefix}.gate_up_proj"
        if fused not in self.ckpt:
            raise CheckpointError(f"experts of layer {layer} not found: neither {per_expert[0]} nor {fused}")
        ref = self.ckpt.ref(fused)
        if proj == "down":
            return fused, ref.shape, ref.nbytes, lambda: self.ckpt.read(fused)
        n_ff = ref.shape[1] // 2
        start = 0 if proj == "gate" else n_ff
        return (fused, (ref.shape[0], n_ff, ref.shape[2]), ref.nbytes // 2,
                lambda: self.ckpt.read_rows(fused, start, start + n_ff))

    def _stack(self, names: list[str]) -> np.ndarray:
        """Per-expert tensors into one preallocated [E, n_out, n_in] array (never two copies)."""
        first = self.ckpt.ref(names[0])
        out = np.empty((len(names), *first.shape), dtype=np.float32)
        for e, name in enumerate(names):
            out[e] = self.ckpt.read(name)
        return out

    def _experts(self, layer: int, proj: str) -> PlanItem:
        source, shape, source_bytes, load = self._expert_source(layer, proj)
        base = f"blk.{layer}.ffn_{proj}_exps"
        if shape[-1] % 32 != 0 and self.experts in ("amat", "q8_0"):
            raise CheckpointError(f"{source}: input dimension {shape[-1]} is not a multiple of 32, "
                                  f"required by --experts {self.experts}")
        if self.experts == "amat":
            outs = [OutTensor(f"{base}.weight", shape, Q.Q4_1, "expert_msb"),
                    OutTensor(f"{base}.{LSB_SUFFIX}", shape, Q.Q4_1, "expert_lsb")]
        else:
            qtype = {"q8_0": Q.Q8_0, "f16": Q.F16, "f32": Q.F32}[self.experts]
            outs = [OutTensor(f"{base}.weight", shape, qtype, "expert")]
        return PlanItem(outs, load, source_bytes)

    def _make_plan(self) -> list[PlanItem]:
        c, a = self.config, self.arch
        plan = [self._dense("model.embed_tokens.weight", "token_embd.weight")]
        moe = set(moe_layers(a, c))
        n_head, n_head_kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
        for i in range(c["num_hidden_layers"]):
            if i not in moe and not a.dense_ffn:
                raise CheckpointError(f"layer {i} is a dense FFN layer, which llama.cpp's {a.gguf_arch} does not run")
            dense = DENSE_FFN_TENSORS if i not in moe else {}
            for hf_suffix, gguf_suffix in {**ATTENTION_TENSORS, **a.extra, **dense}.items():
                hf_name = f"model.layers.{i}.{hf_suffix}"
                if hf_name not in self.ckpt:
                    continue
                permute = 0
                if a.permute_qk and gguf_suffix == "attn_q.weight":
                    permute = n_head
                elif a.permute_qk and gguf_suffix == "attn_k.weight":
                    permute = n_head_kv
                plan.append(self._dense(hf_name, f"blk.{i}.{gguf_suffix}", permute))
            if a.mla:
                plan.append(self._mla_kv_b(i))
            if i not in moe:
                continue
            plan.append(self._dense(f"model.layers.{i}.{self._moe_block(i)}.{a.router}.weight", f"blk.{i}.ffn_gate_inp.weight"))
            for proj in ("gate", "up", "down"):
                plan.append(self._experts(i, proj))
        plan.append(self._dense("model.norm.weight", "output_norm.weight"))
        if "lm_head.weight" in self.ckpt:
            plan.append(self._dense("lm_head.weight", "output.weight"))
        elif not c.get("tie_word_embeddings", False):
            raise CheckpointError("tensor lm_head.weight not found in the checkpoint")
        return plan

    # -- encoding ----------------------------------------------------------------------------

    def _encode(self, item: PlanItem, data: np.ndarray) -> list[np.ndarray]:
        arrays = item.transform(data) if item.transform is not None else [data]
        for t, a in zip(item.outputs, arrays):
            if tuple(a.shape) != t.shape:
                raise CheckpointError(f"{t.name}: source shape {a.shape} != expected {t.shape}")
        first = item.outputs[0]
        if first.role == "expert_msb":
            # expert by expert, so the quantizer's temporaries stay the size of one expert
            row_bytes = data.shape[-1] // amat.GROUP_SIZE * amat.Q4_1_BLOCK_BYTES
            msb = np.empty((*data.shape[:-1], row_bytes), dtype=np.uint8)
            lsb = np.empty_like(msb)

            def encode_expert(e: int) -> None:
                msb[e], lsb[e] = amat.slice_blocks(amat.quantize(data[e], name=first.name, grid=self.grid))

            # experts on every core: numpy releases the GIL in its loops, and the searched grid's
            # search is most of a conversion's time
            with ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, data.shape[0])) as pool:
                list(pool.map(encode_expert, range(data.shape[0])))
            return [msb, lsb]
        return [_encode_plain(t, a) for t, a in zip(item.outputs, arrays)]

    def tensors(self) -> list[OutTensor]:
        return [t for item in self.plan for t in item.outputs]

    def bytes_by_role(self) -> dict[str, int]:
        roles: dict[str, int] = {}
        for t in self.tensors():
            roles[t.role] = roles.get(t.role, 0) + t.nbytes
        return roles

    def _metadata(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        w.add_name(c.get("_name_or_path") or self.ckpt.path.name)
        write_hparams(w, self.arch, c)
        file_type = {"amat": gguf.LlamaFileType.MOSTLY_Q4_1, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}[self.experts]
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(w, self.ckpt.path, self.n_rows, self.tokenizer_pre)
        if self.experts == "amat":
            # The paper's grid is written as version 1, byte for byte what earlier versions wrote.
            w.add_uint32("slicemoe.format_version", amat.format_version(self.grid))
            if amat.format_version(self.grid) >= 2:
                w.add_string("slicemoe.grid", self.grid)
            w.add_uint32("slicemoe.bits_high", 8)
            w.add_uint32("slicemoe.bits_low", 4)
            w.add_uint32("slicemoe.group_size", amat.GROUP_SIZE)
            w.add_string("slicemoe.lsb_suffix", LSB_SUFFIX)
            w.add_string("slicemoe.source.model", str(c.get("_name_or_path") or self.ckpt.path.name))
            w.add_string("slicemoe.source.model_type", c["model_type"])
            if c.get("transformers_version"):
                w.add_string("slicemoe.source.transformers_version", c["transformers_version"])

    # -- writing -----------------------------------------------------------------------------

    def write(self, out: str | os.PathLike, *, force: bool = False, progress: bool = True) -> ConversionSummary:
        from tqdm import tqdm

        out = Path(out)
        if out.exists() and not force:
            raise CheckpointError(f"{out} exists; pass --force to overwrite it")
        if not out.parent.is_dir():
            raise CheckpointError(f"output directory {out.parent} does not exist")
        t0 = time.perf_counter()
        _remove_abandoned_partials(out)
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        except OSError as exc:
            raise CheckpointError(f"cannot write to {out.parent}: {exc.strerror}") from exc
        # held (and so locked) until this function returns: a partial file nobody holds is a
        # leftover of a killed run, which the next run removes
        fcntl.flock(fd, fcntl.LOCK_EX)
        locks = [fd]
        tmp = Path(tmp_name)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)   # mkstemp's 0600 would hide the model from other users
            w = gguf.GGUFWriter(tmp, arch=self.arch.gguf_arch)
            if self.experts == "amat":
                # every tensor starts on a 4 KiB boundary, and so every expert slice of the published
                # shapes (whose slice sizes are 4 KiB multiples): the cache reads them with O_DIRECT
                # straight into its pools
                w.add_custom_alignment(SLICE_ALIGNMENT)
            self._metadata(w)
            for t in self.tensors():
                # float tensors by element type; quantized ones as raw blocks with their ggml type
                plain = {Q.F32: np.dtype(np.float32), Q.F16: np.dtype(np.float16)}.get(t.qtype)
                w.add_tensor_info(t.name, t.shape, plain if plain is not None else np.dtype(np.float32),
                                  t.nbytes, raw_dtype=None if plain is not None else t.qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            total = sum(item.source_bytes for item in self.plan)
            with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress) as bar:
                for item in self.plan:
                    for t, data in zip(item.outputs, self._encode(item, item.load())):
                        if data.nbytes != t.nbytes:
                            raise CheckpointError(f"{t.name}: encoded {data.nbytes} bytes, planned {t.nbytes}")
                        w.write_tensor_data(data)
                    bar.update(item.source_bytes)
            w.close()
            if self.dense_type in DENSE_MIXES:
                locks.append(_quantize_dense(tmp, self.dense_type, progress))
            _check_loads(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC or _free_bytes(out.parent) < (1 << 20):
                raise CheckpointError(f"cannot write {out}: no space left on the device of {out.parent}; "
                                      "nothing was written") from exc
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            for lock in locks:
                os.close(lock)
        return ConversionSummary(out, self.arch.gguf_arch, out.stat().st_size, self._bytes_by_role_in(out),
                                 time.perf_counter() - t0)

    def _bytes_by_role_in(self, path: Path) -> dict[str, int]:
        """Tensor bytes by role as written (a dense mix changes the planned sizes)."""
        role_of = {t.name: t.role for t in self.tensors()}
        roles: dict[str, int] = {}
        for t in gguf.GGUFReader(path).tensors:
            roles[role_of[t.name]] = roles.get(role_of[t.name], 0) + int(t.n_bytes)
        return roles
