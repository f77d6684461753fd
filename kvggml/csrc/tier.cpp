// The compressed tier and the hooks llama.cpp calls (llama-hooks.h).
//
// This file knows llama.cpp's internals (llama_kv_cache is a friend of kvggml::Tier);
// the codec (codec.h) knows nothing of them.

#include "tier.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "ggml-backend.h"
#include "ggml.h"
#include "llama-batch.h"
#include "llama-graph.h"
#include "llama-hooks.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"

namespace kvggml {

namespace {

uint64_t now_us() {
    return (uint64_t) std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}

constexpr int32_t kGroup = 64;  // channels per scale (docs/FORMAT.md, G)

kvggml_codec_params make_params(const Config & cfg, int32_t channels, int32_t head_dim) {
    if (channels % kGroup != 0) {
        throw std::invalid_argument("OLLAMA_KV_COMPRESSION=1 needs K/V rows of a multiple of " +
                                    std::to_string(kGroup) + " values; this model has " + std::to_string(channels));
    }
    kvggml_codec_params p{};
    p.levels    = (int32_t) cfg.level;
    p.group     = kGroup;
    p.rotation  = cfg.hadamard ? head_dim : 1;
    p.threshold = 0.0f;
    const auto bits = cfg.subband_bits();
    std::copy(bits.begin(), bits.begin() + cfg.level + 1, p.bits);
    return p;
}

// One decoder per thread: the codec owns its scratch and is not shared between threads.
BlockCodec & thread_codec(const kvggml_codec_params & params, int32_t channels) {
    thread_local std::unique_ptr<BlockCodec> codec;
    thread_local kvggml_codec_params key{};
    thread_local int32_t key_channels = 0;
    if (!codec || key_channels != channels || std::memcmp(&key, &params, sizeof(params)) != 0) {
        codec = std::make_unique<BlockCodec>(params, channels);
        key = params;
        key_channels = channels;
    }
    return *codec;
}

// llama.cpp's convention for position ranges: p0 < 0 is 0, p1 < 0 is "to the end".
void normalise_range(llama_pos & p0, llama_pos & p1) {
    if (p0 < 0) {
        p0 = 0;
    }
    if (p1 < 0) {
        p1 = std::numeric_limits<llama_pos>::max();
    }
}

void decode_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * view = static_cast<const LayerView *>(userdata);
    view->tier->decode_into(*view, dst, ith, nth);
}

} // namespace

// Visible-or-not of every compressed token for every query token of the micro-batch.
class AttnInput : public llm_graph_input_i {
public:
    AttnInput(const Tier & tier, ggml_tensor * mask) : tier(tier), mask(mask), generation(tier.generation()) {}

    void set_input(const llama_ubatch * ubatch) override {
        if (joined == nullptr) {
            return;  // no compressed token when the graph was built: the mask is not in it
        }
        GGML_ASSERT(ggml_backend_buffer_is_host(mask->buffer));
        const int64_t n_comp = mask->ne[0];
        const uint32_t B = tier.config().block_tokens();
        const auto & blocks = tier.blocks();
        const float blocked = -INFINITY;
        for (int64_t i = 0; i < mask->ne[1]; ++i) {
            for (int64_t j = 0; j < n_comp; ++j) {
                const Block & b = blocks[j / B];
                bool visible = false;
                if ((uint32_t) i < ubatch->n_tokens) {
                    for (int32_t s = 0; s < ubatch->n_seq_id[i]; ++s) {
                        visible = visible || (ubatch->seq_id[i][s] == b.seq && b.p1 <= ubatch->pos[i]);
                    }
                }
                const float value = visible ? 0.0f : blocked;
                if (mask->type == GGML_TYPE_F16) {
                    ((ggml_fp16_t *) mask->data)[i * n_comp + j] = ggml_fp32_to_fp16(value);
                } else {
                    ((float *) mask->data)[i * n_comp + j] = value;
                }
            }
        }
    }

    bool can_reuse(const llm_graph_params & params) override {
        GGML_UNUSED(params);
        return generation == tier.generation();
    }

    const Tier & tier;
    ggml_tensor * mask;            // [n_comp, n_tokens]: compressed tokens only
    ggml_tensor * joined = nullptr; // mask in front of llama.cpp's own, shared by every layer
    const uint64_t generation;
};

