// llama.cpp's eval callback and the ubatch lifecycle: the callback observes a MoE layer's router
// probabilities and top-k node and serves the step before the layer's expert products run.

#include "slicemoe-engine.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace slicemoe {

namespace {

// Whether the engine wants to see a router node of this kind: every observed node costs a graph split.
bool wants(const cache & c, router_node_kind kind) {
    switch (kind) {
        case NODE_PROBS:   // the uses' weights matter to auto precision, gating and the trace only
            return c.record || c.pol->iface->drop_use || (c.precision == SLICEMOE_PRECISION_AUTO && !c.observe_only);
        case NODE_TOPK:
            return true;
        case NODE_LOGITS:
            return c.pol->iface->router_bias && !c.observe_only;
        case NODE_AHEAD:
            return c.prefetch;
        default:
            return false;
    }
}

// The selection and probabilities of a layer whose step is an op of the graph are the op's inputs.
bool in_graph(const eval_chain & chain, const router_node & node) {
    return (node.kind == NODE_TOPK || node.kind == NODE_PROBS) && size_t(node.layer) < chain.step_in_graph.size() &&
           chain.step_in_graph[size_t(node.layer)];
}

bool observe_node(cache & c, const eval_chain & chain, ggml_tensor * t, bool ask) {
    if (c.precision_only) {
        return !ask;   // nothing to observe: the graph runs in one piece
    }
    const auto found = chain.nodes.find(t);
    if (found == chain.nodes.end() || !wants(c, found->second.kind) || in_graph(chain, found->second)) {
        return !ask;   // not ours: never requested (and keep computing if asked to report)
    }
    if (ask) {
        return true;
    }
    const int index = found->second.layer;
    const bool is_ahead = found->second.kind == NODE_AHEAD;
    const bool is_logits = found->second.kind == NODE_LOGITS;
    const bool is_probs = found->second.kind == NODE_PROBS;
    layer & L = c.layers[size_t(index)];
    join_prefetch(c, L);   // before anything else, so that no prefetch outlives a failure
    if (c.failed) {
        return false;
    }
    const int64_t n_tokens = t->ne[1];
    if (is_ahead) {
        if (n_tokens == 1 && size_t(index + 1) < c.layers.size()) {
            std::vector<float> v(size_t(c.n_expert));
            ggml_backend_tensor_get(t, v.data(), 0, v.size() * sizeof(float));
            std::vector<int> order(size_t(c.n_expert));
            for (int e = 0; e < c.n_expert; ++e) order[size_t(e)] = e;
            std::partial_sort(order.begin(), order.begin() + c.top_k, order.end(),
                              [&](int a, int b) { return v[size_t(a)] > v[size_t(b)]; });
            order.resize(size_t(c.top_k));
            layer & next = c.layers[size_t(index + 1)];
            join_prefetch(c, next);
            start_prefetch(c, next, order);
        }
        return true;
    }
    if (is_logits) {
        if (n_tokens == 1) {
            set_selection_bias(c, L, t);
        }
        return true;
    }
    if (is_probs) {
        L.probs.resize(size_t(c.n_expert * n_tokens));
        ggml_backend_tensor_get(t, L.probs.data(), 0, L.probs.size() * sizeof(float));
        return true;
    }
    return serve_selection(c, chain, index, t);
}

} // namespace

