// The fused expert product's block kernels (slicemoe-product.h): scalar, AVX2, AVX512-VNNI, NEON,
// NEON with dot products, chosen at run time as ggml chooses its own (libllama is built for the
// baseline ISA). The ggml op that runs them over a layer's uses is slicemoe-product-op.cpp.
//
// The arithmetic. An AMAT weight is d_msb h + m_msb + d_lsb l + m_lsb (h, l its two nibbles), and
// every grid stores d_msb = 16 d_lsb exactly, so with s = d_lsb and the 8-bit code 16 h + l:
//     w = s (16 h + l) + (m_msb + m_lsb)
//     sum_j w_j x_j ~ s d_x sum_j (16 h_j + l_j) q_j + (m_msb + m_lsb) d_x sum_j q_j
// one 8 x 8-bit dot product per block, as Q8_0 x Q8_0: vpdpbusd takes the unsigned code as it is;
// AVX2's maddubs would saturate on it, so there the code is centred (c - 128, the offset gaining
// 128 s). A block whose steps are not nested (a file this project did not write) takes the exact
// two-product form, h and l separately.

#include "slicemoe-product.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SLICEMOE_X86 1
#endif

#if defined(__aarch64__)
#include <arm_neon.h>
#define SLICEMOE_ARM64 1
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#endif

namespace slicemoe {

namespace {

// 1 / d of an activation block, capped: below d = 1 / FLT_MAX the inverse would overflow to inf
// (and x * inf to NaN), while x * FLT_MAX still lands within the 8-bit range (|x| <= 127 d).
float inverse_step(float d) {
    return d != 0.0f ? std::min(1.0f / d, FLT_MAX) : 0.0f;
}

float fp16(ggml_fp16_t h) {
    return ggml_fp16_to_fp32(h);
}

// The exact two-product form of one block, for blocks whose steps are not nested.
float block_dot_general(const q4_1_block & msb, const q4_1_block * lsb, const act_block & x) {
    int32_t sum_h = 0, sum_l = 0;
    for (int j = 0; j < 16; ++j) {
        sum_h += int32_t(msb.qs[j] & 15) * x.q[j] + int32_t(msb.qs[j] >> 4) * x.q[j + 16];
        if (lsb) sum_l += int32_t(lsb->qs[j] & 15) * x.q[j] + int32_t(lsb->qs[j] >> 4) * x.q[j + 16];
    }
    float result = fp16(msb.d) * x.d * float(sum_h) + fp16(msb.m) * x.d_sum;
    if (lsb) result += fp16(lsb->d) * x.d * float(sum_l) + fp16(lsb->m) * x.d_sum;
    return result;
}

bool nested(const q4_1_block & msb, const q4_1_block & lsb) {
    return fp16(msb.d) == 16.0f * fp16(lsb.d);
}

float row_dot_scalar(const q4_1_block * msb, const q4_1_block * lsb, const act_block * x, int64_t n_blocks) {
    float sum = 0.0f;
    for (int64_t b = 0; b < n_blocks; ++b) {
        if (!lsb || !nested(msb[b], lsb[b])) {
            sum += block_dot_general(msb[b], lsb ? &lsb[b] : nullptr, x[b]);
            continue;
        }
        int32_t dot = 0;
        for (int j = 0; j < 16; ++j) {
            const int32_t c_lo = int32_t((msb[b].qs[j] & 15) << 4 | (lsb[b].qs[j] & 15)) - 128;
            const int32_t c_hi = int32_t((msb[b].qs[j] >> 4) << 4 | (lsb[b].qs[j] >> 4)) - 128;
            dot += c_lo * x[b].q[j] + c_hi * x[b].q[j + 16];
        }
        const float s = fp16(lsb[b].d);
        sum += s * x[b].d * float(dot) + (128.0f * s + fp16(msb[b].m) + fp16(lsb[b].m)) * x[b].d_sum;
    }
    return sum;
}

#ifdef SLICEMOE_X86

#define SLICEMOE_AVX2 __attribute__((target("avx2,fma,f16c")))

SLICEMOE_AVX2 inline __m256i nibbles_in_order(const uint8_t * qs) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i *>(qs));
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    return _mm256_and_si256(both, _mm256_set1_epi8(15));
}

