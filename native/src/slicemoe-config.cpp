// The engine's settings: one table (SETTINGS) from which the slicemoe.* override keys, the
// SLICEMOE_* variables, the range checks and their messages, and (through slicemoe_setting_get)
// the Python layer's names, flags and checks all come.

#include "slicemoe-config.h"

#include <cctype>
#include <cmath>
#include <cstdio>
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

const char * precision_name(int32_t value) {
    constexpr const char * names[] = { "auto", "high", "low" };   // enum slicemoe_precision
    return value >= 0 && value < 3 ? names[value] : nullptr;
}

const char * warmup_name(int32_t value) {
    constexpr const char * names[] = { "none", "pcw" };   // enum slicemoe_warmup
    return value >= 0 && value < 2 ? names[value] : nullptr;
}

const char * io_mode_name(int32_t value) {
    constexpr const char * names[] = { "auto", "direct", "buffered" };   // enum slicemoe_io_mode
    return value >= 0 && value < 3 ? names[value] : nullptr;
}

const char * policy_name(int32_t value) {
    const policy_i * iface = policy_table(value);
    return iface ? iface->name : nullptr;
}

using P = slicemoe_model_params;

// the field of a model's parameters that a setting sets
#define FIELD(member) [](P & params) -> void * { return &params.member; }

//   name              flag                kind                     min   max   open  help
const setting_def SETTINGS[] = {
    { "cache_budget",   "--cache-budget",   SLICEMOE_SETTING_SIZE,   0.0f, 0.0f, false,
      "RAM for routed-expert slices: bytes, a size (2GiB) or a percentage of all slices (40%); 0 = no cache",
      nullptr, FIELD(cache.budget_bytes) },
    { "policy",         "--policy",         SLICEMOE_SETTING_CHOICE, 0.0f, 0.0f, false,
      "the cache policy", policy_name, FIELD(cache.policy) },
    { "precision",      "--precision",      SLICEMOE_SETTING_CHOICE, 0.0f, 0.0f, false,
      "routed experts at 8 bits (high), 4 bits (low) or per use by the policy (auto)", precision_name,
      FIELD(cache.precision) },
    { "warmup",         "--warmup",         SLICEMOE_SETTING_CHOICE, 0.0f, 0.0f, false,
      "prefill-time cache warm-up from the prompt's routing (pcw) or none", warmup_name, FIELD(cache.warmup) },
    { "high_threshold", "--high-threshold", SLICEMOE_SETTING_NUMBER, 0.0f, 1.0f, false,
      "auto precision: a use runs at 8 bits when its routing weight reaches this", nullptr,
      FIELD(cache.high_threshold) },
    { "max_miss_rate",  "--max-miss-rate",  SLICEMOE_SETTING_NUMBER, 0.0f, 1.0f, true,
      "auto precision: move the threshold to keep the slice miss rate under this; 0 = a fixed threshold",
      nullptr, FIELD(cache.max_miss_rate) },
    { "msb_share",      "--msb-share",      SLICEMOE_SETTING_NUMBER, 0.0f, 1.0f, false,
      "share of a layer's budget for MSB slices; 0 = the policy's own split", nullptr, FIELD(cache.msb_share) },
    { "high_ratio",     "--high-ratio",     SLICEMOE_SETTING_NUMBER, 0.0f, 1.0f, false,
      "dymoe: the share of 8-bit uses at the first MoE layer; 0 = 0.5", nullptr, FIELD(cache.high_ratio) },
    { "prior_lambda",   "--prior-lambda",   SLICEMOE_SETTING_NUMBER, 0.0f, 1e6f, false,
      "cache_prior: a cached expert's router logit bias, in mean logit ranges", nullptr, FIELD(cache.prior_lambda) },
    { "gating_t",       "--gating-t",       SLICEMOE_SETTING_NUMBER, 0.0f, 1.0f, false,
      "adapmoe: a use after the first is dropped when its weight is below sqrt(T / S_l) (T a squared weight)",
      nullptr, FIELD(cache.gating_t) },
    { "lsb_background", "--lsb-background", SLICEMOE_SETTING_FLAG,   0.0f, 0.0f, false,
      "an 8-bit use whose MSB slice hits and LSB slice misses runs at 4 bits while the LSB slice is read for the next token",
      nullptr, FIELD(cache.lsb_background) },
    { "prefetch",       "--prefetch",       SLICEMOE_SETTING_FLAG,   0.0f, 0.0f, false,
      "load the next layer's predicted experts while this one computes", nullptr, FIELD(prefetch) },
    { "low_precision_prompt", "--low-precision-prompt", SLICEMOE_SETTING_FLAG, 0.0f, 0.0f, false,
      "a prompt's expert products read the MSB slices only (4 bits) but for its last token's: a first prompt reads about half the bytes; decode keeps the policy's precision",
      nullptr, FIELD(low_precision_prompt) },
    { "record_trace",   "",                 SLICEMOE_SETTING_FLAG,   0.0f, 0.0f, false,
      "record the routing of every token (slicemoe trace)", nullptr, FIELD(record_trace) },
    { "io_mode",        "--io",             SLICEMOE_SETTING_CHOICE, 0.0f, 0.0f, false,
      "read misses with O_DIRECT where the file system has it (auto), always (direct) or through the page cache",
      io_mode_name, FIELD(io_mode) },
};

