"""AMAT: calibration-free asymmetric Matryoshka quantization, and its nested Q4_1 bit slices.

Per group of GROUP_SIZE consecutive input weights ``w`` (the last axis), an 8-bit code ``q`` on the
grid ``w ~ lo + s * q`` (q in 0..255) whose top four bits ``h = q >> 4`` (the MSB code) are a 4-bit
code by themselves and whose bottom four bits ``l = q & 15`` (the LSB code) refine it:

    high precision:  w ~ lo + s * (16 h + l)
    MSB only:        w ~ lo + s * (16 h + c)      (c: where the MSB level sits among its 16 codes)

Both slices are stored as ggml Q4_1 blocks (``x = d * code + m``), so every backend runs them with
its existing kernels and the high-precision product is the sum of two 4-bit products:

    MSB block: d = 16 s, m = lo + c s         LSB block: d = s, m = lo - m_msb  (~ -c s)

A grid is the choice of (lo, s) per group; every grid nests exactly (MSB + LSB is the 8-bit value,
no byte is stored twice), c = 7.5 centres each MSB level among the 16 codes that share it, and the
engine runs all grids alike. GRIDS:

- ``paper`` (arXiv 2512.12990; format version 1): ``lo = min``, ``s = (max - min) / 255``. Its 4-bit
  levels run from min + 7.5 s to max - 7.5 s and never reach the group's extremes, so the largest
  weights of every group shrink together: its MSB-only KL is 1.2x stock Q4_1's at the same
  storage on the embedded model, 1.9x on a model trained on other text (scripts/bench_grid.py).
- ``aligned`` (format version 2): ``s = (max - min) / 240``, ``lo = min - 7.5 s``. The 4-bit levels
  are min + 16 s h: exactly Q4_1's levels (min to max in 15 steps), at Q4_1's accuracy.
- ``searched`` (format version 2; the default): the 4-bit step and offset of each group searched
  for the least squared error (search_msb_grid), under the constraint that keeps the 8-bit value
  from clipping; then as ``aligned``. Its MSB-only KL is 0.83x and 0.93x Q4_1's on those two
  models, its 8-bit KL 0.62x and 0.52x Q8_0's.

The aligned and searched grids put a group's min and max on half steps of the 8-bit grid; those
ties are rounded toward the middle code (round-half-to-even would move both extremes up, a bias
in every group), so the 8-bit value's mean error is as small as Q8_0's.

Q4_1 stores d and m in fp16. ``16 s`` is exact in fp16 when ``s`` is; the LSB offset
absorbs the rounding of the MSB offset (``m_lsb = fp16(lo - m_msb)``), so ``m_msb + m_lsb`` is ``lo``
to within the fp16 rounding of a number of size c s, not of ``lo``. The codes are then computed
against the stored constants. The paper grid rounds ``s`` up (255 s spans the group); the others
round it to nearest, so the top level lands on either side of the max with no preferred sign.

Why Q4_1 for the LSB rather than Q4_0 with the offset folded into the MSB: Q4_0 has a symmetric
signed code (``d * (code - 8)``), whose offset of -8 d cannot carry the MSB rounding residual, and
it saves nothing (Q4_0 is 18 bytes per 32 weights against Q4_1's 20, but the MSB's ``m`` would then
have to hold ``lo + c s - 8 s``, which breaks the MSB slice as a model on its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP_SIZE = 32
Q4_1_BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of packed nibbles
FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)

GRIDS = ("paper", "aligned", "searched")
DEFAULT_GRID = "searched"
# c: the MSB level sits at code 16 h + c, the centre of the 16 codes that share h
MSB_CENTRE = np.float32(7.5)


@dataclass
class AmatGroups:
    """AMAT codes and stored block constants of a tensor, one row per group of 32 weights."""

    shape: tuple[int, ...]   # the original tensor shape (last axis = input features)
    codes: np.ndarray        # uint8 [n_groups, 32], the 8-bit codes q
    d_msb: np.ndarray        # float16 [n_groups]  = 16 s
    m_msb: np.ndarray        # float16 [n_groups]  ~ lo + c s
    d_lsb: np.ndarray        # float16 [n_groups]  = s
    m_lsb: np.ndarray        # float16 [n_groups]  ~ lo - m_msb
    grid: str = DEFAULT_GRID

    @property
    def msb_codes(self) -> np.ndarray:
        return self.codes >> 4

    @property
    def lsb_codes(self) -> np.ndarray:
        return self.codes & 15


def format_version(grid: str) -> int:
    """The sliced-GGUF format version of a file that holds ``grid`` (slicemoe.format_version):
    1 is the paper's grid (files written before the grid became a choice), 2 names its grid in
    slicemoe.grid."""
    if grid not in GRIDS:
        raise ValueError(f"unknown AMAT grid {grid!r} (one of {', '.join(GRIDS)})")
    return 1 if grid == "paper" else 2


def _fp16_round_up(x: np.ndarray) -> np.ndarray:
    """The smallest float16 >= x (x >= 0, float64 so that a tiny positive x never becomes 0)."""
    h = x.astype(np.float16)
    low = h.astype(np.float64) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def _fp16_nearest_nonzero(x: np.ndarray) -> np.ndarray:
    """The nearest float16 to x (x >= 0), but never 0 for a positive x (a group with a range must
    keep a step, or all its weights would collapse onto its minimum)."""
    h = x.astype(np.float16)
    h[(h == 0) & (x > 0)] = np.float16(FP16_TINY)
    return h


def _checked_groups(w: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(groups float32 [n, 32], min [n], max [n]); ValueError naming the tensor for bad input."""
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
    return groups, lo, hi


