// The wavelet block codec: docs/FORMAT.md, bit for bit with kvggml/codec.py (HaarCodec).
//
// One BlockCodec per (configuration, channel count) owns all its scratch, so encoding and
// decoding allocate nothing per block; it is not thread-safe (use one per thread).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvggml.h"

namespace kvggml {

constexpr int kFormatMaxLevels = 8;

// Parsed block header.
struct BlockHeader {
    int32_t levels, rotation, channels, group;
    uint8_t bits[kFormatMaxLevels + 1];
    size_t  header_bytes;
};

class BlockCodec {
public:
    // Throws std::invalid_argument when params do not describe a valid block of `channels`.
    BlockCodec(const kvggml_codec_params & params, int32_t channels);

    int32_t block_tokens() const { return B; }
    int32_t channels() const { return C; }
    // Largest encoded size of one block.
    size_t bound() const;

    // x[B][C] float32 (finite). Returns the bytes written to out (at least bound() bytes).
    size_t encode(const float * x, uint8_t * out);
    // B rows of f16 values, row r at rows + r * row_stride.
    size_t encode_f16(const uint16_t * rows, size_t row_stride, uint8_t * out);

    // Decode a block of this codec's channel count into out[B][C]. 0 or a KVGGML_ERROR_* code.
    int32_t decode(const uint8_t * data, size_t size, float * out);
    // The same, rounded to f16 rows: row r at out + r * row_stride.
    int32_t decode_f16(const uint8_t * data, size_t size, uint16_t * out, size_t row_stride);

    // Header checks shared by the decoder and the C API (which learns B from the header).
    static int32_t parse_header(const uint8_t * data, size_t size, BlockHeader & header);

private:
    kvggml_codec_params params;
    int32_t B, C, N;  // tokens, channels, groups per row
    std::vector<float>   work;   // B * C coefficients
    std::vector<float>   tmp;    // one Haar step
    std::vector<int32_t>  q;       // quantized values, B * C
    std::vector<uint8_t>  present; // per group, in group order
    std::vector<uint16_t> scales;  // of the present groups, in group order

    // Decoded block left in `work`.
    int32_t decode_to_work(const uint8_t * data, size_t size);
};

uint16_t fp32_to_fp16(float f);
float    fp16_to_fp32(uint16_t h);

} // namespace kvggml
