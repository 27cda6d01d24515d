"""Kernel layer: raw kernels (Triton, native) and the tensor-level functions that launch them.

Autograd and dispatch live one level up (``fastnest/projector.py``, ``fastnest/dispatch.py``).
"""
