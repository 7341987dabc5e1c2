// Trace replay (slicemoe sim): the live engine's policy with no pools and no reads, driven by a
// recorded trace, so that a policy is measured live and on traces by the same code.

#include "slicemoe-engine.h"

#include <cmath>

namespace slicemoe {

cache * sim_create(const slicemoe_sim_params & p, std::string * error) {
    // the limits keep every product of counts and sizes far from int64 overflow
    constexpr int64_t max_slice = int64_t(1) << 40;
    if (p.n_layers <= 0 || p.n_layers > 512 || p.n_expert <= 0 || p.n_expert > 1024 || p.top_k <= 0 ||
        p.top_k > p.n_expert || p.msb_bytes <= 0 || p.msb_bytes > max_slice || p.lsb_bytes < 0 ||
        p.lsb_bytes > max_slice || p.cache.budget_bytes <= 0) {
        *error = "simulation needs 1 to 512 MoE layers, 1 to 1024 experts, 1 <= top_k <= n_expert, slice sizes in "
                 "(0, 1 TiB] (lsb may be 0) and a budget above 0";
        return nullptr;
    }
    auto c = std::make_unique<cache>();
    c->simulated = true;
    c->n_expert = p.n_expert;
    c->top_k = p.top_k;
    c->warmup = p.cache.warmup;
    c->lsb_background = p.cache.lsb_background;
    set_policy(*c, policy_params::of(p.cache), p.n_layers);
    c->budget = p.cache.budget_bytes;
    std::vector<slice_sizes> sizes(size_t(p.n_layers), slice_sizes{ size_t(p.msb_bytes), size_t(p.lsb_bytes) });
    if ((p.layer_msb_bytes == nullptr) != (p.layer_lsb_bytes == nullptr)) {
        *error = "per-layer slice sizes need both layer_msb_bytes and layer_lsb_bytes";
        return nullptr;
    }
    for (int i = 0; p.layer_msb_bytes && i < p.n_layers; ++i) {
        if (p.layer_msb_bytes[i] <= 0 || p.layer_msb_bytes[i] > max_slice || p.layer_lsb_bytes[i] < 0 ||
            p.layer_lsb_bytes[i] > max_slice) {
            *error = "layer " + std::to_string(i) + ": slice sizes must be in (0, 1 TiB] (lsb may be 0)";
            return nullptr;
        }
        sizes[size_t(i)] = { size_t(p.layer_msb_bytes[i]), size_t(p.layer_lsb_bytes[i]) };
    }
    bool alike = true;
    for (const slice_sizes & size : sizes) {
        if (c->precision != SLICEMOE_PRECISION_LOW && size.lsb == 0) {
            *error = "this policy and precision need LSB slices (lsb_bytes > 0)";
            return nullptr;
        }
        alike = alike && size.msb == size.lsb;
    }
    slot_plan plan;
    if (!layer_settings_fit(c->pol->params, p.n_layers, error) ||
        !slot_counts(*c, sizes, alike, p.cache.msb_share, p.cache.layer_slots, p.cache.n_layer_slots, &plan, error)) {
        return nullptr;
    }
    c->layers.resize(size_t(p.n_layers));
    for (int i = 0; i < p.n_layers; ++i) {
        layer & L = c->layers[size_t(i)];
        L.index = i;
        L.il = i;
        L.stats.layer = i;
        L.prompt_score.assign(size_t(c->n_expert), 0.0);
        const int n_msb = plan.msb[size_t(i)], n_lsb = plan.lsb[size_t(i)];
        L.shared_slots = plan.shared[size_t(i)];
        init_pool(L.msb, n_msb, c->n_expert);
        init_pool(L.lsb, n_lsb, c->n_expert);
        L.msb.slice_bytes = sizes[size_t(i)].msb;
        L.lsb.slice_bytes = sizes[size_t(i)].lsb;
        L.stats.msb_slots = n_msb;
        L.stats.lsb_slots = n_lsb;
        c->totals.pool_bytes += int64_t(n_msb) * int64_t(sizes[size_t(i)].msb) +
                                (L.shared_slots ? 0 : int64_t(n_lsb) * int64_t(sizes[size_t(i)].lsb));
    }
    c->totals.budget_bytes = c->budget;
    return c.release();
}

void sim_free(cache * c) {
    delete c;
}

int sim_run(cache * c, int64_t n, const int32_t * requests, const int32_t * layers, const int32_t * phases,
            const int32_t * experts, const float * weights, const float * logits, std::string * error) {
    const int n_layers = int(c->layers.size());
    for (int64_t i = 0; i < n; ++i) {
        if (layers[i] < 0 || layers[i] >= n_layers || (phases[i] != 0 && phases[i] != 1)) {
            *error = "trace record " + std::to_string(i) + ": layer or phase out of range";
            return SLICEMOE_ERR_INVALID_ARG;
        }
    }
    const policy_i & iface = *c->pol->iface;
    if (iface.see_trace) {
        std::vector<int64_t> first_event(static_cast<size_t>(n_layers));
        for (const layer & L : c->layers) first_event[size_t(L.index)] = L.event;
        iface.see_trace(*c->pol, { n, layers, phases, experts, first_event.data() });
    }
    for (int64_t i = 0; i < n; ++i) {
        // where a live run's prompt ubatch ended, and end_ubatch warmed what it recorded: before a
        // decode record, another request, or a prompt record of an earlier layer (the next ubatch)
        if (i > 0 && phases[i - 1] == 0 &&
            (phases[i] == 1 || requests[i] != requests[i - 1] || layers[i] < layers[i - 1])) {
            warm_recorded_layers(*c);
        }
        if (requests[i] != c->request) {
            begin_sequence(c);
            c->request = requests[i];
        }
        const int32_t * ids = experts + i * c->top_k;
        const float * w = weights + i * c->top_k;
        std::vector<int32_t> chosen(size_t(c->top_k));
        std::vector<float> chosen_w(size_t(c->top_k));
        const float * row = logits ? logits + i * c->n_expert : nullptr;
        if (iface.router_bias && phases[i] == 1 && row && !std::isnan(row[0])) {
            replay_selection(*c, c->layers[size_t(layers[i])], row, chosen.data(), chosen_w.data());
            // where the replayed state picks what the run picked, keep the run's own weights
            if (!std::equal(chosen.begin(), chosen.end(), ids)) {
                ids = chosen.data();
                w = chosen_w.data();
            }
        }
        if (!access(*c, layers[i], phases[i], ids, w)) {
            *error = "trace record " + std::to_string(i) + ": " + c->error;
            c->failed = false;
            return SLICEMOE_ERR_INVALID_ARG;
        }
    }
    return SLICEMOE_OK;
}

} // namespace slicemoe
