// Budget planning: slot counts of every MoE layer from one byte budget (pure: no pools, no model).

#include "slicemoe-engine.h"

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

namespace slicemoe {

namespace {

// Slot counts of one layer from its share of the budget (see docs/design.md for the rule). shared:
// the layer's MSB and LSB slices take their slots from one set (the adaptive split), which needs
// slices of one size (share_slots).
void split_budget(int64_t budget, int precision, int n_expert, int top_k, slice_sizes size, float msb_share,
                  bool share_slots, int * n_msb, int * n_lsb, bool * shared) {
    const size_t msb_b = size.msb, lsb_b = size.lsb == 0 ? 1 : size.lsb;
    const int64_t whole = int64_t(n_expert) * int64_t(msb_b + lsb_b);
    *shared = false;
    if (precision == SLICEMOE_PRECISION_LOW) {
        *n_msb = (int) std::min<int64_t>(n_expert, budget / int64_t(msb_b));
        *n_lsb = 0;
    } else if (precision == SLICEMOE_PRECISION_HIGH || budget >= whole) {
        *n_msb = *n_lsb = (int) std::min<int64_t>(n_expert, budget / int64_t(msb_b + lsb_b));
    } else if (share_slots && msb_share <= 0.0f) {
        // DBSC's adaptive split: every slot may hold either kind, and the policy's eviction
        // order decides how many of each the layer keeps
        *n_msb = *n_lsb = (int) std::min<int64_t>(2 * int64_t(n_expert), budget / int64_t(msb_b));
        *shared = true;
    } else {
        // a fixed split: a share of the layer's bytes (two thirds unless asked otherwise) for MSB
        // slots (every use needs one), the rest for the LSB slices of the uses that run at 8 bits
        const double share = msb_share > 0.0f ? double(msb_share) : 2.0 / 3.0;
        const int64_t for_msb = std::max<int64_t>(int64_t(top_k) * int64_t(msb_b), int64_t(double(budget) * share));
        *n_msb = (int) std::min<int64_t>(n_expert, for_msb / int64_t(msb_b));
        *n_lsb = (int) std::min<int64_t>(n_expert, (budget - int64_t(*n_msb) * int64_t(msb_b)) / int64_t(lsb_b));
    }
}

int64_t min_layer_budget(int precision, int top_k, slice_sizes size) {
    return int64_t(top_k) * int64_t(precision == SLICEMOE_PRECISION_HIGH ? size.msb + size.lsb : size.msb);
}

} // namespace

std::string format_bytes(int64_t n) {
    char buf[64];
    if (n >= (int64_t(1) << 30))      snprintf(buf, sizeof(buf), "%.2f GiB", n / double(int64_t(1) << 30));
    else if (n >= (int64_t(1) << 20)) snprintf(buf, sizeof(buf), "%.2f MiB", n / double(1 << 20));
    else if (n >= 1024)               snprintf(buf, sizeof(buf), "%.1f KiB", n / 1024.0);
    else                              snprintf(buf, sizeof(buf), "%lld B", (long long) n);
    return buf;
}

// Slot counts per MoE layer: each layer gets the minimum it needs to run, and the rest of the
// budget in proportion to what the layer could still use (split_budget within each layer), so
// layers of different sizes keep the same fraction; or, for whole-expert policies, explicit
// per-layer counts (the planner's DP allocation). Checks the minimum and the budget; false with
// *error set otherwise.
bool slot_counts(const cache & c, const std::vector<slice_sizes> & sizes, bool slices_alike, float msb_share,
                 const int32_t * layer_slots, int32_t n_layer_slots, slot_plan * out, std::string * error) {
    const int n_layers = int(sizes.size());
    const bool low = c.precision == SLICEMOE_PRECISION_LOW;
    std::vector<int64_t> minimum((size_t) n_layers), room((size_t) n_layers);
    int64_t min_total = 0, room_total = 0;
    for (int i = 0; i < n_layers; ++i) {
        const slice_sizes & size = sizes[size_t(i)];
        minimum[size_t(i)] = min_layer_budget(c.precision, c.top_k, size);
        room[size_t(i)] = int64_t(c.n_expert) * int64_t(size.msb + (low ? 0 : size.lsb)) - minimum[size_t(i)];
        min_total += minimum[size_t(i)];
        room_total += room[size_t(i)];
    }
    if (c.budget < min_total) {
        *error = "cache budget " + format_bytes(c.budget) + " is below the minimum that can run, " +
                 format_bytes(min_total) + " (" + std::to_string(c.top_k) + " " +
                 (c.precision == SLICEMOE_PRECISION_HIGH ? "MSB+LSB" : "MSB") + " expert slices in each of " +
                 std::to_string(n_layers) + " MoE layers)";
        return false;
    }
    out->msb.assign(size_t(n_layers), 0);
    out->lsb.assign(size_t(n_layers), 0);
    out->shared.assign(size_t(n_layers), 0);
    if (layer_slots == nullptr || n_layer_slots == 0) {
        const int64_t spare = c.budget - min_total;
        const bool share_slots = c.pol->iface->shares_slots && slices_alike;
        for (int i = 0; i < n_layers; ++i) {
            const int64_t extra = room_total > 0 ? int64_t((long double) spare * room[size_t(i)] / room_total) : 0;
            bool shared = false;
            split_budget(minimum[size_t(i)] + extra, c.precision, c.n_expert, c.top_k, sizes[size_t(i)], msb_share,
                         share_slots, &out->msb[size_t(i)], &out->lsb[size_t(i)], &shared);
            out->shared[size_t(i)] = shared;
        }
        return true;
    }
    if (n_layer_slots != n_layers || c.precision != SLICEMOE_PRECISION_HIGH) {
        *error = "per-layer slots need one count per MoE layer (" + std::to_string(n_layers) +
                 ") and a whole-expert policy (lru8, lfu8, adapmoe, belady)";
        return false;
    }
    int64_t bytes = 0;
    for (int i = 0; i < n_layers; ++i) {
        if (layer_slots[i] < c.top_k || layer_slots[i] > c.n_expert) {
            *error = "layer " + std::to_string(i) + ": " + std::to_string(layer_slots[i]) + " slots, need " +
                     std::to_string(c.top_k) + " to " + std::to_string(c.n_expert);
            return false;
        }
        out->msb[size_t(i)] = out->lsb[size_t(i)] = layer_slots[i];
        bytes += int64_t(layer_slots[i]) * int64_t(sizes[size_t(i)].msb + sizes[size_t(i)].lsb);
    }
    if (bytes > c.budget) {
        *error = "per-layer slots need " + format_bytes(bytes) + ", more than the budget " + format_bytes(c.budget);
        return false;
    }
    return true;
}

} // namespace slicemoe