#undef FIELD

const setting_def * find_setting(const std::string & name) {
    for (const setting_def & def : SETTINGS) {
        if (name == def.name) return &def;
    }
    return nullptr;
}

std::string number_text(float v) {
    char buf[32];
    snprintf(buf, sizeof(buf), "%g", double(v));
    std::string text = buf;
    const size_t e = text.find("e+");
    if (e != std::string::npos) {   // 1e+06 -> 1e6
        size_t digits = e + 2;
        while (digits + 1 < text.size() && text[digits] == '0') ++digits;
        text = text.substr(0, e + 1) + text.substr(digits);
    }
    return text;
}

// One value given for a setting: its text (from an override or the environment) or a typed override.
struct given_value {
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

bool read_choice(const given_value & s, const setting_def & def, int32_t * out, std::string * error) {
    const std::string text = s.kv ? (s.kv->tag == LLAMA_KV_OVERRIDE_TYPE_STR ? s.kv->val_str : "") : s.text;
    std::string names;
    for (int32_t value = 0; def.choice(value); ++value) {
        if (text == def.choice(value)) {
            *out = value;
            return true;
        }
        names += std::string(names.empty() ? "" : ", ") + def.choice(value);
    }
    *error = s.source + ": '" + text + "' is not one of " + names + " (a string)";
    return false;
}

bool read_float(const given_value & s, float * out, std::string * error) {
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

bool read_bool(const given_value & s, bool * out, std::string * error) {
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

bool read_budget(const given_value & s, stock_config * out, std::string * error) {
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
    *static_cast<int64_t *>(find_setting("cache_budget")->field(out->params)) = bytes;
    out->budget_percent = percent;
    return true;
}

bool apply(const given_value & s, stock_config * out, std::string * error) {
    const setting_def * def = find_setting(s.name);
    if (!def) {
        std::string names;
        for (const setting_def & d : SETTINGS) names += std::string(names.empty() ? "" : ", ") + d.name;
        *error = s.source + ": not a slicemoe setting (" + names + ")";
        return false;
    }
    slicemoe_model_params & p = out->params;
    switch (def->kind) {
        case SLICEMOE_SETTING_SIZE:   return read_budget(s, out, error);
        case SLICEMOE_SETTING_CHOICE: return read_choice(s, *def, static_cast<int32_t *>(def->field(p)), error);
        case SLICEMOE_SETTING_NUMBER: return read_float(s, static_cast<float *>(def->field(p)), error);
        default:                      return read_bool(s, static_cast<bool *>(def->field(p)), error);
    }
}

} // namespace

int32_t n_settings() {
    return int32_t(sizeof(SETTINGS) / sizeof(SETTINGS[0]));
}

const setting_def * setting_at(int32_t i) {
    return i >= 0 && i < n_settings() ? &SETTINGS[i] : nullptr;
}

std::string range_problem(const char * name, float value) {
    const setting_def & def = *find_setting(name);
    const bool in = value >= def.min && (def.max_open ? value < def.max : value <= def.max);   // false for NaN
    if (in) return "";
    return std::string(name) + " must be in [" + number_text(def.min) + ", " + number_text(def.max) +
           (def.max_open ? ")" : "]");
}

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
    std::vector<given_value> given;
    for (const llama_model_kv_override * kv = overrides; kv && kv->key[0] != '\0'; ++kv) {
        const std::string key = kv->key;
        if (key.rfind(PREFIX, 0) != 0) continue;
        given.push_back({ key.substr(std::strlen(PREFIX)), key, kv, "" });
    }
    for (const setting_def & def : SETTINGS) {
        const char * name = def.name;
        bool overridden = false;
        for (const given_value & s : given) overridden = overridden || s.name == name;
        const std::string var = env_name(name);
        const char * value = std::getenv(var.c_str());
        if (!overridden && value) {
            given.push_back({ name, var, nullptr, value });
        }
    }
    for (const given_value & s : given) {
        if (!apply(s, out, error)) return false;
    }
    out->any = !given.empty();
    return true;
}

} // namespace slicemoe
