// The C API: the engine's counters, routing traces, forced routes and trace replay.

#include "slicemoe-api.h"

#include "slicemoe.h"
#include "slicemoe-config.h"
#include "slicemoe-cpu.h"
#include "slicemoe-product.h"
#include "slicemoe-slices.h"
#include "slicemoe-validate.h"

#include "llama.h"
#include "llama-ext.h"   // llama_get_memory_breakdown (the pinned source's internal C++ API)
#include "ggml-backend.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

using namespace slicemoe::api;

int slicemoe_cache_get_stats(const slicemoe_model * model, slicemoe_cache_stats_t * out) {
    return guard([&]() -> int {
        slicemoe::cache * c = model ? slicemoe::cache_of(model->model) : nullptr;
        const auto lock = hold(c);
        if (!c || !out) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "the model runs without a slice cache");
        }
        slicemoe::read_stats(c, out);
        return ok();
    });
}

const char * slicemoe_cache_io_note(const slicemoe_model * model) {
    return guard_value<const char *>("", [&]() -> const char * {
        return model ? slicemoe::io_note(slicemoe::cache_of(model->model)) : "";
    });
}

int32_t slicemoe_cache_n_layers(const slicemoe_model * model) {
    return guard_value<int32_t>(0, [&]() -> int32_t {
        slicemoe::cache * c = model ? slicemoe::cache_of(model->model) : nullptr;
        const auto lock = hold(c);
        return c ? slicemoe::n_layers(c) : 0;
    });
}

int slicemoe_cache_get_layer_stats(const slicemoe_model * model, int32_t i, slicemoe_layer_stats_t * out) {
    return guard([&]() -> int {
        slicemoe::cache * c = model ? slicemoe::cache_of(model->model) : nullptr;
        const auto lock = hold(c);
        if (!c || !out || slicemoe::read_layer_stats(c, i, out) != SLICEMOE_OK) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "no slice cache, or layer index out of range");
        }
        return ok();
    });
}

void slicemoe_cache_reset_stats(slicemoe_model * model) {
    guard_value(0, [&]() -> int {
        if (slicemoe::cache * c = model ? slicemoe::cache_of(model->model) : nullptr) {
            const auto lock = hold(c);
            slicemoe::clear_stats(c);
        }
        return 0;
    });
}

void slicemoe_cache_release(slicemoe_model * model) {
    guard_value(0, [&]() -> int {
        if (slicemoe::cache * c = model ? slicemoe::cache_of(model->model) : nullptr) {
            const auto lock = hold(c);
            slicemoe::release_pools(*c);
        }
        return 0;
    });
}

void slicemoe_cache_fail_reads_after(slicemoe_model * model, int64_t n_reads) {
    guard_value(0, [&]() -> int {
        if (slicemoe::cache * c = model ? slicemoe::cache_of(model->model) : nullptr) {
            const auto lock = hold(c);
            slicemoe::fail_reads_after(c, n_reads);
        }
        return 0;
    });
}

int32_t slicemoe_trace_top_k(const slicemoe_model * model) {
    return guard_value<int32_t>(0, [&]() -> int32_t {
        slicemoe::cache * c = model ? slicemoe::cache_of(model->model) : nullptr;
        const auto lock = hold(c);
        return c ? slicemoe::top_k(c) : 0;
    });
}

int64_t slicemoe_trace_size(const slicemoe_model * model) {
    return guard_value<int64_t>(0, [&]() -> int64_t {
        slicemoe::cache * c = model ? slicemoe::cache_of(model->model) : nullptr;
        const auto lock = hold(c);
        return c ? slicemoe::trace_size(c) : 0;
    });
}

int slicemoe_trace_get(const slicemoe_model * model, int64_t i, int32_t * request, int32_t * layer,
                       int32_t * phase, int32_t * experts, float * weights) {
    return guard([&]() -> int {
        slicemoe::cache * c = model ? slicemoe::cache_of(model->model) : nullptr;
        const auto lock = hold(c);
        const slicemoe::route * r = c ? slicemoe::trace_at(c, i) : nullptr;
        if (!r || !request || !layer || !phase || !experts || !weights) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "no trace record " + std::to_string(i) + " (was record_trace set?)");
        }
        slicemoe::route_fields(r, request, layer, phase, experts, weights, slicemoe::top_k(c));
        return ok();
    });
}

