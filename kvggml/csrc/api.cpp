// kvggml's public C API on a llama_context (include/kvggml.h, "context" section).

#include "kvggml.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "tier.h"

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
