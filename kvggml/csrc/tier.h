// The compressed tier of one llama_kv_cache.
//
// Tokens older than the exact window are encoded block by block (B = 2^level tokens,
// every layer's K and V, docs/FORMAT.md) and their f16 cells are freed. A block's bytes
// never change once written.
//
//   tier.cpp         the store: construction, accounting, compress()
//   tier-hierarchy.cpp  the resolution hierarchy: old blocks coarsened by age and under a budget
//   tier-guidance.cpp   the attention each block receives, which orders the budget's coarsening
//   tier-memory.cpp  llama.cpp's memory operations (remove, copy, keep, shift)
//   tier-state.cpp   saved states
//   attention.cpp    attention over the tier: the decode op and the mask
//   llama-hooks.cpp  the entry points the patches call
#pragma once

#include <atomic>
#include <functional>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "codec.h"
#include "config.h"
#include "kvggml.h"
#include "llama.h"

struct ggml_tensor;
struct llama_cparams;
class llama_io_read_i;
class llama_io_write_i;
class llama_kv_cache;
class llama_memory_i;

namespace kvggml {

// A saved state's compressed section starts with this word where llama.cpp's starts with its
// stream count (docs/FORMAT.md, "Saved state").
constexpr uint32_t kStateMagic   = 0x5447564B;  // "KVGT"
constexpr uint32_t kStateVersion = 4;

// One compressed block: B tokens of one sequence, encoded together.
struct Block {
    llama_seq_id seq;
    std::vector<llama_pos> pos;    // per token: its position, or -1 once removed
    std::vector<llama_pos> moved;  // per token: how far it was moved since encoding (RoPE owed to its key)
    uint32_t step = 0;             // steps of the hierarchy's ladder taken (Config::ladder()); 0: as encoded.
                                   // With per-head steps, the most any head took.
    // Guidance steps each KV head of each layer on its own: per cache layer and KV head, the steps
    // its channels took. Empty while every head is at `step`.
    std::vector<uint8_t> head_steps{};
    // Guidance (tier-guidance.cpp): per cache layer and KV head, the decayed sum of the attention
    // sampled queries gave this block, relative to an even spread (1: its share of the blocks they
    // saw); `observed` is the decayed count of those queries. Empty and 0 until first observed.
    std::vector<float> attention{};
    float observed = 0;

    bool      empty() const;
    uint32_t  n_alive() const;
    llama_pos first() const;  // smallest position held (requires !empty())
    llama_pos end() const;    // one past the largest
    bool      holds(llama_pos p0, llama_pos p1) const;  // a token in [p0, p1)?
};

// The encoded bytes of every block for one layer's K or V.
struct Stream {
    std::vector<uint8_t> bytes;
    std::vector<size_t>  offsets{0};  // block b is bytes[offsets[b] .. offsets[b+1])

