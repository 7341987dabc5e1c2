// The slicemoe C API (include/slicemoe.h) over llama.cpp's public API: errors and logging, and
// the library itself. The other entry points are in slicemoe-api-*.cpp (see slicemoe-api.h).

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

#ifndef SLICEMOE_VERSION
#define SLICEMOE_VERSION "dev"
#endif
#ifndef SLICEMOE_LLAMA_CPP_PYTHON_VERSION
#define SLICEMOE_LLAMA_CPP_PYTHON_VERSION "unknown"
#endif
#ifndef SLICEMOE_LLAMA_CPP_COMMIT
#define SLICEMOE_LLAMA_CPP_COMMIT "unknown"
#endif

namespace slicemoe::api {

static thread_local std::string g_last_error;

static std::mutex  g_log_mutex;
static bool        g_verbose = false;
static ggml_log_level g_last_level = GGML_LOG_LEVEL_NONE;
// error lines llama.cpp logged on this thread since the last clear: a call's failure is reported
// with its own thread's lines, never another thread's
static thread_local std::string g_llama_errors;

// The logger ggml has when this library loads, before any caller can set one: it prints every line
// to stderr. We stay quiet instead (slicemoe_set_verbose prints); any other logger a caller set,
// before or after us (llama-cpp-python sets one), gets every line from ours.
static ggml_log_callback logger_found_at_load() {
    ggml_log_callback callback = nullptr;
    void * user_data = nullptr;
    llama_log_get(&callback, &user_data);
    return callback;
}
static const ggml_log_callback g_default_logger = logger_found_at_load();
static ggml_log_callback g_next_logger = nullptr;   // the caller's logger we chain to, if any
static void *            g_next_user_data = nullptr;

static void log_callback(ggml_log_level level, const char * text, void * /*user_data*/) {
    ggml_log_level effective = level;   // a continued line has its first line's level
    ggml_log_callback next = nullptr;
    void * next_user_data = nullptr;
    {
        std::lock_guard<std::mutex> lock(g_log_mutex);
        if (level == GGML_LOG_LEVEL_CONT) {
            effective = g_last_level;
        }
        g_last_level = effective;
        next = g_next_logger;
        next_user_data = g_next_user_data;
        if (g_verbose && !next) {
            fputs(text, stderr);
            fflush(stderr);
        }
    }
    if (effective == GGML_LOG_LEVEL_ERROR && g_llama_errors.size() < 4096) {
        g_llama_errors += text;
    }
    if (next) {
        next(level, text, next_user_data);
    }
}

// Ours in front, chaining to whatever logger a caller installed since we last looked.
static void install_logger() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    ggml_log_callback current = nullptr;
    void * user_data = nullptr;
    llama_log_get(&current, &user_data);
    if (current == log_callback) {
        return;
    }
    g_next_logger = current == g_default_logger ? nullptr : current;
    g_next_user_data = user_data;
    llama_log_set(log_callback, nullptr);
}

void clear_llama_errors() {
    install_logger();
    g_llama_errors.clear();
}

std::string take_llama_errors() {
    std::string s;
    s.swap(g_llama_errors);
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) {
        s.pop_back();
    }
    return s;
}

int fail(int status, std::string message) {
    g_last_error = std::move(message);
    return status;
}

// A failure of a llama.cpp call: our message, then what llama.cpp logged about it.
int fail_llama(int status, const std::string & message) {
    const std::string detail = take_llama_errors();
    return fail(status, detail.empty() ? message : message + ": " + detail);
}

int ok() {
    g_last_error.clear();
    return SLICEMOE_OK;
}

int fail_nothrow(int status, const char * what, const char * detail) noexcept {
    try {
        g_last_error = std::string(what) + ": " + detail;
    } catch (...) {
        g_last_error.clear();   // out of memory even for the message: the status still says it
    }
    return status;
}

void init_once() {
    static std::once_flag once;
    std::call_once(once, [] {
        install_logger();
        llama_backend_init();
    });
}


} // namespace slicemoe::api

using namespace slicemoe::api;

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

bool slicemoe_policy_needs_logits(int32_t policy) {
    const slicemoe::policy_i * iface = slicemoe::policy_table(policy);
    return iface && iface->router_bias;
}

const char * slicemoe_policy_demand(int32_t policy) {
    const slicemoe::policy_i * iface = slicemoe::policy_table(policy);
    return iface ? iface->demand : nullptr;
}

int32_t slicemoe_setting_count(void) {
    return slicemoe::n_settings();
}

bool slicemoe_setting_get(int32_t i, slicemoe_setting * out) {
    const slicemoe::setting_def * def = slicemoe::setting_at(i);
    if (!def || !out) return false;
    slicemoe_model_params defaults = slicemoe_model_default_params();
    const void * field = def->field(defaults);
    double value = 0.0;
    switch (def->kind) {
        case SLICEMOE_SETTING_SIZE:   value = double(*static_cast<const int64_t *>(field)); break;
        case SLICEMOE_SETTING_CHOICE: value = double(*static_cast<const int32_t *>(field)); break;
        case SLICEMOE_SETTING_NUMBER: value = double(*static_cast<const float *>(field)); break;
        default:                      value = *static_cast<const bool *>(field) ? 1.0 : 0.0; break;
    }
    *out = { def->name, def->flag, def->kind, def->min, def->max, def->max_open, def->help, value };
    return true;
}

const char * slicemoe_setting_choice(int32_t i, int32_t value) {
    const slicemoe::setting_def * def = slicemoe::setting_at(i);
    return def && def->choice ? def->choice(value) : nullptr;
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

