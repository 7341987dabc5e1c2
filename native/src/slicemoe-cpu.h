// The cores a default thread count uses. ggml's threads meet at a barrier after every operation,
// so on a phone's big and little cores one thread on a little core sets the pace of all of them:
// the default is one thread per fast core.
#pragma once

namespace slicemoe {

// The cores under cpu_dir (a sysfs cpu directory: cpuN/cpu_capacity, else
// cpuN/cpufreq/cpuinfo_max_freq) whose capacity is at least half the largest; 0 when neither is
// readable (then every core counts).
int fast_core_count(const char * cpu_dir);

} // namespace slicemoe
