// The fused expert product's x86 kernels (slicemoe-kernels.h): AVX2 and AVX512-VNNI, compiled with
// target attributes (libllama is built for the baseline ISA) and chosen at run time. The
// arithmetic is described at the top of slicemoe-kernels.cpp.

#include "slicemoe-kernels.h"

#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>
#include <cstring>

namespace slicemoe {

namespace {

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

// AVX2 takes a block's two slices as two vectors of nibbles: maddubs multiplies unsigned by
// signed bytes, and the 8-bit code (up to 255) would saturate its 16-bit pair sums, where a nibble
// (up to 15) cannot. code . q = 16 (h . q) + (l . q), the same integer vpdpbusd gives.
struct nibble_pair {
    __m256i high, low;
};

SLICEMOE_AVX2 inline nibble_pair nibbles_of_both(const uint8_t * msb_qs, const uint8_t * lsb_qs) {
    return { nibbles_in_order(msb_qs), nibbles_in_order(lsb_qs) };
}

SLICEMOE_AVX2 inline __m256i dot_nibbles_avx2(__m256i h, __m256i q) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(h, q), _mm256_set1_epi16(1));
}

SLICEMOE_AVX2 inline __m256i dot_code_avx2(nibble_pair code, __m256i q) {
    const __m256i high = _mm256_madd_epi16(_mm256_maddubs_epi16(code.high, q), _mm256_set1_epi16(16));
    return _mm256_add_epi32(high, dot_nibbles_avx2(code.low, q));
}

// The (d, m) headers of N = 8 (or 4) consecutive blocks as N lanes of 32 bits (d low), the other
// lanes zero: block i's header is dword 5 i of their bytes. AVX2 loads them one by one (a vpgatherdd
// took more time: one expert on one thread, 8-bit 156 -> 113-148 us, MSB 81 -> 65-70 us on Zen 4);
// AVX512 permutes 64-byte loads (headers_vnni).
template <int N>
SLICEMOE_AVX2 inline __m256i headers_avx2(const q4_1_block * blocks) {
    int32_t h[8] = {};
    for (int i = 0; i < N; ++i) std::memcpy(&h[i], &blocks[i], 4);
    return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(h));
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

template <int N>
SLICEMOE_AVX2 inline __m256 load_lanes(const float * values) {
    return N == 8 ? _mm256_loadu_ps(values) : _mm256_set_m128(_mm_setzero_ps(), _mm_loadu_ps(values));
}

// AVX512-VNNI (256-bit vectors, AVX512VL): vpdpbusd multiplies unsigned by signed bytes and sums
// four products into 32 bits without saturation, so the 8-bit code needs no centring.
#define SLICEMOE_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))

SLICEMOE_VNNI inline __m256i dot_unsigned_vnni(__m256i u, __m256i q) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, q);
}

// The 8-bit code of a block, bytes in x.q's order: code j = h_j << 4 | l_j, with AVX512's
// three-input logic (shifts within 16-bit lanes put each nibble where its byte needs it; the 0xF0
// mask picks which source fills which half of a byte)
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
template <int N>
SLICEMOE_VNNI inline __m256i headers_vnni(const q4_1_block * blocks) {
    const __m512i first = _mm512_loadu_si512(blocks);        // headers of blocks 0-3 at dwords 0, 5, 10, 15
    const __m512i index = _mm512_setr_epi32(0, 5, 10, 15, 16, 21, 26, 31, 0, 0, 0, 0, 0, 0, 0, 0);
    if (N == 4) return _mm512_castsi512_si256(_mm512_maskz_permutexvar_epi32(0x000F, index, first));
    const __m512i second = _mm512_loadu_si512(blocks + 4);   // and of blocks 4-7
    return _mm512_castsi512_si256(_mm512_permutex2var_epi32(first, index, second));
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

SLICEMOE_VNNI inline __m256 header_halves_vnni(__m256i headers, bool high) {
    return _mm256_cvtph_ps(_mm256_cvtepi32_epi16(high ? _mm256_srli_epi32(headers, 16) : headers));
}

// One block of a row (rest: the row's sum outside the vector accumulators).
#define SLICEMOE_X86_BLOCK(B, CODE, DOT_NIBBLES, DOT_CODE)                                                    \
    do {                                                                                                      \
        const int64_t blk = (B);                                                                              \
        const act_block & xb = x.blocks[size_t(blk)];                                                         \
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xb.q));                        \
        if (!lsb) {                                                                                           \
            const float dot = horizontal_sum(_mm256_cvtepi32_ps(DOT_NIBBLES(nibbles_in_order(msb[blk].qs), q))); \
            rest += fp16_avx2(msb[blk].d) * xb.d * dot + fp16_avx2(msb[blk].m) * xb.d_sum;                    \
        } else if (!nested(msb[blk], lsb[blk])) {                                                             \
            rest += block_dot_general(msb[blk], &lsb[blk], xb);                                               \
        } else {                                                                                              \
            const float s = fp16_avx2(lsb[blk].d);                                                            \
            const float dot = horizontal_sum(_mm256_cvtepi32_ps(DOT_CODE(CODE(msb[blk].qs, lsb[blk].qs), q))); \
            rest += s * xb.d * dot + (fp16_avx2(msb[blk].m) + fp16_avx2(lsb[blk].m)) * xb.d_sum;              \
        }                                                                                                     \
    } while (0)

