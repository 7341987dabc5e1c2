// Sliced models and the slice cache (DBSC with PCW).
//
// Without a cache every expert stays mapped from the file and the graph hook only sets the
// precision: high adds the LSB product to the MSB product (the 8-bit model), low leaves the MSB
// product alone (the 4-bit model).
//
// With a cache, decode (one token per batch) runs the expert products on pools:
//   - per MoE layer, an MSB pool and an LSB pool (one tensor per projection, [n_in, n_out, slots])
//     allocated once in a CPU buffer; their sizes come from one byte budget;
//   - the graph maps expert ids to slots with get_rows on two small I32 tables; a use that does
//     not run (4-bit for the LSB product, dropped by gating) gets slot -1 on CPU pools, which runs
//     no product (patch 0005), and slot 0 with a 0 mask on device pools;
//   - llama.cpp's eval callback observes the layer's router probabilities and top-k node, then
//     runs the policy before the expert products of that layer run: hits, misses (all of a step's
//     slice reads at once on the reader threads, slicemoe-io.h), evictions, precision per use;
//     then it rewrites the tables.
// Prefill (more than one token per batch) is compute-bound and touches most experts, so it runs
// on the mapped tensors (streaming them from the file) and only records routing for warm-up.

#include "slicemoe-engine.h"
#include "slicemoe-graph.h"

#include "llama-model.h"

#include "ggml-backend.h"
#include "gguf.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <memory>
#include <sys/mman.h>
#include <mutex>
#include <unistd.h>
#include <unordered_map>
#include <map>
#include <vector>

