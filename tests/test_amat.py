"""AMAT quantization and its Q4_1 slice blocks: the properties the file format relies on.

gguf-py (the format library llama.cpp ships) is the independent reference: it decodes the slices we
write, and its own Q4_1 and Q8_0 are the stock encodings a grid must match.
"""

from __future__ import annotations

import hashlib

import gguf
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from slicemoe_gguf import amat


def _fp16_ulp(x: np.ndarray) -> np.ndarray:
    """Spacing of float16 at |x| (the rounding a stored block constant can carry)."""
    h = np.abs(x).astype(np.float16)
    return (np.nextafter(h, np.float16(np.inf)).astype(np.float32) - h.astype(np.float32))


weights = arrays(
    np.float32, st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 96])),
    elements=st.floats(-300, 300, width=32, allow_nan=False, allow_infinity=False))
scales = st.sampled_from([1e-4, 1e-2, 1.0, 100.0])


def _groups(w):
    return w.reshape(-1, amat.GROUP_SIZE)


Q4_1 = gguf.GGMLQuantizationType.Q4_1
grids = st.sampled_from(amat.GRIDS)


@settings(max_examples=200, deadline=None)
@given(w=weights, scale=scales, grid=grids)
def test_msb_codes_are_the_top_bits_of_the_8bit_codes(w, scale, grid):
    g = amat.quantize(w * np.float32(scale), grid=grid)
    assert g.codes.dtype == np.uint8
    np.testing.assert_array_equal(g.msb_codes * 16 + g.lsb_codes, g.codes)
    assert g.msb_codes.max() <= 15 and g.lsb_codes.max() <= 15


@settings(max_examples=200, deadline=None)
@given(w=weights, scale=scales, grid=grids)
# a range of one float32 subnormal: (max - min) / 255 underflows to 0 in float32
@example(w=np.array([[0.0] + [1e-45] * 31], dtype=np.float32), scale=1.0, grid="paper")
@example(w=np.array([[0.0] + [1e-45] * 31], dtype=np.float32), scale=1.0, grid="searched")
def test_high_precision_error_is_within_half_a_step(w, scale, grid):
    w = w * np.float32(scale)
    g = amat.quantize(w, grid=grid)
    err = np.abs(_groups(amat.dequantize_high(g) - w))
    s = g.d_lsb.astype(np.float32)
    rng = np.ptp(_groups(w), axis=1)
    # s/2 of rounding, plus the fp16 rounding of the stored offsets (and of s, over the at most 248
    # steps to the group's far end, for the grids that round s to nearest), plus float32 arithmetic
    s_rounding = 0 if grid == "paper" else 124 * _fp16_ulp(s)
    bound = s / 2 + s_rounding + _fp16_ulp(g.m_lsb.astype(np.float32)) + 1e-6 * np.abs(_groups(w)).max(axis=1)
    assert (err.max(axis=1) <= bound).all()
    # and s is the 8-bit step of the group's range: range / 255 rounded up to fp16 (paper), at most
    # range / 240 to the nearest fp16 (the grids whose 4-bit levels reach min and max)
    if grid == "paper":
        assert (s * 255 >= rng).all()
        assert (s <= rng / 255 + _fp16_ulp(rng / 255)).all()
    else:
        assert (s <= rng / 240 + _fp16_ulp(rng / 240)).all()


@settings(max_examples=200, deadline=None)
@given(w=weights, scale=scales, grid=grids)
def test_msb_only_error_is_within_eight_and_a_half_steps(w, scale, grid):
    w = w * np.float32(scale)
    g = amat.quantize(w, grid=grid)
    err = np.abs(_groups(amat.dequantize_msb(g) - w))
    s = g.d_lsb.astype(np.float32)
    s_rounding = 0 if grid == "paper" else 124 * _fp16_ulp(s)
    bound = 8.5 * s + s_rounding + _fp16_ulp(g.m_msb.astype(np.float32)) + 1e-6 * np.abs(_groups(w)).max(axis=1)
    assert (err.max(axis=1) <= bound).all()


@pytest.mark.parametrize("grid", amat.GRIDS)
@pytest.mark.parametrize("value", [0.0, 1.0, -0.5, 0.25, 1024.0, -3.140625])
def test_constant_groups_round_trip_exactly(value, grid):
    w = np.full((3, 64), value, dtype=np.float32)
    g = amat.quantize(w, grid=grid)
    np.testing.assert_array_equal(amat.dequantize_high(g), w)
    np.testing.assert_array_equal(amat.dequantize_msb(g), w)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_rejected_with_the_tensor_name(bad):
    w = np.zeros((2, 32), dtype=np.float32)
    w[1, 7] = bad
    with pytest.raises(ValueError, match="blk.3.ffn_up_exps: contains NaN or Inf"):
        amat.quantize(w, name="blk.3.ffn_up_exps")


