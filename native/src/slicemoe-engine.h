// The engine's state, shared by its units (one concern each):
//   slicemoe-budget.cpp    budget planning: slot counts per layer (pure)
//   slicemoe-pools.cpp     the pools and the load queue: victims, queued reads, evictions
//   slicemoe-prefetch.cpp  look-ahead reads of the next layer's predicted experts
//   slicemoe-serve.cpp     serving a step (the one place that drives the policy), warm-up
//   slicemoe-build.cpp     construction at model load (attach)
//   slicemoe-callback.cpp  llama.cpp's eval callback and the ubatch lifecycle
//   slicemoe-counters.cpp  counters and the routing trace, for the C API
//   slicemoe-replay.cpp    trace replay; slicemoe-graph.cpp the MoE graph hooks;
//   slicemoe-policy.cpp    the policies (slicemoe-policy.h, which needs nothing of this header)
// Internal: nothing outside native/src includes it.
#pragma once

#include "slicemoe-slices.h"
#include "slicemoe-io.h"
#include "slicemoe-policy.h"
#include "slicemoe-product.h"
#include "slicemoe-route.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <atomic>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
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
};


struct route {
    int32_t request, layer, phase;   // phase: 0 prefill, 1 decode
    std::vector<int32_t> experts;
    std::vector<float>   weights;
    std::vector<float>   logits;     // all router logits (cache_prior runs), else empty
};


// A slice read queued by a step (a decode token of a layer, a warm-up): its slot is already
// assigned, its bytes arrive in flush_loads.
struct layer;
struct pending_load {
    layer *              L = nullptr;
    pool *               p = nullptr;
    int                  expert = -1, slot = -1;
    std::vector<uint8_t> staging[N_PROJ];   // for a pool in device memory: uploaded after the read
    bool                 cached = false;    // read through the page cache (slice_read::cached): PCW's warm-up
    bool                 background = false;// lsb_background: read for the layer's next step, not waited for
    int32_t              first_read[N_PROJ] = {};   // in the step's batch: projection j's slice is the reads
    int32_t              n_reads[N_PROJ] = {};      // [first_read[j], first_read[j] + n_reads[j]) (chunks)
};

// A slice is read in chunks of at most this many bytes, in the order the products use them: with
// reads overlapped, a product computes an expert's first rows once their chunk has landed, and a
// few chunks in flight at a time land in order. (fio on this machine's disk, random O_DIRECT reads:
// 512 KiB at queue depth 1 gave 1.16 GB/s, at 2 1.10, at 8 1.05; 1 MiB at 8 1.00, 256 KiB at 1
// 0.65.) A multiple of 4 KiB, so that chunks of an aligned slice stay aligned for O_DIRECT.
constexpr int64_t READ_CHUNK = 512 * 1024;
// A step's chunks in flight at once when the products wait for them read by read (overlapped reads).
constexpr size_t OVERLAPPED_IN_FLIGHT = 2;

struct layer {
    int                  index = 0;           // among the MoE layers
    int                  il = 0;              // llama.cpp's layer
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
    // lsb_background: LSB slices a step left to be read while the token goes on, for the layer's
    // next step (joined with the prefetches, before anything else touches the layer)
    std::shared_ptr<read_batch> lsb_reads;
    std::vector<pending_load> lsb_loads;
    std::vector<char>    lsb_loading;         // per expert: its LSB slot is being filled (not usable yet)
    // CPU pools: the current step's misses, read while the fused products compute what is resident
    std::unique_ptr<product_ready[]> ready;   // [N_PROJ]: what each projection's product waits for
    std::shared_ptr<read_batch> step_reads;   // in flight until join_step_reads (nullptr: none)
    std::vector<pending_load> step_loads;     // what they read, to undo a failed one
    std::vector<float>   last_logits;         // a router-biasing policy + trace: this token's router logits
    std::vector<float>   probs;               // router probabilities of the current decode token
    std::vector<double>  prompt_score;        // recency-weighted prompt routing, for PCW
    std::vector<int32_t> last_prompt_experts; // the experts of the last prompt token recorded: a 4-bit
                                              // prompt read their LSB slices (its last row at 8 bits)
    bool                 warm_pending = false;
    // the layer's last prompt graph reads the pools where they hold a slice and the file elsewhere:
    // its prompt steps write msb_map and lsb_map as expert -> slot, or n_slots + expert
    bool                 prompt_from_pools = false;
    int64_t              event = 0;           // decode accesses of this layer so far
    slicemoe_layer_stats_t stats = {};
};


// persistent reader threads per model: enough for a step's misses (top-k experts x 3 projections)
// to be in flight together on flash that wants queue depth
constexpr int READER_THREADS = 8;

// The nodes of a MoE layer the engine observes, as build_moe_ffn built them.
enum router_node_kind : int {
    NODE_LOGITS,   // the router's logits [n_expert, n_tokens] (cache-aware routing's bias)
    NODE_PROBS,    // its probabilities [n_expert, n_tokens] (the weights of the uses)
    NODE_TOPK,     // the selected experts [top_k, n_tokens]: the step is served here
    NODE_AHEAD,    // the next layer's router on this layer's input (look-ahead prefetch)
    N_ROUTER_NODES,
};

