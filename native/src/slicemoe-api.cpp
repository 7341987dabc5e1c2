// The slicemoe C API (include/slicemoe.h) over llama.cpp's public API.
//
// Errors: every entry point that can fail returns a status and leaves a message in a thread-local
// string. llama.cpp reports its own failures through its log, so the log callback keeps the error
// lines of the current call and they become part of our message.

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

#ifndef SLICEMOE_VERSION
#define SLICEMOE_VERSION "dev"
#endif
#ifndef SLICEMOE_LLAMA_CPP_PYTHON_VERSION
#define SLICEMOE_LLAMA_CPP_PYTHON_VERSION "unknown"
#endif
#ifndef SLICEMOE_LLAMA_CPP_COMMIT
#define SLICEMOE_LLAMA_CPP_COMMIT "unknown"
#endif

struct slicemoe_model {
    llama_model       * model;
    const llama_vocab * vocab;
    int                 fd;        // the model file, held open to notice changes (see file_unchanged)
    struct stat         at_load;   // its size and modification time when loaded
    bool                owned;     // false: a llama_model loaded by someone else (slicemoe_model_wrap)
};

// The engine's state is read and cleared under the lock that its ubatches hold.
static std::unique_lock<std::mutex> hold(slicemoe::cache * c) {
    return c ? std::unique_lock<std::mutex>(slicemoe::compute_mutex(*c)) : std::unique_lock<std::mutex>();
}

struct slicemoe_context {
    slicemoe_model  * model;
    llama_context   * lctx;
    std::vector<int32_t> n_past;        // [n_seq] tokens of each sequence
    std::vector<int32_t> logits_index;  // [n_seq] its token's index in the last llama_decode's batch, -1: none
    slicemoe_timings  timings;
};

struct slicemoe_sampler {
    llama_sampler * chain;
};

// ---------------------------------------------------------------------------------------------
// errors and logging

static thread_local std::string g_last_error;

static std::mutex  g_log_mutex;
static bool        g_verbose = false;
static std::string g_llama_errors;         // error lines llama.cpp logged since the last clear
static ggml_log_level g_last_level = GGML_LOG_LEVEL_NONE;

static void log_callback(ggml_log_level level, const char * text, void * /*user_data*/) {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    if (level == GGML_LOG_LEVEL_CONT) {
        level = g_last_level;
    }
    g_last_level = level;
    if (g_verbose) {
        fputs(text, stderr);
        fflush(stderr);
    }
    if (level == GGML_LOG_LEVEL_ERROR && g_llama_errors.size() < 4096) {
        g_llama_errors += text;
    }
}

static void clear_llama_errors() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_llama_errors.clear();
}

static std::string take_llama_errors() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    std::string s;
    s.swap(g_llama_errors);
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) {
        s.pop_back();
    }
    return s;
}

static int fail(int status, std::string message) {
    g_last_error = std::move(message);
    return status;
}

// A failure of a llama.cpp call: our message, then what llama.cpp logged about it.
static int fail_llama(int status, const std::string & message) {
    const std::string detail = take_llama_errors();
    return fail(status, detail.empty() ? message : message + ": " + detail);
}

static int ok() {
    g_last_error.clear();
    return SLICEMOE_OK;
}

// Nothing crosses the C boundary: every exported function runs its body through guard (status
// functions) or guard_value (the others), which turn an exception into a status and a message.
static int fail_nothrow(int status, const char * what, const char * detail) noexcept {
    try {
        g_last_error = std::string(what) + ": " + detail;
    } catch (...) {
        g_last_error.clear();   // out of memory even for the message: the status still says it
    }
    return status;
}

template <typename F>
static int guard(F && body) noexcept {
    try {
        return body();
    } catch (const std::bad_alloc &) {
        return fail_nothrow(SLICEMOE_ERR_NO_MEMORY, "out of memory", "an allocation failed");
    } catch (const std::exception & e) {
        return fail_nothrow(SLICEMOE_ERR_INTERNAL, "internal error", e.what());
    } catch (...) {
        return fail_nothrow(SLICEMOE_ERR_INTERNAL, "internal error", "unknown exception");
    }
}

template <typename T, typename F>
static T guard_value(T on_error, F && body) noexcept {
    T value = on_error;
    guard([&]() -> int { value = body(); return SLICEMOE_OK; });
    return value;
}

static void init_once() {
    static std::once_flag once;
    std::call_once(once, [] {
        llama_log_set(log_callback, nullptr);
        llama_backend_init();
    });
}

// ---------------------------------------------------------------------------------------------
// library

const char * slicemoe_version(void) {
    return SLICEMOE_VERSION;
}

const char * slicemoe_llama_cpp_version(void) {
    return "llama-cpp-python " SLICEMOE_LLAMA_CPP_PYTHON_VERSION " (llama.cpp " SLICEMOE_LLAMA_CPP_COMMIT ")";
}

const char * slicemoe_system_info(void) {
    return guard_value<const char *>("", [&]() -> const char * {
        init_once();
        return llama_print_system_info();
    });
}

const char * slicemoe_kernel_name(int32_t kernel) {
    if (kernel < 0 || kernel > slicemoe::KERNEL_NEON_DOTPROD || !slicemoe::kernel_available(slicemoe::kernel_id(kernel))) {
        return nullptr;
    }
    return slicemoe::kernel_name(slicemoe::kernel_id(kernel));
}

const char * slicemoe_policy_name(int32_t policy) {
    const slicemoe::policy_i * iface = slicemoe::policy_table(policy);
    return iface ? iface->name : nullptr;
}

