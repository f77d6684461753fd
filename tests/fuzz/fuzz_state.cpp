// Fuzz target: loading a saved state into a context that compresses (docs/FORMAT.md, section 9).
//
// Input: one selector byte (even: the whole context's state, llama_state_set_data; odd: sequence
// 1's, llama_state_seq_set_data), then the saved state. Before loading, the kvggml section's
// checksum is recomputed when its layout can be followed, so mutations reach the checks behind
// it (positions, sequences, sizes, blocks) instead of all failing on the checksum. A state the
// loader accepts must then serve: the context decodes a token after each sequence, and the
// segments, bitmap and step map read back.
//
// Environment: KVGGML_FUZZ_MODEL (a GGUF; the fuzz script passes the default model), and
// KVGGML_FUZZ_SEEDS, when set, a directory to write real saved states of this context into,
// as seed inputs.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kvggml.h"
#include "llama.h"

namespace {

constexpr uint32_t kStateMagic = 0x5447564B;  // "KVGT": the section's first word
constexpr uint32_t kSeqs = 2, kCtx = 512;

llama_model * model;
llama_context * ctx;
int32_t n_vocab;

void require(bool ok, const char * what) {
    if (!ok) {
        std::fprintf(stderr, "fuzz_state: %s\n", what);
        std::abort();
    }
}

uint32_t word_at(const std::vector<uint8_t> & b, size_t at) {
    uint32_t v;
    std::memcpy(&v, b.data() + at, sizeof(v));
    return v;
}

// Recompute the kvggml section's FNV-1a in place; false when the section cannot be followed.
bool fix_checksum(std::vector<uint8_t> & b) {
    size_t start = 0;
    while (start + 4 <= b.size() && word_at(b, start) != kStateMagic) {
        ++start;
    }
    if (start + 32 > b.size()) {
        return false;
    }
    const uint32_t level = word_at(b, start + 8), layers = word_at(b, start + 12), n_blocks = word_at(b, start + 28);
    if (level > 8 || layers > 1024) {
        return false;
    }
    const size_t B = size_t(1) << level;
    size_t at = start + 32;
    for (uint32_t i = 0; i < n_blocks; ++i) {
        at += 4 + 2 * B * 4 + 4;  // seq, pos[B], moved[B], step
        for (uint32_t j = 0; j < 2 * layers; ++j) {
            if (at + 4 > b.size()) {
                return false;
            }
            at += 4 + (size_t) word_at(b, at);
        }
    }
    if (at + 8 > b.size()) {
        return false;
    }
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = start; i < at; ++i) {
        h = (h ^ b[i]) * 0x100000001b3ull;
    }
    std::memcpy(b.data() + at, &h, sizeof(h));
    return true;
}

// No logits: seeds then hold none, and mutations land on the cache, not on them.
void decode(const std::vector<llama_token> & tokens, llama_pos pos, llama_seq_id seq) {
    llama_batch batch = llama_batch_init((int32_t) tokens.size(), 0, 1);
    for (size_t i = 0; i < tokens.size(); ++i) {
        batch.token[i] = tokens[i];
        batch.pos[i] = pos + (llama_pos) i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = seq;
        batch.logits[i] = false;
    }
    batch.n_tokens = (int32_t) tokens.size();
    require(llama_decode(ctx, batch) == 0, "decode failed");
    llama_batch_free(batch);
}

std::vector<llama_token> tokens(size_t n, uint32_t salt) {
    std::vector<llama_token> t(n);
    for (size_t i = 0; i < n; ++i) {
        t[i] = (llama_token) ((i * 7919 + salt * 104729) % (uint32_t) n_vocab);
    }
    return t;
}

void save_seed(const std::string & dir, const std::string & name, bool one_sequence) {
    std::vector<uint8_t> b(1 + (one_sequence ? llama_state_seq_get_size(ctx, 1) : llama_state_get_size(ctx)));
    b[0] = one_sequence;
    const size_t n = one_sequence ? llama_state_seq_get_data(ctx, b.data() + 1, b.size() - 1, 1)
                                  : llama_state_get_data(ctx, b.data() + 1, b.size() - 1);
    require(n > 0, "saving a seed state failed");
    b.resize(1 + n);
    FILE * f = std::fopen((dir + "/" + name).c_str(), "wb");
    require(f != nullptr && std::fwrite(b.data(), 1, b.size(), f) == b.size() && std::fclose(f) == 0,
            "cannot write a seed state");
}