namespace slicemoe {

namespace {

std::string format_bytes(int64_t n) {
    char buf[64];
    if (n >= (int64_t(1) << 30))      snprintf(buf, sizeof(buf), "%.2f GiB", n / double(int64_t(1) << 30));
    else if (n >= (int64_t(1) << 20)) snprintf(buf, sizeof(buf), "%.2f MiB", n / double(1 << 20));
    else if (n >= 1024)               snprintf(buf, sizeof(buf), "%.1f KiB", n / 1024.0);
    else                              snprintf(buf, sizeof(buf), "%lld B", (long long) n);
    return buf;
}

// Slot counts of one layer from its share of the budget (see docs/design.md for the rule). shared:
// the layer's MSB and LSB slices take their slots from one set (the adaptive split), which needs
// slices of one size (share_slots).
void split_budget(int64_t budget, int precision, int n_expert, int top_k, slice_sizes size, float msb_share,
                  bool share_slots, int * n_msb, int * n_lsb, bool * shared) {
    const size_t msb_b = size.msb, lsb_b = size.lsb == 0 ? 1 : size.lsb;
    const int64_t whole = int64_t(n_expert) * int64_t(msb_b + lsb_b);
    *shared = false;
    if (precision == SLICEMOE_PRECISION_LOW) {
        *n_msb = (int) std::min<int64_t>(n_expert, budget / int64_t(msb_b));
        *n_lsb = 0;
    } else if (precision == SLICEMOE_PRECISION_HIGH || budget >= whole) {
        *n_msb = *n_lsb = (int) std::min<int64_t>(n_expert, budget / int64_t(msb_b + lsb_b));
    } else if (share_slots && msb_share <= 0.0f) {
        // DBSC's adaptive split: every slot may hold either kind, and the policy's eviction
        // order decides how many of each the layer keeps
        *n_msb = *n_lsb = (int) std::min<int64_t>(2 * int64_t(n_expert), budget / int64_t(msb_b));
        *shared = true;
    } else {
        // a fixed split: a share of the layer's bytes (two thirds unless asked otherwise) for MSB
        // slots (every use needs one), the rest for the LSB slices of the uses that run at 8 bits
        const double share = msb_share > 0.0f ? double(msb_share) : 2.0 / 3.0;
        const int64_t for_msb = std::max<int64_t>(int64_t(top_k) * int64_t(msb_b), int64_t(double(budget) * share));
        *n_msb = (int) std::min<int64_t>(n_expert, for_msb / int64_t(msb_b));
        *n_lsb = (int) std::min<int64_t>(n_expert, (budget - int64_t(*n_msb) * int64_t(msb_b)) / int64_t(lsb_b));
    }
}

int64_t min_layer_budget(int precision, int top_k, slice_sizes size) {
    return int64_t(top_k) * int64_t(precision == SLICEMOE_PRECISION_HIGH ? size.msb + size.lsb : size.msb);
}

bool tensor_source(gguf_context * g, const ggml_tensor * t, int64_t * offset, std::string * error) {
    const int64_t id = gguf_find_tensor(g, ggml_get_name(t));
    if (id < 0) {
        *error = std::string("tensor ") + ggml_get_name(t) + " not found in the file";
        return false;
    }
    *offset = int64_t(gguf_get_data_offset(g) + gguf_get_tensor_offset(g, id));
    return true;
}

// The file range of one expert's slice of projection j.
slice_read slice_range(const pool & p, int j, int expert, uint8_t * dst) {
    slice_read r;
    r.bytes = p.expert_bytes[j];
    r.offset = p.file_offset[j] + int64_t(expert) * int64_t(r.bytes);
    r.dst = dst;
    return r;
}

// Assign `expert`'s slice to `slot` now and queue its read for flush_loads. The slot is claimed
// until then, so that no later victim() of the same step gives it to another slice.
void queue_load(cache & c, layer & L, pool & p, int expert, int slot) {
    p.slot_expert[slot] = expert;
    p.expert_slot[expert] = slot;
    p.uses[slot] = 0;
    p.claimed[slot] = 1;
    c.claims.push_back({ &p, slot });
    L.stats.loads += 1;
    L.stats.flash_bytes += int64_t(p.slice_bytes);
    c.totals.loads += 1;
    c.totals.flash_bytes += int64_t(p.slice_bytes);
    if (!c.simulated) {
        c.pending.push_back({ &L, &p, expert, slot, {} });
    }
}

// A step that fails before its reads: the slots it assigned hold nothing, so they are emptied.
void abandon_loads(cache & c) {
    for (const pending_load & q : c.pending) {
        if (q.p->slot_expert[q.slot] == q.expert) {
            q.p->slot_expert[q.slot] = -1;
            q.p->expert_slot[q.expert] = -1;
        }
    }
    c.pending.clear();
    for (const auto & [p, slot] : c.claims) p->claimed[slot] = 0;
    c.claims.clear();
}

// Read every queued slice at once. false (c.failed, c.error) when a read failed: the slots of
// the slices that failed are left empty, never half-filled.
bool flush_loads(cache & c) {
    for (const auto & [p, slot] : c.claims) p->claimed[slot] = 0;
    c.claims.clear();
    if (c.pending.empty()) return true;
    std::vector<slice_read> reads;
    reads.reserve(c.pending.size() * N_PROJ);
    for (pending_load & q : c.pending) {
        for (int j = 0; j < N_PROJ; ++j) {
            ggml_tensor * t = q.p->t[j];
            uint8_t * dst = nullptr;
            if (ggml_backend_buffer_is_host(t->buffer)) {
                dst = (uint8_t *) t->data + size_t(q.slot) * t->nb[2];
            } else {
                q.staging[j].resize(q.p->expert_bytes[j]);
                dst = q.staging[j].data();
            }
            slice_read r = slice_range(*q.p, j, q.expert, dst);
            r.fail = c.reads_left == 0;
            if (c.reads_left > 0) --c.reads_left;
            reads.push_back(r);
        }
    }
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<char> failed;
    std::string error;
    const bool ok = c.io->read(reads, &failed, &error);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    c.totals.io_ms += ms;
    c.pending.front().L->stats.io_ms += ms;   // a step's loads are one layer's
    int first_failed = -1;
    for (size_t i = 0; i < c.pending.size(); ++i) {
        pending_load & q = c.pending[i];
        const bool bad = failed[i * N_PROJ] || failed[i * N_PROJ + 1] || failed[i * N_PROJ + 2];
        if (bad) {
            if (first_failed < 0) first_failed = int(i);
            if (q.p->slot_expert[q.slot] == q.expert) {
                q.p->slot_expert[q.slot] = -1;
                q.p->expert_slot[q.expert] = -1;
            }
            continue;
        }
        for (int j = 0; j < N_PROJ; ++j) {
            if (!q.staging[j].empty()) {
                ggml_backend_tensor_set(q.p->t[j], q.staging[j].data(), size_t(q.slot) * q.p->t[j]->nb[2], q.staging[j].size());
            }
        }
    }
    if (!ok) {
        const pending_load & q = c.pending[size_t(std::max(first_failed, 0))];
        c.failed = true;
        c.error = "reading expert " + std::to_string(q.expert) + " of layer " + std::to_string(q.L->il) +
                  " from the model file failed: " + error;
    }
    c.pending.clear();
    return ok;
}

void evict(cache & c, layer & L, pool & p, int slot) {
    const int old = p.slot_expert[slot];
    if (old < 0) return;
    p.expert_slot[old] = -1;
    p.slot_expert[slot] = -1;
    L.stats.evictions += 1;
    c.totals.evictions += 1;
    // an LSB slice is useless without its MSB slice
    if (&p == &L.msb && L.lsb.n_slots > 0 && L.lsb.expert_slot[old] >= 0) {
        evict(c, L, L.lsb, L.lsb.expert_slot[old]);
    }
}

// The pool whose slice is in slot s: p, or with shared slots the MSB or the LSB pool.
const pool & owner(const layer & L, const pool & p, int s) {
    if (!L.shared_slots) return p;
    return L.lsb.slot_expert[size_t(s)] >= 0 ? L.lsb : L.msb;
}

pool & owner(layer & L, pool & p, int s) {
    return const_cast<pool &>(owner(static_cast<const layer &>(L), static_cast<const pool &>(p), s));
}

// The slot to replace for the current token: an empty one first, never one the token already
// uses or a load of this step claimed, else the lowest key of the policy's eviction order (ties:
// least recently used). -1 if none.
int victim(const cache & c, const layer & L, const pool & p) {
    int best = -1;
    double best_key = 0.0;
    uint64_t best_use = 0;
    for (int s = 0; s < p.n_slots; ++s) {
        // a slot a load of this step goes to is never given again within the step, even when the
        // slice it receives was evicted since (an LSB slice dropped with its MSB slice): its read
        // is in flight, and a second read into it would race
        if (p.claimed[s] || (L.shared_slots && (L.msb.claimed[s] || L.lsb.claimed[s]))) continue;
        const pool & q = owner(L, p, s);
        if (q.slot_expert[s] < 0) return s;
        if (q.last_use[s] == c.clock) continue;
        const slice_view slice = { L.index, L.event, &q == &L.msb ? 0 : 1, q.slot_expert[s], q.last_use[s], q.uses[s] };
        const double key = c.pol->iface->evict_key(*c.pol, slice);
        if (best < 0 || key < best_key || (key == best_key && q.last_use[s] < best_use)) {
            best = s;
            best_key = key;
            best_use = q.last_use[s];
        }
    }
    return best;
}

// Give slot s of pool p (or of the pool sharing its slots) to a new slice.
void free_slot(cache & c, layer & L, pool & p, int slot) {
    evict(c, L, owner(L, p, slot), slot);
}

// Make `expert`'s slice resident in pool p; false if no slot is free for it or the read failed.
bool ensure(cache & c, layer & L, pool & p, int expert, bool * hit) {
    int slot = p.expert_slot[expert];
    *hit = slot >= 0;
    if (slot < 0) {
        slot = victim(c, L, p);
        if (slot < 0) return false;
        free_slot(c, L, p, slot);
        queue_load(c, L, p, expert, slot);
    }
    p.last_use[slot] = c.clock;
    p.uses[slot] += 1;
    return true;
}

// PCW: before the layer's first decode token, load the slices the prompt used most (recent tokens
// weigh more): MSB slices for as many as fit, LSB slices for the top of that list.
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
            c.totals.warmup_loads += 1;
        }
        if (rank < L.lsb.n_slots && rank < c.top_k && L.lsb.expert_slot[e] < 0 && L.msb.expert_slot[e] >= 0) {
            const int slot = victim(c, L, L.lsb);
            if (slot < 0) continue;
            free_slot(c, L, L.lsb, slot);
            queue_load(c, L, L.lsb, e, slot);
            c.totals.warmup_loads += 1;
        }
    }
    flush_loads(c);
}

