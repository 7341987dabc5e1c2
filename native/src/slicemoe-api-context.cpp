// The C API: contexts, and the evaluation of one or several sequences.

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

