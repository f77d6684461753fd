// Compression settings read from the environment by the library itself, so every
// consumer of the patched libllama (llama-cpp-python, llama-perplexity, llama-bench)
// honours them. Mirrors kvggml/config.py: the bad-value tests of tests/test_config.py (Python)
// and tests/test_tier.py (this code) expect the same messages.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace kvggml {

constexpr int kMaxLevels = 6;

using SubbandBits = std::array<uint8_t, kMaxLevels + 1>;  // A_L, then D_L .. D_1 (level + 1 used)

// One step of the resolution hierarchy: blocks at least `age` tokens older than their
// sequence's newest token are coarsened to `bits` (docs/FORMAT.md, section 10).
struct Step {
    uint32_t    age;
    SubbandBits bits;
};

// OLLAMA_KV_COMPRESSION_BUDGET: bytes, or a fraction of the f16 cache at n_ctx (0: no budget).
struct Budget {
    uint64_t bytes    = 0;
    double   fraction = 0;

    bool set() const { return bytes != 0 || fraction != 0; }
};

struct Config {
    bool     enabled   = false;
    uint32_t threshold = 512;   // most recent tokens per sequence kept exact
    uint32_t level     = 4;     // Haar levels; a block is 2^level tokens
    std::string preset = "balanced";  // a preset, or K's and V's: "hi/lo" (keys are the sensitive half)
    // OLLAMA_KV_COMPRESSION_LAYERS: model layers that take a preset of their own, e.g. a layer whose
    // keys are far more sensitive than the others' (README, "Layers apart")
    std::map<uint32_t, std::string> layer_presets;
    uint32_t sinks     = 4;     // first tokens per sequence kept exact
    bool     hadamard  = true;
    std::vector<Step> schedule;  // OLLAMA_KV_COMPRESSION_SCHEDULE, ages increasing, widths narrowing
    Budget   budget;
    bool     guidance  = false;  // the budget coarsens the least-attended blocks first, not the oldest
    bool     direct    = true;   // attention reads the blocks' coefficients (attention-direct.cpp), not f16 copies

    uint32_t block_tokens() const { return 1u << level; }
    // Model layer il's preset: its own (layer_presets), or the preset.
    const std::string & preset_of(uint32_t il) const;
    // Width per subband of K's (is_v false) or V's preset in model layer il, A_L first then D_L .. D_1
    // (level + 1 entries).
    SubbandBits subband_bits(bool is_v, uint32_t il) const;
    // Per subband the widest of K's and V's, over the preset and every layer's: where a schedule and
    // the budget's ladder start.
    SubbandBits widest_bits() const;
    // The steps a block walks: the schedule, or, with a budget and no schedule, the preset's
    // detail subbands dropped finest first (steps the budget alone takes).
    std::vector<Step> ladder() const;

    // Throws std::invalid_argument naming the variable, the value and the allowed range.
    static Config from_env();
};

// A preset's name (fine, hi, balanced, lo), or two of them as K/V.
bool is_preset(const std::string & name);

// What is_preset allows, for error messages.
extern const char * const kPresetsAllowed;

} // namespace kvggml
