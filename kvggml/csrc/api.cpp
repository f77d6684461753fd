// kvggml's public C API on a llama_context (include/kvggml.h, "context" section).

#include "kvggml.h"

#include <algorithm>
#include <vector>

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "tier.h"

namespace {

kvggml::Tier * tier_of(const llama_context * ctx) {
    const auto * kv = ctx ? dynamic_cast<const llama_kv_cache *>(llama_get_memory(ctx)) : nullptr;
    return kv ? kv->kvggml_tier.get() : nullptr;
}

} // namespace

int64_t kvggml_get_segments(const struct llama_context * ctx, int32_t seq_id, kvggml_segment * out, size_t capacity) {
    const kvggml::Tier * tier = tier_of(ctx);
    if (tier == nullptr || (out == nullptr && capacity > 0)) {
        return KVGGML_ERROR_ARGUMENT;
    }
    std::vector<size_t> order;
    for (size_t b = 0; b < tier->blocks().size(); ++b) {
        if (seq_id < 0 || tier->blocks()[b].seq == seq_id) {
            order.push_back(b);
        }
    }
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
        const auto & x = tier->blocks()[a];
        const auto & y = tier->blocks()[b];
        return x.seq != y.seq ? x.seq < y.seq : x.p0 < y.p0;
    });
    for (size_t i = 0; i < order.size() && i < capacity; ++i) {
        const auto & blk = tier->blocks()[order[i]];
        out[i] = {blk.seq, blk.p0, blk.p1, (int32_t) tier->config().level, tier->block_bytes(order[i])};
    }
    return (int64_t) order.size();
}

int64_t kvggml_get_bitmap(const struct llama_context * ctx, int32_t seq_id, uint8_t * bits, size_t n_bytes) {
    const kvggml::Tier * tier = tier_of(ctx);
    if (tier == nullptr || seq_id < 0 || (bits == nullptr && n_bytes > 0)) {
        return KVGGML_ERROR_ARGUMENT;
    }
    const int64_t B = tier->config().block_tokens();
    const int64_t sinks = tier->config().sinks;
    int64_t n_bits = 0;
    std::fill(bits, bits + n_bytes, 0);
    for (const auto & blk : tier->blocks()) {
        if (blk.seq != seq_id) {
            continue;
        }
        const int64_t k = (blk.p0 - sinks) / B;  // the slot holding its first position
        n_bits = std::max(n_bits, k + 1);
        if ((size_t) k / 8 < n_bytes) {
            bits[k / 8] |= (uint8_t) (1u << (k % 8));
        }
    }
    return n_bits;
}

int32_t kvggml_set_compress_callback(struct llama_context * ctx, kvggml_compress_callback callback, void * user_data) {
    kvggml::Tier * tier = tier_of(ctx);
    if (tier == nullptr) {
        return KVGGML_ERROR_ARGUMENT;
    }
    tier->on_compress = callback;
    tier->on_compress_data = user_data;
    return KVGGML_OK;
}

int32_t kvggml_get_stats(const struct llama_context * ctx, kvggml_stats * out) {
    if (ctx == nullptr || out == nullptr) {
        return KVGGML_ERROR_ARGUMENT;
    }
    *out = kvggml_stats{};
    const auto * kv = dynamic_cast<const llama_kv_cache *>(llama_get_memory(ctx));
    if (kv == nullptr) {
        return 0;  // no plain KV cache: nothing to report, nothing compressed
    }
    out->exact_cells = kv->get_size();
    if (const kvggml::Tier * tier = kv->kvggml_tier.get()) {
        out->enabled           = 1;
        out->exact_bytes       = tier->exact_bytes();
        out->compressed_bytes  = tier->compressed_bytes();
        out->compressed_tokens = tier->n_tokens();
        out->blocks            = tier->blocks().size();
        out->encode_us         = tier->encode_us;
        out->decode_us         = tier->decode_us;
    }
    return 0;
}
