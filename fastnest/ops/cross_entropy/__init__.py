"""The Matryoshka objective and the fused linear cross-entropy: see fastnest/ops/__init__.py."""
