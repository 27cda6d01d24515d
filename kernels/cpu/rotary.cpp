// Rotary position embedding of packed rows, Hugging Face's form: out = x * cos + rotate_half(x) * sin with
// rotate_half(x) = [-x2, x1] over each head's two halves; the backward is the transposed rotation.
#include <omp.h>

#include <algorithm>

#include "kernels.h"
#include "scalar_math.h"

namespace fastnest {
namespace {

constexpr int64_t kTaskElements = 1 << 14;  // elements per OpenMP task: big enough to amortize a dispatch

// Token t: x at x + t * x_stride ([heads, dim] contiguous), out at out + t * heads * dim, cos/sin rows [dim].
// Forward: out_j = x_j c_j - x_{j+h} s_j (j < h), x_j c_j + x_{j-h} s_j (j >= h), h = dim / 2.
// Backward (x is the output's gradient): dx_j = x_j c_j + x_{j+h} s_{j+h} (j < h), x_j c_j - x_{j-h} s_{j-h}.
template <typename T>
FASTNEST_INLINE void rotate_tokens(const T* x, int64_t x_stride, const T* cos, const T* sin, T* out, int64_t tokens,
                                   int64_t heads, int64_t dim, bool backward) {
    const int64_t half = dim / 2;
    for (int64_t t = 0; t < tokens; ++t) {
        const T* c = cos + t * dim;
        const T* s = sin + t * dim;
        for (int64_t hd = 0; hd < heads; ++hd) {
            const T* xi = x + t * x_stride + hd * dim;
            T* oi = out + (t * heads + hd) * dim;
            if (!backward) {
#pragma omp simd
                for (int64_t j = 0; j < half; ++j) {
                    const Acc<T> a = load(xi + j), b = load(xi + j + half);
                    store(oi + j, a * load(c + j) - b * load(s + j));
                    store(oi + j + half, b * load(c + j + half) + a * load(s + j + half));
                }
            } else {
#pragma omp simd
                for (int64_t j = 0; j < half; ++j) {
                    const Acc<T> a = load(xi + j), b = load(xi + j + half);
                    store(oi + j, a * load(c + j) + b * load(s + j + half));
                    store(oi + j + half, b * load(c + j + half) - a * load(s + j));
                }
            }
        }
    }
}

#define FASTNEST_ROTARY_WORKER(T, NAME)                                                                      \
    FASTNEST_MULTIVERSION void rotate_##NAME(const T* x, int64_t x_stride, const T* cos, const T* sin, T* out, \
                                             int64_t tokens, int64_t heads, int64_t dim, bool backward) {     \
        rotate_tokens(x, x_stride, cos, sin, out, tokens, heads, dim, backward);                              \
    }                                                                                                         \
    void rotate(const T* x, int64_t x_stride, const T* cos, const T* sin, T* out, int64_t tokens,             \
                int64_t heads, int64_t dim, bool backward, int threads) {                                     \
        const int64_t step = std::max<int64_t>(1, kTaskElements / (heads * dim));                             \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic) if (tokens * heads * dim > kTaskElements)") \
        for (int64_t t = 0; t < tokens; t += step)                                                            \
            rotate_##NAME(x + t * x_stride, x_stride, cos + t * dim, sin + t * dim, out + t * heads * dim,    \
                          std::min(step, tokens - t), heads, dim, backward);                                  \
    }

FASTNEST_ROTARY_WORKER(float, f32)
FASTNEST_ROTARY_WORKER(double, f64)
FASTNEST_ROTARY_WORKER(bf16, bf16)
FASTNEST_ROTARY_WORKER(f16, f16)

#undef FASTNEST_ROTARY_WORKER

template <typename T>
void rotate_as(const void* x, int64_t x_stride, const void* cos, const void* sin, void* out, int64_t tokens,
               int64_t heads, int64_t dim, bool backward, int threads) {
    rotate(static_cast<const T*>(x), x_stride, static_cast<const T*>(cos), static_cast<const T*>(sin),
           static_cast<T*>(out), tokens, heads, dim, backward, threads);
}

}  // namespace

void rotary(const void* x, int64_t x_stride, const void* cos, const void* sin, void* out, int64_t tokens,
            int64_t heads, int64_t dim, bool backward, DType dtype, int num_threads) {
    switch (dtype) {
        case DType::f32:
            return rotate_as<float>(x, x_stride, cos, sin, out, tokens, heads, dim, backward, num_threads);
        case DType::f64:
            return rotate_as<double>(x, x_stride, cos, sin, out, tokens, heads, dim, backward, num_threads);
        case DType::bf16:
            return rotate_as<bf16>(x, x_stride, cos, sin, out, tokens, heads, dim, backward, num_threads);
        case DType::f16:
            return rotate_as<f16>(x, x_stride, cos, sin, out, tokens, heads, dim, backward, num_threads);
    }
}

}  // namespace fastnest