// Saved states of this context at several moments: blocks, coarsened blocks, removed tokens
// inside a block, a copied and a shifted sequence.
void write_seeds(const std::string & dir) {
    llama_memory_t mem = llama_get_memory(ctx);
    decode(tokens(20, 0), 0, 0);
    save_seed(dir, "exact-only", false);
    decode(tokens(50, 1), 20, 0);
    save_seed(dir, "blocks", false);
    llama_memory_seq_rm(mem, 0, 10, 17);
    llama_memory_seq_cp(mem, 0, 1, -1, -1);
    save_seed(dir, "removed-and-copied", false);
    save_seed(dir, "sequence-1", true);
    llama_memory_seq_add(mem, 1, 30, -1, -10);
    decode(tokens(100, 2), 60, 1);
    save_seed(dir, "shifted-and-coarsened", false);
    save_seed(dir, "sequence-1-shifted", true);
    llama_memory_clear(mem, true);
}

void check_serves() {
    llama_memory_t mem = llama_get_memory(ctx);
    for (llama_seq_id s = 0; s < (llama_seq_id) kSeqs; ++s) {
        const llama_pos next = llama_memory_seq_pos_max(mem, s) + 1;
        if (next >= (llama_pos) kCtx) {
            continue;
        }
        kvggml_segment segments[kCtx];
        uint8_t bitmap[kCtx / 8], steps[kCtx];
        require(kvggml_get_segments(ctx, s, segments, kCtx) >= 0, "segments of a loaded state");
        require(kvggml_get_bitmap(ctx, s, bitmap, sizeof(bitmap)) >= 0, "bitmap of a loaded state");
        require(kvggml_get_step_map(ctx, s, steps, sizeof(steps)) >= 0, "step map of a loaded state");
        // attention runs over the loaded blocks; no check of the logits, as llama.cpp's own cells
        // are raw f16 that no loader checks, and a mutated one may well be NaN, as in stock
        decode(tokens(1, 3), next, s);
    }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    const char * path = std::getenv("KVGGML_FUZZ_MODEL");
    require(path != nullptr, "set KVGGML_FUZZ_MODEL to a GGUF model");
    // Small blocks, a short window and a hierarchy, so a few hundred tokens reach every kind of block.
    setenv("OLLAMA_KV_COMPRESSION", "1", 1);
    setenv("OLLAMA_KV_COMPRESSION_THRESHOLD", "32", 1);
    setenv("OLLAMA_KV_COMPRESSION_SCHEDULE", "48:6.4.3.3.0,96:6.4.3.0.0", 1);
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();
    model = llama_model_load_from_file(path, llama_model_default_params());
    require(model != nullptr, "cannot load KVGGML_FUZZ_MODEL");
    n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = kCtx;
    cp.n_batch = 256;
    cp.n_ubatch = 64;
    cp.n_seq_max = kSeqs;
    cp.kv_unified = true;
    cp.n_threads = cp.n_threads_batch = 1;  // one thread: coverage the same on every run
    ctx = llama_init_from_model(model, cp);
    require(ctx != nullptr, "cannot create a context with compression");
    const char * seeds = std::getenv("KVGGML_FUZZ_SEEDS");
    if (seeds != nullptr) {
        write_seeds(seeds);
    }
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    if (size < 1) {
        return 0;
    }
    std::vector<uint8_t> state(data + 1, data + size);
    fix_checksum(state);
    const bool one_sequence = data[0] & 1;
    const size_t read = one_sequence ? llama_state_seq_set_data(ctx, state.data(), state.size(), 1)
                                     : llama_state_set_data(ctx, state.data(), state.size());
    if (read != 0) {
        check_serves();
    }
    return 0;
}