bool slicemoe_policy_runs_live(int32_t policy) {
    const slicemoe::policy_i * iface = slicemoe::policy_table(policy);
    return iface && iface->runs_live;
}

int slicemoe_expert_product(int32_t kernel, const void * msb, const void * lsb, int64_t n_in, int64_t n_out,
                            const float * x, float * y) {
    using namespace slicemoe;
    if (!msb || !x || !y || n_in <= 0 || n_in % 32 != 0 || n_out < 0) {
        return fail(SLICEMOE_ERR_INVALID_ARG, "expert product: null pointer, or n_in not a positive multiple of 32");
    }
    if (kernel < 0 || kernel > KERNEL_NEON_DOTPROD || !kernel_available(kernel_id(kernel))) {
        return fail(SLICEMOE_ERR_INVALID_ARG, "expert product: kernel " + std::to_string(kernel) + " is not available on this CPU");
    }
    const int64_t n_blocks = n_in / 32;
    std::vector<act_block> act(static_cast<size_t>(n_blocks));
    quantize_activations(kernel_id(kernel), x, n_in, act.data());
    const auto * msb_rows = static_cast<const q4_1_block *>(msb);
    const auto * lsb_rows = static_cast<const q4_1_block *>(lsb);
    for (int64_t r = 0; r < n_out; ++r) {
        y[r] = row_dot(kernel_id(kernel), msb_rows + r * n_blocks, lsb_rows ? lsb_rows + r * n_blocks : nullptr,
                       act.data(), n_blocks);
    }
    return ok();
}

const char * slicemoe_last_error(void) {
    return g_last_error.c_str();
}

void slicemoe_set_verbose(bool verbose) {
    guard_value(0, [&]() -> int {
        init_once();
        std::lock_guard<std::mutex> lock(g_log_mutex);
        g_verbose = verbose;
        return 0;
    });
}

int32_t slicemoe_device_count(void) {
    return guard_value<int32_t>(0, [&]() -> int32_t {
        init_once();
        return (int32_t) ggml_backend_dev_count();
    });
}

const char * slicemoe_device_name(int32_t i) {
    return guard_value<const char *>("", [&]() -> const char * {
        init_once();
        if (i < 0 || (size_t) i >= ggml_backend_dev_count()) {
            return "";
        }
        return ggml_backend_dev_name(ggml_backend_dev_get(i));
    });
}

const char * slicemoe_device_description(int32_t i) {
    return guard_value<const char *>("", [&]() -> const char * {
        init_once();
        if (i < 0 || (size_t) i >= ggml_backend_dev_count()) {
            return "";
        }
        return ggml_backend_dev_description(ggml_backend_dev_get(i));
    });
}

// ---------------------------------------------------------------------------------------------
// model

slicemoe_model_params slicemoe_model_default_params(void) {
    slicemoe_model_params p;
    p.n_gpu_layers = 0;
    p.use_mmap     = true;
    p.precision    = SLICEMOE_PRECISION_AUTO;
    p.cache_budget_bytes = 0;
    // the same defaults as slicemoe_gguf/defaults.py (a test holds them together)
    p.warmup         = SLICEMOE_WARMUP_PCW;
    p.high_threshold = 0.25f;
    p.max_miss_rate  = 0.0f;
    p.policy         = SLICEMOE_POLICY_DBSC;
    p.record_trace   = false;
    p.msb_share      = 0.0f;
    p.high_ratio     = 0.0f;
    p.prior_lambda   = 0.5f;
    p.gating_t       = 0.04f;
    p.prefetch       = false;
    p.layer_slots    = nullptr;
    p.n_layer_slots  = 0;
    p.io_mode        = SLICEMOE_IO_AUTO;
    p.forced_routes  = false;
    p.layer_sensitivity   = nullptr;
    p.n_layer_sensitivity = 0;
    p.layer_high_uses     = nullptr;
    p.n_layer_high_uses   = 0;
    return p;
}

// llama.cpp's no_alloc load on the CPU: every tensor is created (names, counts, shapes checked)
// and sized, none is read or allocated. slicemoe_model_check and slicemoe_memory_estimate use it.
static llama_model_params no_alloc_params() {
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers    = 0;
    mp.load_mode       = LLAMA_LOAD_MODE_NONE;
    mp.no_alloc        = true;
    return mp;
}

// Every file passes here before llama.cpp's loader sees it: what llama.cpp would only report as
// "failed to load" (missing file, not a GGUF), then the validator (what it would abort on).
static int check_gguf_file(const char * path) {
    FILE * f = fopen(path, "rb");
    if (!f) {
        return fail(SLICEMOE_ERR_IO, std::string("cannot open '") + path + "': " + strerror(errno));
    }
    char magic[4] = {0, 0, 0, 0};
    const size_t n = fread(magic, 1, sizeof(magic), f);
    fclose(f);
    if (n != sizeof(magic) || memcmp(magic, "GGUF", 4) != 0) {
        return fail(SLICEMOE_ERR_FORMAT, std::string("'") + path + "' is not a GGUF file (no GGUF magic at its start)");
    }
    std::string error;
    clear_llama_errors();
    const int status = slicemoe::validate_file(path, &error);
    return status == SLICEMOE_OK ? SLICEMOE_OK : fail_llama(status, error);
}

