#include "config.h"

#include <algorithm>
#include <cerrno>
#include <iterator>
#include <sstream>
#include <cstdlib>
#include <utility>
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
    {"fine",     8, {6, 6, 7, 8}},
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

// "A.B.C": level + 1 widths, each 0 or 2..16; `what` names the value in errors.
SubbandBits parse_widths(const std::string & text, uint32_t level, const std::string & what) {
    SubbandBits bits{};
    size_t k = 0, start = 0;
    while (true) {
        const size_t dot = text.find('.', start);
        const std::string part = text.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
        char * end = nullptr;
        const long width = std::strtol(part.c_str(), &end, 10);
        if (part.empty() || *end != '\0' || k > level || width < 0 || width == 1 || width > 16) {
            throw std::invalid_argument(what + ": expected " + std::to_string(level + 1) +
                                        " dot-separated widths (A_L, D_L, ..., D_1), each 0 or 2 to 16");
        }
        bits[k++] = (uint8_t) width;
        if (dot == std::string::npos) {
            break;
        }
        start = dot + 1;
    }
    if (k != level + 1) {
        throw std::invalid_argument(what + ": expected " + std::to_string(level + 1) +
                                    " dot-separated widths (A_L, D_L, ..., D_1), each 0 or 2 to 16");
    }
    return bits;
}

// "AGE:WIDTHS,AGE:WIDTHS": ages increasing, each step's widths at most the one before (the
// first: the widest of the presets') and narrower somewhere.
std::vector<Step> parse_schedule(const char * name, const std::string & raw, const Config & c) {
    const std::string what = std::string(name) + "='" + raw + "'";
    std::vector<Step> steps;
    SubbandBits before = c.widest_bits();
    size_t start = 0;
    while (start <= raw.size()) {
        const size_t comma = raw.find(',', start);
        const std::string item = trim(raw.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
        const size_t colon = item.find(':');
        char * end = nullptr;
        const std::string age_text = item.substr(0, colon);
        const long long age = std::strtoll(age_text.c_str(), &end, 10);
        if (colon == std::string::npos || age_text.empty() || *end != '\0' || age < 0 || age > (1ll << 24)) {
            throw std::invalid_argument(what + " is not a schedule: expected AGE:WIDTHS steps separated by commas, "
                                        "AGE an integer from 0 to 16777216 (tokens), e.g. 2048:6.4.3.3.0,6144:6.4.3.0.0");
        }
        Step step{(uint32_t) age, parse_widths(item.substr(colon + 1), c.level, what + " step '" + item + "'")};
        bool narrower = false;
        for (uint32_t k = 0; k <= c.level; ++k) {
            if (step.bits[k] > before[k]) {
                throw std::invalid_argument(what + " step '" + item + "' widens subband " + std::to_string(k) +
                                            ": each step's widths must be at most the step before's (the first: preset " +
                                            c.preset + (c.layer_presets.empty() ? "'s)" : "'s and the layers', widest)"));
            }
            narrower = narrower || step.bits[k] < before[k];
        }
        if (!narrower || (!steps.empty() && step.age <= steps.back().age)) {
            throw std::invalid_argument(what + " step '" + item + "' must be older and narrower than the step before: "
                                        "ages increasing, widths narrower in at least one subband");
        }
        for (uint32_t k = 0; k <= c.level && c.guidance; ++k) {
            if (step.bits[k] != 0 && step.bits[k] != before[k]) {
                throw std::invalid_argument(what + " step '" + item + "' narrows subband " + std::to_string(k) + " from " +
                                            std::to_string(before[k]) + " to " + std::to_string(step.bits[k]) +
                                            " bits: with OLLAMA_KV_COMPRESSION_GUIDANCE=1 each KV head steps on its "
                                            "own, so a step may only drop subbands: 0 or " +
                                            std::to_string(before[k]));
            }
        }
        steps.push_back(step);
        before = step.bits;
        if (comma == std::string::npos) {
            break;
        }
        start = comma + 1;
    }
    return steps;
}

// Bytes with an optional unit (B, KiB, MiB, GiB, KB, MB, GB), or a fraction of the f16 cache in (0, 1].
Budget parse_budget(const char * name, const std::string & raw) {
    const std::string value = trim(raw);
    const std::string allowed = " expected bytes (an integer, optionally with B, KiB, MiB, GiB, KB, MB or GB) or a "
                                "fraction of the f16 cache above 0 and at most 1 (e.g. 0.25)";
    char * end = nullptr;
    errno = 0;
    if (value.find('.') != std::string::npos) {
        const double fraction = std::strtod(value.c_str(), &end);
        if (value.empty() || *end != '\0' || !(fraction > 0 && fraction <= 1)) {
            throw std::invalid_argument(std::string(name) + "='" + raw + "' is out of range:" + allowed);
        }
        return {0, fraction};
    }
    const unsigned long long number = std::strtoull(value.c_str(), &end, 10);
    const std::string unit = trim(end);
    const std::pair<const char *, uint64_t> units[] = {{"", 1}, {"B", 1}, {"KiB", 1ull << 10}, {"MiB", 1ull << 20},
                                                       {"GiB", 1ull << 30}, {"KB", 1000}, {"MB", 1000000},
                                                       {"GB", 1000000000}};
    for (const auto & [suffix, scale] : units) {
        if (end != value.c_str() && value[0] != '-' && errno == 0 && unit == suffix && number > 0 &&
            number <= UINT64_MAX / scale) {
            return {number * scale, 0};
        }
    }
    throw std::invalid_argument(std::string(name) + "='" + raw + "' is not a size:" + allowed);
}

} // namespace

