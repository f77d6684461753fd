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
#include "llama-io.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"
#include "llama-model.h"
#include "llama-cparams.h"

namespace kvggml {

namespace {

uint64_t now_us() {
    return (uint64_t) std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}

constexpr int32_t kGroup = 64;  // channels per scale (docs/FORMAT.md, G)

// rotated: llama.cpp stores this cache's values in the Hadamard basis already (attn_rot_k/v).
kvggml_codec_params make_params(const Config & cfg, int32_t channels, int32_t head_dim, bool rotated) {
    if (channels % kGroup != 0) {
        throw std::invalid_argument("OLLAMA_KV_COMPRESSION=1 needs K/V rows of a multiple of " +
                                    std::to_string(kGroup) + " values; this model has " + std::to_string(channels));
    }
    kvggml_codec_params p{};
    p.levels    = (int32_t) cfg.level;
    p.group     = kGroup;
    p.rotation  = cfg.hadamard && !rotated ? head_dim : 1;
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

// FNV-1a, 64 bits: a saved section's checksum, so a changed byte fails the load instead of
// decoding into wrong keys and values.
struct Fnv1a {
    uint64_t value = 0xcbf29ce484222325ull;
    void add(const void * data, size_t size) {
        for (const uint8_t * p = (const uint8_t *) data; size-- > 0; ++p) {
            value = (value ^ *p) * 0x100000001b3ull;
        }
    }
};

// dst = the layer's compressed tokens, then (when src[0], the exact cells, is given) those
// cells' rows: one pass where decoding and a ggml_concat would write the tier twice.
void decode_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * view = static_cast<const LayerView *>(userdata);
    view->tier->decode_into(*view, dst, ith, nth);
    if (const ggml_tensor * exact = dst->src[0]) {
        GGML_ASSERT(exact->nb[0] == sizeof(ggml_fp16_t) && exact->nb[1] == exact->ne[0] * exact->nb[0]);
        const size_t row = exact->ne[0] * exact->ne[1] * sizeof(ggml_fp16_t);
        const int64_t n_exact = exact->ne[2], first = dst->ne[2] - n_exact;
        for (int64_t r = ith * n_exact / nth; r < (ith + 1) * n_exact / nth; ++r) {
            std::memcpy((char *) dst->data + (first + r) * row, (const char *) exact->data + r * exact->nb[2], row);
        }
    }
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
                const llama_pos pos = b.pos[j % B];
                bool visible = false;
                if ((uint32_t) i < ubatch->n_tokens && pos >= 0) {
                    for (int32_t s = 0; s < ubatch->n_seq_id[i]; ++s) {
                        visible = visible || (ubatch->seq_id[i][s] == b.seq && pos <= ubatch->pos[i]);
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

bool Block::empty() const {
    return std::none_of(pos.begin(), pos.end(), [](llama_pos p) { return p >= 0; });
}

uint32_t Block::n_alive() const {
    return (uint32_t) std::count_if(pos.begin(), pos.end(), [](llama_pos p) { return p >= 0; });
}

llama_pos Block::first() const {
    llama_pos lo = std::numeric_limits<llama_pos>::max();
    for (const llama_pos p : pos) {
        lo = p >= 0 ? std::min(lo, p) : lo;
    }
    return lo;
}

llama_pos Block::end() const {
    return *std::max_element(pos.begin(), pos.end()) + 1;
}

bool Block::holds(llama_pos p0, llama_pos p1) const {
    return std::any_of(pos.begin(), pos.end(), [&](llama_pos p) { return p >= 0 && p >= p0 && p < p1; });
}

Tier::Tier(const Config & config, llama_kv_cache & kv, const llama_cparams & cparams)
    : kv(kv), cfg(config), cells_for_recent(config.sinks + config.threshold), n_ctx(cparams.n_ctx_seq) {
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
    update_params();
    k_streams.resize(n_layer);
    v_streams.resize(n_layer);
    views.reserve(2 * n_layer);
    for (size_t ikv = 0; ikv < n_layer; ++ikv) {
        views.push_back({this, (int32_t) ikv, false, false});
        views.push_back({this, (int32_t) ikv, true, kv.v_trans});
    }

    // Moving compressed keys re-applies RoPE as llama.cpp's own K-shift does (build_rope_shift),
    // for the plain rotations only; anything else refuses to move them.
    if (cparams.yarn_ext_factor != 0.0f || cparams.yarn_attn_factor != 1.0f) {
        no_shift = "YaRN RoPE scaling";
    } else if (hp.n_pos_per_embd() != 1 || hp.n_lora_kv > 0) {
        no_shift = "multi-dimensional positions or latent attention";
    } else if (hp.rope_type != LLAMA_ROPE_TYPE_NORM && hp.rope_type != LLAMA_ROPE_TYPE_NEOX &&
               hp.rope_type != LLAMA_ROPE_TYPE_NONE) {
        no_shift = "this model's RoPE type";
    }
    for (const auto & layer : kv.layers) {
        Rope rope;
        rope.on = hp.rope_type != LLAMA_ROPE_TYPE_NONE && hp.has_rope(layer.il);
        rope.neox = hp.rope_type == LLAMA_ROPE_TYPE_NEOX;
        rope.n_rot = (int) hp.n_rot(layer.il);
        rope.freq_base = kv.model.get_rope_freq_base(cparams, layer.il);
        rope.freq_scale = kv.model.get_rope_freq_scale(cparams, layer.il);
        if (rope.on && kv.model.get_rope_factors(cparams, layer.il) != nullptr && no_shift.empty()) {
            no_shift = "per-dimension RoPE frequency factors";
        }
        ropes.push_back(rope);
    }
}

uint32_t Tier::cache_basis() const {
    return (kv.attn_rot_k ? 1u : 0u) | (kv.attn_rot_v ? 2u : 0u);
}

void Tier::update_params() {
    const auto & hp = kv.hparams;
    const uint32_t il0 = kv.layers.front().il;
    params_k = make_params(cfg, (int32_t) hp.n_embd_k_gqa(il0), (int32_t) hp.n_embd_head_k(il0), kv.attn_rot_k);
    params_v = make_params(cfg, (int32_t) hp.n_embd_v_gqa(il0), (int32_t) hp.n_embd_head_v(il0), kv.attn_rot_v);
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

uint64_t Tier::n_alive() const {
    uint64_t n = 0;
    for (const Block & blk : blks) {
        n += blk.n_alive();
    }
    return n;
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

    // The cells left are moved to the front, in order: the layout a saved state restores to,
    // so a restored context computes exactly what this one does.
    std::vector<bool> leaving(kv_size);
    for (const auto & run : runs) {
        for (const uint32_t idx : run) {
            leaving[idx] = true;
        }
    }
    std::vector<uint32_t> kept;
    for (uint32_t idx = 0; idx < kv_size; ++idx) {
        if (!cells.is_empty(idx) && !leaving[idx]) {
            kept.push_back(idx);
        }
    }
    const bool compact = !cells.get_has_shift();  // a pending K-shift is kept per cell: leave them be

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
            if (compact) {
                for (size_t k = 0; k < kept.size(); ++k) {  // kept[k] >= k: copying upwards is safe
                    for (int64_t c = 0; c < C; ++c) {
                        auto & to = transposed ? tensor[c * kv_size + k] : tensor[k * C + c];
                        to = transposed ? tensor[c * kv_size + kept[k]] : tensor[kept[k] * C + c];
                    }
                }
                ggml_backend_tensor_set(t, tensor.data(), 0, tensor.size() * sizeof(ggml_fp16_t));
            }
        }
    }
    for (size_t r = 0; r < runs.size(); ++r) {
        Block blk{run_seq[r], {}, std::vector<llama_pos>(B, 0)};
        for (const uint32_t idx : runs[r]) {
            blk.pos.push_back(cells.pos_get(idx));
            cells.rm(idx);
        }
        blks.push_back(std::move(blk));
    }
    if (compact) {
        const llama_kv_cells moved = cells.cp(kept);
        for (const uint32_t idx : kept) {
            cells.rm(idx);
        }
        cells.set(0, moved);
    }
    kv.v_heads[0] = 0;
    ++gen;
    encode_us += now_us() - t0;
    if (on_compress) {
        for (size_t b = blks.size() - runs.size(); b < blks.size(); ++b) {
            const kvggml_event event = {blks[b].seq, blks[b].first(), blks[b].end(), (int32_t) cfg.level,
                                        block_f16_bytes(), block_bytes(b)};
            on_compress(&event, on_compress_data);
        }
    }
}

void Tier::rotate_keys(const Rope & rope, const Block & blk, uint16_t * rows, int64_t C) const {
    const int64_t head_dim = kv.hparams.n_embd_head_k(kv.layers.front().il);
    const int half = rope.n_rot / 2;
    // pair (a, b) of dimension pair i: NORM rotates (2i, 2i+1), NEOX (i, i + n_rot/2)
    const int step = rope.neox ? 1 : 2, other = rope.neox ? half : 1;
    const float theta_scale = powf(rope.freq_base, -2.0f / rope.n_rot);
    // keys stored in llama.cpp's Hadamard basis leave it for RoPE and return (the rotation is
    // its own inverse), as its K-shift does; its length as in llama_kv_cache::build_input_k_rot
    int32_t k_rot = 1;
    if (kv.attn_rot_k) {
        for (k_rot = 64; kv.n_embd_head_k_all % (2 * k_rot) == 0; k_rot *= 2) {
        }
    }
    thread_local std::vector<float> cos_sin, row;
    cos_sin.resize(2 * half);
    row.resize((size_t) C);
    for (size_t r = 0; r < blk.pos.size(); ++r) {
        if (blk.moved[r] == 0) {
            continue;
        }
        float theta = (float) blk.moved[r];  // as ggml_rope_cache_init: theta *= theta_scale per pair
        for (int i = 0; i < half; ++i) {
            cos_sin[2 * i] = cosf(rope.freq_scale * theta);
            cos_sin[2 * i + 1] = sinf(rope.freq_scale * theta);
            theta *= theta_scale;
        }
        uint16_t * key = rows + r * C;
        for (int64_t c = 0; c < C; ++c) {
            row[c] = fp16_to_fp32(key[c]);
        }
        hadamard_rows(row.data(), 1, (int32_t) C, k_rot);
        for (int64_t h = 0; h < C / head_dim; ++h) {
            float * x = row.data() + h * head_dim;
            for (int i = 0; i < half; ++i) {
                const int a = i * step, b = a + other;
                const float x0 = x[a], x1 = x[b];
                x[a] = x0 * cos_sin[2 * i] - x1 * cos_sin[2 * i + 1];
                x[b] = x0 * cos_sin[2 * i + 1] + x1 * cos_sin[2 * i];
            }
        }
        hadamard_rows(row.data(), 1, (int32_t) C, k_rot);
        for (int64_t c = 0; c < C; ++c) {
            key[c] = fp32_to_fp16(row[c]);
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
    const Rope & rope = ropes[view.ikv];
    BlockCodec & codec = thread_codec(params, (int32_t) C);
    thread_local std::vector<float> block;
    block.resize((size_t) B * C);
    auto * out = (ggml_fp16_t *) dst->data;
    for (int64_t b = ith * n_blocks / nth; b < (ith + 1) * n_blocks / nth; ++b) {
        const uint8_t * data = stream.bytes.data() + stream.offsets[b];
        const size_t size = stream.offsets[b + 1] - stream.offsets[b];
        int rc;
        if (!view.transposed) {
            auto * rows = (uint16_t *) out + b * B * C;
            rc = codec.decode_f16(data, size, rows, (size_t) C);
            if (!view.is_v && rope.on) {
                rotate_keys(rope, blks[b], rows, C);
            }
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
            kept.push_back(std::move(blks[b]));
        }
    }
    blks = std::move(kept);
    ++gen;
}

void Tier::append_copy(const Block & blk, const std::vector<Stream> & from_k, const std::vector<Stream> & from_v,
                       size_t b) {
    for (size_t ikv = 0; ikv < k_streams.size(); ++ikv) {
        for (const bool is_v : {false, true}) {
            const Stream & from = is_v ? from_v[ikv] : from_k[ikv];
            Stream & to = is_v ? v_streams[ikv] : k_streams[ikv];
            // copied first: `from` may be `to`, whose storage the insert can move
            const std::vector<uint8_t> bytes(from.bytes.begin() + from.offsets[b], from.bytes.begin() + from.offsets[b + 1]);
            to.bytes.insert(to.bytes.end(), bytes.begin(), bytes.end());
            to.offsets.push_back(to.bytes.size());
        }
    }
    blks.push_back(blk);
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

void Tier::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    normalise_range(p0, p1);
    for (Block & blk : blks) {
        if (seq_id < 0 || blk.seq == seq_id) {
            for (llama_pos & p : blk.pos) {
                p = p >= p0 && p < p1 ? -1 : p;  // the bytes stay until the block's last token goes
            }
        }
    }
    erase_blocks_if([](const Block & blk) { return blk.empty(); });
}

void Tier::seq_keep(llama_seq_id seq_id) {
    erase_blocks_if([&](const Block & blk) { return blk.seq != seq_id; });
}

void Tier::seq_cp(llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1) {
    normalise_range(p0, p1);
    const size_t n = blks.size();
    for (size_t b = 0; b < n; ++b) {
        if (blks[b].seq != src || !blks[b].holds(p0, p1)) {
            continue;
        }
        Block copy = blks[b];
        copy.seq = dst;
        for (llama_pos & p : copy.pos) {
            p = p >= p0 && p < p1 ? p : -1;  // the copy holds the range's tokens only
        }
        append_copy(copy, k_streams, v_streams, b);
    }
}

template <typename F>
bool Tier::move(const char * op, llama_seq_id seq_id, llama_pos p0, llama_pos p1, F new_pos) {
    normalise_range(p0, p1);
    const auto hit = [&](const Block & blk) { return blk.seq == seq_id && blk.holds(p0, p1); };
    if (std::none_of(blks.begin(), blks.end(), hit)) {
        return true;
    }
    if (!no_shift.empty()) {
        LLAMA_LOG_ERROR("%s: kvggml: %s on sequence %d [%d, %d) would move compressed keys, which cannot be "
                        "re-rotated for %s: refused, nothing changed\n", __func__, op, seq_id, p0, p1, no_shift.c_str());
        return false;
    }
    for (Block & blk : blks) {
        if (!hit(blk)) {
            continue;
        }
        for (size_t r = 0; r < blk.pos.size(); ++r) {
            if (blk.pos[r] >= p0 && blk.pos[r] < p1) {
                const llama_pos to = new_pos(blk.pos[r]);
                blk.moved[r] += to - blk.pos[r];
                blk.pos[r] = to < 0 ? -1 : to;  // moved before position 0: removed, as llama.cpp does
            }
        }
    }
    erase_blocks_if([](const Block & blk) { return blk.empty(); });
    ++gen;
    return true;
}

bool Tier::seq_add(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos delta) {
    return move("seq_add", seq_id, p0, p1, [&](llama_pos p) { return p + delta; });
}

bool Tier::seq_div(llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    return move("seq_div", seq_id, p0, p1, [&](llama_pos p) { return p / d; });
}

void Tier::set_settings(const Settings & s) {
    if (!is_preset(s.preset)) {
        throw std::invalid_argument("preset '" + s.preset + "' is not allowed: expected one of hi, balanced, lo");
    }
    if ((uint64_t) s.sinks + s.threshold > cells_for_recent) {
        throw std::invalid_argument("threshold + sinks = " + std::to_string((uint64_t) s.sinks + s.threshold) +
                                    " is out of range: this context's cache was sized for at most " +
                                    std::to_string(cells_for_recent) +
                                    " (OLLAMA_KV_COMPRESSION_THRESHOLD + OLLAMA_KV_COMPRESSION_SINKS when it was created)");
    }
    cfg.threshold = s.threshold;
    cfg.sinks = s.sinks;
    cfg.preset = s.preset;
    update_params();  // new blocks only: every block's header carries its own subband widths
}

void Tier::state_write(llama_io_write_i & io, llama_seq_id seq_id) const {
    Fnv1a hash;
    const auto write = [&](const void * data, size_t size) {
        io.write(data, size);
        hash.add(data, size);
    };
    const auto put = [&](uint32_t value) { write(&value, sizeof(value)); };
    std::vector<size_t> chosen;
    for (size_t b = 0; b < blks.size(); ++b) {
        if (seq_id < 0 || blks[b].seq == seq_id) {
            chosen.push_back(b);
        }
    }
    put(kStateMagic);
    put(kStateVersion);
    put(cfg.level);
    put((uint32_t) k_streams.size());
    put((uint32_t) kv.hparams.n_embd_k_gqa(kv.layers.front().il));
    put((uint32_t) kv.hparams.n_embd_v_gqa(kv.layers.front().il));
    put(cache_basis());
    put((uint32_t) chosen.size());
    for (const size_t b : chosen) {
        put((uint32_t) blks[b].seq);
        write(blks[b].pos.data(), blks[b].pos.size() * sizeof(llama_pos));
        write(blks[b].moved.data(), blks[b].moved.size() * sizeof(llama_pos));
        for (size_t ikv = 0; ikv < k_streams.size(); ++ikv) {
            for (const Stream * s : {&k_streams[ikv], &v_streams[ikv]}) {
                put((uint32_t) (s->offsets[b + 1] - s->offsets[b]));
                write(s->bytes.data() + s->offsets[b], s->offsets[b + 1] - s->offsets[b]);
            }
        }
    }
    io.write(&hash.value, sizeof(hash.value));
}

void Tier::state_read(llama_io_read_i & io, llama_seq_id seq_id, uint32_t & first_word) {
    staged = Staged{};
    if (first_word != kStateMagic) {
        if (cache_basis() != 0) {
            throw std::runtime_error("kvggml: this state was saved without OLLAMA_KV_COMPRESSION; this context keeps "
                                     "K/V Hadamard-rotated, so load it into a context without compression, or with "
                                     "OLLAMA_KV_COMPRESSION_HADAMARD=0");
        }
        return;  // saved without compression, in the basis this cache uses: llama.cpp's own data follows
    }
    Fnv1a hash;
    hash.add(&first_word, sizeof(first_word));
    const auto read = [&](void * data, size_t size) {
        io.read(data, size);
        hash.add(data, size);
    };
    const auto get = [&]() {
        uint32_t value;
        read(&value, sizeof(value));
        return value;
    };
    const auto expect = [&](const std::string & what, uint32_t want) {
        const uint32_t got = get();
        if (got != want) {
            throw std::runtime_error("kvggml: the saved state's " + what + " is " + std::to_string(got) +
                                     ", this context's is " + std::to_string(want));
        }
    };
    const auto & hp = kv.hparams;
    const uint32_t il0 = kv.layers.front().il;
    const uint32_t B = cfg.block_tokens();
    expect("format version", kStateVersion);
    expect("Haar level (OLLAMA_KV_COMPRESSION_LEVEL)", cfg.level);
    expect("number of cache layers", (uint32_t) k_streams.size());
    expect("K width", hp.n_embd_k_gqa(il0));
    expect("V width", hp.n_embd_v_gqa(il0));
    expect("K/V basis (1: K rotated, 2: V rotated; OLLAMA_KV_COMPRESSION_HADAMARD)", cache_basis());
    const uint32_t n_blocks = get();
    staged.k_streams.resize(k_streams.size());
    staged.v_streams.resize(v_streams.size());
    std::vector<float> scratch;
    for (uint32_t i = 0; i < n_blocks; ++i) {
        const std::string where = "kvggml: saved block " + std::to_string(i) + " of " + std::to_string(n_blocks);
        Block blk{(llama_seq_id) get(), std::vector<llama_pos>(B), std::vector<llama_pos>(B)};
        if (seq_id < 0 && (blk.seq < 0 || blk.seq >= (llama_seq_id) kv.n_seq_max)) {
            throw std::runtime_error(where + ": sequence " + std::to_string(blk.seq) + " is out of range: expected 0 to " +
                                     std::to_string(kv.n_seq_max - 1));
        }
        blk.seq = seq_id < 0 ? blk.seq : seq_id;
        read(blk.pos.data(), B * sizeof(llama_pos));
        read(blk.moved.data(), B * sizeof(llama_pos));
        if (blk.empty() || std::any_of(blk.pos.begin(), blk.pos.end(), [](llama_pos p) { return p < -1; })) {
            throw std::runtime_error(where + ": invalid positions");
        }
        if (!no_shift.empty() && std::any_of(blk.moved.begin(), blk.moved.end(), [](llama_pos m) { return m != 0; })) {
            throw std::runtime_error(where + ": moved keys, which cannot be re-rotated for " + no_shift);
        }
        for (size_t ikv = 0; ikv < k_streams.size(); ++ikv) {
            for (const bool is_v : {false, true}) {
                const auto & params = is_v ? params_v : params_k;
                const int32_t C = (int32_t) (is_v ? hp.n_embd_v_gqa(il0) : hp.n_embd_k_gqa(il0));
                BlockCodec & codec = thread_codec(params, C);
                Stream & stream = is_v ? staged.v_streams[ikv] : staged.k_streams[ikv];
                const uint32_t size = get();
                if (size > codec.bound()) {
                    throw std::runtime_error(where + ": " + std::to_string(size) + " bytes, above the largest block (" +
                                             std::to_string(codec.bound()) + ")");
                }
                const size_t start = stream.bytes.size();
                stream.bytes.resize(start + size);
                read(stream.bytes.data() + start, size);
                stream.offsets.push_back(stream.bytes.size());
                // decoded once here, so attention never meets a block that fails
                scratch.resize((size_t) B * C);
                const int32_t rc = codec.decode(stream.bytes.data() + start, size, scratch.data());
                if (rc != KVGGML_OK) {
                    throw std::runtime_error(where + ", layer " + std::to_string(ikv) + (is_v ? " V" : " K") +
                                             ": " + kvggml_error_name(rc));
                }
            }
        }
        staged.blks.push_back(std::move(blk));
    }
    uint64_t saved_hash;
    io.read(&saved_hash, sizeof(saved_hash));
    if (saved_hash != hash.value) {
        staged = Staged{};
        throw std::runtime_error("kvggml: the saved compressed blocks are corrupt (checksum mismatch)");
    }
    io.read(&first_word, sizeof(first_word));  // llama.cpp's own data follows
}

void Tier::state_commit(llama_seq_id seq_id) {
    if (seq_id < 0) {
        clear();
    } else {
        erase_blocks_if([&](const Block & blk) { return blk.seq == seq_id; });
    }
    for (size_t b = 0; b < staged.blks.size(); ++b) {
        append_copy(staged.blks[b], staged.k_streams, staged.v_streams, b);
    }
    staged = Staged{};
}

} // namespace kvggml

using kvggml::Tier;

namespace kvggml {

llama_kv_cache * compressible_cache(llama_memory_i * memory) {
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(memory)) {
        return iswa->get_base();  // the full-attention layers; the window layers stay as they are
    }
    return dynamic_cast<llama_kv_cache *>(memory);
}

} // namespace kvggml

static Tier * tier_of(llama_memory_i * memory) {
    auto * kv = kvggml::compressible_cache(memory);
    return kv ? kv->kvggml_tier.get() : nullptr;
}

bool kvggml_rotates_cache(const llama_hparams & hparams) {
    const kvggml::Config cfg = kvggml::Config::from_env();
    bool full_rope = true;
    for (uint32_t il = 0; il < hparams.n_layer(); ++il) {
        full_rope = full_rope && (!hparams.has_rope(il) || hparams.n_rot(il) == hparams.n_embd_head_k(il));
    }
    return cfg.enabled && cfg.hadamard && full_rope;
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

void kvggml_attach(llama_memory_i * memory, const llama_cparams & cparams) {
    const kvggml::Config cfg = kvggml::Config::from_env();
    if (!cfg.enabled) {
        return;
    }
    llama_kv_cache * kv = kvggml::compressible_cache(memory);
    if (kv == nullptr) {
        throw std::invalid_argument("OLLAMA_KV_COMPRESSION=1 supports models with a full-attention KV cache "
                                    "(plain or beside sliding-window layers); this model's memory is recurrent or hybrid");
    }
    kv->kvggml_tier = std::make_shared<Tier>(cfg, *kv, cparams);
    LLAMA_LOG_INFO("%s: kvggml compression on: window %u, sinks %u, level %u, preset %s, %u f16 cells for n_ctx %u\n",
                   __func__, cfg.threshold, cfg.sinks, cfg.level, cfg.preset.c_str(), kv->get_size(), cparams.n_ctx_seq);
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
    k = ggml_custom_4d(ctx, GGML_TYPE_F16, k->ne[0], k->ne[1], n_comp + k->ne[2], 1, &k, 1,
                       kvggml::decode_op, GGML_N_TASKS_MAX, const_cast<kvggml::LayerView *>(kview));
    if (!vview->transposed) {
        v = ggml_custom_4d(ctx, GGML_TYPE_F16, v->ne[0], v->ne[1], n_comp + v->ne[2], 1, &v, 1,
                           kvggml::decode_op, GGML_N_TASKS_MAX, const_cast<kvggml::LayerView *>(vview));
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

void kvggml_seq_rm(llama_kv_cache & kv, llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (kv.kvggml_tier) {
        kv.kvggml_tier->seq_rm(seq_id, p0, p1);
    }
}

void kvggml_seq_keep(llama_kv_cache & kv, llama_seq_id seq_id) {
    if (kv.kvggml_tier) {
        kv.kvggml_tier->seq_keep(seq_id);
    }
}

void kvggml_seq_cp(llama_kv_cache & kv, llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1) {
    if (kv.kvggml_tier) {
        kv.kvggml_tier->seq_cp(src, dst, p0, p1);
    }
}

bool kvggml_seq_add(llama_kv_cache & kv, llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) {
    return !kv.kvggml_tier || shift == 0 || kv.kvggml_tier->seq_add(seq_id, p0, p1, shift);
}

bool kvggml_seq_div(llama_kv_cache & kv, llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    return !kv.kvggml_tier || d == 1 || kv.kvggml_tier->seq_div(seq_id, p0, p1, d);
}

bool kvggml_can_shift(const llama_kv_cache & kv) {
    return !kv.kvggml_tier || kv.kvggml_tier->shift_refusal().empty();
}

bool kvggml_swa_is_full(const llama_kv_cache & base, const llama_kv_cache & swa) {
    return base.kvggml_tier && swa.get_size() >= base.kvggml_tier->n_ctx_seq();
}

llama_pos kvggml_seq_pos_min(const llama_kv_cache & kv, llama_seq_id seq_id, llama_pos cells_min) {
    if (!kv.kvggml_tier) {
        return cells_min;
    }
    llama_pos lo = cells_min < 0 ? std::numeric_limits<llama_pos>::max() : cells_min;
    for (const kvggml::Block & blk : kv.kvggml_tier->blocks()) {
        lo = blk.seq == seq_id ? std::min(lo, blk.first()) : lo;
    }
    return lo == std::numeric_limits<llama_pos>::max() ? -1 : lo;
}

llama_pos kvggml_seq_pos_max(const llama_kv_cache & kv, llama_seq_id seq_id, llama_pos cells_max) {
    llama_pos hi = cells_max;
    if (!kv.kvggml_tier) {
        return cells_max;
    }
    for (const kvggml::Block & blk : kv.kvggml_tier->blocks()) {
        hi = blk.seq == seq_id ? std::max(hi, blk.end() - 1) : hi;
    }
    return hi;
}

void kvggml_state_write(const llama_kv_cache & kv, llama_io_write_i & io, llama_seq_id seq_id) {
    if (kv.kvggml_tier) {
        kv.kvggml_tier->state_write(io, seq_id);
    }
}

void kvggml_state_read(llama_kv_cache & kv, llama_io_read_i & io, llama_seq_id seq_id, uint32_t & first_word) {
    if (kv.kvggml_tier) {
        kv.kvggml_tier->state_read(io, seq_id, first_word);
    } else if (first_word == kvggml::kStateMagic) {
        throw std::runtime_error("kvggml: this state holds compressed KV blocks; load it into a context created "
                                 "with OLLAMA_KV_COMPRESSION=1 (and the same level)");
    }
}

void kvggml_state_commit(llama_kv_cache & kv, llama_seq_id seq_id) {
    if (kv.kvggml_tier) {
        kv.kvggml_tier->state_commit(seq_id);
    }
}
