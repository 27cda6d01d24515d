"""Multi-scale average pooling of a square token grid and its adjoint (the fold): see fastnest/ops/__init__.py."""
