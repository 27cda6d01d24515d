"""The language model's elementwise ops (RMSNorm, SwiGLU, rotary embedding), fused: see fastnest/ops/__init__.py."""
