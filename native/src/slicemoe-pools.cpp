// The pools and the load queue: which slot a slice goes to (the policy's eviction order), the
// reads a step queues and flushes at once, evictions.

#include "slicemoe-engine.h"

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

namespace slicemoe {

namespace {

// The pool whose slice is in slot s: p, or with shared slots the MSB or the LSB pool.
const pool & owner(const layer & L, const pool & p, int s) {
    if (!L.shared_slots) return p;
    return L.lsb.slot_expert[size_t(s)] >= 0 ? L.lsb : L.msb;
}

pool & owner(layer & L, pool & p, int s) {
    return const_cast<pool &>(owner(static_cast<const layer &>(L), static_cast<const pool &>(p), s));
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

namespace {

// The projections (up 0, gate 1, down 2) in the order ggml computes a layer's products: the gated
// activation swiglu_split(gate, up) is visited source by source, so gate runs first, then up, then down.
constexpr int RUN_ORDER[N_PROJ] = { 1, 0, 2 };

// The reads of the queued slices, into their slots (or a staging buffer for a device pool), each
// slice in chunks (READ_CHUNK); q.first_read and q.n_reads say which reads are whose. Projection by
// projection in the order the layer's products run (RUN_ORDER), each in the loads' order: the
// readers claim a batch's reads in order, so with the step not waited for (defer_loads) the slices
// the first product needs land first, and the next product's are read while it computes.
std::vector<slice_read> reads_of(cache & c, std::vector<pending_load> & loads) {
    std::vector<slice_read> reads;
    for (int position = 0; position < N_PROJ; ++position) {
        const int j = RUN_ORDER[position];
        for (pending_load & q : loads) {
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
            r.cached = q.cached;
            const ggml_tensor * model_tensor = q.L->mapped[(q.p == &q.L->lsb ? N_PROJ : 0) + j];
            if (q.cached && model_tensor && model_tensor->data && model_tensor->buffer &&
                ggml_backend_buffer_is_host(model_tensor->buffer) && size_t(model_tensor->nb[2]) == r.bytes) {
                r.mapped = static_cast<const uint8_t *>(model_tensor->data) + size_t(q.expert) * model_tensor->nb[2];
            }
            if (c.reads_left > 0) --c.reads_left;
            q.first_read[j] = int32_t(reads.size());
            for (size_t done = 0; done < r.bytes || done == 0; done += size_t(c.read_chunk)) {
                slice_read chunk = r;
                chunk.offset += int64_t(done);
                chunk.bytes = std::min(r.bytes - done, size_t(c.read_chunk));
                chunk.dst += done;
                if (chunk.mapped) chunk.mapped += done;
                reads.push_back(chunk);
            }
            q.n_reads[j] = int32_t(reads.size()) - q.first_read[j];
        }
    }
    return reads;
}

// The loads' reads are done (failed[i] per read): a slice that failed leaves its slot empty, never
// half-filled; the others are uploaded where they were staged. false (c.failed, c.error) on a failure.
// report = false (reads nothing computed has waited for): a failure only empties its slot.
bool land_loads(cache & c, std::vector<pending_load> & loads, const std::vector<char> & failed, bool ok,
                const std::string & error, bool report = true) {
    int first_failed = -1;
    for (size_t i = 0; i < loads.size(); ++i) {
        pending_load & q = loads[i];
        bool bad = false;
        for (int j = 0; j < N_PROJ; ++j) {
            for (int32_t r = q.first_read[j]; r < q.first_read[j] + q.n_reads[j]; ++r) bad = bad || failed[size_t(r)];
        }
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
    if (!ok && report && !c.failed) {
        const pending_load & q = loads[size_t(std::max(first_failed, 0))];
        c.failed = true;
        c.error = "reading expert " + std::to_string(q.expert) + " of layer " + std::to_string(q.L->il) +
                  " from the model file failed: " + error;
    }
    loads.clear();
    return ok;
}

// The step's reads go to the reader threads and the fused products wait for each slot's read
// (product_ready): what is resident computes while the misses are read.
void defer_loads(cache & c, layer & L, const int32_t * ids, int k) {
    L.step_loads = std::move(c.pending);
    c.pending.clear();
    L.step_reads = c.io->submit(reads_of(c, L.step_loads), /*urgent*/ true, OVERLAPPED_IN_FLIGHT);
    for (int j = 0; j < N_PROJ; ++j) {
        product_ready & ready = L.ready[j];
        ready.msb_read.assign(size_t(L.msb.n_slots), -1);
        ready.lsb_read.assign(size_t(std::max(L.lsb.n_slots, L.shared_slots ? L.msb.n_slots : 0)), -1);
        for (const pending_load & q : L.step_loads) {
            (q.p == &L.msb ? ready.msb_read : ready.lsb_read)[size_t(q.slot)] = q.first_read[j];
        }
        ready.chunk_bytes = c.read_chunk;
        // one token: its uses whose slices are all resident first (at 8 bits a use waits for its LSB
        // slice too, the usual miss where every MSB slice fits)
        ready.order.clear();
        for (int pass = 0; ids && pass < 2; ++pass) {
            for (int r = 0; r < k; ++r) {
                const int e = ids[r];
                const bool known = e >= 0 && e < c.n_expert;
                const int slot = known ? L.msb.expert_slot[size_t(e)] : -1;
                const int slot_lsb = known && size_t(e) < L.lsb.expert_slot.size() ? L.lsb.expert_slot[size_t(e)] : -1;
                const bool pending = (slot >= 0 && ready.msb_read[size_t(slot)] >= 0) ||
                                     (slot_lsb >= 0 && size_t(slot_lsb) < ready.lsb_read.size() &&
                                      ready.lsb_read[size_t(slot_lsb)] >= 0);
                if (pending == (pass == 1)) ready.order.push_back(r);
            }
        }
        ready.waited_ns.store(0, std::memory_order_relaxed);
        ready.state = L.step_reads->state.get();
    }
}

} // namespace

bool flush_loads(cache & c, layer * deferred, const int32_t * ids, int k) {
    for (const auto & [p, slot] : c.claims) p->claimed[slot] = 0;
    c.claims.clear();
    const auto background = std::stable_partition(c.pending.begin(), c.pending.end(),
                                                  [](const pending_load & q) { return !q.background; });
    if (background != c.pending.end()) {   // one layer's step: read behind every step's misses
        layer & L = *background->L;
        L.lsb_loads.assign(std::make_move_iterator(background), std::make_move_iterator(c.pending.end()));
        c.pending.erase(background, c.pending.end());
        L.lsb_reads = c.io->submit(reads_of(c, L.lsb_loads));
    }
    if (c.pending.empty()) return true;
    if (deferred) {
        defer_loads(c, *deferred, ids, k);
        return true;
    }
    const std::vector<slice_read> reads = reads_of(c, c.pending);
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<char> failed;
    std::string error;
    const bool ok = c.io->read(reads, &failed, &error);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (c.pending.front().cached) {
        // PCW's warm-up (its loads alone are read through the page cache) runs in the prompt: its
        // time is prefill time, and the decode's io_ms, from which run derives compute per token,
        // must not carry it
        c.totals.warmup_io_ms += ms;
    } else {
        c.totals.io_ms += ms;
        c.pending.front().L->stats.io_ms += ms;   // a step's loads are one layer's
    }
    std::vector<pending_load> loads = std::move(c.pending);
    c.pending.clear();
    return land_loads(c, loads, failed, ok, error);
}

bool join_step_reads(cache & c, layer & L) {
    if (!L.step_reads) return true;
    std::string error;
    const auto t0 = std::chrono::steady_clock::now();
    const bool ok = c.io->wait(L.step_reads, &error);
    // blocked: the products' waits (each the slowest thread's) and this join's
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    for (int j = 0; j < N_PROJ; ++j) {
        ms += double(L.ready[j].waited_ns.load(std::memory_order_relaxed)) / 1e6;
        L.ready[j].state = nullptr;
    }
    c.totals.io_ms += ms;
    L.stats.io_ms += ms;
    const std::vector<char> failed = L.step_reads->failed;
    L.step_reads.reset();
    return land_loads(c, L.step_loads, failed, ok, error);
}

void join_lsb_reads(cache & c, layer & L) {
    if (L.lsb_reads) {
        std::string error;
        const auto t0 = std::chrono::steady_clock::now();
        const bool ok = c.io->wait(L.lsb_reads, &error);
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        c.totals.io_ms += ms;   // blocked only where a whole token was not time enough to read them
        L.stats.io_ms += ms;
        const std::vector<char> failed = L.lsb_reads->failed;
        L.lsb_reads.reset();
        land_loads(c, L.lsb_loads, failed, ok, error, /*report*/ false);
    }
    L.lsb_loads.clear();
    std::fill(L.lsb_loading.begin(), L.lsb_loading.end(), 0);
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
bool holds_every_slice(const cache & c, const layer & L) {
    const auto in_own_slots = [&c](const pool & p) {
        if (p.n_slots != c.n_expert) return false;
        for (int e = 0; e < c.n_expert; ++e) {
            if (p.expert_slot[size_t(e)] != e) return false;
        }
        return true;
    };
    return L.cpu_pools && !L.shared_slots && in_own_slots(L.msb) &&
           (c.precision == SLICEMOE_PRECISION_LOW || in_own_slots(L.lsb));
}

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

// A resident slice of `expert` is not a victim within the current step (victim skips last_use == clock).
void protect_for_step(cache & c, pool & p, int expert) {
    const int slot = p.n_slots > 0 ? p.expert_slot[size_t(expert)] : -1;
    if (slot >= 0) p.last_use[size_t(slot)] = c.clock;
}

} // namespace slicemoe
