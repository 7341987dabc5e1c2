// The C API: the fused expert product's kernels on one expert, and their timing beside ggml's own
// product for the kernel microbenchmark (scripts/bench_product.py).

#include "slicemoe-api.h"

#include "slicemoe.h"
#include "slicemoe-product.h"

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

using namespace slicemoe::api;

namespace {

bool product_args_ok(int32_t kernel, const void * msb, int64_t n_in, int64_t n_out, int64_t n_tokens, const float * x,
                     const float * y) {
    if (!msb || !x || !y || n_in <= 0 || n_in % 32 != 0 || n_out < 0 || n_tokens < 1) {
        fail(SLICEMOE_ERR_INVALID_ARG, "expert product: null pointer, n_in not a positive multiple of 32, or no token");
        return false;
    }
    if (kernel < 0 || kernel > slicemoe::KERNEL_NEON_DOTPROD || !slicemoe::kernel_available(slicemoe::kernel_id(kernel))) {
        fail(SLICEMOE_ERR_INVALID_ARG, "expert product: kernel " + std::to_string(kernel) + " is not available on this CPU");
        return false;
    }
    return true;
}

// x [n_tokens, n_in] -> y [n_tokens, n_out], as the graph's op computes the uses of one expert:
// the activations quantized, then every row against all of them.
void expert_product_tokens(slicemoe::kernel_id kernel, const void * msb, const void * lsb, int64_t n_in, int64_t n_out,
                           int64_t n_tokens, const float * x, float * y, std::vector<slicemoe::quantized_activations> * acts) {
    acts->resize(size_t(n_tokens));
    std::vector<const slicemoe::quantized_activations *> xs;
    std::vector<float *> outs;
    for (int64_t t = 0; t < n_tokens; ++t) {
        slicemoe::quantize_activations(kernel, x + t * n_in, n_in, &(*acts)[size_t(t)]);
        xs.push_back(&(*acts)[size_t(t)]);
        outs.push_back(y + t * n_out);
    }
    // in tiles of rows, as the product op runs a ubatch (its work items)
    const int64_t stride = n_in / 32;
    std::vector<float *> tile_outs(outs.size());
    for (int64_t first = 0; first < n_out; first += slicemoe::GROUP_ROWS) {
        for (size_t t = 0; t < outs.size(); ++t) tile_outs[t] = outs[t] + first;
        slicemoe::rows_dot_tokens(kernel, static_cast<const slicemoe::q4_1_block *>(msb) + first * stride,
                                  lsb ? static_cast<const slicemoe::q4_1_block *>(lsb) + first * stride : nullptr, stride,
                                  xs.data(), int(n_tokens), std::min(slicemoe::GROUP_ROWS, n_out - first), tile_outs.data());
    }
}

template <typename F>
double best_of(int32_t repeats, F && run) {
    double best = 1e30;
    for (int32_t i = 0; i < std::max(repeats, 1); ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        run();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
}

struct ggml_deleter {
    void operator()(ggml_context * ctx) const { ggml_free(ctx); }
    void operator()(ggml_backend * backend) const { ggml_backend_free(backend); }
    void operator()(ggml_backend_buffer * buf) const { ggml_backend_buffer_free(buf); }
};
template <typename T> using ggml_ptr = std::unique_ptr<T, ggml_deleter>;

// The buffer type llama.cpp would load a weight of this op's src[0] into on the CPU: the first of
// the CPU device's extra (repacking) buffer types that supports the op, else the plain CPU one. The
// same test as llama.cpp's weight_buft_supported: the op asked with src[0] in an empty buffer of it.
ggml_backend_buffer_type_t weight_buffer_type(ggml_tensor * op) {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    auto get_extra = reinterpret_cast<ggml_backend_dev_get_extra_bufts_t>(
        ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(dev), "ggml_backend_dev_get_extra_bufts"));
    for (ggml_backend_buffer_type_t * buft = get_extra ? get_extra(dev) : nullptr; buft && *buft; ++buft) {
        ggml_ptr<ggml_backend_buffer> empty(ggml_backend_buft_alloc_buffer(*buft, 0));
        op->src[0]->buffer = empty.get();
        const bool supported = ggml_backend_dev_supports_op(dev, op);
        op->src[0]->buffer = nullptr;
        if (supported) {
            return *buft;
        }
    }
    return ggml_backend_cpu_buffer_type();
}

} // namespace