std::vector<Step> Config::ladder() const {
    if (!schedule.empty() || !budget.set()) {
        return schedule;
    }
    std::vector<Step> steps;
    SubbandBits bits = widest_bits();
    for (uint32_t k = level; k >= 2; --k) {  // D_1, D_2, ..., D_{L-1}: A_L and D_L stay
        bits[k] = 0;
        steps.push_back({UINT32_MAX, bits});
    }
    return steps;
}

const char * const kPresetsAllowed =
    "expected one of fine, hi, balanced, lo, or two of them as K/V, K's preset then V's (e.g. hi/lo)";

namespace {

const Preset * find_preset(const std::string & name) {
    for (const auto & p : kPresets) {
        if (name == p.name) {
            return &p;
        }
    }
    return nullptr;
}

// "hi/lo" -> {"hi", "lo"}; "hi" -> {"hi", "hi"}
std::pair<std::string, std::string> split_preset(const std::string & name) {
    const size_t slash = name.find('/');
    return slash == std::string::npos ? std::pair{name, name} : std::pair{name.substr(0, slash), name.substr(slash + 1)};
}

} // namespace

const std::string & Config::preset_of(uint32_t il) const {
    const auto it = layer_presets.find(il);
    return it == layer_presets.end() ? preset : it->second;
}

SubbandBits Config::subband_bits(bool is_v, uint32_t il) const {
    const auto [k_name, v_name] = split_preset(preset_of(il));
    const Preset * p = find_preset(is_v ? v_name : k_name);
    SubbandBits bits{};
    bits[0] = p->approximation;
    for (uint32_t k = 1; k <= level; ++k) {
        const uint32_t j = level + 1 - k;  // subband k holds D_j
        bits[k] = p->detail[std::min<uint32_t>(j, 4) - 1];
    }
    return bits;
}

SubbandBits Config::widest_bits() const {
    SubbandBits bits{};
    const auto widen = [&](uint32_t il) {
        for (const bool is_v : {false, true}) {
            const SubbandBits role = subband_bits(is_v, il);
            for (size_t k = 0; k < bits.size(); ++k) {
                bits[k] = std::max(bits[k], role[k]);
            }
        }
    };
    widen(UINT32_MAX);  // a layer without a preset of its own
    for (const auto & [il, name] : layer_presets) {
        widen(il);
    }
    return bits;
}

bool is_preset(const std::string & name) {
    const auto [k_name, v_name] = split_preset(name);
    return find_preset(k_name) != nullptr && find_preset(v_name) != nullptr;
}

