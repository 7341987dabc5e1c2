#include "slicemoe-io.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <unistd.h>

namespace slicemoe {

namespace {

constexpr int64_t ALIGN = 4096;   // the logical block size O_DIRECT needs, at most, on the targets

bool aligned(int64_t v) { return v % ALIGN == 0; }

// pread until n bytes or the end of the file; the count read, or -1 with errno set.
ssize_t pread_full(int fd, uint8_t * dst, size_t n, int64_t offset) {
    size_t got = 0;
    while (got < n) {
        const ssize_t r = pread(fd, dst + got, n - got, off_t(offset + int64_t(got)));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        got += size_t(r);
    }
    return ssize_t(got);
}

// A bounce buffer per thread for unaligned direct reads, grown as needed and never shrunk.
struct bounce_buffer {
    uint8_t * data = nullptr;
    size_t    size = 0;
    ~bounce_buffer() { std::free(data); }
    uint8_t * get(size_t n) {
        if (n > size) {
            std::free(data);
            data = static_cast<uint8_t *>(std::aligned_alloc(size_t(ALIGN), n));
            size = data ? n : 0;
        }
        return data;
    }
};

thread_local bounce_buffer t_bounce;

} // namespace

std::unique_ptr<slice_reader> slice_reader::open(const char * path, int mode, int n_threads, std::string * error) {
    std::unique_ptr<slice_reader> r(new slice_reader());
    r->fd_ = ::open(path, O_RDONLY | O_CLOEXEC);
    if (r->fd_ < 0) {
        *error = std::string("cannot open '") + path + "' for expert reads: " + strerror(errno);
        return nullptr;
    }
#if defined(__APPLE__)
    fcntl(r->fd_, F_NOCACHE, 1);   // macOS has neither O_DIRECT nor posix_fadvise: this is its equivalent
#endif
    const char * timeline = std::getenv("SLICEMOE_READ_TIMELINE");
    r->timeline_path_ = timeline ? timeline : "";
    const char * delay = std::getenv("SLICEMOE_FAULT_READ_DELAY_MS");
    r->delay_ms_ = delay ? std::max(0, std::atoi(delay)) : 0;
    if (mode != BUFFERED) {
#ifdef O_DIRECT
        r->direct_fd_ = ::open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
#else
        errno = EINVAL;
#endif
        if (r->direct_fd_ < 0 && mode == DIRECT) {
            *error = std::string("cannot open '") + path + "' with O_DIRECT (direct reads were asked for): " +
                     strerror(errno);
            return nullptr;
        }
        const char * fault = std::getenv("SLICEMOE_FAULT_DIRECT_READS");
        r->corrupt_direct_ = fault && std::strcmp(fault, "corrupt") == 0;
        const std::string mismatch = r->direct_fd_ >= 0 ? r->verify_direct() : std::string();
        if (!mismatch.empty()) {
            close(r->direct_fd_);
            r->direct_fd_ = -1;
            if (mode == DIRECT) {
                *error = std::string("direct reads of '") + path + "' cannot be trusted: " + mismatch;
                return nullptr;
            }
            r->fallback_reason_ = "O_DIRECT reads of this file system cannot be trusted (" + mismatch +
                                  "): misses are read buffered";
        }
    }
    for (int i = 1; i < n_threads; ++i) {   // the calling thread is the first reader
        r->threads_.emplace_back(&slice_reader::worker, r.get());
    }
    return r;
}

slice_reader::~slice_reader() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
    }
    wake_.notify_all();
    for (std::thread & t : threads_) t.join();
    write_timeline();
    if (direct_fd_ >= 0) close(direct_fd_);
    if (fd_ >= 0) close(fd_);
}

ssize_t slice_reader::pread_direct(uint8_t * dst, size_t n, int64_t offset) const {
    const ssize_t got = pread_full(direct_fd_, dst, n, offset);
    if (corrupt_direct_ && got > 0) {
        for (ssize_t i = 0; i < got; i += 64) dst[i] ^= 0x5a;   // what a broken FUSE layer might hand back
    }
    return got;
}