SLICEMOE_AVX2 inline float fp16_avx2(ggml_fp16_t h) {
    return _cvtsh_ss(h);
}

SLICEMOE_AVX2 inline float horizontal_sum(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

// signed bytes a . b, 32 pairs, as 8 int32 sums (|a| <= 128, |b| <= 127: no int16 saturation)
SLICEMOE_AVX2 inline __m256i dot_i8(__m256i a, __m256i b) {
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

// The 8-bit code of a block, bytes in x.q's order: code j = h_j << 4 | l_j. Shifts within 16-bit
// lanes put each nibble where its byte needs it; the 0xF0 mask picks which source fills which half.
SLICEMOE_AVX2 inline __m256i code_in_order(const uint8_t * msb_qs, const uint8_t * lsb_qs) {
    const __m128i high = _mm_loadu_si128(reinterpret_cast<const __m128i *>(msb_qs));
    const __m128i low = _mm_loadu_si128(reinterpret_cast<const __m128i *>(lsb_qs));
    const __m128i upper = _mm_set1_epi8(char(0xF0));
    const __m128i first = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(high, 4), upper), _mm_andnot_si128(upper, low));
    const __m128i second = _mm_or_si128(_mm_and_si128(high, upper), _mm_andnot_si128(upper, _mm_srli_epi16(low, 4)));
    return _mm256_set_m128i(second, first);
}

// AVX2: a nibble h <= 15 is an unsigned byte, one maddubs without the sign trick; the 8-bit code
// would saturate maddubs, so it is centred (c - 128, the block's offset gaining 128 s).
SLICEMOE_AVX2 inline __m256i dot_nibbles_avx2(__m256i h, __m256i q) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(h, q), _mm256_set1_epi16(1));
}

SLICEMOE_AVX2 inline __m256i dot_code_avx2(__m256i code, __m256i q) {
    return dot_i8(_mm256_xor_si256(code, _mm256_set1_epi8(char(0x80))), q);
}

// The (d, m) headers of 8 consecutive blocks as 8 lanes of 32 bits (d low): block i's header is
// dword 5 i of their 160 bytes. AVX2 gathers them; AVX512 permutes two 64-byte loads.
SLICEMOE_AVX2 inline __m256i headers_avx2(const q4_1_block * blocks) {
    const __m256i offsets = _mm256_setr_epi32(0, 20, 40, 60, 80, 100, 120, 140);
    return _mm256_i32gather_epi32(reinterpret_cast<const int *>(blocks), offsets, 1);
}

// The low (d) or high (m) fp16 halves of 8 headers, as floats.
SLICEMOE_AVX2 inline __m256 header_halves_avx2(__m256i headers, bool high) {
    const __m256i pick = high ? _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1,
                                                 2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1)
                              : _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                                 0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(headers, pick), 0x08);   // qwords 0, 2
    return _mm256_cvtph_ps(_mm256_castsi256_si128(packed));
}

// AVX512-VNNI (256-bit vectors, AVX512VL): vpdpbusd multiplies unsigned by signed bytes and sums
// four products into 32 bits without saturation, so the 8-bit code needs no centring.
#define SLICEMOE_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))

SLICEMOE_VNNI inline __m256i dot_unsigned_vnni(__m256i u, __m256i q) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, q);
}

// code_in_order with AVX512's three-input logic: each half of a byte from its source in one step
SLICEMOE_VNNI inline __m256i code_in_order_vnni(const uint8_t * msb_qs, const uint8_t * lsb_qs) {
    const __m128i high = _mm_loadu_si128(reinterpret_cast<const __m128i *>(msb_qs));
    const __m128i low = _mm_loadu_si128(reinterpret_cast<const __m128i *>(lsb_qs));
    const __m128i upper = _mm_set1_epi8(char(0xF0));
    constexpr int UPPER_FROM_A_ELSE_B = 0xE4;   // c ? a : b, bit by bit
    const __m128i first = _mm_ternarylogic_epi32(_mm_slli_epi16(high, 4), low, upper, UPPER_FROM_A_ELSE_B);
    const __m128i second = _mm_ternarylogic_epi32(high, _mm_srli_epi16(low, 4), upper, UPPER_FROM_A_ELSE_B);
    return _mm256_set_m128i(second, first);
}

