// GELU forward (bias add fused, pre-activation kept) and backward (in place on the incoming gradient).
#include <omp.h>

#include <algorithm>

#include "kernels.h"
#include "scalar_math.h"

namespace fastnest {
namespace {

constexpr int64_t kTaskElements = 1 << 15;  // elements per OpenMP task: big enough to amortize a dispatch

// The four element-wise functions as types (lambdas would be out-of-line calls compiled for the baseline ISA).
struct ExactForward {
    template <typename A>
    static FASTNEST_INLINE A apply(A v) { return gelu_exact(v); }
};
struct TanhForward {
    template <typename A>
    static FASTNEST_INLINE A apply(A v) { return gelu_tanh(v); }
};
struct ExactGrad {
    template <typename A>
    static FASTNEST_INLINE A apply(A v) { return gelu_exact_grad(v); }
};
struct TanhGrad {
    template <typename A>
    static FASTNEST_INLINE A apply(A v) { return gelu_tanh_grad(v); }
};

template <typename F, typename T>
FASTNEST_INLINE void forward_rows(T* pre, const T* bias, T* h, int64_t rows, int64_t cols) {
    for (int64_t i = 0; i < rows; ++i) {
        T* p = pre + i * cols;
        T* o = h + i * cols;
        if (bias != nullptr) {
#pragma omp simd
            for (int64_t j = 0; j < cols; ++j) {
                const Acc<T> v = round_to<T>(load(p + j) + load(bias + j));
                store(p + j, v);
                store(o + j, F::apply(v));
            }
        } else {
#pragma omp simd
            for (int64_t j = 0; j < cols; ++j) store(o + j, F::apply(load(p + j)));
        }
    }
}

template <typename F, typename T>
FASTNEST_INLINE void backward_block(T* grad, const T* pre, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) store(grad + i, load(grad + i) * F::apply(load(pre + i)));
}

// One multiversioned worker per dtype and GELU form (target_clones does not apply to templates).
#define FASTNEST_GELU_WORKERS(T, NAME)                                                                     \
    FASTNEST_MULTIVERSION void forward_##NAME(T* pre, const T* bias, T* h, int64_t rows, int64_t cols,    \
                                              Gelu kind) {                                                 \
        if (kind == Gelu::exact)                                                                           \
            forward_rows<ExactForward>(pre, bias, h, rows, cols);                \
        else                                                                                               \
            forward_rows<TanhForward>(pre, bias, h, rows, cols);                 \
    }                                                                                                      \
    FASTNEST_MULTIVERSION void backward_##NAME(T* grad, const T* pre, int64_t n, Gelu kind) {             \
        if (kind == Gelu::exact)                                                                           \
            backward_block<ExactGrad>(grad, pre, n);                     \
        else                                                                                               \
            backward_block<TanhGrad>(grad, pre, n);                      \
    }                                                                                                      \
    void forward(T* pre, const T* bias, T* h, int64_t rows, int64_t cols, Gelu kind, int threads) {        \
        const int64_t step = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(cols, 1));             \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic) if (rows * cols > kTaskElements)") \
        for (int64_t i = 0; i < rows; i += step)                                                           \
            forward_##NAME(pre + i * cols, bias, h + i * cols, std::min(step, rows - i), cols, kind);      \
    }                                                                                                      \
    void backward(T* grad, const T* pre, int64_t n, Gelu kind, int threads) {                              \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic) if (n > kTaskElements)")           \
        for (int64_t i = 0; i < n; i += kTaskElements)                                                     \
            backward_##NAME(grad + i, pre + i, std::min(kTaskElements, n - i), kind);                      \
    }

FASTNEST_GELU_WORKERS(float, f32)
FASTNEST_GELU_WORKERS(double, f64)
FASTNEST_GELU_WORKERS(bf16, bf16)
FASTNEST_GELU_WORKERS(f16, f16)

#undef FASTNEST_GELU_WORKERS

}  // namespace

void gelu_forward(void* pre, const void* bias, void* h, int64_t rows, int64_t cols, DType dtype, Gelu kind,
                  int num_threads) {
    switch (dtype) {
        case DType::f32:
            return forward(static_cast<float*>(pre), static_cast<const float*>(bias), static_cast<float*>(h), rows,
                           cols, kind, num_threads);
        case DType::f64:
            return forward(static_cast<double*>(pre), static_cast<const double*>(bias), static_cast<double*>(h),
                           rows, cols, kind, num_threads);
        case DType::bf16:
            return forward(static_cast<bf16*>(pre), static_cast<const bf16*>(bias), static_cast<bf16*>(h), rows,
                           cols, kind, num_threads);
        case DType::f16:
            return forward(static_cast<f16*>(pre), static_cast<const f16*>(bias), static_cast<f16*>(h), rows, cols,
                           kind, num_threads);
    }
}

void gelu_backward(void* grad, const void* pre, int64_t n, DType dtype, Gelu kind, int num_threads) {
    switch (dtype) {
        case DType::f32:
            return backward(static_cast<float*>(grad), static_cast<const float*>(pre), n, kind, num_threads);
        case DType::f64:
            return backward(static_cast<double*>(grad), static_cast<const double*>(pre), n, kind, num_threads);
        case DType::bf16:
            return backward(static_cast<bf16*>(grad), static_cast<const bf16*>(pre), n, kind, num_threads);
        case DType::f16:
            return backward(static_cast<f16*>(grad), static_cast<const f16*>(pre), n, kind, num_threads);
    }
}

}  // namespace fastnest