struct router_node {
    int              layer;   // the engine's layer index
    router_node_kind kind;
};

// The eval callback of one context: the engine's, then the one the context brought (user, nullptr:
// none), and the router nodes of the context's last graph, matched by address (never by name).
struct eval_chain {
    cache *                          engine = nullptr;
    ggml_backend_sched_eval_callback user = nullptr;
    void *                           user_data = nullptr;
    const ggml_tensor *              user_asked = nullptr;   // the last node the caller asked to see
                                                             // (ubatches of an engine run one at a time)
    std::unordered_map<const ggml_tensor *, router_node> nodes;   // of the graph built last
    std::vector<int> n_fused;   // per layer: its fused products in the graph built last (3: all)
    // SLICEMOE_GRAPH_STEP=1: per layer, whether the graph built last serves its decode step in an op
    // of the graph (graph_step) instead of stopping at its top-k node; and the op's arguments
    std::vector<char> step_in_graph;
    std::vector<std::pair<eval_chain *, int>> step_args;
};

struct cache {
    const llama_model *  model = nullptr;
    std::unique_ptr<policy> pol;              // the cache policy: its hooks, settings and state
    std::unique_ptr<slice_reader> io;         // misses are read here (nullptr: no cache, or replay)
    std::vector<pending_load> pending;
    std::vector<std::pair<pool *, int>> claims;   // slots claimed by the current step's loads
    int                  n_expert = 0;
    int                  top_k = 0;
    int                  precision = SLICEMOE_PRECISION_AUTO;   // what runs (the policy's)
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
    bool                 prefetch = false;
    bool                 lsb_background = false;   // slicemoe_cache_params.lsb_background
    bool                 low_precision_prompt = false;   // slicemoe_model_params.low_precision_prompt
    // SLICEMOE_OVERLAP=1: a step's misses are read while the fused products compute the resident uses
    // (CPU pools, every product of the layer fused). Off by default: on the 2-core machine it was
    // measured on (scripts/bench_overlap.py, full-size OLMoE at 50%), decode ran at 0.91-1.20x the
    // time of reading first (docs/design.md): a layer's resident products hide little of its reads.
    bool                 overlap = false;
    // SLICEMOE_GRAPH_STEP=1: a decode step on CPU pools runs as an op of the graph (graph_step), so a
    // token is one graph run, without a stop per MoE layer for the eval callback
    bool                 graph_step = false;
    int                  step_fused = 0;      // the fused products of the layer being served (its graph's)
    int64_t              budget = 0;
    std::vector<ggml_context *>          ctxs;   // one per buffer type the pools live in
    std::vector<ggml_backend_buffer_t>   bufs;
    std::vector<std::pair<void *, size_t>> host_memory;   // under the host pools' buffers (alloc_page_aligned)
    std::vector<layer>   layers;
    std::unordered_map<int, int> layer_of_il;
    uint64_t             clock = 0;
    bool                 failed = false;
    std::string          error;
    int64_t              reads_left = -1;     // failure injection for tests; -1 = off
    int64_t              read_chunk = READ_CHUNK;   // SLICEMOE_READ_CHUNK_KIB: smaller, for tests whose
                                                    // slices are smaller than one chunk
    bool                 mapped = false;      // the model's expert tensors are mapped from the file
    bool                 prompt_seen = false; // a prompt batch ran since the last release
    std::thread          releaser;            // release_mapped after a prompt, off the decode's path
    std::atomic<bool>    releaser_stop{false};// the engine is going: what is left of a release is moot
    slicemoe_cache_stats_t totals = {};
    std::vector<int32_t> scratch_ids;
    std::unique_ptr<forced_routes> forced;    // trace-driven routing (slicemoe_route_force)
    std::list<eval_chain> chains;             // one per context of the model (new_chain, free_chain)

    ~cache() {
        releaser_stop = true;
        if (releaser.joinable()) releaser.join();   // before the model unmaps what it hands back
        io.reset();   // finishes any prefetch still queued: no read in flight from here on
        for (ggml_backend_buffer_t b : bufs) ggml_backend_buffer_free(b);
        for (const auto & [memory, size] : host_memory) std::free(memory);
        for (ggml_context * ctx : ctxs) ggml_free(ctx);
    }
};

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
// The cache's policy, for an engine of n_layers MoE layers (sets c.pol and c.precision).
void set_policy(cache & c, const policy_params & params, int n_layers);
// PCW's warm-up of every layer whose prompt tokens were recorded since its last warm-up (the end of a
// prompt ubatch: a layer is warmed when the next one's routing is seen, the last one here). false
// (c.failed, c.error) when a read failed.
bool warm_recorded_layers(cache & c);
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
// Replay of a router-biasing policy: the experts the biased router picks in the replayed cache state.
void replay_selection(cache & c, layer & L, const float * logits, int32_t * ids, float * weights);
// A router-biasing policy's bias for the logits of a decode token, written to L.sel_bias.
void set_selection_bias(cache & c, layer & L, const ggml_tensor * logits);

