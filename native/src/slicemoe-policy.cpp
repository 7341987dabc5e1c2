// The cache policies: one policy_i table each, with the hooks and the state that policy needs
// (slicemoe-policy.h). Live runs and trace replay call the same hooks, so a policy is the same
// code in both.

#include "slicemoe-policy.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace slicemoe {

namespace {

constexpr int AUTO = SLICEMOE_PRECISION_AUTO, HIGH = SLICEMOE_PRECISION_HIGH, LOW = SLICEMOE_PRECISION_LOW;

// ---- the threshold rule of SliceMoE (dbsc, hobbit, cache_prior) and its miss-rate controller ----

// --max-miss-rate: after each decode token (at its first MoE layer) compare the smoothed slice
// miss rate with the target; above it, fewer uses run at 8 bits (each one may miss an LSB slice),
// below it, more do. Steps are asymmetric so the rate settles under the target.
struct threshold_rule {
    float   threshold = 0.25f;
    double  miss_rate_ema = 0.0;
    int64_t token_uses = 0, token_misses = 0;

    void count(bool hit) {
        token_uses += 1;
        token_misses += !hit;
    }

    void adapt(float max_miss_rate, int64_t decode_tokens) {
        if (token_uses == 0) return;
        const double rate = double(token_misses) / double(token_uses);
        miss_rate_ema = decode_tokens <= 2 ? rate : 0.8 * miss_rate_ema + 0.2 * rate;
        token_uses = token_misses = 0;
        threshold = miss_rate_ema > max_miss_rate ? std::min(1.0f, threshold + 0.05f)
                                                  : std::max(0.0f, threshold - 0.01f);
    }
};

// dbsc's eviction order: a slice's uses, each decayed by HEAT_DECAY per decode token of its layer
// since (a half-life of about 140 tokens). Counts are kept for every expert, cached or not, so a
// slice evicted too early comes back with its history, and an MSB and an LSB slice compete for a
// shared slot on what each has been worth lately: the split between them follows the routing.
// Of 0.5 .. 1, 0.995 read the fewest bytes on held-out routing of the embedded model, and within
// 1% of the fewest on the second trained model (top-2 of 16; results/optimum.md). Adding the use's
// routing weight instead of 1 read 2-31% more.
constexpr double HEAT_DECAY = 0.995;

struct heat_table {
    std::vector<double>  count;   // [layer][kind][expert]: decayed uses
    std::vector<int64_t> at;      // the layer's decode step of that count
    int n_expert = 0;

