// One chunk of the fused linear cross-entropy: per row, the log-sum-exp, the loss and, in place, the gradient of
// coef * loss with respect to the logits. No GEMM here (the Python side runs them with ATen).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "scalar_math.h"

namespace fastnest {
namespace {

constexpr int64_t kTaskElements = 1 << 15;  // logits per OpenMP task: big enough to amortize a dispatch

FASTNEST_INLINE float exp_acc(float x) { return exp_f(x); }
FASTNEST_INLINE double exp_acc(double x) { return std::exp(x); }

// One row: two passes over the logits (max, then sum of exp), the loss, then the gradient written over them.
template <typename T>
FASTNEST_INLINE void ce_row(T* z, int64_t vocab, int64_t target, float coef, float* loss) {
    using A = Acc<T>;
    if (target == kIgnoreIndex) {
        *loss = 0.0f;
#pragma omp simd
        for (int64_t j = 0; j < vocab; ++j) store(z + j, A(0));
        return;
    }
    A m = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < vocab; ++j) {
        const A v = load(z + j);
        m = v > m ? v : m;
    }
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < vocab; ++j) s += exp_acc(load(z + j) - m);  // a NaN logit makes s (and all) NaN
    const A lse = m + std::log(s);
    const A z_target = load(z + target);
    *loss = static_cast<float>(lse - z_target);
    const A c = coef;
#pragma omp simd
    for (int64_t j = 0; j < vocab; ++j) store(z + j, exp_acc(load(z + j) - lse) * c);
    store(z + target, (exp_acc(z_target - lse) - A(1)) * c);
}

template <typename T>
FASTNEST_INLINE void ce_rows(T* logits, int64_t row_stride, const int64_t* targets, const float* coef, float* loss,
                             int64_t rows, int64_t vocab) {
    for (int64_t i = 0; i < rows; ++i) ce_row(logits + i * row_stride, vocab, targets[i], coef[i], loss + i);
}

// One multiversioned worker per dtype (target_clones does not apply to templates).
#define FASTNEST_CE_WORKER(T, NAME)                                                                          \
    FASTNEST_MULTIVERSION void rows_##NAME(T* logits, int64_t row_stride, const int64_t* targets,             \
                                           const float* coef, float* loss, int64_t rows, int64_t vocab) {     \
        ce_rows(logits, row_stride, targets, coef, loss, rows, vocab);                                        \
    }                                                                                                         \
    void run(T* logits, int64_t row_stride, const int64_t* targets, const float* coef, float* loss,          \
             int64_t rows, int64_t vocab, int threads) {                                                      \
        const int64_t step = std::max<int64_t>(1, kTaskElements / vocab);                                     \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic) if (rows * vocab > kTaskElements)") \
        for (int64_t i = 0; i < rows; i += step)                                                              \
            rows_##NAME(logits + i * row_stride, row_stride, targets + i, coef + i, loss + i,                 \
                        std::min(step, rows - i), vocab);                                                     \
    }

FASTNEST_CE_WORKER(float, f32)
FASTNEST_CE_WORKER(double, f64)
FASTNEST_CE_WORKER(bf16, bf16)
FASTNEST_CE_WORKER(f16, f16)

#undef FASTNEST_CE_WORKER

void check_targets(const int64_t* targets, int64_t rows, int64_t vocab) {
    for (int64_t i = 0; i < rows; ++i) {
        const int64_t t = targets[i];
        if (t != kIgnoreIndex && (t < 0 || t >= vocab))
            throw std::invalid_argument("target " + std::to_string(t) + " of row " + std::to_string(i) +
                                        " is outside [0, " + std::to_string(vocab) + ") and is not " +
                                        std::to_string(kIgnoreIndex));
    }
}

}  // namespace

void ce_grad(void* logits, int64_t row_stride, const int64_t* targets, const float* coef, float* loss, int64_t rows,
             int64_t vocab, DType dtype, int num_threads) {
    check_targets(targets, rows, vocab);
    switch (dtype) {
        case DType::f32:
            return run(static_cast<float*>(logits), row_stride, targets, coef, loss, rows, vocab, num_threads);
        case DType::f64:
            return run(static_cast<double*>(logits), row_stride, targets, coef, loss, rows, vocab, num_threads);
        case DType::bf16:
            return run(static_cast<bf16*>(logits), row_stride, targets, coef, loss, rows, vocab, num_threads);
        case DType::f16:
            return run(static_cast<f16*>(logits), row_stride, targets, coef, loss, rows, vocab, num_threads);
    }
}

}  // namespace fastnest
