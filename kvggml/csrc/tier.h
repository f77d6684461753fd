// The compressed tier of one llama_kv_cache.
//
// Tokens older than the exact window are encoded block by block (B = 2^level tokens,
// every layer's K and V, docs/FORMAT.md) and their f16 cells are freed. Attention
// reads the tier through one custom ggml op per layer and tensor that decodes that
// layer only, so at most one layer's worth is ever expanded at a time.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "codec.h"
#include "config.h"
#include "kvggml.h"
#include "llama.h"

struct ggml_tensor;
class llama_kv_cache;

namespace kvggml {

// One compressed block: B consecutive tokens of one sequence.
struct Block {
    llama_seq_id seq;
    llama_pos    p0;  // first position
    llama_pos    p1;  // one past the last position

    bool overlaps(llama_pos q0, llama_pos q1) const { return p1 > q0 && p0 < q1; }
    bool inside(llama_pos q0, llama_pos q1) const { return p0 >= q0 && p1 <= q1; }
};

// The encoded bytes of every block for one layer's K or V.
struct Stream {
    std::vector<uint8_t> bytes;
    std::vector<size_t>  offsets{0};  // block b is bytes[offsets[b] .. offsets[b+1])
};

class Tier;

// What the decode op of one layer's K or V needs; addresses stay fixed for the tier's life.
struct LayerView {
    Tier *  tier;
    int32_t ikv;        // layer index inside the cache
    bool    is_v;
    bool    transposed; // V stored transposed (no flash attention)
};

class Tier {
public:
    Tier(const Config & config, llama_kv_cache & kv);

    // After a micro-batch: encode every whole block of old tokens, free their cells.
    void compress();

    void clear();
    bool seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1);
    void seq_keep(llama_seq_id seq_id);
    bool seq_cp(llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1);
    // Does [p0, p1) of the sequence (-1: any) hold compressed tokens?
    bool holds(llama_seq_id seq_id, llama_pos p0, llama_pos p1) const;

    const Config & config() const { return cfg; }
    const std::vector<Block> & blocks() const { return blks; }
    uint32_t n_tokens() const { return (uint32_t) blks.size() * cfg.block_tokens(); }
    size_t   compressed_bytes() const;
    size_t   exact_bytes() const;  // the f16 cells of the cache, K and V, all layers
    // Changes whenever the set of blocks does, so graphs built for another set are not reused.
    uint64_t generation() const { return gen; }

    // Encoded bytes of block b, K and V, all layers.
    uint64_t block_bytes(size_t b) const;
    // f16 bytes one block held before compression.
    uint64_t block_f16_bytes() const;

    kvggml_compress_callback on_compress = nullptr;
    void * on_compress_data = nullptr;

    // Custom-op bodies: decode layer `view` into dst, blocks split across threads.
    void decode_into(const LayerView & view, ggml_tensor * dst, int ith, int nth) const;
    const LayerView * view(int32_t il, bool is_v) const;

    llama_kv_cache & kv;
    std::atomic<uint64_t> encode_us{0};
    mutable std::atomic<uint64_t> decode_us{0};

private:
    Config cfg;
    kvggml_codec_params params_k{};
    kvggml_codec_params params_v{};
    std::vector<Block>  blks;
    std::vector<Stream> k_streams;  // per cache layer
    std::vector<Stream> v_streams;
    std::vector<LayerView> views;   // 2 per cache layer: K, V
    uint64_t gen = 0;

    // Drop the blocks `drop` selects, with their bytes in every stream.
    template <typename Pred> void erase_blocks_if(Pred drop);
};

} // namespace kvggml
