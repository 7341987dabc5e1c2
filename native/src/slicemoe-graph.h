// The hooks llama.cpp calls (native/patches/0002 and 0004): model load attaches the engine of a
// sliced model, context creation installs its eval callback, every ubatch runs under the engine's
// lock, and the MoE graph asks which weights and expert ids the expert products use.
//
// The engine is owned by the model (llama_model::slicemoe_engine) and reached by the graph hooks
// through their own arguments: the context's eval callback and its user data, which is the engine.
#pragma once

#include "ggml.h"
#include "ggml-backend.h"
#include "llama.h"

#include <cstdint>
#include <mutex>

namespace slicemoe { struct cache; }

struct slicemoe_moe_weights {
    ggml_tensor * up;        // MSB slice (or plain expert weights); replaced by a pool when cached
    ggml_tensor * gate;
    ggml_tensor * down;
    ggml_tensor * up_lsb;    // LSB slices; nullptr = no LSB product (4-bit, or a plain model)
    ggml_tensor * gate_lsb;
    ggml_tensor * down_lsb;
    ggml_tensor * ids;       // expert (or slot) ids of the MSB products, [n_expert_used, n_tokens];
                             // on CPU pools -1 runs no product (a use dropped by gating)
    ggml_tensor * ids_lsb;   // ids of the LSB products; on CPU pools -1 for a use that runs at 4 bits
    ggml_tensor * lsb_mask;  // optional [1, n_expert_used, n_tokens] F32 of 1 (use the LSB) or 0
    ggml_tensor * weight_mask;  // optional, same shape: 0 drops the use from the mixture (AdapMoE)
    ggml_tensor * input;     // the layer's FFN input [n_embd, 1, n_tokens] (for look-ahead prefetch)
    bool          sliced = false;  // set by slicemoe_moe_graph: the weights are a sliced file's (the
                                   // fused product takes them; a stock file keeps ggml's products)
    bool          decode = false;  // set by slicemoe_moe_graph: the products run on the pools for
                                   // decode tokens (one, or one per sequence of a batch)
    // set by slicemoe_moe_graph for the pools: what the fused product of up, gate and down waits for
    // (slicemoe::product_ready), and a count of the layer's products that are fused (the engine
    // overlaps a step's reads with the products only when all three are)
    void *        ready[3] = { nullptr, nullptr, nullptr };
    int *         n_fused = nullptr;
    // set by slicemoe_moe_graph for a prompt on CPU pools that do not hold every slice: the file's
    // mapped MSB (up, gate, down) and LSB tensors, from which the fused product reads a slice whose
    // id is at or past its pool's slots (ids: expert -> slot, or n_slots + expert)
    ggml_tensor * file[6] = { nullptr, nullptr, nullptr, nullptr, nullptr, nullptr };
};

// After a successful load from a path (every entry point: llama_model_load_from_file too). A
// sliced file gets its engine, configured by the parameters slicemoe_model_load passes, else by
// the slicemoe.* key-value overrides of params, else by SLICEMOE_* environment variables. Returns
// false, with the reason logged as a llama.cpp error, when the configuration is bad or the cache
// cannot be built; the caller then frees the model.
bool slicemoe_model_loaded(llama_model * model, const char * path, const llama_model_params & params);

// At context creation: a context of a model with an engine gets the engine's eval callback. A
// context that brings its own callback cannot run the engine: that throws (llama.cpp turns it
// into a failed llama_init_from_model with the message logged).
void slicemoe_context_init(const llama_model & model, ggml_backend_sched_eval_callback & cb_eval, void *& cb_eval_user_data);
// At context destruction: the context's callback chain goes with it.
void slicemoe_context_free(const llama_model & model, ggml_backend_sched_eval_callback cb_eval, void * cb_eval_user_data);

// One ubatch on a context: holds the engine's lock from graph build to the end of its compute, so
// that two contexts of one model never run each other's slots. A ubatch of several sequences is
// refused under a cache (the cache serves one sequence per batch), as is any ubatch while the
// engine is broken. A ubatch at position 0 starts a new request (warm-up, trace numbering).
class slicemoe_ubatch_scope {
public:
    slicemoe_ubatch_scope(ggml_backend_sched_eval_callback cb_eval, void * cb_eval_user_data, uint32_t n_tokens,
                          uint32_t n_seqs, int32_t first_pos);
    bool admitted() const { return admitted_; }
    // After the graph ran: false when the engine failed during it (the message is logged and kept
    // for slicemoe_eval); the engine is usable again by the next ubatch.
    bool finished();
    // A ubatch that ends without finished() (its graph failed) still joins the reads it issued
    // before the next one may run.
    ~slicemoe_ubatch_scope();

private:
    slicemoe::cache * engine_ = nullptr;
    std::unique_lock<std::mutex> lock_;
    bool admitted_ = true;
    bool finished_ = false;
};

// Called by build_moe_ffn once it selected the experts of layer il: the router's logits (nullptr when
// the architecture brings its own probabilities), its probabilities [n_expert, n_tokens] and the
// selected experts [n_expert_used, n_tokens]. The engine's eval callback observes these nodes of the
// graph being built, matched by address.
void slicemoe_moe_router_nodes(ggml_backend_sched_eval_callback cb_eval, void * cb_eval_user_data, int il,
                               const ggml_tensor * logits, const ggml_tensor * probs, const ggml_tensor * selected);

// Called by build_moe_ffn with the model's own tensors in *w; leaves *w unchanged for contexts
// without an engine (stock models).
void slicemoe_moe_graph(ggml_context * ctx, ggml_cgraph * gf, ggml_backend_sched_eval_callback cb_eval,
                        void * cb_eval_user_data, int il, int64_t n_tokens, slicemoe_moe_weights * w);

// Trace-driven routing (slicemoe_route_force): the router probabilities [n_expert, n_tokens] that
// replace the layer's own, with *experts set to the experts [n_expert_used, n_tokens] that replace
// its top-k; nullptr (and *experts untouched) to route as the model does.
ggml_tensor * slicemoe_moe_forced_route(ggml_context * ctx, ggml_backend_sched_eval_callback cb_eval,
                                        void * cb_eval_user_data, int il, int64_t n_tokens, ggml_tensor ** experts);

// Cache-aware routing: a bias [n_expert] added to the router logits for selecting the top-k (the
// mixing weights keep the unbiased probabilities), or nullptr to select as the model does.
ggml_tensor * slicemoe_moe_selection_bias(ggml_backend_sched_eval_callback cb_eval, void * cb_eval_user_data, int il,
                                          int64_t n_tokens);

// The product of a sliced file's expert projection (w, with its LSB slices w_lsb or nullptr at 4
// bits) for patch 0002: one fused pass (slicemoe-product.h) for any ubatch whose weights are Q4_1
// in host memory and need no mask, else nullptr for ggml's mul_mat_id products (device pools,
// stock files). SLICEMOE_PRODUCT=ggml keeps ggml's products everywhere (to measure one against
// the other).
ggml_tensor * slicemoe_moe_product(ggml_context * ctx, ggml_tensor * w, ggml_tensor * w_lsb, ggml_tensor * x,
                                   const slicemoe_moe_weights * sw);
