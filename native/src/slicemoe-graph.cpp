// The MoE graph hooks of patch 0002: build_moe_ffn asks the engine for cache-aware selection bias,
// forced routes and the weights and expert (slot) ids its expert products run on.

#include "slicemoe-graph.h"
#include "slicemoe-engine.h"
#include "slicemoe-product.h"

#include <algorithm>

namespace {

slicemoe::cache * engine_from(ggml_backend_sched_eval_callback cb_eval, void * cb_eval_user_data) {
    return slicemoe::engine_of_callback(cb_eval, cb_eval_user_data);
}

// SLICEMOE_GRAPH_STEP=1: the decode step of a layer on CPU pools as an op of the graph, on the
// router's selection and probabilities, its output the layer's slot tables [1, n_expert, 2]; nullptr
// where the eval callback serves the step (device pools, a decode batch, the option off).
ggml_tensor * step_op(ggml_context * ctx, slicemoe::cache & c, slicemoe::eval_chain & chain, slicemoe::layer & L,
                      int64_t n_tokens, ggml_tensor * selected) {
    using namespace slicemoe;
    if (!c.graph_step || !L.cpu_pools || n_tokens != 1 || c.decode_batch) return nullptr;
    const ggml_tensor * probs = nullptr;
    for (const auto & [node, where] : chain.nodes) {
        if (where.layer == L.index && where.kind == NODE_PROBS) probs = node;
    }
    if (!probs) return nullptr;
    ggml_tensor * args[2] = { selected, const_cast<ggml_tensor *>(probs) };
    ggml_tensor * step = ggml_custom_4d(ctx, GGML_TYPE_I32, 1, c.n_expert, 2, 1, args, 2, graph_step, 1,
                                        &chain.step_args[size_t(L.index)]);
    ggml_format_name(step, "slicemoe_step-%d", L.il);
    chain.step_in_graph[size_t(L.index)] = 1;
    return step;
}

// The three weights of a product's MSB (or LSB) operand: a pool's tensors [n_embd or n_ff, .., n_slots] or
// the file's mapped ones, in the order up, gate, down.
void use_msb(slicemoe_moe_weights * w, ggml_tensor * const t[slicemoe::N_PROJ]) {
    w->up   = t[0];
    w->gate = t[1];
    w->down = t[2];
}

// Whether the fused product can read every slice of the layer from the file where a pool lacks it
// (else a prompt streams them all through the mapping, ids being expert ids)
bool file_on_host(const slicemoe::layer & L) {
    for (const ggml_tensor * t : L.mapped) {
        if (!t || !t->buffer || !ggml_backend_buffer_is_host(t->buffer)) return false;
    }
    return true;
}

void use_lsb(slicemoe_moe_weights * w, ggml_tensor * const t[slicemoe::N_PROJ]) {
    w->up_lsb   = t[0];
    w->gate_lsb = t[1];
    w->down_lsb = t[2];
}

// The last column of ids [k, n_tokens] as [k, 1]: the LSB ids of a 4-bit prompt's last row (the fused
// product runs every other row at 4 bits)
ggml_tensor * last_row(ggml_context * ctx, ggml_tensor * ids) {
    return ggml_view_2d(ctx, ids, ids->ne[0], 1, ids->nb[1], size_t(ids->ne[1] - 1) * ids->nb[1]);
}

} // namespace

ggml_tensor * slicemoe_moe_selection_bias(ggml_backend_sched_eval_callback cb_eval, void * cb_eval_user_data, int il,
                                          int64_t n_tokens) {
    using namespace slicemoe;
    cache * c = engine_from(cb_eval, cb_eval_user_data);
    const auto it = c ? c->layer_of_il.find(il) : std::unordered_map<int, int>::iterator();
    if (!c || it == c->layer_of_il.end() || !serves_decode(*c) || n_tokens != 1) {
        return nullptr;
    }
    return c->layers[size_t(it->second)].sel_bias;   // nullptr unless cache_prior
}

ggml_tensor * slicemoe_moe_forced_route(ggml_context * ctx, ggml_backend_sched_eval_callback cb_eval,
                                        void * cb_eval_user_data, int il, int64_t n_tokens, ggml_tensor ** experts) {
    using namespace slicemoe;
    cache * c = engine_from(cb_eval, cb_eval_user_data);
    const auto it = c && c->forced ? c->layer_of_il.find(il) : std::unordered_map<int, int>::iterator();
    if (!c || !c->forced || it == c->layer_of_il.end()) {
        return nullptr;
    }
    ggml_tensor * probs = c->forced->probs(ctx, it->second, n_tokens);
    if (probs) {
        *experts = c->forced->experts(ctx, it->second, n_tokens);
    }
    return probs;
}