// GCC 12 warns inside its own _mm512_castsi512_si256 (the _mm256_undefined idiom, GCC bug 105593)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
SLICEMOE_VNNI inline __m256i headers_vnni(const q4_1_block * blocks) {
    const __m512i first = _mm512_loadu_si512(blocks);        // headers of blocks 0-3 at dwords 0, 5, 10, 15
    const __m512i second = _mm512_loadu_si512(blocks + 4);   // and of blocks 4-7
    const __m512i index = _mm512_setr_epi32(0, 5, 10, 15, 16, 21, 26, 31, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castsi512_si256(_mm512_permutex2var_epi32(first, index, second));
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

SLICEMOE_VNNI inline __m256 header_halves_vnni(__m256i headers, bool high) {
    return _mm256_cvtph_ps(_mm256_cvtepi32_epi16(high ? _mm256_srli_epi32(headers, 16) : headers));
}

// One block of a row (rest: the row's sum outside the vector accumulators).
#define SLICEMOE_X86_BLOCK(B, CODE, DOT_NIBBLES, DOT_CODE, CENTRE)                                               \
    do {                                                                                                  \
        const int64_t blk = (B);                                                                          \
        const act_block & xb = x.blocks[size_t(blk)];                                                     \
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xb.q));                    \
        if (!lsb) {                                                                                       \
            const float dot = horizontal_sum(_mm256_cvtepi32_ps(DOT_NIBBLES(nibbles_in_order(msb[blk].qs), q))); \
            rest += fp16_avx2(msb[blk].d) * xb.d * dot + fp16_avx2(msb[blk].m) * xb.d_sum;                \
        } else if (!nested(msb[blk], lsb[blk])) {                                                         \
            rest += block_dot_general(msb[blk], &lsb[blk], xb);                                           \
        } else {                                                                                          \
            const float s = fp16_avx2(lsb[blk].d);                                                        \
            const float dot = horizontal_sum(_mm256_cvtepi32_ps(DOT_CODE(CODE(msb[blk].qs, lsb[blk].qs), q))); \
            rest += s * xb.d * dot + (CENTRE * s + fp16_avx2(msb[blk].m) + fp16_avx2(lsb[blk].m)) * xb.d_sum; \
        }                                                                                                 \
    } while (0)

// The one-block form for blocks [FIRST, LAST) of the row, for each of the T vectors.
#define SLICEMOE_X86_BLOCKS_ALONE(FIRST, LAST, CODE, DOT_NIBBLES, DOT_CODE, CENTRE)                         \
    for (int t = 0; t < T; ++t) {                                                                         \
        const quantized_activations & x = *xs[t];                                                         \
        float & rest = rests[t];                                                                          \
        for (int64_t blk_i = (FIRST); blk_i < (LAST); ++blk_i) {                                          \
            SLICEMOE_X86_BLOCK(blk_i, CODE, DOT_NIBBLES, DOT_CODE, CENTRE);                               \
        }                                                                                                 \
    }