// llama.cpp maps the file and prefetches all of it; the expert tensors are only read by prefill,
// so their pages are handed back (to the file, not dropped as data) after loading and after each
// prompt, and resident memory is the pools plus the dense weights.
void release_mapped(cache & c) {
    if (!c.mapped) return;
    const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
    for (const layer & L : c.layers) {
        for (const ggml_tensor * t : L.mapped) {
            const uintptr_t begin = (uintptr_t(t->data) + page - 1) / page * page;
            const uintptr_t end = (uintptr_t(t->data) + ggml_nbytes(t)) / page * page;
            if (end > begin) {
                madvise((void *) begin, end - begin, MADV_DONTNEED);
            }
        }
    }
#if defined(POSIX_FADV_DONTNEED)
    posix_fadvise(c.io->fd(), 0, 0, POSIX_FADV_DONTNEED);
#endif
}

// The policy for one decode token of one layer: ids are the token's experts, best first, and
// weights their routing probabilities (0 where not observed).
// Look-ahead prefetch: while layer L's predecessor computes, load the predicted experts' MSB slices
// into L's pool on the reader threads. The slots are chosen here, on the compute thread (least
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

// A resident slice of `expert` is not a victim within the current step (victim skips last_use == clock).
void protect_for_step(cache & c, pool & p, int expert) {
    const int slot = p.n_slots > 0 ? p.expert_slot[size_t(expert)] : -1;
    if (slot >= 0) p.last_use[size_t(slot)] = c.clock;
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
            if (high && L.lsb.n_slots > 0) {
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
    if (!flush_loads(c)) {   // all the step's misses at once
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
    L.warm_pending = c.warmup == SLICEMOE_WARMUP_PCW;
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

void set_selection_bias(cache & c, layer & L, const ggml_tensor * logits) {
    std::vector<float> v(size_t(c.n_expert));
    ggml_backend_tensor_get(logits, v.data(), 0, v.size() * sizeof(float));
    const std::vector<float> bias = selection_bias(c, L, v);
    ggml_backend_tensor_set(L.sel_bias, bias.data(), 0, bias.size() * sizeof(float));
    if (c.record) {
        L.last_logits = std::move(v);
    }
}

} // namespace

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
        return true;
    }
    if (index == 0) {
        c.totals.decode_tokens += n_tokens;
        if (c.pol->iface->begin_token) {
            c.pol->iface->begin_token(*c.pol, c.totals.decode_tokens);
        }
        if (c.prompt_seen) {
            c.prompt_seen = false;
            release_mapped(c);   // the prompt streamed the experts through the mapping
        }
    }
    const bool ok = serve_step(c, L, n_tokens, ids, stride, weights);
    L.event += 1;
    return ok;
}

