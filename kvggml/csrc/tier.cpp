// The compressed tier's store: construction, accounting, and compress(), which moves whole
// blocks of old tokens out of llama.cpp's cells into encoded streams.
//
// The tier's other concerns live beside it: tier-memory.cpp (llama.cpp's memory operations),
// tier-state.cpp (saved states), attention.cpp (attention over the tier) and llama-hooks.cpp
// (the entry points the patches call). This code knows llama.cpp's internals
// (llama_kv_cache is a friend of kvggml::Tier); the codec (codec.h) knows nothing of them.

#include "tier.h"

#include <algorithm>
#include <functional>
#include <chrono>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "ggml-backend.h"
#include "ggml.h"
#include "llama-cparams.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

namespace kvggml {

namespace {

constexpr int32_t kGroup = 64;  // channels per scale (docs/FORMAT.md, G)

// rotated: llama.cpp stores this cache's values in the Hadamard basis already (attn_rot_k/v).
// il: the model layer whose preset gives the widths.
kvggml_codec_params make_params(const Config & cfg, int32_t channels, int32_t head_dim, bool rotated, bool is_v,
                                uint32_t il) {
    if (channels % kGroup != 0) {
        throw std::invalid_argument("OLLAMA_KV_COMPRESSION=1 needs K/V rows of a multiple of " +
                                    std::to_string(kGroup) + " values; this model has " + std::to_string(channels));
    }
    kvggml_codec_params p{};
    p.levels    = (int32_t) cfg.level;
    p.group     = kGroup;
    p.rotation  = cfg.hadamard && !rotated ? head_dim : 1;
    p.threshold = 0.0f;
    const auto bits = cfg.subband_bits(is_v, il);
    std::copy(bits.begin(), bits.begin() + cfg.level + 1, p.bits);
    return p;
}

} // namespace

uint64_t now_us() {
    return (uint64_t) std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}

BlockCodec & thread_codec(const kvggml_codec_params & params, int32_t channels, bool is_v) {
    struct Slot {
        std::unique_ptr<BlockCodec> codec;
        kvggml_codec_params key{};
        int32_t channels = 0;
    };
    thread_local Slot slots[2];  // K's and V's
    Slot & slot = slots[is_v];
    if (!slot.codec || slot.channels != channels || std::memcmp(&slot.key, &params, sizeof(params)) != 0) {
        slot = {std::make_unique<BlockCodec>(params, channels), params, channels};
    }
    return *slot.codec;
}

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
        // the tier reads and writes cells in place, on the CPU
        for (const ggml_tensor * t : {layer.k, layer.v}) {
            if (!ggml_backend_buffer_is_host(t->buffer)) {
                throw std::invalid_argument(std::string("OLLAMA_KV_COMPRESSION=1 needs the KV cache in host memory; "
                                                        "layer ") + std::to_string(layer.il) + "'s is in the " +
                                            ggml_backend_buffer_name(t->buffer) +
                                            " buffer: keep it on the CPU (llama.cpp's --no-kv-offload, -nkvo)");
            }
        }
    }
    const auto & hp = kv.hparams;
    const uint32_t il0 = kv.layers.front().il;
    for (const auto & layer : kv.layers) {
        if (hp.n_embd_k_gqa(layer.il) != hp.n_embd_k_gqa(il0) || hp.n_embd_v_gqa(layer.il) != hp.n_embd_v_gqa(il0)) {
            throw std::invalid_argument("OLLAMA_KV_COMPRESSION=1 needs the same K/V width in every layer");
        }
    }
    for (const auto & [il, preset] : config.layer_presets) {
        if (kv.map_layer_ids.count((int32_t) il) == 0) {
            std::string allowed;
            for (const auto & layer : kv.layers) {
                allowed += (allowed.empty() ? "" : ", ") + std::to_string(layer.il);
            }
            throw std::invalid_argument("OLLAMA_KV_COMPRESSION_LAYERS names layer " + std::to_string(il) +
                                        ", which compression does not apply to: allowed this model's full-attention "
                                        "layers, " + allowed);
        }
    }
    update_params();
    n_heads_kv = hp.n_head_kv(il0);
    for (const uint32_t width : {hp.n_embd_k_gqa(il0), hp.n_embd_v_gqa(il0)}) {
        if (cfg.guidance && (width / n_heads_kv) % kGroup != 0) {
            throw std::invalid_argument("OLLAMA_KV_COMPRESSION_GUIDANCE=1 steps each KV head on its own, which needs "
                                        "heads of a multiple of " + std::to_string(kGroup) + " channels; this model's "
                                        "are " + std::to_string(width / n_heads_kv) + ": use OLLAMA_KV_COMPRESSION_GUIDANCE=0");
        }
    }
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
    init_budget(cparams.n_ctx);
}

uint32_t Tier::cache_basis() const {
    return (kv.attn_rot_k ? 1u : 0u) | (kv.attn_rot_v ? 2u : 0u);
}

