// Causal attention over packed variable-length sequences, float32, forward (output and log-sum-exp) and backward.
// Sequence s has n_s queries (rows cu_q[s]..cu_q[s+1] of q) and m_s >= n_s keys (key_rows[cu_k[s]..cu_k[s+1]] of
// k and v), bottom-right aligned: query i sees key p iff p <= i + m_s - n_s (and, with a window W, p > i + m_s -
// n_s - W). That one rule covers a square (n = m), a sequence with a shared context before its own keys, and a
// last layer's tail queries.
//
// Why not torch's CPU flash attention: it computes whole 512-key blocks, so a causal sequence of up to 512 keys
// costs as much as a full one. Here each block of R query rows computes scores only up to its last row's last
// visible key (and from its first row's first, with a window). Scores are a row block's full rows (keys fit in
// L2 for the packed lengths this runs), so the softmax is exact in one pass; the backward recomputes them from the
// saved log-sum-exp, as FlashAttention does.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "scalar_math.h"

namespace fastnest {
namespace {

// GCC lowers these to the clone's registers: v16 is one AVX-512 register, two AVX2 ones, four SSE ones.
typedef float v8 __attribute__((vector_size(32)));
typedef float v16 __attribute__((vector_size(64)));
template <typename V>
FASTNEST_INLINE V load(const float* p) {
    V r;
    std::memcpy(&r, p, sizeof(r));
    return r;
}
template <typename V>
FASTNEST_INLINE void store(float* p, V v) {
    std::memcpy(p, &v, sizeof(v));
}

// Tile sizes, measured fastest among 4-16 rows x 8-16 keys x 16-32 columns on an AVX-512 machine (the
// accumulators, R v16 for scores and R x DC / 16 for the products with values and keys, fit its 32 registers;
// AVX2 holds half as many floats, so it spills some).
constexpr int R = 12;   // query rows per block
constexpr int BK = 16;  // keys per score tile (one v16)
constexpr int DC = 32;  // head-dim columns per accumulation pass (two v16)

FASTNEST_INLINE int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// The keys row r of a block sees: [lo, hi).
struct Span {
    int64_t lo, hi;
};
FASTNEST_INLINE Span visible(int64_t i, int64_t off, int64_t m, int64_t window) {
    const int64_t a = i + off;  // the query's position among the keys
    return {window > 0 ? std::max<int64_t>(0, a - window + 1) : 0, std::min(m, a + 1)};
}

// S[r][j0..j1) = sum_d A[r][d] * BT[d][j] for r < R (A [R][D] row-major, BT [D][ld]); j0, j1 multiples of BK.
FASTNEST_INLINE void scores(const float* A, int64_t D, const float* BT, int64_t ld, int64_t j0, int64_t j1, float* S) {
    for (int64_t j = j0; j < j1; j += BK) {
        v16 acc[R] = {};
        for (int64_t d = 0; d < D; ++d) {
            const v16 b = load<v16>(BT + d * ld + j);
            for (int r = 0; r < R; ++r) acc[r] += A[r * D + d] * b;
        }
        for (int r = 0; r < R; ++r) store(S + r * ld + j, acc[r]);
    }
}

// O[r][c0..c0+W*NV) = sum_{p in [j0, j1)} P[r][p] * B[p][c0..] for r < R (P [R][ld], B [m][D] row-major), in NV
// vectors V of W floats per row.
template <typename V, int NV>
FASTNEST_INLINE void combine_cols(const float* P, int64_t ld, int64_t j0, int64_t j1, const float* B, int64_t D,
                                  int64_t c0, float* O) {
    constexpr int W = sizeof(V) / sizeof(float);
    V acc[R][NV] = {};
    for (int64_t p = j0; p < j1; ++p) {
        V b[NV];
        for (int c = 0; c < NV; ++c) b[c] = load<V>(B + p * D + c0 + W * c);
        for (int r = 0; r < R; ++r) {
            const float w = P[r * ld + p];
            for (int c = 0; c < NV; ++c) acc[r][c] += w * b[c];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < NV; ++c) store(O + r * D + c0 + W * c, acc[r][c]);
}

// O [R][D] = P [R][j0..j1) @ B [j0..j1)[D] (D a multiple of 8).
FASTNEST_INLINE void combine(const float* P, int64_t ld, int64_t j0, int64_t j1, const float* B, int64_t D, float* O) {
    int64_t c0 = 0;
    for (; c0 + DC <= D; c0 += DC) combine_cols<v16, DC / 16>(P, ld, j0, j1, B, D, c0, O);
    if (c0 + 16 <= D) combine_cols<v16, 1>(P, ld, j0, j1, B, D, c0, O), c0 += 16;
    if (c0 < D) combine_cols<v8, 1>(P, ld, j0, j1, B, D, c0, O);
}

// Acc[p][:] += sum_r P[r][p] * X[r][:] for p in [j0, j1) (a rank-R update of key rows).
FASTNEST_INLINE void rank_update(const float* P, int64_t ld, int64_t j0, int64_t j1, const float* X, int64_t D,
                                 float* Acc) {
    for (int64_t p = j0; p < j1; ++p) {
        float* a = Acc + p * D;
        int64_t c = 0;
        for (; c + 16 <= D; c += 16) {
            v16 s = load<v16>(a + c);
            for (int r = 0; r < R; ++r) s += P[r * ld + p] * load<v16>(X + r * D + c);
            store(a + c, s);
        }
        if (c < D) {
            v8 s = load<v8>(a + c);
            for (int r = 0; r < R; ++r) s += P[r * ld + p] * load<v8>(X + r * D + c);
            store(a + c, s);
        }
    }
}

// The problem: pointers and strides (in floats) shared by every task.
struct Problem {
    const float *q, *k, *v, *out, *lse, *dout;
    float *o_out, *lse_out, *dq, *dk, *dv;
    const int64_t *key_rows, *cu_q, *cu_k;
    int64_t seqs, heads, kv_heads, dim, q_stride, k_stride, v_stride, window;
    float scale;
};

// Per-thread buffers for sequences of up to max_keys keys.
struct Scratch {
    std::vector<float> kt, vt, kb, vb, dkb, dvb, s, dp, a, b, o;
    Scratch(int64_t max_keys, int64_t D, bool backward) {
        const int64_t mp = round_up(std::max<int64_t>(max_keys, 1), BK);
        kt.resize(D * mp);
        s.resize(R * mp);
        a.resize(R * D);
        b.resize(R * D);
        o.resize(R * D);
        if (!backward) vb.resize(mp * D);
        if (backward) {
            vt.resize(D * mp);
            kb.resize(mp * D);
            dkb.resize(mp * D);
            dvb.resize(mp * D);
            dp.resize(R * mp);
        }
    }
};

// Gathers sequence s's keys of kv head hk: transposed (BT [D][mp], zero past m) and/or row-major (B [m][D]).
FASTNEST_INLINE void gather_keys(const float* src, int64_t stride, const int64_t* rows, int64_t m, int64_t D,
                                 float* BT, int64_t mp, float* B) {
    for (int64_t p = 0; p < m; ++p) {
        const float* row = src + rows[p] * stride;
        if (BT != nullptr)
            for (int64_t d = 0; d < D; ++d) BT[d * mp + p] = row[d];
        if (B != nullptr) std::memcpy(B + p * D, row, D * sizeof(float));
    }
    if (BT != nullptr)
        for (int64_t d = 0; d < D; ++d) std::fill(BT + d * mp + m, BT + (d + 1) * mp, 0.0f);
}

// dst [R][D] = factor * rows t0 .. t0 + rows - 1 of src (row t at src + t * stride), zero past rows.
FASTNEST_INLINE void load_rows(const float* src, int64_t stride, int64_t t0, int rows, int64_t D, float factor,
                               float* dst) {
    for (int r = 0; r < R; ++r)
        for (int64_t d = 0; d < D; ++d) dst[r * D + d] = r < rows ? src[(t0 + r) * stride + d] * factor : 0.0f;
}

// Row block [i0, i0 + rows) of a sequence: the key range its score tiles cover (multiples of BK).
struct Block {
    int64_t j0, j1, hi;  // tiles [j0, j1); keys past hi are seen by no row of the block
};
FASTNEST_INLINE Block block_keys(int64_t i0, int rows, int64_t off, int64_t m, int64_t window) {
    const int64_t lo = visible(i0, off, m, window).lo, hi = visible(i0 + rows - 1, off, m, window).hi;
    return {lo / BK * BK, round_up(hi, BK), hi};
}

FASTNEST_MULTIVERSION void forward_task(const Problem& P, int64_t s, int64_t h, Scratch& w) {
    const int64_t D = P.dim, n = P.cu_q[s + 1] - P.cu_q[s], m = P.cu_k[s + 1] - P.cu_k[s], off = m - n;
    if (n == 0) return;  // no query: nothing to write (its keys are read by no one)
    const int64_t hk = h / (P.heads / P.kv_heads), mp = round_up(m, BK);
    const int64_t* rows = P.key_rows + P.cu_k[s];
    gather_keys(P.k + hk * D, P.k_stride, rows, m, D, w.kt.data(), mp, nullptr);
    gather_keys(P.v + hk * D, P.v_stride, rows, m, D, nullptr, mp, w.vb.data());
    float* S = w.s.data();
    for (int64_t i0 = 0; i0 < n; i0 += R) {
        const int rows_here = static_cast<int>(std::min<int64_t>(R, n - i0));
        load_rows(P.q + h * D, P.q_stride, P.cu_q[s] + i0, rows_here, D, P.scale, w.a.data());
        const Block blk = block_keys(i0, rows_here, off, m, P.window);
        scores(w.a.data(), D, w.kt.data(), mp, blk.j0, blk.j1, S);
        float inv[R] = {};
        for (int r = 0; r < R; ++r) {
            float* row = S + r * mp;
            if (r >= rows_here) continue;  // zero queries: zero scores, an output nobody reads
            const Span span = visible(i0 + r, off, m, P.window);
            float mx = -INFINITY;
            for (int64_t p = span.lo; p < span.hi; ++p) mx = std::max(mx, row[p]);
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t p = span.lo; p < span.hi; ++p) {
                const float e = exp_f(row[p] - mx);
                row[p] = e;
                sum += e;
            }
            std::fill(row + blk.j0, row + span.lo, 0.0f);
            std::fill(row + span.hi, row + blk.j1, 0.0f);
            inv[r] = 1.0f / sum;
            P.lse_out[(P.cu_q[s] + i0 + r) * P.heads + h] = mx + std::log(sum);
        }
        combine(S, mp, blk.j0, blk.hi, w.vb.data(), D, w.o.data());
        for (int r = 0; r < rows_here; ++r) {
            float* dst = P.o_out + ((P.cu_q[s] + i0 + r) * P.heads + h) * D;
            for (int64_t d = 0; d < D; ++d) dst[d] = w.o[r * D + d] * inv[r];
        }
    }
}

// Sequence s, kv head hk, every query head of its group: dq of those heads' rows, and dk/dv of the sequence's
// key positions (written whole, so a key row that several sequences share gets one slot per sequence).
FASTNEST_MULTIVERSION void backward_task(const Problem& P, int64_t s, int64_t hk, Scratch& w) {
    const int64_t D = P.dim, n = P.cu_q[s + 1] - P.cu_q[s], m = P.cu_k[s + 1] - P.cu_k[s], off = m - n;
    const int64_t group = P.heads / P.kv_heads, mp = round_up(m, BK);
    const int64_t* rows = P.key_rows + P.cu_k[s];
    gather_keys(P.k + hk * D, P.k_stride, rows, m, D, w.kt.data(), mp, w.kb.data());
    gather_keys(P.v + hk * D, P.v_stride, rows, m, D, w.vt.data(), mp, nullptr);
    std::fill(w.dkb.begin(), w.dkb.begin() + m * D, 0.0f);
    std::fill(w.dvb.begin(), w.dvb.begin() + m * D, 0.0f);
    float *S = w.s.data(), *dP = w.dp.data(), *qs = w.a.data(), *go = w.b.data();
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < n; i0 += R) {
            const int rows_here = static_cast<int>(std::min<int64_t>(R, n - i0));
            const int64_t t0 = P.cu_q[s] + i0;
            load_rows(P.q + h * D, P.q_stride, t0, rows_here, D, P.scale, qs);
            load_rows(P.dout + h * D, P.heads * D, t0, rows_here, D, 1.0f, go);
            float lse[R] = {}, delta[R] = {};
            for (int r = 0; r < rows_here; ++r) {
                lse[r] = P.lse[(t0 + r) * P.heads + h];
                const float* o = P.out + ((t0 + r) * P.heads + h) * D;
                for (int64_t d = 0; d < D; ++d) delta[r] += go[r * D + d] * o[d];
            }
            const Block blk = block_keys(i0, rows_here, off, m, P.window);
            scores(qs, D, w.kt.data(), mp, blk.j0, blk.j1, S);
            scores(go, D, w.vt.data(), mp, blk.j0, blk.j1, dP);
            for (int r = 0; r < R; ++r) {
                float *p_row = S + r * mp, *dp_row = dP + r * mp;
                const Span span = r < rows_here ? visible(i0 + r, off, m, P.window) : Span{blk.j0, blk.j0};
                std::fill(p_row + blk.j0, p_row + span.lo, 0.0f);
                std::fill(dp_row + blk.j0, dp_row + span.lo, 0.0f);
#pragma omp simd
                for (int64_t p = span.lo; p < span.hi; ++p) {
                    const float prob = exp_f(p_row[p] - lse[r]);
                    p_row[p] = prob;
                    dp_row[p] = prob * (dp_row[p] - delta[r]);  // dS
                }
                std::fill(p_row + std::max(span.hi, blk.j0), p_row + blk.j1, 0.0f);
                std::fill(dp_row + std::max(span.hi, blk.j0), dp_row + blk.j1, 0.0f);
            }
            combine(dP, mp, blk.j0, blk.hi, w.kb.data(), D, w.o.data());
            for (int r = 0; r < rows_here; ++r) {
                float* dst = P.dq + ((P.cu_q[s] + i0 + r) * P.heads + h) * D;
                for (int64_t d = 0; d < D; ++d) dst[d] = w.o[r * D + d] * P.scale;
            }
            rank_update(S, mp, blk.j0, blk.hi, go, D, w.dvb.data());
            rank_update(dP, mp, blk.j0, blk.hi, qs, D, w.dkb.data());  // qs holds scale * q: dk = scale * dS^T q
        }
    }
    for (int64_t p = 0; p < m; ++p) {
        const int64_t slot = ((P.cu_k[s] + p) * P.kv_heads + hk) * D;
        std::memcpy(P.dk + slot, w.dkb.data() + p * D, D * sizeof(float));
        std::memcpy(P.dv + slot, w.dvb.data() + p * D, D * sizeof(float));
    }
}

