// Text reports for hosts (include/kvggml.h, "Text for a host's log and metrics endpoint"): built
// from the public API alone, so they read what any caller of kvggml_get_stats/segments reads.

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "api.h"
#include "kvggml.h"

namespace {

void append(std::string & text, const char * format, ...) {
    va_list args;
    va_start(args, format);
    char line[512];
    const int n = std::vsnprintf(line, sizeof line, format, args);
    va_end(args);
    text.append(line, (size_t) std::min(n, (int) sizeof line - 1));
}

// text written as snprintf writes it: its length returned whatever size is.
int64_t write(const std::string & text, char * buf, size_t size) {
    if (buf == nullptr && size > 0) {
        return kvggml::argument_error("buf is NULL with a size above 0");
    }
    if (size > 0) {
        const size_t n = std::min(text.size(), size - 1);
        text.copy(buf, n);
        buf[n] = '\0';
    }
    return (int64_t) text.size();
}

std::vector<kvggml_segment> segments_of(const llama_context * ctx, int32_t seq_id, int64_t & status) {
    std::vector<kvggml_segment> segments;
    status = kvggml_get_segments(ctx, seq_id, nullptr, 0);
    if (status > 0) {
        segments.resize((size_t) status);
        // the count may grow between the calls (another thread decoding): take what fits
        status = std::min<int64_t>(kvggml_get_segments(ctx, seq_id, segments.data(), segments.size()),
                                   (int64_t) segments.size());
        segments.resize(status > 0 ? (size_t) status : 0);
    }
    return segments;
}

struct Held {
    uint64_t tokens = 0, bytes = 0;
};

Held held_by(const std::vector<kvggml_segment> & segments) {
    Held held;
    for (const auto & s : segments) {
        held.tokens += s.n_tokens;
        held.bytes += s.bytes;
    }
    return held;
}

// f16 bytes of one token's K and V in all layers of the compressible cache.
double f16_bytes_per_token(const kvggml_stats & stats) {
    return stats.exact_cells > 0 ? (double) stats.exact_bytes / stats.exact_cells : 0.0;
}

struct Metric {
    const char * name;
    const char * type;
    const char * help;
    double       value;
};

}  // namespace

int64_t kvggml_format_sequence(const struct llama_context * ctx, int32_t seq_id, char * buf, size_t size) {
    if (seq_id < 0) {
        return kvggml::argument_error("seq_id " + std::to_string(seq_id) + " is negative: expected a sequence id");
    }
    int64_t status = 0;
    // fails, with its reason, when ctx is NULL or does not compress
    const std::vector<kvggml_segment> segments = segments_of(ctx, seq_id, status);
    if (status < 0) {
        return status;
    }
    kvggml_stats stats{};
    kvggml_get_stats(ctx, &stats);
    const auto [tokens, bytes] = held_by(segments);
    std::map<int32_t, int> per_step;
    for (const auto & s : segments) {
        per_step[s.step]++;
    }
    std::string text;
    append(text, "kvggml: seq %d: %llu tokens compressed in %zu blocks, %.2f MiB", seq_id, (unsigned long long) tokens,
           segments.size(), bytes / 1048576.0);
    if (bytes > 0) {
        append(text, " (%.2fx smaller than f16)", tokens * f16_bytes_per_token(stats) / bytes);
    }
    if (per_step.size() > 1 || (per_step.size() == 1 && per_step.begin()->first != 0)) {
        text += ", blocks per step:";
        for (const auto & [step, n] : per_step) {
            append(text, " %d:%d", step, n);
        }
    }
    return write(text, buf, size);
}

int64_t kvggml_format_metrics(const struct llama_context * ctx, int32_t n_seq, char * buf, size_t size) {
    if (ctx == nullptr) {
        return kvggml::argument_error("ctx is NULL");
    }
    kvggml_stats stats{};
    kvggml_get_stats(ctx, &stats);
    if (n_seq < 0) {
        return kvggml::argument_error("n_seq " + std::to_string(n_seq) + " is negative: expected 0 or more");
    }
    const double f16_held = stats.compressed_tokens * f16_bytes_per_token(stats);
    const Metric metrics[] = {
        { "enabled", "gauge", "1 when the context compresses its KV cache", (double) stats.enabled },
        { "exact_cells", "gauge", "f16 cells allocated (sinks, window, a block and a batch)",
         (double) stats.exact_cells },
        { "exact_bytes", "gauge", "bytes of the f16 cells, K and V, all layers", (double) stats.exact_bytes },
        { "compressed_bytes", "gauge", "bytes of the compressed blocks, K and V, all layers",
         (double) stats.compressed_bytes },
        { "allocated_bytes", "gauge", "storage of the compressed blocks: their bytes and room to grow",
         (double) stats.allocated_bytes },
        { "compressed_tokens", "gauge", "tokens held compressed, all sequences", (double) stats.compressed_tokens },
        { "blocks", "gauge", "compressed blocks", (double) stats.blocks },
        { "compression_ratio", "gauge", "f16 bytes of the compressed tokens over their compressed bytes",
         stats.compressed_bytes > 0 ? f16_held / stats.compressed_bytes : 0.0 },
        { "budget_bytes", "gauge", "OLLAMA_KV_COMPRESSION_BUDGET in bytes (0: none)", (double) stats.budget_bytes },
        { "encode_seconds_total", "counter", "time spent compressing", stats.encode_us / 1e6 },
        { "decode_seconds_total", "counter", "time spent decoding blocks for attention (one thread's share)",
         stats.decode_us / 1e6 },
        { "coarsenings_total", "counter", "hierarchy steps taken by blocks", (double) stats.coarsenings },
    };
    std::string text;
    for (const Metric & m : metrics) {
        append(text, "# HELP kvggml:%s %s\n# TYPE kvggml:%s %s\nkvggml:%s %.15g\n", m.name, m.help, m.name, m.type,
               m.name, m.value);
    }
    if (stats.enabled && n_seq > 0) {
        std::string tokens = "# HELP kvggml:seq_compressed_tokens tokens a sequence holds compressed\n"
                             "# TYPE kvggml:seq_compressed_tokens gauge\n";
        std::string bytes = "# HELP kvggml:seq_compressed_bytes bytes of a sequence's compressed blocks\n"
                            "# TYPE kvggml:seq_compressed_bytes gauge\n";
        for (int32_t seq = 0; seq < n_seq; ++seq) {
            int64_t seq_status = 0;
            const Held held = held_by(segments_of(ctx, seq, seq_status));
            append(tokens, "kvggml:seq_compressed_tokens{seq=\"%d\"} %llu\n", seq, (unsigned long long) held.tokens);
            append(bytes, "kvggml:seq_compressed_bytes{seq=\"%d\"} %llu\n", seq, (unsigned long long) held.bytes);
        }
        text += tokens + bytes;
    }
    return write(text, buf, size);
}
