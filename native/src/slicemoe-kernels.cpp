// The fused expert product's block kernels (slicemoe-product.h): scalar, NEON, NEON with dot
// products here, AVX2 and AVX512-VNNI in slicemoe-kernels-x86.cpp, chosen at run time as ggml
// chooses its own (libllama is built for the baseline ISA). The ggml op that runs them over a
// layer's uses is slicemoe-product-op.cpp.
//
// The arithmetic. An AMAT weight is d_msb h + m_msb + d_lsb l + m_lsb (h, l its two nibbles), and
// every grid stores d_msb = 16 d_lsb exactly, so with s = d_lsb and the 8-bit code 16 h + l:
//     w = s (16 h + l) + (m_msb + m_lsb)
//     sum_j w_j x_j ~ s d_x sum_j (16 h_j + l_j) q_j + (m_msb + m_lsb) d_x sum_j q_j
// one 8 x 8-bit dot product per block, as Q8_0 x Q8_0: vpdpbusd takes the unsigned code as it is;
// AVX2's maddubs would saturate on it, so there it is 16 (h . q) + (l . q), the same integer; the
// scalar and NEON kernels centre it (c - 128, the offset gaining 128 s). A block whose steps are not
// nested (a file this project did not write) takes the exact two-product form, h and l separately.

#include "slicemoe-kernels.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__aarch64__)
#include <arm_neon.h>
#define SLICEMOE_ARM64 1
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#endif

namespace slicemoe {

// 1 / d of an activation block, capped: below d = 1 / FLT_MAX the inverse would overflow to inf
// (and x * inf to NaN), while x * FLT_MAX still lands within the 8-bit range (|x| <= 127 d).
float inverse_step(float d) {
    return d != 0.0f ? std::min(1.0f / d, FLT_MAX) : 0.0f;
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


namespace {

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
    // only the x86 vector kernels read the pair form: the scalar and NEON ones skip the copy
    const bool paired = kernel == KERNEL_AVX2 || kernel == KERNEL_AVX512_VNNI;
    out->pair_q.resize(paired ? n_blocks / 2 * 64 : 0);
    for (size_t pair = 0; paired && pair < n_blocks / 2; ++pair) {
        int8_t * q = &out->pair_q[pair * 64];
        for (int half = 0; half < 2; ++half) {
            std::memcpy(q + half * 32,      out->blocks[2 * pair].q + half * 16, 16);
            std::memcpy(q + half * 32 + 16, out->blocks[2 * pair + 1].q + half * 16, 16);
        }
    }
}

void rows_dot_tokens(kernel_id kernel, const q4_1_block * msb, const q4_1_block * lsb, int64_t stride,
                     const quantized_activations * const * xs, int n_x, int64_t n_rows, float * const * outs) {
    if (kernel == KERNEL_AUTO) kernel = best_kernel();
    if (n_x <= 0) return;
    const int64_t n_blocks = int64_t(xs[0]->blocks.size());
#ifdef SLICEMOE_X86
    if (kernel == KERNEL_AVX2 || kernel == KERNEL_AVX512_VNNI) {
        for (int first = 0; first < n_x; first += TOKENS_AT_ONCE) {
            rows_x86(kernel, msb, lsb, stride, xs + first, std::min(TOKENS_AT_ONCE, n_x - first), n_blocks, n_rows,
                     outs + first);
        }
        return;
    }
#endif
    for (int64_t r = 0; r < n_rows; ++r) {
        const q4_1_block * high = msb + r * stride;
        const q4_1_block * low = lsb ? lsb + r * stride : nullptr;
        for (int t = 0; t < n_x; ++t) {
            const act_block * x = xs[t]->blocks.data();
#ifdef SLICEMOE_ARM64
            if (kernel == KERNEL_NEON) { outs[t][r] = row_dot_neon(high, low, x, n_blocks); continue; }
            if (kernel == KERNEL_NEON_DOTPROD) { outs[t][r] = row_dot_neon_dotprod(high, low, x, n_blocks); continue; }
#endif
            outs[t][r] = row_dot_scalar(high, low, x, n_blocks);
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
