// Miss I/O: reads of expert slices from the model file. All the misses of one step (a layer's
// decode token, a warm-up) are issued at once over a pool of persistent reader threads and land in
// the memory the caller names (a pool slot, or a staging buffer for a device pool).
//
// Direct mode opens the file with O_DIRECT (Linux, Android): no page-cache copy, and no page
// cache that would hide the next miss. A range whose offset, length and destination are all 4 KiB
// aligned (every slice of the published shapes in a file written with general.alignment = 4096)
// is read straight into place; any other is read as its enclosing aligned range into a bounce
// buffer and copied. Buffered mode (a file system without O_DIRECT, or asked for) uses pread and
// then drops the range from the page cache (POSIX_FADV_DONTNEED; F_NOCACHE on macOS), so that a
// later miss of the same slice is a real read too.
//
// O_DIRECT is trusted only once it has read right: at open, a range at each end of the file is read
// both ways and compared. On some file systems the open succeeds and reads return other bytes
// (Android's FUSE shared storage); a mismatch or a failed direct read selects buffered reads in
// auto mode (fallback_reason() says why) and fails the open when direct reads were asked for.
// SLICEMOE_FAULT_DIRECT_READS=corrupt makes every direct read return altered bytes, to test that.
//
// SLICEMOE_READ_TIMELINE=PATH records when every read was submitted, started and ended and writes
// them to PATH as tab-separated values when the reader closes (scripts/read_timeline.py reads it):
// the timeline shows whether reads overlap compute, not only how long compute waited for them.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace slicemoe {

struct slice_read {
    int64_t   offset = 0;   // in the model file
    size_t    bytes = 0;
    uint8_t * dst = nullptr;
    bool      fail = false; // testing: report this read as failed (EIO) without reading
    bool      cached = false; // through the page cache even in direct mode: pages a prompt has just
                              // read (PCW's warm-up), copied instead of read from the device again
    const uint8_t * mapped = nullptr;   // with cached: the range in the model's own mapping, copied
                                        // from there (no system call; a page gone is faulted back in)
};

// Reads in flight together: a step's misses (read(): the caller reads too and waits) or a
// look-ahead prefetch (submit(): the reader threads read it while the caller computes).
struct read_batch {
    std::vector<slice_read> reads;
    std::vector<char>       failed;        // per read, once finished
    std::unique_ptr<std::atomic<uint8_t>[]> state;   // per read: 0 in flight, 1 read, 2 failed (for
                                                     // a compute that waits for one read at a time)
    size_t                  next = 0;      // the next read to claim
    size_t                  finished = 0;
    size_t                  in_flight = 0;     // claimed, not finished
    size_t                  max_in_flight = 0; // readers at once on this batch (0: every reader); a
                                               // batch that compute waits for read by read keeps
                                               // few in flight, so that its reads land in order
    std::string             first_error;
    bool                    urgent = false;   // a step's misses (compute waits): ahead of prefetches
    int64_t                 id = 0;           // in submission order, for the read timeline
    int64_t                 submitted_ns = 0; // since the reader opened, for the read timeline
};

// One read as SLICEMOE_READ_TIMELINE records it: times in ns since the reader opened.
struct read_event {
    int64_t batch, read, bytes;
    int64_t submitted_ns, started_ns, ended_ns;
    bool    urgent, by_caller;   // a step's misses; read by the thread that waits for the batch
};

class slice_reader {
public:
    enum mode_t { AUTO = 0, DIRECT = 1, BUFFERED = 2 };   // = enum slicemoe_io_mode

    // nullptr with *error when the file cannot be opened (or O_DIRECT was asked for and the file
    // system does not support it).
    static std::unique_ptr<slice_reader> open(const char * path, int mode, int n_threads, std::string * error);
    // Finishes every batch still queued first.
    ~slice_reader();
    slice_reader(const slice_reader &) = delete;
    slice_reader & operator=(const slice_reader &) = delete;

    // Every read of the batch, spread over the reader threads and the calling thread, ahead of any
    // background batch; returns when all are done. false with *error (the first failure) when any
    // failed; failed[i] then says which. One such call at a time (the engine's lock).
    bool read(const std::vector<slice_read> & reads, std::vector<char> * failed, std::string * error);
    // A batch the reader threads read while the caller goes on; it waits for it later (wait()), or
    // for one read at a time (read_batch::state). urgent: a step's misses, ahead of every look-ahead
    // prefetch; else behind every batch queued. max_in_flight: at most that many of its reads at once
    // (0: no limit), claimed in order. nullptr for an empty batch.
    std::shared_ptr<read_batch> submit(std::vector<slice_read> reads, bool urgent = false, size_t max_in_flight = 0);
    // Until every read of a submitted batch is done (reading what no reader took yet); false with
    // *error when any failed.
    bool wait(const std::shared_ptr<read_batch> & batch, std::string * error);

    bool direct() const { return direct_fd_ >= 0; }
    int  fd() const { return fd_; }   // the buffered descriptor
    // Why auto mode reads buffered although the file opened with O_DIRECT ("" when it does not).
    const std::string & fallback_reason() const { return fallback_reason_; }

private:
    slice_reader() = default;
    void worker();
    bool run(const slice_read & r, std::string * error);
    // pread on the O_DIRECT descriptor (dst, offset and n aligned), altered under the fault switch.
    ssize_t pread_direct(uint8_t * dst, size_t n, int64_t offset) const;
    // "" when direct reads of both ends of the file equal buffered reads, else what differed.
    std::string verify_direct() const;
    // Under mutex_: claim the next read of b (taking b off the queue with its last read), run it
    // unlocked, record the result.
    void claim_and_run(const std::shared_ptr<read_batch> & b, std::unique_lock<std::mutex> & lock);
    // Under mutex_: the first queued batch a reader thread may claim a read of now (nullptr: none).
    std::shared_ptr<read_batch> claimable() const;
    // Under mutex_: number the batch and stamp its submission (for the timeline).
    void stamp(read_batch & b);
    int64_t now_ns() const;
    void write_timeline() const;

    int fd_ = -1;
    int direct_fd_ = -1;
    bool corrupt_direct_ = false;   // fault injection (SLICEMOE_FAULT_DIRECT_READS=corrupt)
    int  delay_ms_ = 0;             // fault injection: every read takes this long first (SLICEMOE_FAULT_READ_DELAY_MS)
    std::string fallback_reason_;
    std::vector<std::thread> threads_;
    std::mutex mutex_;
    std::condition_variable wake_, done_;
    std::deque<std::shared_ptr<read_batch>> queue_;   // batches with reads left to claim, step first
    bool stop_ = false;
    std::string timeline_path_;          // SLICEMOE_READ_TIMELINE ("": no timeline)
    std::vector<read_event> timeline_;
    int64_t n_batches_ = 0;
    std::chrono::steady_clock::time_point opened_ = std::chrono::steady_clock::now();
};

} // namespace slicemoe
