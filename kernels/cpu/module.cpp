// fastnest._C: a plain CPython module (no torch headers, so it builds without torch). Functions take tensors as
// data pointers (int), shapes, a dtype code (kernels.h DType) and a thread count; they release the GIL while the
// kernels run. fastnest/ops/*/native.py validate tensors before calling them; the checks here only
// keep a wrong call from touching memory out of bounds where the arguments say so.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace {

using fastnest::DType;
using fastnest::Gelu;
using fastnest::Scale;

bool parse_dtype(int code, DType* out) {
    if (code < 0 || code > 3) {
        PyErr_Format(PyExc_ValueError, "dtype code %d is not one of 0 (float32), 1 (float64), 2 (bfloat16), "
                     "3 (float16)", code);
        return false;
    }
    *out = static_cast<DType>(code);
    return true;
}

bool parse_gelu(int code, Gelu* out) {
    if (code != 0 && code != 1) {
        PyErr_Format(PyExc_ValueError, "approximate code %d is not 0 (none) or 1 (tanh)", code);
        return false;
    }
    *out = static_cast<Gelu>(code);
    return true;
}

bool check_positive(const char* name, long long value) {
    if (value < 1) {
        PyErr_Format(PyExc_ValueError, "%s must be >= 1, got %lld", name, value);
        return false;
    }
    return true;
}

bool check_pointer(const char* name, unsigned long long ptr) {
    if (ptr == 0) {
        PyErr_Format(PyExc_ValueError, "%s must be a non-null data pointer", name);
        return false;
    }
    return true;
}

// kernels and offsets: equal-length sequences of ints.
bool parse_scales(PyObject* kernels, PyObject* offsets, std::vector<Scale>* out) {
    PyObject* ks = PySequence_Fast(kernels, "kernels must be a sequence of ints");
    if (ks == nullptr) return false;
    PyObject* os = PySequence_Fast(offsets, "offsets must be a sequence of ints");
    if (os == nullptr) {
        Py_DECREF(ks);
        return false;
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(ks);
    bool ok = n == PySequence_Fast_GET_SIZE(os);
    if (!ok) PyErr_SetString(PyExc_ValueError, "kernels and offsets must have the same length");
    for (Py_ssize_t i = 0; ok && i < n; ++i) {
        const long long k = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(ks, i));
        const long long o = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(os, i));
        ok = !PyErr_Occurred();
        if (ok) out->push_back({k, o});
    }
    Py_DECREF(ks);
    Py_DECREF(os);
    return ok;
}

// Runs a kernel without the GIL; C++ exceptions become Python ones.
template <typename F>
PyObject* run(F&& kernel) {
    std::string error;
    PyObject* type = nullptr;
    Py_BEGIN_ALLOW_THREADS;
    try {
        kernel();
    } catch (const std::invalid_argument& e) {
        type = PyExc_ValueError;
        error = e.what();
    } catch (const std::bad_alloc&) {
        type = PyExc_MemoryError;
        error = "out of memory for the kernel's scratch buffers";
    } catch (const std::exception& e) {
        type = PyExc_RuntimeError;
        error = e.what();
    }
    Py_END_ALLOW_THREADS;
    if (type != nullptr) {
        PyErr_SetString(type, error.c_str());
        return nullptr;
    }
    Py_RETURN_NONE;
}

PyObject* gelu_forward(PyObject*, PyObject* args) {
    unsigned long long pre, bias, h;
    long long rows, cols;
    int dtype_code, gelu_code, threads;
    if (!PyArg_ParseTuple(args, "KKKLLiii:gelu_forward", &pre, &bias, &h, &rows, &cols, &dtype_code, &gelu_code,
                          &threads))
        return nullptr;
    DType dtype;
    Gelu kind;
    if (!parse_dtype(dtype_code, &dtype) || !parse_gelu(gelu_code, &kind) || !check_pointer("pre", pre) ||
        !check_pointer("h", h) || !check_positive("rows", rows) || !check_positive("cols", cols) ||
        !check_positive("num_threads", threads))
        return nullptr;
    return run([&] {
        fastnest::gelu_forward(reinterpret_cast<void*>(pre), reinterpret_cast<const void*>(bias),
                               reinterpret_cast<void*>(h), rows, cols, dtype, kind, threads);
    });
}

