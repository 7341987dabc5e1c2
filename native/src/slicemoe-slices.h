// The engine's side of sliced (AMAT) models: which MoE layers have bit slices, the slice cache
// that serves them during decode, and its counters.
#pragma once

#include "slicemoe.h"

#include <cstdint>

#include "ggml-backend.h"
#include <mutex>
#include <string>

struct llama_model;
struct ggml_tensor;

namespace slicemoe {

struct cache;

// Give the model its engine (llama_model::slicemoe_engine, freed with the model): for a sliced
// model, its MoE layers' MSB/LSB slice tensors and precision, and with params.cache.budget_bytes
// > 0 the slice cache (pools allocated once, misses read from `path`). Returns SLICEMOE_OK, or an
// error status with *error set and nothing attached. sliced: the file declares the slicemoe
// format; a stock model gets only a routing observer, when params.record_trace asks for one.
int  attach(llama_model * model, const char * path, const slicemoe_model_params & params, bool sliced,
            std::string * error);
// MoE layers with bit slices in this model (0 for a stock model).
int  n_sliced_layers(const llama_model * model);

// The model's engine (nullptr for a stock model without a trace).
cache * engine_of(const llama_model * model);
// The model's slice cache or routing observer, or nullptr when it has neither.
cache * cache_of(const llama_model * model);
// Whether decode runs on the engine's pools (a slice cache, not an observer).
bool serves_decode(const cache & c);
// Held for each ubatch of any context of the model (slicemoe_ubatch_scope), and by the C API when
// it reads or clears the engine's state.
std::mutex & compute_mutex(cache & c);
// A ubatch of n_tokens tokens of n_seqs sequences starts (under the lock), the first at first_pos:
// one at position 0 begins a new request. Several sequences are served only as a decode batch (one
// token each): false with *error for any other batch of several sequences, or when a forced route
// does not cover the positions.
bool begin_ubatch(cache & c, int32_t first_pos, int64_t n_tokens, int64_t n_seqs, std::string * error);
// Trace-driven routing from the next ubatch on (see slicemoe_route_force); n_positions 0 ends it.
int  force_routes(cache & c, int32_t n_positions, const int32_t * experts, const float * weights, std::string * error);
// A ubatch ended (under the lock): false, with *failure set, when the engine failed during it;
// the engine is then ready for the next ubatch.
bool end_ubatch(cache & c, std::string * failure);

// slicemoe_model_load's parameters for the llama.cpp load it runs on this thread: the load hook
// uses them instead of overrides and environment, and reports a failure here.
struct explicit_load {
    const slicemoe_model_params * params = nullptr;
    int         status = SLICEMOE_OK;
    std::string error;
};
void set_explicit_load(explicit_load * load);
// llama.cpp's eval callback (user data: the cache): observes routing nodes and runs the policy
// before the expert products of the same layer run.
// Never throws: a failure stops the graph and is reported by take_error.
// user_data: the context's eval_chain (new_chain), which holds the engine and, after it, a callback
// the context brought of its own.
bool eval_callback(ggml_tensor * t, bool ask, void * user_data) noexcept;
// A context's callback chain: the engine's eval callback first, then the caller's own (nullptr for
// none). One per context, from its creation (new_chain) to its destruction (free_chain).
struct eval_chain;
eval_chain * new_chain(cache & c, ggml_backend_sched_eval_callback user, void * user_data);
void free_chain(cache & c, eval_chain * chain);
// build_moe_ffn built node t of kind `kind` for engine layer `layer` in the context's next graph.
// The first MoE layer starts a new graph: what the previous graph recorded is forgotten.
enum router_node_kind : int;
void record_router_node(eval_chain & chain, int layer, router_node_kind kind, const ggml_tensor * t);
// The engine of a context's callback chain (nullptr when the callback is not the engine's).
cache * engine_of_callback(ggml_backend_sched_eval_callback cb_eval, void * cb_eval_user_data);
// The failure of the last ubatch this thread ran (a read error), taken once by the caller of
// llama_decode.
bool take_error(std::string * message);
// A new sequence starts: forget the prompt routing recorded for warm-up.
void begin_sequence(cache * c);

void    read_stats(const cache * c, slicemoe_cache_stats_t * out);
int32_t n_layers(const cache * c);
int     read_layer_stats(const cache * c, int32_t i, slicemoe_layer_stats_t * out);
void    clear_stats(cache * c);
void    fail_reads_after(cache * c, int64_t n_reads);
// Empty every slot of every pool and hand the host pools' pages back to the kernel (an idle
// process then holds no pool memory, which memory pressure would otherwise swap out and decode
// fault back page by page); the next uses read their slices from the file as misses
// (slicemoe-mapping.cpp).
void    release_pools(cache & c);

// Routing trace of a model run with record_trace.
struct route;
int64_t       trace_size(const cache * c);
const route * trace_at(const cache * c, int64_t i);
// Why misses are read buffered although the file opened with O_DIRECT ("" when they are not).
const char * io_note(const cache * c);
void          trace_clear(cache * c);
void          route_fields(const route * r, int32_t * request, int32_t * layer, int32_t * phase,
                           int32_t * experts, float * weights, int32_t top_k);
int32_t       top_k(const cache * c);
int32_t       n_experts(const cache * c);
// The router logits stored with record i (cache_prior runs): copies n_expert values, or returns
// false when the record has none.
bool          route_logits(const cache * c, int64_t i, float * out);

// Trace replay: the same cache and policy with no pools and no reads.
cache * sim_create(const slicemoe_sim_params & p, std::string * error);
void    sim_free(cache * c);
int     sim_run(cache * c, int64_t n, const int32_t * request, const int32_t * layer, const int32_t * phase,
                const int32_t * experts, const float * weights, const float * logits, std::string * error);

} // namespace slicemoe