// The one-block form for blocks [FIRST, LAST) of the row, for each of the T vectors.
#define SLICEMOE_X86_BLOCKS_ALONE(FIRST, LAST, CODE, DOT_NIBBLES, DOT_CODE)                                   \
    for (int t = 0; t < T; ++t) {                                                                             \
        const quantized_activations & x = *xs[t];                                                             \
        float & rest = rests[t];                                                                              \
        for (int64_t blk_i = (FIRST); blk_i < (LAST); ++blk_i) {                                              \
            SLICEMOE_X86_BLOCK(blk_i, CODE, DOT_NIBBLES, DOT_CODE);                                           \
        }                                                                                                     \
    }

// The pair form: blocks a and a + 1 are unpacked together, a 16-byte half of each per vector, and
// dotted with the activations' pair_q (their first halves, then their second halves), so a vector
// op covers both blocks: the dot product's lanes 0-3 are block a's partial sums, lanes 4-7 block a + 1's.

// The qs of blocks a and a + 1 in one vector.
SLICEMOE_AVX2 inline __m256i qs_of_pair(const q4_1_block * a) {
    return _mm256_loadu2_m128i(reinterpret_cast<const __m128i *>(a[1].qs), reinterpret_cast<const __m128i *>(a[0].qs));
}

// Two blocks' weights, as pair_q takes them: weights 0-15 of both, then weights 16-31 of both.
struct pair_halves {
    __m256i first, second;
};

SLICEMOE_AVX2 inline pair_halves nibbles_of_pair(const q4_1_block * a) {
    const __m256i packed = qs_of_pair(a);
    const __m256i mask = _mm256_set1_epi8(15);
    return { _mm256_and_si256(packed, mask), _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask) };
}

// AVX2: a nibble times a byte twice fits 16 bits (2 x 2 x 15 x 128), so both halves add before widening.
SLICEMOE_AVX2 inline __m256i dot_pair_nibbles_avx2(pair_halves w, __m256i q_first, __m256i q_second, short weight) {
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(w.first, q_first), _mm256_maddubs_epi16(w.second, q_second));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(weight));
}

struct pair_code_avx2 {
    pair_halves high, low;
};

SLICEMOE_AVX2 inline pair_code_avx2 code_of_pair_avx2(const q4_1_block * msb, const q4_1_block * lsb) {
    return { nibbles_of_pair(msb), nibbles_of_pair(lsb) };
}

SLICEMOE_AVX2 inline __m256i dot_pair_code_avx2(pair_code_avx2 code, __m256i q_first, __m256i q_second) {
    return _mm256_add_epi32(dot_pair_nibbles_avx2(code.high, q_first, q_second, 16),
                            dot_pair_nibbles_avx2(code.low, q_first, q_second, 1));
}

SLICEMOE_AVX2 inline __m256i dot_pair_msb_avx2(pair_halves w, __m256i q_first, __m256i q_second) {
    return dot_pair_nibbles_avx2(w, q_first, q_second, 1);
}

