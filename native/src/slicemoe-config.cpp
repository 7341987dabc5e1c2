#include "slicemoe-config.h"

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace slicemoe {

namespace {

constexpr const char * PREFIX = "slicemoe.";

struct name_value {
    const char * name;
    int32_t      value;
};

// The same names as the CLI's --precision, --warmup and --io; the policies' are their tables' (policy_i::name).
constexpr name_value PRECISIONS[] = {
    { "auto", SLICEMOE_PRECISION_AUTO }, { "high", SLICEMOE_PRECISION_HIGH }, { "low", SLICEMOE_PRECISION_LOW },
};
constexpr name_value WARMUPS[] = { { "none", SLICEMOE_WARMUP_NONE }, { "pcw", SLICEMOE_WARMUP_PCW } };
constexpr name_value IO_MODES[] = {
    { "auto", SLICEMOE_IO_AUTO }, { "direct", SLICEMOE_IO_DIRECT }, { "buffered", SLICEMOE_IO_BUFFERED },
};

// One configuration key: its text value (from an override or the environment) or a typed override.
struct setting {
    std::string name;        // without the prefix, e.g. "cache_budget"
    std::string source;      // "slicemoe.cache_budget" or "SLICEMOE_CACHE_BUDGET", for messages
    const llama_model_kv_override * kv = nullptr;   // nullptr: text holds the environment's value
    std::string text;
};

std::string env_name(const std::string & name) {
    std::string out = "SLICEMOE_";
    for (char ch : name) out += char(std::toupper(static_cast<unsigned char>(ch)));
    return out;
}

template <size_t N>
bool read_name(const setting & s, const name_value (&table)[N], int32_t * out, std::string * error) {
    const std::string text = s.kv ? (s.kv->tag == LLAMA_KV_OVERRIDE_TYPE_STR ? s.kv->val_str : "") : s.text;
    for (const name_value & nv : table) {
        if (text == nv.name) {
            *out = nv.value;
            return true;
        }
    }
    std::string names;
    for (const name_value & nv : table) names += std::string(names.empty() ? "" : ", ") + nv.name;
    *error = s.source + ": '" + text + "' is not one of " + names + " (a string)";
    return false;
}

bool read_policy(const setting & s, int32_t * out, std::string * error) {
    const std::string text = s.kv ? (s.kv->tag == LLAMA_KV_OVERRIDE_TYPE_STR ? s.kv->val_str : "") : s.text;
    std::string names;
    for (int32_t id = 0; id < n_policies(); ++id) {
        if (text == policy_table(id)->name) {
            *out = id;
            return true;
        }
        names += std::string(names.empty() ? "" : ", ") + policy_table(id)->name;
    }
    *error = s.source + ": '" + text + "' is not one of " + names + " (a string)";
    return false;
}

bool read_float(const setting & s, float * out, std::string * error) {
    double v = NAN;
    if (s.kv && s.kv->tag == LLAMA_KV_OVERRIDE_TYPE_FLOAT) v = s.kv->val_f64;
    else if (s.kv && s.kv->tag == LLAMA_KV_OVERRIDE_TYPE_INT) v = double(s.kv->val_i64);
    else if (!s.kv || s.kv->tag == LLAMA_KV_OVERRIDE_TYPE_STR) {
        const std::string text = s.kv ? s.kv->val_str : s.text;
        char * end = nullptr;
        v = std::strtod(text.c_str(), &end);
        if (text.empty() || *end != '\0') v = NAN;
    }
    if (!std::isfinite(v)) {
        *error = s.source + ": expected a number";
        return false;
    }
    *out = float(v);
    return true;
}

bool read_bool(const setting & s, bool * out, std::string * error) {
    if (s.kv && s.kv->tag == LLAMA_KV_OVERRIDE_TYPE_BOOL) {
        *out = s.kv->val_bool;
        return true;
    }
    if (!s.kv || s.kv->tag == LLAMA_KV_OVERRIDE_TYPE_STR) {
        const std::string text = s.kv ? s.kv->val_str : s.text;
        for (const char * t : { "1", "true", "yes", "on" }) if (text == t) { *out = true; return true; }
        for (const char * f : { "0", "false", "no", "off" }) if (text == f) { *out = false; return true; }
    }
    *error = s.source + ": expected a bool (true or false)";
    return false;
}

bool read_budget(const setting & s, stock_config * out, std::string * error) {
    int64_t bytes = 0;
    double percent = 0.0;
    bool ok = false;
    if (s.kv && s.kv->tag == LLAMA_KV_OVERRIDE_TYPE_INT) {
        bytes = s.kv->val_i64;
        ok = bytes >= 0;
    } else if (!s.kv || s.kv->tag == LLAMA_KV_OVERRIDE_TYPE_STR) {
        ok = parse_size(s.kv ? s.kv->val_str : s.text, &bytes, &percent);
    }
    if (!ok) {
        *error = s.source + ": expected a size in bytes (an int), or a string such as \"2GiB\", \"512MB\" or "
                 "\"40%\" (of all routed-expert slices); 0 = no cache";
        return false;
    }
    out->params.cache_budget_bytes = bytes;
    out->budget_percent = percent;
    return true;
}

bool apply(const setting & s, stock_config * out, std::string * error) {
    slicemoe_model_params & p = out->params;
    const std::string & n = s.name;
    if (n == "cache_budget")   return read_budget(s, out, error);
    if (n == "policy")         return read_policy(s, &p.policy, error);
    if (n == "precision")      return read_name(s, PRECISIONS, &p.precision, error);
    if (n == "warmup")         return read_name(s, WARMUPS, &p.warmup, error);
    if (n == "io_mode")        return read_name(s, IO_MODES, &p.io_mode, error);
    if (n == "high_threshold") return read_float(s, &p.high_threshold, error);
    if (n == "max_miss_rate")  return read_float(s, &p.max_miss_rate, error);
    if (n == "msb_share")      return read_float(s, &p.msb_share, error);
    if (n == "high_ratio")     return read_float(s, &p.high_ratio, error);
    if (n == "prior_lambda")   return read_float(s, &p.prior_lambda, error);
    if (n == "gating_t")       return read_float(s, &p.gating_t, error);
    if (n == "prefetch")       return read_bool(s, &p.prefetch, error);
    if (n == "record_trace")   return read_bool(s, &p.record_trace, error);
    *error = s.source + ": not a slicemoe setting (cache_budget, policy, precision, warmup, high_threshold, "
             "max_miss_rate, msb_share, high_ratio, prior_lambda, gating_t, prefetch, record_trace, io_mode)";
    return false;
}

} // namespace

bool parse_size(const std::string & text, int64_t * bytes, double * percent) {
    const char * s = text.c_str();
    while (std::isspace(static_cast<unsigned char>(*s))) ++s;
    char * end = nullptr;
    const double value = std::strtod(s, &end);
    if (end == s || !std::isfinite(value) || value < 0 || *s == '-' || *s == '+') return false;
    std::string unit;
    for (const char * u = end; *u; ++u) {
        if (!std::isspace(static_cast<unsigned char>(*u))) unit += char(std::tolower(static_cast<unsigned char>(*u)));
    }
    *percent = 0.0;
    if (unit == "%") {
        if (!(value > 0 && value <= 100)) return false;
        *percent = value;
        *bytes = 0;
        return true;
    }
    // the units of slicemoe_gguf/units.py: decimal KB/MB/GB/TB, binary K/M/G and KiB/MiB/GiB/TiB
    const struct { const char * name; double scale; } units[] = {
        { "", 1 }, { "b", 1 }, { "kb", 1e3 }, { "mb", 1e6 }, { "gb", 1e9 }, { "tb", 1e12 },
        { "k", 1024.0 }, { "m", 1048576.0 }, { "g", 1073741824.0 }, { "kib", 1024.0 }, { "mib", 1048576.0 },
        { "gib", 1073741824.0 }, { "tib", 1099511627776.0 },
    };
    for (const auto & u : units) {
        if (unit == u.name && value * u.scale < 9.0e18) {
            *bytes = int64_t(value * u.scale);
            return true;
        }
    }
    return false;
}

bool read_stock_config(const llama_model_kv_override * overrides, stock_config * out, std::string * error) {
    out->params = slicemoe_model_default_params();
    out->budget_percent = 0.0;
    out->any = false;
    std::vector<setting> given;
    for (const llama_model_kv_override * kv = overrides; kv && kv->key[0] != '\0'; ++kv) {
        const std::string key = kv->key;
        if (key.rfind(PREFIX, 0) != 0) continue;
        given.push_back({ key.substr(std::strlen(PREFIX)), key, kv, "" });
    }
    for (const char * name : { "cache_budget", "policy", "precision", "warmup", "high_threshold", "max_miss_rate",
                               "msb_share", "high_ratio", "prior_lambda", "gating_t", "prefetch", "record_trace",
                               "io_mode" }) {
        bool overridden = false;
        for (const setting & s : given) overridden = overridden || s.name == name;
        const std::string var = env_name(name);
        const char * value = std::getenv(var.c_str());
        if (!overridden && value) {
            given.push_back({ name, var, nullptr, value });
        }
    }
    for (const setting & s : given) {
        if (!apply(s, out, error)) return false;
    }
    out->any = !given.empty();
    return true;
}

} // namespace slicemoe