void check(const Problem& P) {
    if (P.dim % 8 != 0) throw std::invalid_argument("attention: the head dimension must be a multiple of 8");
    if (P.kv_heads < 1 || P.heads % P.kv_heads != 0)
        throw std::invalid_argument("attention: the query heads must divide into the key/value heads");
    for (int64_t s = 0; s < P.seqs; ++s)
        if (P.cu_q[s + 1] - P.cu_q[s] > P.cu_k[s + 1] - P.cu_k[s] || P.cu_q[s + 1] < P.cu_q[s])
            throw std::invalid_argument("attention: a sequence has more queries than keys");
}

// Checks P, then runs task(P, s, head, scratch) for every sequence s and head in 0 .. heads - 1 on the threads,
// each thread with its own scratch.
template <typename Task>
void run_tasks(const Problem& P, int64_t heads, bool backward, int num_threads, Task task) {
    check(P);
    int64_t keys = 0;
    for (int64_t s = 0; s < P.seqs; ++s) keys = std::max(keys, P.cu_k[s + 1] - P.cu_k[s]);
#pragma omp parallel num_threads(num_threads)
    {
        Scratch w(keys, P.dim, backward);
#pragma omp for schedule(dynamic)
        for (int64_t t = 0; t < P.seqs * heads; ++t) task(P, t / heads, t % heads, w);
    }
}

}  // namespace