std::string slice_reader::verify_direct() const {
    const off_t size = lseek(fd_, 0, SEEK_END);
    if (size <= 0) return "";
    const int64_t window = std::min<int64_t>(int64_t(1) << 20, (int64_t(size) + ALIGN - 1) / ALIGN * ALIGN);
    std::unique_ptr<uint8_t, decltype(&std::free)> direct(
        static_cast<uint8_t *>(std::aligned_alloc(size_t(ALIGN), size_t(window))), &std::free);
    std::vector<uint8_t> buffered(static_cast<size_t>(window));
    if (!direct) return "";   // no memory for the check: keep what the open gave
    const int64_t last = std::max<int64_t>(0, (int64_t(size) - window) / ALIGN * ALIGN);
    for (const int64_t offset : {int64_t(0), last}) {
        const ssize_t got = pread_direct(direct.get(), size_t(window), offset);
        if (got < 0) {
            return std::string("a direct read failed: ") + strerror(errno);
        }
        const ssize_t want = pread_full(fd_, buffered.data(), size_t(window), offset);
#if defined(POSIX_FADV_DONTNEED)
        posix_fadvise(fd_, off_t(offset), off_t(window), POSIX_FADV_DONTNEED);   // the check caches nothing
#endif
        if (got != want || std::memcmp(direct.get(), buffered.data(), size_t(std::max<ssize_t>(got, 0))) != 0) {
            return "a direct read of " + std::to_string(window) + " bytes at offset " + std::to_string(offset) +
                   " differs from a buffered read of the same range";
        }
    }
    return "";
}

bool slice_reader::run(const slice_read & r, std::string * error) {
    if (delay_ms_ > 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms_));
    }
    ssize_t got = -1;
    int err = EIO;
    if (r.fail) {
        got = -1;
    } else if (r.cached && r.mapped) {
        std::memcpy(r.dst, r.mapped, r.bytes);
        got = ssize_t(r.bytes);
    } else if (direct_fd_ >= 0 && !r.cached) {
        const int64_t begin = r.offset / ALIGN * ALIGN;
        const int64_t end = (r.offset + int64_t(r.bytes) + ALIGN - 1) / ALIGN * ALIGN;
        if (begin == r.offset && aligned(int64_t(r.bytes)) && aligned(int64_t(reinterpret_cast<uintptr_t>(r.dst)))) {
            got = pread_direct(r.dst, r.bytes, r.offset);
            err = errno;
        } else if (uint8_t * bounce = t_bounce.get(size_t(end - begin))) {
            const ssize_t n = pread_direct(bounce, size_t(end - begin), begin);
            err = errno;
            // the last block may end at the end of the file: what matters is the range asked for
            got = n < 0 ? -1 : ssize_t(std::min<int64_t>(int64_t(r.bytes), std::max<int64_t>(0, n - (r.offset - begin))));
            if (got > 0) std::memcpy(r.dst, bounce + (r.offset - begin), size_t(got));
        } else {
            err = ENOMEM;
        }
    } else {
        got = pread_full(fd_, r.dst, r.bytes, r.offset);
        err = errno;
#if defined(POSIX_FADV_DONTNEED)
        posix_fadvise(fd_, off_t(r.offset), off_t(r.bytes), POSIX_FADV_DONTNEED);
#endif
    }
    if (got == ssize_t(r.bytes)) {
        return true;
    }
    *error = std::string(got < 0 ? strerror(r.fail ? EIO : err) : "short read (the file ends early)") + " (" +
             std::to_string(r.bytes) + " bytes at offset " + std::to_string(r.offset) + ")";
    return false;
}

void slice_reader::claim_and_run(const std::shared_ptr<read_batch> & b, std::unique_lock<std::mutex> & lock) {
    const size_t i = b->next++;
    if (b->next == b->reads.size()) {
        queue_.erase(std::find(queue_.begin(), queue_.end(), b));
    }
    const bool by_caller = !timeline_path_.empty() &&
                           std::find_if(threads_.begin(), threads_.end(), [](const std::thread & t) {
                               return t.get_id() == std::this_thread::get_id();
                           }) == threads_.end();
    b->in_flight += 1;
    lock.unlock();
    std::string error;
    const int64_t started = timeline_path_.empty() ? 0 : now_ns();
    const bool ok = run(b->reads[i], &error);
    const int64_t ended = timeline_path_.empty() ? 0 : now_ns();
    lock.lock();
    if (!timeline_path_.empty()) {
        timeline_.push_back({ b->id, int64_t(i), int64_t(b->reads[i].bytes), b->submitted_ns, started, ended, b->urgent,
                              by_caller });
    }
    if (!ok) {
        b->failed[i] = 1;
        if (b->first_error.empty()) b->first_error = error;
    }
    b->state[i].store(ok ? 1 : 2, std::memory_order_release);
    b->in_flight -= 1;
    if (++b->finished == b->reads.size()) done_.notify_all();
    if (b->max_in_flight > 0 && b->next < b->reads.size()) wake_.notify_one();   // its next read may go
}

