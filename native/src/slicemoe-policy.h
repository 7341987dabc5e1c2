// A cache policy as an object, in the spirit of llama.cpp's llama_sampler { iface, ctx }: a table of
// hooks (policy_i) and the policy's own settings and state (policy). The engine (serving a step,
// the eviction order, the slot plan, trace replay) calls the hooks and never asks which policy runs;
// a policy sees the engine only through the small views below, so this header needs nothing of the
// engine's. Adding a policy: its table and hooks in slicemoe-policy.cpp, its id in slicemoe.h.
#pragma once

#include "slicemoe.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace slicemoe {

// The policy settings that slicemoe_model_params and slicemoe_sim_params both carry (validated by
// cache_params_valid before they get here).
struct policy_params {
    int32_t            policy = SLICEMOE_POLICY_DBSC;
    int32_t            precision = SLICEMOE_PRECISION_AUTO;   // as given; policy::precision is what runs
    float              high_threshold = 0.25f;
    float              max_miss_rate = 0.0f;
    float              high_ratio = 0.5f;
    float              prior_lambda = 0.0f;
    float              gating_t = 0.0f;
    std::vector<float> layer_sensitivity;   // per MoE layer, or empty
    std::vector<int>   layer_high_uses;     // per MoE layer, or empty

    static policy_params of(const slicemoe_cache_params & p) {
        policy_params out;
        out.policy = p.policy;
        out.precision = p.precision;
        out.high_threshold = p.high_threshold;
        out.max_miss_rate = p.max_miss_rate;
        out.high_ratio = p.high_ratio > 0.0f ? p.high_ratio : 0.5f;
        out.prior_lambda = p.prior_lambda;
        out.gating_t = p.gating_t;
        out.layer_sensitivity.assign(p.layer_sensitivity, p.layer_sensitivity + p.n_layer_sensitivity);
        out.layer_high_uses.assign(p.layer_high_uses, p.layer_high_uses + p.n_layer_high_uses);
        return out;
    }
};

// The engine's shape, fixed when the policy is made.
struct policy_shape {
    int n_layers = 0;   // MoE layers
    int n_expert = 0;
    int top_k = 0;
};

// One use of an expert in a decode step of a layer, as a policy sees it.
struct use_view {
    int      layer = 0;        // MoE layer index, 0 .. n_layers - 1
    int64_t  event = 0;        // the layer's decode steps before this one
    int      rank = 0;         // 0: the router's best
    float    weight = 0.0f;    // routing probability (0 where not observed)
    int      expert = 0;
    bool     msb_hit = false;  // its MSB slice was resident before this step
    bool     lsb_cached = false;   // its LSB slice is resident now
};

// A resident slice, as the eviction order sees it.
struct slice_view {
    int      layer = 0;
    int64_t  event = 0;        // the layer's decode steps so far
    int      kind = 0;         // 0: MSB slice, 1: LSB slice
    int      expert = 0;
    uint64_t last_use = 0;     // the engine's step clock at its last use
    int64_t  uses = 0;         // uses since it was loaded
};

// A routing trace about to be replayed (records in order; experts [n, top_k]).
struct trace_view {
    int64_t         n = 0;
    const int32_t * layers = nullptr;
    const int32_t * phases = nullptr;   // 0 prompt, 1 decode
    const int32_t * experts = nullptr;
    const int64_t * first_event = nullptr;   // per MoE layer: its decode steps before the trace
};

struct policy;

struct policy_i {
    const char * name;           // as --policy and slicemoe.policy spell it
    int          precision;      // SLICEMOE_PRECISION_HIGH / LOW: fixed; AUTO: follows --precision
    bool         shares_slots;   // an MSB or an LSB slice per slot (the adaptive split), where the
                                 // two have one shape and the budget holds less than everything
    bool         runs_live;      // false: it needs the future, so it runs only in trace replay
    const char * demand;         // the uses it serves at 8 bits, as the offline optimum bounds them:
                                 // "auto" (the threshold rule), "high", "low", "dymoe", "adapmoe";
                                 // nullptr: none (its precision follows the cache, or it reroutes)

    // Every hook may be nullptr: no state, never dropped, never 8-bit by choice, nothing to do.
    // The policy's state for an engine of this shape (nullptr: stateless); freed by free.
    void * (*init)(const policy & self, const policy_shape & shape);
    void   (*free)(void * ctx);
    // A use after the first: left out (neither loaded nor run)?
    bool   (*drop_use)(const policy & self, const use_view & use);
    // Auto precision: does this use run at 8 bits?
    bool   (*high_use)(const policy & self, const use_view & use);
    // Eviction order: the slice with the lowest key goes (ties: least recently used). Required.
    double (*evict_key)(const policy & self, const slice_view & slice);
    // A use was served from a slice of `kind` (hit: it was resident).
    void   (*count_use)(policy & self, const use_view & use, int kind, bool hit);
    // A decode token starts (at its first MoE layer); decode_tokens: the engine's count, this one included.
    void   (*begin_token)(policy & self, int64_t decode_tokens);
    // Decode: a bias per expert added to the router logits before top-k (cache-aware routing);
    // msb_cached[e]: expert e's MSB slice is resident. Non-null: the engine observes the logits.
    void   (*router_bias)(policy & self, int layer, const float * logits, const char * msb_cached, float * bias);
    // Replay: the trace, before it runs (the future, for Belady).
    void   (*see_trace)(policy & self, const trace_view & trace);
    // The threshold it runs at now, for the counters (nullptr: the given high_threshold).
    float  (*threshold)(const policy & self);
};

struct policy {
    const policy_i * iface = nullptr;
    policy_params    params;
    int              precision = SLICEMOE_PRECISION_AUTO;   // what runs: the policy's own, else params'
    policy_shape     shape;
    void *           ctx = nullptr;

    policy() = default;
    policy(const policy &) = delete;
    policy & operator=(const policy &) = delete;
    ~policy() {
        if (ctx && iface->free) iface->free(ctx);
    }
};

// The policy with this id (nullptr for an unknown one), and the number of ids.
const policy_i * policy_table(int32_t id);
int32_t          n_policies();
// A policy of the given settings for an engine of this shape (params.policy must be known).
std::unique_ptr<policy> make_policy(const policy_params & params, const policy_shape & shape);
// Whole-expert policies run at 8 bits, lru4 at 4; the others follow `precision` (auto: per use).
int effective_precision(int32_t policy_id, int precision);
// false with *error when a per-layer setting does not have one value per MoE layer.
bool layer_settings_fit(const policy_params & params, int n_layers, std::string * error);

} // namespace slicemoe