def test_rows_that_are_not_whole_groups_are_rejected():
    with pytest.raises(ValueError, match="experts.0.down_proj: last dimension 48 is not a multiple of 32"):
        amat.quantize(np.zeros((4, 48), np.float32), name="experts.0.down_proj")


@settings(max_examples=100, deadline=None)
@given(w=weights, scale=scales, grid=grids)
def test_q4_1_blocks_reproduce_the_slices(w, scale, grid):
    g = amat.quantize(w * np.float32(scale), grid=grid)
    msb, lsb = amat.slice_blocks(g)
    assert msb.shape == (*w.shape[:-1], w.shape[-1] // 32 * 20)
    msb_values = amat.dequantize_q4_1(msb, w.shape)
    lsb_values = amat.dequantize_q4_1(lsb, w.shape)
    np.testing.assert_array_equal(msb_values, amat.dequantize_msb(g))
    np.testing.assert_array_equal(lsb_values, amat.dequantize_lsb(g))
    # the high-precision product is the sum of the two 4-bit products
    x = np.linspace(-1, 1, w.shape[-1], dtype=np.float32)
    np.testing.assert_allclose(msb_values @ x + lsb_values @ x, amat.dequantize_high(g) @ x,
                               rtol=1e-5, atol=1e-5 * float(np.abs(msb_values).max() + 1))


def test_q4_1_nibble_layout_is_what_gguf_py_decodes():
    """ggml block_q4_1: byte j = code j (low nibble) | code j+16 (high nibble). Random codes, so a
    swap of the nibbles or of the two halves changes the decoded values."""
    codes = np.random.default_rng(7).integers(0, 16, size=(5, 32), dtype=np.uint8)
    assert (codes[:, :16] != codes[:, 16:]).any()
    blocks = amat.pack_q4_1(np.full(5, 1.0, np.float16), np.zeros(5, np.float16), codes)
    np.testing.assert_array_equal(gguf.quants.dequantize(blocks, Q4_1), codes.astype(np.float32))
    np.testing.assert_array_equal(amat.unpack_q4_1(blocks)[2], codes)


def test_values_beyond_fp16_constants_are_rejected_with_the_tensor_name():
    with pytest.raises(ValueError, match="lm_experts: values beyond"):
        amat.quantize(np.full((1, 32), 1e6, np.float32), name="lm_experts")


# -- the grids: what gguf-py decodes, and accuracy against its stock Q4_1 and Q8_0 ---------------

def _extreme_groups() -> np.ndarray:
    """Groups a converter meets in real checkpoints: an outlier, a tiny range, a constant, values
    near the fp16 limit, one value apart from a constant rest, alternating signs."""
    rng = np.random.default_rng(3)
    rows = [rng.standard_normal(32) * 0.02 for _ in range(4)]
    rows[0][5] = 3.0
    rows[1] *= 1e-5
    rows.append(np.full(32, -0.0625))
    rows.append(np.linspace(-30000, 30000, 32))
    rows.append(np.r_[np.zeros(31), 1.0])
    rows.append(np.tile([1.0, -1.0], 16))
    return np.asarray(rows, dtype=np.float32)


@pytest.mark.parametrize("grid", amat.GRIDS)
@pytest.mark.parametrize("kind", ["random", "extreme"])
def test_gguf_py_decodes_the_slices_to_the_8bit_values(grid, kind):
    """The file's two Q4_1 tensors, decoded by gguf-py and added, are the 8-bit values exactly, and
    the MSB tensor alone is the 4-bit value: the nesting holds for every grid."""
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((16, 128)) * 0.05).astype(np.float32) if kind == "random" else _extreme_groups()
    g = amat.quantize(w, grid=grid)
    msb, lsb = amat.slice_blocks(g)
    msb_values = gguf.quants.dequantize(msb, Q4_1)
    lsb_values = gguf.quants.dequantize(lsb, Q4_1)
    np.testing.assert_array_equal(msb_values, amat.dequantize_msb(g))
    np.testing.assert_array_equal(msb_values + lsb_values, amat.dequantize_high(g))
    # the 8-bit value is the group's base plus s times the 8-bit code, to float32 rounding
    base = (g.m_msb.astype(np.float32) + g.m_lsb.astype(np.float32))[:, None]
    eight_bit = base + g.d_lsb.astype(np.float32)[:, None] * g.codes
    np.testing.assert_allclose(_groups(msb_values + lsb_values), eight_bit, rtol=0,
                               atol=1e-6 * float(np.abs(w).max()))