void attention_forward(const float* q, int64_t q_stride, const float* k, int64_t k_stride, const float* v,
                       int64_t v_stride, const int64_t* key_rows, const int64_t* cu_q, const int64_t* cu_k,
                       int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim, float scale, int64_t window,
                       float* out, float* lse, int num_threads) {
    Problem P{q, k, v, nullptr, nullptr, nullptr, out, lse, nullptr, nullptr, nullptr, key_rows, cu_q, cu_k,
              seqs, heads, kv_heads, dim, q_stride, k_stride, v_stride, window, scale};
    run_tasks(P, heads, false, num_threads, forward_task);
}

void attention_backward(const float* dout, const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                        const float* v, int64_t v_stride, const float* out, const float* lse, const int64_t* key_rows,
                        const int64_t* cu_q, const int64_t* cu_k, int64_t seqs, int64_t heads, int64_t kv_heads,
                        int64_t dim, float scale, int64_t window, float* dq, float* dk, float* dv, int num_threads) {
    Problem P{q, k, v, out, lse, dout, nullptr, nullptr, dq, dk, dv, key_rows, cu_q, cu_k,
              seqs, heads, kv_heads, dim, q_stride, k_stride, v_stride, window, scale};
    run_tasks(P, kv_heads, true, num_threads, backward_task);
}

}  // namespace fastnest
