// The wavelet block codec of docs/FORMAT.md. Every float operation below is written in
// the order the spec gives (compiled with -ffp-contract=off), so the bytes and decoded
// values equal the numpy reference's (tests/test_c_codec.py, tests/vectors/).

#include "codec.h"

// x86-64 builds carry AVX-512 VBMI, AVX2 and F16C kernels beside the portable code and pick them
// at run time, so one library runs on any x86-64 CPU; all give the same bits. -DKVGGML_CODEC_PORTABLE
// builds the portable code alone, -DKVGGML_CODEC_NO_AVX512 leaves out AVX-512 (the tests check each).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(KVGGML_CODEC_PORTABLE)
#include <immintrin.h>
#define KVGGML_X86_KERNELS 1
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace kvggml {

// The decoder reads the value stream (little-endian, section 6) in 8-byte words.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "kvggml's codec needs a little-endian host");

namespace {

constexpr uint8_t kMagic    = 0x57;  // 'W'
constexpr uint8_t kVersion  = 1;
constexpr int     kMaxBits  = 16;
constexpr float   kSqrtHalf = 0x1.6a09e6p-1f;  // (float)(1/sqrt(2))
constexpr float   kF16Max   = 65504.0f;

#if KVGGML_X86_KERNELS
struct CpuFeatures {
    bool avx2, f16c, vbmi;
};

CpuFeatures cpu_features() {
    __builtin_cpu_init();  // this runs among the library's static constructors, maybe before libgcc's
#ifdef KVGGML_CODEC_NO_AVX512
    const bool vbmi = false;  // the AVX2 kernels alone, for tests on CPUs that have AVX-512
#else
    const bool vbmi = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi");
#endif
    return {__builtin_cpu_supports("avx2") != 0, __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c"), vbmi};
}

const CpuFeatures kCpu = cpu_features();
#endif

// Subband k's rows in the transformed block (Mallat order, section 3).
int32_t rows_of(int32_t B, int32_t L, int32_t k) { return k == 0 ? B >> L : B >> (L + 1 - k); }
int32_t first_row(int32_t B, int32_t L, int32_t k) { return k == 0 ? 0 : B >> (L + 1 - k); }

} // namespace

// Section 3 along rows (tokens), every channel at once: contiguous inner loops over channels.
void haar_forward(float * t, float * tmp, int32_t B, int32_t L, int32_t C) {
    for (int32_t l = 1; l <= L; ++l) {
        const int32_t n = B >> (l - 1);
        for (int32_t i = 0; i < n / 2; ++i) {
            const float * x0 = t + (size_t) (2 * i) * C;
            const float * x1 = x0 + C;
            float * a = tmp + (size_t) i * C;
            float * d = tmp + (size_t) (n / 2 + i) * C;
            for (int32_t c = 0; c < C; ++c) {
                a[c] = (x0[c] + x1[c]) * kSqrtHalf;
                d[c] = (x0[c] - x1[c]) * kSqrtHalf;
            }
        }
        std::memcpy(t, tmp, sizeof(float) * (size_t) n * C);
    }
}

// Without copies: level l writes its n rows to t when l is odd, to tmp when even, so level 1
// ends in t. Its approximations come from the level before (t for l = L), its details from t's
// rows [n/2, n), which no earlier level wrote (they wrote n/2 rows or fewer). Writing into t
// while reading t is safe: output rows 2i, 2i+1 are never detail rows still to be read, and
// when l = L is odd its one pair of rows is read before it is written, channel by channel.
void haar_inverse(float * t, float * tmp, int32_t B, int32_t L, int32_t C) {
    const float * approx = t;
    for (int32_t l = L; l >= 1; --l) {
        const int32_t n = B >> (l - 1);
        float * out = l % 2 ? t : tmp;
        for (int32_t i = 0; i < n / 2; ++i) {
            const float * a = approx + (size_t) i * C;
            const float * d = t + (size_t) (n / 2 + i) * C;
            float * e0 = out + (size_t) (2 * i) * C;
            float * e1 = e0 + C;
            for (int32_t c = 0; c < C; ++c) {
                const float ac = a[c], dc = d[c];
                e0[c] = (ac + dc) * kSqrtHalf;
                e1[c] = (ac - dc) * kSqrtHalf;
            }
        }
        approx = out;
    }
}

namespace {

// LSB-first bit stream (section 6).
struct BitWriter {
    uint8_t * out;
    size_t    pos = 0;  // bytes written
    uint64_t  acc = 0;
    int       n   = 0;  // bits in acc, < 8 between calls

    void put(uint32_t value, int bits) {
        acc |= (uint64_t) (value & ((1u << bits) - 1u)) << n;
        n += bits;
        while (n >= 8) {
            out[pos++] = (uint8_t) acc;
            acc >>= 8;
            n -= 8;
        }
    }

    void flush() {
        if (n > 0) {
            out[pos++] = (uint8_t) acc;  // the high bits are 0: padding
            acc = 0;
            n   = 0;
        }
    }
};

bool bit(const uint8_t * bytes, size_t i) { return (bytes[i / 8] >> (i % 8)) & 1; }

uint16_t read_u16(const uint8_t * p) { return (uint16_t) (p[0] | (p[1] << 8)); }

// The 1 bits among bits [from, to): whole bytes at a time where they lie in the range.
size_t count_bits(const uint8_t * bytes, size_t from, size_t to) {
    size_t n = 0, i = from;
    for (; i < to && i % 8; ++i) {
        n += bit(bytes, i);
    }
    for (; i + 8 <= to; i += 8) {
        n += (size_t) __builtin_popcount(bytes[i / 8]);
    }
    for (; i < to; ++i) {
        n += bit(bytes, i);
    }
    return n;
}

// Decodes n values of one group (section 4): b-bit two's complement from bit `bitpos` of src
// (8 readable bytes past the last value), each times d, into y; each value is one 8-byte load
// and a shift. Returns nonzero if a value is -2^(b-1), which the encoder never produces.
// kBits = b lets the compiler fix every shift; kBits = 0 serves any width.
template <int kBits>
uint32_t unpack_group(const uint8_t * src, size_t bitpos, int b, int32_t n, float d, float * y) {
    if constexpr (kBits != 0) {
        b = kBits;
    }
    const uint32_t mask = (1u << b) - 1u, sign_bit = 1u << (b - 1);
    const int      extend = 32 - b;
    uint32_t       never_produced = 0;
    for (int32_t j = 0; j < n; ++j, bitpos += b) {
        uint64_t word;
        std::memcpy(&word, src + bitpos / 8, 8);
        const uint32_t raw = (uint32_t) (word >> (bitpos % 8)) & mask;
        never_produced |= raw == sign_bit;
        y[j] = (float) ((int32_t) (raw << extend) >> extend) * d;
    }
    return never_produced;
}

// Decodes n_groups consecutive present groups of G values (section 4): group i's values follow
// group i - 1's in the bit stream, its scale is the f16 at scales + 2 * i, its output y + i * G.
// One call serves a run of groups, so the SIMD kernels below set up their constants once.
using UnpackGroups = uint32_t (*)(const uint8_t * src, size_t bitpos, int b, int32_t G, int32_t n_groups,
                                  const uint8_t * scales, float * y);

template <int kBits>
uint32_t unpack_groups(const uint8_t * src, size_t bitpos, int b, int32_t G, int32_t n_groups, const uint8_t * scales,
                       float * y) {
    uint32_t never_produced = 0;
    for (int32_t i = 0; i < n_groups; ++i) {
        never_produced |= unpack_group<kBits>(src, bitpos + (size_t) i * G * b, b, G,
                                              fp16_to_fp32(read_u16(scales + 2 * i)), y + (size_t) i * G);
    }
    return never_produced;
}

#if KVGGML_X86_KERNELS
// unpack_groups<kBits> eight lanes at a time: values 0-3 of an 8-byte word sit in its low 32
// bits and values 4-7 in the 32 bits from bit 4b (4b + b <= 32 for b <= 8), so each lane
// shifts one of the two by 0, b, 2b or 3b. The integers and products are the scalar ones.
template <int kBits>
__attribute__((target("avx2"))) uint32_t unpack_groups_avx2(const uint8_t * src, size_t bitpos, int b, int32_t G,
                                                            int32_t n_groups, const uint8_t * scales, float * y) {
    if (bitpos % 8 != 0 || (size_t) G * kBits % 8 != 0) {
        return unpack_groups<kBits>(src, bitpos, b, G, n_groups, scales, y);
    }
    const __m256i shifts   = _mm256_setr_epi32(0, kBits, 2 * kBits, 3 * kBits, 0, kBits, 2 * kBits, 3 * kBits);
    const __m256i mask     = _mm256_set1_epi32((1 << kBits) - 1);
    const __m256i sign_bit = _mm256_set1_epi32(1 << (kBits - 1));
    __m256i never_produced = _mm256_setzero_si256();
    uint32_t tails = 0;
    for (int32_t i = 0; i < n_groups; ++i, bitpos += (size_t) G * kBits, y += G) {
        const float  d     = fp16_to_fp32(read_u16(scales + 2 * i));
        const __m256 scale = _mm256_set1_ps(d);
        int32_t j = 0;
        for (; j + 8 <= G; j += 8) {
            uint64_t word;
            std::memcpy(&word, src + bitpos / 8 + (size_t) j * kBits / 8, 8);
            const int lo = (int) (uint32_t) word, hi = (int) (uint32_t) (word >> (4 * kBits));
            const __m256i halves = _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi);
            const __m256i raw = _mm256_and_si256(_mm256_srlv_epi32(halves, shifts), mask);
            never_produced = _mm256_or_si256(never_produced, _mm256_cmpeq_epi32(raw, sign_bit));
            const __m256i v = _mm256_srai_epi32(_mm256_slli_epi32(raw, 32 - kBits), 32 - kBits);
            _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_cvtepi32_ps(v), scale));
        }
        tails |= unpack_group<kBits>(src, bitpos + (size_t) j * kBits, b, G - j, d, y + j);
    }
    return tails | (uint32_t) !_mm256_testz_si256(never_produced, never_produced);
}