// ---- budget planning (slicemoe-budget.cpp) ----
std::string format_bytes(int64_t n);   // "1.50 GiB", "12.0 KiB", "17 B"

// ---- the pools and the load queue (slicemoe-pools.cpp) ----
// The file range of one expert's slice of projection j, read into dst.
slice_read slice_range(const pool & p, int j, int expert, uint8_t * dst);
// Assign `expert`'s slice to `slot` now and queue its read for flush_loads. The slot is claimed
// until then, so that no later victim() of the same step gives it to another slice.
void queue_load(cache & c, layer & L, pool & p, int expert, int slot);
// A step that fails before its reads: the slots it assigned hold nothing, so they are emptied.
void abandon_loads(cache & c);
// Read every queued slice at once. false (c.failed, c.error) when a read failed: the slots of
// the slices that failed are left empty, never half-filled. deferred: a layer whose fused products
// wait for each slot's read (issued now, joined by join_step_reads); ids: its token's uses (one
// token; nullptr for a batch), computed resident first.
bool flush_loads(cache & c, layer * deferred = nullptr, const int32_t * ids = nullptr, int k = 0);
// The deferred reads of layer L's step, after the products that waited for them (the end of the
// ubatch): as flush_loads's result.
bool join_step_reads(cache & c, layer & L);
// lsb_background: until the LSB slices the layer's last step left to be read have landed. A failed
// read leaves its slot empty (the use misses again next time); nothing computed used it.
void join_lsb_reads(cache & c, layer & L);
// Empty slot s of pool p (with an MSB slice, its LSB slice goes too).
void evict(cache & c, layer & L, pool & p, int slot);
// The slot to replace for the current step (-1 if none): an empty one first, never one the step
// already uses or a load of this step claimed, else the policy's lowest eviction key.
int  victim(const cache & c, const layer & L, const pool & p);
// Give slot s of pool p (or of the pool sharing its slots) to a new slice.
void free_slot(cache & c, layer & L, pool & p, int slot);
// Make `expert`'s slice resident in pool p; false if no slot is free for it.
bool ensure(cache & c, layer & L, pool & p, int expert, bool * hit);
// A resident slice of `expert` is not a victim within the current step.
void protect_for_step(cache & c, pool & p, int expert);
// Whether slot e of L's host pools holds expert e's slices, every expert's (MSB, and LSB unless
// the precision is low): a budget that holds every slice, filled at load, and no miss since. A
// prompt then reads the pools instead of streaming the experts through the file's mapping.
bool holds_every_slice(const cache & c, const layer & L);

// low_precision_prompt on a model whose decode runs 8-bit uses: a prompt batch (more than one token)
// computes its rows from the MSB slices alone, except its last row (the one the next token is
// sampled from) where the fused product runs: that row's uses read both slices.
inline bool prompt_at_low_precision(const cache & c) {
    return c.low_precision_prompt && c.precision != SLICEMOE_PRECISION_LOW;
}

// ---- the decode step as an op of the graph (slicemoe-callback.cpp) ----
// Serve the selection node t ([top_k, n_tokens] expert ids) of engine layer `index`, as the eval
// callback does when it is shown that node; false when the ubatch has failed.
bool serve_selection(cache & c, const eval_chain & chain, int index, const ggml_tensor * t);
// The op's compute function (ggml_custom_4d, one task): src[0] the selection, src[1] the router
// probabilities; dst [1, n_expert, 2] I32 the MSB and LSB slot of each expert (-1: none).
void graph_step(ggml_tensor * dst, int ith, int nth, void * userdata);
// ---- the model file's mapping (slicemoe-mapping.cpp) ----
// Copy the dense weights' pages out of the file mapping into anonymous memory, so that page cache
// pressure never evicts them; false (and *error) if the copy failed.
bool keep_dense_resident(cache & c, std::string * error);
// Hand the mapped expert tensors' pages back after loading and after each prompt.
void release_mapped(cache & c);
// The same on c.releaser at the lowest priority, so that decode does not wait for it: at full size
// the prompt leaves GBs of the file's pages mapped and cached, and dropping them took 0.5-0.6 s of
// the first decode token (OLMoE-1B-7B). The decode reads the pools and the file, never the mapping.
void release_mapped_in_background(cache & c);
// low_precision_prompt: the mapped LSB tensors read no more than the page a fault is on (a 4-bit
// prompt reads them at its last token's experts alone)
void advise_sparse_lsb(cache & c);
// low_precision_prompt: start reading the LSB slices of the last prompt token's experts that the
// pool lacks into the page cache, before the layer's products read them from the mapping
void ask_for_last_row(const cache & c, const layer & L);

// ---- look-ahead prefetch (slicemoe-prefetch.cpp) ----
// Load the predicted experts' MSB slices into L's pool on the reader threads.
void start_prefetch(cache & c, layer & L, const std::vector<int> & predicted);
// Wait for every read into L that no step waited for: its look-ahead reads and its background LSB
// reads (join_lsb_reads); a slot whose read failed is emptied.
void join_prefetch(cache & c, layer & L);

} // namespace slicemoe
