// slicemoe.h: the C API of slicemoe-gguf, compiled into libllama next to the llama_* API.
//
// Conventions
//   - Handles are opaque. Every function that can fail returns an int status (SLICEMOE_OK == 0)
//     and, on failure, leaves a message in slicemoe_last_error() (per thread). Nothing aborts on
//     bad input: every file is validated before llama.cpp reads it, and no C++ exception leaves
//     an exported function or the engine's callbacks (an allocation failure is
//     SLICEMOE_ERR_NO_MEMORY, anything else unexpected SLICEMOE_ERR_INTERNAL).
//   - Outputs go through pointer arguments; the caller owns every buffer it passes.
//   - Parameter structs are obtained from *_default_params() and then edited, so fields can be
//     added at the end without breaking callers that start from the defaults.
//
// Ownership and threads
//   - The engine of a sliced model (its slice cache: pools, slot tables, counters, routing trace)
//     belongs to the model and is freed with it. A model gets it at load from whichever API
//     loads it: slicemoe_model_load with its params, or llama.cpp's llama_model_load_from_file
//     configured by slicemoe.* key-value overrides or SLICEMOE_* environment variables (a bad
//     value fails the load; see docs/usage.md, "Serving, chat and llama-cpp-python").
//   - Every context of the model evaluates through the engine. Each ubatch of any context holds
//     the engine's lock from graph build to the end of its compute, so contexts may decode on
//     different threads at once and each gets exactly what it gets alone; they share the budget
//     and the counters. Reading or resetting the counters and the trace takes the same lock.
//   - Under a cache, a batch with tokens of more than one sequence is refused (llama_decode
//     returns -3): the cache serves one sequence per batch. A batch at position 0 begins a new
//     request for the engine (warm-up, trace numbering).
//   - A model handle and each context handle are used by one thread at a time; a failure message
//     (slicemoe_last_error) is per thread.
//
// This header is C and is the only thing the Python layer binds (cffi, ABI mode): between the
// cdef markers keep to plain declarations (no preprocessor lines, no expressions in enums).

#ifndef SLICEMOE_H
#define SLICEMOE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(SLICEMOE_BUILDING)
#define SLICEMOE_API __declspec(dllexport)
#elif defined(_WIN32)
#define SLICEMOE_API __declspec(dllimport)
#else
#define SLICEMOE_API __attribute__((visibility("default")))
#endif

// cdef-begin (the Python binding parses the declarations from here to cdef-end)
enum slicemoe_status {
    SLICEMOE_OK                 = 0,
    SLICEMOE_ERR_INVALID_ARG    = 1,  // a NULL handle, a bad size, an out-of-range token
    SLICEMOE_ERR_IO             = 2,  // a file is missing or cannot be read
    SLICEMOE_ERR_FORMAT         = 3,  // not a GGUF, truncated, or a model llama.cpp cannot load
    SLICEMOE_ERR_NO_MEMORY      = 4,
    SLICEMOE_ERR_BUFFER_TOO_SMALL = 5,  // the required size is returned through the n_out argument
    SLICEMOE_ERR_CONTEXT_FULL   = 6,  // the prompt plus generated tokens exceed n_ctx
    SLICEMOE_ERR_COMPUTE        = 7,  // llama_decode failed
    SLICEMOE_ERR_INTERNAL       = 8,  // an unexpected exception inside the engine (a bug; the message names it)
};

typedef struct slicemoe_model   slicemoe_model;
typedef struct slicemoe_context slicemoe_context;
typedef struct slicemoe_sampler slicemoe_sampler;

// Precision of the routed experts of a sliced (AMAT) model.
enum slicemoe_precision {
    SLICEMOE_PRECISION_AUTO = 0,  // chosen per use by the cache policy; without a cache: high
    SLICEMOE_PRECISION_HIGH = 1,  // MSB + LSB slices: the 8-bit model
    SLICEMOE_PRECISION_LOW  = 2,  // MSB slices only: the 4-bit model
};

