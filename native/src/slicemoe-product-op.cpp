// The fused expert product as a ggml custom op (slicemoe-product.h): a layer's expert products on
// ggml's thread pool, rows claimed in chunks, each use's activations quantized once per thread, and
// (SLICEMOE_OVERLAP=1) a use's rows computed once its slots' reads have landed. The block kernels
// are slicemoe-kernels.cpp.

#include "slicemoe-product.h"

#include "ggml-backend.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace slicemoe {

namespace {

const char * row_of(const ggml_tensor * t, int64_t i1, int64_t i2) {
    return static_cast<const char *>(t->data) + i1 * t->nb[1] + i2 * t->nb[2];
}

// The rows from `first` of slice `id` of operand `operand` (0: MSB, 1: LSB): a slot of the pool
// tensor, or, for an id at or past the pool's slots, expert id - n_slots of the file's mapped tensor
// (src[5] and src[6]: a prompt reads what the pools hold from them and the rest from the file).
const q4_1_block * slice_rows(const ggml_tensor * dst, int operand, int64_t first, int32_t id) {
    const ggml_tensor * pool = dst->src[operand == 0 ? 0 : 3];
    const ggml_tensor * file = dst->src[operand == 0 ? 5 : 6];
    const bool from_file = file && id >= pool->ne[2];
    return reinterpret_cast<const q4_1_block *>(from_file ? row_of(file, first, id - pool->ne[2]) : row_of(pool, first, id));
}

int32_t id_at(const ggml_tensor * ids, int64_t use, int64_t token) {
    return *reinterpret_cast<const int32_t *>(static_cast<const char *>(ids->data) + use * ids->nb[0] + token * ids->nb[1]);
}

// The LSB slice of a use with MSB id `slot`, or -1 (a 4-bit use): ids_lsb is [k, n_tokens], or [k, 1]
// for the last token alone (a 4-bit prompt's last row at 8 bits)
int32_t lsb_id_at(const ggml_tensor * ids_lsb, int32_t slot, int64_t use, int64_t token, int64_t n_tokens) {
    if (slot < 0 || !ids_lsb) return -1;
    if (ids_lsb->ne[1] == n_tokens) return id_at(ids_lsb, use, token);
    return token == n_tokens - 1 ? id_at(ids_lsb, use, 0) : -1;
}

// Until the reads of rows [first, last) of a slot (row_bytes each) have landed (true) or one failed
// (false); a resident slot is ready at once. The wait sleeps in short steps: the reader threads need
// the cores' time to finish the reads (a spinning wait took it from them), and a chunk read takes
// hundreds of microseconds.
bool wait_for_rows(const product_ready * ready, const std::vector<int32_t> & read_of, int32_t slot, int64_t first,
                   int64_t last, size_t row_bytes, int64_t * waited_ns) {
    if (!ready || !ready->pending() || slot < 0 || size_t(slot) >= read_of.size() || read_of[size_t(slot)] < 0) {
        return true;
    }
    const int64_t first_chunk = first * int64_t(row_bytes) / ready->chunk_bytes;
    const int64_t last_chunk = (last * int64_t(row_bytes) - 1) / ready->chunk_bytes;
    for (int64_t chunk = first_chunk; chunk <= last_chunk; ++chunk) {
        const std::atomic<uint8_t> & state = ready->state[read_of[size_t(slot)] + chunk];
        uint8_t now = state.load(std::memory_order_acquire);
        if (now == 0) {
            const auto t0 = std::chrono::steady_clock::now();
            while ((now = state.load(std::memory_order_acquire)) == 0) {
                std::this_thread::sleep_for(std::chrono::microseconds(20));
            }
            *waited_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
        }
        if (now != 1) return false;
    }
    return true;
}

// The rows [begin, end) of dst; *quantized says which activations act holds (-1: none yet).
void product_rows(ggml_tensor * dst, const product_ready * ready, int64_t begin, int64_t end, quantized_activations & act,
                  int64_t * quantized, int64_t * waited_ns) {
    const ggml_tensor * w = dst->src[0];        // Q4_1 [n_in, n_out, n_slots]
    const ggml_tensor * x = dst->src[1];        // F32  [n_in, k or 1, n_tokens]
    const ggml_tensor * ids = dst->src[2];      // I32  [k, n_tokens]
    const ggml_tensor * ids_lsb = dst->src[4];  // I32  [k, n_tokens], or nullptr (4 bits only)
    const int64_t n_in = w->ne[0], n_out = w->ne[1], k = ids->ne[0];
    // one token's uses in the order the engine gave (resident slices first), so that the threads
    // compute those while the misses are still being read
    const bool reordered = ready && ready->pending() && int64_t(ready->order.size()) == k && ids->ne[1] == 1;
    for (int64_t row = begin; row < end;) {
        const int64_t position = (row / n_out) % k, token = row / (n_out * k);
        const int64_t use = reordered ? ready->order[size_t(position)] : position;
        const int64_t first = row % n_out, last = std::min(n_out, first + (end - row));
        row += last - first;
        float * out = reinterpret_cast<float *>(const_cast<char *>(row_of(dst, use, token)));
        const int32_t slot = id_at(ids, use, token);
        const int32_t slot_lsb = lsb_id_at(ids_lsb, slot, use, token, ids->ne[1]);
        // (the two slices of an expert have one type and shape: one row size for both)
        if (slot >= 0 && ready && !(wait_for_rows(ready, ready->msb_read, slot, first, last, w->nb[1], waited_ns) &&
                                    wait_for_rows(ready, ready->lsb_read, slot_lsb, first, last, w->nb[1], waited_ns))) {
            std::memset(out + first, 0, size_t(last - first) * sizeof(float));   // the ubatch fails
            continue;
        }
        if (slot < 0) {
            std::memset(out + first, 0, size_t(last - first) * sizeof(float));
            continue;
        }
        const int64_t column = x->ne[1] == 1 ? 0 : use;
        if (token * x->ne[1] + column != *quantized) {
            quantize_activations(KERNEL_AUTO, reinterpret_cast<const float *>(row_of(x, column, token)), n_in, &act);
            *quantized = token * x->ne[1] + column;
        }
        const q4_1_block * msb = slice_rows(dst, 0, first, slot);
        const q4_1_block * lsb = slot_lsb >= 0 ? slice_rows(dst, 1, first, slot_lsb) : nullptr;
        rows_dot(KERNEL_AUTO, msb, lsb, int64_t(w->nb[1] / sizeof(q4_1_block)), act, last - first, out + first);
    }
}

// A ubatch of several tokens: its uses grouped by the slices they read, so that a chunk of an
// expert's rows is read from memory once for every token that uses it, and stays in the core's
// cache while they do (one token at a time, a full expert's rows left it before the next token).
// Every thread builds the same groups, a sort of at most k * n_tokens pairs.
struct use_group {
    int32_t slot, slot_lsb;
    std::vector<std::pair<int32_t, int32_t>> uses;   // (use, token)
};

void group_uses(const ggml_tensor * ids, const ggml_tensor * ids_lsb, std::vector<use_group> * groups) {
    struct keyed { int32_t slot, slot_lsb, use, token; };
    std::vector<keyed> all;
    for (int64_t token = 0; token < ids->ne[1]; ++token) {
        for (int64_t use = 0; use < ids->ne[0]; ++use) {
            const int32_t slot = id_at(ids, use, token);
            all.push_back({ slot, lsb_id_at(ids_lsb, slot, use, token, ids->ne[1]), int32_t(use), int32_t(token) });
        }
    }
    std::stable_sort(all.begin(), all.end(), [](const keyed & a, const keyed & b) {
        return a.slot != b.slot ? a.slot < b.slot : a.slot_lsb < b.slot_lsb;
    });
    groups->clear();
    for (const keyed & u : all) {
        if (groups->empty() || groups->back().slot != u.slot || groups->back().slot_lsb != u.slot_lsb) {
            groups->push_back({ u.slot, u.slot_lsb, {} });
        }
        groups->back().uses.emplace_back(u.use, u.token);
    }
}

// Work item `item` of the grouped product: rows [first, first + GROUP_ROWS) of one group's expert,
// for each of its uses. acts[token * columns + column] holds that vector quantized once its flag is set.
void product_group_rows(ggml_tensor * dst, const product_ready * ready, const std::vector<use_group> & groups,
                        int64_t item, std::vector<quantized_activations> & acts, std::vector<uint8_t> & quantized,
                        int64_t * waited_ns) {
    const ggml_tensor * w = dst->src[0], * x = dst->src[1];
    const int64_t n_in = w->ne[0], n_out = w->ne[1], columns = x->ne[1];
    const int64_t chunks_per_group = (n_out + GROUP_ROWS - 1) / GROUP_ROWS;
    const use_group & group = groups[size_t(item / chunks_per_group)];
    const int64_t first = item % chunks_per_group * GROUP_ROWS, last = std::min(n_out, first + GROUP_ROWS);
    const bool usable = group.slot >= 0 &&
                        (!ready || (wait_for_rows(ready, ready->msb_read, group.slot, first, last, w->nb[1], waited_ns) &&
                                    wait_for_rows(ready, ready->lsb_read, group.slot_lsb, first, last, w->nb[1], waited_ns)));
    const q4_1_block * msb = usable ? slice_rows(dst, 0, first, group.slot) : nullptr;
    const q4_1_block * lsb = usable && group.slot_lsb >= 0 ? slice_rows(dst, 1, first, group.slot_lsb) : nullptr;
    thread_local std::vector<const quantized_activations *> xs;
    thread_local std::vector<float *> outs;
    xs.clear();
    outs.clear();
    for (const auto & [use, token] : group.uses) {
        float * out = reinterpret_cast<float *>(const_cast<char *>(row_of(dst, use, token)));
        if (!msb) {   // a dropped use, or a read that failed (the ubatch fails)
            std::memset(out + first, 0, size_t(last - first) * sizeof(float));
            continue;
        }
        const int64_t column = columns == 1 ? 0 : use;
        const size_t which = size_t(token * columns + column);
        if (!quantized[which]) {
            quantize_activations(KERNEL_AUTO, reinterpret_cast<const float *>(row_of(x, column, token)), n_in, &acts[which]);
            quantized[which] = 1;
        }
        xs.push_back(&acts[which]);
        outs.push_back(out + first);
    }
    rows_dot_tokens(KERNEL_AUTO, msb, lsb, int64_t(w->nb[1] / sizeof(q4_1_block)), xs.data(), int(xs.size()),
                    last - first, outs.data());
}

// The op's work queue lives in the node's own op_params, after the custom op's parameters (a
// function, a count and a pointer): the next chunk to claim and how many threads have found the
// queue empty. The last of those resets both, so the node's next run (ggml reuses graphs) starts
// at zero; ggml's barrier after every node orders that reset before the next run. 32-bit counters:
// op_params is an int32_t array, so only 4-byte alignment is certain, and an atomic that is not
// naturally aligned faults on arm64 (SIGBUS).
constexpr size_t QUEUE_OFFSET = 32;
static_assert(QUEUE_OFFSET >= 3 * sizeof(void *) && QUEUE_OFFSET + 2 * sizeof(int32_t) <= GGML_MAX_OP_PARAMS &&
              QUEUE_OFFSET % sizeof(int32_t) == 0, "the queue fits in op_params after ggml_custom_op_params");

int32_t * queue_of(ggml_tensor * dst) {
    return reinterpret_cast<int32_t *>(reinterpret_cast<char *>(dst->op_params) + QUEUE_OFFSET);
}

// dst [n_out, k, n_tokens] = for each use u of token t: W[ids[u, t]] x[:, u or 0, t], plus
// W_lsb[ids_lsb[u, t]] x when that id is >= 0. A negative MSB id (a dropped use) gives a zero row.
// Threads claim chunks of output rows as they go (as ggml's mul_mat does: a thread slowed by the
// machine takes fewer), and each quantizes the activations of the uses its rows belong to (a few
// KiB, against the MiB of weights each use reads). One token's chunks run through its uses in
// order; several tokens' through their uses grouped by expert (product_group_rows). Each output
// value is computed by the same arithmetic either way.
void expert_product_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    auto * ready = static_cast<product_ready *>(userdata);
    int32_t * queue = queue_of(dst);   // [0]: chunks claimed beyond the first nth, [1]: threads done
    int64_t waited_ns = 0;
    const auto next = [&]() { return nth + int64_t(__atomic_fetch_add(&queue[0], 1, __ATOMIC_RELAXED)); };
    if (dst->ne[2] > 1) {
        thread_local std::vector<use_group> groups;
        thread_local std::vector<quantized_activations> acts;
        thread_local std::vector<uint8_t> quantized;
        group_uses(dst->src[2], dst->src[4], &groups);
        acts.resize(size_t(dst->src[1]->ne[1] * dst->src[1]->ne[2]));
        quantized.assign(acts.size(), 0);
        const int64_t n_items = int64_t(groups.size()) * ((dst->ne[0] + GROUP_ROWS - 1) / GROUP_ROWS);
        for (int64_t c = ith; c < n_items; c = next()) {
            product_group_rows(dst, ready, groups, c, acts, quantized, &waited_ns);
        }
    } else {
        const int64_t total = dst->ne[0] * dst->ne[1];
        const int64_t chunk = std::max<int64_t>(16, total / (int64_t(nth) * 8));
        const int64_t n_chunks = (total + chunk - 1) / chunk;
        thread_local quantized_activations act;
        int64_t quantized = -1;
        for (int64_t c = ith; c < n_chunks; c = next()) {
            product_rows(dst, ready, c * chunk, std::min(total, (c + 1) * chunk), act, &quantized, &waited_ns);
        }
    }
    if (waited_ns > 0) {   // the time this op was held up by reads: its slowest thread's
        std::atomic<int64_t> & longest = ready->waited_ns;
        int64_t seen = longest.load(std::memory_order_relaxed);
        while (waited_ns > seen && !longest.compare_exchange_weak(seen, waited_ns, std::memory_order_relaxed)) {
        }
    }
    if (__atomic_add_fetch(&queue[1], 1, __ATOMIC_ACQ_REL) == nth) {
        __atomic_store_n(&queue[0], 0, __ATOMIC_RELAXED);
        __atomic_store_n(&queue[1], 0, __ATOMIC_RELEASE);
    }
}