// One row of an expert against T activation vectors xs[0..T), 8 blocks at a time: their 8 headers
// are loaded and converted as one vector, so a block costs its unpacking (once for the T vectors),
// one dot product and one multiply-add per vector (the scale of block i taken from lane i); the
// offsets m d_x sum(q) of 8 blocks are one vector multiply-add. Groups with a block whose steps are
// not nested, and the last n_blocks % 8 blocks, take the one-block form. Each vector's sums run in
// the same order for every T, so a token computes the same in a prompt batch as alone. A macro for
// the two targets: GCC compiles a body for one target.
#define SLICEMOE_X86_ROW(HEADERS, HALVES, CODE, DOT_NIBBLES, DOT_CODE, CENTRE)                                   \
    __m256 acc_even[T], acc_odd[T], offsets[T];                                                            \
    float rests[T];                                                                                       \
    for (int t = 0; t < T; ++t) {                                                                         \
        acc_even[t] = acc_odd[t] = offsets[t] = _mm256_setzero_ps();                                      \
        rests[t] = 0.0f;                                                                                  \
    }                                                                                                     \
    int64_t b = 0;                                                                                        \
    for (; b + 8 <= n_blocks; b += 8) {                                                                   \
        const __m256i high_headers = HEADERS(msb + b);                                                    \
        __m256 step = HALVES(high_headers, false);                                                        \
        __m256 minimum = HALVES(high_headers, true);                                                      \
        if (lsb) {                                                                                        \
            const __m256i low_headers = HEADERS(lsb + b);                                                 \
            const __m256 low_step = HALVES(low_headers, false);                                           \
            const __m256 nested_steps = _mm256_cmp_ps(step, _mm256_mul_ps(low_step, _mm256_set1_ps(16.0f)), _CMP_EQ_OQ); \
            if (_mm256_movemask_ps(nested_steps) != 0xFF) {                                               \
                SLICEMOE_X86_BLOCKS_ALONE(b, b + 8, CODE, DOT_NIBBLES, DOT_CODE, CENTRE);                 \
                continue;                                                                                 \
            }                                                                                             \
            minimum = _mm256_add_ps(minimum, _mm256_fmadd_ps(low_step, _mm256_set1_ps(CENTRE), HALVES(low_headers, true))); \
            step = low_step;                                                                              \
        }                                                                                                 \
        __m256 scale[T];                                                                                  \
        for (int t = 0; t < T; ++t) {                                                                     \
            scale[t] = _mm256_mul_ps(step, _mm256_loadu_ps(&xs[t]->d[size_t(b)]));                        \
            offsets[t] = _mm256_fmadd_ps(minimum, _mm256_loadu_ps(&xs[t]->d_sum[size_t(b)]), offsets[t]); \
        }                                                                                                 \
        /* two accumulators per vector, in registers (an indexed pair would live on the stack) */      \
        for (int i = 0; i < 8; i += 2) {                                                                  \
            const __m256i code_even = lsb ? CODE(msb[b + i].qs, lsb[b + i].qs) : nibbles_in_order(msb[b + i].qs); \
            const __m256i code_odd = lsb ? CODE(msb[b + i + 1].qs, lsb[b + i + 1].qs)                      \
                                         : nibbles_in_order(msb[b + i + 1].qs);                           \
            const __m256i lane_even = _mm256_set1_epi32(i), lane_odd = _mm256_set1_epi32(i + 1);          \
            for (int t = 0; t < T; ++t) {                                                                 \
                const __m256i q_even = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xs[t]->blocks[size_t(b + i)].q)); \
                const __m256i q_odd = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xs[t]->blocks[size_t(b + i + 1)].q)); \
                const __m256i dot_even = lsb ? DOT_CODE(code_even, q_even) : DOT_NIBBLES(code_even, q_even); \
                const __m256i dot_odd = lsb ? DOT_CODE(code_odd, q_odd) : DOT_NIBBLES(code_odd, q_odd);   \
                acc_even[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_even),                               \
                                              _mm256_permutevar8x32_ps(scale[t], lane_even), acc_even[t]); \
                acc_odd[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_odd),                                 \
                                             _mm256_permutevar8x32_ps(scale[t], lane_odd), acc_odd[t]);   \
            }                                                                                             \
        }                                                                                                 \
    }                                                                                                     \
    SLICEMOE_X86_BLOCKS_ALONE(b, n_blocks, CODE, DOT_NIBBLES, DOT_CODE, CENTRE);                          \
    for (int t = 0; t < T; ++t) {                                                                         \
        out[t] = horizontal_sum(_mm256_add_ps(acc_even[t], acc_odd[t])) + horizontal_sum(offsets[t]) + rests[t]; \
    }

template <int T>
SLICEMOE_AVX2 void row_dot_avx2(const q4_1_block * msb, const q4_1_block * lsb, const quantized_activations * const * xs,
                                int64_t n_blocks, float * out) {
    SLICEMOE_X86_ROW(headers_avx2, header_halves_avx2, code_in_order, dot_nibbles_avx2, dot_code_avx2, 128.0f)
}

