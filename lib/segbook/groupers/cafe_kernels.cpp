// CAFE's per-pixel reductions (segbook.groupers.cafe_native compiles and loads this file).
//
// Stages 1 and 2 of CAFE score every pixel against K prototypes (a matrix product, done by
// torch) and then reduce each row of scores: the best column, whether the runner-up is within
// a margin (a float32 re-check is then needed), and in stage 2 the pooled attention
// A^G = A G added to the scores first. In torch each of these is a separate pass over a
// (pixels x K) matrix (a conversion, a scatter-add, a maximum, a masked second maximum), and
// they cost several times the product itself. Here one pass over each row does all of them
// while the row is in the first-level cache.
//
// Threads: OpenMP loops over rows. Compiled with -fopenmp, this library uses the libgomp that
// torch has already loaded (same soname), so the kernels share torch's threads and its
// torch.set_num_threads() setting instead of competing with its spinning workers.
//
// Conventions: row-major arrays; bfloat16 values are passed as their uint16 bit patterns;
// ties go to the lowest column (as torch's max(dim=1)); every input is finite (the callers
// check). Nothing here allocates more than two rows of K floats per call.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

// How the T attention columns of a row are pooled into K prototype columns (A G, G one-hot):
// column k gets token src[k] times w[k] (w 0 when no token maps to k, else 1: the lowest token
// of k), then the n_rest other tokens are added one by one in increasing token order
// (rest_tok[i] -> column rest_grp[i]). The first part is a vectorised gather; when no two
// tokens share a prototype (CAFE's dictionary before any merge) it is all there is.
struct Pool {
    const int32_t* src;
    const float* w;
    int64_t n_rest;
    const int32_t* rest_tok;
    const int32_t* rest_grp;
    int64_t identity;     // token k -> column k for every k (K == T): A G = A, no gather
};