bool host_q4_1(const ggml_tensor * t) {
    return t->type == GGML_TYPE_Q4_1 && t->buffer && ggml_backend_buffer_is_host(t->buffer);
}

} // namespace

bool fused_products() {
    static const bool fused = [] {   // read once: graphs are built for every decode token
        const char * choice = std::getenv("SLICEMOE_PRODUCT");
        return !(choice && std::strcmp(choice, "ggml") == 0);
    }();
    return fused;
}

ggml_tensor * build_expert_product(ggml_context * ctx, ggml_tensor * w, ggml_tensor * w_lsb, ggml_tensor * x,
                                   ggml_tensor * ids, ggml_tensor * ids_lsb, product_ready * ready,
                                   ggml_tensor * w_file, ggml_tensor * w_lsb_file) {
    const bool fits = host_q4_1(w) && w->ne[0] % 32 == 0 && w->nb[1] % sizeof(q4_1_block) == 0 &&
                      x->type == GGML_TYPE_F32 && x->nb[0] == sizeof(float) && x->ne[0] == w->ne[0] &&
                      ids->type == GGML_TYPE_I32 && x->ne[2] == ids->ne[1] && (x->ne[1] == 1 || x->ne[1] == ids->ne[0]);
    const bool lsb_fits = !w_lsb || (host_q4_1(w_lsb) && w->ne[0] == w_lsb->ne[0] && w->ne[1] == w_lsb->ne[1] &&
                                     w->nb[1] == w_lsb->nb[1] && ids_lsb && ids_lsb->type == GGML_TYPE_I32 &&
                                     ids_lsb->ne[0] == ids->ne[0] && (ids_lsb->ne[1] == ids->ne[1] || ids_lsb->ne[1] == 1));
    // a file's tensor behind a pool: the same rows (one row size), read where the pool has no slot
    const auto same_rows = [](const ggml_tensor * pool, const ggml_tensor * file) {
        return !file || (pool && host_q4_1(file) && file->ne[0] == pool->ne[0] && file->ne[1] == pool->ne[1] &&
                         file->nb[1] == pool->nb[1]);
    };
    if (!fits || !lsb_fits || !same_rows(w, w_file) || !same_rows(w_lsb, w_lsb_file)) {
        return nullptr;
    }
    ggml_tensor * args[] = { w, x, ids, w_lsb, ids_lsb, w_file, w_lsb_file };
    const int n_args = w_file ? 7 : w_lsb ? 5 : 3;
    ggml_tensor * product = ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], ids->ne[0], ids->ne[1], 1, args, n_args,
                                           expert_product_op, GGML_N_TASKS_MAX, ready);
    ggml_format_name(product, "slicemoe_product");
    return product;
}

} // namespace slicemoe
