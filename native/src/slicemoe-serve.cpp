// Serving a step: the routing events of a layer, live or replayed, drive the policy here: hits,
// misses (all of a step's reads at once), evictions, precision per use, then the slot tables the
// graph's expert products read. Prefill only records routing, for PCW's warm-up.

#include "slicemoe-engine.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace slicemoe {

namespace {

// Whether the last prompt token recorded in L routed to `expert`.
bool used_last(const layer & L, int expert) {
    return std::find(L.last_prompt_experts.begin(), L.last_prompt_experts.end(), expert) != L.last_prompt_experts.end();
}

// PCW: load the slices the prompt used most (recent tokens weigh more): MSB slices for as many as
// fit, LSB slices for the top of that list. Run as soon as the layer's prompt products have computed
// (warm_recorded_layers), its slices are read through the page cache: the prompt has just read those
// pages from the file, so they are copied, not read from the device a second time.
void warm_up(cache & c, layer & L) {
    L.warm_pending = false;
    std::vector<int> order(c.n_expert);
    for (int e = 0; e < c.n_expert; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return L.prompt_score[a] > L.prompt_score[b]; });
    for (int rank = 0; rank < c.n_expert && !c.failed; ++rank) {
        const int e = order[rank];
        if (L.prompt_score[e] <= 0.0) break;
        if (rank < L.msb.n_slots && L.msb.expert_slot[e] < 0) {
            const int slot = victim(c, L, L.msb);
            if (slot < 0) break;
            free_slot(c, L, L.msb, slot);
            queue_load(c, L, L.msb, e, slot);
            if (!c.pending.empty()) c.pending.back().cached = true;
            c.totals.warmup_loads += 1;
        }
        if (rank < L.lsb.n_slots && rank < c.top_k && L.lsb.expert_slot[e] < 0 && L.msb.expert_slot[e] >= 0) {
            const int slot = victim(c, L, L.lsb);
            if (slot < 0) continue;
            free_slot(c, L, L.lsb, slot);
            queue_load(c, L, L.lsb, e, slot);
            // a prompt at 4 bits read the LSB pages of its last token's experts only: the others
            // come from the device
            if (!c.pending.empty()) c.pending.back().cached = !prompt_at_low_precision(c) || used_last(L, e);
            c.totals.warmup_loads += 1;
        }
    }
    flush_loads(c);
}

// A use of the current step of layer L, as the policy sees it.
use_view view_of(const layer & L, int rank, float weight, int expert, bool msb_hit) {
    const bool lsb_cached = L.lsb.n_slots > 0 && L.lsb.expert_slot[size_t(expert)] >= 0;
    return { L.index, L.event, rank, weight, expert, msb_hit, lsb_cached };
}

// Whether the use of rank r runs at 8 bits (before LSB slots are counted).
bool wants_high(const cache & c, const layer & L, int r, float weight, int expert, bool msb_hit) {
    const policy_i & iface = *c.pol->iface;
    return c.precision == SLICEMOE_PRECISION_HIGH ||
           (c.precision == SLICEMOE_PRECISION_AUTO && iface.high_use &&
            iface.high_use(*c.pol, view_of(L, r, weight, expert, msb_hit)));
}

// A use served from pool p (the layer's MSB or LSB pool): the policy's count, its hit or miss in
// the layer's and the totals' counters, and the slice bytes its product reads.
void count_use(cache & c, layer & L, pool & p, int expert, bool hit) {
    const bool msb = &p == &L.msb;
    if (c.pol->iface->count_use) {
        c.pol->iface->count_use(*c.pol, view_of(L, 0, 0.0f, expert, false), msb ? 0 : 1, hit);
    }
    int64_t & layer_count = msb ? (hit ? L.stats.msb_hits : L.stats.msb_misses) : (hit ? L.stats.lsb_hits : L.stats.lsb_misses);
    int64_t & total_count = msb ? (hit ? c.totals.msb_hits : c.totals.msb_misses) : (hit ? c.totals.lsb_hits : c.totals.lsb_misses);
    layer_count += 1;
    total_count += 1;
    L.stats.ram_bytes += int64_t(p.slice_bytes);
    c.totals.ram_bytes += int64_t(p.slice_bytes);
}

