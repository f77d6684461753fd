#include "config.h"

#include <algorithm>
#include <cerrno>
#include <iterator>
#include <cstdlib>
#include <stdexcept>

namespace kvggml {

namespace {

struct Preset {
    const char * name;
    uint8_t approximation;
    uint8_t detail[4];  // D_1 (finest), D_2, D_3, D_4 and coarser
};

// Chosen with `kvggml eval` on SmolLM2 (README, "Presets"); kvggml/presets.py holds the same table.
constexpr Preset kPresets[] = {
    {"hi",       8, {4, 5, 6, 7}},
    {"balanced", 6, {3, 3, 3, 4}},
    {"lo",       4, {3, 3, 3, 3}},
};

std::string trim(const std::string & s) {
    const auto b = s.find_first_not_of(" \t\n\r");
    const auto e = s.find_last_not_of(" \t\n\r");
    return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

// Unset or empty: the default. Anything else must be a whole decimal number in [lo, hi].
uint32_t env_int(const char * name, uint32_t def, uint32_t lo, uint32_t hi) {
    const char * raw = std::getenv(name);
    if (raw == nullptr || *raw == '\0') {
        return def;
    }
    const std::string range = "expected an integer from " + std::to_string(lo) + " to " + std::to_string(hi);
    const std::string value = trim(raw);
    char * end = nullptr;
    errno = 0;
    const long long number = std::strtoll(value.c_str(), &end, 10);
    if (value.empty() || *end != '\0') {
        throw std::invalid_argument(std::string(name) + "='" + raw + "' is not an integer: " + range);
    }
    if (errno == ERANGE || number < (long long) lo || number > (long long) hi) {
        throw std::invalid_argument(std::string(name) + "='" + raw + "' is out of range: " + range);
    }
    return (uint32_t) number;
}

} // namespace

std::array<uint8_t, kMaxLevels + 1> Config::subband_bits() const {
    std::array<uint8_t, kMaxLevels + 1> bits{};
    for (const auto & p : kPresets) {
        if (preset == p.name) {
            bits[0] = p.approximation;
            for (uint32_t k = 1; k <= level; ++k) {
                const uint32_t j = level + 1 - k;  // subband k holds D_j
                bits[k] = p.detail[std::min<uint32_t>(j, 4) - 1];
            }
        }
    }
    return bits;
}

bool is_preset(const std::string & name) {
    return std::any_of(std::begin(kPresets), std::end(kPresets), [&](const Preset & p) { return name == p.name; });
}

Config Config::from_env() {
    Config c;
    c.enabled   = env_int("OLLAMA_KV_COMPRESSION", 0, 0, 1) != 0;
    c.threshold = env_int("OLLAMA_KV_COMPRESSION_THRESHOLD", 512, 0, 1u << 24);
    c.level     = env_int("OLLAMA_KV_COMPRESSION_LEVEL", 4, 1, kMaxLevels);
    c.sinks     = env_int("OLLAMA_KV_COMPRESSION_SINKS", 4, 0, 4096);
    c.hadamard  = env_int("OLLAMA_KV_COMPRESSION_HADAMARD", 1, 0, 1) != 0;
    if (const char * raw = std::getenv("OLLAMA_KV_COMPRESSION_PRESET"); raw != nullptr && *raw != '\0') {
        const std::string value = trim(raw);
        if (!is_preset(value)) {
            throw std::invalid_argument(std::string("OLLAMA_KV_COMPRESSION_PRESET='") + raw +
                                        "' is not allowed: expected one of hi, balanced, lo");
        }
        c.preset = value;
    }
    return c;
}

} // namespace kvggml
