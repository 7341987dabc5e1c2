// The GGUF validator: what a file must satisfy before llama.cpp's loader sees it.
//
// llama.cpp refuses most bad files with an exception, which becomes an error status, but it still
// asserts (and so aborts the whole process) on a few hyperparameters it reads before any check,
// on epsilons that only the CPU kernels test, and it trusts tokenizer arrays to have one entry per
// token. Those rules are checked here, for any architecture, together with what the engine itself
// relies on: tensor data inside the file and the slicemoe.* format of a sliced model. Everything
// else (tensor names, counts and shapes per architecture) is left to llama.cpp's own no_alloc
// load, which refuses cleanly.
//
// Past 500 lines on purpose: one rule per function, read top to bottom as the list of what a file
// must satisfy; split, the rules would be scattered.

#include "slicemoe-validate.h"

#include "ggml.h"
#include "gguf.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <sys/stat.h>
#include <unordered_set>

namespace slicemoe {

namespace {

// Limits of the pinned llama.cpp (src/llama-hparams.h): LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS.
constexpr uint64_t MAX_LAYERS  = 512;
constexpr uint64_t MAX_EXPERTS = 1024;
// The sliced formats this engine reads (slicemoe-convert, amat.GRIDS): version 1 holds the paper's
// AMAT grid; version 2 names its grid in 'slicemoe.grid'. Every grid is a pair of Q4_1 slices whose
// sum is the 8-bit value, so the engine runs all versions alike.
constexpr uint64_t FORMAT_VERSION_MIN = 1;
constexpr uint64_t FORMAT_VERSION_MAX = 2;

struct gguf_deleter {
    void operator()(gguf_context * g) const { gguf_free(g); }
};
struct ggml_deleter {
    void operator()(ggml_context * c) const { ggml_free(c); }
};

struct file_view {
    std::unique_ptr<gguf_context, gguf_deleter> gguf;
    std::unique_ptr<ggml_context, ggml_deleter> meta;   // tensor shapes, no data
    std::string arch;
};

bool is_integer(gguf_type t) {
    switch (t) {
        case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16:
        case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64:
            return true;
        default:
            return false;
    }
}

// An integer value of any width as int64 (u64 above INT64_MAX clamps; no hyperparameter gets there).
int64_t integer_at(const gguf_context * g, int64_t id, gguf_type t, size_t i, bool array) {
    const void * base = array ? gguf_get_arr_data(g, id) : nullptr;
    switch (t) {
        case GGUF_TYPE_UINT8:  return array ? ((const uint8_t *) base)[i]  : gguf_get_val_u8(g, id);
        case GGUF_TYPE_INT8:   return array ? ((const int8_t *) base)[i]   : gguf_get_val_i8(g, id);
        case GGUF_TYPE_UINT16: return array ? ((const uint16_t *) base)[i] : gguf_get_val_u16(g, id);
        case GGUF_TYPE_INT16:  return array ? ((const int16_t *) base)[i]  : gguf_get_val_i16(g, id);
        case GGUF_TYPE_UINT32: return array ? ((const uint32_t *) base)[i] : gguf_get_val_u32(g, id);
        case GGUF_TYPE_INT32:  return array ? ((const int32_t *) base)[i]  : gguf_get_val_i32(g, id);
        case GGUF_TYPE_INT64:  return array ? ((const int64_t *) base)[i]  : gguf_get_val_i64(g, id);
        case GGUF_TYPE_UINT64: {
            const uint64_t v = array ? ((const uint64_t *) base)[i] : gguf_get_val_u64(g, id);
            return v > uint64_t(INT64_MAX) ? INT64_MAX : int64_t(v);
        }
        default: return 0;
    }
}

// A hyperparameter that llama.cpp reads as a scalar or a per-layer array: its largest value.
// false with *error set when the key has another type; *present false when it is absent.
bool max_integer(const gguf_context * g, const std::string & key, int64_t * out, bool * present, std::string * error) {
    const int64_t id = gguf_find_key(g, key.c_str());
    *present = id >= 0;
    if (id < 0) return true;
    const gguf_type t = gguf_get_kv_type(g, id);
    if (is_integer(t)) {
        *out = integer_at(g, id, t, 0, false);
        return true;
    }
    if (t == GGUF_TYPE_ARRAY && is_integer(gguf_get_arr_type(g, id)) && gguf_get_arr_n(g, id) > 0) {
        const size_t n = gguf_get_arr_n(g, id);
        *out = INT64_MIN;
        for (size_t i = 0; i < n; ++i) {
            *out = std::max(*out, integer_at(g, id, gguf_get_arr_type(g, id), i, true));
        }
        return true;
    }
    *error = "metadata '" + key + "' must be an integer (or an array of integers)";
    return false;
}

bool check_range(const gguf_context * g, const std::string & key, bool required, int64_t lo, int64_t hi,
                 int64_t * value, std::string * error) {
    bool present = false;
    *value = 0;
    if (!max_integer(g, key, value, &present, error)) return false;
    if (!present) {
        if (required) *error = "metadata '" + key + "' is missing";
        return !required;
    }
    if (*value < lo || *value > hi) {
        *error = "metadata '" + key + "' = " + std::to_string(*value) + " is outside [" + std::to_string(lo) +
                 ", " + std::to_string(hi) + "]";
        return false;
    }
    // a per-layer array must not hold a value below the range either
    const int64_t id = gguf_find_key(g, key.c_str());
    if (gguf_get_kv_type(g, id) == GGUF_TYPE_ARRAY) {
        for (size_t i = 0; i < gguf_get_arr_n(g, id); ++i) {
            const int64_t v = integer_at(g, id, gguf_get_arr_type(g, id), i, true);
            if (v < lo) {
                *error = "metadata '" + key + "'[" + std::to_string(i) + "] = " + std::to_string(v) + " is below " +
                         std::to_string(lo);
                return false;
            }
        }
    }
    return true;
}

// Rules llama.cpp asserts on (llama_model::load_hparams) rather than refusing.
bool check_hparams(const file_view & f, std::string * error) {
    const gguf_context * g = f.gguf.get();
    const std::string a = f.arch + ".";
    int64_t n_layer = 0, n_nextn = 0, n_expert = 0, n_used = 0, n_groups = 0, n_group_used = 0;
    if (!check_range(g, a + "block_count", true, 1, MAX_LAYERS, &n_layer, error) ||
        !check_range(g, a + "nextn_predict_layers", false, 0, n_layer, &n_nextn, error) ||
        !check_range(g, a + "expert_count", false, 0, MAX_EXPERTS, &n_expert, error) ||
        !check_range(g, a + "expert_used_count", false, n_expert > 0 ? 1 : 0, n_expert, &n_used, error) ||
        !check_range(g, a + "expert_group_count", false, 0, n_expert > 0 ? n_expert - 1 : 0, &n_groups, error)) {
        return false;
    }
    if (n_expert > 0 && gguf_find_key(g, (a + "expert_used_count").c_str()) < 0) {
        *error = "metadata '" + a + "expert_used_count' is missing (the model has " + std::to_string(n_expert) +
                 " experts)";
        return false;
    }
    if (n_groups > 1) {
        if (n_expert % n_groups != 0) {
            *error = "expert_count " + std::to_string(n_expert) + " is not a multiple of expert_group_count " +
                     std::to_string(n_groups);
            return false;
        }
        if (!check_range(g, a + "expert_group_used_count", true, 1, n_groups - 1, &n_group_used, error)) {
            return false;
        }
    }
    const int64_t scaling = gguf_find_key(g, (a + "rope.scaling.type").c_str());
    if (scaling >= 0) {
        const char * s = gguf_get_kv_type(g, scaling) == GGUF_TYPE_STRING ? gguf_get_val_str(g, scaling) : "";
        if (strcmp(s, "none") != 0 && strcmp(s, "linear") != 0 && strcmp(s, "yarn") != 0 && strcmp(s, "longrope") != 0) {
            *error = "metadata '" + a + "rope.scaling.type' = '" + s + "' is not none, linear, yarn or longrope";
            return false;
        }
    }
    // every float hyperparameter finite, every epsilon >= 0 (the CPU kernels assert on a negative one)
    for (int64_t id = 0; id < gguf_get_n_kv(g); ++id) {
        const std::string key = gguf_get_key(g, id);
        const gguf_type t = gguf_get_kv_type(g, id);
        if (key.compare(0, a.size(), a) != 0 || (t != GGUF_TYPE_FLOAT32 && t != GGUF_TYPE_FLOAT64)) continue;
        const double v = t == GGUF_TYPE_FLOAT32 ? double(gguf_get_val_f32(g, id)) : gguf_get_val_f64(g, id);
        if (!std::isfinite(v) || (key.find("epsilon") != std::string::npos && v < 0.0)) {
            *error = "metadata '" + key + "' = " + std::to_string(v) + " is not a valid value";
            return false;
        }
    }
    return true;
}

// Attention geometry the graph builders assume without checking (ggml then asserts on a shape):
// heads that group evenly, rotary dimensions inside a head, and DeepSeek's MLA sizes.
bool check_attention(const file_view & f, std::string * error) {
    const gguf_context * g = f.gguf.get();
    const std::string a = f.arch + ".";
    int64_t n_head = 0, n_head_kv = 0, n_embd = 0, head_k = 0, n_rot = 0;
    bool has_head = false, has_kv = false, has_k = false, has_rot = false, has_embd = false;
    if (!max_integer(g, a + "attention.head_count", &n_head, &has_head, error) ||
        !max_integer(g, a + "attention.head_count_kv", &n_head_kv, &has_kv, error) ||
        !max_integer(g, a + "embedding_length", &n_embd, &has_embd, error) ||
        !max_integer(g, a + "attention.key_length", &head_k, &has_k, error) ||
        !max_integer(g, a + "rope.dimension_count", &n_rot, &has_rot, error)) {
        return false;
    }
    if (!has_head || n_head <= 0) {
        return true;   // no attention (recurrent models), or llama.cpp refuses it itself
    }
    if (has_kv && (n_head_kv < 1 || n_head_kv > n_head || n_head % n_head_kv != 0)) {
        *error = "metadata '" + a + "attention.head_count_kv' = " + std::to_string(n_head_kv) +
                 " does not divide attention.head_count = " + std::to_string(n_head);
        return false;
    }
    const int64_t mla_id = gguf_find_key(g, (a + "attention.key_length_mla").c_str());
    if (!has_k && has_embd) {
        head_k = n_embd / n_head;
    }
    int64_t rot_limit = head_k;
    if (mla_id >= 0) {
        // MLA (DeepSeek-V2/V3): one latent KV head of kv_lora_rank + rope dims; per-head queries
        // of key_length_mla, of which the last rope.dimension_count dims are rotated
        int64_t k_mla = 0, v_mla = 0, kv_rank = 0, v_len = 0;
        bool present = false;
        if (!max_integer(g, a + "attention.key_length_mla", &k_mla, &present, error) ||
            !max_integer(g, a + "attention.value_length_mla", &v_mla, &present, error) ||
            !max_integer(g, a + "attention.kv_lora_rank", &kv_rank, &present, error) ||
            !max_integer(g, a + "attention.value_length", &v_len, &present, error)) {
            return false;
        }
        std::string problem;
        if (has_kv && n_head_kv != 1) problem = "attention.head_count_kv must be 1 (one latent KV head)";
        else if (k_mla <= n_rot || v_mla < 1) problem = "attention.key_length_mla must exceed rope.dimension_count, value_length_mla be >= 1";
        else if (kv_rank < 1 || head_k != kv_rank + n_rot) problem = "attention.key_length must be kv_lora_rank + rope.dimension_count";
        else if (v_len != kv_rank) problem = "attention.value_length must be kv_lora_rank";
        if (!problem.empty()) {
            *error = "multi-head latent attention: " + problem + " (key_length " + std::to_string(head_k) +
                     ", key_length_mla " + std::to_string(k_mla) + ", kv_lora_rank " + std::to_string(kv_rank) +
                     ", rope.dimension_count " + std::to_string(n_rot) + ")";
            return false;
        }
        rot_limit = k_mla;
    }
    if (has_rot && (n_rot < 0 || n_rot > rot_limit)) {
        *error = "metadata '" + a + "rope.dimension_count' = " + std::to_string(n_rot) + " exceeds the head size " +
                 std::to_string(rot_limit);
        return false;
    }
    return true;
}

// The tokenizer: a model llama.cpp knows, and one entry per token in every per-token array (the
// loader indexes them by token id without checking their lengths).
bool check_tokenizer(const file_view & f, std::string * error) {
    const gguf_context * g = f.gguf.get();
    const int64_t model = gguf_find_key(g, "tokenizer.ggml.model");
    if (model < 0 || gguf_get_kv_type(g, model) != GGUF_TYPE_STRING) {
        *error = "metadata 'tokenizer.ggml.model' is missing: the file has no tokenizer";
        return false;
    }
    const std::string name = gguf_get_val_str(g, model);
    if (name == "none" || name == "no_vocab") {
        *error = "the file has no vocabulary (tokenizer.ggml.model = '" + name + "'): text cannot be tokenized";
        return false;
    }
    const int64_t tokens = gguf_find_key(g, "tokenizer.ggml.tokens");
    if (tokens < 0 || gguf_get_kv_type(g, tokens) != GGUF_TYPE_ARRAY || gguf_get_arr_type(g, tokens) != GGUF_TYPE_STRING) {
        *error = "metadata 'tokenizer.ggml.tokens' is missing or not an array of strings";
        return false;
    }
    const size_t n_tokens = gguf_get_arr_n(g, tokens);
    if (n_tokens == 0 || n_tokens > size_t(INT32_MAX)) {
        *error = "the tokenizer has " + std::to_string(n_tokens) + " tokens";
        return false;
    }
    // llama.cpp maps token text to id and asserts that no two tokens share a text
    std::unordered_set<std::string_view> seen;
    seen.reserve(n_tokens);
    for (size_t i = 0; i < n_tokens; ++i) {
        if (!seen.insert(gguf_get_arr_str(g, tokens, i)).second) {
            *error = "the tokenizer has two tokens with the same text (token " + std::to_string(i) + ")";
            return false;
        }
    }
    const struct { const char * key; gguf_type type; } per_token[] = {
        { "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32 },
        { "tokenizer.ggml.token_type", GGUF_TYPE_INT32 },
    };
    for (const auto & entry : per_token) {
        const int64_t id = gguf_find_key(g, entry.key);
        if (id < 0) continue;
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(g, id) != entry.type ||
            gguf_get_arr_n(g, id) != n_tokens) {
            *error = std::string("metadata '") + entry.key + "' must be an array of " + gguf_type_name(entry.type) +
                     " with one entry per token (" + std::to_string(n_tokens) + ")";
            return false;
        }
    }
    return true;
}

// Tensor data inside the file (the engine reads expert slices with pread from these offsets).
bool check_tensor_data(const file_view & f, const char * path, std::string * error) {
    struct stat st;
    if (stat(path, &st) != 0) {
        *error = std::string("cannot stat '") + path + "': " + strerror(errno);
        return false;
    }
    const gguf_context * g = f.gguf.get();
    const uint64_t file_size = uint64_t(st.st_size);
    const uint64_t data = gguf_get_data_offset(g);
    for (int64_t i = 0; i < gguf_get_n_tensors(g); ++i) {
        const uint64_t begin = data + gguf_get_tensor_offset(g, i);
        const uint64_t size = gguf_get_tensor_size(g, i);
        if (begin < data || begin > file_size || size > file_size - begin) {
            *error = std::string("tensor '") + gguf_get_tensor_name(g, i) + "' (" + std::to_string(size) +
                     " bytes at offset " + std::to_string(begin) + ") lies outside the file (" +
                     std::to_string(file_size) + " bytes): the file is truncated or corrupt";
            return false;
        }
    }
    return true;
}

// Vectors (norm weights, biases, scales) in a float type: llama.cpp uses them in element-wise
// operations, which abort on a quantized operand, and its converters and quantizer never write one.
bool check_tensor_types(const file_view & f, std::string * error) {
    for (ggml_tensor * t = ggml_get_first_tensor(f.meta.get()); t; t = ggml_get_next_tensor(f.meta.get(), t)) {
        if (ggml_n_dims(t) == 1 && ggml_is_quantized(t->type)) {
            *error = std::string("tensor '") + ggml_get_name(t) + "' is a vector of the quantized type " +
                     ggml_type_name(t->type) + ": vectors (norm weights, biases) must be F32, F16 or BF16";
            return false;
        }
    }
    return true;
}

bool uint_key_equals(const gguf_context * g, const char * key, uint64_t expected, std::string * error) {
    const int64_t id = gguf_find_key(g, key);
    if (id < 0 || !is_integer(gguf_get_kv_type(g, id))) {
        *error = std::string("sliced model: metadata '") + key + "' is missing or not an integer";
        return false;
    }
    const int64_t v = integer_at(g, id, gguf_get_kv_type(g, id), 0, false);
    if (v != int64_t(expected)) {
        *error = std::string("sliced model: metadata '") + key + "' = " + std::to_string(v) + ", this version reads " +
                 std::to_string(expected);
        return false;
    }
    return true;
}

bool format_version_known(const gguf_context * g, std::string * error) {
    const int64_t id = gguf_find_key(g, "slicemoe.format_version");
    if (!is_integer(gguf_get_kv_type(g, id))) {
        *error = "sliced model: metadata 'slicemoe.format_version' is not an integer";
        return false;
    }
    const int64_t version = integer_at(g, id, gguf_get_kv_type(g, id), 0, false);
    if (version < int64_t(FORMAT_VERSION_MIN) || version > int64_t(FORMAT_VERSION_MAX)) {
        *error = "sliced model: slicemoe.format_version " + std::to_string(version) + " is not one this version reads (" +
                 std::to_string(FORMAT_VERSION_MIN) + " to " + std::to_string(FORMAT_VERSION_MAX) + ")";
        return false;
    }
    const int64_t grid = gguf_find_key(g, "slicemoe.grid");
    if (version >= 2 && (grid < 0 || gguf_get_kv_type(g, grid) != GGUF_TYPE_STRING)) {
        *error = "sliced model: format version 2 needs the string 'slicemoe.grid' (the AMAT grid it holds)";
        return false;
    }
    return true;
}

// A sliced model: the format version this engine reads, and every LSB slice tensor the twin of
// its MSB tensor (same shape, both Q4_1, one expert per slice along ne[2]).
bool check_slices(const file_view & f, std::string * error) {
    const gguf_context * g = f.gguf.get();
    if (gguf_find_key(g, "slicemoe.format_version") < 0) return true;
    if (!format_version_known(g, error) ||
        !uint_key_equals(g, "slicemoe.bits_high", 8, error) || !uint_key_equals(g, "slicemoe.bits_low", 4, error) ||
        !uint_key_equals(g, "slicemoe.group_size", 32, error)) {
        return false;
    }
    const int64_t n_expert_id = gguf_find_key(g, (f.arch + ".expert_count").c_str());
    const int64_t n_expert = n_expert_id >= 0 ? integer_at(g, n_expert_id, gguf_get_kv_type(g, n_expert_id), 0, false) : 0;
    int n_sliced = 0;
    for (int64_t i = 0; i < gguf_get_n_tensors(g); ++i) {
        const std::string name = gguf_get_tensor_name(g, i);
        const std::string suffix = ".lsb";
        if (name.size() <= suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
            continue;
        }
        const std::string msb_name = name.substr(0, name.size() - suffix.size()) + ".weight";
        const ggml_tensor * lsb = ggml_get_tensor(f.meta.get(), name.c_str());
        const ggml_tensor * msb = ggml_get_tensor(f.meta.get(), msb_name.c_str());
        if (!msb) {
            *error = "sliced model: LSB slice '" + name + "' has no MSB tensor '" + msb_name + "'";
            return false;
        }
        if (lsb->type != GGML_TYPE_Q4_1 || msb->type != GGML_TYPE_Q4_1 || !ggml_are_same_shape(lsb, msb) ||
            ggml_n_dims(msb) != 3 || msb->ne[2] != n_expert) {
            *error = "sliced model: '" + msb_name + "' and its LSB slice must both be Q4_1 of one shape [n_in, n_out, " +
                     std::to_string(n_expert) + " experts]";
            return false;
        }
        n_sliced += 1;
    }
    if (n_sliced == 0) {
        *error = "sliced model: slicemoe.format_version is set but the file has no LSB slice tensors";
        return false;
    }
    return true;
}

// The header's structure, walked before ggml's gguf parser reads it: every value type, array
// element type and tensor type in range (that parser loads them into enums first, undefined
// behaviour for other values), every length inside the file. gguf_init_from_file then checks the
// rest (duplicates, shapes, offsets).
struct header_reader {
    FILE *   file;
    uint64_t size;
    bool     ok = true;