// Cache policies: one implementation each, used live and in trace replay.
enum slicemoe_policy {
    SLICEMOE_POLICY_DBSC   = 0,  // SliceMoE: bit-sliced caching, precision per use
    SLICEMOE_POLICY_LRU8   = 1,  // whole experts (MSB + LSB) at 8 bits, least recently used out
    SLICEMOE_POLICY_LFU8   = 2,  // whole experts at 8 bits, least frequently used out
    SLICEMOE_POLICY_LRU4   = 3,  // MSB slices only (the 4-bit model), LRU
    SLICEMOE_POLICY_BELADY = 4,  // whole experts at 8 bits, farthest next use out (replay only)
    SLICEMOE_POLICY_HOBBIT = 5,  // HOBBIT-style: a miss of an unimportant expert loads and runs it at
                                 // 4 bits, of an important one at 8 bits; hits run as cached
    SLICEMOE_POLICY_DYMOE  = 6,  // DyMoE-style: the share of 8-bit uses falls with depth (cosine
                                 // schedule scaled by high_ratio), the best-ranked uses first
    SLICEMOE_POLICY_CACHE_PRIOR = 7,  // cache-aware routing: dbsc, and during decode the router logit
                                 // of every cached expert gets + prior_lambda * (mean logit range)
    SLICEMOE_POLICY_ADAPMOE = 8, // AdapMoE-style adaptive gating: whole 8-bit experts (LRU); a use
                                 // ranked below the first is dropped when its weight < sqrt(T / S_l)
};

// How the slice cache reads a miss from the model file (see native/src/slicemoe-io.h).
enum slicemoe_io_mode {
    SLICEMOE_IO_AUTO     = 0,  // direct where the file system supports O_DIRECT, else buffered
    SLICEMOE_IO_DIRECT   = 1,  // O_DIRECT (an error where it is not supported)
    SLICEMOE_IO_BUFFERED = 2,  // pread through the page cache, then POSIX_FADV_DONTNEED
};

// The kernels of the fused expert product (native/src/slicemoe-product.h).
enum slicemoe_kernel {
    SLICEMOE_KERNEL_AUTO   = 0,  // the best this CPU runs (what the MoE graph uses)
    SLICEMOE_KERNEL_SCALAR = 1,
    SLICEMOE_KERNEL_AVX2   = 2,
    SLICEMOE_KERNEL_AVX512_VNNI = 3,  // 256-bit vpdpbusd (AVX512VL)
    SLICEMOE_KERNEL_NEON   = 4,  // arm64 ARMv8.0
    SLICEMOE_KERNEL_NEON_DOTPROD = 5,  // arm64 with sdot (ARMv8.2 dotprod)
};

enum slicemoe_warmup {
    SLICEMOE_WARMUP_NONE = 0,
    SLICEMOE_WARMUP_PCW  = 1,  // predictive cache warm-up from the prompt's routing
};

// The engine's settings, one table (slicemoe_setting_get): each is the field of
// slicemoe_model_params of its name, the `slicemoe.<name>` key-value override and the
// SLICEMOE_<NAME> variable of a load through llama.cpp's own entry points, and the CLI flag `flag`.
enum slicemoe_setting_kind {
    SLICEMOE_SETTING_SIZE   = 0,  // bytes, or a size string ("2GiB", "40%")
    SLICEMOE_SETTING_CHOICE = 1,  // one of names (slicemoe_setting_choice)
    SLICEMOE_SETTING_NUMBER = 2,  // a float in [min, max] (max excluded when max_open)
    SLICEMOE_SETTING_FLAG   = 3,  // a bool
};

struct slicemoe_setting {
    const char * name;    // "cache_budget", "policy", ...
    const char * flag;    // the CLI's flag, e.g. "--cache-budget" ("": a command of its own, `slicemoe trace`)
    int32_t      kind;    // enum slicemoe_setting_kind
    float        min;     // NUMBER: the range
    float        max;
    bool         max_open;
    const char * help;    // one line
    double       default_value;   // the engine's default (slicemoe_model_default_params): a CHOICE's
                                  // value, a NUMBER, a FLAG as 0 or 1, a SIZE in bytes
};

