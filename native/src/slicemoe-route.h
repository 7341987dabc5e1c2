// Trace-driven routing: every MoE layer takes a recorded route (experts and router probabilities
// per position) instead of its router's choice, so that a model of a published shape computes and
// reads exactly what another model's routing asked for.
//
// The route of every position is held on the host; before each ubatch the rows of its positions
// are copied into two small input tables per MoE layer, whose first n_tokens columns the MoE graph
// uses in place of the router's top-k and probabilities. The tables keep their place across
// ubatches, so a graph llama.cpp reuses reads the new rows.
#pragma once

#include "ggml.h"
#include "ggml-backend.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace slicemoe {

class forced_routes {
public:
    // experts and weights: [n_positions][n_layers][top_k], position-major. nullptr with *error
    // when an expert is out of range, a weight is not a finite number >= 0, or memory runs out.
    static std::unique_ptr<forced_routes> create(int n_layers, int n_expert, int top_k, int32_t n_positions,
                                                 const int32_t * experts, const float * weights, std::string * error);
    ~forced_routes();
    forced_routes(const forced_routes &) = delete;
    forced_routes & operator=(const forced_routes &) = delete;

    // Before a ubatch of positions [first_pos, first_pos + n_tokens): false with *error when the
    // route does not cover them.
    bool upload(int32_t first_pos, int64_t n_tokens, std::string * error);

    // The graph's inputs for MoE layer `index` of a ubatch of n_tokens: probabilities
    // [n_expert, n_tokens] (the route's weights at its experts, 0 elsewhere) and experts
    // [top_k, n_tokens]. A graph of fewer tokens than the ubatch (llama.cpp's last layer of a prompt
    // runs on its output rows only) gets the ubatch's last positions. nullptr when n_tokens exceeds
    // the route (a worst-case graph reserved at context creation; a real ubatch that long is
    // refused by upload).
    ggml_tensor * probs(ggml_context * ctx, int index, int64_t n_tokens) const;
    ggml_tensor * experts(ggml_context * ctx, int index, int64_t n_tokens) const;

    int32_t n_positions() const { return n_positions_; }

private:
    forced_routes() = default;

    int n_layers_ = 0, n_expert_ = 0, top_k_ = 0;
    int32_t n_positions_ = 0;
    int64_t ubatch_tokens_ = 0;      // of the ubatch uploaded last
    int64_t first_column(int64_t n_tokens) const;
    std::vector<int32_t> experts_;   // [n_positions][n_layers][top_k]
    std::vector<float>   weights_;
    ggml_context * ctx_ = nullptr;
    ggml_backend_buffer_t buf_ = nullptr;
    std::vector<ggml_tensor *> probs_table_;    // per MoE layer: F32 [n_expert, n_positions]
    std::vector<ggml_tensor *> experts_table_;  // per MoE layer: I32 [top_k, n_positions]
};

} // namespace slicemoe
