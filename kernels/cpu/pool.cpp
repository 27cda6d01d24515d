// Multi-scale average pooling of a square token grid (one pass, pyramid of fp32 sums) and its adjoint, the fold.
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "scalar_math.h"

namespace fastnest {
namespace {

// A scale with kernel > 1. Its fp32 block sums live at acc[cell_start ...] (one row of `width` per cell); it is
// summed from y directly (parent < 0) or from the sums of the largest finer level whose kernel divides its own.
struct Level {
    int64_t kernel;
    int64_t offset;
    int64_t side;  // cells per grid row: grid / kernel
    int64_t parent;
    int64_t cell_start;
};

struct Plan {
    std::vector<Level> levels;  // kernel ascending, so parents come first
    int64_t copy_offset = -1;   // offset of the kernel-1 scale, -1 if absent
    int64_t cells = 0;          // sum of the levels' cells
};

void check_scales(int64_t grid, const std::vector<Scale>& scales, int64_t total) {
    if (scales.empty()) throw std::invalid_argument("no scales given");
    for (size_t i = 0; i < scales.size(); ++i) {
        const Scale& s = scales[i];
        if (s.kernel < 1 || grid % s.kernel != 0)
            throw std::invalid_argument("kernel " + std::to_string(s.kernel) + " does not divide grid " +
                                        std::to_string(grid));
        const int64_t side = grid / s.kernel;
        if (s.offset < 0 || s.offset + side * side > total)
            throw std::invalid_argument("scale with kernel " + std::to_string(s.kernel) + " at offset " +
                                        std::to_string(s.offset) + " does not fit in " + std::to_string(total) +
                                        " tokens per image");
        for (size_t j = 0; j < i; ++j)
            if (scales[j].kernel == s.kernel)
                throw std::invalid_argument("kernel " + std::to_string(s.kernel) + " given twice");
    }
}

Plan make_plan(int64_t grid, const std::vector<Scale>& scales, int64_t total) {
    check_scales(grid, scales, total);
    Plan plan;
    for (const Scale& s : scales) {
        if (s.kernel == 1)
            plan.copy_offset = s.offset;
        else
            plan.levels.push_back({s.kernel, s.offset, grid / s.kernel, -1, 0});
    }
    std::sort(plan.levels.begin(), plan.levels.end(),
              [](const Level& a, const Level& b) { return a.kernel < b.kernel; });
    for (size_t i = 0; i < plan.levels.size(); ++i) {
        Level& level = plan.levels[i];
        for (size_t j = 0; j < i; ++j)
            if (level.kernel % plan.levels[j].kernel == 0) level.parent = static_cast<int64_t>(j);
        level.cell_start = plan.cells;
        plan.cells += level.side * level.side;
    }
    return plan;
}

// Pools channels [0, width) of one image. y, bias and out point at the block's first channel; rows are
// `stride` apart. acc holds plan.cells * width sums, v one row.
template <typename T>
FASTNEST_INLINE void pool_block(const T* y, const T* bias, T* out, int64_t grid, int64_t stride, int64_t width,
                                const Plan& plan, Acc<T>* acc, Acc<T>* v) {
    using A = Acc<T>;
    std::fill(acc, acc + plan.cells * width, A(0));
    for (int64_t r = 0; r < grid; ++r) {
        for (int64_t c = 0; c < grid; ++c) {
            const T* src = y + (r * grid + c) * stride;
            if (bias != nullptr) {
#pragma omp simd
                for (int64_t j = 0; j < width; ++j) v[j] = round_to<T>(load(src + j) + load(bias + j));
            } else {
#pragma omp simd
                for (int64_t j = 0; j < width; ++j) v[j] = load(src + j);
            }
            if (plan.copy_offset >= 0) {
                T* dst = out + (plan.copy_offset + r * grid + c) * stride;
#pragma omp simd
                for (int64_t j = 0; j < width; ++j) store(dst + j, v[j]);
            }
            for (const Level& level : plan.levels) {
                if (level.parent >= 0) continue;
                A* a = acc + (level.cell_start + (r / level.kernel) * level.side + c / level.kernel) * width;
#pragma omp simd
                for (int64_t j = 0; j < width; ++j) a[j] += v[j];
            }
        }
    }
    for (const Level& level : plan.levels) {
        if (level.parent < 0) continue;
        const Level& finer = plan.levels[level.parent];
        const int64_t m = level.kernel / finer.kernel;
        for (int64_t i = 0; i < level.side; ++i) {
            for (int64_t k = 0; k < level.side; ++k) {
                A* a = acc + (level.cell_start + i * level.side + k) * width;
                for (int64_t di = 0; di < m; ++di) {
                    for (int64_t dk = 0; dk < m; ++dk) {
                        const A* f = acc + (finer.cell_start + (i * m + di) * finer.side + k * m + dk) * width;
#pragma omp simd
                        for (int64_t j = 0; j < width; ++j) a[j] += f[j];
                    }
                }
            }
        }
    }
    for (const Level& level : plan.levels) {
        const A inv = A(1) / static_cast<A>(level.kernel * level.kernel);
        for (int64_t cell = 0; cell < level.side * level.side; ++cell) {
            const A* a = acc + (level.cell_start + cell) * width;
            T* dst = out + (level.offset + cell) * stride;
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) store(dst + j, a[j] * inv);
        }
    }
}

// One grid row r of one image's fold: grad_y[r * grid + c] = sum_s grad_out[offset_s + cell_s] / kernel_s^2.
template <typename T>
FASTNEST_INLINE void fold_row(const T* g, T* gy, int64_t r, int64_t grid, int64_t channels,
                              const std::vector<Scale>& scales, Acc<T>* acc) {
    using A = Acc<T>;
    for (int64_t c = 0; c < grid; ++c) {
        for (size_t s = 0; s < scales.size(); ++s) {
            const int64_t k = scales[s].kernel;
            const int64_t cell = (r / k) * (grid / k) + c / k;
            const T* src = g + (scales[s].offset + cell) * channels;
            const A inv = A(1) / static_cast<A>(k * k);
            if (s == 0) {
#pragma omp simd
                for (int64_t j = 0; j < channels; ++j) acc[j] = load(src + j) * inv;
            } else {
#pragma omp simd
                for (int64_t j = 0; j < channels; ++j) acc[j] += load(src + j) * inv;
            }
        }
        T* dst = gy + (r * grid + c) * channels;
#pragma omp simd
        for (int64_t j = 0; j < channels; ++j) store(dst + j, acc[j]);
    }
}

#define FASTNEST_POOL_WORKERS(T, NAME)                                                                      \
    FASTNEST_MULTIVERSION void pool_block_##NAME(const T* y, const T* bias, T* out, int64_t grid,          \
                                                 int64_t stride, int64_t width, const Plan& plan,          \
                                                 Acc<T>* acc, Acc<T>* v) {                                 \
        pool_block(y, bias, out, grid, stride, width, plan, acc, v);                                        \
    }                                                                                                       \
    FASTNEST_MULTIVERSION void fold_row_##NAME(const T* g, T* gy, int64_t r, int64_t grid, int64_t channels, \
                                               const std::vector<Scale>& scales, Acc<T>* acc) {             \
        fold_row(g, gy, r, grid, channels, scales, acc);                                                    \
    }                                                                                                       \
    void pool_worker(const T* y, const T* bias, T* out, int64_t grid, int64_t stride, int64_t width,        \
                     const Plan& plan, Acc<T>* acc, Acc<T>* v) {                                            \
        pool_block_##NAME(y, bias, out, grid, stride, width, plan, acc, v);                                 \
    }                                                                                                       \
    void fold_worker(const T* g, T* gy, int64_t r, int64_t grid, int64_t channels,                          \
                     const std::vector<Scale>& scales, Acc<T>* acc) {                                       \
        fold_row_##NAME(g, gy, r, grid, channels, scales, acc);                                             \
    }

