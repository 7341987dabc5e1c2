// What the fused product's kernel units share (slicemoe-kernels.cpp: scalar, NEON and the choice
// of kernel; slicemoe-kernels-x86.cpp: AVX2 and AVX512-VNNI).
#pragma once

#include "slicemoe-product.h"

#if defined(__x86_64__) || defined(_M_X64)
#define SLICEMOE_X86 1
#endif

namespace slicemoe {

// 1 / d of an activation block, capped so that x * (1 / d) stays finite
float inverse_step(float d);
inline float fp16(ggml_fp16_t h) {
    return ggml_fp16_to_fp32(h);
}
// The exact two-product form of one block (steps not nested, or lsb nullptr: the MSB alone).
float block_dot_general(const q4_1_block & msb, const q4_1_block * lsb, const act_block & x);
// Whether the block's steps nest (d_msb = 16 d_lsb): its 8-bit code is then one integer.
inline bool nested(const q4_1_block & msb, const q4_1_block & lsb) {
    return fp16(msb.d) == 16.0f * fp16(lsb.d);
}

#ifdef SLICEMOE_X86
// n_rows rows (row r at r * stride blocks) against n_x <= TOKENS_AT_ONCE vectors with KERNEL_AVX2 or
// KERNEL_AVX512_VNNI: outs[t][r].
void rows_x86(kernel_id kernel, const q4_1_block * msb, const q4_1_block * lsb, int64_t stride,
              const quantized_activations * const * xs, int n_x, int64_t n_blocks, int64_t n_rows, float * const * outs);
// quantize_activations with AVX2: the same values as the scalar loop (ties to even)
void quantize_activations_avx2(const float * x, int64_t n_in, act_block * out);
#endif

} // namespace slicemoe