Tier::Tier(const Config & config, llama_kv_cache & kv) : kv(kv), cfg(config) {
    if (kv.n_stream != 1) {
        throw std::invalid_argument("OLLAMA_KV_COMPRESSION=1 needs a unified KV cache (kv_unified) "
                                    "when several sequences are used");
    }
    const size_t n_layer = kv.layers.size();
    for (const auto & layer : kv.layers) {
        if (layer.k->type != GGML_TYPE_F16 || (layer.v && layer.v->type != GGML_TYPE_F16)) {
            throw std::invalid_argument(std::string("OLLAMA_KV_COMPRESSION=1 needs an f16 KV cache; this one is ") +
                                        ggml_type_name(layer.k->type) + "/" +
                                        (layer.v ? ggml_type_name(layer.v->type) : "none"));
        }
        if (!layer.v) {
            throw std::invalid_argument("OLLAMA_KV_COMPRESSION=1 needs a V cache in every layer");
        }
    }
    const auto & hp = kv.hparams;
    const uint32_t il0 = kv.layers.front().il;
    for (const auto & layer : kv.layers) {
        if (hp.n_embd_k_gqa(layer.il) != hp.n_embd_k_gqa(il0) || hp.n_embd_v_gqa(layer.il) != hp.n_embd_v_gqa(il0)) {
            throw std::invalid_argument("OLLAMA_KV_COMPRESSION=1 needs the same K/V width in every layer");
        }
    }
    params_k = make_params(cfg, (int32_t) hp.n_embd_k_gqa(il0), (int32_t) hp.n_embd_head_k(il0));
    params_v = make_params(cfg, (int32_t) hp.n_embd_v_gqa(il0), (int32_t) hp.n_embd_head_v(il0));
    k_streams.resize(n_layer);
    v_streams.resize(n_layer);
    views.reserve(2 * n_layer);
    for (size_t ikv = 0; ikv < n_layer; ++ikv) {
        views.push_back({this, (int32_t) ikv, false, false});
        views.push_back({this, (int32_t) ikv, true, kv.v_trans});
    }
}

const LayerView * Tier::view(int32_t il, bool is_v) const {
    const int32_t ikv = kv.map_layer_ids.at(il);
    return &views[2 * ikv + (is_v ? 1 : 0)];
}

uint64_t Tier::block_bytes(size_t b) const {
    uint64_t total = 0;
    for (size_t ikv = 0; ikv < k_streams.size(); ++ikv) {
        total += k_streams[ikv].offsets[b + 1] - k_streams[ikv].offsets[b];
        total += v_streams[ikv].offsets[b + 1] - v_streams[ikv].offsets[b];
    }
    return total;
}

uint64_t Tier::block_f16_bytes() const {
    uint64_t total = 0;
    for (const auto & layer : kv.layers) {
        total += (uint64_t) cfg.block_tokens() * (layer.k->ne[0] + layer.v->ne[0]) * sizeof(ggml_fp16_t);
    }
    return total;
}

size_t Tier::exact_bytes() const {
    return kv.total_size();
}

size_t Tier::compressed_bytes() const {
    size_t total = 0;
    for (size_t i = 0; i < k_streams.size(); ++i) {
        total += k_streams[i].bytes.size() + v_streams[i].bytes.size();
    }
    return total;
}