namespace {

// Subnormal floats (attention weights of far tokens, e^-100 and smaller) cost a microcode
// assist per operation on x86, 6x the whole pass here; while a kernel runs they are read and
// written as zero (flush-to-zero and denormals-are-zero), which changes sums by < 1e-37.
struct FlushSubnormals {
#if defined(__SSE__)
    unsigned int saved = _mm_getcsr();
    FlushSubnormals() { _mm_setcsr(saved | 0x8040u); }
    ~FlushSubnormals() { _mm_setcsr(saved); }
#endif
};

inline float bf16_to_f32(uint16_t b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline uint16_t f32_to_bf16(float f) {
    // round to nearest even, as torch's conversion (inputs are finite)
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

// scratch size for the pooled attention row: K floats when there is an attention term
inline int64_t a_size(const float* att, int64_t K) { return att ? K : 1; }

inline float load(const float* s, int64_t k) { return s[k]; }
inline float load(const uint16_t* s, int64_t k) { return bf16_to_f32(s[k]); }

// 16 float lanes (GCC vector extensions: AVX-512, two AVX2 or four SSE registers, whatever
// -march=native offers).
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16f load16(const float* p) {
    v16f r;
    std::memcpy(&r, p, sizeof r);
    return r;
}

// <x, d> over C entries: 16 partial sums (a fixed order, so the result does not depend on
// the machine's vector width), then the tail.
inline float dot(const float* x, const float* d, int64_t C) {
    v16f acc = v16f{};
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) acc += load16(x + c) * load16(d + c);
    float out = 0.f;
    for (int j = 0; j < 16; ++j) out += acc[j];
    for (; c < C; ++c) out += x[c] * d[c];
    return out;
}

// Lanes padded with -inf so that rows of any K are whole blocks of 16.
inline int64_t padded(int64_t K) { return (K + 15) / 16 * 16; }

struct Top2 {
    float first, second;
    int64_t index, second_index;
};

// The best value of v[0:Kp] (Kp a multiple of 16, padding -inf), the lowest index holding it,
// the runner-up (the best of the rest; equal to `first` on a tie) and an index holding it.
// Each lane keeps its own two best values and their blocks (first occurrence: strict >).
inline Top2 top2(const float* v, int64_t Kp) {
    const float ninf = -std::numeric_limits<float>::infinity();
    v16f m1 = ninf - v16f{}, m2 = m1;
    v16i b1 = v16i{}, b2 = v16i{}, cur = v16i{};
    for (int64_t k = 0; k < Kp; k += 16, cur += 1) {
        const v16f x = load16(v + k);
        const v16i gt = x > m1;
        const v16i gt2 = x > m2;
        m2 = gt ? m1 : (gt2 ? x : m2);
        b2 = gt ? b1 : (gt2 ? cur : b2);
        m1 = gt ? x : m1;
        b1 = gt ? cur : b1;
    }
    Top2 out{ninf, ninf, 0, 0};
    int lane = -1;
    for (int j = 0; j < 16; ++j) {
        const int64_t idx = static_cast<int64_t>(b1[j]) * 16 + j;
        if (m1[j] > out.first || (m1[j] == out.first && lane >= 0 && idx < out.index)) {
            out.first = m1[j];
            out.index = idx;
            lane = j;
        }
    }
    if (lane < 0) return out;
    for (int j = 0; j < 16; ++j) {
        const float o = j == lane ? m2[j] : m1[j];
        const int64_t idx = static_cast<int64_t>(j == lane ? b2[j] : b1[j]) * 16 + j;
        if (o > out.second) {
            out.second = o;
            out.second_index = idx;
        }
    }
    return out;
}

// One row's values v[k] = alpha * s[k] + beta * (A G)[k] + bias[k] (terms absent when their
// pointer is null). ag is scratch of K floats.
template <typename S>
inline void row_values(const S* s, int64_t K, const float* a, int64_t T, const Pool* g,
                       float alpha, float beta, const float* bias, float* v, float* ag) {
    (void)T;
    if (a != nullptr && g->identity) {
        if (bias != nullptr)
            for (int64_t k = 0; k < K; ++k) v[k] = alpha * load(s, k) + beta * a[k] + bias[k];
        else
            for (int64_t k = 0; k < K; ++k) v[k] = alpha * load(s, k) + beta * a[k];
    } else if (a != nullptr) {
        const int32_t* src = g->src;
        const float* w = g->w;
        for (int64_t k = 0; k < K; ++k) ag[k] = w[k] * a[src[k]];
        for (int64_t i = 0; i < g->n_rest; ++i) ag[g->rest_grp[i]] += a[g->rest_tok[i]];
        if (bias != nullptr)
            for (int64_t k = 0; k < K; ++k) v[k] = alpha * load(s, k) + beta * ag[k] + bias[k];
        else
            for (int64_t k = 0; k < K; ++k) v[k] = alpha * load(s, k) + beta * ag[k];
    } else if (bias != nullptr) {
        for (int64_t k = 0; k < K; ++k) v[k] = alpha * load(s, k) + bias[k];
    } else {
        for (int64_t k = 0; k < K; ++k) v[k] = alpha * load(s, k);
    }
}

template <typename S>
int64_t best_rows(const S* scores, int64_t R, int64_t K, const float* att, int64_t T,
                  const Pool* g, float alpha, float beta, const float* bias, float err0,
                  float err1, int64_t* best, uint8_t* ambiguous) {
    const int64_t Kp = padded(K);
    int64_t n_amb = 0;
#pragma omp parallel reduction(+ : n_amb) if (R >= 256)
    {
        FlushSubnormals guard;
        std::vector<float> v(Kp, -std::numeric_limits<float>::infinity()), ag(a_size(att, K));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; ++r) {
            row_values(scores + r * K, K, att ? att + r * T : nullptr, T, g, alpha, beta, bias,
                       v.data(), ag.data());
            const Top2 t = top2(v.data(), Kp);
            best[r] = t.index;
            if (ambiguous == nullptr) continue;
            // the two scores' rounding errors, each at most err0 + err1 |score| (one column:
            // never ambiguous)
            const float e1 = err0 + err1 * std::fabs(load(scores + r * K, t.index));
            const float e2 = err0 + err1 * std::fabs(load(scores + r * K, t.second_index));
            const bool amb = K > 1 && t.first - t.second < alpha * (e1 + e2);
            ambiguous[r] = amb;
            n_amb += amb;
        }
    }
    return n_amb;
}

template <typename S>
void recheck_rows(const S* scores, int64_t K, const float* att, int64_t T, const Pool* g,
                  float alpha, float beta, const float* bias, float err0, float err1,
                  const int64_t* rows,
                  int64_t m, const float* X, const float* inv_norm, int64_t C, const float* D,
                  int64_t* best) {
    const int64_t Kp = padded(K);
#pragma omp parallel if (m >= 64)
    {
    FlushSubnormals guard;
    std::vector<float> v(Kp, -std::numeric_limits<float>::infinity()), ag(a_size(att, K));
#pragma omp for schedule(static)
    for (int64_t j = 0; j < m; ++j) {
        const int64_t r = rows[j];
        row_values(scores + r * K, K, att ? att + r * T : nullptr, T, g, alpha, beta, bias,
                   v.data(), ag.data());
        const S* sr = scores + r * K;
        const Top2 t = top2(v.data(), Kp);
        // column k can beat the best only if v[k] + its error >= the best's v - its error
        const float floor = t.first - alpha * (err0 + err1 * std::fabs(load(sr, t.index)));
        const float* x = X + j * C;
        // the pooled attention of the row (the row itself when the pooling is the identity)
        const float* pooled = att != nullptr && g->identity ? att + r * T : ag.data();
        float top = -std::numeric_limits<float>::infinity();
        int64_t arg = 0;
        for (int64_t k = 0; k < K; ++k) {
            if (!(v[k] + alpha * (err0 + err1 * std::fabs(load(sr, k))) >= floor)) continue;
            float e = alpha * (dot(x, D + k * C, C) * inv_norm[j]);
            if (att != nullptr) e += beta * pooled[k];
            if (bias != nullptr) e += bias[k];
            if (e > top) { top = e; arg = k; }
        }
        best[r] = arg;
    }
    }
}

}  // namespace