// The slice cache's settings, one struct for a live cache (slicemoe_model_params.cache) and a trace
// replay (slicemoe_sim_params.cache), so that a replay with the settings of a run reproduces its
// counters. slicemoe_cache_default_params() gives the defaults of every front end.
struct slicemoe_cache_params {
    // Bytes for all routed-expert slice pools. 0 = no cache (every expert stays mapped from the
    // file). During decode the expert products then run on the pools and a miss reads the slice
    // from the file. (A replay needs a budget above 0.)
    int64_t budget_bytes;
    int32_t policy;            // enum slicemoe_policy (precision follows it except for dbsc)
    int32_t precision;         // enum slicemoe_precision; ignored for stock (unsliced) models
    int32_t warmup;            // enum slicemoe_warmup (default pcw)
    float   high_threshold;    // auto precision: a use runs at 8 bits if its routing weight >= this
                               // (the top-ranked expert of a token always does)
    float   max_miss_rate;     // auto precision: > 0 adapts high_threshold at run time so that the
                               // slice miss rate stays near this target (see docs/design.md); 0 = off
    float   msb_share;         // dbsc: a fixed share of each layer's budget for MSB slots; 0 = adaptive:
                               // one pool whose slots hold MSB or LSB slices (see docs/design.md)
    float   high_ratio;        // dymoe: share of 8-bit uses in the first MoE layer (0 = 0.5)
    float   prior_lambda;      // cache_prior (default 0.5): 0 = the model's own routing
    float   gating_t;          // adapmoe: T of the gating rule (default 0.04); 0 = never drop (the
                               // model's routing)
    // Whole-expert policies: slots per MoE layer (e.g. from slicemoe plan's DP allocation) instead
    // of an equal share of the budget; NULL / 0 = equal shares.
    const int32_t * layer_slots;
    int32_t n_layer_slots;
    // Calibrated policies (scripts/calibrate_policies.py measures them), one value per MoE layer;
    // NULL / 0 = the calibration-free rules. adapmoe: the sensitivity S_l in its gating rule (a use
    // is dropped when its weight < sqrt(T / S_l)); dymoe: how many of a token's best-ranked uses run
    // at 8 bits in each layer, instead of the cosine depth schedule.
    const float *   layer_sensitivity;
    int32_t n_layer_sensitivity;
    const int32_t * layer_high_uses;
    int32_t n_layer_high_uses;
    // An 8-bit use whose MSB slice is resident and whose LSB slice is not runs at 4 bits, and the
    // LSB slice is read in the background for the layer's next token (which finds it resident): no
    // decode step waits for a read that only refines precision. A use that waits for its MSB slice
    // anyway reads its LSB slice with it. Replay makes the same decisions.
    bool    lsb_background;
};

struct slicemoe_model_params {
    int32_t n_gpu_layers;  // layers offloaded to a GPU backend; 0 = CPU only, -1 = all
    bool    use_mmap;      // map the file instead of reading it (llama.cpp's default)
    struct slicemoe_cache_params cache;   // the slice cache of a sliced model
    bool    record_trace;      // keep the routing of every MoE layer (see slicemoe_trace_*); works
                               // for stock MoE models too
    bool    prefetch;          // look-ahead: apply the next MoE layer's router to this layer's input
                               // and queue the predicted MSB slices' reads on the reader threads meanwhile
    int32_t io_mode;           // enum slicemoe_io_mode (default auto)
    bool    low_precision_prompt; // a prompt's expert products read the MSB slices only (4 bits),
                               // but for its last token's (the row the next token comes from, at
                               // 8 bits where the fused product runs): a first prompt reads about
                               // half the expert bytes; decode keeps the policy's precision (off by
                               // default: the whole prompt at 8 bits)
    bool    forced_routes;     // the routing will come from slicemoe_route_force: a stock model gets
                               // an engine for it too (a sliced model always has one)
};

// Trace replay with no model: the same cache manager with no pools and no reads.
struct slicemoe_sim_params {
    int32_t n_layers;          // MoE layers
    int32_t n_expert;
    int32_t top_k;
    int64_t msb_bytes;         // one expert's MSB slice, all projections
    int64_t lsb_bytes;         // one expert's LSB slice (0 for a model without slices: lru4 only)
    const int64_t * layer_msb_bytes;  // NULL, or n_layers sizes: MoE layers of different shapes
    const int64_t * layer_lsb_bytes;  // NULL, or n_layers sizes (with layer_msb_bytes)
    struct slicemoe_cache_params cache;   // as a live cache's
};

