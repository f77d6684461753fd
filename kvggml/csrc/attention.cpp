// Attention over the compressed tier. One custom ggml op per layer and tensor decodes that
// layer's blocks only, so at most one layer's worth is ever expanded at a time, and copies
// the exact cells behind them; AttnInput fills the mask's compressed columns.

#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <memory>
#include <vector>

#include "ggml.h"
#include "ggml-backend.h"
#include "llama-batch.h"
#include "llama-graph.h"
#include "llama-kv-cache.h"
#include "tier.h"

namespace kvggml {

namespace {

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

void score_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * view = static_cast<const ScoreView *>(userdata);
    view->tier->gather_attention(*view, dst, ith, nth);
}

void attend_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * view = static_cast<const DirectView *>(userdata);
    view->tier->attend_direct(*view, dst, ith, nth);
}

} // namespace

// Visible-or-not of every compressed token for every query token of the micro-batch, and which
// query rows guidance samples.
class AttnInput : public llm_graph_input_i {
public:
    AttnInput(const Tier & tier, ggml_tensor * mask, const llama_ubatch & ubatch)
        : tier(tier), mask(mask), generation(tier.generation()), sampling(samples(tier, ubatch)) {}

    // Whether guidance samples a query of this micro-batch: such a graph takes the reference path,
    // where the guidance op scores the decoded keys; the others (63 decode steps in 64) may attend
    // directly.
    static bool samples(const Tier & tier, const llama_ubatch & ubatch) {
        for (uint32_t i = 0; i < ubatch.n_tokens && ubatch.pos && tier.guided(); ++i) {
            if (Tier::sampled(ubatch.pos[i])) {
                return true;
            }
        }
        return false;
    }

    void set_input(const llama_ubatch * ubatch) override {
        if (!used) {
            return;  // no compressed token when the graph was built: the mask is not in it
        }
        GGML_ASSERT(ggml_backend_buffer_is_host(mask->buffer));
        const int64_t n_comp = mask->ne[0];
        const uint32_t B = tier.config().block_tokens();
        const auto & blocks = tier.blocks();
        const float blocked = -INFINITY;
        sampled.clear();
        for (uint32_t i = 0; i < ubatch->n_tokens && sampling; ++i) {
            if (Tier::sampled(ubatch->pos[i])) {
                sampled.push_back((int32_t) i);
            }
        }
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
        return generation == tier.generation() && sampling == samples(tier, params.ubatch);
    }

