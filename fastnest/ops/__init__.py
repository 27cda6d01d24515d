"""The kernel layer: one folder per op, each with its plain reference beside its kernels.

- ``pooling/``: multi-scale average pooling of a square token grid and its adjoint (the fold);
- ``projector/``: the projector (linear -> GELU -> linear) with the pooling fused into GEMM2;
- ``cross_entropy/``: the Matryoshka objective and the fused linear cross-entropy over logits chunks;
- ``decoder/``: the language model's RMSNorm, SwiGLU and rotary embedding, fused (native kernels; no triton.py:
  on CUDA fastnest/hf/lm_kernels.py applies Liger-Kernel's).

Each folder holds ``naive.py`` (the plain PyTorch reference the tests compare against), ``triton.py`` (Triton
kernels and their launchers), ``native.py`` (wrappers of the C++/OpenMP extension ``fastnest._C``, sources in
kernels/cpu/) and ``function.py`` (the autograd.Function, the public entry point and the table mapping a backend
name to its implementation). Kernel functions take row-major tensors, allocate their outputs and never build
autograd graphs. ``fastnest.dispatch.resolve_backend`` picks the backend name: a backend that is asked for runs
or raises with the reason. Imports: ops use only fastnest.constants, fastnest.scales, fastnest.dispatch and
each other; triton.py files are imported lazily, so fastnest imports where triton does not.
"""
