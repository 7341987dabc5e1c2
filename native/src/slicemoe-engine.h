// The engine's state, shared by its units: slicemoe-slices.cpp (building it, the policy, the
// eval callback), slicemoe-replay.cpp (trace replay) and slicemoe-graph.cpp (the MoE graph hooks).
// Internal: nothing outside native/src includes it.
#pragma once

#include "slicemoe-slices.h"
#include "slicemoe-io.h"
#include "slicemoe-route.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

struct llama_model;

namespace slicemoe {

constexpr int N_PROJ = 3;   // up, gate, down: the order of slicemoe_moe_weights

struct pool {
    ggml_tensor *          t[N_PROJ] = {};
    int64_t                file_offset[N_PROJ] = {};   // of the model tensor's data in the GGUF
    size_t                 expert_bytes[N_PROJ] = {};  // one expert's slice of one projection
    size_t                 slice_bytes = 0;            // one expert's slice, all projections
    int                    n_slots = 0;
    std::vector<int>       slot_expert;                // -1: empty
    std::vector<int>       expert_slot;                // -1: not cached
    std::vector<uint64_t>  last_use;
    std::vector<int64_t>   uses;                       // per slot, since loaded (LFU)
    std::vector<char>      claimed;                    // per slot: a load of the current step goes there
    std::vector<double>    heat;                       // per expert, cached or not: decayed uses (dbsc)
    std::vector<int64_t>   heat_at;                    // per expert: the layer's decode token of that count
};


struct route {
    int32_t request, layer, phase;   // phase: 0 prefill, 1 decode
    std::vector<int32_t> experts;
    std::vector<float>   weights;
    std::vector<float>   logits;     // all router logits (cache_prior runs), else empty
};


struct layer {
    int                  il = 0;
    pool                 msb, lsb;
    bool                 shared_slots = false;   // msb and lsb are one set of slots, each slot holding
                                                 // an MSB or an LSB slice (dbsc's adaptive split)
    const ggml_tensor *  mapped[2 * N_PROJ] = {};   // the model's own MSB and LSB tensors
    ggml_tensor *        msb_map = nullptr;   // I32 [1, n_expert, 1]: expert -> MSB slot
    ggml_tensor *        lsb_map = nullptr;   // I32 [1, n_expert, 1]: expert -> LSB slot
    ggml_tensor *        lsb_mask = nullptr;  // F32 [1, n_expert, 1]: 1 = run the LSB product
    ggml_tensor *        sel_bias = nullptr;  // F32 [n_expert]: cache_prior's bias on the router logits
    ggml_tensor *        keep = nullptr;      // F32 [1, n_expert, 1]: adapmoe, 0 = dropped from the mixture
    bool                 cpu_pools = false;   // pools in CPU memory: a use that does not run gets slot -1
                                              // (no product; patch 0005), else slot 0 and a 0 mask
    const ggml_tensor *  next_router = nullptr;  // prefetch: the next MoE layer's router weight
    std::shared_ptr<read_batch> ahead;        // look-ahead reads into this layer, on the reader threads
    std::vector<std::pair<int, int>> ahead_slots;   // their (expert, slot), in the order of the reads
    std::vector<char>    prefetched;          // per expert: MSB slice loaded ahead, not used yet
    std::vector<float>   last_logits;         // cache_prior + trace: this token's router logits
    double               logit_range_sum = 0.0;  // cache_prior: sum and count of (max - min) logit
    int64_t              logit_range_n = 0;
    std::vector<float>   probs;               // router probabilities of the current decode token
    std::vector<double>  prompt_score;        // recency-weighted prompt routing, for PCW
    bool                 warm_pending = false;
    int64_t              event = 0;           // decode accesses of this layer so far
    std::vector<std::vector<int64_t>> future; // Belady (replay): per expert, its decode access indices
    slicemoe_layer_stats_t stats = {};
};


// A slice read queued by a step (a decode token of a layer, a warm-up): its slot is already
// assigned, its bytes arrive in flush_loads.
struct pending_load {
    layer *              L = nullptr;
    pool *               p = nullptr;
    int                  expert = -1, slot = -1;
    std::vector<uint8_t> staging[N_PROJ];   // for a pool in device memory: uploaded after the read
};

// persistent reader threads per model: enough for a step's misses (top-k experts x 3 projections)
// to be in flight together on flash that wants queue depth
constexpr int READER_THREADS = 8;

struct cache;

// A cache policy, in the spirit of llama.cpp's llama_sampler_i: what a use wants and which slice
// goes. One table per policy (slicemoe-policy.cpp); the engine never switches on the policy.
struct policy_i {
    const char * name;
    int          precision;      // SLICEMOE_PRECISION_HIGH / LOW: fixed; AUTO: follows --precision
    bool         shares_slots;   // an MSB or an LSB slice per slot (the adaptive split), where the
                                 // two have one shape and the budget holds less than everything
    // a use after the first, of routing weight w: left out (neither loaded nor run)? nullptr: never
    bool   (*drop_use)(const cache & c, const layer & L, float weight);
    // auto precision: does use `rank` (best first, routing weight w) of `expert` run at 8 bits?
    // msb_hit: its MSB slice was resident before this token. nullptr: never
    bool   (*high_use)(const cache & c, const layer & L, int rank, float weight, int expert, bool msb_hit);
    // eviction order: the slice in slot s of pool p with the lowest key goes (ties: least recently used)
    double (*evict_key)(const cache & c, const layer & L, const pool & p, int slot);
};

const policy_i & policy_of(int policy);   // dbsc for an unknown id (parameters are validated first)

// dbsc's eviction key: expert's decayed use count in pool p (kept for cached and evicted experts)
double heat(const layer & L, const pool & p, int expert);
void   add_use(const layer & L, pool & p, int expert);

struct cache {
    const llama_model *  model = nullptr;
    const policy_i *     iface = &policy_of(SLICEMOE_POLICY_DBSC);
    std::unique_ptr<slice_reader> io;         // misses are read here (nullptr: no cache, or replay)
    std::vector<pending_load> pending;
    std::vector<std::pair<pool *, int>> claims;   // slots claimed by the current step's loads
    int                  n_expert = 0;
    int                  top_k = 0;
    int                  precision = SLICEMOE_PRECISION_AUTO;
    int                  policy = SLICEMOE_POLICY_DBSC;
    int                  warmup = SLICEMOE_WARMUP_NONE;
    bool                 simulated = false;   // trace replay: no pools, no reads, same decisions
    bool                 observe_only = false;// no pools at all: only records routing
    bool                 sliced = false;      // the model's experts are AMAT bit slices
    bool                 precision_only = false; // a sliced model without cache or trace: only chooses
                                              // the precision of the mapped experts
    bool                 sequence_fresh = false; // begin_sequence ran and no ubatch since
    bool                 decode_batch = false;   // the ubatch running is one decode token of each of
                                                 // several sequences (served from the pools together)
    std::mutex           compute_mutex;       // held by slicemoe_ubatch_scope: one ubatch at a time
    bool                 record = false;      // keep a routing trace
    int32_t              request = 0;
    std::vector<route>   trace;
    float                high_threshold = 0.25f;
    float                max_miss_rate = 0.0f;
    float                high_ratio = 0.5f;     // dymoe
    float                prior_lambda = 0.0f;   // cache_prior
    float                gating_t = 0.0f;       // adapmoe
    std::vector<float>   sensitivity;           // adapmoe, per MoE layer: calibrated S_l (empty: 1)
    std::vector<int>     high_uses;             // dymoe, per MoE layer: 8-bit ranks (empty: cosine schedule)
    bool                 prefetch = false;
    double               miss_rate_ema = 0.0;   // slice miss rate, smoothed over decode tokens
    int64_t              token_uses = 0, token_misses = 0;
    int64_t              budget = 0;
    std::vector<ggml_context *>          ctxs;   // one per buffer type the pools live in
    std::vector<ggml_backend_buffer_t>   bufs;
    std::vector<void *>                  host_memory;   // under the host pools' buffers (alloc_page_aligned)
    std::vector<layer>   layers;
    std::unordered_map<int, int> layer_of_il;
    uint64_t             clock = 0;
    bool                 failed = false;
    std::string          error;
    int64_t              reads_left = -1;     // failure injection for tests; -1 = off
    bool                 mapped = false;      // the model's expert tensors are mapped from the file
    bool                 prompt_seen = false; // a prompt batch ran since the last release
    slicemoe_cache_stats_t totals = {};
    std::vector<int32_t> scratch_ids;
    std::unique_ptr<forced_routes> forced;    // trace-driven routing (slicemoe_route_force)

