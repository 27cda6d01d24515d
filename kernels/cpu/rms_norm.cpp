// RMSNorm over the rows of a [rows, cols] matrix, forward (keeping 1/rms per row) and backward (input and weight
// gradients in one pass over the rows), as Hugging Face's LlamaRMSNorm computes it.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "scalar_math.h"

namespace fastnest {
namespace {

constexpr int64_t kTaskElements = 1 << 14;  // elements per OpenMP task: big enough to amortize a dispatch

// y = w * round(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), accumulated in fp32 (fp64 for double).
template <typename T>
FASTNEST_INLINE void forward_rows(const T* x, const T* w, T* y, Acc<T>* rstd, int64_t rows, int64_t cols,
                                  double eps) {
    using A = Acc<T>;
    for (int64_t i = 0; i < rows; ++i) {
        const T* xi = x + i * cols;
        T* yi = y + i * cols;
        A ss = 0;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < cols; ++j) ss += load(xi + j) * load(xi + j);
        const A r = A(1) / std::sqrt(ss / static_cast<A>(cols) + static_cast<A>(eps));
        rstd[i] = r;
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) store(yi + j, load(w + j) * round_to<T>(load(xi + j) * r));
    }
}

// dx = rstd * (g - xh * mean(g * xh)), g = dy * w, xh = x * rstd; dw_acc += dy * round(xh).
template <typename T>
FASTNEST_INLINE void backward_rows(const T* dy, const T* x, const T* w, const Acc<T>* rstd, T* dx, Acc<T>* dw_acc,
                                   int64_t rows, int64_t cols) {
    using A = Acc<T>;
    for (int64_t i = 0; i < rows; ++i) {
        const T* dyi = dy + i * cols;
        const T* xi = x + i * cols;
        T* dxi = dx + i * cols;
        const A r = rstd[i];
        A dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < cols; ++j) dot += load(dyi + j) * load(w + j) * load(xi + j);
        const A c = dot * r * r / static_cast<A>(cols);
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) {
            const A xv = load(xi + j), g = load(dyi + j);
            store(dxi + j, r * (g * load(w + j) - xv * c));
            dw_acc[j] += g * round_to<T>(xv * r);
        }
    }
}

// One multiversioned worker per dtype (target_clones does not apply to templates).
#define FASTNEST_RMS_WORKERS(T, NAME)                                                                        \
    FASTNEST_MULTIVERSION void forward_##NAME(const T* x, const T* w, T* y, Acc<T>* rstd, int64_t rows,       \
                                              int64_t cols, double eps) {                                     \
        forward_rows(x, w, y, rstd, rows, cols, eps);                                                         \
    }                                                                                                         \
    FASTNEST_MULTIVERSION void backward_##NAME(const T* dy, const T* x, const T* w, const Acc<T>* rstd, T* dx, \
                                               Acc<T>* dw_acc, int64_t rows, int64_t cols) {                  \
        backward_rows(dy, x, w, rstd, dx, dw_acc, rows, cols);                                                \
    }

FASTNEST_RMS_WORKERS(float, f32)
FASTNEST_RMS_WORKERS(double, f64)
FASTNEST_RMS_WORKERS(bf16, bf16)
FASTNEST_RMS_WORKERS(f16, f16)

#undef FASTNEST_RMS_WORKERS