PyObject* gelu_backward(PyObject*, PyObject* args) {
    unsigned long long grad, pre;
    long long n;
    int dtype_code, gelu_code, threads;
    if (!PyArg_ParseTuple(args, "KKLiii:gelu_backward", &grad, &pre, &n, &dtype_code, &gelu_code, &threads))
        return nullptr;
    DType dtype;
    Gelu kind;
    if (!parse_dtype(dtype_code, &dtype) || !parse_gelu(gelu_code, &kind) || !check_pointer("grad", grad) ||
        !check_pointer("pre", pre) || !check_positive("n", n) || !check_positive("num_threads", threads))
        return nullptr;
    return run([&] {
        fastnest::gelu_backward(reinterpret_cast<void*>(grad), reinterpret_cast<const void*>(pre), n, dtype, kind,
                                threads);
    });
}

PyObject* pool(PyObject*, PyObject* args) {
    unsigned long long y, bias, out;
    long long images, grid, channels, total;
    PyObject *kernels, *offsets;
    int dtype_code, threads;
    if (!PyArg_ParseTuple(args, "KKKLLLOOLii:pool", &y, &bias, &out, &images, &grid, &channels,
                          &kernels, &offsets, &total, &dtype_code, &threads))
        return nullptr;
    DType dtype;
    std::vector<Scale> scales;
    if (!parse_dtype(dtype_code, &dtype) || !check_pointer("y", y) || !check_pointer("out", out) ||
        !check_positive("images", images) || !check_positive("grid", grid) || !check_positive("channels", channels) ||
        !check_positive("total", total) || !check_positive("num_threads", threads) ||
        !parse_scales(kernels, offsets, &scales))
        return nullptr;
    return run([&] {
        fastnest::pool(reinterpret_cast<const void*>(y), reinterpret_cast<const void*>(bias),
                       reinterpret_cast<void*>(out), images, grid, channels, scales, total, dtype, threads);
    });
}

PyObject* fold(PyObject*, PyObject* args) {
    unsigned long long grad_out, grad_y;
    long long images, grid, channels, total;
    PyObject *kernels, *offsets;
    int dtype_code, threads;
    if (!PyArg_ParseTuple(args, "KKLLLOOLii:fold", &grad_out, &grad_y, &images, &grid, &channels, &kernels, &offsets,
                          &total, &dtype_code, &threads))
        return nullptr;
    DType dtype;
    std::vector<Scale> scales;
    if (!parse_dtype(dtype_code, &dtype) || !check_pointer("grad_out", grad_out) ||
        !check_pointer("grad_y", grad_y) || !check_positive("images", images) || !check_positive("grid", grid) ||
        !check_positive("channels", channels) || !check_positive("total", total) ||
        !check_positive("num_threads", threads) || !parse_scales(kernels, offsets, &scales))
        return nullptr;
    return run([&] {
        fastnest::fold(reinterpret_cast<const void*>(grad_out), reinterpret_cast<void*>(grad_y), images, grid,
                       channels, scales, total, dtype, threads);
    });
}

PyObject* ce_grad(PyObject*, PyObject* args) {
    unsigned long long logits, targets, coef, loss;
    long long row_stride, rows, vocab;
    int dtype_code, threads;
    if (!PyArg_ParseTuple(args, "KLKKKLLii:ce_grad", &logits, &row_stride, &targets, &coef, &loss, &rows, &vocab,
                          &dtype_code, &threads))
        return nullptr;
    DType dtype;
    if (!parse_dtype(dtype_code, &dtype) || !check_pointer("logits", logits) || !check_pointer("targets", targets) ||
        !check_pointer("coef", coef) || !check_pointer("loss", loss) || !check_positive("rows", rows) ||
        !check_positive("vocab", vocab) || !check_positive("num_threads", threads))
        return nullptr;
    if (row_stride < vocab) {
        PyErr_Format(PyExc_ValueError, "row_stride %lld is smaller than vocab %lld", row_stride, vocab);
        return nullptr;
    }
    return run([&] {
        fastnest::ce_grad(reinterpret_cast<void*>(logits), row_stride, reinterpret_cast<const int64_t*>(targets),
                          reinterpret_cast<const float*>(coef), reinterpret_cast<float*>(loss), rows, vocab, dtype,
                          threads);
    });
}