// Counters of the slice cache, summed over layers (or of one layer). "Hits" and "misses" count
// slice uses: an expert run at high precision uses its MSB and its LSB slice.
typedef struct slicemoe_cache_stats {
    int64_t budget_bytes;      // as configured
    int64_t pool_bytes;        // actually allocated for slice pools (never more than the budget)
    int64_t msb_hits, msb_misses, lsb_hits, lsb_misses;
    int64_t loads, evictions;  // slices read into / dropped from pools (warm-up loads included)
    int64_t flash_bytes;       // bytes read from the model file
    int64_t ram_bytes;         // expert slice bytes the decode products read from the pools
    int64_t high_uses, low_uses;
    int64_t warmup_loads;
    int64_t decode_tokens;
    double  io_ms;             // time the decode was blocked on reads (warm-up's is warmup_io_ms)
    float   high_threshold;    // current value (moves when max_miss_rate is set)
    int64_t dropped_uses;      // adapmoe: uses removed from the mixture by its gating
    int64_t prefetch_loads;    // slices loaded ahead by look-ahead prefetch (also in loads, flash_bytes)
    int64_t prefetch_useful_bytes;  // ... of which the next token's layer used
    int64_t prefetch_wasted_bytes;  // ... and did not
    int64_t device_pool_bytes;  // of pool_bytes, the part in device memory (offloaded layers' pools)
    int32_t io_direct;         // 1: misses are read with O_DIRECT, 0: buffered pread
    int64_t dense_copied_bytes;  // dense weights copied out of the file mapping into anonymous
                                 // memory at load, where page cache pressure cannot evict them
    int64_t load_flash_bytes;  // slice bytes read while the model loaded (a budget that holds every
    double  load_io_ms;        // slice fills the pools then) and the time it took; the counters above
                               // start after it, so they describe serving alone
    double  warmup_io_ms;      // time PCW's warm-up loads took; they run during the prompt, so this
                               // is part of its prefill time, not of io_ms (their bytes are in
                               // flash_bytes and loads, as where the warm-up ran at the first token)
} slicemoe_cache_stats_t;

typedef struct slicemoe_layer_stats {
    int32_t layer;
    int32_t msb_slots, lsb_slots;
    int64_t msb_hits, msb_misses, lsb_hits, lsb_misses;
    int64_t loads, evictions, flash_bytes, ram_bytes;
    double  io_ms;
    int32_t shared_slots;      // 1: msb_slots (= lsb_slots) slots, each holding an MSB or an LSB slice
    int32_t msb_resident, lsb_resident;   // slices held now
} slicemoe_layer_stats_t;

struct slicemoe_context_params {
    uint32_t n_ctx;      // context length in tokens; 0 = the model's training context
    uint32_t n_batch;    // tokens per llama_decode call during prompt evaluation
    int32_t  n_threads;  // compute threads; 0 = slicemoe_default_threads()
    int32_t  n_seq;      // sequences decoded together (slicemoe_decode_batch); each gets n_ctx / n_seq tokens
};

// The sampler chain, in the order llama-server applies it: logit bias, penalties, grammar, then
// greedy, or top-k, top-p, min-p, temperature and a seeded draw.
struct slicemoe_sampling_params {
    float    temperature;  // <= 0: greedy (argmax)
    float    top_p;        // nucleus sampling; 1 disables it
    uint32_t seed;
    int32_t  top_k;              // keep the k most likely tokens; 0 disables it
    float    min_p;              // drop tokens below min_p x the most likely one's probability; 0 disables it
    float    repeat_penalty;     // divides a repeated token's positive logit (multiplies a negative one); 1 disables it
    float    frequency_penalty;  // subtracted once per earlier occurrence; 0 disables it
    float    presence_penalty;   // subtracted once if the token occurred; 0 disables it
    int32_t  penalty_last_n;     // the tokens the penalties look at: the last n sampled ones (-1: all of the context)
    const char * grammar;        // GBNF the output must match (start symbol "root"); NULL or "" for none
    const int32_t * logit_bias_tokens;  // n_logit_bias token ids, each with the bias added to its logit
    const float   * logit_bias_values;
    int32_t  n_logit_bias;
};

struct slicemoe_timings {
    double  prefill_ms;  // wall time of prompt batches (more than one token per llama_decode)
    double  decode_ms;   // wall time of single-token steps
    int32_t n_prefill;   // tokens evaluated as prompt
    int32_t n_decode;    // tokens evaluated one at a time
};

// --- library -------------------------------------------------------------------------------

// The threads a context uses when n_threads is 0: one per fast core, where the cores differ (a
// phone's big and little cores: a little core would set the pace of every ggml barrier), else one
// per core.
SLICEMOE_API int32_t slicemoe_default_threads(void);
// The cores under a sysfs cpu directory (NULL: /sys/devices/system/cpu) with at least half the
// largest cpu_capacity (else cpufreq/cpuinfo_max_freq); 0 when neither can be read.
SLICEMOE_API int32_t slicemoe_cpu_fast_cores(const char * cpu_dir);

