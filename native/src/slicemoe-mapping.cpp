// Resident memory under a cache: what of the model file's mapping stays resident and how, and the
// pools handed back when the process goes idle.
//
// llama.cpp maps the whole file. With a cache, decode reads the routed experts from the pools, so
// only the dense weights (attention, norms, routers, shared experts, embeddings, output) are used
// every token. Left as mapped file pages they are page cache, and under a memory limit (a cgroup,
// a phone's low-memory pressure) the kernel reclaims them before anything anonymous: every token
// then re-reads them by 4 KiB faults (issue 26: 1371 ms/token for a configuration whose slices all
// fit, 36 MB/token of faults). Copied into anonymous memory, the same bytes stay put like the pools
// do, and the expert tensors' pages go back to the file.

#include "slicemoe-engine.h"

#include "llama-model.h"

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#if defined(__linux__)
#include <sys/syscall.h>   // the releaser's thread id, for its priority
#endif
#include <sys/stat.h>
#include <unistd.h>
#include <unordered_set>
#include <utility>
#include <system_error>
#include <thread>
#include <vector>

namespace slicemoe {

namespace {

// copies go through a bounce buffer of this size, so the copy never holds two whole copies
constexpr size_t COPY_CHUNK = size_t(4) << 20;

uintptr_t page_size() {
    return uintptr_t(sysconf(_SC_PAGESIZE));
}

// The address range of the file's mapping, [begin, end), found from the expert tensors: each one's
// data is the mapping's start plus its file offset. {0, 0} when they are not mapped from the file
// (no mmap, or a layout where the offsets disagree).
std::pair<uintptr_t, uintptr_t> file_mapping(const cache & c) {
    struct stat st = {};
    if (!c.mapped || !c.io || fstat(c.io->fd(), &st) != 0 || c.layers.empty()) return { 0, 0 };
    const layer & first = c.layers.front();
    const uintptr_t begin = uintptr_t(first.mapped[0]->data) - uintptr_t(first.msb.file_offset[0]);
    if (begin % page_size() != 0) return { 0, 0 };
    // the MSB tensors only: an LSB pool without slots (a 4-bit policy) never looked up its offsets
    for (const layer & L : c.layers) {
        for (int j = 0; j < N_PROJ; ++j) {
            if (uintptr_t(L.mapped[j]->data) != begin + uintptr_t(L.msb.file_offset[j])) return { 0, 0 };
        }
    }
    return { begin, begin + uintptr_t(st.st_size) };
}

// The pages of the mapping that hold dense tensors, merged into ranges (a page shared with an
// expert tensor counts as dense: one page per boundary).
std::vector<std::pair<uintptr_t, uintptr_t>> dense_pages(const cache & c, uintptr_t map_begin, uintptr_t map_end) {
    std::unordered_set<const ggml_tensor *> experts;
    for (const layer & L : c.layers) {
        for (const ggml_tensor * t : L.mapped) experts.insert(t);
    }
    const uintptr_t page = page_size();
    const uintptr_t limit = (map_end + page - 1) / page * page;
    std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
    for (const auto & [name, t] : c.model->tensors_by_name) {
        const uintptr_t data = uintptr_t(t->data);
        if (experts.count(t) || !t->data || data < map_begin || data >= map_end) continue;
        const uintptr_t begin = data / page * page;
        const uintptr_t end = std::min(limit, (data + ggml_nbytes(t) + page - 1) / page * page);
        ranges.emplace_back(begin, end);
    }
    std::sort(ranges.begin(), ranges.end());
    std::vector<std::pair<uintptr_t, uintptr_t>> merged;
    for (const auto & r : ranges) {
        if (!merged.empty() && r.first <= merged.back().second) {
            merged.back().second = std::max(merged.back().second, r.second);
        } else {
            merged.push_back(r);
        }
    }
    return merged;
}

// Replace [begin, end) of the mapping by anonymous pages with the same bytes, read-only as before.
bool make_anonymous(uintptr_t begin, uintptr_t end, std::vector<uint8_t> & bounce) {
    for (uintptr_t at = begin; at < end; at += COPY_CHUNK) {
        const size_t n = size_t(std::min<uintptr_t>(COPY_CHUNK, end - at));
        memcpy(bounce.data(), (const void *) at, n);
        void * fresh = mmap((void *) at, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (fresh == MAP_FAILED) return false;
        memcpy(fresh, bounce.data(), n);
        if (mprotect(fresh, n, PROT_READ) != 0) return false;
    }
    return true;
}

} // namespace

bool keep_dense_resident(cache & c, std::string * error) {
    const char * mapped = std::getenv("SLICEMOE_DENSE_MAPPED");   // 1: as before, for measuring the difference
    if (mapped && std::strcmp(mapped, "1") == 0) return true;
    const auto [map_begin, map_end] = file_mapping(c);
    if (map_begin == 0) return true;   // nothing of the model is mapped from the file
    std::vector<uint8_t> bounce(COPY_CHUNK);
    for (const auto & [begin, end] : dense_pages(c, map_begin, map_end)) {
        if (!make_anonymous(begin, end, bounce)) {
            *error = std::string("cannot copy the dense weights out of the file mapping: ") + strerror(errno);
            return false;
        }
        c.totals.dense_copied_bytes += int64_t(end - begin);
    }
    return true;
}

constexpr uintptr_t RELEASE_STEP = uintptr_t(16) << 20;

void release_mapped(cache & c) {
    if (!c.mapped) return;
    const uintptr_t page = page_size();
    for (const layer & L : c.layers) {
        for (const ggml_tensor * t : L.mapped) {
            if (!t) continue;
            const uintptr_t begin = (uintptr_t(t->data) + page - 1) / page * page;
            const uintptr_t end = (uintptr_t(t->data) + ggml_nbytes(t)) / page * page;
            // in steps, each holding the address space's lock briefly (a page fault or an mmap of
            // the decode threads waits for the step it meets, not for GBs of pages)
            for (uintptr_t step = begin; step < end && !c.releaser_stop; step += RELEASE_STEP) {
                madvise((void *) step, std::min<uintptr_t>(RELEASE_STEP, end - step), MADV_DONTNEED);
            }
        }
    }
#if defined(POSIX_FADV_DONTNEED)
    posix_fadvise(c.io->fd(), 0, 0, POSIX_FADV_DONTNEED);
#endif
}

// A 4-bit prompt reads the LSB tensors at its last token's experts alone. A fault there would read
// around the page (the device's readahead window: 8 MiB on the machine measured, which took a first
// prompt from 4.6 to 7.3 GB read), so those ranges read only the page they fault on, and the slices
// the last row needs are asked for ahead, exactly (ask_for_last_row).
void advise_sparse_lsb(cache & c) {
    if (!c.mapped || !prompt_at_low_precision(c)) return;
    const uintptr_t page = page_size();
    for (const layer & L : c.layers) {
        for (int j = 0; j < N_PROJ; ++j) {
            const ggml_tensor * t = L.mapped[N_PROJ + j];
            if (!t || !t->data) continue;
            const uintptr_t begin = (uintptr_t(t->data) + page - 1) / page * page;
            const uintptr_t end = (uintptr_t(t->data) + ggml_nbytes(t)) / page * page;
            if (end > begin) madvise((void *) begin, end - begin, MADV_RANDOM);
        }
    }
}

void ask_for_last_row(const cache & c, const layer & L) {
    if (!c.mapped) return;
    const uintptr_t page = page_size();
    for (const int32_t e : L.last_prompt_experts) {
        if (e < 0 || e >= c.n_expert || L.lsb.expert_slot[size_t(e)] >= 0) continue;   // the pool serves it
        for (int j = 0; j < N_PROJ; ++j) {
            const ggml_tensor * t = L.mapped[N_PROJ + j];
            if (!t || !t->data) continue;
            const uintptr_t first = uintptr_t(t->data) + uintptr_t(e) * t->nb[2];
            const uintptr_t begin = first / page * page;
            const uintptr_t end = (first + t->nb[2] + page - 1) / page * page;
            madvise((void *) begin, end - begin, MADV_WILLNEED);   // reads the range, no more, and returns
        }
    }
}

void release_mapped_in_background(cache & c) {
    if (c.releaser.joinable()) c.releaser.join();
    try {
        c.releaser = std::thread([&c] {
#if defined(__linux__)
            // the lowest share of the cores: the decode threads keep them, and the pages go back
            // as they idle (between tokens and requests) instead of during the next tokens
            setpriority(PRIO_PROCESS, pid_t(syscall(SYS_gettid)), 19);
#endif
            release_mapped(c);
        });
    } catch (const std::system_error &) {   // no thread to be had: hand the pages back here
        release_mapped(c);
    }
}

void release_pools(cache & c) {
    for (layer & L : c.layers) {
        join_prefetch(c, L);
        join_step_reads(c, L);   // a failed read empties its slot, and every slot is emptied below
        for (pool * p : { &L.msb, &L.lsb }) {
            std::fill(p->slot_expert.begin(), p->slot_expert.end(), -1);
            std::fill(p->expert_slot.begin(), p->expert_slot.end(), -1);
            std::fill(p->uses.begin(), p->uses.end(), 0);
        }
        std::fill(L.prefetched.begin(), L.prefetched.end(), 0);
    }
    for (const auto & [memory, size] : c.host_memory) {
        madvise(memory, size, MADV_DONTNEED);   // private anonymous memory: reads back as zeros
    }
}

} // namespace slicemoe
