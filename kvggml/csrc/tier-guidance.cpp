// Guidance: the attention each compressed block receives, gathered from the queries of the
// attention llama.cpp computes anyway, orders the budget's coarsening (tier-hierarchy.cpp).
//
// One query position in kGuidanceStride is sampled (prefill and decode alike). For each sampled
// query, layer and query head, the op scores the layer's keys, the compressed ones already
// decoded for attention (the joined K), takes the softmax over every token the query may see,
// exact cells included, and adds each block's share of it relative to an even spread over those
// tokens: 1 is the block's fair share, so blocks compressed at different depths compare, and a
// layer that attends to its recent tokens gives every block little. (Normalising over the
// compressed tokens alone gave such a layer's blocks even shares: 0.0415 KLD against 0.0367,
// README "Guidance".) The importance of one KV head of one layer in a block is the mean of that
// over its queries, decayed so that recent queries count most. The hierarchy ages each head by
// its mean over the blocks (tier-hierarchy.cpp).

#include "tier.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "ggml.h"
#include "llama-kv-cache.h"

namespace kvggml {

namespace {

// Per sampled query, the weight of the queries before it: a half-life of about 44 samples
// (2,800 tokens at the stride of 64).
constexpr float kGuidanceDecay = 1.0f - 1.0f / 64;

float dot(const float * a, const float * b, int64_t n) {
    float lanes[8] = {};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; ++j) {
            lanes[j] += a[i + j] * b[i + j];
        }
    }
    float sum = 0;
    for (; i < n; ++i) {
        sum += a[i] * b[i];
    }
    for (const float lane : lanes) {
        sum += lane;
    }
    return sum;
}

float mask_at(const ggml_tensor * mask, int64_t col, int64_t row) {
    const char * p = (const char *) mask->data + row * mask->nb[1] + col * mask->nb[0];
    return mask->type == GGML_TYPE_F16 ? ggml_fp16_to_fp32(*(const ggml_fp16_t *) p) : *(const float *) p;
}

} // namespace

void Tier::prepare_gathering() {
    std::lock_guard<std::mutex> lock(gathered_mutex);
    gathered.assign(blks.size() * kv.layers.size() * n_heads_kv, 0.0f);
    gathered_seen.assign(blks.size(), 0.0f);
    gathered_queries = 0;
}