template <int T>
SLICEMOE_VNNI void row_dot_vnni(const q4_1_block * msb, const q4_1_block * lsb, const quantized_activations * const * xs,
                                int64_t n_blocks, float * out) {
    SLICEMOE_X86_ROW(headers_vnni, header_halves_vnni, code_in_order_vnni, dot_unsigned_vnni, dot_unsigned_vnni, 0.0f)
}

#undef SLICEMOE_X86_ROW
#undef SLICEMOE_X86_BLOCKS_ALONE
#undef SLICEMOE_X86_BLOCK

// quantize_activations for AVX2 machines: the same values as the scalar loop (ties to even)
SLICEMOE_AVX2 void quantize_activations_avx2(const float * x, int64_t n_in, act_block * out) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < n_in / 32; ++b) {
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; ++i) {
            v[i] = _mm256_loadu_ps(x + b * 32 + i * 8);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float d = _mm_cvtss_f32(m4) / 127.0f;
        const __m256 inverse = _mm256_set1_ps(inverse_step(d));
        __m256i q[4];
        for (int i = 0; i < 4; ++i) {
            q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
        const __m256i sum4 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(sum4), _mm256_extracti128_si256(sum4, 1));
        sum = _mm_hadd_epi32(sum, sum);
        sum = _mm_hadd_epi32(sum, sum);
        // packs work within 128-bit lanes: the permute puts the 32 bytes back in order
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(out[b].q), ordered);
        out[b].d = d;
        out[b].d_sum = d * float(_mm_cvtsi128_si32(sum));
    }
}

#endif // SLICEMOE_X86

#ifdef SLICEMOE_ARM64

// ARMv8.0 NEON (every arm64 core) and ARMv8.2 dot products (sdot: most phones since 2019), in one
// loop: a block's 32 byte pairs as one int32 sum. Without sdot, vmull_s8 + vmlal_s8 pair two
// products in 16 bits (|a| <= 128, |b| <= 127: at most 32512) before widening. The 8-bit code is
// centred (c - 128) as for AVX2: both instructions take signed bytes.

inline int8x16x2_t nibbles_neon(const uint8_t * qs) {   // nibble j, then nibble j + 16, as x.q
    const uint8x16_t packed = vld1q_u8(qs);
    return {{ vreinterpretq_s8_u8(vandq_u8(packed, vdupq_n_u8(15))), vreinterpretq_s8_u8(vshrq_n_u8(packed, 4)) }};
}

inline int32_t dot_pairs_v80(int8x16_t a0, int8x16_t a1, const int8_t * q) {
    const int8x16_t q0 = vld1q_s8(q), q1 = vld1q_s8(q + 16);
    int32x4_t acc = vpaddlq_s16(vmlal_s8(vmull_s8(vget_low_s8(a0), vget_low_s8(q0)), vget_high_s8(a0), vget_high_s8(q0)));
    acc = vpadalq_s16(acc, vmlal_s8(vmull_s8(vget_low_s8(a1), vget_low_s8(q1)), vget_high_s8(a1), vget_high_s8(q1)));
    return vaddvq_s32(acc);
}

#define SLICEMOE_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))

SLICEMOE_DOTPROD inline int32_t dot_pairs_sdot(int8x16_t a0, int8x16_t a1, const int8_t * q) {
    const int32x4_t acc = vdotq_s32(vdotq_s32(vdupq_n_s32(0), a0, vld1q_s8(q)), a1, vld1q_s8(q + 16));
    return vaddvq_s32(acc);
}