namespace {

// "ffn_moe_topk-12" -> (true, 12)
bool parse_node(const char * name, const char * prefix, int * il) {
    const size_t n = strlen(prefix);
    if (strncmp(name, prefix, n) != 0 || name[n] != '-') return false;
    char * end = nullptr;
    const long v = strtol(name + n + 1, &end, 10);
    if (end == name + n + 1 || *end != '\0') return false;
    *il = int(v);
    return true;
}

} // namespace

void init_pool(pool & p, int n_slots, int n_expert) {
    p.n_slots = n_slots;
    p.slot_expert.assign(n_slots, -1);
    p.expert_slot.assign(n_expert, -1);
    p.last_use.assign(n_slots, 0);
    p.uses.assign(n_slots, 0);
    p.claimed.assign(n_slots, 0);
}

void set_policy(cache & c, const policy_params & params, int n_layers) {
    c.pol = make_policy(params, { n_layers, c.n_expert, c.top_k });
    c.precision = c.pol->precision;
}


// Slot counts per MoE layer: each layer gets the minimum it needs to run, and the rest of the
// budget in proportion to what the layer could still use (split_budget within each layer), so
// layers of different sizes keep the same fraction; or, for whole-expert policies, explicit
// per-layer counts (the planner's DP allocation). Checks the minimum and the budget; false with
// *error set otherwise.
bool slot_counts(const cache & c, const std::vector<slice_sizes> & sizes, bool slices_alike, float msb_share,
                 const int32_t * layer_slots, int32_t n_layer_slots, slot_plan * out, std::string * error) {
    const int n_layers = int(sizes.size());
    const bool low = c.precision == SLICEMOE_PRECISION_LOW;
    std::vector<int64_t> minimum((size_t) n_layers), room((size_t) n_layers);
    int64_t min_total = 0, room_total = 0;
    for (int i = 0; i < n_layers; ++i) {
        const slice_sizes & size = sizes[size_t(i)];
        minimum[size_t(i)] = min_layer_budget(c.precision, c.top_k, size);
        room[size_t(i)] = int64_t(c.n_expert) * int64_t(size.msb + (low ? 0 : size.lsb)) - minimum[size_t(i)];
        min_total += minimum[size_t(i)];
        room_total += room[size_t(i)];
    }
    if (c.budget < min_total) {
        *error = "cache budget " + format_bytes(c.budget) + " is below the minimum that can run, " +
                 format_bytes(min_total) + " (" + std::to_string(c.top_k) + " " +
                 (c.precision == SLICEMOE_PRECISION_HIGH ? "MSB+LSB" : "MSB") + " expert slices in each of " +
                 std::to_string(n_layers) + " MoE layers)";
        return false;
    }
    out->msb.assign(size_t(n_layers), 0);
    out->lsb.assign(size_t(n_layers), 0);
    out->shared.assign(size_t(n_layers), 0);
    if (layer_slots == nullptr || n_layer_slots == 0) {
        const int64_t spare = c.budget - min_total;
        const bool share_slots = c.pol->iface->shares_slots && slices_alike;
        for (int i = 0; i < n_layers; ++i) {
            const int64_t extra = room_total > 0 ? int64_t((long double) spare * room[size_t(i)] / room_total) : 0;
            bool shared = false;
            split_budget(minimum[size_t(i)] + extra, c.precision, c.n_expert, c.top_k, sizes[size_t(i)], msb_share,
                         share_slots, &out->msb[size_t(i)], &out->lsb[size_t(i)], &shared);
            out->shared[size_t(i)] = shared;
        }
        return true;
    }
    if (n_layer_slots != n_layers || c.precision != SLICEMOE_PRECISION_HIGH) {
        *error = "per-layer slots need one count per MoE layer (" + std::to_string(n_layers) +
                 ") and a whole-expert policy (lru8, lfu8, adapmoe, belady)";
        return false;
    }
    int64_t bytes = 0;
    for (int i = 0; i < n_layers; ++i) {
        if (layer_slots[i] < c.top_k || layer_slots[i] > c.n_expert) {
            *error = "layer " + std::to_string(i) + ": " + std::to_string(layer_slots[i]) + " slots, need " +
                     std::to_string(c.top_k) + " to " + std::to_string(c.n_expert);
            return false;
        }
        out->msb[size_t(i)] = out->lsb[size_t(i)] = layer_slots[i];
        bytes += int64_t(layer_slots[i]) * int64_t(sizes[size_t(i)].msb + sizes[size_t(i)].lsb);
    }
    if (bytes > c.budget) {
        *error = "per-layer slots need " + format_bytes(bytes) + ", more than the budget " + format_bytes(c.budget);
        return false;
    }
    return true;
}

