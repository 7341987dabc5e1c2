// The graph hook for sliced models. Without a slice cache every expert stays where llama.cpp put
// it (mapped from the file) and the hook only decides the precision: high adds the LSB product to
// the MSB product (the 8-bit model, exactly MSB + LSB as AMAT defines it), low leaves the MSB
// product alone (the 4-bit model).

#include "slicemoe-slices.h"
#include "slicemoe-graph.h"
#include "slicemoe.h"

#include "llama-model.h"

#include <mutex>
#include <unordered_map>

namespace {

struct sliced_layer {
    const llama_model * model;
    ggml_tensor * up_lsb;
    ggml_tensor * gate_lsb;
    ggml_tensor * down_lsb;
    int precision;
};

std::mutex g_mutex;
// keyed by the layer's MSB up tensor, the pointer build_moe_ffn hands to the hook
std::unordered_map<const ggml_tensor *, sliced_layer> g_layers;

} // namespace

int slicemoe_slices_attach(const llama_model * model, int precision) {
    std::lock_guard<std::mutex> lock(g_mutex);
    int n = 0;
    for (const llama_layer & layer : model->layers) {
        if (layer.ffn_up_exps && layer.ffn_up_exps_lsb && layer.ffn_gate_exps_lsb && layer.ffn_down_exps_lsb) {
            g_layers[layer.ffn_up_exps] = { model, layer.ffn_up_exps_lsb, layer.ffn_gate_exps_lsb, layer.ffn_down_exps_lsb, precision };
            ++n;
        }
    }
    return n;
}

void slicemoe_slices_detach(const llama_model * model) {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (auto it = g_layers.begin(); it != g_layers.end();) {
        it = it->second.model == model ? g_layers.erase(it) : std::next(it);
    }
}

int slicemoe_slices_n_layers(const llama_model * model) {
    std::lock_guard<std::mutex> lock(g_mutex);
    int n = 0;
    for (const auto & kv : g_layers) {
        n += kv.second.model == model;
    }
    return n;
}

void slicemoe_moe_graph(ggml_context * /*ctx*/, ggml_cgraph * /*gf*/, int /*il*/, int64_t /*n_tokens*/, slicemoe_moe_weights * w) {
    std::lock_guard<std::mutex> lock(g_mutex);
    const auto it = g_layers.find(w->up);
    if (it == g_layers.end() || it->second.precision == SLICEMOE_PRECISION_LOW) {
        return;
    }
    w->up_lsb   = it->second.up_lsb;
    w->gate_lsb = it->second.gate_lsb;
    w->down_lsb = it->second.down_lsb;
    w->ids_lsb  = w->ids;
}
