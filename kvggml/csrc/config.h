// Compression settings read from the environment by the library itself, so every
// consumer of the patched libllama (llama-cpp-python, llama-perplexity, llama-bench)
// honours them. Mirrors kvggml/config.py: the bad-value tests of tests/test_config.py (Python)
// and tests/test_tier.py (this code) expect the same messages.
#pragma once

#include <array>
#include <cstdint>
#include <string>

namespace kvggml {

constexpr int kMaxLevels = 6;

struct Config {
    bool     enabled   = false;
    uint32_t threshold = 512;   // most recent tokens per sequence kept exact
    uint32_t level     = 4;     // Haar levels; a block is 2^level tokens
    std::string preset = "balanced";
    uint32_t sinks     = 4;     // first tokens per sequence kept exact
    bool     hadamard  = true;

    uint32_t block_tokens() const { return 1u << level; }
    // Width per subband, A_L first then D_L .. D_1 (level + 1 entries).
    std::array<uint8_t, kMaxLevels + 1> subband_bits() const;

    // Throws std::invalid_argument naming the variable, the value and the allowed range.
    static Config from_env();
};

// One of the preset names: hi, balanced, lo.
bool is_preset(const std::string & name);

} // namespace kvggml