// One decode step of a layer: the uses of n_tokens tokens (one per sequence of a batch), their ids
// `stride` apart and weights [n_tokens, top_k]. Every slice the step needs is resident at once: an
// expert two sequences use is read once and counts one miss and one hit. The slot tables are per
// expert, so in a batch a use runs at 8 bits when any use of its expert in the step does.
bool serve_step(cache & c, layer & L, int64_t n_tokens, const int32_t * ids, int64_t stride, const float * weights) {
    c.clock += 1;
    if (!join_step_reads(c, L)) {   // normally joined at the end of the last ubatch already
        return false;
    }
    join_lsb_reads(c, L);   // normally joined with the prefetches already (replay reads nothing)
    L.lsb_loading.assign(size_t(c.n_expert), 0);
    if (L.warm_pending) {
        warm_up(c, L);
        if (c.failed) return false;
    }
    const int k = c.top_k;
    auto id = [&](int64_t tok, int r) { return ids[tok * stride + r]; };
    auto weight = [&](int64_t tok, int r) { return weights[tok * k + r]; };
    auto dropped = [&](int64_t tok, int r) {
        return r > 0 && c.pol->iface->drop_use &&
               c.pol->iface->drop_use(*c.pol, view_of(L, r, weight(tok, r), id(tok, r), false));
    };
    // a use that does not run (dropped, or 4-bit for the LSB product) computes nothing on CPU pools
    const int32_t no_slot = L.cpu_pools ? -1 : 0;
    std::vector<int32_t> msb_map(c.n_expert, no_slot), lsb_map(c.n_expert, no_slot);
    std::vector<float> mask(c.n_expert, 0.0f), keep(c.n_expert, n_tokens > 1 ? 0.0f : 1.0f);
    // MSB slices first, for every use: each use needs one, and with shared slots an LSB slice
    // loaded earlier must not take the slot a later use's MSB slice needs
    const size_t n_uses = size_t(n_tokens) * size_t(k);
    std::vector<char> msb_hit(n_uses, 0), kept(n_uses, 0);
    // The step's resident slices are in use before any of its misses picks a victim: otherwise a
    // miss of a better-ranked use could evict the slice a later use hits, and read it again. LSB
    // slices only of the uses that run at 8 bits (a 4-bit use's LSB slice is no use to this step,
    // and holding it could push an 8-bit use down to 4 bits), and only where they have their own
    // pool: shared slots must stay free for MSB slices, which every use needs.
    for (int64_t tok = 0; tok < n_tokens; ++tok) {
        for (int r = 0; r < k; ++r) {
            const int e = id(tok, r);
            if (e < 0 || e >= c.n_expert || dropped(tok, r)) continue;
            protect_for_step(c, L.msb, e);
            if (!L.shared_slots && L.lsb.n_slots > 0 &&
                wants_high(c, L, r, weight(tok, r), e, L.msb.expert_slot[size_t(e)] >= 0)) {
                protect_for_step(c, L.lsb, e);
            }
        }
    }
    for (int64_t tok = 0; tok < n_tokens; ++tok) {
        for (int r = 0; r < k; ++r) {
            const int e = id(tok, r);
            const size_t use = size_t(tok) * size_t(k) + size_t(r);
            if (e < 0 || e >= c.n_expert) {
                c.failed = true;
                c.error = "router selected expert " + std::to_string(e) + " outside [0, " + std::to_string(c.n_expert) + ")";
                abandon_loads(c);
                return false;
            }
            if (dropped(tok, r)) {
                if (n_tokens == 1) keep[e] = 0.0f;
                c.totals.dropped_uses += 1;
                continue;
            }
            keep[e] = 1.0f;
            bool hit = false;
            if (!ensure(c, L, L.msb, e, &hit)) {
                if (!c.failed) {
                    c.failed = true;
                    c.error = "no MSB slot free in layer " + std::to_string(L.il) + (n_tokens > 1
                        ? " for the experts of a batch of " + std::to_string(n_tokens) + " sequences (fewer "
                          "sequences per batch, or a larger budget)"
                        : std::string(" (budget below top-k slices)"));
                }
                abandon_loads(c);
                return false;
            }
            kept[use] = 1;
            msb_hit[use] = hit;
            count_use(c, L, L.msb, e, hit);
            msb_map[e] = L.msb.expert_slot[e];
            if (!L.prefetched.empty() && L.prefetched[size_t(e)]) {
                L.prefetched[size_t(e)] = 0;
                c.totals.prefetch_useful_bytes += int64_t(L.msb.slice_bytes);
            }
        }
    }
    // then the LSB slices of the uses that run at 8 bits
    for (int64_t tok = 0; tok < n_tokens; ++tok) {
        for (int r = 0; r < k; ++r) {
            const size_t use = size_t(tok) * size_t(k) + size_t(r);
            if (!kept[use]) continue;
            const int e = id(tok, r);
            bool high = wants_high(c, L, r, weight(tok, r), e, msb_hit[use]);
            bool hit = false;
            // A use whose MSB slice missed waits for this expert's read anyway: its LSB slice joins
            // that read. Only a use that could run at once is left at 4 bits.
            const bool later = high && L.lsb.n_slots > 0 && c.lsb_background &&
                               (L.lsb_loading[size_t(e)] || (msb_hit[use] && L.lsb.expert_slot[size_t(e)] < 0));
            if (later) {
                // runs at 4 bits now; the slice is read while the token goes on, for the next one
                if (!L.lsb_loading[size_t(e)] && ensure(c, L, L.lsb, e, &hit)) {
                    L.lsb_loading[size_t(e)] = 1;
                    if (!c.pending.empty() && c.pending.back().p == &L.lsb && c.pending.back().expert == e) {
                        c.pending.back().background = true;
                    }
                } else if (c.failed) {
                    abandon_loads(c);
                    return false;
                }
                high = false;
            } else if (high && L.lsb.n_slots > 0) {
                if (ensure(c, L, L.lsb, e, &hit)) {
                    count_use(c, L, L.lsb, e, hit);
                    lsb_map[e] = L.lsb.expert_slot[e];
                    mask[e] = 1.0f;
                } else if (c.failed) {
                    abandon_loads(c);
                    return false;
                } else {
                    high = false;   // every LSB slot serves this step already: run at 4 bits
                }
            } else {
                high = false;
            }
            (high ? c.totals.high_uses : c.totals.low_uses) += 1;
        }
    }
    // all the step's misses at once; read while the products compute where they can wait for them
    const bool defer = c.overlap && L.ready && c.step_fused == N_PROJ && !c.simulated;
    if (!flush_loads(c, defer ? &L : nullptr, n_tokens == 1 ? ids : nullptr, k)) {
        return false;
    }
    for (char & f : L.prefetched) {
        if (f) {
            f = 0;
            c.totals.prefetch_wasted_bytes += int64_t(L.msb.slice_bytes);
        }
    }
    if (c.simulated) {
        return true;
    }
    ggml_backend_tensor_set(L.msb_map, msb_map.data(), 0, msb_map.size() * sizeof(int32_t));
    if (L.keep) {
        ggml_backend_tensor_set(L.keep, keep.data(), 0, keep.size() * sizeof(float));
    }
    if (L.lsb_map) {
        ggml_backend_tensor_set(L.lsb_map, lsb_map.data(), 0, lsb_map.size() * sizeof(int32_t));
        ggml_backend_tensor_set(L.lsb_mask, mask.data(), 0, mask.size() * sizeof(float));
    }
    return true;
}

