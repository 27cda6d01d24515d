"""The one resolver: which backend runs an op (a kernel op or the packed attention) for given tensors.

It resolves names only; each op (fastnest/ops/*/function.py, fastnest/attention/varlen.py) maps the resolved name to
its implementation. A named backend runs or a ValueError says why it cannot; nothing falls back silently.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("triton", "native", "torch")  # the kernel ops' backends
OPS: dict[str, tuple[str, ...]] = {
    "projector": BACKENDS,
    "pooling": BACKENDS,
    "cross_entropy": BACKENDS,
    "attention": ("flash", "xformers", "flex", "native", "sdpa"),
    # the language model's fused RMSNorm / SwiGLU / rotary (fastnest/hf/lm_kernels.py): Liger-Kernel's (CUDA),
    # fastnest._C's (CPU), or the model's own code
    "lm_kernels": ("liger", "native", "torch"),
}
_CUDA_ONLY = {"flash": "flash_attn", "xformers": "xformers"}  # attention backend -> module it imports
_HALF = (torch.float16, torch.bfloat16)
FLASH_MIN_CAPABILITY = (8, 0)  # FlashAttention 2 runs on Ampere (sm80) and newer


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def native_error() -> str | None:
    """Why the native extension cannot be used (None when it can)."""
    try:
        from . import _C  # noqa: F401
    except ImportError as e:
        return f"the native extension fastnest._C is not built ({e}); reinstall fastnest with a C++ compiler and cmake"
    return None


def native_available() -> bool:
    return native_error() is None


def _process_error(op: str, backend: str) -> str | None:
    """Why ``backend`` of ``op`` cannot run in this process at all (None when it can)."""
    if op == "attention":
        if backend in _CUDA_ONLY:
            module = _CUDA_ONLY[backend]
            if importlib.util.find_spec(module) is None:
                return f"the {module} package is not installed (pip install {module.replace('_', '-')})"
            if not torch.cuda.is_available():
                return f"{module} runs on CUDA and torch.cuda.is_available() is False"
            if backend == "flash":
                return _capability_error(None)
        if backend == "flex" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
        return native_error() if backend == "native" else None
    if op == "lm_kernels" and backend == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "the liger_kernel package is not installed (pip install liger-kernel)"
        if not torch.cuda.is_available():
            return "Liger-Kernel's Triton kernels run on CUDA and torch.cuda.is_available() is False"
        return None
    if backend == "triton":
        return None if _triton_importable() else "triton is not installed"
    if backend == "native":
        return native_error()
    return None


def _kernel_error(backend: str, device: torch.device) -> str | None:
    """Why kernel backend ``backend`` cannot run on ``device`` (None when it can)."""
    reason = _process_error("kernel", backend)
    if reason is not None or backend == "torch":
        return reason
    if backend == "triton":
        if device.type != "cuda" and not triton_interpreting():
            return f"Triton kernels need CUDA tensors (got {device.type}; TRITON_INTERPRET=1 runs them on CPU)"
        return None
    if device.type != "cpu":
        return f"the native extension runs on CPU tensors, got {device.type}"
    return None


def _capability_error(device: torch.device | None) -> str | None:
    """Why FlashAttention 2 cannot run on ``device`` (the current CUDA device when None): its compute capability."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FLASH_MIN_CAPABILITY:
        want = "{}.{}".format(*FLASH_MIN_CAPABILITY)
        return f"FlashAttention 2 needs compute capability >= {want} (Ampere), this GPU has {major}.{minor}"
    return None


def _attention_error(backend: str, device: torch.device, dtype: torch.dtype | None, backward: bool) -> str | None:
    """Why attention ``backend`` (runnable in this process) cannot run these tensors (None when it can)."""
    if backend in _CUDA_ONLY and device.type != "cuda":
        return f"it runs on CUDA tensors, got {device.type}"
    if backend == "flash" and dtype not in _HALF:
        return f"FlashAttention takes float16/bfloat16, got {dtype}"
    if backend == "flash":
        return _capability_error(device)
    if backend == "native" and (device.type != "cpu" or dtype not in (None, torch.float32)):
        return f"fastnest._C's attention takes float32 CPU tensors, got {dtype} on {device.type}"
    if backend == "flex" and backward and device.type != "cuda":
        return f"FlexAttention's backward needs CUDA tensors, got {device.type} (its forward runs there)"
    return None