FASTNEST_POOL_WORKERS(float, f32)
FASTNEST_POOL_WORKERS(double, f64)
FASTNEST_POOL_WORKERS(bf16, bf16)
FASTNEST_POOL_WORKERS(f16, f16)

#undef FASTNEST_POOL_WORKERS

template <typename T>
void pool_typed(const T* y, const T* bias, T* out, int64_t images, int64_t grid, int64_t channels,
                const std::vector<Scale>& scales, int64_t total, int threads) {
    using A = Acc<T>;
    const Plan plan = make_plan(grid, scales, total);
    // Channel blocks sized so one task's sums stay in L2 (~256 KiB), a multiple of 16 channels.
    const int64_t fit = (int64_t{1} << 18) / (std::max<int64_t>(plan.cells, 1) * int64_t(sizeof(A)));
    const int64_t block = std::min(channels, std::clamp<int64_t>(fit / 16 * 16, 16, 256));
    const int64_t blocks = (channels + block - 1) / block;
    const int64_t scratch = plan.cells * block + block;
    std::vector<A> buffer(static_cast<size_t>(threads * scratch));  // before the parallel region: may throw
    const int64_t tasks = images * blocks;
#pragma omp parallel for num_threads(threads) schedule(dynamic) if (images * grid * grid * channels > (1 << 15))
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t n = t / blocks;
        const int64_t c0 = (t % blocks) * block;
        A* acc = buffer.data() + omp_get_thread_num() * scratch;
        pool_worker(y + n * grid * grid * channels + c0, bias == nullptr ? nullptr : bias + c0, out + n * total * channels + c0,
                    grid, channels, std::min(block, channels - c0), plan, acc, acc + plan.cells * block);
    }
}

