// Configuration of a model loaded through llama.cpp's own entry points (llama_model_load_from_file,
// as llama-cpp-python calls it): slicemoe.* key-value overrides, with SLICEMOE_* environment
// variables as the fallback for each key not overridden. The names and values are those of
// `slicemoe run`'s flags (see docs/usage.md, "Serving, chat and llama-cpp-python").
#pragma once

#include "slicemoe.h"
#include "slicemoe-policy.h"
#include "llama.h"

#include <string>
#include <utility>

namespace slicemoe {

// One of the engine's settings (the table is in slicemoe-config.cpp): its public description and
// the field of slicemoe_model_params it sets.
struct setting_def {
    const char * name;
    const char * flag;
    int32_t      kind;                      // enum slicemoe_setting_kind
    float        min, max;                  // NUMBER: the range
    bool         max_open;
    const char * help;
    const char * (*choice)(int32_t value) = nullptr;   // CHOICE: the name of a value, nullptr past the last
    // The field it sets in a model's parameters: an int32_t (CHOICE), float (NUMBER), bool (FLAG)
    // or int64_t bytes (SIZE).
    void * (*field)(slicemoe_model_params & params) = nullptr;
};
int32_t             n_settings();
const setting_def * setting_at(int32_t i);   // nullptr past the last
// "" when value is in the range of the NUMBER setting `name`, else "name must be in [min, max]".
std::string range_problem(const char * name, float value);

struct stock_config {
    slicemoe_model_params params;  // from slicemoe_model_default_params(), then the keys given
    double budget_percent = 0.0;   // slicemoe.cache_budget given as "N%" of all routed slices; 0 = bytes
    bool   any = false;            // at least one key or variable was given
};

// Reads the slicemoe.* overrides (an unknown slicemoe.* key is an error, so that a typo never
// runs silently with the defaults) and the environment. False with *error naming the key and
// what it takes when a value is bad.
bool read_stock_config(const llama_model_kv_override * overrides, stock_config * out, std::string * error);

// The settings of a live cache or a replay, checked the same way for both: false with *error naming
// the setting and what it takes.
inline bool cache_params_valid(const slicemoe_cache_params & p, std::string * error) {
    const auto in = [](float v, float lo, float hi) { return v >= lo && v <= hi; };   // false for NaN
    const char * problem = nullptr;
    std::string range;
    for (const auto & [name, value] : { std::pair<const char *, float>{ "high_threshold", p.high_threshold },
                                        { "max_miss_rate", p.max_miss_rate }, { "msb_share", p.msb_share },
                                        { "high_ratio", p.high_ratio }, { "prior_lambda", p.prior_lambda },
                                        { "gating_t", p.gating_t } }) {
        if (range.empty()) range = range_problem(name, value);
    }
    if (!policy_table(p.policy)) problem = "policy: not a known policy";
    else if (p.precision < SLICEMOE_PRECISION_AUTO || p.precision > SLICEMOE_PRECISION_LOW) problem = "precision: auto (0), high (1) or low (2)";
    else if (p.warmup < SLICEMOE_WARMUP_NONE || p.warmup > SLICEMOE_WARMUP_PCW) problem = "warmup: none (0) or pcw (1)";
    else if (!range.empty()) problem = range.c_str();
    else if (p.n_layer_slots < 0 || (p.n_layer_slots > 0 && !p.layer_slots)) problem = "layer_slots: NULL with a count above 0";
    else if (p.n_layer_sensitivity < 0 || (p.n_layer_sensitivity > 0 && !p.layer_sensitivity)) problem = "layer_sensitivity: NULL with a count above 0";
    else if (p.n_layer_high_uses < 0 || (p.n_layer_high_uses > 0 && !p.layer_high_uses)) problem = "layer_high_uses: NULL with a count above 0";
    for (int32_t i = 0; !problem && i < p.n_layer_sensitivity; ++i) {
        if (!in(p.layer_sensitivity[i], 1e-6f, 1e6f)) problem = "layer_sensitivity: every S_l must be in [1e-6, 1e6]";
    }
    for (int32_t i = 0; !problem && i < p.n_layer_high_uses; ++i) {
        if (p.layer_high_uses[i] < 0) problem = "layer_high_uses: counts must be >= 0";
    }
    if (problem) {
        *error = problem;
        return false;
    }
    return true;
}

// A model's parameters: its cache's settings and how misses are read.
inline bool model_params_valid(const slicemoe_model_params & p, std::string * error) {
    if (!cache_params_valid(p.cache, error)) {
        return false;
    }
    if (p.io_mode < SLICEMOE_IO_AUTO || p.io_mode > SLICEMOE_IO_BUFFERED) {
        *error = "io_mode: auto (0), direct (1) or buffered (2)";
        return false;
    }
    return true;
}

// "2GiB", "512MB", "1.5 GB", "1073741824" (bytes) or "40%": the size grammar of the CLI.
bool parse_size(const std::string & text, int64_t * bytes, double * percent);

} // namespace slicemoe