// The row loop for either dot product (a macro: GCC compiles a function for one target only).
#define SLICEMOE_NEON_ROW(DOT)                                                                         \
    float sum = 0.0f;                                                                                  \
    for (int64_t b = 0; b < n_blocks; ++b) {                                                           \
        const int8x16x2_t h = nibbles_neon(msb[b].qs);                                                 \
        if (!lsb) {                                                                                    \
            sum += fp16(msb[b].d) * x[b].d * float(DOT(h.val[0], h.val[1], x[b].q)) + fp16(msb[b].m) * x[b].d_sum; \
            continue;                                                                                  \
        }                                                                                              \
        const float s = fp16(lsb[b].d);                                                                \
        if (fp16(msb[b].d) != 16.0f * s) {                                                             \
            sum += block_dot_general(msb[b], &lsb[b], x[b]);                                           \
            continue;                                                                                  \
        }                                                                                              \
        const int8x16x2_t l = nibbles_neon(lsb[b].qs);                                                 \
        const int8x16_t flip = vdupq_n_s8(int8_t(-128));                                              \
        const int8x16_t c0 = veorq_s8(vorrq_s8(vshlq_n_s8(h.val[0], 4), l.val[0]), flip);             \
        const int8x16_t c1 = veorq_s8(vorrq_s8(vshlq_n_s8(h.val[1], 4), l.val[1]), flip);             \
        sum += s * x[b].d * float(DOT(c0, c1, x[b].q)) +                                               \
               (128.0f * s + fp16(msb[b].m) + fp16(lsb[b].m)) * x[b].d_sum;                           \
    }                                                                                                  \
    return sum;

float row_dot_neon(const q4_1_block * msb, const q4_1_block * lsb, const act_block * x, int64_t n_blocks) {
    SLICEMOE_NEON_ROW(dot_pairs_v80)
}

SLICEMOE_DOTPROD float row_dot_neon_dotprod(const q4_1_block * msb, const q4_1_block * lsb, const act_block * x,
                                            int64_t n_blocks) {
    SLICEMOE_NEON_ROW(dot_pairs_sdot)
}

#undef SLICEMOE_NEON_ROW

bool cpu_has_dotprod() {
#if defined(__APPLE__)
    return true;   // every Apple arm64 core (A11 and later, M1 and later)
#elif defined(__linux__) && defined(HWCAP_ASIMDDP)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
    return false;
#endif
}

#endif // SLICEMOE_ARM64

void quantize_activations_scalar(const float * x, int64_t n_in, act_block * out) {
    for (int64_t b = 0; b < n_in / 32; ++b) {
        const float * v = x + b * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
        const float d = amax / 127.0f;
        const float inverse = inverse_step(d);
        int32_t sum = 0;
        for (int j = 0; j < 32; ++j) {
            out[b].q[j] = int8_t(std::nearbyint(v[j] * inverse));
            sum += out[b].q[j];
        }
        out[b].d = d;
        out[b].d_sum = d * float(sum);
    }
}

} // namespace

bool kernel_available(kernel_id kernel) {
    switch (kernel) {
        case KERNEL_AUTO:
        case KERNEL_SCALAR:
            return true;
        case KERNEL_AVX2:
#ifdef SLICEMOE_X86
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
            return false;
#endif
        case KERNEL_AVX512_VNNI:
#ifdef SLICEMOE_X86
            return kernel_available(KERNEL_AVX2) && __builtin_cpu_supports("avx512f") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vnni");
#else
            return false;
#endif
        case KERNEL_NEON:
#ifdef SLICEMOE_ARM64
            return true;
#else
            return false;
#endif
        case KERNEL_NEON_DOTPROD:
#ifdef SLICEMOE_ARM64
            return cpu_has_dotprod();
#else
            return false;
#endif
    }
    return false;
}

kernel_id best_kernel() {
    static const kernel_id best = kernel_available(KERNEL_AVX512_VNNI)  ? KERNEL_AVX512_VNNI
                                : kernel_available(KERNEL_AVX2)         ? KERNEL_AVX2
                                : kernel_available(KERNEL_NEON_DOTPROD) ? KERNEL_NEON_DOTPROD
                                : kernel_available(KERNEL_NEON)         ? KERNEL_NEON
                                                                        : KERNEL_SCALAR;
    return best;
}

const char * kernel_name(kernel_id kernel) {
    switch (kernel) {
        case KERNEL_AUTO:   return kernel_name(best_kernel());
        case KERNEL_SCALAR: return "scalar";
        case KERNEL_AVX2:   return "avx2";
        case KERNEL_AVX512_VNNI: return "avx512vnni";
        case KERNEL_NEON:   return "neon";
        case KERNEL_NEON_DOTPROD: return "neon-dotprod";
    }
    return "unknown";
}