extern "C" {

// best[r] = argmax_k v[r, k] for rows 0..R-1 of `scores` (R x K), v as in row_values; with
// `ambiguous` non-null, ambiguous[r] = 1 where the two best values are closer than their
// possible error: each score is within err0 + err1 |score| of the exact one, so the values
// within alpha times that. Returns the number of ambiguous rows.
int64_t cafe_best_rows_bf16(const uint16_t* scores, int64_t R, int64_t K, const float* att,
                            int64_t T, const Pool* g, float alpha, float beta,
                            const float* bias, float err0, float err1, int64_t* best,
                            uint8_t* ambiguous) {
    return best_rows(scores, R, K, att, T, g, alpha, beta, bias, err0, err1, best, ambiguous);
}

int64_t cafe_best_rows_f32(const float* scores, int64_t R, int64_t K, const float* att,
                           int64_t T, const Pool* g, float alpha, float beta,
                           const float* bias, float err0, float err1, int64_t* best,
                           uint8_t* ambiguous) {
    return best_rows(scores, R, K, att, T, g, alpha, beta, bias, err0, err1, best, ambiguous);
}

// For each listed row r = rows[j]: every column k whose value could exceed the best's, given
// the errors of both (as in cafe_best_rows_bf16), is scored in float32, alpha * <x_j, D_k> * inv_norm[j] + beta * (A G)[r, k] + bias[k], with x_j
// the row j of X (m x C, float32, the pixel's features, unnormalised) and D (K x C);
// best[r] = the best of them (the lowest column on a tie).
void cafe_recheck_rows_bf16(const uint16_t* scores, int64_t K, const float* att, int64_t T,
                            const Pool* g, float alpha, float beta, const float* bias,
                            float err0, float err1, const int64_t* rows, int64_t m,
                            const float* X, const float* inv_norm, int64_t C, const float* D,
                            int64_t* best) {
    recheck_rows(scores, K, att, T, g, alpha, beta, bias, err0, err1, rows, m, X, inv_norm, C,
                 D, best);
}

// g2[y, x] = sum over channels of the squared spatial differences of X (C x H x W), as
// numpy.gradient takes them: central (halved) inside, one-sided at the border, none along an
// axis of length 1. Bands of 8 output rows read their 10 input rows once per channel.
void cafe_feature_gradient(const float* X, int64_t C, int64_t H, int64_t W, float* g2) {
    constexpr int64_t B = 8;
    const int64_t nb = (H + B - 1) / B;
#pragma omp parallel for schedule(static) if (H * W >= 16384)
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t y0 = b * B, y1 = y0 + B < H ? y0 + B : H;
        for (int64_t y = y0; y < y1; ++y)
            for (int64_t x = 0; x < W; ++x) g2[y * W + x] = 0.f;
        for (int64_t c = 0; c < C; ++c) {
            const float* xc = X + c * H * W;
            for (int64_t y = y0; y < y1; ++y) {
                const float* row = xc + y * W;
                float* o = g2 + y * W;
                if (W > 1) {
                    const float d0 = row[1] - row[0], d1 = row[W - 1] - row[W - 2];
                    o[0] += d0 * d0;
                    for (int64_t x = 1; x + 1 < W; ++x) {
                        const float d = (row[x + 1] - row[x - 1]) * 0.5f;
                        o[x] += d * d;
                    }
                    o[W - 1] += d1 * d1;
                }
                if (H > 1) {
                    const float* up = y == 0 ? row : xc + (y - 1) * W;
                    const float* dn = y + 1 == H ? row : xc + (y + 1) * W;
                    const float f = (y == 0 || y + 1 == H) ? 1.f : 0.5f;
                    for (int64_t x = 0; x < W; ++x) {
                        const float d = (dn[x] - up[x]) * f;
                        o[x] += d * d;
                    }
                }
            }
        }
    }
}