bool serve_selection(cache & c, const eval_chain & chain, int index, const ggml_tensor * t) {
    layer & L = c.layers[size_t(index)];
    const int64_t n_tokens = t->ne[1];
    // top-k ids: a view [top_k, n_tokens] of the argsort, rows nb[1] bytes apart
    const size_t row_stride = t->nb[1] / sizeof(int32_t);
    c.scratch_ids.resize(size_t((n_tokens - 1) * int64_t(row_stride) + c.top_k));
    ggml_backend_tensor_get(t, c.scratch_ids.data(), 0, c.scratch_ids.size() * sizeof(int32_t));
    const bool have_probs = L.probs.size() == size_t(c.n_expert * n_tokens);
    std::vector<float> weights(size_t(n_tokens * c.top_k), 0.0f);
    for (int64_t tok = 0; tok < n_tokens; ++tok) {
        const int32_t * ids = c.scratch_ids.data() + tok * int64_t(row_stride);
        for (int r = 0; r < c.top_k; ++r) {
            const bool valid = have_probs && ids[r] >= 0 && ids[r] < c.n_expert;
            weights[size_t(tok * c.top_k + r)] = valid ? L.probs[size_t(tok * c.n_expert + ids[r])] : 0.0f;
        }
    }
    L.probs.clear();
    // a prompt's tokens are recorded for warm-up; a decode token, or a batch of one decode token
    // per sequence, is served from the pools
    const int phase = (n_tokens == 1 || c.decode_batch) ? 1 : 0;
    c.step_fused = size_t(index) < chain.n_fused.size() ? chain.n_fused[size_t(index)] : 0;
    return access(c, index, phase, n_tokens, c.scratch_ids.data(), int64_t(row_stride), weights.data());
}

void graph_step(ggml_tensor * dst, int ith, int /*nth*/, void * userdata) {
    if (ith != 0) return;   // one task: the policy runs once, the other threads wait at the barrier
    const auto & [chain, index] = *static_cast<const std::pair<eval_chain *, int> *>(userdata);
    cache & c = *chain->engine;
    layer & L = c.layers[size_t(index)];
    int32_t * slots = static_cast<int32_t *>(dst->data);   // [n_expert] MSB, then [n_expert] LSB
    std::fill(slots, slots + 2 * c.n_expert, -1);          // a failed step computes no product
    try {
        join_prefetch(c, L);
        if (c.failed) return;
        const ggml_tensor * probs = dst->src[1];
        if (wants(c, NODE_PROBS)) {
            L.probs.assign(static_cast<const float *>(probs->data), static_cast<const float *>(probs->data) + c.n_expert);
        }
        if (!serve_selection(c, *chain, index, dst->src[0])) return;
        std::copy_n(static_cast<const int32_t *>(L.msb_map->data), c.n_expert, slots);
        if (L.lsb_map) std::copy_n(static_cast<const int32_t *>(L.lsb_map->data), c.n_expert, slots + c.n_expert);
    } catch (const std::exception & e) {
        c.failed = true;
        try {
            c.error = std::string("slice cache: ") + e.what();
        } catch (...) {
        }
    }
}

eval_chain * new_chain(cache & c, ggml_backend_sched_eval_callback user, void * user_data) {
    std::lock_guard<std::mutex> lock(c.compute_mutex);
    c.chains.emplace_back();   // a list: the other contexts' chains stay where they are
    eval_chain & chain = c.chains.back();
    chain.engine = &c;
    chain.user = user;
    chain.user_data = user_data;
    chain.step_in_graph.assign(c.layers.size(), 0);
    for (int i = 0; i < int(c.layers.size()); ++i) chain.step_args.push_back({ &chain, i });
    return &chain;
}

void free_chain(cache & c, eval_chain * chain) {
    std::lock_guard<std::mutex> lock(c.compute_mutex);
    c.chains.remove_if([chain](const eval_chain & other) { return &other == chain; });
}

void record_router_node(eval_chain & chain, int layer, router_node_kind kind, const ggml_tensor * t) {
    // build_moe_ffn builds the MoE layers in order, each router's logits first: the first layer's
    // logits begin a new graph, where an address of the last graph may be a different node
    if (layer == 0 && kind == NODE_LOGITS) {
        chain.nodes.clear();
        std::fill(chain.step_in_graph.begin(), chain.step_in_graph.end(), 0);
    }
    if (t) {
        chain.nodes[t] = { layer, kind };
    }
}