    uint64_t remaining() { const long at = ftell(file); return at < 0 || uint64_t(at) > size ? 0 : size - uint64_t(at); }
    template <typename T> T take() {
        T v{};
        ok = ok && fread(&v, sizeof(T), 1, file) == 1;
        return v;
    }
    void skip(uint64_t n) { ok = ok && n <= remaining() && fseek(file, long(n), SEEK_CUR) == 0; }
    void skip_string() { const uint64_t n = take<uint64_t>(); skip(n); }
};

bool check_structure(const char * path, std::string * error) {
    std::unique_ptr<FILE, int (*)(FILE *)> file(fopen(path, "rb"), fclose);
    struct stat st;
    if (!file || fstat(fileno(file.get()), &st) != 0) {
        *error = std::string("cannot read the header: ") + strerror(errno);
        return false;
    }
    header_reader r{file.get(), uint64_t(st.st_size)};
    r.skip(4);   // magic, checked by the caller
    const uint32_t version = r.take<uint32_t>();
    const uint64_t n_tensors = r.take<uint64_t>(), n_kv = r.take<uint64_t>();
    if (!r.ok || version < 2 || version > 3 || n_tensors > r.size / 24 || n_kv > r.size / 12) {
        *error = "the GGUF header is truncated or corrupt (version " + std::to_string(version) + ", " +
                 std::to_string(n_tensors) + " tensors, " + std::to_string(n_kv) + " metadata keys)";
        return false;
    }
    // bytes of a scalar of each raw GGUF type: u8 i8 u16 i16 u32 i32 f32 bool (string) (array) u64 i64 f64
    const auto scalar_size = [](uint32_t t) -> uint64_t {
        static const uint64_t sizes[] = { 1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8 };
        return t < sizeof(sizes) / sizeof(sizes[0]) ? sizes[t] : 0;
    };
    for (uint64_t i = 0; i < n_kv && r.ok; ++i) {
        r.skip_string();
        const uint32_t type = r.take<uint32_t>();
        if (r.ok && type >= GGUF_TYPE_COUNT) {
            *error = "metadata key " + std::to_string(i) + " has an unknown value type " + std::to_string(type);
            return false;
        }
        if (type == GGUF_TYPE_STRING) {
            r.skip_string();
        } else if (type == GGUF_TYPE_ARRAY) {
            const uint32_t element = r.take<uint32_t>();
            const uint64_t n = r.take<uint64_t>();
            if (r.ok && (element >= GGUF_TYPE_COUNT || element == GGUF_TYPE_ARRAY)) {
                *error = "metadata key " + std::to_string(i) + " is an array of unknown type " + std::to_string(element);
                return false;
            }
            if (element == GGUF_TYPE_STRING) {
                for (uint64_t j = 0; j < n && r.ok; ++j) r.skip_string();
            } else {
                r.ok = r.ok && n <= r.remaining() / scalar_size(element);
                r.skip(n * scalar_size(element));
            }
        } else {
            r.skip(scalar_size(type));
        }
    }
    for (uint64_t i = 0; i < n_tensors && r.ok; ++i) {
        r.skip_string();
        const uint32_t n_dims = r.take<uint32_t>();
        if (r.ok && n_dims > GGML_MAX_DIMS) {
            *error = "tensor info " + std::to_string(i) + " has " + std::to_string(n_dims) + " dimensions";
            return false;
        }
        r.skip(8 * uint64_t(n_dims));
        const uint32_t type = r.take<uint32_t>();
        if (r.ok && type >= GGML_TYPE_COUNT) {
            *error = "tensor info " + std::to_string(i) + " has an unknown ggml type " + std::to_string(type);
            return false;
        }
        r.skip(8);
    }
    if (!r.ok) {
        *error = "the GGUF header is truncated or corrupt (a length runs past the end of the file)";
        return false;
    }
    return true;
}

} // namespace

int validate_file(const char * path, std::string * error) {
    std::string problem;
    if (!check_structure(path, &problem)) {
        *error = std::string("'") + path + "': " + problem;
        return SLICEMOE_ERR_FORMAT;
    }
    file_view f;
    ggml_context * meta = nullptr;
    gguf_init_params params = { /*no_alloc*/ true, /*ctx*/ &meta };
    f.gguf.reset(gguf_init_from_file(path, params));
    f.meta.reset(meta);
    if (!f.gguf || !f.meta) {
        *error = std::string("'") + path + "' is not a readable GGUF (truncated or corrupt header)";
        return SLICEMOE_ERR_FORMAT;
    }
    const int64_t arch = gguf_find_key(f.gguf.get(), "general.architecture");
    if (arch < 0 || gguf_get_kv_type(f.gguf.get(), arch) != GGUF_TYPE_STRING) {
        *error = std::string("'") + path + "': metadata 'general.architecture' is missing";
        return SLICEMOE_ERR_FORMAT;
    }
    f.arch = gguf_get_val_str(f.gguf.get(), arch);
    if (!check_tensor_data(f, path, &problem) || !check_tensor_types(f, &problem) || !check_hparams(f, &problem) || !check_attention(f, &problem) ||
        !check_tokenizer(f, &problem) ||
        !check_slices(f, &problem)) {
        *error = std::string("'") + path + "': " + problem;
        return SLICEMOE_ERR_FORMAT;
    }
    return SLICEMOE_OK;
}

} // namespace slicemoe