// Lane i's byte j: byte kBits * i + j of the 8 * kBits that hold 64 values (any byte for j >= kBits).
template <int kBits> constexpr std::array<uint8_t, 64> kVbmiGather = [] {
    std::array<uint8_t, 64> a{};
    for (int i = 0; i < 64; ++i) {
        a[i] = (uint8_t) ((i / 8) * kBits + (i % 8 < kBits ? i % 8 : 0));
    }
    return a;
}();

// Byte j of a lane: the first bit of the lane's value j, kBits * j.
template <int kBits> constexpr uint64_t kVbmiOffsets = [] {
    uint64_t offsets = 0;
    for (int j = 0; j < 8; ++j) {
        offsets |= (uint64_t) (j * kBits) << (8 * j);
    }
    return offsets;
}();

// y[0, 16) = the 16 signed bytes times scale.
__attribute__((target("avx512f"))) inline void store_scaled(__m128i bytes, __m512 scale, float * y) {
    _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), scale));
}

// unpack_groups<kBits> 64 values at a time with AVX-512 VBMI: the kBits bytes that hold eight values
// go to each 64-bit lane (vpermb), each value's bits to a byte of its lane (vpmultishiftqb), then
// the bytes are sign-extended, widened and scaled. The integers and products are the scalar ones.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on its own intrinsics (GCC bug 105593)
template <int kBits>
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) uint32_t unpack_groups_vbmi(const uint8_t * src, size_t bitpos,
                                                                                    int b, int32_t G, int32_t n_groups,
                                                                                    const uint8_t * scales, float * y) {
    if (bitpos % 8 != 0 || G % 64 != 0) {
        return unpack_groups_avx2<kBits>(src, bitpos, b, G, n_groups, scales, y);
    }
    const __m512i   lanes    = _mm512_loadu_si512(kVbmiGather<kBits>.data());
    const __m512i   shifts   = _mm512_set1_epi64((long long) kVbmiOffsets<kBits>);
    const __m512i   mask     = _mm512_set1_epi8((char) ((1 << kBits) - 1));
    const __m512i   sign_bit = _mm512_set1_epi8((char) (1 << (kBits - 1)));
    const __mmask64 bytes    = kBits == 8 ? ~0ull : (1ull << (8 * kBits)) - 1;
    __mmask64       never_produced = 0;
    for (int32_t i = 0; i < n_groups; ++i, y += G) {
        const __m512 scale = _mm512_set1_ps(fp16_to_fp32(read_u16(scales + 2 * i)));
        for (int32_t j = 0; j < G; j += 64, bitpos += 64 * kBits) {
            const __m512i packed = _mm512_maskz_loadu_epi8(bytes, src + bitpos / 8);
            const __m512i raw =
                _mm512_and_si512(_mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(lanes, packed)), mask);
            never_produced |= _mm512_cmpeq_epi8_mask(raw, sign_bit);
            const __m512i v = _mm512_sub_epi8(_mm512_xor_si512(raw, sign_bit), sign_bit);  // kBits-bit two's complement
            store_scaled(_mm512_castsi512_si128(v), scale, y + j);
            store_scaled(_mm512_extracti32x4_epi32(v, 1), scale, y + j + 16);
            store_scaled(_mm512_extracti32x4_epi32(v, 2), scale, y + j + 32);
            store_scaled(_mm512_extracti32x4_epi32(v, 3), scale, y + j + 48);
        }
    }
    return never_produced != 0;
}
#pragma GCC diagnostic pop
#endif

