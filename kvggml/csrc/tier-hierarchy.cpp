// The resolution hierarchy: stored blocks walk a ladder of narrower subband widths
// (Config::ladder(), docs/FORMAT.md section 10), one step at a time, from their own bytes.
//
// Two things move a block down the ladder after each micro-batch:
//  - its age: a block at least step.age tokens older than its sequence's newest token takes
//    that step (OLLAMA_KV_COMPRESSION_SCHEDULE);
//  - the budget: while exact cells + blocks exceed OLLAMA_KV_COMPRESSION_BUDGET, the oldest
//    block that can still coarsen takes its next step; with OLLAMA_KV_COMPRESSION_GUIDANCE=1,
//    the least attended (tier-guidance.cpp), the oldest among equals and those not yet seen
//    last. The budget is checked against n_ctx when the context is created, so this always
//    ends within it.

#include "tier.h"

#include <algorithm>
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
    kvggml_codec_params coarsest_k = params_k, coarsest_v = params_v;
    const SubbandBits last = steps.empty() ? cfg.subband_bits() : steps.back().bits;
    std::copy(last.begin(), last.begin() + cfg.level + 1, coarsest_k.bits);
    std::copy(last.begin(), last.begin() + cfg.level + 1, coarsest_v.bits);
    const auto & hp = kv.hparams;
    const uint32_t il0 = kv.layers.front().il;
    const uint64_t per_block = kv.layers.size() * (block_bound(coarsest_k, (int32_t) hp.n_embd_k_gqa(il0)) +
                                                   block_bound(coarsest_v, (int32_t) hp.n_embd_v_gqa(il0)));
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

void Tier::coarsen_old(std::vector<kvggml_event> & events) {
    if (steps.empty() || blks.empty()) {
        return;
    }
    const uint64_t t0 = now_us();
    const std::vector<llama_pos> newest = newest_positions();
    const auto age = [&](const Block & blk) { return (int64_t) newest[blk.seq] - blk.end(); };
    const size_t n_streams = 2 * k_streams.size();
    const auto stream = [&](size_t s) -> Stream & { return s % 2 ? v_streams[s / 2] : k_streams[s / 2]; };
    // bytes of the blocks coarsened in this round, per stream; the streams are rewritten once at the end
    std::vector<std::vector<std::vector<uint8_t>>> recoded(blks.size());
    std::vector<uint64_t> bytes_before(blks.size());
    uint64_t total = exact_bytes() + compressed_bytes();

    const auto take_step = [&](size_t b) {
        Block & blk = blks[b];
        if (recoded[b].empty()) {
            recoded[b].resize(n_streams);
            bytes_before[b] = block_bytes(b);
        }
        for (size_t s = 0; s < n_streams; ++s) {
            std::vector<uint8_t> & now = recoded[b][s];
            if (now.empty()) {
                const Stream & from = stream(s);
                now.assign(from.bytes.begin() + from.offsets[b], from.bytes.begin() + from.offsets[b + 1]);
            }
            BlockHeader h;
            parse_header(now.data(), now.size(), h);
            uint8_t bits[kFormatMaxLevels + 1] = {};
            for (int32_t k = 0; k <= h.levels; ++k) {
                bits[k] = std::min(steps[blk.step].bits[k], h.bits[k]);  // a block of a narrower preset stays narrower
            }
            const kvggml_codec_params & params = s % 2 ? params_v : params_k;
            std::vector<uint8_t> next(now.size());
            const int64_t n = thread_codec(params, h.channels, s % 2).coarsen(now.data(), now.size(), bits, next.data());
            if (n < 0) {
                throw std::runtime_error(std::string("kvggml: a stored block failed to coarsen: ") +
                                         kvggml_error_name((int32_t) n));
            }
            next.resize((size_t) n);
            total = total - now.size() + next.size();
            now = std::move(next);
        }
        ++blk.step;
        ++n_coarsened;
    };

    for (size_t b = 0; b < blks.size(); ++b) {
        while (blks[b].step < steps.size() && age(blks[b]) >= (int64_t) steps[blks[b].step].age) {
            take_step(b);
        }
    }
    std::vector<float> importance(blks.size(), 0.0f);
    for (size_t b = 0; b < blks.size() && guided(); ++b) {
        importance[b] = this->importance(b);
    }
    const auto coarsens_before = [&](size_t a, size_t b) {
        return importance[a] != importance[b] ? importance[a] < importance[b] : age(blks[a]) > age(blks[b]);
    };
    while (budget != 0 && total > budget) {
        size_t next = blks.size();
        for (size_t b = 0; b < blks.size(); ++b) {
            if (blks[b].step < steps.size() && (next == blks.size() || coarsens_before(b, next))) {
                next = b;
            }
        }
        if (next == blks.size()) {
            // init_budget() sized the budget for n_ctx at the coarsest step, so this is a bug
            fprintf(stderr, "kvggml: error: %llu bytes exceed OLLAMA_KV_COMPRESSION_BUDGET (%llu) with every block "
                    "at its coarsest\n", (unsigned long long) total, (unsigned long long) budget);
            break;
        }
        take_step(next);
    }

    if (std::all_of(recoded.begin(), recoded.end(), [](const auto & r) { return r.empty(); })) {
        return;
    }
    const std::vector<bool> keep(blks.size(), true);
    std::vector<const std::vector<uint8_t> *> with(blks.size());
    for (size_t s = 0; s < n_streams; ++s) {
        for (size_t b = 0; b < blks.size(); ++b) {
            with[b] = recoded[b].empty() ? nullptr : &recoded[b][s];
        }
        stream(s).rewrite(keep, with);
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