// PCW's prompt statistics: each prompt token decays the scores by 0.9 and adds 1 to its experts,
// so recent tokens count most (one token at a time: the same whatever the batch size).
void record_prompt_token(cache & c, layer & L, const int32_t * ids) {
    for (double & score : L.prompt_score) score *= 0.9;
    for (int r = 0; r < c.top_k; ++r) {
        const int e = ids[r];
        if (e >= 0 && e < c.n_expert) L.prompt_score[size_t(e)] += 1.0;
    }
    L.last_prompt_experts.assign(ids, ids + c.top_k);
    L.warm_pending = c.warmup == SLICEMOE_WARMUP_PCW;
}

// A prompt's products on CPU pools that do not hold every slice (slicemoe_moe_graph): each slice
// from its pool where it is resident, else from the file's mapping, through the layer's tables:
// expert -> slot, or the pool's slot count + expert. The bytes are the same either way.
void write_prompt_tables(cache & c, layer & L) {
    join_prefetch(c, L);   // a slot whose read is still in flight holds no slice yet
    const auto write = [&c](const pool & p, ggml_tensor * table) {
        const int32_t n_slots = int32_t(p.t[0]->ne[2]);
        std::vector<int32_t> ids(size_t(c.n_expert));
        for (int e = 0; e < c.n_expert; ++e) {
            const int slot = p.expert_slot[size_t(e)];
            ids[size_t(e)] = slot >= 0 ? slot : n_slots + e;
        }
        ggml_backend_tensor_set(table, ids.data(), 0, ids.size() * sizeof(int32_t));
    };
    write(L.msb, L.msb_map);
    if (c.precision != SLICEMOE_PRECISION_LOW) {
        write(L.lsb, L.lsb_map);
    }
}