template <int kBits> UnpackGroups fastest_unpacker() {
#if KVGGML_X86_KERNELS
    if (kCpu.vbmi) {
        return unpack_groups_vbmi<kBits>;
    }
    if (kCpu.avx2) {
        return unpack_groups_avx2<kBits>;
    }
#endif
    return unpack_groups<kBits>;
}

UnpackGroups unpacker(int b) {
    switch (b) {
        case 2: return fastest_unpacker<2>();
        case 3: return fastest_unpacker<3>();
        case 4: return fastest_unpacker<4>();
        case 5: return fastest_unpacker<5>();
        case 6: return fastest_unpacker<6>();
        case 7: return fastest_unpacker<7>();
        case 8: return fastest_unpacker<8>();
        default: return unpack_groups<0>;
    }
}

// Every scale finite and positive (section 7); the first one that is not names the error.
int32_t check_scales(const uint8_t * scale_bytes, size_t n) {
    uint32_t any_bad = 0;  // one pass without branches first: blocks are read at every decode step
    for (size_t s = 0; s < n; ++s) {
        const uint16_t v = read_u16(scale_bytes + 2 * s);
        any_bad |= (v & 0x7C00u) == 0x7C00u || v == 0 || (v & 0x8000u);
    }
    for (size_t s = 0; any_bad && s < n; ++s) {
        const uint16_t v = read_u16(scale_bytes + 2 * s);
        if ((v & 0x7C00u) == 0x7C00u) {
            return KVGGML_ERROR_SCALE_NONFINITE;
        }
        if (v == 0 || (v & 0x8000u)) {
            return KVGGML_ERROR_SCALE_NONPOSITIVE;
        }
    }
    return KVGGML_OK;
}

float group_max(const float * y, int32_t G) {
    float amax = 0.0f;
    for (int32_t j = 0; j < G; ++j) {
        amax = std::max(amax, std::fabs(y[j]));
    }
    return amax;
}

// Section 4, step 3: the smallest f16 >= amax / qmax of width b, saturated at 65504.
uint16_t scale_for(float amax, int b) {
    const float m = std::fmin(amax / (float) ((1 << (b - 1)) - 1), kF16Max);
    uint16_t h = fp32_to_fp16(m);
    if (fp16_to_fp32(h) < m) {
        ++h;
    }
    return h;
}

} // namespace

// Section 2. The butterflies of one stage touch disjoint pairs, so visiting them span by span
// (instead of testing j & h) gives the same values and a contiguous inner loop. With the cache
// in llama.cpp's Hadamard basis (tier.cpp) the tier's blocks need no rotation here.
void hadamard_rows(float * x, int32_t n_rows, int32_t C, int32_t R) {
    if (R <= 1) {
        return;
    }
    const float r = (float) (1.0 / std::sqrt((double) R));
    for (int32_t row = 0; row < n_rows; ++row) {
        for (int32_t run = 0; run < C; run += R) {
            float * v = x + (size_t) row * C + run;
            for (int32_t h = 1; h < R; h *= 2) {
                for (int32_t span = 0; span < R; span += 2 * h) {
                    float * lo = v + span;
                    float * hi = lo + h;
                    for (int32_t j = 0; j < h; ++j) {
                        const float a = lo[j], b = hi[j];
                        lo[j] = a + b;
                        hi[j] = a - b;
                    }
                }
            }
            for (int32_t j = 0; j < R; ++j) {
                v[j] = v[j] * r;
            }
        }
    }
}

