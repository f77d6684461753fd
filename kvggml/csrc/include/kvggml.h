// kvggml: wavelet compression of the llama.cpp KV cache.
//
// The one public header of the C side, top to bottom: version, error codes, the block
// codec (docs/FORMAT.md), then what a llama_context exposes. Everything here is exported
// by the patched libllama; the stock library has none of these symbols, which is how the
// Python layer tells the two apart.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#    define KVGGML_API __declspec(dllexport)
#else
#    define KVGGML_API __attribute__((visibility("default")))
#endif

//
// version
//

#define KVGGML_VERSION_MAJOR 0
#define KVGGML_VERSION_MINOR 8
#define KVGGML_VERSION_PATCH 0
#define KVGGML_VERSION_NUMBER (KVGGML_VERSION_MAJOR * 10000 + KVGGML_VERSION_MINOR * 100 + KVGGML_VERSION_PATCH)

// Version of the compression code compiled into this library, e.g. "0.1.0".
KVGGML_API const char * kvggml_version_string(void);
// The same as KVGGML_VERSION_NUMBER, for checking header/library agreement at run time.
KVGGML_API unsigned kvggml_version_number(void);

//
// errors: 0 is success, every error is negative; kvggml_error_name() names it
//

#define KVGGML_OK                         0
#define KVGGML_ERROR_ARGUMENT            -1  // null pointer, or a block of another configuration
#define KVGGML_ERROR_CAPACITY            -2  // output buffer too small
#define KVGGML_ERROR_TRUNCATED_HEADER    -3
#define KVGGML_ERROR_MAGIC               -4
#define KVGGML_ERROR_VERSION             -5
#define KVGGML_ERROR_LEVELS              -6
#define KVGGML_ERROR_SIZES               -7  // channels, group and rotation inconsistent
#define KVGGML_ERROR_BITS                -8  // a subband width of 1 or above 16
#define KVGGML_ERROR_TRUNCATED_BITMAP    -9
#define KVGGML_ERROR_TRUNCATED_SCALES   -10
#define KVGGML_ERROR_TRUNCATED_DATA     -11
#define KVGGML_ERROR_TRAILING           -12
#define KVGGML_ERROR_PADDING            -13  // a set padding bit
#define KVGGML_ERROR_SCALE_NONFINITE    -14
#define KVGGML_ERROR_SCALE_NONPOSITIVE  -15
#define KVGGML_ERROR_VALUE              -16  // a value of -2^(b-1), never produced
#define KVGGML_ERROR_NONFINITE_INPUT    -17
#define KVGGML_ERROR_MEMORY             -18  // scratch allocation failed

// A short static string naming the code (e.g. "truncated scales").
KVGGML_API const char * kvggml_error_name(int32_t code);

// What the last failed call of the context API below said, on this thread: names the bad
// value and the allowed range. "" when none failed.
KVGGML_API const char * kvggml_last_error(void);

//
// block codec (docs/FORMAT.md): one block is 2^levels tokens x channels values
//

typedef struct kvggml_codec_params {
    int32_t levels;     // Haar levels L, 0..8; a block holds 2^L tokens
    int32_t group;      // channels per f16 scale; divides the channel count
    int32_t rotation;   // Hadamard length (the head dimension), or 1 for none
    float   threshold;  // detail groups at or below threshold x their A_L level are dropped (encoder only)
    uint8_t bits[9];    // bits[0..L]: widths of A_L, D_L, ..., D_1; 0 (dropped) or 2..16
} kvggml_codec_params;

// The kernels this library picked for this CPU when it loaded, e.g. "avx2 f16c", or "portable"
// (the same bits either way).
KVGGML_API const char * kvggml_codec_kernels(void);

// Largest encoded size of one block, or 0 for invalid params.
KVGGML_API size_t kvggml_codec_block_bound(const kvggml_codec_params * params, int32_t channels);

// Encode x[2^L][channels] (float32, finite) into out (out_capacity >= the bound above).
// Returns the bytes written, or an error code.
KVGGML_API int64_t kvggml_codec_encode_block(const kvggml_codec_params * params, const float * x, int32_t channels,
                                             uint8_t * out, size_t out_capacity);

// Decode one block into out[B][channels]; the block must say `channels`. *out_tokens (may be
// NULL) receives B. Returns KVGGML_OK or an error code; malformed input is rejected without
// reading out of bounds.
KVGGML_API int32_t kvggml_codec_decode_block(const uint8_t * data, size_t size, int32_t channels,
                                             float * out, size_t out_capacity_floats, int32_t * out_tokens);

// The same with f16 rows, as the KV cache holds them: token r of the block is the `channels`
// values at rows + r * row_stride_elems (row_stride_elems >= channels). Encoding reads them as
// exact floats; decoding rounds each float32 result to the nearest f16 (ties to even, overflow
// to infinity), exactly like numpy's astype(np.float16). out_capacity_elems must reach the last
// row: (B - 1) * row_stride_elems + channels.
KVGGML_API int64_t kvggml_codec_encode_block_f16(const kvggml_codec_params * params, const uint16_t * rows,
                                                 size_t row_stride_elems, int32_t channels, uint8_t * out,
                                                 size_t out_capacity);