template <typename T>
void fold_typed(const T* g, T* gy, int64_t images, int64_t grid, int64_t channels, const std::vector<Scale>& scales,
                int64_t total, int threads) {
    check_scales(grid, scales, total);
    std::vector<Acc<T>> buffer(static_cast<size_t>(threads * channels));
#pragma omp parallel for num_threads(threads) schedule(dynamic) if (images * grid * grid * channels > (1 << 15))
    for (int64_t t = 0; t < images * grid; ++t) {
        const int64_t n = t / grid;
        fold_worker(g + n * total * channels, gy + n * grid * grid * channels, t % grid, grid, channels, scales,
                    buffer.data() + omp_get_thread_num() * channels);
    }
}

}  // namespace

void pool(const void* y, const void* bias, void* out, int64_t images, int64_t grid, int64_t channels,
          const std::vector<Scale>& scales, int64_t total, DType dtype, int num_threads) {
    switch (dtype) {
        case DType::f32:
            return pool_typed(static_cast<const float*>(y), static_cast<const float*>(bias),
                              static_cast<float*>(out), images, grid, channels, scales, total, num_threads);
        case DType::f64:
            return pool_typed(static_cast<const double*>(y), static_cast<const double*>(bias),
                              static_cast<double*>(out), images, grid, channels, scales, total, num_threads);
        case DType::bf16:
            return pool_typed(static_cast<const bf16*>(y), static_cast<const bf16*>(bias),
                              static_cast<bf16*>(out), images, grid, channels, scales, total, num_threads);
        case DType::f16:
            return pool_typed(static_cast<const f16*>(y), static_cast<const f16*>(bias),
                              static_cast<f16*>(out), images, grid, channels, scales, total, num_threads);
    }
}

void fold(const void* grad_out, void* grad_y, int64_t images, int64_t grid, int64_t channels,
          const std::vector<Scale>& scales, int64_t total, DType dtype, int num_threads) {
    switch (dtype) {
        case DType::f32:
            return fold_typed(static_cast<const float*>(grad_out), static_cast<float*>(grad_y), images, grid, channels,
                              scales, total, num_threads);
        case DType::f64:
            return fold_typed(static_cast<const double*>(grad_out), static_cast<double*>(grad_y), images, grid,
                              channels, scales, total, num_threads);
        case DType::bf16:
            return fold_typed(static_cast<const bf16*>(grad_out), static_cast<bf16*>(grad_y), images, grid, channels,
                              scales, total, num_threads);
        case DType::f16:
            return fold_typed(static_cast<const f16*>(grad_out), static_cast<f16*>(grad_y), images, grid, channels,
                              scales, total, num_threads);
    }
}

}  // namespace fastnest
