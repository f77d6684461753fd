// The entry points that kvggml's llama.cpp patches call (patches/0002-*). Each is a
// no-op, or returns llama.cpp's own value, when OLLAMA_KV_COMPRESSION is off, so the
// patched library then behaves exactly like stock.
#pragma once

#include <cstdint>

#include "llama.h"

struct ggml_backend_sched;
struct ggml_context;
struct ggml_tensor;
struct llama_ubatch;
class llama_kv_cache;
class llama_kv_cache_context;
class llama_memory_i;
class llm_graph_result;

namespace kvggml {
class AttnInput;
}

// llama_model::create_memory: how many f16 cells the cache allocates. With compression
// on: sinks + window + one block + one batch per sequence, not n_ctx. Throws
// std::invalid_argument on a bad OLLAMA_KV_COMPRESSION* value (context creation fails).
uint32_t kvggml_cache_cells(uint32_t n_ctx_seq, uint32_t n_batch, uint32_t n_seq_max);

// llama_model::create_memory, once the memory exists: attach the compressed tier to a
// plain KV cache; throws when compression is on and this memory cannot take it.
void kvggml_attach(llama_memory_i * memory, uint32_t n_ctx_seq);

// llama_context::decode, after each micro-batch: move tokens older than the window
// into the compressed tier and free their cells.
void kvggml_after_ubatch(llama_memory_i * memory, ggml_backend_sched * sched);

// llm_graph_context::build_attn: put the layer's compressed tokens in front of the
// exact ones in k, v and the mask.
void kvggml_extend_attention(ggml_context * ctx, llm_graph_result * res, const llama_kv_cache_context * mctx,
                             kvggml::AttnInput *& input, int32_t il,
                             ggml_tensor *& k, ggml_tensor *& v, ggml_tensor *& kq_mask);

// llama_kv_cache memory operations on the compressed tier.
void kvggml_clear(llama_kv_cache & kv);
// false when [p0, p1) cuts through a compressed block (llama.cpp's "cannot remove part").
bool kvggml_seq_rm(llama_kv_cache & kv, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
// seq_keep drops the other sequences' blocks. seq_cp copies the blocks inside [p0, p1); it
// returns false, and copies nothing, when the range cuts a block.
void kvggml_seq_keep(llama_kv_cache & kv, llama_seq_id seq_id);
bool kvggml_seq_cp(llama_kv_cache & kv, llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1);
// seq_add / seq_div cannot move compressed keys (they carry RoPE at their old positions):
// false, with an error logged, when [p0, p1) holds compressed tokens of the sequence.
bool kvggml_can_move(const llama_kv_cache & kv, const char * op, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
// true when the cache holds compressed tokens (shifting and state saving refuse then).
bool kvggml_holds_compressed(const llama_kv_cache & kv);