KVGGML_API int32_t kvggml_codec_decode_block_f16(const uint8_t * data, size_t size, int32_t channels, uint16_t * out,
                                                 size_t row_stride_elems, size_t out_capacity_elems,
                                                 int32_t * out_tokens);

// Coarsen one block (docs/FORMAT.md, section 10): re-encode it with subband widths bits[0..L]
// (n_bits = L + 1, each 0 or 2..16 and at most the block's own width), from its stored
// coefficients alone. out_capacity >= size suffices: a coarsened block is never longer. Returns
// the bytes written, or an error code (KVGGML_ERROR_BITS for a width not allowed).
KVGGML_API int64_t kvggml_codec_coarsen_block(const uint8_t * data, size_t size, int32_t channels,
                                              const uint8_t * bits, size_t n_bits, uint8_t * out,
                                              size_t out_capacity);

// Coarsen the channels [c0, c1) of one block only (docs/FORMAT.md, section 11), as the hierarchy
// does to one KV head: c0 and c1 are multiples of the block's group size, and each bits[k] is 0
// (the subband is dropped from those channels) or the block's own width. The whole range
// [0, channels) is kvggml_codec_coarsen_block. KVGGML_ERROR_ARGUMENT for a range not allowed.
KVGGML_API int64_t kvggml_codec_coarsen_channels(const uint8_t * data, size_t size, int32_t channels,
                                                 const uint8_t * bits, size_t n_bits, int32_t c0, int32_t c1,
                                                 uint8_t * out, size_t out_capacity);

//
// a llama_context with compression (OLLAMA_KV_COMPRESSION=1)
//

struct llama_context;

typedef struct kvggml_stats {
    int32_t  enabled;           // 1 when this context compresses its KV cache
    uint32_t exact_cells;       // f16 cells allocated: sinks + window + a block + a batch, not n_ctx
    uint64_t exact_bytes;       // bytes of those cells, K and V, all layers
    uint64_t compressed_bytes;  // encoded blocks, K and V, all layers
    uint64_t compressed_tokens; // tokens held compressed, all sequences (removed ones not counted)
    uint64_t blocks;            // compressed blocks
    uint64_t encode_us;         // time spent compressing, in total
    uint64_t decode_us;         // time spent decoding blocks for attention (one thread's share), in total
    uint64_t budget_bytes;      // OLLAMA_KV_COMPRESSION_BUDGET in bytes (0: none): exact_bytes +
                                // compressed_bytes stays at or below it after every micro-batch
    uint64_t coarsenings;       // hierarchy steps taken by blocks, in total (with guidance, by one head of a block)
    uint64_t allocated_bytes;   // storage the blocks' streams hold: compressed_bytes and room to grow
} kvggml_stats;

// Totals of the context's compressible KV cache (the full-attention one of a sliding-window
// model). Fields stay 0 where the memory has none.
KVGGML_API int32_t kvggml_get_stats(const struct llama_context * ctx, kvggml_stats * out);

// One compressed block: 2^level consecutive positions of one sequence when it was encoded.
// Removing tokens hides them one by one (the block is freed with its last token) and a
// context shift moves them, so p0/p1 bound what it holds now and n_tokens counts it.
typedef struct kvggml_segment {
    int32_t  seq_id;
    int32_t  p0;        // first position held
    int32_t  p1;        // one past the last position held
    int32_t  level;     // Haar levels it was encoded with
    uint32_t n_tokens;  // tokens it still holds, 1..2^level
    uint64_t bytes;     // encoded size, K and V, all layers
    int32_t  step;      // hierarchy steps taken: 0 as encoded, s: coarsened to the ladder's step s
    uint8_t  bits[9];   // its K's subband widths now, A_L, D_L, ..., D_1 (level + 1 used; 0: dropped)
} kvggml_segment;

// The compressed blocks of sequence seq_id (-1: every sequence), in position order. Writes
// at most `capacity` of them to out (which may be NULL when capacity is 0) and returns how
// many there are, or a negative error code.
KVGGML_API int64_t kvggml_get_segments(const struct llama_context * ctx, int32_t seq_id, kvggml_segment * out,
                                       size_t capacity);

// The compressed-segment bitmap of sequence seq_id: bit k (LSB first) is 1 when the block slot
// of positions [sinks + k*B, sinks + (k+1)*B) is compressed, B = 2^level (a block that no
// longer starts on a slot, after tokens were removed, marks the slot holding its first
// position). Writes n_bytes bytes
// and returns the number of meaningful bits (one per block slot up to the last compressed
// block), or a negative error code.
KVGGML_API int64_t kvggml_get_bitmap(const struct llama_context * ctx, int32_t seq_id, uint8_t * bits, size_t n_bytes);

// The hierarchy step of each block slot of sequence seq_id, one byte per slot as in the bitmap
// above: 0 where the slot holds no compressed block, 1 + step where it does (1: as encoded).
// Writes n_bytes bytes and returns the number of meaningful slots, or a negative error code.
KVGGML_API int64_t kvggml_get_step_map(const struct llama_context * ctx, int32_t seq_id, uint8_t * steps,
                                       size_t n_bytes);