int slicemoe_expert_product(int32_t kernel, const void * msb, const void * lsb, int64_t n_in, int64_t n_out,
                            const float * x, float * y) {
    return slicemoe_expert_product_time(kernel, msb, lsb, n_in, n_out, 1, x, y, 1, nullptr);
}

int slicemoe_expert_product_time(int32_t kernel, const void * msb, const void * lsb, int64_t n_in, int64_t n_out,
                                 int64_t n_tokens, const float * x, float * y, int32_t repeats, double * best_seconds) {
    return guard([&]() -> int {
        if (!product_args_ok(kernel, msb, n_in, n_out, n_tokens, x, y)) {
            return SLICEMOE_ERR_INVALID_ARG;
        }
        std::vector<slicemoe::quantized_activations> acts;
        const double best = best_of(repeats, [&] {
            expert_product_tokens(slicemoe::kernel_id(kernel), msb, lsb, n_in, n_out, n_tokens, x, y, &acts);
        });
        if (best_seconds) *best_seconds = best;
        return ok();
    });
}

int slicemoe_ggml_product_time(int32_t type, const float * weights, int64_t n_in, int64_t n_out, int64_t n_tokens,
                               const float * x, float * y, int32_t repeats, double * best_seconds, bool * repacked) {
    return guard([&]() -> int {
        init_once();   // ggml's log through ours: its repacking notes are not printed unless verbose
        if (type < 0 || type >= GGML_TYPE_COUNT || !ggml_get_type_traits(ggml_type(type))->is_quantized ||
            !weights || !x || !y || n_in <= 0 || n_out <= 0 || n_tokens < 1) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "ggml product: a quantized type, weights, activations and sizes are needed");
        }
        const ggml_type wtype = ggml_type(type);
        if (n_in % ggml_blck_size(wtype) != 0) {
            return fail(SLICEMOE_ERR_INVALID_ARG, std::string("ggml product: rows of ") + std::to_string(n_in) +
                                                      " values are not whole blocks of " + ggml_type_name(wtype));
        }
        // the weights in ggml's format, from its own quantizer
        std::vector<uint8_t> quantized(ggml_row_size(wtype, n_in) * size_t(n_out));
        ggml_quantize_chunk(wtype, weights, quantized.data(), 0, n_out, n_in, nullptr);

        const ggml_init_params params = { ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, true };
        ggml_ptr<ggml_context> weight_ctx(ggml_init(params)), ctx(ggml_init(params));
        ggml_tensor * w = ggml_new_tensor_2d(weight_ctx.get(), wtype, n_in, n_out);          // [n_in, n_out]
        ggml_tensor * xt = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, n_in, n_tokens);    // [n_in, n_tokens]
        ggml_tensor * product = ggml_mul_mat(ctx.get(), w, xt);                              // [n_out, n_tokens]
        ggml_backend_buffer_type_t buft = weight_buffer_type(product);
        ggml_ptr<ggml_backend_buffer> weight_buf(ggml_backend_alloc_ctx_tensors_from_buft(weight_ctx.get(), buft));
        ggml_ptr<ggml_backend_buffer> buf(ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), ggml_backend_cpu_buffer_type()));
        ggml_ptr<ggml_backend> backend(ggml_backend_cpu_init());
        if (!weight_buf || !buf || !backend) {
            return fail(SLICEMOE_ERR_NO_MEMORY, "ggml product: buffers or the CPU backend could not be made");
        }
        ggml_backend_cpu_set_n_threads(backend.get(), 1);
        ggml_backend_tensor_set(w, quantized.data(), 0, quantized.size());   // repacks, in a repacking buffer
        ggml_backend_tensor_set(xt, x, 0, ggml_nbytes(xt));
        ggml_cgraph * graph = ggml_new_graph(ctx.get());
        ggml_build_forward_expand(graph, product);
        ggml_status status = GGML_STATUS_SUCCESS;
        const double best = best_of(repeats, [&] {
            if (status == GGML_STATUS_SUCCESS) status = ggml_backend_graph_compute(backend.get(), graph);
        });
        if (status != GGML_STATUS_SUCCESS) {
            return fail(SLICEMOE_ERR_COMPUTE, "ggml product: the graph did not compute");
        }
        ggml_backend_tensor_get(product, y, 0, ggml_nbytes(product));
        if (best_seconds) *best_seconds = best;
        if (repacked) *repacked = buft != ggml_backend_cpu_buffer_type();
        return ok();
    });
}