void Tier::compress() {
    auto & cells = kv.v_cells[0];
    const uint32_t B = cfg.block_tokens();
    const uint32_t kv_size = cells.size();
    std::vector<std::vector<uint32_t>> runs;  // cell indices of each new block, in position order
    std::vector<llama_seq_id> run_seq;

    for (llama_seq_id seq = 0; seq < (llama_seq_id) kv.n_seq_max; ++seq) {
        const llama_pos pos_max = cells.seq_pos_max(seq);
        if (pos_max < 0) {
            continue;
        }
        const llama_pos limit = pos_max + 1 - (llama_pos) cfg.threshold;  // positions below it are old
        // whole blocks of consecutive, single-sequence cells between the sinks and the window
        std::vector<uint32_t> run;
        for (const auto & [pos, idx] : cells.seq_pos_get(seq)) {
            if (pos < (llama_pos) cfg.sinks) {
                continue;
            }
            if (pos >= limit) {
                break;
            }
            const bool extends = run.empty() || pos == cells.pos_get(run.back()) + 1;
            if (cells.seq_count(idx) != 1 || !extends) {
                run.clear();  // a cell shared by sequences stays exact: a block belongs to one sequence
            }
            if (cells.seq_count(idx) == 1) {
                run.push_back(idx);
            }
            if (run.size() == B) {
                runs.push_back(run);
                run_seq.push_back(seq);
                run.clear();
            }
        }
    }
    if (runs.empty()) {
        return;
    }

    const uint64_t t0 = now_us();
    std::vector<ggml_fp16_t> tensor;  // one layer's whole K or V, as stored
    std::vector<ggml_fp16_t> rows;    // one block, token-major
    for (size_t ikv = 0; ikv < kv.layers.size(); ++ikv) {
        const auto & layer = kv.layers[ikv];
        for (const bool is_v : {false, true}) {
            ggml_tensor * t = is_v ? layer.v : layer.k;
            const int64_t C = t->ne[0];
            const bool transposed = is_v && kv.v_trans;
            tensor.resize((size_t) C * kv_size);
            ggml_backend_tensor_get(t, tensor.data(), 0, tensor.size() * sizeof(ggml_fp16_t));
            rows.resize((size_t) B * C);
            const auto & params = is_v ? params_v : params_k;
            BlockCodec & codec = thread_codec(params, (int32_t) C);
            Stream & stream = is_v ? v_streams[ikv] : k_streams[ikv];
            for (const auto & run : runs) {
                for (uint32_t r = 0; r < B; ++r) {
                    for (int64_t c = 0; c < C; ++c) {
                        rows[r * C + c] = transposed ? tensor[c * kv_size + run[r]] : tensor[run[r] * C + c];
                    }
                }
                const size_t start = stream.bytes.size();
                stream.bytes.resize(start + codec.bound());
                const size_t n = codec.encode_f16((const uint16_t *) rows.data(), (size_t) C, stream.bytes.data() + start);
                stream.bytes.resize(start + n);
                stream.offsets.push_back(stream.bytes.size());
            }
        }
    }
    for (size_t r = 0; r < runs.size(); ++r) {
        blks.push_back({run_seq[r], cells.pos_get(runs[r].front()), cells.pos_get(runs[r].back()) + 1});
        for (const uint32_t idx : runs[r]) {
            cells.rm(idx);
        }
    }
    kv.v_heads[0] = 0;
    ++gen;
    encode_us += now_us() - t0;
    if (on_compress) {
        for (size_t b = blks.size() - runs.size(); b < blks.size(); ++b) {
            const kvggml_event event = {blks[b].seq, blks[b].p0, blks[b].p1, (int32_t) cfg.level,
                                        block_f16_bytes(), block_bytes(b)};
            on_compress(&event, on_compress_data);
        }
    }
}

void Tier::decode_into(const LayerView & view, ggml_tensor * dst, int ith, int nth) const {
    const uint64_t t0 = now_us();
    const Stream & stream = view.is_v ? v_streams[view.ikv] : k_streams[view.ikv];
    const auto & params = view.is_v ? params_v : params_k;
    const uint32_t B = cfg.block_tokens();
    const int64_t n_blocks = (int64_t) blks.size();
    const int64_t C = view.is_v ? kv.hparams.n_embd_v_gqa(kv.layers[view.ikv].il) : kv.hparams.n_embd_k_gqa(kv.layers[view.ikv].il);
    const int64_t n_comp = n_blocks * B;
    BlockCodec & codec = thread_codec(params, (int32_t) C);
    thread_local std::vector<float> block;
    block.resize((size_t) B * C);
    auto * out = (ggml_fp16_t *) dst->data;
    for (int64_t b = ith * n_blocks / nth; b < (ith + 1) * n_blocks / nth; ++b) {
        const uint8_t * data = stream.bytes.data() + stream.offsets[b];
        const size_t size = stream.offsets[b + 1] - stream.offsets[b];
        int rc;
        if (!view.transposed) {
            rc = codec.decode_f16(data, size, (uint16_t *) out + b * B * C, (size_t) C);
        } else {
            // dst is [channel][token]: the layout of a transposed V cache
            rc = codec.decode(data, size, block.data());
            for (uint32_t r = 0; r < B; ++r) {
                for (int64_t c = 0; c < C; ++c) {
                    out[c * n_comp + b * B + r] = ggml_fp32_to_fp16(block[r * C + c]);
                }
            }
        }
        GGML_ASSERT(rc == 0 && "kvggml: a compressed block failed to decode");
    }
    if (ith == 0) {
        decode_us += now_us() - t0;  // thread 0's share: a sample of the op's wall time
    }
}

template <typename Pred> void Tier::erase_blocks_if(Pred pred) {
    std::vector<bool> drop(blks.size());
    std::transform(blks.begin(), blks.end(), drop.begin(), pred);
    if (std::find(drop.begin(), drop.end(), true) == drop.end()) {
        return;
    }
    std::vector<Block> kept;
    for (size_t ikv = 0; ikv < k_streams.size(); ++ikv) {
        for (Stream * s : {&k_streams[ikv], &v_streams[ikv]}) {
            Stream out;
            for (size_t b = 0; b < blks.size(); ++b) {
                if (!drop[b]) {
                    out.bytes.insert(out.bytes.end(), s->bytes.begin() + s->offsets[b], s->bytes.begin() + s->offsets[b + 1]);
                    out.offsets.push_back(out.bytes.size());
                }
            }
            *s = std::move(out);
        }
    }
    for (size_t b = 0; b < blks.size(); ++b) {
        if (!drop[b]) {
            kept.push_back(blks[b]);
        }
    }
    blks = std::move(kept);
    ++gen;
}

