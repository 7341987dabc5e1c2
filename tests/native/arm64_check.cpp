// What must not depend on the CPU, printed one fact per line for tests/test_arm64.py to compare
// between this machine and arm64 under emulation. Built against the C API only (slicemoe.h).
//
//   arm64_check kernels                       every fused-product kernel of this CPU against the scalar one
//   arm64_check decode MODEL.gguf BYTES...    greedy tokens, cache counters and the last logits of each
//                                             policy at each cache budget (bytes)

#include "slicemoe.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

uint32_t g_state = 12345;   // xorshift: the same data on every CPU

uint32_t next_random() {
    g_state ^= g_state << 13;
    g_state ^= g_state >> 17;
    g_state ^= g_state << 5;
    return g_state;
}

// A Q4_1 block as ggml stores it: fp16 step and minimum, then 16 bytes of nibble pairs.
struct q4_1_block {
    uint16_t d, m;
    uint8_t  qs[16];
};

// fp16 bits of a normal value 2^(exponent - 15) x (1 + mantissa / 1024)
uint16_t half(int exponent, int mantissa, bool negative = false) {
    return uint16_t((negative ? 0x8000 : 0) | (exponent << 10) | mantissa);
}

int check_kernels() {
    const int64_t n_in = 256, n_out = 48, n_blocks = n_in / 32;
    std::vector<q4_1_block> msb(static_cast<size_t>(n_out * n_blocks)), lsb(msb.size());
    for (size_t b = 0; b < msb.size(); ++b) {
        const int exponent = 5 + int(next_random() % 6), mantissa = int(next_random() % 1024);
        // nested steps (d_msb = 16 d_lsb, as every AMAT grid writes) except every seventh block
        lsb[b].d = half(exponent, mantissa);
        msb[b].d = b % 7 == 3 ? half(exponent + 3, int(next_random() % 1024)) : half(exponent + 4, mantissa);
        msb[b].m = half(8 + int(next_random() % 6), int(next_random() % 1024), true);
        lsb[b].m = half(4 + int(next_random() % 6), int(next_random() % 1024));
        for (int j = 0; j < 16; ++j) {
            msb[b].qs[j] = uint8_t(next_random());
            lsb[b].qs[j] = uint8_t(next_random());
        }
    }
    std::vector<float> x(static_cast<size_t>(n_in));
    for (float & v : x) v = float(int(next_random() % 2001) - 1000) / 997.0f;
    std::vector<float> scalar8(static_cast<size_t>(n_out)), scalar4(scalar8.size()), y(scalar8.size());
    if (slicemoe_expert_product(SLICEMOE_KERNEL_SCALAR, msb.data(), lsb.data(), n_in, n_out, x.data(), scalar8.data()) ||
        slicemoe_expert_product(SLICEMOE_KERNEL_SCALAR, msb.data(), nullptr, n_in, n_out, x.data(), scalar4.data())) {
        std::printf("error %s\n", slicemoe_last_error());
        return 1;
    }
    int failures = 0;
    for (int kernel = SLICEMOE_KERNEL_SCALAR; kernel <= SLICEMOE_KERNEL_NEON_DOTPROD; ++kernel) {
        const char * name = slicemoe_kernel_name(kernel);
        if (!name) continue;
        double worst = 0.0;
        for (int high = 0; high < 2; ++high) {
            const std::vector<float> & reference = high ? scalar8 : scalar4;
            slicemoe_expert_product(kernel, msb.data(), high ? lsb.data() : nullptr, n_in, n_out, x.data(), y.data());
            for (int64_t r = 0; r < n_out; ++r) {
                worst = std::max(worst, std::fabs(double(y[size_t(r)]) - reference[size_t(r)]) /
                                        std::max(1e-3, std::fabs(double(reference[size_t(r)]))));
            }
        }
        const bool ok = worst <= 1e-5;
        failures += !ok;
        std::printf("kernel %s %s %.2e\n", name, ok ? "agrees" : "DIFFERS", worst);
    }
    std::printf("auto %s\n", slicemoe_kernel_name(SLICEMOE_KERNEL_AUTO));
    return failures;
}