SLICEMOE_API const char * slicemoe_version(void);             // this package, e.g. "0.1.0"
SLICEMOE_API const char * slicemoe_llama_cpp_version(void);   // e.g. "llama-cpp-python 0.3.36 (llama.cpp 0c1e570)"
SLICEMOE_API const char * slicemoe_system_info(void);         // llama.cpp's CPU feature line
SLICEMOE_API const char * slicemoe_kernel_name(int32_t kernel);   // "avx512vnni", "avx2", "neon-dotprod", "neon", "scalar"; NULL if this CPU lacks it
SLICEMOE_API const char * slicemoe_policy_name(int32_t policy);   // "dbsc", "lru8", ... as --policy spells it; NULL for an unknown id
SLICEMOE_API bool slicemoe_policy_runs_live(int32_t policy);      // false: it needs the future (replay only), or an unknown id
// The 8-bit uses a policy serves, as `slicemoe sim --optimum` bounds them: "auto" (the threshold
// rule), "high", "low", "dymoe", "adapmoe"; NULL when no fixed demand bounds it (hobbit's precision
// follows the cache, cache_prior reroutes) or for an unknown id.
SLICEMOE_API const char * slicemoe_policy_demand(int32_t policy);
// Whether it biases the router (cache_prior): live it reads the logits, and a replay needs a trace
// that recorded them.
SLICEMOE_API bool slicemoe_policy_needs_logits(int32_t policy);
SLICEMOE_API int32_t slicemoe_setting_count(void);
SLICEMOE_API bool slicemoe_setting_get(int32_t i, struct slicemoe_setting * out);   // false past the last
SLICEMOE_API const char * slicemoe_setting_choice(int32_t i, int32_t value);        // the name of a CHOICE value; NULL past the last
// One expert's fused product, as the MoE graph runs it (for tests and benchmarks): y[n_out] =
// (MSB + LSB) x, or MSB x when lsb is NULL. msb and lsb hold n_out rows of n_in / 32 Q4_1 blocks
// (20 bytes each: fp16 d, fp16 m, 16 bytes of nibbles); x is quantized to 8 bits per 32 values as
// llama.cpp's Q8_1 does. ERR_INVALID_ARG for a kernel this CPU lacks or n_in not a multiple of 32.
SLICEMOE_API int          slicemoe_expert_product(int32_t kernel, const void * msb, const void * lsb, int64_t n_in,
                                                  int64_t n_out, const float * x, float * y);
// For the kernel microbenchmark: the same product for n_tokens activation vectors x [n_tokens, n_in]
// -> y [n_tokens, n_out], run `repeats` times on this thread; *best_seconds (may be NULL) the fastest.
SLICEMOE_API int          slicemoe_expert_product_time(int32_t kernel, const void * msb, const void * lsb, int64_t n_in,
                                                       int64_t n_out, int64_t n_tokens, const float * x, float * y,
                                                       int32_t repeats, double * best_seconds);
// ggml's own product of the same shape, as llama.cpp runs a stock file's weights on the CPU: weights
// (float [n_out, n_in]) quantized to ggml type `type` (enum ggml_type: 8 Q8_0, 2 Q4_0, 12 Q4_K, ...)
// by ggml's quantizer, loaded into the buffer type llama.cpp would pick (*repacked: a repacking one),
// one thread. ERR_INVALID_ARG for a type that is not quantized or rows that are not whole blocks of it.
SLICEMOE_API int          slicemoe_ggml_product_time(int32_t type, const float * weights, int64_t n_in, int64_t n_out,
                                                     int64_t n_tokens, const float * x, float * y, int32_t repeats,
                                                     double * best_seconds, bool * repacked);
SLICEMOE_API const char * slicemoe_last_error(void);          // "" when the last call succeeded
// Verbose mode forwards llama.cpp's log to stderr; otherwise only its errors are kept (as the
// message of the failing call).
SLICEMOE_API void         slicemoe_set_verbose(bool verbose);

// Compute devices ggml found (CPU, Vulkan GPUs, Metal): name and description of device i.
SLICEMOE_API int32_t      slicemoe_device_count(void);
SLICEMOE_API const char * slicemoe_device_name(int32_t i);
SLICEMOE_API const char * slicemoe_device_description(int32_t i);

// --- model ---------------------------------------------------------------------------------

SLICEMOE_API struct slicemoe_cache_params slicemoe_cache_default_params(void);
SLICEMOE_API struct slicemoe_model_params slicemoe_model_default_params(void);
SLICEMOE_API int  slicemoe_model_load(const char * path, const struct slicemoe_model_params * params,
                                      slicemoe_model ** out);