PyObject* rms_norm_forward(PyObject*, PyObject* args) {
    unsigned long long x, weight, y, rstd;
    long long rows, cols;
    double eps;
    int dtype_code, threads;
    if (!PyArg_ParseTuple(args, "KKKKLLdii:rms_norm_forward", &x, &weight, &y, &rstd, &rows, &cols, &eps,
                          &dtype_code, &threads))
        return nullptr;
    DType dtype;
    if (!parse_dtype(dtype_code, &dtype) || !check_pointer("x", x) || !check_pointer("weight", weight) ||
        !check_pointer("y", y) || !check_pointer("rstd", rstd) || !check_positive("rows", rows) ||
        !check_positive("cols", cols) || !check_positive("num_threads", threads))
        return nullptr;
    return run([&] {
        fastnest::rms_norm_forward(reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(weight),
                                   reinterpret_cast<void*>(y), reinterpret_cast<void*>(rstd), rows, cols, eps, dtype,
                                   threads);
    });
}

PyObject* rms_norm_backward(PyObject*, PyObject* args) {
    unsigned long long dy, x, weight, rstd, dx, dweight;
    long long rows, cols;
    int dtype_code, threads;
    if (!PyArg_ParseTuple(args, "KKKKKKLLii:rms_norm_backward", &dy, &x, &weight, &rstd, &dx, &dweight, &rows, &cols,
                          &dtype_code, &threads))
        return nullptr;
    DType dtype;
    if (!parse_dtype(dtype_code, &dtype) || !check_pointer("dy", dy) || !check_pointer("x", x) ||
        !check_pointer("weight", weight) || !check_pointer("rstd", rstd) || !check_pointer("dx", dx) ||
        !check_pointer("dweight", dweight) || !check_positive("rows", rows) || !check_positive("cols", cols) ||
        !check_positive("num_threads", threads))
        return nullptr;
    return run([&] {
        fastnest::rms_norm_backward(reinterpret_cast<const void*>(dy), reinterpret_cast<const void*>(x),
                                    reinterpret_cast<const void*>(weight), reinterpret_cast<const void*>(rstd),
                                    reinterpret_cast<void*>(dx), reinterpret_cast<void*>(dweight), rows, cols, dtype,
                                    threads);
    });
}

PyObject* swiglu_forward(PyObject*, PyObject* args) {
    unsigned long long gate, up, h;
    long long n;
    int dtype_code, threads;
    if (!PyArg_ParseTuple(args, "KKKLii:swiglu_forward", &gate, &up, &h, &n, &dtype_code, &threads)) return nullptr;
    DType dtype;
    if (!parse_dtype(dtype_code, &dtype) || !check_pointer("gate", gate) || !check_pointer("up", up) ||
        !check_pointer("h", h) || !check_positive("n", n) || !check_positive("num_threads", threads))
        return nullptr;
    return run([&] {
        fastnest::swiglu_forward(reinterpret_cast<const void*>(gate), reinterpret_cast<const void*>(up),
                                 reinterpret_cast<void*>(h), n, dtype, threads);
    });
}

PyObject* swiglu_backward(PyObject*, PyObject* args) {
    unsigned long long dh, gate, up, dgate, dup;
    long long n;
    int dtype_code, threads;
    if (!PyArg_ParseTuple(args, "KKKKKLii:swiglu_backward", &dh, &gate, &up, &dgate, &dup, &n, &dtype_code, &threads))
        return nullptr;
    DType dtype;
    if (!parse_dtype(dtype_code, &dtype) || !check_pointer("dh", dh) || !check_pointer("gate", gate) ||
        !check_pointer("up", up) || !check_pointer("dgate", dgate) || !check_pointer("dup", dup) ||
        !check_positive("n", n) || !check_positive("num_threads", threads))
        return nullptr;
    return run([&] {
        fastnest::swiglu_backward(reinterpret_cast<const void*>(dh), reinterpret_cast<const void*>(gate),
                                  reinterpret_cast<const void*>(up), reinterpret_cast<void*>(dgate),
                                  reinterpret_cast<void*>(dup), n, dtype, threads);
    });
}