// Per segment k and channel c (labels lab[p] in 0..K-1 for the N pixels of X, C x N):
// fsum[c, k] = sum of X[c, p], nsum[c, k] = sum of X[c, p] * inv_norm[p] (float64, in pixel
// order), fmax[c, k] / fmin[c, k] = max / min of X[c, p] (float32; +-inf for an empty segment).
// Channels go to threads (so the sums do not depend on the thread count); along a channel,
// runs of equal labels (segments are mostly contiguous along image rows) are accumulated in
// registers and written once per run.
void cafe_segment_stats(const float* X, int64_t C, int64_t N, const int64_t* lab, int64_t K,
                        const float* inv_norm, double* fsum, double* nsum, float* fmax,
                        float* fmin) {
    const float inf = std::numeric_limits<float>::infinity();
    constexpr int64_t CB = 8;                        // channels at once: independent chains
    const int64_t nb = (C + CB - 1) / CB;
#pragma omp parallel for schedule(static) if (C * N >= 65536)
    for (int64_t blk = 0; blk < nb; ++blk) {
        const int64_t c0 = blk * CB, nc = c0 + CB <= C ? CB : C - c0;
        for (int64_t c = c0; c < c0 + nc; ++c)
            for (int64_t k = 0; k < K; ++k) {
                fsum[c * K + k] = 0.0;
                nsum[c * K + k] = 0.0;
                fmax[c * K + k] = -inf;
                fmin[c * K + k] = inf;
            }
        const float* xs[CB];
        for (int64_t j = 0; j < CB; ++j) xs[j] = X + (c0 + (j < nc ? j : 0)) * N;
        int64_t p = 0;
        while (p < N) {
            const int64_t k = lab[p];
            double a[CB] = {0.0}, b[CB] = {0.0};
            float hi[CB], lo[CB];
            for (int64_t j = 0; j < CB; ++j) hi[j] = -inf, lo[j] = inf;
            for (; p < N && lab[p] == k; ++p) {
                const float s = inv_norm[p];
                for (int64_t j = 0; j < CB; ++j) {
                    const float v = xs[j][p];
                    a[j] += v;
                    b[j] += static_cast<double>(v * s);
                    hi[j] = v > hi[j] ? v : hi[j];
                    lo[j] = v < lo[j] ? v : lo[j];
                }
            }
            for (int64_t j = 0; j < nc; ++j) {
                const int64_t o = (c0 + j) * K + k;
                fsum[o] += a[j];
                nsum[o] += b[j];
                fmax[o] = hi[j] > fmax[o] ? hi[j] : fmax[o];
                fmin[o] = lo[j] < fmin[o] ? lo[j] : fmin[o];
            }
        }
    }
}

// For each row r of the attention A (R x T): best[r] = argmax (lowest on a tie),
// sums[r] = the row's sum (16 partial sums) and mins[r] = its minimum: the argmax CAFE's
// stage 1 reads and the checks of the rows (finite, non-negative, summing to one), in one pass.
void cafe_attention_rows(const float* A, int64_t R, int64_t T, int64_t* best, float* sums,
                         float* mins) {
    const int64_t Tp = padded(T);
#pragma omp parallel if (R >= 256)
    {
        FlushSubnormals guard;
        std::vector<float> v(Tp, -std::numeric_limits<float>::infinity());
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; ++r) {
            const float* a = A + r * T;
            std::memcpy(v.data(), a, sizeof(float) * T);
            best[r] = top2(v.data(), Tp).index;
            v16f acc = v16f{}, lo = std::numeric_limits<float>::infinity() - v16f{};
            int64_t t = 0;
            for (; t + 16 <= T; t += 16) {
                const v16f x = load16(a + t);
                acc += x;
                lo = x < lo ? x : lo;
            }
            float sum = 0.f, mn = std::numeric_limits<float>::infinity();
            for (int j = 0; j < 16; ++j) {
                sum += acc[j];
                mn = lo[j] < mn ? lo[j] : mn;
            }
            for (; t < T; ++t) {
                sum += a[t];
                mn = a[t] < mn ? a[t] : mn;
            }
            // a NaN anywhere makes the sum NaN; the minimum may miss it
            sums[r] = sum;
            mins[r] = mn;
        }
    }
}