def _lm_kernels_error(backend: str, device: torch.device) -> str | None:
    """Why ``lm_kernels`` backend ``backend`` (runnable in this process) cannot run on ``device``."""
    wants = {"native": "cpu", "liger": "cuda"}.get(backend)
    if wants is not None and device.type != wants:
        return f"it runs on {wants} tensors, got {device.type}"
    return None


def _label(op: str) -> str:
    return op if op in ("attention", "lm_kernels") else "backend"


def check_backend(op: str, backend: str | None) -> str:
    """Validate a backend choice for ``op`` at patch time: None/``"auto"`` -> ``"auto"``; else the name.

    ValueError for an unknown op or name (the allowed ones are named) or a backend this process can never run
    (what is missing is named).
    """
    if op not in OPS:
        raise ValueError(f"op {op!r} is not one of {tuple(OPS)}")
    if backend is None or backend == "auto":
        return "auto"
    if backend not in OPS[op]:
        raise ValueError(f"{_label(op)} {backend!r} is not one of {('auto', *OPS[op])}")
    reason = _process_error(op, backend)
    if reason is not None:
        raise ValueError(f"{_label(op)} {backend!r} is unavailable: {reason}")
    return backend


def _auto_attention(device: torch.device, dtype: torch.dtype | None, backward: bool) -> str:
    if device.type != "cuda":
        # measured faster than SDPA at every packed length (bench/results/2026-12-02-cpu-native-attention/)
        return "native" if device.type == "cpu" and dtype == torch.float32 and native_available() else "sdpa"
    reasons = {}
    for candidate in ("flash", "xformers"):
        reason = _process_error("attention", candidate) or _attention_error(candidate, device, dtype, backward)
        if reason is None:
            return candidate
        reasons[candidate] = reason
    warnings.warn(
        "attention 'auto' on CUDA falls back to 'sdpa' (one scaled_dot_product_attention per packed sequence, "
        f"much slower than one varlen kernel): flash: {reasons['flash']}; xformers: {reasons['xformers']}. "
        "Install flash-attn or xformers, or pass attention='sdpa' to choose it explicitly",
        stacklevel=3,
    )
    return "sdpa"


def _auto(op: str, device: torch.device, dtype: torch.dtype | None) -> str:
    for candidate in ("triton", "native") if device.type == "cuda" else ("native",):
        if _kernel_error(candidate, device) is None:
            return candidate
    return "torch"


def resolve_backend(
    op: str,
    device: torch.device | str,
    backend: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    backward: bool = True,
) -> str:
    """The backend that runs ``op`` for tensors on ``device`` (attention also looks at ``dtype``/``backward``).

    Kernel ops, ``None``/``"auto"``: CUDA (with Triton) -> ``"triton"``; CPU -> ``"native"`` when
    ``fastnest._C`` is built, else ``"torch"``. ``lm_kernels``, auto: ``"native"`` on CPU when built, else
    ``"torch"`` (Liger's only when asked for). Attention, auto: on CUDA, flash (when installed and ``dtype`` is
    fp16/bf16 on compute capability >= 8.0), else xformers (when installed), else sdpa with a warning naming why
    neither could run; on CPU, float32: native (fastnest._C's, when built), else sdpa; elsewhere sdpa;
    FlexAttention only when asked for.
    A named backend is returned as is, or ValueError says why it cannot run; nothing falls back silently.
    """
    device = torch.device(device)
    name = check_backend(op, backend)
    if name == "auto" and op == "lm_kernels":  # measured faster on CPU (bench/results/2026-12-02-cpu-step-kernels.md)
        return "native" if device.type == "cpu" and native_available() else "torch"
    if name == "auto":
        return _auto_attention(device, dtype, backward) if op == "attention" else _auto(op, device, dtype)
    if op == "lm_kernels":
        reason = _lm_kernels_error(name, device)
        if reason is not None:
            raise ValueError(f"lm_kernels {name!r} cannot run here: {reason}; use lm_kernels='auto' or 'torch'")
        return name
    if op == "attention":
        reason = _attention_error(name, device, dtype, backward)
        if reason is not None:
            raise ValueError(f"attention {name!r} cannot run here: {reason}; use attention='sdpa' or 'auto'")
        return name
    reason = _kernel_error(name, device)
    if reason is not None:
        raise ValueError(f"backend {name!r} is unavailable: {reason}")
    return name
