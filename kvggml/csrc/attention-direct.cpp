// Attention straight from the compressed blocks: no f16 copy of a block is made.
//
// The Haar transform along tokens is linear and orthonormal (docs/FORMAT.md, section 3), so for
// a block with coefficient rows c_r (its K rows are W^T c) and a query q:
//   scores  s = W^T (c_r . q)         the inverse transform of B dot products
//   output  o = sum_r (W p)_r c'_r    the forward transform of the softmax weights p, applied
//                                     to the V coefficient rows c'_r
// Dropped subbands are rows that are zero, so a coarsened block costs fewer dot products.
//
// One exact softmax runs over the compressed blocks and the exact cells, online (running max
// and sum). The work is cut into kDirectParts fixed parts of the layer's blocks and cells, each
// with its own running state (the "partials" tensor); a second op joins them. The parts do not
// depend on the thread count, so 1 and n threads give the same bits.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "ggml.h"
#include "llama-kv-cache.h"
#include "tier.h"

// The loops below are compiled for AVX-512, AVX2 with FMA and baseline x86-64, the best picked when
// the library loads; the code is the same, so are the results up to the order of float sums and the
// rounding of fused multiply-adds. Unlike the codec, attention need not match numpy bit for bit, so
// this file lets the compiler fuse them: the dot products and weighted sums are most of its work.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(KVGGML_CODEC_PORTABLE)
#pragma GCC optimize("fp-contract=fast")
#define KVGGML_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KVGGML_SIMD_CLONES
#endif

