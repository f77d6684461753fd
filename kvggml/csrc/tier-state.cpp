// Saved states: the compressed blocks travel in front of llama.cpp's own data
// (docs/FORMAT.md, "Saved state"), checked whole before the tier takes them.

#include "tier.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "llama-io.h"
#include "llama-kv-cache.h"

namespace kvggml {

namespace {

// FNV-1a, 64 bits: a saved section's checksum, so a changed byte fails the load instead of
// decoding into wrong keys and values.
struct Fnv1a {
    uint64_t value = 0xcbf29ce484222325ull;
    void add(const void * data, size_t size) {
        for (const uint8_t * p = (const uint8_t *) data; size-- > 0; ++p) {
            value = (value ^ *p) * 0x100000001b3ull;
        }
    }
};

} // namespace

void Tier::state_write(llama_io_write_i & io, llama_seq_id seq_id) const {
    Fnv1a hash;
    const auto write = [&](const void * data, size_t size) {
        io.write(data, size);
        hash.add(data, size);
    };
    const auto put = [&](uint32_t value) { write(&value, sizeof(value)); };
    std::vector<size_t> chosen;
    for (size_t b = 0; b < blks.size(); ++b) {
        if (seq_id < 0 || blks[b].seq == seq_id) {
            chosen.push_back(b);
        }
    }
    put(kStateMagic);
    put(kStateVersion);
    put(cfg.level);
    put((uint32_t) k_streams.size());
    put((uint32_t) kv.hparams.n_embd_k_gqa(kv.layers.front().il));
    put((uint32_t) kv.hparams.n_embd_v_gqa(kv.layers.front().il));
    put(cache_basis());
    put((uint32_t) chosen.size());
    for (const size_t b : chosen) {
        put((uint32_t) blks[b].seq);
        write(blks[b].pos.data(), blks[b].pos.size() * sizeof(llama_pos));
        write(blks[b].moved.data(), blks[b].moved.size() * sizeof(llama_pos));
        put(blks[b].step);
        put((uint32_t) blks[b].head_steps.size());
        if (!blks[b].head_steps.empty()) {  // an empty vector's data() may be NULL, which io's memcpy must not get
            write(blks[b].head_steps.data(), blks[b].head_steps.size());
        }
        for (size_t ikv = 0; ikv < k_streams.size(); ++ikv) {
            for (const Stream * s : {&k_streams[ikv], &v_streams[ikv]}) {
                put((uint32_t) (s->offsets[b + 1] - s->offsets[b]));
                write(s->bytes.data() + s->offsets[b], s->offsets[b + 1] - s->offsets[b]);
            }
        }
    }
    io.write(&hash.value, sizeof(hash.value));
}

void Tier::state_read(llama_io_read_i & io, llama_seq_id seq_id, uint32_t & first_word) {
    const auto lock = read_lock();  // params_k/v: the API may change them from another thread
    staged = Staged{};
    if (first_word != kStateMagic) {
        if (cache_basis() != 0) {
            throw std::runtime_error("kvggml: this state was saved without OLLAMA_KV_COMPRESSION; this context keeps "
                                     "K/V Hadamard-rotated, so load it into a context without compression, or with "
                                     "OLLAMA_KV_COMPRESSION_HADAMARD=0");
        }
        return;  // saved without compression, in the basis this cache uses: llama.cpp's own data follows
    }
    Fnv1a hash;
    hash.add(&first_word, sizeof(first_word));
    const auto read = [&](void * data, size_t size) {
        io.read(data, size);
        hash.add(data, size);
    };
    const auto get = [&]() {
        uint32_t value;
        read(&value, sizeof(value));
        return value;
    };
    const auto expect = [&](const std::string & what, uint32_t want) {
        const uint32_t got = get();
        if (got != want) {
            throw std::runtime_error("kvggml: the saved state's " + what + " is " + std::to_string(got) +
                                     ", this context's is " + std::to_string(want));
        }
    };
    const auto & hp = kv.hparams;
    const uint32_t il0 = kv.layers.front().il;
    const uint32_t B = cfg.block_tokens();
    const uint32_t version = get();
    if (version != kStateVersion && version != 3) {
        throw std::runtime_error("kvggml: the saved state's format version is " + std::to_string(version) +
                                 ": this library reads 3 and " + std::to_string(kStateVersion));
    }
    expect("Haar level (OLLAMA_KV_COMPRESSION_LEVEL)", cfg.level);
    expect("number of cache layers", (uint32_t) k_streams.size());
    expect("K width", hp.n_embd_k_gqa(il0));
    expect("V width", hp.n_embd_v_gqa(il0));
    expect("K/V basis (1: K rotated, 2: V rotated; OLLAMA_KV_COMPRESSION_HADAMARD)", cache_basis());
    const uint32_t n_blocks = get();
    staged.k_streams.resize(k_streams.size());
    staged.v_streams.resize(v_streams.size());
    std::vector<float> scratch;
    for (uint32_t i = 0; i < n_blocks; ++i) {
        const std::string where = "kvggml: saved block " + std::to_string(i) + " of " + std::to_string(n_blocks);
        Block blk{(llama_seq_id) get(), std::vector<llama_pos>(B), std::vector<llama_pos>(B)};
        if (seq_id < 0 && (blk.seq < 0 || blk.seq >= (llama_seq_id) kv.n_seq_max)) {
            throw std::runtime_error(where + ": sequence " + std::to_string(blk.seq) + " is out of range: expected 0 to " +
                                     std::to_string(kv.n_seq_max - 1));
        }
        blk.seq = seq_id < 0 ? blk.seq : seq_id;
        read(blk.pos.data(), B * sizeof(llama_pos));
        read(blk.moved.data(), B * sizeof(llama_pos));
        // the step counts the saving context's ladder; the widths travel in the block's bytes, so
        // a shorter ladder here only means the block coarsens no further
        blk.step = std::min<uint32_t>(get(), (uint32_t) steps.size());
        if (version >= 4) {
            const uint32_t n_heads = get();
            if (n_heads != 0 && n_heads != k_streams.size() * n_heads_kv) {
                throw std::runtime_error(where + ": steps of " + std::to_string(n_heads) + " heads, this context has " +
                                         std::to_string(k_streams.size() * n_heads_kv) + " (or 0)");
            }
            blk.head_steps.resize(n_heads);
            if (n_heads != 0) {
                read(blk.head_steps.data(), n_heads);
            }
            for (uint8_t & step : blk.head_steps) {
                step = (uint8_t) std::min<uint32_t>(step, (uint32_t) steps.size());
            }
        }
        if (blk.empty() || std::any_of(blk.pos.begin(), blk.pos.end(), [](llama_pos p) { return p < -1; })) {
            throw std::runtime_error(where + ": invalid positions");
        }
        if (!no_shift.empty() && std::any_of(blk.moved.begin(), blk.moved.end(), [](llama_pos m) { return m != 0; })) {
            throw std::runtime_error(where + ": moved keys, which cannot be re-rotated for " + no_shift);
        }
        for (size_t ikv = 0; ikv < k_streams.size(); ++ikv) {
            for (const bool is_v : {false, true}) {
                const auto & params = is_v ? params_v : params_k;
                const int32_t C = (int32_t) (is_v ? hp.n_embd_v_gqa(il0) : hp.n_embd_k_gqa(il0));
                BlockCodec & codec = thread_codec(params, C, is_v);
                Stream & stream = is_v ? staged.v_streams[ikv] : staged.k_streams[ikv];
                const uint32_t size = get();
                if (size > codec.bound()) {
                    throw std::runtime_error(where + ": " + std::to_string(size) + " bytes, above the largest block (" +
                                             std::to_string(codec.bound()) + ")");
                }
                const size_t start = stream.bytes.size();
                stream.make_room(size);
                stream.bytes.resize(start + size);
                read(stream.bytes.data() + start, size);
                stream.offsets.push_back(stream.bytes.size());
                // decoded once here, so attention never meets a block that fails
                scratch.resize((size_t) B * C);
                const int32_t rc = codec.decode(stream.bytes.data() + start, size, scratch.data());
                if (rc != KVGGML_OK) {
                    throw std::runtime_error(where + ", layer " + std::to_string(ikv) + (is_v ? " V" : " K") +
                                             ": " + kvggml_error_name(rc));
                }
            }
        }
        staged.blks.push_back(std::move(blk));
    }
    uint64_t saved_hash;
    io.read(&saved_hash, sizeof(saved_hash));
    if (saved_hash != hash.value) {
        staged = Staged{};
        throw std::runtime_error("kvggml: the saved compressed blocks are corrupt (checksum mismatch)");
    }
    io.read(&first_word, sizeof(first_word));  // llama.cpp's own data follows
}

void Tier::state_commit(llama_seq_id seq_id) {
    std::unique_lock<std::shared_mutex> lock(mutex);
    erase_blocks_if([&](const Block & blk) { return seq_id < 0 || blk.seq == seq_id; });
    for (size_t b = 0; b < staged.blks.size(); ++b) {
        append_copy(staged.blks[b], staged.k_streams, staged.v_streams, b);
    }
    staged = Staged{};
}

} // namespace kvggml