// Four pairs' dot products (blocks 0-7) reduce by hadd: hadd(pair 0, pair 1) holds partial sums of
// blocks 0 0 2 2 | 1 1 3 3, and the hadd of that with hadd(pair 2, pair 3) the 8 blocks' sums in
// lanes 0 2 4 6 | 1 3 5 7, which this puts in block order. Integer sums: the order is exact.
SLICEMOE_AVX2 inline __m256i in_block_order(__m256i even_then_odd) {
    return _mm256_permutevar8x32_epi32(even_then_odd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// The 8-bit codes of two blocks in pair_q's order, with the three-input logic as code_in_order_vnni.
SLICEMOE_VNNI inline pair_halves code_of_pair_vnni(const q4_1_block * msb, const q4_1_block * lsb) {
    const __m256i high = qs_of_pair(msb);
    const __m256i low = qs_of_pair(lsb);
    const __m256i upper = _mm256_set1_epi8(char(0xF0));
    constexpr int UPPER_FROM_A_ELSE_B = 0xE4;
    return { _mm256_ternarylogic_epi32(_mm256_slli_epi16(high, 4), low, upper, UPPER_FROM_A_ELSE_B),
             _mm256_ternarylogic_epi32(high, _mm256_srli_epi16(low, 4), upper, UPPER_FROM_A_ELSE_B) };
}

SLICEMOE_VNNI inline __m256i dot_pair_vnni(pair_halves w, __m256i q_first, __m256i q_second) {
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w.first, q_first), w.second, q_second);
}

