"""AMAT: calibration-free asymmetric Matryoshka quantization, and its nested Q4_1 bit slices.

Per group of GROUP_SIZE consecutive input weights ``w`` (the last axis):

    lo = min(w), s = (max(w) - lo) / 255, q = clamp(round((w - lo) / s), 0, 255)   (8-bit code)
    h = q >> 4  (MSB code),  l = q & 15  (LSB code)
    high precision:  w ~ lo + s * (16 h + l)
    MSB only:        w ~ lo + s * (16 h + 7.5)      (7.5 centres the truncated range)

Both slices are stored as ggml Q4_1 blocks (``x = d * code + m``), so every backend runs them with
its existing kernels and the high-precision product is the sum of two 4-bit products:

    MSB block: d = 16 s, m = lo + 7.5 s      LSB block: d = s, m = lo - m_msb  (~ -7.5 s)

Q4_1 stores d and m in fp16. Two choices keep that rounding from adding to the 8-bit error:
``s`` is rounded up to an fp16 value first (so 255 s still spans the group, and 16 s is exact),
and the LSB offset absorbs the rounding of the MSB offset (``m_lsb = fp16(lo - m_msb)``), so
``m_msb + m_lsb`` is ``lo`` to within the fp16 rounding of a number of size 7.5 s, not of ``lo``.
The codes are then computed against the stored constants. Why Q4_1 for the LSB rather than Q4_0
with the offset folded into the MSB: Q4_0 has a symmetric signed code (``d * (code - 8)``), whose
offset of -8 d cannot carry the MSB rounding residual, and it saves nothing (Q4_0 is 18 bytes per
32 weights against Q4_1's 20, but the MSB's ``m`` would then have to hold ``lo + 7.5 s - 8 s``,
which breaks the MSB slice as a model on its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP_SIZE = 32
Q4_1_BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of packed nibbles
FP16_MAX = float(np.finfo(np.float16).max)


@dataclass
class AmatGroups:
    """AMAT codes and stored block constants of a tensor, one row per group of 32 weights."""

    shape: tuple[int, ...]   # the original tensor shape (last axis = input features)
    codes: np.ndarray        # uint8 [n_groups, 32], the 8-bit codes q
    d_msb: np.ndarray        # float16 [n_groups]  = 16 s
    m_msb: np.ndarray        # float16 [n_groups]  ~ lo + 7.5 s
    d_lsb: np.ndarray        # float16 [n_groups]  = s
    m_lsb: np.ndarray        # float16 [n_groups]  ~ lo - m_msb

    @property
    def msb_codes(self) -> np.ndarray:
        return self.codes >> 4

    @property
    def lsb_codes(self) -> np.ndarray:
        return self.codes & 15


def _fp16_round_up(x: np.ndarray) -> np.ndarray:
    """The smallest float16 >= x (x >= 0, float64 so that a tiny positive x never becomes 0)."""
    h = x.astype(np.float16)
    low = h.astype(np.float64) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def quantize(w: np.ndarray, name: str = "tensor") -> AmatGroups:
    """AMAT-quantize ``w`` along its last axis, which must be a multiple of 32.

    Raises ValueError naming the tensor for NaN/Inf, values beyond fp16 range, or a bad shape.
    """
    w = np.asarray(w)
    if w.ndim == 0 or w.shape[-1] % GROUP_SIZE != 0:
        raise ValueError(f"{name}: last dimension {w.shape[-1] if w.ndim else 0} is not a multiple of {GROUP_SIZE}")
    groups = w.reshape(-1, GROUP_SIZE).astype(np.float32, copy=False)
    lo = groups.min(axis=1)
    hi = groups.max(axis=1)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    if max(-float(lo.min(initial=0)), float(hi.max(initial=0))) > FP16_MAX / 2:
        raise ValueError(f"{name}: values beyond +-{FP16_MAX / 2:g} cannot be stored in fp16 block constants")

    s = _fp16_round_up((hi.astype(np.float64) - lo) / 255)
    s32 = s.astype(np.float32)
    m_msb = (lo + np.float32(7.5) * s32).astype(np.float16)
    m_lsb = (lo - m_msb.astype(np.float32)).astype(np.float16)
    base = m_msb.astype(np.float32) + m_lsb.astype(np.float32)

    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(s32 > 0, np.float32(1) / s32, np.float32(0))
    q = (groups - base[:, None]) * inv[:, None]
    np.rint(q, out=q)
    np.clip(q, 0, 255, out=q)
    return AmatGroups(shape=tuple(w.shape), codes=q.astype(np.uint8),
                      d_msb=(s32 * 16).astype(np.float16), m_msb=m_msb, d_lsb=s, m_lsb=m_lsb)


def dequantize_high(g: AmatGroups) -> np.ndarray:
    """The 8-bit reconstruction, computed as MSB block + LSB block (what the engine runs)."""
    return dequantize_msb(g) + dequantize_lsb(g)


def dequantize_msb(g: AmatGroups, *, centred: bool = True) -> np.ndarray:
    """The 4-bit MSB-only reconstruction. ``centred=False`` is plain truncation (lo + 16 s h),
    kept for the accuracy comparison."""
    d = g.d_msb.astype(np.float32)[:, None]
    m = g.m_msb.astype(np.float32)[:, None]
    if not centred:
        m = m - np.float32(7.5 / 16) * d
    return (d * g.msb_codes + m).reshape(g.shape)


def dequantize_lsb(g: AmatGroups) -> np.ndarray:
    """The LSB slice's contribution on its own (a refinement, not a model)."""
    return (g.d_lsb.astype(np.float32)[:, None] * g.lsb_codes + g.m_lsb.astype(np.float32)[:, None]).reshape(g.shape)