// out[b, k] = max over rows r of block b (rows b*blk .. b*blk + blk - 1) of scores[r, k]:
// bfloat16 scores (R x K), float32 maxima; one pass, vectorised across columns.
void cafe_block_col_max_bf16(const uint16_t* scores, int64_t R, int64_t K, int64_t blk,
                             float* out) {
    const float ninf = -std::numeric_limits<float>::infinity();
    const int64_t nb = (R + blk - 1) / blk;
#pragma omp parallel for schedule(static) if (nb >= 2)
    for (int64_t b = 0; b < nb; ++b) {
        float* o = out + b * K;
        for (int64_t k = 0; k < K; ++k) o[k] = ninf;
        const int64_t r0 = b * blk, r1 = r0 + blk < R ? r0 + blk : R;
        for (int64_t r = r0; r < r1; ++r) {
            const uint16_t* row = scores + r * K;
            for (int64_t k = 0; k < K; ++k) {
                const float x = bf16_to_f32(row[k]);
                o[k] = x > o[k] ? x : o[k];
            }
        }
    }
}

// out[j, c] = X[c, s + rows[j]] for j < m (rows ascending): the features of a few pixels of
// a chunk, gathered 8 channels at a time so that the 8 channel rows being read stay in cache
// (their stride is the whole image, which maps them to one cache set).
void cafe_gather_rows(const float* X, int64_t C, int64_t ldX, int64_t s, const int64_t* rows,
                      int64_t m, float* out) {
#pragma omp parallel for schedule(static) if (m >= 128)
    for (int64_t j0 = 0; j0 < m; j0 += 64) {
        const int64_t j1 = j0 + 64 < m ? j0 + 64 : m;
        for (int64_t c0 = 0; c0 < C; c0 += 8) {
            const int64_t c1 = c0 + 8 < C ? c0 + 8 : C;
            for (int64_t j = j0; j < j1; ++j) {
                const float* src = X + s + rows[j];
                float* dst = out + j * C;
                for (int64_t c = c0; c < c1; ++c) dst[c] = src[c * ldX];
            }
        }
    }
}

// inv_norm[p] = 1 / max(|X[:, p]|, 1e-12) for p < n and, when `out` is not null,
// out[p, c] = bfloat16(X[c, p] * inv_norm[p]): the unit pixel rows, transposed from the
// channel-first feature map (C x ldX), in rows of ldo >= C entries; when ldo > C, entry C is
// 1 (the offset column: see segbook.groupers.cafe_stages.PixelFeatures) and the rest 0. Blocks of 64 pixels: their squares are summed 8 channels
// at a time (8 rows a whole image apart share a cache set, which holds 12), then the block,
// still in cache, is read again to scale and convert.
void cafe_unit_rows_bf16(const float* X, int64_t C, int64_t ldX, int64_t n, float* inv_norm,
                         uint16_t* out, int64_t ldo) {
    constexpr int64_t TP = 64, TC = 8;
#pragma omp parallel for schedule(static) if (n >= 4096)
    for (int64_t p0 = 0; p0 < n; p0 += TP) {
        const int64_t np = p0 + TP < n ? TP : n - p0;
        float sq[TP] = {0.f};
        for (int64_t c = 0; c < C; ++c) {
            const float* x = X + c * ldX + p0;
            for (int64_t i = 0; i < np; ++i) sq[i] += x[i] * x[i];
        }
        for (int64_t i = 0; i < np; ++i) {
            const float nrm = std::sqrt(sq[i]);
            inv_norm[p0 + i] = 1.f / (nrm > 1e-12f ? nrm : 1e-12f);
        }
        if (out == nullptr) continue;
        float scale[TP];
        for (int64_t i = 0; i < np; ++i) scale[i] = inv_norm[p0 + i];
        uint16_t tmp[TC][TP];
        for (int64_t c0 = 0; c0 < C; c0 += TC) {
            const int64_t nc = c0 + TC < C ? TC : C - c0;
            for (int64_t c = 0; c < nc; ++c) {           // along pixels: vectorised
                const float* x = X + (c0 + c) * ldX + p0;
                for (int64_t i = 0; i < np; ++i) tmp[c][i] = f32_to_bf16(x[i] * scale[i]);
            }
            for (int64_t i = 0; i < np; ++i) {           // transposed into the rows
                uint16_t* o = out + (p0 + i) * ldo + c0;
                for (int64_t c = 0; c < nc; ++c) o[c] = tmp[c][i];
            }
        }
        for (int64_t i = 0; i < np && ldo > C; ++i) {
            uint16_t* o = out + (p0 + i) * ldo;
            o[C] = 0x3F80;                                // bfloat16 1.0
            for (int64_t c = C + 1; c < ldo; ++c) o[c] = 0;
        }
    }
}

}  // extern "C"