int slicemoe_model_load(const char * path, const slicemoe_model_params * params, slicemoe_model ** out) {
    return guard([&]() -> int {
        init_once();
        if (!path || !out) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_model_load: path and out must not be NULL");
        }
        *out = nullptr;
        const int status = check_gguf_file(path);
        if (status != SLICEMOE_OK) {
            return status;
        }
        const slicemoe_model_params p = params ? *params : slicemoe_model_default_params();
        if (p.cache_budget_bytes < 0) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "the cache budget must be >= 0 bytes");
        }
        std::string invalid;
        if (!slicemoe::policy_params_valid(p, &invalid)) {
            return fail(SLICEMOE_ERR_INVALID_ARG, invalid);
        }

        llama_model_params mp = llama_model_default_params();
        mp.n_gpu_layers = p.n_gpu_layers;
        mp.load_mode    = p.use_mmap ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
        // With a cache, the routed experts (MSB and LSB tensors) stay in the mapped file on the host
        // even for offloaded layers: the device holds only the cache's pools, filled slice by slice.
        const llama_model_tensor_buft_override experts_on_host[] = {
            { "\\.ffn_(up|gate|down)_exps\\.(weight|lsb)$",
              ggml_backend_dev_buffer_type(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)) },
            { nullptr, nullptr },
        };
        if (p.cache_budget_bytes > 0 && p.n_gpu_layers != 0) {
            mp.tensor_buft_overrides = experts_on_host;
        }

        // the load hook attaches the engine with these parameters (not overrides or environment)
        slicemoe::explicit_load request;
        request.params = &p;
        slicemoe::set_explicit_load(&request);
        clear_llama_errors();
        llama_model * model = llama_model_load_from_file(path, mp);
        slicemoe::set_explicit_load(nullptr);
        if (!model && request.status != SLICEMOE_OK) {
            return fail(request.status, request.error);
        }
        if (!model) {
            return fail_llama(SLICEMOE_ERR_FORMAT, std::string("llama.cpp could not load '") + path + "'");
        }
        slicemoe_model * m = new (std::nothrow) slicemoe_model{model, llama_model_get_vocab(model), -1, {}, true};
        if (!m) {
            llama_model_free(model);
            return fail(SLICEMOE_ERR_NO_MEMORY, "out of memory");
        }
        m->fd = open(path, O_RDONLY | O_CLOEXEC);
        if (m->fd < 0 || fstat(m->fd, &m->at_load) != 0) {
            const std::string reason = strerror(errno);
            slicemoe_model_free(m);
            return fail(SLICEMOE_ERR_IO, std::string("cannot open '") + path + "' again after loading: " + reason);
        }
        *out = m;
        return ok();
    });
}

int slicemoe_model_wrap(void * llama_model_ptr, slicemoe_model ** out) {
    return guard([&]() -> int {
        if (!llama_model_ptr || !out) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_model_wrap: model and out must not be NULL");
        }
        llama_model * model = static_cast<llama_model *>(llama_model_ptr);
        *out = new slicemoe_model{model, llama_model_get_vocab(model), -1, {}, false};
        return ok();
    });
}

int slicemoe_model_check(const char * path) {
    return guard([&]() -> int {
        init_once();
        if (!path) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_model_check: path must not be NULL");
        }
        const int status = check_gguf_file(path);
        if (status != SLICEMOE_OK) {
            return status;
        }
        llama_model_params mp = no_alloc_params();
        mp.use_extra_bufts = false;
        clear_llama_errors();
        llama_model * model = llama_model_load_from_file(path, mp);
        if (!model) {
            return fail_llama(SLICEMOE_ERR_FORMAT, std::string("llama.cpp would not load '") + path + "'");
        }
        llama_model_free(model);
        return ok();
    });
}

void slicemoe_model_free(slicemoe_model * model) {
    guard_value(0, [&]() -> int {
        if (model) {
            if (model->owned) llama_model_free(model->model);   // frees its engine too
            if (model->fd >= 0) close(model->fd);
            delete model;
        }
        return 0;
    });
}

int32_t slicemoe_model_n_vocab(const slicemoe_model * model) {
    return guard_value<int32_t>(0, [&]() -> int32_t {
        return model ? llama_vocab_n_tokens(model->vocab) : 0;
    });
}

int32_t slicemoe_model_n_sliced_layers(const slicemoe_model * model) {
    return guard_value<int32_t>(0, [&]() -> int32_t {
        return model ? slicemoe::n_sliced_layers(model->model) : 0;
    });
}

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
    const slicemoe_model_params m = slicemoe_model_default_params();   // one set of policy defaults
    p.policy         = m.policy;
    p.precision      = m.precision;
    p.warmup         = m.warmup;
    p.high_threshold = m.high_threshold;
    p.max_miss_rate  = m.max_miss_rate;
    p.msb_share      = m.msb_share;
    p.high_ratio     = m.high_ratio;
    p.prior_lambda   = m.prior_lambda;
    p.gating_t       = m.gating_t;
    return p;
}

