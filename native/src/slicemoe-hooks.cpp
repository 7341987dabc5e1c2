// The engine's side of patch 0004: what llama.cpp calls at model load, at context creation and
// around every ubatch, so that a sliced model runs its engine whichever API loaded it.

#include "slicemoe-graph.h"
#include "slicemoe-config.h"
#include "slicemoe-engine.h"

#include "llama-impl.h"
#include "llama-model.h"

#include <stdexcept>
#include <string>

namespace slicemoe {

namespace {

thread_local explicit_load * t_explicit_load = nullptr;
// The failure of the last ubatch this thread ran, until slicemoe_eval takes it.
thread_local std::string t_failure;

// All routed-expert slices of the model (what "N%" of a budget refers to).
int64_t slice_bytes(const llama_model & model) {
    int64_t total = 0;
    for (const llama_layer & l : model.layers) {
        for (const ggml_tensor * t : { l.ffn_up_exps, l.ffn_gate_exps, l.ffn_down_exps,
                                       l.ffn_up_exps_lsb, l.ffn_gate_exps_lsb, l.ffn_down_exps_lsb }) {
            total += t ? int64_t(ggml_nbytes(t)) : 0;
        }
    }
    return total;
}

bool fail_load(int status, const std::string & message) {
    LLAMA_LOG_ERROR("slicemoe: %s\n", message.c_str());
    if (t_explicit_load) {
        t_explicit_load->status = status;
        t_explicit_load->error = message;
    }
    return false;
}

} // namespace

void set_explicit_load(explicit_load * load) {
    t_explicit_load = load;
}

bool take_error(std::string * message) {
    if (t_failure.empty()) return false;
    *message = std::move(t_failure);
    t_failure.clear();
    return true;
}

} // namespace slicemoe

bool slicemoe_model_loaded(llama_model * model, const char * path, const llama_model_params & params) {
    using namespace slicemoe;
    if (params.no_alloc || params.vocab_only) {
        return true;   // nothing will run: a check or a memory estimate
    }
    try {
        stock_config config;
        std::string error;
        if (t_explicit_load) {
            config.params = *t_explicit_load->params;
        } else {
            if (!read_stock_config(params.kv_overrides, &config, &error)) {
                return fail_load(SLICEMOE_ERR_INVALID_ARG, error);
            }
            config.params.use_mmap = params.load_mode == LLAMA_LOAD_MODE_MMAP ||
                                     params.load_mode == LLAMA_LOAD_MODE_MMAP_MLOCK ||
                                     params.load_mode == LLAMA_LOAD_MODE_AUTO;
        }
        slicemoe_model_params & p = config.params;
        if (!model_params_valid(p, &error)) {
            return fail_load(SLICEMOE_ERR_INVALID_ARG, error);
        }
        char version[16];
        const bool sliced = llama_model_meta_val_str(model, "slicemoe.format_version", version, sizeof(version)) >= 0;
        if (!sliced && (p.cache.budget_bytes > 0 || config.budget_percent > 0)) {
            return fail_load(SLICEMOE_ERR_INVALID_ARG, std::string("'") + path + "' is not a sliced (AMAT) model: a slice "
                             "cache needs a file written by slicemoe-convert --experts amat");
        }
        if (config.budget_percent > 0) {
            p.cache.budget_bytes = int64_t(double(slice_bytes(*model)) * config.budget_percent / 100.0);
        }
        if (!sliced && !p.record_trace && !p.forced_routes) {
            return true;   // a stock model runs as llama.cpp runs it
        }
        const int status = attach(model, path, p, sliced, &error);
        const slicemoe::cache * engine = status == SLICEMOE_OK ? slicemoe::engine_of(model) : nullptr;
        if (engine && slicemoe::io_note(engine)[0] != '\0') {
            LLAMA_LOG_WARN("slicemoe: %s\n", slicemoe::io_note(engine));
        }
        return status == SLICEMOE_OK || fail_load(status, error);
    } catch (const std::bad_alloc &) {
        return fail_load(SLICEMOE_ERR_NO_MEMORY, "out of memory while building the slice cache");
    } catch (const std::exception & e) {
        return fail_load(SLICEMOE_ERR_INTERNAL, std::string("internal error: ") + e.what());
    }
}

void slicemoe_context_init(const llama_model & model, ggml_backend_sched_eval_callback & cb_eval, void *& cb_eval_user_data) {
    slicemoe::cache * engine = slicemoe::engine_of(&model);
    if (!engine) {
        return;
    }
    if (cb_eval == slicemoe::eval_callback) {   // parameters copied from a context of a model
        if (slicemoe::engine_of_callback(cb_eval, cb_eval_user_data) != engine) {
            throw std::runtime_error("slicemoe: this context's eval callback is another model's engine");
        }
        // a chain of its own, calling what the other context's chain calls after the engine
        const auto * other = static_cast<const slicemoe::eval_chain *>(cb_eval_user_data);
        cb_eval_user_data = slicemoe::new_chain(*engine, other->user, other->user_data);
        return;
    }
    // the engine's callback first; a callback the context brought runs after it
    cb_eval_user_data = slicemoe::new_chain(*engine, cb_eval, cb_eval_user_data);
    cb_eval = slicemoe::eval_callback;
}

void slicemoe_context_free(const llama_model & model, ggml_backend_sched_eval_callback cb_eval, void * cb_eval_user_data) {
    slicemoe::cache * engine = slicemoe::engine_of(&model);
    if (engine && cb_eval == slicemoe::eval_callback) {
        slicemoe::free_chain(*engine, static_cast<slicemoe::eval_chain *>(cb_eval_user_data));
    }
}

slicemoe_ubatch_scope::slicemoe_ubatch_scope(ggml_backend_sched_eval_callback cb_eval, void * cb_eval_user_data,
                                             uint32_t n_tokens, uint32_t n_seqs, int32_t first_pos) {
    if (cb_eval != slicemoe::eval_callback || n_tokens == 0) {
        return;
    }
    engine_ = slicemoe::engine_of_callback(cb_eval, cb_eval_user_data);
    lock_ = std::unique_lock<std::mutex>(slicemoe::compute_mutex(*engine_));
    if (!slicemoe::begin_ubatch(*engine_, first_pos, n_tokens, n_seqs, &slicemoe::t_failure)) {
        LLAMA_LOG_ERROR("slicemoe: %s\n", slicemoe::t_failure.c_str());
        admitted_ = false;
    }
}

slicemoe_ubatch_scope::~slicemoe_ubatch_scope() {
    if (engine_ && admitted_ && !finished_) {
        try {
            std::string ignored;   // the graph's own failure is what the caller reports
            slicemoe::end_ubatch(*engine_, &ignored);
        } catch (...) {
        }
    }
}

bool slicemoe_ubatch_scope::finished() {
    finished_ = true;
    if (!engine_ || slicemoe::end_ubatch(*engine_, &slicemoe::t_failure)) {
        return true;
    }
    LLAMA_LOG_ERROR("slicemoe: %s\n", slicemoe::t_failure.c_str());
    return false;
}
