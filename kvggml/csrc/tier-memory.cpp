// llama.cpp's memory operations on the compressed tier. They act on each token's position:
// removing tokens hides them (a block is freed with its last token), copying keeps a block's
// bytes and the range's tokens, and moving them (context shift) records the RoPE rotation
// still owed to their keys, which decoding applies (attention.cpp).

#include "tier.h"

#include <algorithm>
#include <limits>

#include "llama-impl.h"

namespace kvggml {

namespace {

// llama.cpp's convention for position ranges: p0 < 0 is 0, p1 < 0 is "to the end".
void normalise_range(llama_pos & p0, llama_pos & p1) {
    if (p0 < 0) {
        p0 = 0;
    }
    if (p1 < 0) {
        p1 = std::numeric_limits<llama_pos>::max();
    }
}

} // namespace

void Tier::clear() {
    std::unique_lock<std::shared_mutex> lock(mutex);
    blks.clear();
    for (size_t ikv = 0; ikv < k_streams.size(); ++ikv) {
        k_streams[ikv] = Stream{};
        v_streams[ikv] = Stream{};
    }
    ++gen;
}

void Tier::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    normalise_range(p0, p1);
    std::unique_lock<std::shared_mutex> lock(mutex);
    for (Block & blk : blks) {
        if (seq_id < 0 || blk.seq == seq_id) {
            for (llama_pos & p : blk.pos) {
                p = p >= p0 && p < p1 ? -1 : p;  // the bytes stay until the block's last token goes
            }
        }
    }
    erase_blocks_if([](const Block & blk) { return blk.empty(); });
}

void Tier::seq_keep(llama_seq_id seq_id) {
    std::unique_lock<std::shared_mutex> lock(mutex);
    erase_blocks_if([&](const Block & blk) { return blk.seq != seq_id; });
}

void Tier::seq_cp(llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1) {
    if (src == dst) {
        return;  // nothing to copy, as llama.cpp's cells have it: a copy would hold each token twice
    }
    normalise_range(p0, p1);
    std::unique_lock<std::shared_mutex> lock(mutex);
    const size_t n = blks.size();
    for (size_t b = 0; b < n; ++b) {
        if (blks[b].seq != src || !blks[b].holds(p0, p1)) {
            continue;
        }
        Block copy = blks[b];
        copy.seq = dst;
        for (llama_pos & p : copy.pos) {
            p = p >= p0 && p < p1 ? p : -1;  // the copy holds the range's tokens only
        }
        append_copy(copy, k_streams, v_streams, b);
    }
}

template <typename F>
bool Tier::move(const char * op, llama_seq_id seq_id, llama_pos p0, llama_pos p1, F new_pos) {
    normalise_range(p0, p1);
    const auto hit = [&](const Block & blk) { return blk.seq == seq_id && blk.holds(p0, p1); };
    if (std::none_of(blks.begin(), blks.end(), hit)) {
        return true;
    }
    if (!no_shift.empty()) {
        LLAMA_LOG_ERROR("%s: kvggml: %s on sequence %d [%d, %d) would move compressed keys, which cannot be "
                        "re-rotated for %s: refused, nothing changed\n", __func__, op, seq_id, p0, p1, no_shift.c_str());
        return false;
    }
    std::unique_lock<std::shared_mutex> lock(mutex);  // after the log line: a log callback may call the API
    for (Block & blk : blks) {
        if (!hit(blk)) {
            continue;
        }
        for (size_t r = 0; r < blk.pos.size(); ++r) {
            if (blk.pos[r] >= p0 && blk.pos[r] < p1) {
                const llama_pos to = new_pos(blk.pos[r]);
                blk.moved[r] += to - blk.pos[r];
                blk.pos[r] = to < 0 ? -1 : to;  // moved before position 0: removed, as llama.cpp does
            }
        }
    }
    erase_blocks_if([](const Block & blk) { return blk.empty(); });
    ++gen;
    return true;
}

bool Tier::seq_add(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos delta) {
    return move("seq_add", seq_id, p0, p1, [&](llama_pos p) { return p + delta; });
}

bool Tier::seq_div(llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    return move("seq_div", seq_id, p0, p1, [&](llama_pos p) { return p / d; });
}

} // namespace kvggml