int slicemoe_sim_create(const slicemoe_sim_params * params, slicemoe_sim ** out) {
    return guard([&]() -> int {
        if (!params || !out) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_sim_create: NULL argument");
        }
        *out = nullptr;
        std::string error;
        if (!slicemoe::policy_params_valid(*params, &error)) {
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

int32_t slicemoe_model_n_layer(const slicemoe_model * model) {
    return guard_value<int32_t>(0, [&]() -> int32_t {
        return model ? llama_model_n_layer(model->model) : 0;
    });
}

int32_t slicemoe_model_n_ctx_train(const slicemoe_model * model) {
    return guard_value<int32_t>(0, [&]() -> int32_t {
        return model ? llama_model_n_ctx_train(model->model) : 0;
    });
}

bool slicemoe_model_is_eog(const slicemoe_model * model, int32_t token) {
    return guard_value<bool>(false, [&]() -> bool {
        return model && llama_vocab_is_eog(model->vocab, token);
    });
}

int slicemoe_model_desc(const slicemoe_model * model, char * buf, size_t size) {
    return guard([&]() -> int {
        if (!model || !buf || size == 0) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_model_desc: NULL model or empty buffer");
        }
        llama_model_desc(model->model, buf, size);
        return ok();
    });
}

int slicemoe_model_meta(const slicemoe_model * model, const char * key, char * buf, size_t size) {
    return guard([&]() -> int {
        if (!model || !key || !buf || size == 0) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_model_meta: NULL argument or empty buffer");
        }
        const int32_t n = llama_model_meta_val_str(model->model, key, buf, size);
        if (n < 0) {
            return fail(SLICEMOE_ERR_INVALID_ARG, std::string("no metadata key '") + key + "'");
        }
        if ((size_t) n >= size) {
            return fail(SLICEMOE_ERR_BUFFER_TOO_SMALL, std::string("metadata value of '") + key + "' is truncated");
        }
        return ok();
    });
}

int slicemoe_tokenize(const slicemoe_model * model, const char * text, int32_t text_len,
                      bool add_special, bool parse_special,
                      int32_t * tokens, int32_t n_tokens_max, int32_t * n_out) {
    return guard([&]() -> int {
        if (!model || !text || text_len < 0 || !n_out || n_tokens_max < 0 || (!tokens && n_tokens_max > 0)) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_tokenize: bad arguments");
        }
        const int32_t n = llama_tokenize(model->vocab, text, text_len, tokens, n_tokens_max, add_special, parse_special);
        if (n == INT32_MIN) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_tokenize: the text yields more than 2^31 tokens");
        }
        if (n < 0) {
            *n_out = -n;
            return fail(SLICEMOE_ERR_BUFFER_TOO_SMALL, "token buffer too small");
        }
        *n_out = n;
        return ok();
    });
}

int slicemoe_chat_apply(const slicemoe_model * model, const char * const * roles, const char * const * contents,
                        int32_t n_messages, bool add_assistant, char * buf, int32_t size, int32_t * n_out) {
    return guard([&]() -> int {
        if (!model || !roles || !contents || n_messages <= 0 || !n_out || (size > 0 && !buf) || size < 0) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_chat_apply: NULL argument or no messages");
        }
        std::vector<llama_chat_message> chat(static_cast<size_t>(n_messages));
        for (int32_t i = 0; i < n_messages; ++i) {
            if (!roles[i] || !contents[i]) {
                return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_chat_apply: message " + std::to_string(i) + " is NULL");
            }
            chat[size_t(i)] = { roles[i], contents[i] };
        }
        const char * tmpl = llama_model_chat_template(model->model, nullptr);
        const int32_t n = llama_chat_apply_template(tmpl, chat.data(), chat.size(), add_assistant, nullptr, 0);
        if (n < 0) {
            return fail(SLICEMOE_ERR_FORMAT, "the model's chat template (tokenizer.chat_template) is not one llama.cpp knows");
        }
        *n_out = n;
        if (n > size) {
            return fail(SLICEMOE_ERR_BUFFER_TOO_SMALL, "the buffer holds " + std::to_string(size) + " bytes, the chat needs " + std::to_string(n));
        }
        std::vector<char> text(size_t(n) + 1);
        llama_chat_apply_template(tmpl, chat.data(), chat.size(), add_assistant, text.data(), n + 1);
        std::memcpy(buf, text.data(), size_t(n));
        return ok();
    });
}

int slicemoe_detokenize(const slicemoe_model * model, const int32_t * tokens, int32_t n_tokens,
                        char * text, int32_t text_len_max, int32_t * n_out) {
    return guard([&]() -> int {
        if (!model || (!tokens && n_tokens > 0) || n_tokens < 0 || !n_out || text_len_max < 0 || (!text && text_len_max > 0)) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_detokenize: bad arguments");
        }
        const int32_t n_vocab = llama_vocab_n_tokens(model->vocab);
        for (int32_t i = 0; i < n_tokens; ++i) {
            if (tokens[i] < 0 || tokens[i] >= n_vocab) {
                return fail(SLICEMOE_ERR_INVALID_ARG, "token id " + std::to_string(tokens[i]) + " is outside the vocabulary");
            }
        }
        const int32_t n = llama_detokenize(model->vocab, tokens, n_tokens, text, text_len_max,
                                           /*remove_special*/ false, /*unparse_special*/ false);
        if (n < 0) {
            *n_out = -n;
            return fail(SLICEMOE_ERR_BUFFER_TOO_SMALL, "text buffer too small");
        }
        *n_out = n;
        return ok();
    });
}

int slicemoe_token_piece(const slicemoe_model * model, int32_t token, char * buf, int32_t size, int32_t * n_out) {
    return guard([&]() -> int {
        if (!model || !n_out || size < 0 || (!buf && size > 0)) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_token_piece: bad arguments");
        }
        if (token < 0 || token >= llama_vocab_n_tokens(model->vocab)) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "token id " + std::to_string(token) + " is outside the vocabulary");
        }
        const int32_t n = llama_token_to_piece(model->vocab, token, buf, size, /*lstrip*/ 0, /*special*/ true);
        if (n < 0) {
            *n_out = -n;
            return fail(SLICEMOE_ERR_BUFFER_TOO_SMALL, "piece buffer too small");
        }
        *n_out = n;
        return ok();
    });
}

// ---------------------------------------------------------------------------------------------
// context

// llama.cpp maps the model file, so a file truncated or rewritten in place under a loaded model
// would fault (SIGBUS) or compute with other weights. Every evaluation first compares the open
// file with what was loaded. A file replaced by rename is not a change: the open inode and its
// mapping keep the old contents, which stay consistent.
static int64_t mtime_ns(const struct stat & st) {
#ifdef __APPLE__
    return int64_t(st.st_mtimespec.tv_sec) * 1000000000 + st.st_mtimespec.tv_nsec;
#else
    return int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
#endif
}

