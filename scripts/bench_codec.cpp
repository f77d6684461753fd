// Decode speed of the C++ block codec (kvggml/csrc/codec.cpp), in ns per decoded element.
//
//   g++ -std=c++17 -O3 -ffp-contract=off -Ikvggml/csrc -Ikvggml/csrc/include scripts/bench_codec.cpp kvggml/csrc/codec.cpp -o build/bench_codec
//   build/bench_codec [rotation] [passes]
//
// Blocks as the tier encodes them for SmolLM2 (192 channels, level 4, the balanced preset,
// groups of 64): smooth channels plus noise, f16 output rows. rotation 1 (the default) is the
// tier's own case, the cache already in llama.cpp's Hadamard basis; 64 rotates in the codec.
// Add -DKVGGML_CODEC_PORTABLE to time the portable code.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "codec.h"

int main(int argc, char ** argv) {
    const int32_t rotation = argc > 1 ? std::atoi(argv[1]) : 1;
    const int     passes   = argc > 2 ? std::atoi(argv[2]) : 100;
    const int32_t C = 192, n_blocks = 480;
    kvggml_codec_params params{};
    params.levels   = 4;
    params.group    = 64;
    params.rotation = rotation;
    const uint8_t balanced[5] = {6, 4, 3, 3, 3};  // A_4, D_4, D_3, D_2, D_1
    std::copy(balanced, balanced + 5, params.bits);
    if (kvggml::check_params(params, C) != KVGGML_OK || passes < 1) {
        std::fprintf(stderr, "usage: %s [rotation: 1 or a power of two dividing %d] [passes >= 1]\n", argv[0], C);
        return 2;
    }
    kvggml::BlockCodec codec(params, C);
    const int32_t B = codec.block_tokens();

    std::mt19937 rng(1);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<std::vector<uint8_t>> blocks(n_blocks);
    std::vector<float> x((size_t) B * C), level(C);
    for (auto & block : blocks) {
        for (auto & l : level) {
            l = 3.0f * normal(rng);
        }
        for (int32_t r = 0; r < B; ++r) {
            for (int32_t c = 0; c < C; ++c) {
                x[(size_t) r * C + c] = level[c] + 0.5f * normal(rng);
            }
        }
        block.resize(codec.bound());
        block.resize(codec.encode(x.data(), block.data()));
    }

    std::vector<uint16_t> out((size_t) B * C);
    const auto t0 = std::chrono::steady_clock::now();
    for (int pass = 0; pass < passes; ++pass) {
        for (const auto & block : blocks) {
            if (codec.decode_f16(block.data(), block.size(), out.data(), C) != KVGGML_OK) {
                std::fprintf(stderr, "a block failed to decode\n");
                return 1;
            }
        }
    }
    const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
    std::printf("rotation %d: %.3f ns per decoded element (%d blocks of %d x %d, %zu bytes each, %d passes)\n",
                rotation, ns / ((double) passes * n_blocks * B * C), n_blocks, B, C, blocks[0].size(), passes);
    return 0;
}