def _stock(w: np.ndarray, kind: str) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType[kind]
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)


# Trained expert weights are near-Gaussian with heavier tails; both shapes, at a trained scale.
def _weights(dist: str) -> np.ndarray:
    rng = np.random.default_rng(5)
    n = (512, 2048)
    w = rng.standard_normal(n) if dist == "normal" else rng.standard_t(4, n)
    return (w * 0.02).astype(np.float32)


@pytest.mark.parametrize("dist", ["normal", "student-t"])
def test_mean_error_is_no_larger_than_stock(dist):
    """Over a million weights the mean error of the MSB and of the 8-bit value is within four
    standard errors of zero, or within gguf-py Q4_1's and Q8_0's own mean error: no bias that
    adds up along a row. The paper's grid fails it at 8 bits (its top code rounds up in every
    group), which shows the bound has teeth."""
    w = _weights(dist)
    n = w.size

    def bias_bound(err: np.ndarray, stock_err: np.ndarray) -> float:
        return max(4 * float(np.sqrt((err.astype(np.float64) ** 2).mean() / n)), abs(float(stock_err.mean())))

    q4_1_err, q8_0_err = _stock(w, "Q4_1") - w, _stock(w, "Q8_0") - w
    for grid in ("aligned", "searched"):
        g = amat.quantize(w, grid=grid)
        msb_err, high_err = amat.dequantize_msb(g) - w, amat.dequantize_high(g) - w
        assert abs(float(msb_err.mean())) <= bias_bound(msb_err, q4_1_err), grid
        assert abs(float(high_err.mean())) <= bias_bound(high_err, q8_0_err), grid
    paper_err = amat.dequantize_high(amat.quantize(w, grid="paper")) - w
    assert abs(float(paper_err.mean())) > bias_bound(paper_err, q8_0_err)


@pytest.mark.parametrize("dist", ["normal", "student-t"])
def test_msb_is_as_accurate_as_stock_q4_1_and_the_8bit_value_as_q8_0(dist):
    """RMS error per weight: the aligned grid's MSB is Q4_1 itself (to fp16 rounding), the searched
    grid's is smaller; both 8-bit values are within 1.05x of Q8_0's (which spends 8.5 bits on a
    symmetric grid). The paper grid's MSB is worse than Q4_1, the defect the other grids remove."""
    w = _weights(dist)
    rms = lambda x: float(np.sqrt((x.astype(np.float64) ** 2).mean()))  # noqa: E731
    q4_1, q8_0 = rms(_stock(w, "Q4_1") - w), rms(_stock(w, "Q8_0") - w)
    aligned, searched = amat.quantize(w, grid="aligned"), amat.quantize(w, grid="searched")
    assert rms(amat.dequantize_msb(aligned) - w) <= 1.005 * q4_1
    assert rms(amat.dequantize_msb(searched) - w) <= 0.97 * q4_1
    for g in (aligned, searched):
        assert rms(amat.dequantize_high(g) - w) <= 1.05 * q8_0
    assert rms(amat.dequantize_msb(amat.quantize(w, grid="paper")) - w) > 1.01 * q4_1


def test_the_paper_grid_writes_the_bytes_earlier_versions_wrote():
    """Files of the paper's grid (format version 1) stay what they were: the digest of its slices of
    a fixed input was recorded from the quantizer before grids were a choice (commit f5aa2f9)."""
    rng = np.random.default_rng(20261206)
    w = (rng.standard_normal((64, 256)) * 0.02).astype(np.float32)
    w[3, :32] = 0.5            # a constant group
    w[5, 7] = 0.9              # an outlier
    w[9] = w[9] * 1e-4         # a tiny range
    msb, lsb = amat.slice_blocks(amat.quantize(w, grid="paper"))
    digest = hashlib.sha256(msb.tobytes() + lsb.tobytes()).hexdigest()
    assert digest == "4e21b882115a9fe4c05bf1bf0dba0897f9687ac279acaccca1536d246039a615"


def test_format_versions_name_the_grids():
    assert amat.format_version("paper") == 1
    assert amat.format_version("aligned") == amat.format_version("searched") == 2
    with pytest.raises(ValueError, match="unknown AMAT grid 'q4_k'"):
        amat.quantize(np.zeros((1, 32), np.float32), grid="q4_k")