namespace {

// "5,11=hi 17=hi/lo": LAYERS=PRESET items separated by spaces, each layer named once.
std::map<uint32_t, std::string> parse_layers(const char * name, const std::string & raw) {
    const std::string what = std::string(name) + "='" + raw + "'";
    std::map<uint32_t, std::string> presets;
    std::istringstream items(raw);
    std::string item;
    while (items >> item || presets.empty()) {  // no item at all: one empty item, refused
        const size_t equals = item.find('=');
        std::vector<uint32_t> layers;
        for (size_t from = 0; equals != std::string::npos && from <= equals;) {
            const size_t comma = std::min(item.find(',', from), equals);
            const std::string number = item.substr(from, comma - from);
            if (number.empty() || number.size() > 5 || number.find_first_not_of("0123456789") != std::string::npos ||
                std::stoul(number) > 65535) {
                layers.clear();
                break;
            }
            layers.push_back((uint32_t) std::stoul(number));
            from = comma + 1;
        }
        if (layers.empty()) {
            throw std::invalid_argument(what + " item '" + item + "' is not LAYERS=PRESET: expected items separated by "
                                        "spaces, LAYERS model layer numbers from 0 to 65535 separated by commas "
                                        "(e.g. 5,11=hi 17=hi/lo)");
        }
        const std::string preset = item.substr(equals + 1);
        if (!is_preset(preset)) {
            throw std::invalid_argument(what + " item '" + item + "': preset '" + preset + "' is not allowed: " +
                                        kPresetsAllowed);
        }
        for (const uint32_t layer : layers) {
            if (!presets.emplace(layer, preset).second) {
                throw std::invalid_argument(what + " names layer " + std::to_string(layer) +
                                            " twice: each layer takes one preset");
            }
        }
    }
    return presets;
}

} // namespace

Config Config::from_env() {
    Config c;
    c.enabled   = env_int("OLLAMA_KV_COMPRESSION", 0, 0, 1) != 0;
    c.threshold = env_int("OLLAMA_KV_COMPRESSION_THRESHOLD", 512, 0, 1u << 24);
    c.level     = env_int("OLLAMA_KV_COMPRESSION_LEVEL", 4, 1, kMaxLevels);
    c.sinks     = env_int("OLLAMA_KV_COMPRESSION_SINKS", 4, 0, 4096);
    c.hadamard  = env_int("OLLAMA_KV_COMPRESSION_HADAMARD", 1, 0, 1) != 0;
    c.guidance  = env_int("OLLAMA_KV_COMPRESSION_GUIDANCE", 0, 0, 1) != 0;
    c.direct    = env_int("OLLAMA_KV_COMPRESSION_DIRECT", 1, 0, 1) != 0;
    if (const char * raw = std::getenv("OLLAMA_KV_COMPRESSION_PRESET"); raw != nullptr && *raw != '\0') {
        const std::string value = trim(raw);
        if (!is_preset(value)) {
            throw std::invalid_argument(std::string("OLLAMA_KV_COMPRESSION_PRESET='") + raw + "' is not allowed: " +
                                        kPresetsAllowed);
        }
        c.preset = value;
    }
    if (const char * raw = std::getenv("OLLAMA_KV_COMPRESSION_LAYERS"); raw != nullptr && *raw != '\0') {
        c.layer_presets = parse_layers("OLLAMA_KV_COMPRESSION_LAYERS", raw);
    }
    if (const char * raw = std::getenv("OLLAMA_KV_COMPRESSION_SCHEDULE"); raw != nullptr && *raw != '\0') {
        c.schedule = parse_schedule("OLLAMA_KV_COMPRESSION_SCHEDULE", raw, c);
    }
    if (const char * raw = std::getenv("OLLAMA_KV_COMPRESSION_BUDGET"); raw != nullptr && *raw != '\0') {
        c.budget = parse_budget("OLLAMA_KV_COMPRESSION_BUDGET", raw);
    }
    return c;
}

} // namespace kvggml