int32_t check_params(const kvggml_codec_params & p, int32_t C) {
    if (p.levels < 0 || p.levels > kFormatMaxLevels) {
        return KVGGML_ERROR_LEVELS;
    }
    if (C < 1 || C > 0xFFFF || p.group < 1 || p.group > 0xFFFF || C % p.group != 0 || p.rotation < 1 ||
        (p.rotation & (p.rotation - 1)) != 0 || C % p.rotation != 0) {
        return KVGGML_ERROR_SIZES;
    }
    for (int32_t k = 0; k <= p.levels; ++k) {
        if (p.bits[k] == 1 || p.bits[k] > kMaxBits) {
            return KVGGML_ERROR_BITS;
        }
    }
    if (!std::isfinite(p.threshold) || p.threshold < 0) {
        return KVGGML_ERROR_ARGUMENT;
    }
    return KVGGML_OK;
}

size_t block_bound(const kvggml_codec_params & p, int32_t C) {
    const int32_t B = 1 << p.levels;
    size_t groups = 0, value_bits = 0;
    for (int32_t k = 0; k <= p.levels; ++k) {
        if (p.bits[k]) {
            groups += (size_t) rows_of(B, p.levels, k) * (C / p.group);
            value_bits += (size_t) rows_of(B, p.levels, k) * C * p.bits[k];
        }
    }
    return 9 + p.levels + (groups + 7) / 8 + 2 * groups + (value_bits + 7) / 8;
}

size_t channel_payload_bits(const uint8_t * data, size_t size, int32_t c0, int32_t c1) {
    BlockHeader h;
    if (parse_header(data, size, h) != KVGGML_OK) {
        return 0;
    }
    const int32_t B = 1 << h.levels, N = h.channels / h.group;
    const uint8_t * bitmap = data + h.header_bytes;
    size_t i = 0, n_bits = 0;
    for (int32_t k = 0; k <= h.levels; ++k) {
        for (int32_t r = 0; r < rows_of(B, h.levels, k) && h.bits[k]; ++r) {
            for (int32_t g = 0; g < N; ++g, ++i) {
                if (g * h.group >= c0 && g * h.group < c1 && bit(bitmap, i)) {
                    n_bits += 16 + (size_t) h.group * h.bits[k];
                }
            }
        }
    }
    return n_bits;
}

int32_t parse_header(const uint8_t * data, size_t size, BlockHeader & h) {
    if (data == nullptr || size < 8) {
        return KVGGML_ERROR_TRUNCATED_HEADER;
    }
    if (data[0] != kMagic) {
        return KVGGML_ERROR_MAGIC;
    }
    if (data[1] != kVersion) {
        return KVGGML_ERROR_VERSION;
    }
    h.levels = data[2];
    if (h.levels > kFormatMaxLevels) {
        return KVGGML_ERROR_LEVELS;
    }
    if (size < (size_t) (9 + h.levels)) {
        return KVGGML_ERROR_TRUNCATED_HEADER;
    }
    const int log2r = data[3];
    h.channels = read_u16(data + 4);
    h.group    = read_u16(data + 6);
    if (h.channels == 0 || h.group == 0 || h.channels % h.group != 0 || log2r > 15 ||
        h.channels % (1 << log2r) != 0) {
        return KVGGML_ERROR_SIZES;
    }
    h.rotation = 1 << log2r;
    for (int32_t k = 0; k <= h.levels; ++k) {
        h.bits[k] = data[8 + k];
        if (h.bits[k] == 1 || h.bits[k] > kMaxBits) {
            return KVGGML_ERROR_BITS;
        }
    }
    h.header_bytes = 9 + h.levels;
    return KVGGML_OK;
}

BlockCodec::BlockCodec(const kvggml_codec_params & p, int32_t channels) : params(p), C(channels) {
    if (check_params(p, channels) != KVGGML_OK) {
        throw std::invalid_argument("kvggml codec: invalid parameters for " + std::to_string(channels) + " channels");
    }
    B = 1 << p.levels;
    N = C / p.group;
    work.resize((size_t) B * C);
    tmp.resize((size_t) B * C);
    q.resize((size_t) B * C);
    present.resize((size_t) B * N);
    scales.reserve((size_t) B * N);
    group_scale.resize((size_t) B * N);
}

size_t BlockCodec::encode_f16(const uint16_t * rows, size_t row_stride_elems, uint8_t * out) {
    for (int32_t r = 0; r < B; ++r) {
        const uint16_t * row = rows + r * row_stride_elems;
        float * dst = work.data() + (size_t) r * C;
        for (int32_t c = 0; c < C; ++c) {
            dst[c] = fp16_to_fp32(row[c]);
        }
    }
    return encode(work.data(), out);
}