    // Rewrites the blocks in place, in order: block b is dropped where keep[b] is false, and takes
    // *with[b]'s bytes where with[b] is set, which are never more than its own (coarsening only
    // shrinks a block), so the writes stay behind the reads. The storage is reused: building a new
    // stream at every change fragmented the heap, and RSS grew under a budget while malloc's bytes
    // in use stayed flat.
    void rewrite(const std::vector<bool> & keep, const std::vector<const std::vector<uint8_t> *> & with);
    // Room for n more bytes, growing the storage by an eighth rather than the vector's doubling:
    // a stream keeps its storage for good, so doubling could leave as much spare as data.
    void make_room(size_t n);
    // Asks the CPU to load block b's bytes into its caches ahead of their use: attention at depth
    // reads every block once per step from memory, and waited on those loads. Readers going through
    // blocks in order prefetch the one kPrefetchAhead ahead. Decode at depth 8192 (SmolLM2, 2 threads,
    // Xeon, two libraries in turn): none 35.3 and 35.9 tok/s, 1 ahead 38.5 and 37.8; then 1 ahead
    // 37.0 and 38.9, 2 ahead 37.4 and 39.5.
    static constexpr int64_t kPrefetchAhead = 2;
    void prefetch(int64_t b) const {
        const auto end = (uintptr_t) (bytes.data() + offsets[b + 1]);
        for (auto line = (uintptr_t) (bytes.data() + offsets[b]) & ~(uintptr_t) 63; line < end; line += 64) {
            __builtin_prefetch((const void *) line);  // never faults, even before bytes.data()
        }
    }
};

// How one layer's keys were rotated (RoPE), to rotate compressed keys that moved.
struct Rope {
    bool  on = false;    // the layer applies RoPE
    bool  neox = false;  // pairs (i, i + n_rot/2) rather than (2i, 2i + 1)
    int   n_rot = 0;
    float freq_base = 0, freq_scale = 0;
};

class Tier;

// What the decode op of one layer's K or V needs; addresses stay fixed for the tier's life.
struct LayerView {
    Tier *  tier;
    int32_t ikv;        // layer index inside the cache
    bool    is_v;
    bool    transposed; // V stored transposed (no flash attention)
};

// What the guidance op of one layer needs (tier-guidance.cpp): its queries' sampled rows are
// `rows`, which the graph's mask input fills before each micro-batch.
struct ScoreView {
    Tier *  tier;
    int32_t ikv;
    float   kq_scale;
    const std::vector<int32_t> * rows;
};

// What the direct-attention op of one layer needs (attention-direct.cpp).
struct DirectView {
    Tier *  tier;
    int32_t ikv;
    float   kq_scale;
};

// The settings a running context may change: kvggml_set_settings.
struct Settings {
    uint32_t threshold, sinks;
    std::string preset;
};

// Threads (docs/API.md, "Threads"): llama.cpp runs a context's decodes and memory operations on
// one thread at a time, and a decode's ggml threads only read the tier. The API may be called
// from any other thread meanwhile: everything that changes the blocks or the settings holds
// `mutex` exclusively, the API's readers hold it shared, so each read sees the state between two
// changes. Compress callbacks run after it is released, so they may call the API.
class Tier {
public:
    Tier(const Config & config, llama_kv_cache & kv, const llama_cparams & cparams);

    // After a micro-batch: encode every whole block of old tokens, free their cells, then
    // coarsen old blocks by age and to stay within the budget.
    void compress();

    void clear();
    void seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1);
    void seq_keep(llama_seq_id seq_id);
    void seq_cp(llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1);
    // Move tokens of [p0, p1) to pos + delta (seq_add) or pos / d (seq_div); false, with nothing
    // changed and an error logged, when compressed keys are in the range and cannot be re-rotated.
    bool seq_add(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos delta);
    bool seq_div(llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d);
    // Empty when compressed keys can be re-rotated; otherwise why not.
    const std::string & shift_refusal() const { return no_shift; }

    // Saved states (docs/FORMAT.md, "Saved state"): the blocks of seq_id (-1: all).
    void state_write(llama_io_write_i & io, llama_seq_id seq_id) const;
    // first_word is the state's first 32 bits: kStateMagic starts our section, which is read
    // and checked into `staged` without touching the tier (std::runtime_error names what is
    // wrong), then first_word becomes the word after it. state_commit then replaces seq_id's
    // blocks with the staged ones.
    void state_read(llama_io_read_i & io, llama_seq_id seq_id, uint32_t & first_word);
    void state_commit(llama_seq_id seq_id);

    Settings settings() const { return {cfg.threshold, cfg.sinks, cfg.preset}; }
    uint32_t recent_capacity() const { return cells_for_recent; }
    uint32_t n_ctx_seq() const { return n_ctx; }  // the context's size per sequence
    // Throws std::invalid_argument naming the setting and its allowed range.
    void set_settings(const Settings & s);

    const Config & config() const { return cfg; }
    const std::vector<Block> & blocks() const { return blks; }
    uint32_t n_tokens() const { return (uint32_t) blks.size() * cfg.block_tokens(); }  // columns, removed ones too
    uint64_t n_alive() const;
    size_t   compressed_bytes() const;
    size_t   allocated_bytes() const;  // the streams' storage: compressed_bytes() and room to grow
    size_t   exact_bytes() const;  // the f16 cells of the cache, K and V, all layers
    uint64_t budget_bytes() const { return budget; }  // 0: none
    uint64_t coarsenings() const { return n_coarsened; }  // ladder steps taken by blocks, in total
    const std::vector<Step> & ladder() const { return steps; }
    // Changes whenever the blocks or their positions do, so graphs built before are not reused.
    uint64_t generation() const { return gen; }

