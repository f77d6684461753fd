// The entry points that kvggml's llama.cpp patches call (patches/0002-*). Each is a
// no-op, or returns llama.cpp's own value, when OLLAMA_KV_COMPRESSION is off, so the
// patched library then behaves exactly like stock.
#pragma once

#include <cstdint>

#include "llama.h"

struct ggml_backend;
struct ggml_backend_sched;
struct ggml_context;
struct ggml_tensor;
struct llama_cparams;
struct llama_hparams;
struct llama_ubatch;
class llama_io_read_i;
class llama_io_write_i;
class llama_kv_cache;
class llama_kv_cache_context;
class llama_memory_i;
class llm_graph_result;

namespace kvggml {
class AttnInput;
}

// llama_context's constructor, once n_ctx_seq is set: whether the KV cache is unified. With
// compression on and several sequences in split caches (llama-server's default), it becomes
// unified: one tier holds every sequence's blocks and one set of f16 cells serves them all,
// while each sequence keeps the n_ctx_seq a split cache would give it. Otherwise kv_unified.
bool kvggml_kv_unified(bool kv_unified, uint32_t n_seq_max);

// llama_model::create_memory: how many f16 cells the cache allocates. With compression
// on: sinks + window + one block + one batch per sequence, not n_ctx. Throws
// std::invalid_argument on a bad OLLAMA_KV_COMPRESSION* value (context creation fails).
// At most n_ctx, the cells stock allocates for all sequences; n_ctx_seq without compression.
uint32_t kvggml_cache_cells(uint32_t n_ctx_seq, uint32_t n_ctx, uint32_t n_batch, uint32_t n_seq_max);

// llama_kv_cache's constructor: whether the cache stores K and V in llama.cpp's per-head
// Hadamard basis, as it does for its quantized caches (queries are rotated to match and the
// attention output back, once per token). With compression and OLLAMA_KV_COMPRESSION_HADAMARD
// on, it does: compressed blocks are then already rotated, and decoding needs no rotation.
// Not for partial RoPE (n_rot < head size): llama.cpp's K-shift rotates only n_rot dimensions.
bool kvggml_rotates_cache(const llama_hparams & hparams);

// llama_model::create_memory, once the memory exists: attach the compressed tier to its
// full-attention KV cache (a plain cache, or the base of a sliding-window one); throws when
// compression is on and this memory cannot take it. cparams give RoPE for context shifts.
void kvggml_attach(llama_memory_i * memory, const llama_cparams & cparams);

// llama_context::decode, after each micro-batch: move tokens older than the window
// into the compressed tier and free their cells.
void kvggml_after_ubatch(llama_memory_i * memory, ggml_backend_sched * sched);

// llm_graph_context::build_attn: the layer's attention output computed straight from the
// compressed blocks where it can be (`plain`: no bias, sinks, latent V or Grok's scaling);
// otherwise null, with the layer's compressed tokens put in front of the exact ones in k, v and
// the mask for build_attn_mha. When guidance samples a query of `ubatch` (the graph's), q (and the
// softmax's kq_scale) also scores them.
ggml_tensor * kvggml_extend_attention(ggml_context * ctx, llm_graph_result * res, ggml_backend_sched * sched,
                                      ggml_backend * backend_cpu, const llama_kv_cache_context * mctx,
                                      const llama_ubatch & ubatch, kvggml::AttnInput *& input, int32_t il,
                                      ggml_tensor * q, float kq_scale, bool plain, ggml_tensor *& k, ggml_tensor *& v,
                                      ggml_tensor *& kq_mask);

// llama_kv_cache memory operations on the compressed tier. Removing and copying act per
// token, so any range works.
void kvggml_clear(llama_kv_cache & kv);
void kvggml_seq_rm(llama_kv_cache & kv, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
void kvggml_seq_keep(llama_kv_cache & kv, llama_seq_id seq_id);
void kvggml_seq_cp(llama_kv_cache & kv, llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1);
// seq_add / seq_div move compressed tokens and owe their keys the RoPE rotation, applied when
// they are decoded. false, with an error logged and nothing changed, when the model's RoPE is
// one kvggml cannot re-apply (kvggml_can_shift then says false too).
bool kvggml_seq_add(llama_kv_cache & kv, llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift);
bool kvggml_seq_div(llama_kv_cache & kv, llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d);
bool kvggml_can_shift(const llama_kv_cache & kv);
// llama_kv_cache_iswa::get_can_shift: the window cache holds every token (swa_full) although the
// compressed base cache has fewer cells than it.
bool kvggml_swa_is_full(const llama_kv_cache & base, const llama_kv_cache & swa);
// seq_pos_min / seq_pos_max: the cells' answer (-1: none), widened by the compressed tokens.
llama_pos kvggml_seq_pos_min(const llama_kv_cache & kv, llama_seq_id seq_id, llama_pos cells_min);
llama_pos kvggml_seq_pos_max(const llama_kv_cache & kv, llama_seq_id seq_id, llama_pos cells_max);

// state_write / state_read_sinfo: the compressed blocks travel in front of llama.cpp's own
// data. kvggml_state_read gets the first word read (llama.cpp's stream count, or our magic),
// reads our section if there is one, and leaves the next word in its place; the blocks take
// effect in kvggml_state_commit, once llama.cpp's data was read without error.
void kvggml_state_write(const llama_kv_cache & kv, llama_io_write_i & io, llama_seq_id seq_id);
void kvggml_state_read(llama_kv_cache & kv, llama_io_read_i & io, llama_seq_id seq_id, uint32_t & first_word);
void kvggml_state_commit(llama_kv_cache & kv, llama_seq_id seq_id);