void slicemoe_moe_router_nodes(ggml_backend_sched_eval_callback cb_eval, void * cb_eval_user_data, int il,
                               const ggml_tensor * logits, const ggml_tensor * probs, const ggml_tensor * selected) {
    using namespace slicemoe;
    cache * c = engine_from(cb_eval, cb_eval_user_data);
    const auto it = c ? c->layer_of_il.find(il) : std::unordered_map<int, int>::iterator();
    if (!c || it == c->layer_of_il.end()) {
        return;
    }
    eval_chain & chain = *static_cast<eval_chain *>(cb_eval_user_data);
    record_router_node(chain, it->second, NODE_LOGITS, logits);
    record_router_node(chain, it->second, NODE_PROBS, probs);
    record_router_node(chain, it->second, NODE_TOPK, selected);
}

void slicemoe_moe_graph(ggml_context * ctx, ggml_cgraph * gf, ggml_backend_sched_eval_callback cb_eval,
                        void * cb_eval_user_data, int il, int64_t n_tokens, slicemoe_moe_weights * w) {
    using namespace slicemoe;
    cache * c = engine_from(cb_eval, cb_eval_user_data);
    const auto it = c ? c->layer_of_il.find(il) : std::unordered_map<int, int>::iterator();
    if (!c || it == c->layer_of_il.end() || !c->sliced) {
        return;
    }
    w->sliced = true;
    layer & L = c->layers[size_t(it->second)];
    if (serves_decode(*c) && (n_tokens == 1 || c->decode_batch)) {
        // the expert ids [k, n_tokens] as one row of ids, to look up per-expert tables
        const int64_t k = w->ids->ne[0];
        ggml_tensor * selected = n_tokens == 1 ? w->ids : ggml_reshape_1d(ctx, ggml_cont(ctx, w->ids), k * n_tokens);
        auto gather = [&](ggml_tensor * table) {
            return ggml_reshape_2d(ctx, ggml_get_rows(ctx, table, selected), k, n_tokens);
        };
        eval_chain & chain = *static_cast<eval_chain *>(cb_eval_user_data);
        ggml_tensor * msb_map = L.msb_map;
        ggml_tensor * lsb_map = L.lsb_map;
        if (ggml_tensor * step = step_op(ctx, *c, chain, L, n_tokens, w->ids)) {
            // the slot tables are the op's output: the products that read them run after it
            msb_map = ggml_view_3d(ctx, step, 1, c->n_expert, 1, step->nb[1], step->nb[2], 0);
            lsb_map = ggml_view_3d(ctx, step, 1, c->n_expert, 1, step->nb[1], step->nb[2], step->nb[2]);
        }
        use_msb(w, L.msb.t);
        w->ids  = gather(msb_map);
        w->decode = true;
        if (L.ready) {
            chain.n_fused.resize(c->layers.size(), 0);
            chain.n_fused[size_t(L.index)] = 0;
            w->n_fused = &chain.n_fused[size_t(L.index)];
            for (int j = 0; j < N_PROJ; ++j) w->ready[j] = &L.ready[j];
        }
        if (L.keep && !L.cpu_pools) {   // on CPU pools a dropped use has slot -1 and no product
            w->weight_mask = ggml_reshape_3d(ctx, ggml_get_rows(ctx, L.keep, selected), 1, k, n_tokens);
        }
        if (L.next_router && w->input) {
            // look-ahead: the next MoE layer's router on this layer's input predicts its experts
            ggml_tensor * x = ggml_reshape_2d(ctx, w->input, w->input->ne[0], n_tokens);
            ggml_tensor * ahead = ggml_mul_mat(ctx, const_cast<ggml_tensor *>(L.next_router), x);
            ggml_format_name(ahead, "slicemoe_lookahead-%d", L.il);
            ggml_build_forward_expand(gf, ahead);
            record_router_node(*static_cast<eval_chain *>(cb_eval_user_data), it->second, NODE_AHEAD, ahead);
        }
        if (L.lsb.n_slots > 0) {
            use_lsb(w, L.lsb.t);
            w->ids_lsb  = gather(lsb_map);
            // fixed high precision needs no mask, nor do CPU pools (slot -1 for a 4-bit use)
            if (c->precision == SLICEMOE_PRECISION_AUTO && !L.cpu_pools) {
                w->lsb_mask = ggml_reshape_3d(ctx, ggml_get_rows(ctx, L.lsb_mask, selected), 1, k, n_tokens);
            }
        }
        return;
    }
    // A prompt: the experts a batch uses, every one, read once. From the pools when they hold every
    // slice in its expert's slot (the ids are then slots). Else, where the fused product runs on
    // CPU pools, each slice from its pool when resident and from the file's mapping when not (ids
    // through the layer's tables, which its prompt step writes), so a prompt after the first reads
    // from the file only what the pools lack; elsewhere every slice through the mapping.
    // low_precision_prompt: every row but the last at 4 bits, and where the fused product runs, the
    // last at 8 bits (a batch of one token is a decode token on a model without a cache: it keeps the
    // decode's precision)
    const bool low = c->precision == SLICEMOE_PRECISION_LOW;
    const bool low_prompt = prompt_at_low_precision(*c) && n_tokens > 1;
    const bool from_pools = serves_decode(*c) && holds_every_slice(*c, L);
    L.prompt_from_pools = !from_pools && serves_decode(*c) && L.cpu_pools && fused_products() && file_on_host(L) &&
                          (low || L.lsb.n_slots > 0);
    ggml_tensor * mapped[2 * N_PROJ];
    for (int j = 0; j < 2 * N_PROJ; ++j) mapped[j] = const_cast<ggml_tensor *>(L.mapped[j]);
    if (L.prompt_from_pools) {
        const int64_t k = w->ids->ne[0];
        ggml_tensor * selected = ggml_reshape_1d(ctx, ggml_cont(ctx, w->ids), k * n_tokens);
        const auto gather = [&](ggml_tensor * table) {
            return ggml_reshape_2d(ctx, ggml_get_rows(ctx, table, selected), k, n_tokens);
        };
        use_msb(w, L.msb.t);
        w->ids = gather(L.msb_map);
        std::copy_n(mapped, N_PROJ, w->file);
        if (!low) {
            use_lsb(w, L.lsb.t);
            w->ids_lsb = low_prompt ? last_row(ctx, gather(L.lsb_map)) : gather(L.lsb_map);
            std::copy_n(mapped + N_PROJ, N_PROJ, w->file + N_PROJ);
        }
        return;
    }
    if (from_pools) {
        use_msb(w, L.msb.t);
    }
    const bool fused = fused_products() && (from_pools ? L.cpu_pools : file_on_host(L));
    if (low || (low_prompt && !fused)) {
        return;   // every row at 4 bits: ggml's products take one set of ids for all rows
    }
    use_lsb(w, from_pools ? L.lsb.t : mapped + N_PROJ);
    w->ids_lsb = low_prompt ? last_row(ctx, w->ids) : w->ids;
}