static bool file_unchanged(const slicemoe_model & m, std::string * error) {
    if (m.fd < 0) {
        return true;   // a wrapped model: its loader owns the file
    }
    struct stat now;
    if (fstat(m.fd, &now) != 0) {
        *error = std::string("cannot check the model file: ") + strerror(errno);
        return false;
    }
    if (now.st_size != m.at_load.st_size || mtime_ns(now) != mtime_ns(m.at_load)) {
        *error = "the model file was changed on disk while loaded (" + std::to_string(int64_t(m.at_load.st_size)) +
                 " bytes when loaded, " + std::to_string(int64_t(now.st_size)) + " now): load it again";
        return false;
    }
    return true;
}

slicemoe_context_params slicemoe_context_default_params(void) {
    slicemoe_context_params p;
    p.n_ctx     = 2048;
    p.n_batch   = 512;
    p.n_threads = 0;
    p.n_seq     = 1;
    return p;
}

// One thread per fast core (slicemoe-cpu.h), else per core.
static int32_t default_threads() {
    const int fast = slicemoe::fast_core_count("/sys/devices/system/cpu");
    const unsigned n = std::thread::hardware_concurrency();
    if (fast > 0 && (n == 0 || unsigned(fast) <= n)) {
        return fast;
    }
    return n > 0 ? (int32_t) n : 4;
}

int32_t slicemoe_cpu_fast_cores(const char * cpu_dir) {
    return guard_value<int32_t>(0, [&]() -> int32_t {
        return slicemoe::fast_core_count(cpu_dir ? cpu_dir : "/sys/devices/system/cpu");
    });
}

int32_t slicemoe_default_threads(void) {
    return guard_value<int32_t>(1, [&]() -> int32_t { return default_threads(); });
}

static llama_context_params to_llama_context_params(const slicemoe_context_params & p) {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx           = p.n_ctx;
    cp.n_batch         = p.n_batch;
    cp.n_ubatch        = p.n_batch;
    cp.n_seq_max       = (uint32_t) std::max(p.n_seq, 1);
    cp.n_threads       = p.n_threads > 0 ? p.n_threads : default_threads();
    cp.n_threads_batch = cp.n_threads;
    return cp;
}

// llama.cpp's own account of a context's buffers, summed over devices.
static void memory_of(const llama_context * lctx, slicemoe_memory * out) {
    *out = {};
    for (const auto & entry : llama_get_memory_breakdown(lctx)) {
        out->weights_bytes += (int64_t) entry.second.model;
        out->kv_bytes      += (int64_t) entry.second.context;
        out->compute_bytes += (int64_t) entry.second.compute;
    }
}

int slicemoe_context_memory(const slicemoe_context * ctx, slicemoe_memory * out) {
    return guard([&]() -> int {
        if (!ctx || !out) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_context_memory: NULL argument");
        }
        memory_of(ctx->lctx, out);
        return ok();
    });
}

int slicemoe_memory_estimate(const char * path, const slicemoe_context_params * params, bool with_cache,
                             slicemoe_memory * out) {
    return guard([&]() -> int {
        init_once();
        if (!path || !out) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_memory_estimate: path and out must not be NULL");
        }
        const slicemoe_context_params p = params ? *params : slicemoe_context_default_params();
        if (p.n_batch == 0) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "n_batch must be at least 1");
        }
        int status = check_gguf_file(path);
        if (status != SLICEMOE_OK) {
            return status;
        }
        clear_llama_errors();
        llama_model * model = llama_model_load_from_file(path, no_alloc_params());
        if (!model) {
            return fail_llama(SLICEMOE_ERR_FORMAT, std::string("llama.cpp could not load '") + path + "'");
        }
        llama_context_params cp = to_llama_context_params(p);
        cp.op_offload = !with_cache;   // as slicemoe_context_create sets it: the graphs, and so the buffers, differ
        llama_context * lctx = llama_init_from_model(model, cp);
        if (!lctx) {
            llama_model_free(model);
            return fail_llama(SLICEMOE_ERR_NO_MEMORY, "llama.cpp could not size a context");
        }
        memory_of(lctx, out);
        llama_free(lctx);
        llama_model_free(model);
        return ok();
    });
}

int slicemoe_context_create(slicemoe_model * model, const slicemoe_context_params * params, slicemoe_context ** out) {
    return guard([&]() -> int {
        init_once();
        if (!model || !out) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_context_create: model and out must not be NULL");
        }
        *out = nullptr;
        const slicemoe_context_params p = params ? *params : slicemoe_context_default_params();
        const int32_t max_seq = int32_t(llama_max_parallel_sequences());
        if (p.n_batch == 0 || p.n_seq < 1 || p.n_seq > max_seq) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "n_batch must be at least 1 and n_seq in [1, " +
                        std::to_string(max_seq) + "]");
        }

        llama_context_params cp = to_llama_context_params(p);

        if (slicemoe::cache_of(model->model)) {
            // (the context-creation hook installs the engine's eval callback)
            // Prompt batches read the experts from the mapped file; operation offload would copy whole
            // expert tensors to the device for every large batch, which is what the cache avoids.
            cp.op_offload = false;
        }

        clear_llama_errors();
        llama_context * lctx = llama_init_from_model(model->model, cp);
        if (!lctx) {
            return fail_llama(SLICEMOE_ERR_NO_MEMORY, "llama.cpp could not create a context");
        }
        slicemoe_context * c = new (std::nothrow) slicemoe_context{model, lctx, {}, {}, {}};
        if (!c) {
            llama_free(lctx);
            return fail(SLICEMOE_ERR_NO_MEMORY, "out of memory");
        }
        c->n_past.assign(size_t(std::max(p.n_seq, 1)), 0);
        c->logits_index.assign(c->n_past.size(), -1);
        *out = c;
        return ok();
    });
}