void Tier::update_params() {
    const auto & hp = kv.hparams;
    const uint32_t il0 = kv.layers.front().il;
    params_k = make_params(cfg, (int32_t) hp.n_embd_k_gqa(il0), (int32_t) hp.n_embd_head_k(il0), kv.attn_rot_k, false, il0);
    params_v = make_params(cfg, (int32_t) hp.n_embd_v_gqa(il0), (int32_t) hp.n_embd_head_v(il0), kv.attn_rot_v, true, il0);
}

kvggml_codec_params Tier::encode_params(size_t ikv, bool is_v) const {
    kvggml_codec_params p = is_v ? params_v : params_k;
    const SubbandBits bits = cfg.subband_bits(is_v, kv.layers[ikv].il);
    std::copy(bits.begin(), bits.begin() + cfg.level + 1, p.bits);
    return p;
}

int32_t Tier::model_layer(size_t ikv) const {
    return (int32_t) kv.layers[ikv].il;
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

SubbandBits Tier::block_widths(size_t b) const {
    SubbandBits bits{};
    const uint8_t * header = k_streams.front().bytes.data() + k_streams.front().offsets[b];
    std::copy(header + 8, header + 9 + cfg.level, bits.begin());
    return bits;
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

size_t Tier::allocated_bytes() const {
    size_t total = 0;
    for (size_t i = 0; i < k_streams.size(); ++i) {
        total += k_streams[i].bytes.capacity() + v_streams[i].bytes.capacity();
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
    std::vector<kvggml_event> events;
    {
        std::unique_lock<std::shared_mutex> lock(mutex);
        fold_attention();
        const std::vector<Run> runs = old_runs();
        if (!runs.empty()) {
            encode_old(runs, events);
        }
        coarsen_old(events);
    }
    announce(events);
}

void Tier::encode_old(const std::vector<Run> & runs, std::vector<kvggml_event> & events) {
    const uint64_t t0 = now_us();
    // The cells left are moved to the front, in order: the layout a saved state restores to,
    // so a restored context computes exactly what this one does. A pending K-shift is kept per
    // cell: then they are left where they are.
    const std::vector<uint32_t> kept = cells_kept(runs);
    const bool compact = !kv.v_cells[0].get_has_shift();
    std::vector<ggml_fp16_t> tensor;  // one layer's whole K or V, as stored; reused layer after layer
    for (size_t ikv = 0; ikv < kv.layers.size(); ++ikv) {
        for (const bool is_v : {false, true}) {
            encode_runs(ikv, is_v, runs, compact ? &kept : nullptr, tensor);
        }
    }
    const size_t first_new = blks.size();
    add_blocks(runs);
    if (compact) {
        move_cells_to_front(kept);
    }
    kv.v_heads[0] = 0;
    ++gen;
    encode_us += now_us() - t0;
    encoded_events(first_new, events);
}

std::vector<Tier::Run> Tier::old_runs() const {
    const auto & cells = kv.v_cells[0];
    const uint32_t B = cfg.block_tokens();
    std::vector<Run> runs;
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
                runs.push_back({seq, run});
                run.clear();
            }
        }
    }
    return runs;
}

std::vector<uint32_t> Tier::cells_kept(const std::vector<Run> & runs) const {
    const auto & cells = kv.v_cells[0];
    std::vector<bool> leaving(cells.size());
    for (const Run & run : runs) {
        for (const uint32_t idx : run.cells) {
            leaving[idx] = true;
        }
    }
    std::vector<uint32_t> kept;
    for (uint32_t idx = 0; idx < cells.size(); ++idx) {
        if (!cells.is_empty(idx) && !leaving[idx]) {
            kept.push_back(idx);
        }
    }
    return kept;
}

void Tier::encode_runs(size_t ikv, bool is_v, const std::vector<Run> & runs, const std::vector<uint32_t> * kept,
                       std::vector<ggml_fp16_t> & tensor) {
    std::vector<ggml_fp16_t> rows;  // one block, token-major
    const uint32_t B = cfg.block_tokens();
    const uint32_t kv_size = kv.v_cells[0].size();
    ggml_tensor * t = is_v ? kv.layers[ikv].v : kv.layers[ikv].k;
    const int64_t C = t->ne[0];
    const bool transposed = is_v && kv.v_trans;
    const auto at = [&](uint32_t cell, int64_t c) -> ggml_fp16_t & {
        return transposed ? tensor[c * kv_size + cell] : tensor[cell * C + c];
    };
    tensor.resize((size_t) C * kv_size);
    ggml_backend_tensor_get(t, tensor.data(), 0, tensor.size() * sizeof(ggml_fp16_t));
    rows.resize((size_t) B * C);
    BlockCodec & codec = thread_codec(encode_params(ikv, is_v), (int32_t) C, is_v);
    Stream & stream = is_v ? v_streams[ikv] : k_streams[ikv];
    for (const Run & run : runs) {
        for (uint32_t r = 0; r < B; ++r) {
            for (int64_t c = 0; c < C; ++c) {
                rows[r * C + c] = at(run.cells[r], c);
            }
        }
        const size_t start = stream.bytes.size();
        stream.make_room(codec.bound());
        stream.bytes.resize(start + codec.bound());
        const size_t n = codec.encode_f16((const uint16_t *) rows.data(), (size_t) C, stream.bytes.data() + start);
        stream.bytes.resize(start + n);
        stream.offsets.push_back(stream.bytes.size());
    }
    if (kept != nullptr) {
        for (size_t k = 0; k < kept->size(); ++k) {  // (*kept)[k] >= k: copying upwards is safe
            for (int64_t c = 0; c < C; ++c) {
                at((uint32_t) k, c) = at((*kept)[k], c);
            }
        }
        ggml_backend_tensor_set(t, tensor.data(), 0, tensor.size() * sizeof(ggml_fp16_t));
    }
}

