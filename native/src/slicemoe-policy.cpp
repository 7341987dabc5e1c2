// The cache policies: one policy_i table each (slicemoe-engine.h). The engine (serve_token,
// victim, slot_counts) asks the table what a use wants and which slice goes; live runs and trace
// replay share the tables, so a policy is the same code in both. Adding a policy: a table here and
// its id in slicemoe.h / slicemoe-config.cpp.

#include "slicemoe-engine.h"

#include <algorithm>
#include <cmath>

namespace slicemoe {

// dbsc's eviction order: a slice's uses, each decayed by HEAT_DECAY per decode token of its layer
// since (a half-life of about 140 tokens). Counts are kept for every expert, cached or not, so a
// slice evicted too early comes back with its history, and an MSB and an LSB slice compete for a
// shared slot on what each has been worth lately: the split between them follows the routing.
// Of 0.5 .. 1, 0.995 read the fewest bytes on held-out routing of the embedded model, and within
// 1% of the fewest on the second trained model (top-2 of 16; results/optimum.md). Adding the use's
// routing weight instead of 1 read 2-31% more.
constexpr double HEAT_DECAY = 0.995;

double heat(const layer & L, const pool & p, int expert) {
    return p.heat[size_t(expert)] * std::pow(HEAT_DECAY, double(L.event - p.heat_at[size_t(expert)]));
}

void add_use(const layer & L, pool & p, int expert) {
    p.heat[size_t(expert)] = heat(L, p, expert) + 1.0;
    p.heat_at[size_t(expert)] = L.event;
}

namespace {

// ---- which uses run at 8 bits (auto precision) ----

// SliceMoE: the top-ranked use, and any use whose routing weight reaches the threshold
bool important(const cache & c, const layer &, int rank, float weight, int, bool) {
    return rank == 0 || weight >= c.high_threshold;
}

// DyMoE: the best-ranked uses run at 8 bits, as many as the layer's calibrated count, else by the
// depth schedule: round(ratio * k) ranks at the first MoE layer, falling by a half cosine to none
// at the last
bool dymoe_rank(const cache & c, const layer & L, int rank, float, int, bool) {
    const size_t index = size_t(&L - c.layers.data());
    if (!c.high_uses.empty()) {
        return rank < c.high_uses[index];
    }
    const int n = int(c.layers.size());
    const double depth = n > 1 ? double(&L - c.layers.data()) / double(n - 1) : 0.0;
    const double share = c.high_ratio * 0.5 * (1.0 + std::cos(M_PI * depth));
    return rank < int(std::lround(share * c.top_k));
}

// HOBBIT: a hit runs at the precision cached; a miss loads what the use's importance asks for
bool hobbit_use(const cache & c, const layer & L, int rank, float weight, int expert, bool msb_hit) {
    if (msb_hit) {
        return L.lsb.n_slots > 0 && L.lsb.expert_slot[size_t(expert)] >= 0;
    }
    return important(c, L, rank, weight, expert, msb_hit);
}

// AdapMoE's gating: a use after the first whose weight is below sqrt(T / S_l) is left out, S_l the
// layer's calibrated sensitivity (1 without calibration)
bool adapmoe_drop(const cache & c, const layer & L, float weight) {
    const float sensitivity = c.sensitivity.empty() ? 1.0f : c.sensitivity[size_t(&L - c.layers.data())];
    return weight < std::sqrt(c.gating_t / sensitivity);
}

// ---- eviction order (lowest key first; ties: least recently used) ----

double coldest(const cache &, const layer & L, const pool & p, int slot) {
    return heat(L, p, p.slot_expert[size_t(slot)]);
}

double least_recent(const cache &, const layer &, const pool & p, int slot) {
    return double(p.last_use[size_t(slot)]);
}

double least_frequent(const cache &, const layer &, const pool & p, int slot) {
    return double(p.uses[size_t(slot)]);
}

// Belady (replay only): the slice used farthest in the future goes first
double farthest_next_use(const cache &, const layer & L, const pool & p, int slot) {
    const std::vector<int64_t> & f = L.future[size_t(p.slot_expert[size_t(slot)])];
    const auto it = std::upper_bound(f.begin(), f.end(), L.event);
    return it == f.end() ? -1e300 : -double(*it);
}

constexpr int AUTO = SLICEMOE_PRECISION_AUTO, HIGH = SLICEMOE_PRECISION_HIGH, LOW = SLICEMOE_PRECISION_LOW;

//                                 name           precision shares drop_use      high_use    evict_key
const policy_i DBSC        = { "dbsc",        AUTO, true,  nullptr,      important,  coldest };
const policy_i LRU8        = { "lru8",        HIGH, false, nullptr,      nullptr,    least_recent };
const policy_i LFU8        = { "lfu8",        HIGH, false, nullptr,      nullptr,    least_frequent };
const policy_i LRU4        = { "lru4",        LOW,  false, nullptr,      nullptr,    least_recent };
const policy_i BELADY      = { "belady",      HIGH, false, nullptr,      nullptr,    farthest_next_use };
const policy_i HOBBIT      = { "hobbit",      AUTO, false, nullptr,      hobbit_use, least_recent };
const policy_i DYMOE       = { "dymoe",       AUTO, false, nullptr,      dymoe_rank, least_recent };
const policy_i CACHE_PRIOR = { "cache_prior", AUTO, false, nullptr,      important,  least_recent };
const policy_i ADAPMOE     = { "adapmoe",     HIGH, false, adapmoe_drop, nullptr,    least_recent };

} // namespace

const policy_i & policy_of(int policy) {
    switch (policy) {
        case SLICEMOE_POLICY_LRU8:        return LRU8;
        case SLICEMOE_POLICY_LFU8:        return LFU8;
        case SLICEMOE_POLICY_LRU4:        return LRU4;
        case SLICEMOE_POLICY_BELADY:      return BELADY;
        case SLICEMOE_POLICY_HOBBIT:      return HOBBIT;
        case SLICEMOE_POLICY_DYMOE:       return DYMOE;
        case SLICEMOE_POLICY_CACHE_PRIOR: return CACHE_PRIOR;
        case SLICEMOE_POLICY_ADAPMOE:     return ADAPMOE;
        default:                          return DBSC;
    }
}

// Whole-expert policies run at 8 bits, lru4 at 4; the others follow --precision (auto: per use).
bool layer_settings_fit(const cache & c, int n_layers, std::string * error) {
    const auto fits = [&](size_t n, const char * name) {
        if (n == 0 || n == size_t(n_layers)) return true;
        *error = std::string(name) + ": " + std::to_string(n) + " values for " + std::to_string(n_layers) + " MoE layers";
        return false;
    };
    return fits(c.sensitivity.size(), "layer_sensitivity") && fits(c.high_uses.size(), "layer_high_uses");
}

int effective_precision(int policy, int precision) {
    const int fixed = policy_of(policy).precision;
    return fixed == AUTO ? precision : fixed;
}

} // namespace slicemoe