void Tier::gather_attention(const ScoreView & view, const ggml_tensor * dst, int ith, int nth) const {
    const ggml_tensor * q = dst->src[0];      // [head_dim, n_head, n_tokens], f32
    const ggml_tensor * k = dst->src[1];      // [head_dim, n_head_kv, n_comp + n_exact], f16, compressed first
    const ggml_tensor * mask = dst->src[2];   // [n_comp, rows]: 0 where visible
    const ggml_tensor * exact = dst->src[3];  // [n_exact, rows]: llama.cpp's mask of the exact cells
    const std::vector<int32_t> & rows = *view.rows;
    const int64_t head_dim = k->ne[0], n_head = q->ne[1], n_comp = mask->ne[0], n_all = k->ne[2];
    const int64_t group = n_head / (int64_t) n_heads_kv;
    const uint32_t B = cfg.block_tokens();
    const size_t n_blocks = (size_t) n_comp / B, per_block = kv.layers.size() * n_heads_kv;
    GGML_ASSERT(q->type == GGML_TYPE_F32 && k->type == GGML_TYPE_F16 && k->ne[1] == (int64_t) n_heads_kv);
    GGML_ASSERT(exact->ne[0] >= n_all - n_comp);
    if (rows.empty() || gathered.size() != n_blocks * per_block) {
        return;  // no sampled query (most decode steps), or a graph built for other blocks
    }

    thread_local std::vector<float> key, query, scores, share, seen, mass;
    thread_local std::vector<uint8_t> visible;  // per block: a token of it is visible to the query
    visible.resize(n_blocks);
    key.resize((size_t) head_dim);
    query.resize((size_t) head_dim);
    scores.resize((size_t) n_all);
    share.assign(n_blocks * n_heads_kv, 0.0f);
    seen.assign(n_blocks, 0.0f);
    mass.resize(n_blocks);
    const float blocked = -std::numeric_limits<float>::infinity();
    const int64_t n_items = (int64_t) rows.size() * n_head;  // (sampled row, query head)
    for (int64_t item = ith * n_items / nth; item < (ith + 1) * n_items / nth; ++item) {
        const int32_t row = rows[item / n_head];
        const int64_t h = item % n_head, kvh = h / group;
        const char * q_row = (const char *) q->data + row * q->nb[2] + h * q->nb[1];
        for (int64_t d = 0; d < head_dim; ++d) {
            query[d] = *(const float *) (q_row + d * q->nb[0]) * view.kq_scale;
        }
        // the softmax over every token the query sees, compressed and exact, as attention takes it
        float top = blocked;
        int64_t n_visible = 0;
        bool any_block_visible = false;
        std::fill(visible.begin(), visible.end(), 0);
        for (int64_t t = 0; t < n_all; ++t) {
            const float m = t < n_comp ? mask_at(mask, t, row) : mask_at(exact, t - n_comp, row);
            if (m == blocked) {
                scores[t] = blocked;
                continue;
            }
            const auto * k_row = (const ggml_fp16_t *) ((const char *) k->data + t * k->nb[2] + kvh * k->nb[1]);
            ggml_fp16_to_fp32_row(k_row, key.data(), head_dim);
            scores[t] = dot(query.data(), key.data(), head_dim) + m;
            top = std::max(top, scores[t]);
            ++n_visible;
            if (t < n_comp) {
                visible[t / B] = 1;
                any_block_visible = true;
            }
        }
        if (!any_block_visible) {
            continue;  // no compressed token visible to this query
        }
        float total = 0;
        for (int64_t t = 0; t < n_all; ++t) {
            scores[t] = std::exp(scores[t] - top);
            total += scores[t];
        }
        // masked tokens scored exp(-inf) = 0
        std::fill(mass.begin(), mass.end(), 0.0f);
        for (size_t b = 0; b < n_blocks; ++b) {
            for (uint32_t r = 0; r < B; ++r) {
                mass[b] += scores[b * B + r];
            }
            if (visible[b] && view.ikv == 0 && h == 0) {
                seen[b] += 1;
            }
        }
        // relative to an even spread over the visible tokens: a layer that attends to its recent
        // tokens gives every block little, rather than an even share of what the blocks got
        for (size_t b = 0; b < n_blocks; ++b) {
            share[b * n_heads_kv + kvh] += mass[b] / total * (float) n_visible / (float) B / (float) group;
        }
    }

    std::lock_guard<std::mutex> lock(gathered_mutex);
    for (size_t b = 0; b < n_blocks; ++b) {
        for (size_t kvh = 0; kvh < n_heads_kv; ++kvh) {
            gathered[b * per_block + view.ikv * n_heads_kv + kvh] += share[b * n_heads_kv + kvh];
        }
        gathered_seen[b] += seen[b];
    }
    if (view.ikv == 0 && ith == 0) {
        gathered_queries += (uint32_t) rows.size();
    }
}

void Tier::fold_attention() {
    std::lock_guard<std::mutex> lock(gathered_mutex);
    const size_t per_block = kv.layers.size() * n_heads_kv;
    if (gathered_queries == 0 || gathered.size() != blks.size() * per_block) {
        return;
    }
    const float decay = std::pow(kGuidanceDecay, (float) gathered_queries);
    for (size_t b = 0; b < blks.size(); ++b) {
        Block & blk = blks[b];
        blk.attention.resize(per_block, 0.0f);
        for (size_t i = 0; i < per_block; ++i) {
            blk.attention[i] = blk.attention[i] * decay + gathered[b * per_block + i];
        }
        blk.observed = blk.observed * decay + gathered_seen[b];
    }
    std::fill(gathered.begin(), gathered.end(), 0.0f);
    std::fill(gathered_seen.begin(), gathered_seen.end(), 0.0f);
    gathered_queries = 0;
}

float Tier::importance(size_t b, size_t unit) const {
    const Block & blk = blks[b];
    if (blk.observed <= 0 || blk.attention.empty()) {
        return std::numeric_limits<float>::infinity();
    }
    return blk.attention[unit] / blk.observed;
}

} // namespace kvggml