    ~cache() {
        io.reset();   // finishes any prefetch still queued: no read in flight from here on
        for (ggml_backend_buffer_t b : bufs) ggml_backend_buffer_free(b);
        for (void * m : host_memory) std::free(m);
        for (ggml_context * ctx : ctxs) ggml_free(ctx);
    }
};

// The precision a policy runs: its own (whole experts at 8 bits, lru4 at 4), else `precision`.
int  effective_precision(int policy, int precision);
void init_pool(pool & p, int n_slots, int n_expert);
// One MoE layer's slice sizes: one expert's MSB and LSB slice, all projections.
struct slice_sizes {
    size_t msb = 0, lsb = 0;
};
// Slot counts of every MoE layer; shared: the layer's MSB and LSB pools are one set of slots.
struct slot_plan {
    std::vector<int>  msb, lsb;
    std::vector<char> shared;
};
// Slot counts per MoE layer from the budget (or explicit per-layer counts). slices_alike: every
// layer's MSB and LSB slices have one shape, so a slot can hold either (dbsc's adaptive split).
// false with *error when the budget is below the minimum or the counts do not fit.
bool slot_counts(const cache & c, const std::vector<slice_sizes> & sizes, bool slices_alike, float msb_share,
                 const int32_t * layer_slots, int32_t n_layer_slots, slot_plan * out, std::string * error);
// The policy settings that the model's and the simulation's parameters both carry.
template <class params_t> void set_policy(cache & c, const params_t & p) {
    c.policy = p.policy;
    c.iface = &policy_of(p.policy);
    c.precision = effective_precision(p.policy, p.precision);
    c.warmup = p.warmup;
    c.high_threshold = p.high_threshold;
    c.max_miss_rate = p.max_miss_rate;
    c.high_ratio = p.high_ratio > 0.0f ? p.high_ratio : 0.5f;
    c.prior_lambda = p.policy == SLICEMOE_POLICY_CACHE_PRIOR ? p.prior_lambda : 0.0f;
    c.gating_t = p.policy == SLICEMOE_POLICY_ADAPMOE ? p.gating_t : 0.0f;
    c.sensitivity.assign(p.layer_sensitivity, p.layer_sensitivity + p.n_layer_sensitivity);
    c.high_uses.assign(p.layer_high_uses, p.layer_high_uses + p.n_layer_high_uses);
}
// false with *error when a per-layer setting does not have one value per MoE layer.
bool layer_settings_fit(const cache & c, int n_layers, std::string * error);
// The routing events of one step of a layer, live or replayed: the single place that drives the
// policy. n_tokens tokens, their top-k ids `stride` apart and weights [n_tokens, top_k]; phase 0 is a
// prompt (each token recorded for warm-up), phase 1 a decode step: one token, or one token of each
// sequence of a batch, served together (the union of their slices resident at once).
bool access(cache & c, int index, int phase, int64_t n_tokens, const int32_t * ids, int64_t stride,
            const float * weights);
// One token's routing event.
inline bool access(cache & c, int index, int phase, const int32_t * ids, const float * weights) {
    return access(c, index, phase, 1, ids, c.top_k, weights);
}
// Replay of cache_prior: the experts the biased router picks in the replayed cache state.
void replay_selection(const cache & c, layer & L, const float * logits, int32_t * ids, float * weights);

} // namespace slicemoe
