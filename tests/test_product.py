"""The fused expert product: one pass over an expert's MSB and LSB slices.

The reference is independent of the kernels: gguf-py's Q4_1 `dequantize` of each slice (8-bit: the
two summed), times the activations in float64. The kernels quantize the activations to 8 bits per 32
values, as llama.cpp's Q8_1 does, so the result may differ from the float product by at most that
rounding (half an activation step per value, times |w|); against the same rounding done in numpy it
agrees to float32 arithmetic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import gguf
import numpy as np
import pytest

from slicemoe_gguf import amat, kernels
from slicemoe_gguf._native import SliceMoEError

Q4_1 = gguf.GGMLQuantizationType.Q4_1


def _dequantize(rows: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(rows, Q4_1).astype(np.float64)


def _quantized_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x as the kernels see it, each value's rounding bound): llama.cpp's Q8_1 rule per 32 values,
    d = max|x| / 127, q = x / d rounded to nearest (ties to even, as its x86 path), in float32."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=1) / np.float32(127)
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    scaled = blocks * inverse[:, None]
    q = np.rint(scaled)
    seen = (q * d[:, None]).astype(np.float64).reshape(-1)
    return seen, np.repeat(d.astype(np.float64) / 2, 32)


def _slices(w: np.ndarray, grid: str) -> tuple[np.ndarray, np.ndarray]:
    return amat.slice_blocks(amat.quantize(w, grid=grid))


def _random_blocks(rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    """Q4_1 rows of random nibbles and random finite fp16 steps and minimums (steps that are not
    nested: the kernels' general form)."""
    n_blocks = n_out * n_in // 32
    blocks = np.empty((n_blocks, 20), dtype=np.uint8)
    blocks[:, 0:2] = rng.uniform(0, 0.05, n_blocks).astype("<f2").view(np.uint8).reshape(-1, 2)
    blocks[:, 2:4] = rng.uniform(-0.5, 0.5, n_blocks).astype("<f2").view(np.uint8).reshape(-1, 2)
    blocks[:, 4:] = rng.integers(0, 256, (n_blocks, 16), dtype=np.uint8)
    return blocks.reshape(n_out, -1)


def _weights(kind: str, rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    w = rng.standard_normal((n_out, n_in)).astype(np.float32) * np.float32(0.02)
    if kind == "constant groups":
        w[:, :32] = np.float32(0.25)
        w[::2, 32:64] = np.float32(-3e-3)
    elif kind == "extreme scales":
        w[0] *= np.float32(1e4)
        w[1] *= np.float32(1e-5)
    elif kind == "denormal minimums":
        w[:, :64] = rng.uniform(0, 1e-6, (n_out, 64)).astype(np.float32)   # fp16 minimums below 6.1e-5
        w[:, 64:96] = np.float32(3e-7)
    return w


def _check(y: np.ndarray, msb: np.ndarray, lsb: np.ndarray | None, x: np.ndarray) -> None:
    w = _dequantize(msb) + (_dequantize(lsb) if lsb is not None else 0.0)
    seen, rounding = _quantized_activations(x)
    # within the activations' rounding of the float product
    assert (np.abs(y - w @ x.astype(np.float64)) <= np.abs(w) @ rounding * (1 + 1e-5) + 1e-30).all()
    # and, with that rounding done independently, within float32 arithmetic (each block's offsets
    # are of the order of its largest weight, whose rounding the tolerance scales with)
    scale = np.abs(w).reshape(w.shape[0], -1, 32).max(axis=2) @ np.abs(seen).reshape(-1, 32).sum(axis=1)
    np.testing.assert_array_less(np.abs(y - w @ seen), 1e-5 * scale + 1e-30)


@pytest.mark.parametrize("kernel", kernels.available())
@pytest.mark.parametrize("grid", amat.GRIDS)
@pytest.mark.parametrize("kind", ["random", "constant groups", "extreme scales", "denormal minimums"])
def test_fused_product_is_the_product_of_the_decoded_slices(kernel, grid, kind):
    rng = np.random.default_rng(zlib.crc32(f"{grid} {kind}".encode()))
    n_out, n_in = 24, 256
    msb, lsb = _slices(_weights(kind, rng, n_out, n_in), grid)
    x = rng.standard_normal(n_in).astype(np.float32)
    x[:32] *= np.float32(1e3)   # one block of large activations
    _check(kernels.expert_product(msb, lsb, x, kernel), msb, lsb, x)      # an 8-bit use
    _check(kernels.expert_product(msb, None, x, kernel), msb, None, x)    # a 4-bit use: the MSB slice


@pytest.mark.parametrize("kernel", kernels.available())
def test_blocks_whose_steps_are_not_nested_take_the_two_product_form(kernel):
    rng = np.random.default_rng(7)
    n_in = 11 * 32   # the vector kernels take 8 blocks at a time: one group and three blocks after it
    msb, lsb = _random_blocks(rng, 16, n_in), _random_blocks(rng, 16, n_in)
    x = rng.standard_normal(n_in).astype(np.float32)
    _check(kernels.expert_product(msb, lsb, x, kernel), msb, lsb, x)


@pytest.mark.parametrize("kernel", kernels.available())
@pytest.mark.parametrize("block", [0, 5, 9])   # first of a group of 8, inside it, after the last group
def test_one_block_whose_steps_are_not_nested_among_nested_ones(kernel, block):
    rng = np.random.default_rng(block)
    n_in = 11 * 32
    msb, lsb = _slices(rng.standard_normal((8, n_in)).astype(np.float32) * np.float32(0.02), "searched")
    steps = lsb.reshape(8, -1, 20)[3, block, 0:2].view("<f2")
    steps[0] = steps[0] * np.float16(1.5)   # row 3's LSB step of that block no longer divides its MSB step
    x = rng.standard_normal(n_in).astype(np.float32)
    _check(kernels.expert_product(msb, lsb, x, kernel), msb, lsb, x)


def test_each_nibble_lands_on_its_own_weight():
    """One nonzero activation at a time: the product reads exactly that weight's two nibbles
    (a swap of nibble halves or of slices would read another weight's)."""
    rng = np.random.default_rng(3)
    msb, lsb = _slices(rng.standard_normal((4, 64)).astype(np.float32), "searched")
    w = _dequantize(msb) + _dequantize(lsb)
    for kernel in kernels.available():
        for j in range(64):
            x = np.zeros(64, dtype=np.float32)
            x[j] = 1.0
            np.testing.assert_allclose(kernels.expert_product(msb, lsb, x, kernel), w[:, j], rtol=1e-5, atol=1e-7)


def test_every_kernel_agrees_with_the_scalar_one():
    rng = np.random.default_rng(11)
    n_in = 1408   # Qwen1.5-MoE's expert width: 44 blocks, 5 groups of 8 and 4 after them
    msb, lsb = _slices(rng.standard_normal((64, n_in)).astype(np.float32) * np.float32(0.03), "searched")
    x = rng.standard_normal(n_in).astype(np.float32)
    scalar = kernels.expert_product(msb, lsb, x, "scalar")
    scalar_msb = kernels.expert_product(msb, None, x, "scalar")
    for kernel in kernels.available():
        np.testing.assert_allclose(kernels.expert_product(msb, lsb, x, kernel), scalar, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(kernels.expert_product(msb, None, x, kernel), scalar_msb, rtol=1e-5, atol=1e-6)


GUARDED_PRODUCTS = """
import ctypes, mmap, sys
import numpy as np
from slicemoe_gguf import kernels

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

def at_the_end_of_readable_memory(a):
    # a copy of a whose last byte is the last one before a page that cannot be read
    size = -(-a.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    region = mmap.mmap(-1, size + mmap.PAGESIZE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert libc.mprotect(address + size, mmap.PAGESIZE, 0) == 0, ctypes.get_errno()
    copy = np.frombuffer(region, dtype=np.uint8, count=size)[size - a.nbytes:].reshape(a.shape)
    copy[...] = a
    return copy

rng = np.random.default_rng(0)
for n_blocks in map(int, sys.argv[1:]):
    msb = rng.integers(0, 256, (3, n_blocks * 20), dtype=np.uint8)
    msb.reshape(3, n_blocks, 20)[:, :, 0:4] = np.frombuffer(np.float16([0.016, -0.1]).tobytes(), np.uint8)
    lsb = msb.copy()
    lsb.reshape(3, n_blocks, 20)[:, :, 0:4] = np.frombuffer(np.float16([0.001, 0.0]).tobytes(), np.uint8)
    guarded_msb, guarded_lsb = at_the_end_of_readable_memory(msb), at_the_end_of_readable_memory(lsb)
    x = rng.standard_normal((5, n_blocks * 32)).astype(np.float32)
    for kernel in kernels.available():
        for high, guarded in ((lsb, guarded_lsb), (None, None)):
            y, _ = kernels.time_expert_product(guarded_msb, guarded, x, kernel, repeats=1)
            np.testing.assert_array_equal(y, kernels.time_expert_product(msb, high, x, kernel, repeats=1)[0])
print("ok")
"""


def test_no_kernel_reads_past_the_last_block_of_an_expert(tmp_path):
    """An expert's last row may end where readable memory ends (a pool's last slot, a mapped file's
    last expert): every kernel, 8-bit and 4-bit, one token and a batch, over rows whose blocks end in
    a group of 8, a group of 4 and blocks alone, reads only the expert's own bytes (its copy placed
    just before a page that cannot be read computes the same values). In a child process: a read
    past the end is a crash there."""
    n_blocks = ["8", "11", "12", "44", "45", "3"]
    # cwd: the installed package, not the source tree's (python -c puts the directory first on the path)
    child = subprocess.run([sys.executable, "-c", GUARDED_PRODUCTS, *n_blocks], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert child.returncode == 0 and child.stdout.strip() == "ok", child.stderr[-2000:]


def test_bad_arguments_are_refused():
    msb = np.zeros((2, 20), dtype=np.uint8)
    with pytest.raises(ValueError, match="activations"):
        kernels.expert_product(msb, None, np.zeros(64, dtype=np.float32))
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.expert_product(msb, None, np.zeros(32, dtype=np.float32), "sve")
    # another architecture's kernel (NEON here on x86, AVX2 on arm64)
    missing = next(name for name in kernels.KERNELS[1:] if name not in kernels.available())
    with pytest.raises(SliceMoEError, match="not available on this CPU"):
        kernels.expert_product(msb, None, np.zeros(32, dtype=np.float32), missing)


@pytest.mark.parametrize("kernel", kernels.available())
def test_a_batch_of_tokens_computes_each_token_as_it_alone(kernel):
    """A prompt's tokens that use one expert are computed together (each block unpacked once for up
    to 8 of them, in tiles of 32 rows): every value equals that token's product alone, bit for bit,
    so a token computes the same in a prompt batch as in decode. 11 tokens (a group of 8 and one of
    3), 40 rows (a tile of 32 and one of 8), 11 blocks (a group of 8 and 3 after it), one block whose
    steps are not nested."""
    rng = np.random.default_rng(5)
    n_in, n_rows, n_tokens = 11 * 32, 40, 11
    msb, lsb = _slices(rng.standard_normal((n_rows, n_in)).astype(np.float32) * np.float32(0.02), "searched")
    steps = lsb.reshape(n_rows, -1, 20)[7, 2, 0:2].view("<f2")
    steps[0] = steps[0] * np.float16(1.5)
    x = rng.standard_normal((n_tokens, n_in)).astype(np.float32)
    for high in (lsb, None):
        y, seconds = kernels.time_expert_product(msb, high, x, kernel, repeats=2)
        assert seconds > 0
        for token in range(n_tokens):
            np.testing.assert_array_equal(y[token], kernels.expert_product(msb, high, x[token], kernel))
        _check(y[n_tokens - 1], msb, high, x[n_tokens - 1])


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_0"])
def test_ggml_product_for_the_benchmark_is_the_product_of_gguf_py_dequantized_weights(ggml_type):
    """The microbenchmark's stock side computes what a stock file of that type computes: the
    weights as gguf-py quantizes and dequantizes them (gguf-py writes the same bytes as ggml for
    these types), times activations that ggml rounds to 8 bits per block."""
    rng = np.random.default_rng(9)
    w = rng.standard_normal((16, 512)).astype(np.float32) * np.float32(0.02)
    x = rng.standard_normal((2, 512)).astype(np.float32)
    quant = gguf.GGMLQuantizationType[ggml_type]
    reference = x.astype(np.float64) @ gguf.quants.dequantize(gguf.quants.quantize(w, quant), quant).astype(np.float64).T
    y, seconds, _ = kernels.time_ggml_product(w, x, ggml_type, repeats=2)
    assert seconds > 0
    # the activations' 8-bit rounding: half a step of max|x| / 127 per value, times |w|
    bound = np.abs(x).max() / 127 / 2 * np.abs(w).sum(axis=1) * 1.5
    assert (np.abs(y - reference) <= bound).all()


def test_ggml_q4_k_product_for_the_benchmark_is_within_a_4_bit_step_of_the_float_one():
    """gguf-py cannot quantize Q4_K: each weight is then within one 4-bit step of its sub-block's
    range, (max - min) / 15, of its float value (a wrong layout or scale would be far off)."""
    rng = np.random.default_rng(10)
    w = rng.standard_normal((16, 512)).astype(np.float32) * np.float32(0.02)
    x = rng.standard_normal((2, 512)).astype(np.float32)
    y, _, _ = kernels.time_ggml_product(w, x, "Q4_K", repeats=1)
    groups = w.reshape(16, -1, 32)
    step = np.repeat((groups.max(axis=2) - groups.min(axis=2)) / 15, 32, axis=1)   # [16, 512]
    bound = np.abs(x) @ step.T + np.abs(x).max() / 127 / 2 * np.abs(w).sum(axis=1) * 1.5
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    assert (np.abs(y - exact) <= bound).all()
    assert np.abs(y - exact).max() < 0.1 * np.abs(exact).max()


def test_ggml_product_refuses_what_ggml_cannot_quantize_that_way():
    w, x = np.zeros((8, 96), dtype=np.float32), np.zeros((1, 96), dtype=np.float32)
    with pytest.raises(SliceMoEError, match="not whole blocks of q4_K"):
        kernels.time_ggml_product(w, x, "Q4_K")
    with pytest.raises(SliceMoEError, match="quantized type"):
        kernels.time_ggml_product(w, x, "F32")
    with pytest.raises(ValueError, match="unknown ggml type"):
        kernels.time_ggml_product(w, x, "Q9_9")


_LOGITS_CHILD = r"""
import json, sys
import numpy as np
from slicemoe_gguf import Model
path, kwargs = sys.argv[1], json.loads(sys.argv[2])
with Model(path, n_threads=2, **kwargs) as model:
    model.eval(list(range(1, 25)))        # a prompt batch
    rows = [model.logits().tolist()]
    for token in (5, 17, 42):             # decode tokens
        model.eval([token])
        rows.append(model.logits().tolist())
print(json.dumps(rows))
"""


def _logits(path, env: dict, **kwargs) -> np.ndarray:
    # run outside the source tree, whose slicemoe_gguf has no built library
    proc = subprocess.run([sys.executable, "-c", _LOGITS_CHILD, str(path), json.dumps(kwargs)], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300, cwd=Path(path).parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.array(json.loads(proc.stdout.splitlines()[-1]))


@pytest.mark.parametrize("config", [{"precision": "high"}, {"precision": "low"},
                                    {"cache_budget_fraction": 0.5, "policy": "dbsc"},
                                    {"cache_budget_fraction": 1.0, "policy": "lru4"}],
                         ids=["8-bit", "4-bit", "dbsc-50%", "lru4"])
def test_prompts_decode_and_4_bit_runs_go_through_the_fused_product_and_agree_with_ggmls(config, sliced_gguf):
    """Every product of a sliced file runs the fused op (prompt batches grouped by expert, 4-bit-only
    runs on the MSB slice alone); SLICEMOE_PRODUCT=ggml runs ggml's Q4_1 products instead. The two
    differ in rounding only (ggml keeps the activations' block sums in fp16, the op in float, and
    AMAT's block offsets are large): not bit-identical, which shows the op ran, and within 3% of the
    largest logit (this untrained fixture's layers amplify rounding: 0.9-1.2% measured; its near
    ties let the top token differ, so that is not asserted)."""
    from slicemoe_gguf.model_info import describe

    path = sliced_gguf("olmoe")
    kwargs = dict(config)
    if "cache_budget_fraction" in kwargs:
        info = describe(path)
        expert_bytes = sum(layer["msb_bytes_per_expert"] + layer["lsb_bytes_per_expert"]
                           for layer in info["layers"]) * info["n_experts"]
        kwargs["cache_budget"] = int(expert_bytes * kwargs.pop("cache_budget_fraction"))
    fused = _logits(path, {}, **kwargs)
    ggml = _logits(path, {"SLICEMOE_PRODUCT": "ggml"}, **kwargs)
    assert not np.array_equal(fused[0], ggml[0])    # the prompt
    assert not np.array_equal(fused[1:], ggml[1:])  # the decode tokens
    scale = np.abs(ggml).max(axis=1, keepdims=True)
    assert (np.abs(fused - ggml) <= 0.03 * scale).all()
