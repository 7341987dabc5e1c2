"""slicemoe-convert: every supported architecture, both expert layouts, AMAT slices within their
bounds, stock GGUFs that reproduce transformers, and clean failures on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest

from helpers import convert, gguf_dequantize, rewrite_checkpoint, run_cli, run_json

from slicemoe_gguf.model_info import read_header

ARCHS = ["qwen2_moe", "olmoe", "mixtral", "qwen3_moe", "deepseek_v2"]
PROMPT = "Once upon a time there was a small village"


def _expert_stack(hf_dir: Path, layer: int, proj: str) -> np.ndarray:
    """[E, n_out, n_in] float32 of one projection, read with safetensors from a per-expert checkpoint."""
    from safetensors.torch import load_file

    tensors = {k: v.float().numpy() for k, v in load_file(hf_dir / "model.safetensors").items()}
    hf_proj = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}[proj]
    rows = {}
    for name, value in tensors.items():
        parts = name.split(".")
        if f"layers.{layer}." in name and ".experts." in name and parts[-2] in hf_proj:
            rows[int(parts[-3])] = value
    return np.stack([rows[e] for e in sorted(rows)]).astype(np.float32)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.slow
def test_amat_slices_reproduce_the_original_experts(arch, tiny_checkpoints, tmp_path):
    """Read back with gguf-py (an independent reader). The state-dict layout gives the same file
    content (tests/test_published.py)."""
    src = hf_dir = tiny_checkpoints(arch)
    out = tmp_path / "amat.gguf"
    proc = convert(hf_dir, out)
    assert proc.returncode == 0, proc.stderr

    reader = gguf.GGUFReader(out)
    fields = {f.name: f.contents() for f in reader.fields.values()}
    assert (fields["slicemoe.format_version"], fields["slicemoe.grid"]) == (2, "searched")
    assert (fields["slicemoe.bits_high"], fields["slicemoe.bits_low"], fields["slicemoe.group_size"]) == (8, 4, 32)
    assert fields["slicemoe.lsb_suffix"] == "lsb"
    tensors = {t.name: t for t in reader.tensors}
    config = json.loads((src / "config.json").read_text())
    first_moe = config.get("first_k_dense_replace", 0)   # DeepSeek-V2 starts with dense layers
    moe = [i for i in range(config["num_hidden_layers"]) if f"blk.{i}.ffn_up_exps.weight" in tensors]
    assert moe == list(range(first_moe, config["num_hidden_layers"]))
    for layer in moe:
        for proj in ("gate", "up", "down"):
            w = _expert_stack(src, layer, proj)
            msb_t, lsb_t = tensors[f"blk.{layer}.ffn_{proj}_exps.weight"], tensors[f"blk.{layer}.ffn_{proj}_exps.lsb"]
            assert msb_t.tensor_type == lsb_t.tensor_type == gguf.GGMLQuantizationType.Q4_1
            assert list(msb_t.shape) == [w.shape[2], w.shape[1], w.shape[0]]  # ggml order: n_in, n_out, n_expert
            msb = gguf_dequantize(msb_t).reshape(w.shape)
            lsb = gguf_dequantize(lsb_t).reshape(w.shape)
            groups = w.reshape(-1, 32)
            # the searched grid's 8-bit step is at most range / 240 and its MSB levels reach within
            # half a step of the group's ends
            s = (groups.max(1) - groups.min(1)) / 240
            slack = 1e-3 * np.abs(groups).max(1) + 1e-7   # fp16 rounding of the block constants
            err_high = np.abs((msb + lsb).reshape(-1, 32) - groups).max(1)
            err_low = np.abs(msb.reshape(-1, 32) - groups).max(1)
            assert (err_high <= s / 2 + slack).all()
            assert (err_low <= 8 * s + slack).all()
            # one expert's slice is one contiguous byte range
            per_expert_bytes = msb_t.n_bytes // w.shape[0]
            assert per_expert_bytes == w.shape[1] * w.shape[2] // 32 * 20


@pytest.mark.slow
def test_sharded_state_dict_gives_the_same_gguf_as_single_file_save_pretrained(tiny_checkpoints, tmp_path):
    a = tiny_checkpoints("qwen2_moe")
    b = rewrite_checkpoint(tiny_checkpoints("qwen2_moe", "state_dict"), tmp_path / "b", shards=3)
    assert convert(a, tmp_path / "a.gguf").returncode == 0
    assert convert(b, tmp_path / "b.gguf").returncode == 0
    (_, ta), (_, tb) = read_header(tmp_path / "a.gguf"), read_header(tmp_path / "b.gguf")
    assert [(t.name, t.shape) for t in ta] == [(t.name, t.shape) for t in tb]
    a, b = (tmp_path / "a.gguf").read_bytes(), (tmp_path / "b.gguf").read_bytes()
    for x, y in zip(ta, tb):
        assert a[x.offset:x.offset + x.n_bytes] == b[y.offset:y.offset + y.n_bytes], x.name


@pytest.mark.slow
def test_q8_0_experts_make_a_stock_gguf(tiny_checkpoints, tmp_path):
    out = tmp_path / "q8.gguf"
    assert convert(tiny_checkpoints("olmoe"), out, "--experts", "q8_0").returncode == 0
    reader = gguf.GGUFReader(out)
    assert not any(f.name.startswith("slicemoe.") for f in reader.fields.values())
    assert not any(t.name.endswith(".lsb") for t in reader.tensors)
    result = run_json("run", "-m", str(out), "-p", PROMPT, "-n", "4", "--json", "--ignore-eos")
    assert result["n_decode"] == 4


@pytest.mark.slow
def test_a_k_mix_gives_llama_cpps_own_dense_tensors_and_leaves_the_slices_unchanged(tiny_checkpoints, stock_gguf,
                                                                                   sliced_gguf, tmp_path):
    """--dense-type q4_k_m: the dense part is what llama.cpp makes of the same checkpoint for a stock
    Q4_K_M file (per tensor: its type and bytes), and every expert slice is the default conversion's,
    byte for byte. Qwen1.5-MoE: shared experts and a padded vocabulary. The reference is independent of
    our converter and our quantizer call: the pinned convert_hf_to_gguf.py's f32 file, quantized by
    llama_model_quantize through llama-cpp-python with its default parameters."""
    hf = tiny_checkpoints("qwen2_moe")
    mixed = tmp_path / "mixed.gguf"
    proc = convert(hf, mixed, "--dense-type", "q4_k_m")
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob(".mixed.gguf.*"))   # the f32 intermediate is gone
    stock = tmp_path / "stock-q4_k_m.gguf"
    quantize = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import ctypes
        import slicemoe_gguf.llama   # llama-cpp-python's bindings on the library we built
        import llama_cpp
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        status = llama_cpp.llama_model_quantize({str(stock_gguf("qwen2_moe")).encode()!r}, {str(stock).encode()!r},
                                                ctypes.byref(params))
        raise SystemExit(status)
    """)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert quantize.returncode == 0, quantize.stderr[-2000:]

    ours = {t.name: t for t in gguf.GGUFReader(mixed).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(stock).tensors}
    default = {t.name: t for t in gguf.GGUFReader(sliced_gguf("qwen2_moe")).tensors}
    assert set(ours) == set(default)
    experts = {name for name in ours if "_exps." in name}
    assert experts and all(name.endswith(".lsb") or name.endswith(".weight") for name in experts)
    for name in experts:
        assert ours[name].tensor_type == default[name].tensor_type == gguf.GGMLQuantizationType.Q4_1, name
        assert np.array_equal(ours[name].data, default[name].data), name
    mixed_types = set()
    for name in set(ours) - experts:
        assert ours[name].tensor_type == theirs[name].tensor_type, name
        assert np.array_equal(ours[name].data, theirs[name].data), name
        mixed_types.add(ours[name].tensor_type)
    assert len(mixed_types - {gguf.GGMLQuantizationType.F32}) >= 2   # a mix, not one type

    result = run_json("run", "-m", str(mixed), "-p", PROMPT, "-n", "4", "--json", "--ignore-eos",
                      "--cache-budget", "50%")
    assert result["n_decode"] == 4 and result["cache"]["misses"] > 0


