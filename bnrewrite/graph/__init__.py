"""Graph capture and the views that rules and passes work on."""

from .capture import capture
from .captured import Capture, Region
from .layers import LayerSite, layer_site
from .norms import BNSite, OtherNormSite, bn_site, other_norm_site
from .ops import node_shape, source_line
from .tracer import clone_graph_module
from .view import to_networkx

__all__ = [
    "BNSite",
    "Capture",
    "LayerSite",
    "OtherNormSite",
    "Region",
    "bn_site",
    "capture",
    "clone_graph_module",
    "layer_site",
    "node_shape",
    "other_norm_site",
    "source_line",
    "to_networkx",
]