namespace kvggml {

namespace {

// Eight lanes of partial sums in a vector, added pairwise at the end, so the whole dot product
// vectorizes (a single running sum could not be reordered).
typedef float Lanes __attribute__((vector_size(32)));
constexpr int kLanes = sizeof(Lanes) / sizeof(float);

// Sixteen lanes: one AVX-512 register, two AVX2 ones, for the loops that accumulate rows.
typedef float Wide __attribute__((vector_size(64)));
constexpr int kWide = sizeof(Wide) / sizeof(float);

inline Lanes folded(Wide v) {  // lane i + lane i + 8
    return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}

// The sum of v's lanes, pairwise.
inline float lanes_total(Lanes v) {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

inline float dot(const float * a, const float * b, int64_t n) {
    Lanes sum = {};
    int64_t c = 0;
    for (; c + kLanes <= n; c += kLanes) {
        Lanes x, y;
        std::memcpy(&x, a + c, sizeof(x));
        std::memcpy(&y, b + c, sizeof(y));
        sum += x * y;
    }
    float total = lanes_total(sum);
    for (; c < n; ++c) {
        total += a[c] * b[c];
    }
    return total;
}

// Lane i of the result: the sum of a[i]'s lanes. A tree of shuffles and adds serves eight dot
// products at once, where each would otherwise end in a horizontal sum of its own.
inline Lanes lane_sums(const Lanes (&a)[kLanes]) {
    const auto pairs = [](Lanes x, Lanes y) {  // [x0+x1, y0+y1, x2+x3, y2+y3, ...]
        return __builtin_shufflevector(x, y, 0, 8, 2, 10, 4, 12, 6, 14) + __builtin_shufflevector(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
    };
    const auto quads = [](Lanes x, Lanes y) {
        return __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) + __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
    };
    const Lanes low = quads(pairs(a[0], a[1]), pairs(a[2], a[3])), high = quads(pairs(a[4], a[5]), pairs(a[6], a[7]));
    return __builtin_shufflevector(low, high, 0, 1, 2, 3, 8, 9, 10, 11) + __builtin_shufflevector(low, high, 4, 5, 6, 7, 12, 13, 14, 15);
}

// out[r * out_stride] = the dot product of rows[r * row_stride ...] with q[0, D), for r < n.
inline void row_dots(const float * rows, int64_t row_stride, int64_t n, const float * q, int64_t D, float * out,
                     int64_t out_stride) {
    int64_t r = 0;
    for (; D % kWide == 0 && r + kLanes <= n; r += kLanes) {
        Wide sums[kLanes] = {};
        for (int64_t c = 0; c < D; c += kWide) {
            Wide y;
            std::memcpy(&y, q + c, sizeof(y));
            for (int i = 0; i < kLanes; ++i) {
                Wide x;
                std::memcpy(&x, rows + (r + i) * row_stride + c, sizeof(x));
                sums[i] += x * y;
            }
        }
        Lanes halves[kLanes];
        for (int i = 0; i < kLanes; ++i) {
            halves[i] = folded(sums[i]);
        }
        const Lanes dots = lane_sums(halves);
        for (int i = 0; i < kLanes; ++i) {
            out[(r + i) * out_stride] = dots[i];
        }
    }
    for (; r < n; ++r) {
        out[r * out_stride] = dot(rows + r * row_stride, q, D);
    }
}

inline void axpy(float a, const float * x, float * y, int64_t n) {
    for (int64_t c = 0; c < n; ++c) {
        y[c] += a * x[c];
    }
}

// acc[0..D) += sum over r < n_rows of w[r * w_stride] * rows[r * row_stride + c]: 64 channels at
// a time summed in registers, even and odd rows apart so that two chains of adds overlap.
inline void weighted_rows(const float * w, int64_t w_stride, const float * rows, int64_t row_stride, int64_t n_rows,
                          float * acc, int64_t D) {
    constexpr int kParts = 64 / kWide;  // vectors in 64 channels
    int64_t c0 = 0;
    for (; c0 + 64 <= D; c0 += 64) {
        Wide even[kParts] = {}, odd[kParts] = {};
        int64_t r = 0;
        for (; r + 2 <= n_rows; r += 2) {
            const float w0 = w[r * w_stride], w1 = w[(r + 1) * w_stride];
            const float * row0 = rows + r * row_stride + c0, * row1 = row0 + row_stride;
            for (int i = 0; i < kParts; ++i) {
                Wide x0, x1;
                std::memcpy(&x0, row0 + i * kWide, sizeof(x0));
                std::memcpy(&x1, row1 + i * kWide, sizeof(x1));
                even[i] += w0 * x0;
                odd[i] += w1 * x1;
            }
        }
        for (; r < n_rows; ++r) {
            const float w0 = w[r * w_stride];
            for (int i = 0; i < kParts; ++i) {
                Wide x0;
                std::memcpy(&x0, rows + r * row_stride + c0 + i * kWide, sizeof(x0));
                even[i] += w0 * x0;
            }
        }
        for (int i = 0; i < kParts; ++i) {
            Wide a;
            std::memcpy(&a, acc + c0 + i * kWide, sizeof(a));
            a += even[i] + odd[i];
            std::memcpy(acc + c0 + i * kWide, &a, sizeof(a));
        }
    }
    for (int64_t r = 0; r < n_rows; ++r) {
        axpy(w[r * w_stride], rows + r * row_stride + c0, acc + c0, D - c0);
    }
}

// The largest of x[0, n) and their sum, eight lanes at a time (a single running max or sum would
// be one chain of dependent operations).
inline float max_of(const float * x, int64_t n) {
    Lanes top = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
        Lanes v;
        std::memcpy(&v, x + j, sizeof(v));
        top = v > top ? v : top;
    }
    float m = std::max(std::max(std::max(top[0], top[4]), std::max(top[2], top[6])),
                       std::max(std::max(top[1], top[5]), std::max(top[3], top[7])));
    for (; j < n; ++j) {
        m = std::max(m, x[j]);
    }
    return m;
}

inline float sum_of(const float * x, int64_t n) {
    Lanes sum = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
        Lanes v;
        std::memcpy(&v, x + j, sizeof(v));
        sum += v;
    }
    float total = lanes_total(sum);
    for (; j < n; ++j) {
        total += x[j];
    }
    return total;
}

// e^x for scores less their maximum (x <= 0, or -inf for a hidden token, which gives 0), within
// a few ulp (Cephes' polynomial), without branches so the loop vectorizes where expf would not.
inline void exp_nonpositive(float * x, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
        float v = x[j] > -87.0f ? x[j] : -87.0f;  // NaN too: the conversion to int below must stay defined
        v = v < 88.0f ? v : 88.0f;
        const float k = (v * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23
        const float r = v - k * 0.693359375f + k * 2.12194440e-4f;
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        const float e = p * r * r + r + 1.0f;
        int32_t bits = ((int32_t) k + 127) << 23;
        float scale;
        std::memcpy(&scale, &bits, 4);
        x[j] = x[j] != x[j] ? x[j] : x[j] < -87.0f ? 0.0f : e * scale;  // a NaN score stays NaN
    }
}

// One query head's running softmax: acc[Dv], then the running max m and sum l.
struct Running {
    float * acc;
    int64_t Dv;
    float & m() const { return acc[Dv]; }
    float & l() const { return acc[Dv + 1]; }
};

// The shapes of one layer's direct attention. x = t * n_head + i numbers query t's head i.
struct Shape {
    int64_t Dk, Dv, n_head, n_head_kv, n_gqa, n_q, B, L;
    float   kq_scale;
    const int32_t * kv_heads;  // per x: its KV head, i / n_gqa (a division the inner loops skip)

