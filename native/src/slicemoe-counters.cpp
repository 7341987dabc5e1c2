// The engine's counters and routing trace, read by the C API.

#include "slicemoe-engine.h"

#include <algorithm>

namespace slicemoe {

void read_stats(const cache * c, slicemoe_cache_stats_t * out) {
    *out = c->totals;
    const policy & pol = *c->pol;
    out->high_threshold = pol.iface->threshold ? pol.iface->threshold(pol) : pol.params.high_threshold;
}

int32_t n_layers(const cache * c) {
    return int32_t(c->layers.size());
}

int read_layer_stats(const cache * c, int32_t i, slicemoe_layer_stats_t * out) {
    if (i < 0 || size_t(i) >= c->layers.size()) return SLICEMOE_ERR_INVALID_ARG;
    const layer & L = c->layers[size_t(i)];
    *out = L.stats;
    out->shared_slots = L.shared_slots;
    out->msb_resident = int32_t(std::count_if(L.msb.slot_expert.begin(), L.msb.slot_expert.end(), [](int e) { return e >= 0; }));
    out->lsb_resident = int32_t(std::count_if(L.lsb.slot_expert.begin(), L.lsb.slot_expert.end(), [](int e) { return e >= 0; }));
    return SLICEMOE_OK;
}

void clear_stats(cache * c) {
    const slicemoe_cache_stats_t kept = c->totals;
    c->totals = {};
    c->totals.budget_bytes = kept.budget_bytes;
    c->totals.io_direct = kept.io_direct;
    c->totals.dense_copied_bytes = kept.dense_copied_bytes;
    c->totals.load_flash_bytes = kept.load_flash_bytes;
    c->totals.load_io_ms = kept.load_io_ms;
    c->totals.pool_bytes = kept.pool_bytes;
    c->totals.device_pool_bytes = kept.device_pool_bytes;
    for (layer & L : c->layers) {
        const slicemoe_layer_stats_t keep = L.stats;
        L.stats = {};
        L.stats.layer = keep.layer;
        L.stats.msb_slots = keep.msb_slots;
        L.stats.lsb_slots = keep.lsb_slots;
    }
}

void fail_reads_after(cache * c, int64_t n_reads) {
    c->reads_left = n_reads;
}

int64_t trace_size(const cache * c) {
    return int64_t(c->trace.size());
}

const char * io_note(const cache * c) {
    return c && c->io ? c->io->fallback_reason().c_str() : "";
}

const route * trace_at(const cache * c, int64_t i) {
    return i >= 0 && i < int64_t(c->trace.size()) ? &c->trace[size_t(i)] : nullptr;
}

void trace_clear(cache * c) {
    c->trace.clear();
}

void route_fields(const route * r, int32_t * request, int32_t * layer, int32_t * phase, int32_t * experts,
                  float * weights, int32_t top_k) {
    *request = r->request;
    *layer = r->layer;
    *phase = r->phase;
    std::copy(r->experts.begin(), r->experts.begin() + top_k, experts);
    std::copy(r->weights.begin(), r->weights.begin() + top_k, weights);
}

int32_t top_k(const cache * c) {
    return c->top_k;
}

int32_t n_experts(const cache * c) {
    return c->n_expert;
}

bool route_logits(const cache * c, int64_t i, float * out) {
    const route * r = trace_at(c, i);
    if (!r || r->logits.empty()) return false;
    std::copy(r->logits.begin(), r->logits.end(), out);
    return true;
}

} // namespace slicemoe
