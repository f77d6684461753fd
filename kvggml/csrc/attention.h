// Attention over the compressed tier: each layer's compressed tokens are decoded in front
// of its exact cells, and the mask gets matching columns.
#pragma once

#include <cstdint>

struct ggml_backend;
struct ggml_backend_sched;
struct ggml_context;
struct ggml_tensor;
class llm_graph_result;
struct llama_ubatch;

namespace kvggml {

class AttnInput;
class Tier;

// llm_graph_context::build_attn, for layer il. Where the layer's attention can be computed
// straight from the blocks (attention-direct.cpp; `plain`: no bias, sinks or latent V), returns
// its output, as build_attn_mha would. Otherwise returns null, and k, v and kq_mask become the
// compressed tokens followed by the exact ones, for build_attn_mha. `input` holds the mask shared
// by every layer of the graph; the first layer creates it for `ubatch`. When guidance samples a
// query of `ubatch`, the reference path is taken and the layer's queries q (scaled by kq_scale in
// the softmax) also score the compressed tokens (tier-guidance.cpp). The ops it adds run on `cpu`
// (through `sched`), whichever backend holds the layer: they read the cache's host memory and call
// into this library, and a device such as llama.cpp's RPC backend would be sent a function pointer.
ggml_tensor * extend_attention(Tier & tier, ggml_context * ctx, llm_graph_result * res, ggml_backend_sched * sched,
                               ggml_backend * cpu, const llama_ubatch & ubatch, AttnInput *& input, int32_t il,
                               ggml_tensor * q, float kq_scale, bool plain, ggml_tensor *& k, ggml_tensor *& v,
                               ggml_tensor *& kq_mask);

} // namespace kvggml