    int64_t kv_head(int64_t x) const { return kv_heads[x]; }
};

// Query head x's running softmax in one part of the partials: [Dv + 2][n_head][n_q].
inline Running state(float * part, const Shape & sh, int64_t x) {
    return {part + x * (sh.Dv + 2), sh.Dv};
}

// Scores s[0..n) join the running softmax: s becomes their weights e^(s - m). False (s untouched)
// when every score is -inf: nothing of these tokens is visible.
inline bool join_softmax(const Running & st, float * s, int64_t n) {
    const float top = max_of(s, n);
    if (top == -INFINITY) {
        return false;
    }
    if (top > st.m()) {
        const float f = st.m() == -INFINITY ? 0.0f : std::exp(st.m() - top);
        for (int64_t c = 0; c < st.Dv; ++c) {
            st.acc[c] *= f;
        }
        st.l() *= f;
        st.m() = top;
    }
    for (int64_t j = 0; j < n; ++j) {
        s[j] -= st.m();
    }
    exp_nonpositive(s, n);
    st.l() += sum_of(s, n);
    return true;
}

float mask_at(const ggml_tensor * mask, int64_t col, int64_t row) {
    const char * p = (const char *) mask->data + col * mask->nb[0] + row * mask->nb[1];
    return mask->type == GGML_TYPE_F16 ? ggml_fp16_to_fp32(*(const ggml_fp16_t *) p) : *(const float *) p;
}

// One compressed block for every query: its K coefficient rows, V's bytes (and how many bytes after
// them may be read), the mask's B columns of each query (mask[t * B + j]), the queries
// q[(t * n_head + i) * Dk], the states in `part`.
// y and tmp are scratch of B * n_q * n_head; attended of n_q * n_head. Column t * n_head + i of
// y holds query t, head i's values for the block's B rows, so each transform runs once for all.
KVGGML_SIMD_CLONES void attend_block(const Shape & sh, const float * k_rows, int32_t k_coded, BlockCodec & vc,
                                     const uint8_t * v_bytes, size_t v_size, size_t v_readable_after, const float * mask,
                                     const float * q, float * part, float * y, float * tmp, uint8_t * attended) {
    const int64_t B = sh.B, Ck = sh.Dk * sh.n_head_kv, Cv = sh.Dv * sh.n_head_kv, n = sh.n_q * sh.n_head;
    for (int64_t x = 0; x < n; ++x) {
        row_dots(k_rows + sh.kv_head(x) * sh.Dk, Ck, k_coded, q + x * sh.Dk, sh.Dk, y + x, n);
    }
    std::fill(y + k_coded * n, y + B * n, 0.0f);
    haar_inverse(y, tmp, (int32_t) B, (int32_t) sh.L, (int32_t) n);  // scores, unscaled
    float s[1 << kMaxLevels];
    for (int64_t x = 0; x < n; ++x) {
        const float * mask_t = mask + (x / sh.n_head) * B;
        for (int64_t j = 0; j < B; ++j) {
            s[j] = y[j * n + x] * sh.kq_scale + mask_t[j];
        }
        attended[x] = join_softmax(state(part, sh, x), s, B);
        for (int64_t j = 0; j < B; ++j) {
            y[j * n + x] = attended[x] ? s[j] : 0.0f;
        }
    }
    haar_forward(y, tmp, (int32_t) B, (int32_t) sh.L, (int32_t) n);  // the weights of the V coefficient rows
    const float * v_rows;
    int32_t v_coded;
    GGML_ASSERT(vc.coefficients(v_bytes, v_size, v_readable_after, v_rows, v_coded) == KVGGML_OK &&
                "kvggml: a compressed block failed to decode");
    for (int64_t x = 0; x < n; ++x) {
        if (attended[x]) {
            weighted_rows(y + x, n, v_rows + sh.kv_head(x) * sh.Dv, Cv, v_coded, state(part, sh, x).acc, sh.Dv);
        }
    }
}

// Exact cells [0, n) as f32 rows k[j * Ck], v[j * Cv], for every query.
KVGGML_SIMD_CLONES void attend_cells(const Shape & sh, int64_t n, const float * k, const float * v, const float * mask,
                                     const float * q, float * part) {
    const int64_t Ck = sh.Dk * sh.n_head_kv, Cv = sh.Dv * sh.n_head_kv;
    float s[1 << kMaxLevels];  // n <= B
    for (int64_t x = 0; x < sh.n_q * sh.n_head; ++x) {
        const int64_t h = sh.kv_head(x);
        const float * mask_t = mask + (x / sh.n_head) * sh.B;
        row_dots(k + h * sh.Dk, Ck, n, q + x * sh.Dk, sh.Dk, s, 1);
        for (int64_t j = 0; j < n; ++j) {
            s[j] = s[j] * sh.kq_scale + mask_t[j];
        }
        const Running st = state(part, sh, x);
        if (join_softmax(st, s, n)) {
            weighted_rows(s, 1, v + h * sh.Dv, Cv, n, st.acc, sh.Dv);
        }
    }
}

} // namespace

