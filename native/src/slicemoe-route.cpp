#include "slicemoe-route.h"

#include <algorithm>
#include <cmath>

namespace slicemoe {

std::unique_ptr<forced_routes> forced_routes::create(int n_layers, int n_expert, int top_k, int32_t n_positions,
                                                     const int32_t * experts, const float * weights,
                                                     std::string * error) {
    const size_t n = size_t(n_positions) * size_t(n_layers) * size_t(top_k);
    for (size_t i = 0; i < n; ++i) {
        if (experts[i] < 0 || experts[i] >= n_expert || !std::isfinite(weights[i]) || weights[i] < 0.0f) {
            const size_t position = i / (size_t(n_layers) * size_t(top_k));
            const size_t layer = i / size_t(top_k) % size_t(n_layers);
            *error = "route of position " + std::to_string(position) + ", MoE layer " + std::to_string(layer) +
                     ": expert " + std::to_string(experts[i]) + " (need [0, " + std::to_string(n_expert) +
                     ")) with weight " + std::to_string(weights[i]) + " (need a finite number >= 0)";
            return nullptr;
        }
    }
    std::unique_ptr<forced_routes> r(new forced_routes());
    r->n_layers_ = n_layers;
    r->n_expert_ = n_expert;
    r->top_k_ = top_k;
    r->n_positions_ = n_positions;
    r->experts_.assign(experts, experts + n);
    r->weights_.assign(weights, weights + n);
    ggml_init_params ip = { ggml_tensor_overhead() * size_t(2 * n_layers), nullptr, /*no_alloc*/ true };
    r->ctx_ = ggml_init(ip);
    if (!r->ctx_) {
        *error = "out of memory for the route tables";
        return nullptr;
    }
    for (int l = 0; l < n_layers; ++l) {
        r->probs_table_.push_back(ggml_new_tensor_2d(r->ctx_, GGML_TYPE_F32, n_expert, n_positions));
        r->experts_table_.push_back(ggml_new_tensor_2d(r->ctx_, GGML_TYPE_I32, top_k, n_positions));
    }
    r->buf_ = ggml_backend_alloc_ctx_tensors_from_buft(r->ctx_, ggml_backend_cpu_buffer_type());
    if (!r->buf_) {
        *error = "out of memory for the route tables";
        return nullptr;
    }
    return r;
}

forced_routes::~forced_routes() {
    if (buf_) ggml_backend_buffer_free(buf_);
    if (ctx_) ggml_free(ctx_);
}

bool forced_routes::upload(int32_t first_pos, int64_t n_tokens, std::string * error) {
    if (first_pos < 0 || int64_t(first_pos) + n_tokens > n_positions_) {
        *error = "the route trace covers positions 0 to " + std::to_string(n_positions_ - 1) + "; this batch runs " +
                 std::to_string(first_pos) + " to " + std::to_string(int64_t(first_pos) + n_tokens - 1);
        return false;
    }
    ubatch_tokens_ = n_tokens;
    std::vector<float> probs(size_t(n_tokens) * size_t(n_expert_));
    std::vector<int32_t> ids(size_t(n_tokens) * size_t(top_k_));
    for (int l = 0; l < n_layers_; ++l) {
        std::fill(probs.begin(), probs.end(), 0.0f);
        for (int64_t t = 0; t < n_tokens; ++t) {
            const size_t row = (size_t(first_pos + t) * size_t(n_layers_) + size_t(l)) * size_t(top_k_);
            for (int r = 0; r < top_k_; ++r) {
                const int32_t e = experts_[row + size_t(r)];
                ids[size_t(t) * size_t(top_k_) + size_t(r)] = e;
                probs[size_t(t) * size_t(n_expert_) + size_t(e)] = weights_[row + size_t(r)];
            }
        }
        ggml_backend_tensor_set(probs_table_[size_t(l)], probs.data(), 0, probs.size() * sizeof(float));
        ggml_backend_tensor_set(experts_table_[size_t(l)], ids.data(), 0, ids.size() * sizeof(int32_t));
    }
    return true;
}

int64_t forced_routes::first_column(int64_t n_tokens) const {
    // llama.cpp runs the last layer of a prompt batch on its output rows only (the last token's);
    // they are the ubatch's last positions
    const int64_t first = ubatch_tokens_ > n_tokens ? ubatch_tokens_ - n_tokens : 0;
    return std::min<int64_t>(first, n_positions_ - n_tokens);
}

ggml_tensor * forced_routes::probs(ggml_context * ctx, int index, int64_t n_tokens) const {
    ggml_tensor * table = probs_table_[size_t(index)];
    return n_tokens > n_positions_ ? nullptr : ggml_view_2d(ctx, table, n_expert_, n_tokens, table->nb[1],
                                                            size_t(first_column(n_tokens)) * table->nb[1]);
}

ggml_tensor * forced_routes::experts(ggml_context * ctx, int index, int64_t n_tokens) const {
    ggml_tensor * table = experts_table_[size_t(index)];
    return n_tokens > n_positions_ ? nullptr : ggml_view_2d(ctx, table, top_k_, n_tokens, table->nb[1],
                                                            size_t(first_column(n_tokens)) * table->nb[1]);
}

} // namespace slicemoe
