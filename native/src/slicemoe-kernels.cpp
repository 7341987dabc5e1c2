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

SLICEMOE_AVX2 float row_dot_avx2(const q4_1_block * msb, const q4_1_block * lsb, const act_block * x, int64_t n_blocks) {
    __m256 acc = _mm256_setzero_ps();
    float offsets = 0.0f;
    float general = 0.0f;
    for (int64_t b = 0; b < n_blocks; ++b) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x[b].q));
        const __m256i h = nibbles_in_order(msb[b].qs);
        if (!lsb) {
            // h <= 15 is an unsigned byte: one maddubs without the sign trick
            const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(h, q), _mm256_set1_epi16(1));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(fp16_avx2(msb[b].d) * x[b].d), acc);
            offsets += fp16_avx2(msb[b].m) * x[b].d_sum;
            continue;
        }
        const float s = fp16_avx2(lsb[b].d);
        if (fp16_avx2(msb[b].d) != 16.0f * s) {
            general += block_dot_general(msb[b], &lsb[b], x[b]);
            continue;
        }
        // h << 4 within 16-bit lanes stays in its byte (h <= 15)
        const __m256i code = _mm256_or_si256(_mm256_slli_epi16(h, 4), nibbles_in_order(lsb[b].qs));
        const __m256i centred = _mm256_xor_si256(code, _mm256_set1_epi8(char(0x80)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8(centred, q)), _mm256_set1_ps(s * x[b].d), acc);
        offsets += (128.0f * s + fp16_avx2(msb[b].m) + fp16_avx2(lsb[b].m)) * x[b].d_sum;
    }
    return horizontal_sum(acc) + offsets + general;
}

// AVX512-VNNI (256-bit vectors, AVX512VL): vpdpbusd multiplies unsigned by signed bytes and sums
// four products into 32 bits without saturation, so the 8-bit code needs no centring. The loop is
// row_dot_avx2's with other products: one template for both would need its body compiled for two
// targets, which GCC's target attributes do not give a template.
#define SLICEMOE_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))

SLICEMOE_VNNI float row_dot_vnni(const q4_1_block * msb, const q4_1_block * lsb, const act_block * x, int64_t n_blocks) {
    __m256 acc = _mm256_setzero_ps();
    float offsets = 0.0f;
    float general = 0.0f;
    for (int64_t b = 0; b < n_blocks; ++b) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x[b].q));
        const __m256i h = nibbles_in_order(msb[b].qs);
        if (!lsb) {
            const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), h, q);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(fp16_avx2(msb[b].d) * x[b].d), acc);
            offsets += fp16_avx2(msb[b].m) * x[b].d_sum;
            continue;
        }
        const float s = fp16_avx2(lsb[b].d);
        if (fp16_avx2(msb[b].d) != 16.0f * s) {
            general += block_dot_general(msb[b], &lsb[b], x[b]);
            continue;
        }
        const __m256i code = _mm256_or_si256(_mm256_slli_epi16(h, 4), nibbles_in_order(lsb[b].qs));
        const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), code, q);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s * x[b].d), acc);
        offsets += (fp16_avx2(msb[b].m) + fp16_avx2(lsb[b].m)) * x[b].d_sum;
    }
    return horizontal_sum(acc) + offsets + general;
}

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

void quantize_activations(kernel_id kernel, const float * x, int64_t n_in, act_block * out) {
    if (kernel == KERNEL_AUTO) kernel = best_kernel();
#ifdef SLICEMOE_X86
    if (kernel != KERNEL_SCALAR) return quantize_activations_avx2(x, n_in, out);
#endif
    quantize_activations_scalar(x, n_in, out);
}

float row_dot(kernel_id kernel, const q4_1_block * msb, const q4_1_block * lsb, const act_block * x, int64_t n_blocks) {
    if (kernel == KERNEL_AUTO) kernel = best_kernel();
#ifdef SLICEMOE_X86
    if (kernel == KERNEL_AVX2) return row_dot_avx2(msb, lsb, x, n_blocks);
    if (kernel == KERNEL_AVX512_VNNI) return row_dot_vnni(msb, lsb, x, n_blocks);
#endif
#ifdef SLICEMOE_ARM64
    if (kernel == KERNEL_NEON) return row_dot_neon(msb, lsb, x, n_blocks);
    if (kernel == KERNEL_NEON_DOTPROD) return row_dot_neon_dotprod(msb, lsb, x, n_blocks);
#endif
    return row_dot_scalar(msb, lsb, x, n_blocks);
}

} // namespace slicemoe