namespace {

// An engine with no pools: it records routing (tracing a run without a budget) or, for a sliced
// model, only sets the precision of the mapped experts.
std::unique_ptr<cache> build_uncached(const llama_model * model, const slicemoe_model_params & params,
                                      const std::vector<const llama_layer *> & moe, const std::vector<int> & moe_il) {
    auto c = std::make_unique<cache>();
    c->model = model;
    c->n_expert = int(model->hparams.n_expert);
    c->top_k = int(model->hparams.n_expert_used_max());
    set_policy(*c, policy_params::of(params), int(moe_il.size()));
    c->observe_only = true;
    c->record = params.record_trace;
    c->precision_only = !params.record_trace;
    c->layers.resize(moe_il.size());
    for (size_t i = 0; i < moe_il.size(); ++i) {
        layer & L = c->layers[i];
        L.index = int(i);
        L.il = moe_il[i];
        L.stats.layer = moe_il[i];
        L.prompt_score.assign(size_t(c->n_expert), 0.0);
        const llama_layer & ml = *moe[i];
        const ggml_tensor * mapped[2 * N_PROJ] = { ml.ffn_up_exps, ml.ffn_gate_exps, ml.ffn_down_exps,
                                                   ml.ffn_up_exps_lsb, ml.ffn_gate_exps_lsb, ml.ffn_down_exps_lsb };
        std::copy(mapped, mapped + 2 * N_PROJ, L.mapped);
        c->layer_of_il[moe_il[i]] = int(i);
    }
    return c;
}

// The host pools of ctx in one page-aligned allocation, each tensor on a page boundary: a slot of
// a slice size that is a multiple of 4 KiB then takes an O_DIRECT read straight into place.
// nullptr when the memory cannot be had.
ggml_backend_buffer_t alloc_page_aligned(ggml_context * ctx, std::vector<void *> * owned) {
    constexpr size_t page = 4096;
    size_t size = 0;
    for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
        size += GGML_PAD(ggml_nbytes(t), page);
    }
    void * memory = std::aligned_alloc(page, std::max(size, page));
    if (!memory) return nullptr;
    owned->push_back(memory);
    ggml_backend_buffer_t buf = ggml_backend_cpu_buffer_from_ptr(memory, std::max(size, page));
    size_t offset = 0;
    for (ggml_tensor * t = ggml_get_first_tensor(ctx); t && buf; t = ggml_get_next_tensor(ctx, t)) {
        if (ggml_backend_tensor_alloc(buf, t, static_cast<uint8_t *>(memory) + offset) != GGML_STATUS_SUCCESS) {
            ggml_backend_buffer_free(buf);
            return nullptr;
        }
        offset += GGML_PAD(ggml_nbytes(t), page);
    }
    return buf;
}

