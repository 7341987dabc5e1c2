// The C API: loading, checking, describing and quantizing a model; tokens, pieces and chat templates.

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
#include "gguf.h"

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
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

using namespace slicemoe::api;

// ---------------------------------------------------------------------------------------------
// model

// The one set of defaults: the CLI, Model, replay and slicemoe_gguf/defaults.py all read these.
slicemoe_cache_params slicemoe_cache_default_params(void) {
    slicemoe_cache_params p = {};
    p.budget_bytes   = 0;
    p.policy         = SLICEMOE_POLICY_DBSC;
    p.precision      = SLICEMOE_PRECISION_AUTO;
    p.warmup         = SLICEMOE_WARMUP_PCW;
    p.high_threshold = 0.25f;
    p.max_miss_rate  = 0.0f;
    p.msb_share      = 0.0f;
    p.high_ratio     = 0.0f;
    p.prior_lambda   = 0.5f;
    p.gating_t       = 0.04f;
    p.lsb_background = false;
    return p;   // no per-layer arrays
}

slicemoe_model_params slicemoe_model_default_params(void) {
    slicemoe_model_params p = {};
    p.n_gpu_layers  = 0;
    p.use_mmap      = true;
    p.cache         = slicemoe_cache_default_params();
    p.record_trace  = false;
    p.prefetch      = false;
    p.io_mode       = SLICEMOE_IO_AUTO;
    p.low_precision_prompt = false;
    p.forced_routes = false;
    return p;
}

namespace slicemoe::api {

// llama.cpp's no_alloc load on the CPU: every tensor is created (names, counts, shapes checked)
// and sized, none is read or allocated. slicemoe_model_check and slicemoe_memory_estimate use it.
llama_model_params no_alloc_params() {
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers    = 0;
    mp.load_mode       = LLAMA_LOAD_MODE_NONE;
    mp.no_alloc        = true;
    return mp;
}

// Every file passes here before llama.cpp's loader sees it: what llama.cpp would only report as
// "failed to load" (missing file, not a GGUF), then the validator (what it would abort on).
int check_gguf_file(const char * path) {
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

} // namespace slicemoe::api

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
        if (p.cache.budget_bytes < 0) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "the cache budget must be >= 0 bytes");
        }
        std::string invalid;
        if (!slicemoe::model_params_valid(p, &invalid)) {
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
        if (p.cache.budget_bytes > 0 && p.n_gpu_layers != 0) {
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

namespace {

struct llama_file_type_name {
    const char * name;
    llama_ftype  ftype;
};

// The file types users pick by name in llama.cpp's quantize tool and on model hubs.
const llama_file_type_name llama_file_types[] = {
    {"Q4_0", LLAMA_FTYPE_MOSTLY_Q4_0},     {"Q4_1", LLAMA_FTYPE_MOSTLY_Q4_1},
    {"Q5_0", LLAMA_FTYPE_MOSTLY_Q5_0},     {"Q5_1", LLAMA_FTYPE_MOSTLY_Q5_1},
    {"Q8_0", LLAMA_FTYPE_MOSTLY_Q8_0},     {"Q3_K_M", LLAMA_FTYPE_MOSTLY_Q3_K_M},
    {"Q4_K_S", LLAMA_FTYPE_MOSTLY_Q4_K_S}, {"Q4_K_M", LLAMA_FTYPE_MOSTLY_Q4_K_M},
    {"Q5_K_S", LLAMA_FTYPE_MOSTLY_Q5_K_S}, {"Q5_K_M", LLAMA_FTYPE_MOSTLY_Q5_K_M},
    {"Q6_K", LLAMA_FTYPE_MOSTLY_Q6_K},
};

bool is_routed_expert(const std::string & name) {
    const std::string suffix = "_exps.weight";
    return name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// One exact pattern per routed-expert tensor of `path`, pinned to the type it has: llama.cpp's
// quantizer copies a tensor whose target type is its own type.
// (The patterns live here while tt_overrides points at them.)
struct expert_pin {
    std::string pattern;
    ggml_type   type;
};

bool expert_type_pins(const char * path, std::vector<expert_pin> * pins) {
    gguf_init_params params = {/*no_alloc =*/ true, /*ctx =*/ nullptr};
    gguf_context * ctx = gguf_init_from_file(path, params);
    if (!ctx) {
        return false;
    }
    for (int64_t i = 0; i < gguf_get_n_tensors(ctx); ++i) {
        const std::string name = gguf_get_tensor_name(ctx, i);
        if (is_routed_expert(name)) {
            std::string escaped;
            for (char ch : name) {
                if (ch == '.') escaped += '\\';
                escaped += ch;
            }
            pins->push_back({"^" + escaped + "$", gguf_get_tensor_type(ctx, i)});
        }
    }
    gguf_free(ctx);
    return true;
}

}  // namespace

int slicemoe_quantize_file(const char * src, const char * dst, const char * file_type, bool keep_experts,
                           int32_t n_threads) {
    return guard([&]() -> int {
        init_once();
        if (!src || !dst || !file_type) {
            return fail(SLICEMOE_ERR_INVALID_ARG, "slicemoe_quantize_file: src, dst and file_type must not be NULL");
        }
        const llama_file_type_name * chosen = nullptr;
        std::string known;
        for (const auto & t : llama_file_types) {
            if (strcasecmp(t.name, file_type) == 0) chosen = &t;
            known += std::string(known.empty() ? "" : ", ") + t.name;
        }
        if (!chosen) {
            return fail(SLICEMOE_ERR_INVALID_ARG, std::string("unknown llama.cpp file type '") + file_type +
                                                      "' (one of " + known + ")");
        }
        const int status = check_gguf_file(src);
        if (status != SLICEMOE_OK) {
            return status;
        }
        std::vector<expert_pin> experts;
        if (keep_experts && !expert_type_pins(src, &experts)) {
            return fail(SLICEMOE_ERR_FORMAT, std::string("cannot read the tensors of '") + src + "'");
        }
        std::vector<llama_model_tensor_override> pins;
        for (const expert_pin & pin : experts) {
            pins.push_back({pin.pattern.c_str(), pin.type});
        }
        pins.push_back({nullptr, GGML_TYPE_COUNT});
        llama_model_quantize_params params = llama_model_quantize_default_params();
        params.ftype            = chosen->ftype;
        params.nthread          = n_threads;
        params.allow_requantize = true;
        params.tt_overrides     = pins.size() > 1 ? pins.data() : nullptr;
        clear_llama_errors();
        if (llama_model_quantize(src, dst, &params) != 0) {
            return fail_llama(SLICEMOE_ERR_FORMAT, std::string("llama.cpp could not quantize '") + src + "' to " +
                                                       chosen->name);
        }
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