# -- ggml Q4_1 blocks ---------------------------------------------------------------------------

def pack_q4_1(d: np.ndarray, m: np.ndarray, codes4: np.ndarray) -> np.ndarray:
    """ggml block_q4_1 bytes [n_groups, 20]: fp16 d, fp16 m, then byte j holds code j in its low
    nibble and code j + 16 in its high nibble."""
    n = codes4.shape[0]
    out = np.empty((n, Q4_1_BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:2] = d.astype("<f2").view(np.uint8).reshape(n, 2)
    out[:, 2:4] = m.astype("<f2").view(np.uint8).reshape(n, 2)
    out[:, 4:] = codes4[:, :16] | (codes4[:, 16:] << 4)
    return out


def unpack_q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of pack_q4_1: (d float16 [n], m float16 [n], codes uint8 [n, 32])."""
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, Q4_1_BLOCK_BYTES)
    d = blocks[:, 0:2].copy().view("<f2")[:, 0]
    m = blocks[:, 2:4].copy().view("<f2")[:, 0]
    qs = blocks[:, 4:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=1)
    return d, m, codes


def dequantize_q4_1(blocks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of Q4_1 blocks, reshaped to ``shape`` (last axis = the blocks' rows)."""
    d, m, codes = unpack_q4_1(blocks)
    return (d.astype(np.float32)[:, None] * codes + m.astype(np.float32)[:, None]).reshape(shape)


def slice_blocks(g: AmatGroups) -> tuple[np.ndarray, np.ndarray]:
    """(MSB blocks, LSB blocks) as uint8 arrays shaped like the tensor with the last axis
    replaced by its bytes (n_in / 32 * 20): the row layout GGUF stores for Q4_1."""
    row_bytes = g.shape[-1] // GROUP_SIZE * Q4_1_BLOCK_BYTES
    out_shape = (*g.shape[:-1], row_bytes)
    msb = pack_q4_1(g.d_msb, g.m_msb, g.msb_codes).reshape(out_shape)
    lsb = pack_q4_1(g.d_lsb, g.m_lsb, g.lsb_codes).reshape(out_shape)
    return msb, lsb