PyObject* rotary(PyObject*, PyObject* args) {
    unsigned long long x, cos, sin, out;
    long long x_stride, tokens, heads, dim;
    int backward, dtype_code, threads;
    if (!PyArg_ParseTuple(args, "KLKKKLLLpii:rotary", &x, &x_stride, &cos, &sin, &out, &tokens, &heads, &dim,
                          &backward, &dtype_code, &threads))
        return nullptr;
    DType dtype;
    if (!parse_dtype(dtype_code, &dtype) || !check_pointer("x", x) || !check_pointer("cos", cos) ||
        !check_pointer("sin", sin) || !check_pointer("out", out) || !check_positive("tokens", tokens) ||
        !check_positive("heads", heads) || !check_positive("dim", dim) || !check_positive("num_threads", threads))
        return nullptr;
    if (dim % 2 != 0 || x_stride < heads * dim) {
        PyErr_Format(PyExc_ValueError, "dim %lld must be even and x_stride %lld at least heads * dim = %lld", dim,
                     x_stride, heads * dim);
        return nullptr;
    }
    return run([&] {
        fastnest::rotary(reinterpret_cast<const void*>(x), x_stride, reinterpret_cast<const void*>(cos),
                         reinterpret_cast<const void*>(sin), reinterpret_cast<void*>(out), tokens, heads, dim,
                         backward != 0, dtype, threads);
    });
}

template <typename T>
T* ptr(unsigned long long p) {
    return reinterpret_cast<T*>(p);
}

bool check_attention(long long seqs, long long heads, long long kv_heads, long long dim, long long window,
                     int threads) {
    if (!check_positive("seqs", seqs) || !check_positive("heads", heads) || !check_positive("kv_heads", kv_heads) ||
        !check_positive("dim", dim) || !check_positive("num_threads", threads))
        return false;
    if (window < 0) {
        PyErr_Format(PyExc_ValueError, "window must be >= 0 (0: none), got %lld", window);
        return false;
    }
    return true;
}

PyObject* attention_forward(PyObject*, PyObject* args) {
    unsigned long long q, k, v, key_rows, cu_q, cu_k, out, lse;
    long long q_stride, k_stride, v_stride, seqs, heads, kv_heads, dim, window;
    float scale;
    int threads;
    if (!PyArg_ParseTuple(args, "KLKLKLKKKLLLLfLKKi:attention_forward", &q, &q_stride, &k, &k_stride, &v, &v_stride,
                          &key_rows, &cu_q, &cu_k, &seqs, &heads, &kv_heads, &dim, &scale, &window, &out, &lse,
                          &threads))
        return nullptr;
    if (!check_attention(seqs, heads, kv_heads, dim, window, threads) || !check_pointer("q", q) ||
        !check_pointer("k", k) || !check_pointer("v", v) || !check_pointer("key_rows", key_rows) ||
        !check_pointer("cu_q", cu_q) || !check_pointer("cu_k", cu_k) || !check_pointer("out", out) ||
        !check_pointer("lse", lse))
        return nullptr;
    return run([&] {
        fastnest::attention_forward(ptr<const float>(q), q_stride, ptr<const float>(k), k_stride, ptr<const float>(v),
                                    v_stride, ptr<const int64_t>(key_rows), ptr<const int64_t>(cu_q),
                                    ptr<const int64_t>(cu_k), seqs, heads, kv_heads, dim, scale, window,
                                    ptr<float>(out), ptr<float>(lse), threads);
    });
}

PyObject* attention_backward(PyObject*, PyObject* args) {
    unsigned long long dout, q, k, v, out, lse, key_rows, cu_q, cu_k, dq, dk, dv;
    long long q_stride, k_stride, v_stride, seqs, heads, kv_heads, dim, window;
    float scale;
    int threads;
    if (!PyArg_ParseTuple(args, "KKLKLKLKKKKKLLLLfLKKKi:attention_backward", &dout, &q, &q_stride, &k, &k_stride, &v,
                          &v_stride, &out, &lse, &key_rows, &cu_q, &cu_k, &seqs, &heads, &kv_heads, &dim, &scale,
                          &window, &dq, &dk, &dv, &threads))
        return nullptr;
    if (!check_attention(seqs, heads, kv_heads, dim, window, threads) || !check_pointer("dout", dout) ||
        !check_pointer("q", q) || !check_pointer("k", k) || !check_pointer("v", v) || !check_pointer("out", out) ||
        !check_pointer("lse", lse) || !check_pointer("key_rows", key_rows) || !check_pointer("cu_q", cu_q) ||
        !check_pointer("cu_k", cu_k) || !check_pointer("dq", dq) || !check_pointer("dk", dk) ||
        !check_pointer("dv", dv))
        return nullptr;
    return run([&] {
        fastnest::attention_backward(ptr<const float>(dout), ptr<const float>(q), q_stride, ptr<const float>(k),
                                     k_stride, ptr<const float>(v), v_stride, ptr<const float>(out),
                                     ptr<const float>(lse), ptr<const int64_t>(key_rows), ptr<const int64_t>(cu_q),
                                     ptr<const int64_t>(cu_k), seqs, heads, kv_heads, dim, scale, window,
                                     ptr<float>(dq), ptr<float>(dk), ptr<float>(dv), threads);
    });
}