// nullptr on failure, with *error and *status (SLICEMOE_ERR_INVALID_ARG for a budget or parameters
// that cannot run, SLICEMOE_ERR_NO_MEMORY when the pools cannot be allocated, SLICEMOE_ERR_IO when
// the file cannot be opened or read).
std::unique_ptr<cache> build_cache(const llama_model * model, const char * path, const slicemoe_model_params & params,
                                   const std::vector<const llama_layer *> & moe, const std::vector<int> & moe_il,
                                   std::string * error, int * status) {
    *status = SLICEMOE_ERR_INVALID_ARG;
    auto c = std::make_unique<cache>();
    c->model = model;
    c->n_expert = int(model->hparams.n_expert);
    c->top_k = int(model->hparams.n_expert_used_max());
    set_policy(*c, policy_params::of(params), int(moe.size()));
    c->warmup = params.warmup;
    c->record = params.record_trace;
    c->prefetch = params.prefetch;
    c->budget = params.cache_budget_bytes;

    gguf_init_params gp = { /*no_alloc*/ true, /*ctx*/ nullptr };
    gguf_context * g = gguf_init_from_file(path, gp);
    if (!g) {
        *error = std::string("cannot read the tensor index of '") + path + "'";
        return nullptr;
    }
    // each MoE layer's own slice sizes (layers may differ); a slot can hold an MSB or an LSB slice
    // when the two have one type and shape in every projection of every layer
    const int64_t n_layers = int64_t(moe.size());
    std::vector<slice_sizes> sizes((size_t) n_layers);
    bool alike = true;
    for (int64_t i = 0; i < n_layers; ++i) {
        const llama_layer & ml = *moe[size_t(i)];
        const ggml_tensor * msb_t[N_PROJ] = { ml.ffn_up_exps, ml.ffn_gate_exps, ml.ffn_down_exps };
        const ggml_tensor * lsb_t[N_PROJ] = { ml.ffn_up_exps_lsb, ml.ffn_gate_exps_lsb, ml.ffn_down_exps_lsb };
        for (int j = 0; j < N_PROJ; ++j) {
            sizes[size_t(i)].msb += msb_t[j]->nb[2];
            sizes[size_t(i)].lsb += lsb_t[j]->nb[2];
            alike = alike && lsb_t[j]->type == msb_t[j]->type && lsb_t[j]->ne[0] == msb_t[j]->ne[0] &&
                    lsb_t[j]->ne[1] == msb_t[j]->ne[1];
        }
    }
    slot_plan plan;
    if (!layer_settings_fit(c->pol->params, int(n_layers), error) ||
        !slot_counts(*c, sizes, alike, params.msb_share, params.layer_slots, params.n_layer_slots, &plan, error)) {
        gguf_free(g);
        return nullptr;
    }

    const size_t n_tensors = size_t(n_layers) * (2 * N_PROJ + 5);
    // The pools of a layer live where llama.cpp runs that layer (CPU, or the Vulkan/Metal device of
    // an offloaded layer), one buffer per buffer type; misses reach a device by tensor_set.
    // The small remap tables get buffers of their own, so a pool buffer's size is slices only.
    std::map<std::pair<ggml_backend_buffer_type_t, bool>, ggml_context *> ctx_of;
    auto ctx_for = [&](int il, bool tables) {
        const auto key = std::make_pair(ggml_backend_dev_buffer_type(model->dev_layer(il)), tables);
        auto it = ctx_of.find(key);
        if (it != ctx_of.end()) return it->second;
        ggml_init_params ip = { ggml_tensor_overhead() * n_tensors, nullptr, /*no_alloc*/ true };
        ggml_context * ctx = ggml_init(ip);
        c->ctxs.push_back(ctx);
        ctx_of[key] = ctx;
        return ctx;
    };
    c->layers.resize(size_t(n_layers));
    bool ok = true;
    for (int64_t i = 0; i < n_layers && ok; ++i) {
        const llama_layer & ml = *moe[i];
        layer & L = c->layers[i];
        L.index = int(i);
        L.il = moe_il[i];
        L.stats.layer = L.il;
        L.prompt_score.assign(c->n_expert, 0.0);
        const ggml_tensor * msb[N_PROJ] = { ml.ffn_up_exps, ml.ffn_gate_exps, ml.ffn_down_exps };
        const ggml_tensor * lsb[N_PROJ] = { ml.ffn_up_exps_lsb, ml.ffn_gate_exps_lsb, ml.ffn_down_exps_lsb };
        const int n_msb = plan.msb[size_t(i)], n_lsb = plan.lsb[size_t(i)];
        L.shared_slots = plan.shared[size_t(i)];
        ggml_context * ctx = ctx_for(L.il, false);
        ggml_context * tables = ctx_for(L.il, true);
        init_pool(L.msb, n_msb, c->n_expert);
        init_pool(L.lsb, n_lsb, c->n_expert);
        for (int j = 0; j < N_PROJ; ++j) {
            L.mapped[j] = msb[j];
            L.mapped[N_PROJ + j] = lsb[j];
        }
        for (int j = 0; j < N_PROJ && ok; ++j) {
            L.msb.t[j] = ggml_new_tensor_3d(ctx, msb[j]->type, msb[j]->ne[0], msb[j]->ne[1], n_msb);
            L.msb.expert_bytes[j] = msb[j]->nb[2];
            L.msb.slice_bytes += msb[j]->nb[2];
            ok = tensor_source(g, msb[j], &L.msb.file_offset[j], error);
            if (n_lsb > 0 && ok) {
                // shared slots: one tensor, which the LSB products index with their own slot table
                L.lsb.t[j] = L.shared_slots ? L.msb.t[j]
                                            : ggml_new_tensor_3d(ctx, lsb[j]->type, lsb[j]->ne[0], lsb[j]->ne[1], n_lsb);
                L.lsb.expert_bytes[j] = lsb[j]->nb[2];
                L.lsb.slice_bytes += lsb[j]->nb[2];
                ok = tensor_source(g, lsb[j], &L.lsb.file_offset[j], error);
            }
        }
        L.msb_map = ggml_new_tensor_3d(tables, GGML_TYPE_I32, 1, c->n_expert, 1);
        L.cpu_pools = ggml_backend_dev_buffer_type(model->dev_layer(L.il)) == ggml_backend_cpu_buffer_type();
        if (c->pol->iface->router_bias) {
            L.sel_bias = ggml_new_tensor_1d(tables, GGML_TYPE_F32, c->n_expert);
        }
        if (c->pol->iface->drop_use) {
            L.keep = ggml_new_tensor_3d(tables, GGML_TYPE_F32, 1, c->n_expert, 1);
        }
        if (n_lsb > 0) {
            L.lsb_map  = ggml_new_tensor_3d(tables, GGML_TYPE_I32, 1, c->n_expert, 1);
            L.lsb_mask = ggml_new_tensor_3d(tables, GGML_TYPE_F32, 1, c->n_expert, 1);
        }
        L.stats.msb_slots = n_msb;
        L.stats.lsb_slots = n_lsb;
        if (c->prefetch && i + 1 < n_layers) {
            L.next_router = moe[size_t(i + 1)]->ffn_gate_inp;
        }
        L.prefetched.assign(size_t(c->n_expert), 0);
        c->layer_of_il[L.il] = int(i);
    }
    gguf_free(g);
    if (!ok) return nullptr;

    for (const auto & [key, ctx] : ctx_of) {
        const auto [buft, tables] = key;
        ggml_backend_buffer_t buf = !tables && buft == ggml_backend_cpu_buffer_type()
                                        ? alloc_page_aligned(ctx, &c->host_memory)
                                        : ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
        if (!buf) {
            *error = "cannot allocate the slice pools (" + format_bytes(c->budget) + ") in " + ggml_backend_buft_name(buft) +
                     ": out of memory; try a smaller --cache-budget";
            *status = SLICEMOE_ERR_NO_MEMORY;
            return nullptr;
        }
        ggml_backend_buffer_clear(buf, 0);
        c->bufs.push_back(buf);
        if (!tables && !ggml_backend_buffer_is_host(buf)) {
            c->totals.device_pool_bytes += int64_t(ggml_backend_buffer_get_size(buf));
        }
    }
    if (c->prefetch && c->totals.device_pool_bytes > 0) {
        // prefetch reads land in the pools from the reader threads; device backends are not
        // known here to take uploads concurrently with a running graph
        *error = "look-ahead prefetch needs the pools on the host in this version: use it without -ngl";
        return nullptr;
    }
    c->io = slice_reader::open(path, params.io_mode, READER_THREADS, error);
    if (!c->io) {
        *status = SLICEMOE_ERR_IO;
        return nullptr;
    }
    c->totals.io_direct = c->io->direct();
    for (const layer & L : c->layers) {
        for (int j = 0; j < N_PROJ; ++j) {
            c->totals.pool_bytes += int64_t(ggml_nbytes(L.msb.t[j]));
            if (L.lsb.t[j] && !L.shared_slots) c->totals.pool_bytes += int64_t(ggml_nbytes(L.lsb.t[j]));
        }
    }
    c->totals.budget_bytes = c->budget;
    // A budget that holds every slice needs no policy: load them all now, in file order, as the
    // stock path would, so decode starts with no compulsory misses.
    for (layer & L : c->layers) {
        const bool everything = !L.shared_slots && L.msb.n_slots == c->n_expert &&
                                (L.lsb.n_slots == c->n_expert || c->precision == SLICEMOE_PRECISION_LOW);
        for (int e = 0; everything && e < c->n_expert; ++e) {
            queue_load(*c, L, L.msb, e, e);
            if (L.lsb.n_slots > 0) queue_load(*c, L, L.lsb, e, e);
        }
        if (!flush_loads(*c)) {
            *error = c->error;
            *status = SLICEMOE_ERR_IO;
            return nullptr;
        }
    }
    c->totals.warmup_loads = c->totals.loads;
    c->mapped = params.use_mmap;
    release_mapped(*c);
    return c;
}

} // namespace

