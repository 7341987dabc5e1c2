// The one hook llama.cpp's MoE graph calls (native/patches/0002): it lets the engine choose which
// weights and expert ids the expert products use.
#pragma once

#include "ggml.h"

#include <cstdint>

struct slicemoe_moe_weights {
    ggml_tensor * up;        // MSB slice (or plain expert weights); replaced by a pool when cached
    ggml_tensor * gate;
    ggml_tensor * down;
    ggml_tensor * up_lsb;    // LSB slices; nullptr = no LSB product (4-bit, or a plain model)
    ggml_tensor * gate_lsb;
    ggml_tensor * down_lsb;
    ggml_tensor * ids;       // expert (or slot) ids of the MSB products, [n_expert_used, n_tokens]
    ggml_tensor * ids_lsb;   // ids of the LSB products
    ggml_tensor * lsb_mask;  // optional [1, n_expert_used, n_tokens] F32 of 1 (use the LSB) or 0
    ggml_tensor * weight_mask;  // optional, same shape: 0 drops the use from the mixture (AdapMoE)
    ggml_tensor * input;     // the layer's FFN input [n_embd, 1, n_tokens] (for look-ahead prefetch)
};

// Called by build_moe_ffn with the model's own tensors in *w; leaves *w unchanged for layers the
// engine does not know (stock models).
void slicemoe_moe_graph(ggml_context * ctx, ggml_cgraph * gf, int il, int64_t n_tokens, slicemoe_moe_weights * w);

// Cache-aware routing: a bias [n_expert] added to the router logits for selecting the top-k (the
// mixing weights keep the unbiased probabilities), or nullptr to select as the model does.
ggml_tensor * slicemoe_moe_selection_bias(ggml_context * ctx, int il, int64_t n_tokens, const ggml_tensor * up_exps);