SEARCH_STEPS = 8        # candidate 4-bit steps between range/15 and range/15.9375
SEARCH_REFITS = 2       # least-squares refits of (step, offset) per candidate


def search_msb_grid(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group, the 4-bit step d and offset m (levels m + d h, h in 0..15) with the least squared
    error, in the manner of llama.cpp's make_qkx2_quants: a few candidate steps, each refined by
    alternating nearest codes and a least-squares fit of (d, m). Constrained so that every weight
    lies within half an MSB step of the 4-bit range, i.e. inside the 8-bit range [m - 7.5 s,
    m + 247.5 s] with s = d / 16 (the 8-bit value never clips), and d <= range / 15 (the 8-bit step
    is never coarser than the aligned grid's).
    float32 [n] each; a constant group gets d = 0, m = its value."""
    x = np.ascontiguousarray(groups, dtype=np.float32)
    lo, hi = x.min(axis=1), x.max(axis=1)
    span = hi - lo
    sum_x = x.sum(axis=1)
    best_d, best_m = span / np.float32(15), lo.copy()
    best_err = _msb_error(x, best_d, best_m)
    for k in range(1, SEARCH_STEPS + 1):
        d = span / np.float32(15 + 0.9375 * k / SEARCH_STEPS)
        m = lo + (span - 15 * d) / 2
        for _ in range(SEARCH_REFITS):
            d, m = _refit(x, sum_x, _msb_codes(x, d, m), lo, hi, span, d, m)
        err = _msb_error(x, d, m)
        better = err < best_err
        best_err[better], best_d[better], best_m[better] = err[better], d[better], m[better]
    return best_d, best_m


def _msb_codes(x: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    # A subnormal step's inverse overflows: that candidate's codes and error are NaN, and the
    # search never prefers it (NaN < error is false), so the range/15 start stays.
    with np.errstate(over="ignore", invalid="ignore"):
        inv = np.divide(1, d, out=np.zeros_like(d), where=d > 0)
        codes = x - m[:, None]
        codes *= inv[:, None]
    np.rint(codes, out=codes)
    return np.clip(codes, 0, 15, out=codes)


def _msb_error(x: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    residual = _msb_codes(x, d, m)
    with np.errstate(invalid="ignore"):
        residual *= d[:, None]
        residual += m[:, None]
        residual -= x
        return np.einsum("ij,ij->i", residual, residual)


def _refit(x, sum_x, codes, lo, hi, span, d, m):
    """Least-squares (d, m) for fixed codes, clamped to the constraint of search_msb_grid."""
    n = np.float32(x.shape[1])
    sum_c = codes.sum(axis=1)
    sum_cc = np.einsum("ij,ij->i", codes, codes)
    sum_cx = np.einsum("ij,ij->i", codes, x)
    det = n * sum_cc - sum_c * sum_c
    ok = det > 0
    safe = np.where(ok, det, np.float32(1))
    d = np.where(ok, (n * sum_cx - sum_c * sum_x) / safe, d)
    d = np.clip(d, span / np.float32(15.9375), span / np.float32(15))
    # the offset that goes with the (clamped) step: keeping the joint fit's offset for a clamped step
    # would anchor the grid at its bottom level, a bias toward negative errors in every such group
    m = (sum_x - d * sum_c) / n
    s = d / 16
    m = np.minimum(np.maximum(m, hi - 247.5 * s), lo + 7.5 * s)
    return d, m


def quantize(w: np.ndarray, name: str = "tensor", grid: str = DEFAULT_GRID) -> AmatGroups:
    """AMAT-quantize ``w`` along its last axis, which must be a multiple of 32, on ``grid``.

    Raises ValueError naming the tensor for NaN/Inf, values beyond fp16 range, or a bad shape.
    """
    if grid not in GRIDS:
        raise ValueError(f"unknown AMAT grid {grid!r} (one of {', '.join(GRIDS)})")
    groups, lo, hi = _checked_groups(w, name)
    span = hi.astype(np.float64) - lo
    if grid == "paper":
        s = _fp16_round_up(span / 255)
        s32 = s.astype(np.float32)
        base8 = lo
    elif grid == "aligned":
        s = _fp16_nearest_nonzero(span / 240)
        s32 = s.astype(np.float32)
        base8 = lo - MSB_CENTRE * s32
    else:
        d4, m4 = search_msb_grid(groups)
        s = _fp16_nearest_nonzero(d4 / 16)
        s32 = s.astype(np.float32)
        base8 = m4.astype(np.float32) - MSB_CENTRE * s32
    m_msb = (base8 + MSB_CENTRE * s32).astype(np.float16)
    m_lsb = (base8 - m_msb.astype(np.float32)).astype(np.float16)
    base = m_msb.astype(np.float32) + m_lsb.astype(np.float32)

    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(s32 > 0, np.float32(1) / s32, np.float32(0))
    q = (groups - base[:, None]) * inv[:, None]
    if grid == "paper":
        np.rint(q, out=q)
    else:
        # The aligned grid puts min and max on half steps of the 8-bit grid (codes 7.5 and 247.5);
        # round-half-to-even would move both up, a bias in every group. Ties go toward the middle.
        q = np.where(q > 127.5, np.ceil(q - 0.5), np.floor(q + 0.5))
    np.clip(q, 0, 255, out=q)
    return AmatGroups(shape=tuple(np.shape(w)), codes=q.astype(np.uint8),
                      d_msb=(s32 * 16).astype(np.float16), m_msb=m_msb, d_lsb=s, m_lsb=m_lsb, grid=grid)


def dequantize_high(g: AmatGroups) -> np.ndarray:
    """The 8-bit reconstruction, computed as MSB block + LSB block (what the engine runs)."""
    return dequantize_msb(g) + dequantize_lsb(g)


def dequantize_msb(g: AmatGroups, *, centred: bool = True) -> np.ndarray:
    """The 4-bit MSB-only reconstruction (what the MSB slice runs). ``centred=False`` is plain
    truncation of the 8-bit value (lo + 16 s h), kept for the accuracy comparison."""
    d = g.d_msb.astype(np.float32)[:, None]
    m = g.m_msb.astype(np.float32)[:, None]
    if not centred:
        m = m - np.float32(MSB_CENTRE / 16) * d
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