size_t BlockCodec::encode(const float * x, uint8_t * out) {
    const int32_t L = params.levels, G = params.group;
    if (x != work.data()) {
        std::memcpy(work.data(), x, sizeof(float) * work.size());
    }
    hadamard_rows(work.data(), B, C, params.rotation);
    haar_forward(work.data(), tmp.data(), B, L, C);

    // section 5: the level of each group, max |A_L| over the approximation rows
    float * ref = tmp.data();  // free again after the transform
    for (int32_t g = 0; g < N; ++g) {
        float m = 0.0f;
        for (int32_t r = 0; r < rows_of(B, L, 0); ++r) {
            m = std::max(m, group_max(work.data() + (size_t) r * C + g * G, G));
        }
        ref[g] = m;
    }

    // presence, scale and values of every coded group, in group order (section 4)
    size_t n_groups = 0;
    scales.clear();  // capacity B * N, reserved once
    for (int32_t k = 0; k <= L; ++k) {
        const int b = params.bits[k];
        if (b == 0) {
            continue;
        }
        for (int32_t r = first_row(B, L, k); r < first_row(B, L, k) + rows_of(B, L, k); ++r) {
            for (int32_t g = 0; g < N; ++g, ++n_groups) {
                const float * y = work.data() + (size_t) r * C + g * G;
                const float amax = group_max(y, G);
                present[n_groups] = k == 0 ? amax > 0.0f : amax > params.threshold * ref[g];
                if (present[n_groups]) {
                    quantize_group(y, scale_for(amax, b), b, q.data() + (size_t) r * C + g * G);
                }
            }
        }
    }
    return pack(params.bits, out);
}

void BlockCodec::quantize_group(const float * y, uint16_t h, int b, int32_t * qg) {
    const float qmax = (float) ((1 << (b - 1)) - 1);
    const float d = fp16_to_fp32(h);
    scales.push_back(h);
    for (int32_t j = 0; j < params.group; ++j) {
        qg[j] = (int32_t) std::fmin(std::fmax(std::rint(y[j] / d), -qmax), qmax);
    }
}

size_t BlockCodec::pack(const uint8_t * bits, uint8_t * out) const {
    const int32_t L = params.levels, G = params.group;
    out[0] = kMagic;
    out[1] = kVersion;
    out[2] = (uint8_t) L;
    int log2r = 0;
    while ((1 << log2r) < params.rotation) {
        ++log2r;
    }
    out[3] = (uint8_t) log2r;
    out[4] = (uint8_t) (C & 0xFF);
    out[5] = (uint8_t) (C >> 8);
    out[6] = (uint8_t) (G & 0xFF);
    out[7] = (uint8_t) (G >> 8);
    size_t n_groups = 0;
    for (int32_t k = 0; k <= L; ++k) {
        out[8 + k] = bits[k];
        n_groups += bits[k] ? (size_t) rows_of(B, L, k) * N : 0;
    }
    size_t pos = 9 + L;

    const size_t bitmap_bytes = (n_groups + 7) / 8;
    std::memset(out + pos, 0, bitmap_bytes);
    for (size_t i = 0; i < n_groups; ++i) {
        out[pos + i / 8] |= (uint8_t) (present[i] << (i % 8));
    }
    pos += bitmap_bytes;
    for (const uint16_t h : scales) {
        out[pos++] = (uint8_t) (h & 0xFF);
        out[pos++] = (uint8_t) (h >> 8);
    }
    BitWriter w{out + pos};
    size_t i = 0;
    for (int32_t k = 0; k <= L; ++k) {
        const int b = bits[k];
        if (b == 0) {
            continue;
        }
        for (int32_t r = first_row(B, L, k); r < first_row(B, L, k) + rows_of(B, L, k); ++r) {
            for (int32_t g = 0; g < N; ++g, ++i) {
                if (!present[i]) {
                    continue;
                }
                const int32_t * qg = q.data() + (size_t) r * C + g * G;
                for (int32_t j = 0; j < G; ++j) {
                    w.put((uint32_t) qg[j], b);
                }
            }
        }
    }
    w.flush();
    return pos + w.pos;
}

int64_t BlockCodec::coarsen(const uint8_t * data, size_t size, const uint8_t * bits, uint8_t * out, int32_t c0,
                            int32_t c1) {
    BlockHeader h;
    if (const int32_t rc = decode_coefficients(data, size, h); rc != KVGGML_OK) {
        return rc;
    }
    const int32_t L = params.levels, G = params.group;
    if (c1 < 0) {
        c1 = C;
    }
    const bool whole = c0 == 0 && c1 == C;
    if (c0 < 0 || c1 > C || c0 >= c1 || c0 % G || c1 % G) {
        return KVGGML_ERROR_ARGUMENT;
    }
    uint8_t widths[kFormatMaxLevels + 1] = {};
    for (int32_t k = 0; k <= L; ++k) {
        // a channel range can only drop a subband: its width is shared by every channel
        if (bits[k] == 1 || bits[k] > h.bits[k] || (!whole && bits[k] != 0 && bits[k] != h.bits[k])) {
            return KVGGML_ERROR_BITS;
        }
        widths[k] = bits[k];
    }
    // section 10: a subband of the same width keeps its groups; a narrower one is quantized
    // again from its decoded coefficients, present where they are not all zero. Section 11: a
    // subband dropped from a channel range keeps its width elsewhere, and becomes width 0 when no
    // group of it is left.
    const auto in_range = [&](int32_t g) { return g * G >= c0 && g * G < c1; };
    for (int32_t k = 0; k <= L && !whole; ++k) {
        for (int32_t r = first_row(B, L, k); r < first_row(B, L, k) + rows_of(B, L, k) && bits[k] == 0; ++r) {
            for (int32_t g = 0; g < N; ++g) {
                if (!in_range(g) && group_scale[(size_t) r * N + g] != 0) {
                    widths[k] = h.bits[k];  // a group outside the range keeps the subband
                }
            }
        }
    }
    size_t n_groups = 0;
    scales.clear();
    for (int32_t k = 0; k <= L; ++k) {
        const int b = widths[k];
        if (b == 0) {
            continue;
        }
        for (int32_t r = first_row(B, L, k); r < first_row(B, L, k) + rows_of(B, L, k); ++r) {
            for (int32_t g = 0; g < N; ++g, ++n_groups) {
                const float * y = work.data() + (size_t) r * C + g * G;
                const uint16_t kept = group_scale[(size_t) r * N + g];
                const bool dropped = bits[k] == 0 && in_range(g);
                const float amax = b == h.bits[k] ? 0.0f : group_max(y, G);
                present[n_groups] = !dropped && (b == h.bits[k] ? kept != 0 : amax > 0.0f);
                if (present[n_groups]) {
                    quantize_group(y, b == h.bits[k] ? kept : scale_for(amax, b), b, q.data() + (size_t) r * C + g * G);
                }
            }
        }
    }
    return (int64_t) pack(widths, out);
}