// A router-biasing policy's bias for layer L's logits of a decode token.
std::vector<float> selection_bias(cache & c, const layer & L, const std::vector<float> & logits) {
    std::vector<char> msb_cached(size_t(c.n_expert));
    for (int e = 0; e < c.n_expert; ++e) {
        msb_cached[size_t(e)] = L.msb.expert_slot[size_t(e)] >= 0;
    }
    std::vector<float> bias(size_t(c.n_expert));
    c.pol->iface->router_bias(*c.pol, L.index, logits.data(), msb_cached.data(), bias.data());
    return bias;
}

} // namespace

void set_selection_bias(cache & c, layer & L, const ggml_tensor * logits) {
    std::vector<float> v(size_t(c.n_expert));
    ggml_backend_tensor_get(logits, v.data(), 0, v.size() * sizeof(float));
    const std::vector<float> bias = selection_bias(c, L, v);
    ggml_backend_tensor_set(L.sel_bias, bias.data(), 0, bias.size() * sizeof(float));
    if (c.record) {
        L.last_logits = std::move(v);
    }
}

// Replay of a router-biasing policy: the experts the biased router picks in the replayed cache
// state (best first), with the unbiased probabilities as weights.
void replay_selection(cache & c, layer & L, const float * logits, int32_t * ids, float * weights) {
    const std::vector<float> v(logits, logits + c.n_expert);
    const std::vector<float> bias = selection_bias(c, L, v);
    std::vector<int> order(size_t(c.n_expert));
    for (int e = 0; e < c.n_expert; ++e) order[size_t(e)] = e;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
        return v[size_t(a)] + bias[size_t(a)] > v[size_t(b)] + bias[size_t(b)];
    });
    const float top = *std::max_element(v.begin(), v.end());
    double sum = 0.0;
    for (float x : v) sum += std::exp(double(x - top));
    for (int r = 0; r < c.top_k; ++r) {
        ids[r] = order[size_t(r)];
        weights[r] = float(std::exp(double(v[size_t(ids[r])] - top)) / sum);
    }
}

bool access(cache & c, int index, int phase, int64_t n_tokens, const int32_t * ids, int64_t stride,
            const float * weights) {
    layer & L = c.layers[size_t(index)];
    if (c.record) {
        for (int64_t tok = 0; tok < n_tokens; ++tok) {
            const int32_t * row = ids + tok * stride;
            const float * w = weights + tok * c.top_k;
            c.trace.push_back({ c.request, index, phase, std::vector<int32_t>(row, row + c.top_k),
                                std::vector<float>(w, w + c.top_k), std::move(L.last_logits) });
            L.last_logits.clear();
        }
    }
    if (c.observe_only) {
        return true;
    }
    if (phase == 0) {
        for (int64_t tok = 0; tok < n_tokens; ++tok) {
            record_prompt_token(c, L, ids + tok * stride);
        }
        c.prompt_seen = true;
        // the previous MoE layer's prompt products have run: its pages are fresh in the page cache
        if (index > 0 && c.layers[size_t(index - 1)].warm_pending) {
            warm_up(c, c.layers[size_t(index - 1)]);
        }
        if (L.prompt_from_pools && !c.failed) {
            write_prompt_tables(c, L);
            if (prompt_at_low_precision(c)) ask_for_last_row(c, L);
        }
        return !c.failed;
    }
    if (index == 0) {
        c.totals.decode_tokens += n_tokens;
        if (c.pol->iface->begin_token) {
            c.pol->iface->begin_token(*c.pol, c.totals.decode_tokens);
        }
        if (c.prompt_seen) {
            c.prompt_seen = false;
            const bool mapped = !std::all_of(c.layers.begin(), c.layers.end(),
                                             [&c](const layer & L) { return holds_every_slice(c, L); });
            if (mapped) release_mapped_in_background(c);   // the prompt streamed the experts through the mapping
        }
    }
    const bool ok = serve_step(c, L, n_tokens, ids, stride, weights);
    L.event += 1;
    return ok;
}

bool warm_recorded_layers(cache & c) {
    for (layer & L : c.layers) {
        if (L.warm_pending && !c.failed) warm_up(c, L);
    }
    return !c.failed;
}

} // namespace slicemoe