PyMethodDef methods[] = {
    {"gelu_forward", gelu_forward, METH_VARARGS,
     "gelu_forward(pre, bias, h, rows, cols, dtype, approximate, num_threads): h = gelu(pre + bias); with a bias "
     "(pointer != 0) pre becomes pre + bias. h may equal pre."},
    {"gelu_backward", gelu_backward, METH_VARARGS,
     "gelu_backward(grad, pre, n, dtype, approximate, num_threads): grad *= gelu'(pre), in place."},
    {"pool", pool, METH_VARARGS,
     "pool(y, bias, out, images, grid, channels, kernels, offsets, total, dtype, num_threads): every scale's "
     "average pooling of y + bias [images, grid*grid, channels] into out [images, total, channels], one pass."},
    {"fold", fold, METH_VARARGS,
     "fold(grad_out, grad_y, images, grid, channels, kernels, offsets, total, dtype, num_threads): the adjoint "
     "of pool, grad_y [images, grid*grid, channels]."},
    {"ce_grad", ce_grad, METH_VARARGS,
     "ce_grad(logits, row_stride, targets, coef, loss, rows, vocab, dtype, num_threads): per row of logits "
     "[rows, vocab], loss = logsumexp - logits[target] (fp32) and logits <- coef * (softmax - onehot(target)) in "
     "place; target -100: loss 0, zero row."},
    {"rms_norm_forward", rms_norm_forward, METH_VARARGS,
     "rms_norm_forward(x, weight, y, rstd, rows, cols, eps, dtype, num_threads): y = weight * x * rstd per row, "
     "rstd = 1 / sqrt(mean(x^2) + eps) (float32; float64 for float64)."},
    {"rms_norm_backward", rms_norm_backward, METH_VARARGS,
     "rms_norm_backward(dy, x, weight, rstd, dx, dweight, rows, cols, dtype, num_threads): the input and weight "
     "gradients of rms_norm_forward."},
    {"swiglu_forward", swiglu_forward, METH_VARARGS,
     "swiglu_forward(gate, up, h, n, dtype, num_threads): h = silu(gate) * up over n elements."},
    {"swiglu_backward", swiglu_backward, METH_VARARGS,
     "swiglu_backward(dh, gate, up, dgate, dup, n, dtype, num_threads): the gradients of swiglu_forward."},
    {"rotary", rotary, METH_VARARGS,
     "rotary(x, x_stride, cos, sin, out, tokens, heads, dim, backward, dtype, num_threads): out = x * cos + "
     "rotate_half(x) * sin per token (backward: the transposed map), out [tokens, heads, dim] contiguous."},
    {"attention_forward", attention_forward, METH_VARARGS,
     "attention_forward(q, q_stride, k, k_stride, v, v_stride, key_rows, cu_q, cu_k, seqs, heads, kv_heads, dim, "
     "scale, window, out, lse, num_threads): packed causal attention, float32 (kernels.h)."},
    {"attention_backward", attention_backward, METH_VARARGS,
     "attention_backward(dout, q, q_stride, k, k_stride, v, v_stride, out, lse, key_rows, cu_q, cu_k, seqs, heads, "
     "kv_heads, dim, scale, window, dq, dk, dv, num_threads): its gradients, dk/dv per key position."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "fastnest._C",
    "Native CPU kernels of fastnest (GELU, multi-scale pooling, fold, cross-entropy, RMSNorm, SwiGLU, rotary, attention); "
    "see fastnest/ops/*/native.py.",
    -1,
    methods, nullptr, nullptr, nullptr, nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
