// The C API: sampling.

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