SLICEMOE_API void slicemoe_model_free(slicemoe_model * model);
// A model that llama.cpp's own API loaded (llama_model_load_from_file, as llama-cpp-python does;
// llama_model_ptr is its struct llama_model *), seen through this API: its cache counters, trace
// and metadata. The handle does not own the model: free it before llama_model_free.
SLICEMOE_API int  slicemoe_model_wrap(void * llama_model_ptr, slicemoe_model ** out);
// Whether llama.cpp would load the file: its hyperparameters, vocabulary, tensor names, counts and
// shapes are checked exactly as a load checks them, but no tensor data is read or allocated
// (llama.cpp's no_alloc load). SLICEMOE_OK, or an error whose message is llama.cpp's reason.
SLICEMOE_API int  slicemoe_model_check(const char * path);
// llama.cpp's own quantizer (llama_model_quantize, no importance matrix) from src to dst, as its
// quantize tool makes the file type users pick by name ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", ...;
// case-insensitive). keep_experts: the routed experts (`*_exps.weight`) keep their type and bytes, so
// a sliced file's slices are copied unchanged and only its dense tensors follow the mix. dst is
// written in place (callers write to a temporary name). ERR_INVALID_ARG for an unknown type.
SLICEMOE_API int  slicemoe_quantize_file(const char * src, const char * dst, const char * file_type, bool keep_experts,
                                         int32_t n_threads);

SLICEMOE_API int32_t slicemoe_model_n_vocab(const slicemoe_model * model);
SLICEMOE_API int32_t slicemoe_model_n_layer(const slicemoe_model * model);
SLICEMOE_API int32_t slicemoe_model_n_ctx_train(const slicemoe_model * model);
SLICEMOE_API bool    slicemoe_model_is_eog(const slicemoe_model * model, int32_t token);
// MoE layers whose experts are AMAT bit slices (0 for a stock model).
SLICEMOE_API int32_t slicemoe_model_n_sliced_layers(const slicemoe_model * model);
// Slice cache counters; SLICEMOE_ERR_INVALID_ARG when the model runs without a cache.
SLICEMOE_API int     slicemoe_cache_get_stats(const slicemoe_model * model, slicemoe_cache_stats_t * out);
SLICEMOE_API int32_t slicemoe_cache_n_layers(const slicemoe_model * model);
SLICEMOE_API int     slicemoe_cache_get_layer_stats(const slicemoe_model * model, int32_t i, slicemoe_layer_stats_t * out);
SLICEMOE_API void    slicemoe_cache_reset_stats(slicemoe_model * model);
// Empty the pools and hand their memory back to the system, for a process going idle: memory
// pressure would otherwise swap the pools out and the next tokens fault them back 4 KiB at a time;
// after this the next uses read their slices from the file as misses (counted as such). Counters
// and the policy's settings are kept. Waits for any ubatch in flight.
SLICEMOE_API void    slicemoe_cache_release(slicemoe_model * model);
// Testing: every read after the next n_reads fails as an I/O error would (-1 = never).
SLICEMOE_API void    slicemoe_cache_fail_reads_after(slicemoe_model * model, int64_t n_reads);
// Why misses are read buffered although the file system opened the file with O_DIRECT: its direct
// reads differed from buffered reads of the same range at load (or failed). "" when they are not.
SLICEMOE_API const char * slicemoe_cache_io_note(const slicemoe_model * model);

// The routing trace (record_trace): one record per (request, token, MoE layer) in the order the
// cache saw them; layer is the index among MoE layers, phase 0 = prefill, 1 = decode; experts and
// weights hold top_k values (weights are router probabilities, 0 where not observed).
SLICEMOE_API int32_t slicemoe_trace_top_k(const slicemoe_model * model);
SLICEMOE_API int64_t slicemoe_trace_size(const slicemoe_model * model);
SLICEMOE_API int     slicemoe_trace_get(const slicemoe_model * model, int64_t i, int32_t * request, int32_t * layer,
                                        int32_t * phase, int32_t * experts, float * weights);
SLICEMOE_API void    slicemoe_trace_clear(slicemoe_model * model);
// The n_expert router logits stored with record i (recorded under cache_prior); *has is false
// when the record has none.
SLICEMOE_API int     slicemoe_trace_get_logits(const slicemoe_model * model, int64_t i, float * logits, bool * has);