void Tier::clear() {
    blks.clear();
    for (size_t ikv = 0; ikv < k_streams.size(); ++ikv) {
        k_streams[ikv] = Stream{};
        v_streams[ikv] = Stream{};
    }
    ++gen;
}

bool Tier::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    normalise_range(p0, p1);
    const auto hit = [&](const Block & blk) { return (seq_id < 0 || blk.seq == seq_id) && blk.overlaps(p0, p1); };
    if (std::any_of(blks.begin(), blks.end(), [&](const Block & blk) { return hit(blk) && !blk.inside(p0, p1); })) {
        return false;  // would cut a block in two: refuse rather than lose its other tokens
    }
    erase_blocks_if(hit);
    return true;
}

void Tier::seq_keep(llama_seq_id seq_id) {
    erase_blocks_if([&](const Block & blk) { return blk.seq != seq_id; });
}

bool Tier::seq_cp(llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1) {
    normalise_range(p0, p1);
    std::vector<size_t> copies;
    for (size_t b = 0; b < blks.size(); ++b) {
        const Block & blk = blks[b];
        if (blk.seq != src || !blk.overlaps(p0, p1)) {
            continue;
        }
        if (!blk.inside(p0, p1)) {
            LLAMA_LOG_ERROR("%s: kvggml: [%d, %d) cuts the compressed block [%d, %d) of sequence %d: nothing copied\n",
                            __func__, p0, p1, blk.p0, blk.p1, src);
            return false;
        }
        copies.push_back(b);
    }
    for (const size_t b : copies) {
        for (size_t ikv = 0; ikv < k_streams.size(); ++ikv) {
            for (Stream * s : {&k_streams[ikv], &v_streams[ikv]}) {
                const std::vector<uint8_t> block(s->bytes.begin() + s->offsets[b], s->bytes.begin() + s->offsets[b + 1]);
                s->bytes.insert(s->bytes.end(), block.begin(), block.end());
                s->offsets.push_back(s->bytes.size());
            }
        }
        blks.push_back({dst, blks[b].p0, blks[b].p1});
    }
    if (!copies.empty()) {
        ++gen;
    }
    return true;
}

bool Tier::holds(llama_seq_id seq_id, llama_pos p0, llama_pos p1) const {
    normalise_range(p0, p1);
    for (const Block & blk : blks) {
        if ((seq_id < 0 || blk.seq == seq_id) && blk.overlaps(p0, p1)) {
            return true;
        }
    }
    return false;
}

} // namespace kvggml

using kvggml::Tier;

static Tier * tier_of(llama_memory_i * memory) {
    auto * kv = dynamic_cast<llama_kv_cache *>(memory);
    return kv ? kv->kvggml_tier.get() : nullptr;
}

uint32_t kvggml_cache_cells(uint32_t n_ctx_seq, uint32_t n_batch, uint32_t n_seq_max) {
    const kvggml::Config cfg = kvggml::Config::from_env();
    if (!cfg.enabled) {
        return n_ctx_seq;
    }
    const uint64_t per_seq = (uint64_t) cfg.sinks + cfg.threshold + cfg.block_tokens();
    const uint64_t cells = GGML_PAD(per_seq * n_seq_max + n_batch, 32);  // small padding: every cell is f16 memory
    return (uint32_t) std::min<uint64_t>(cells, n_ctx_seq);
}

void kvggml_attach(llama_memory_i * memory, uint32_t n_ctx_seq) {
    const kvggml::Config cfg = kvggml::Config::from_env();
    if (!cfg.enabled) {
        return;
    }
    auto * kv = dynamic_cast<llama_kv_cache *>(memory);
    if (kv == nullptr) {
        throw std::invalid_argument("OLLAMA_KV_COMPRESSION=1 supports models with one full-attention KV cache; "
                                    "this model's memory is of another kind (sliding-window, recurrent or hybrid)");
    }
    kv->kvggml_tier = std::make_shared<Tier>(cfg, *kv);
    LLAMA_LOG_INFO("%s: kvggml compression on: window %u, sinks %u, level %u, preset %s, %u f16 cells for n_ctx %u\n",
                   __func__, cfg.threshold, cfg.sinks, cfg.level, cfg.preset.c_str(), kv->get_size(), n_ctx_seq);
}

