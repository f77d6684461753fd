// kvggml's public C API on a llama_context (include/kvggml.h, "context" section).

#include "kvggml.h"
#include "api.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "tier.h"

namespace {

thread_local std::string last_error;

const llama_kv_cache * cache_of(const llama_context * ctx) {
    return ctx ? kvggml::compressible_cache(const_cast<llama_memory_i *>(llama_get_memory(ctx))) : nullptr;
}

kvggml::Tier * tier_of(const llama_context * ctx) {
    const llama_kv_cache * kv = cache_of(ctx);
    return kv ? kv->kvggml_tier.get() : nullptr;
}

// Why ctx has no tier: a null pointer, or a context created without compression.
std::string no_tier(const llama_context * ctx) {
    return ctx ? "this context does not compress its KV cache (create it with OLLAMA_KV_COMPRESSION=1)"
               : "ctx is NULL";
}

} // namespace

int32_t kvggml::argument_error(const std::string & message) {
    last_error = message;
    return KVGGML_ERROR_ARGUMENT;
}

const char * kvggml_last_error(void) {
    return last_error.c_str();
}

namespace {

// The tier of ctx for a call that lists records into out (at most capacity of them); nullptr,
// with the error code in rc, when ctx has none or out is NULL with room asked for.
const kvggml::Tier * tier_to_list(const llama_context * ctx, const void * out, size_t capacity, int64_t & rc) {
    const kvggml::Tier * tier = tier_of(ctx);
    rc = tier == nullptr                   ? kvggml::argument_error(no_tier(ctx))
         : out == nullptr && capacity > 0 ? kvggml::argument_error("out is NULL with a capacity above 0")
                                           : KVGGML_OK;
    return rc == KVGGML_OK ? tier : nullptr;
}

} // namespace

int64_t kvggml_get_segments(const struct llama_context * ctx, int32_t seq_id, kvggml_segment * out, size_t capacity) {
    int64_t rc = 0;
    const kvggml::Tier * tier = tier_to_list(ctx, out, capacity, rc);
    if (tier == nullptr) {
        return rc;
    }
    const auto lock = tier->read_lock();
    std::vector<size_t> order;
    for (size_t b = 0; b < tier->blocks().size(); ++b) {
        if (seq_id < 0 || tier->blocks()[b].seq == seq_id) {
            order.push_back(b);
        }
    }
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
        const auto & x = tier->blocks()[a];
        const auto & y = tier->blocks()[b];
        return x.seq != y.seq ? x.seq < y.seq : x.first() < y.first();
    });
    for (size_t i = 0; i < order.size() && i < capacity; ++i) {
        const auto & blk = tier->blocks()[order[i]];
        out[i] = {blk.seq, blk.first(), blk.end(), (int32_t) tier->config().level, blk.n_alive(),
                  tier->block_bytes(order[i]), (int32_t) blk.step, {}};
        const kvggml::SubbandBits widths = tier->block_widths(order[i]);
        std::copy(widths.begin(), widths.end(), out[i].bits);
    }
    return (int64_t) order.size();
}

namespace {

// One value per block slot of seq_id (kvggml.h, kvggml_get_bitmap): slot k covers positions
// [sinks + k*B, sinks + (k+1)*B), a block marks the slot of its first position. Calls
// mark(slot, block) for each block of seq_id and returns the number of slots up to the last.
template <class Mark> int64_t for_each_slot(const kvggml::Tier & tier, int32_t seq_id, Mark mark) {
    const int64_t B = tier.config().block_tokens();
    const int64_t sinks = tier.config().sinks;
    int64_t n_slots = 0;
    for (const auto & blk : tier.blocks()) {
        if (blk.seq == seq_id) {
            const int64_t k = std::max<int64_t>(blk.first() - sinks, 0) / B;
            n_slots = std::max(n_slots, k + 1);
            mark(k, blk);
        }
    }
    return n_slots;
}

} // namespace

int64_t kvggml_get_bitmap(const struct llama_context * ctx, int32_t seq_id, uint8_t * bits, size_t n_bytes) {
    const kvggml::Tier * tier = tier_of(ctx);
    if (tier == nullptr) {
        return kvggml::argument_error(no_tier(ctx));
    }
    if (seq_id < 0 || (bits == nullptr && n_bytes > 0)) {
        return kvggml::argument_error("seq_id must be 0 or above, and bits not NULL with n_bytes above 0");
    }
    const auto lock = tier->read_lock();
    std::fill(bits, bits + n_bytes, 0);
    return for_each_slot(*tier, seq_id, [&](int64_t k, const kvggml::Block &) {
        if ((size_t) k / 8 < n_bytes) {
            bits[k / 8] |= (uint8_t) (1u << (k % 8));
        }
    });
}

int64_t kvggml_get_step_map(const struct llama_context * ctx, int32_t seq_id, uint8_t * steps, size_t n_bytes) {
    const kvggml::Tier * tier = tier_of(ctx);
    if (tier == nullptr) {
        return kvggml::argument_error(no_tier(ctx));
    }
    if (seq_id < 0 || (steps == nullptr && n_bytes > 0)) {
        return kvggml::argument_error("seq_id must be 0 or above, and steps not NULL with n_bytes above 0");
    }
    const auto lock = tier->read_lock();
    std::fill(steps, steps + n_bytes, 0);
    return for_each_slot(*tier, seq_id, [&](int64_t k, const kvggml::Block & blk) {
        if ((size_t) k < n_bytes) {
            steps[k] = (uint8_t) std::min<uint32_t>(blk.step + 1, 255);
        }
    });
}