int attach(llama_model * model, const char * path, const slicemoe_model_params & params, bool sliced,
           std::string * error) {
    std::vector<const llama_layer *> moe;
    std::vector<int> moe_il;
    for (size_t il = 0; il < model->layers.size(); ++il) {
        const llama_layer & l = model->layers[il];
        const bool has_lsb = l.ffn_up_exps_lsb && l.ffn_gate_exps_lsb && l.ffn_down_exps_lsb;
        if (l.ffn_up_exps && l.ffn_gate_exps && l.ffn_down_exps && (has_lsb || !sliced)) {
            moe.push_back(&l);
            moe_il.push_back(int(il));
        }
    }
    if (moe.empty()) {
        return SLICEMOE_OK;
    }
    const policy_i * iface = policy_table(params.policy);
    if (iface && !iface->runs_live && params.cache_budget_bytes > 0) {
        *error = std::string("the ") + iface->name + " policy needs the future: it runs only in trace replay (slicemoe sim)";
        return SLICEMOE_ERR_INVALID_ARG;
    }
    std::unique_ptr<cache> c;
    if (params.cache_budget_bytes > 0) {
        int status = SLICEMOE_OK;
        c = build_cache(model, path, params, moe, moe_il, error, &status);
        if (!c) {
            return status;
        }
    } else {
        c = build_uncached(model, params, moe, moe_il);
    }
    c->sliced = sliced;
    model->slicemoe_engine = std::shared_ptr<void>(c.release(), [](void * engine) { delete static_cast<cache *>(engine); });
    return SLICEMOE_OK;
}

