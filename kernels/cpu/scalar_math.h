// Element-wise math shared by the native kernels: dtype conversions and GELU (exact and tanh), forward and
// derivative. Written as branch-free scalar code so GCC vectorizes the loops that inline it.
//
// float: own exp/erfc approximations (relative error ~2e-7), because libm's expf/erfcf are scalar calls that
// the compiler cannot vectorize without -ffast-math. double: libm (exact to an ulp; double exists for gradcheck).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifndef __FLT16_MANT_DIG__
#error "fastnest._C needs a compiler with _Float16 support (GCC >= 12 or Clang >= 15 on x86-64)"
#endif

namespace fastnest {

// Multiversioning: the hot loops are compiled for AVX-512 and AVX2+FMA as well as the baseline, and the
// loader picks one per machine (ifunc). Only for functions outside OpenMP regions: outlined OpenMP bodies are
// not cloned, so each parallel loop calls a multiversioned worker.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTNEST_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTNEST_MULTIVERSION
#endif

// Forced inlining puts the math inside each multiversioned clone (a plain call would run the baseline code).
#define FASTNEST_INLINE inline __attribute__((always_inline))

struct bf16 {
    uint16_t bits;
};
using f16 = _Float16;

template <typename To, typename From>
FASTNEST_INLINE To bits_as(From v) {
    static_assert(sizeof(To) == sizeof(From), "size mismatch");
    To out;
    std::memcpy(&out, &v, sizeof(To));
    return out;
}

// Accumulation type: float for every dtype except double.
template <typename T>
struct AccOf {
    using type = float;
};
template <>
struct AccOf<double> {
    using type = double;
};
template <typename T>
using Acc = typename AccOf<T>::type;

FASTNEST_INLINE float load(const float* p) { return *p; }
FASTNEST_INLINE double load(const double* p) { return *p; }
FASTNEST_INLINE float load(const f16* p) { return static_cast<float>(*p); }
FASTNEST_INLINE float load(const bf16* p) { return bits_as<float>(static_cast<uint32_t>(p->bits) << 16); }

FASTNEST_INLINE void store(float* p, float v) { *p = v; }
FASTNEST_INLINE void store(double* p, double v) { *p = v; }
FASTNEST_INLINE void store(f16* p, float v) { *p = static_cast<f16>(v); }
FASTNEST_INLINE void store(bf16* p, float v) {
    // Round to nearest even; NaN stays a (quiet) NaN instead of rounding into infinity.
    const uint32_t u = bits_as<uint32_t>(v);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    p->bits = static_cast<uint16_t>(v != v ? (u >> 16) | 0x40u : rounded);
}

// The value a T element would hold: rounds through T (a no-op for float and double).
template <typename T>
FASTNEST_INLINE Acc<T> round_to(Acc<T> v) {
    T t;
    store(&t, v);
    return load(&t);
}

// exp(x) for x <= 88; 0 below float's normal range. Range reduction by ln 2, degree-7 Taylor on
// |r| <= ln2/2 (truncation 5e-9), scale by 2^n through the exponent bits.
FASTNEST_INLINE float exp_f(float x) {
    constexpr float lo = -87.33654f;  // log(FLT_MIN)
    const float xc = x < lo ? lo : (x > 88.0f ? 88.0f : x);
    constexpr float round_magic = 12582912.0f;  // 1.5 * 2^23: adding then subtracting rounds to an integer
    const float n = (xc * 1.44269504088896341f + round_magic) - round_magic;
    const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 split in two for an exact n*ln2
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const float scale = bits_as<float>((static_cast<int32_t>(n) + 127) << 23);
    return x < lo ? 0.0f : p * scale;
}

// erfc(a) for a >= 0 with relative error ~2e-7 everywhere (tails included):
// erfc(a) = t * exp(-a^2 + P(t)), t = 1 / (1 + a/2), P of degree 9 fitted (weighted least squares, Lawson
// iterations) to log(erfc(a) / t) + a^2 on t in (0, 1]; fit error 1e-7.
FASTNEST_INLINE float erfc_pos_f(float a) {
    const float t = 1.0f / (1.0f + 0.5f * a);
    float p = 1.692789044e-01f;
    p = p * t - 8.156800269e-01f;
    p = p * t + 1.477746973e+00f;
    p = p * t - 1.125768977e+00f;
    p = p * t + 2.742249705e-01f;
    p = p * t - 1.850306679e-01f;
    p = p * t + 9.661886019e-02f;
    p = p * t + 3.740980471e-01f;
    p = p * t + 1.000024082e+00f;
    p = p * t - 1.265512242e+00f;
    return t * exp_f(p - a * a);
}

constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kTanhCubic = 0.044715;

// Normal CDF Phi(x), from erfc of |x|/sqrt2 so that both tails keep their relative accuracy.
FASTNEST_INLINE float normal_cdf(float x) {
    const float ec = erfc_pos_f(std::fabs(x) * static_cast<float>(kSqrtHalf));
    return x >= 0.0f ? 1.0f - 0.5f * ec : 0.5f * ec;
}
FASTNEST_INLINE double normal_cdf(double x) { return 0.5 * std::erfc(-x * kSqrtHalf); }

FASTNEST_INLINE float gelu_exact(float x) { return x * normal_cdf(x); }
FASTNEST_INLINE double gelu_exact(double x) { return x * normal_cdf(x); }

// d/dx [x Phi(x)] = Phi(x) + x phi(x)
FASTNEST_INLINE float gelu_exact_grad(float x) {
    return normal_cdf(x) + x * static_cast<float>(kInvSqrt2Pi) * exp_f(-0.5f * x * x);
}
FASTNEST_INLINE double gelu_exact_grad(double x) { return normal_cdf(x) + x * kInvSqrt2Pi * std::exp(-0.5 * x * x); }

// tanh form: 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3). The sigmoid form has no
// cancellation in the negative tail. exp's argument is capped at 80 so that it stays finite.
FASTNEST_INLINE float tanh_u(float x) {
    return static_cast<float>(kSqrt2OverPi) * (x + static_cast<float>(kTanhCubic) * x * x * x);
}
FASTNEST_INLINE float gelu_tanh(float x) {
    const float m = -2.0f * tanh_u(x);
    return x / (1.0f + exp_f(m > 80.0f ? 80.0f : m));
}
FASTNEST_INLINE double gelu_tanh(double x) {
    return 0.5 * x * (1.0 + std::tanh(kSqrt2OverPi * (x + kTanhCubic * x * x * x)));
}

// d/dx [x s], s = sigmoid(2u): s + x * 2 s (1 - s) u'(x), with 1 - s = e s for e = exp(-2u).
FASTNEST_INLINE float gelu_tanh_grad(float x) {
    const float m = -2.0f * tanh_u(x);
    const float e = exp_f(m > 80.0f ? 80.0f : m);
    const float s = 1.0f / (1.0f + e);
    const float du = static_cast<float>(kSqrt2OverPi) * (1.0f + 3.0f * static_cast<float>(kTanhCubic) * x * x);
    return s + 2.0f * x * s * (e * s) * du;
}
FASTNEST_INLINE double gelu_tanh_grad(double x) {
    const double u = kSqrt2OverPi * (x + kTanhCubic * x * x * x);
    const double th = std::tanh(u);
    const double du = kSqrt2OverPi * (1.0 + 3.0 * kTanhCubic * x * x);
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du;
}

}  // namespace fastnest
