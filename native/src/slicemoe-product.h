// The fused expert product: one pass over an expert's MSB and LSB slices (Q4_1 blocks each) with
// 8-bit activations. An 8-bit use rejoins each block's two nibbles into AMAT's 8-bit code and does
// one integer dot product per block; a 4-bit use reads the MSB block only. It replaces the two
// Q4_1 mul_mat_id passes of an 8-bit use on CPU pools and mapped CPU weights (patch 0002 asks
// slicemoe_moe_product, slicemoe-graph.h).
#pragma once

#include "ggml.h"

#include <atomic>
#include <cstdint>
#include <vector>

namespace slicemoe {

// A Q4_1 block as ggml stores it (ggml-common.h's block_q4_1, which is not a public header):
// value j = d * nibble_j + m, nibble j in the low half of qs[j], nibble j + 16 in the high half.
struct q4_1_block {
    ggml_fp16_t d;
    ggml_fp16_t m;
    uint8_t     qs[16];
};
static_assert(sizeof(q4_1_block) == 20, "a Q4_1 block is 20 bytes");

// 32 activations quantized as llama.cpp's Q8_1 does (d = max |x| / 127, q = round(x / d)), with
// d * sum(q) kept for the blocks' offsets. Kept in float: the offsets of AMAT blocks are large
// relative to their steps, and a fp16 sum would round away what Q8_1's does not need.
struct act_block {
    int8_t q[32];
    float  d;
    float  d_sum;
};

enum kernel_id { KERNEL_AUTO = 0, KERNEL_SCALAR = 1, KERNEL_AVX2 = 2, KERNEL_AVX512_VNNI = 3, KERNEL_NEON = 4,
                 KERNEL_NEON_DOTPROD = 5 };

// The kernel AUTO runs on this CPU.
kernel_id best_kernel();
bool kernel_available(kernel_id kernel);
const char * kernel_name(kernel_id kernel);

// A vector of activations quantized for the kernels: its blocks, and each block's d and d_sum again
// in their own arrays (the x86 kernels load 8 blocks' at once).
struct quantized_activations {
    std::vector<act_block> blocks;   // [n_in / 32]
    std::vector<float> d, d_sum;     // [n_in / 32]
    // the x86 vector kernels' pair form, [n_in / 64][64] (empty for the others): for blocks 2p and
    // 2p + 1, q[0..16) of each, then q[16..32) of each (the order two blocks' nibbles unpack in)
    std::vector<int8_t> pair_q;
};

// x [n_in] -> n_in / 32 blocks; every kernel gives the same values (rounding ties to even, as
// ggml's x86 Q8_1 path does)
void quantize_activations(kernel_id kernel, const float * x, int64_t n_in, quantized_activations * out);

// n_rows rows of one expert, row r starting stride * r blocks after msb (and lsb): out[r] = the sum
// over its blocks of (msb + lsb) . x, or msb . x when lsb is nullptr.
void rows_dot(kernel_id kernel, const q4_1_block * msb, const q4_1_block * lsb, int64_t stride,
              const quantized_activations & x, int64_t n_rows, float * out);

// The same rows against n_x activation vectors at once (a prompt batch's tokens that use this
// expert): outs[t][r] = row r . xs[t]. The x86 kernels unpack each block once for up to
// TOKENS_AT_ONCE vectors; every value equals what rows_dot computes for that vector alone. (8: a
// 32-token ubatch of one expert in 1.17-1.18x ggml Q8_0's time with AVX512-VNNI on Zen 4, against
// 1.24-1.28x with 4; AVX2, with half the vector registers, still gained: 1.78x -> 1.55x.)
constexpr int TOKENS_AT_ONCE = 8;
// Rows of one expert per work item of a batch's product: the tile stays in the core's cache while
// every token that uses it passes (32 x 2.5 KiB of 8-bit slices at n_in 2048).
constexpr int64_t GROUP_ROWS = 32;
void rows_dot_tokens(kernel_id kernel, const q4_1_block * msb, const q4_1_block * lsb, int64_t stride,
                     const quantized_activations * const * xs, int n_x, int64_t n_rows, float * const * outs);

// Reads still landing in a projection's MSB and LSB pools while the product runs (one per layer and
// projection, owned by the engine; the op keeps a pointer to it). The engine fills it when it issues
// a step's reads and clears it once they are joined, always outside the graph's compute; during the
// compute only the read states change.
struct product_ready {
    const std::atomic<uint8_t> * state = nullptr;   // per read: 0 in flight, 1 landed, 2 failed
    std::vector<int32_t> msb_read, lsb_read;         // per slot: the first read of its slice, or -1 (resident)
    int64_t chunk_bytes = 0;                         // the slice's reads are its chunks of this many bytes
    std::vector<int32_t> order;                      // one token: its uses, resident first (empty: in order)
    std::atomic<int64_t> waited_ns{0};               // the longest a thread of the op waited
    bool pending() const { return state != nullptr; }
};

// The op over a layer's uses: [n_out, k, n_tokens] F32 from Q4_1 weights w and w_lsb
// [n_in, n_out, slots] in host memory (w_lsb nullptr: every use at 4 bits), activations x
// [n_in, k or 1, n_tokens] and slot ids [k, n_tokens] (MSB id < 0: a dropped use, zeros; LSB id
// < 0: a 4-bit use; LSB ids [k, 1]: the last token's, every other token's uses at 4 bits). ready
// (may be nullptr): the slots to wait for, use by use, before reading them. w_file and w_lsb_file (may be nullptr): the file's mapped tensors [n_in, n_out, n_expert]
// behind the pools; an id at or past a pool's slots is then expert id - slots there (a prompt
// reads the slices the pools hold from them). nullptr where the tensors do not fit that
// description (device pools, other types): the caller keeps ggml's products.
ggml_tensor * build_expert_product(ggml_context * ctx, ggml_tensor * w, ggml_tensor * w_lsb, ggml_tensor * x,
                                   ggml_tensor * ids, ggml_tensor * ids_lsb, product_ready * ready,
                                   ggml_tensor * w_file = nullptr, ggml_tensor * w_lsb_file = nullptr);

// Whether a sliced file's products are the fused op (the default). SLICEMOE_PRODUCT=ggml keeps
// ggml's two Q4_1 passes instead, for side-by-side runs.
bool fused_products();

} // namespace slicemoe