ggml_tensor * slicemoe_moe_product(ggml_context * ctx, ggml_tensor * w, ggml_tensor * w_lsb, ggml_tensor * x,
                                   const slicemoe_moe_weights * sw) {
    // Every product of a sliced file's experts in host memory: decode tokens on the pools, prompt
    // batches on the pools and the mapped file (the op groups a batch's uses by expert), 8-bit uses
    // and 4-bit ones (w_lsb nullptr: a 4-bit-only run).
    if (!sw->sliced || sw->lsb_mask || !slicemoe::fused_products()) {
        return nullptr;
    }
    const int proj = w == sw->up ? 0 : w == sw->gate ? 1 : w == sw->down ? 2 : -1;
    auto * ready = proj >= 0 ? static_cast<slicemoe::product_ready *>(sw->ready[proj]) : nullptr;
    ggml_tensor * file = proj >= 0 ? sw->file[proj] : nullptr;
    ggml_tensor * file_lsb = proj >= 0 && w_lsb ? sw->file[slicemoe::N_PROJ + proj] : nullptr;
    ggml_tensor * product = slicemoe::build_expert_product(ctx, w, w_lsb, x, sw->ids, w_lsb ? sw->ids_lsb : nullptr, ready,
                                                           file, file_lsb);
    if (product && ready && sw->n_fused) {
        *sw->n_fused += 1;
    }
    return product;
}