int32_t BlockCodec::decode(const uint8_t * data, size_t size, float * out) {
    const int32_t rc = decode_to_work(data, size);
    if (rc == KVGGML_OK) {
        std::memcpy(out, work.data(), sizeof(float) * work.size());
    }
    return rc;
}

namespace {

// n values from float to f16 (nearest even) or back (exact). The x86 F16C instructions round
// exactly as fp32_to_fp16 does (IEEE, subnormals and overflow included) at a tenth of the cost:
// they are used where the CPU has them, decided once at run time.
inline uint16_t convert(float x) { return fp32_to_fp16(x); }
inline float convert(uint16_t h) { return fp16_to_fp32(h); }

template <class From, class To> void convert_portable(const From * x, To * y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        y[i] = convert(x[i]);
    }
}

#if KVGGML_X86_KERNELS
__attribute__((target("avx,f16c"))) inline void convert8(const float * x, uint16_t * y) {
    _mm_storeu_si128((__m128i *) y, _mm256_cvtps_ph(_mm256_loadu_ps(x), _MM_FROUND_TO_NEAREST_INT));
}

__attribute__((target("avx,f16c"))) inline void convert8(const uint16_t * x, float * y) {
    _mm256_storeu_ps(y, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) x)));
}

template <class From, class To>
__attribute__((target("avx,f16c"))) void convert_f16c(const From * x, To * y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        convert8(x + i, y + i);
    }
    convert_portable(x + i, y + i, n - i);
}

const auto rows_to_f16  = kCpu.f16c ? convert_f16c<float, uint16_t> : convert_portable<float, uint16_t>;
const auto row_from_f16 = kCpu.f16c ? convert_f16c<uint16_t, float> : convert_portable<uint16_t, float>;
#else
const auto rows_to_f16  = convert_portable<float, uint16_t>;
const auto row_from_f16 = convert_portable<uint16_t, float>;
#endif

} // namespace

void f16_to_f32_row(const uint16_t * x, float * y, int64_t n) {
    row_from_f16(x, y, n);
}

int32_t BlockCodec::decode_f16(const uint8_t * data, size_t size, uint16_t * out, size_t row_stride_elems) {
    const int32_t rc = decode_to_work(data, size);
    if (rc != KVGGML_OK) {
        return rc;
    }
    for (int32_t r = 0; r < B; ++r) {
        rows_to_f16(work.data() + (size_t) r * C, out + r * row_stride_elems, C);
    }
    return KVGGML_OK;
}

int32_t BlockCodec::coefficients(const uint8_t * data, size_t size, size_t readable_after, const float *& rows,
                                 int32_t & rows_coded) {
    BlockHeader h;
    const int32_t rc = decode_coefficients(data, size, h, readable_after);
    rows_coded = 0;
    for (int32_t k = 0; k <= h.levels && rc == KVGGML_OK; ++k) {
        if (h.bits[k]) {
            rows_coded = first_row(B, h.levels, k) + rows_of(B, h.levels, k);
        }
    }
    rows = work.data();
    return rc;
}

int32_t BlockCodec::decode_to_work(const uint8_t * data, size_t size) {
    BlockHeader h;
    if (const int32_t rc = decode_coefficients(data, size, h); rc != KVGGML_OK) {
        return rc;
    }
    haar_inverse(work.data(), tmp.data(), B, h.levels, C);
    hadamard_rows(work.data(), B, C, h.rotation);
    return KVGGML_OK;
}

