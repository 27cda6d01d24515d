// Entry points of the native CPU kernels (fastnest._C). Tensors are raw pointers to contiguous row-major data of
// one dtype; shapes and strides count elements. Callers (module.cpp) validate arguments; these functions throw
// std::invalid_argument for an inconsistent scale plan and std::bad_alloc when scratch memory is short.
#pragma once

#include <cstdint>
#include <vector>

namespace fastnest {

enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };
enum class Gelu : int { exact = 0, tanh = 1 };

// h[i, j] = gelu(pre[i, j] + bias[j]) for a [rows, cols] matrix. With a bias, pre is updated in place to
// pre + bias (rounded to the dtype) so it holds the pre-activation the backward needs. h may alias pre.
void gelu_forward(void* pre, const void* bias, void* h, int64_t rows, int64_t cols, DType dtype, Gelu kind,
                  int num_threads);

// grad[i] *= gelu'(pre[i]) over n elements, in place.
void gelu_backward(void* grad, const void* pre, int64_t n, DType dtype, Gelu kind, int num_threads);

// One pooling scale of a grid x grid map: kernel (= stride) and the first row of its cells in an image's output.
struct Scale {
    int64_t kernel;
    int64_t offset;
};

// out[n, offset_s + cell, :] = mean over the kernel_s x kernel_s block `cell` of (y[n] + bias) for every scale,
// in one pass over y [images, grid*grid, channels]; out is [images, total, channels]. Coarser scales whose kernel
// is a multiple of a finer one are summed from the finer one's fp32 (fp64) sums. A kernel-1 scale copies y + bias
// (rounded to the dtype; the coarser scales pool those rounded values, as pooling a stored y would).
void pool(const void* y, const void* bias, void* out, int64_t images, int64_t grid, int64_t channels,
          const std::vector<Scale>& scales, int64_t total, DType dtype, int num_threads);

// The adjoint of pool (without bias): grad_y[n, p, :] = sum over scales of grad_out[n, offset_s + cell_s(p), :]
// / kernel_s^2, each grad_y row written once. grad_out is [images, total, channels], grad_y [images, grid*grid,
// channels].
void fold(const void* grad_out, void* grad_y, int64_t images, int64_t grid, int64_t channels,
          const std::vector<Scale>& scales, int64_t total, DType dtype, int num_threads);

// The target of a row that adds no loss (fastnest.constants.IGNORE_INDEX).
constexpr int64_t kIgnoreIndex = -100;

// One chunk of the fused linear cross-entropy over logits [rows, vocab] (row r at logits + r * row_stride): per
// row, in fp32 (fp64 for fp64), lse = log sum exp(z); loss[r] = lse - z[targets[r]] and, in place, z <- coef[r]
// * (softmax(z) - onehot(targets[r])). A row whose target is kIgnoreIndex gets loss 0 and a zero row. Throws
// std::invalid_argument for a target outside [0, vocab) that is not kIgnoreIndex. NaN logits give NaN.
void ce_grad(void* logits, int64_t row_stride, const int64_t* targets, const float* coef, float* loss, int64_t rows,
             int64_t vocab, DType dtype, int num_threads);

// RMSNorm of x [rows, cols] (Hugging Face's LlamaRMSNorm): rstd[r] = 1 / sqrt(mean_j x[r, j]^2 + eps) (fp32, fp64
// for double; rstd is float* or double* accordingly) and y = weight * round(x * rstd), in fp32 (fp64) arithmetic.
void rms_norm_forward(const void* x, const void* weight, void* y, void* rstd, int64_t rows, int64_t cols, double eps,
                      DType dtype, int num_threads);

// Its backward from the forward's rstd: dx [rows, cols] and dweight [cols] (summed over rows in fp32, in a fixed
// order whatever the thread schedule).
void rms_norm_backward(const void* dy, const void* x, const void* weight, const void* rstd, void* dx, void* dweight,
                       int64_t rows, int64_t cols, DType dtype, int num_threads);

// SwiGLU over n elements: h = round(silu(gate)) * up; backward: dgate, dup from dh, gate and up.
void swiglu_forward(const void* gate, const void* up, void* h, int64_t n, DType dtype, int num_threads);
void swiglu_backward(const void* dh, const void* gate, const void* up, void* dgate, void* dup, int64_t n,
                     DType dtype, int num_threads);

// Rotary embedding of tokens x (token t's [heads, dim] at x + t * x_stride) with per-token cos/sin [tokens, dim]
// into out [tokens, heads, dim] (contiguous): out = x * cos + rotate_half(x) * sin; backward = true applies the
// transposed map (x is then the output's gradient). dim is even.
void rotary(const void* x, int64_t x_stride, const void* cos, const void* sin, void* out, int64_t tokens,
            int64_t heads, int64_t dim, bool backward, DType dtype, int num_threads);

// Causal attention over packed sequences (kernels/cpu/attention.cpp says how), float32. q [Tq, heads, dim] with
// row stride q_stride (heads contiguous in a row), k/v [Tk, kv_heads, dim] likewise; sequence s: queries cu_q[s] to
// cu_q[s+1], keys key_rows[cu_k[s]] to key_rows[cu_k[s+1] - 1], bottom-right aligned; window 0 is none. Forward:
// out [Tq, heads, dim] and lse [Tq, heads] (of the scaled scores). Backward from the contiguous gradient of out:
// dq [Tq, heads, dim], and dk/dv per key position [cu_k[seqs], kv_heads, dim] (the caller sums shared rows).
void attention_forward(const float* q, int64_t q_stride, const float* k, int64_t k_stride, const float* v,
                       int64_t v_stride, const int64_t* key_rows, const int64_t* cu_q, const int64_t* cu_k,
                       int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim, float scale, int64_t window,
                       float* out, float* lse, int num_threads);
void attention_backward(const float* dout, const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                        const float* v, int64_t v_stride, const float* out, const float* lse, const int64_t* key_rows,
                        const int64_t* cu_q, const int64_t* cu_k, int64_t seqs, int64_t heads, int64_t kv_heads,
                        int64_t dim, float scale, int64_t window, float* dq, float* dk, float* dv, int num_threads);
}  // namespace fastnest
