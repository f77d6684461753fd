// The wavelet block codec: docs/FORMAT.md, bit for bit with kvggml/codecs/ (HaarCodec, haar_format.py).
//
// One BlockCodec per (configuration, channel count) owns all its scratch, so encoding and
// decoding allocate nothing per block; it is not thread-safe (use one per thread).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kvggml.h"

namespace kvggml {

constexpr int kFormatMaxLevels = 8;

// KVGGML_OK when params describe valid blocks of `channels` channels, else the error code.
int32_t check_params(const kvggml_codec_params & params, int32_t channels);
// Largest encoded size of one block (every group present); params must be valid.
size_t block_bound(const kvggml_codec_params & params, int32_t channels);

// Section 2 on each of n_rows rows of C values: the Hadamard rotation of every run of R
// channels (R a power of two dividing C; R <= 1 does nothing). Its own inverse.
void hadamard_rows(float * x, int32_t n_rows, int32_t C, int32_t R);

// Section 3 on n-row columns of C channels: t[B][C] in place, tmp the same size as scratch.
void haar_forward(float * t, float * tmp, int32_t B, int32_t L, int32_t C);
void haar_inverse(float * t, float * tmp, int32_t B, int32_t L, int32_t C);

// Parsed block header.
struct BlockHeader {
    int32_t levels, rotation, channels, group;
    uint8_t bits[kFormatMaxLevels + 1];
    size_t  header_bytes;
};

// Header checks of section 7, without reading past `size`.
int32_t parse_header(const uint8_t * data, size_t size, BlockHeader & header);
// Bits of the scales and values (section 6) of the present groups of channels [c0, c1) of a
// valid block: what those channels cost, without the header and presence bitmap they share.
size_t channel_payload_bits(const uint8_t * data, size_t size, int32_t c0, int32_t c1);

class BlockCodec {
public:
    // Throws std::invalid_argument when check_params() fails.
    BlockCodec(const kvggml_codec_params & params, int32_t channels);

    int32_t block_tokens() const { return B; }
    int32_t channels() const { return C; }
    size_t  bound() const { return block_bound(params, C); }

    // x[B][C] float32, finite. Writes at most bound() bytes to out and returns their count.
    size_t encode(const float * x, uint8_t * out);
    // The same from B rows of C finite f16 values, row r at rows + r * row_stride_elems.
    size_t encode_f16(const uint16_t * rows, size_t row_stride_elems, uint8_t * out);

    // Decode a block into out[B][C]. KVGGML_OK, or an error code (out is then unspecified);
    // a block whose header disagrees with this codec's levels, group, rotation or channels
    // is KVGGML_ERROR_ARGUMENT. The header's bits may differ from the codec's.
    int32_t decode(const uint8_t * data, size_t size, float * out);
    // The same, rounded to f16 (nearest even) into rows: row r at out + r * row_stride_elems.
    int32_t decode_f16(const uint8_t * data, size_t size, uint16_t * out, size_t row_stride_elems);

    // The block's dequantized coefficients (section 4, before the inverse transforms): B rows
    // of C values, valid until this codec's next call. rows_coded is how many leading rows can
    // be nonzero (the rows after it are all in dropped subbands). readable_after: bytes after the
    // block that may be read (8 or more spares a copy of its values). KVGGML_OK or an error code.
    int32_t coefficients(const uint8_t * data, size_t size, size_t readable_after, const float *& rows,
                         int32_t & rows_coded);

    // Section 10: the block re-encoded with narrower subbands bits[0..L] (each 0 or 2..16, at
    // most the block's width), from its stored coefficients, into out (at most `size` bytes).
    // Section 11: with channels [c0, c1) (multiples of the group size) narrower than the block,
    // only those channels change, and a width must be 0 or the block's own (c1 < 0: C).
    // Returns the bytes written, or an error code (KVGGML_ERROR_BITS for a width not allowed).
    int64_t coarsen(const uint8_t * data, size_t size, const uint8_t * bits, uint8_t * out, int32_t c0 = 0,
                    int32_t c1 = -1);

private:
    kvggml_codec_params   params;
    int32_t               B, C, N;  // tokens, channels, groups per row
    std::vector<float>    work;     // B * C coefficients
    std::vector<float>    tmp;      // one Haar step; after the forward transform, ref[] of section 5
    std::vector<int32_t>  q;        // quantized values, B * C
    std::vector<uint8_t>  present;  // per group, in group order
    std::vector<uint16_t> scales;   // of the present groups, in group order
    std::vector<uint8_t>  values;   // decode: the value bytes, 8 bytes of zero padding after
    std::vector<uint16_t> group_scale;  // decode: per row and group, its scale (0: absent)

    // Decoded block left in `work`.
    int32_t decode_to_work(const uint8_t * data, size_t size);
    // The checked block's dequantized coefficients left in `work`, scales in group_scale.
    int32_t decode_coefficients(const uint8_t * data, size_t size, BlockHeader & header, size_t readable_after = 0);
    // Quantize one group of G coefficients with scale h and width b into qg; h joins `scales`.
    void quantize_group(const float * y, uint16_t h, int b, int32_t * qg);
    // Section 6: the block's bytes from present[], scales and q with widths bits[0..L].
    size_t pack(const uint8_t * bits, uint8_t * out) const;
};

inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// IEEE binary32 -> binary16, rounding to nearest even like numpy's astype(np.float16)
// (subnormals, overflow to infinity). Inline (an exported function is not inlined under
// -fPIC) and free of data-dependent branches except selects. Relies on the default FP
// rounding mode.
inline uint16_t fp32_to_fp16(float f) {
    const uint32_t x    = float_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t abs  = x & 0x7FFFFFFFu;
    // below 2^-14 the result is subnormal: adding 0.5 (ulp 2^-24, the f16 subnormal step)
    // makes the FPU round at that position, to nearest even
    const float    half      = 0.5f;
    const uint32_t subnormal = float_bits(bits_float(abs) + half) - float_bits(half);
    // normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even
    // (a carry into the exponent is the correct result, up to infinity)
    const uint32_t normal = (abs + ((uint32_t) (15 - 127) << 23) + 0xFFFu + ((abs >> 13) & 1u)) >> 13;
    uint32_t       h      = abs < (113u << 23) ? subnormal : normal;
    h = abs >= (143u << 23) ? (abs > 0x7F800000u ? 0x7E00u : 0x7C00u) : h;  // >= 2^16: inf, or NaN
    return (uint16_t) (sign | h);
}

// y[0, n) = x[0, n) from f16, exact (F16C where the CPU has it).
void f16_to_f32_row(const uint16_t * x, float * y, int64_t n);

// IEEE binary16 -> binary32, exact.
inline float fp16_to_fp32(uint16_t h) {
    const uint32_t magnitude = (uint32_t) (h & 0x7FFFu) << 13;  // exponent and mantissa at f32 positions
    const uint32_t exponent  = magnitude & 0x0F800000u;
    uint32_t       bits      = magnitude + ((127u - 15u) << 23);
    bits += exponent == 0x0F800000u ? (128u - 16u) << 23 : 0u;  // inf/NaN keep an all-ones exponent
    // zero/subnormal: as the normal 2^-14 * (1 + m/1024), then subtract 2^-14 (exact)
    const float normalised = bits_float(exponent == 0 ? bits + (1u << 23) : bits);
    const float value      = exponent == 0 ? normalised - 0x1p-14f : normalised;
    return bits_float(float_bits(value) | (uint32_t) (h & 0x8000u) << 16);
}

} // namespace kvggml