int64_t kvggml_get_head_reports(const struct llama_context * ctx, int32_t seq_id, kvggml_head_report * out,
                                size_t capacity) {
    int64_t rc = 0;
    const kvggml::Tier * tier = tier_to_list(ctx, out, capacity, rc);
    if (tier == nullptr) {
        return rc;
    }
    const auto lock = tier->read_lock();
    const size_t n_heads = tier->kv_heads(), n_units = tier->n_layers() * n_heads;
    for (size_t u = 0; u < n_units && u < capacity; ++u) {
        kvggml_head_report & r = out[u];
        r = {tier->model_layer(u / n_heads), (int32_t) (u % n_heads), 0.0f, 0, 0, 0};
        uint64_t n_bits = 0;
        uint32_t n_observed = 0;
        for (size_t b = 0; b < tier->blocks().size(); ++b) {
            const kvggml::Block & blk = tier->blocks()[b];
            if (seq_id >= 0 && blk.seq != seq_id) {
                continue;
            }
            ++r.blocks;
            r.steps += tier->head_step(blk, u);
            n_bits += tier->head_payload_bits(b, u);
            if (const float a = tier->importance(b, u); std::isfinite(a)) {
                r.attention += a;
                ++n_observed;
            }
        }
        r.bytes = (n_bits + 7) / 8;
        r.attention = n_observed ? r.attention / (float) n_observed : std::nanf("");
    }
    return (int64_t) n_units;
}

int32_t kvggml_set_compress_callback(struct llama_context * ctx, kvggml_compress_callback callback, void * user_data) {
    kvggml::Tier * tier = tier_of(ctx);
    if (tier == nullptr) {
        return kvggml::argument_error(no_tier(ctx));
    }
    tier->set_callback(callback, user_data);
    return KVGGML_OK;
}

int32_t kvggml_get_stats(const struct llama_context * ctx, kvggml_stats * out) {
    if (ctx == nullptr || out == nullptr) {
        return kvggml::argument_error("ctx and out must not be NULL");
    }
    *out = kvggml_stats{};
    const llama_kv_cache * kv = cache_of(ctx);
    if (kv == nullptr) {
        return KVGGML_OK;  // no full-attention KV cache: nothing to report, nothing compressed
    }
    out->exact_cells = kv->get_size();
    if (const kvggml::Tier * tier = kv->kvggml_tier.get()) {
        const auto lock = tier->read_lock();  // one state: a decode on another thread may be changing it
        out->enabled           = 1;
        out->exact_bytes       = tier->exact_bytes();
        out->compressed_bytes  = tier->compressed_bytes();
        out->compressed_tokens = tier->n_alive();
        out->blocks            = tier->blocks().size();
        out->encode_us         = tier->encode_us;
        out->decode_us         = tier->decode_us;
        out->budget_bytes      = tier->budget_bytes();
        out->coarsenings       = tier->coarsenings();
        out->allocated_bytes   = tier->allocated_bytes();
    }
    return KVGGML_OK;
}

int32_t kvggml_get_settings(const struct llama_context * ctx, kvggml_settings * out) {
    const kvggml::Tier * tier = tier_of(ctx);
    if (tier == nullptr) {
        return kvggml::argument_error(no_tier(ctx));
    }
    if (out == nullptr) {
        return kvggml::argument_error("out must not be NULL");
    }
    const auto lock = tier->read_lock();
    const kvggml::Settings s = tier->settings();
    *out = kvggml_settings{};
    out->threshold = s.threshold;
    out->sinks = s.sinks;
    out->level = tier->config().level;
    out->recent_capacity = tier->recent_capacity();
    std::snprintf(out->preset, sizeof(out->preset), "%s", s.preset.c_str());
    return KVGGML_OK;
}

int32_t kvggml_set_settings(struct llama_context * ctx, const kvggml_settings * settings) {
    kvggml::Tier * tier = tier_of(ctx);
    if (tier == nullptr) {
        return kvggml::argument_error(no_tier(ctx));
    }
    if (settings == nullptr) {
        return kvggml::argument_error("settings must not be NULL");
    }
    if (settings->level != tier->config().level) {
        return kvggml::argument_error("level " + std::to_string(settings->level) + " cannot change: it is fixed at " +
                    std::to_string(tier->config().level) + " when the context is created (OLLAMA_KV_COMPRESSION_LEVEL)");
    }
    if (settings->recent_capacity != tier->recent_capacity()) {
        return kvggml::argument_error("recent_capacity is read-only: " + std::to_string(tier->recent_capacity()));
    }
    if (std::memchr(settings->preset, '\0', sizeof(settings->preset)) == nullptr) {
        return kvggml::argument_error("preset is not NUL-terminated");
    }
    try {
        tier->set_settings({settings->threshold, settings->sinks, settings->preset});
    } catch (const std::invalid_argument & err) {
        return kvggml::argument_error(err.what());
    }
    return KVGGML_OK;
}