void slicemoe_context_free(slicemoe_context * ctx) {
    guard_value(0, [&]() -> int {
        if (ctx) {
            llama_free(ctx->lctx);
            delete ctx;
        }
        return 0;
    });
}

uint32_t slicemoe_context_n_ctx(const slicemoe_context * ctx) {
    return guard_value<uint32_t>(0u, [&]() -> uint32_t {
        return ctx ? llama_n_ctx(ctx->lctx) : 0;
    });
}

int32_t slicemoe_context_n_past(const slicemoe_context * ctx) {
    return slicemoe_seq_n_past(ctx, 0);
}

int32_t slicemoe_seq_n_past(const slicemoe_context * ctx, int32_t seq) {
    return guard_value<int32_t>(0, [&]() -> int32_t {
        return ctx && seq >= 0 && size_t(seq) < ctx->n_past.size() ? ctx->n_past[size_t(seq)] : 0;
    });
}

void slicemoe_context_reset(slicemoe_context * ctx) {
    guard_value(0, [&]() -> int {
        if (!ctx) {
            return 0;
        }
        // (the next ubatch starts at position 0, which begins a new request for the engine)
        llama_memory_clear(llama_get_memory(ctx->lctx), true);
        std::fill(ctx->n_past.begin(), ctx->n_past.end(), 0);
        std::fill(ctx->logits_index.begin(), ctx->logits_index.end(), -1);
        ctx->timings = {};
        return 0;
    });
}

void slicemoe_seq_reset(slicemoe_context * ctx, int32_t seq) {
    guard_value(0, [&]() -> int {
        if (ctx && seq >= 0 && size_t(seq) < ctx->n_past.size()) {
            llama_memory_seq_rm(llama_get_memory(ctx->lctx), seq, -1, -1);
            ctx->n_past[size_t(seq)] = 0;
            ctx->logits_index[size_t(seq)] = -1;
        }
        return 0;
    });
}

static bool valid_tokens(const slicemoe_context * ctx, const int32_t * tokens, int32_t n_tokens, std::string * error) {
    const int32_t n_vocab = llama_vocab_n_tokens(ctx->model->vocab);
    for (int32_t i = 0; i < n_tokens; ++i) {
        if (tokens[i] < 0 || tokens[i] >= n_vocab) {
            *error = "token id " + std::to_string(tokens[i]) + " is outside the vocabulary of " + std::to_string(n_vocab);
            return false;
        }
    }
    return true;
}

// One llama_decode under the engine; on failure every sequence of the batch is rolled back to
// where it was, so the context stays usable.
static int decode_or_roll_back(slicemoe_context * ctx, llama_batch batch, const std::vector<int32_t> & seqs) {
    const int32_t rc = llama_decode(ctx->lctx, batch);
    std::string cache_error;
    const bool cache_failed = slicemoe::take_error(&cache_error);
    if (!cache_failed && rc == 0) {
        return SLICEMOE_OK;
    }
    for (int32_t seq : seqs) {
        llama_memory_seq_rm(llama_get_memory(ctx->lctx), seq, ctx->n_past[size_t(seq)], -1);
    }
    std::fill(ctx->logits_index.begin(), ctx->logits_index.end(), -1);
    if (cache_failed) {
        return fail(SLICEMOE_ERR_IO, cache_error);
    }
    return fail_llama(SLICEMOE_ERR_COMPUTE, "llama_decode failed with code " + std::to_string(rc));
}

// The sequence's context size: llama.cpp splits n_ctx evenly between the sequences.
static uint32_t seq_capacity(const slicemoe_context * ctx) {
    return llama_n_ctx(ctx->lctx) / uint32_t(ctx->n_past.size());
}

int slicemoe_eval_seq(slicemoe_context * ctx, int32_t seq, const int32_t * tokens, int32_t n_tokens) {
    return guard([&]() -> int {
        if (!ctx || !tokens || n_tokens <= 0) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_eval: NULL context or no tokens");
        }
        if (seq < 0 || size_t(seq) >= ctx->n_past.size()) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "sequence " + std::to_string(seq) + " outside [0, " +
                        std::to_string(ctx->n_past.size()) + ")");
        }
        std::string error;
        if (!valid_tokens(ctx, tokens, n_tokens, &error)) {
            return fail(SLICEMOE_ERR_INVALID_ARG, error);
        }
        if (!file_unchanged(*ctx->model, &error)) {
            return fail(SLICEMOE_ERR_IO, error);
        }
        int32_t & n_past = ctx->n_past[size_t(seq)];
        if ((uint32_t) n_past + (uint32_t) n_tokens > seq_capacity(ctx)) {
            return fail(SLICEMOE_ERR_CONTEXT_FULL, "context full: " + std::to_string(n_past) + " evaluated + " +
                        std::to_string(n_tokens) + " new tokens > n_ctx " + std::to_string(seq_capacity(ctx)));
        }
        const int32_t n_batch = (int32_t) llama_n_batch(ctx->lctx);
        const auto t0 = std::chrono::steady_clock::now();
        clear_llama_errors();
        llama_batch batch = llama_batch_init(std::min(n_batch, n_tokens), 0, 1);
        for (int32_t i = 0; i < n_tokens; i += n_batch) {
            const int32_t n = std::min(n_batch, n_tokens - i);
            batch.n_tokens = n;
            for (int32_t j = 0; j < n; ++j) {
                batch.token[j] = tokens[i + j];
                batch.pos[j] = n_past + i + j;
                batch.n_seq_id[j] = 1;
                batch.seq_id[j][0] = seq;
                batch.logits[j] = i + j == n_tokens - 1;
            }
            const int status = decode_or_roll_back(ctx, batch, {seq});
            if (status != SLICEMOE_OK) {
                llama_batch_free(batch);
                return status;
            }
        }
        const int32_t last_row = batch.n_tokens - 1;   // the last chunk's last token
        llama_batch_free(batch);
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        if (n_tokens > 1) {
            ctx->timings.prefill_ms += ms;
            ctx->timings.n_prefill  += n_tokens;
        } else {
            ctx->timings.decode_ms += ms;
            ctx->timings.n_decode  += 1;
        }
        n_past += n_tokens;
        std::fill(ctx->logits_index.begin(), ctx->logits_index.end(), -1);
        ctx->logits_index[size_t(seq)] = last_row;
        return ok();
    });
}