// Every length is checked (section 7) before the bytes it covers are read.
int32_t BlockCodec::decode_coefficients(const uint8_t * data, size_t size, BlockHeader & h, size_t readable_after) {
    if (const int32_t rc = parse_header(data, size, h); rc != KVGGML_OK) {
        return rc;
    }
    const int32_t L = h.levels, G = h.group;
    if (h.channels != C || L != params.levels || G != params.group || h.rotation != params.rotation) {
        return KVGGML_ERROR_ARGUMENT;
    }
    size_t pos = h.header_bytes;

    size_t n_groups = 0;
    for (int32_t k = 0; k <= L; ++k) {
        if (h.bits[k]) {
            n_groups += (size_t) rows_of(B, L, k) * N;
        }
    }
    const size_t bitmap_bytes = (n_groups + 7) / 8;
    if (size < pos + bitmap_bytes) {
        return KVGGML_ERROR_TRUNCATED_BITMAP;
    }
    const uint8_t * bitmap = data + pos;
    if (n_groups % 8 && (bitmap[bitmap_bytes - 1] >> (n_groups % 8))) {
        return KVGGML_ERROR_PADDING;
    }
    pos += bitmap_bytes;

    size_t n_present = 0, value_bits = 0;
    for (int32_t k = 0, i = 0; k <= L; ++k) {
        if (h.bits[k]) {
            const size_t present = count_bits(bitmap, i, i + rows_of(B, L, k) * N);
            n_present += present;
            value_bits += present * G * h.bits[k];
            i += rows_of(B, L, k) * N;
        }
    }
    if (size < pos + 2 * n_present) {
        return KVGGML_ERROR_TRUNCATED_SCALES;
    }
    const uint8_t * scale_bytes = data + pos;
    if (const int32_t rc = check_scales(scale_bytes, n_present); rc != KVGGML_OK) {
        return rc;
    }
    pos += 2 * n_present;

    const size_t value_bytes = (value_bits + 7) / 8;
    if (size < pos + value_bytes) {
        return KVGGML_ERROR_TRUNCATED_DATA;
    }
    if (size > pos + value_bytes) {
        return KVGGML_ERROR_TRAILING;
    }
    if (value_bits % 8 && (data[pos + value_bytes - 1] >> (value_bits % 8))) {
        return KVGGML_ERROR_PADDING;
    }

    // An 8-byte load at any value's first byte must stay in bounds: read the values where they are
    // when 8 bytes after the block may be read (the bits past a value are masked off), else copied.
    const uint8_t * value_bytes_at = data + pos;
    if (readable_after < 8) {
        values.resize(value_bytes + 8);
        std::memcpy(values.data(), data + pos, value_bytes);
        std::memset(values.data() + value_bytes, 0, 8);
        value_bytes_at = values.data();
    }
    size_t i = 0, s = 0, bitpos = 0;
    uint32_t never_produced = 0;
    for (int32_t k = 0; k <= L; ++k) {
        // the subband's groups lie one after another in work (row r, group g at r * C + g * G)
        const int b = h.bits[k];
        const int32_t n_groups = rows_of(B, L, k) * N;
        float * y = work.data() + (size_t) first_row(B, L, k) * C;
        uint16_t * y_scale = group_scale.data() + (size_t) first_row(B, L, k) * N;
        if (b == 0) {
            std::fill(y, y + (size_t) n_groups * G, 0.0f);  // dropped subband: +0.0f
            std::fill(y_scale, y_scale + n_groups, 0);
            continue;
        }
        const UnpackGroups unpack = unpacker(b);  // one call per run of present groups
        for (int32_t g = 0; g < n_groups;) {
            if (!bit(bitmap, i + g)) {
                y_scale[g] = 0;
                std::fill(y + (size_t) g * G, y + (size_t) (g + 1) * G, 0.0f);  // absent group: +0.0f
                ++g;
                continue;
            }
            int32_t run = 1;
            while (g + run < n_groups && bit(bitmap, i + g + run)) {
                ++run;
            }
            for (int32_t j = 0; j < run; ++j) {
                y_scale[g + j] = read_u16(scale_bytes + 2 * (s + j));
            }
            never_produced |= unpack(value_bytes_at, bitpos, b, G, run, scale_bytes + 2 * s, y + (size_t) g * G);
            bitpos += (size_t) run * G * b;
            s += run;
            g += run;
        }
        i += n_groups;
    }
    return never_produced ? KVGGML_ERROR_VALUE : KVGGML_OK;
}

namespace {

// The C API's one-shot codecs allocate their scratch per call; allocation is the only thing
// that can throw once the params are checked, and no exception may cross into C.
template <class Call> auto no_throw(Call && call) -> decltype(call()) {
    try {
        return call();
    } catch (...) {
        return KVGGML_ERROR_MEMORY;
    }
}

// The params a block's header describes, for decoding it with a one-shot codec.
int32_t header_params(const uint8_t * data, size_t size, int32_t channels, kvggml_codec_params & params) {
    BlockHeader h;
    if (const int32_t rc = parse_header(data, size, h); rc != KVGGML_OK) {
        return rc;
    }
    if (h.channels != channels) {
        return KVGGML_ERROR_ARGUMENT;
    }
    params          = kvggml_codec_params{};
    params.levels   = h.levels;
    params.group    = h.group;
    params.rotation = h.rotation;
    std::copy(h.bits, h.bits + h.levels + 1, params.bits);
    return KVGGML_OK;
}

} // namespace

} // namespace kvggml

using kvggml::BlockCodec;

const char * kvggml_error_name(int32_t code) {
    switch (code) {
        case KVGGML_OK:                      return "ok";
        case KVGGML_ERROR_ARGUMENT:          return "invalid argument";
        case KVGGML_ERROR_CAPACITY:          return "output buffer too small";
        case KVGGML_ERROR_TRUNCATED_HEADER:  return "truncated header";
        case KVGGML_ERROR_MAGIC:             return "bad magic";
        case KVGGML_ERROR_VERSION:           return "unsupported version";
        case KVGGML_ERROR_LEVELS:            return "levels out of range";
        case KVGGML_ERROR_SIZES:             return "inconsistent sizes";
        case KVGGML_ERROR_BITS:              return "bits out of range";
        case KVGGML_ERROR_TRUNCATED_BITMAP:  return "truncated presence bitmap";
        case KVGGML_ERROR_TRUNCATED_SCALES:  return "truncated scales";
        case KVGGML_ERROR_TRUNCATED_DATA:    return "truncated data";
        case KVGGML_ERROR_TRAILING:          return "trailing bytes";
        case KVGGML_ERROR_PADDING:           return "nonzero padding";
        case KVGGML_ERROR_SCALE_NONFINITE:   return "non-finite scale";
        case KVGGML_ERROR_SCALE_NONPOSITIVE: return "non-positive scale";
        case KVGGML_ERROR_VALUE:             return "value out of range";
        case KVGGML_ERROR_NONFINITE_INPUT:   return "non-finite input";
        case KVGGML_ERROR_MEMORY:            return "out of memory";
        default:                             return "unknown error";
    }
}