    const Tier & tier;
    ggml_tensor * mask;            // [n_comp, n_tokens]: compressed tokens only
    bool used = false;              // a layer of the graph reads the mask
    ggml_tensor * joined = nullptr; // mask in front of llama.cpp's own, shared by every layer
    const uint64_t generation;
    const bool sampling;
    std::vector<int32_t> sampled;   // rows of the queries guidance samples in this micro-batch
    std::deque<ScoreView> scores;   // the guidance op's of each layer (a deque: their addresses stay)
    std::deque<DirectView> direct;  // the direct-attention op's of each layer
};

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
    const auto lock = read_lock();  // params_k/v: the API may change them from another thread
    const uint64_t t0 = now_us();
    const Stream & stream = view.is_v ? v_streams[view.ikv] : k_streams[view.ikv];
    const auto & params = view.is_v ? params_v : params_k;
    const uint32_t B = cfg.block_tokens();
    const int64_t n_blocks = (int64_t) blks.size();
    const int64_t C = view.is_v ? kv.hparams.n_embd_v_gqa(kv.layers[view.ikv].il) : kv.hparams.n_embd_k_gqa(kv.layers[view.ikv].il);
    const int64_t n_comp = n_blocks * B;
    const Rope & rope = ropes[view.ikv];
    BlockCodec & codec = thread_codec(params, (int32_t) C, view.is_v);
    thread_local std::vector<float> block;
    block.resize((size_t) B * C);
    auto * out = (ggml_fp16_t *) dst->data;
    const int64_t last = (ith + 1) * n_blocks / nth;
    for (int64_t b = ith * n_blocks / nth; b < last; ++b) {
        if (b + Stream::kPrefetchAhead < last) {
            stream.prefetch(b + Stream::kPrefetchAhead);
        }
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

ggml_tensor * extend_attention(Tier & tier, ggml_context * ctx, llm_graph_result * res, ggml_backend_sched * sched,
                               ggml_backend * cpu, const llama_ubatch & ubatch, AttnInput *& input, int32_t il,
                               ggml_tensor * q, float kq_scale, bool plain, ggml_tensor *& k, ggml_tensor *& v,
                               ggml_tensor *& kq_mask) {
    const auto on_cpu = [&](ggml_tensor * op) {
        ggml_backend_sched_set_tensor_backend(sched, op, cpu);
        return op;
    };
    const int64_t n_comp = tier.n_tokens();
    if (input == nullptr) {
        ggml_tensor * mask = ggml_new_tensor_4d(ctx, kq_mask->type, std::max<int64_t>(n_comp, 1), kq_mask->ne[1],
                                                kq_mask->ne[2], kq_mask->ne[3]);
        ggml_set_input(mask);
        ggml_set_name(mask, "kvggml_kq_mask");
        auto owned = std::make_unique<AttnInput>(tier, mask, ubatch);
        input = owned.get();
        res->add_input(std::move(owned));  // added even when empty: its can_reuse notices the first block
        if (input->sampling) {
            tier.prepare_gathering();
        }
    }
    if (n_comp == 0) {
        return nullptr;
    }
    input->used = true;
    const auto * kview = tier.view(il, false);
    const auto * vview = tier.view(il, true);
    if (plain && !input->sampling && tier.attends_directly(q, k, v)) {
        const int64_t Dv = vview->transposed ? v->ne[2] : v->ne[0], n_head = q->ne[1], n_tokens = q->ne[2];
        input->direct.push_back({&tier, kview->ikv, kq_scale});
        ggml_tensor * args[] = {q, k, v, kq_mask, input->mask};
        ggml_tensor * parts = on_cpu(ggml_custom_4d(ctx, GGML_TYPE_F32, Dv + 2, n_head, n_tokens, Tier::kDirectParts,
                                                    args, 5, attend_op, GGML_N_TASKS_MAX, &input->direct.back()));
        return on_cpu(ggml_custom_4d(ctx, GGML_TYPE_F32, Dv * n_head, n_tokens, 1, 1, &parts, 1, merge_partials,
                                     GGML_N_TASKS_MAX, nullptr));
    }
    k = on_cpu(ggml_custom_4d(ctx, GGML_TYPE_F16, k->ne[0], k->ne[1], n_comp + k->ne[2], 1, &k, 1, decode_op,
                              GGML_N_TASKS_MAX, const_cast<LayerView *>(kview)));
    if (input->sampling) {
        // a leaf of the graph: nothing reads its one-element result, the tier gathers
        input->scores.push_back({&tier, kview->ikv, kq_scale, &input->sampled});
        ggml_tensor * args[] = {q, k, input->mask, kq_mask};
        ggml_build_forward_expand(res->get_gf(), on_cpu(ggml_custom_4d(ctx, GGML_TYPE_F32, 1, 1, 1, 1, args, 4, score_op,
                                                                       GGML_N_TASKS_MAX, &input->scores.back())));
    }
    if (!vview->transposed) {
        v = on_cpu(ggml_custom_4d(ctx, GGML_TYPE_F16, v->ne[0], v->ne[1], n_comp + v->ne[2], 1, &v, 1, decode_op,
                                  GGML_N_TASKS_MAX, const_cast<LayerView *>(vview)));
    } else {
        // v is [n_kv, n_head, head_dim] with n_kv fastest: join along tokens in [tokens, head_dim, n_head]
        // order, then view it back the way build_attn_mha recognises a transposed V.
        const int64_t head_dim = v->ne[2], n_head = v->ne[1];
        ggml_tensor * v_comp = on_cpu(ggml_custom_4d(ctx, GGML_TYPE_F16, n_comp, head_dim, n_head, 1, nullptr, 0,
                                                     decode_op, GGML_N_TASKS_MAX, const_cast<LayerView *>(vview)));
        ggml_tensor * joined = ggml_concat(ctx, v_comp, ggml_permute(ctx, v, 0, 2, 1, 3), 0);
        v = ggml_permute(ctx, joined, 0, 2, 1, 3);
    }
    if (input->joined == nullptr) {
        input->joined = ggml_concat(ctx, input->mask, kq_mask, 0);
    }
    kq_mask = input->joined;
    return nullptr;
}

} // namespace kvggml