void quantize_activations(kernel_id kernel, const float * x, int64_t n_in, quantized_activations * out) {
    if (kernel == KERNEL_AUTO) kernel = best_kernel();
    const size_t n_blocks = size_t(n_in / 32);
    out->blocks.resize(n_blocks);
    out->d.resize(n_blocks);
    out->d_sum.resize(n_blocks);
#ifdef SLICEMOE_X86
    if (kernel != KERNEL_SCALAR) {
        quantize_activations_avx2(x, n_in, out->blocks.data());
    } else
#endif
    {
        quantize_activations_scalar(x, n_in, out->blocks.data());
    }
    for (size_t b = 0; b < n_blocks; ++b) {
        out->d[b] = out->blocks[b].d;
        out->d_sum[b] = out->blocks[b].d_sum;
    }
}

namespace {

#ifdef SLICEMOE_X86
// One row against up to TOKENS_AT_ONCE vectors: row_dot_<isa><T>, T from the count.
template <template <int> class Row>
void row_x86(const q4_1_block * high, const q4_1_block * low, const quantized_activations * const * xs, int n_x,
             int64_t n_blocks, float * out) {
    switch (n_x) {
        case 4: return Row<4>::run(high, low, xs, n_blocks, out);
        case 3: return Row<3>::run(high, low, xs, n_blocks, out);
        case 2: return Row<2>::run(high, low, xs, n_blocks, out);
        default: return Row<1>::run(high, low, xs, n_blocks, out);
    }
}
template <int T> struct row_avx2 {
    static void run(const q4_1_block * h, const q4_1_block * l, const quantized_activations * const * xs, int64_t n, float * out) {
        row_dot_avx2<T>(h, l, xs, n, out);
    }
};
template <int T> struct row_vnni {
    static void run(const q4_1_block * h, const q4_1_block * l, const quantized_activations * const * xs, int64_t n, float * out) {
        row_dot_vnni<T>(h, l, xs, n, out);
    }
};
#endif

} // namespace

void rows_dot_tokens(kernel_id kernel, const q4_1_block * msb, const q4_1_block * lsb, int64_t stride,
                     const quantized_activations * const * xs, int n_x, int64_t n_rows, float * const * outs) {
    if (kernel == KERNEL_AUTO) kernel = best_kernel();
    if (n_x <= 0) return;
    const int64_t n_blocks = int64_t(xs[0]->blocks.size());
    for (int64_t r = 0; r < n_rows; ++r) {
        const q4_1_block * high = msb + r * stride;
        const q4_1_block * low = lsb ? lsb + r * stride : nullptr;
        for (int first = 0; first < n_x; first += TOKENS_AT_ONCE) {
            const int count = std::min(TOKENS_AT_ONCE, n_x - first);
            float row[TOKENS_AT_ONCE];
            switch (kernel) {
#ifdef SLICEMOE_X86
                case KERNEL_AVX2:        row_x86<row_avx2>(high, low, xs + first, count, n_blocks, row); break;
                case KERNEL_AVX512_VNNI: row_x86<row_vnni>(high, low, xs + first, count, n_blocks, row); break;
#endif
                default:
                    for (int t = 0; t < count; ++t) {
                        const act_block * x = xs[first + t]->blocks.data();
#ifdef SLICEMOE_ARM64
                        if (kernel == KERNEL_NEON) { row[t] = row_dot_neon(high, low, x, n_blocks); continue; }
                        if (kernel == KERNEL_NEON_DOTPROD) { row[t] = row_dot_neon_dotprod(high, low, x, n_blocks); continue; }
#endif
                        row[t] = row_dot_scalar(high, low, x, n_blocks);
                    }
                    break;
            }
            for (int t = 0; t < count; ++t) outs[first + t][r] = row[t];
        }
    }
}

void rows_dot(kernel_id kernel, const q4_1_block * msb, const q4_1_block * lsb, int64_t stride,
              const quantized_activations & x, int64_t n_rows, float * out) {
    const quantized_activations * xs[] = { &x };
    float * outs[] = { out };
    rows_dot_tokens(kernel, msb, lsb, stride, xs, 1, n_rows, outs);
}

} // namespace slicemoe
