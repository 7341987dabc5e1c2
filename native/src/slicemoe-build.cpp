// Construction: the engine a model gets at load (attach): the policy, the slot plan, the pools in
// the buffers where llama.cpp runs each layer, the reader, and a first load when everything fits.
//
// Without a cache every expert stays mapped from the file and the graph hook only sets the
// precision: high adds the LSB product to the MSB product (the 8-bit model), low leaves the MSB
// product alone (the 4-bit model). With a cache, decode runs the expert products on the pools
// (slicemoe-serve.cpp); prefill, compute-bound and touching most experts, runs on the mapped tensors.

#include "slicemoe-engine.h"

#include "llama-model.h"

#include "ggml-backend.h"
#include "gguf.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>
#include <sys/mman.h>

namespace slicemoe {

namespace {

bool tensor_source(gguf_context * g, const ggml_tensor * t, int64_t * offset, std::string * error) {
    const int64_t id = gguf_find_tensor(g, ggml_get_name(t));
    if (id < 0) {
        *error = std::string("tensor ") + ggml_get_name(t) + " not found in the file";
        return false;
    }
    *offset = int64_t(gguf_get_data_offset(g) + gguf_get_tensor_offset(g, id));
    return true;
}

// An engine with no pools: it records routing (tracing a run without a budget) or, for a sliced
// model, only sets the precision of the mapped experts.
std::unique_ptr<cache> build_uncached(const llama_model * model, const slicemoe_model_params & params,
                                      const std::vector<const llama_layer *> & moe, const std::vector<int> & moe_il) {
    auto c = std::make_unique<cache>();
    c->model = model;
    c->n_expert = int(model->hparams.n_expert);
    c->top_k = int(model->hparams.n_expert_used_max());
    set_policy(*c, policy_params::of(params.cache), int(moe_il.size()));
    c->observe_only = true;
    c->record = params.record_trace;
    c->precision_only = !params.record_trace;
    c->low_precision_prompt = params.low_precision_prompt;
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
// The allocation is aligned to 2 MiB and asked for transparent huge pages (where the kernel has
// them): decode streams about a gigabyte of slices per token through the pools, and on 4 KiB pages
// each 300 KiB slice crosses 75 TLB entries. nullptr when the memory cannot be had.
ggml_backend_buffer_t alloc_page_aligned(ggml_context * ctx, std::vector<std::pair<void *, size_t>> * owned) {
    constexpr size_t page = 4096;
    constexpr size_t huge_page = size_t(2) << 20;
    size_t size = 0;
    for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
        size += GGML_PAD(ggml_nbytes(t), page);
    }
    const size_t alignment = size >= huge_page ? huge_page : page;
    const size_t allocated = GGML_PAD(std::max(size, page), alignment);   // aligned_alloc: a multiple of it
    void * memory = std::aligned_alloc(alignment, allocated);
    if (!memory) return nullptr;
#ifdef MADV_HUGEPAGE
    if (alignment == huge_page) madvise(memory, allocated, MADV_HUGEPAGE);   // advice: ignored where THP is off
#endif
    owned->push_back({ memory, allocated });
    ggml_backend_buffer_t buf = ggml_backend_cpu_buffer_from_ptr(memory, allocated);
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
    set_policy(*c, policy_params::of(params.cache), int(moe.size()));
    c->warmup = params.cache.warmup;
    c->lsb_background = params.cache.lsb_background;
    c->record = params.record_trace;
    c->prefetch = params.prefetch;
    c->low_precision_prompt = params.low_precision_prompt;
    const char * overlap = std::getenv("SLICEMOE_OVERLAP");
    c->overlap = overlap && std::strcmp(overlap, "1") == 0;
    const char * graph_step = std::getenv("SLICEMOE_GRAPH_STEP");
    c->graph_step = graph_step && std::strcmp(graph_step, "1") == 0;
    if (const char * chunk_kib = std::getenv("SLICEMOE_READ_CHUNK_KIB")) {
        c->read_chunk = std::max<int64_t>(4, std::atoll(chunk_kib)) * 1024;
    }
    c->budget = params.cache.budget_bytes;

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
        !slot_counts(*c, sizes, alike, params.cache.msb_share, params.cache.layer_slots, params.cache.n_layer_slots, &plan, error)) {
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
        if (L.cpu_pools) {
            L.ready.reset(new product_ready[N_PROJ]);
        }
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
    // what loading read is reported apart: per-token figures (flash bytes, time blocked on reads,
    // modelled energy) are of serving
    c->totals.load_flash_bytes = c->totals.flash_bytes;
    c->totals.load_io_ms = c->totals.io_ms;
    clear_stats(c.get());
    c->mapped = params.use_mmap;
    if (!keep_dense_resident(*c, error)) {
        *status = SLICEMOE_ERR_IO;
        return nullptr;
    }
    release_mapped(*c);
    advise_sparse_lsb(*c);
    return c;
}

} // namespace

void set_policy(cache & c, const policy_params & params, int n_layers) {
    c.pol = make_policy(params, { n_layers, c.n_expert, c.top_k });
    c.precision = c.pol->precision;
}

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
    const policy_i * iface = policy_table(params.cache.policy);
    if (iface && !iface->runs_live && params.cache.budget_bytes > 0) {
        *error = std::string("the ") + iface->name + " policy needs the future: it runs only in trace replay (slicemoe sim)";
        return SLICEMOE_ERR_INVALID_ARG;
    }
    std::unique_ptr<cache> c;
    if (params.cache.budget_bytes > 0) {
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

} // namespace slicemoe
