#include "slicemoe-cpu.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <string>
#include <vector>
#include <dirent.h>

namespace slicemoe {

namespace {

// The number in a one-line sysfs file, or -1.
long read_number(const std::string & path) {
    FILE * f = std::fopen(path.c_str(), "r");
    if (!f) return -1;
    long value = -1;
    if (std::fscanf(f, "%ld", &value) != 1) value = -1;
    std::fclose(f);
    return value;
}

bool is_cpu_entry(const char * name) {
    if (std::string(name).rfind("cpu", 0) != 0 || !name[3]) return false;
    for (const char * c = name + 3; *c; ++c) {
        if (!std::isdigit(static_cast<unsigned char>(*c))) return false;
    }
    return true;
}

} // namespace

int fast_core_count(const char * cpu_dir) {
    DIR * dir = cpu_dir ? opendir(cpu_dir) : nullptr;
    if (!dir) return 0;
    std::vector<std::string> cpus;
    while (const dirent * entry = readdir(dir)) {
        if (is_cpu_entry(entry->d_name)) cpus.push_back(std::string(cpu_dir) + "/" + entry->d_name);
    }
    closedir(dir);
    // capacity (arm64's energy-aware scheduling) first: it is what the kernel itself compares
    for (const char * file : {"/cpu_capacity", "/cpufreq/cpuinfo_max_freq"}) {
        std::vector<long> values;
        for (const std::string & cpu : cpus) {
            const long v = read_number(cpu + file);
            if (v > 0) values.push_back(v);
        }
        if (values.empty() || values.size() != cpus.size()) continue;
        const long largest = *std::max_element(values.begin(), values.end());
        return int(std::count_if(values.begin(), values.end(), [&](long v) { return 2 * v >= largest; }));
    }
    return 0;
}

} // namespace slicemoe
