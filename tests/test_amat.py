"""AMAT quantization and its Q4_1 slice blocks: the properties the file format relies on."""

from __future__ import annotations

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


@settings(max_examples=200, deadline=None)
@given(w=weights, scale=scales)
def test_msb_codes_are_the_top_bits_of_the_8bit_codes(w, scale):
    g = amat.quantize(w * np.float32(scale))
    assert g.codes.dtype == np.uint8
    np.testing.assert_array_equal(g.msb_codes * 16 + g.lsb_codes, g.codes)
    assert g.msb_codes.max() <= 15 and g.lsb_codes.max() <= 15


@settings(max_examples=200, deadline=None)
@given(w=weights, scale=scales)
# a range of one float32 subnormal: (max - min) / 255 underflows to 0 in float32
@example(w=np.array([[0.0] + [1e-45] * 31], dtype=np.float32), scale=1.0)
def test_high_precision_error_is_within_half_a_step(w, scale):
    w = w * np.float32(scale)
    g = amat.quantize(w)
    err = np.abs(_groups(amat.dequantize_high(g) - w))
    s = g.d_lsb.astype(np.float32)
    # s/2 of rounding, plus the fp16 rounding of the stored offsets, plus float32 arithmetic
    bound = s / 2 + _fp16_ulp(g.m_lsb.astype(np.float32)) + 1e-6 * np.abs(_groups(w)).max(axis=1)
    assert (err.max(axis=1) <= bound).all()
    # and s itself is the 8-bit step of the group's range, rounded up to fp16
    rng = np.ptp(_groups(w), axis=1)
    assert (s * 255 >= rng).all()
    assert (s <= rng / 255 + _fp16_ulp(rng / 255)).all()


@settings(max_examples=200, deadline=None)
@given(w=weights, scale=scales)
def test_msb_only_error_is_within_eight_and_a_half_steps(w, scale):
    w = w * np.float32(scale)
    g = amat.quantize(w)
    err = np.abs(_groups(amat.dequantize_msb(g) - w))
    s = g.d_lsb.astype(np.float32)
    bound = 8.5 * s + _fp16_ulp(g.m_msb.astype(np.float32)) + 1e-6 * np.abs(_groups(w)).max(axis=1)
    assert (err.max(axis=1) <= bound).all()


@pytest.mark.parametrize("value", [0.0, 1.0, -0.5, 0.25, 1024.0, -3.140625])
def test_constant_groups_round_trip_exactly(value):
    w = np.full((3, 64), value, dtype=np.float32)
    g = amat.quantize(w)
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
@given(w=weights, scale=scales)
def test_q4_1_blocks_reproduce_the_slices(w, scale):
    g = amat.quantize(w * np.float32(scale))
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


def test_q4_1_nibble_layout_matches_ggml():
    """ggml block_q4_1: byte j = code j (low nibble) | code j+16 (high nibble)."""
    codes = np.arange(32, dtype=np.uint8)[None, :] % 16
    blocks = amat.pack_q4_1(np.array([1.0], np.float16), np.array([0.0], np.float16), codes)
    assert blocks[0, 4] == (0 | (0 << 4))
    assert blocks[0, 5] == (1 | (1 << 4))
    assert blocks[0, 4 + 15] == (15 | (15 << 4))
    np.testing.assert_array_equal(amat.unpack_q4_1(blocks)[2], codes)


def test_values_beyond_fp16_constants_are_rejected_with_the_tensor_name():
    with pytest.raises(ValueError, match="lm_experts: values beyond"):
        amat.quantize(np.full((1, 32), 1e6, np.float32), name="lm_experts")