void Tier::add_blocks(const std::vector<Run> & runs) {
    auto & cells = kv.v_cells[0];
    for (const Run & run : runs) {
        Block blk{run.seq, {}, std::vector<llama_pos>(cfg.block_tokens(), 0)};
        for (const uint32_t idx : run.cells) {
            blk.pos.push_back(cells.pos_get(idx));
            cells.rm(idx);
        }
        blks.push_back(std::move(blk));
    }
}

void Tier::move_cells_to_front(const std::vector<uint32_t> & kept) {
    auto & cells = kv.v_cells[0];
    const llama_kv_cells moved = cells.cp(kept);
    for (const uint32_t idx : kept) {
        cells.rm(idx);
    }
    cells.set(0, moved);
}

void Tier::encoded_events(size_t first_new, std::vector<kvggml_event> & events) const {
    for (size_t b = first_new; b < blks.size(); ++b) {
        events.push_back({blks[b].seq, blks[b].first(), blks[b].end(), (int32_t) cfg.level, block_f16_bytes(),
                          block_bytes(b), 0});
    }
}

void Tier::announce(const std::vector<kvggml_event> & events) const {
    std::lock_guard<std::recursive_mutex> lock(callback_mutex);
    for (const kvggml_event & event : events) {
        if (on_compress) {  // read each time: the callback may remove itself
            on_compress(&event, on_compress_data);
        }
    }
}

void Tier::set_callback(kvggml_compress_callback fn, void * user_data) {
    std::lock_guard<std::recursive_mutex> lock(callback_mutex);
    on_compress = fn;
    on_compress_data = user_data;
}

void Stream::rewrite(const std::vector<bool> & keep, const std::vector<const std::vector<uint8_t> *> & with) {
    size_t n_kept = 0;
    size_t begin = 0;
    for (size_t b = 0; b + 1 < offsets.size(); ++b) {
        const size_t end = offsets[b + 1];  // read before offsets[n_kept + 1], n_kept <= b, is written
        if (keep[b]) {
            const uint8_t * from = with[b] ? with[b]->data() : bytes.data() + begin;
            const size_t n = with[b] ? with[b]->size() : end - begin;
            std::memmove(bytes.data() + offsets[n_kept], from, n);
            offsets[n_kept + 1] = offsets[n_kept] + n;
            ++n_kept;
        }
        begin = end;
    }
    offsets.resize(n_kept + 1);
    bytes.resize(offsets.back());
}

void Stream::make_room(size_t n) {
    if (bytes.size() + n > bytes.capacity()) {
        bytes.reserve(bytes.size() + n + bytes.size() / 8);
    }
}

void Tier::erase_blocks_if(const std::function<bool(const Block &)> & pred) {
    std::vector<bool> keep(blks.size());
    std::transform(blks.begin(), blks.end(), keep.begin(), [&](const Block & blk) { return !pred(blk); });
    if (std::find(keep.begin(), keep.end(), false) == keep.end()) {
        return;
    }
    const std::vector<const std::vector<uint8_t> *> unchanged(blks.size(), nullptr);
    for (size_t ikv = 0; ikv < k_streams.size(); ++ikv) {
        k_streams[ikv].rewrite(keep, unchanged);
        v_streams[ikv].rewrite(keep, unchanged);
    }
    std::vector<Block> kept;
    for (size_t b = 0; b < blks.size(); ++b) {
        if (keep[b]) {
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
            to.make_room(bytes.size());
            to.bytes.insert(to.bytes.end(), bytes.begin(), bytes.end());
            to.offsets.push_back(to.bytes.size());
        }
    }
    blks.push_back(blk);
    ++gen;
}

void Tier::set_settings(const Settings & s) {
    if (!is_preset(s.preset)) {
        throw std::invalid_argument("preset '" + s.preset + "' is not allowed: " + kPresetsAllowed);
    }
    if ((uint64_t) s.sinks + s.threshold > cells_for_recent) {
        throw std::invalid_argument("threshold + sinks = " + std::to_string((uint64_t) s.sinks + s.threshold) +
                                    " is out of range: this context's cache was sized for at most " +
                                    std::to_string(cells_for_recent) +
                                    " (OLLAMA_KV_COMPRESSION_THRESHOLD + OLLAMA_KV_COMPRESSION_SINKS when it was created)");
    }
    std::unique_lock<std::shared_mutex> lock(mutex);
    cfg.threshold = s.threshold;
    cfg.sinks = s.sinks;
    cfg.preset = s.preset;
    update_params();  // new blocks only: every block's header carries its own subband widths
}

} // namespace kvggml
