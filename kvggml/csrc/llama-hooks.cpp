// The entry points that kvggml's llama.cpp patches call (llama-hooks.h): each finds the
// tier of the cache at hand and hands the work to it, or does nothing without one.

#include "llama-hooks.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>

#include "attention.h"
#include "config.h"
#include "ggml-backend.h"
#include "llama-cparams.h"
#include "llama-hparams.h"
#include "llama-impl.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"
#include "tier.h"

using kvggml::Tier;

namespace kvggml {

llama_kv_cache * compressible_cache(llama_memory_i * memory) {
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(memory)) {
        return iswa->get_base();  // the full-attention layers; the window layers stay as they are
    }
    return dynamic_cast<llama_kv_cache *>(memory);
}

} // namespace kvggml

// Context creation refused: llama.cpp logs why and returns null ("failed to create context"), but
// tools that silence the log (llama-bench) or show only their own errors never print the reason.
// It goes to stderr as well, so it reaches the user in every consumer of the library.
[[noreturn]] static void refuse(const std::invalid_argument & err) {
    std::fprintf(stderr, "kvggml: error: %s\n", err.what());
    throw err;
}

static kvggml::Config config_from_env() {
    try {
        return kvggml::Config::from_env();
    } catch (const std::invalid_argument & err) {
        refuse(err);
    }
}

static Tier * tier_of(llama_memory_i * memory) {
    auto * kv = kvggml::compressible_cache(memory);
    return kv ? kv->kvggml_tier.get() : nullptr;
}

bool kvggml_rotates_cache(const llama_hparams & hparams) {
    const kvggml::Config cfg = config_from_env();
    bool full_rope = true;
    for (uint32_t il = 0; il < hparams.n_layer(); ++il) {
        full_rope = full_rope && (!hparams.has_rope(il) || hparams.n_rot(il) == hparams.n_embd_head_k(il));
    }
    return cfg.enabled && cfg.hadamard && full_rope;
}

bool kvggml_kv_unified(bool kv_unified, uint32_t n_seq_max) {
    if (kv_unified || n_seq_max == 1 || !config_from_env().enabled) {
        return kv_unified;
    }
    LLAMA_LOG_INFO("%s: kvggml compression keeps the %u sequences of the split cache in one store; each "
                   "still holds up to n_ctx / n_seq_max tokens\n", __func__, n_seq_max);
    return true;
}

uint32_t kvggml_cache_cells(uint32_t n_ctx_seq, uint32_t n_ctx, uint32_t n_batch, uint32_t n_seq_max) {
    const kvggml::Config cfg = config_from_env();
    if (!cfg.enabled) {
        return n_ctx_seq;
    }
    const uint64_t per_seq = (uint64_t) cfg.sinks + cfg.threshold + cfg.block_tokens();
    const uint64_t cells = GGML_PAD(per_seq * n_seq_max + n_batch, 32);  // small padding: every cell is f16 memory
    return (uint32_t) std::min<uint64_t>(cells, n_ctx);  // every sequence's cells: split caches kept in one store too
}

void kvggml_attach(llama_memory_i * memory, const llama_cparams & cparams) {
    const kvggml::Config cfg = config_from_env();
    if (!cfg.enabled) {
        return;
    }
    llama_kv_cache * kv = kvggml::compressible_cache(memory);
    if (kv == nullptr) {
        refuse(std::invalid_argument("OLLAMA_KV_COMPRESSION=1 supports models with a full-attention KV cache (plain "
                                     "or beside sliding-window layers); this model's memory is recurrent or hybrid"));
    }
    try {
        kv->kvggml_tier = std::make_shared<Tier>(cfg, *kv, cparams);
    } catch (const std::invalid_argument & err) {
        refuse(err);  // the model's cache cannot take compression: Tier says why
    }
    std::string presets = cfg.preset;
    for (const auto & [il, preset] : cfg.layer_presets) {
        presets += ", layer " + std::to_string(il) + " " + preset;
    }
    LLAMA_LOG_INFO("%s: kvggml compression on: window %u, sinks %u, level %u, preset %s, %u f16 cells for n_ctx %u\n",
                   __func__, cfg.threshold, cfg.sinks, cfg.level, presets.c_str(), kv->get_size(), cparams.n_ctx_seq);
}

void kvggml_after_ubatch(llama_memory_i * memory, ggml_backend_sched * sched) {
    if (Tier * tier = tier_of(memory)) {
        ggml_backend_sched_synchronize(sched);
        tier->compress();
    }
}

ggml_tensor * kvggml_extend_attention(ggml_context * ctx, llm_graph_result * res, ggml_backend_sched * sched,
                                      ggml_backend * backend_cpu, const llama_kv_cache_context * mctx,
                                      const llama_ubatch & ubatch, kvggml::AttnInput *& input, int32_t il,
                                      ggml_tensor * q, float kq_scale, bool plain, ggml_tensor *& k, ggml_tensor *& v,
                                      ggml_tensor *& kq_mask) {
    if (Tier * tier = mctx->kvggml_cache()->kvggml_tier.get()) {
        return kvggml::extend_attention(*tier, ctx, res, sched, backend_cpu, ubatch, input, il, q, kq_scale, plain, k,
                                        v, kq_mask);
    }
    return nullptr;
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
