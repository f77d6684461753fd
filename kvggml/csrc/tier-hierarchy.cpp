// The resolution hierarchy: stored blocks walk a ladder of narrower subband widths
// (Config::ladder(), docs/FORMAT.md section 10), one step at a time, from their own bytes.
//
// Two things move a block down the ladder after each micro-batch:
//  - its age: a block at least step.age tokens older than its sequence's newest token takes
//    that step (OLLAMA_KV_COMPRESSION_SCHEDULE);
//  - the budget: while exact cells + blocks exceed OLLAMA_KV_COMPRESSION_BUDGET, the oldest
//    block that can still coarsen takes its next step. The budget is checked against n_ctx when
//    the context is created, so this always ends within it.
//
// With OLLAMA_KV_COMPRESSION_GUIDANCE=1 each KV head of each layer steps on its own (section 11:
// the head's channels drop a subband, the others keep it), and the budget orders the heads of
// all blocks by effective age: the block's age times the head's rate, the inverse of its mean
// attention to the blocks (tier-guidance.cpp). So a head that looks at its recent tokens gives
// up its old blocks' detail first, while a head that reads far back keeps it: per-head rates.

#include "tier.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "llama-kv-cache.h"

namespace kvggml {

namespace {

std::string widths_text(const SubbandBits & bits, uint32_t level) {
    std::string text;
    for (uint32_t k = 0; k <= level; ++k) {
        text += (k ? "." : "") + std::to_string(bits[k]);
    }
    return text;
}

} // namespace

void Tier::init_budget(uint32_t n_ctx_all) {
    steps = cfg.ladder();
    if (!cfg.budget.set()) {
        return;
    }
    const uint64_t f16_at_n_ctx = block_f16_bytes() / cfg.block_tokens() * n_ctx_all;
    budget = cfg.budget.bytes ? cfg.budget.bytes : (uint64_t) (cfg.budget.fraction * (double) f16_at_n_ctx);
    // the most the context can hold: its cells, and every block of n_ctx at its coarsest, at its largest
    const SubbandBits last = steps.empty() ? cfg.widest_bits() : steps.back().bits;
    const auto & hp = kv.hparams;
    uint64_t per_block = 0;
    for (size_t ikv = 0; ikv < kv.layers.size(); ++ikv) {
        for (const bool is_v : {false, true}) {
            kvggml_codec_params coarsest = encode_params(ikv, is_v);
            for (uint32_t k = 0; k <= cfg.level; ++k) {  // a step narrows K and V to at most its widths
                coarsest.bits[k] = std::min(coarsest.bits[k], last[k]);
            }
            const uint32_t il = kv.layers[ikv].il;
            per_block += block_bound(coarsest, (int32_t) (is_v ? hp.n_embd_v_gqa(il) : hp.n_embd_k_gqa(il)));
        }
    }
    const uint64_t need = exact_bytes() + (uint64_t) (n_ctx_all / cfg.block_tokens()) * per_block;
    if (budget < need) {
        throw std::invalid_argument(
            "OLLAMA_KV_COMPRESSION_BUDGET is " + std::to_string(budget) + " bytes, below what this context can need: " +
            std::to_string(need) + " bytes for n_ctx " + std::to_string(n_ctx_all) + " (" +
            std::to_string(exact_bytes()) + " in exact cells, every block at its coarsest widths " +
            widths_text(last, cfg.level) + "): allowed at least " + std::to_string(need) + " bytes, or a fraction of at least " +
            std::to_string((double) need / (double) f16_at_n_ctx) + " of the f16 cache");
    }
}

std::vector<llama_pos> Tier::newest_positions() const {
    std::vector<llama_pos> newest(kv.n_seq_max, 0);
    for (llama_seq_id seq = 0; seq < (llama_seq_id) kv.n_seq_max; ++seq) {
        newest[seq] = kv.v_cells[0].seq_pos_max(seq) + 1;
    }
    for (const Block & blk : blks) {
        newest[blk.seq] = std::max(newest[blk.seq], blk.end());
    }
    return newest;
}

uint32_t Tier::head_step(const Block & blk, size_t unit) const {
    return blk.head_steps.empty() ? blk.step : blk.head_steps[unit];
}

uint64_t Tier::head_payload_bits(size_t b, size_t unit) const {
    const size_t ikv = unit / n_heads_kv, head = unit % n_heads_kv;
    uint64_t n_bits = 0;
    for (const Stream * s : {&k_streams[ikv], &v_streams[ikv]}) {
        const uint8_t * data = s->bytes.data() + s->offsets[b];
        const size_t size = s->offsets[b + 1] - s->offsets[b];
        const int32_t width = (int32_t) (data[4] | (data[5] << 8)) / (int32_t) n_heads_kv;  // header: C
        n_bits += channel_payload_bits(data, size, (int32_t) head * width, (int32_t) (head + 1) * width);
    }
    return n_bits;
}

void Tier::coarsen_old(std::vector<kvggml_event> & events) {
    if (steps.empty() || blks.empty()) {
        return;
    }
    const uint64_t t0 = now_us();
    const std::vector<llama_pos> newest = newest_positions();
    const auto age = [&](const Block & blk) { return (int64_t) newest[blk.seq] - blk.end(); };
    const size_t n_streams = 2 * k_streams.size();
    const auto stream = [&](size_t s) -> Stream & { return s % 2 ? v_streams[s / 2] : k_streams[s / 2]; };
    // With guidance every KV head of every cache layer steps on its own (a unit); without, the
    // whole block is one unit.
    const size_t n_units = guided() ? kv.layers.size() * n_heads_kv : 1;
    const auto step_of = [&](const Block & blk, size_t u) { return n_units == 1 ? blk.step : head_step(blk, u); };
    // bytes of the blocks coarsened in this round, per stream; the streams are rewritten once at the end
    std::vector<std::vector<std::vector<uint8_t>>> recoded(blks.size());
    std::vector<uint64_t> bytes_before(blks.size());
    uint64_t total = exact_bytes() + compressed_bytes();

    const auto take_step = [&](size_t b, size_t u) {
        Block & blk = blks[b];
        if (recoded[b].empty()) {
            recoded[b].resize(n_streams);
            bytes_before[b] = block_bytes(b);
        }
        const uint32_t next = step_of(blk, u);
        // a unit is a head of one layer: its channels in that layer's K and V
        const size_t s0 = n_units == 1 ? 0 : 2 * (u / n_heads_kv), s1 = n_units == 1 ? n_streams : s0 + 2;
        for (size_t s = s0; s < s1; ++s) {
            std::vector<uint8_t> & now = recoded[b][s];
            if (now.empty()) {
                const Stream & from = stream(s);
                now.assign(from.bytes.begin() + from.offsets[b], from.bytes.begin() + from.offsets[b + 1]);
            }
            BlockHeader h;
            parse_header(now.data(), now.size(), h);
            uint8_t bits[kFormatMaxLevels + 1] = {};
            for (int32_t k = 0; k <= h.levels; ++k) {
                // a block of a narrower preset stays narrower; a head's ladder only drops subbands
                bits[k] = n_units == 1 ? std::min(steps[next].bits[k], h.bits[k]) : steps[next].bits[k] ? h.bits[k] : 0;
            }
            const int32_t head = h.channels / (int32_t) n_heads_kv;
            const int32_t c0 = n_units == 1 ? 0 : (int32_t) (u % n_heads_kv) * head;
            const kvggml_codec_params & params = s % 2 ? params_v : params_k;
            std::vector<uint8_t> out(now.size());
            const int64_t n = thread_codec(params, h.channels, s % 2)
                                  .coarsen(now.data(), now.size(), bits, out.data(), c0, n_units == 1 ? -1 : c0 + head);
            if (n < 0) {
                throw std::runtime_error(std::string("kvggml: a stored block failed to coarsen: ") +
                                         kvggml_error_name((int32_t) n));
            }
            out.resize((size_t) n);
            total = total - now.size() + out.size();
            now = std::move(out);
        }
        if (n_units == 1) {
            ++blk.step;
        } else {
            blk.head_steps.resize(n_units, (uint8_t) blk.step);
            blk.head_steps[u] = (uint8_t) (next + 1);
            blk.step = *std::max_element(blk.head_steps.begin(), blk.head_steps.end());
        }
        ++n_coarsened;
    };

    for (size_t b = 0; b < blks.size(); ++b) {
        for (size_t u = 0; u < n_units; ++u) {
            while (step_of(blks[b], u) < steps.size() && age(blks[b]) >= (int64_t) steps[step_of(blks[b], u)].age) {
                take_step(b, u);
            }
        }
    }
    if (budget != 0 && total > budget) {
        // Every unit that can still coarsen, in the order it does, each down its whole ladder before
        // the next: the oldest first. With guidance a head ages faster the less it attends to the
        // blocks (its mean relative attention over them), so the heads that concentrate on recent
        // tokens give up old detail first and those that read far back keep it.
        std::vector<double> head_attention(n_units, 0.0), head_seen(n_units, 0.0);
        for (size_t b = 0; b < blks.size() && guided(); ++b) {
            for (size_t u = 0; u < n_units; ++u) {
                if (const float a = importance(b, u); std::isfinite(a)) {
                    head_attention[u] += a;
                    head_seen[u] += 1;
                }
            }
        }
        std::vector<std::pair<size_t, size_t>> order;
        std::vector<double> effective_age;
        for (size_t b = 0; b < blks.size(); ++b) {
            for (size_t u = 0; u < n_units; ++u) {
                if (step_of(blks[b], u) < steps.size()) {
                    // uncapped: capping the rate at 4x either way cost KLD (README, "Guidance")
                    const double rate = head_seen[u] > 0 ? head_seen[u] / std::max(head_attention[u], 1e-9) : 1.0;
                    order.emplace_back(b, u);
                    effective_age.push_back((double) (age(blks[b]) + 1) * rate);
                }
            }
        }
        std::vector<size_t> rank(order.size());
        for (size_t i = 0; i < rank.size(); ++i) {
            rank[i] = i;
        }
        std::stable_sort(rank.begin(), rank.end(), [&](size_t i, size_t j) { return effective_age[i] > effective_age[j]; });
        for (size_t i = 0; i < rank.size() && total > budget; ++i) {
            const auto [b, u] = order[rank[i]];
            while (total > budget && step_of(blks[b], u) < steps.size()) {
                take_step(b, u);
            }
        }
        if (total > budget) {
            // init_budget() sized the budget for n_ctx at the coarsest step, so this is a bug
            fprintf(stderr, "kvggml: error: %llu bytes exceed OLLAMA_KV_COMPRESSION_BUDGET (%llu) with every block "
                    "at its coarsest\n", (unsigned long long) total, (unsigned long long) budget);
        }
    }

    if (std::all_of(recoded.begin(), recoded.end(), [](const auto & r) { return r.empty(); })) {
        return;
    }
    const std::vector<bool> keep(blks.size(), true);
    std::vector<const std::vector<uint8_t> *> with(blks.size());
    for (size_t s = 0; s < n_streams; ++s) {
        for (size_t b = 0; b < blks.size(); ++b) {
            with[b] = recoded[b].empty() || recoded[b][s].empty() ? nullptr : &recoded[b][s];
        }
        // a head's step recodes 2 of the streams: the others would be moved onto themselves
        if (std::any_of(with.begin(), with.end(), [](const auto * w) { return w != nullptr; })) {
            stream(s).rewrite(keep, with);
        }
    }
    ++gen;
    encode_us += now_us() - t0;
    for (size_t b = 0; b < blks.size(); ++b) {
        if (!recoded[b].empty()) {
            events.push_back({blks[b].seq, blks[b].first(), blks[b].end(), (int32_t) cfg.level, bytes_before[b],
                              block_bytes(b), (int32_t) blks[b].step});
        }
    }
}

} // namespace kvggml