int n_sliced_layers(const llama_model * model) {
    const cache * c = engine_of(model);
    return c && c->sliced ? int(c->layers.size()) : 0;
}

cache * engine_of(const llama_model * model) {
    return static_cast<cache *>(model->slicemoe_engine.get());
}

cache * cache_of(const llama_model * model) {
    cache * c = engine_of(model);
    return c && !c->precision_only ? c : nullptr;
}

namespace {

bool observe_node(cache & c, ggml_tensor * t, bool ask) {
    if (c.precision_only) {
        return !ask;   // nothing to observe: the graph runs in one piece
    }
    int il = -1;
    const char * name = ggml_get_name(t);
    // router probabilities matter only to auto precision; every observed node costs a graph split
    const bool want_probs = c.record || c.pol->iface->drop_use || (c.precision == SLICEMOE_PRECISION_AUTO && !c.observe_only);
    const bool is_probs = want_probs && parse_node(name, "ffn_moe_probs", &il);
    const bool is_topk = !is_probs && parse_node(name, "ffn_moe_topk", &il);
    const bool is_logits = !is_probs && !is_topk && c.pol->iface->router_bias && !c.observe_only &&
                           parse_node(name, "ffn_moe_logits", &il);
    const bool is_ahead = !is_probs && !is_topk && !is_logits && c.prefetch && parse_node(name, "slicemoe_lookahead", &il);
    const auto it = (is_probs || is_topk || is_logits || is_ahead) ? c.layer_of_il.find(il) : c.layer_of_il.end();
    if (it == c.layer_of_il.end()) {
        return !ask;   // not ours: never requested (and keep computing if asked to report)
    }
    if (ask) {
        return true;
    }
    layer & L = c.layers[it->second];
    join_prefetch(c, L);   // before anything else, so that no prefetch outlives a failure
    if (c.failed) {
        return false;
    }
    const int64_t n_tokens = t->ne[1];
    if (is_ahead) {
        if (n_tokens == 1 && size_t(it->second + 1) < c.layers.size()) {
            std::vector<float> v(size_t(c.n_expert));
            ggml_backend_tensor_get(t, v.data(), 0, v.size() * sizeof(float));
            std::vector<int> order(size_t(c.n_expert));
            for (int e = 0; e < c.n_expert; ++e) order[size_t(e)] = e;
            std::partial_sort(order.begin(), order.begin() + c.top_k, order.end(),
                              [&](int a, int b) { return v[size_t(a)] > v[size_t(b)]; });
            order.resize(size_t(c.top_k));
            layer & next = c.layers[size_t(it->second + 1)];
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
    return access(c, it->second, phase, n_tokens, c.scratch_ids.data(), int64_t(row_stride), weights.data());
}

} // namespace

bool eval_callback(ggml_tensor * t, bool ask, void * user_data) noexcept {
    cache & c = *static_cast<cache *>(user_data);
    try {
        return observe_node(c, t, ask);
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