// What one KV head of one layer received from the hierarchy (per-head rates, README "The
// hierarchy"). With OLLAMA_KV_COMPRESSION_GUIDANCE=1 each head steps on its own, in the order of
// the attention its sampled queries gave each block; without, every head of a block shares the
// block's step.
typedef struct kvggml_head_report {
    int32_t  layer;      // model layer
    int32_t  head;       // KV head of that layer
    float    attention;  // mean over the blocks its queries saw of its decayed relative attention to
                         // them (1: an even spread over the tokens a query sees); NaN when none
                         // was sampled (guidance off, or no sampled query yet)
    uint32_t blocks;     // compressed blocks of the sequence
    uint32_t steps;      // ladder steps its channels took, summed over those blocks
    uint64_t bytes;      // its K and V channels' scales and values in those blocks (their headers
                         // and presence bitmaps are the layer's, shared by its heads)
} kvggml_head_report;

// One report per cache layer and KV head, layer-major, for the blocks of sequence seq_id (-1:
// every sequence). Writes at most `capacity` to out (NULL when capacity is 0) and returns how
// many there are (cache layers x KV heads), or a negative error code.
KVGGML_API int64_t kvggml_get_head_reports(const struct llama_context * ctx, int32_t seq_id,
                                           kvggml_head_report * out, size_t capacity);

// A block was just compressed (step 0: encoded, its cells freed) or coarsened (step s >= 1:
// re-encoded at the hierarchy's step s). Called on the thread that runs llama_decode, once per
// block and event, after the block is stored and before its cells are reused. A block coarsened
// by several steps in one decode (a budget can take it further than its age) gets one event, with
// the step it reached; kvggml_stats.coarsenings counts the steps.
typedef struct kvggml_event {
    int32_t  seq_id;
    int32_t  p0;
    int32_t  p1;
    int32_t  level;
    uint64_t bytes_before;  // encoding: the block's f16 K and V, all layers; coarsening: its encoded size before
    uint64_t bytes_after;   // encoded
    int32_t  step;
} kvggml_event;
typedef void (*kvggml_compress_callback)(const kvggml_event * event, void * user_data);

// The settings of a context that compresses. threshold, sinks and preset may change while it
// runs: they apply from the next llama_decode on (blocks already encoded keep their bytes).
typedef struct kvggml_settings {
    uint32_t threshold;        // most recent tokens per sequence kept exact
    uint32_t sinks;            // first tokens per sequence kept exact
    uint32_t level;            // Haar levels, a block is 2^level tokens: fixed at context creation
    uint32_t recent_capacity;  // largest sinks + threshold: what the cache was sized for (read-only)
    char     preset[16];       // "fine", "hi", "balanced" or "lo", or two of them as K/V: "hi/lo" (NUL-terminated)
} kvggml_settings;

KVGGML_API int32_t kvggml_get_settings(const struct llama_context * ctx, kvggml_settings * out);
// KVGGML_ERROR_ARGUMENT, and nothing changed, when a value is out of range or a read-only field
// differs; kvggml_last_error() says which and the allowed range.
KVGGML_API int32_t kvggml_set_settings(struct llama_context * ctx, const kvggml_settings * settings);

// Register (or, with NULL, remove) the context's callback. KVGGML_ERROR_ARGUMENT when the
// context does not compress.
KVGGML_API int32_t kvggml_set_compress_callback(struct llama_context * ctx, kvggml_compress_callback callback,
                                                void * user_data);

// Text for a host's log and metrics endpoint (llama-server's, through patch 0003), written as
// snprintf writes: at most `size` bytes, NUL included (buf may be NULL when size is 0); returns
// the length of the whole text, or a negative error code.
//
// One line on sequence seq_id: its tokens held compressed, blocks, bytes and ratio to f16, and
// its blocks per hierarchy step. KVGGML_ERROR_ARGUMENT when the context does not compress.
KVGGML_API int64_t kvggml_format_sequence(const struct llama_context * ctx, int32_t seq_id, char * buf, size_t size);
// The context's statistics in Prometheus' text format (names prefixed "kvggml:"), and per
// sequence 0..n_seq-1 its compressed tokens and bytes. A context without compression reports
// kvggml:enabled 0.
KVGGML_API int64_t kvggml_format_metrics(const struct llama_context * ctx, int32_t n_seq, char * buf, size_t size);

#ifdef __cplusplus
}
#endif

#ifdef __cplusplus
#    include <string>

// C++ hosts: a kvggml_format_* text as a string, "" on an error.
inline std::string kvggml_format_string(int64_t (*format)(const llama_context *, int32_t, char *, size_t),
                                        const llama_context * ctx, int32_t arg) {
    const int64_t n = format(ctx, arg, nullptr, 0);
    if (n <= 0) {
        return {};
    }
    std::string text((size_t) n + 1, '\0');
    format(ctx, arg, text.data(), text.size());
    text.resize((size_t) n);
    return text;
}
#endif