FASTNEST_INLINE void forward_any(const float* x, const float* w, float* y, float* r, int64_t n, int64_t c, double e) {
    forward_f32(x, w, y, r, n, c, e);
}
FASTNEST_INLINE void forward_any(const double* x, const double* w, double* y, double* r, int64_t n, int64_t c,
                                 double e) {
    forward_f64(x, w, y, r, n, c, e);
}
FASTNEST_INLINE void forward_any(const bf16* x, const bf16* w, bf16* y, float* r, int64_t n, int64_t c, double e) {
    forward_bf16(x, w, y, r, n, c, e);
}
FASTNEST_INLINE void forward_any(const f16* x, const f16* w, f16* y, float* r, int64_t n, int64_t c, double e) {
    forward_f16(x, w, y, r, n, c, e);
}
FASTNEST_INLINE void backward_any(const float* dy, const float* x, const float* w, const float* r, float* dx,
                                  float* dw, int64_t n, int64_t c) {
    backward_f32(dy, x, w, r, dx, dw, n, c);
}
FASTNEST_INLINE void backward_any(const double* dy, const double* x, const double* w, const double* r, double* dx,
                                  double* dw, int64_t n, int64_t c) {
    backward_f64(dy, x, w, r, dx, dw, n, c);
}
FASTNEST_INLINE void backward_any(const bf16* dy, const bf16* x, const bf16* w, const float* r, bf16* dx, float* dw,
                                  int64_t n, int64_t c) {
    backward_bf16(dy, x, w, r, dx, dw, n, c);
}
FASTNEST_INLINE void backward_any(const f16* dy, const f16* x, const f16* w, const float* r, f16* dx, float* dw,
                                  int64_t n, int64_t c) {
    backward_f16(dy, x, w, r, dx, dw, n, c);
}

template <typename T>
void forward(const void* x, const void* w, void* y, void* rstd, int64_t rows, int64_t cols, double eps,
             int threads) {
    const int64_t step = std::max<int64_t>(1, kTaskElements / cols);
#pragma omp parallel for num_threads(threads) schedule(dynamic) if (rows * cols > kTaskElements)
    for (int64_t i = 0; i < rows; i += step)
        forward_any(static_cast<const T*>(x) + i * cols, static_cast<const T*>(w), static_cast<T*>(y) + i * cols,
                    static_cast<Acc<T>*>(rstd) + i, std::min(step, rows - i), cols, eps);
}

// Each thread sums its rows' weight gradient in its own buffer; the buffers are added in thread order, so the
// result does not depend on scheduling.
template <typename T>
void backward(const void* dy, const void* x, const void* w, const void* rstd, void* dx, void* dw, int64_t rows,
              int64_t cols, int threads) {
    using A = Acc<T>;
    const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows * cols / kTaskElements)));
    std::vector<A> partial(static_cast<size_t>(parts) * cols, A(0));
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1)
    for (int p = 0; p < parts; ++p) {
        const int64_t lo = rows * p / parts, hi = rows * (p + 1) / parts;
        backward_any(static_cast<const T*>(dy) + lo * cols, static_cast<const T*>(x) + lo * cols,
                     static_cast<const T*>(w), static_cast<const A*>(rstd) + lo, static_cast<T*>(dx) + lo * cols,
                     partial.data() + static_cast<size_t>(p) * cols, hi - lo, cols);
    }
    T* out = static_cast<T*>(dw);
    for (int64_t j = 0; j < cols; ++j) {
        A s = 0;
        for (int p = 0; p < parts; ++p) s += partial[static_cast<size_t>(p) * cols + j];
        store(out + j, s);
    }
}

}  // namespace

void rms_norm_forward(const void* x, const void* weight, void* y, void* rstd, int64_t rows, int64_t cols, double eps,
                      DType dtype, int num_threads) {
    switch (dtype) {
        case DType::f32:
            return forward<float>(x, weight, y, rstd, rows, cols, eps, num_threads);
        case DType::f64:
            return forward<double>(x, weight, y, rstd, rows, cols, eps, num_threads);
        case DType::bf16:
            return forward<bf16>(x, weight, y, rstd, rows, cols, eps, num_threads);
        case DType::f16:
            return forward<f16>(x, weight, y, rstd, rows, cols, eps, num_threads);
    }
}

void rms_norm_backward(const void* dy, const void* x, const void* weight, const void* rstd, void* dx, void* dweight,
                       int64_t rows, int64_t cols, DType dtype, int num_threads) {
    switch (dtype) {
        case DType::f32:
            return backward<float>(dy, x, weight, rstd, dx, dweight, rows, cols, num_threads);
        case DType::f64:
            return backward<double>(dy, x, weight, rstd, dx, dweight, rows, cols, num_threads);
        case DType::bf16:
            return backward<bf16>(dy, x, weight, rstd, dx, dweight, rows, cols, num_threads);
        case DType::f16:
            return backward<f16>(dy, x, weight, rstd, dx, dweight, rows, cols, num_threads);
    }
}

}  // namespace fastnest