std::shared_ptr<read_batch> slice_reader::claimable() const {
    for (const std::shared_ptr<read_batch> & b : queue_) {
        if (b->max_in_flight == 0 || b->in_flight < b->max_in_flight) return b;
        if (b->urgent) return nullptr;   // compute waits for its reads: nothing behind it shares the device
    }
    return nullptr;
}

void slice_reader::worker() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
        std::shared_ptr<read_batch> b;
        wake_.wait(lock, [&] { return (b = claimable()) != nullptr || (stop_ && queue_.empty()); });
        if (!b) return;   // stopping, with nothing left to read
        claim_and_run(b, lock);
    }
}

bool slice_reader::read(const std::vector<slice_read> & reads, std::vector<char> * failed, std::string * error) {
    failed->assign(reads.size(), 0);
    if (reads.empty()) return true;
    auto b = std::make_shared<read_batch>();
    b->reads = reads;
    b->failed.assign(reads.size(), 0);
    b->state.reset(new std::atomic<uint8_t>[reads.size()]());
    std::unique_lock<std::mutex> lock(mutex_);
    b->urgent = true;
    stamp(*b);
    queue_.push_front(b);   // a step's misses block compute: ahead of any prefetch
    // as many readers as the batch can keep busy besides this thread: a decode step of a small
    // model misses one or two slices, and waking every reader for them costs more than the reads
    const size_t helpers = std::min(reads.size() - 1, threads_.size());
    for (size_t k = 0; k < helpers; ++k) wake_.notify_one();
    while (b->next < b->reads.size()) {   // the calling thread reads too
        claim_and_run(b, lock);
    }
    done_.wait(lock, [&] { return b->finished == b->reads.size(); });
    *failed = b->failed;
    if (!b->first_error.empty()) {
        *error = b->first_error;
        return false;
    }
    return true;
}

std::shared_ptr<read_batch> slice_reader::submit(std::vector<slice_read> reads, bool urgent, size_t max_in_flight) {
    if (reads.empty()) return nullptr;
    auto b = std::make_shared<read_batch>();
    b->failed.assign(reads.size(), 0);
    b->state.reset(new std::atomic<uint8_t>[reads.size()]());
    b->reads = std::move(reads);
    b->urgent = urgent;
    b->max_in_flight = max_in_flight;
    std::lock_guard<std::mutex> lock(mutex_);
    stamp(*b);
    if (urgent) {
        // behind the urgent batches already queued (earlier layers' steps), ahead of every prefetch
        auto at = queue_.begin();
        while (at != queue_.end() && (*at)->urgent) ++at;
        queue_.insert(at, b);
    } else {
        queue_.push_back(b);
    }
    size_t readers = std::min(b->reads.size(), threads_.size());
    if (max_in_flight > 0) readers = std::min(readers, max_in_flight);
    for (size_t k = 0; k < readers; ++k) wake_.notify_one();
    return b;
}

bool slice_reader::wait(const std::shared_ptr<read_batch> & batch, std::string * error) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (batch->next < batch->reads.size()) {   // what the readers have not reached yet
        claim_and_run(batch, lock);
    }
    done_.wait(lock, [&] { return batch->finished == batch->reads.size(); });
    if (!batch->first_error.empty()) {
        *error = batch->first_error;
        return false;
    }
    return true;
}

void slice_reader::stamp(read_batch & b) {
    b.id = n_batches_++;
    b.submitted_ns = timeline_path_.empty() ? 0 : now_ns();
}

int64_t slice_reader::now_ns() const {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - opened_).count();
}

void slice_reader::write_timeline() const {
    if (timeline_path_.empty()) return;
    FILE * out = std::fopen(timeline_path_.c_str(), "w");
    if (!out) return;   // a diagnostic: never a reason to fail closing the model
    std::fprintf(out, "batch\tread\tbytes\tsubmitted_ns\tstarted_ns\tended_ns\turgent\tby_caller\n");
    for (const read_event & e : timeline_) {
        std::fprintf(out, "%lld\t%lld\t%lld\t%lld\t%lld\t%lld\t%d\t%d\n", (long long) e.batch, (long long) e.read,
                     (long long) e.bytes, (long long) e.submitted_ns, (long long) e.started_ns, (long long) e.ended_ns,
                     int(e.urgent), int(e.by_caller));
    }
    std::fclose(out);
}

} // namespace slicemoe