    size_t index(int layer, int kind, int expert) const {
        return (size_t(layer) * 2 + size_t(kind)) * size_t(n_expert) + size_t(expert);
    }
    double heat(int layer, int kind, int expert, int64_t event) const {
        const size_t i = index(layer, kind, expert);
        return count[i] * std::pow(HEAT_DECAY, double(event - at[i]));
    }
    void add(int layer, int kind, int expert, int64_t event) {
        const size_t i = index(layer, kind, expert);
        count[i] = heat(layer, kind, expert, event) + 1.0;
        at[i] = event;
    }
};

// The state of the policies that pick 8-bit uses by the threshold rule: the rule, and what dbsc
// (heat) or cache_prior (each layer's mean logit range) keeps besides.
struct threshold_state {
    threshold_rule       rule;
    heat_table           heat;
    std::vector<double>  logit_range_sum;   // per layer: sum and count of (max - min) router logit
    std::vector<int64_t> logit_range_n;
};

threshold_state & state(const policy & self) {
    return *static_cast<threshold_state *>(self.ctx);
}

void * init_threshold(const policy & self, const policy_shape & shape) {
    auto * s = new threshold_state();
    s->rule.threshold = self.params.high_threshold;
    return s;
}

void * init_dbsc(const policy & self, const policy_shape & shape) {
    auto * s = static_cast<threshold_state *>(init_threshold(self, shape));
    const size_t n = size_t(shape.n_layers) * 2 * size_t(shape.n_expert);
    s->heat.count.assign(n, 0.0);
    s->heat.at.assign(n, 0);
    s->heat.n_expert = shape.n_expert;
    return s;
}

void * init_cache_prior(const policy & self, const policy_shape & shape) {
    auto * s = static_cast<threshold_state *>(init_threshold(self, shape));
    s->logit_range_sum.assign(size_t(shape.n_layers), 0.0);
    s->logit_range_n.assign(size_t(shape.n_layers), 0);
    return s;
}

void free_threshold(void * ctx) {
    delete static_cast<threshold_state *>(ctx);
}

// SliceMoE: the top-ranked use, and any use whose routing weight reaches the threshold
bool important(const policy & self, const use_view & use) {
    return use.rank == 0 || use.weight >= state(self).rule.threshold;
}

// HOBBIT: a hit runs at the precision cached; a miss loads what the use's importance asks for
bool hobbit_use(const policy & self, const use_view & use) {
    return use.msb_hit ? use.lsb_cached : important(self, use);
}

void count_threshold(policy & self, const use_view &, int, bool hit) {
    state(self).rule.count(hit);
}

void count_dbsc(policy & self, const use_view & use, int kind, bool hit) {
    state(self).rule.count(hit);
    state(self).heat.add(use.layer, kind, use.expert, use.event);
}

void adapt_threshold(policy & self, int64_t decode_tokens) {
    if (self.params.max_miss_rate > 0.0f && self.precision == AUTO) {
        state(self).rule.adapt(self.params.max_miss_rate, decode_tokens);
    }
}

float current_threshold(const policy & self) {
    return state(self).rule.threshold;
}

// cache_prior: bias every cached expert's logit by lambda times the layer's mean logit range
// (max - min over experts, averaged over decode tokens so far, this one included).
void cache_prior_bias(policy & self, int layer, const float * logits, const char * msb_cached, float * bias) {
    threshold_state & s = state(self);
    const int n_expert = self.shape.n_expert;
    const auto range = std::minmax_element(logits, logits + n_expert);
    s.logit_range_sum[size_t(layer)] += double(*range.second - *range.first);
    s.logit_range_n[size_t(layer)] += 1;
    const double mean_range = s.logit_range_sum[size_t(layer)] / double(s.logit_range_n[size_t(layer)]);
    const float shift = float(double(self.params.prior_lambda) * mean_range);
    for (int e = 0; e < n_expert; ++e) {
        bias[e] = msb_cached[e] ? shift : 0.0f;
    }
}

// ---- the other precision rules ----

// DyMoE: the best-ranked uses run at 8 bits, as many as the layer's calibrated count, else by the
// depth schedule: round(ratio * k) ranks at the first MoE layer, falling by a half cosine to none
// at the last
bool dymoe_rank(const policy & self, const use_view & use) {
    if (!self.params.layer_high_uses.empty()) {
        return use.rank < self.params.layer_high_uses[size_t(use.layer)];
    }
    const int n = self.shape.n_layers;
    const double depth = n > 1 ? double(use.layer) / double(n - 1) : 0.0;
    const double share = self.params.high_ratio * 0.5 * (1.0 + std::cos(M_PI * depth));
    return use.rank < int(std::lround(share * self.shape.top_k));
}

// AdapMoE's gating: a use after the first whose weight is below sqrt(T / S_l) is left out, S_l the
// layer's calibrated sensitivity (1 without calibration)
bool adapmoe_drop(const policy & self, const use_view & use) {
    const std::vector<float> & s = self.params.layer_sensitivity;
    const float sensitivity = s.empty() ? 1.0f : s[size_t(use.layer)];
    return use.weight < std::sqrt(self.params.gating_t / sensitivity);
}

// ---- eviction orders (lowest key first; ties: least recently used) ----

double coldest(const policy & self, const slice_view & slice) {
    return state(self).heat.heat(slice.layer, slice.kind, slice.expert, slice.event);
}

double least_recent(const policy &, const slice_view & slice) {
    return double(slice.last_use);
}

double least_frequent(const policy &, const slice_view & slice) {
    return double(slice.uses);
}

// Belady (replay only): the slice used farthest in the future goes first. Its state: per layer and
// expert, the decode steps that use it, in order.
struct belady_state {
    std::vector<std::vector<std::vector<int64_t>>> future;   // [layer][expert] -> steps
};

void * init_belady(const policy &, const policy_shape & shape) {
    auto * s = new belady_state();
    s->future.assign(size_t(shape.n_layers), std::vector<std::vector<int64_t>>(size_t(shape.n_expert)));
    return s;
}

void free_belady(void * ctx) {
    delete static_cast<belady_state *>(ctx);
}

void see_future(policy & self, const trace_view & trace) {
    auto & future = static_cast<belady_state *>(self.ctx)->future;
    for (auto & experts : future) {
        for (auto & steps : experts) steps.clear();
    }
    std::vector<int64_t> event(trace.first_event, trace.first_event + self.shape.n_layers);
    const int k = self.shape.top_k;
    for (int64_t i = 0; i < trace.n; ++i) {
        if (trace.phases[i] != 1) continue;
        const size_t layer = size_t(trace.layers[i]);
        const int64_t step = event[layer]++;
        for (int r = 0; r < k; ++r) {
            const int e = trace.experts[i * k + r];
            if (e >= 0 && e < self.shape.n_expert) future[layer][size_t(e)].push_back(step);
        }
    }
}

double farthest_next_use(const policy & self, const slice_view & slice) {
    const std::vector<int64_t> & steps =
        static_cast<belady_state *>(self.ctx)->future[size_t(slice.layer)][size_t(slice.expert)];
    const auto next = std::upper_bound(steps.begin(), steps.end(), slice.event);
    return next == steps.end() ? -1e300 : -double(*next);
}

// ---- the tables, in the order of enum slicemoe_policy ----

//               name     precision shares live   demand     init              free            drop_use      high_use    evict_key          count_use        begin_token      router_bias       see_trace   threshold
const policy_i POLICIES[] = {
    { "dbsc",        AUTO, true,  true,  "auto",    init_dbsc,        free_threshold, nullptr,      important,  coldest,           count_dbsc,      adapt_threshold, nullptr,          nullptr,    current_threshold },
    { "lru8",        HIGH, false, true,  "high",    nullptr,          nullptr,        nullptr,      nullptr,    least_recent,      nullptr,         nullptr,         nullptr,          nullptr,    nullptr },
    { "lfu8",        HIGH, false, true,  "high",    nullptr,          nullptr,        nullptr,      nullptr,    least_frequent,    nullptr,         nullptr,         nullptr,          nullptr,    nullptr },
    { "lru4",        LOW,  false, true,  "low",     nullptr,          nullptr,        nullptr,      nullptr,    least_recent,      nullptr,         nullptr,         nullptr,          nullptr,    nullptr },
    { "belady",      HIGH, false, false, "high",    init_belady,      free_belady,    nullptr,      nullptr,    farthest_next_use, nullptr,         nullptr,         nullptr,          see_future, nullptr },
    { "hobbit",      AUTO, false, true,  nullptr,   init_threshold,   free_threshold, nullptr,      hobbit_use, least_recent,      count_threshold, adapt_threshold, nullptr,          nullptr,    current_threshold },
    { "dymoe",       AUTO, false, true,  "dymoe",   nullptr,          nullptr,        nullptr,      dymoe_rank, least_recent,      nullptr,         nullptr,         nullptr,          nullptr,    nullptr },
    { "cache_prior", AUTO, false, true,  nullptr,   init_cache_prior, free_threshold, nullptr,      important,  least_recent,      count_threshold, adapt_threshold, cache_prior_bias, nullptr,    current_threshold },
    { "adapmoe",     HIGH, false, true,  "adapmoe", nullptr,          nullptr,        adapmoe_drop, nullptr,    least_recent,      nullptr,         nullptr,         nullptr,          nullptr,    nullptr },
};

} // namespace

