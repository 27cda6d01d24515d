"""The projector (linear -> GELU -> linear) with the multi-scale pooling fused in: see fastnest/ops/__init__.py."""