// Trace-driven routing: from the next ubatch of any context of the model, every MoE layer runs the
// given experts with the given router probabilities instead of its router's choice (the model's own
// weight normalization still applies), so that a model of a published shape computes and reads
// what a recorded routing asked for. Position p of the sequence (0 = the first prompt token) in MoE
// layer l uses experts[(p * n_layers + l) * top_k + r] and weights[...], r < top_k. n_layers,
// n_expert and top_k must be the model's (the error says which differs); a ubatch at positions
// beyond n_positions fails. n_positions 0 returns to the model's routing. A stock model needs
// forced_routes in its load parameters.
SLICEMOE_API int     slicemoe_route_force(slicemoe_model * model, int32_t n_positions, int32_t n_layers, int32_t n_expert,
                                          int32_t top_k, const int32_t * experts, const float * weights);

typedef struct slicemoe_sim slicemoe_sim;
SLICEMOE_API struct slicemoe_sim_params slicemoe_sim_default_params(void);
SLICEMOE_API int     slicemoe_sim_create(const struct slicemoe_sim_params * params, slicemoe_sim ** out);
SLICEMOE_API void    slicemoe_sim_free(slicemoe_sim * sim);
// Replay n records (arrays as in slicemoe_trace_get; experts and weights n * top_k, row-major).
// logits: NULL, or n * n_expert router logits (a row starting with NaN: none). With them, cache_prior
// re-picks the experts under the replayed cache state (a counterfactual budget or lambda).
SLICEMOE_API int     slicemoe_sim_run(slicemoe_sim * sim, int64_t n, const int32_t * request, const int32_t * layer,
                                      const int32_t * phase, const int32_t * experts, const float * weights,
                                      const float * logits);
SLICEMOE_API int     slicemoe_sim_get_stats(const slicemoe_sim * sim, slicemoe_cache_stats_t * out);
SLICEMOE_API int     slicemoe_sim_get_layer_stats(const slicemoe_sim * sim, int32_t i, slicemoe_layer_stats_t * out);
// Short description ("qwen2moe ?B F32") written into buf, NUL-terminated.
SLICEMOE_API int     slicemoe_model_desc(const slicemoe_model * model, char * buf, size_t size);
// A metadata value as a string (e.g. "general.architecture"); SLICEMOE_ERR_INVALID_ARG if absent.
SLICEMOE_API int     slicemoe_model_meta(const slicemoe_model * model, const char * key, char * buf, size_t size);

// Text -> token ids. add_special adds BOS/EOS as the model's tokenizer says; parse_special turns
// "<|...|>" markup into special tokens. On SLICEMOE_ERR_BUFFER_TOO_SMALL, *n_out is the size needed.
SLICEMOE_API int slicemoe_tokenize(const slicemoe_model * model, const char * text, int32_t text_len,
                                   bool add_special, bool parse_special,
                                   int32_t * tokens, int32_t n_tokens_max, int32_t * n_out);
// Token ids -> UTF-8 text (not NUL-terminated; *n_out bytes). Same buffer rule as tokenize.
// A conversation (n_messages roles such as "system", "user", "assistant", and their contents) as
// the model's chat template writes it: llama.cpp's built-in templates, recognised from the file's
// tokenizer.chat_template; a model without one gets chatml. add_assistant opens the assistant's
// turn at the end. Not NUL-terminated; on SLICEMOE_ERR_BUFFER_TOO_SMALL *n_out is the size needed.
// SLICEMOE_ERR_FORMAT: a template llama.cpp does not recognise.
SLICEMOE_API int slicemoe_chat_apply(const slicemoe_model * model, const char * const * roles, const char * const * contents,
                                     int32_t n_messages, bool add_assistant, char * buf, int32_t size, int32_t * n_out);
SLICEMOE_API int slicemoe_detokenize(const slicemoe_model * model, const int32_t * tokens, int32_t n_tokens,
                                     char * text, int32_t text_len_max, int32_t * n_out);
// The bytes of one token as the vocabulary stores them (special tokens written out), which may be
// part of a UTF-8 character: what a token's logprob entry names. Not NUL-terminated.
SLICEMOE_API int slicemoe_token_piece(const slicemoe_model * model, int32_t token, char * buf, int32_t size,
                                      int32_t * n_out);

// --- context -------------------------------------------------------------------------------

// What llama.cpp's buffers of a context take, summed over devices (bytes). weights_bytes counts
// every tensor of the model, mapped or allocated (routed experts included: with a slice cache they
// stay in the file and only the pools, counted by the cache, are resident).
struct slicemoe_memory {
    int64_t weights_bytes;
    int64_t kv_bytes;       // the KV cache of n_ctx tokens
    int64_t compute_bytes;  // compute buffers (the largest graph: an n_batch prompt batch)
};