const policy_i * policy_table(int32_t id) {
    return id >= 0 && id < n_policies() ? &POLICIES[id] : nullptr;
}

int32_t n_policies() {
    return int32_t(sizeof(POLICIES) / sizeof(POLICIES[0]));
}

int effective_precision(int32_t policy_id, int precision) {
    const policy_i * iface = policy_table(policy_id);
    return iface && iface->precision != AUTO ? iface->precision : precision;
}

std::unique_ptr<policy> make_policy(const policy_params & params, const policy_shape & shape) {
    auto self = std::make_unique<policy>();
    self->iface = policy_table(params.policy);
    self->params = params;
    self->precision = effective_precision(params.policy, params.precision);
    self->shape = shape;
    self->ctx = self->iface->init ? self->iface->init(*self, shape) : nullptr;
    return self;
}

bool layer_settings_fit(const policy_params & params, int n_layers, std::string * error) {
    const auto fits = [&](size_t n, const char * name) {
        if (n == 0 || n == size_t(n_layers)) return true;
        *error = std::string(name) + ": " + std::to_string(n) + " values for " + std::to_string(n_layers) + " MoE layers";
        return false;
    };
    return fits(params.layer_sensitivity.size(), "layer_sensitivity") &&
           fits(params.layer_high_uses.size(), "layer_high_uses");
}

} // namespace slicemoe