    // Encoded bytes of block b, K and V, all layers.
    uint64_t block_bytes(size_t b) const;
    // Block b's subband widths now (its K header in the first layer; K and V share them).
    SubbandBits block_widths(size_t b) const;
    // f16 bytes one block held before compression.
    uint64_t block_f16_bytes() const;

    // Held shared by the API's readers (api.cpp).
    std::shared_lock<std::shared_mutex> read_lock() const { return std::shared_lock<std::shared_mutex>(mutex); }
    // Register (or with nullptr remove) the compress callback; waits for a callback running on
    // another thread, so fn is never called after this returns.
    void set_callback(kvggml_compress_callback fn, void * user_data);

    // Custom-op bodies: decode layer `view` into dst, blocks split across threads.
    void decode_into(const LayerView & view, ggml_tensor * dst, int ith, int nth) const;
    const LayerView * view(int32_t il, bool is_v) const;

    // Attention straight from the blocks' coefficients (attention-direct.cpp), for micro-batches of
    // up to kDirectMaxQueries tokens: larger ones decode each block once and reuse it across their
    // queries. attends_directly: whether it serves this layer's q, exact k and v (and the settings,
    // the blocks); attend_direct: the op's body, filling dst (the partials, [Dv + 2, n_head,
    // n_tokens, kDirectParts]) from src q, k, v, the exact cells' mask and the compressed mask.
    static constexpr int64_t kDirectMaxQueries = 32;
    static constexpr int64_t kDirectParts = 16;
    bool attends_directly(const ggml_tensor * q, const ggml_tensor * k, const ggml_tensor * v) const;
    void attend_direct(const DirectView & view, ggml_tensor * dst, int ith, int nth) const;

    // Guidance (tier-guidance.cpp). Queries at positions p with sampled(p) are sampled (a
    // micro-batch holding one takes the reference path); the op gathers the attention their
    // queries give the compressed tokens of one layer (src: q, the joined K, the compressed mask,
    // llama.cpp's mask of the exact cells) into `gathered`, and compress() folds it into the blocks.
    static constexpr int32_t kGuidanceStride = 64;
    static bool sampled(llama_pos p) { return p % kGuidanceStride == kGuidanceStride - 1; }
    bool guided() const { return cfg.guidance && !steps.empty(); }
    void prepare_gathering();  // at graph build: `gathered` sized for the blocks now
    void gather_attention(const ScoreView & view, const ggml_tensor * dst, int ith, int nth) const;
    // Block b's relative attention from one KV head of one layer (unit: layer * KV heads + head);
    // +inf before any query saw it.
    float importance(size_t b, size_t unit) const;
    // The steps the channels of unit (as above) took in blk.
    uint32_t head_step(const Block & blk, size_t unit) const;
    // Bits of unit's K and V channels in block b: their scales and values (channel_payload_bits).
    uint64_t head_payload_bits(size_t b, size_t unit) const;
    size_t kv_heads() const { return n_heads_kv; }
    size_t n_layers() const { return k_streams.size(); }  // cache layers
    int32_t model_layer(size_t ikv) const;                 // the model's index of cache layer ikv

    llama_kv_cache & kv;
    std::atomic<uint64_t> encode_us{0};
    mutable std::atomic<uint64_t> decode_us{0};

private:
    mutable std::shared_mutex mutex;
    mutable std::recursive_mutex callback_mutex;  // recursive: a callback may change the callback
    kvggml_compress_callback on_compress = nullptr;
    void * on_compress_data = nullptr;

    Config cfg;
    uint32_t cells_for_recent;  // sinks + threshold the cache was sized for
    uint32_t n_ctx;
    kvggml_codec_params params_k{};
    kvggml_codec_params params_v{};
    std::vector<Block>  blks;
    std::vector<Stream> k_streams;  // per cache layer
    std::vector<Stream> v_streams;
    std::vector<LayerView> views;   // 2 per cache layer: K, V
    std::vector<Rope> ropes;        // per cache layer
    std::string no_shift;
    uint64_t gen = 0;
    std::vector<Step> steps;  // the hierarchy's ladder
    uint64_t budget = 0;
    uint64_t n_coarsened = 0;

