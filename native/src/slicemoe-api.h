// The C API's shared parts (internal to its units): the handles behind slicemoe.h's opaque types,
// and the error discipline every entry point follows. The API's units:
//   slicemoe-api.cpp          errors and logging, the library (versions, devices, kernels, policies)
//   slicemoe-api-model.cpp    loading, checking and describing a model, tokens and chat templates
//   slicemoe-api-cache.cpp    the engine's counters, routing traces, forced routes, trace replay
//   slicemoe-api-context.cpp  contexts: evaluation of one or several sequences, memory, threads
//   slicemoe-api-sampler.cpp  sampling
//
// Errors: every entry point that can fail returns a status and leaves a message in a thread-local
// string. llama.cpp reports its own failures through its log, so the log callback keeps the error
// lines of the current call (per thread) and they become part of our message.
#pragma once

#include "slicemoe.h"
#include "slicemoe-slices.h"

#include "llama.h"

#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>
#include <sys/stat.h>


struct slicemoe_model {
    llama_model       * model;
    const llama_vocab * vocab;
    int                 fd;        // the model file, held open to notice changes (see file_unchanged)
    struct stat         at_load;   // its size and modification time when loaded
    bool                owned;     // false: a llama_model loaded by someone else (slicemoe_model_wrap)
};

// The engine's state is read and cleared under the lock that its ubatches hold.
inline std::unique_lock<std::mutex> hold(slicemoe::cache * c) {
    return c ? std::unique_lock<std::mutex>(slicemoe::compute_mutex(*c)) : std::unique_lock<std::mutex>();
}

struct slicemoe_context {
    slicemoe_model  * model;
    llama_context   * lctx;
    std::vector<int32_t> n_past;        // [n_seq] tokens of each sequence
    std::vector<int32_t> logits_index;  // [n_seq] its token's index in the last llama_decode's batch, -1: none
    slicemoe_timings  timings;
};

struct slicemoe_sampler {
    llama_sampler * chain;
};

namespace slicemoe::api {

// Set the calling thread's message and return status.
int  fail(int status, std::string message);
// A failure of a llama.cpp call: our message, then what llama.cpp logged about it on this thread.
int  fail_llama(int status, const std::string & message);
// Success: clears the calling thread's message.
int  ok();
int  fail_nothrow(int status, const char * what, const char * detail) noexcept;
// Forget what llama.cpp logged on this thread (before a call whose failure we report).
void clear_llama_errors();
std::string take_llama_errors();
// llama.cpp's backends and our logger, once per process.
void init_once();
// llama.cpp's no_alloc load on the CPU: every tensor created and sized, none read or allocated.
llama_model_params no_alloc_params();
// A file llama.cpp's loader may see: it exists, is a GGUF, and passes the validator.
int check_gguf_file(const char * path);

// Nothing crosses the C boundary: every exported function runs its body through guard (status
// functions) or guard_value (the others), which turn an exception into a status and a message.
template <typename F>
int guard(F && body) noexcept {
    try {
        return body();
    } catch (const std::bad_alloc &) {
        return fail_nothrow(SLICEMOE_ERR_NO_MEMORY, "out of memory", "an allocation failed");
    } catch (const std::exception & e) {
        return fail_nothrow(SLICEMOE_ERR_INTERNAL, "internal error", e.what());
    } catch (...) {
        return fail_nothrow(SLICEMOE_ERR_INTERNAL, "internal error", "unknown exception");
    }
}

template <typename T, typename F>
T guard_value(T on_error, F && body) noexcept {
    T value = on_error;
    guard([&]() -> int { value = body(); return SLICEMOE_OK; });
    return value;
}

} // namespace slicemoe::api