SLICEMOE_API struct slicemoe_context_params slicemoe_context_default_params(void);
SLICEMOE_API int  slicemoe_context_memory(const slicemoe_context * ctx, struct slicemoe_memory * out);
// The same figures for `path` and `params` before anything is loaded: llama.cpp sizes the model
// and the context without reading or allocating them (its no_alloc mode). with_cache: size the
// context a slice cache would run (prompt batches stay on the CPU, as slicemoe_context_create
// arranges), else a plain one.
SLICEMOE_API int  slicemoe_memory_estimate(const char * path, const struct slicemoe_context_params * params,
                                           bool with_cache, struct slicemoe_memory * out);
SLICEMOE_API int  slicemoe_context_create(slicemoe_model * model, const struct slicemoe_context_params * params,
                                          slicemoe_context ** out);
SLICEMOE_API void slicemoe_context_free(slicemoe_context * ctx);
SLICEMOE_API uint32_t slicemoe_context_n_ctx(const slicemoe_context * ctx);
SLICEMOE_API int32_t  slicemoe_context_n_past(const slicemoe_context * ctx);

// Forget every evaluated token and zero the timings.
SLICEMOE_API void slicemoe_context_reset(slicemoe_context * ctx);
// Append tokens to the sequence and run the model over them (in n_batch chunks); afterwards the
// logits of the last token are available. A failed call leaves the sequence as it was.
SLICEMOE_API int  slicemoe_eval(slicemoe_context * ctx, const int32_t * tokens, int32_t n_tokens);
// The n_vocab logits of the last evaluated token, or NULL before any evaluation.
SLICEMOE_API const float * slicemoe_logits(slicemoe_context * ctx);

// Several sequences on one context (n_seq > 1), decoded together so that the slice cache serves the
// union of the experts their tokens select: each missing slice is read once per step, for every
// sequence routed to it. Sequence ids are 0 .. n_seq - 1; slicemoe_eval is slicemoe_eval_seq of 0.
// Append tokens to one sequence (a prompt, in n_batch chunks); its last token's logits follow.
SLICEMOE_API int  slicemoe_eval_seq(slicemoe_context * ctx, int32_t seq, const int32_t * tokens, int32_t n_tokens);
// One token for each of n sequences (distinct ids) in one batch; each one's logits follow. A failed
// call leaves every sequence as it was.
SLICEMOE_API int  slicemoe_decode_batch(slicemoe_context * ctx, int32_t n, const int32_t * seqs, const int32_t * tokens);
// The logits of a sequence's last token when the last evaluation computed them, else NULL.
SLICEMOE_API const float * slicemoe_logits_seq(slicemoe_context * ctx, int32_t seq);
// Tokens of a sequence so far; forgetting them frees the sequence for a new prompt.
SLICEMOE_API int32_t slicemoe_seq_n_past(const slicemoe_context * ctx, int32_t seq);
SLICEMOE_API void slicemoe_seq_reset(slicemoe_context * ctx, int32_t seq);
SLICEMOE_API void slicemoe_timings_get(const slicemoe_context * ctx, struct slicemoe_timings * out);

// --- sampling ------------------------------------------------------------------------------

SLICEMOE_API struct slicemoe_sampling_params slicemoe_sampling_default_params(void);
// The model gives the vocabulary that a grammar, penalties and logit biases need. Fails with
// SLICEMOE_ERR_INVALID_ARG (and the reason) for a grammar that does not parse, a token id outside
// the vocabulary or a value out of its range.
SLICEMOE_API int  slicemoe_sampler_create(const slicemoe_model * model, const struct slicemoe_sampling_params * params,
                                          slicemoe_sampler ** out);
SLICEMOE_API void slicemoe_sampler_free(slicemoe_sampler * sampler);
// Choose the next token from the last logits (does not evaluate it).
SLICEMOE_API int  slicemoe_sample(slicemoe_sampler * sampler, slicemoe_context * ctx, int32_t * token);
// Choose a sequence's next token from its logits (a sampler per sequence: samplers keep state).
SLICEMOE_API int  slicemoe_sample_seq(slicemoe_sampler * sampler, slicemoe_context * ctx, int32_t seq, int32_t * token);
// Decode one token: sample from the last logits, then evaluate the chosen token so the next
// logits are ready. *token receives the chosen id.
SLICEMOE_API int  slicemoe_decode_next(slicemoe_sampler * sampler, slicemoe_context * ctx, int32_t * token);

// cdef-end

#ifdef __cplusplus
}
#endif

#endif // SLICEMOE_H