struct policy_case { const char * name; int policy; };

int decode(const char * path, const std::vector<int64_t> & budgets) {
    const policy_case policies[] = {
        {"dbsc", SLICEMOE_POLICY_DBSC}, {"lru8", SLICEMOE_POLICY_LRU8}, {"lfu8", SLICEMOE_POLICY_LFU8},
        {"lru4", SLICEMOE_POLICY_LRU4}, {"hobbit", SLICEMOE_POLICY_HOBBIT}, {"dymoe", SLICEMOE_POLICY_DYMOE},
        {"cache_prior", SLICEMOE_POLICY_CACHE_PRIOR}, {"adapmoe", SLICEMOE_POLICY_ADAPMOE},
    };
    const char prompt[] = "ROMEO.\nBut soft, what light through yonder window breaks?";
    for (int64_t budget : budgets) {
        for (const policy_case & pc : policies) {
            slicemoe_model_params params = slicemoe_model_default_params();
            params.cache.budget_bytes = budget;
            params.cache.policy = pc.policy;
            slicemoe_model * model = nullptr;
            slicemoe_context * ctx = nullptr;
            slicemoe_sampler * sampler = nullptr;
            slicemoe_context_params cparams = slicemoe_context_default_params();
            cparams.n_ctx = 256;
            cparams.n_threads = 2;
            int32_t tokens[64], n_tokens = 0;
            if (slicemoe_model_load(path, &params, &model) || slicemoe_context_create(model, &cparams, &ctx) ||
                slicemoe_sampler_create(model, nullptr, &sampler) ||
                slicemoe_tokenize(model, prompt, int32_t(std::strlen(prompt)), true, false, tokens, 64, &n_tokens) ||
                slicemoe_eval(ctx, tokens, n_tokens)) {
                std::printf("error %s %lld: %s\n", pc.name, (long long) budget, slicemoe_last_error());
                return 1;
            }
            std::string line = std::string("decode ") + pc.name + " " + std::to_string(budget) + " tokens";
            for (int i = 0; i < 16; ++i) {
                int32_t token = 0;
                if (slicemoe_decode_next(sampler, ctx, &token)) {
                    std::printf("error %s: %s\n", pc.name, slicemoe_last_error());
                    return 1;
                }
                line += (i ? "," : " ") + std::to_string(token);
            }
            slicemoe_cache_stats_t stats;
            slicemoe_cache_get_stats(model, &stats);
            const float * logits = slicemoe_logits(ctx);
            double top = -1e30, sum = 0.0;
            for (int32_t v = 0; v < slicemoe_model_n_vocab(model); ++v) {
                top = std::max(top, double(logits[v]));
                sum += logits[v];
            }
            std::printf("%s counters %lld %lld %lld %lld %lld logits %.6f %.6f\n", line.c_str(),
                        (long long) (stats.msb_hits + stats.lsb_hits), (long long) (stats.msb_misses + stats.lsb_misses),
                        (long long) stats.loads, (long long) stats.flash_bytes, (long long) stats.high_uses, top, sum);
            slicemoe_sampler_free(sampler);
            slicemoe_context_free(ctx);
            slicemoe_model_free(model);
        }
    }
    return 0;
}

} // namespace

int main(int argc, char ** argv) {
    if (argc >= 2 && std::strcmp(argv[1], "kernels") == 0) {
        return check_kernels();
    }
    if (argc >= 4 && std::strcmp(argv[1], "decode") == 0) {
        std::vector<int64_t> budgets;
        for (int i = 3; i < argc; ++i) budgets.push_back(std::atoll(argv[i]));
        return decode(argv[2], budgets);
    }
    std::fprintf(stderr, "usage: arm64_check kernels | arm64_check decode MODEL.gguf BYTES...\n");
    return 2;
}
