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

}  // namespace fastnest