int slicemoe_eval(slicemoe_context * ctx, const int32_t * tokens, int32_t n_tokens) {
    return slicemoe_eval_seq(ctx, 0, tokens, n_tokens);
}

int slicemoe_decode_batch(slicemoe_context * ctx, int32_t n, const int32_t * seqs, const int32_t * tokens) {
    return guard([&]() -> int {
        if (!ctx || !seqs || !tokens || n <= 0 || size_t(n) > ctx->n_past.size()) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_decode_batch: NULL argument, or n outside [1, n_seq]");
        }
        std::vector<int32_t> order(seqs, seqs + n);
        std::vector<char> seen(ctx->n_past.size(), 0);
        for (int32_t seq : order) {
            if (seq < 0 || size_t(seq) >= ctx->n_past.size() || seen[size_t(seq)]) {
                return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_decode_batch: sequence ids must be distinct, in [0, " +
                            std::to_string(ctx->n_past.size()) + ")");
            }
            seen[size_t(seq)] = 1;
            if ((uint32_t) ctx->n_past[size_t(seq)] + 1 > seq_capacity(ctx)) {
                return fail(SLICEMOE_ERR_CONTEXT_FULL, "context full: sequence " + std::to_string(seq) + " holds " +
                            std::to_string(ctx->n_past[size_t(seq)]) + " tokens of " + std::to_string(seq_capacity(ctx)));
            }
        }
        std::string error;
        if (!valid_tokens(ctx, tokens, n, &error)) {
            return fail(SLICEMOE_ERR_INVALID_ARG, error);
        }
        if (!file_unchanged(*ctx->model, &error)) {
            return fail(SLICEMOE_ERR_IO, error);
        }
        const auto t0 = std::chrono::steady_clock::now();
        clear_llama_errors();
        llama_batch batch = llama_batch_init(n, 0, 1);
        batch.n_tokens = n;
        for (int32_t i = 0; i < n; ++i) {
            batch.token[i] = tokens[i];
            batch.pos[i] = ctx->n_past[size_t(seqs[i])];
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = seqs[i];
            batch.logits[i] = true;
        }
        const int status = decode_or_roll_back(ctx, batch, order);
        llama_batch_free(batch);
        if (status != SLICEMOE_OK) {
            return status;
        }
        ctx->timings.decode_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        ctx->timings.n_decode += n;
        std::fill(ctx->logits_index.begin(), ctx->logits_index.end(), -1);
        for (int32_t i = 0; i < n; ++i) {
            ctx->n_past[size_t(seqs[i])] += 1;
            ctx->logits_index[size_t(seqs[i])] = i;
        }
        return ok();
    });
}

const float * slicemoe_logits_seq(slicemoe_context * ctx, int32_t seq) {
    return guard_value<const float *>(nullptr, [&]() -> const float * {
        if (!ctx || seq < 0 || size_t(seq) >= ctx->n_past.size() || ctx->logits_index[size_t(seq)] < 0) {
            return nullptr;
        }
        return llama_get_logits_ith(ctx->lctx, ctx->logits_index[size_t(seq)]);
    });
}

const float * slicemoe_logits(slicemoe_context * ctx) {
    return slicemoe_logits_seq(ctx, 0);
}

void slicemoe_timings_get(const slicemoe_context * ctx, slicemoe_timings * out) {
    guard_value(0, [&]() -> int {
        if (ctx && out) {
            *out = ctx->timings;
        }
        return 0;
    });
}

// ---------------------------------------------------------------------------------------------
// sampling

slicemoe_sampling_params slicemoe_sampling_default_params(void) {
    slicemoe_sampling_params p;
    p.temperature       = 0.0f;
    p.top_p             = 1.0f;
    p.seed              = 0;
    p.top_k             = 0;
    p.min_p             = 0.0f;
    p.repeat_penalty    = 1.0f;
    p.frequency_penalty = 0.0f;
    p.presence_penalty  = 0.0f;
    p.penalty_last_n    = 64;   // llama.cpp's default window
    p.grammar           = nullptr;
    p.logit_bias_tokens = nullptr;
    p.logit_bias_values = nullptr;
    p.n_logit_bias      = 0;
    return p;
}