int slicemoe_trace_get_logits(const slicemoe_model * model, int64_t i, float * logits, bool * has) {
    return guard([&]() -> int {
        slicemoe::cache * c = model ? slicemoe::cache_of(model->model) : nullptr;
        const auto lock = hold(c);
        if (!c || !logits || !has || !slicemoe::trace_at(c, i)) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "no trace record " + std::to_string(i));
        }
        *has = slicemoe::route_logits(c, i, logits);
        return ok();
    });
}

void slicemoe_trace_clear(slicemoe_model * model) {
    guard_value(0, [&]() -> int {
        if (slicemoe::cache * c = model ? slicemoe::cache_of(model->model) : nullptr) {
            const auto lock = hold(c);
            slicemoe::trace_clear(c);
        }
        return 0;
    });
}

int slicemoe_route_force(slicemoe_model * model, int32_t n_positions, int32_t n_layers, int32_t n_expert,
                         int32_t top_k, const int32_t * experts, const float * weights) {
    return guard([&]() -> int {
        slicemoe::cache * c = model ? slicemoe::engine_of(model->model) : nullptr;
        if (!c) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "this model has no engine to force routes on: load a stock model "
                                                  "with forced_routes");
        }
        const auto lock = hold(c);
        const int32_t model_layers = slicemoe::n_layers(c), model_experts = slicemoe::n_experts(c),
                      model_k = slicemoe::top_k(c);
        if (n_positions < 0 || (n_positions > 0 && (!experts || !weights))) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "a route needs n_positions >= 0 and its experts and weights");
        }
        if (n_positions > 0 && (n_layers != model_layers || n_expert != model_experts || top_k != model_k)) {
            return fail(SLICEMOE_ERR_INVALID_ARG,
                        "the route has " + std::to_string(n_layers) + " MoE layers, top-" + std::to_string(top_k) +
                        " of " + std::to_string(n_expert) + " experts; the model has " + std::to_string(model_layers) +
                        " MoE layers, top-" + std::to_string(model_k) + " of " + std::to_string(model_experts) + " experts");
        }
        std::string error;
        const int status = slicemoe::force_routes(*c, n_positions, experts, weights, &error);
        return status == SLICEMOE_OK ? ok() : fail(status, error);
    });
}

struct slicemoe_sim {
    slicemoe::cache * cache;
};

slicemoe_sim_params slicemoe_sim_default_params(void) {
    slicemoe_sim_params p = {};
    p.cache = slicemoe_cache_default_params();   // one set of defaults for live caches and replay
    return p;
}

int slicemoe_sim_create(const slicemoe_sim_params * params, slicemoe_sim ** out) {
    return guard([&]() -> int {
        if (!params || !out) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_sim_create: NULL argument");
        }
        *out = nullptr;
        std::string error;
        if (!slicemoe::cache_params_valid(params->cache, &error)) {
            return fail(SLICEMOE_ERR_INVALID_ARG, error);
        }
        slicemoe::cache * c = slicemoe::sim_create(*params, &error);
        if (!c) {
            return fail(SLICEMOE_ERR_INVALID_ARG, error);
        }
        *out = new slicemoe_sim{c};
        return ok();
    });
}

void slicemoe_sim_free(slicemoe_sim * sim) {
    guard_value(0, [&]() -> int {
        if (sim) {
            slicemoe::sim_free(sim->cache);
            delete sim;
        }
        return 0;
    });
}

int slicemoe_sim_run(slicemoe_sim * sim, int64_t n, const int32_t * request, const int32_t * layer,
                     const int32_t * phase, const int32_t * experts, const float * weights, const float * logits) {
    return guard([&]() -> int {
        if (!sim || n < 0 || (n > 0 && (!request || !layer || !phase || !experts || !weights))) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_sim_run: bad arguments");
        }
        std::string error;
        const int status = slicemoe::sim_run(sim->cache, n, request, layer, phase, experts, weights, logits, &error);
        return status == SLICEMOE_OK ? ok() : fail(status, error);
    });
}

int slicemoe_sim_get_stats(const slicemoe_sim * sim, slicemoe_cache_stats_t * out) {
    return guard([&]() -> int {
        if (!sim || !out) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_sim_get_stats: NULL argument");
        }
        slicemoe::read_stats(sim->cache, out);
        return ok();
    });
}

int slicemoe_sim_get_layer_stats(const slicemoe_sim * sim, int32_t i, slicemoe_layer_stats_t * out) {
    return guard([&]() -> int {
        if (!sim || !out || slicemoe::read_layer_stats(sim->cache, i, out) != SLICEMOE_OK) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "layer index out of range");
        }
        return ok();
    });
}