bool Tier::attends_directly(const ggml_tensor * q, const ggml_tensor * k, const ggml_tensor * v) const {
    const bool v_trans = v->nb[1] > v->nb[2];
    const int64_t Dv = v_trans ? v->ne[2] : v->ne[0];
    return cfg.direct && q->type == GGML_TYPE_F32 && q->nb[0] == sizeof(float) &&
           k->type == GGML_TYPE_F16 && v->type == GGML_TYPE_F16 && k->ne[3] == 1 && q->ne[3] == 1 &&
           q->ne[2] <= kDirectMaxQueries && q->ne[0] == k->ne[0] && q->ne[1] % k->ne[1] == 0 &&
           Dv * k->ne[1] == (int64_t) kv.hparams.n_embd_v_gqa(kv.layers.front().il) &&
           params_k.rotation <= 1 && params_v.rotation <= 1 &&  // keys in the cache's own basis
           !kv.hparams.attn_soft_cap && kv.hparams.f_max_alibi_bias == 0.0f &&
           std::none_of(blks.begin(), blks.end(), [](const Block & b) {  // moved keys owe RoPE
               return std::any_of(b.moved.begin(), b.moved.end(), [](llama_pos m) { return m != 0; });
           });
}

void Tier::attend_direct(const DirectView & view, ggml_tensor * dst, int ith, int nth) const {
    const auto lock = read_lock();
    const uint64_t t0 = now_us();
    const ggml_tensor * q = dst->src[0], * k = dst->src[1], * v = dst->src[2], * mask = dst->src[3], * comp = dst->src[4];
    const bool v_trans = v->nb[1] > v->nb[2];
    Shape sh;
    sh.Dk = q->ne[0];
    sh.Dv = dst->ne[0] - 2;
    sh.n_head = q->ne[1];
    sh.n_head_kv = k->ne[1];
    sh.n_gqa = sh.n_head / sh.n_head_kv;
    sh.n_q = q->ne[2];
    sh.B = cfg.block_tokens();
    sh.L = cfg.level;
    sh.kq_scale = view.kq_scale;
    thread_local std::vector<int32_t> kv_heads;
    kv_heads.resize((size_t) sh.n_q * sh.n_head);
    for (int64_t x = 0; x < sh.n_q * sh.n_head; ++x) {
        kv_heads[x] = (int32_t) ((x % sh.n_head) / sh.n_gqa);
    }
    sh.kv_heads = kv_heads.data();
    const int64_t Ck = sh.Dk * sh.n_head_kv, Cv = sh.Dv * sh.n_head_kv, B = sh.B;
    const int64_t n_blocks = (int64_t) blks.size(), n_exact = k->ne[2];
    const int64_t n_items = n_blocks + (n_exact + B - 1) / B, n_parts = dst->ne[3];
    const Stream & ks = k_streams[view.ikv], & vs = v_streams[view.ikv];
    BlockCodec & kc = thread_codec(params_k, (int32_t) Ck, false);
    BlockCodec & vc = thread_codec(params_v, (int32_t) Cv, true);

    thread_local std::vector<float> queries, masks, k_rows, v_rows, v_cols, y, tmp;
    thread_local std::vector<uint8_t> attended;
    queries.resize((size_t) sh.n_q * sh.n_head * sh.Dk);
    for (int64_t t = 0; t < sh.n_q; ++t) {
        for (int64_t i = 0; i < sh.n_head; ++i) {
            std::memcpy(queries.data() + (t * sh.n_head + i) * sh.Dk, (const char *) q->data + t * q->nb[2] + i * q->nb[1],
                        sh.Dk * sizeof(float));
        }
    }
    masks.resize((size_t) sh.n_q * B);
    k_rows.resize((size_t) B * Ck);
    v_rows.resize((size_t) B * Cv);
    v_cols.resize(v_trans ? (size_t) B * Cv : 0);
    y.resize((size_t) sh.n_q * sh.n_head * B);
    tmp.resize(y.size());
    attended.resize((size_t) sh.n_q * sh.n_head);

    // The items some query sees, split evenly into the parts: removed tokens and other sequences'
    // blocks change neither the parts nor the order of the sums, so a sequence computes the same
    // bits whatever else the cache holds (every thread finds the same list).
    // Item it: block it, or chunk it - n_blocks of B exact cells; its columns in its mask.
    const auto first_column = [&](int64_t it) { return it < n_blocks ? it * B : (it - n_blocks) * B; };
    const auto columns = [&](int64_t it) { return it < n_blocks ? B : std::min(B, n_exact - first_column(it)); };
    thread_local std::vector<int64_t> seen;
    seen.clear();
    for (int64_t it = 0; it < n_items; ++it) {
        bool visible = false;
        for (int64_t t = 0; t < sh.n_q && !visible; ++t) {
            for (int64_t j = 0; j < columns(it) && !visible; ++j) {
                visible = mask_at(it < n_blocks ? comp : mask, first_column(it) + j, t) != -INFINITY;
            }
        }
        if (visible) {
            seen.push_back(it);
        }
    }
    const int64_t n_seen = (int64_t) seen.size();

    for (int64_t p = ith; p < n_parts; p += nth) {
        float * part = (float *) dst->data + p * sh.n_q * sh.n_head * (sh.Dv + 2);
        for (int64_t x = 0; x < sh.n_q * sh.n_head; ++x) {
            const Running st = state(part, sh, x);
            std::fill(st.acc, st.acc + sh.Dv, 0.0f);
            st.m() = -INFINITY;
            st.l() = 0;
        }
        for (int64_t i = p * n_seen / n_parts; i < (p + 1) * n_seen / n_parts; ++i) {
            const int64_t it = seen[i];
            const bool block = it < n_blocks;
            const int64_t first = first_column(it), n = columns(it);
            const int64_t ahead = i + Stream::kPrefetchAhead;
            if (ahead < (p + 1) * n_seen / n_parts && seen[ahead] < n_blocks) {
                ks.prefetch(seen[ahead]);
                vs.prefetch(seen[ahead]);
            }
            for (int64_t t = 0; t < sh.n_q; ++t) {
                for (int64_t j = 0; j < B; ++j) {
                    masks[t * B + j] = j < n ? mask_at(block ? comp : mask, first + j, t) : -INFINITY;
                }
            }
            if (block) {
                const float * rows;
                int32_t coded;
                GGML_ASSERT(kc.coefficients(ks.bytes.data() + ks.offsets[it], ks.offsets[it + 1] - ks.offsets[it],
                                            ks.bytes.size() - ks.offsets[it + 1], rows, coded) == KVGGML_OK &&
                            "kvggml: a compressed block failed to decode");
                attend_block(sh, rows, coded, vc, vs.bytes.data() + vs.offsets[it], vs.offsets[it + 1] - vs.offsets[it],
                             vs.bytes.size() - vs.offsets[it + 1], masks.data(), queries.data(), part, y.data(),
                             tmp.data(), attended.data());
                continue;
            }
            for (int64_t j = 0; j < n; ++j) {
                const char * kj = (const char *) k->data + (first + j) * k->nb[2];
                for (int64_t h = 0; h < sh.n_head_kv; ++h) {
                    f16_to_f32_row((const uint16_t *) (kj + h * k->nb[1]), k_rows.data() + j * Ck + h * sh.Dk, sh.Dk);
                    if (!v_trans) {
                        f16_to_f32_row((const uint16_t *) ((const char *) v->data + (first + j) * v->nb[2] + h * v->nb[1]),
                                   v_rows.data() + j * Cv + h * sh.Dv, sh.Dv);
                    }
                }
            }
            if (v_trans) {
                // a transposed V holds each channel's cells in a row: convert those rows (F16C where
                // the CPU has it; one value at a time was most of this op's own time), then transpose
                for (int64_t c = 0; c < Cv; ++c) {
                    f16_to_f32_row((const uint16_t *) ((const char *) v->data + first * v->nb[0] +
                                                       (c / sh.Dv) * v->nb[1] + (c % sh.Dv) * v->nb[2]),
                                   v_cols.data() + c * B, n);
                }
                for (int64_t j = 0; j < n; ++j) {
                    for (int64_t c = 0; c < Cv; ++c) {
                        v_rows[j * Cv + c] = v_cols[c * B + j];
                    }
                }
            }
            attend_cells(sh, n, k_rows.data(), v_rows.data(), masks.data(), queries.data(), part);
        }
    }
    if (ith == 0) {
        decode_us += now_us() - t0;  // thread 0's share: a sample of the op's wall time
    }
}

