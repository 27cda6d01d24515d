"""``scale="auto"``: a learned scale router (``fastnest route`` fits it; ``model(..., scale="auto")`` uses it).

``head``: the router and its budget rule; ``fit``: fitting it; ``features``: the routing pass; ``files``: the
router on disk beside its model; ``auto``: routing a batch; ``tradeoff``: accuracy against tokens of fixed
scales, the oracle, the cascade and the router.
"""

from .auto import AUTO, attached_router, load_router, route_scales
from .features import FEATURES, routing_features
from .files import read_router, save_router
from .fit import FitOptions, fit_router, out_of_fold
from .head import Router, choose

__all__ = [
    "AUTO",
    "FEATURES",
    "FitOptions",
    "Router",
    "attached_router",
    "choose",
    "fit_router",
    "load_router",
    "out_of_fold",
    "read_router",
    "route_scales",
    "routing_features",
    "save_router",
]