// The body of a loop over groups of N = 8 (or 4) blocks from b (`continue` goes to the next group;
// a do-while wrapper, tried instead, made GCC compile the loop about 8% slower). The N headers are
// loaded and converted as one vector (lanes past N zero: a step of 0 nests, a minimum of 0 adds
// nothing); the blocks are unpacked in pairs (once for the T vectors), each pair one integer dot
// product per vector; their integer sums are reduced into one vector (lane i = block i) and scaled
// by one multiply-add, as are the offsets m d_x sum(q). A group with a block whose steps are not
// nested takes the one-block form.
#define SLICEMOE_X86_GROUP(N, HEADERS, HALVES, CODE, DOT_NIBBLES, DOT_CODE, PAIR_CODE, PAIR_DOT_CODE, PAIR_DOT_MSB) \
        const __m256i high_headers = HEADERS<N>(msb + b);                                                     \
        __m256 step = HALVES(high_headers, false);                                                            \
        __m256 minimum = HALVES(high_headers, true);                                                          \
        if (lsb) {                                                                                            \
            const __m256i low_headers = HEADERS<N>(lsb + b);                                                  \
            const __m256 low_step = HALVES(low_headers, false);                                               \
            const __m256 nested_steps = _mm256_cmp_ps(step, _mm256_mul_ps(low_step, _mm256_set1_ps(16.0f)), _CMP_EQ_OQ); \
            if (_mm256_movemask_ps(nested_steps) != 0xFF) {                                                   \
                SLICEMOE_X86_BLOCKS_ALONE(b, b + N, CODE, DOT_NIBBLES, DOT_CODE);                             \
                continue;                                                                                     \
            }                                                                                                 \
            minimum = _mm256_add_ps(minimum, HALVES(low_headers, true));                                      \
            step = low_step;                                                                                  \
        }                                                                                                     \
        __m256 scale[T];                                                                                      \
        for (int t = 0; t < T; ++t) {                                                                         \
            scale[t] = _mm256_mul_ps(step, load_lanes<N>(&xs[t]->d[size_t(b)]));                              \
            offsets[t] = _mm256_fmadd_ps(minimum, load_lanes<N>(&xs[t]->d_sum[size_t(b)]), offsets[t]);       \
        }                                                                                                     \
        __m256i pair_dot[4][T];                                                                               \
        for (int i = N / 2; i < 4; ++i) {                                                                     \
            for (int t = 0; t < T; ++t) pair_dot[i][t] = _mm256_setzero_si256();                              \
        }                                                                                                     \
        for (int i = 0; i < N / 2; ++i) {                                                                     \
            const q4_1_block * high = msb + b + 2 * i;                                                        \
            if (lsb) {                                                                                        \
                const auto code = PAIR_CODE(high, lsb + b + 2 * i);                                           \
                for (int t = 0; t < T; ++t) {                                                                 \
                    const __m256i * q = reinterpret_cast<const __m256i *>(&xs[t]->pair_q[size_t(b + 2 * i) * 32]); \
                    pair_dot[i][t] = PAIR_DOT_CODE(code, _mm256_loadu_si256(q), _mm256_loadu_si256(q + 1));   \
                }                                                                                             \
            } else {                                                                                          \
                const pair_halves nibbles = nibbles_of_pair(high);                                            \
                for (int t = 0; t < T; ++t) {                                                                 \
                    const __m256i * q = reinterpret_cast<const __m256i *>(&xs[t]->pair_q[size_t(b + 2 * i) * 32]); \
                    pair_dot[i][t] = PAIR_DOT_MSB(nibbles, _mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)); \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
        for (int t = 0; t < T; ++t) {                                                                         \
            const __m256i sums = in_block_order(_mm256_hadd_epi32(_mm256_hadd_epi32(pair_dot[0][t], pair_dot[1][t]), \
                                                                   _mm256_hadd_epi32(pair_dot[2][t], pair_dot[3][t]))); \
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale[t], acc[t]);                             \
        }                                                                                                     \

// One row of an expert against T activation vectors xs[0..T): groups of 8 blocks, then one of 4
// where 4 to 7 remain, then the last n_blocks % 4 blocks in the one-block form. The pair form costs
// about half the vector operations of a block unpacked and scaled alone (OLMoE's gate/up expert,
// one thread, AVX512-VNNI: 8-bit 101 -> 71 us, MSB 73 -> 48 us, with the group of 4 and the loop
// over rows inside the target function). Each vector's sums run in the same order for every T, so
// a token computes the same in a prompt batch as alone. A macro for the two targets: GCC compiles a
// body for one target.
#define SLICEMOE_X86_ROW(HEADERS, HALVES, CODE, DOT_NIBBLES, DOT_CODE, PAIR_CODE, PAIR_DOT_CODE, PAIR_DOT_MSB) \
    __m256 acc[T], offsets[T];                                                                                \
    float rests[T];                                                                                           \
    for (int t = 0; t < T; ++t) {                                                                             \
        acc[t] = offsets[t] = _mm256_setzero_ps();                                                            \
        rests[t] = 0.0f;                                                                                      \
    }                                                                                                         \
    int64_t b = 0;                                                                                            \
    for (; b + 8 <= n_blocks; b += 8) {                                                                       \
        SLICEMOE_X86_GROUP(8, HEADERS, HALVES, CODE, DOT_NIBBLES, DOT_CODE, PAIR_CODE, PAIR_DOT_CODE, PAIR_DOT_MSB); \
    }                                                                                                         \
    for (; b + 4 <= n_blocks; b += 4) {   /* at most once */                                                  \
        SLICEMOE_X86_GROUP(4, HEADERS, HALVES, CODE, DOT_NIBBLES, DOT_CODE, PAIR_CODE, PAIR_DOT_CODE, PAIR_DOT_MSB); \
    }                                                                                                         \
    SLICEMOE_X86_BLOCKS_ALONE(b, n_blocks, CODE, DOT_NIBBLES, DOT_CODE);                                      \
    for (int t = 0; t < T; ++t) {                                                                             \
        out[t] = horizontal_sum(_mm256_add_ps(acc[t], offsets[t])) + rests[t];                                \
    }

// n_rows rows of an expert (row r at stride r blocks from msb_rows, lsb_rows) against T vectors:
// outs[t][r]. The loop over rows is inside the target function: a call per row cost about 10 ns,
// a tenth of a short row's time.
#define SLICEMOE_X86_ROWS(...)                                                                                \
    for (int64_t r = 0; r < n_rows; ++r) {                                                                    \
        const q4_1_block * msb = msb_rows + r * stride;                                                       \
        const q4_1_block * lsb = lsb_rows ? lsb_rows + r * stride : nullptr;                                  \
        float out[T];                                                                                         \
        SLICEMOE_X86_ROW(__VA_ARGS__)                                                                         \
        for (int t = 0; t < T; ++t) outs[t][r] = out[t];                                                      \
    }

template <int T>
SLICEMOE_AVX2 void rows_dot_avx2(const q4_1_block * msb_rows, const q4_1_block * lsb_rows, int64_t stride,
                                 const quantized_activations * const * xs, int64_t n_blocks, int64_t n_rows,
                                 float * const * outs) {
    SLICEMOE_X86_ROWS(headers_avx2, header_halves_avx2, nibbles_of_both, dot_nibbles_avx2, dot_code_avx2,
                      code_of_pair_avx2, dot_pair_code_avx2, dot_pair_msb_avx2)
}

template <int T>
SLICEMOE_VNNI void rows_dot_vnni(const q4_1_block * msb_rows, const q4_1_block * lsb_rows, int64_t stride,
                                 const quantized_activations * const * xs, int64_t n_blocks, int64_t n_rows,
                                 float * const * outs) {
    SLICEMOE_X86_ROWS(headers_vnni, header_halves_vnni, code_in_order_vnni, dot_unsigned_vnni, dot_unsigned_vnni,
                      code_of_pair_vnni, dot_pair_vnni, dot_pair_vnni)
}

#undef SLICEMOE_X86_ROWS
#undef SLICEMOE_X86_ROW
#undef SLICEMOE_X86_GROUP
#undef SLICEMOE_X86_BLOCKS_ALONE
#undef SLICEMOE_X86_BLOCK

// Rows against up to TOKENS_AT_ONCE vectors: Rows<T>, T from the count.
template <template <int> class Rows>
void rows_of_isa(const q4_1_block * msb, const q4_1_block * lsb, int64_t stride, const quantized_activations * const * xs,
                 int n_x, int64_t n_blocks, int64_t n_rows, float * const * outs) {
    switch (n_x) {
        case 8: return Rows<8>::run(msb, lsb, stride, xs, n_blocks, n_rows, outs);
        case 7: return Rows<7>::run(msb, lsb, stride, xs, n_blocks, n_rows, outs);
        case 6: return Rows<6>::run(msb, lsb, stride, xs, n_blocks, n_rows, outs);
        case 5: return Rows<5>::run(msb, lsb, stride, xs, n_blocks, n_rows, outs);
        case 4: return Rows<4>::run(msb, lsb, stride, xs, n_blocks, n_rows, outs);
        case 3: return Rows<3>::run(msb, lsb, stride, xs, n_blocks, n_rows, outs);
        case 2: return Rows<2>::run(msb, lsb, stride, xs, n_blocks, n_rows, outs);
        default: return Rows<1>::run(msb, lsb, stride, xs, n_blocks, n_rows, outs);
    }
}
template <int T> struct rows_avx2 {
    static void run(const q4_1_block * h, const q4_1_block * l, int64_t stride, const quantized_activations * const * xs,
                    int64_t n_blocks, int64_t n_rows, float * const * outs) {
        rows_dot_avx2<T>(h, l, stride, xs, n_blocks, n_rows, outs);
    }
};
template <int T> struct rows_vnni {
    static void run(const q4_1_block * h, const q4_1_block * l, int64_t stride, const quantized_activations * const * xs,
                    int64_t n_blocks, int64_t n_rows, float * const * outs) {
        rows_dot_vnni<T>(h, l, stride, xs, n_blocks, n_rows, outs);
    }
};
} // namespace

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


void rows_x86(kernel_id kernel, const q4_1_block * msb, const q4_1_block * lsb, int64_t stride,
              const quantized_activations * const * xs, int n_x, int64_t n_blocks, int64_t n_rows, float * const * outs) {
    if (kernel == KERNEL_AVX512_VNNI) {
        rows_of_isa<rows_vnni>(msb, lsb, stride, xs, n_x, n_blocks, n_rows, outs);
    } else {
        rows_of_isa<rows_avx2>(msb, lsb, stride, xs, n_x, n_blocks, n_rows, outs);
    }
}

} // namespace slicemoe

#endif // x86