def test_dry_run_lists_tensors_and_writes_nothing(tiny_checkpoints, tmp_path):
    out = tmp_path / "never.gguf"
    proc = convert(tiny_checkpoints("qwen2_moe"), out, "--dry-run")
    assert proc.returncode == 0
    assert "blk.0.ffn_up_exps.lsb" in proc.stdout and "Q4_1" in proc.stdout and "MiB" in proc.stdout
    assert not out.exists()


class TestBadInput:
    def _fails(self, proc, message: str, out: Path):
        assert proc.returncode == 1
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.*"))   # no temporary file left behind

    def test_unsupported_architecture_lists_the_supported_ones(self, tiny_checkpoints, tmp_path):
        hf = rewrite_checkpoint(tiny_checkpoints("olmoe"), tmp_path / "hf")
        config = json.loads((hf / "config.json").read_text())
        config["model_type"] = "llama"
        (hf / "config.json").write_text(json.dumps(config))
        out = tmp_path / "o.gguf"
        self._fails(convert(hf, out), "unsupported architecture 'llama'", out)
        assert "qwen2_moe" in convert(hf, out).stderr

    def test_missing_shard_is_named(self, tiny_checkpoints, tmp_path):
        hf = rewrite_checkpoint(tiny_checkpoints("olmoe"), tmp_path / "hf", shards=2)
        (hf / "model-00002-of-00002.safetensors").unlink()
        out = tmp_path / "o.gguf"
        self._fails(convert(hf, out), "missing shard model-00002-of-00002.safetensors", out)

    def test_missing_tensor_is_named(self, tiny_checkpoints, tmp_path):
        from safetensors.torch import load_file, save_file

        hf = rewrite_checkpoint(tiny_checkpoints("olmoe"), tmp_path / "hf")
        tensors = load_file(hf / "model.safetensors")
        del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
        save_file(tensors, hf / "model.safetensors")
        out = tmp_path / "o.gguf"
        self._fails(convert(hf, out), "model.layers.1.mlp.experts.3.up_proj.weight not found", out)

    def test_nan_weights_are_named(self, tiny_checkpoints, tmp_path):
        from safetensors.torch import load_file, save_file

        hf = rewrite_checkpoint(tiny_checkpoints("olmoe"), tmp_path / "hf")
        tensors = load_file(hf / "model.safetensors")
        tensors["model.layers.2.mlp.experts.5.down_proj.weight"][3, 7] = float("nan")
        save_file(tensors, hf / "model.safetensors")
        out = tmp_path / "o.gguf"
        self._fails(convert(hf, out), "blk.2.ffn_down_exps.weight: contains NaN or Inf", out)

    def test_truncated_safetensors(self, tiny_checkpoints, tmp_path):
        hf = rewrite_checkpoint(tiny_checkpoints("olmoe"), tmp_path / "hf")
        data = (hf / "model.safetensors").read_bytes()
        (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
        out = tmp_path / "o.gguf"
        self._fails(convert(hf, out), "truncated", out)

    def test_not_a_checkpoint_directory(self, tmp_path):
        out = tmp_path / "o.gguf"
        self._fails(convert(tmp_path / "nowhere", out), "is not a directory", out)

    def test_existing_output_needs_force(self, tiny_checkpoints, tmp_path):
        out = tmp_path / "o.gguf"
        out.write_bytes(b"keep me")
        proc = convert(tiny_checkpoints("olmoe"), out)
        assert proc.returncode == 1 and "--force" in proc.stderr
        assert out.read_bytes() == b"keep me"
        assert convert(tiny_checkpoints("olmoe"), out, "--force").returncode == 0
        assert out.read_bytes()[:4] == b"GGUF"

    def test_unwritable_output_directory(self, tiny_checkpoints, tmp_path):
        out = tmp_path / "no" / "such" / "dir" / "o.gguf"
        proc = convert(tiny_checkpoints("olmoe"), out)
        assert proc.returncode == 1 and "does not exist" in proc.stderr


@pytest.mark.slow
def test_inspect_reports_slice_sizes(tiny_checkpoints, tmp_path):
    out = tmp_path / "amat.gguf"
    assert convert(tiny_checkpoints("qwen2_moe"), out).returncode == 0
    info = run_json("inspect", str(out), "--json")
    assert info["architecture"] == "qwen2moe" and info["sliced"]
    config = json.loads((tiny_checkpoints("qwen2_moe") / "config.json").read_text())
    n_expert, hidden, ffn = config["num_experts"], config["hidden_size"], config["moe_intermediate_size"]
    assert (info["n_layers"], info["n_experts"], info["top_k"]) == (3, n_expert, config["num_experts_per_tok"])
    assert info["moe_layers"] == [0, 1, 2]
    # per expert: gate + up (ffn x hidden) and down (hidden x ffn), 20 bytes per 32 weights, in each slice
    per_expert = 3 * hidden * ffn // 32 * 20
    assert info["layers"][0]["msb_bytes_per_expert"] == info["layers"][0]["lsb_bytes_per_expert"] == per_expert
    assert info["expert_msb_bytes"] == 3 * n_expert * per_expert
    assert info["memory"]["expert_bytes"] == 2 * info["expert_msb_bytes"]   # no cache: all of them
    assert info["slicemoe"]["slicemoe.group_size"] == 32
    assert "AMAT slices" in run_cli("inspect", str(out)).stdout


def test_amat_gguf_loads_and_runs_through_our_library(tiny_checkpoints, tmp_path):
    """A sliced file loads (patch 0001 accepts the .lsb tensors); until the slice cache exists the
    stock graph runs its MSB slices, i.e. the 4-bit model."""
    out = tmp_path / "amat.gguf"
    assert convert(tiny_checkpoints("olmoe"), out).returncode == 0
    result = run_json("run", "-m", str(out), "-p", PROMPT, "-n", "6", "--json", "--ignore-eos")
    assert result["n_decode"] == 6 and all(0 <= t < 50304 for t in result["tokens"])


@pytest.mark.slow
def test_unknown_pre_tokenizer_regex_is_refused_unless_named(tiny_checkpoints, tmp_path):
    hf = rewrite_checkpoint(tiny_checkpoints("olmoe"), tmp_path / "hf")
    tok = json.loads((hf / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (hf / "tokenizer.json").write_text(json.dumps(tok))
    out = tmp_path / "o.gguf"
    proc = convert(hf, out)
    assert proc.returncode == 1 and "--tokenizer-pre" in proc.stderr and not out.exists()
    assert convert(hf, out, "--tokenizer-pre", "gpt-2").returncode == 0
    fields = {f.name: f.contents() for f in gguf.GGUFReader(out).fields.values() if f.name == "tokenizer.ggml.pre"}
    assert fields["tokenizer.ggml.pre"] == "gpt-2"


@pytest.mark.slow
def test_header_reader_agrees_with_gguf_py(tiny_checkpoints, tmp_path):
    """slicemoe's own header walk (describe, inspect: fast on 150k-token vocabularies) reads the
    same scalars and tensors as gguf-py's GGUFReader."""
    out = tmp_path / "m.gguf"
    assert convert(tiny_checkpoints("olmoe"), out).returncode == 0
    reader = gguf.GGUFReader(out)
    fields, tensors = read_header(out)
    scalars = {f.name: f.contents() for f in reader.fields.values()
               if not f.name.startswith("GGUF.") and f.types[0] != gguf.GGUFValueType.ARRAY}
    assert fields.keys() == scalars.keys()
    for key, value in scalars.items():
        assert fields[key] == pytest.approx(value) if isinstance(value, float) else fields[key] == value, key
    assert [(t.name, tuple(int(d) for d in t.shape), int(t.n_bytes), int(t.data_offset)) for t in reader.tensors] == \
        [(t.name, t.shape, t.n_bytes, t.offset) for t in tensors]