// The reason the parameters cannot make a sampler, or "" when they can.
static std::string sampling_params_error(const slicemoe_model * model, const slicemoe_sampling_params & p) {
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
        return "top_p must be in (0, 1]";
    }
    if (p.top_k < 0 || !(p.min_p >= 0.0f && p.min_p <= 1.0f)) {
        return "top_k must be >= 0 and min_p in [0, 1]";
    }
    if (!(p.repeat_penalty > 0.0f) || !std::isfinite(p.repeat_penalty) || !std::isfinite(p.frequency_penalty) ||
        !std::isfinite(p.presence_penalty) || p.penalty_last_n < -1) {
        return "repeat_penalty must be > 0, the other penalties finite and penalty_last_n >= -1";
    }
    const bool needs_model = (p.grammar && p.grammar[0]) || p.n_logit_bias > 0 || p.repeat_penalty != 1.0f ||
                             p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f;
    if (needs_model && !model) {
        return "a grammar, penalties and logit biases need the model (its vocabulary)";
    }
    if (p.n_logit_bias < 0 || (p.n_logit_bias > 0 && (!p.logit_bias_tokens || !p.logit_bias_values))) {
        return "logit_bias: n_logit_bias tokens and values";
    }
    const int32_t n_vocab = model ? llama_vocab_n_tokens(model->vocab) : 0;
    for (int32_t i = 0; i < p.n_logit_bias; i++) {
        if (p.logit_bias_tokens[i] < 0 || p.logit_bias_tokens[i] >= n_vocab) {
            return "logit_bias: token " + std::to_string(p.logit_bias_tokens[i]) + " is not in the vocabulary of " +
                   std::to_string(n_vocab) + " tokens";
        }
    }
    return "";
}

// logit bias -> penalties -> grammar -> (greedy | top-k -> top-p -> min-p -> temperature -> draw)
static llama_sampler * build_sampler_chain(const slicemoe_model * model, const slicemoe_sampling_params & p) {
    llama_sampler * chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
    if (p.n_logit_bias > 0) {
        std::vector<llama_logit_bias> biases(p.n_logit_bias);
        for (int32_t i = 0; i < p.n_logit_bias; i++) {
            biases[i] = {p.logit_bias_tokens[i], p.logit_bias_values[i]};
        }
        llama_sampler_chain_add(chain, llama_sampler_init_logit_bias(llama_vocab_n_tokens(model->vocab),
                                                                     p.n_logit_bias, biases.data()));
    }
    if (p.repeat_penalty != 1.0f || p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f) {
        const int32_t last_n = p.penalty_last_n >= 0 ? p.penalty_last_n : llama_model_n_ctx_train(model->model);
        llama_sampler_chain_add(chain, llama_sampler_init_penalties(llama_vocab_n_tokens(model->vocab), last_n,
                                                                    p.repeat_penalty, p.frequency_penalty,
                                                                    p.presence_penalty));
    }
    if (p.grammar && p.grammar[0]) {
        llama_sampler * grammar = llama_sampler_init_grammar(model->vocab, p.grammar, "root");
        if (!grammar) {
            llama_sampler_free(chain);
            return nullptr;
        }
        llama_sampler_chain_add(chain, grammar);
    }
    if (p.temperature <= 0.0f) {
        llama_sampler_chain_add(chain, llama_sampler_init_greedy());
        return chain;
    }
    if (p.top_k > 0) {
        llama_sampler_chain_add(chain, llama_sampler_init_top_k(p.top_k));
    }
    if (p.top_p < 1.0f) {
        llama_sampler_chain_add(chain, llama_sampler_init_top_p(p.top_p, 1));
    }
    if (p.min_p > 0.0f) {
        llama_sampler_chain_add(chain, llama_sampler_init_min_p(p.min_p, 1));
    }
    llama_sampler_chain_add(chain, llama_sampler_init_temp(p.temperature));
    llama_sampler_chain_add(chain, llama_sampler_init_dist(p.seed));
    return chain;
}

int slicemoe_sampler_create(const slicemoe_model * model, const slicemoe_sampling_params * params,
                            slicemoe_sampler ** out) {
    return guard([&]() -> int {
        init_once();
        if (!out) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_sampler_create: out must not be NULL");
        }
        *out = nullptr;
        const slicemoe_sampling_params p = params ? *params : slicemoe_sampling_default_params();
        const std::string error = sampling_params_error(model, p);
        if (!error.empty()) {
            return fail(SLICEMOE_ERR_INVALID_ARG, error);
        }
        llama_sampler * chain = build_sampler_chain(model, p);
        if (!chain) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "the grammar does not parse (llama.cpp's log says where)");
        }
        *out = new slicemoe_sampler{chain};
        return ok();
    });
}

void slicemoe_sampler_free(slicemoe_sampler * sampler) {
    guard_value(0, [&]() -> int {
        if (sampler) {
            llama_sampler_free(sampler->chain);
            delete sampler;
        }
        return 0;
    });
}

int slicemoe_sample_seq(slicemoe_sampler * sampler, slicemoe_context * ctx, int32_t seq, int32_t * token) {
    return guard([&]() -> int {
        if (!sampler || !ctx || !token || seq < 0 || size_t(seq) >= ctx->n_past.size()) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_sample: NULL argument or no such sequence");
        }
        if (ctx->logits_index[size_t(seq)] < 0) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_sample: no logits yet, evaluate a prompt first");
        }
        *token = llama_sampler_sample(sampler->chain, ctx->lctx, ctx->logits_index[size_t(seq)]);
        return ok();
    });
}

int slicemoe_sample(slicemoe_sampler * sampler, slicemoe_context * ctx, int32_t * token) {
    return slicemoe_sample_seq(sampler, ctx, 0, token);
}

int slicemoe_decode_next(slicemoe_sampler * sampler, slicemoe_context * ctx, int32_t * token) {
    return guard([&]() -> int {
        const int status = slicemoe_sample(sampler, ctx, token);
        if (status != SLICEMOE_OK) {
            return status;
        }
        return slicemoe_eval(ctx, token, 1);
    });
}