    // Attention the current micro-batch's sampled queries gave each block: per block, cache
    // layer and KV head, and per block how many queries saw it (counted at layer 0, head 0).
    mutable std::mutex gathered_mutex;
    mutable std::vector<float> gathered;
    mutable std::vector<float> gathered_seen;
    mutable uint32_t gathered_queries = 0;
    size_t n_heads_kv = 0;  // KV heads of a cache layer
    void fold_attention();  // gathered into the blocks' decayed sums, then zeroed

    struct Staged {
        std::vector<Block>  blks;
        std::vector<Stream> k_streams, v_streams;
    } staged;

    // A whole block of old tokens to encode: its sequence and its cells, in position order.
    struct Run {
        llama_seq_id seq;
        std::vector<uint32_t> cells;
    };
    // The steps of compress().
    std::vector<Run> old_runs() const;  // every whole block between the sinks and the window
    std::vector<uint32_t> cells_kept(const std::vector<Run> & runs) const;  // occupied cells not in a run
    // Encode the runs of one layer's K or V into its stream; with `kept`, also move those cells'
    // values to the front of the tensor. `tensor` is scratch for the layer's values.
    void encode_runs(size_t ikv, bool is_v, const std::vector<Run> & runs, const std::vector<uint32_t> * kept,
                     std::vector<uint16_t> & tensor);
    void add_blocks(const std::vector<Run> & runs);  // the runs become blocks; their cells are freed
    void move_cells_to_front(const std::vector<uint32_t> & kept);
    // An event for each block from first_new on, just encoded.
    void encoded_events(size_t first_new, std::vector<kvggml_event> & events) const;
    void announce(const std::vector<kvggml_event> & events) const;  // the compress callback, for each
    void encode_old(const std::vector<Run> & runs, std::vector<kvggml_event> & events);

    // The hierarchy (tier-hierarchy.cpp).
    void init_budget(uint32_t n_ctx_all);  // throws std::invalid_argument when the budget cannot hold n_ctx
    void coarsen_old(std::vector<kvggml_event> & events);  // an event for each block coarsened
    // Tokens newer than each sequence's blocks: a block's age is newest[seq] - blk.end().
    std::vector<llama_pos> newest_positions() const;

    // Drop the blocks `drop` selects, with their bytes in every stream.
    void erase_blocks_if(const std::function<bool(const Block &)> & drop);
    // Append a block with bytes copied from block b of `from`.
    void append_copy(const Block & blk, const std::vector<Stream> & from_k, const std::vector<Stream> & from_v, size_t b);
    // Move the positions of [p0, p1) of seq_id by new_pos(pos).
    template <typename F> bool move(const char * op, llama_seq_id seq_id, llama_pos p0, llama_pos p1, F new_pos);
    void update_params();  // codec parameters of the cache's blocks, from cfg (widths: the first layer's)
    // The codec parameters of cache layer ikv's new K or V blocks: its model layer's preset's widths.
    kvggml_codec_params encode_params(size_t ikv, bool is_v) const;
    // Saved with a state: 1 when llama.cpp keeps K Hadamard-rotated (attn_rot_k), + 2 for V.
    uint32_t cache_basis() const;
    void rotate_keys(const Rope & rope, const Block & blk, uint16_t * rows, int64_t C) const;
};

// The direct-attention op's second half: dst [Dv * n_head, n_tokens] = the partials (src[0])
// joined into one softmax per query and head.
void merge_partials(ggml_tensor * dst, int ith, int nth, void * userdata);

// Microseconds of a steady clock, for the encode/decode counters.
uint64_t now_us();

// This thread's codec for these parameters, one for K and one for V, so both can be used at once:
// a codec owns its scratch and is not shared between threads.
BlockCodec & thread_codec(const kvggml_codec_params & params, int32_t channels, bool is_v);

// The plain KV cache that holds the compressed tier of `memory` (the full-attention cache
// of a sliding-window model), or null when there is none.
llama_kv_cache * compressible_cache(llama_memory_i * memory);

} // namespace kvggml