cache * engine_of_callback(ggml_backend_sched_eval_callback cb_eval, void * cb_eval_user_data) {
    return cb_eval == eval_callback ? static_cast<eval_chain *>(cb_eval_user_data)->engine : nullptr;
}

// The engine observes its routing nodes; the caller's callback is asked about every node and sees
// those it asks for. A node either wants stops the graph there; either one can end the graph.
// ggml's scheduler asks about nodes in order until one is wanted, computes up to it, then shows it:
// the node shown is the last one asked about.
bool eval_callback(ggml_tensor * t, bool ask, void * user_data) noexcept {
    eval_chain & chain = *static_cast<eval_chain *>(user_data);
    cache & c = *chain.engine;
    try {
        if (ask) {
            const bool engine_wants = observe_node(c, chain, t, true);
            const bool user_wants = chain.user && chain.user(t, true, chain.user_data);
            chain.user_asked = user_wants ? t : nullptr;
            return engine_wants || user_wants;
        }
        // a node that is not the engine's: observe_node returns true (go on) and does nothing
        if (!observe_node(c, chain, t, false)) {
            return false;
        }
        return chain.user_asked != t || chain.user(t, false, chain.user_data);
    } catch (const std::exception & e) {
        // an allocation or a thread that could not start: stop this graph, report through take_error
        c.failed = true;
        try {
            c.error = std::string("slice cache: ") + e.what();
        } catch (...) {
        }
        return false;
    }
}

bool end_ubatch(cache & c, std::string * failure) {
    c.decode_batch = false;
    if (!c.failed) warm_recorded_layers(c);   // a prompt's last layers
    for (layer & L : c.layers) {
        join_step_reads(c, L);   // a failed read sets c.failed
    }
    if (!c.failed) return true;
    for (layer & L : c.layers) {
        join_prefetch(c, L);   // the decode stopped; so do its prefetches
    }
    *failure = std::move(c.error);
    c.failed = false;
    c.error.clear();
    return false;
}

void begin_sequence(cache * c) {
    if (!c) return;
    c->request += 1;
    c->sequence_fresh = true;
    for (layer & L : c->layers) {
        join_prefetch(*c, L);
        std::fill(L.prompt_score.begin(), L.prompt_score.end(), 0.0);
        L.warm_pending = false;
    }
}

bool begin_ubatch(cache & c, int32_t first_pos, int64_t n_tokens, int64_t n_seqs, std::string * error) {
    c.decode_batch = false;
    if (n_seqs > 1 && serves_decode(c)) {
        // a prompt's experts stream through the mapping and a decode step's through the pools;
        // a batch that mixes them, or a forced route (one sequence's positions), is not served
        if (n_tokens != n_seqs || c.forced) {
            *error = "a batch with " + std::to_string(n_tokens) + " tokens of " + std::to_string(n_seqs) +
                     " sequences: the slice cache serves a prompt of one sequence, or one decode token of each "
                     "sequence" + (c.forced ? std::string(" (and forced routes one sequence)") : std::string());
            return false;
        }
        c.decode_batch = true;
        return true;
    }
    if (first_pos == 0 && !c.sequence_fresh) {
        begin_sequence(&c);
    }
    c.sequence_fresh = false;
    return !c.forced || c.forced->upload(first_pos, n_tokens, error);
}

int force_routes(cache & c, int32_t n_positions, const int32_t * experts, const float * weights, std::string * error) {
    c.forced.reset();
    if (n_positions == 0) {
        return SLICEMOE_OK;
    }
    c.forced = forced_routes::create(int(c.layers.size()), c.n_expert, c.top_k, n_positions, experts, weights, error);
    return c.forced ? SLICEMOE_OK : SLICEMOE_ERR_INVALID_ARG;
}

bool serves_decode(const cache & c) {
    return !c.observe_only && !c.simulated;
}

std::mutex & compute_mutex(cache & c) {
    return c.compute_mutex;
}

} // namespace slicemoe
