// SwiGLU, h = silu(gate) * up, forward and backward (both input gradients in one pass), rounding where Hugging
// Face's act_fn(gate) * up rounds (silu's output is a tensor of the input dtype).
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "kernels.h"
#include "scalar_math.h"

namespace fastnest {
namespace {

constexpr int64_t kTaskElements = 1 << 15;  // elements per OpenMP task: big enough to amortize a dispatch

// sigmoid(x) = 1 / (1 + exp(-x)); exp's argument is capped at 80 so that it stays finite.
FASTNEST_INLINE float sigmoid(float x) {
    const float m = -x;
    return 1.0f / (1.0f + exp_f(m > 80.0f ? 80.0f : m));
}
FASTNEST_INLINE double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

template <typename T>
FASTNEST_INLINE void forward_block(const T* gate, const T* up, T* h, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const Acc<T> g = load(gate + i);
        store(h + i, round_to<T>(g * sigmoid(g)) * load(up + i));
    }
}

// d gate = round(dh * up) * s (1 + g (1 - s)), d up = dh * round(silu(g)), s = sigmoid(g).
template <typename T>
FASTNEST_INLINE void backward_block(const T* dh, const T* gate, const T* up, T* dgate, T* dup, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const Acc<T> g = load(gate + i), d = load(dh + i), s = sigmoid(g);
        store(dgate + i, round_to<T>(d * load(up + i)) * (s * (Acc<T>(1) + g * (Acc<T>(1) - s))));
        store(dup + i, d * round_to<T>(g * s));
    }
}

#define FASTNEST_SWIGLU_WORKERS(T, NAME)                                                                     \
    FASTNEST_MULTIVERSION void forward_##NAME(const T* gate, const T* up, T* h, int64_t n) {                 \
        forward_block(gate, up, h, n);                                                                        \
    }                                                                                                         \
    FASTNEST_MULTIVERSION void backward_##NAME(const T* dh, const T* gate, const T* up, T* dgate, T* dup,    \
                                               int64_t n) {                                                   \
        backward_block(dh, gate, up, dgate, dup, n);                                                          \
    }                                                                                                         \
    void forward(const T* gate, const T* up, T* h, int64_t n, int threads) {                                  \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic) if (n > kTaskElements)")              \
        for (int64_t i = 0; i < n; i += kTaskElements)                                                        \
            forward_##NAME(gate + i, up + i, h + i, std::min(kTaskElements, n - i));                          \
    }                                                                                                         \
    void backward(const T* dh, const T* gate, const T* up, T* dgate, T* dup, int64_t n, int threads) {        \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic) if (n > kTaskElements)")              \
        for (int64_t i = 0; i < n; i += kTaskElements)                                                        \
            backward_##NAME(dh + i, gate + i, up + i, dgate + i, dup + i, std::min(kTaskElements, n - i));    \
    }

FASTNEST_SWIGLU_WORKERS(float, f32)
FASTNEST_SWIGLU_WORKERS(double, f64)
FASTNEST_SWIGLU_WORKERS(bf16, bf16)
FASTNEST_SWIGLU_WORKERS(f16, f16)

#undef FASTNEST_SWIGLU_WORKERS

template <typename T>
void forward_as(const void* gate, const void* up, void* h, int64_t n, int threads) {
    forward(static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(h), n, threads);
}

template <typename T>
void backward_as(const void* dh, const void* gate, const void* up, void* dgate, void* dup, int64_t n, int threads) {
    backward(static_cast<const T*>(dh), static_cast<const T*>(gate), static_cast<const T*>(up),
             static_cast<T*>(dgate), static_cast<T*>(dup), n, threads);
}

}  // namespace

void swiglu_forward(const void* gate, const void* up, void* h, int64_t n, DType dtype, int num_threads) {
    switch (dtype) {
        case DType::f32:
            return forward_as<float>(gate, up, h, n, num_threads);
        case DType::f64:
            return forward_as<double>(gate, up, h, n, num_threads);
        case DType::bf16:
            return forward_as<bf16>(gate, up, h, n, num_threads);
        case DType::f16:
            return forward_as<f16>(gate, up, h, n, num_threads);
    }
}

void swiglu_backward(const void* dh, const void* gate, const void* up, void* dgate, void* dup, int64_t n,
                     DType dtype, int num_threads) {
    switch (dtype) {
        case DType::f32:
            return backward_as<float>(dh, gate, up, dgate, dup, n, num_threads);
        case DType::f64:
            return backward_as<double>(dh, gate, up, dgate, dup, n, num_threads);
        case DType::bf16:
            return backward_as<bf16>(dh, gate, up, dgate, dup, n, num_threads);
        case DType::f16:
            return backward_as<f16>(dh, gate, up, dgate, dup, n, num_threads);
    }
}

}  // namespace fastnest