void merge_partials(ggml_tensor * dst, int ith, int nth, void * userdata) {
    GGML_UNUSED(userdata);
    const ggml_tensor * parts = dst->src[0];
    const int64_t Dv = parts->ne[0] - 2, n_head = parts->ne[1], n_q = parts->ne[2], n_parts = parts->ne[3];
    const auto * in = (const float *) parts->data;
    for (int64_t x = ith; x < n_q * n_head; x += nth) {
        float * out = (float *) ((char *) dst->data + (x / n_head) * dst->nb[1]) + (x % n_head) * Dv;
        float top = -INFINITY;
        for (int64_t p = 0; p < n_parts; ++p) {
            top = std::max(top, in[(p * n_q * n_head + x) * (Dv + 2) + Dv]);
        }
        std::fill(out, out + Dv, 0.0f);
        if (top == -INFINITY) {
            continue;  // nothing visible (a padding row)
        }
        float sum = 0;
        for (int64_t p = 0; p < n_parts; ++p) {
            const float * st = in + (p * n_q * n_head + x) * (Dv + 2);
            if (st[Dv] == -INFINITY) {
                continue;
            }
            const float f = std::exp(st[Dv] - top);
            sum += st[Dv + 1] * f;
            axpy(f, st, out, Dv);
        }
        for (int64_t c = 0; c < Dv; ++c) {
            out[c] /= sum;
        }
    }
}

} // namespace kvggml