const char * kvggml_codec_kernels(void) {
#if KVGGML_X86_KERNELS
    using kvggml::kCpu;
    return kCpu.vbmi && kCpu.f16c ? "avx512vbmi avx2 f16c"
         : kCpu.avx2 && kCpu.f16c ? "avx2 f16c"
         : kCpu.avx2              ? "avx2"
         : kCpu.f16c              ? "f16c"
                                  : "portable";
#else
    return "portable";
#endif
}

size_t kvggml_codec_block_bound(const kvggml_codec_params * params, int32_t channels) {
    if (params == nullptr || kvggml::check_params(*params, channels) != KVGGML_OK) {
        return 0;
    }
    return kvggml::block_bound(*params, channels);
}

int64_t kvggml_codec_encode_block(const kvggml_codec_params * params, const float * x, int32_t channels,
                                  uint8_t * out, size_t out_capacity) {
    if (params == nullptr || x == nullptr || out == nullptr) {
        return KVGGML_ERROR_ARGUMENT;
    }
    if (const int32_t rc = kvggml::check_params(*params, channels); rc != KVGGML_OK) {
        return rc;
    }
    if (out_capacity < kvggml::block_bound(*params, channels)) {
        return KVGGML_ERROR_CAPACITY;
    }
    const size_t n = ((size_t) 1 << params->levels) * channels;
    for (size_t i = 0; i < n; ++i) {
        if (!std::isfinite(x[i])) {
            return KVGGML_ERROR_NONFINITE_INPUT;
        }
    }
    return kvggml::no_throw([&]() -> int64_t { return (int64_t) BlockCodec(*params, channels).encode(x, out); });
}

int64_t kvggml_codec_encode_block_f16(const kvggml_codec_params * params, const uint16_t * rows,
                                      size_t row_stride_elems, int32_t channels, uint8_t * out, size_t out_capacity) {
    if (params == nullptr || rows == nullptr || out == nullptr) {
        return KVGGML_ERROR_ARGUMENT;
    }
    if (const int32_t rc = kvggml::check_params(*params, channels); rc != KVGGML_OK) {
        return rc;
    }
    if (row_stride_elems < (size_t) channels) {
        return KVGGML_ERROR_ARGUMENT;
    }
    if (out_capacity < kvggml::block_bound(*params, channels)) {
        return KVGGML_ERROR_CAPACITY;
    }
    for (int32_t r = 0; r < (1 << params->levels); ++r) {
        for (int32_t c = 0; c < channels; ++c) {
            if ((rows[r * row_stride_elems + c] & 0x7C00u) == 0x7C00u) {
                return KVGGML_ERROR_NONFINITE_INPUT;
            }
        }
    }
    return kvggml::no_throw(
        [&]() -> int64_t { return (int64_t) BlockCodec(*params, channels).encode_f16(rows, row_stride_elems, out); });
}

int32_t kvggml_codec_decode_block(const uint8_t * data, size_t size, int32_t channels,
                                  float * out, size_t out_capacity_floats, int32_t * out_tokens) {
    kvggml_codec_params params;
    if (const int32_t rc = kvggml::header_params(data, size, channels, params); rc != KVGGML_OK) {
        return rc;
    }
    if (out == nullptr) {
        return KVGGML_ERROR_ARGUMENT;
    }
    const int32_t tokens = 1 << params.levels;
    if (out_capacity_floats < (size_t) tokens * channels) {
        return KVGGML_ERROR_CAPACITY;
    }
    if (out_tokens) {
        *out_tokens = tokens;
    }
    return kvggml::no_throw([&]() -> int32_t { return BlockCodec(params, channels).decode(data, size, out); });
}

int32_t kvggml_codec_decode_block_f16(const uint8_t * data, size_t size, int32_t channels, uint16_t * out,
                                      size_t row_stride_elems, size_t out_capacity_elems, int32_t * out_tokens) {
    kvggml_codec_params params;
    if (const int32_t rc = kvggml::header_params(data, size, channels, params); rc != KVGGML_OK) {
        return rc;
    }
    if (out == nullptr || row_stride_elems < (size_t) channels) {
        return KVGGML_ERROR_ARGUMENT;
    }
    const int32_t tokens = 1 << params.levels;
    if (out_capacity_elems < (size_t) (tokens - 1) * row_stride_elems + channels) {
        return KVGGML_ERROR_CAPACITY;
    }
    if (out_tokens) {
        *out_tokens = tokens;
    }
    return kvggml::no_throw(
        [&]() -> int32_t { return BlockCodec(params, channels).decode_f16(data, size, out, row_stride_elems); });
}

int64_t kvggml_codec_coarsen_block(const uint8_t * data, size_t size, int32_t channels, const uint8_t * bits,
                                   size_t n_bits, uint8_t * out, size_t out_capacity) {
    return kvggml_codec_coarsen_channels(data, size, channels, bits, n_bits, 0, channels, out, out_capacity);
}

int64_t kvggml_codec_coarsen_channels(const uint8_t * data, size_t size, int32_t channels, const uint8_t * bits,
                                      size_t n_bits, int32_t c0, int32_t c1, uint8_t * out, size_t out_capacity) {
    kvggml_codec_params params;
    if (const int32_t rc = kvggml::header_params(data, size, channels, params); rc != KVGGML_OK) {
        return rc;
    }
    if (bits == nullptr || out == nullptr || n_bits != (size_t) params.levels + 1) {
        return KVGGML_ERROR_ARGUMENT;
    }
    if (out_capacity < size) {
        return KVGGML_ERROR_CAPACITY;
    }
    return kvggml::no_throw(
        [&]() -> int64_t { return BlockCodec(params, channels).coarsen(data, size, bits, out, c0, c1); });
}
