// Look-ahead prefetch: while layer L's predecessor computes, load the predicted experts' MSB slices
// into L's pool on the reader threads.

#include "slicemoe-engine.h"

#include <string>
#include <vector>

namespace slicemoe {

// The slots are chosen here, on the compute thread (least
// recently used among those holding no predicted expert); the reads are waited for by join_prefetch
// before L is served, and a slot whose read failed is emptied then (a missed chance: the miss path
// reads and reports again).
void start_prefetch(cache & c, layer & L, const std::vector<int> & predicted) {
    pool & p = L.msb;
    std::vector<char> keep(size_t(p.n_slots), 0);
    for (int e : predicted) {
        if (p.expert_slot[size_t(e)] >= 0) keep[size_t(p.expert_slot[size_t(e)])] = 1;
    }
    std::vector<slice_read> reads;
    for (int e : predicted) {
        if (p.expert_slot[size_t(e)] >= 0) continue;
        int slot = -1;
        for (int s = 0; s < p.n_slots; ++s) {
            if (keep[size_t(s)] || (L.shared_slots && L.lsb.slot_expert[size_t(s)] >= 0)) continue;
            if (p.slot_expert[size_t(s)] < 0) { slot = s; break; }
            if (slot < 0 || p.last_use[size_t(s)] < p.last_use[size_t(slot)]) slot = s;
        }
        if (slot < 0) break;
        const int old = p.slot_expert[size_t(slot)];
        if (old >= 0) {
            evict(c, L, p, slot);
            if (L.prefetched[size_t(old)]) {
                L.prefetched[size_t(old)] = 0;
                c.totals.prefetch_wasted_bytes += int64_t(p.slice_bytes);
            }
        }
        for (int j = 0; j < N_PROJ; ++j) {   // host pools only (build_cache checks)
            reads.push_back(slice_range(p, j, e, (uint8_t *) p.t[j]->data + size_t(slot) * p.t[j]->nb[2]));
        }
        p.slot_expert[size_t(slot)] = e;
        p.expert_slot[size_t(e)] = slot;
        p.uses[size_t(slot)] = 0;
        p.last_use[size_t(slot)] = c.clock;
        keep[size_t(slot)] = 1;
        L.prefetched[size_t(e)] = 1;
        L.ahead_slots.push_back({ e, slot });
        L.stats.loads += 1;
        L.stats.flash_bytes += int64_t(p.slice_bytes);
        c.totals.loads += 1;
        c.totals.flash_bytes += int64_t(p.slice_bytes);
        c.totals.prefetch_loads += 1;
    }
    L.ahead = c.io->submit(std::move(reads));
}

void join_prefetch(cache & c, layer & L) {
    join_lsb_reads(c, L);
    if (!L.ahead) return;
    std::string error;
    if (!c.io->wait(L.ahead, &error)) {
        for (size_t i = 0; i < L.ahead_slots.size(); ++i) {
            const auto [expert, slot] = L.ahead_slots[i];
            const bool bad = L.ahead->failed[i * N_PROJ] || L.ahead->failed[i * N_PROJ + 1] || L.ahead->failed[i * N_PROJ + 2];
            if (bad && L.msb.slot_expert[size_t(slot)] == expert) {
                L.msb.slot_expert[size_t(slot)] = -1;
                L.msb.expert_slot[size_t(expert)] = -1;
                L.prefetched[size_t(expert)] = 0;
            }
        }
    }
    L.ahead.reset();
    L.ahead_slots.clear();
}

} // namespace slicemoe