void kvggml_after_ubatch(llama_memory_i * memory, ggml_backend_sched * sched) {
    if (Tier * tier = tier_of(memory)) {
        ggml_backend_sched_synchronize(sched);
        tier->compress();
    }
}

void kvggml_extend_attention(ggml_context * ctx, llm_graph_result * res, const llama_kv_cache_context * mctx,
                             kvggml::AttnInput *& input, int32_t il,
                             ggml_tensor *& k, ggml_tensor *& v, ggml_tensor *& kq_mask) {
    Tier * tier = mctx->kvggml_cache()->kvggml_tier.get();
    if (tier == nullptr) {
        return;
    }
    const int64_t n_comp = tier->n_tokens();
    if (input == nullptr) {
        ggml_tensor * mask = ggml_new_tensor_4d(ctx, kq_mask->type, std::max<int64_t>(n_comp, 1), kq_mask->ne[1],
                                                kq_mask->ne[2], kq_mask->ne[3]);
        ggml_set_input(mask);
        ggml_set_name(mask, "kvggml_kq_mask");
        auto owned = std::make_unique<kvggml::AttnInput>(*tier, mask);
        input = owned.get();
        res->add_input(std::move(owned));  // added even when empty: its can_reuse notices the first block
    }
    if (n_comp == 0) {
        return;
    }
    const auto * kview = tier->view(il, false);
    const auto * vview = tier->view(il, true);
    ggml_tensor * k_comp = ggml_custom_4d(ctx, GGML_TYPE_F16, k->ne[0], k->ne[1], n_comp, 1, nullptr, 0,
                                          kvggml::decode_op, GGML_N_TASKS_MAX, const_cast<kvggml::LayerView *>(kview));
    k = ggml_concat(ctx, k_comp, k, 2);
    if (!vview->transposed) {
        ggml_tensor * v_comp = ggml_custom_4d(ctx, GGML_TYPE_F16, v->ne[0], v->ne[1], n_comp, 1, nullptr, 0,
                                              kvggml::decode_op, GGML_N_TASKS_MAX, const_cast<kvggml::LayerView *>(vview));
        v = ggml_concat(ctx, v_comp, v, 2);
    } else {
        // v is [n_kv, n_head, head_dim] with n_kv fastest: join along tokens in [tokens, head_dim, n_head]
        // order, then view it back the way build_attn_mha recognises a transposed V.
        const int64_t head_dim = v->ne[2], n_head = v->ne[1];
        ggml_tensor * v_comp = ggml_custom_4d(ctx, GGML_TYPE_F16, n_comp, head_dim, n_head, 1, nullptr, 0,
                                              kvggml::decode_op, GGML_N_TASKS_MAX, const_cast<kvggml::LayerView *>(vview));
        ggml_tensor * joined = ggml_concat(ctx, v_comp, ggml_permute(ctx, v, 0, 2, 1, 3), 0);
        v = ggml_permute(ctx, joined, 0, 2, 1, 3);
    }
    if (input->joined == nullptr) {
        input->joined = ggml_concat(ctx, input->mask, kq_mask, 0);
    }
    kq_mask = input->joined;
}

void kvggml_clear(llama_kv_cache & kv) {
    if (kv.kvggml_tier) {
        kv.kvggml_tier->clear();
    }
}

bool kvggml_seq_rm(llama_kv_cache & kv, llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    return !kv.kvggml_tier || kv.kvggml_tier->seq_rm(seq_id, p0, p1);
}

void kvggml_seq_keep(llama_kv_cache & kv, llama_seq_id seq_id) {
    if (kv.kvggml_tier) {
        kv.kvggml_tier->seq_keep(seq_id);
    }
}

bool kvggml_seq_cp(llama_kv_cache & kv, llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1) {
    return !kv.kvggml_tier || kv.kvggml_tier->seq_cp(src, dst, p0, p1);
}

bool kvggml_can_move(const llama_kv_cache & kv, const char * op, llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (!kv.kvggml_tier || !kv.kvggml_tier->holds(seq_id, p0, p1)) {
        return true;
    }
    LLAMA_LOG_ERROR("%s: kvggml: %s on sequence %d [%d, %d) would move compressed keys, which carry RoPE at their "
                    "old positions: refused, nothing changed\n", __func__, op, seq_id, p0, p1);
    return false;
}

bool kvggml_holds_compressed(const llama_kv_cache & kv) {
    return kv.kvggml_tier && !kv.kvggml_tier->blocks().empty();
}
