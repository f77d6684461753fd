// Fuzz target: the block decoder (docs/FORMAT.md, sections 6-7) and coarsening (section 10).
// The input is one encoded block; seeds are the golden vectors (tests/vectors). Beyond "no
// memory error", it checks what the format promises of a block the decoder accepts: it
// decodes to finite floats, f16 and f32 decoding agree on the token count, and it can be
// coarsened (to its own widths, and with its finest subband dropped) into a block that is no
// longer and decodes again.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kvggml.h"

namespace {

void require(bool ok, const char * what) {
    if (!ok) {
        std::fprintf(stderr, "fuzz_block: %s\n", what);
        std::abort();
    }
}

constexpr size_t kHeader = 8;                // magic, version, L, log2(R), C (u16), G (u16)
constexpr size_t kMaxValues = size_t(1) << 20;  // B * C above this is skipped: memory, not coverage

// Coarsen to bits, decode the result, and check it: returns its size, or -1 when refused.
int64_t coarsen_and_decode(const uint8_t * data, size_t size, int32_t channels, const std::vector<uint8_t> & bits,
                           std::vector<float> & out) {
    std::vector<uint8_t> coarse(size);
    const int64_t n = kvggml_codec_coarsen_block(data, size, channels, bits.data(), bits.size(), coarse.data(),
                                                 coarse.size());
    if (n < 0) {
        return -1;
    }
    require((size_t) n <= size, "a coarsened block is longer than the block");
    require(kvggml_codec_decode_block(coarse.data(), (size_t) n, channels, out.data(), out.size(), nullptr) ==
                KVGGML_OK,
            "a coarsened block does not decode");
    return n;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int *, char ***) { return 0; }

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    // The channel count the block claims: the decoder needs the caller's, and rejects a mismatch.
    const int32_t channels = size >= kHeader ? data[4] | data[5] << 8 : 1;
    const uint32_t levels = size > 2 ? data[2] : 0;
    const size_t tokens = levels <= 8 ? size_t(1) << levels : 1;
    if (channels == 0 || tokens * channels > kMaxValues) {
        require(kvggml_codec_decode_block(data, size, channels, nullptr, 0, nullptr) != KVGGML_OK,
                "a block with no room to decode into was accepted");
        return 0;
    }
    std::vector<float> out(tokens * channels);
    int32_t n_tokens = 0;
    if (kvggml_codec_decode_block(data, size, channels, out.data(), out.size(), &n_tokens) != KVGGML_OK) {
        return 0;
    }
    require((size_t) n_tokens == tokens, "the decoded token count is not 2^L");
    for (const float v : out) {
        require(std::isfinite(v), "an accepted block decodes to a value that is not finite");
    }
    std::vector<uint16_t> half(out.size());
    int32_t n_half = 0;
    require(kvggml_codec_decode_block_f16(data, size, channels, half.data(), channels, half.size(), &n_half) ==
                    KVGGML_OK && n_half == n_tokens,
            "f16 decoding disagrees with f32 decoding");

    std::vector<uint8_t> bits(data + kHeader, data + kHeader + levels + 1);
    require(coarsen_and_decode(data, size, channels, bits, out) == (int64_t) size,
            "coarsening a block to its own widths changed its size");
    for (size_t k = bits.size(); k-- > 1;) {  // drop the finest subband still coded
        if (bits[k] != 0) {
            bits[k] = 0;
            require(coarsen_and_decode(data, size, channels, bits, out) >= 0, "dropping a subband was refused");
            break;
        }
    }
    return 0;
}
